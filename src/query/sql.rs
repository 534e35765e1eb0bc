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
    Expr as SqlExpr, GroupByExpr, Ident, Query, SelectItem, SetExpr, Statement, TableFactor, Value, VisitMut, VisitorMut,
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
    for cube in &cubes.cubes {
        let table = CubeTable::new(ctx, cube).await?;
        ctx.register_table(datafusion::common::TableReference::partial(CUBES_SCHEMA, cube.name.as_str()), Arc::new(table))?;
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
        let state = state
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| datafusion::error::DataFusionError::Internal("cube tables need a SessionState".into()))?;
        let ctx = SessionContext::new_with_state(state.clone());
        let fields = self.schema.fields();
        let output: Vec<String> = match projection {
            Some(p) => p.iter().map(|i| fields[*i].name().clone()).collect(),
            None => fields.iter().map(|f| f.name().clone()).collect(),
        };
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
        df.create_physical_plan().await
    }
}

/// Plans one SQL statement, giving measures of cube tables their cube semantics.
pub async fn sql(ctx: &SessionContext, cubes: &CubeSet, text: &str) -> Result<DataFrame> {
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
    cubes: &'a CubeSet,
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
        let mut refs = MeasureRefs { cube, depth: 0, error: None, keep: Vec::new() };
        let _ = select.projection.visit(&mut refs);
        let _ = select.having.visit(&mut refs);
        refs.keep = outputs;
        let _ = query.order_by.visit(&mut refs);
        if let Some(e) = refs.error {
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
            [.., schema, table] if schema == CUBES_SCHEMA => self.cubes.cubes.iter().find(|c| c.name == *table),
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
            match measure_expr(self.cube, name, 0) {
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

/// The SQL expression of a measure over the cube table's columns.
fn measure_expr(cube: &Cube, name: &str, depth: usize) -> Result<SqlExpr, QueryError> {
    if depth > 16 {
        return Err(QueryError::new(format!("measure '{name}' of cube '{}' refers to itself", cube.name)));
    }
    let m = cube.measure(name)?;
    if let MeasureKind::Base { semi_additive: Some(dim), .. } = &m.kind {
        return Err(QueryError::new(format!(
            "measure '{name}' is semi-additive over '{dim}' (a balance): SQL over cubes.{} does not compute it yet",
            cube.name
        ))
        .with_hint(Some(format!("use `crmcube query {} -m {name}`, or SUM({name}) filtered to one date", cube.name))));
    }
    let text = match &m.kind {
        MeasureKind::Base { agg, .. } => {
            let column = format!("\"{}\"", m.name.replace('"', "\"\""));
            match agg {
                Aggregation::Sum => format!("SUM({column})"),
                Aggregation::Count => format!("COUNT({column})"),
                Aggregation::CountDistinct => format!("COUNT(DISTINCT {column})"),
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
        let mut inner = Nested { cube, depth: depth + 1, error: None };
        let _ = parsed.visit(&mut inner);
        if let Some(e) = inner.error {
            return Err(e);
        }
    }
    Ok(SqlExpr::Nested(Box::new(parsed)))
}

/// Expands the measures a calculated measure refers to.
struct Nested<'a> {
    cube: &'a Cube,
    depth: usize,
    error: Option<QueryError>,
}

impl VisitorMut for Nested<'_> {
    type Break = ();

    fn post_visit_expr(&mut self, e: &mut SqlExpr) -> ControlFlow<()> {
        if let Some(name) = measure_name(e)
            && self.cube.measure(name).is_ok()
        {
            match measure_expr(self.cube, name, self.depth) {
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
