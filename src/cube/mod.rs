//! Cube models: `cubes/*.yaml` → validated [`Cube`]s with dimensions, hierarchies and measures.
//!
//! This module knows nothing of DataFusion: it resolves names and checks the model's own
//! consistency (unique names, measures well-formed, tables known to the ETL). The
//! [`crate::query`] module binds a cube to warehouse columns and plans queries over it.

pub mod spec;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

pub use spec::Aggregation;
use spec::CubeSpec;

use crate::error::{Diagnostic, QueryError, Result, SpecErrors, valid_names_hint};
use crate::etl::TransformSet;
use crate::project::{Project, check_version, diagnostic_at as diag, load_folder};

/// A validated cube.
#[derive(Debug, Clone)]
pub struct Cube {
    pub name: String,
    pub file: PathBuf,
    pub description: Option<String>,
    pub fact: String,
    pub dimensions: Vec<Dimension>,
    pub measures: Vec<Measure>,
    pub rollups: Vec<Rollup>,
    /// Every column the file names, with where: checked against the tables once their columns
    /// are known ([`CubeSet::check_columns`]).
    pub columns: Vec<ColumnUse>,
}

/// A column a cube file names: `table.column`, at `line:column` of the file, under `key`.
#[derive(Debug, Clone)]
pub struct ColumnUse {
    pub table: String,
    pub column: String,
    pub line: u64,
    pub at: u64,
    pub key: String,
}

/// A pre-aggregation of a cube (see [`crate::rollup`]): base measures grouped by some levels.
#[derive(Debug, Clone)]
pub struct Rollup {
    pub name: String,
    /// The warehouse table holding it: `rollup_<cube>_<name>`.
    pub table: String,
    /// Grouping levels as (dimension, level index): the declared levels and every coarser level
    /// of their dimensions, coarsest first within a dimension.
    pub levels: Vec<(String, usize)>,
    /// Base measures stored, each under its own name, aggregated by its own aggregation.
    pub measures: Vec<String>,
    /// The level whose members partition the table's files.
    pub partition: Option<(String, usize)>,
}

impl Rollup {
    /// The rollup's grouping levels resolved against `cube`.
    pub fn level_refs<'c>(&self, cube: &'c Cube) -> Vec<LevelRef<'c>> {
        self.levels
            .iter()
            .filter_map(|(d, i)| cube.dimensions.iter().find(|x| x.name == *d).map(|dimension| LevelRef { dimension, index: *i }))
            .collect()
    }

    /// Partition column, if any (a level's output name).
    pub fn partition_column(&self, cube: &Cube) -> Option<String> {
        let (d, i) = self.partition.as_ref()?;
        cube.dimensions.iter().find(|x| x.name == *d).map(|dimension| LevelRef { dimension, index: *i }.output_name())
    }

    /// A digest of everything the stored rows depend on (tables, columns, aggregations): a stored
    /// rollup whose fingerprint differs from the model's is stale and never answers a query.
    pub fn fingerprint(&self, cube: &Cube) -> String {
        use sha2::Digest;
        let levels: Vec<String> = self
            .level_refs(cube)
            .iter()
            .map(|l| format!("{:?}|{:?}", l.dimension.join.as_ref().map(|j| (&j.table, &j.key, &j.foreign_key)), l.level()))
            .collect();
        let measures: Vec<String> = self.measures.iter().filter_map(|m| cube.measure(m).ok()).map(|m| format!("{}={:?}", m.name, m.kind)).collect();
        let text = format!("{}|{}|{levels:?}|{measures:?}|{:?}", cube.fact, self.table, self.partition);
        sha2::Sha256::digest(text.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Debug, Clone)]
pub struct Dimension {
    pub name: String,
    pub join: Option<DimensionJoin>,
    /// Coarsest first.
    pub levels: Vec<Level>,
}

impl Dimension {
    /// The column of `cubes.<cube>` holding the fact's key to this dimension, named
    /// `<dimension>_<key>` (`time_date`): a semi-additive measure takes its value at the last of
    /// these within each period. Only dimensions a semi-additive measure names have it.
    pub fn key_column(&self) -> Option<String> {
        self.join.as_ref().map(|j| format!("{}_{}", self.name, j.key))
    }
}

/// How a dimension table joins the fact: `fact.foreign_key = table.key`.
#[derive(Debug, Clone)]
pub struct DimensionJoin {
    pub table: String,
    pub key: String,
    pub foreign_key: String,
}

#[derive(Debug, Clone)]
pub struct Level {
    pub name: String,
    pub column: String,
    pub label: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Measure {
    pub name: String,
    pub description: Option<String>,
    pub kind: MeasureKind,
}

#[derive(Debug, Clone)]
pub enum MeasureKind {
    Base {
        agg: Aggregation,
        column: String,
        /// The time dimension over which this measure is not additive (takes the last date).
        semi_additive: Option<String>,
    },
    /// A SQL expression over `inputs` (other measures), evaluated after aggregation.
    Calculated { expr: String, inputs: Vec<String> },
}

/// A reference to one level: `dimension.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelRef<'a> {
    pub dimension: &'a Dimension,
    pub index: usize,
}

impl LevelRef<'_> {
    pub fn level(&self) -> &Level {
        &self.dimension.levels[self.index]
    }

    /// Output column name: `customer_region`.
    pub fn output_name(&self) -> String {
        format!("{}_{}", self.dimension.name, self.level().name)
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.dimension.name, self.level().name)
    }
}

impl PartialEq for Dimension {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for Dimension {}

impl Cube {
    /// The dimensions over which some measure is semi-additive (each once).
    pub fn semi_additive_dimensions(&self) -> Vec<&Dimension> {
        let mut out: Vec<&Dimension> = Vec::new();
        for m in &self.measures {
            if let MeasureKind::Base { semi_additive: Some(d), .. } = &m.kind
                && let Some(dim) = self.dimensions.iter().find(|x| x.name == *d)
                && !out.iter().any(|x| x.name == dim.name)
            {
                out.push(dim);
            }
        }
        out
    }

    pub fn measure(&self, name: &str) -> Result<&Measure, QueryError> {
        self.measures.iter().find(|m| m.name == name).ok_or_else(|| {
            QueryError::new(format!("cube '{}' has no measure '{name}'", self.name)).with_hint(Some(valid_names_hint(
                "measures",
                name,
                self.measures.iter().map(|m| m.name.as_str()),
            )))
        })
    }

    /// Resolves `dimension.level` (or a bare level name when it is unambiguous).
    pub fn level(&self, qualified: &str) -> Result<LevelRef<'_>, QueryError> {
        let all: Vec<String> =
            self.dimensions.iter().flat_map(|d| d.levels.iter().map(move |l| format!("{}.{}", d.name, l.name))).collect();
        let not_found = || {
            QueryError::new(format!("cube '{}' has no level '{qualified}'", self.name))
                .with_hint(Some(valid_names_hint("levels", qualified, all.iter().map(String::as_str))))
        };
        let found: Vec<LevelRef<'_>> = match qualified.split_once('.') {
            Some((d, l)) => self
                .dimensions
                .iter()
                .filter(|dim| dim.name == d)
                .flat_map(|dim| dim.levels.iter().position(|x| x.name == l).map(|index| LevelRef { dimension: dim, index }))
                .collect(),
            None => self
                .dimensions
                .iter()
                .flat_map(|dim| dim.levels.iter().position(|x| x.name == qualified).map(|index| LevelRef { dimension: dim, index }))
                .collect(),
        };
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(not_found()),
            many => Err(QueryError::new(format!(
                "level '{qualified}' is ambiguous: {}",
                many.iter().map(|l| l.qualified()).collect::<Vec<_>>().join(", ")
            ))
            .with_hint(Some("name it with its dimension, e.g. customer.region".into()))),
        }
    }

    /// Every measure needed to compute `name`, inputs before the measures that use them.
    pub fn measure_closure(&self, names: &[String]) -> Result<Vec<&Measure>, QueryError> {
        let mut out: Vec<&Measure> = Vec::new();
        fn visit<'a>(cube: &'a Cube, name: &str, out: &mut Vec<&'a Measure>, depth: usize) -> Result<(), QueryError> {
            if depth > 32 {
                return Err(QueryError::new(format!("measure '{name}' refers to itself")));
            }
            let m = cube.measure(name)?;
            if let MeasureKind::Calculated { inputs, .. } = &m.kind {
                for i in inputs {
                    visit(cube, i, out, depth + 1)?;
                }
            }
            if !out.iter().any(|x| x.name == m.name) {
                out.push(m);
            }
            Ok(())
        }
        for n in names {
            visit(self, n, &mut out, 0)?;
        }
        Ok(out)
    }
}

/// All cubes of a project.
#[derive(Debug, Clone)]
pub struct CubeSet {
    pub cubes: Vec<Cube>,
}

impl CubeSet {
    /// Loads and validates every cube file; `transforms` names the tables cubes may use.
    pub fn load(project: &Project, transforms: &TransformSet) -> Result<Self> {
        // Transforms' tables, and the model tables every load fits (customer_clv, clv_model).
        let tables: Vec<&str> = transforms.transforms.iter().map(|t| t.name.as_str()).chain(crate::etl::models::TABLES).collect();
        let (specs, mut errors) = load_folder::<CubeSpec>(project, &project.cubes)?;
        let cubes: Vec<Cube> = specs.iter().map(|(file, spec)| resolve(file, spec, &tables, &mut errors)).collect();
        let mut names = BTreeSet::new();
        for c in &cubes {
            if !names.insert(c.name.clone()) {
                errors.push(Diagnostic {
                    file: c.file.clone(),
                    line: 0,
                    column: 0,
                    key: format!("cube '{}'", c.name),
                    message: "another cube file defines a cube with this name".into(),
                    hint: None,
                });
            }
        }
        if errors.is_empty() { Ok(Self { cubes }) } else { Err(SpecErrors(errors).into()) }
    }

    /// Checks every column a cube names against its table's columns (`columns_of` gives them,
    /// None for a table not known yet): each missing one is a diagnostic at its place in the
    /// cube file, with the nearest column of that table.
    pub fn check_columns(&self, columns_of: impl Fn(&str) -> Option<Vec<String>>) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for c in &self.cubes {
            for u in &c.columns {
                let Some(columns) = columns_of(&u.table) else { continue };
                if !columns.contains(&u.column) {
                    out.push(Diagnostic {
                        file: c.file.clone(),
                        line: u.line,
                        column: u.at,
                        key: u.key.clone(),
                        message: format!("column '{}' is not in table '{}'", u.column, u.table),
                        hint: Some(valid_names_hint("columns", &u.column, columns.iter().map(String::as_str))),
                    });
                }
            }
        }
        out
    }

    pub fn get(&self, name: &str) -> Result<&Cube, QueryError> {
        self.cubes.iter().find(|c| c.name == name).ok_or_else(|| {
            QueryError::new(format!("no cube named '{name}'"))
                .with_hint(Some(valid_names_hint("cubes", name, self.cubes.iter().map(|c| c.name.as_str()))))
        })
    }
}

/// Resolves one cube file, appending problems to `errors`.
pub(crate) fn resolve(file: &Path, spec: &CubeSpec, tables: &[&str], errors: &mut Vec<Diagnostic>) -> Cube {
    let cube = spec.cube.value.clone();
    check_version(file, spec.version, errors);
    let check_table = |errors: &mut Vec<Diagnostic>, at: &Spanned<String>, key: String| {
        if !tables.contains(&at.value.as_str()) {
            errors.push(diag(
                file,
                at,
                key,
                format!("table '{}' is not a warehouse table", at.value),
                Some(valid_names_hint("tables", &at.value, tables.iter().copied())),
            ));
        }
    };
    check_table(errors, &spec.fact, format!("cube '{cube}' › fact"));
    let mut columns: Vec<ColumnUse> = Vec::new();
    let mut uses = |table: &str, at: &Spanned<String>, key: String| {
        columns.push(ColumnUse { table: table.to_string(), column: at.value.clone(), line: at.referenced.line(), at: at.referenced.column(), key });
    };
    let mut dimensions = Vec::new();
    for d in &spec.dimensions {
        let dkey = format!("cube '{cube}' › dimension '{}'", d.name.value);
        let join = match (&d.table, &d.key, &d.foreign_key) {
            (Some(t), Some(k), Some(fk)) => {
                check_table(errors, t, format!("{dkey} › table"));
                Some(DimensionJoin { table: t.value.clone(), key: k.value.clone(), foreign_key: fk.value.clone() })
            }
            (None, None, None) => None,
            _ => {
                errors.push(diag(
                    file,
                    &d.name,
                    dkey.clone(),
                    "a joined dimension needs `table`, `key` and `foreign_key` together".into(),
                    Some("omit all three for a dimension whose levels are fact columns".into()),
                ));
                None
            }
        };
        if d.levels.is_empty() {
            errors.push(diag(file, &d.name, dkey.clone(), "a dimension needs at least one level".into(), None));
        }
        let table = d.table.as_ref().map(|t| t.value.as_str()).unwrap_or(spec.fact.value.as_str());
        if let (Some(k), Some(fk)) = (&d.key, &d.foreign_key) {
            uses(table, k, format!("{dkey} › key"));
            uses(&spec.fact.value, fk, format!("{dkey} › foreign_key"));
        }
        let mut level_names = BTreeSet::new();
        for l in &d.levels {
            let lkey = format!("{dkey} › level '{}'", l.name.value);
            // A hierarchy is one path from coarse to fine: a level may not come back.
            if !level_names.insert(l.name.value.clone()) {
                errors.push(diag(
                    file,
                    &l.name,
                    lkey.clone(),
                    format!("level '{}' appears twice: a hierarchy runs once from the coarsest level to the finest, without cycles", l.name.value),
                    Some("list each level once, coarse to fine".into()),
                ));
            }
            uses(table, l.column.as_ref().unwrap_or(&l.name), lkey.clone());
            if let Some(label) = &l.label {
                uses(table, label, format!("{lkey} › label"));
            }
        }
        let levels = d
            .levels
            .iter()
            .map(|l| Level {
                name: l.name.value.clone(),
                column: l.column.as_ref().map(|c| c.value.clone()).unwrap_or_else(|| l.name.value.clone()),
                label: l.label.as_ref().map(|c| c.value.clone()),
            })
            .collect();
        dimensions.push(Dimension { name: d.name.value.clone(), join, levels });
    }
    let measure_names: Vec<&str> = spec.measures.iter().map(|m| m.name.value.as_str()).collect();
    let mut measures = Vec::new();
    for m in &spec.measures {
        let mkey = format!("cube '{cube}' › measure '{}'", m.name.value);
        let kind = match (&m.agg, &m.column, &m.expr) {
            (Some(agg), Some(column), None) => {
                uses(&spec.fact.value, column, format!("{mkey} › column"));
                if let Some(dim) = &m.semi_additive {
                    let joined_time = spec.dimensions.iter().find(|d| d.name.value == dim.value).map(|d| d.table.is_some());
                    match joined_time {
                        None => errors.push(diag(
                            file,
                            dim,
                            mkey.clone(),
                            format!("semi_additive names dimension '{}', which this cube does not have", dim.value),
                            Some(valid_names_hint("dimensions", &dim.value, spec.dimensions.iter().map(|d| d.name.value.as_str()))),
                        )),
                        Some(false) => errors.push(diag(
                            file,
                            dim,
                            mkey.clone(),
                            format!("semi_additive needs a joined time dimension (with table, key and foreign_key); '{}' has none", dim.value),
                            None,
                        )),
                        Some(true) => {}
                    }
                }
                MeasureKind::Base { agg: *agg, column: column.value.clone(), semi_additive: m.semi_additive.as_ref().map(|d| d.value.clone()) }
            }
            (None, None, Some(expr)) if m.semi_additive.is_none() => {
                let inputs: Vec<String> = identifiers(&expr.value)
                    .into_iter()
                    .filter(|w| measure_names.contains(&w.as_str()) && *w != m.name.value)
                    .collect();
                if inputs.is_empty() {
                    errors.push(diag(
                        file,
                        expr,
                        mkey.clone(),
                        "a calculated measure must refer to at least one other measure".into(),
                        Some(valid_names_hint("measures", &expr.value, measure_names.iter().copied())),
                    ));
                }
                MeasureKind::Calculated { expr: expr.value.clone(), inputs }
            }
            _ => {
                errors.push(diag(
                    file,
                    &m.name,
                    mkey,
                    "a measure needs either `agg` and `column`, or `expr`".into(),
                    Some("e.g. `agg: sum, column: revenue` or `expr: revenue - cost`".into()),
                ));
                continue;
            }
        };
        measures.push(Measure { name: m.name.value.clone(), description: m.description.clone(), kind });
    }
    let mut seen = BTreeSet::new();
    for n in spec.dimensions.iter().map(|d| &d.name).chain(spec.measures.iter().map(|m| &m.name)) {
        if !seen.insert(n.value.clone()) {
            errors.push(diag(file, n, format!("cube '{cube}' › '{}'", n.value), "name is used twice".into(), None));
        }
    }
    let mut model = Cube {
        name: cube,
        file: file.to_path_buf(),
        description: spec.description.clone(),
        fact: spec.fact.value.clone(),
        dimensions,
        measures,
        rollups: Vec::new(),
        columns,
    };
    model.rollups = spec.rollups.iter().filter_map(|r| resolve_rollup(file, &model, r, errors)).collect();
    let mut rollup_names = BTreeSet::new();
    for r in &spec.rollups {
        if !rollup_names.insert(r.name.value.clone()) {
            errors.push(diag(file, &r.name, format!("cube '{}' › rollup '{}'", model.name, r.name.value), "name is used twice".into(), None));
        }
    }
    model
}

/// Resolves one rollup declaration against its (already resolved) cube.
fn resolve_rollup(file: &Path, cube: &Cube, r: &spec::RollupSpec, errors: &mut Vec<Diagnostic>) -> Option<Rollup> {
    let key = format!("cube '{}' › rollup '{}'", cube.name, r.name.value);
    let before = errors.len();
    if r.name.value.is_empty() || !r.name.value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        errors.push(diag(file, &r.name, key.clone(), "a rollup name is letters, digits and '_'".into(), Some("e.g. name: region_month".into())));
    }
    // Finest declared level per dimension; coarser levels come with it.
    let mut finest: Vec<(String, usize)> = Vec::new();
    for l in &r.levels {
        match cube.level(&l.value) {
            Ok(level) => match finest.iter_mut().find(|(d, _)| *d == level.dimension.name) {
                Some(entry) => entry.1 = entry.1.max(level.index),
                None => finest.push((level.dimension.name.clone(), level.index)),
            },
            Err(e) => errors.push(diag(file, l, format!("{key} › levels"), e.message.clone(), e.hint.clone())),
        }
    }
    let levels: Vec<(String, usize)> = finest.iter().flat_map(|(d, i)| (0..=*i).map(move |j| (d.clone(), j))).collect();
    let reaggregatable = |m: &Measure| matches!(&m.kind, MeasureKind::Base { agg, semi_additive: None, .. } if *agg != Aggregation::Avg);
    let measures: Vec<String> = match &r.measures {
        None => cube.measures.iter().filter(|m| reaggregatable(m)).map(|m| m.name.clone()).collect(),
        Some(names) => {
            let mut out: Vec<String> = Vec::new();
            for n in names {
                match cube.measure_closure(std::slice::from_ref(&n.value)) {
                    Ok(closure) => {
                        for m in closure.into_iter().filter(|m| matches!(m.kind, MeasureKind::Base { .. })) {
                            if !reaggregatable(m) {
                                errors.push(diag(
                                    file,
                                    n,
                                    format!("{key} › measures"),
                                    format!("measure '{}' cannot be stored in a rollup: averages and semi-additive balances do not re-aggregate exactly", m.name),
                                    Some("store its sum and count as two measures and divide them in a calculated measure".into()),
                                ));
                            } else if !out.contains(&m.name) {
                                out.push(m.name.clone());
                            }
                        }
                    }
                    Err(e) => errors.push(diag(file, n, format!("{key} › measures"), e.message.clone(), e.hint.clone())),
                }
            }
            out
        }
    };
    let partition = match &r.partition {
        None => None,
        Some(p) => match cube.level(&p.value) {
            Ok(l) if levels.iter().any(|(d, i)| *d == l.dimension.name && *i == l.index) => Some((l.dimension.name.clone(), l.index)),
            Ok(l) => {
                errors.push(diag(
                    file,
                    p,
                    format!("{key} › partition"),
                    format!("level '{}' is not a level of this rollup", l.qualified()),
                    Some("partition by one of the rollup's levels or a coarser level of the same dimension, e.g. time.year".into()),
                ));
                None
            }
            Err(e) => {
                errors.push(diag(file, p, format!("{key} › partition"), e.message.clone(), e.hint.clone()));
                None
            }
        },
    };
    (errors.len() == before).then(|| Rollup { name: r.name.value.clone(), table: format!("rollup_{}_{}", cube.name, r.name.value), levels, measures, partition })
}

/// The identifiers appearing in an expression (for measure dependencies).
fn identifiers(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch == '\'' {
            in_quote = !in_quote;
            cur.clear();
            continue;
        }
        if !in_quote && (ch.is_ascii_alphanumeric() || ch == '_') {
            cur.push(ch);
        } else {
            if !cur.is_empty() && !cur.starts_with(|c: char| c.is_ascii_digit()) && !out.contains(&cur) {
                out.push(cur.clone());
            }
            cur.clear();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::identifiers;

    #[test]
    fn identifiers_skip_numbers_and_string_literals() {
        assert_eq!(identifiers("round(100 * margin / NULLIF(revenue, 0), 2)"), ["round", "margin", "NULLIF", "revenue"]);
        assert_eq!(identifiers("coalesce(x, 'revenue')"), ["coalesce", "x"]);
    }
}
