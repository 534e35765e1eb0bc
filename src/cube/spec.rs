//! The raw cube metadata, exactly as written in `cubes/*.yaml`.

use serde::Deserialize;
use serde_saphyr::Spanned;

/// One `cubes/*.yaml` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CubeSpec {
    pub version: u32,
    pub cube: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// The fact table (a warehouse table) at the cube's grain.
    pub fact: Spanned<String>,
    pub dimensions: Vec<DimensionSpec>,
    pub measures: Vec<MeasureSpec>,
    /// Pre-aggregations built by every load and read automatically by queries they answer.
    #[serde(default)]
    pub rollups: Vec<RollupSpec>,
}

/// A rollup: the cube's base measures aggregated by a few levels, stored as a warehouse table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupSpec {
    pub name: Spanned<String>,
    /// `dimension.level`s to group by; every coarser level of the same dimension is kept too.
    pub levels: Vec<Spanned<String>>,
    /// Measures to keep (calculated ones bring their inputs); all re-aggregatable ones if omitted.
    #[serde(default)]
    pub measures: Option<Vec<Spanned<String>>>,
    /// A level of the rollup whose members partition its files (e.g. `time.year`).
    #[serde(default)]
    pub partition: Option<Spanned<String>>,
}

/// A dimension: a hierarchy of levels, from a joined table or from the fact itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DimensionSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Dimension table joined to the fact; absent for a degenerate dimension on the fact.
    #[serde(default)]
    pub table: Option<Spanned<String>>,
    /// Key column of `table`.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// Column of the fact that holds the key.
    #[serde(default)]
    pub foreign_key: Option<Spanned<String>>,
    /// Levels from the coarsest to the finest (year › quarter › month › day).
    pub levels: Vec<LevelSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelSpec {
    pub name: Spanned<String>,
    /// Column identifying the member (defaults to the level name).
    #[serde(default)]
    pub column: Option<Spanned<String>>,
    /// Column with a human-readable name shown next to the member (e.g. a customer's name).
    #[serde(default)]
    pub label: Option<Spanned<String>>,
}

/// A measure: an aggregate of a fact column, or a formula over other measures.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Aggregation of `column` (base measures).
    #[serde(default)]
    pub agg: Option<Aggregation>,
    #[serde(default)]
    pub column: Option<Spanned<String>>,
    /// SQL expression over other measures (calculated measures), evaluated after aggregation so
    /// that ratios are ratios of sums at every level.
    #[serde(default)]
    pub expr: Option<Spanned<String>>,
    /// A balance: aggregated over every dimension but this one (a time dimension), over which it
    /// takes the value at the last date of each period (e.g. the month-end balance of a year).
    #[serde(default)]
    pub semi_additive: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Sum,
    Count,
    CountDistinct,
    /// `approx_distinct` (HyperLogLog): rollups keep it as a sketch that merges at any grouping.
    ApproxCountDistinct,
    Min,
    Max,
    Avg,
}
