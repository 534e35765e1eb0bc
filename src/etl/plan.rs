//! Every table of a project planned over no rows: what `crmcube check` finds in the derived
//! tables' SQL without loading anything.
//!
//! Source tables are registered empty with the types cleaning gives their declared columns, each
//! history with the columns its SQL adds, and each derived table, in dependency order, with the
//! columns of its SELECT as DataFusion plans it — the same planner and types a load uses, so a
//! SELECT that plans here plans in the load. A SELECT that does not plan (a misspelled column or
//! table, a type error) is a problem at its file's `sql:` line; its dependents are not planned
//! (their one problem is that one). A `grows_with` or `refresh_by` the SELECT does not allow is a
//! warning: the load recomputes the table in full every night instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use super::validate::{TransformBody, TransformSet};
use crate::error::{Diagnostic, Result, valid_names_hint};
use crate::project::Project;

/// What planning every table found.
#[derive(Debug, Default)]
pub struct Planned {
    /// Each planned table's columns, by table.
    pub columns: BTreeMap<String, Vec<String>>,
    pub problems: Vec<Diagnostic>,
    /// A refresh the SELECT does not allow, with why, by table.
    pub warnings: Vec<String>,
}

/// Plans every table of `set` in `ctx` (a fresh warehouse context: it registers the tables).
pub async fn plan_tables(project: &Project, ctx: &SessionContext, set: &TransformSet) -> Result<Planned> {
    let mut planned = Planned::default();
    let register = |planned: &mut Planned, name: &str, schema: SchemaRef| -> Result<()> {
        ctx.register_table(name, Arc::new(MemTable::try_new(schema.clone(), vec![vec![RecordBatch::new_empty(schema.clone())]])?))?;
        planned.columns.insert(name.to_string(), schema.fields().iter().map(|f| f.name().clone()).collect());
        Ok(())
    };
    for t in &set.transforms {
        match &t.body {
            TransformBody::Source(spec) => register(&mut planned, &t.name, super::clean::table_schema(ctx, spec)?)?,
            TransformBody::History(h) => {
                let sql = super::load::history_sql(ctx, h, None).await?;
                let schema = Arc::new(ctx.sql(&sql).await?.schema().as_arrow().clone());
                register(&mut planned, &t.name, schema)?;
            }
            TransformBody::Derived { .. } => {}
        }
    }

    // Derived tables once the tables they read are planned; not at all when one of those failed.
    let mut pending: Vec<_> = set.transforms.iter().filter(|t| matches!(t.body, TransformBody::Derived { .. })).collect();
    let names: BTreeSet<&str> = set.transforms.iter().map(|t| t.name.as_str()).chain(super::models::TABLES).collect();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    while !pending.is_empty() {
        let before = pending.len();
        let mut waiting = Vec::new();
        for t in pending {
            let TransformBody::Derived { sql, grows_with, refresh_by } = &t.body else { continue };
            let problem = |message: String, hint: Option<String>| Diagnostic {
                file: t.file.clone(),
                line: sql_line(project, &t.file),
                column: 1,
                key: format!("table '{}' › sql", t.name),
                message,
                hint,
            };
            let inputs = match super::load::referenced_tables(ctx, sql) {
                Ok(inputs) => inputs,
                Err(e) => {
                    planned.problems.push(problem(e.to_string(), None));
                    failed.insert(t.name.clone());
                    continue;
                }
            };
            if inputs.iter().any(|i| failed.contains(i)) {
                failed.insert(t.name.clone());
                continue;
            }
            if inputs.iter().any(|i| names.contains(i.as_str()) && !planned.columns.contains_key(i) && !super::models::TABLES.contains(&i.as_str())) {
                waiting.push(t);
                continue;
            }
            if let Some(unknown) = inputs.iter().find(|i| !names.contains(i.as_str())) {
                let hint = valid_names_hint("tables", unknown, names.iter().copied());
                planned.problems.push(problem(format!("table '{unknown}' not found"), Some(hint)));
                failed.insert(t.name.clone());
                continue;
            }
            let df = match ctx.sql(sql).await {
                Ok(df) => df,
                Err(e) => {
                    planned.problems.push(problem(e.to_string(), Some("fix the SELECT; `crmcube sql` runs it over the current snapshot".into())));
                    failed.insert(t.name.clone());
                    continue;
                }
            };
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            planned.problems.extend(super::load::layout_problems(t, &schema, sql_line(project, &t.file), 1));
            let plan = df.into_unoptimized_plan();
            if let Some(driver) = grows_with
                && let Some(why) = super::load::not_row_wise(&plan, driver, &inputs)
            {
                planned.warnings.push(format!("{}: table '{}' › grows_with {driver}: {why}; the load recomputes the table in full every night", t.file.display(), t.name));
            }
            if let Some(by) = refresh_by
                && let Some(why) = super::keyed::not_keyed(&plan, &by.table, &by.key, &inputs)
            {
                planned
                    .warnings
                    .push(format!("{}: table '{}' › refresh_by {}.{}: {why}; the load recomputes the table in full every night", t.file.display(), t.name, by.table, by.key));
            }
            register(&mut planned, &t.name, schema)?;
        }
        if waiting.len() == before {
            let names: Vec<&str> = waiting.iter().map(|t| t.name.as_str()).collect();
            for t in &waiting {
                planned.problems.push(Diagnostic {
                    file: t.file.clone(),
                    line: sql_line(project, &t.file),
                    column: 1,
                    key: format!("table '{}' › sql", t.name),
                    message: format!("derived tables depend on each other in a cycle: {}", names.join(", ")),
                    hint: None,
                });
            }
            break;
        }
        pending = waiting;
    }
    Ok(planned)
}

/// The line of a transform file's `sql:` key (0 when the file cannot be read).
fn sql_line(project: &Project, file: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(project.root.join(file)).unwrap_or_default();
    text.lines().position(|l| l.starts_with("sql:")).map_or(0, |i| i as u64 + 1)
}
