//! Eager aggregation: a cube aggregate no rollup answers is grouped by the fact's dimension keys
//! before the large dimension tables are joined.
//!
//! "Top customers of 2025" over the base tables joins every sale row of the year (3.4 M at 10 M
//! order lines) to the 400,000 customer versions, then groups those rows by two strings (id and
//! name). The same answer comes from grouping the year's sale rows by their customer key first,
//! a few hundred thousand partial sums, and joining only those to the customers:
//!
//! ```text
//! Aggregate: groupBy=[customer_customer, customer_customer_name]  aggr=[sum(revenue)]
//!   TableScan: eager_sales                                  (EagerStar, planned at scan time as)
//!     fact_sales ⋈ dim_date, year = 2025                    small and filtered: joined first
//!     Aggregate: groupBy=[customer_version]  aggr=[sum(revenue)]
//!     ⋈ dim_customer_history                                joined to the groups by their key
//! ```
//!
//! The rule ([`super::RollupRule`]) treats the grouped rows as a rollup made for the query: its
//! levels are the levels the query names, its measures the ones it aggregates, and the same
//! re-aggregation reads it (`SUM` of sums, `MIN` of minima, `SUM` of counts; `MIN`, `MAX`,
//! `COUNT(DISTINCT …)` of a level's members). That is exact because every fact row reaches a
//! dimension only through its key: rows grouped by the key meet the same dimension rows, so
//! each group's partial sum lands where its rows would have.
//!
//! It is chosen only when it pays and is exact:
//! - no measure is a distinct count (orders, customers), an approximate one, an average or
//!   semi-additive: those do not add up from partial groups;
//! - a dimension the query filters (the dates of `time_year = 2025`, the customers of
//!   `customer_region = 'East'`) is joined before grouping, so its filter cuts the rows first;
//!   its levels, where grouped, join the keys. Grouping first and filtering the groups after
//!   measured slower: provinces of East in 2025 grouped the year's 3.4 M sales by customer
//!   before four fifths of them were dropped (251 → 354 ms at 10 M order lines). Every other
//!   dimension the query reads is joined after (a "late" one), and at least one is: where all
//!   are filtered, the one with the fewest rows (a rep filtered by region: the sales grouped by
//!   rep, then the reps). A filtered dimension keyed by days or integers whose filter keeps a
//!   whole range of them (a year of dates) is not joined at all: the fact is filtered by the
//!   range of its key (`key_filter`);
//! - the groups, bounded by the product of the late dimensions' rows (and the early grouped
//!   ones'), are at most a [`MIN_REDUCTION`]th of the fact's rows. Customers × months would
//!   not be, so "KPIs by month × region" keeps the plain plan.
//!
//! Measured in the dashboard bench (`benches/dashboard.rs`, 10 M order lines, p50 against the
//! plain star join in the same run): top 10 customers of 2025 388 → 295 ms, rep regions of 2026
//! 92 → 74 ms; without rollups, year over year 127 → 56 ms and top 10 products 202 → 82 ms.
//! With integer customer versions (a later run): top customers 284 → 182 ms (DuckDB 209 ms).
//! Customer versions are integer keys (they were text, `C000123#2`, whose hashing was then the
//! largest part of what was left for top customers).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, JoinType};
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{Aggregate, Expr, ExprSchemable, TableProviderFilterPushDown, TableType, cast};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{DataFrame, SessionContext, col};

use super::{Candidate, Reaggregate, Shape, answer, pinned};
use crate::cube::{Aggregation, Cube, Dimension, DimensionJoin, LevelRef, MeasureKind, Rollup};

/// Grouping first must cut the fact's rows at least this many times (bounded by the late
/// dimensions' rows); set, not measured: at 10 M order lines the chosen plans cut 9.6 M rows
/// to 400,000 customer versions (24×) or to the reps (thousands×).
pub const MIN_REDUCTION: u64 = 4;

/// The fact grouped by dimension keys, then joined to the late dimensions: the rows the rule's
/// re-aggregation reads (see the module docs).
#[derive(Debug)]
pub(super) struct EagerStar {
    cube: Cube,
    schema: SchemaRef,
    /// The query's levels as (dimension, level index).
    levels: Vec<(String, usize)>,
    /// Dimensions (by name) joined before grouping, including those whose levels are fact columns.
    early: Vec<String>,
    /// Dimensions (by name) joined to the groups by their foreign key.
    late: Vec<String>,
    /// Level and label columns of the early dimensions: a filter on these alone cuts the fact's
    /// rows before grouping, so it is applied there (exactly) and not kept above.
    early_columns: BTreeSet<String>,
    /// (measure, aggregation, fact column).
    measures: Vec<(String, Aggregation, String)>,
}

/// What the rule needs to plan an aggregate eagerly: the rollup-like candidate, the
/// re-aggregation of each aggregate, and a note for `--explain`.
pub(super) struct Eager {
    pub candidate: Candidate,
    pub calls: Vec<Reaggregate>,
    pub note: String,
}

/// Every level of `cube` with the columns it gives the cube table (its own and its label's).
fn level_columns_of(cube: &Cube) -> Vec<(LevelRef<'_>, Vec<String>)> {
    cube.dimensions
        .iter()
        .flat_map(|d| (0..d.levels.len()).map(move |index| LevelRef { dimension: d, index }))
        .map(|l| (l, crate::query::level_columns(&[l])))
        .collect()
}

/// The eager plan for `agg` over `cube`, or why it does not apply. `rows` holds the row count
/// of every table of the snapshot.
pub(super) fn plan(cube: &Cube, rows: &BTreeMap<String, u64>, agg: &Aggregate, shape: &Shape<'_>) -> Result<Eager, String> {
    let mut used: BTreeSet<String> = shape.row_columns.clone();
    // Columns grouped or aggregated by the query (as level members): they become keys.
    let mut keyed: BTreeSet<String> = BTreeSet::new();
    for e in agg.group_expr.iter().chain(&agg.aggr_expr) {
        keyed.extend(e.column_refs().into_iter().map(|c| c.name.clone()));
    }
    used.extend(keyed.iter().cloned());
    let all = level_columns_of(cube);
    let mut levels: Vec<(String, usize)> = Vec::new();
    let mut measures: Vec<(String, Aggregation, String)> = Vec::new();
    for name in &used {
        if let Some((l, _)) = all.iter().find(|(_, cols)| cols.contains(name)) {
            let level = (l.dimension.name.clone(), l.index);
            if !levels.contains(&level) {
                levels.push(level);
            }
            continue;
        }
        let m = cube.measure(name).map_err(|_| format!("'{name}' is neither a level nor a measure of the cube"))?;
        match &m.kind {
            MeasureKind::Base { agg: a @ (Aggregation::Sum | Aggregation::Count | Aggregation::Min | Aggregation::Max), column, semi_additive: None } => {
                measures.push((name.clone(), *a, column.clone()));
            }
            _ => return Err(format!("measure '{name}' does not add up from groups of rows (a distinct count, average or semi-additive measure)")),
        }
    }
    let rollup = Rollup {
        name: "eager".into(),
        table: format!("eager_{}", cube.name),
        levels: levels.clone(),
        measures: measures.iter().map(|(n, _, _)| n.clone()).collect(),
        partition: None,
    };
    let calls = answer(cube, &rollup, agg, shape)?;

    // Which dimension joins before grouping, which after, and how many groups that may make.
    let pinned = pinned(&shape.chain);
    let dimension_of = |c: &str| all.iter().find(|(_, cols)| cols.iter().any(|x| x == c)).map(|(l, _)| l.dimension.name.clone());
    let filtered: BTreeSet<String> = shape.row_columns.iter().filter_map(|c| dimension_of(c)).collect();
    let grouped: BTreeSet<String> = keyed.iter().filter(|c| !pinned.contains(*c)).filter_map(|c| dimension_of(c)).collect();
    let (mut early, mut late, mut groups) = (Vec::new(), Vec::new(), 1u64);
    let mut late_tables = Vec::new();
    for d in cube.dimensions.iter().filter(|d| levels.iter().any(|(n, _)| *n == d.name)) {
        match &d.join {
            None if grouped.contains(&d.name) => return Err(format!("dimension {} has no table to bound its members", d.name)),
            None => early.push(d.name.clone()),
            Some(j) => {
                let n = *rows.get(&j.table).ok_or_else(|| format!("the snapshot has no table {}", j.table))?;
                if filtered.contains(&d.name) {
                    early.push(d.name.clone());
                    if grouped.contains(&d.name) {
                        groups = groups.saturating_mul(n);
                    }
                } else {
                    late.push(d.name.clone());
                    late_tables.push(format!("{} ({n} rows)", j.table));
                    groups = groups.saturating_mul(n);
                }
            }
        }
    }
    if late.is_empty() {
        // Every dimension is filtered: the one with the fewest rows is joined to the groups
        // instead, its filter applied to them.
        let fewest = early
            .iter()
            .filter_map(|name| cube.dimensions.iter().find(|d| d.name == *name))
            .filter_map(|d| d.join.as_ref().and_then(|j| rows.get(&j.table).map(|n| (d, j, *n))))
            .min_by_key(|(_, _, n)| *n);
        let Some((d, j, n)) = fewest else { return Err("its dimensions have no tables to join after grouping".into()) };
        early.retain(|x| *x != d.name);
        if !grouped.contains(&d.name) {
            groups = groups.saturating_mul(n);
        }
        late.push(d.name.clone());
        late_tables.push(format!("{} ({n} rows)", j.table));
    }
    let fact_rows = rows.get(&cube.fact).copied().unwrap_or(0);
    if groups.saturating_mul(MIN_REDUCTION) > fact_rows {
        return Err(format!(
            "grouping the {fact_rows} rows of {} by the keys of {} could keep up to {groups} groups",
            cube.fact,
            late_tables.join(", ")
        ));
    }

    // The table the re-aggregation reads: the levels' columns as the cube table types them,
    // each measure as its aggregation types it.
    let source = shape.scan_schema.clone();
    let df_schema = DFSchema::try_from(source.as_ref().clone()).map_err(|e| e.to_string())?;
    let mut fields: Vec<Field> = Vec::new();
    for c in super::level_columns(cube, &rollup) {
        fields.push(source.field_with_name(&c).map_err(|e| e.to_string())?.clone().with_nullable(true));
    }
    for (name, a, _) in &measures {
        let t = crate::query::aggregate_call(*a, col(Column::new_unqualified(name.as_str()))).get_type(&df_schema).map_err(|e| e.to_string())?;
        fields.push(Field::new(name.as_str(), t, true));
    }
    let early_columns: BTreeSet<String> = all.iter().filter(|(l, _)| early.contains(&l.dimension.name)).flat_map(|(_, cols)| cols.iter().cloned()).collect();
    let keys: Vec<String> = cube
        .dimensions
        .iter()
        .filter(|d| late.contains(&d.name))
        .filter_map(|d| d.join.as_ref().map(|j| j.foreign_key.clone()))
        .chain(keyed.iter().filter(|c| early_columns.contains(*c) && !pinned.contains(*c)).cloned())
        .collect();
    let note = format!(
        "eager aggregation: {} grouped by {} (at most {groups} groups of {fact_rows} rows) before joining {}",
        cube.fact,
        keys.join(", "),
        late_tables.join(", ")
    );
    let star = EagerStar { cube: cube.clone(), schema: Arc::new(Schema::new(fields)), levels, early, late, early_columns, measures };
    Ok(Eager { candidate: Candidate { rollup, source: provider_as_source(Arc::new(star)), rows: groups }, calls, note })
}

/// `e` with its columns unqualified: the filters arrive qualified by the rule's scan name, the
/// frame built here names its columns without one.
fn unqualified(e: &Expr) -> datafusion::error::Result<Expr> {
    Ok(e.clone()
        .transform_up(|x| match x {
            Expr::Column(c) if c.relation.is_some() => Ok(Transformed::yes(Expr::Column(Column::new_unqualified(c.name)))),
            other => Ok(Transformed::no(other)),
        })?
        .data)
}

/// `df` left-joined to a dimension's table by its foreign key, adding `columns` (output name,
/// table column), as the cube table joins it.
async fn join_dimension(ctx: &SessionContext, df: DataFrame, dimension: &str, j: &DimensionJoin, columns: &[(String, String)]) -> datafusion::error::Result<DataFrame> {
    let (dim, key) = dimension_frame(ctx, dimension, j, columns).await?;
    df.join(dim, JoinType::Left, &[j.foreign_key.as_str()], &[key.as_str()], None)
}

/// A dimension's table with `columns` (output name, table column) and its key as `__key_<dimension>`.
async fn dimension_frame(ctx: &SessionContext, dimension: &str, j: &DimensionJoin, columns: &[(String, String)]) -> datafusion::error::Result<(DataFrame, String)> {
    let key = format!("__key_{dimension}");
    let mut select: Vec<Expr> = columns.iter().map(|(n, s)| col(Column::new_unqualified(s.as_str())).alias(n.as_str())).collect();
    select.push(col(Column::new_unqualified(j.key.as_str())).alias(key.as_str()));
    Ok((ctx.table(j.table.as_str()).await?.select(select)?, key))
}

/// Kept keys up to which a filtered dimension's rows are read to filter the fact by its key.
pub const KEY_FILTER_ROWS: usize = 10_000;

/// What a filtered dimension's kept keys do to the fact.
enum KeyFilter {
    /// Keeps exactly the rows the join and the filters keep: the dimension is not joined.
    Exact(Expr),
    /// A range of keys that cuts the rows before the join (and lets the scan skip row groups
    /// and pages outside it); the join and the filters still decide (three months of two years).
    Narrow(Expr),
}

/// A filter on the fact's foreign key from the dimension rows `filters` keep (see [`KeyFilter`]),
/// or None (no filters, more than [`KEY_FILTER_ROWS`] kept rows, or a filter that could keep a
/// fact row without a dimension row). `time_year = 2025` becomes
/// `order_date >= 2025-01-01 AND order_date <= 2025-12-31`: the scan compares dates instead of
/// probing a hash table for every sale, and skips the row groups and pages outside the year.
///
/// Only for keys that are days or integers. Exact when every filter rejects a fact row the
/// dimension has no row for (its columns NULL after the left join: `time_year = 2025` does,
/// `time_year IS NULL` does not), no kept key is kept twice (each fact row then matches at most
/// one kept dimension row, as in the join), and the keys are a whole range (or none at all).
async fn key_filter(ctx: &SessionContext, dimension: &str, j: &DimensionJoin, columns: &[(String, String)], filters: &[Expr]) -> datafusion::error::Result<Option<KeyFilter>> {
    use datafusion::common::ScalarValue;
    use datafusion::prelude::lit;
    if filters.is_empty() {
        return Ok(None);
    }
    for f in filters {
        let refs = f.column_refs();
        if !datafusion::optimizer::utils::is_restrict_null_predicate(f.clone(), refs.iter().copied())? {
            return Ok(None);
        }
    }
    let (mut kept, key) = dimension_frame(ctx, dimension, j, columns).await?;
    // Other keys (strings) are joined: the scan tests its filters row by row as it decodes, and
    // at 10 M order lines `product_id IN (the 15 products of a category)` there made a slice
    // 192 → 371 ms where the join probes one small hash table. Decided from the key's type,
    // before reading any row. Integer keys (customer versions) are read up to the limit: a
    // region's 80,000 versions stop the read there; a city's, spread over the whole key range,
    // give a range that keeps nearly every row (two comparisons a row) and the join decides.
    let key_type = kept.schema().field_with_unqualified_name(&key)?.data_type().clone();
    if !matches!(key_type, DataType::Date32 | DataType::Int32 | DataType::Int64) {
        return Ok(None);
    }
    for f in filters {
        kept = kept.filter(f.clone())?;
    }
    let batches = kept.select(vec![col(Column::new_unqualified(key.as_str()))])?.limit(0, Some(KEY_FILTER_ROWS + 1))?.collect().await?;
    let mut keys: Vec<ScalarValue> = Vec::new();
    for b in &batches {
        for i in 0..b.num_rows() {
            keys.push(ScalarValue::try_from_array(b.column(0), i)?);
        }
    }
    if keys.len() > KEY_FILTER_ROWS {
        return Ok(None);
    }
    keys.retain(|k| !k.is_null());
    let n = keys.len();
    keys.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    keys.dedup();
    let unique = keys.len() == n;
    let fk = col(Column::new_unqualified(j.foreign_key.as_str()));
    let (Some(first), Some(last)) = (keys.first().cloned(), keys.last().cloned()) else {
        return Ok(Some(KeyFilter::Exact(lit(false))));
    };
    // A range is two comparisons, worth testing even where it is not exact.
    let span = match (&first, &last) {
        (ScalarValue::Date32(Some(a)), ScalarValue::Date32(Some(b))) | (ScalarValue::Int32(Some(a)), ScalarValue::Int32(Some(b))) => Some(i64::from(*b) - i64::from(*a) + 1),
        (ScalarValue::Int64(Some(a)), ScalarValue::Int64(Some(b))) => Some(b - a + 1),
        _ => None,
    };
    let range = span.map(|_| fk.clone().gt_eq(lit(first)).and(fk.clone().lt_eq(lit(last))));
    Ok(range.map(|range| if unique && span == Some(keys.len() as i64) { KeyFilter::Exact(range) } else { KeyFilter::Narrow(range) }))
}

impl EagerStar {
    fn dimensions(&self, names: &[String]) -> Vec<&Dimension> {
        self.cube.dimensions.iter().filter(|d| names.contains(&d.name)).collect()
    }

    /// The query's levels of `d` with their columns: (output name, dimension table column).
    fn columns_of(&self, d: &Dimension, needed: &BTreeSet<String>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (_, index) in self.levels.iter().filter(|(n, _)| *n == d.name) {
            let l = LevelRef { dimension: d, index: *index };
            out.extend(crate::query::level_sources(&l).into_iter().filter(|(name, _)| needed.contains(name)));
        }
        out
    }

    fn is_early(&self, filter: &Expr) -> bool {
        let columns = filter.column_refs();
        !columns.is_empty() && columns.iter().all(|c| self.early_columns.contains(&c.name))
    }
}

#[async_trait::async_trait]
impl TableProvider for EagerStar {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // On early columns: applied to the fact's rows before grouping, which is exactly the
        // query's filter. Any other: applied to the joined groups inside and kept above.
        Ok(filters.iter().map(|f| if self.is_early(f) { TableProviderFilterPushDown::Exact } else { TableProviderFilterPushDown::Inexact }).collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let (ctx, output) = crate::query::sql::scan_session(state, &self.schema, projection)?;
        let filters: Vec<Expr> = filters.iter().map(unqualified).collect::<datafusion::error::Result<_>>()?;
        let (mut before, after): (Vec<Expr>, Vec<Expr>) = filters.into_iter().partition(|f| self.is_early(f));
        let mut needed: BTreeSet<String> = output.iter().cloned().collect();
        for f in before.iter().chain(&after) {
            needed.extend(f.column_refs().into_iter().map(|c| c.name.clone()));
        }
        // Keys of the groups: the early columns read above the grouping, then the late
        // dimensions' foreign keys.
        let mut above: BTreeSet<String> = output.iter().cloned().collect();
        for f in &after {
            above.extend(f.column_refs().into_iter().map(|c| c.name.clone()));
        }

        let mut df = ctx.table(self.cube.fact.as_str()).await?;
        let mut keys: Vec<Expr> = Vec::new();
        for d in self.dimensions(&self.early) {
            let columns = self.columns_of(d, &needed);
            keys.extend(columns.iter().filter(|(n, _)| above.contains(n)).map(|(n, _)| col(Column::new_unqualified(n.as_str()))));
            if columns.is_empty() {
                continue;
            }
            // Only filtered, not grouped: the keys its filters keep may filter the fact instead.
            if let Some(j) = &d.join
                && !columns.iter().any(|(n, _)| above.contains(n))
            {
                let names: BTreeSet<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
                let (own, rest): (Vec<Expr>, Vec<Expr>) = before.into_iter().partition(|f| f.column_refs().iter().all(|c| names.contains(c.name.as_str())));
                before = rest;
                match key_filter(&ctx, &d.name, j, &columns, &own).await? {
                    Some(KeyFilter::Exact(predicate)) => {
                        df = df.filter(predicate)?;
                        continue;
                    }
                    Some(KeyFilter::Narrow(predicate)) => df = df.filter(predicate)?,
                    None => {}
                }
                before.extend(own);
            }
            match &d.join {
                Some(j) => df = join_dimension(&ctx, df, &d.name, j, &columns).await?,
                None => {
                    for (n, s) in &columns {
                        df = df.with_column(n, col(Column::new_unqualified(s.as_str())))?;
                    }
                }
            }
        }
        for f in before {
            df = df.filter(f)?;
        }
        let late: Vec<(&Dimension, Vec<(String, String)>)> =
            self.dimensions(&self.late).into_iter().map(|d| (d, self.columns_of(d, &needed))).filter(|(_, c)| !c.is_empty()).collect();
        keys.extend(late.iter().filter_map(|(d, _)| d.join.as_ref()).map(|j| col(Column::new_unqualified(j.foreign_key.as_str()))));
        let groups = keys.len();
        let aggregates: Vec<Expr> = self.measures.iter().map(|(_, a, c)| crate::query::aggregate_call(*a, col(Column::new_unqualified(c.as_str())))).collect();
        df = df.aggregate(keys, aggregates)?;
        // Aggregates unaliased in the Aggregate node (see query::aggregate), named above it.
        let columns = df.schema().columns();
        let mut select: Vec<Expr> = columns[..groups].iter().map(|c| Expr::Column(Column::new_unqualified(c.name.as_str()))).collect();
        select.extend(self.measures.iter().enumerate().map(|(i, (m, _, _))| Expr::Column(columns[groups + i].clone()).alias(m.as_str())));
        df = df.select(select)?;
        for (d, columns) in late {
            if let Some(j) = &d.join {
                df = join_dimension(&ctx, df, &d.name, j, &columns).await?;
            }
        }
        for f in after {
            df = df.filter(f)?;
        }
        let select: Vec<Expr> = output
            .iter()
            .map(|c| {
                let t = self.schema.field_with_name(c)?.data_type().clone();
                Ok(cast(col(Column::new_unqualified(c.as_str())), t).alias(c.as_str()))
            })
            .collect::<datafusion::error::Result<_>>()?;
        df = df.select(select)?;
        if let Some(n) = limit {
            df = df.limit(0, Some(n))?;
        }
        crate::query::sql::scan_plan(df).await
    }
}
