//! `crmcube load`: extract → clean → derive → commit, as one warehouse snapshot.
//!
//! Sources load in reference order (a referenced table first), derived tables in the order their
//! SQL needs. Everything is computed before anything is written; then each table becomes a new
//! Delta version and, last, the snapshot manifest naming those versions is committed. A load that
//! exceeds a reject threshold, fails or is killed leaves the previous snapshot what readers see.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::prelude::SessionContext;
use rayon::prelude::*;
use serde::Serialize;

use super::clean::{clean, count_rows};
use super::extract::{Extracted, Reject, extract};
use super::validate::{TransformBody, TransformSet};
use crate::error::{DataError, Error, Result};
use crate::project::Project;
use crate::warehouse::{Snapshot, SourceFile, TableEntry, Warehouse};

/// Name of the quarantine table in the warehouse.
pub const QUARANTINE_TABLE: &str = "quarantine";

/// What happened to one table in a load.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    /// `source` or `derived`.
    pub kind: &'static str,
    /// Records read from the export(s); for derived tables, rows produced.
    pub read: u64,
    pub loaded: u64,
    pub quarantined: u64,
    /// Rows superseded by a later row with the same key.
    pub duplicates: u64,
    /// Time spent on this table (extraction is shared and counted in the load's total).
    pub millis: u64,
}

/// The outcome of a load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub snapshot: u64,
    pub tables: Vec<TableReport>,
    /// Export files compared with the ones the previous snapshot was loaded from.
    pub files: FilesReport,
    pub seconds: f64,
}

/// Export files of this load against the previous snapshot's (paths under the sources folder).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FilesReport {
    pub read: usize,
    /// Not in the previous snapshot.
    pub new: Vec<String>,
    /// Same path, different content: an export rewritten after it was loaded.
    pub changed: Vec<String>,
    /// In the previous snapshot, not matched tonight.
    pub gone: Vec<String>,
    /// The snapshot compared with.
    pub since: Option<u64>,
}

impl FilesReport {
    fn compare(now: &BTreeMap<String, SourceFile>, previous: Option<&Snapshot>) -> Self {
        let empty = BTreeMap::new();
        let before = previous.map(|s| &s.files).unwrap_or(&empty);
        let mut r = FilesReport { read: now.len(), since: previous.map(|s| s.id), ..Default::default() };
        for (path, f) in now {
            match before.get(path) {
                None => r.new.push(path.clone()),
                Some(b) if b.sha256 != f.sha256 => r.changed.push(path.clone()),
                Some(_) => {}
            }
        }
        r.gone = before.keys().filter(|p| !now.contains_key(*p)).cloned().collect();
        r
    }
}

impl LoadReport {
    pub fn table(&self, name: &str) -> Option<&TableReport> {
        self.tables.iter().find(|t| t.table == name)
    }
}

/// The columns of the quarantine table.
pub fn quarantine_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("source_file", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("column_name", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
    ]))
}

/// Choices a scheduler can make per run.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Source tables that may load empty although the current snapshot holds rows.
    pub allow_empty: Vec<String>,
}

/// Loads the project's sources into its warehouse and commits one snapshot.
pub async fn load(project: &Project, warehouse: &Warehouse) -> Result<LoadReport> {
    load_with(project, warehouse, &LoadOptions::default()).await
}

/// [`load`] with options.
///
/// Every table is a full refresh, so an export that arrives empty (a failed extract upstream, a
/// truncated transfer) would wipe its table. Such a load stops before committing unless the
/// table is named in `allow_empty`.
pub async fn load_with(project: &Project, warehouse: &Warehouse, options: &LoadOptions) -> Result<LoadReport> {
    let started = Instant::now();
    let set = TransformSet::load(project)?;
    for name in &options.allow_empty {
        if !matches!(set.get(name).map(|t| &t.body), Some(TransformBody::Source(_))) {
            let sources = set.transforms.iter().filter(|t| matches!(t.body, TransformBody::Source(_))).map(|t| t.name.as_str());
            return Err(crate::error::QueryError::new(format!("--allow-empty {name}: not a source table"))
                .with_hint(Some(crate::error::valid_names_hint("source tables", name, sources)))
                .into());
        }
    }
    let _lock = warehouse.lock()?;
    let previous = warehouse.current()?;
    let ctx = warehouse.context()?;

    // Extract every source in parallel: decoding and splitting is CPU work outside DataFusion.
    let sources: Vec<_> = set
        .transforms
        .iter()
        .filter_map(|t| match &t.body {
            TransformBody::Source(s) => Some((t, s)),
            TransformBody::Derived { .. } => None,
        })
        .collect();
    let extracted: Vec<Extracted> = sources
        .par_iter()
        .map(|(t, s)| extract(&t.name, s, &project.sources, &project.root))
        .collect::<Result<_>>()?;
    for (t, _) in &sources {
        crate::fault::point(&format!("extracted {}", t.name));
    }
    let files: BTreeMap<String, SourceFile> =
        extracted.iter().flat_map(|e| e.sources.iter().map(|f| (f.path.clone(), f.clone()))).collect();
    let files_report = FilesReport::compare(&files, previous.as_ref());
    for path in &files_report.changed {
        tracing::warn!(file = %path, since = ?files_report.since, "export file changed since the previous snapshot loaded it");
    }

    let mut reports = Vec::new();
    let mut outputs: Vec<(String, SchemaRef, Vec<RecordBatch>)> = Vec::new();
    let mut quarantine: Vec<RecordBatch> = Vec::new();
    for ((t, spec), ex) in sources.iter().zip(extracted) {
        let table_started = Instant::now();
        let cleaned = clean(&ctx, &t.name, spec, ex.batch).await?;
        crate::fault::point(&format!("cleaned {}", t.name));
        let quarantined = cleaned.quarantined + ex.rejects.len() as u64;
        let report = TableReport {
            table: t.name.clone(),
            kind: "source",
            read: ex.read,
            loaded: cleaned.loaded,
            quarantined,
            duplicates: cleaned.duplicates,
            millis: table_started.elapsed().as_millis() as u64,
        };
        tracing::info!(table = %t.name, read = report.read, loaded = report.loaded, quarantined, duplicates = report.duplicates, "cleaned");
        let had = previous.as_ref().and_then(|s| s.tables.get(&t.name)).map(|e| e.rows).unwrap_or(0);
        if report.read == 0 && had > 0 && !options.allow_empty.contains(&t.name) {
            return Err(DataError::EmptySource { table: t.name.clone(), previous: had }.into());
        }
        if report.read != report.loaded + report.quarantined + report.duplicates {
            return Err(Error::Internal(format!("row accounting does not add up for table '{}': {report:?}", t.name)));
        }
        if quarantined as f64 > spec.reject_threshold * report.read as f64 {
            return Err(DataError::RejectThreshold {
                table: t.name.clone(),
                spec: t.file.display().to_string(),
                rejected: quarantined,
                read: report.read,
                threshold: spec.reject_threshold,
            }
            .into());
        }
        quarantine.push(rejects_batch(&ex.rejects)?);
        quarantine.extend(cleaned.rejected);
        let schema = cleaned.schema.clone();
        ctx.register_batch(t.name.as_str(), datafusion::arrow::compute::concat_batches(&schema, &cleaned.rows)?)?;
        outputs.push((t.name.clone(), schema, cleaned.rows));
        reports.push(report);
    }

    // Derived tables, each once all the tables its SQL reads are registered.
    let mut pending: Vec<(String, String)> = set
        .transforms
        .iter()
        .filter_map(|t| match &t.body {
            TransformBody::Derived { sql } => Some((t.name.clone(), sql.clone())),
            TransformBody::Source(_) => None,
        })
        .collect();
    let pending_names: BTreeSet<String> = pending.iter().map(|(n, _)| n.clone()).collect();
    let mut done: BTreeSet<String> = outputs.iter().map(|(n, _, _)| n.clone()).collect();
    while !pending.is_empty() {
        let mut progressed = false;
        let mut i = 0;
        while i < pending.len() {
            let (name, sql) = &pending[i];
            let inputs = referenced_tables(&ctx, sql)?;
            if inputs.iter().any(|t| pending_names.contains(t) && !done.contains(t)) {
                i += 1;
                continue;
            }
            let table_started = Instant::now();
            let df = ctx.sql(sql).await.map_err(|e| derived_error(&set, name, e))?;
            let schema = Arc::new(df.schema().as_arrow().clone());
            let rows = df.collect().await.map_err(|e| derived_error(&set, name, e))?;
            ctx.register_batch(name.as_str(), datafusion::arrow::compute::concat_batches(&schema, &rows)?)?;
            crate::fault::point(&format!("derived {name}"));
            let n = count_rows(&rows);
            let millis = table_started.elapsed().as_millis() as u64;
            tracing::info!(table = %name, rows = n, "derived");
            reports.push(TableReport { table: name.clone(), kind: "derived", read: n, loaded: n, quarantined: 0, duplicates: 0, millis });
            outputs.push((name.clone(), schema, rows));
            done.insert(name.clone());
            pending.remove(i);
            progressed = true;
        }
        if !progressed {
            let names: Vec<_> = pending.iter().map(|(n, _)| n.as_str()).collect();
            return Err(DataError::Input {
                file: project.display_path(&project.transforms),
                line: None,
                message: format!("derived tables depend on each other in a cycle: {}", names.join(", ")),
            }
            .into());
        }
    }
    outputs.push((QUARANTINE_TABLE.to_string(), quarantine_schema(), quarantine));

    // Lifetime value models, fitted over the whole customer base (see etl::models).
    if set.get("fact_sales").is_some() {
        let table_started = Instant::now();
        for (name, schema, rows) in super::models::clv_tables(&ctx).await? {
            crate::fault::point(&format!("fitted {name}"));
            let n = count_rows(&rows);
            tracing::info!(table = %name, rows = n, "derived");
            reports.push(TableReport { table: name.clone(), kind: "model", read: n, loaded: n, quarantined: 0, duplicates: 0, millis: table_started.elapsed().as_millis() as u64 });
            outputs.push((name, schema, rows));
        }
    }

    // Rollups, from the tables just derived (see crate::rollup).
    let cubes = crate::cube::CubeSet::load(project, &set)?;
    let mut partitions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for cube in &cubes.cubes {
        for rollup in &cube.rollups {
            let table_started = Instant::now();
            let df = crate::rollup::build(&ctx, cube, rollup).await?;
            let schema = Arc::new(df.schema().as_arrow().clone());
            let rows = df.collect().await?;
            crate::fault::point(&format!("built {}", rollup.table));
            let n = count_rows(&rows);
            tracing::info!(table = %rollup.table, rows = n, "derived");
            reports.push(TableReport {
                table: rollup.table.clone(),
                kind: "rollup",
                read: n,
                loaded: n,
                quarantined: 0,
                duplicates: 0,
                millis: table_started.elapsed().as_millis() as u64,
            });
            partitions.insert(rollup.table.clone(), rollup.partition_column(cube).into_iter().collect());
            outputs.push((rollup.table.clone(), schema, rows));
        }
    }

    // Commit: every table first, then the snapshot that names them.
    let mut entries = BTreeMap::new();
    for (name, schema, rows) in outputs {
        let n = count_rows(&rows);
        let partition = partitions.get(&name).map(Vec::as_slice).unwrap_or(&[]);
        let version = warehouse.write_partitioned(&name, schema, rows, partition).await?;
        crate::fault::point(&format!("wrote {name}"));
        tracing::info!(table = %name, version, rows = n, "written");
        entries.insert(name, TableEntry { version, rows: n });
    }
    let snapshot: Snapshot = warehouse.commit(entries, files, crate::rollup::fingerprints(&cubes))?;
    tracing::info!(snapshot = snapshot.id, "snapshot committed");
    Ok(LoadReport { snapshot: snapshot.id, tables: reports, files: files_report, seconds: started.elapsed().as_secs_f64() })
}

/// Names of the tables a SQL statement reads.
fn referenced_tables(ctx: &SessionContext, sql: &str) -> Result<Vec<String>> {
    let state = ctx.state();
    let statement = state.sql_to_statement(sql, &datafusion::config::Dialect::Generic)?;
    let refs = state.resolve_table_references(&statement)?;
    Ok(refs.iter().map(|r| r.table().to_string()).collect())
}

fn derived_error(set: &TransformSet, table: &str, e: datafusion::error::DataFusionError) -> Error {
    let file = set.get(table).map(|t| t.file.display().to_string()).unwrap_or_default();
    Error::Spec(crate::error::SpecErrors(vec![crate::error::Diagnostic {
        file: file.into(),
        line: 0,
        column: 0,
        key: format!("table '{table}' › sql"),
        message: e.to_string(),
        hint: Some("fix the SELECT; `crmcube sql` runs it over the current snapshot".into()),
    }]))
}

/// Quarantine rows for records rejected while reading the export.
fn rejects_batch(rejects: &[Reject]) -> Result<RecordBatch> {
    use datafusion::arrow::array::{Int64Array, StringArray};
    Ok(RecordBatch::try_new(
        quarantine_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.table.as_str()))),
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.file.as_str()))),
            Arc::new(Int64Array::from_iter_values(rejects.iter().map(|r| r.line))),
            Arc::new(StringArray::from_iter(rejects.iter().map(|r| r.column.as_deref()))),
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.reason.as_str()))),
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.raw.as_str()))),
        ],
    )?)
}
