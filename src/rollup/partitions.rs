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
//! On a night the fact table only gained rows (a `grows_with` table appended, so tonight's table
//! is the previous version plus those rows) a rollup is refreshed by [`append`] instead: the
//! stored rows merged group by group with the aggregate of the new rows alone, without reading a
//! touched unit's old rows. Sums and counts add, minima and maxima are kept, HyperLogLog
//! sketches merge, and an exact distinct count grows by the values that are new to their group:
//! those whose every row in the group, among all fact rows holding a value the new rows hold (the
//! fact rows tested against a hash set of the new values), is a new row. The units' prints add
//! too, so the next night compares against exact prints without hashing the whole fact table.
//!
//! The row hash is DataFusion's (foldhash with fixed seeds) per column, mixed non-linearly row by
//! row; a different build hashing differently only makes every unit look touched (a full rebuild),
//! never a wrong answer. Two different sets of rows share a print with a chance of about 2⁻⁶⁴.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Int64Type, SchemaRef};
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::datasource::MemTable;
use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::prelude::{DataFrame, Expr, JoinType, SessionContext, cast, col, lit};
use datafusion::scalar::ScalarValue;

use super::sketch;
use crate::cube::{Aggregation, Cube, LevelRef, MeasureKind, Rollup};
use crate::error::{Error, Result};

/// A fingerprint of a multiset of rows: how many, and the sum (mod 2⁶⁴) of their row hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Print {
    rows: u64,
    sum: u64,
}

/// The print of both multisets of rows.
impl std::ops::Add for Print {
    type Output = Print;

    fn add(self, other: Print) -> Print {
        Print { rows: self.rows + other.rows, sum: self.sum.wrapping_add(other.sum) }
    }
}

impl Print {
    /// The print of these rows less `other`'s, which they hold; None when they cannot hold them
    /// (fewer rows).
    pub fn less(self, other: Print) -> Option<Print> {
        Some(Print { rows: self.rows.checked_sub(other.rows)?, sum: self.sum.wrapping_sub(other.sum) })
    }

    /// How many rows.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// As stored in the snapshot manifest.
    pub fn text(&self) -> String {
        format!("{}:{:016x}", self.rows, self.sum)
    }

    /// A print as [`Print::text`] wrote it.
    pub fn parse(text: &str) -> Option<Print> {
        let (rows, sum) = text.split_once(':')?;
        Some(Print { rows: rows.parse().ok()?, sum: u64::from_str_radix(sum, 16).ok()? })
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

impl KeyPrint {
    /// The key as text (None for NULL).
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    pub fn print(&self) -> Print {
        self.print
    }
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
    units_of(ctx, unit, &facts).await
}

/// The units the fact rows of `facts` fall in; None when one has no unit.
async fn units_of(ctx: &SessionContext, unit: LevelRef<'_>, facts: &[KeyPrint]) -> Result<Option<Units>> {
    Ok(units_in(&unit_members(ctx, unit).await?, facts))
}

/// The unit (as text) of each member key (as text) of `unit`'s dimension.
async fn unit_members(ctx: &SessionContext, unit: LevelRef<'_>) -> Result<HashMap<String, String>> {
    let join = unit.dimension.join.as_ref().ok_or_else(|| Error::Internal("a refresh unit's dimension joins a table".into()))?;
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
    Ok(unit_of)
}

/// The units the fact rows of `facts` fall in, by `unit_of`; None when one has no unit.
fn units_in(unit_of: &HashMap<String, String>, facts: &[KeyPrint]) -> Option<Units> {
    let mut prints: BTreeMap<String, Print> = BTreeMap::new();
    let mut keys: BTreeMap<String, Vec<ScalarValue>> = BTreeMap::new();
    for f in facts.iter() {
        let u = f.text.as_ref().and_then(|t| unit_of.get(t))?;
        let p = prints.entry(u.clone()).or_default();
        *p = *p + f.print;
        keys.entry(u.clone()).or_default().push(f.key.clone());
    }
    Some(Units { prints: prints.into_iter().map(|(u, p)| (u, p.text())).collect(), keys })
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
    // The cube over only the touched units' fact rows.
    let view = format!("__rollup_facts_{}", rollup.table);
    let facts = ctx.table(cube.fact.as_str()).await?;
    let facts = in_list(facts, col(join.foreign_key.as_str()), keys, false)?;
    ctx.register_table(view.as_str(), facts.into_view())?;
    let scoped = Cube { fact: view.clone(), ..cube.clone() };
    let fresh = super::aggregate(ctx, &scoped, rollup).await;
    let result = async {
        let fresh = fresh?;
        let rebuilt = fresh.clone().count().await? as u64;
        let schema = fresh.schema().clone();
        let unit_column = unit.output_name();
        let names: Vec<Expr> = touched.iter().map(|u| lit(u.as_str())).collect();
        let kept = in_list(ctx.table(previous).await?, cast(col(unit_column.as_str()), DataType::Utf8), names, true)?;
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

/// The fact rows a print map stands for (None when one print is not in [`Print::text`]'s format).
pub fn printed_rows(prints: &BTreeMap<String, String>) -> Option<u64> {
    prints.values().map(|p| Print::parse(p).map(|p| p.rows)).sum()
}

/// A cube's new fact rows on a night its fact table only gained rows (the table is its previous
/// version and these rows, see `grows_with`): what [`append`] refreshes the cube's rollups from,
/// registered in the session once for all of them.
#[derive(Debug)]
pub struct Appended {
    /// The new fact rows.
    facts: String,
    rows: u64,
    /// The cube's rows over the new facts, with every level and measure its rollups keep.
    frame: String,
    /// Per exact distinct count (measure): its pairs (the levels of the rollups keeping the
    /// measure, a value the new rows hold) over every fact row, old or new, holding such a
    /// value, with how many rows hold each pair (`__all`) and how many of them are new
    /// (`__new`). One pass over the fact table finds the rows for all counts. None when the
    /// measure counts a column the fact table lacks.
    prior: BTreeMap<String, Option<String>>,
    /// The new rows' prints by foreign key.
    prints: HashMap<String, Vec<KeyPrint>>,
    /// The unit of each member key, by (dimension, level index) (see [`unit_members`]).
    members: HashMap<(String, usize), HashMap<String, String>>,
}

impl Appended {
    /// Registers the new fact rows `rows` of `cube` and the cube's rows over them.
    pub async fn register(ctx: &SessionContext, cube: &Cube, schema: &SchemaRef, rows: &[RecordBatch]) -> Result<Appended> {
        let facts = format!("__appended_{}", cube.name);
        ctx.register_table(facts.as_str(), Arc::new(MemTable::try_new(schema.clone(), vec![rows.to_vec()])?))?;
        let mut out = Appended {
            facts: facts.clone(),
            rows: rows.iter().map(|b| b.num_rows() as u64).sum(),
            frame: format!("__appended_frame_{}", cube.name),
            prior: BTreeMap::new(),
            prints: HashMap::new(),
            members: HashMap::new(),
        };
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        let mut distinct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in &cube.rollups {
            let levels = super::level_columns(cube, r);
            wanted.extend(levels.iter().cloned());
            wanted.extend(r.measures.iter().cloned());
            for m in &r.measures {
                if let MeasureKind::Base { agg: Aggregation::CountDistinct, .. } = &cube.measure(m)?.kind {
                    distinct.entry(m.clone()).or_default().extend(levels.iter().cloned());
                }
            }
        }
        let wanted: Vec<String> = wanted.into_iter().collect();
        let scoped = Cube { fact: facts.clone(), ..cube.clone() };
        let started = std::time::Instant::now();
        register_rows(ctx, &out.frame, crate::query::cube_frame(ctx, &scoped, Some(&wanted)).await?).await?;
        tracing::debug!(cube = %cube.name, ms = started.elapsed().as_millis() as u64, "appended facts: cube rows");
        let fact = ctx.table(cube.fact.as_str()).await?;
        // The exact distinct counts of the fact table's columns: (measure, column, levels).
        let mut counted = Vec::new();
        for (m, levels) in distinct {
            let MeasureKind::Base { column, .. } = &cube.measure(&m)?.kind else { continue };
            if fact.schema().has_column_with_unqualified_name(column) {
                counted.push((m, column.clone(), levels));
            } else {
                out.prior.insert(m, None);
            }
        }
        if counted.is_empty() {
            return Ok(out);
        }
        // One pass over the fact table for all of them: every row holding a value some new row
        // holds, of any counted column (a superset of each count's rows serves it: the rows
        // are split by measure below).
        let started = std::time::Instant::now();
        let (subset, touched) = out.in_touched_units(ctx, cube, fact, counted.iter().map(|(m, ..)| m)).await?;
        // Each counted column's new values, collected once: the pass tests each fact row's value
        // against them (one hash set a column, [`super::holds`]) and the pairs below join them.
        // A join per column probed and emitted every row of the touched units before the filter;
        // an IN list of literals costs as little to run but far more to plan (tens of thousands).
        // The touched units' range on its own too, so that the scan skips the files and row
        // groups outside it by their statistics (a fact partitioned or sorted by date).
        let subset = match &touched {
            Some(range) => subset.filter(range.clone())?,
            None => subset,
        };
        let mut sets = Vec::new();
        let mut tested = vec![touched.unwrap_or(lit(true))];
        let mut new_values_of = Vec::new();
        for (_, column, _) in &counted {
            let values = ctx.table(facts.as_str()).await?.select(vec![col(column.as_str()).alias("__value")])?.distinct()?;
            let schema: SchemaRef = Arc::new(values.schema().as_arrow().clone());
            let batches = values.collect().await?;
            // In the fact column's own type, so that values compare alike (a decimal's text
            // depends on its scale).
            let key_type = subset.schema().field_with_unqualified_name(column)?.data_type().clone();
            sets.push(datafusion::arrow::compute::cast(datafusion::arrow::compute::concat_batches(&schema, &batches)?.column(0), &key_type)?);
            tested.push(col(column.as_str()));
            new_values_of.push(ctx.read_batches(crate::warehouse::with_empty(&schema, batches))?);
        }
        let mut columns: BTreeSet<String> = counted.iter().flat_map(|(_, _, levels)| levels.iter().cloned()).collect();
        columns.extend(counted.iter().map(|(m, ..)| m.clone()));
        let columns: Vec<String> = columns.into_iter().collect();
        let mut subset = subset.filter(super::holds::udf(sets)?.call(tested))?;
        // Only the columns the pairs read are copied out of the fact rows kept.
        if let Some(read) = fact_columns(ctx, cube, &columns).await? {
            subset = subset.select_columns(&read.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        // Collected before the dimensions join them: the exact row count lets the joins hold the
        // dimension, not these rows, in memory.
        let view = format!("__appended_prior_facts_{}", cube.name);
        register_rows(ctx, &view, subset).await?;
        let scoped = Cube { fact: view.clone(), ..cube.clone() };
        let all = format!("__appended_prior_{}", cube.name);
        let registered = async { register_rows(ctx, &all, crate::query::cube_frame(ctx, &scoped, Some(&columns)).await?).await }.await;
        ctx.deregister_table(view.as_str())?;
        registered?;
        tracing::debug!(cube = %cube.name, ms = started.elapsed().as_millis() as u64, "appended facts: rows holding their values");
        // Per count, its pairs (levels, value) with how many rows hold each and how many of
        // those are new: what [`new_values`] regroups per rollup.
        let pairs = async {
            for ((m, _, levels), values) in counted.into_iter().zip(new_values_of) {
                let prior = values.join(ctx.table(all.as_str()).await?, JoinType::RightSemi, &["__value"], &[m.as_str()], None)?;
                let tagged = |table: DataFrame, all: i64, new: i64| -> Result<DataFrame> {
                    let mut select: Vec<Expr> = levels.iter().map(|l| col(l.as_str())).collect();
                    select.extend([col(m.as_str()).alias("__value"), lit(all).alias("__all"), lit(new).alias("__new")]);
                    Ok(table.select(select)?)
                };
                let rows = tagged(prior, 1, 0)?.union(tagged(ctx.table(out.frame.as_str()).await?, 0, 1)?)?.filter(col("__value").is_not_null())?;
                let mut by_value: Vec<Expr> = levels.iter().map(|l| col(l.as_str())).collect();
                by_value.push(col("__value"));
                let grouped = rows.aggregate(by_value, vec![sum(col("__all")).alias("__all"), sum(col("__new")).alias("__new")])?;
                let name = format!("__appended_pairs_{}_{m}", cube.name);
                register_rows(ctx, &name, grouped).await?;
                out.prior.insert(m, Some(name));
            }
            Ok::<_, Error>(())
        }
        .await;
        ctx.deregister_table(all.as_str())?;
        pairs?;
        tracing::debug!(cube = %cube.name, ms = started.elapsed().as_millis() as u64, "appended facts: pairs of the distinct counts");
        Ok(out)
    }

    /// Removes what [`Appended::register`] registered.
    pub fn deregister(&self, ctx: &SessionContext) -> Result<()> {
        for t in [&self.facts, &self.frame].into_iter().chain(self.prior.values().flatten()) {
            ctx.deregister_table(t.as_str())?;
        }
        Ok(())
    }

    /// The rows of `fact` that can share a group of a rollup keeping one of `measures` with a
    /// new row: those in the units the new rows fall in, of the coarsest refresh unit of those
    /// rollups (all of one dimension; otherwise every row). Either a condition on the fact's
    /// rows (a range or a list of its foreign keys), or the rows themselves (a semi-join).
    async fn in_touched_units(&mut self, ctx: &SessionContext, cube: &Cube, fact: DataFrame, measures: impl Iterator<Item = &String>) -> Result<(DataFrame, Option<Expr>)> {
        let measures: Vec<&String> = measures.collect();
        let units: Option<Vec<LevelRef<'_>>> = cube.rollups.iter().filter(|r| r.measures.iter().any(|m| measures.contains(&m))).map(|r| refresh_unit(cube, r)).collect();
        let Some(units) = units else { return Ok((fact, None)) };
        let (Some(first), Some(coarsest)) = (units.first(), units.iter().min_by_key(|u| u.index)) else { return Ok((fact, None)) };
        let Some(join) = coarsest.dimension.join.as_ref() else { return Ok((fact, None)) };
        if units.iter().any(|u| u.dimension.name != first.dimension.name) {
            return Ok((fact, None));
        }
        let Some(touched) = self.units(ctx, *coarsest).await? else { return Ok((fact, None)) };
        // The member keys of those units, as values of the fact's foreign key: a filter on the
        // fact rows instead of a join with the dimension.
        let key_type = fact.schema().field_with_unqualified_name(&join.foreign_key)?.data_type().clone();
        let members = &self.members[&(coarsest.dimension.name.clone(), coarsest.index)];
        let mut keys: Vec<&String> = members.iter().filter(|(_, u)| touched.prints.contains_key(*u)).map(|(k, _)| k).collect();
        keys.sort();
        let typed: Option<Vec<ScalarValue>> = keys.iter().map(|k| ScalarValue::try_from_string((*k).clone(), &key_type).ok()).collect();
        match typed {
            Some(typed) if typed.len() <= MAX_KEYS_IN_LIST => {
                tracing::debug!(keys = typed.len(), units = touched.prints.len(), "appended facts: the pass reads the touched units' keys");
                // When no other unit's key lies between the least and the greatest of them (the
                // days of a year), a range says the same and costs a comparison per row.
                let order = |a: &&ScalarValue, b: &&ScalarValue| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal);
                if let (Some(lo), Some(hi)) = (typed.iter().min_by(order), typed.iter().max_by(order)) {
                    let inside = |k: &ScalarValue| k.partial_cmp(lo).is_none_or(|o| o.is_ge()) && k.partial_cmp(hi).is_none_or(|o| o.is_le());
                    let others_inside = members.iter().filter(|(_, u)| !touched.prints.contains_key(*u)).any(|(k, _)| ScalarValue::try_from_string(k.clone(), &key_type).map_or(true, |k| inside(&k)));
                    if !others_inside {
                        let fk = col(join.foreign_key.as_str());
                        return Ok((fact, Some(fk.clone().gt_eq(lit(lo.clone())).and(fk.lt_eq(lit(hi.clone()))))));
                    }
                }
                Ok((fact, Some(one_of(col(join.foreign_key.as_str()), typed.into_iter().map(lit).collect(), false))))
            }
            // Many members (or keys that do not read back as the foreign key's type): a
            // semi-join with the dimension's rows in those units.
            _ => {
                let names: Vec<Expr> = touched.prints.keys().map(|u| lit(u.as_str())).collect();
                let members = in_list(ctx.table(join.table.as_str()).await?, cast(col(coarsest.level().column.as_str()), DataType::Utf8), names, false)?;
                let keys = members.select(vec![col(join.key.as_str()).alias("__unit_key")])?;
                Ok((keys.join(fact, JoinType::RightSemi, &["__unit_key"], &[join.foreign_key.as_str()], None)?, None))
            }
        }
    }

    /// The units of `unit` the new rows fall in (None when one has no unit), the dimension's
    /// members read once a night per level.
    async fn units(&mut self, ctx: &SessionContext, unit: LevelRef<'_>) -> Result<Option<Units>> {
        let join = unit.dimension.join.as_ref().ok_or_else(|| Error::Internal("a refresh unit's dimension joins a table".into()))?;
        let prints = self.prints(ctx, &join.foreign_key).await?;
        let level = (unit.dimension.name.clone(), unit.index);
        if !self.members.contains_key(&level) {
            let members = unit_members(ctx, unit).await?;
            self.members.insert(level.clone(), members);
        }
        Ok(units_in(&self.members[&level], &prints))
    }

    async fn prints(&mut self, ctx: &SessionContext, key: &str) -> Result<Vec<KeyPrint>> {
        if !self.prints.contains_key(key) {
            let p = fact_prints(ctx, &self.facts, key).await?;
            self.prints.insert(key.to_string(), p);
        }
        Ok(self.prints[key].clone())
    }
}

/// The columns of `cube`'s fact table that its rows of `columns` (levels and measures, see
/// [`crate::query::cube_frame`]) read, as the optimised plan of those rows scans them. None when
/// the plan does not scan the fact table by its name (a view, inlined).
async fn fact_columns(ctx: &SessionContext, cube: &Cube, columns: &[String]) -> Result<Option<Vec<String>>> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let plan = crate::query::cube_frame(ctx, cube, Some(columns)).await?.into_optimized_plan()?;
    let mut read: Option<BTreeSet<String>> = None;
    plan.apply(|node| {
        if let datafusion::logical_expr::LogicalPlan::TableScan(scan) = node
            && scan.table_name.table() == cube.fact
        {
            read.get_or_insert_default().extend(scan.projected_schema.fields().iter().map(|f| f.name().clone()));
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(read.map(|r| r.into_iter().collect()))
}

/// The most member keys [`Appended::in_touched_units`] lists in a filter (a few years of days);
/// above it, the fact rows are semi-joined with the dimension instead.
const MAX_KEYS_IN_LIST: usize = 4096;

/// Whether `value` is one of `list` (or, `negated`, none of them). No value is one of an empty
/// list (negated, every value is none of it): an empty IN list is not valid SQL.
fn one_of(value: Expr, list: Vec<Expr>, negated: bool) -> Expr {
    if list.is_empty() { lit(negated) } else { value.in_list(list, negated) }
}

/// The rows of `df` whose `value` is [`one_of`] `list` (or, `negated`, none of them).
fn in_list(df: DataFrame, value: Expr, list: Vec<Expr>, negated: bool) -> Result<DataFrame> {
    Ok(df.filter(one_of(value, list, negated))?)
}

/// Collects `df` and registers its rows in memory as `name`. `CRMCUBE_LOG=trace` logs the plan
/// that made them, with each operator's metrics (what EXPLAIN ANALYZE shows).
async fn register_rows(ctx: &SessionContext, name: &str, df: DataFrame) -> Result<()> {
    let schema = Arc::new(df.schema().as_arrow().clone());
    let plan = df.create_physical_plan().await?;
    let rows = datafusion::physical_plan::collect(plan.clone(), ctx.task_ctx()).await?;
    if tracing::enabled!(tracing::Level::TRACE) {
        let shown = datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref()).indent(true).to_string();
        tracing::trace!(table = name, "registered from the plan:\n{shown}");
    }
    ctx.register_table(name, Arc::new(MemTable::try_new(schema, vec![rows])?))?;
    Ok(())
}

/// A rollup refreshed by [`append`].
#[derive(Debug)]
pub struct Appending {
    pub schema: SchemaRef,
    pub rows: Vec<RecordBatch>,
    /// The new fact rows read.
    pub read: u64,
    /// Tonight's prints by unit: the stored ones plus the new rows'.
    pub prints: BTreeMap<String, String>,
    /// The units the new rows fall in.
    pub touched: Vec<String>,
}

/// The rows of `rollup` on a night its fact table only gained the rows of `appended`: the stored
/// rows (`previous`, registered in `ctx`, built with the prints `stored`) merged group by group
/// with the aggregate of the new rows alone — sums and counts added, minima and maxima kept,
/// sketches merged, and each exact distinct count raised by the values new to its group (see
/// [`new_values`]). The same rows a rebuild gives, reading only the new rows and, for a distinct
/// count, the rows holding their values. None when it does not apply (a new row without a unit,
/// a distinct count of a column the fact table lacks): the caller refreshes by unit.
pub async fn append(
    ctx: &SessionContext,
    cube: &Cube,
    rollup: &Rollup,
    unit: LevelRef<'_>,
    appended: &mut Appended,
    stored: &BTreeMap<String, String>,
    previous: &str,
) -> Result<Option<Appending>> {
    let started = std::time::Instant::now();
    let Some(new) = appended.units(ctx, unit).await? else { return Ok(None) };
    let mut prints = stored.clone();
    for (u, text) in &new.prints {
        let before = match stored.get(u) {
            Some(t) => Print::parse(t),
            None => Some(Print::default()),
        };
        let (Some(before), Some(add)) = (before, Print::parse(text)) else { return Ok(None) };
        prints.insert(u.clone(), (before + add).text());
    }

    let levels = super::level_columns(cube, rollup);
    let by_levels = || levels.iter().map(|l| col(l.as_str())).collect::<Vec<Expr>>();
    // The columns a full build gives (planned, never run): every part is cast to them.
    let target = super::aggregate(ctx, cube, rollup).await?.schema().as_arrow().clone();
    let frame = ctx.table(appended.frame.as_str()).await?;
    let mut parts = vec![crate::warehouse::in_columns(ctx.table(previous).await?, &target)?];
    let mut fresh = Vec::new();
    let mut merged = Vec::new();
    let mut names = Vec::new();
    for m in &rollup.measures {
        let MeasureKind::Base { agg, .. } = &cube.measure(m)?.kind else { continue };
        let c = col(m.as_str());
        // The new rows aggregate as a build does (super::aggregate); the parts then combine.
        let (new_rows, combine) = match agg {
            Aggregation::Sum | Aggregation::Count => (Some(crate::query::aggregate_call(*agg, c.clone())), sum(c)),
            Aggregation::Min => (Some(min(c.clone())), min(c)),
            Aggregation::Max => (Some(max(c.clone())), max(c)),
            Aggregation::ApproxCountDistinct => {
                let value_type = frame.schema().field_with_unqualified_name(m)?.data_type().clone();
                (Some(sketch::sketch_udaf().call(vec![c.clone()])), sketch::union_udaf(value_type).call(vec![c]))
            }
            Aggregation::CountDistinct => {
                let Some(Some(prior)) = appended.prior.get(m) else { return Ok(None) };
                let counted = new_values(ctx, prior, &levels, m, (&unit.output_name(), new.prints.keys())).await?;
                parts.push(crate::warehouse::in_columns(counted, &target)?);
                (None, sum(c))
            }
            Aggregation::Avg => return Ok(None),
        };
        fresh.extend(new_rows.map(|e| e.alias(m.as_str())));
        merged.push(combine.alias(m.as_str()));
        names.push(m.clone());
    }
    // The new rows' sums, counts, extremes and sketches (distinct counts NULL: added above).
    parts.push(crate::warehouse::in_columns(frame.aggregate(by_levels(), fresh)?, &target)?);
    let mut all = parts.remove(0);
    for p in parts {
        all = all.union(p)?;
    }
    let grouped = all.aggregate(by_levels(), merged)?;
    let mut select = by_levels();
    for m in &names {
        select.push(cast(col(m.as_str()), target.field_with_name(m)?.data_type().clone()).alias(m.as_str()));
    }
    let rows = super::sorted(cube, rollup, grouped.select(select)?)?;
    let schema = Arc::new(rows.schema().as_arrow().clone());
    let planned = started.elapsed().as_millis() as u64;
    let rows = rows.collect().await?;
    tracing::debug!(rollup = %rollup.table, planned, ms = started.elapsed().as_millis() as u64, "appended");
    Ok(Some(Appending { schema, rows, read: appended.rows, prints, touched: new.prints.keys().cloned().collect() }))
}

/// Per group of `levels`, how many values of the distinct-count measure `m` the new rows bring
/// that no earlier row of the group holds. `pairs` holds, per (levels of every rollup keeping
/// `m`, value) with a value some new row holds, how many fact rows hold it (`__all`) and how
/// many of them are new (`__new`); a value is new to its group when every row of the group
/// holding it is a new one. Only pairs in the units `touched` (by the unit's level column) are
/// read: the new rows' groups are in them.
async fn new_values<'u>(ctx: &SessionContext, pairs: &str, levels: &[String], m: &str, (unit, touched): (&str, impl Iterator<Item = &'u String>)) -> Result<DataFrame> {
    let names: Vec<Expr> = touched.map(|u| lit(u.as_str())).collect();
    let pairs = ctx.table(pairs).await?;
    // A rollup at the pairs' own grain (the finest keeping `m`) reads them as they are.
    let pair_levels: BTreeSet<&str> = pairs.schema().fields().iter().map(|f| f.name().as_str()).filter(|n| !["__value", "__all", "__new"].contains(n)).collect();
    let same_grain = pair_levels == levels.iter().map(String::as_str).collect();
    let pairs = in_list(pairs, cast(col(unit), DataType::Utf8), names, false)?;
    let mut by_value: Vec<Expr> = levels.iter().map(|l| col(l.as_str())).collect();
    by_value.push(col("__value"));
    let grouped = if same_grain { pairs } else { pairs.aggregate(by_value, vec![sum(col("__all")).alias("__all"), sum(col("__new")).alias("__new")])? };
    let fresh = grouped.filter(col("__all").eq(col("__new")))?;
    Ok(fresh.aggregate(levels.iter().map(|l| col(l.as_str())).collect(), vec![count(lit(1)).alias(m)])?)
}

/// Whether every member `previous` (the stored dimension table, registered in `ctx`) held is
/// still in `current` with the same values of `columns` (its key and the levels a rollup reads).
pub async fn members_kept(ctx: &SessionContext, previous: &str, current: &str, columns: &[String]) -> Result<bool> {
    let now = ctx.table(current).await?.select_columns(&columns.iter().map(String::as_str).collect::<Vec<_>>())?;
    let before = ctx.table(previous).await?;
    // A column gone, or stored as another kind of value (text version keys before they were
    // integers): the members are not the same ones.
    let same_kind = |a: &DataType, b: &DataType| {
        let text = |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
        let time = |t: &DataType| matches!(t, DataType::Timestamp(..));
        a == b || (text(a) && text(b)) || (time(a) && time(b))
    };
    for c in columns {
        match (before.schema().field_with_unqualified_name(c), now.schema().field_with_unqualified_name(c)) {
            (Ok(b), Ok(n)) if same_kind(b.data_type(), n.data_type()) => {}
            _ => return Ok(false),
        }
    }
    let before = crate::warehouse::in_columns(before, now.schema().as_arrow())?;
    Ok(before.except(now)?.limit(0, Some(1))?.count().await? == 0)
}

/// Prints of `fact`'s rows grouped by `key`.
async fn fact_prints(ctx: &SessionContext, fact: &str, key: &str) -> Result<Vec<KeyPrint>> {
    prints_by(ctx.table(fact).await?, key).await
}

/// Prints of `df`'s rows (all columns) grouped by the value of its column `key`.
pub async fn prints_by(df: DataFrame, key: &str) -> Result<Vec<KeyPrint>> {
    let columns: Vec<Expr> = df.schema().columns().into_iter().map(Expr::Column).collect();
    let hash = ScalarUDF::from(RowHash::new()).call(columns);
    // Summed exactly (20-digit values, 30-digit sums), reduced mod 2⁶⁴ here.
    let key = datafusion::prelude::ident(key);
    let grouped = df.aggregate(vec![key.clone()], vec![count(lit(1)).alias("rows"), sum(cast(hash, DataType::Decimal128(20, 0))).alias("sum")])?;
    let grouped = grouped.select(vec![key.clone(), cast(key, DataType::Utf8).alias("__text"), col("rows"), col("sum")])?;
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

/// `array` in the one type its values hash by ([`crate::warehouse::canonical_type`]): the same
/// text hashes differently as `Utf8`, `Utf8View` and `LargeUtf8`.
fn canonical(array: ArrayRef) -> datafusion::error::Result<ArrayRef> {
    let to = crate::warehouse::canonical_type(array.data_type());
    if &to == array.data_type() {
        return Ok(array);
    }
    Ok(datafusion::arrow::compute::cast(&array, &to)?)
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
            let array = canonical(value.to_array(n)?)?;
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

    #[tokio::test]
    async fn the_same_text_prints_the_same_in_every_string_type() {
        // A table read from memory holds Utf8; read back from its Parquet files, Utf8View.
        let text = StringArray::from(vec![Some("C000001"), None, Some("C000002")]);
        let key = Int64Array::from(vec![1, 1, 2]);
        let mut seen = Vec::new();
        for ty in [DataType::Utf8, DataType::Utf8View, DataType::LargeUtf8, DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))] {
            let schema = Arc::new(Schema::new(vec![Field::new("key", DataType::Int64, false), Field::new("text", ty.clone(), true)]));
            let column = datafusion::arrow::compute::cast(&text, &ty).unwrap();
            let batch = RecordBatch::try_new(schema, vec![Arc::new(key.clone()), column]).unwrap();
            let ctx = SessionContext::new();
            let printed = prints_by(ctx.read_batch(batch).unwrap(), "key").await.unwrap();
            let mut printed: Vec<_> = printed.into_iter().map(|k| (k.text, k.print)).collect();
            printed.sort_by(|a, b| a.0.cmp(&b.0));
            seen.push((ty, printed));
        }
        for (ty, printed) in &seen[1..] {
            assert_eq!(printed, &seen[0].1, "{ty} prints differently from Utf8");
        }
        assert_ne!(seen[0].1[0].1, seen[0].1[1].1);
    }
}
