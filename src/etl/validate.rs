//! Resolves raw [`TransformSpec`]s into the validated [`Transform`] model.
//!
//! Every problem is collected (not just the first), with file, line, column, the key at fault and
//! the nearest valid name. Cross-file checks (references to other tables, cycles) run once all
//! files are loaded. After this step the loader never re-checks metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

use super::spec::{Case, ColumnType, LoadMode, SourceSpec, TransformSpec};
use crate::error::{Diagnostic, Result, SpecErrors, valid_names_hint};
use crate::project::{Project, check_version, diagnostic_at as diag, load_folder};

/// Default share of rows that may be quarantined before a load fails.
pub const DEFAULT_REJECT_THRESHOLD: f64 = 0.05;

/// A validated transform: a source table or a derived table.
#[derive(Debug, Clone)]
pub struct Transform {
    pub name: String,
    /// The metadata file it came from, relative to the project (for messages).
    pub file: PathBuf,
    pub body: TransformBody,
    /// Row-level access rules; None when the table declares none (everyone reads every row).
    pub access: Option<Vec<crate::access::AccessRule>>,
    /// How its files are written (sort order, row groups, Bloom filters).
    pub layout: crate::warehouse::Layout,
}

#[derive(Debug, Clone)]
pub enum TransformBody {
    Source(SourceTransform),
    /// A SELECT over other warehouse tables, run after its inputs are loaded; `grows_with` and
    /// `refresh_by`: see [`super::spec::TransformSpec::grows_with`] and [`super::keyed`].
    Derived { sql: String, grows_with: Option<String>, refresh_by: Option<RefreshBy> },
    /// The type-2 history of a source table that declares `history:` (see [`History`]); built by
    /// the load from the previous snapshot's history and the table's new rows.
    History(History),
}

/// `refresh_by:` resolved: the driver table and the key column (see [`super::keyed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshBy {
    pub table: String,
    pub key: String,
}

/// The history table `<of>_history`: every column of the source table `of`, then
/// [`History::VERSION_COLUMNS`]. A key gets a new version when one of `columns` changes; the
/// other columns are corrected in every version (type 1).
#[derive(Debug, Clone)]
pub struct History {
    /// The source table whose history this is.
    pub of: String,
    pub key: Vec<String>,
    pub columns: Vec<String>,
    pub changed_at: String,
}

impl History {
    /// Columns the history adds: `version` (1, 2, …), `valid_from` (NULL: since the start),
    /// `valid_to` (NULL: still valid), `is_current`, and `version_key` (a BIGINT surrogate key,
    /// unique across versions, that facts join on: stored versions keep theirs, new ones are
    /// numbered after the largest).
    pub const VERSION_COLUMNS: [&'static str; 5] = ["version", "valid_from", "valid_to", "is_current", "version_key"];

    /// Name of the history table of `table`.
    pub fn table_of(table: &str) -> String {
        format!("{table}_history")
    }
}

/// A source table: where its export lives, its columns and rules.
#[derive(Debug, Clone)]
pub struct SourceTransform {
    pub source: SourceSpec,
    pub columns: Vec<Column>,
    pub key: Vec<String>,
    pub latest_by: Option<String>,
    pub references: Vec<Reference>,
    pub reject_threshold: f64,
    pub mode: LoadMode,
    /// Incremental sources: rows at or before the stored watermark are skipped.
    pub watermark: Option<String>,
}

/// A validated column with its parse and validation rules.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// Name in the export (CSV header or JSON key).
    pub from: String,
    pub ty: ColumnType,
    pub nullable: bool,
    pub formats: Vec<String>,
    pub scale: i8,
    pub case: Option<Case>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub allowed: Vec<String>,
    pub pattern: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Reference {
    pub column: String,
    pub table: String,
    pub key: String,
}

/// All transforms of a project, sources in dependency order followed by derived tables.
#[derive(Debug, Clone)]
pub struct TransformSet {
    pub transforms: Vec<Transform>,
}

impl TransformSet {
    /// Loads and validates every file in the project's transforms folder.
    pub fn load(project: &Project) -> Result<Self> {
        let (specs, mut errors) = load_folder::<TransformSpec>(project, &project.transforms)?;
        // A file that does not parse is reported once: references to its table (by the usual
        // name, the file's stem) are not reported again as "not found".
        let unreadable: Vec<String> = errors.iter().filter_map(|d| d.file.file_stem().map(|s| s.to_string_lossy().to_string())).collect();
        let set = resolve(specs, &unreadable, &mut errors);
        if errors.is_empty() { Ok(set) } else { Err(SpecErrors(errors).into()) }
    }

    pub fn get(&self, name: &str) -> Option<&Transform> {
        self.transforms.iter().find(|t| t.name == name)
    }
}

/// Resolves raw specs into the model, appending every problem to `errors`.
pub fn resolve(specs: Vec<(PathBuf, TransformSpec)>, unreadable: &[String], errors: &mut Vec<Diagnostic>) -> TransformSet {
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut transforms: Vec<Transform> =
        specs.iter().map(|(file, spec)| resolve_one(file, spec, errors, &mut seen)).collect();
    // Cross-file checks: every reference names a table, and a column of it when it is a source.
    let names: Vec<&str> = transforms.iter().map(|t| t.name.as_str()).collect();
    let columns_of = |table: &str| {
        transforms.iter().find(|t| t.name == table).and_then(|t| match &t.body {
            TransformBody::Source(s) => Some(s.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>()),
            TransformBody::Derived { .. } | TransformBody::History(_) => None,
        })
    };
    let mut cross = Vec::new();
    for (file, spec) in &specs {
        if let Some(g) = &spec.grows_with
            && !names.contains(&g.value.as_str())
            && !unreadable.contains(&g.value)
        {
            let hint = valid_names_hint("tables", &g.value, names.iter().copied());
            cross.push(diag(file, g, format!("table '{}' › grows_with", spec.table.value), format!("table '{}' not found", g.value), Some(hint)));
        }
        if let Some(r) = &spec.refresh_by
            && !names.contains(&r.table.value.as_str())
            && !unreadable.contains(&r.table.value)
        {
            let hint = valid_names_hint("tables", &r.table.value, names.iter().copied());
            cross.push(diag(file, &r.table, format!("table '{}' › refresh_by › table", spec.table.value), format!("table '{}' not found", r.table.value), Some(hint)));
        }
        for r in &spec.references {
            let key = format!("table '{}' › references › '{}'", spec.table.value, r.column.value);
            if unreadable.contains(&r.table.value) {
                continue;
            }
            if !names.contains(&r.table.value.as_str()) {
                let hint = valid_names_hint("tables", &r.table.value, names.iter().copied());
                cross.push(diag(file, &r.table, key, format!("table '{}' not found", r.table.value), Some(hint)));
            } else if let Some(cols) = columns_of(&r.table.value)
                && !cols.contains(&r.key.value)
            {
                let hint = valid_names_hint("columns", &r.key.value, cols.iter().map(String::as_str));
                cross.push(diag(
                    file,
                    &r.key,
                    key,
                    format!("column '{}' not found in table '{}'", r.key.value, r.table.value),
                    Some(hint),
                ));
            }
        }
    }
    errors.extend(cross);
    // Each `history:` brings its table, governed by the same access rules as the table itself.
    let histories: Vec<Transform> = specs
        .iter()
        .zip(&transforms)
        .filter_map(|((_, spec), t)| {
            let h = spec.history.as_ref()?;
            let TransformBody::Source(s) = &t.body else { return None };
            Some(Transform {
                name: History::table_of(&t.name),
                file: t.file.clone(),
                body: TransformBody::History(History {
                    of: t.name.clone(),
                    key: s.key.clone(),
                    columns: h.columns.iter().map(|c| c.value.clone()).collect(),
                    changed_at: h.changed_at.value.clone(),
                }),
                access: t.access.clone(),
                layout: Default::default(),
            })
        })
        .collect();
    for h in histories {
        if let Some(other) = transforms.iter().find(|t| t.name == h.name) {
            errors.push(Diagnostic {
                file: other.file.clone(),
                line: 0,
                column: 0,
                key: format!("table '{}'", h.name),
                message: format!("table '{}' is the history of '{}' (its `history:`); name this table otherwise", h.name, h.name.trim_end_matches("_history")),
                hint: None,
            });
        }
        transforms.push(h);
    }
    order_sources(&mut transforms, errors);
    TransformSet { transforms }
}

/// Validates one file on its own.
fn resolve_one(
    file: &Path,
    spec: &TransformSpec,
    errors: &mut Vec<Diagnostic>,
    seen: &mut BTreeMap<String, PathBuf>,
) -> Transform {
    let table = spec.table.value.clone();
    let at = |key: &str| format!("table '{table}' › {key}");
    check_version(file, spec.version, errors);
    if let Some(first) = seen.insert(table.clone(), file.to_path_buf()) {
        errors.push(diag(
            file,
            &spec.table,
            "table".into(),
            format!("table '{table}' is already defined in {}", first.display()),
            Some("each warehouse table has one transform file".into()),
        ));
    }
    let body = match (&spec.source, &spec.sql) {
        (Some(_), Some(_)) | (None, None) => {
            errors.push(diag(
                file,
                &spec.table,
                at("source/sql"),
                "a transform needs exactly one of `source:` (an export) or `sql:` (a derived table)".into(),
                None,
            ));
            TransformBody::Derived { sql: String::new(), grows_with: None, refresh_by: None }
        }
        (None, Some(sql)) => TransformBody::Derived {
            sql: sql.clone(),
            grows_with: spec.grows_with.as_ref().map(|g| g.value.clone()),
            refresh_by: spec.refresh_by.as_ref().map(|r| RefreshBy { table: r.table.value.clone(), key: r.key.value.clone() }),
        },
        (Some(source), None) => TransformBody::Source(resolve_source(file, spec, source, errors)),
    };
    if let (Some(g), Some(_)) = (&spec.grows_with, &spec.source) {
        errors.push(diag(file, g, at("grows_with"), "`grows_with` is for derived tables (`sql:`); a source table declares `load: incremental`".into(), None));
    }
    if let Some(r) = &spec.refresh_by {
        if spec.source.is_some() {
            errors.push(diag(file, &r.table, at("refresh_by"), "`refresh_by` is for derived tables (`sql:`); a source table declares `load: incremental`".into(), None));
        } else if spec.grows_with.is_some() {
            errors.push(diag(
                file,
                &r.table,
                at("refresh_by"),
                "a derived table declares `grows_with` (each row from one row of a table) or `refresh_by` (each key's rows from its rows of a table), not both".into(),
                None,
            ));
        }
    }
    let access = spec.access.as_ref().map(|rules| crate::access::resolve_rules(file, &table, rules, errors));
    let layout = resolve_layout(file, spec, &body, errors);
    Transform { name: table, file: file.to_path_buf(), body, access, layout }
}

/// `layout:`. A source's columns are checked here; a derived table's when its SELECT is planned
/// (see [`crate::warehouse::Layout::missing`]).
fn resolve_layout(file: &Path, spec: &TransformSpec, body: &TransformBody, errors: &mut Vec<Diagnostic>) -> crate::warehouse::Layout {
    let Some(l) = &spec.layout else { return Default::default() };
    let table = &spec.table.value;
    if let TransformBody::Source(s) = body {
        let names: Vec<&str> = s.columns.iter().map(|c| c.name.as_str()).collect();
        let named = l.sort_by.iter().map(|c| ("sort_by", c)).chain(l.bloom_filters.iter().map(|c| ("bloom_filters", c))).chain(l.partition_by.iter().map(|c| ("partition_by", c)));
        for (what, c) in named {
            if !names.contains(&c.value.as_str()) {
                let hint = valid_names_hint("columns", &c.value, names.iter().copied());
                errors.push(diag(file, c, format!("table '{table}' › layout › {what}"), format!("column '{}' not found", c.value), Some(hint)));
            }
        }
        if let Some(c) = &l.partition_by
            && let Some(column) = s.columns.iter().find(|col| col.name == c.value)
            && !matches!(column.ty, ColumnType::Date | ColumnType::Integer)
        {
            let message = format!("column '{}' is {}: a table is partitioned by a date or integer column", c.value, column.ty.describe());
            errors.push(diag(file, c, format!("table '{table}' › layout › partition_by"), message, Some(crate::warehouse::Layout::PARTITION_HINT.into())));
        }
    }
    if let Some(n) = &l.row_group_rows
        && n.value == 0
    {
        errors.push(diag(file, n, format!("table '{table}' › layout › row_group_rows"), "a row group holds at least one row".into(), Some("e.g. 131072; default 1048576".into())));
    }
    crate::warehouse::Layout {
        sort_by: l.sort_by.iter().map(|c| c.value.clone()).collect(),
        row_group_rows: l.row_group_rows.as_ref().map(|n| n.value),
        bloom_filters: l.bloom_filters.iter().map(|c| c.value.clone()).collect(),
        partition_by: l.partition_by.as_ref().map(|c| c.value.clone()),
    }
}

fn resolve_source(file: &Path, spec: &TransformSpec, source: &SourceSpec, errors: &mut Vec<Diagnostic>) -> SourceTransform {
    let table = &spec.table.value;
    let mut columns = Vec::new();
    let mut names = BTreeSet::new();
    if spec.columns.is_empty() {
        errors.push(diag(file, &spec.table, format!("table '{table}' › columns"), "a source needs at least one column".into(), None));
    }
    let where_key = format!("table '{table}' › source");
    match &source.postgres {
        None if source.path.is_empty() => errors.push(diag(
            file,
            &spec.table,
            where_key,
            "a source needs `path:` (an export file or glob under the sources folder) or `postgres:` (a database table or query)".into(),
            None,
        )),
        None => {}
        Some(pg) => {
            if !source.path.is_empty() {
                errors.push(diag(file, &pg.url, where_key.clone(), "give either `path:` or `postgres:`, not both".into(), None));
            }
            if source.format != super::spec::SourceFormat::Csv || source.encoding != super::spec::SourceEncoding::Utf8 || !source.header || source.delimiter != ',' {
                errors.push(diag(file, &pg.url, where_key.clone(), "`format`, `encoding`, `delimiter` and `header` are for export files; a PostgreSQL source has none of them".into(), Some("remove them from `source:`".into())));
            }
            match (&pg.table, &pg.query) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => errors.push(diag(file, &pg.url, format!("{where_key} › postgres"), "give exactly one of `table:` (a table or view) and `query:` (a SELECT)".into(), None)),
            }
            if let Err(e) = super::postgres::check_url(&pg.url.value) {
                errors.push(diag(file, &pg.url, format!("{where_key} › postgres › url"), e, None));
            }
        }
    }
    for c in &spec.columns {
        let name = c.name.value.clone();
        let key = format!("table '{table}' › column '{name}'");
        if !names.insert(name.clone()) {
            errors.push(diag(file, &c.name, key.clone(), "column is declared twice".into(), None));
        }
        if (c.min.is_some() || c.max.is_some()) && !c.ty.is_numeric() {
            errors.push(diag(file, &c.name, key.clone(), "min/max apply only to integer, decimal and float columns".into(), None));
        }
        if (!c.allowed.is_empty() || c.pattern.is_some() || c.case.is_some()) && c.ty != ColumnType::String {
            errors.push(diag(file, &c.name, key.clone(), "enum, pattern and case apply only to string columns".into(), None));
        }
        if !c.formats.is_empty() && !matches!(c.ty, ColumnType::Date | ColumnType::Timestamp) {
            errors.push(diag(file, &c.name, key.clone(), "formats apply only to date and timestamp columns".into(), None));
        }
        if let Some(p) = &c.pattern
            && let Err(e) = regex::Regex::new(p)
        {
            errors.push(diag(file, &c.name, key.clone(), format!("pattern is not a valid regular expression: {e}"), None));
        }
        let scale = c.scale.unwrap_or(2);
        if scale > 10 {
            errors.push(diag(file, &c.name, key.clone(), format!("scale {scale} is too large; at most 10"), None));
        }
        let formats = if !c.formats.is_empty() {
            c.formats.clone()
        } else {
            match c.ty {
                ColumnType::Date => vec!["%Y-%m-%d".into()],
                ColumnType::Timestamp => vec!["%Y-%m-%d %H:%M:%S".into(), "%Y-%m-%dT%H:%M:%S".into()],
                _ => vec![],
            }
        };
        columns.push(Column {
            from: c.from.clone().unwrap_or_else(|| name.clone()),
            name,
            ty: c.ty,
            nullable: c.nullable,
            formats,
            scale: scale.min(10) as i8,
            case: c.case,
            min: c.min,
            max: c.max,
            allowed: c.allowed.clone(),
            pattern: c.pattern.clone(),
        });
    }
    let column_names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let check_column = |errors: &mut Vec<Diagnostic>, at: &Spanned<String>, what: &str| {
        if !column_names.contains(&at.value.as_str()) {
            errors.push(diag(
                file,
                at,
                format!("table '{table}' › {what} '{}'", at.value),
                "column not found".into(),
                Some(valid_names_hint("columns", &at.value, column_names.iter().copied())),
            ));
        }
    };
    for k in &spec.key {
        check_column(errors, k, "key");
    }
    if let Some(d) = &spec.duplicates {
        check_column(errors, &d.latest_by, "duplicates › latest_by");
    }
    for r in &spec.references {
        check_column(errors, &r.column, "references › column");
    }
    let reject_threshold = spec.reject_threshold.unwrap_or(DEFAULT_REJECT_THRESHOLD);
    if !(0.0..=1.0).contains(&reject_threshold) {
        errors.push(diag(
            file,
            &spec.table,
            format!("table '{table}' › reject_threshold"),
            format!("{reject_threshold} is not a fraction between 0 and 1 (0.05 means 5 %)"),
            None,
        ));
    }
    if spec.duplicates.is_some() && spec.key.is_empty() {
        errors.push(diag(file, &spec.table, format!("table '{table}' › duplicates"), "duplicates need a `key:`".into(), None));
    }
    let type_of = |name: &str| columns.iter().find(|c| c.name == name).map(|c| c.ty);
    if let Some(w) = &spec.watermark {
        check_column(errors, w, "watermark");
        if spec.load != LoadMode::Incremental {
            errors.push(diag(file, w, format!("table '{table}' › watermark"), "a watermark applies to `load: incremental` tables".into(), Some("add `load: incremental`, or remove `watermark:`".into())));
        } else if let Some(ty) = type_of(&w.value)
            && !matches!(ty, ColumnType::Date | ColumnType::Timestamp | ColumnType::Integer)
        {
            errors.push(diag(file, w, format!("table '{table}' › watermark"), format!("column '{}' is {}; a watermark is a date, timestamp or integer column", w.value, ty.describe()), None));
        }
    }
    if let Some(h) = &spec.history {
        if spec.key.is_empty() {
            errors.push(diag(file, &spec.table, format!("table '{table}' › history"), "a history needs a `key:` (the versions of one key make its history)".into(), None));
        }
        for c in &h.columns {
            check_column(errors, c, "history › columns");
            if spec.key.iter().any(|k| k.value == c.value) {
                errors.push(diag(file, c, format!("table '{table}' › history › columns"), format!("'{}' is the key; a key column identifies a row and never changes", c.value), None));
            }
        }
        if h.columns.is_empty() {
            errors.push(diag(file, &spec.table, format!("table '{table}' › history › columns"), "name at least one column whose changes to keep".into(), None));
        }
        check_column(errors, &h.changed_at, "history › changed_at");
        if let Some(ty) = type_of(&h.changed_at.value)
            && !matches!(ty, ColumnType::Date | ColumnType::Timestamp)
        {
            errors.push(diag(file, &h.changed_at, format!("table '{table}' › history › changed_at"), format!("column '{}' is {}; changed_at is a date or timestamp column", h.changed_at.value, ty.describe()), None));
        }
        for c in columns.iter().map(|c| c.name.as_str()) {
            if History::VERSION_COLUMNS.contains(&c) {
                errors.push(diag(file, &spec.table, format!("table '{table}' › column '{c}'"), format!("'{c}' is a column the history adds; rename it"), None));
            }
        }
    }
    SourceTransform {
        source: source.clone(),
        columns,
        key: spec.key.iter().map(|k| k.value.clone()).collect(),
        latest_by: spec.duplicates.as_ref().map(|d| d.latest_by.value.clone()),
        references: spec
            .references
            .iter()
            .map(|r| Reference { column: r.column.value.clone(), table: r.table.value.clone(), key: r.key.value.clone() })
            .collect(),
        reject_threshold,
        mode: spec.load,
        watermark: spec.watermark.as_ref().map(|w| w.value.clone()),
    }
}

/// Orders source tables so that a referenced table loads before the tables referring to it;
/// derived tables keep their file order after the sources (the loader orders them by SQL).
fn order_sources(transforms: &mut Vec<Transform>, errors: &mut Vec<Diagnostic>) {
    let mut remaining: Vec<Transform> = std::mem::take(transforms);
    let (mut sources, derived): (Vec<_>, Vec<_>) =
        remaining.drain(..).partition(|t| matches!(t.body, TransformBody::Source(_) | TransformBody::History(_)));
    let source_names: BTreeSet<String> = sources.iter().map(|t| t.name.clone()).collect();
    let mut done: BTreeSet<String> = BTreeSet::new();
    while !sources.is_empty() {
        let ready = sources.iter().position(|t| match &t.body {
            TransformBody::Source(s) => s
                .references
                .iter()
                .all(|r| r.table == t.name || done.contains(&r.table) || !source_names.contains(&r.table)),
            // A history follows its table.
            TransformBody::History(h) => done.contains(&h.of),
            TransformBody::Derived { .. } => true,
        });
        match ready {
            Some(i) => {
                let t = sources.remove(i);
                done.insert(t.name.clone());
                transforms.push(t);
            }
            None => {
                let cycle: Vec<String> = sources.iter().map(|t| t.name.clone()).collect();
                errors.push(Diagnostic {
                    file: sources[0].file.clone(),
                    line: 0,
                    column: 0,
                    key: "references".into(),
                    message: format!("source tables reference each other in a cycle: {}", cycle.join(" → ")),
                    hint: Some("a reference must point to a table that can load first".into()),
                });
                transforms.append(&mut sources);
            }
        }
    }
    transforms.extend(derived);
}
