//! Rollups: pre-aggregated cube tables, built by every load and chosen automatically by queries.
//!
//! A rollup (declared under `rollups:` in a cube file) stores the cube's base measures grouped
//! by a few levels — plus every coarser level of the same dimensions, since a month determines
//! its quarter and year. It is an ordinary Delta table of the snapshot (`rollup_<cube>_<name>`),
//! written after the base tables by `crmcube load` and stamped in the manifest with a
//! fingerprint of its definition, so a rollup left over from an older cube file never answers.
//! A load rebuilds a partitioned rollup only in the partitions whose fact rows changed
//! ([`partitions`]).
//!
//! [`RollupRule`] is a DataFusion analyzer rule. Every cube query reaches it in the same shape,
//! from the CLI (which plans over `cubes.<cube>`) and from SQL or Flight SQL alike:
//!
//! ```text
//! Aggregate: groupBy=[customer_region]  aggr=[sum(revenue), count(DISTINCT orders)]
//!   Filter: time_year = 2025                  (any Filter / SubqueryAlias / column Projection)
//!     TableScan: cubes.sales
//! ```
//!
//! It replaces the scan with the smallest rollup that answers the aggregate exactly and
//! re-aggregates: `SUM` of sums, `MIN`/`MAX` of minima/maxima, `SUM` of counts; `MIN`, `MAX`
//! and `COUNT(DISTINCT …)` of a rollup's own level columns. A stored distinct count (orders,
//! customers) only answers a query at the rollup's own grain — grouped by all its levels, up to
//! the coarser levels they imply — because distinct counts do not add up. An approximate one
//! (`approx_count_distinct`) is stored as a HyperLogLog sketch and merges at any grouping
//! ([`sketch`]); `--explain` says the answer is approximate. Filters and grouping
//! may name only the rollup's level columns. Anything else keeps the base tables. The output is
//! cast back to the types and names the base plan had, so nothing above the aggregate changes.
//!
//! Where no rollup answers, the same re-aggregation reads the fact grouped by its dimension keys
//! before the large dimensions are joined, when that is exact and shrinks the rows ([`eager`]);
//! otherwise the plain star join answers.
//!
//! Access rules: sessions of restricted users do not install the rule (their tables are rule
//! views; rollups are aggregates over everything), so they always read the base tables.

pub mod eager;
mod holds;
pub mod partitions;
pub mod sketch;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use datafusion::catalog::TableProvider;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, TableReference};
use datafusion::datasource::provider_as_source;
use datafusion::functions_aggregate::expr_fn::{count_distinct, max, min, sum};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, Projection, SubqueryAlias, TableSource, cast};
use datafusion::optimizer::AnalyzerRule;
use datafusion::prelude::{DataFrame, SessionContext, coalesce, col, lit};

use crate::cube::{Aggregation, Cube, CubeSet, LevelRef, MeasureKind, Rollup};
use crate::error::Result;
use crate::query::sql::CUBES_SCHEMA;
use crate::warehouse::Snapshot;

/// Output column names of a rollup's levels, each followed by its label when it has one.
pub fn level_columns(cube: &Cube, rollup: &Rollup) -> Vec<String> {
    crate::query::level_columns(&rollup.level_refs(cube))
}

/// The rows of `rollup`, planned over the cube's tables in `ctx`, sorted by its partition and
/// levels (so each Parquet row group covers a narrow range of members).
pub async fn build(ctx: &SessionContext, cube: &Cube, rollup: &Rollup) -> Result<DataFrame> {
    sorted(cube, rollup, aggregate(ctx, cube, rollup).await?)
}

/// The rollup's rows grouped from the cube's rows, in no particular order.
async fn aggregate(ctx: &SessionContext, cube: &Cube, rollup: &Rollup) -> Result<DataFrame> {
    let groups = level_columns(cube, rollup);
    let mut wanted = groups.clone();
    wanted.extend(rollup.measures.iter().cloned());
    let rows = crate::query::cube_frame(ctx, cube, Some(&wanted)).await?;
    let mut aggs = Vec::new();
    for name in &rollup.measures {
        let m = cube.measure(name)?;
        let MeasureKind::Base { agg, .. } = &m.kind else { continue };
        // The cube model refuses averages in rollups, so every call here re-aggregates; an
        // approximate distinct count is stored as its sketch (see sketch.rs).
        aggs.push(match agg {
            Aggregation::ApproxCountDistinct => sketch::sketch_udaf().call(vec![col(name.as_str())]),
            _ => crate::query::aggregate_call(*agg, col(name.as_str())),
        });
    }
    // Aggregates unaliased in the Aggregate node (see query::aggregate), named above it.
    let grouped = rows.aggregate(groups.iter().map(|g| col(g.as_str())).collect(), aggs)?;
    let columns = grouped.schema().columns();
    let mut select: Vec<Expr> = groups.iter().map(|g| col(g.as_str())).collect();
    select.extend(rollup.measures.iter().enumerate().map(|(i, m)| Expr::Column(columns[groups.len() + i].clone()).alias(m.as_str())));
    Ok(grouped.select(select)?)
}

/// A rollup's rows in the order they are written: by partition, then by every level.
fn sorted(cube: &Cube, rollup: &Rollup, rows: DataFrame) -> Result<DataFrame> {
    let mut sorts = Vec::new();
    if let Some(p) = rollup.partition_column(cube) {
        sorts.push(col(p.as_str()).sort(true, true));
    }
    sorts.extend(level_columns(cube, rollup).iter().map(|g| col(g.as_str()).sort(true, true)));
    Ok(rows.sort(sorts)?)
}

/// Rollups up to this many rows are kept in memory by a session after their first read.
pub const IN_MEMORY_ROWS: u64 = 1_000_000;

/// A small rollup read once per session, then answered from memory: a dashboard asks the same
/// rollups again and again, and a few thousand rows cost less to keep than to plan a Parquet
/// scan for (log replay, file listing, partition pruning) on every query.
#[derive(Debug)]
struct InMemory {
    inner: Arc<dyn TableProvider>,
    cache: tokio::sync::OnceCell<Arc<datafusion::datasource::MemTable>>,
    /// The rollup's rows in the snapshot (for [`OnePartition`]).
    rows: u64,
}

/// A query that reads only small in-memory rollups is planned on one partition, once per session.
///
/// Its whole work is aggregating a few thousand rows, a fraction of a millisecond; planned on
/// the session's partitions (two here), it is a partial aggregate, a hash repartition and a
/// final aggregate whose tasks hand batches between threads, which cost more than the work.
/// Measured in-process over the 10 M-line sample, 3,000 runs of one query: year over year by
/// quarter (`rollup_sales_month`) 1.02-1.12 -> 0.79-0.82 ms; category × channel, 2025
/// 1.66 -> 1.27 ms. The session state is cloned for it (~70 µs of that: one partition for the
/// whole session measured 0.72 ms). Every other plan (any base table, or more than
/// [`ONE_PARTITION_ROWS`] rollup rows) is planned as the session says.
///
/// A dashboard sends the same queries again and again, and the Flight SQL server keeps a session
/// per user and snapshot: the physical plan of such a query is kept, by its optimized logical
/// plan, and run again with its state reset (`reset_plan_states`) instead of being planned
/// again. They are planned without dynamic filters, the one state a reset does not reach (a
/// TopK's filter handed to the nodes below it); over a few thousand rows they save nothing.
#[derive(Debug)]
struct OnePartition {
    /// The session's planner before, which plans every query, with one partition or not.
    inner: Arc<dyn datafusion::execution::context::QueryPlanner + Send + Sync>,
    /// Physical plans of small-rollup queries, by logical plan (at most [`PLAN_CACHE_ENTRIES`]).
    plans: Mutex<std::collections::HashMap<LogicalPlan, Arc<dyn datafusion::physical_plan::ExecutionPlan>>>,
    /// The rule's notes, where a reused plan says so (after the rule's notes for it).
    notes: Notes,
}

/// The note a query answered by a kept plan adds.
pub const PLAN_REUSED: &str = "physical plan reused: this session planned the same query before";

/// Rollup rows up to which a query is planned on one partition. Set, not measured: one thread
/// aggregates this many in-memory rows in a few milliseconds; rollups at 10 M order lines have
/// at most a few thousand.
pub const ONE_PARTITION_ROWS: u64 = 100_000;

/// Small-rollup plans a session keeps; when full, it starts again. Set, not measured: a
/// dashboard has tens of distinct queries.
pub const PLAN_CACHE_ENTRIES: usize = 256;

#[async_trait::async_trait]
impl datafusion::execution::context::QueryPlanner for OnePartition {
    async fn create_physical_plan(
        &self,
        plan: &LogicalPlan,
        session: &dyn datafusion::catalog::Session,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let Some(state) = session.as_any().downcast_ref::<datafusion::execution::SessionState>().filter(|_| reads_only_small_rollups(plan)) else {
            return self.inner.create_physical_plan(plan, session).await;
        };
        let cached = self.plans.lock().unwrap_or_else(|e| e.into_inner()).get(plan).cloned();
        if let Some(physical) = cached {
            self.notes.lock().unwrap_or_else(|e| e.into_inner()).push(PLAN_REUSED.into());
            return datafusion::physical_plan::execution_plan::reset_plan_states(physical);
        }
        let mut one = state.clone();
        let options = one.config_mut().options_mut();
        options.execution.target_partitions = 1;
        options.optimizer.enable_dynamic_filter_pushdown = false;
        options.optimizer.enable_topk_dynamic_filter_pushdown = false;
        options.optimizer.enable_join_dynamic_filter_pushdown = false;
        options.optimizer.enable_aggregate_dynamic_filter_pushdown = false;
        let physical = self.inner.create_physical_plan(plan, &one).await?;
        if matches!(plan, LogicalPlan::Analyze(_)) {
            return Ok(physical); // its metrics are its answer: planned afresh every time
        }
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if plans.len() >= PLAN_CACHE_ENTRIES {
            plans.clear();
        }
        plans.insert(plan.clone(), physical.clone());
        Ok(physical)
    }
}

/// Whether every table `plan` scans is an in-memory rollup, together at most
/// [`ONE_PARTITION_ROWS`] rows (and it scans at least one).
fn reads_only_small_rollups(plan: &LogicalPlan) -> bool {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let (mut rows, mut scans, mut other) = (0u64, 0usize, false);
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let provider = datafusion::datasource::source_as_provider(&scan.source).ok();
            match provider.as_deref().and_then(|p| p.downcast_ref::<InMemory>()) {
                Some(m) => {
                    rows += m.rows;
                    scans += 1;
                }
                None => {
                    other = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    !other && scans > 0 && rows <= ONE_PARTITION_ROWS
}

#[async_trait::async_trait]
impl TableProvider for InMemory {
    fn schema(&self) -> datafusion::arrow::datatypes::SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> datafusion::logical_expr::TableType {
        datafusion::logical_expr::TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let table = self
            .cache
            .get_or_try_init(|| async {
                let plan = self.inner.scan(state, None, &[], None).await?;
                let batches = datafusion::physical_plan::collect(plan, state.task_ctx()).await?;
                // The scan may order or type columns its own way: line them up with schema().
                let schema = self.inner.schema();
                let batches = batches
                    .into_iter()
                    .map(|b| {
                        let columns = schema
                            .fields()
                            .iter()
                            .map(|f| {
                                let c = b.column_by_name(f.name()).ok_or_else(|| {
                                    datafusion::error::DataFusionError::Internal(format!("rollup scan lacks column {}", f.name()))
                                })?;
                                Ok(datafusion::arrow::compute::cast(c, f.data_type())?)
                            })
                            .collect::<datafusion::error::Result<Vec<_>>>()?;
                        Ok(datafusion::arrow::array::RecordBatch::try_new(schema.clone(), columns)?)
                    })
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                Ok::<_, datafusion::error::DataFusionError>(Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![batches])?))
            })
            .await?;
        table.scan(state, projection, filters, limit).await
    }
}

/// A stored rollup a session can read.
struct Candidate {
    rollup: Rollup,
    source: Arc<dyn TableSource>,
    rows: u64,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate").field("rollup", &self.rollup.table).field("rows", &self.rows).finish()
    }
}

/// The cubes of a session with the rollups their snapshot holds.
#[derive(Debug)]
struct CubeRollups {
    cube: Cube,
    candidates: Vec<Candidate>,
    /// Declared rollups the snapshot lacks or holds from an older definition, with the reason.
    unusable: Vec<String>,
}

/// Rewrites aggregates over `cubes.<cube>` to read a rollup (see the module docs), or where none
/// answers, to group the fact by its dimension keys first ([`eager`]).
#[derive(Debug)]
pub struct RollupRule {
    cubes: Vec<CubeRollups>,
    /// Rows of every table of the snapshot, for the eager plan's estimate; None: no eager plans.
    eager: Option<BTreeMap<String, u64>>,
    /// What the rule decided for the plans it saw last: for `--explain`.
    notes: Notes,
}

/// Where the rollup rule writes what it decided for the last plan it saw (`--explain` prints it).
pub type Notes = Arc<Mutex<Vec<String>>>;

/// Which rewrites a session's aggregates over cubes get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrites {
    /// Read the stored rollups that answer exactly.
    pub rollups: bool,
    /// Where none does, group the fact by its dimension keys before joining large dimensions.
    pub eager: bool,
}

impl Rewrites {
    pub const ALL: Rewrites = Rewrites { rollups: true, eager: true };
}

/// Installs the rollup rule in `ctx` for the rollups `snapshot` holds (tables already
/// registered there), with eager aggregation where no rollup answers. Returns the notes the
/// rule writes, for `--explain`.
pub async fn install(ctx: &SessionContext, cubes: &CubeSet, snapshot: &Snapshot) -> Result<Notes> {
    install_with(ctx, cubes, snapshot, Rewrites::ALL).await
}

/// [`install`] with the rewrites chosen: `crmcube --no-rollups` keeps eager aggregation, and the
/// tests compare each rewrite with the plain plan.
pub async fn install_with(ctx: &SessionContext, cubes: &CubeSet, snapshot: &Snapshot, with: Rewrites) -> Result<Notes> {
    let mut out = Vec::new();
    for cube in &cubes.cubes {
        let mut candidates = Vec::new();
        let mut unusable = Vec::new();
        for r in cube.rollups.iter().filter(|_| with.rollups) {
            let stored = snapshot.rollups.get(&r.table);
            let entry = snapshot.tables.get(&r.table);
            match (stored, entry) {
                (Some(f), Some(entry)) if *f == r.fingerprint(cube) => {
                    let mut provider: Arc<dyn TableProvider> = ctx.table_provider(r.table.as_str()).await?;
                    if entry.rows <= IN_MEMORY_ROWS {
                        provider = Arc::new(InMemory { inner: provider, cache: tokio::sync::OnceCell::new(), rows: entry.rows });
                    }
                    candidates.push(Candidate { rollup: r.clone(), source: provider_as_source(provider), rows: entry.rows });
                }
                (Some(_), Some(_)) => unusable.push(format!(
                    "rollup {}.{} is stale (the cube file changed since snapshot {} built it); `crmcube refresh` or the next load rebuilds it",
                    cube.name, r.name, snapshot.id
                )),
                _ => unusable.push(format!("rollup {}.{} is not built yet in snapshot {}; `crmcube refresh` builds it", cube.name, r.name, snapshot.id)),
            }
        }
        candidates.sort_by_key(|c| c.rows);
        if (with.rollups && !cube.rollups.is_empty()) || with.eager {
            out.push(CubeRollups { cube: cube.clone(), candidates, unusable });
        }
    }
    let notes = Arc::new(Mutex::new(Vec::new()));
    if !out.is_empty() {
        let eager = with.eager.then(|| snapshot.tables.iter().map(|(t, e)| (t.clone(), e.rows)).collect());
        ctx.add_analyzer_rule(Arc::new(RollupRule { cubes: out, eager, notes: notes.clone() }));
        let state = ctx.state_ref();
        let mut state = state.write();
        let inner = state.query_planner().clone();
        let with_planner = datafusion::execution::SessionStateBuilder::new_from_existing(state.clone())
            .with_query_planner(Arc::new(OnePartition { inner, plans: Mutex::default(), notes: notes.clone() }))
            .build();
        *state = with_planner;
    }
    Ok(notes)
}

impl AnalyzerRule for RollupRule {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> datafusion::error::Result<LogicalPlan> {
        let mut notes = Vec::new();
        let out = plan
            .transform_up_with_subqueries(|node| {
                let LogicalPlan::Aggregate(agg) = &node else { return Ok(Transformed::no(node)) };
                match self.rewrite(agg, &mut notes)? {
                    Some(new) => Ok(Transformed::yes(new)),
                    None => Ok(Transformed::no(node)),
                }
            })?
            .data;
        if !notes.is_empty() {
            for n in &notes {
                tracing::debug!(target: "crmcube::rollup", "{n}");
            }
            *self.notes.lock().unwrap_or_else(|e| e.into_inner()) = notes;
        }
        Ok(out)
    }

    fn name(&self) -> &str {
        "crmcube_rollups"
    }
}

/// An aggregate's input as the rule sees it: the nodes down to a cube scan.
struct Shape<'p> {
    /// Filter, SubqueryAlias and Projection nodes from the aggregate down.
    chain: Vec<&'p LogicalPlan>,
    scan_name: TableReference,
    /// The cube table's columns.
    scan_schema: datafusion::arrow::datatypes::SchemaRef,
    /// Columns named by filters and projections (not by aggregate arguments).
    row_columns: BTreeSet<String>,
}

impl RollupRule {
    /// The cube a scan reads, when it is `cubes.<name>` of a cube with rollups.
    fn cube_of(&self, name: &TableReference) -> Option<&CubeRollups> {
        let schema_ok = name.schema() == Some(CUBES_SCHEMA) && name.catalog().is_none_or(|c| c == crate::warehouse::CATALOG);
        schema_ok.then(|| self.cubes.iter().find(|c| c.cube.name == name.table())).flatten()
    }

    fn shape<'p>(&self, agg: &'p Aggregate) -> Option<Shape<'p>> {
        let mut chain = Vec::new();
        let mut row_columns = BTreeSet::new();
        let mut node = agg.input.as_ref();
        loop {
            match node {
                LogicalPlan::Filter(f) => {
                    if has_subquery(&f.predicate) {
                        return None;
                    }
                    row_columns.extend(f.predicate.column_refs().into_iter().map(|c| c.name.clone()));
                    chain.push(node);
                    node = f.input.as_ref();
                }
                LogicalPlan::SubqueryAlias(s) => {
                    chain.push(node);
                    node = s.input.as_ref();
                }
                LogicalPlan::Projection(p) => {
                    // Only a choice of columns (the CLI's), so names above mean the same below.
                    if !p.expr.iter().all(|e| matches!(e, Expr::Column(_))) {
                        return None;
                    }
                    chain.push(node);
                    node = p.input.as_ref();
                }
                LogicalPlan::TableScan(scan) if scan.filters.is_empty() && scan.fetch.is_none() => {
                    return Some(Shape { chain, scan_name: scan.table_name.clone(), scan_schema: scan.source.schema(), row_columns });
                }
                _ => return None,
            }
        }
    }

    fn rewrite(&self, agg: &Aggregate, notes: &mut Vec<String>) -> datafusion::error::Result<Option<LogicalPlan>> {
        let Some(shape) = self.shape(agg) else { return Ok(None) };
        let Some(cube) = self.cube_of(&shape.scan_name) else { return Ok(None) };
        let mut why: Vec<String> = cube.unusable.clone();
        for c in &cube.candidates {
            match answer(&cube.cube, &c.rollup, agg, &shape) {
                Ok(exprs) => {
                    let approximate = exprs.iter().any(|r| r.approximate);
                    let plan = rebuild(agg, &shape, c, exprs)?;
                    notes.push(format!("rollup {}.{} ({} rows, table {}) answers this aggregate", cube.cube.name, c.rollup.name, c.rows, c.rollup.table));
                    if approximate {
                        notes.push(format!("approximate: its distinct-count estimates merge the HyperLogLog sketches rollup {}.{} stores (the same estimate as over the base rows, about ±0.8 %)", cube.cube.name, c.rollup.name));
                    }
                    return Ok(Some(plan));
                }
                Err(reason) => why.push(format!("rollup {}.{}: {reason}", cube.cube.name, c.rollup.name)),
            }
        }
        if !cube.cube.rollups.is_empty() && (!cube.candidates.is_empty() || !cube.unusable.is_empty()) {
            notes.push(format!("no rollup of cube {} answers this aggregate; the base tables do. {}", cube.cube.name, why.join("; ")));
        }
        let Some(rows) = &self.eager else { return Ok(None) };
        match eager::plan(&cube.cube, rows, agg, &shape) {
            Ok(e) => {
                let plan = rebuild(agg, &shape, &e.candidate, e.calls)?;
                notes.push(e.note);
                Ok(Some(plan))
            }
            Err(why) => {
                notes.push(format!("no eager aggregation: {why}"));
                Ok(None)
            }
        }
    }
}

/// Columns a filter of the chain holds to one value (`column = literal` conjuncts).
fn pinned(chain: &[&LogicalPlan]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for node in chain {
        let LogicalPlan::Filter(f) = node else { continue };
        for conjunct in datafusion::logical_expr::utils::split_conjunction(&f.predicate) {
            if let Expr::BinaryExpr(b) = conjunct
                && b.op == datafusion::logical_expr::Operator::Eq
            {
                // A widening cast (type coercion's) still holds the column to one value.
                let column = |e: &Expr| match e {
                    Expr::Column(c) => Some(c.name.clone()),
                    Expr::Cast(c) => match c.expr.as_ref() {
                        Expr::Column(c) => Some(c.name.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                match (b.left.as_ref(), b.right.as_ref()) {
                    (l, Expr::Literal(..)) | (Expr::Literal(..), l) => out.extend(column(l)),
                    _ => {}
                }
            }
        }
    }
    out
}

/// Whether `e` holds a subquery (scalar, IN or EXISTS).
pub(crate) fn has_subquery(e: &Expr) -> bool {
    e.exists(|x| Ok(matches!(x, Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_)))).unwrap_or(true)
}

/// One aggregate of the query as an aggregate over the rollup's rows.
struct Reaggregate {
    call: Expr,
    /// A count: an empty input gives 0, where SUM of stored counts gives NULL.
    zero_if_null: bool,
    /// Merged HyperLogLog sketches: an estimate (as the base rows' `approx_distinct` is).
    approximate: bool,
}

/// How each aggregate expression reads the rollup, or why the rollup cannot answer.
fn answer(cube: &Cube, rollup: &Rollup, agg: &Aggregate, shape: &Shape<'_>) -> std::result::Result<Vec<Reaggregate>, String> {
    let levels = rollup.level_refs(cube);
    let stored: BTreeSet<String> = level_columns(cube, rollup).into_iter().collect();
    let missing = |c: &str| -> String {
        match cube.dimensions.iter().flat_map(|d| (0..d.levels.len()).map(move |index| LevelRef { dimension: d, index })).find(|l| l.output_name() == c) {
            Some(l) => format!("it has no level {}", l.qualified()),
            None => format!("'{c}' is not one of its level columns"),
        }
    };
    for c in &shape.row_columns {
        if !stored.contains(c) && !rollup.measures.contains(c) {
            return Err(missing(c));
        }
    }
    // Rows are filtered by members only: a filter on a measure's row values needs the rows.
    for f in &shape.chain {
        if let LogicalPlan::Filter(f) = f
            && let Some(c) = f.predicate.column_refs().into_iter().find(|c| !stored.contains(&c.name))
        {
            return Err(format!("the query filters on row values of '{}'", c.name));
        }
    }
    let mut grouped_plain = true;
    // Columns pinned to one member by `column = value` count as grouped for the grain.
    let mut grouped: BTreeSet<String> = pinned(&shape.chain);
    for g in &agg.group_expr {
        if matches!(g, Expr::GroupingSet(_)) {
            return Err("grouping sets are answered from the base tables".into());
        }
        for c in g.column_refs() {
            if !stored.contains(&c.name) {
                return Err(missing(&c.name));
            }
            grouped.insert(c.name.clone());
        }
        grouped_plain &= matches!(g, Expr::Column(_));
    }
    // The rollup's own grain: every level it groups by, implied by the query's groups.
    let mut implied: BTreeSet<String> = BTreeSet::new();
    for l in &levels {
        if grouped.contains(&l.output_name()) {
            implied.extend((0..=l.index).map(|i| LevelRef { dimension: l.dimension, index: i }.output_name()));
        }
    }
    let same_grain = grouped_plain && levels.iter().all(|l| implied.contains(&l.output_name()));

    let mut out = Vec::new();
    for e in &agg.aggr_expr {
        let inner = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            other => other,
        };
        let Expr::AggregateFunction(AggregateFunction { func, params }) = inner else {
            return Err(format!("'{inner}' is not an aggregate call"));
        };
        if params.filter.is_some() || !params.order_by.is_empty() || params.args.len() != 1 {
            return Err(format!("'{inner}' has a FILTER, ORDER BY or several arguments"));
        }
        let function = func.name().to_ascii_lowercase();
        // An approximate distinct count hashes its column through crmcube_hll_value.
        let argument = match &params.args[0] {
            Expr::ScalarFunction(f) if function == "approx_distinct" && f.func.name() == sketch::VALUE_FUNCTION && f.args.len() == 1 => &f.args[0],
            other => other,
        };
        let Expr::Column(arg) = argument else {
            return Err(format!("'{inner}' aggregates an expression, not a column"));
        };
        let c = Expr::Column(arg.clone());
        let plain = |call: Expr| Reaggregate { call, zero_if_null: false, approximate: false };
        let counted = |call: Expr| Reaggregate { call, zero_if_null: true, approximate: false };
        let rewritten = if stored.contains(&arg.name) {
            // A level column: its members are in the rollup's rows.
            match (function.as_str(), params.distinct) {
                ("min", _) => plain(min(c)),
                ("max", _) => plain(max(c)),
                ("count", true) => plain(count_distinct(c)),
                _ => return Err(format!("'{inner}' over a level column needs the rows")),
            }
        } else if rollup.measures.contains(&arg.name) {
            let m = cube.measure(&arg.name).map_err(|e| e.message)?;
            let MeasureKind::Base { agg: stored_agg, .. } = &m.kind else { return Err(format!("'{}' is not a base measure", arg.name)) };
            match (stored_agg, function.as_str(), params.distinct) {
                (Aggregation::Sum, "sum", false) => plain(sum(c)),
                (Aggregation::Min, "min", _) => plain(min(c)),
                (Aggregation::Max, "max", _) => plain(max(c)),
                (Aggregation::Count, "count", false) => counted(sum(c)),
                (Aggregation::ApproxCountDistinct, "approx_distinct", false) => {
                    // The sketches merge at any grouping (see sketch.rs); the values' type picks
                    // the sketch format approx_distinct keeps.
                    let value_type = datafusion::common::ExprSchema::field_from_column(agg.input.schema().as_ref(), arg).map_err(|e| e.to_string())?.data_type().clone();
                    Reaggregate { call: sketch::merge_udaf(value_type).call(vec![c]), zero_if_null: false, approximate: true }
                }
                (Aggregation::CountDistinct, "count", true) if same_grain => counted(sum(c)),
                (Aggregation::CountDistinct, "count", true) => {
                    return Err(format!(
                        "the distinct count '{}' is stored at the rollup's grain ({}) and the query groups differently",
                        arg.name,
                        levels.iter().map(|l| l.qualified()).collect::<Vec<_>>().join(", ")
                    ));
                }
                _ => return Err(format!("'{inner}' is not how measure '{}' aggregates ({stored_agg:?})", arg.name)),
            }
        } else {
            return Err(format!("it does not store '{}'", arg.name));
        };
        out.push(rewritten);
    }
    Ok(out)
}

/// The aggregate rebuilt over the rollup, projected back to the original names and types.
fn rebuild(agg: &Aggregate, shape: &Shape<'_>, c: &Candidate, calls: Vec<Reaggregate>) -> datafusion::error::Result<LogicalPlan> {
    let scan = LogicalPlanBuilder::scan(TableReference::bare(c.rollup.table.as_str()), c.source.clone(), None)?.build()?;
    // Aliased to the cube table's name, so every column reference above still resolves.
    let mut input = LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(Arc::new(scan), shape.scan_name.clone())?);
    for node in shape.chain.iter().rev() {
        input = node.with_new_exprs(node.expressions(), vec![input])?;
    }
    let aggr: Vec<Expr> = calls.iter().enumerate().map(|(i, r)| r.call.clone().alias(format!("__rollup_{i}"))).collect();
    let new_agg = LogicalPlan::Aggregate(Aggregate::try_new(Arc::new(input), agg.group_expr.clone(), aggr)?);
    let new_schema = new_agg.schema().clone();
    let groups = agg.group_expr.len();
    let mut project = Vec::new();
    for (i, (qualifier, field)) in agg.schema.iter().enumerate() {
        let (q, f) = new_schema.qualified_field(i);
        let mut e = Expr::Column(Column::new(q.cloned(), f.name()));
        if i >= groups && calls[i - groups].zero_if_null {
            e = coalesce(vec![e, lit(0i64)]);
        }
        if f.data_type() != field.data_type() {
            e = cast(e, field.data_type().clone());
        }
        project.push(e.alias_qualified(qualifier.cloned(), field.name()));
    }
    Ok(LogicalPlan::Projection(Projection::try_new(project, Arc::new(new_agg))?))
}

/// What `crmcube refresh` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RefreshReport {
    /// The snapshot committed, or None when every rollup was already current.
    pub snapshot: Option<u64>,
    /// Rollup tables rebuilt, with their row counts.
    pub rebuilt: Vec<(String, u64)>,
    /// Rollup tables the cube files no longer declare, dropped from the snapshot.
    pub dropped: Vec<String>,
    pub seconds: f64,
}

/// Rebuilds rollups from the current snapshot's tables, without reading any export: those
/// missing or stale (their cube file changed), or every one with `all`. Commits a snapshot
/// with the same base tables and the new rollups; rollups no cube declares any more leave it.
pub async fn refresh(warehouse: &crate::warehouse::Warehouse, cubes: &CubeSet, all: bool) -> Result<RefreshReport> {
    let started = std::time::Instant::now();
    let _lock = warehouse.lock()?;
    let snapshot = warehouse.current_or_error()?;
    let ctx = warehouse.session_at(Some(snapshot.id)).await?;
    let wanted = fingerprints(cubes);
    let mut tables = snapshot.tables.clone();
    let dropped: Vec<String> = snapshot.rollups.keys().filter(|t| !wanted.contains_key(*t)).cloned().collect();
    for t in &dropped {
        tables.remove(t);
    }
    let mut rebuilt = Vec::new();
    let mut prints = partitions::PrintCache::default();
    for cube in &cubes.cubes {
        for rollup in &cube.rollups {
            let current = snapshot.rollups.get(&rollup.table) == Some(&rollup.fingerprint(cube)) && snapshot.tables.contains_key(&rollup.table);
            if current && !all {
                continue;
            }
            let df = build(&ctx, cube, rollup).await?;
            let schema = Arc::new(df.schema().as_arrow().clone());
            let rows = df.collect().await?;
            let n: u64 = rows.iter().map(|b| b.num_rows() as u64).sum();
            let partition: Vec<String> = rollup.partition_column(cube).into_iter().collect();
            let version = warehouse.write_partitioned(&rollup.table, schema, rows, &partition, &Default::default()).await?;
            crate::fault::point(&format!("refreshed {}", rollup.table));
            tracing::info!(table = %rollup.table, rows = n, version, "written");
            // The units' prints, so that the next load can refresh this rollup by partition.
            let units = match partitions::refresh_unit(cube, rollup) {
                Some(u) => partitions::units(&ctx, &mut prints, cube, u).await?,
                None => None,
            };
            let entry = crate::warehouse::TableEntry { partitions: units.map(|u| u.prints).unwrap_or_default(), ..crate::warehouse::TableEntry::new(version, n) };
            tables.insert(rollup.table.clone(), entry);
            rebuilt.push((rollup.table.clone(), n));
        }
    }
    let snapshot = if rebuilt.is_empty() && dropped.is_empty() {
        None
    } else {
        Some(warehouse.commit(tables, snapshot.files.clone(), wanted)?.id)
    };
    Ok(RefreshReport { snapshot, rebuilt, dropped, seconds: started.elapsed().as_secs_f64() })
}

/// The definition fingerprint of every declared rollup, by table: what a load stamps in the
/// snapshot next to the rollup tables it writes.
pub fn fingerprints(cubes: &CubeSet) -> BTreeMap<String, String> {
    cubes.cubes.iter().flat_map(|c| c.rollups.iter().map(move |r| (r.table.clone(), r.fingerprint(c)))).collect()
}
