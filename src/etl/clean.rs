//! Clean: text → typed, validated, de-duplicated rows, as DataFusion plans.
//!
//! For each declared column the plan trims the text, blanks empty values, normalises case,
//! parses the type ([`super::parse`]) and checks the rules (required, range, enum, pattern).
//! A row with any failing column goes to quarantine with a reason naming each column and value;
//! the rest are de-duplicated by key (latest `duplicates.latest_by` wins, then the later line)
//! and checked against the tables they reference. Nothing is dropped without being counted.

use datafusion::arrow::array::RecordBatch;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::{JoinType, ScalarValue};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::functions::expr_fn::{btrim, concat, concat_ws, lower, nullif, regexp_like, upper};
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{ExprFunctionExt, SortExpr, case};
use datafusion::prelude::*;

use super::extract::{FILE_COL, LINE_COL, RAW_COL};
use super::parse::{date_expr, decimal_expr, timestamp_expr};
use super::spec::{Case, ColumnType};
use super::validate::{Column, SourceTransform};
use crate::error::Result;

const REASON_COL: &str = "_reason";
const COLUMN_COL: &str = "_column";
const RULE_COL: &str = "_rule";
const RN_COL: &str = "_rn";

/// The outcome of cleaning one source table.
#[derive(Debug)]
pub struct Cleaned {
    /// The typed table's schema (also when no row passed).
    pub schema: SchemaRef,
    /// Typed rows that passed every rule (declared columns only).
    pub rows: Vec<RecordBatch>,
    /// Quarantine rows (see [`crate::etl::load::quarantine_schema`] for the columns).
    pub rejected: Vec<RecordBatch>,
    pub loaded: u64,
    pub quarantined: u64,
    pub duplicates: u64,
}

/// Records typed at a time: the typed rows of one slice, with their reasons, are held beside
/// the text, not the whole table's.
const TYPED_SLICE_ROWS: usize = 1 << 20;

/// Runs the cleaning plan of one source over its extracted text.
///
/// Referenced tables must already be registered in `ctx` under their warehouse names. `text_memory`
/// (the extracted batch's reservation, if any) is shrunk to the record texts once every field is
/// typed: the fields' own text is no longer held then.
pub async fn clean(ctx: &SessionContext, table: &str, spec: &SourceTransform, raw: RecordBatch, text_memory: Option<&MemoryReservation>) -> Result<Cleaned> {
    clean_in_slices(ctx, table, spec, raw, text_memory, TYPED_SLICE_ROWS).await
}

/// [`clean`], typing `slice_rows` records at a time.
async fn clean_in_slices(
    ctx: &SessionContext,
    table: &str,
    spec: &SourceTransform,
    raw: RecordBatch,
    text_memory: Option<&MemoryReservation>,
    slice_rows: usize,
) -> Result<Cleaned> {
    // Each record's text, by file and line (the same buffers, not a copy): only rejected rows
    // need it, joined back at the end, so no cleaning step copies it along with its rows.
    let schema = raw.schema();
    let texts = raw.project(&[schema.index_of(FILE_COL)?, schema.index_of(LINE_COL)?, schema.index_of(RAW_COL)?])?;
    // Each step's rows are materialised, and counted in the session's memory pool while the
    // next step is computed from them (two steps' rows at a time at most).
    let mut working = Working::new(ctx, table);

    // Typing is row by row, so it runs a slice at a time: each slice's rejected rows are
    // collected at once (they are few) and its valid rows, in the declared columns with their
    // file and line, are kept. The text of the fields is dropped after the last slice.
    let mut rejected_rows = Vec::new();
    let mut valid = Vec::new();
    let mut valid_schema = None;
    let mut kept: Vec<Expr> = spec.columns.iter().map(|c| col(c.name.as_str())).collect();
    kept.extend([col(FILE_COL), col(LINE_COL)]);
    // An empty export is one empty slice (its plan gives the typed schema).
    let starts: Vec<usize> = (0..raw.num_rows().max(1)).step_by(slice_rows).collect();
    for offset in starts {
        let slice = raw.slice(offset, slice_rows.min(raw.num_rows() - offset));
        let typed = typed_with_reasons(ctx.read_batch(slice)?, spec)?;
        let typed = crate::warehouse::materialize(ctx, typed).await?;
        rejected_rows.extend(
            quarantine_rows(typed.clone().filter(col(REASON_COL).is_not_null())?, table, col(COLUMN_COL), col(RULE_COL), col(REASON_COL))?
                .collect()
                .await?,
        );
        let good = typed.filter(col(REASON_COL).is_null())?.select(kept.clone())?;
        let good_schema: SchemaRef = Arc::new(good.schema().as_arrow().clone());
        // One batch a slice, its buffers sized to the rows: the filtered batches' buffers were
        // sized for the rows before the filter.
        let batches = good.collect().await?;
        let batch = datafusion::arrow::compute::concat_batches(&good_schema, &batches)?;
        drop(batches);
        working.hold(std::slice::from_ref(&batch))?;
        valid.push(batch);
        valid_schema = Some(good_schema);
    }
    drop(raw);
    if let Some(memory) = text_memory {
        memory.resize(crate::warehouse::memory_size(std::slice::from_ref(&texts)));
    }
    let valid_schema = valid_schema.ok_or_else(|| crate::error::Error::Internal("no slice typed".into()))?;
    let mut good = ctx.read_batches(crate::warehouse::with_empty(&valid_schema, valid))?;
    let mut duplicates = 0u64;

    // Ranking sorts every row by key; most exports have no repeated key at all, which a grouped
    // count finds much faster (and then there is nothing to rank).
    if !spec.key.is_empty() && has_repeated_key(good.clone(), spec).await? {
        let ranked = working.materialize(rank_by_key(good, spec)?).await?;
        let extra = ranked.clone().filter(col(RN_COL).gt(lit(1u64)))?;
        match &spec.latest_by {
            // Superseded rows are resolved duplicates: counted, not quarantined.
            Some(_) => duplicates = extra.count().await? as u64,
            None => rejected_rows.extend(
                quarantine_rows(
                    extra,
                    table,
                    lit(spec.key.join(",")),
                    lit("duplicate"),
                    concat(
                        std::iter::once(lit(format!("duplicate key ({}) = ", spec.key.join(","))))
                            .chain(spec.key.iter().map(|k| cast(col(k.as_str()), DataType::Utf8)))
                            .chain(std::iter::once(lit("; the first row in file order was kept")))
                            .collect(),
                    ),
                )?
                .collect()
                .await?,
            ),
        }
        good = ranked.filter(col(RN_COL).eq(lit(1u64)))?;
    }

    for r in &spec.references {
        let parent = ctx
            .table(r.table.as_str())
            .await?
            .select(vec![col(r.key.as_str()).alias("_ref_key")])?
            .distinct()?;
        let joined = good.join(parent, JoinType::Left, &[r.column.as_str()], &["_ref_key"], None)?;
        let joined = working.materialize(joined).await?;
        let orphan = col(r.column.as_str()).is_not_null().and(col("_ref_key").is_null());
        rejected_rows.extend(
            quarantine_rows(
                joined.clone().filter(orphan.clone())?,
                table,
                lit(r.column.as_str()),
                lit("reference"),
                concat(vec![
                    lit(format!("column '{}': '", r.column)),
                    cast(col(r.column.as_str()), DataType::Utf8),
                    lit(format!("' not found in {}.{}", r.table, r.key)),
                ]),
            )?
            .collect()
            .await?,
        );
        good = joined.filter(orphan.not())?.drop_columns(&["_ref_key"])?;
    }

    let select: Vec<Expr> = spec.columns.iter().map(|c| col(c.name.as_str())).collect();
    let good = good.select(select)?;
    let schema: SchemaRef = Arc::new(good.schema().as_arrow().clone());
    let rows = good.collect().await?;
    drop(working);
    let rejected_rows = with_texts(ctx, rejected_rows, texts).await?;
    Ok(Cleaned {
        schema,
        loaded: count_rows(&rows),
        quarantined: count_rows(&rejected_rows),
        rows,
        rejected: rejected_rows,
        duplicates,
    })
}

/// The materialised steps of one cleaning plan, in the session's memory pool.
struct Working<'a> {
    ctx: &'a SessionContext,
    table: &'a str,
    reservation: MemoryReservation,
    /// Bytes of the latest step, the only one held between steps.
    last: usize,
}

impl<'a> Working<'a> {
    fn new(ctx: &'a SessionContext, table: &'a str) -> Self {
        let reservation = MemoryConsumer::new(format!("load: cleaning table '{table}'")).register(&ctx.runtime_env().memory_pool);
        Self { ctx, table, reservation, last: 0 }
    }

    /// Counts `batches` in the latest step: rows collected piece by piece (the valid rows of
    /// each typed slice) make one step.
    fn hold(&mut self, batches: &[RecordBatch]) -> Result<()> {
        let bytes = crate::warehouse::memory_size(batches);
        let table = self.table;
        self.reservation.try_grow(bytes).map_err(|e| e.context(format!("cleaning table '{table}' ({} of rows)", super::load::mib(bytes))))?;
        self.last += bytes;
        Ok(())
    }

    async fn materialize(&mut self, df: DataFrame) -> Result<DataFrame> {
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        // While this step was made from the previous one both were held; from here on only this
        // one is read (each step replaces the rows of the one before).
        let previous = std::mem::take(&mut self.last);
        self.hold(&batches)?;
        self.reservation.shrink(previous.min(self.reservation.size()));
        Ok(self.ctx.read_batches(crate::warehouse::with_empty(&schema, batches))?)
    }
}

pub fn count_rows(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}

/// Projects typed columns plus `_reason` (NULL when the row is valid) and `_column`.
fn typed_with_reasons(raw: DataFrame, spec: &SourceTransform) -> Result<DataFrame> {
    // Step 1: trimmed, blank-as-NULL, case-normalised text.
    let mut trimmed: Vec<Expr> = spec
        .columns
        .iter()
        .map(|c| {
            let t = nullif(btrim(vec![col(c.name.as_str())]), lit(""));
            let t = match c.case {
                Some(Case::Lower) => lower(t),
                Some(Case::Upper) => upper(t),
                None => t,
            };
            t.alias(c.name.as_str())
        })
        .collect();
    trimmed.extend([col(FILE_COL), col(LINE_COL)]);
    let text = raw.select(trimmed)?;

    // Step 2: parse and check every column.
    let mut exprs = Vec::new();
    let mut errors = Vec::new();
    for c in &spec.columns {
        let parsed = parse(c);
        let (reason, rule) = problem(c, parsed.clone())?;
        errors.push((c.name.clone(), reason, rule));
        exprs.push(parsed.alias(c.name.as_str()));
    }
    let reason = nullif(concat_ws(lit("; "), errors.iter().map(|(_, e, _)| e.clone()).collect()), lit(""));
    // The row's column and rule are the first failing column's.
    let (mut column, mut rule) = (case(lit(true)), case(lit(true)));
    for (name, e, r) in &errors {
        column = column.when(e.clone().is_not_null(), lit(name.as_str()));
        rule = rule.when(e.clone().is_not_null(), r.clone());
    }
    exprs.push(reason.alias(REASON_COL));
    exprs.push(column.otherwise(lit(ScalarValue::Utf8(None)))?.alias(COLUMN_COL));
    exprs.push(rule.otherwise(lit(ScalarValue::Utf8(None)))?.alias(RULE_COL));
    exprs.extend([col(FILE_COL), col(LINE_COL)]);
    Ok(text.select(exprs)?)
}

/// The typed value of a column from its cleaned text (NULL where it does not parse).
fn parse(c: &Column) -> Expr {
    let text = col(c.name.as_str());
    match c.ty {
        ColumnType::String => text,
        ColumnType::Integer => try_cast(text, DataType::Int64),
        ColumnType::Float => try_cast(text, DataType::Float64),
        ColumnType::Boolean => try_cast(text, DataType::Boolean),
        ColumnType::Decimal => decimal_expr(text, c.scale),
        ColumnType::Date => date_expr(text, &c.formats),
        ColumnType::Timestamp => timestamp_expr(text, &c.formats),
    }
}

/// What is wrong with the column's value, or NULL: the reason (text naming the value) and the
/// rule it broke (one word, see [`crate::etl::load::quarantine_schema`]).
fn problem(c: &Column, parsed: Expr) -> Result<(Expr, Expr)> {
    let text = col(c.name.as_str());
    let prefix = format!("column '{}': ", c.name);
    let found = |what: String| concat(vec![lit(format!("{prefix}{what}, found '")), text.clone(), lit("'")]);
    let mut checks = vec![(
        text.clone().is_null(),
        if c.nullable { lit(ScalarValue::Utf8(None)) } else { lit(format!("{prefix}a value is required but the field is blank")) },
        if c.nullable { lit(ScalarValue::Utf8(None)) } else { lit("required") },
    )];
    let expected = match (c.ty, c.formats.is_empty()) {
        (ColumnType::Date | ColumnType::Timestamp, false) => format!("expected {} in format {}", c.ty.describe(), c.formats.join(" or ")),
        _ => format!("expected {}", c.ty.describe()),
    };
    checks.push((parsed.clone().is_null(), found(expected), lit("type")));
    if let Some(min) = c.min {
        checks.push((parsed.clone().lt(lit(min)), found(format!("expected a value of at least {min}")), lit("min")));
    }
    if let Some(max) = c.max {
        checks.push((parsed.clone().gt(lit(max)), found(format!("expected a value of at most {max}")), lit("max")));
    }
    if !c.allowed.is_empty() {
        let allowed: Vec<Expr> = c.allowed.iter().map(|v| lit(v.as_str())).collect();
        checks.push((parsed.clone().in_list(allowed, true), found(format!("expected one of {}", c.allowed.join(", "))), lit("allowed")));
    }
    if let Some(p) = &c.pattern {
        checks.push((regexp_like(parsed, lit(p.as_str()), None).not(), found(format!("expected text matching {p}")), lit("pattern")));
    }
    // The same chain twice: the first failing check gives both the reason and the rule.
    let chain = |pick: fn(&(Expr, Expr, Expr)) -> Expr| -> Result<Expr> {
        let mut rule = case(lit(true));
        for check in &checks {
            rule = rule.when(check.0.clone(), pick(check));
        }
        Ok(rule.otherwise(lit(ScalarValue::Utf8(None)))?)
    };
    Ok((chain(|c| c.1.clone())?, chain(|c| c.2.clone())?))
}

/// Whether two rows share a key (NULLs counting as equal, as the ranking's partitions do).
async fn has_repeated_key(good: DataFrame, spec: &SourceTransform) -> Result<bool> {
    let keys: Vec<Expr> = spec.key.iter().map(|k| col(k.as_str())).collect();
    let repeated = good.aggregate(keys, vec![count(lit(1)).alias("_n")])?.filter(col("_n").gt(lit(1i64)))?.limit(0, Some(1))?;
    Ok(count_rows(&repeated.collect().await?) > 0)
}

/// Numbers the rows of each key: 1 is the row that wins.
fn rank_by_key(good: DataFrame, spec: &SourceTransform) -> Result<DataFrame> {
    let mut order: Vec<SortExpr> = Vec::new();
    let latest_first = spec.latest_by.is_some();
    if let Some(latest) = &spec.latest_by {
        order.push(col(latest.as_str()).sort(false, false));
    }
    // On a tie (or without a rule) file order decides: the later line wins a `latest_by` tie,
    // the first line wins otherwise.
    order.push(col(FILE_COL).sort(!latest_first, true));
    order.push(col(LINE_COL).sort(!latest_first, true));
    let rn = row_number()
        .partition_by(spec.key.iter().map(|k| col(k.as_str())).collect())
        .order_by(order)
        .build()?
        .alias(RN_COL);
    Ok(good.window(vec![rn])?)
}

/// Shapes rejected rows as quarantine rows, but for their text (see [`with_texts`]).
fn quarantine_rows(df: DataFrame, table: &str, column: Expr, rule: Expr, reason: Expr) -> Result<DataFrame> {
    Ok(df.select(vec![
        lit(table).alias("table_name"),
        cast(col(FILE_COL), DataType::Utf8).alias("source_file"),
        col(LINE_COL).alias("line"),
        cast(column, DataType::Utf8).alias("column_name"),
        cast(rule, DataType::Utf8).alias("rule"),
        cast(reason, DataType::Utf8).alias("reason"),
    ])?)
}

/// Quarantine rows with each record's text (`raw`), found in `texts` by file and line.
async fn with_texts(ctx: &SessionContext, rejected: Vec<RecordBatch>, texts: RecordBatch) -> Result<Vec<RecordBatch>> {
    let n = count_rows(&rejected);
    if n == 0 {
        return Ok(Vec::new());
    }
    let rejected = ctx.read_batches(rejected)?;
    let texts = ctx.read_batch(texts)?.select(vec![col(FILE_COL).alias("_text_file"), col(LINE_COL).alias("_text_line"), col(RAW_COL)])?;
    // Joined on the line (a number); the file (dictionary-encoded text) checked on the few matches.
    let same_file = cast(col("_text_file"), DataType::Utf8).eq(col("source_file"));
    let joined = rejected.join(texts, JoinType::Inner, &["line"], &["_text_line"], Some(same_file))?;
    let columns = ["table_name", "source_file", "line", "column_name", "rule", "reason"];
    let mut select: Vec<Expr> = columns.iter().map(|c| col(*c)).collect();
    select.push(col(RAW_COL).alias("raw"));
    let rows = joined.select(select)?.collect().await?;
    if count_rows(&rows) != n {
        return Err(crate::error::Error::Internal(format!("{n} rejected rows found {} record texts", count_rows(&rows))));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etl::validate::{TransformBody, TransformSet};

    fn cells(batches: &[RecordBatch]) -> Vec<String> {
        let mut rows: Vec<String> = datafusion::arrow::util::pretty::pretty_format_batches(batches).unwrap().to_string().lines().map(str::to_string).collect();
        rows.sort();
        rows
    }

    /// Typing a slice at a time changes nothing: rejects in any slice, a key repeated across
    /// slices (the first line in file order is kept), references checked over all the rows.
    #[tokio::test]
    async fn cleaning_in_slices_gives_what_cleaning_at_once_gives() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("transforms")).unwrap();
        std::fs::write(dir.path().join("crmcube.yaml"), "version: 1\nname: t\nsources: .\n").unwrap();
        std::fs::write(
            dir.path().join("transforms/orders.yaml"),
            "version: 1\ntable: orders\nsource: { path: orders.csv }\ncolumns:\n  - { name: order_id, type: string, nullable: false }\n  - { name: customer_id, type: string }\n  - { name: amount, type: decimal, scale: 2, min: 0 }\nkey: [order_id]\nreferences:\n  - { column: customer_id, table: customers, key: customer_id }\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("transforms/customers.yaml"),
            "version: 1\ntable: customers\nsource: { path: customers.csv }\ncolumns:\n  - { name: customer_id, type: string }\nkey: [customer_id]\n",
        )
        .unwrap();
        let set = TransformSet::load(&crate::project::Project::open(dir.path()).unwrap()).unwrap();
        let Some(TransformBody::Source(spec)) = set.get("orders").map(|t| &t.body) else { panic!("a source") };
        // 40 records: every 9th amount is negative, every 11th customer unknown, and O5 comes
        // again at record 31 (another slice of 7).
        let mut csv = String::from("order_id,customer_id,amount\n");
        let (mut bad, mut orphans) = (0, 0);
        for i in 1..=40 {
            let id = if i == 31 { "O5".to_string() } else { format!("O{i}") };
            let customer = if i % 11 == 0 { orphans += 1; "X" } else { "C1" };
            let amount = if i % 9 == 0 { bad += 1; "-1.00" } else { "2.50" };
            csv.push_str(&format!("{id},{customer},{amount}\n"));
        }
        let ctx = SessionContext::new();
        ctx.register_batch("customers", RecordBatch::try_from_iter([("customer_id", Arc::new(datafusion::arrow::array::StringArray::from(vec!["C1"])) as _)]).unwrap()).unwrap();
        let clean_by = |rows: usize| {
            let ctx = ctx.clone();
            let (spec, csv) = (spec.clone(), csv.clone());
            async move {
                let ex = crate::etl::extract::extract_bytes("orders", &spec, csv.as_bytes(), "orders.csv").unwrap();
                clean_in_slices(&ctx, "orders", &spec, ex.batch, None, rows).await.unwrap()
            }
        };
        let (sliced, whole) = (clean_by(7).await, clean_by(1 << 20).await);
        // Record 31 is neither negative (31 % 9) nor an orphan (31 % 11): a duplicate only.
        assert_eq!((whole.loaded, whole.quarantined, whole.duplicates), (40 - bad - orphans - 1, bad + orphans + 1, 0));
        assert_eq!((sliced.loaded, sliced.quarantined, sliced.duplicates), (whole.loaded, whole.quarantined, whole.duplicates));
        assert_eq!(cells(&sliced.rows), cells(&whole.rows));
        assert_eq!(cells(&sliced.rejected), cells(&whole.rejected));
        let rejected = cells(&sliced.rejected).join("\n");
        assert!(rejected.contains("| orders     | orders.csv  | 32   | order_id") && rejected.contains("the first row in file order was kept"), "{rejected}");
    }
}
