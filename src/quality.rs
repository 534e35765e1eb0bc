//! `crmcube quality`: which rules the exports broke, per table, over the last loads.
//!
//! Every snapshot holds the quarantine as it stood after that load (rows of tables rebuilt that
//! night replaced, rows of kept or incremental tables carried over), each row with the `rule` it
//! broke (see [`crate::etl::load::quarantine_schema`]). The report reads the quarantine at each
//! of the last N snapshots — older Delta versions, no export re-read — and counts rows by table
//! and rule, so a rule whose count jumps tonight stands out; then a few sample rows of each
//! (table, rule) from the newest snapshot, with file, line, column and reason, to fix the export.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::SessionContext;

use crate::error::{Error, QueryError, Result};
use crate::etl::QUARANTINE_TABLE;
use crate::warehouse::Warehouse;

/// The quality report: counts by table × rule × snapshot, and sample rows.
#[derive(Debug)]
pub struct Quality {
    /// Snapshot ids, oldest first: the count columns of `counts`.
    pub snapshots: Vec<u64>,
    /// `table_name, rule, "#<id>"…, change, rows` — one row per (table, rule) seen in any of the
    /// snapshots; `change` is the newest count minus the one before; `rows` the table's rows in
    /// the newest snapshot (what loaded, to weigh the quarantined against).
    pub counts: RecordBatch,
    /// `table_name, rule, source_file, line, column_name, reason` from the newest snapshot.
    pub samples: RecordBatch,
}

/// Reads the quarantine of the last `loads` snapshots; `table` keeps one table's rows.
pub async fn quality(warehouse: &Warehouse, loads: usize, table: Option<&str>, samples: usize) -> Result<Quality> {
    if loads == 0 {
        return Err(QueryError::new("--loads 0: nothing to compare; give the number of recent loads to read (default 7)").into());
    }
    let all = warehouse.snapshots()?;
    if all.is_empty() {
        return Err(QueryError::new("the warehouse has no snapshot yet: run `crmcube load` first").into());
    }
    let recent = &all[all.len().saturating_sub(loads)..];
    let newest = recent.last().expect("not empty");
    if let Some(t) = table
        && !recent.iter().any(|s| s.tables.contains_key(t))
    {
        let names = newest.tables.keys().map(String::as_str).filter(|n| *n != QUARANTINE_TABLE);
        return Err(QueryError::new(format!("--table {t}: no such table in the last {} snapshot(s)", recent.len()))
            .with_hint(Some(crate::error::valid_names_hint("tables", t, names)))
            .into());
    }

    let ctx = warehouse.context()?;
    let mut counts: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for (i, s) in recent.iter().enumerate() {
        let Some(entry) = s.tables.get(QUARANTINE_TABLE) else { continue };
        let name = format!("__quarantine_{}", s.id);
        ctx.register_table(name.as_str(), warehouse.provider(&ctx, QUARANTINE_TABLE, entry.version).await?)?;
        let rule = rule_column(&ctx, &name).await?;
        let rows = ctx
            .sql(&format!("SELECT table_name, {rule} AS rule, count(*) AS n FROM {name} {} GROUP BY 1, 2", where_table(table)))
            .await?
            .collect()
            .await?;
        for b in &rows {
            let (t, r) = (utf8(b.column(0))?, utf8(b.column(1))?);
            let (t, r) = (strings(&t)?, strings(&r)?);
            let n = b.column(2).as_any().downcast_ref::<Int64Array>().ok_or_else(|| internal("count"))?;
            for row in 0..b.num_rows() {
                counts.entry((t.value(row).to_string(), r.value(row).to_string())).or_insert_with(|| vec![0; recent.len()])[i] = n.value(row);
            }
        }
    }

    let mut fields = vec![Field::new("table_name", DataType::Utf8, false), Field::new("rule", DataType::Utf8, false)];
    fields.extend(recent.iter().map(|s| Field::new(format!("#{}", s.id), DataType::Int64, false)));
    fields.extend([Field::new("change", DataType::Int64, false), Field::new("rows", DataType::Int64, true)]);
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(counts.keys().map(|(t, _)| t.as_str()))),
        Arc::new(StringArray::from_iter_values(counts.keys().map(|(_, r)| r.as_str()))),
    ];
    for i in 0..recent.len() {
        columns.push(Arc::new(Int64Array::from_iter_values(counts.values().map(|v| v[i]))));
    }
    let last = recent.len() - 1;
    columns.push(Arc::new(Int64Array::from_iter_values(counts.values().map(|v| if last == 0 { v[0] } else { v[last] - v[last - 1] }))));
    columns.push(Arc::new(Int64Array::from_iter(counts.keys().map(|(t, _)| newest.tables.get(t).map(|e| e.rows as i64)))));
    let counts = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;

    let samples = match newest.tables.get(QUARANTINE_TABLE) {
        Some(_) if samples > 0 => sample_rows(&ctx, newest.id, table, samples).await?,
        _ => RecordBatch::new_empty(Arc::new(sample_schema())),
    };
    Ok(Quality { snapshots: recent.iter().map(|s| s.id).collect(), counts, samples })
}

/// Up to `n` rows of each (table, rule) of one snapshot's quarantine, in file and line order.
async fn sample_rows(ctx: &SessionContext, snapshot: u64, table: Option<&str>, n: usize) -> Result<RecordBatch> {
    let name = format!("__quarantine_{snapshot}");
    let rule = rule_column(ctx, &name).await?;
    let batches = ctx
        .sql(&format!(
            "SELECT table_name, rule, source_file, line, column_name, reason FROM (
                 SELECT table_name, {rule} AS rule, source_file, line, column_name, reason,
                        row_number() OVER (PARTITION BY table_name, {rule} ORDER BY source_file, line) AS k
                 FROM {name} {}) WHERE k <= {n} ORDER BY table_name, rule, source_file, line",
            where_table(table)
        ))
        .await?
        .collect()
        .await?;
    let schema = Arc::new(sample_schema());
    // The Parquet reader hands text as Utf8View; the report's schema is plain Utf8.
    let mut typed = Vec::new();
    for b in batches {
        let columns = b.columns().iter().zip(schema.fields()).map(|(c, f)| cast(c, f.data_type())).collect::<std::result::Result<Vec<_>, _>>()?;
        typed.push(RecordBatch::try_new(schema.clone(), columns)?);
    }
    Ok(datafusion::arrow::compute::concat_batches(&schema, &typed)?)
}

/// The SQL for a registered quarantine's rule: the column, or `'unclassified'` for a quarantine
/// written before the column existed.
async fn rule_column(ctx: &SessionContext, name: &str) -> Result<&'static str> {
    let has_rule = ctx.table(name).await?.schema().has_column_with_unqualified_name("rule");
    Ok(if has_rule { "rule" } else { "'unclassified'" })
}

fn sample_schema() -> Schema {
    Schema::new(vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("source_file", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("column_name", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
    ])
}

fn where_table(table: Option<&str>) -> String {
    table.map(|t| format!("WHERE table_name = '{}'", t.replace('\'', "''"))).unwrap_or_default()
}

fn utf8(a: &ArrayRef) -> Result<ArrayRef> {
    Ok(cast(a, &DataType::Utf8)?)
}

fn strings(a: &ArrayRef) -> Result<&StringArray> {
    a.as_any().downcast_ref::<StringArray>().ok_or_else(|| internal("text column"))
}

fn internal(what: &str) -> Error {
    Error::Internal(format!("quality: unexpected type of the quarantine's {what}"))
}
