//! Cube queries: binds a [`CubeQuery`] to warehouse columns and plans it with DataFusion.
//!
//! One planner for the CLI and SQL: the aggregate step of every cube query is the SQL a BI tool
//! would send, `SELECT <levels>, <measures> FROM cubes.<cube> WHERE … GROUP BY …`, planned by
//! [`sql`] (measure semantics, rollup matching). Filter values become typed literals of the
//! level's column type, written into that SQL by DataFusion's unparser — never user text pasted
//! in. Above the aggregate this module adds what SQL alone does not say: trend windows (previous
//! period, change in %, moving average, year-to-date, year-over-year), pivot, compare, the
//! others row, forecast, order and limit. Drill-through reads the fact joined to the dimension
//! tables it needs ([`cube_frame`], which is also what `cubes.<cube>` scans).

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{JoinType, ScalarValue};
use datafusion::functions_aggregate::expr_fn::{avg, count, count_distinct, max, min, sum};
use datafusion::functions_window::expr_fn::{dense_rank, lag};
use datafusion::logical_expr::{ExprFunctionExt, SortExpr, WindowFrame, WindowFrameBound, WindowFrameUnits};
use datafusion::prelude::*;
use serde::{Deserialize, Serialize};

pub mod sql;

use crate::cube::{Aggregation, Cube, LevelRef, MeasureKind};
use crate::error::{QueryError, Result};

/// A question to a cube, as the CLI or a query file states it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CubeQuery {
    /// The cube asked (a query file may leave it to the command line).
    #[serde(default)]
    pub cube: String,
    #[serde(default)]
    pub measures: Vec<String>,
    /// Levels to group by, as `dimension.level`.
    #[serde(default)]
    pub by: Vec<String>,
    /// Filters such as `customer.region=East`, `time.year>=2025`, `channel.channel!=store`,
    /// `customer.region=East,North` (any of).
    #[serde(default)]
    pub filters: Vec<String>,
    /// A drill path: each `dimension.level=member` keeps that member and groups it by the next
    /// level down; `customer.region=East`, then `customer.province=Zhejiang` gives its cities.
    #[serde(default)]
    pub drill: Vec<String>,
    /// A time level to trend over (`time.month`): adds `<measure>_prev` and `<measure>_change_pct`.
    #[serde(default)]
    pub trend: Option<String>,
    /// With `trend`: keep only the last N periods (changes are computed before the cut).
    #[serde(default)]
    pub last: Option<usize>,
    /// With `trend`: moving average over this many periods (`<measure>_ma<N>`).
    #[serde(default)]
    pub moving_average: Option<usize>,
    /// With `trend`: running total since the first period (`<measure>_running`).
    #[serde(default)]
    pub running_total: bool,
    /// With `trend`: year-to-date total (`<measure>_ytd`).
    #[serde(default)]
    pub year_to_date: bool,
    /// With `trend`: the same period one year earlier and the change in % (`<measure>_last_year`,
    /// `<measure>_yoy_pct`).
    #[serde(default)]
    pub year_over_year: bool,
    /// With `trend`: forecast this many periods ahead (Holt-Winters, see [`crate::analytics`]).
    #[serde(default)]
    pub forecast: Option<usize>,
    /// A level whose members become columns.
    #[serde(default)]
    pub pivot: Option<String>,
    /// Two members of one level side by side with the change: `time.year=2025:2024`.
    #[serde(default)]
    pub compare: Option<String>,
    /// With `limit`: one more row, `(others)`, aggregating every member past the limit.
    #[serde(default)]
    pub others: bool,
    /// Drill-through: the fact rows behind the cell(s) instead of aggregates (use `limit`).
    #[serde(default)]
    pub detail: bool,
    /// Sort keys: a measure or level, optionally `:desc`.
    #[serde(default)]
    pub order: Vec<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub level: String,
    pub op: FilterOp,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    /// SQL LIKE pattern (`%`, `_`).
    Like,
}

impl Filter {
    /// Parses `level OP value[,value...]` where OP is one of `= != < <= > >= ~` (`~` is LIKE).
    pub fn parse(text: &str) -> Result<Self, QueryError> {
        const OPS: [(&str, FilterOp); 7] = [
            ("!=", FilterOp::NotEq),
            ("<=", FilterOp::LtEq),
            (">=", FilterOp::GtEq),
            ("=", FilterOp::Eq),
            ("<", FilterOp::Lt),
            (">", FilterOp::Gt),
            ("~", FilterOp::Like),
        ];
        let found = OPS.iter().filter_map(|(s, op)| text.find(s).map(|i| (i, *s, *op))).min_by_key(|(i, s, _)| (*i, usize::MAX - s.len()));
        let Some((i, s, op)) = found else {
            return Err(QueryError::new(format!("filter '{text}' has no operator"))
                .with_hint(Some("write level=value, e.g. customer.region=East or time.year>=2025".into())));
        };
        let level = text[..i].trim().to_string();
        let value = text[i + s.len()..].trim();
        if level.is_empty() || value.is_empty() {
            return Err(QueryError::new(format!("filter '{text}' needs a level and a value"))
                .with_hint(Some("e.g. customer.region=East".into())));
        }
        let values: Vec<String> = match op {
            FilterOp::Eq | FilterOp::NotEq => value.split(',').map(|v| v.trim().to_string()).collect(),
            _ => vec![value.to_string()],
        };
        Ok(Self { level, op, values })
    }
}

impl CubeQuery {
    /// Reads a query file (YAML or JSON, which YAML includes) with the same keys as this struct.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        crate::project::load_yaml(path)
    }
}

/// The output column name of a level's label.
fn label_name(l: &LevelRef<'_>) -> String {
    format!("{}_name", l.output_name())
}

fn push<'a>(l: LevelRef<'a>, group: &mut Vec<LevelRef<'a>>) {
    if !group.contains(&l) {
        group.push(l);
    }
}

/// A query with every name resolved against its cube.
struct Bound<'c> {
    cube: &'c Cube,
    /// Output group levels, in output order.
    group: Vec<LevelRef<'c>>,
    filters: Vec<(LevelRef<'c>, Filter)>,
    trend: Option<LevelRef<'c>>,
    /// The year level of the trend's dimension, when year-to-date or year-over-year need it.
    year: Option<LevelRef<'c>>,
    /// Pivot or compare level with its members (compare: exactly two, given).
    across: Option<(LevelRef<'c>, Vec<String>)>,
}

fn bind<'c>(cube: &'c Cube, q: &CubeQuery) -> Result<Bound<'c>> {
    if q.measures.is_empty() && !q.detail {
        return Err(QueryError::new("name at least one measure")
            .with_hint(Some(format!(
                "measures of '{}' are {}",
                cube.name,
                cube.measures.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
            )))
            .into());
    }
    // Every measure named, and every measure they are computed from, must exist.
    cube.measure_closure(&q.measures)?;
    let mut group: Vec<LevelRef<'_>> = Vec::new();
    let trend = q.trend.as_deref().map(|t| cube.level(t)).transpose()?;
    if let Some(t) = trend {
        push(t, &mut group);
    }
    for b in &q.by {
        push(cube.level(b)?, &mut group);
    }
    let mut filters: Vec<(LevelRef<'_>, Filter)> = Vec::new();
    for f in &q.filters {
        let f = Filter::parse(f)?;
        filters.push((cube.level(&f.level)?, f));
    }
    for d in &q.drill {
        let f = Filter::parse(d)?;
        let l = cube.level(&f.level)?;
        if f.op != FilterOp::Eq || f.values.len() != 1 {
            return Err(QueryError::new(format!("drill '{d}' must name one member with '='"))
                .with_hint(Some("e.g. --drill customer.region=East".into()))
                .into());
        }
        let next = l.index + 1;
        if next >= l.dimension.levels.len() {
            return Err(QueryError::new(format!("cannot drill below '{}': it is the finest level", l.qualified())).into());
        }
        push(l, &mut group);
        push(LevelRef { dimension: l.dimension, index: next }, &mut group);
        filters.push((l, f));
    }
    let trend_needed = |what: &str| -> Result<LevelRef<'c>> {
        trend.ok_or_else(|| QueryError::new(format!("{what} needs --trend LEVEL, e.g. --trend time.month")).into())
    };
    if q.moving_average.is_some() || q.running_total || q.year_to_date || q.year_over_year || q.last.is_some() || q.forecast.is_some() {
        trend_needed("--last, --moving-average, --running-total, --ytd, --yoy and --forecast")?;
    }
    let year = if q.year_to_date || q.year_over_year {
        let t = trend_needed("year-to-date and year-over-year")?;
        let index = t.dimension.levels.iter().position(|l| l.name == "year").ok_or_else(|| {
            QueryError::new(format!("dimension '{}' has no 'year' level, which year-to-date and year-over-year need", t.dimension.name))
        })?;
        Some(LevelRef { dimension: t.dimension, index })
    } else {
        None
    };
    let across = match (&q.pivot, &q.compare) {
        (Some(_), Some(_)) => return Err(QueryError::new("--pivot and --compare cannot be combined").into()),
        (Some(p), None) => Some((cube.level(p)?, Vec::new())),
        (None, Some(c)) => {
            let f = Filter::parse(c)?;
            let members: Vec<String> = f.values.first().map(|v| v.split(':').map(|m| m.trim().to_string()).collect()).unwrap_or_default();
            if f.op != FilterOp::Eq || members.len() != 2 {
                return Err(QueryError::new(format!("compare '{c}' must name two members of one level"))
                    .with_hint(Some("e.g. --compare time.year=2025:2024".into()))
                    .into());
            }
            Some((cube.level(&f.level)?, members))
        }
        (None, None) => None,
    };
    if across.is_some() && trend.is_some() {
        return Err(QueryError::new("--pivot/--compare cannot be combined with --trend").with_hint(Some("pivot the trend level instead: --pivot time.year".into())).into());
    }
    if let Some((l, _)) = &across
        && group.contains(l)
    {
        return Err(QueryError::new(format!("level '{}' cannot be both a row and a column", l.qualified())).into());
    }
    Ok(Bound { cube, group, filters, trend, year, across })
}

/// The fact joined to the dimension tables that `levels` and the filters need, filtered.
/// Each level appears as a column named [`LevelRef::output_name`] (and its label, if any).
async fn detail_frame(ctx: &SessionContext, b: &Bound<'_>, levels: &[LevelRef<'_>]) -> Result<DataFrame> {
    let mut df = ctx.table(b.cube.fact.as_str()).await?;
    let used: Vec<LevelRef<'_>> = levels.iter().copied().chain(b.filters.iter().map(|(l, _)| *l)).collect();
    let mut joined: Vec<&str> = Vec::new();
    for l in &used {
        let dim = l.dimension;
        if joined.contains(&dim.name.as_str()) {
            continue;
        }
        joined.push(&dim.name);
        let mut cols: Vec<(String, Expr)> = Vec::new();
        for x in used.iter().filter(|x| x.dimension == dim) {
            for (name, source) in level_sources(x) {
                if !cols.iter().any(|(n, _)| *n == name) {
                    cols.push((name, col(source.as_str())));
                }
            }
        }
        match &dim.join {
            Some(j) => {
                let key = format!("__key_{}", dim.name);
                let mut select: Vec<Expr> = cols.into_iter().map(|(n, e)| e.alias(n)).collect();
                select.push(col(j.key.as_str()).alias(key.as_str()));
                let dim_df = ctx.table(j.table.as_str()).await?.select(select)?;
                df = df.join(dim_df, JoinType::Left, &[j.foreign_key.as_str()], &[key.as_str()], None)?;
            }
            None => {
                for (name, expr) in cols {
                    df = df.with_column(&name, expr)?;
                }
            }
        }
    }
    for (l, f) in &b.filters {
        let predicate = filter_expr(&df, l, f)?;
        df = df.filter(predicate)?;
    }
    Ok(df)
}

fn filter_expr(df: &DataFrame, l: &LevelRef<'_>, f: &Filter) -> Result<Expr> {
    let name = l.output_name();
    let dt = df.schema().field_with_unqualified_name(&name)?.data_type().clone();
    let values: Vec<Expr> = f.values.iter().map(|v| typed_literal(v, &dt, l)).collect::<Result<_, _>>()?;
    let c = col(name.as_str());
    Ok(match f.op {
        FilterOp::Eq if values.len() == 1 => c.eq(values[0].clone()),
        FilterOp::Eq => c.in_list(values, false),
        FilterOp::NotEq if values.len() == 1 => c.not_eq(values[0].clone()),
        FilterOp::NotEq => c.in_list(values, true),
        FilterOp::Lt => c.lt(values[0].clone()),
        FilterOp::LtEq => c.lt_eq(values[0].clone()),
        FilterOp::Gt => c.gt(values[0].clone()),
        FilterOp::GtEq => c.gt_eq(values[0].clone()),
        FilterOp::Like => cast(c, DataType::Utf8).like(lit(f.values[0].as_str())),
    })
}

/// Output column names of levels, each followed by its label when it has one.
pub(crate) fn level_columns(levels: &[LevelRef<'_>]) -> Vec<String> {
    levels.iter().flat_map(level_sources).map(|(name, _)| name).collect()
}

/// A level's output columns with the columns of its dimension's table they come from: the
/// level's own, then its label's when it has one.
pub(crate) fn level_sources(l: &LevelRef<'_>) -> Vec<(String, String)> {
    let mut out = vec![(l.output_name(), l.level().column.clone())];
    if let Some(label) = &l.level().label {
        out.push((label_name(l), label.clone()));
    }
    out
}

/// The aggregate step of a cube query: `SELECT <levels>, <measures> FROM cubes.<cube> WHERE
/// <filters> GROUP BY <levels>`, planned by [`sql::plan`]. It is the SQL a BI tool would send and
/// goes through the same measure rewrite (calculated measures as ratios of sums, balances at the
/// last date of their period) and the same rollup matching ([`crate::rollup`]): one planner for
/// both paths. Filter values are typed literals of the cube table's column types, written into
/// the SQL by DataFusion's unparser, never pasted as text. `exclude` drops rows (the others row).
async fn aggregate(ctx: &SessionContext, b: &Bound<'_>, group_cols: &[String], measures: &[String], exclude: Option<Expr>) -> Result<DataFrame> {
    sql::ensure_registered(ctx, b.cube).await?;
    let rows = ctx.table(datafusion::common::TableReference::partial(sql::CUBES_SCHEMA, b.cube.name.as_str())).await?;
    let mut predicates: Vec<Expr> = b.filters.iter().map(|(l, f)| filter_expr(&rows, l, f)).collect::<Result<_>>()?;
    predicates.extend(exclude);
    let columns: Vec<String> = group_cols.iter().map(|c| sql::quoted(c)).collect();
    let outputs: Vec<String> = columns.iter().cloned().chain(measures.iter().map(|m| sql::quoted(m))).collect();
    let mut text = format!("SELECT {} FROM {}.{}", outputs.join(", "), sql::quoted(sql::CUBES_SCHEMA), sql::quoted(&b.cube.name));
    if !predicates.is_empty() {
        let sql_of = |p: &Expr| -> Result<String> { Ok(format!("({})", datafusion::sql::unparser::expr_to_sql(p)?)) };
        text.push_str(&format!(" WHERE {}", predicates.iter().map(sql_of).collect::<Result<Vec<_>>>()?.join(" AND ")));
    }
    if !columns.is_empty() {
        text.push_str(&format!(" GROUP BY {}", columns.join(", ")));
    }
    sql::plan(ctx, std::slice::from_ref(b.cube), &text).await
}

/// A base measure's aggregation applied to `c`.
pub(crate) fn aggregate_call(agg: Aggregation, c: Expr) -> Expr {
    match agg {
        Aggregation::Sum => sum(c),
        Aggregation::Count => count(c),
        Aggregation::CountDistinct => count_distinct(c),
        Aggregation::ApproxCountDistinct => datafusion::functions_aggregate::expr_fn::approx_distinct(crate::rollup::sketch::value_udf().call(vec![c])),
        Aggregation::Min => min(c),
        Aggregation::Max => max(c),
        Aggregation::Avg => avg(c),
    }
}

/// Plans a cube query as one DataFusion plan over the tables registered in `ctx`.
///
/// Operations that need a first result before they can be planned (pivot, compare, others,
/// forecast) run through [`run`]; this function plans their first step.
pub async fn plan(ctx: &SessionContext, cube: &Cube, q: &CubeQuery) -> Result<DataFrame> {
    let b = bind(cube, q)?;
    if q.detail {
        return detail_rows(ctx, &b, q).await;
    }
    let mut levels = b.group.clone();
    if let Some(y) = b.year {
        push(y, &mut levels);
    }
    if let Some((l, _)) = &b.across {
        push(*l, &mut levels);
    }
    let mut df = aggregate(ctx, &b, &level_columns(&levels), &q.measures, None).await?;

    let mut out: Vec<Expr> = level_columns(&b.group).iter().map(|c| col(c.as_str())).collect();
    if let Some((l, _)) = &b.across {
        out.extend(level_columns(&[*l]).iter().map(|c| col(c.as_str())));
    }
    out.extend(q.measures.iter().map(|m| col(m.as_str())));
    if let Some(t) = b.trend {
        df = trend_windows(df, &b, t, q, &mut out)?;
    }
    df = df.select(out)?;
    let sorts = sort_keys(&b, q)?;
    if !sorts.is_empty() {
        df = df.sort(sorts)?;
    }
    if let Some(n) = q.limit
        && b.across.is_none()
    {
        df = df.limit(0, Some(n))?;
    }
    Ok(df)
}

/// Previous period, change, moving average, running total, year-to-date and year-over-year.
fn trend_windows(mut df: DataFrame, b: &Bound<'_>, t: LevelRef<'_>, q: &CubeQuery, out: &mut Vec<Expr>) -> Result<DataFrame> {
    let period = t.output_name();
    let others: Vec<Expr> = level_columns(&b.group)
        .into_iter()
        .filter(|c| *c != period && *c != label_name(&t))
        .map(|c| col(c.as_str()))
        .collect();
    let by_period = || vec![col(period.as_str()).sort(true, true)];
    let pct = |now: Expr, before: Expr| {
        round(vec![
            (cast(now, DataType::Float64) - cast(before.clone(), DataType::Float64)) * lit(100.0)
                / nullif(cast(before, DataType::Float64), lit(0.0)),
            lit(1),
        ])
    };
    // Each window specification is its own node: DataFusion plans one sort order per node.
    let mut prev = Vec::new();
    for m in &q.measures {
        let w = lag(col(m.as_str()), Some(1), None).partition_by(others.clone()).order_by(by_period()).build()?;
        prev.push(w.alias(format!("{m}_prev")));
    }
    df = df.window(prev)?;
    for m in &q.measures {
        df = df.with_column(&format!("{m}_change_pct"), pct(col(m.as_str()), col(format!("{m}_prev").as_str())))?;
        out.push(col(format!("{m}_prev").as_str()));
        out.push(col(format!("{m}_change_pct").as_str()));
    }
    if let Some(n) = q.moving_average {
        let n = n.max(1) as u64;
        let frame = WindowFrame::new_bounds(
            WindowFrameUnits::Rows,
            WindowFrameBound::Preceding(ScalarValue::UInt64(Some(n - 1))),
            WindowFrameBound::CurrentRow,
        );
        let mut ws = Vec::new();
        for m in &q.measures {
            let w = over_rows(datafusion::functions_aggregate::average::avg_udaf(), cast(col(m.as_str()), DataType::Float64))
                .partition_by(others.clone())
                .order_by(by_period())
                .window_frame(frame.clone())
                .build()?;
            ws.push(w.alias(format!("__{m}_ma")));
            out.push(col(format!("{m}_ma{n}").as_str()));
        }
        df = df.window(ws)?;
        for m in &q.measures {
            df = df.with_column(&format!("{m}_ma{n}"), round(vec![col(format!("__{m}_ma").as_str()), lit(2)]))?;
        }
    }
    let cumulative = |partition: Vec<Expr>, m: &str| -> Result<Expr> {
        Ok(over_rows(datafusion::functions_aggregate::sum::sum_udaf(), col(m))
            .partition_by(partition)
            .order_by(by_period())
            .window_frame(WindowFrame::new_bounds(WindowFrameUnits::Rows, WindowFrameBound::Preceding(ScalarValue::Null), WindowFrameBound::CurrentRow))
            .build()?)
    };
    if q.running_total {
        let ws = q.measures.iter().map(|m| Ok(cumulative(others.clone(), m)?.alias(format!("{m}_running")))).collect::<Result<Vec<_>>>()?;
        df = df.window(ws)?;
        out.extend(q.measures.iter().map(|m| col(format!("{m}_running").as_str())));
    }
    let year = b.year.map(|y| y.output_name());
    if q.year_to_date
        && let Some(year) = &year
    {
        let mut partition = others.clone();
        partition.push(col(year.as_str()));
        let ws = q.measures.iter().map(|m| Ok(cumulative(partition.clone(), m)?.alias(format!("{m}_ytd")))).collect::<Result<Vec<_>>>()?;
        df = df.window(ws)?;
        out.extend(q.measures.iter().map(|m| col(format!("{m}_ytd").as_str())));
    }
    if q.year_over_year
        && let Some(year) = &year
    {
        // The same period one year earlier: the previous row among rows with the same period
        // within the year (month 07, quarter Q3, day 03-14), if it is exactly one year earlier.
        let mut partition = others.clone();
        if let Some(k) = within_year(&t) {
            df = df.with_column("__within_year", k)?;
            partition.push(col("__within_year"));
        }
        let over = |e: Expr| lag(e, Some(1), None).partition_by(partition.clone()).order_by(vec![col(year.as_str()).sort(true, true)]).build();
        let mut ws = vec![over(col(year.as_str()))?.alias("__prev_year")];
        for m in &q.measures {
            ws.push(over(col(m.as_str()))?.alias(format!("__{m}_prev_year_value")));
        }
        df = df.window(ws)?;
        for m in &q.measures {
            let last_year = when(
                col("__prev_year").eq(cast(col(year.as_str()), DataType::Int64) - lit(1i64)),
                col(format!("__{m}_prev_year_value").as_str()),
            )
            .end()?;
            df = df.with_column(&format!("{m}_last_year"), last_year)?;
            df = df.with_column(&format!("{m}_yoy_pct"), pct(col(m.as_str()), col(format!("{m}_last_year").as_str())))?;
            out.push(col(format!("{m}_last_year").as_str()));
            out.push(col(format!("{m}_yoy_pct").as_str()));
        }
    }
    if let Some(n) = q.last {
        let rank = dense_rank().order_by(vec![col(period.as_str()).sort(false, true)]).build()?;
        df = df.window(vec![rank.alias("__period_rank")])?.filter(col("__period_rank").lt_eq(lit(n as u64)))?;
    }
    Ok(df)
}

/// An aggregate function used as a window function (to be given its partition, order, frame).
fn over_rows(udaf: std::sync::Arc<datafusion::logical_expr::AggregateUDF>, arg: Expr) -> Expr {
    Expr::from(datafusion::logical_expr::expr::WindowFunction::new(udaf, vec![arg]))
}

/// The position of a period within its year, by the time dimension's conventions:
/// `2025-Q3` → `Q3`, `2025-07` → `07`, a day → `MM-DD`; none for years.
fn within_year(t: &LevelRef<'_>) -> Option<Expr> {
    let c = col(t.output_name().as_str());
    match t.level().name.as_str() {
        "quarter" | "month" => Some(substr(cast(c, DataType::Utf8), lit(6i64))),
        "day" => Some(to_char(c, lit("%m-%d"))),
        _ => None,
    }
}

/// Sort keys: explicit ones, then the group levels in order.
fn sort_keys(b: &Bound<'_>, q: &CubeQuery) -> Result<Vec<SortExpr>> {
    let mut sorts: Vec<SortExpr> = Vec::new();
    for o in &q.order {
        let (name, desc) = match o.rsplit_once(':') {
            Some((n, "desc")) => (n, true),
            Some((n, "asc")) => (n, false),
            _ => (o.as_str(), false),
        };
        let column = if q.measures.iter().any(|m| m == name) && b.across.is_none() {
            name.to_string()
        } else {
            match b.cube.level(name) {
                Ok(l) if b.group.contains(&l) => l.output_name(),
                _ => {
                    let mut valid: Vec<String> = if b.across.is_none() { q.measures.clone() } else { Vec::new() };
                    valid.extend(b.group.iter().map(|l| l.qualified()));
                    return Err(QueryError::new(format!("cannot order by '{name}': it is not a measure or level of this query"))
                        .with_hint(Some(crate::error::valid_names_hint("sort keys", name, valid.iter().map(String::as_str))))
                        .into());
                }
            }
        };
        sorts.push(col(column.as_str()).sort(!desc, false));
    }
    sorts.extend(b.group.iter().map(|l| col(l.output_name().as_str()).sort(true, true)));
    Ok(sorts)
}

/// Drill-through: the fact rows behind the selected cells, with the levels asked for.
async fn detail_rows(ctx: &SessionContext, b: &Bound<'_>, q: &CubeQuery) -> Result<DataFrame> {
    let df = detail_frame(ctx, b, &b.group).await?;
    let fact_cols: Vec<String> = ctx.table(b.cube.fact.as_str()).await?.schema().fields().iter().map(|f| f.name().clone()).collect();
    let mut out: Vec<Expr> = level_columns(&b.group).iter().map(|c| col(c.as_str())).collect();
    out.extend(fact_cols.iter().map(|c| col(c.as_str())));
    let mut df = df.select(out)?;
    let mut sorts = sort_keys(b, q)?;
    sorts.extend(fact_cols.iter().take(2).map(|c| col(c.as_str()).sort(true, true)));
    df = df.sort(sorts)?;
    Ok(df.limit(0, Some(q.limit.unwrap_or(DETAIL_ROW_LIMIT)))?)
}

/// The cube as one wide table: every level (and label) column and, per base measure, the
/// values it aggregates under the measure's name. The schema of `cubes.<name>` for SQL.
pub async fn cube_view(ctx: &SessionContext, cube: &Cube) -> Result<DataFrame> {
    cube_frame(ctx, cube, None).await
}

/// The columns `wanted` of the cube's wide table (all when None), joining only the dimension
/// tables those columns come from: `SELECT customer_region, revenue FROM cubes.sales` reads the
/// fact and the customer table, not the product or date tables.
pub async fn cube_frame(ctx: &SessionContext, cube: &Cube, wanted: Option<&[String]>) -> Result<DataFrame> {
    let want = |name: &str| wanted.is_none_or(|w| w.iter().any(|x| x == name));
    let levels: Vec<LevelRef<'_>> = cube
        .dimensions
        .iter()
        .flat_map(|d| (0..d.levels.len()).map(move |index| LevelRef { dimension: d, index }))
        .filter(|l| want(&l.output_name()) || (l.level().label.is_some() && want(&label_name(l))))
        .collect();
    let b = Bound { cube, group: levels.clone(), filters: Vec::new(), trend: None, year: None, across: None };
    let df = detail_frame(ctx, &b, &levels).await?;
    let level_cols = level_columns(&levels);
    let mut select: Vec<Expr> = level_cols.iter().filter(|c| want(c)).map(|c| col(c.as_str())).collect();
    for m in &cube.measures {
        if let MeasureKind::Base { column, .. } = &m.kind
            && want(&m.name)
        {
            select.push(col(column.as_str()).alias(m.name.as_str()));
        }
    }
    for d in cube.semi_additive_dimensions() {
        if let (Some(name), Some(j)) = (d.key_column(), &d.join)
            && want(&name)
            && !level_cols.contains(&name)
        {
            select.push(col(j.foreign_key.as_str()).alias(name));
        }
    }
    Ok(df.select(select)?)
}

/// Rows returned by a drill-through without an explicit limit.
pub const DETAIL_ROW_LIMIT: usize = 1000;

/// Runs a cube query to completion, including the operations that take two steps.
pub async fn run(ctx: &SessionContext, cube: &Cube, q: &CubeQuery) -> Result<Vec<RecordBatch>> {
    let b = bind(cube, q)?;
    let first = plan(ctx, cube, q).await?;
    if let Some((l, members)) = &b.across {
        return across(ctx, &b, q, first, *l, members).await;
    }
    if let Some(k) = q.forecast {
        return forecast(ctx, &b, q, first, k).await;
    }
    let batches = first.collect().await?;
    if q.others && q.limit.is_some() && !b.group.is_empty() && !q.detail {
        return with_others(ctx, &b, q, batches).await;
    }
    Ok(batches)
}

/// The grand total of a grouped query's measures (same filters and drill members, no groups),
/// for the totals row of a table. `None` where a total row would not mean anything.
pub async fn totals(ctx: &SessionContext, cube: &Cube, q: &CubeQuery) -> Result<Option<Vec<RecordBatch>>> {
    if q.detail || q.trend.is_some() || q.pivot.is_some() || q.compare.is_some() || (q.by.is_empty() && q.drill.is_empty()) {
        return Ok(None);
    }
    let total = CubeQuery {
        cube: q.cube.clone(),
        measures: q.measures.clone(),
        filters: q.filters.iter().chain(&q.drill).cloned().collect(),
        ..Default::default()
    };
    Ok(Some(plan(ctx, cube, &total).await?.collect().await?))
}

/// Pivot (members across columns) or compare (two members and their change).
async fn across(
    ctx: &SessionContext,
    b: &Bound<'_>,
    q: &CubeQuery,
    first: DataFrame,
    level: LevelRef<'_>,
    given: &[String],
) -> Result<Vec<RecordBatch>> {
    let name = level.output_name();
    let aggregated = crate::warehouse::materialize(ctx, first).await?;
    let dt = aggregated.schema().field_with_unqualified_name(&name)?.data_type().clone();
    let members: Vec<ScalarValue> = if given.is_empty() {
        let distinct = aggregated.clone().select(vec![col(name.as_str())])?.distinct()?.sort(vec![col(name.as_str()).sort(true, true)])?;
        let mut values = Vec::new();
        for batch in distinct.collect().await? {
            for i in 0..batch.num_rows() {
                values.push(ScalarValue::try_from_array(batch.column(0), i)?);
            }
        }
        if values.len() > MAX_PIVOT_COLUMNS {
            return Err(QueryError::new(format!("pivot on '{}' would make {} columns", level.qualified(), values.len()))
                .with_hint(Some(format!("filter it to at most {MAX_PIVOT_COLUMNS} members, or pivot a coarser level")))
                .into());
        }
        values
    } else {
        given.iter().map(|v| ScalarValue::try_from_string(v.clone(), &dt).map_err(|_| QueryError::new(format!("'{v}' is not a valid value for level '{}'", level.qualified())))).collect::<Result<_, _>>()?
    };
    let row_cols = level_columns(&b.group);
    let mut aggs = Vec::new();
    let mut names = Vec::new();
    for m in &q.measures {
        for v in &members {
            let label = if q.measures.len() == 1 && given.is_empty() { v.to_string() } else { format!("{m} {v}") };
            aggs.push(max(when(col(name.as_str()).eq(lit(v.clone())), col(m.as_str())).end()?).alias(label.as_str()));
            names.push(label);
        }
    }
    let mut df = aggregated.aggregate(row_cols.iter().map(|c| col(c.as_str())).collect(), aggs)?;
    if !given.is_empty() {
        for m in &q.measures {
            let (a, bb) = (col(format!("{m} {}", members[0]).as_str()), col(format!("{m} {}", members[1]).as_str()));
            df = df.with_column(&format!("{m} change"), cast(a.clone(), DataType::Float64) - cast(bb.clone(), DataType::Float64))?;
            df = df.with_column(
                &format!("{m} change %"),
                round(vec![
                    (cast(a, DataType::Float64) - cast(bb.clone(), DataType::Float64)) * lit(100.0) / nullif(cast(bb, DataType::Float64), lit(0.0)),
                    lit(1),
                ]),
            )?;
        }
    }
    let sorts = sort_keys(b, q)?;
    if !sorts.is_empty() {
        df = df.sort(sorts)?;
    }
    if let Some(n) = q.limit {
        df = df.limit(0, Some(n))?;
    }
    Ok(df.collect().await?)
}

/// Most members a pivot spreads across columns.
pub const MAX_PIVOT_COLUMNS: usize = 100;

/// Top/bottom N plus one `(others)` row aggregating everything past the limit, computed from
/// the fact rows (so distinct counts and ratios stay exact), not by adding up rows.
async fn with_others(ctx: &SessionContext, b: &Bound<'_>, q: &CubeQuery, top: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    let cols = level_columns(&b.group);
    let mut keep: Vec<Expr> = Vec::new();
    for batch in &top {
        for i in 0..batch.num_rows() {
            let mut row = lit(true);
            for l in &b.group {
                let name = l.output_name();
                let v = ScalarValue::try_from_array(batch.column_by_name(&name).expect("group column in result"), i)?;
                row = row.and(if v.is_null() { col(name.as_str()).is_null() } else { col(name.as_str()).eq(lit(v)) });
            }
            keep.push(row);
        }
    }
    let rest = aggregate(ctx, b, &[], &q.measures, keep.into_iter().reduce(Expr::or).map(Expr::not)).await?;
    let mut select: Vec<Expr> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| if i == 0 { lit("(others)").alias(c.as_str()) } else { lit(ScalarValue::Utf8(None)).alias(c.as_str()) })
        .collect();
    select.extend(q.measures.iter().map(|m| col(m.as_str())));
    let rest = rest.select(select)?;
    // Row labels become text so that "(others)" fits under any level type.
    let text_labels = |df: DataFrame| -> Result<DataFrame> {
        let mut exprs: Vec<Expr> = cols.iter().map(|c| cast(col(c.as_str()), DataType::Utf8).alias(c.as_str())).collect();
        exprs.extend(q.measures.iter().map(|m| col(m.as_str())));
        Ok(df.select(exprs)?)
    };
    let rest = text_labels(rest)?.collect().await?;
    if top.is_empty() {
        return Ok(top);
    }
    let top = text_labels(ctx.read_batches(top)?)?.collect().await?;
    let mut out = top;
    if rest.iter().any(|b| b.num_rows() > 0 && b.columns().iter().skip(cols.len()).any(|c| c.null_count() < c.len())) {
        out.extend(rest);
    }
    Ok(out)
}

/// Forecasts the next `k` periods of a single-series trend with Holt-Winters.
async fn forecast(_ctx: &SessionContext, b: &Bound<'_>, q: &CubeQuery, first: DataFrame, k: usize) -> Result<Vec<RecordBatch>> {
    let t = b.trend.expect("bind checks that forecast has a trend");
    if b.group.len() > 1 || q.measures.len() != 1 || q.last.is_some() {
        return Err(QueryError::new("--forecast needs one measure over the trend level alone")
            .with_hint(Some("e.g. crmcube query sales -m revenue --trend time.month --forecast 6".into()))
            .into());
    }
    let m = &q.measures[0];
    let period = t.output_name();
    let series = first.select(vec![cast(col(period.as_str()), DataType::Utf8).alias("period"), cast(col(m.as_str()), DataType::Float64).alias("value")])?;
    let mut periods = Vec::new();
    let mut values = Vec::new();
    for batch in series.collect().await? {
        let p = batch.column(0).as_any().downcast_ref::<datafusion::arrow::array::StringArray>().expect("text periods");
        let v = batch.column(1).as_any().downcast_ref::<datafusion::arrow::array::Float64Array>().expect("float values");
        for i in 0..batch.num_rows() {
            periods.push(p.value(i).to_string());
            values.push(if v.is_null(i) { 0.0 } else { v.value(i) });
        }
    }
    let season = crate::analytics::season_length(&t.level().name);
    let fc = crate::analytics::holt_winters(&values, season, k).map_err(|e| QueryError::new(format!("cannot forecast '{m}': {e}")))?;
    let mut next = periods.last().cloned().unwrap_or_default();
    let mut rows_period = periods.clone();
    let mut kind = vec!["actual"; periods.len()];
    let mut value: Vec<Option<f64>> = values.iter().map(|v| Some(*v)).collect();
    let mut lower: Vec<Option<f64>> = vec![None; periods.len()];
    let mut upper: Vec<Option<f64>> = vec![None; periods.len()];
    for p in &fc.points {
        next = crate::analytics::next_period(&t.level().name, &next).map_err(QueryError::new)?;
        rows_period.push(next.clone());
        kind.push("forecast");
        value.push(Some((p.value * 100.0).round() / 100.0));
        lower.push(Some((p.lower * 100.0).round() / 100.0));
        upper.push(Some((p.upper * 100.0).round() / 100.0));
    }
    use datafusion::arrow::array::{Float64Array, StringArray};
    let schema = std::sync::Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
        datafusion::arrow::datatypes::Field::new(period.as_str(), DataType::Utf8, false),
        datafusion::arrow::datatypes::Field::new("kind", DataType::Utf8, false),
        datafusion::arrow::datatypes::Field::new(m.as_str(), DataType::Float64, true),
        datafusion::arrow::datatypes::Field::new(format!("{m}_lower_95"), DataType::Float64, true),
        datafusion::arrow::datatypes::Field::new(format!("{m}_upper_95"), DataType::Float64, true),
    ]));
    Ok(vec![RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(StringArray::from(rows_period)),
            std::sync::Arc::new(StringArray::from(kind)),
            std::sync::Arc::new(Float64Array::from(value)),
            std::sync::Arc::new(Float64Array::from(lower)),
            std::sync::Arc::new(Float64Array::from(upper)),
        ],
    )?])
}

/// A filter value as a literal of the level column's type, or a clear error.
fn typed_literal(value: &str, dt: &DataType, level: &LevelRef<'_>) -> Result<Expr, QueryError> {
    let target = match dt {
        DataType::Utf8View | DataType::LargeUtf8 | DataType::Dictionary(..) => DataType::Utf8,
        other => other.clone(),
    };
    ScalarValue::try_from_string(value.to_string(), &target).map(lit).map_err(|_| {
        QueryError::new(format!("'{value}' is not a valid value for level '{}' ({target})", level.qualified()))
    })
}
