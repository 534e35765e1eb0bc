//! Cubes in SQL: a table `cubes.<cube>` per cube, with measure semantics.
//!
//! `cubes.sales` has one column per level (`customer_region`, `time_month`, …, labels as
//! `customer_customer_name`) and one per base measure holding the values that measure
//! aggregates (`revenue`, `orders` = order ids, …). In a SELECT over a cube table that groups
//! (`GROUP BY`), names a calculated measure, or selects only measures, a measure written bare is
//! the measure itself:
//!
//! ```sql
//! SELECT customer_region, revenue, margin_pct FROM cubes.sales WHERE time_year = 2025 GROUP BY 1
//! ```
//!
//! becomes `SUM(revenue) AS revenue, round(100 * CAST(SUM(revenue) - SUM(cost) …) AS margin_pct`
//! before DataFusion plans it — so ratios are ratios of sums and distinct counts stay distinct at
//! any grouping, exactly as `crmcube query` computes them (both use the measure definitions of
//! the cube model). A measure inside an aggregate call (`SUM(revenue)`) is the raw column, as BI
//! tools expect. WHERE clauses filter rows, so measures there are raw values too.
//!
//! A semi-additive measure (a balance, `semi_additive: time`) sums over every dimension but its
//! own: `SELECT time_year, balance FROM cubes.receivables GROUP BY 1` gives each year's balance
//! at its last month end. The cube table carries the fact's date for it (`time_date`), and
//! [`last_values`] turns the FROM into a derived table where each row's balance counts only if
//! its date is the last date of its period within the WHERE slice. Such a query must read the
//! cube table alone (joins go in an outer query).
//!
//! `crmcube query` plans its aggregates through [`plan`] as well, so the CLI and SQL share one
//! planner.

use std::ops::ControlFlow;

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Column;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{DataFrame, SessionContext, col};
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, GroupByExpr, Ident, Query, Select, SelectItem, SetExpr, Statement, TableFactor, Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::cube::{Aggregation, Cube, CubeSet, MeasureKind};
use crate::error::{QueryError, Result};

/// The schema holding one table per cube.
pub const CUBES_SCHEMA: &str = "cubes";

/// Registers `cubes.<name>` for every cube of `cubes` in `ctx`.
pub async fn register_cubes(ctx: &SessionContext, cubes: &CubeSet) -> Result<()> {
    let default = ctx.state().config_options().catalog.default_catalog.clone();
    let catalog = ctx.catalog(&default).ok_or_else(|| crate::error::Error::Internal("no default catalog".into()))?;
    if catalog.schema(CUBES_SCHEMA).is_none() {
        catalog.register_schema(CUBES_SCHEMA, std::sync::Arc::new(datafusion::catalog::MemorySchemaProvider::new()))?;
    }
    // Approximate distinct counts hash their values through it (see rollup::sketch).
    ctx.register_udf(crate::rollup::sketch::value_udf());
    for cube in &cubes.cubes {
        // A cube whose tables this snapshot lacks (a cube added since the last load, or an
        // older snapshot read with --as-of) is left out; the others stay usable.
        match CubeTable::new(ctx, cube).await {
            Ok(table) => {
                ctx.register_table(datafusion::common::TableReference::partial(CUBES_SCHEMA, cube.name.as_str()), Arc::new(table))?;
            }
            Err(e) => tracing::warn!(cube = %cube.name, "cube not available in this snapshot: {e}"),
        }
    }
    Ok(())
}

/// Registers `cubes.<name>` for one cube unless the session has it already; unlike
/// [`register_cubes`], a cube whose tables are missing is an error (it was asked for).
pub(crate) async fn ensure_registered(ctx: &SessionContext, cube: &Cube) -> Result<()> {
    let table = datafusion::common::TableReference::partial(CUBES_SCHEMA, cube.name.as_str());
    if !ctx.table_exist(table.clone()).unwrap_or(false) {
        register_cubes(ctx, &CubeSet { cubes: Vec::new() }).await?;
        ctx.register_table(table, Arc::new(CubeTable::new(ctx, cube).await?))?;
    }
    Ok(())
}

/// `cubes.<name>`: the cube's wide table, planned per query with only the dimension joins the
/// query's columns need ([`super::cube_frame`]). Its tables are resolved in the session that
/// runs the query, so access rules bound there apply.
#[derive(Debug)]
pub struct CubeTable {
    cube: Cube,
    schema: SchemaRef,
}

impl CubeTable {
    pub async fn new(ctx: &SessionContext, cube: &Cube) -> Result<Self> {
        let schema = Arc::new(super::cube_view(ctx, cube).await?.schema().as_arrow().clone());
        Ok(Self { cube: cube.clone(), schema })
    }
}

#[async_trait::async_trait]
impl TableProvider for CubeTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // Applied inside (so they reach the Delta scans) and kept above: Inexact is always safe.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let (ctx, output) = scan_session(state, &self.schema, projection)?;
        let mut needed = output.clone();
        for f in filters {
            needed.extend(f.column_refs().into_iter().map(|c| c.name.clone()));
        }
        let external = |e: crate::error::Error| datafusion::error::DataFusionError::External(Box::new(e));
        let mut df = super::cube_frame(&ctx, &self.cube, Some(&needed)).await.map_err(external)?;
        for f in filters {
            df = df.filter(f.clone())?;
        }
        let columns: Vec<Expr> = output.iter().map(|c| col(Column::new_unqualified(c.as_str()))).collect();
        df = df.select(columns)?;
        if let Some(n) = limit {
            df = df.limit(0, Some(n))?;
        }
        scan_plan(df).await
    }
}

/// The physical plan a provider's scan returns for `df`, its rows planned at scan time: not yet
/// physically optimized. The query's own physical optimizer then runs once over the whole tree,
/// this plan included. Optimized here as well, a join's dynamic filter was already built when the
/// query's join selection came to swap that join's sides, which DataFusion refuses ("Cannot swap
/// HashJoinExec inputs after dynamic filters have been constructed"): one customer's sales by
/// year, whose eager plan joins the days late, failed so.
pub(crate) async fn scan_plan(df: DataFrame) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    let (state, plan) = df.into_parts();
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(state).with_physical_optimizer_rules(vec![]).build();
    state.create_physical_plan(&plan).await
}

/// For a provider that plans its rows as a DataFrame at scan time: a context of the query's
/// session, and the names of the columns of `schema` the scan asks for.
pub(crate) fn scan_session(state: &dyn Session, schema: &SchemaRef, projection: Option<&Vec<usize>>) -> datafusion::error::Result<(SessionContext, Vec<String>)> {
    let state = state
        .as_any()
        .downcast_ref::<SessionState>()
        .ok_or_else(|| datafusion::error::DataFusionError::Internal("cube tables need a SessionState".into()))?;
    let fields = schema.fields();
    let output: Vec<String> = match projection {
        Some(p) => p.iter().map(|i| fields[*i].name().clone()).collect(),
        None => fields.iter().map(|f| f.name().clone()).collect(),
    };
    Ok((SessionContext::new_with_state(state.clone()), output))
}

/// Plans one SQL statement, giving measures of cube tables their cube semantics.
pub async fn sql(ctx: &SessionContext, cubes: &CubeSet, text: &str) -> Result<DataFrame> {
    plan(ctx, &cubes.cubes, text).await
}

/// [`sql`] with the cubes given as a slice: `crmcube query` plans its aggregates through here.
pub(crate) async fn plan(ctx: &SessionContext, cubes: &[Cube], text: &str) -> Result<DataFrame> {
    let mut statements = Parser::parse_sql(&GenericDialect {}, text).map_err(|e| QueryError::new(format!("SQL does not parse: {e}")))?;
    if statements.len() != 1 {
        return Err(QueryError::new(format!("expected one SQL statement, found {}", statements.len())).into());
    }
    let mut statement: Statement = statements.remove(0);
    let _ = statement.visit(&mut Placeholders { next: 0 });
    let mut rewriter = CubeRewriter { cubes, error: None };
    let _ = statement.visit(&mut rewriter);
    if let Some(e) = rewriter.error {
        return Err(e.into());
    }
    let state = ctx.state();
    let plan = state.statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(statement))).await?;
    // Planned, DDL, DML and statements (SET, transactions) would fail later with "Unsupported
    // logical plan: CreateMemoryTable"; said plainly here instead.
    let read_only = datafusion::execution::context::SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
    if let Err(e) = read_only.verify_plan(&plan) {
        let hint = "the warehouse is read-only to SQL: ask with SELECT (or EXPLAIN, SHOW TABLES); `crmcube load` changes its data";
        return Err(QueryError::new(format!("only queries are answered: {e}")).with_hint(Some(hint.into())).into());
    }
    Ok(DataFrame::new(state, plan))
}

/// Numbers `?` placeholders (JDBC/ODBC/DB-API style) as `$1`, `$2`, … in the order written,
/// which is the form DataFusion binds.
struct Placeholders {
    next: usize,
}

impl VisitorMut for Placeholders {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &mut SqlExpr) -> ControlFlow<()> {
        if let SqlExpr::Value(v) = e
            && let Value::Placeholder(p) = &mut v.value
            && p == "?"
        {
            self.next += 1;
            *p = format!("${}", self.next);
        }
        ControlFlow::Continue(())
    }
}

/// Finds SELECTs over cube tables and rewrites their measure references.
struct CubeRewriter<'a> {
    cubes: &'a [Cube],
    error: Option<QueryError>,
}

impl VisitorMut for CubeRewriter<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        let SetExpr::Select(select) = query.body.as_mut() else { return ControlFlow::Continue(()) };
        let Some(cube) = select.from.iter().flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation))).find_map(|r| self.cube_of(r)) else {
            return ControlFlow::Continue(());
        };
        let grouped = match &select.group_by {
            GroupByExpr::All(_) => true,
            GroupByExpr::Expressions(e, _) => !e.is_empty(),
        };
        let names_calculated = select.projection.iter().any(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                measure_name(e).is_some_and(|m| cube.measure(m).is_ok_and(|m| matches!(m.kind, MeasureKind::Calculated { .. })))
            }
            _ => false,
        });
        let only_measures = select.projection.iter().all(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                measure_name(e).is_some_and(|m| cube.measure(m).is_ok()) || is_aggregate(e)
            }
            _ => false,
        });
        if !grouped && !names_calculated && !only_measures {
            return ControlFlow::Continue(());
        }
        // Bare measures in the projection keep their name as the output column.
        for item in select.projection.iter_mut() {
            if let SelectItem::UnnamedExpr(e) = item
                && let Some(m) = measure_name(e).filter(|m| cube.measure(m).is_ok()).map(str::to_string)
            {
                *item = SelectItem::ExprWithAlias { expr: e.clone(), alias: Ident::new(m) };
            }
        }
        // ORDER BY a projected measure's name means the output column, as SQL resolves aliases.
        let outputs: Vec<String> = select
            .projection
            .iter()
            .filter_map(|item| match item {
                SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
                _ => None,
            })
            .collect();
        let mut refs = MeasureRefs { cube, depth: 0, error: None, keep: Vec::new(), semi: Vec::new() };
        let _ = select.projection.visit(&mut refs);
        let _ = select.having.visit(&mut refs);
        refs.keep = outputs;
        let _ = query.order_by.visit(&mut refs);
        let result = match refs.error {
            Some(e) => Err(e),
            None if refs.semi.is_empty() => Ok(()),
            None => {
                let SetExpr::Select(select) = query.body.as_mut() else { unreachable!("matched above") };
                last_values(select, cube, &refs.semi)
            }
        };
        if let Err(e) = result {
            self.error = Some(e);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

impl<'a> CubeRewriter<'a> {
    fn cube_of(&self, relation: &TableFactor) -> Option<&'a Cube> {
        let TableFactor::Table { name, .. } = relation else { return None };
        let parts: Vec<String> = name.0.iter().map(|p| p.to_string().trim_matches('"').to_string()).collect();
        match parts.as_slice() {
            [.., schema, table] if schema == CUBES_SCHEMA => self.cubes.iter().find(|c| c.name == *table),
            _ => None,
        }
    }
}

/// The measure a bare (or table-qualified) column reference names, if any.
fn measure_name(e: &SqlExpr) -> Option<&str> {
    match e {
        SqlExpr::Identifier(i) => Some(i.value.as_str()),
        SqlExpr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.as_str()),
        _ => None,
    }
}

/// Aggregate functions inside which a measure name is its raw column.
const AGGREGATES: [&str; 9] = ["sum", "count", "avg", "min", "max", "mean", "median", "approx_distinct", "array_agg"];

/// Replaces measure references outside aggregate calls with the measures' aggregate expressions.
struct MeasureRefs<'a> {
    cube: &'a Cube,
    depth: usize,
    error: Option<QueryError>,
    /// Names left alone (output columns).
    keep: Vec<String>,
    /// Semi-additive measures met (directly or inside calculated ones): (measure, dimension).
    semi: Vec<(String, String)>,
}

/// An aggregate call (not a window: `SUM(revenue) OVER (...)` over a grouped cube query sums
/// the measure across groups, so its argument is the measure).
fn is_aggregate(e: &SqlExpr) -> bool {
    matches!(e, SqlExpr::Function(f) if f.over.is_none() && AGGREGATES.contains(&f.name.to_string().to_ascii_lowercase().as_str()))
}

impl VisitorMut for MeasureRefs<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &mut SqlExpr) -> ControlFlow<()> {
        if is_aggregate(e) {
            self.depth += 1;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &mut SqlExpr) -> ControlFlow<()> {
        if is_aggregate(e) {
            self.depth -= 1;
        } else if self.depth == 0
            && let Some(name) = measure_name(e)
            && self.cube.measure(name).is_ok()
            && !(matches!(e, SqlExpr::Identifier(_)) && self.keep.iter().any(|k| k == name))
        {
            match measure_expr(self.cube, name, 0, &mut self.semi) {
                Ok(x) => *e = x,
                Err(err) => {
                    self.error = Some(err);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// The SQL expression of a measure over the cube table's columns. A semi-additive measure
/// aggregates its last-date column (see [`last_values`]) and is recorded in `semi`.
fn measure_expr(cube: &Cube, name: &str, depth: usize, semi: &mut Vec<(String, String)>) -> Result<SqlExpr, QueryError> {
    if depth > 16 {
        return Err(QueryError::new(format!("measure '{name}' of cube '{}' refers to itself", cube.name)));
    }
    let m = cube.measure(name)?;
    let text = match &m.kind {
        MeasureKind::Base { agg, semi_additive, .. } => {
            // A semi-additive measure aggregates only the rows at the last date of their period.
            let column = match semi_additive {
                Some(dim) => {
                    if !semi.iter().any(|(n, _)| *n == m.name) {
                        semi.push((m.name.clone(), dim.clone()));
                    }
                    quoted(&last_value_name(&m.name))
                }
                None => quoted(&m.name),
            };
            match agg {
                Aggregation::Sum => format!("SUM({column})"),
                Aggregation::Count => format!("COUNT({column})"),
                Aggregation::CountDistinct => format!("COUNT(DISTINCT {column})"),
                Aggregation::ApproxCountDistinct => format!("approx_distinct({}({column}))", crate::rollup::sketch::VALUE_FUNCTION),
                Aggregation::Min => format!("MIN({column})"),
                Aggregation::Max => format!("MAX({column})"),
                Aggregation::Avg => format!("AVG({column})"),
            }
        }
        MeasureKind::Calculated { expr, .. } => expr.clone(),
    };
    let mut parsed = Parser::new(&GenericDialect {})
        .try_with_sql(&text)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| QueryError::new(format!("measure '{name}' of cube '{}' does not parse: {e}", cube.name)))?;
    if let MeasureKind::Calculated { .. } = &m.kind {
        let mut inner = Nested { cube, depth: depth + 1, error: None, semi };
        let _ = parsed.visit(&mut inner);
        if let Some(e) = inner.error {
            return Err(e);
        }
    }
    Ok(SqlExpr::Nested(Box::new(parsed)))
}

/// Expands the measures a calculated measure refers to.
struct Nested<'a, 's> {
    cube: &'a Cube,
    depth: usize,
    error: Option<QueryError>,
    semi: &'s mut Vec<(String, String)>,
}

impl VisitorMut for Nested<'_, '_> {
    type Break = ();

    fn post_visit_expr(&mut self, e: &mut SqlExpr) -> ControlFlow<()> {
        if let Some(name) = measure_name(e)
            && self.cube.measure(name).is_ok()
        {
            match measure_expr(self.cube, name, self.depth, self.semi) {
                Ok(x) => *e = x,
                Err(err) => {
                    self.error = Some(err);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// A SQL identifier, quoted.
pub(crate) fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The column holding a semi-additive measure's values on the last date of their period only.
fn last_value_name(measure: &str) -> String {
    format!("__last_{measure}")
}

/// Gives a SELECT over a cube the columns its semi-additive measures sum: the cube table (with
/// the query's WHERE, so "last" means last within the slice) becomes a derived table adding, per
/// such measure, its value where the row's date is the last date of its period — a period being
/// a value of the query's grouping expressions over the measure's dimension (none grouped: the
/// whole slice). A year then shows its last month-end balance, a region its balance at the slice's
/// last date, exactly as `crmcube query` computes it (it plans through here).
fn last_values(select: &mut Select, cube: &Cube, semi: &[(String, String)]) -> Result<(), QueryError> {
    let alone = || {
        QueryError::new(format!(
            "semi-additive measure '{}' needs cubes.{} alone in FROM (no joins): its last date is found within the query's rows",
            semi[0].0, cube.name
        ))
        .with_hint(Some("join in an outer query: SELECT … FROM (SELECT … FROM cubes.… GROUP BY …) t JOIN …".into()))
    };
    let [from] = select.from.as_slice() else { return Err(alone()) };
    let TableFactor::Table { name, alias, .. } = &from.relation else { return Err(alone()) };
    if !from.joins.is_empty() {
        return Err(alone());
    }
    let alias = alias.as_ref().map(|a| a.name.to_string()).unwrap_or_else(|| quoted(&cube.name));
    // Grouping expressions as written: ordinals and output names resolved to the projection.
    let item = |e: &SelectItem| match e {
        SelectItem::UnnamedExpr(x) => Some(x.clone()),
        SelectItem::ExprWithAlias { expr, .. } => Some(expr.clone()),
        _ => None,
    };
    let group: Vec<SqlExpr> = match &select.group_by {
        GroupByExpr::All(_) => select.projection.iter().filter_map(item).collect(),
        GroupByExpr::Expressions(exprs, _) => exprs
            .iter()
            .map(|g| match g {
                SqlExpr::Value(v) => match &v.value {
                    Value::Number(n, _) => n.parse::<usize>().ok().and_then(|i| select.projection.get(i.wrapping_sub(1))).and_then(item),
                    _ => None,
                }
                .unwrap_or_else(|| g.clone()),
                SqlExpr::Identifier(i) => select
                    .projection
                    .iter()
                    .find_map(|p| match p {
                        SelectItem::ExprWithAlias { expr, alias } if alias.value == i.value => Some(expr.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| g.clone()),
                _ => g.clone(),
            })
            .collect(),
    };
    let filter = select.selection.take().map(|w| format!(" WHERE {w}")).unwrap_or_default();
    let (mut columns, mut joins) = (Vec::new(), Vec::new());
    let mut dims: Vec<&String> = semi.iter().map(|(_, d)| d).collect();
    dims.sort();
    dims.dedup();
    for dim in dims {
        let dimension = cube.dimensions.iter().find(|d| d.name == *dim).ok_or_else(|| QueryError::new(format!("cube '{}' has no dimension '{dim}'", cube.name)))?;
        let date = dimension.key_column().ok_or_else(|| QueryError::new(format!("dimension '{dim}' is not joined")))?;
        let levels: Vec<crate::cube::LevelRef<'_>> = (0..dimension.levels.len()).map(|index| crate::cube::LevelRef { dimension, index }).collect();
        let mut own = super::level_columns(&levels);
        own.push(date.clone());
        let partition: Vec<String> = group.iter().filter(|g| references_any(g, &own)).map(|g| g.to_string()).collect();
        // The last date per period: a small grouped scan joined back, so the rows stream
        // (a window over every row would hold them all).
        let last = format!("__last_date_{}", joins.len());
        let keys: Vec<String> = (0..partition.len()).map(|i| format!("{} AS __p{i}", partition[i])).collect();
        let grouped = if partition.is_empty() { String::new() } else { format!(" GROUP BY {}", (1..=partition.len()).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")) };
        let on: Vec<String> = partition.iter().enumerate().map(|(i, p)| format!("({p}) IS NOT DISTINCT FROM {last}.__p{i}")).collect();
        let date = quoted(&date);
        joins.push(format!(
            " JOIN (SELECT {}MAX({date}) AS __date FROM {name} AS {alias}{filter}{grouped}) AS {last} ON {}",
            keys.iter().map(|k| format!("{k}, ")).collect::<String>(),
            if on.is_empty() { "TRUE".to_string() } else { on.join(" AND ") }
        ));
        // One join per dimension, shared by every measure over it.
        for (measure, _) in semi.iter().filter(|(_, d)| d == dim) {
            columns.push(format!("CASE WHEN {alias}.{date} = {last}.__date THEN {alias}.{} END AS {}", quoted(measure), quoted(&last_value_name(measure))));
        }
    }
    let text = format!("SELECT 1 FROM (SELECT {alias}.*, {} FROM {name} AS {alias}{}{filter}) AS {alias}", columns.join(", "), joins.concat());
    let parsed = Parser::parse_sql(&GenericDialect {}, &text).map_err(|e| QueryError::new(format!("internal: the last-value rewrite does not parse ({e}): {text}")))?;
    let Some(Statement::Query(q)) = parsed.into_iter().next() else { return Err(QueryError::new("internal: the last-value rewrite is not a query")) };
    let SetExpr::Select(inner) = *q.body else { return Err(QueryError::new("internal: the last-value rewrite is not a SELECT")) };
    select.from = inner.from;
    Ok(())
}

/// Whether `e` refers to a column named in `names` (bare or table-qualified).
fn references_any(e: &SqlExpr, names: &[String]) -> bool {
    let mut found = false;
    let _ = datafusion::sql::sqlparser::ast::visit_expressions(e, |x| {
        if measure_name(x).is_some_and(|n| names.iter().any(|c| c == n)) {
            found = true;
        }
        ControlFlow::<()>::Continue(())
    });
    found
}
