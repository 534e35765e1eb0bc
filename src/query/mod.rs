//! Cube queries: binds a [`CubeQuery`] to warehouse columns and plans it with DataFusion.
//!
//! The plan is built with DataFrame expressions, never by pasting user values into SQL: filter
//! values become typed literals. Its shape: fact ⟕ the dimension tables the query needs → filters
//! → group by the requested levels with the base measures → calculated measures as expressions
//! over the aggregates (ratios of sums at every level) → trend windows (previous period, change
//! in %) → order and limit.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{JoinType, ScalarValue};
use datafusion::functions_aggregate::expr_fn::{avg, count, count_distinct, max, min, sum};
use datafusion::functions_window::expr_fn::{dense_rank, lag};
use datafusion::logical_expr::{ExprFunctionExt, SortExpr};
use datafusion::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cube::{Aggregation, Cube, LevelRef, MeasureKind};
use crate::error::{QueryError, Result};

/// A question to a cube, as the CLI or a query file states it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CubeQuery {
    pub cube: String,
    pub measures: Vec<String>,
    /// Levels to group by, as `dimension.level`.
    #[serde(default)]
    pub by: Vec<String>,
    /// Filters such as `customer.region=East`, `time.year>=2025`, `channel.channel!=store`,
    /// `customer.region=East,North` (any of).
    #[serde(default)]
    pub filters: Vec<String>,
    /// Drill into a member: `customer.region=East` groups East by the next level (province).
    #[serde(default)]
    pub drill: Option<String>,
    /// A time level to trend over (`time.month`): adds `<measure>_prev` and `<measure>_change_pct`.
    #[serde(default)]
    pub trend: Option<String>,
    /// With `trend`: keep only the last N periods (changes are computed before the cut).
    #[serde(default)]
    pub last: Option<usize>,
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

/// The output column name of a level's label.
fn label_name(l: &LevelRef<'_>) -> String {
    format!("{}_name", l.output_name())
}

/// Plans a cube query over the tables registered in `ctx`.
pub async fn plan(ctx: &SessionContext, cube: &Cube, q: &CubeQuery) -> Result<DataFrame> {
    if q.measures.is_empty() {
        return Err(QueryError::new("name at least one measure")
            .with_hint(Some(format!(
                "measures of '{}' are {}",
                cube.name,
                cube.measures.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
            )))
            .into());
    }
    let closure = cube.measure_closure(&q.measures)?;

    // Group-by levels: trend level first, then `by`, then the drill's member and next level.
    let mut group: Vec<LevelRef<'_>> = Vec::new();
    fn push<'a>(l: LevelRef<'a>, group: &mut Vec<LevelRef<'a>>) {
        if !group.contains(&l) {
            group.push(l);
        }
    }
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
    if let Some(d) = &q.drill {
        let f = Filter::parse(d)?;
        let l = cube.level(&f.level)?;
        if f.op != FilterOp::Eq {
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

    // Join the dimension tables the query touches, each once.
    let mut df = ctx.table(cube.fact.as_str()).await?;
    let used: Vec<LevelRef<'_>> = group.iter().copied().chain(filters.iter().map(|(l, _)| *l)).collect();
    let mut joined: Vec<&str> = Vec::new();
    for l in &used {
        let dim = l.dimension;
        if joined.contains(&dim.name.as_str()) {
            continue;
        }
        joined.push(&dim.name);
        let levels: Vec<LevelRef<'_>> = used.iter().filter(|x| x.dimension == dim).copied().collect();
        let mut cols: Vec<Expr> = Vec::new();
        for x in &levels {
            let name = x.output_name();
            if !cols.iter().any(|c| c.schema_name().to_string() == name) {
                cols.push(col(x.level().column.as_str()).alias(name));
                if let Some(label) = &x.level().label {
                    cols.push(col(label.as_str()).alias(label_name(x)));
                }
            }
        }
        match &dim.join {
            Some(j) => {
                let key = format!("__key_{}", dim.name);
                cols.push(col(j.key.as_str()).alias(key.as_str()));
                let dim_df = ctx.table(j.table.as_str()).await?.select(cols)?;
                df = df.join(dim_df, JoinType::Left, &[j.foreign_key.as_str()], &[key.as_str()], None)?;
            }
            None => {
                for c in cols {
                    let name = c.schema_name().to_string();
                    let expr = match c {
                        Expr::Alias(a) => *a.expr,
                        other => other,
                    };
                    df = df.with_column(&name, expr)?;
                }
            }
        }
    }

    for (l, f) in &filters {
        let name = l.output_name();
        let dt = df.schema().field_with_unqualified_name(&name)?.data_type().clone();
        let values: Vec<Expr> = f.values.iter().map(|v| typed_literal(v, &dt, l)).collect::<Result<_, _>>()?;
        let c = col(name.as_str());
        let pred = match f.op {
            FilterOp::Eq if values.len() == 1 => c.eq(values[0].clone()),
            FilterOp::Eq => c.in_list(values, false),
            FilterOp::NotEq if values.len() == 1 => c.not_eq(values[0].clone()),
            FilterOp::NotEq => c.in_list(values, true),
            FilterOp::Lt => c.lt(values[0].clone()),
            FilterOp::LtEq => c.lt_eq(values[0].clone()),
            FilterOp::Gt => c.gt(values[0].clone()),
            FilterOp::GtEq => c.gt_eq(values[0].clone()),
            FilterOp::Like => cast(c, DataType::Utf8).like(lit(f.values[0].as_str())),
        };
        df = df.filter(pred)?;
    }

    // Aggregate base measures by the group levels (and their labels).
    let mut group_cols: Vec<String> = Vec::new();
    for l in &group {
        group_cols.push(l.output_name());
        if l.level().label.is_some() {
            group_cols.push(label_name(l));
        }
    }
    let aggs: Vec<Expr> = closure
        .iter()
        .filter_map(|m| match &m.kind {
            MeasureKind::Base { agg, column } => {
                let c = col(column.as_str());
                let e = match agg {
                    Aggregation::Sum => sum(c),
                    Aggregation::Count => count(c),
                    Aggregation::CountDistinct => count_distinct(c),
                    Aggregation::Min => min(c),
                    Aggregation::Max => max(c),
                    Aggregation::Avg => avg(c),
                };
                Some(e.alias(m.name.as_str()))
            }
            MeasureKind::Calculated { .. } => None,
        })
        .collect();
    df = df.aggregate(group_cols.iter().map(|c| col(c.as_str())).collect(), aggs)?;
    for m in &closure {
        if let MeasureKind::Calculated { expr, .. } = &m.kind {
            let e = df.parse_sql_expr(expr).map_err(|e| {
                QueryError::new(format!("measure '{}' of cube '{}' has an invalid expression '{expr}': {e}", m.name, cube.name))
                    .with_hint(Some(format!("fix it in {}", cube.file.display())))
            })?;
            df = df.with_column(&m.name, e)?;
        }
    }

    // Output columns; a trend adds the previous period and the change in %.
    let mut out: Vec<Expr> = group_cols.iter().map(|c| col(c.as_str())).collect();
    out.extend(q.measures.iter().map(|m| col(m.as_str())));
    if let Some(t) = trend {
        let period = t.output_name();
        let others: Vec<Expr> =
            group_cols.iter().filter(|c| **c != period && **c != format!("{period}_name")).map(|c| col(c.as_str())).collect();
        let mut windows = Vec::new();
        for m in &q.measures {
            let prev = format!("{m}_prev");
            windows.push(
                lag(col(m.as_str()), Some(1), None)
                    .partition_by(others.clone())
                    .order_by(vec![col(period.as_str()).sort(true, true)])
                    .build()?
                    .alias(prev.as_str()),
            );
        }
        df = df.window(windows)?;
        if q.last.is_some() {
            // A separate window node: DataFusion plans one sort order per window node.
            let rank = dense_rank().order_by(vec![col(period.as_str()).sort(false, true)]).build()?;
            df = df.window(vec![rank.alias("__period_rank")])?;
        }
        for m in &q.measures {
            let prev = col(format!("{m}_prev").as_str());
            let change = round(vec![
                (cast(col(m.as_str()), DataType::Float64) - cast(prev.clone(), DataType::Float64)) * lit(100.0)
                    / nullif(cast(prev, DataType::Float64), lit(0.0)),
                lit(1),
            ]);
            df = df.with_column(&format!("{m}_change_pct"), change)?;
            out.push(col(format!("{m}_prev").as_str()));
            out.push(col(format!("{m}_change_pct").as_str()));
        }
        if let Some(n) = q.last {
            df = df.filter(col("__period_rank").lt_eq(lit(n as u64)))?;
        }
    }

    // Order: explicit keys, else the group levels in order.
    let mut sorts: Vec<SortExpr> = Vec::new();
    for o in &q.order {
        let (name, desc) = match o.rsplit_once(':') {
            Some((n, "desc")) => (n, true),
            Some((n, "asc")) => (n, false),
            _ => (o.as_str(), false),
        };
        let column = if q.measures.iter().any(|m| m == name) {
            name.to_string()
        } else {
            match cube.level(name) {
                Ok(l) if group.contains(&l) => l.output_name(),
                _ => {
                    let mut valid: Vec<String> = q.measures.clone();
                    valid.extend(group.iter().map(|l| l.qualified()));
                    return Err(QueryError::new(format!("cannot order by '{name}': it is not a measure or level of this query"))
                        .with_hint(Some(crate::error::valid_names_hint("sort keys", name, valid.iter().map(String::as_str))))
                        .into());
                }
            }
        };
        sorts.push(col(column.as_str()).sort(!desc, false));
    }
    sorts.extend(group.iter().map(|l| col(l.output_name().as_str()).sort(true, true)));
    df = df.select(out)?;
    if !sorts.is_empty() {
        df = df.sort(sorts)?;
    }
    if let Some(n) = q.limit {
        df = df.limit(0, Some(n))?;
    }
    Ok(df)
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
