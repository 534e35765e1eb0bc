//! The warehouse on disk: Delta tables plus the snapshot manifests that tie them together.
//!
//! ```text
//! warehouse/
//!   tables/<name>/            one Delta table per warehouse table (Parquet + _delta_log/)
//!   snapshots/000001.json     a manifest: each table's Delta version and row count
//!   CURRENT                   the id of the snapshot readers open
//! ```
//! Delta commits are atomic per table, but a load writes many tables. A load therefore commits
//! every table first and only then writes a new manifest and swaps `CURRENT` by an atomic rename.
//! Readers open exactly the versions the current manifest names, so they see the previous load or
//! the new one, never a mix; a load that fails or is killed before the rename leaves the previous
//! snapshot in place.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::prelude::{DataFrame, SessionContext};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::error::{DataError, Error, Result};

pub mod joins;

/// The SQL catalog query sessions name (`crmcube.warehouse.fact_sales`).
pub const CATALOG: &str = "crmcube";
/// The schema holding the warehouse tables; the default schema of every query session.
pub const WAREHOUSE_SCHEMA: &str = "warehouse";

/// One table in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// The Delta version readers open.
    pub version: u64,
    pub rows: u64,
    /// Fingerprint of the metadata the table was built from (its transform file); a table whose
    /// transform changed is rebuilt even when its inputs did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<String>,
    /// Incremental sources: the greatest watermark value loaded so far, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// Rollups: the fingerprint of the fact rows each refresh unit was built from (see
    /// [`crate::rollup::partitions`]); the next load rebuilds only units whose rows changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, String>,
}

impl TableEntry {
    pub fn new(version: u64, rows: u64) -> Self {
        Self { version, rows, spec: None, watermark: None, partitions: BTreeMap::new() }
    }
}

/// How a table's Parquet files are written (a transform's `layout:`).
///
/// Every file gets min/max statistics per row group and per page and a page index (the Parquet
/// writer's defaults); what a layout adds is measured in the dashboard bench (`benches/dashboard.rs`)
/// and recorded in the README's layout section: sorting the rows by the columns queries filter
/// on makes those statistics narrow, so a filter skips row groups and pages instead of decoding
/// them; a Bloom filter lets a lookup of one value skip row groups whose range holds it but whose
/// rows do not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub sort_by: Vec<String>,
    pub row_group_rows: Option<usize>,
    pub bloom_filters: Vec<String>,
    /// A date or integer column whose values split the table into Delta partitions; a load
    /// rewrites only the partitions whose rows changed (see `etl::load`, `Run::put`).
    pub partition_by: Option<String>,
}

impl Layout {
    pub const PARTITION_HINT: &str = "partition by a date or integer column (e.g. a month's first or last day)";

    /// The columns the layout names that `schema` lacks (a derived table's SELECT is only known
    /// once planned).
    pub fn missing<'a>(&'a self, schema: &Schema) -> Vec<&'a str> {
        self.sort_by.iter().chain(&self.bloom_filters).chain(&self.partition_by).map(String::as_str).filter(|c| schema.field_with_name(c).is_err()).collect()
    }

    /// Why `partition_by` cannot split a table of `schema`, if it cannot: partitions are by a
    /// date or an integer. (Delta stores a partition's value in its folder name; a text column
    /// would read back dictionary-encoded, another type than the table had when it was made.)
    pub fn unpartitionable(&self, schema: &Schema) -> Option<(&str, String)> {
        let c = self.partition_by.as_deref()?;
        let ty = schema.field_with_name(c).ok()?.data_type();
        let partitionable = matches!(ty, DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::Date32);
        (!partitionable).then(|| (c, format!("column '{c}' is of type {ty}: a table is partitioned by a date or integer column")))
    }

    /// The Parquet writer's settings: delta-rs's own (Snappy) plus the row-group size and Bloom
    /// filters asked for.
    pub fn writer_properties(&self) -> deltalake::parquet::file::properties::WriterProperties {
        use deltalake::parquet::basic::Compression;
        use deltalake::parquet::file::properties::WriterProperties;
        use deltalake::parquet::schema::types::ColumnPath;
        let mut b = WriterProperties::builder().set_created_by(format!("crmcube {}", env!("CARGO_PKG_VERSION"))).set_compression(Compression::SNAPPY);
        if let Some(n) = self.row_group_rows {
            b = b.set_max_row_group_row_count(Some(n));
        }
        for c in &self.bloom_filters {
            b = b.set_column_bloom_filter_enabled(ColumnPath::from(c.as_str()), true);
        }
        b.build()
    }

    /// A Delta write with the layout's writer settings. delta-rs writes a plan's partitions
    /// through one writer, interleaving their batches; a sorted table's rows are written from one
    /// partition so its files keep the order.
    fn configure(&self, write: deltalake::operations::write::WriteBuilder) -> deltalake::operations::write::WriteBuilder {
        let write = write.with_writer_properties(self.writer_properties());
        if self.sort_by.is_empty() {
            return write;
        }
        let mut state = deltalake::delta_datafusion::create_session().state();
        state.config_mut().options_mut().execution.target_partitions = 1;
        write.with_session_state(Arc::new(state))
    }

    /// `rows` in the layout's order (unchanged without `sort_by`); a sort that outgrows the
    /// session's memory limit spills.
    pub async fn sort(&self, ctx: &SessionContext, rows: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        if self.sort_by.is_empty() || rows.iter().map(RecordBatch::num_rows).sum::<usize>() < 2 {
            return Ok(rows);
        }
        Ok(ctx.read_batches(rows)?.sort(self.sort_exprs())?.collect().await?)
    }

    /// `sort_by` as DataFusion sort expressions (ascending, NULLs last).
    pub fn sort_exprs(&self) -> Vec<datafusion::logical_expr::SortExpr> {
        self.sort_by.iter().map(|c| datafusion::prelude::col(datafusion::common::Column::new_unqualified(c)).sort(true, false)).collect()
    }
}

/// A consistent state of the whole warehouse: what one load produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    /// RFC 3339 time the snapshot was committed.
    pub committed_at: String,
    pub tables: BTreeMap<String, TableEntry>,
    /// The export files this snapshot was loaded from, by path under the sources folder
    /// (absent in manifests written before files were recorded).
    #[serde(default)]
    pub files: BTreeMap<String, SourceFile>,
    /// Rollup tables of this snapshot with the fingerprint of the definition they were built
    /// from ([`crate::cube::Rollup::fingerprint`]); a rollup answers queries only while its cube
    /// file still has that definition.
    #[serde(default)]
    pub rollups: BTreeMap<String, String>,
}

/// One export file as a load read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path under the sources folder (so a different `--source` folder per night compares).
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// The file's [`Stamp`] when it was read, if it had settled by then: a later load that
    /// finds the same stamp (and size) trusts `sha256` without reading the file again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
}

/// When and where a file was last written, as its file system tells: modification and status
/// change times (nanoseconds since 1970), inode and device. As git trusts its index, a load
/// trusts a recorded checksum while the stamp and size are the same: writing a file's content
/// changes its status change time, which no tool can set back (`touch -d`, `cp -p` and
/// `rsync -t` restore the modification time only). Unix only; elsewhere every file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub modified_ns: i64,
    pub changed_ns: i64,
    pub inode: u64,
    pub device: u64,
}

impl Stamp {
    /// Seconds a file must have been left alone before it is read for its stamp to be recorded:
    /// a write in the same tick of a coarse clock as the one before would leave the stamp as it
    /// was (git's "racily clean" files).
    pub const SETTLE_SECONDS: i64 = 2;

    #[cfg(unix)]
    pub fn of(meta: &std::fs::Metadata) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| s.checked_mul(1_000_000_000)?.checked_add(n);
        Some(Stamp { modified_ns: ns(meta.mtime(), meta.mtime_nsec())?, changed_ns: ns(meta.ctime(), meta.ctime_nsec())?, inode: meta.ino(), device: meta.dev() })
    }

    #[cfg(not(unix))]
    pub fn of(_meta: &std::fs::Metadata) -> Option<Stamp> {
        None
    }

    /// Whether the file was last written at least [`Self::SETTLE_SECONDS`] before `now`.
    pub fn settled_by(&self, now: std::time::SystemTime) -> bool {
        let now = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        self.modified_ns.max(self.changed_ns) < now - Self::SETTLE_SECONDS * 1_000_000_000
    }
}

impl SourceFile {
    pub fn of(path: String, content: &[u8]) -> Self {
        Self { path, bytes: content.len() as u64, sha256: hex(&Sha256::digest(content)), stamp: None }
    }

    /// The same content as `other` (size and checksum), whatever the stamps.
    pub fn same_content(&self, other: &SourceFile) -> bool {
        self.path == other.path && self.bytes == other.bytes && self.sha256 == other.sha256
    }

    /// [`Self::of`] a file's content, read in blocks (an export of gigabytes is not held).
    pub fn read(path: String, mut file: impl std::io::Read) -> std::io::Result<Self> {
        let (mut hasher, mut block, mut bytes) = (Sha256::new(), vec![0u8; 1 << 20], 0u64);
        loop {
            let n = file.read(&mut block)?;
            if n == 0 {
                break;
            }
            hasher.update(&block[..n]);
            bytes += n as u64;
        }
        Ok(Self { path, bytes, sha256: hex(&hasher.finalize()), stamp: None })
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A warehouse folder.
#[derive(Debug, Clone)]
pub struct Warehouse {
    root: PathBuf,
    /// Memory pool of each session this warehouse opens (loads and queries), in bytes.
    memory_limit: Option<usize>,
}

impl Warehouse {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), memory_limit: None }
    }

    /// Bounds the memory of every session (query or load) to `bytes`: sorts, aggregations and
    /// joins that can spill do so to temporary files; what cannot fails with "Resources
    /// exhausted" instead of growing until the kernel kills the process.
    pub fn with_memory_limit(mut self, bytes: Option<usize>) -> Self {
        self.memory_limit = bytes;
        self
    }

    /// The limit of a session's memory pool, if any (`--memory-limit`).
    pub fn memory_limit(&self) -> Option<usize> {
        self.memory_limit
    }

    /// An empty session with the warehouse's catalog names and memory limit.
    pub fn context(&self) -> Result<SessionContext> {
        let mut config = datafusion::prelude::SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, WAREHOUSE_SCHEMA)
            .with_information_schema(true);
        if let Some(bytes) = self.memory_limit {
            // A spilling sort reserves this much for its merge (10 MB by default, more than a
            // small limit holds); an eighth of the pool leaves room for the sort itself.
            let options = config.options_mut();
            options.execution.sort_spill_reservation_bytes = options.execution.sort_spill_reservation_bytes.min(bytes / 8);
        }
        // Hash joins build on the dimension side of a star join (see `joins`).
        let options = config.options_mut();
        options.optimizer.use_statistics_registry = true;
        options.optimizer.hash_join_single_partition_threshold = joins::COLLECT_BYTES;
        options.optimizer.hash_join_single_partition_threshold_rows = joins::COLLECT_ROWS;
        let mut runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new();
        if let Some(bytes) = self.memory_limit {
            // The error of a reservation that does not fit names the largest consumers too.
            use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
            let pool = TrackConsumersPool::new(FairSpillPool::new(bytes), std::num::NonZeroUsize::new(5).expect("five is not zero"));
            runtime = runtime.with_memory_pool(std::sync::Arc::new(pool));
        }
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime.build_arc()?)
            .with_default_features()
            .with_statistics_registry(joins::registry())
            .build();
        Ok(SessionContext::new_with_state(state))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of a table's Delta log and Parquet files.
    pub fn table_path(&self, name: &str) -> PathBuf {
        self.root.join("tables").join(name)
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn table_url(&self, name: &str) -> Result<url::Url> {
        let path = self.table_path(name);
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        let abs = path.canonicalize().map_err(|e| Error::io(&path, e))?;
        url::Url::from_directory_path(&abs)
            .map_err(|_| Error::Internal(format!("cannot turn {} into a URL", abs.display())))
    }

    /// Replaces a table's content with `batches` as a new Delta version; returns the version.
    ///
    /// The new version is invisible to readers until a snapshot naming it is committed.
    pub async fn write_table(&self, name: &str, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<u64> {
        self.write_partitioned(name, schema, batches, &[], &Layout::default()).await
    }

    /// [`Self::write_table`] with the files split by the values of `partition` columns (Delta
    /// partitions: a filter on them skips whole folders).
    /// The rows are written in the order given: [`Layout::sort`] first for a sorted layout.
    pub async fn write_partitioned(&self, name: &str, schema: SchemaRef, batches: Vec<RecordBatch>, partition: &[String], layout: &Layout) -> Result<u64> {
        let delta_err = |source| Error::Delta { table: name.to_string(), source };
        let (schema, mut batches) = delta_compatible(schema, batches)?;
        if batches.is_empty() {
            batches.push(RecordBatch::new_empty(schema));
        }
        let url = self.table_url(name)?;
        // A table's first write starts from an unloaded handle: loading a log that does not exist
        // yet fails (and delta-rs logs it as an ERROR a user would take for a failed load).
        let table = if self.table_path(name).join("_delta_log").exists() {
            DeltaTable::try_from_url(url).await.map_err(delta_err)?
        } else {
            DeltaTableBuilder::from_url(url).map_err(delta_err)?.build().map_err(delta_err)?
        };
        let table = layout
            .configure(table.write(batches))
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite)
            .with_table_name(name)
            .with_partition_columns(partition.to_vec())
            .await
            .map_err(delta_err)?;
        table
            .version()
            .ok_or_else(|| Error::Internal(format!("table '{name}' has no version after a write")))
    }

    /// Replaces the rows of some partitions of a table partitioned by `column` (the ones `which`
    /// selects, a filter on `column` alone) with `batches`, which must all lie in them, as a new
    /// Delta version; returns the version. The files of every other partition stay as they are.
    /// The schema must be the table's: a changed one needs [`Self::write_partitioned`].
    pub async fn replace_partitions(&self, name: &str, schema: SchemaRef, batches: Vec<RecordBatch>, column: &str, which: datafusion::prelude::Expr, layout: &Layout) -> Result<u64> {
        let delta_err = |source| Error::Delta { table: name.to_string(), source };
        let (schema, mut batches) = delta_compatible(schema, batches)?;
        if batches.is_empty() {
            batches.push(RecordBatch::new_empty(schema));
        }
        let table = DeltaTable::try_from_url(self.table_url(name)?).await.map_err(delta_err)?;
        let table = layout
            .configure(table.write(batches))
            .with_save_mode(SaveMode::Overwrite)
            .with_replace_where(which)
            .with_partition_columns([column.to_string()])
            .await
            .map_err(delta_err)?;
        table
            .version()
            .ok_or_else(|| Error::Internal(format!("table '{name}' has no version after a write")))
    }

    /// Adds `batches` to a table as a new Delta version (only the new rows are written; columns
    /// the table lacks are added, nullable); returns the version.
    pub async fn append_table(&self, name: &str, schema: SchemaRef, batches: Vec<RecordBatch>, layout: &Layout) -> Result<u64> {
        let delta_err = |source| Error::Delta { table: name.to_string(), source };
        let (_, batches) = delta_compatible(schema, batches)?;
        let table = DeltaTable::try_from_url(self.table_url(name)?).await.map_err(delta_err)?;
        let table = layout
            .configure(table.write(batches))
            .with_save_mode(SaveMode::Append)
            .with_schema_mode(deltalake::operations::write::SchemaMode::Merge)
            .await
            .map_err(delta_err)?;
        table
            .version()
            .ok_or_else(|| Error::Internal(format!("table '{name}' has no version after a write")))
    }

    /// The snapshot readers currently see, if any load has committed.
    pub fn current(&self) -> Result<Option<Snapshot>> {
        let current = self.root.join("CURRENT");
        let id = match std::fs::read_to_string(&current) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| DataError::Input {
                file: current.clone(),
                line: Some(1),
                message: format!("expected a snapshot id, found '{}'", text.trim()),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(current, e)),
        };
        self.snapshot(id).map(Some)
    }

    /// Reads one snapshot manifest.
    pub fn snapshot(&self, id: u64) -> Result<Snapshot> {
        let path = self.snapshots_dir().join(format!("{id:06}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| DataError::Input { file: path, line: Some(e.line() as u64), message: e.to_string() }.into())
    }

    /// Makes `tables` the new current snapshot: manifest first, then an atomic swap of CURRENT.
    pub fn commit(
        &self,
        tables: BTreeMap<String, TableEntry>,
        files: BTreeMap<String, SourceFile>,
        rollups: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        let id = self.current()?.map(|s| s.id).unwrap_or(0) + 1;
        let snapshot = Snapshot { id, committed_at: chrono::Utc::now().to_rfc3339(), tables, files, rollups };
        let dir = self.snapshots_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let json = serde_json::to_vec_pretty(&snapshot).map_err(|e| Error::Internal(e.to_string()))?;
        crate::fault::point("before the snapshot manifest");
        write_atomic(&dir.join(format!("{id:06}.json")), &json)?;
        crate::fault::point("between the manifest and CURRENT");
        write_atomic(&self.root.join("CURRENT"), format!("{id}\n").as_bytes())?;
        Ok(snapshot)
    }

    /// The current snapshot; an error telling the user to load first when there is none.
    pub fn current_or_error(&self) -> Result<Snapshot> {
        Ok(self.current()?.ok_or_else(|| DataError::Input {
            file: self.root.clone(),
            line: None,
            message: "the warehouse has no snapshot yet; run `crmcube load` first".into(),
        })?)
    }

    /// A query session over the current snapshot.
    pub async fn session(&self) -> Result<SessionContext> {
        self.session_at(None).await
    }

    /// Snapshot `id` as a reader may open it (`--as-of`): committed, so not above the current
    /// one (a manifest there is a killed load's), and still kept (not vacuumed).
    pub fn committed(&self, id: u64) -> Result<Snapshot> {
        let current = self.current_or_error()?;
        let kept = self.snapshots_dir().join(format!("{id:06}.json")).exists();
        if id > current.id || !kept {
            let why = if id > current.id { "was never committed" } else { "was removed by `crmcube vacuum`" };
            return Err(DataError::Input {
                file: self.root.clone(),
                line: None,
                message: format!("snapshot {id} {why}; the current snapshot is {} (`crmcube history` lists the ones kept)", current.id),
            }
            .into());
        }
        self.snapshot(id)
    }

    /// A query session over snapshot `id`, or the current one. An older snapshot stays readable
    /// as long as the Delta versions it names are kept.
    pub async fn session_at(&self, id: Option<u64>) -> Result<SessionContext> {
        let snapshot = match id {
            Some(id) => self.committed(id)?,
            None => self.current_or_error()?,
        };
        let ctx = self.context()?;
        self.register(&ctx, &snapshot).await?;
        Ok(ctx)
    }

    /// Every committed snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let dir = self.snapshots_dir();
        let mut ids: Vec<u64> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(dir, e)),
        };
        // A manifest above CURRENT's id was written by a load killed before it committed: not a
        // snapshot (the next commit writes its own manifest over it).
        let current = self.current()?.map_or(0, |s| s.id);
        ids.retain(|id| *id <= current);
        ids.sort();
        ids.into_iter().map(|id| self.snapshot(id)).collect()
    }

    /// Keeps the newest `keep` snapshots and deletes what only older ones needed: their manifests
    /// and the Parquet files no retained snapshot (nor a table's latest version) reads, including
    /// files a killed load left behind. Takes the load lock, so it never races a load.
    pub async fn vacuum(&self, keep: usize) -> Result<VacuumReport> {
        let _lock = self.lock()?;
        let snapshots = self.snapshots()?;
        let keep = keep.max(1);
        let (old, retained) = snapshots.split_at(snapshots.len().saturating_sub(keep));
        let mut report = VacuumReport { snapshots_removed: old.len(), snapshots_kept: retained.len(), files_deleted: 0 };
        if retained.is_empty() {
            return Ok(report);
        }
        let mut tables: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for s in retained {
            for (name, entry) in &s.tables {
                tables.entry(name.as_str()).or_default().push(entry.version);
            }
        }
        for (name, versions) in tables {
            let delta_err = |source| Error::Delta { table: name.to_string(), source };
            let table = DeltaTableBuilder::from_url(self.table_url(name)?).map_err(delta_err)?.load().await.map_err(delta_err)?;
            let mut keep_versions = versions;
            keep_versions.extend(table.version());
            let (_, metrics) = table
                .vacuum()
                .with_keep_versions(&keep_versions)
                .with_retention_period(chrono::Duration::zero())
                .with_enforce_retention_duration(false)
                .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
                .await
                .map_err(delta_err)?;
            report.files_deleted += metrics.files_deleted.len();
        }
        for s in old {
            let path = self.snapshots_dir().join(format!("{:06}.json", s.id));
            std::fs::remove_file(&path).map_err(|e| Error::io(path, e))?;
        }
        Ok(report)
    }

    /// Rewrites every table of the current snapshot that has at least `min_files` Parquet files
    /// into fewer, larger ones (nightly appends leave one small file per night) and commits a
    /// snapshot naming the compacted versions: the same rows, read faster. Older snapshots keep
    /// their versions and files until `vacuum` drops them. Under the load lock, with a fault
    /// point after each table: a compaction killed midway leaves the current snapshot as it was.
    /// `layouts`: each table's [`Layout`] (from its transform), kept by the rewritten files.
    pub async fn compact(&self, min_files: usize, layouts: &BTreeMap<String, Layout>) -> Result<CompactReport> {
        let no_layout = Layout::default();
        let _lock = self.lock()?;
        let current = self.current_or_error()?;
        let mut tables = current.tables.clone();
        let mut report = CompactReport { snapshot: None, tables: Vec::new() };
        for (name, entry) in &current.tables {
            let delta_err = |source| Error::Delta { table: name.to_string(), source };
            let table = DeltaTableBuilder::from_url(self.table_url(name)?).map_err(delta_err)?.with_version(entry.version).load().await.map_err(delta_err)?;
            let files_before = table.get_file_uris().map_err(delta_err)?.count();
            if files_before < min_files.max(2) {
                continue;
            }
            let layout = layouts.get(name).unwrap_or(&no_layout);
            // The newest version is optimized when it holds the snapshot's rows (it is the
            // snapshot's, or came from a vacuum or a killed compaction), never the snapshot's
            // version under newer ones: a killed compaction has removed the files it would rewrite.
            let (version, files_after, how) = if self.holds_version(name, entry.version).await? {
                let newest = DeltaTable::try_from_url(self.table_url(name)?).await.map_err(delta_err)?;
                // Bin-packing concatenates the files in order: each was written sorted, and a
                // night's files hold that night's rows, so the ranges stay narrow.
                let (table, _) = newest.optimize().with_writer_properties(layout.writer_properties()).await.map_err(delta_err)?;
                let files_after = table.get_file_uris().map_err(delta_err)?.count();
                // Nothing bin-packed, tonight or by a killed compaction (one file per partition
                // already; a vacuum's commits).
                if files_after >= files_before {
                    continue;
                }
                (table.version().map(|v| v as u64).unwrap_or(entry.version), files_after, "optimize")
            } else {
                // A killed load wrote a later version with other rows: write the snapshot's rows
                // as the next version instead of building on a version no snapshot names.
                let metadata = serde_json::to_value(table.snapshot().map_err(delta_err)?.metadata()).map_err(|e| Error::Internal(e.to_string()))?;
                let partition: Vec<String> = metadata["partitionColumns"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
                let ctx = self.context()?;
                let df = ctx.read_table(self.provider(&ctx, name, entry.version).await?)?;
                let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
                let rows = layout.sort(&ctx, df.collect().await?).await?;
                let version = self.write_partitioned(name, schema, rows, &partition, layout).await?;
                let files_after = DeltaTableBuilder::from_url(self.table_url(name)?).map_err(delta_err)?.with_version(version).load().await.map_err(delta_err)?.get_file_uris().map_err(delta_err)?.count();
                (version, files_after, "rewrite")
            };
            if version == entry.version {
                continue; // nothing to bin-pack (one file per partition already)
            }
            tables.insert(name.clone(), TableEntry { version, ..entry.clone() });
            report.tables.push(CompactedTable { table: name.clone(), files_before, files_after, how });
            crate::fault::point(&format!("compacted {name}"));
        }
        if !report.tables.is_empty() {
            report.snapshot = Some(self.commit(tables, current.files.clone(), current.rollups.clone())?.id);
        }
        Ok(report)
    }

    /// Takes the load lock (`warehouse/LOCK`, holding the owner's pid). A lock left by a process
    /// that no longer runs is taken over with a warning; a live one is an error.
    pub fn lock(&self) -> Result<LoadLock> {
        std::fs::create_dir_all(&self.root).map_err(|e| Error::io(&self.root, e))?;
        let path = self.root.join("LOCK");
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    let _ = f.sync_all();
                    return Ok(LoadLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default().trim().parse::<u32>().ok();
                    match owner {
                        Some(pid) if process_alive(pid) => return Err(Error::Locked { path, pid }),
                        _ => {
                            eprintln!(
                                "warning: taking over the stale load lock {} (its process {} no longer runs)",
                                path.display(),
                                owner.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                            );
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        Err(Error::Locked { path, pid: 0 })
    }

    /// Registers every table of `snapshot` in `ctx`, each at the Delta version it names.
    pub async fn register(&self, ctx: &SessionContext, snapshot: &Snapshot) -> Result<()> {
        for (name, entry) in &snapshot.tables {
            let provider = self.provider(ctx, name, entry.version).await?;
            ctx.register_table(name.as_str(), provider)?;
        }
        Ok(())
    }

    /// A table at one Delta version, to register in a session.
    pub async fn provider(&self, ctx: &SessionContext, name: &str, version: u64) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
        let delta_err = |source| Error::Delta { table: name.to_string(), source };
        let table = DeltaTableBuilder::from_url(self.table_url(name)?)
            .map_err(delta_err)?
            .with_version(version)
            .load()
            .await
            .map_err(delta_err)?;
        table.update_datafusion_session(&ctx.state()).map_err(delta_err)?;
        table.table_provider().await.map_err(|e| Error::Internal(e.to_string()))
    }

    /// The newest Delta version of a table (a killed load may have written versions no snapshot
    /// names); None when the table was never written.
    pub async fn latest_version(&self, name: &str) -> Result<Option<u64>> {
        if !self.table_path(name).join("_delta_log").exists() {
            return Ok(None);
        }
        let table = DeltaTable::try_from_url(self.table_url(name)?).await.map_err(|source| Error::Delta { table: name.to_string(), source })?;
        Ok(table.version().map(|v| v as u64))
    }

    /// Whether a table's newest Delta version holds the rows of `version`: it is `version`, or
    /// every commit after it changed no rows — a `vacuum` (which commits its start and end) or a
    /// compaction no snapshot named (files rewritten with `dataChange: false`). A load builds on
    /// the newest version (an append, a partition replaced) only then; after a version that
    /// changed rows (a killed load's) it rewrites the table.
    pub async fn holds_version(&self, name: &str, version: u64) -> Result<bool> {
        let Some(latest) = self.latest_version(name).await? else { return Ok(false) };
        if latest < version {
            return Ok(false);
        }
        let log = self.table_path(name).join("_delta_log");
        for v in version + 1..=latest {
            let path = log.join(format!("{v:020}.json"));
            // A commit no longer on disk (cleaned up after a checkpoint) cannot be vouched for.
            let Ok(text) = std::fs::read_to_string(&path) else { return Ok(false) };
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let action: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
                let Some(action) = action.as_object() else { return Ok(false) };
                for (kind, body) in action {
                    let rows_kept = match kind.as_str() {
                        "commitInfo" | "txn" => true,
                        "add" | "remove" => body["dataChange"] == serde_json::Value::Bool(false),
                        _ => false,
                    };
                    if !rows_kept {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }
}

/// A print of a table's columns, their names and types in order, as a table written from them
/// stores them (text in any of Arrow's string types is stored alike): two schemas with one print
/// make the same Delta table.
pub fn columns_print(schema: &Schema) -> String {
    let columns: Vec<String> = schema.fields().iter().map(|f| format!("{}:{}", f.name(), canonical_type(f.data_type()))).collect();
    hex(&Sha256::digest(columns.join("\n").as_bytes()))[..16].to_string()
}

/// The one type a column's values are stored and compared in whatever Arrow type holds them:
/// text as Utf8 (not Utf8View, LargeUtf8 or dictionary-encoded), bytes as Binary. A table read
/// from memory holds Utf8, read back from its Parquet files Utf8View.
pub fn canonical_type(ty: &DataType) -> DataType {
    match ty {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        DataType::Dictionary(_, values) => canonical_type(values),
        ty => ty.clone(),
    }
}

/// What `compact` did to each table it looked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompactedTable {
    pub table: String,
    pub files_before: usize,
    pub files_after: usize,
    /// `optimize` (small files bin-packed into larger ones) or `rewrite` (the snapshot's rows
    /// written afresh: a later Delta version no snapshot names, with other rows, was in the way).
    pub how: &'static str,
}

/// What `compact` did: the snapshot it committed (None when no table needed it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    pub snapshot: Option<u64>,
    pub tables: Vec<CompactedTable>,
}

/// What `vacuum` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VacuumReport {
    pub snapshots_removed: usize,
    pub snapshots_kept: usize,
    pub files_deleted: usize,
}

/// The load lock; released when dropped (and taken over if its process dies).
#[derive(Debug)]
pub struct LoadLock {
    path: PathBuf,
}

impl Drop for LoadLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a process runs (Linux: it has a /proc entry).
fn process_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Writes a file so that readers see either the old content or the new, never a part.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Delta has no view or unsigned types: store views as plain strings, unsigned as signed.
fn delta_compatible(schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let target = |dt: &DataType| match dt {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::UInt8 | DataType::UInt16 => DataType::Int32,
        DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        other => other.clone(),
    };
    let fields: Vec<Field> =
        schema.fields().iter().map(|f| Field::new(f.name(), target(f.data_type()), true)).collect();
    let new_schema = Arc::new(Schema::new(fields));
    let batches = batches
        .into_iter()
        .map(|b| {
            let cols = b
                .columns()
                .iter()
                .zip(new_schema.fields())
                .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c.clone()) } else { cast(c, f.data_type()) })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(RecordBatch::try_new(new_schema.clone(), cols)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((new_schema, batches))
}

/// Runs a plan to memory and returns a frame over the result, keeping its schema when it has
/// no rows (DataFusion's `read_batches` needs at least one batch). Used where one result feeds
/// several later plans, so the work is done once.
pub async fn materialize(ctx: &SessionContext, df: DataFrame) -> Result<DataFrame> {
    let schema = Arc::new(df.schema().as_arrow().clone());
    Ok(ctx.read_batches(with_empty(&schema, df.collect().await?))?)
}

/// `df` in the columns of `schema` — by name, in its order, cast to its types — where a column
/// `df` lacks reads NULL: a stored table read in tonight's columns (Delta may store text as views
/// and timestamps in microseconds; a column added to a transform has no earlier values).
pub fn in_columns(df: DataFrame, schema: &Schema) -> Result<DataFrame> {
    use datafusion::prelude::{cast, col, lit};
    let select: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| {
            let value = if df.schema().has_column_with_unqualified_name(f.name()) { col(f.name().as_str()) } else { lit(datafusion::scalar::ScalarValue::Null) };
            cast(value, f.data_type().clone()).alias(f.name())
        })
        .collect();
    Ok(df.select(select)?)
}

/// `rows`, or one empty batch of `schema` when there are none (for `read_batches`).
pub fn with_empty(schema: &SchemaRef, mut rows: Vec<RecordBatch>) -> Vec<RecordBatch> {
    if rows.is_empty() {
        rows.push(RecordBatch::new_empty(schema.clone()));
    }
    rows
}

/// The memory `batches` hold, each allocation counted once: batches sliced from one another
/// (an operator's output in 8,192-row pieces, a column passed through a projection) share
/// buffers, which [`RecordBatch::get_array_memory_size`] would count once per batch.
pub fn memory_size(batches: &[RecordBatch]) -> usize {
    fn visit(data: &datafusion::arrow::array::ArrayData, seen: &mut std::collections::HashSet<usize>, total: &mut usize) {
        let nulls = data.nulls().map(|n| n.buffer());
        for buffer in data.buffers().iter().chain(nulls) {
            if seen.insert(buffer.data_ptr().as_ptr() as usize) {
                *total += buffer.capacity();
            }
        }
        for child in data.child_data() {
            visit(child, seen, total);
        }
    }
    let (mut seen, mut total) = (std::collections::HashSet::new(), 0);
    for batch in batches {
        for column in batch.columns() {
            visit(&column.to_data(), &mut seen, &mut total);
        }
    }
    total
}

/// A content checksum of a table: SHA-256 over its rows in sorted order, independent of how
/// the rows are split into files. Two loads of the same input give the same checksum.
pub async fn content_checksum(ctx: &SessionContext, table: &str) -> Result<String> {
    let df = ctx.table(table).await?;
    let batches = df.collect().await?;
    let mut rows: Vec<String> = Vec::new();
    for b in &batches {
        let formatters: Vec<_> = b
            .columns()
            .iter()
            .map(|c| datafusion::arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &Default::default()))
            .collect::<std::result::Result<_, _>>()?;
        for i in 0..b.num_rows() {
            let row: Vec<String> = formatters.iter().map(|f| f.value(i).to_string()).collect();
            rows.push(row.join("\u{1f}"));
        }
    }
    rows.sort();
    let mut h = Sha256::new();
    for r in rows {
        h.update(r.as_bytes());
        h.update(b"\n");
    }
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manifest_left_by_a_load_killed_before_current_is_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let w = Warehouse::new(dir.path());
        // No tables: the vacuum then has only manifests to look at.
        w.commit(BTreeMap::new(), BTreeMap::new(), BTreeMap::new()).unwrap();
        w.commit(BTreeMap::new(), BTreeMap::new(), BTreeMap::new()).unwrap();
        // A load killed between its manifest and CURRENT: manifest 3, CURRENT still 2.
        let orphan = Snapshot { id: 3, ..w.snapshot(2).unwrap() };
        std::fs::write(w.snapshots_dir().join("000003.json"), serde_json::to_vec(&orphan).unwrap()).unwrap();
        assert_eq!(w.snapshots().unwrap().iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 2]);
        let e = w.committed(3).unwrap_err().to_string();
        assert!(e.contains("snapshot 3 was never committed; the current snapshot is 2"), "{e}");
        // Keeping one snapshot keeps the current one, not the orphan.
        let report = w.vacuum(1).await.unwrap();
        assert_eq!((report.snapshots_removed, report.snapshots_kept), (1, 1));
        assert_eq!(w.current().unwrap().map(|s| s.id), Some(2));
        let e = w.committed(1).unwrap_err().to_string();
        assert!(e.contains("snapshot 1 was removed by `crmcube vacuum`"), "{e}");
        // The next commit is snapshot 3, over the orphan.
        let third = w.commit(BTreeMap::new(), BTreeMap::new(), BTreeMap::new()).unwrap();
        assert_eq!(third.id, 3);
        assert_eq!(w.current().unwrap(), Some(third));
    }

    #[test]
    fn a_file_hashed_in_blocks_has_the_checksum_of_its_whole_content() {
        // Over two blocks and a part, so block edges are crossed; the whole-content digest is
        // sha2's own on the full slice.
        let content: Vec<u8> = (0..(5u32 << 19) + 77).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let read = SourceFile::read("a.csv".into(), content.as_slice()).unwrap();
        assert_eq!(read, SourceFile::of("a.csv".into(), &content));
        assert_eq!(read.bytes, content.len() as u64);
        assert_eq!(SourceFile::read("e".into(), [].as_slice()).unwrap().sha256, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn slices_of_one_batch_count_its_memory_once() {
        use datafusion::arrow::array::{Int64Array, StringArray};
        let ints = Int64Array::from_iter_values(0..10_000);
        let text = StringArray::from_iter_values((0..10_000).map(|i| format!("row {i}")));
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
            datafusion::arrow::datatypes::Field::new("i", datafusion::arrow::datatypes::DataType::Int64, false),
            datafusion::arrow::datatypes::Field::new("t", datafusion::arrow::datatypes::DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(ints), Arc::new(text)]).unwrap();
        let whole = memory_size(std::slice::from_ref(&batch));
        // At least the values: 8 bytes an integer, 4 an offset, the text itself.
        let text_bytes: usize = (0..10_000).map(|i| format!("row {i}").len()).sum();
        assert!(whole >= 10_000 * 8 + 10_001 * 4 + text_bytes, "{whole}");
        let pieces: Vec<RecordBatch> = (0..10).map(|k| batch.slice(k * 1_000, 1_000)).collect();
        assert_eq!(memory_size(&pieces), whole);
        assert!(pieces.iter().map(RecordBatch::get_array_memory_size).sum::<usize>() >= 10 * whole);
    }
}
