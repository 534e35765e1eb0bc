//! `crmcube load`: extract → clean → derive → commit, as one warehouse snapshot.
//!
//! Sources load in reference order (a referenced table first), derived tables in the order their
//! SQL needs. Each table becomes a new Delta version as soon as it is made ([`Run::put`]); last,
//! the snapshot manifest naming those versions is committed. Until then no reader sees them: a
//! load that exceeds a reject threshold, fails or is killed leaves the previous snapshot what
//! readers see, and the versions it wrote unnamed, as a load killed before its commit always did.
//!
//! Memory: the later tables read a table from memory as it was made, or, under `--memory-limit`
//! once the tables kept reach a quarter of the limit, from the files just written. A source is
//! typed a slice of records at a time, and the next source's export is read while this one is
//! cleaned only when the pool has room for both. What is held at once is then the largest
//! table's work, not every table of the night.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use datafusion::prelude::SessionContext;
use serde::Serialize;

use std::path::PathBuf;

use datafusion::arrow::array::Array;

use super::clean::{clean, count_rows};
use super::extract::{self, Extracted, Reject};
use super::spec::LoadMode;
use super::validate::{History, RefreshBy, SourceTransform, Transform, TransformBody, TransformSet};
use crate::error::{DataError, Diagnostic, Error, Result, SpecErrors};
use crate::project::Project;
use crate::warehouse::{Snapshot, SourceFile, TableEntry, Warehouse, content_checksum};

/// Derived tables up to this many rows are compared with their previous version when recomputed
/// (cheap for dimensions; the large facts are not worth hashing).
const SAME_CONTENT_CHECK_ROWS: u64 = 100_000;

/// The column of the keys a table refreshed by key recomputed (see `Run::refresh_keys`).
const TOUCHED: &str = "__touched_key";

/// Name of the quarantine table in the warehouse.
pub const QUARANTINE_TABLE: &str = "quarantine";

/// What happened to one table in a load.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct TableReport {
    pub table: String,
    /// `source`, `history`, `derived`, `model` or `rollup`.
    pub kind: &'static str,
    /// `full` (rebuilt from all its input), `incremental` (new rows merged into the previous
    /// snapshot's) or `unchanged` (nothing it reads changed: the previous version is kept).
    pub mode: &'static str,
    /// Records read from the export(s); for other kinds, rows produced.
    pub read: u64,
    /// Rows written from what was read (for an incremental load: inserted plus updated).
    pub loaded: u64,
    /// Of `loaded`, rows that replaced a row with the same key (incremental loads).
    pub updated: u64,
    pub quarantined: u64,
    /// Rows superseded by a later row with the same key.
    pub duplicates: u64,
    /// Rows at or before the stored watermark (incremental loads), left out.
    pub skipped: u64,
    /// Rows in the table after the load.
    pub rows: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark_after: Option<String>,
    /// A rollup refreshed by partition (mode `incremental`): the units rebuilt, e.g. the months
    /// tonight's rows touched; its other rows were kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<String>,
    /// Time spent on this table (extraction is shared and counted in the load's total).
    pub millis: u64,
}

/// The outcome of a load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// The snapshot readers see after the load: a new one, or the previous one when nothing
    /// changed (`unchanged`).
    pub snapshot: u64,
    /// Nothing the load reads changed since the previous snapshot: no snapshot was written.
    pub unchanged: bool,
    pub tables: Vec<TableReport>,
    /// Export files compared with the ones the previous snapshot was loaded from.
    pub files: FilesReport,
    pub seconds: f64,
}

/// Export files of this load against the previous snapshot's (paths under the sources folder).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FilesReport {
    /// Files the export paths match tonight.
    pub read: usize,
    /// Not in the previous snapshot.
    pub new: Vec<String>,
    /// Same path, different content: an export rewritten after it was loaded.
    pub changed: Vec<String>,
    /// In the previous snapshot, not matched tonight.
    pub gone: Vec<String>,
    /// The snapshot compared with.
    pub since: Option<u64>,
}

impl FilesReport {
    fn compare(now: &BTreeMap<String, SourceFile>, previous: Option<&Snapshot>) -> Self {
        let empty = BTreeMap::new();
        let before = previous.map(|s| &s.files).unwrap_or(&empty);
        let mut r = FilesReport { read: now.len(), since: previous.map(|s| s.id), ..Default::default() };
        for (path, f) in now {
            match before.get(path) {
                None => r.new.push(path.clone()),
                // A database source's rows change every night: that is not a rewritten export.
                Some(b) if b.sha256 != f.sha256 && !super::postgres::is_ledger_key(path) => r.changed.push(path.clone()),
                Some(_) => {}
            }
        }
        r.gone = before.keys().filter(|p| !now.contains_key(*p)).cloned().collect();
        r
    }
}

impl LoadReport {
    pub fn table(&self, name: &str) -> Option<&TableReport> {
        self.tables.iter().find(|t| t.table == name)
    }
}

/// The columns of the quarantine table.
///
/// `rule` names the check a row failed, one word an analyst can group by (`crmcube quality`):
/// reading the export — `fields` (wrong number of fields), `quote` (a quote left open),
/// `truncated` (last record without a line break), `unreadable`, `json`; cleaning — `required`,
/// `type`, `min`, `max`, `allowed`, `pattern` (the first failing column's rule), `duplicate`,
/// `reference`. Rows quarantined before the column existed read `unclassified`.
pub fn quarantine_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("source_file", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("column_name", DataType::Utf8, true),
        Field::new("rule", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
    ]))
}

/// Choices a scheduler can make per run.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Source tables that may load empty although the current snapshot holds rows.
    pub allow_empty: Vec<String>,
}

/// Loads the project's sources into its warehouse and commits one snapshot.
pub async fn load(project: &Project, warehouse: &Warehouse) -> Result<LoadReport> {
    load_with(project, warehouse, &LoadOptions::default()).await
}

/// [`load`] with options.
///
/// A `full` table is rebuilt from all its export files, unless those files, its transform and
/// the tables it references are exactly as the previous snapshot loaded them: then it is kept.
/// An `incremental` table reads only files the previous snapshot did not load (or that changed)
/// and merges their rows into the previous rows. A history, derived, model or rollup table is
/// rebuilt only when something it reads changed. When nothing changed at all, no snapshot is
/// written: running the same night's load twice is a no-op.
///
/// A full table whose export arrives empty (a failed extract upstream, a truncated transfer)
/// would be wiped; such a load stops before committing unless the table is in `allow_empty`.
pub async fn load_with(project: &Project, warehouse: &Warehouse, options: &LoadOptions) -> Result<LoadReport> {
    let started = Instant::now();
    let set = TransformSet::load(project)?;
    // Cube files are metadata too: a broken one stops the load before any work.
    let cubes = crate::cube::CubeSet::load(project, &set)?;
    for name in &options.allow_empty {
        if !matches!(set.get(name).map(|t| &t.body), Some(TransformBody::Source(_))) {
            let sources = set.transforms.iter().filter(|t| matches!(t.body, TransformBody::Source(_))).map(|t| t.name.as_str());
            return Err(crate::error::QueryError::new(format!("--allow-empty {name}: not a source table"))
                .with_hint(Some(crate::error::valid_names_hint("source tables", name, sources)))
                .into());
        }
    }
    let _lock = warehouse.lock()?;
    let previous = warehouse.current()?;
    let ctx = warehouse.context()?;
    let mut run = Run::new(project, warehouse, &ctx, previous.as_ref());

    // Survey every source's files (path and checksum) before reading any: what changed decides
    // what is read.
    let sources: Vec<(&Transform, &SourceTransform)> = set
        .transforms
        .iter()
        .filter_map(|t| match &t.body {
            TransformBody::Source(s) => Some((t, s)),
            _ => None,
        })
        .collect();
    // PostgreSQL sources first become staged CSV files (an incremental one only its rows past
    // the stored watermark); from here on every source is files.
    let mut listed: Vec<Vec<PathBuf>> = Vec::new();
    // Incremental database sources with no row past their watermark tonight: nothing new.
    let mut nothing_new: BTreeSet<String> = BTreeSet::new();
    for (t, s) in &sources {
        listed.push(match &s.source.postgres {
            Some(pg) => {
                let watermark = match s.mode {
                    LoadMode::Incremental => previous.as_ref().and_then(|p| p.tables.get(&t.name)).and_then(|e| e.watermark.as_deref()),
                    LoadMode::Full => None,
                };
                let staged = super::postgres::stage(t, s, pg, watermark, &warehouse.root().join("staging")).await?;
                if staged.empty && s.mode == LoadMode::Incremental {
                    nothing_new.insert(t.name.clone());
                }
                vec![staged.path]
            }
            None => extract::list_files(&t.name, s, &project.sources)?,
        });
    }
    // Size and modification time of every export before it is read: compared after reading, a
    // difference means the file changed under the load (the file's own clock, so a writer with
    // another clock does not matter).
    let stats_before: Vec<Vec<FileStat>> =
        listed.iter().map(|files| files.iter().map(|f| FileStat::of(f)).collect::<Result<_>>()).collect::<Result<_>>()?;
    let no_files = BTreeMap::new();
    let known = previous.as_ref().map_or(&no_files, |p| &p.files);
    let mut surveyed: Vec<Vec<SourceFile>> = listed.iter().map(|f| extract::survey(f, &project.sources, known)).collect::<Result<_>>()?;
    // A staged database source is recorded by table, wherever the warehouse lives; an
    // incremental one with nothing new stands for what the previous snapshot loaded (so it is
    // kept, and a night without changes writes no snapshot).
    for ((t, s), files) in sources.iter().zip(surveyed.iter_mut()) {
        if s.source.postgres.is_some() {
            let key = super::postgres::ledger_key(&t.name);
            let before = previous.as_ref().and_then(|p| p.files.get(&key));
            for f in files.iter_mut() {
                f.path = key.clone();
                if let Some(before) = before.filter(|_| nothing_new.contains(&t.name)) {
                    f.sha256 = before.sha256.clone();
                }
            }
        }
    }
    let listed_files = listed.clone();
    let mut files_now: BTreeMap<String, SourceFile> = surveyed.iter().flatten().map(|f| (f.path.clone(), f.clone())).collect();
    for table in &nothing_new {
        let key = super::postgres::ledger_key(table);
        if let Some(before) = previous.as_ref().and_then(|p| p.files.get(&key)) {
            files_now.insert(key, before.clone());
        }
    }
    crate::fault::pause("surveyed");
    let mut files_report = FilesReport::compare(&files_now, previous.as_ref());
    for path in &files_report.changed {
        tracing::warn!(file = %path, since = ?files_report.since, "export file changed since the previous snapshot loaded it");
    }

    // What each source reads tonight.
    let mut plans = Vec::new();
    for (((t, spec), files), hashes) in sources.iter().zip(listed).zip(&surveyed) {
        let plan = run.plan_source(t, spec, files, hashes)?;
        // Sources come in dependency order: a table rebuilt in full tonight may have lost keys,
        // so every later full source that references it is re-read and checked against it. (An
        // incremental table only gains or updates keys: what referenced it stays valid.)
        if matches!(plan, SourcePlan::Full(_)) {
            run.changed.insert(t.name.clone());
        }
        plans.push(plan);
    }
    // An incremental table's files may be removed once loaded; only a full table's are missed.
    files_report.gone.retain(|path| run.full_patterns.iter().any(|p| p.matches(path)));
    // Each source is extracted one ahead of its cleaning: the next source's files are read and
    // split (CPU work outside DataFusion, on a blocking thread) while this one is cleaned, so the
    // text of two sources at most is held at once. Under a memory limit, only when the pool
    // keeps room to clean this one beside the next one's text; else the next is read after.
    let pool = ctx.runtime_env().memory_pool.clone();
    let extraction = |i: usize, ahead_of: Option<usize>| -> Result<_> {
        let (t, s) = sources.get(i).ok_or_else(|| Error::Internal(format!("no source {i} to extract")))?;
        let leave = ahead_of.zip(warehouse.memory_limit());
        spawn_extraction(&pool, &t.name, s, &plans[i], &project.root, leave)
    };
    let mut ahead = None;
    let mut source_index = 0;
    for t in &set.transforms {
        match &t.body {
            TransformBody::Source(spec) => {
                let i = source_index;
                source_index += 1;
                let handle = match ahead.take() {
                    Some(handle) => handle,
                    None => extraction(i, None)?.ok_or_else(|| Error::Internal(format!("no extraction started for table '{}'", t.name)))?,
                };
                let ex = handle.await.map_err(|e| Error::Internal(format!("extracting table '{}' panicked: {e}", t.name)))??;
                if i + 1 < sources.len() {
                    // Cleaning this source takes about its text's size again.
                    let text = ex.as_ref().and_then(|e| e.memory.as_ref()).map_or(0, |m| m.size());
                    ahead = extraction(i + 1, Some(text))?;
                    if ahead.is_none() {
                        tracing::debug!(table = %t.name, "the next source is read after this one: no room to read it while this one is cleaned");
                    }
                }
                if ex.is_some() {
                    crate::fault::point(&format!("extracted {}", t.name));
                }
                unchanged_while_read(project, &listed_files[i], &surveyed[i], &stats_before[i])?;
                in_table(&t.name, run.source(t, spec, plans[i].clone(), ex, options).await)?;
            }
            TransformBody::History(h) => in_table(&t.name, run.history(t, h).await)?,
            TransformBody::Derived { .. } => {}
        }
    }

    // Derived tables, each once all the tables its SQL reads are registered.
    let mut pending: Vec<&Transform> = set.transforms.iter().filter(|t| matches!(t.body, TransformBody::Derived { .. })).collect();
    let pending_names: BTreeSet<String> = pending.iter().map(|t| t.name.clone()).collect();
    while !pending.is_empty() {
        let mut progressed = false;
        let mut i = 0;
        while i < pending.len() {
            let t = pending[i];
            let TransformBody::Derived { sql, grows_with, refresh_by } = &t.body else { unreachable!("only derived tables are pending") };
            let inputs = referenced_tables(&ctx, sql)?;
            if inputs.iter().any(|n| pending_names.contains(n) && !run.done.contains(n)) {
                i += 1;
                continue;
            }
            in_table(&t.name, run.derived(&set, t, sql, grows_with.as_deref(), refresh_by.as_ref(), &inputs).await)?;
            pending.remove(i);
            progressed = true;
        }
        if !progressed {
            let names: Vec<_> = pending.iter().map(|t| t.name.as_str()).collect();
            return Err(DataError::Input {
                file: project.display_path(&project.transforms),
                line: None,
                message: format!("derived tables depend on each other in a cycle: {}", names.join(", ")),
            }
            .into());
        }
    }

    // Lifetime value models, fitted over the whole customer base (see etl::models).
    if set.get("fact_sales").is_some() {
        in_table("customer_clv", run.models().await)?;
    }

    // Every column the cube files name exists in tonight's tables (before rollups read them).
    let mut schemas: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let named: BTreeSet<String> = cubes.cubes.iter().flat_map(|c| c.columns.iter().map(|u| u.table.clone())).collect();
    for name in named {
        if let Ok(df) = ctx.table(name.as_str()).await {
            schemas.insert(name, df.schema().fields().iter().map(|f| f.name().clone()).collect());
        }
    }
    let problems = cubes.check_columns(|t| schemas.get(t).cloned());
    if !problems.is_empty() {
        return Err(crate::error::SpecErrors(problems).into());
    }

    // Rollups, from the tables just derived (see crate::rollup).
    for cube in &cubes.cubes {
        for rollup in &cube.rollups {
            in_table(&rollup.table, run.rollup(cube, rollup).await)?;
        }
        run.forget_growth(&cube.name)?;
    }

    if run.changed.is_empty()
        && let Some(prev) = previous.as_ref()
        && same_files(&run.ledger(&files_now), &prev.files)
    {
        tracing::info!(snapshot = prev.id, "nothing changed since the previous snapshot; none written");
        return Ok(LoadReport { snapshot: prev.id, unchanged: true, tables: run.reports, files: files_report, seconds: started.elapsed().as_secs_f64() });
    }
    run.quarantine().await?;

    // Commit: every table is written; the snapshot that names them makes them what readers see.
    let files = run.ledger(&files_now);
    let entries = std::mem::take(&mut run.entries);
    let snapshot: Snapshot = warehouse.commit(entries, files, crate::rollup::fingerprints(&cubes))?;
    tracing::info!(snapshot = snapshot.id, "snapshot committed");
    Ok(LoadReport { snapshot: snapshot.id, unchanged: false, tables: run.reports, files: files_report, seconds: started.elapsed().as_secs_f64() })
}

/// What a load does with one source table.
#[derive(Debug, Clone)]
enum SourcePlan {
    /// Keep the previous snapshot's version.
    Keep,
    /// Rebuild from these files (all the export path matches).
    Full(Vec<PathBuf>),
    /// Merge the rows of these files (new or changed since loaded) into the previous rows.
    Incremental(Vec<PathBuf>),
}

/// A table a load writes.
struct Output {
    name: String,
    schema: SchemaRef,
    rows: Vec<RecordBatch>,
    /// Rows in the table after the write (more than `rows` when appending).
    total_rows: u64,
    /// Add `rows` to the previous version instead of replacing it.
    append: bool,
    partition: Vec<String>,
    spec: Option<String>,
    watermark: Option<String>,
    /// Rollups: each refresh unit's print (see [`TableEntry::partitions`]).
    partitions: BTreeMap<String, String>,
    /// The table's Parquet layout (its transform's; the default for models, rollups and the
    /// quarantine), and whether the rows are in its order already (a derived table is sorted as
    /// it is derived).
    layout: crate::warehouse::Layout,
    sorted: bool,
}

impl Output {
    /// A table replacing its previous version with `rows`, written in the order given.
    fn new(name: impl Into<String>, schema: SchemaRef, rows: Vec<RecordBatch>) -> Self {
        let total_rows = count_rows(&rows);
        Output { name: name.into(), schema, rows, total_rows, append: false, partition: vec![], spec: None, watermark: None, partitions: BTreeMap::new(), layout: Default::default(), sorted: false }
    }
}

/// The state of one load: which tables changed, what is kept, what will be written.
struct Run<'a> {
    project: &'a Project,
    warehouse: &'a Warehouse,
    ctx: &'a SessionContext,
    previous: Option<&'a Snapshot>,
    /// Tables whose content may differ from the previous snapshot's.
    changed: BTreeSet<String>,
    /// Tables registered in `ctx` with their content after this load.
    done: BTreeSet<String>,
    /// Kept tables: the previous snapshot's entries.
    entries: BTreeMap<String, TableEntry>,
    /// The memory of the tables written tonight that later tables read from memory, in the
    /// session's pool (see [`Run::try_keep`]).
    held: MemoryReservation,
    reports: Vec<TableReport>,
    /// This load's quarantine rows, and the tables whose earlier quarantine rows they replace.
    quarantine: Vec<RecordBatch>,
    requarantined: BTreeSet<String>,
    /// Full tables: their files are the ones matched tonight; other files of theirs leave the ledger.
    full_patterns: Vec<glob::Pattern>,
    /// Fact prints shared by the rollups refreshed by partition (see crate::rollup::partitions).
    prints: crate::rollup::partitions::PrintCache,
    /// Dimension tables checked for kept members, by table and columns: the answer.
    members_kept: BTreeMap<(String, Vec<String>), bool>,
    /// A cube's new fact rows on an append-only night, for its rollups, by cube.
    growth: BTreeMap<String, crate::rollup::partitions::Appended>,
    /// Tables that only gained rows tonight (new keys appended), with those rows: what a
    /// derived table that `grows_with` one of them appends from.
    appended: BTreeMap<String, (SchemaRef, Vec<RecordBatch>)>,
    /// Tables refreshed by key tonight (see [`Run::refresh_keys`]): what a table `refresh_by`
    /// the same key of one of them recomputes.
    refreshed: BTreeMap<String, Refreshed>,
}

/// A table refreshed by key tonight.
#[derive(Clone)]
struct Refreshed {
    /// The key column.
    key: String,
    /// The keys whose rows were recomputed (column `__touched_key`); every other key's rows are
    /// as they were.
    keys: datafusion::prelude::DataFrame,
    /// The table's rows of those keys, as the refresh computed them (in its SELECT's types):
    /// kept when another table is `refresh_by` this one and memory allows (see
    /// [`Run::remember_refresh`]).
    rows: Option<(SchemaRef, Vec<RecordBatch>)>,
}

impl<'a> Run<'a> {
    fn new(project: &'a Project, warehouse: &'a Warehouse, ctx: &'a SessionContext, previous: Option<&'a Snapshot>) -> Self {
        Self {
            project,
            warehouse,
            ctx,
            previous,
            changed: BTreeSet::new(),
            done: BTreeSet::new(),
            entries: BTreeMap::new(),
            held: MemoryConsumer::new("load: tables kept in memory for the tables read after them").register(&ctx.runtime_env().memory_pool),
            reports: Vec::new(),
            quarantine: Vec::new(),
            requarantined: BTreeSet::new(),
            full_patterns: Vec::new(),
            prints: Default::default(),
            members_kept: BTreeMap::new(),
            growth: BTreeMap::new(),
            appended: BTreeMap::new(),
            refreshed: BTreeMap::new(),
        }
    }

    /// Writes a table now and records its entry for the commit. The write is a Delta version no
    /// snapshot names until the commit: a load that fails or is killed later leaves it unread
    /// (and an append checks that it extends the rows of the version the previous snapshot names).
    ///
    /// A table the later tables read (registered in memory as it was made) stays there while
    /// [`Run::try_keep`] allows; past that, they read it from the files just written. A load's
    /// memory is then bounded by the largest table it makes, not by the sum of all of them.
    async fn put(&mut self, out: Output) -> Result<()> {
        let Output { name, schema, rows, total_rows, append, partition, spec, watermark, partitions, layout, sorted } = out;
        let n = count_rows(&rows);
        let bytes = crate::warehouse::memory_size(&rows);
        let rows = if sorted { rows } else { in_table(&name, layout.sort(self.ctx, rows).await)? };
        let (version, partitions) = if append {
            (self.warehouse.append_table(&name, schema, rows, &layout).await?, partitions)
        } else if let Some(column) = &layout.partition_by {
            self.put_partitions(&name, schema, rows, column, spec.as_deref(), &layout).await?
        } else {
            (self.warehouse.write_partitioned(&name, schema, rows, &partition, &layout).await?, partitions)
        };
        crate::fault::point(&format!("wrote {name}"));
        tracing::info!(table = %name, version, rows = n, "written");
        self.entries.insert(name.clone(), TableEntry { version, rows: total_rows, spec, watermark, partitions });
        // An appended table is read as its previous version and the new rows (see `merge` and
        // `grow`): its memory is settled there.
        if self.done.contains(&name) && !append && !self.try_keep(bytes) {
            tracing::debug!(table = %name, bytes, "read from its files from here on (the tables kept in memory reach a quarter of the memory limit)");
            self.read_from_files(&name, version).await?;
        }
        Ok(())
    }

    /// Writes a table partitioned by `column` (its layout's `partition_by`): only the partitions
    /// whose rows differ from the previous snapshot's, when its version is still the table's
    /// newest and was made by the same transform; else every partition. Returns the version and
    /// each partition's print (its row count and the sum of its row hashes, as a partitioned
    /// rollup's units are printed, see [`crate::rollup::partitions`]), stored in the snapshot for
    /// the next load to compare with. A night that changes one month of a per-month table then
    /// writes that month, not the table; a table recomputed to the same rows writes nothing.
    async fn put_partitions(&self, name: &str, schema: SchemaRef, rows: Vec<RecordBatch>, column: &str, spec: Option<&str>, layout: &crate::warehouse::Layout) -> Result<(u64, BTreeMap<String, String>)> {
        let started = Instant::now();
        let all = self.ctx.read_batches(crate::warehouse::with_empty(&schema, rows.clone()))?;
        let prints = in_table(name, crate::rollup::partitions::prints_by(all.clone(), column).await)?;
        let mut now: BTreeMap<String, String> = prints.iter().map(|p| (partition_of(p), p.print().text())).collect();
        now.insert(COLUMNS_PRINT.into(), crate::warehouse::columns_print(&schema));
        let previous = self.previous_entry(name).filter(|e| e.spec.as_deref() == spec && spec.is_some() && e.partitions.get(COLUMNS_PRINT) == now.get(COLUMNS_PRINT));
        if let Some(entry) = previous
            && self.warehouse.holds_version(name, entry.version).await?
        {
            let changed: BTreeSet<&String> = now.keys().chain(entry.partitions.keys()).filter(|k| now.get(*k) != entry.partitions.get(*k)).collect();
            let ms = started.elapsed().as_millis() as u64;
            if changed.is_empty() {
                tracing::debug!(table = name, partitions = now.len() - 1, ms, "partitions printed: none changed, nothing written");
                return Ok((entry.version, now));
            }
            // A value whose text does not read back is written whole below.
            if let Some(which) = partitions_filter(&schema, column, &changed)? {
                let fresh = in_table(name, all.filter(which.clone())?.collect().await.map_err(Error::from))?;
                tracing::debug!(table = name, partitions = now.len() - 1, changed = changed.len(), rows = count_rows(&fresh), ms, "partitions printed: writing the changed ones");
                match self.warehouse.replace_partitions(name, schema.clone(), fresh, column, which, layout).await {
                    Ok(version) => return Ok((version, now)),
                    Err(e) => tracing::debug!(table = name, "partitions written whole: {e}"),
                }
            }
        }
        let version = self.warehouse.write_partitioned(name, schema, rows, &[column.to_string()], layout).await?;
        Ok((version, now))
    }

    /// The by-key refresh of a table partitioned by `column` (see [`Run::refresh_keys`]), written
    /// by partition without reading the rows of the other keys: each partition's print moves by
    /// the prints of the keys' previous rows in it (taken out) and of their `fresh` rows (added
    /// in); only the partitions whose print moved are read — their kept rows, from those
    /// partitions' files — and replaced. Returns the version, the rows and the prints; None when
    /// the previous version's prints cannot serve (another transform, other columns, a newer
    /// version that changed rows, a partition value whose text does not read back, prints that
    /// do not add up, a failed replace), and the caller reads every row as for any refresh. The
    /// NULL partition is replaced like any other (`partitions_filter` names it).
    #[allow(clippy::too_many_arguments)]
    async fn refresh_partitions(
        &self,
        name: &str,
        fingerprint: &str,
        schema: &SchemaRef,
        fresh: &[RecordBatch],
        touched: &datafusion::prelude::DataFrame,
        key: &str,
        column: &str,
        layout: &crate::warehouse::Layout,
    ) -> Result<Option<(u64, u64, BTreeMap<String, String>)>> {
        use crate::rollup::partitions::{Print, prints_by};
        use datafusion::logical_expr::JoinType;
        let Some(entry) = self.previous_entry(name) else { return Ok(None) };
        let columns = crate::warehouse::columns_print(schema);
        if entry.spec.as_deref() != Some(fingerprint)
            || entry.partitions.get(COLUMNS_PRINT) != Some(&columns)
            || !self.warehouse.holds_version(name, entry.version).await?
        {
            return Ok(None);
        }
        let mut stored: BTreeMap<String, Print> = BTreeMap::new();
        for (partition, print) in entry.partitions.iter().filter(|(k, _)| *k != COLUMNS_PRINT) {
            let Some(print) = Print::parse(print) else { return Ok(None) };
            stored.insert(partition.clone(), print);
        }
        let started = Instant::now();
        let previous = format!("__previous_{name}");
        self.register_previous(name, &previous).await?;
        let result = async {
            let before = crate::warehouse::in_columns(self.ctx.table(previous.as_str()).await?, schema)?;
            let old = before.clone().join(touched.clone(), JoinType::LeftSemi, &[key], &[TOUCHED], None)?;
            let fresh = self.ctx.read_batches(crate::warehouse::with_empty(schema, fresh.to_vec()))?;
            let mut now = stored.clone();
            for p in prints_by(old, column).await? {
                let at = partition_of(&p);
                let Some(less) = now.get(&at).and_then(|s| s.less(p.print())) else { return Ok(None) };
                now.insert(at, less);
            }
            for p in prints_by(fresh.clone(), column).await? {
                let at = partition_of(&p);
                let more = now.get(&at).copied().unwrap_or_default() + p.print();
                now.insert(at, more);
            }
            // A partition left without rows is gone (its files are replaced by none).
            if now.values().any(|p| p.rows() == 0 && *p != Print::default()) {
                return Ok(None);
            }
            now.retain(|_, p| p.rows() > 0);
            let changed: BTreeSet<&String> = now.keys().chain(stored.keys()).filter(|k| now.get(*k) != stored.get(*k)).collect();
            let rows: u64 = now.values().map(|p| p.rows()).sum();
            let mut texts: BTreeMap<String, String> = now.iter().map(|(k, p)| (k.clone(), p.text())).collect();
            texts.insert(COLUMNS_PRINT.into(), columns);
            let ms = started.elapsed().as_millis() as u64;
            if changed.is_empty() {
                tracing::debug!(table = name, partitions = now.len(), ms, "partitions printed by the keys' rows: none changed, nothing written");
                return Ok(Some((entry.version, rows, texts)));
            }
            let Some(which) = partitions_filter(schema, column, &changed)? else { return Ok(None) };
            let kept = before.filter(which.clone())?.join(touched.clone(), JoinType::LeftAnti, &[key], &[TOUCHED], None)?;
            let replaced = kept.union(fresh.filter(which.clone())?)?;
            let replaced = if layout.sort_by.is_empty() { replaced } else { replaced.sort(layout.sort_exprs())? };
            let replaced = in_schema(schema, replaced.collect().await?)?;
            tracing::debug!(table = name, partitions = now.len(), changed = changed.len(), rows = count_rows(&replaced), ms, "partitions printed by the keys' rows: writing the changed ones");
            match self.warehouse.replace_partitions(name, schema.clone(), replaced, column, which, layout).await {
                Ok(version) => Ok::<_, Error>(Some((version, rows, texts))),
                Err(e) => {
                    tracing::debug!(table = name, "partitions not replaced by the keys' rows: {e}");
                    Ok(None)
                }
            }
        }
        .await;
        self.ctx.deregister_table(previous.as_str())?;
        result
    }

    /// Records tonight's refresh of `name` by `key` (the `keys` recomputed, as `rows`) for the
    /// tables `refresh_by` it. The rows are kept only when some table is, and the memory limit
    /// leaves room (see [`Refreshed::rows`]).
    fn remember_refresh(&mut self, set: &TransformSet, name: &str, key: &str, keys: datafusion::prelude::DataFrame, schema: SchemaRef, rows: Vec<RecordBatch>) {
        let driving = set.transforms.iter().any(|t| matches!(&t.body, TransformBody::Derived { refresh_by: Some(by), .. } if by.table == name));
        let rows = (driving && self.try_keep(crate::warehouse::memory_size(&rows))).then_some((schema, rows));
        self.refreshed.insert(name.to_string(), Refreshed { key: key.to_string(), keys, rows });
    }

    /// Whether `bytes` more of tables may stay in memory for the tables read after them
    /// (reserved if so): always without a memory limit; under `--memory-limit`, while the tables
    /// kept stay within a quarter of it, the rest left to the extraction of the next exports and
    /// to the queries that make the next tables.
    fn try_keep(&mut self, bytes: usize) -> bool {
        match self.warehouse.memory_limit() {
            None => {
                self.held.grow(bytes);
                true
            }
            Some(limit) => self.held.size() + bytes <= limit / 4 && self.held.try_grow(bytes).is_ok(),
        }
    }

    fn previous_entry(&self, table: &str) -> Option<&'a TableEntry> {
        self.previous.and_then(|p| p.tables.get(table))
    }

    /// Fingerprint of a transform: its file's text (a changed rule or column rebuilds the table).
    fn fingerprint(&self, t: &Transform) -> Result<String> {
        let path = self.project.root.join(&t.file);
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let kind = if matches!(t.body, TransformBody::History(_)) { "history" } else { "table" };
        Ok(SourceFile::of(kind.into(), &text).sha256)
    }

    /// A transform's fingerprint, and whether the previous snapshot's table was built from it.
    fn fingerprint_unchanged(&self, t: &Transform) -> Result<(String, bool)> {
        let fingerprint = self.fingerprint(t)?;
        let unchanged = self.previous_entry(&t.name).and_then(|e| e.spec.as_deref()) == Some(fingerprint.as_str());
        Ok((fingerprint, unchanged))
    }

    /// The previous snapshot's version of `table`, registered under `name`.
    async fn register_previous(&self, table: &str, name: &str) -> Result<bool> {
        let Some(entry) = self.previous_entry(table) else { return Ok(false) };
        let provider = self.warehouse.provider(self.ctx, table, entry.version).await?;
        self.ctx.register_table(name, provider)?;
        Ok(true)
    }

    /// Keeps the previous snapshot's version of a table (nothing it reads changed).
    async fn keep(&mut self, table: &str, kind: &'static str) -> Result<()> {
        let entry = self.previous_entry(table).ok_or_else(|| Error::Internal(format!("no previous version of '{table}' to keep")))?;
        self.register_previous(table, table).await?;
        self.entries.insert(table.to_string(), entry.clone());
        self.done.insert(table.to_string());
        tracing::info!(table = %table, rows = entry.rows, "unchanged");
        self.reports.push(TableReport { table: table.to_string(), kind, mode: "unchanged", rows: entry.rows, ..Default::default() });
        Ok(())
    }

    fn plan_source(&mut self, t: &Transform, spec: &SourceTransform, files: Vec<PathBuf>, hashes: &[SourceFile]) -> Result<SourcePlan> {
        let path = match spec.source.postgres {
            Some(_) => glob::Pattern::escape(&super::postgres::ledger_key(&t.name)),
            None => spec.source.path.clone(),
        };
        let pattern = glob::Pattern::new(&path).map_err(|e| DataError::Input {
            file: t.file.clone(),
            line: None,
            message: format!("invalid source path pattern '{path}': {e}"),
        })?;
        let before: BTreeMap<&str, &str> = self
            .previous
            .map(|p| p.files.iter().filter(|(k, _)| pattern.matches(k)).map(|(k, f)| (k.as_str(), f.sha256.as_str())).collect())
            .unwrap_or_default();
        if spec.mode == LoadMode::Full {
            self.full_patterns.push(pattern);
        }
        if self.previous_entry(&t.name).is_none() {
            return Ok(SourcePlan::Full(files));
        }
        let same_spec = self.fingerprint_unchanged(t)?.1;
        let unseen: Vec<PathBuf> = files
            .iter()
            .zip(hashes)
            .filter(|(_, h)| before.get(h.path.as_str()) != Some(&h.sha256.as_str()))
            .map(|(f, _)| f.clone())
            .collect();
        match spec.mode {
            LoadMode::Full => {
                let same_files = unseen.is_empty() && before.len() == hashes.len();
                let references_changed = spec.references.iter().any(|r| self.changed.contains(&r.table));
                Ok(if same_spec && same_files && !references_changed { SourcePlan::Keep } else { SourcePlan::Full(files) })
            }
            LoadMode::Incremental => {
                if spec.key.is_empty() && spec.watermark.is_none() {
                    let rewritten: Vec<&str> =
                        hashes.iter().filter(|h| before.get(h.path.as_str()).is_some_and(|b| *b != h.sha256)).map(|h| h.path.as_str()).collect();
                    if let Some(path) = rewritten.first() {
                        return Err(DataError::Input {
                            file: self.project.display_path(&self.project.sources.join(path)),
                            line: None,
                            message: format!(
                                "this export changed after it was loaded into '{}', an incremental table with neither a key nor a watermark: \
                                 loading it again would double its rows. Restore the file as it was and deliver the new rows in a new file, \
                                 or declare a `key:` or `watermark:` in {}",
                                t.name,
                                t.file.display()
                            ),
                        }
                        .into());
                    }
                }
                Ok(if unseen.is_empty() && same_spec { SourcePlan::Keep } else { SourcePlan::Incremental(unseen) })
            }
        }
    }

    async fn source(&mut self, t: &Transform, spec: &SourceTransform, plan: SourcePlan, ex: Option<Extracted>, options: &LoadOptions) -> Result<()> {
        let Some(ex) = ex else { return self.keep(&t.name, "source").await };
        let incremental = matches!(plan, SourcePlan::Incremental(_));
        let table_started = Instant::now();
        let cleaned = clean(self.ctx, &t.name, spec, ex.batches, &ex.texts, ex.memory.as_ref()).await?;
        crate::fault::point(&format!("cleaned {}", t.name));
        let quarantined = cleaned.quarantined + ex.rejects.len() as u64;
        let mut report = TableReport {
            table: t.name.clone(),
            kind: "source",
            mode: if incremental { "incremental" } else { "full" },
            read: ex.read,
            loaded: cleaned.loaded,
            quarantined,
            duplicates: cleaned.duplicates,
            ..Default::default()
        };
        let had = self.previous_entry(&t.name).map(|e| e.rows).unwrap_or(0);
        if !incremental && report.read == 0 && had > 0 && !options.allow_empty.contains(&t.name) {
            return Err(DataError::EmptySource { table: t.name.clone(), previous: had }.into());
        }
        if quarantined as f64 > spec.reject_threshold * report.read as f64 {
            return Err(DataError::RejectThreshold {
                table: t.name.clone(),
                spec: t.file.display().to_string(),
                rejected: quarantined,
                read: report.read,
                threshold: spec.reject_threshold,
            }
            .into());
        }
        self.quarantine.push(rejects_batch(&ex.rejects)?);
        self.quarantine.extend(cleaned.rejected);
        let fingerprint = Some(self.fingerprint(t)?);
        let schema = cleaned.schema.clone();
        let output = if incremental {
            self.merge(t, spec, schema, cleaned.rows, &mut report).await?
        } else {
            self.requarantined.insert(t.name.clone());
            report.rows = report.loaded;
            if let Some(w) = &spec.watermark {
                report.watermark_after = max_text(self.ctx, &schema, &cleaned.rows, w).await?;
            }
            self.register(&t.name, &schema, &cleaned.rows)?;
            let watermark = report.watermark_after.clone();
            Output { watermark, ..Output::new(&t.name, schema, cleaned.rows) }
        };
        if report.read != report.loaded + report.quarantined + report.duplicates + report.skipped {
            return Err(Error::Internal(format!("row accounting does not add up for table '{}': {report:?}", t.name)));
        }
        report.millis = table_started.elapsed().as_millis() as u64;
        tracing::info!(table = %t.name, read = report.read, loaded = report.loaded, updated = report.updated, quarantined, duplicates = report.duplicates, "cleaned");
        self.changed.insert(t.name.clone());
        self.done.insert(t.name.clone());
        self.put(Output { spec: fingerprint, layout: t.layout.clone(), ..output }).await?;
        self.reports.push(report);
        Ok(())
    }

    /// Registers a table's rows (after this load) under its name.
    fn register(&self, name: &str, schema: &SchemaRef, rows: &[RecordBatch]) -> Result<()> {
        self.ctx.deregister_table(name)?;
        // The batches themselves (shared, not copied): the output written at commit holds them too.
        let table = datafusion::datasource::MemTable::try_new(schema.clone(), vec![rows.to_vec()]).map_err(|e| {
            let made = rows.first().map(|b| b.schema().to_string()).unwrap_or_default();
            e.context(format!("table '{name}': its rows ({made}) do not have its SELECT's types ({schema})"))
        })?;
        self.ctx.register_table(name, Arc::new(table))?;
        Ok(())
    }

    /// An incremental source: rows past the watermark upsert the previous rows by key (or are
    /// appended to them when the table has no key).
    async fn merge(&mut self, t: &Transform, spec: &SourceTransform, schema: SchemaRef, rows: Vec<RecordBatch>, report: &mut TableReport) -> Result<Output> {
        use datafusion::prelude::{cast, col, lit};
        let ctx = self.ctx;
        let previous_entry = self.previous_entry(&t.name);
        let mut delta = ctx.read_batches(crate::warehouse::with_empty(&schema, rows))?;
        report.watermark_before = previous_entry.and_then(|e| e.watermark.clone());
        if let (Some(w), Some(before)) = (&spec.watermark, &report.watermark_before) {
            let ty = schema.field_with_name(w)?.data_type().clone();
            let kept = delta.clone().filter(col(w.as_str()).gt(cast(lit(before.as_str()), ty)))?;
            let kept = crate::warehouse::materialize(ctx, kept).await?;
            let n = kept.clone().count().await? as u64;
            report.skipped = report.loaded - n;
            report.loaded = n;
            delta = kept;
        }
        let delta_rows = delta.clone().collect().await?;
        report.watermark_after = match &spec.watermark {
            Some(w) => max_text(ctx, &schema, &delta_rows, w).await?.or_else(|| report.watermark_before.clone()),
            None => None,
        };

        // The previous rows, in tonight's columns (a column added to the transform reads NULL).
        let previous_name = format!("__previous_{}", t.name);
        let had_previous = self.register_previous(&t.name, &previous_name).await?;
        let previous = if had_previous {
            let old = ctx.table(previous_name.as_str()).await?;
            let old_columns: BTreeSet<String> = old.schema().fields().iter().map(|f| f.name().clone()).collect();
            let same_columns = old.schema().fields().len() == schema.fields().len() && schema.fields().iter().all(|f| old_columns.contains(f.name()));
            Some((crate::warehouse::in_columns(old, &schema)?, same_columns))
        } else {
            None
        };
        let mut append = matches!(previous, Some((_, true)));
        let merged = match previous {
            None => delta,
            Some((old, _)) if spec.key.is_empty() => old.union(delta)?,
            Some((old, _)) => {
                let keys: Vec<&str> = spec.key.iter().map(String::as_str).collect();
                let new_keys = delta.clone().select_columns(&keys)?;
                let replaced = old.clone().join(new_keys.clone(), datafusion::logical_expr::JoinType::LeftSemi, &keys, &keys, None)?;
                report.updated = replaced.count().await? as u64;
                if report.updated > 0 {
                    append = false;
                    old.join(new_keys, datafusion::logical_expr::JoinType::LeftAnti, &keys, &keys, None)?.union(delta)?
                } else {
                    old.union(delta)?
                }
            }
        };
        // Append only onto the rows the previous snapshot names: a killed load may have written
        // later versions no snapshot names, which an append would inherit (a vacuum's commits
        // change no rows, see Warehouse::holds_version).
        if append && let Some(entry) = previous_entry {
            append = self.warehouse.holds_version(&t.name, entry.version).await?;
        }
        if append && let Some(entry) = previous_entry {
            // The table after the load is the previous version plus tonight's rows: read it from
            // there when needed rather than holding it all in memory.
            let total = entry.rows + count_rows(&delta_rows);
            report.rows = total;
            self.appended.insert(t.name.clone(), (schema.clone(), delta_rows.clone()));
            self.ctx.deregister_table(t.name.as_str())?;
            self.ctx.register_table(t.name.as_str(), merged.into_view())?;
            return Ok(Output { total_rows: total, append, watermark: report.watermark_after.clone(), ..Output::new(&t.name, schema, delta_rows) });
        }
        let merged_rows = merged.collect().await?;
        let total = count_rows(&merged_rows);
        report.rows = total;
        self.register(&t.name, &schema, &merged_rows)?;
        Ok(Output { watermark: report.watermark_after.clone(), ..Output::new(&t.name, schema, merged_rows) })
    }

    /// A type-2 history: the previous history, versions closed and opened where a tracked
    /// column changed, other columns corrected from the table's current rows.
    async fn history(&mut self, t: &Transform, h: &History) -> Result<()> {
        let (fingerprint, same_spec) = self.fingerprint_unchanged(t)?;
        if !self.changed.contains(&h.of) && same_spec {
            return self.keep(&t.name, "history").await;
        }
        let table_started = Instant::now();
        let previous_name = format!("__previous_{}", t.name);
        // The stored history is kept whatever changed in the transform: in tonight's columns and
        // types (a column added reads NULL in earlier versions; Delta stores timestamps in
        // microseconds where the rows just cleaned may carry nanoseconds).
        let had_previous = self.register_previous(&t.name, &previous_name).await?;
        if had_previous {
            let stored = self.ctx.table(previous_name.as_str()).await?;
            let current = self.ctx.table(h.of.as_str()).await?;
            let changed_at = current.schema().field_with_unqualified_name(&h.changed_at)?.data_type().clone();
            let stored_field = |name: &str| stored.schema().field_with_unqualified_name(name).map(|f| f.as_ref().clone());
            let mut columns: Vec<Field> = current.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
            columns.push(Field::new("version", DataType::Int64, true));
            columns.push(Field::new("valid_from", changed_at.clone(), true));
            columns.push(Field::new("valid_to", changed_at, true));
            columns.push(stored_field("is_current")?);
            let integer_keys = stored_field("version_key")?.data_type() == &DataType::Int64;
            columns.push(Field::new("version_key", if integer_keys { DataType::Int64 } else { DataType::Utf8 }, true));
            let mut typed = crate::warehouse::in_columns(stored, &Schema::new(columns))?;
            if !integer_keys {
                // A history stored before keys were integers (`C000123#2`): its versions are
                // numbered in key and version order, and the facts that join it are recomputed
                // (this table changes in full tonight).
                tracing::info!(table = %t.name, "version keys renumbered as integers");
                let names: Vec<String> = typed.schema().fields().iter().map(|f| f.name().clone()).filter(|n| n != "version_key").collect();
                use datafusion::logical_expr::ExprFunctionExt;
                use datafusion::prelude::{Expr, cast, ident};
                let order = h.key.iter().map(|k| ident(k).sort(true, false)).chain([ident("version").sort(true, false)]);
                let number = datafusion::functions_window::expr_fn::row_number().order_by(order.collect()).build()?;
                let mut select: Vec<Expr> = names.iter().map(ident).collect();
                select.push(cast(number, DataType::Int64).alias("version_key"));
                typed = typed.select(select)?;
            }
            self.ctx.deregister_table(previous_name.as_str())?;
            self.ctx.register_table(previous_name.as_str(), typed.into_view())?;
        }
        let sql = history_sql(self.ctx, h, had_previous.then_some(previous_name.as_str())).await?;
        let df = self.ctx.sql(&sql).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let rows = df.collect().await?;
        self.register(&t.name, &schema, &rows)?;
        crate::fault::point(&format!("derived {}", t.name));
        let n = count_rows(&rows);
        tracing::info!(table = %t.name, rows = n, "derived");
        self.reports.push(TableReport {
            table: t.name.clone(),
            kind: "history",
            mode: if had_previous { "incremental" } else { "full" },
            read: n,
            loaded: n,
            rows: n,
            millis: table_started.elapsed().as_millis() as u64,
            ..Default::default()
        });
        self.changed.insert(t.name.clone());
        self.done.insert(t.name.clone());
        self.put(Output { spec: Some(fingerprint), layout: t.layout.clone(), ..Output::new(&t.name, schema, rows) }).await?;
        Ok(())
    }

    async fn derived(&mut self, set: &TransformSet, t: &Transform, sql: &str, grows_with: Option<&str>, refresh_by: Option<&RefreshBy>, inputs: &[String]) -> Result<()> {
        let (fingerprint, same_spec) = self.fingerprint_unchanged(t)?;
        if same_spec && !inputs.iter().any(|i| self.changed.contains(i)) {
            return self.keep(&t.name, "derived").await;
        }
        let name = &t.name;
        let table_started = Instant::now();
        if same_spec
            && let Some(driver) = grows_with
            && self.grow(set, t, sql, driver, inputs, &fingerprint, table_started).await?
        {
            return Ok(());
        }
        if same_spec
            && let Some(by) = refresh_by
            && self.refresh_keys(set, t, sql, by, inputs, &fingerprint, table_started).await?
        {
            return Ok(());
        }
        let df = self.ctx.sql(sql).await.map_err(|e| derived_error(set, name, e))?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        if let Some(problem) = layout_problems(t, &schema, 0, 0).into_iter().next() {
            return Err(SpecErrors(vec![problem]).into());
        }
        // Sorted here rather than at the commit: the rows the later tables read are then the
        // only copy held (sorting at the commit would hold a second one while every other table
        // waits to be written).
        let df = if t.layout.sort_by.is_empty() { df } else { df.sort(t.layout.sort_exprs())? };
        let rows = df.collect().await.map_err(|e| derived_error(set, name, e))?;
        let n = count_rows(&rows);
        // A small table recomputed to the same rows (a date dimension when only new orders
        // arrived) counts as unchanged, so the tables reading it are not rebuilt for nothing.
        if same_spec && n <= SAME_CONTENT_CHECK_ROWS && self.previous_entry(name).is_some_and(|e| e.rows == n) {
            let fresh = format!("__fresh_{name}");
            self.register(&fresh, &schema, &rows)?;
            let previous = format!("__previous_{name}");
            self.register_previous(name, &previous).await?;
            // The same values under the same column names and types: a column renamed upstream
            // (`SELECT *`) must reach this table too.
            let columns = crate::warehouse::columns_print(self.ctx.table(previous.as_str()).await?.schema().as_arrow());
            let same = columns == crate::warehouse::columns_print(&schema) && content_checksum(self.ctx, &fresh).await? == content_checksum(self.ctx, &previous).await?;
            self.ctx.deregister_table(fresh.as_str())?;
            self.ctx.deregister_table(previous.as_str())?;
            if same {
                return self.keep(name, "derived").await;
            }
        }
        tracing::info!(table = %name, rows = n, "derived");
        self.made(t, "full", n, table_started, &fingerprint, schema, rows).await
    }

    /// A derived table made tonight (`mode`, `read` rows computed, `rows` in the table): reported,
    /// and counted as changed and done for the tables after it.
    fn derived_report(&mut self, name: &str, mode: &'static str, read: u64, rows: u64, started: Instant) {
        let millis = started.elapsed().as_millis() as u64;
        self.reports.push(TableReport { table: name.to_string(), kind: "derived", mode, read, loaded: read, rows, millis, ..Default::default() });
        self.changed.insert(name.to_string());
        self.done.insert(name.to_string());
    }

    /// The tables after this one read `name` from its files at `version`, not from memory.
    async fn read_from_files(&self, name: &str, version: u64) -> Result<()> {
        let provider = self.warehouse.provider(self.ctx, name, version).await?;
        self.ctx.deregister_table(name)?;
        self.ctx.register_table(name, provider)?;
        Ok(())
    }

    /// A derived table made tonight in its layout's order (`mode`: in full, or refreshed by key
    /// with `read` rows recomputed): registered for the tables after it, reported and written.
    #[allow(clippy::too_many_arguments)]
    async fn made(&mut self, t: &Transform, mode: &'static str, read: u64, started: Instant, fingerprint: &str, schema: SchemaRef, rows: Vec<RecordBatch>) -> Result<()> {
        let name = t.name.as_str();
        let n = count_rows(&rows);
        self.register(name, &schema, &rows)?;
        crate::fault::point(&format!("derived {name}"));
        self.derived_report(name, mode, read, n, started);
        self.put(Output { spec: Some(fingerprint.to_string()), layout: t.layout.clone(), sorted: true, ..Output::new(name, schema, rows) }).await
    }

    /// A derived table that `grows_with` a driver table, on a night when the driver only gained
    /// rows and every other table its SQL reads kept its rows (or only gained new keys the driver
    /// references, so no earlier driver row finds a new match): the SELECT of the driver's new
    /// rows alone, appended to the previous rows. False when the night does not allow it (the
    /// caller recomputes the table).
    #[allow(clippy::too_many_arguments)]
    async fn grow(&mut self, set: &TransformSet, t: &Transform, sql: &str, driver: &str, inputs: &[String], fingerprint: &str, started: Instant) -> Result<bool> {
        let name = t.name.as_str();
        let Some(entry) = self.previous_entry(name).cloned() else { return Ok(false) };
        let Some((driver_schema, new_rows)) = self.appended.get(driver).cloned() else { return Ok(false) };
        let referenced: Vec<&str> = match set.get(driver).map(|d| &d.body) {
            Some(TransformBody::Source(s)) => s.references.iter().map(|r| r.table.as_str()).collect(),
            _ => Vec::new(),
        };
        if let Some(i) = inputs.iter().find(|i| *i != driver && self.changed.contains(*i) && !(self.appended.contains_key(*i) && referenced.contains(&i.as_str()))) {
            tracing::info!(table = name, "recomputed in full: {i} changed other than by new rows {driver} references");
            return Ok(false);
        }
        let plan = self.ctx.sql(sql).await.map_err(|e| derived_error(set, name, e))?.into_unoptimized_plan();
        if let Some(why) = not_row_wise(&plan, driver, inputs) {
            tracing::warn!(table = name, "grows_with {driver} does not apply: {why}; the table is recomputed in full");
            return Ok(false);
        }
        // Append only onto the rows the previous snapshot names (see merge).
        if !self.warehouse.holds_version(name, entry.version).await? {
            return Ok(false);
        }
        // The SELECT over the driver's new rows: the driver reads as those rows meanwhile.
        let whole = self.ctx.deregister_table(driver)?.ok_or_else(|| Error::Internal(format!("table '{driver}' is not registered")))?;
        self.register(driver, &driver_schema, &new_rows)?;
        let result = async {
            let df = self.ctx.sql(sql).await?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            Ok::<_, datafusion::error::DataFusionError>((schema, df.collect().await?))
        }
        .await;
        self.ctx.deregister_table(driver)?;
        self.ctx.register_table(driver, whole)?;
        let (schema, rows) = result.map_err(|e| derived_error(set, name, e))?;
        tracing::debug!(table = name, ms = started.elapsed().as_millis() as u64, "grown: the new rows selected");

        let n = count_rows(&rows);
        crate::fault::point(&format!("derived {name}"));
        tracing::info!(table = name, rows = n, "appended");
        self.derived_report(name, "incremental", n, entry.rows + n, started);
        self.appended.insert(name.to_string(), (schema.clone(), rows.clone()));
        let output = Output { total_rows: entry.rows + n, append: true, spec: Some(fingerprint.to_string()), layout: t.layout.clone(), ..Output::new(name, schema, rows) };
        self.put(output).await?;
        // The table after the load, for the tables read after it: tonight's version, the
        // previous files and the new rows' file, read from the files. The previous rows are not
        // read into memory: each later table reads only the columns it needs (at 10 M order
        // lines, reading all of them took 0.7–2.9 s and 1 GB of peak RSS, and the night was
        // 0.7–5 s slower than with the later tables reading the files).
        let version = self.entries.get(name).map(|e| e.version).ok_or_else(|| Error::Internal(format!("table '{name}' written but not recorded")))?;
        self.read_from_files(name, version).await?;
        Ok(true)
    }

    /// A derived table `refresh_by` a driver table's key (see [`super::keyed`]), on a night when
    /// the driver only gained rows — or was itself refreshed by the same key — and no other table
    /// its SQL reads changed: the SELECT over the driver's rows of the keys tonight's rows hold
    /// (or the driver's refresh recomputed) replaces the previous rows of those keys, and the rows
    /// of every other key are kept. False when the night does not allow it (the caller
    /// recomputes the table).
    #[allow(clippy::too_many_arguments)]
    async fn refresh_keys(&mut self, set: &TransformSet, t: &Transform, sql: &str, by: &RefreshBy, inputs: &[String], fingerprint: &str, started: Instant) -> Result<bool> {
        use datafusion::logical_expr::JoinType;
        use datafusion::prelude::ident;
        let (name, driver, key) = (t.name.as_str(), by.table.as_str(), by.key.as_str());
        if self.previous_entry(name).is_none() {
            return Ok(false);
        }
        // The driver gained rows, or was itself refreshed by the same key.
        let appended = self.appended.get(driver).cloned();
        let refreshed = self.refreshed.get(driver).filter(|r| r.key == key).cloned();
        if appended.is_none() && refreshed.is_none() {
            return Ok(false);
        }
        if let Some(i) = inputs.iter().find(|i| *i != driver && self.changed.contains(*i)) {
            tracing::info!(table = name, "recomputed in full: {i} changed");
            return Ok(false);
        }
        let plan = self.ctx.sql(sql).await.map_err(|e| derived_error(set, name, e))?.into_unoptimized_plan();
        if let Some(why) = super::keyed::not_keyed(&plan, driver, key, inputs) {
            tracing::warn!(table = name, "refresh_by {driver}.{key} does not apply: {why}; the table is recomputed in full");
            return Ok(false);
        }
        // The keys tonight's rows hold. A NULL key matches no key in a join: its rows are
        // recomputed with the whole table.
        let touched = match (&refreshed, appended) {
            (Some(r), _) => r.keys.clone(),
            (None, Some((driver_schema, new_rows))) => {
                let touched = self.ctx.read_batches(crate::warehouse::with_empty(&driver_schema, new_rows))?.select(vec![ident(key).alias(TOUCHED)])?.distinct()?;
                let touched = crate::warehouse::materialize(self.ctx, touched).await?;
                if touched.clone().filter(ident(TOUCHED).is_null())?.count().await? > 0 {
                    tracing::info!(table = name, "recomputed in full: rows of {driver} with no {key} arrived");
                    return Ok(false);
                }
                touched
            }
            (None, None) => return Ok(false),
        };
        let keys = touched.clone().count().await?;

        // The SELECT over the driver's rows of those keys: the driver reads as them meanwhile.
        // A driver refreshed by the key tonight holds, of those keys, the rows its refresh
        // computed: read from memory in the driver's types, not found among all its rows (at 10 M
        // order lines, customer_lifecycle's 0.26–0.35 s scan of customer_monthly's 3 M rows).
        let computed = match refreshed.as_ref().and_then(|r| r.rows.as_ref()) {
            Some((schema, rows)) => Some(crate::warehouse::in_columns(self.ctx.read_batches(crate::warehouse::with_empty(schema, rows.clone()))?, self.ctx.table(driver).await?.schema().as_arrow())?),
            None => None,
        };
        let whole = self.ctx.deregister_table(driver)?.ok_or_else(|| Error::Internal(format!("table '{driver}' is not registered")))?;
        let result = async {
            let of_keys = match computed {
                Some(rows) => rows,
                None => self.ctx.read_table(whole.clone())?.join(touched.clone(), JoinType::LeftSemi, &[key], &[TOUCHED], None)?,
            };
            self.ctx.register_table(driver, of_keys.into_view())?;
            // Only the rows of those keys (a row of another key, from a table joined to the
            // driver's rows, stands as it was).
            let df = self.ctx.sql(sql).await?.join(touched.clone(), JoinType::LeftSemi, &[key], &[TOUCHED], None)?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            Ok::<_, datafusion::error::DataFusionError>((schema, df.collect().await?))
        }
        .await;
        self.ctx.deregister_table(driver)?;
        self.ctx.register_table(driver, whole)?;
        // A SELECT that plans over the whole tables but not this way (two columns named like
        // the key) is recomputed in full, as the plan check would have it.
        let (schema, fresh) = match result {
            Ok(r) => r,
            Err(e) if !matches!(e.find_root(), datafusion::error::DataFusionError::ResourcesExhausted(_)) => {
                tracing::warn!(table = name, "refresh_by {driver}.{key} does not apply: {e}; the table is recomputed in full");
                return Ok(false);
            }
            Err(e) => return Err(derived_error(set, name, e)),
        };
        let recomputed = count_rows(&fresh);
        tracing::debug!(table = name, keys, rows = recomputed, ms = started.elapsed().as_millis() as u64, "refreshed by key: the keys' rows selected");

        // A partitioned table: written by the partitions the keys' rows moved, read from its
        // files by the tables after it.
        if let Some(column) = t.layout.partition_by.as_deref()
            && let Some((version, rows, prints)) = in_table(name, self.refresh_partitions(name, fingerprint, &schema, &fresh, &touched, key, column, &t.layout).await)?
        {
            crate::fault::point(&format!("derived {name}"));
            tracing::info!(table = name, keys, rows, "refreshed by key");
            self.derived_report(name, "incremental", recomputed, rows, started);
            crate::fault::point(&format!("wrote {name}"));
            tracing::info!(table = %name, version, rows, "written");
            self.entries.insert(name.to_string(), TableEntry { version, rows, spec: Some(fingerprint.to_string()), watermark: None, partitions: prints });
            self.read_from_files(name, version).await?;
            self.remember_refresh(set, name, key, touched, schema, fresh);
            return Ok(true);
        }

        // The previous rows of every other key, in tonight's types, and the fresh ones.
        let previous = format!("__previous_{name}");
        self.register_previous(name, &previous).await?;
        let kept = crate::warehouse::in_columns(self.ctx.table(previous.as_str()).await?, &schema)?.join(touched.clone(), JoinType::LeftAnti, &[key], &[TOUCHED], None)?;
        let all = kept.union(self.ctx.read_batches(crate::warehouse::with_empty(&schema, fresh.clone()))?)?;
        let all = if t.layout.sort_by.is_empty() { all } else { all.sort(t.layout.sort_exprs())? };
        let rows = all.collect().await;
        self.ctx.deregister_table(previous.as_str())?;
        let rows = in_schema(&schema, rows.map_err(|e| derived_error(set, name, e))?)?;
        tracing::info!(table = name, keys, rows = count_rows(&rows), "refreshed by key");
        self.remember_refresh(set, name, key, touched, schema.clone(), fresh);
        self.made(t, "incremental", recomputed, started, fingerprint, schema, rows).await?;
        Ok(true)
    }

    async fn models(&mut self) -> Result<()> {
        let names = super::models::TABLES;
        let settings = &self.project.lifetime_value;
        // The models depend on fact_sales and on the settings: a changed setting refits them.
        let text = serde_json::to_string(settings).map_err(|e| Error::Internal(format!("lifetime value settings: {e}")))?;
        let fingerprint = SourceFile::of("lifetime_value".into(), text.as_bytes()).sha256;
        let current = |n: &str| self.previous_entry(n).is_some_and(|e| e.spec.as_deref() == Some(fingerprint.as_str()));
        if !self.changed.contains("fact_sales") && names.iter().all(|n| current(n)) {
            for n in names {
                self.keep(n, "model").await?;
            }
            return Ok(());
        }
        let table_started = Instant::now();
        for (name, schema, rows) in super::models::clv_tables(self.ctx, settings).await? {
            crate::fault::point(&format!("fitted {name}"));
            let n = count_rows(&rows);
            tracing::info!(table = %name, rows = n, "derived");
            let millis = table_started.elapsed().as_millis() as u64;
            self.reports.push(TableReport { table: name.clone(), kind: "model", mode: "full", read: n, loaded: n, rows: n, millis, ..Default::default() });
            self.changed.insert(name.clone());
            self.put(Output { spec: Some(fingerprint.clone()), ..Output::new(name, schema, rows) }).await?;
        }
        Ok(())
    }

    /// A rollup: kept when nothing it reads changed; else rebuilt by partition when it can be
    /// (only the units whose fact rows changed, see crate::rollup::partitions), else in full.
    async fn rollup(&mut self, cube: &crate::cube::Cube, rollup: &crate::cube::Rollup) -> Result<()> {
        use crate::rollup::partitions;
        let current = self.previous.and_then(|p| p.rollups.get(&rollup.table)) == Some(&rollup.fingerprint(cube));
        let mut inputs = std::iter::once(&cube.fact).chain(cube.dimensions.iter().filter_map(|d| d.join.as_ref().map(|j| &j.table)));
        if current && self.previous_entry(&rollup.table).is_some() && !inputs.any(|t| self.changed.contains(t)) {
            return self.keep(&rollup.table, "rollup").await;
        }
        let table_started = Instant::now();
        let unit = partitions::refresh_unit(cube, rollup);
        let stored = self.previous_entry(&rollup.table).map(|e| e.partitions.clone()).filter(|p| current && !p.is_empty());
        // A night that only appended facts: the stored rows plus the new rows' aggregate.
        if let (Some(u), Some(stored)) = (unit, &stored)
            && let Some(a) = self.append(cube, rollup, u, stored).await?
        {
            if a.touched.is_empty() {
                return self.keep(&rollup.table, "rollup").await;
            }
            return self.rolled_up(cube, rollup, table_started, a.schema, a.rows, a.read, a.touched, a.prints).await;
        }
        let units = match unit {
            Some(u) => partitions::units(self.ctx, &mut self.prints, cube, u).await?,
            None => None,
        };
        let mut rebuilt_units = Vec::new();
        let refresh = match (unit, &units, stored) {
            (Some(u), Some(units), Some(stored)) if self.members_kept(cube, rollup).await? => Some((u, units, units.touched(&stored))),
            _ => None,
        };
        if refresh.as_ref().is_some_and(|(_, _, touched)| touched.is_empty()) {
            return self.keep(&rollup.table, "rollup").await;
        }
        // Every unit changed (a recomputed fact, a new print format): one full build is cheaper.
        let refresh = refresh.filter(|(_, units, touched)| !units.prints.keys().all(|u| touched.contains(u)));
        let (schema, rows, read) = match refresh {
            Some((u, units, touched)) => {
                let previous = format!("__previous_{}", rollup.table);
                self.register_previous(&rollup.table, &previous).await?;
                let out = partitions::rebuild(self.ctx, cube, rollup, u, units, &touched, &previous).await;
                self.ctx.deregister_table(previous.as_str())?;
                rebuilt_units = touched.into_iter().collect();
                out?
            }
            None => {
                let df = crate::rollup::build(self.ctx, cube, rollup).await?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                let rows = df.collect().await?;
                let n = count_rows(&rows);
                (schema, rows, n)
            }
        };
        let partitions = units.map(|u| u.prints).unwrap_or_default();
        self.rolled_up(cube, rollup, table_started, schema, rows, read, rebuilt_units, partitions).await
    }

    /// A rollup's rows refreshed on an append-only night (see crate::rollup::partitions::append),
    /// or None when the night or the rollup does not allow it.
    async fn append(
        &mut self,
        cube: &crate::cube::Cube,
        rollup: &crate::cube::Rollup,
        unit: crate::cube::LevelRef<'_>,
        stored: &BTreeMap<String, String>,
    ) -> Result<Option<crate::rollup::partitions::Appending>> {
        use crate::rollup::partitions;
        if !self.appended.contains_key(&cube.fact) {
            return Ok(None);
        }
        // The stored rollup stands for the previous fact rows, which tonight's table extends.
        let before = self.previous_entry(&cube.fact).map(|e| e.rows);
        if before.is_none() || partitions::printed_rows(stored) != before || !self.members_kept(cube, rollup).await? {
            return Ok(None);
        }
        if !self.growth.contains_key(&cube.name)
            && let Some((schema, rows)) = self.appended.get(&cube.fact).cloned()
        {
            let growth = partitions::Appended::register(self.ctx, cube, &schema, &rows).await?;
            self.growth.insert(cube.name.clone(), growth);
        }
        let previous = format!("__previous_{}", rollup.table);
        self.register_previous(&rollup.table, &previous).await?;
        let growth = self.growth.get_mut(&cube.name).ok_or_else(|| Error::Internal("appended facts registered above".into()))?;
        let out = partitions::append(self.ctx, cube, rollup, unit, growth, stored, &previous).await;
        self.ctx.deregister_table(previous.as_str())?;
        out
    }

    /// Forgets the new fact rows registered for `cube`'s rollups (see [`Run::append`]).
    fn forget_growth(&mut self, cube: &str) -> Result<()> {
        if let Some(g) = self.growth.remove(cube) {
            g.deregister(self.ctx)?;
        }
        Ok(())
    }

    /// Reports and writes a rollup's rows; `units` are the partitions rebuilt (none: in full).
    #[allow(clippy::too_many_arguments)]
    async fn rolled_up(
        &mut self,
        cube: &crate::cube::Cube,
        rollup: &crate::cube::Rollup,
        table_started: Instant,
        schema: SchemaRef,
        rows: Vec<RecordBatch>,
        read: u64,
        rebuilt_units: Vec<String>,
        partitions: BTreeMap<String, String>,
    ) -> Result<()> {
        crate::fault::point(&format!("built {}", rollup.table));
        let n = count_rows(&rows);
        let mode = if rebuilt_units.is_empty() { "full" } else { "incremental" };
        tracing::info!(table = %rollup.table, rows = n, mode, partitions = rebuilt_units.len(), "derived");
        let millis = table_started.elapsed().as_millis() as u64;
        self.reports.push(TableReport {
            table: rollup.table.clone(),
            kind: "rollup",
            mode,
            read,
            loaded: read,
            rows: n,
            millis,
            partitions: rebuilt_units,
            ..Default::default()
        });
        self.changed.insert(rollup.table.clone());
        let partition = rollup.partition_column(cube).into_iter().collect();
        self.put(Output { partition, partitions, ..Output::new(&rollup.table, schema, rows) }).await?;
        Ok(())
    }

    /// Whether every changed dimension table `rollup` reads still holds each of its previous
    /// members with the same key and levels (see crate::rollup::partitions).
    async fn members_kept(&mut self, cube: &crate::cube::Cube, rollup: &crate::cube::Rollup) -> Result<bool> {
        for d in &cube.dimensions {
            let Some(j) = &d.join else { continue };
            if !self.changed.contains(&j.table) {
                continue;
            }
            let mut columns = vec![j.key.clone()];
            for (_, i) in rollup.levels.iter().filter(|(name, _)| *name == d.name) {
                let level = &d.levels[*i];
                columns.extend(std::iter::once(level.column.clone()).chain(level.label.clone()));
            }
            if columns.len() == 1 {
                continue;
            }
            columns.sort();
            columns.dedup();
            let id = (j.table.clone(), columns.clone());
            let kept = match self.members_kept.get(&id) {
                Some(k) => *k,
                None => {
                    let previous = format!("__members_{}", j.table);
                    let k = self.register_previous(&j.table, &previous).await?
                        && crate::rollup::partitions::members_kept(self.ctx, &previous, &j.table, &columns).await?;
                    let _ = self.ctx.deregister_table(previous.as_str())?;
                    self.members_kept.insert(id, k);
                    k
                }
            };
            if !kept {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The quarantine after this load: earlier rows of tables not rebuilt in full tonight, then
    /// tonight's rows.
    async fn quarantine(&mut self) -> Result<()> {
        let mut rows = Vec::new();
        if self.register_previous(QUARANTINE_TABLE, "__previous_quarantine").await? {
            let kept = self.ctx.table("__previous_quarantine").await?;
            let replaced: Vec<_> = self.requarantined.iter().map(|t| datafusion::prelude::lit(t.as_str())).collect();
            let kept = if replaced.is_empty() { kept } else { kept.filter(datafusion::prelude::col("table_name").in_list(replaced, true))? };
            // A quarantine written before the `rule` column existed: its rows read `unclassified`.
            let has_rule = kept.schema().has_column_with_unqualified_name("rule");
            let kept = kept.select(
                quarantine_schema()
                    .fields()
                    .iter()
                    .map(|f| match f.name().as_str() {
                        "rule" if !has_rule => datafusion::prelude::lit("unclassified").alias("rule"),
                        name => datafusion::prelude::col(name),
                    })
                    .collect::<Vec<_>>(),
            )?;
            rows.extend(kept.collect().await?);
        }
        rows.append(&mut self.quarantine);
        self.put(Output::new(QUARANTINE_TABLE, quarantine_schema(), rows)).await?;
        Ok(())
    }

    /// The export files the new snapshot stands for: tonight's, plus files incremental tables
    /// loaded on earlier nights (a full table's files are only tonight's).
    fn ledger(&self, now: &BTreeMap<String, SourceFile>) -> BTreeMap<String, SourceFile> {
        let mut files: BTreeMap<String, SourceFile> = self
            .previous
            .map(|p| p.files.iter().filter(|(k, _)| !self.full_patterns.iter().any(|p| p.matches(k))).map(|(k, f)| (k.clone(), f.clone())).collect())
            .unwrap_or_default();
        files.extend(now.iter().map(|(k, f)| (k.clone(), f.clone())));
        files
    }
}

/// The SQL of a history table (see [`History`]) from the current rows of its table and the
/// previous history registered as `previous` (None: every key starts at version 1, valid since
/// the start).
///
/// `version_key` is a BIGINT surrogate: the previous versions keep theirs, and the versions
/// opened tonight (a changed key's next version, a new key's first) are numbered after the
/// largest stored one, in key and version order. Facts store it (`fact_sales.customer_version`),
/// and an integer is what they group and join on fastest: a text key (`C000123#2`, before)
/// made a query grouping sales by customer version hash strings.
pub(crate) async fn history_sql(ctx: &SessionContext, h: &History, previous: Option<&str>) -> Result<String> {
    let q = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let current = ctx.table(h.of.as_str()).await?;
    let columns: Vec<String> = current.schema().fields().iter().map(|f| f.name().clone()).collect();
    let on = |a: &str, b: &str| h.key.iter().map(|k| format!("{a}.{k} = {b}.{k}", k = q(k))).collect::<Vec<_>>().join(" AND ");
    let changed_at = format!("n.{}", q(&h.changed_at));
    // A NULL of the changed_at column's own type (every UNION branch must agree on types).
    let never = format!("CASE WHEN FALSE THEN {changed_at} END");
    let n_all = columns.iter().map(|c| format!("n.{}", q(c))).collect::<Vec<_>>().join(", ");
    let all = columns.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
    let by_key = h.key.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ");
    // Versions opened tonight (`opened`: their rows without a key), numbered after `base`.
    let numbered = |opened: &str, base: &str| {
        format!(
            "SELECT {all}, version, valid_from, valid_to, is_current, \
             CAST({base} + row_number() OVER (ORDER BY {by_key}, version) AS BIGINT) AS version_key FROM ({opened}) opened"
        )
    };
    let first = format!("SELECT {n_all}, CAST(1 AS BIGINT) AS version, {never} AS valid_from, {never} AS valid_to, TRUE AS is_current FROM {of} n", of = q(&h.of));
    let Some(prev) = previous else { return Ok(numbered(&first, "0")) };
    let differs = h.columns.iter().map(|c| format!("(n.{c} IS DISTINCT FROM p.{c})", c = q(c))).collect::<Vec<_>>().join(" OR ");
    // Earlier versions: tracked columns as they were, the others as the table has them now.
    let key0 = q(&h.key[0]);
    let kept_columns = columns
        .iter()
        .map(|c| {
            if h.columns.contains(c) || h.key.contains(c) {
                format!("p.{}", q(c))
            } else {
                format!("CASE WHEN n.{key0} IS NULL THEN p.{c} ELSE n.{c} END AS {c}", c = q(c))
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let changed = format!("(p.is_current AND n.{key0} IS NOT NULL AND ({differs}))");
    let opened = format!(
        "SELECT {n_all}, p.version + 1 AS version, {changed_at} AS valid_from, {never} AS valid_to, TRUE AS is_current
         FROM {of} n JOIN {prev} p ON {on_pn} AND p.is_current WHERE {differs}
         UNION ALL
         {first} WHERE NOT EXISTS (SELECT 1 FROM {prev} p WHERE {on_pn})",
        of = q(&h.of),
        on_pn = on("p", "n"),
    );
    Ok(format!(
        "SELECT {kept_columns}, p.version, p.valid_from,
                CASE WHEN {changed} THEN {changed_at} ELSE p.valid_to END AS valid_to,
                p.is_current AND NOT {changed} AS is_current, p.version_key
         FROM {prev} p LEFT JOIN {of} n ON {on_pn}
         UNION ALL
         {numbered}",
        of = q(&h.of),
        on_pn = on("p", "n"),
        numbered = numbered(&opened, &format!("(SELECT coalesce(max(version_key), 0) FROM {prev})")),
    ))
}

/// The greatest value of `column` in `rows`, as text (None when there is none).
async fn max_text(ctx: &SessionContext, schema: &SchemaRef, rows: &[RecordBatch], column: &str) -> Result<Option<String>> {
    let df = ctx.read_batches(crate::warehouse::with_empty(schema, rows.to_vec()))?;
    let max = df.aggregate(vec![], vec![datafusion::functions_aggregate::expr_fn::max(datafusion::prelude::col(column))])?;
    first_text(&max.collect().await?)
}

/// The first value of a one-row result as text (None when NULL).
fn first_text(batches: &[RecordBatch]) -> Result<Option<String>> {
    let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else { return Ok(None) };
    if b.column(0).is_null(0) {
        return Ok(None);
    }
    let text = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8)?;
    let text = text.as_any().downcast_ref::<datafusion::arrow::array::StringArray>().ok_or_else(|| Error::Internal("cast to text".into()))?;
    Ok(Some(text.value(0).to_string()))
}

/// `rows` in the SELECT's `schema`: rows read back from Parquet say every column may be NULL,
/// where the SELECT may know better.
fn in_schema(schema: &SchemaRef, rows: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    Ok(rows.into_iter().map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec())).collect::<std::result::Result<Vec<_>, _>>()?)
}

/// A NULL partition's name among a partitioned table's prints (a date or integer never reads so).
const NULL_PARTITION: &str = "NULL";

/// The name among the prints of the partition `p` prints.
fn partition_of(p: &crate::rollup::partitions::KeyPrint) -> String {
    p.text().unwrap_or(NULL_PARTITION).to_string()
}
/// The columns' names and types, among a partitioned table's prints: rows print by their values
/// alone, so a renamed column or a changed type would otherwise pass for unchanged rows.
const COLUMNS_PRINT: &str = "#columns";

/// The partitions `changed` (their texts among the prints) as a filter on `column`: its values,
/// as `schema` types them, and NULL. None when a value's text does not read back as that type.
fn partitions_filter(schema: &Schema, column: &str, changed: &BTreeSet<&String>) -> Result<Option<datafusion::prelude::Expr>> {
    use datafusion::prelude::{Expr, ident, lit};
    let ty = schema.field_with_name(column)?.data_type().clone();
    let values: Option<Vec<Expr>> =
        changed.iter().filter(|k| k.as_str() != NULL_PARTITION).map(|k| datafusion::scalar::ScalarValue::try_from_string(k.to_string(), &ty).ok().map(lit)).collect();
    Ok(values.and_then(|values| {
        let null = changed.iter().any(|k| k.as_str() == NULL_PARTITION).then(|| ident(column).is_null());
        let listed = (!values.is_empty()).then(|| ident(column).in_list(values, false));
        listed.into_iter().chain(null).reduce(Expr::or)
    }))
}

/// The columns a derived table's layout names that its SELECT's `schema` lacks, each a problem
/// at `line`:`column` of its file (with the nearest column).
pub(crate) fn layout_problems(t: &Transform, schema: &Schema, line: u64, column: u64) -> Vec<Diagnostic> {
    let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    t.layout
        .missing(schema)
        .into_iter()
        .map(|c| Diagnostic {
            file: t.file.clone(),
            line,
            column,
            key: format!("table '{}' › layout", t.name),
            message: format!("column '{c}' is not a column of the table's SELECT"),
            hint: Some(crate::error::valid_names_hint("columns", c, columns.iter().copied())),
        })
        .chain(t.layout.unpartitionable(schema).map(|(_, message)| Diagnostic {
            file: t.file.clone(),
            line,
            column,
            key: format!("table '{}' › layout › partition_by", t.name),
            message,
            hint: Some(crate::warehouse::Layout::PARTITION_HINT.into()),
        }))
        .collect()
}

/// Names of the tables a SQL statement reads.
pub(crate) fn referenced_tables(ctx: &SessionContext, sql: &str) -> Result<Vec<String>> {
    let state = ctx.state();
    let statement = state.sql_to_statement(sql, &datafusion::config::Dialect::Generic)?;
    let refs = state.resolve_table_references(&statement)?;
    Ok(refs.iter().map(|r| r.table().to_string()).collect())
}

fn derived_error(set: &TransformSet, table: &str, e: datafusion::error::DataFusionError) -> Error {
    // Out of memory is not a mistake in the SELECT.
    if matches!(e.find_root(), datafusion::error::DataFusionError::ResourcesExhausted(_)) {
        return Error::Engine(e);
    }
    let file = set.get(table).map(|t| t.file.display().to_string()).unwrap_or_default();
    Error::Spec(crate::error::SpecErrors(vec![crate::error::Diagnostic {
        file: file.into(),
        line: 0,
        column: 0,
        key: format!("table '{table}' › sql"),
        message: e.to_string(),
        hint: Some("fix the SELECT; `crmcube sql` runs it over the current snapshot".into()),
    }]))
}

/// Why `plan` is not a row-wise function of `driver`'s rows — each output row from one driver row,
/// joined (inner, or left with the driver on the left) and filtered — or None when it is. The
/// tables it reads (`inputs`) are leaves, whether scanned or inlined as views.
pub(crate) fn not_row_wise(plan: &datafusion::logical_expr::LogicalPlan, driver: &str, inputs: &[String]) -> Option<String> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{JoinType, LogicalPlan};
    if let Some(why) = super::keyed::time_dependent(plan) {
        return Some(why);
    }
    // The name of the input table a node stands for, if it is one: a scan, or a view the load
    // registered under an input's name (over tables of its own). A CTE named like an input reads
    // input tables: it is followed into (`WITH lines AS (SELECT … FROM lines GROUP BY …)` is not
    // the lines).
    let scans_input = |p: &LogicalPlan| p.exists(|n| Ok(matches!(n, LogicalPlan::TableScan(s) if inputs.iter().any(|i| i == s.table_name.table())))).unwrap_or(true);
    let table = |n: &LogicalPlan| match n {
        LogicalPlan::TableScan(s) => Some(s.table_name.table().to_string()),
        LogicalPlan::SubqueryAlias(a) if inputs.iter().any(|i| i == a.alias.table()) && !scans_input(&a.input) => Some(a.alias.table().to_string()),
        _ => None,
    };
    let reads = |p: &LogicalPlan| p.exists(|n| Ok(table(n).as_deref() == Some(driver))).unwrap_or(true);
    let (mut scans, mut why) = (0, None);
    let _ = plan.apply(|node| {
        if let Some(t) = table(node) {
            scans += usize::from(t == driver);
            return Ok(TreeNodeRecursion::Jump);
        }
        let problem = match node {
            LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => None,
            LogicalPlan::Join(j) if j.join_type == JoinType::Inner => None,
            LogicalPlan::Join(j) if j.join_type == JoinType::Left && !reads(&j.right) => None,
            LogicalPlan::Join(j) => Some(format!("it has a {} join", j.join_type)),
            other => Some(format!("it has a step `{}`", other.display().to_string().split(':').next().unwrap_or_default())),
        };
        let problem = problem.or_else(|| node.expressions().iter().any(crate::rollup::has_subquery).then(|| "it has a subquery".to_string()));
        if problem.is_some() {
            why = problem;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    why.or_else(|| (scans != 1).then(|| format!("it reads {driver} {scans} times")))
}

/// Names the table a load was making when it ran out of memory: DataFusion's message names only
/// the operator (`HashJoinInput[0]`).
fn in_table<T>(table: &str, result: Result<T>) -> Result<T> {
    result.map_err(|e| match e {
        Error::Engine(d) if matches!(d.find_root(), datafusion::error::DataFusionError::ResourcesExhausted(_)) => {
            Error::Engine(d.context(format!("making table '{table}'")))
        }
        e => e,
    })
}

/// Quarantine rows for records rejected while reading the export.
fn rejects_batch(rejects: &[Reject]) -> Result<RecordBatch> {
    use datafusion::arrow::array::{Int64Array, StringArray};
    Ok(RecordBatch::try_new(
        quarantine_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.table.as_str()))),
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.file.as_str()))),
            Arc::new(Int64Array::from_iter_values(rejects.iter().map(|r| r.line))),
            Arc::new(StringArray::from_iter(rejects.iter().map(|r| r.column.as_deref()))),
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.rule))),
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.reason.as_str()))),
            Arc::new(StringArray::from_iter_values(rejects.iter().map(|r| r.raw.as_str()))),
        ],
    )?)
}

/// Whether two ledgers name the same files with the same content: a file read again tonight
/// and stamped (see [`crate::warehouse::Stamp`]) is still the file the snapshot loaded.
fn same_files(a: &BTreeMap<String, SourceFile>, b: &BTreeMap<String, SourceFile>) -> bool {
    a.len() == b.len() && a.values().zip(b.values()).all(|(x, y)| x.same_content(y))
}

/// A file's size and modification time (by the file's own clock, so a writer with another clock
/// does not matter).
#[derive(PartialEq)]
struct FileStat {
    bytes: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStat {
    fn of(f: &std::path::Path) -> Result<Self> {
        let m = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        Ok(Self { bytes: m.len(), modified: m.modified().ok() })
    }
}

/// Stops the load if a source's export was rewritten while this load read it (still being
/// written, or replaced): it would load rows of two versions, and the ledger would name a
/// checksum it did not read.
fn unchanged_while_read(project: &Project, files: &[PathBuf], surveyed: &[SourceFile], before: &[FileStat]) -> Result<()> {
    for ((path, surveyed), before) in files.iter().zip(surveyed).zip(before) {
        let now = FileStat::of(path)?;
        if now.bytes != surveyed.bytes || now != *before {
            return Err(DataError::Input {
                file: project.display_path(path),
                line: None,
                message: format!(
                    "the file changed while this load read it ({} bytes when surveyed, {} now{}); nothing was committed — \
                     load again once the export is complete",
                    surveyed.bytes,
                    now.bytes,
                    if now.modified != before.modified { ", modified since" } else { "" }
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// Starts extracting a source's files (none for a kept table) on a blocking thread, its memory
/// reserved in `pool` first (an error now when it does not fit) and then held, as the extracted
/// text's size, until it is cleaned.
///
/// `leave` is `(bytes, limit)` when reading ahead of another source's cleaning under a memory
/// limit: the reservation is taken only if `bytes` of the limit stay free beside it (else None:
/// the caller reads this source later).
fn spawn_extraction(
    pool: &Arc<dyn MemoryPool>,
    table: &str,
    spec: &SourceTransform,
    plan: &SourcePlan,
    root: &std::path::Path,
    leave: Option<(usize, usize)>,
) -> Result<Option<tokio::task::JoinHandle<Result<Option<Extracted>>>>> {
    let (files, reservation) = match plan {
        SourcePlan::Keep => (None, None),
        SourcePlan::Full(files) | SourcePlan::Incremental(files) => {
            let reservation = match (reserve_extraction(pool, table, spec, files), leave) {
                (Ok(r), Some((bytes, limit))) if pool.reserved() + bytes > limit => {
                    drop(r);
                    return Ok(None);
                }
                (Ok(r), _) => r,
                (Err(e), Some(_)) if e.is_out_of_memory() => return Ok(None),
                (Err(e), _) => return Err(e),
            };
            (Some(files.clone()), Some(reservation))
        }
    };
    let (table, spec, root) = (table.to_string(), spec.clone(), root.to_path_buf());
    Ok(Some(tokio::task::spawn_blocking(move || {
        let (Some(files), Some(reservation)) = (files, reservation) else { return Ok(None) };
        let ex = extract::extract_files(&table, &spec, &files, &root)?;
        // What the extracted text holds, not what reading it took at its peak.
        reservation.resize(crate::warehouse::memory_size(&ex.batches));
        Ok(Some(ex.with_reservation(reservation)))
    })))
}

/// Reserves, before a source's files are read, the memory extracting them takes at its peak: the
/// file's bytes (and their decoded copy for GBK) and the fields' text (each about the file's
/// size), and per record an offset for each column, its line, its place in the file and its
/// file (records estimated from the lines of each file's first MiB).
fn reserve_extraction(pool: &Arc<dyn MemoryPool>, table: &str, spec: &SourceTransform, files: &[PathBuf]) -> Result<MemoryReservation> {
    const SAMPLE: usize = 1 << 20;
    let (mut bytes, mut records) = (0u64, 0u64);
    for f in files {
        use std::io::Read;
        let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
        let mut head = Vec::with_capacity(SAMPLE);
        std::fs::File::open(f).and_then(|file| file.take(SAMPLE as u64).read_to_end(&mut head)).map_err(|e| Error::io(f, e))?;
        let lines = head.iter().filter(|b| **b == b'\n').count() as u64 + 1;
        bytes += len;
        records += lines * len.div_ceil(head.len().max(1) as u64);
    }
    let texts = match spec.source.encoding {
        super::spec::SourceEncoding::Utf8 => 2,
        super::spec::SourceEncoding::Gbk => 3,
    };
    let per_record = 4 * spec.columns.len() as u64 + 8 + 8 + 4 + 4;
    let need = usize::try_from(bytes.saturating_mul(texts).saturating_add(records.saturating_mul(per_record))).unwrap_or(usize::MAX);
    let reservation = MemoryConsumer::new(format!("load: extracting table '{table}'")).register(pool);
    reservation
        .try_grow(need)
        .map_err(|e| e.context(format!("extracting table '{table}' ({} of export files) needs about {}", mib(bytes as usize), mib(need))))?;
    Ok(reservation)
}

/// A size for messages, in MiB with one decimal.
pub(crate) fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::memory_pool::GreedyMemoryPool;

    /// Only joins and filters of the driver's rows grow with it; anything that combines rows
    /// (or reads the driver on the kept side of another table's join) recomputes the table.
    #[tokio::test]
    async fn a_select_grows_with_its_driver_only_when_each_row_comes_from_one_driver_row() {
        let ctx = SessionContext::new();
        for t in ["CREATE TABLE lines (order_id TEXT, qty INT)", "CREATE TABLE orders (order_id TEXT, day DATE)"] {
            ctx.sql(t).await.unwrap().collect().await.unwrap();
        }
        let inputs = vec!["lines".to_string(), "orders".to_string()];
        let why = |sql: &'static str| {
            let (ctx, inputs) = (ctx.clone(), inputs.clone());
            async move { not_row_wise(&ctx.sql(sql).await.unwrap().into_unoptimized_plan(), "lines", &inputs) }
        };
        assert_eq!(why("SELECT l.order_id, l.qty * 2 AS q, o.day FROM lines l JOIN orders o ON l.order_id = o.order_id WHERE l.qty > 0").await, None);
        assert_eq!(why("SELECT l.order_id, o.day FROM lines l LEFT JOIN orders o ON l.order_id = o.order_id").await, None);
        for (sql, expected) in [
            ("SELECT order_id, sum(qty) FROM lines GROUP BY 1", "Aggregate"),
            ("SELECT DISTINCT order_id FROM lines", "Distinct"),
            ("SELECT o.order_id FROM orders o LEFT JOIN lines l ON l.order_id = o.order_id", "Left join"),
            ("SELECT order_id FROM lines UNION ALL SELECT order_id FROM lines", "Union"),
            ("SELECT order_id FROM lines WHERE qty > (SELECT avg(qty) FROM lines)", "subquery"),
            ("SELECT order_id, row_number() OVER (ORDER BY qty) FROM lines", "Window"),
            ("SELECT order_id FROM orders", "reads lines 0 times"),
            // CTEs named like an input are not that input.
            ("WITH lines AS (SELECT order_id, sum(qty) AS qty FROM lines GROUP BY 1) SELECT order_id, qty FROM lines", "Aggregate"),
            ("WITH orders AS (SELECT order_id, count(*) AS n FROM lines GROUP BY 1) SELECT l.order_id, o.n FROM lines l JOIN orders o ON l.order_id = o.order_id", "Aggregate"),
            ("SELECT order_id, qty FROM lines WHERE now() > TIMESTAMP '2026-01-01'", "calls now()"),
        ] {
            let got = why(sql).await.unwrap_or_else(|| panic!("{sql} is not row-wise"));
            assert!(got.contains(expected), "{sql}: {got}");
        }
    }

    #[test]
    fn extraction_reserves_its_files_text_and_records_before_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("orders.csv");
        // 2 MiB of 64-byte lines: 32,768 records.
        let line = format!("{}\n", "x".repeat(63));
        std::fs::write(&file, line.repeat(32 * 1024)).unwrap();
        let project = dir.path().join("p");
        std::fs::create_dir_all(project.join("transforms")).unwrap();
        std::fs::write(project.join("crmcube.yaml"), format!("version: 1\nname: t\nsources: {}\n", dir.path().display())).unwrap();
        std::fs::write(
            project.join("transforms/orders.yaml"),
            "version: 1\ntable: orders\nsource: { path: orders.csv }\ncolumns:\n  - { name: order_id, type: string }\n",
        )
        .unwrap();
        let set = TransformSet::load(&crate::project::Project::open(&project).unwrap()).unwrap();
        let Some(TransformBody::Source(spec)) = set.get("orders").map(|t| &t.body) else { panic!("a source") };
        // Two copies of the text (file, fields); per record the column's offset (4 bytes), its
        // line (8), its place in the file (8 and 4) and its file (4): 28 bytes. The records are
        // estimated from the first MiB (16,384 lines ending in it, and the one after) times two.
        let expected = 2 * (2 << 20) + 2 * (16_384 + 1) * 28;

        let small: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(4 << 20));
        let err = reserve_extraction(&small, "orders", spec, std::slice::from_ref(&file)).unwrap_err();
        assert!(err.is_out_of_memory(), "{err}");
        assert!(err.to_string().contains("extracting table 'orders' (2.0 MiB of export files) needs about 4.9 MiB"), "{err}");
        assert_eq!(small.reserved(), 0, "a failed reservation holds nothing");

        let enough: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(8 << 20));
        let reservation = reserve_extraction(&enough, "orders", spec, std::slice::from_ref(&file)).unwrap();
        assert_eq!((reservation.size(), enough.reserved()), (expected, expected));
        drop(reservation);
        assert_eq!(enough.reserved(), 0);
    }
}
