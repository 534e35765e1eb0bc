//! The raw transform metadata, exactly as written in `transforms/*.yaml`.
//!
//! These types mirror the YAML and nothing more; [`super::validate`] resolves them into the
//! [`super::validate::Transform`] model once every file is loaded. Names that other files refer
//! to are `Spanned`, so a validation error can point at the line and column of the bad name.

use serde::Deserialize;
use serde_saphyr::Spanned;

/// `refresh_by:` of a derived table: the driver table and the key column it shares with the table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshBySpec {
    pub table: Spanned<String>,
    pub key: Spanned<String>,
}

/// One `transforms/*.yaml` file: a source table loaded from an export, or a derived table (SQL).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    pub version: u32,
    /// Warehouse table this transform writes.
    pub table: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Where the rows come from (source tables). Exactly one of `source` and `sql`.
    #[serde(default)]
    pub source: Option<SourceSpec>,
    /// A SELECT over other warehouse tables (derived tables).
    #[serde(default)]
    pub sql: Option<String>,
    /// Derived tables: each row comes from one row of this table, joined to other tables by
    /// their keys and filtered. On a night when it only gained rows, and every other table the
    /// SQL reads kept its rows (or only gained new keys it references), a load appends the
    /// SELECT of the new rows instead of recomputing the table.
    #[serde(default)]
    pub grows_with: Option<Spanned<String>>,
    /// Derived tables: the rows of each key value of `key` come from this table's rows of that
    /// key alone (a per-customer summary). On a night when it only gained rows and no other table
    /// the SQL reads changed, a load recomputes the rows of the keys its new rows hold and keeps
    /// the others (see [`super::keyed`]).
    #[serde(default)]
    pub refresh_by: Option<RefreshBySpec>,
    #[serde(default)]
    pub columns: Vec<ColumnSpec>,
    /// Column(s) identifying a row; duplicates are resolved by `duplicates`.
    #[serde(default)]
    pub key: Vec<Spanned<String>>,
    #[serde(default)]
    pub duplicates: Option<DuplicateSpec>,
    #[serde(default)]
    pub references: Vec<ReferenceSpec>,
    /// Largest fraction of rows that may be quarantined before the load fails (default 0.05).
    #[serde(default)]
    pub reject_threshold: Option<f64>,
    /// Row-level access rules (see [`crate::access`]); absent: every role reads every row.
    #[serde(default)]
    pub access: Option<Vec<AccessSpec>>,
    /// How a load refreshes a source table: `full` (default) or `incremental`.
    #[serde(default)]
    pub load: LoadMode,
    /// Incremental sources: a date, timestamp or integer column; a load keeps only rows past the
    /// greatest value already loaded (stored in the snapshot).
    #[serde(default)]
    pub watermark: Option<Spanned<String>>,
    /// Keep the history of these columns as a slowly changing dimension (type 2) in the table
    /// `<table>_history`.
    #[serde(default)]
    pub history: Option<HistorySpec>,
    /// How the table's Parquet files are laid out for the queries that read it.
    #[serde(default)]
    pub layout: Option<LayoutSpec>,
}

/// `layout:` of a transform (see [`crate::warehouse::Layout`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    /// Columns the rows are sorted by when written, so each file, row group and page covers a
    /// narrow range of them and a filter on them skips the rest (e.g. a fact's date).
    #[serde(default)]
    pub sort_by: Vec<Spanned<String>>,
    /// Rows per Parquet row group (default 1,048,576).
    #[serde(default)]
    pub row_group_rows: Option<Spanned<usize>>,
    /// Columns given a Bloom filter per row group, so a lookup of one value skips the row groups
    /// that cannot hold it (keys looked up one at a time, e.g. a customer id).
    #[serde(default)]
    pub bloom_filters: Vec<Spanned<String>>,
    /// A date or integer column whose values split the table into Delta partitions (a folder
    /// each): a filter on it skips whole folders, and a load rewrites only the partitions whose
    /// rows changed (e.g. a per-month table's latest months).
    #[serde(default)]
    pub partition_by: Option<Spanned<String>>,
}

/// How a load refreshes a source table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadMode {
    /// Every load replaces the table with what its export files hold.
    #[default]
    Full,
    /// A load reads only export files it has not loaded before (or that changed), keeps rows past
    /// the watermark, and upserts them by key (appends them when the table has no key).
    Incremental,
}

/// Type-2 history of a source table's attributes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySpec {
    /// The columns whose changes open a new version (the others are corrected in place).
    pub columns: Vec<Spanned<String>>,
    /// The date or timestamp column telling when a row changed: a new version is valid from it.
    pub changed_at: Spanned<String>,
}

/// One row-level rule: which rows of the table a role reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSpec {
    pub role: Spanned<String>,
    /// `all`, or an SQL condition over the table's columns; `{user.NAME}` is the user's
    /// attribute NAME (or `name`, `role`) as a string literal.
    pub rows: Spanned<String>,
}

/// Where an export lives and how it is encoded: files (`path`) or a PostgreSQL table or query
/// (`postgres`), exactly one of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// File name or glob, relative to the project's sources folder.
    #[serde(default)]
    pub path: String,
    /// A live PostgreSQL database (see [`crate::etl::postgres`]).
    #[serde(default)]
    pub postgres: Option<PostgresSpec>,
    /// `csv` (default) or `jsonl`.
    #[serde(default)]
    pub format: SourceFormat,
    #[serde(default)]
    pub encoding: SourceEncoding,
    /// Field delimiter for CSV (one character).
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// Whether the first CSV line names the columns (default true).
    #[serde(default = "default_true")]
    pub header: bool,
}

fn default_delimiter() -> char {
    ','
}
fn default_true() -> bool {
    true
}

/// A table or query of a PostgreSQL database, read at each load.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSpec {
    /// Connection: `postgres://user:password@host:port/database` or `host=… user=… dbname=…`;
    /// `${NAME}` is replaced by the environment variable NAME (keep passwords out of the YAML).
    pub url: Spanned<String>,
    /// A table (or view) to read: `customers`, `crm.customers`.
    #[serde(default)]
    pub table: Option<Spanned<String>>,
    /// A SELECT to read instead of a table.
    #[serde(default)]
    pub query: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    #[default]
    Csv,
    Jsonl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceEncoding {
    #[default]
    #[serde(alias = "utf-8")]
    Utf8,
    Gbk,
}

/// One column of a source: its type, how to parse it, and what values are valid.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    pub name: Spanned<String>,
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Header name (CSV) or key (JSON) in the export, when it differs from `name`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default = "default_true")]
    pub nullable: bool,
    /// chrono formats tried in order for `date` and `timestamp` columns.
    #[serde(default)]
    pub formats: Vec<String>,
    /// Digits after the decimal point for `decimal` columns (default 2).
    #[serde(default)]
    pub scale: Option<u8>,
    /// Normalise the case of a text column before validation.
    #[serde(default)]
    pub case: Option<Case>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// Allowed values (after case normalisation).
    #[serde(default, rename = "enum")]
    pub allowed: Vec<String>,
    /// A regular expression the value must match.
    #[serde(default)]
    pub pattern: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    String,
    Integer,
    Decimal,
    Float,
    Date,
    Timestamp,
    Boolean,
}

impl ColumnType {
    /// How the type is described to users in error messages.
    pub fn describe(self) -> &'static str {
        match self {
            ColumnType::String => "text",
            ColumnType::Integer => "an integer",
            ColumnType::Decimal => "a decimal amount (e.g. 1234.50, 1,234.50 or ¥1,234)",
            ColumnType::Float => "a number",
            ColumnType::Date => "a date",
            ColumnType::Timestamp => "a timestamp",
            ColumnType::Boolean => "true or false",
        }
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, ColumnType::Integer | ColumnType::Decimal | ColumnType::Float)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    Lower,
    Upper,
}

/// How rows with the same key resolve.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuplicateSpec {
    /// The row with the greatest value of this column wins; on a tie, the later line.
    pub latest_by: Spanned<String>,
}

/// A foreign key: every non-null value of `column` must exist in `table`.`key`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceSpec {
    pub column: Spanned<String>,
    pub table: Spanned<String>,
    pub key: Spanned<String>,
}
