//! Refreshing a rollup by partition: a load rebuilds only the units whose fact rows changed.
//!
//! A rollup partitioned by a level of some dimension (`partition: time.year`) is refreshed in
//! *units*: the finest level it keeps of that dimension (`time.month` for a rollup by month).
//! Every unit's rows are a function of the fact rows whose foreign key (`order_date`) falls in
//! it and of the dimension members those rows join, so the load stores with the rollup a
//! fingerprint of each unit's fact rows ([`Print`]: their count and the sum of a strong hash of
//! every row, all columns, order-free). The next load compares tonight's prints with the stored
//! ones and rebuilds the units whose prints differ — from all of their fact rows, so distinct
//! counts stay exact — keeping every other unit's stored rows.
//!
//! Dimensions can change rows of untouched units too (a product moved to another category), so
//! a partial refresh also needs every changed dimension table the rollup reads to still hold
//! each of its previous members with the same levels ([`members_kept`]); new members only join
//! new or changed fact rows, whose units are rebuilt anyway. When that fails, when the rollup's
//! definition changed, when a fact row's key has no unit (a date the date dimension lacks), or
//! when nothing was stored, the rollup is rebuilt in full.
//!
//! The row hash is DataFusion's (foldhash with fixed seeds) per column, mixed non-linearly row by
//! row; a different build hashing differently only makes every unit look touched (a full rebuild),
//! never a wrong answer. Two different sets of rows share a print with a chance of about 2⁻⁶⁴.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Int64Type, SchemaRef};
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::prelude::{Expr, SessionContext, cast, col, lit};
use datafusion::scalar::ScalarValue;

use crate::cube::{Cube, LevelRef, Rollup};
use crate::error::{Error, Result};

/// A fingerprint of a multiset of rows: how many, and the sum (mod 2⁶⁴) of their row hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Print {
    rows: u64,
    sum: u64,
}

impl Print {
    fn add(self, other: Print) -> Print {
        Print { rows: self.rows + other.rows, sum: self.sum.wrapping_add(other.sum) }
    }

    /// As stored in the snapshot manifest.
    pub fn text(&self) -> String {
        format!("{}:{:016x}", self.rows, self.sum)
    }
}

/// The rows of a fact table under one value of its foreign key.
#[derive(Debug, Clone)]
pub struct KeyPrint {
    pub key: ScalarValue,
    /// The key as text, to find its unit in the dimension; None for a NULL key.
    text: Option<String>,
    print: Print,
}

/// Fact prints by (fact table, foreign key), computed once per load for all the rollups that
/// share them.
#[derive(Debug, Default)]
pub struct PrintCache {
    facts: HashMap<(String, String), Arc<Vec<KeyPrint>>>,
}

impl PrintCache {
    /// The prints of `fact`'s rows by the value of `key`, as the tables in `ctx` hold them.
    pub async fn facts(&mut self, ctx: &SessionContext, fact: &str, key: &str) -> Result<Arc<Vec<KeyPrint>>> {
        let id = (fact.to_string(), key.to_string());
        if let Some(p) = self.facts.get(&id) {
            return Ok(p.clone());
        }
        let prints = Arc::new(fact_prints(ctx, fact, key).await?);
        self.facts.insert(id, prints.clone());
        Ok(prints)
    }
}

/// The level a rollup is refreshed by: the finest level it keeps of its partition's dimension,
/// when that dimension joins a table (a dimension read off the fact's own columns has no members
/// to look units up in).
pub fn refresh_unit<'c>(cube: &'c Cube, rollup: &Rollup) -> Option<LevelRef<'c>> {
    let (name, _) = rollup.partition.as_ref()?;
    let index = rollup.levels.iter().filter(|(d, _)| d == name).map(|(_, i)| *i).max()?;
    let dimension = cube.dimensions.iter().find(|d| d.name == *name)?;
    dimension.join.as_ref()?;
    Some(LevelRef { dimension, index })
}

/// Tonight's fact rows of each unit: the print of each unit, and the foreign-key values in it.
#[derive(Debug)]
pub struct Units {
    pub prints: BTreeMap<String, String>,
    keys: BTreeMap<String, Vec<ScalarValue>>,
}

impl Units {
    /// The units whose rows differ from `stored` (the prints the rollup was built with): new,
    /// changed and gone.
    pub fn touched(&self, stored: &BTreeMap<String, String>) -> BTreeSet<String> {
        self.prints.keys().chain(stored.keys()).filter(|u| self.prints.get(*u) != stored.get(*u)).cloned().collect()
    }
}

/// The units of `unit`'s dimension the fact rows fall in, with their prints; None when some
/// fact row's key has no unit (NULL, or a member the dimension lacks).
pub async fn units(ctx: &SessionContext, cache: &mut PrintCache, cube: &Cube, unit: LevelRef<'_>) -> Result<Option<Units>> {
    let join = unit.dimension.join.as_ref().ok_or_else(|| Error::Internal("a refresh unit's dimension joins a table".into()))?;
    let facts = cache.facts(ctx, &cube.fact, &join.foreign_key).await?;
    let members = ctx
        .table(join.table.as_str())
        .await?
        .select(vec![cast(col(join.key.as_str()), DataType::Utf8).alias("key"), cast(col(unit.level().column.as_str()), DataType::Utf8).alias("unit")])?
        .collect()
        .await?;
    let mut unit_of: HashMap<String, String> = HashMap::new();
    for b in &members {
        let (k, u) = (b.column(0).as_string::<i32>(), b.column(1).as_string::<i32>());
        for i in 0..b.num_rows() {
            if k.is_valid(i) && u.is_valid(i) {
                unit_of.insert(k.value(i).to_string(), u.value(i).to_string());
            }
        }
    }
    let mut prints: BTreeMap<String, Print> = BTreeMap::new();
    let mut keys: BTreeMap<String, Vec<ScalarValue>> = BTreeMap::new();
    for f in facts.iter() {
        let Some(u) = f.text.as_ref().and_then(|t| unit_of.get(t)) else { return Ok(None) };
        let p = prints.entry(u.clone()).or_default();
        *p = p.add(f.print);
        keys.entry(u.clone()).or_default().push(f.key.clone());
    }
    Ok(Some(Units { prints: prints.into_iter().map(|(u, p)| (u, p.text())).collect(), keys }))
}

/// The rows of `rollup` with the units `touched` rebuilt from the fact rows in them and every
/// other unit's rows read from `previous` (the stored rollup, registered in `ctx`), in the
/// order [`super::build`] writes.
pub async fn rebuild(
    ctx: &SessionContext,
    cube: &Cube,
    rollup: &Rollup,
    unit: LevelRef<'_>,
    units: &Units,
    touched: &BTreeSet<String>,
    previous: &str,
) -> Result<(SchemaRef, Vec<RecordBatch>, u64)> {
    let join = unit.dimension.join.as_ref().ok_or_else(|| Error::Internal("a refresh unit's dimension joins a table".into()))?;
    let keys: Vec<Expr> = touched.iter().filter_map(|u| units.keys.get(u)).flatten().map(|k| lit(k.clone())).collect();
    // The cube over only the touched units' fact rows (an empty IN list is not valid SQL).
    let view = format!("__rollup_facts_{}", rollup.table);
    let facts = ctx.table(cube.fact.as_str()).await?;
    let facts = if keys.is_empty() { facts.limit(0, Some(0))? } else { facts.filter(col(join.foreign_key.as_str()).in_list(keys, false))? };
    ctx.register_table(view.as_str(), facts.into_view())?;
    let scoped = Cube { fact: view.clone(), ..cube.clone() };
    let fresh = super::aggregate(ctx, &scoped, rollup).await;
    let result = async {
        let fresh = fresh?;
        let rebuilt = fresh.clone().count().await? as u64;
        let schema = fresh.schema().clone();
        let unit_column = unit.output_name();
        let names: Vec<Expr> = touched.iter().map(|u| lit(u.as_str())).collect();
        let mut kept = ctx.table(previous).await?;
        if !names.is_empty() {
            kept = kept.filter(cast(col(unit_column.as_str()), DataType::Utf8).in_list(names, true))?;
        }
        // The stored rows in tonight's column order and types (Delta reads may type text as views).
        let kept = crate::warehouse::in_columns(kept, schema.as_arrow())?;
        let rows = super::sorted(cube, rollup, kept.union(fresh)?)?;
        let arrow = Arc::new(rows.schema().as_arrow().clone());
        Ok::<_, Error>((arrow, rows.collect().await?, rebuilt))
    }
    .await;
    ctx.deregister_table(view.as_str())?;
    result
}

/// Whether every member `previous` (the stored dimension table, registered in `ctx`) held is
/// still in `current` with the same values of `columns` (its key and the levels a rollup reads).
pub async fn members_kept(ctx: &SessionContext, previous: &str, current: &str, columns: &[String]) -> Result<bool> {
    let now = ctx.table(current).await?.select_columns(&columns.iter().map(String::as_str).collect::<Vec<_>>())?;
    let before = ctx.table(previous).await?;
    if columns.iter().any(|c| before.schema().field_with_unqualified_name(c).is_err()) {
        return Ok(false);
    }
    let before = crate::warehouse::in_columns(before, now.schema().as_arrow())?;
    Ok(before.except(now)?.limit(0, Some(1))?.count().await? == 0)
}

/// Prints of `fact`'s rows grouped by `key`.
async fn fact_prints(ctx: &SessionContext, fact: &str, key: &str) -> Result<Vec<KeyPrint>> {
    let df = ctx.table(fact).await?;
    let columns: Vec<Expr> = df.schema().columns().into_iter().map(Expr::Column).collect();
    let hash = ScalarUDF::from(RowHash::new()).call(columns);
    // Summed exactly (20-digit values, 30-digit sums), reduced mod 2⁶⁴ here.
    let grouped = df.aggregate(vec![col(key)], vec![count(lit(1)).alias("rows"), sum(cast(hash, DataType::Decimal128(20, 0))).alias("sum")])?;
    let grouped = grouped.select(vec![col(key), cast(col(key), DataType::Utf8).alias("__text"), col("rows"), col("sum")])?;
    let mut out = Vec::new();
    for b in grouped.collect().await? {
        let text = b.column(1).as_string::<i32>();
        let rows = b.column(2).as_primitive::<Int64Type>();
        let sums = b.column(3).as_primitive::<Decimal128Type>();
        for i in 0..b.num_rows() {
            out.push(KeyPrint {
                key: ScalarValue::try_from_array(b.column(0), i)?,
                text: text.is_valid(i).then(|| text.value(i).to_string()),
                print: Print { rows: rows.value(i) as u64, sum: sums.value(i) as u64 },
            });
        }
    }
    Ok(out)
}

/// What a NULL contributes to a row's hash (positionally: `(NULL, x)` and `(x, NULL)` differ).
const NULL_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

/// The murmur3 finaliser: a bijection that spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

/// `crmcube_row_hash(c1, c2, …)`: a 64-bit hash of a row's values. Each column is hashed on its
/// own (NULLs as [`NULL_HASH`]) and folded in through [`mix`], so that sums of row hashes (a
/// [`Print`]) change when values move between rows, which a linear combination would not see.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RowHash {
    signature: Signature,
}

impl RowHash {
    fn new() -> Self {
        RowHash { signature: Signature::variadic_any(Volatility::Immutable) }
    }
}

impl ScalarUDFImpl for RowHash {
    fn name(&self) -> &str {
        "crmcube_row_hash"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::error::Result<ColumnarValue> {
        let n = args.number_rows;
        let mut row = vec![0u64; n];
        let mut column = vec![0u64; n];
        for (i, value) in args.args.iter().enumerate() {
            let array = value.to_array(n)?;
            column.fill(NULL_HASH);
            create_hashes([&array], &RandomState::with_seed(i as u64), &mut column)?;
            for (r, c) in row.iter_mut().zip(&column) {
                *r = mix(r.wrapping_add(*c) ^ (i as u64));
            }
        }
        Ok(ColumnarValue::Array(Arc::new(UInt64Array::from(row))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};

    async fn prints(rows: Vec<(&str, Option<&str>, i64)>) -> Vec<(Option<String>, Print)> {
        let schema = Arc::new(Schema::new(vec![Field::new("day", DataType::Utf8, true), Field::new("product", DataType::Utf8, true), Field::new("qty", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(rows.iter().map(|r| Some(r.0)).collect::<Vec<_>>())),
                Arc::new(StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        // Two batches of one table: prints do not depend on how rows are split.
        let (a, b) = (batch.slice(0, batch.num_rows() / 2), batch.slice(batch.num_rows() / 2, batch.num_rows() - batch.num_rows() / 2));
        ctx.register_batch("facts_a", a).unwrap();
        ctx.register_batch("facts_b", b).unwrap();
        let df = ctx.table("facts_a").await.unwrap().union(ctx.table("facts_b").await.unwrap()).unwrap();
        ctx.register_table("facts", df.into_view()).unwrap();
        let mut out: Vec<_> = fact_prints(&ctx, "facts", "day").await.unwrap().into_iter().map(|k| (k.text, k.print)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[tokio::test]
    async fn a_days_print_changes_with_any_of_its_rows_and_not_with_their_order() {
        let base = vec![("d1", Some("p1"), 2), ("d1", Some("p2"), 3), ("d2", Some("p1"), 1), ("d2", None, 4)];
        let same = prints(base.clone()).await;
        let mut reordered = base.clone();
        reordered.reverse();
        assert_eq!(prints(reordered).await, same, "order and batching do not matter");
        assert_eq!(same[0].1.rows, 2);
        assert_eq!(same[1].1.rows, 2);

        // Values swapped between two rows of d1: same multiset of columns, different rows.
        let swapped = prints(vec![("d1", Some("p1"), 3), ("d1", Some("p2"), 2), ("d2", Some("p1"), 1), ("d2", None, 4)]).await;
        assert_ne!(swapped[0].1, same[0].1);
        assert_eq!(swapped[1].1, same[1].1, "d2 untouched");
        // A NULL moved to another column position of the same row.
        let moved = prints(vec![("d1", Some("p1"), 2), ("d1", Some("p2"), 3), ("d2", Some("p1"), 1), ("d2", Some("4"), 4)]).await;
        assert_ne!(moved[1].1, same[1].1);
        // A row added to d2, and one removed from d1.
        let added = prints(vec![("d1", Some("p1"), 2), ("d2", Some("p1"), 1), ("d2", None, 4), ("d2", Some("p3"), 1)]).await;
        assert_eq!((added[0].1.rows, added[1].1.rows), (1, 3));
        assert_ne!(added[0].1, same[0].1);
    }
}
