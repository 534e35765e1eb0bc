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

use super::extract::{FILE_COL, LENGTH_COL, LINE_COL, RecordTexts, START_COL};
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

/// Runs the cleaning plan of one source over its extracted text.
///
/// Referenced tables must already be registered in `ctx` under their warehouse names. `text_memory`
/// (the extracted batch's reservation, if any) is shrunk to the records' places once every field
/// is typed: the fields' own text is no longer held then. The quarantined records' texts are read
/// back through `texts`.
pub async fn clean(ctx: &SessionContext, table: &str, spec: &SourceTransform, raw: Vec<RecordBatch>, texts: &RecordTexts, text_memory: Option<&MemoryReservation>) -> Result<Cleaned> {
    // A slice is an extracted batch: its typed rows, with their reasons, are held beside the
    // text not typed yet, not the whole table's.
    clean_in_slices(ctx, table, spec, raw, texts, text_memory, super::extract::CHUNK_RECORDS).await
}

/// [`clean`], typing at most `slice_rows` records at a time.
async fn clean_in_slices(
    ctx: &SessionContext,
    table: &str,
    spec: &SourceTransform,
    raw: Vec<RecordBatch>,
    record_texts: &RecordTexts,
    text_memory: Option<&MemoryReservation>,
    slice_rows: usize,
) -> Result<Cleaned> {
    // Where each record's text lies, by file and line (the same buffers, not a copy): only
    // rejected rows need it, found at the end, so no cleaning step copies it along with its rows.
    let place_columns = |b: &RecordBatch| -> Result<Vec<usize>> {
        let schema = b.schema();
        Ok(vec![schema.index_of(FILE_COL)?, schema.index_of(LINE_COL)?, schema.index_of(START_COL)?, schema.index_of(LENGTH_COL)?])
    };
    let mut texts = Vec::with_capacity(raw.len());
    // Each step's rows are materialised, and counted in the session's memory pool while the
    // next step is computed from them (two steps' rows at a time at most).
    let mut working = Working::new(ctx, table);

    // Typing is row by row, so it runs a slice at a time: each slice's rejected rows are
    // collected at once (they are few) and its valid rows, in the declared columns with their
    // file and line, are kept. Each extracted batch's text is dropped once its slices are typed.
    let mut rejected_rows = Vec::new();
    let mut valid = Vec::new();
    let mut valid_schema = None;
    let mut kept: Vec<Expr> = spec.columns.iter().map(|c| col(c.name.as_str())).collect();
    kept.extend([col(FILE_COL), col(LINE_COL)]);
    // An empty export is one empty slice (its plan gives the typed schema).
    let mut raw = std::collections::VecDeque::from(if raw.is_empty() { vec![RecordBatch::new_empty(super::extract::raw_schema(spec))] } else { raw });
    while let Some(batch) = raw.pop_front() {
        texts.push(batch.project(&place_columns(&batch)?)?);
        for offset in (0..batch.num_rows().max(1)).step_by(slice_rows) {
            let slice = batch.slice(offset, slice_rows.min(batch.num_rows() - offset));
            let typed = typed_with_reasons(ctx.read_batch(slice)?, spec)?;
            let typed = crate::warehouse::materialize(ctx, typed).await?;
            rejected_rows.extend(
                quarantine_rows(typed.clone().filter(col(REASON_COL).is_not_null())?, table, col(COLUMN_COL), col(RULE_COL), col(REASON_COL))?
                    .collect()
                    .await?,
            );
            let good = typed.filter(col(REASON_COL).is_null())?.select(kept.clone())?;
            let good_schema: SchemaRef = Arc::new(good.schema().as_arrow().clone());
            // One batch a slice, its buffers sized to the rows: the filtered batches' buffers
            // were sized for the rows before the filter.
            let batches = good.collect().await?;
            let batch = datafusion::arrow::compute::concat_batches(&good_schema, &batches)?;
            drop(batches);
            working.hold(std::slice::from_ref(&batch))?;
            valid.push(batch);
            valid_schema = Some(good_schema);
        }
        drop(batch);
        // What the extraction still holds: every record's place, the text not typed yet.
        if let Some(memory) = text_memory {
            let held: Vec<RecordBatch> = texts.iter().chain(raw.iter()).cloned().collect();
            memory.resize(crate::warehouse::memory_size(&held));
        }
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
    let rejected_rows = with_texts(ctx, rejected_rows, texts, record_texts).await?;
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

/// The schema of a source table's cleaned rows (its declared columns in the types cleaning
/// gives them), from the cleaning plan over no rows.
pub fn table_schema(ctx: &SessionContext, spec: &SourceTransform) -> Result<SchemaRef> {
    let raw = ctx.read_batch(RecordBatch::new_empty(super::extract::raw_schema(spec)))?;
    let typed = typed_with_reasons(raw, spec)?.select(spec.columns.iter().map(|c| col(c.name.as_str())).collect::<Vec<_>>())?;
    Ok(Arc::new(typed.schema().as_arrow().clone()))
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

/// Quarantine rows with each record's text (`raw`): its place found in `texts` by file and
/// line, its text read back from the file there.
async fn with_texts(ctx: &SessionContext, rejected: Vec<RecordBatch>, texts: Vec<RecordBatch>, record_texts: &RecordTexts) -> Result<Vec<RecordBatch>> {
    use datafusion::arrow::array::{AsArray, StringArray};
    use datafusion::arrow::datatypes::{Int64Type, UInt32Type};
    let n = count_rows(&rejected);
    if n == 0 {
        return Ok(Vec::new());
    }
    let rejected = ctx.read_batches(rejected)?;
    let texts = ctx.read_batches(texts)?.select(vec![col(FILE_COL).alias("_text_file"), col(LINE_COL).alias("_text_line"), col(START_COL), col(LENGTH_COL)])?;
    // Joined on the line (a number); the file (dictionary-encoded text) checked on the few matches.
    let same_file = cast(col("_text_file"), DataType::Utf8).eq(col("source_file"));
    let joined = rejected.join(texts, JoinType::Inner, &["line"], &["_text_line"], Some(same_file))?;
    let columns = ["table_name", "source_file", "line", "column_name", "rule", "reason"];
    let mut select: Vec<Expr> = columns.iter().map(|c| col(*c)).collect();
    select.extend([col(START_COL), col(LENGTH_COL)]);
    // In file order, so each file's records are read front to back.
    let joined = joined.select(select)?.sort(vec![col("source_file").sort(true, true), col(START_COL).sort(true, true)])?;
    let schema = Arc::new(joined.schema().as_arrow().clone());
    let rows = datafusion::arrow::compute::concat_batches(&schema, &joined.collect().await?)?;
    if rows.num_rows() as u64 != n {
        return Err(crate::error::Error::Internal(format!("{n} rejected rows found {} record places", rows.num_rows())));
    }
    let column = |name: &str| -> Result<&datafusion::arrow::array::ArrayRef> { Ok(rows.column(rows.schema_ref().index_of(name)?)) };
    let files = column("source_file")?.as_string::<i32>();
    let (starts, lengths) = (column(START_COL)?.as_primitive::<Int64Type>(), column(LENGTH_COL)?.as_primitive::<UInt32Type>());
    let mut raw: Vec<String> = Vec::with_capacity(rows.num_rows());
    let mut from = 0;
    while from < rows.num_rows() {
        let file = files.value(from);
        let to = (from..rows.num_rows()).find(|i| files.value(*i) != file).unwrap_or(rows.num_rows());
        let places: Vec<(i64, u32)> = (from..to).map(|i| (starts.value(i), lengths.value(i))).collect();
        raw.extend(record_texts.read(file, &places)?);
        from = to;
    }
    // The quarantine's columns: those selected above, then the texts read back.
    let mut quarantined: Vec<_> = rows.columns()[..columns.len()].to_vec();
    quarantined.push(Arc::new(StringArray::from(raw)));
    Ok(vec![RecordBatch::try_new(super::load::quarantine_schema(), quarantined)?])
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

    /// Typing a slice at a time, from extracted batches of a few records, changes nothing:
    /// rejects in any slice, a key repeated across slices (the first line in file order is kept),
    /// references checked over all the rows.
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
        // Typed `rows` records at a time, from extracted batches of `chunk` records.
        let clean_by = |rows: usize, chunk: usize| {
            let ctx = ctx.clone();
            let (spec, csv) = (spec.clone(), csv.clone());
            async move {
                let ex = crate::etl::extract::extract_bytes("orders", &spec, csv.as_bytes(), "orders.csv").unwrap();
                let batches: Vec<RecordBatch> = ex.batches.iter().flat_map(|b| (0..b.num_rows()).step_by(chunk).map(|o| b.slice(o, chunk.min(b.num_rows() - o)))).collect();
                assert_eq!(batches.len(), 40usize.div_ceil(chunk.min(40)));
                clean_in_slices(&ctx, "orders", &spec, batches, &ex.texts, None, rows).await.unwrap()
            }
        };
        let (whole, sliced, chunked) = (clean_by(1 << 20, 1 << 20).await, clean_by(7, 1 << 20).await, clean_by(7, 10).await);
        assert_eq!((chunked.loaded, chunked.quarantined, chunked.duplicates), (whole.loaded, whole.quarantined, whole.duplicates));
        assert_eq!(cells(&chunked.rows), cells(&whole.rows));
        assert_eq!(cells(&chunked.rejected), cells(&whole.rejected));
        // Record 31 is neither negative (31 % 9) nor an orphan (31 % 11): a duplicate only.
        assert_eq!((whole.loaded, whole.quarantined, whole.duplicates), (40 - bad - orphans - 1, bad + orphans + 1, 0));
        assert_eq!((sliced.loaded, sliced.quarantined, sliced.duplicates), (whole.loaded, whole.quarantined, whole.duplicates));
        assert_eq!(cells(&sliced.rows), cells(&whole.rows));
        assert_eq!(cells(&sliced.rejected), cells(&whole.rejected));
        let rejected = cells(&sliced.rejected).join("\n");
        assert!(rejected.contains("| orders     | orders.csv  | 32   | order_id") && rejected.contains("the first row in file order was kept"), "{rejected}");
    }

    /// The quarantine's text of a record is read back from its file by its place: for CSV its
    /// fields joined by the delimiter (quotes resolved, a quoted line break kept), for JSON lines
    /// the line — through a byte-order mark, CRLF line ends, GBK, and for records rejected while
    /// typing, as duplicates and as orphans.
    #[tokio::test]
    async fn quarantined_records_read_their_text_back_from_the_export() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("transforms")).unwrap();
        std::fs::write(dir.path().join("crmcube.yaml"), "version: 1\nname: t\nsources: .\n").unwrap();
        let columns = "columns:\n  - { name: order_id, type: string, nullable: false }\n  - { name: customer_id, type: string }\n  - { name: amount, type: decimal, scale: 2, min: 0 }\nkey: [order_id]\nreferences:\n  - { column: customer_id, table: customers, key: customer_id }\n";
        std::fs::write(
            dir.path().join("transforms/customers.yaml"),
            "version: 1\ntable: customers\nsource: { path: customers.csv }\ncolumns:\n  - { name: customer_id, type: string }\nkey: [customer_id]\n",
        )
        .unwrap();
        for (table, source) in [("utf8", "{ path: utf8.csv }"), ("gbk", "{ path: gbk.csv, encoding: gbk }"), ("lines", "{ path: lines.jsonl, format: jsonl }")] {
            std::fs::write(dir.path().join(format!("transforms/{table}.yaml")), format!("version: 1\ntable: {table}\nsource: {source}\n{columns}")).unwrap();
        }
        // Line 2 loads; 3 fails typing; 4 is an orphan whose quoted field holds the delimiter;
        // 5–6 are one record (a quoted line break) failing typing; 7 repeats line 2's key.
        let csv = "order_id,customer_id,amount\n\"O1\",C1,2.50\nO2,\"C1\",-1.00\n\"O3\",\"Smith, J\",2.50\n\"O4\",\"two\nlines\",x\nO1,C1,3.00\nO5,C1,1.00\n";
        let mut utf8 = b"\xEF\xBB\xBF".to_vec();
        utf8.extend(csv.replace('\n', "\r\n").as_bytes());
        std::fs::write(dir.path().join("utf8.csv"), utf8).unwrap();
        let chinese = csv.replace("Smith, J", "张三, 李");
        let (gbk, _, _) = encoding_rs::GBK.encode(&chinese);
        std::fs::write(dir.path().join("gbk.csv"), gbk).unwrap();
        let jsonl = "{\"order_id\": \"O1\", \"customer_id\": \"C1\", \"amount\": \"2.50\"}\n\n{\"order_id\":\"O2\",\"customer_id\":\"C9\",\"amount\":\"1\"}\n{\"order_id\": \"O3\", \"amount\": \"-2\"}\n";
        std::fs::write(dir.path().join("lines.jsonl"), jsonl).unwrap();

        let set = TransformSet::load(&crate::project::Project::open(dir.path()).unwrap()).unwrap();
        let ctx = SessionContext::new();
        ctx.register_batch("customers", RecordBatch::try_from_iter([("customer_id", Arc::new(datafusion::arrow::array::StringArray::from(vec!["C1"])) as _)]).unwrap()).unwrap();
        let expected: [(&str, Vec<(i64, &str)>); 3] = [
            ("utf8", vec![(3, "O2,C1,-1.00"), (4, "O3,Smith, J,2.50"), (5, "O4,two\r\nlines,x"), (7, "O1,C1,3.00")]),
            ("gbk", vec![(3, "O2,C1,-1.00"), (4, "O3,张三, 李,2.50"), (5, "O4,two\nlines,x"), (7, "O1,C1,3.00")]),
            ("lines", vec![(3, "{\"order_id\":\"O2\",\"customer_id\":\"C9\",\"amount\":\"1\"}"), (4, "{\"order_id\": \"O3\", \"amount\": \"-2\"}")]),
        ];
        for (table, expected) in expected {
            let Some(TransformBody::Source(spec)) = set.get(table).map(|t| &t.body) else { panic!("a source") };
            let files = crate::etl::extract::list_files(table, spec, dir.path()).unwrap();
            let ex = crate::etl::extract::extract_files(table, spec, &files, dir.path()).unwrap();
            assert!(ex.rejects.is_empty(), "{table}: {:?}", ex.rejects);
            let cleaned = clean(&ctx, table, spec, ex.batches, &ex.texts, None).await.unwrap();
            let mut got: Vec<(i64, String)> = Vec::new();
            for b in &cleaned.rejected {
                use datafusion::arrow::array::AsArray;
                let (lines, raws) = (b.column_by_name("line").unwrap().as_primitive::<datafusion::arrow::datatypes::Int64Type>(), b.column_by_name("raw").unwrap().as_string::<i32>());
                got.extend((0..b.num_rows()).map(|i| (lines.value(i), raws.value(i).to_string())));
            }
            got.sort();
            let expected: Vec<(i64, String)> = expected.into_iter().map(|(l, r)| (l, r.to_string())).collect();
            assert_eq!(got, expected, "{table}");
        }
    }
}
