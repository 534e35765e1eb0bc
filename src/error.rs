//! The error categories shared by every stage of the pipeline.
//!
//! Each error has a [`ErrorKind`] (spec, query, data, io, internal) which the CLI maps to an exit
//! code (see [`ErrorKind::exit_code`]) and a later server maps to gRPC status codes. Messages say
//! where (file, line, column, key), what was expected, and how to fix it.

use std::fmt;
use std::path::PathBuf;

use datafusion::error::DataFusionError;
use deltalake::DeltaTableError;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The broad category of an error; decides the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A metadata file (crmcube.yaml, transforms/, cubes/) is wrong.
    Spec,
    /// A query names something that does not exist or is malformed.
    Query,
    /// Input data broke a declared limit (e.g. the reject threshold).
    Data,
    /// Reading or writing a file or table failed.
    Io,
    /// Another load holds the warehouse lock.
    Locked,
    /// A bug in crmcube.
    Internal,
}

impl ErrorKind {
    /// Documented process exit codes (README, "Exit codes").
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Internal | ErrorKind::Io => 1,
            ErrorKind::Spec | ErrorKind::Query => 2,
            ErrorKind::Data => 3,
            ErrorKind::Locked => 4,
        }
    }
}

/// One problem found in a metadata file, with its position and a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The metadata file, as the user named it (relative to the project when possible).
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The key at fault, as a path: `cube 'sales' › measure 'revenu'`.
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
    /// How to fix it, e.g. `did you mean 'revenue'?`.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        write!(f, ": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

/// Every problem found while validating the project's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<Diagnostic>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// A cube query or SQL statement that cannot be answered as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
pub struct QueryError {
    pub message: String,
    pub hint: Option<String>,
}

impl QueryError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), hint: None }
    }

    pub fn with_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }
}

/// Input data that stops a load before it commits.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "table '{table}': {rejected} of {read} rows rejected ({pct:.2}%), above the reject threshold of {threshold_pct:.2}%; \
         nothing was committed. See the reasons with `crmcube load --json` or raise `reject_threshold` in {spec}",
        pct = 100.0 * *rejected as f64 / (*read).max(1) as f64,
        threshold_pct = threshold * 100.0
    )]
    RejectThreshold { table: String, spec: String, rejected: u64, read: u64, threshold: f64 },
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Input { file: PathBuf, line: Option<u64>, message: String },
    #[error(
        "table '{table}': the export has no rows, but the current snapshot holds {previous}; nothing was committed \
         (an empty or truncated export must not wipe a table). If the table really is empty now, run \
         `crmcube load --allow-empty {table}`"
    )]
    EmptySource { table: String, previous: u64 },
}

/// The crate's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Spec(#[from] SpecErrors),
    #[error("{0}")]
    Query(#[from] QueryError),
    #[error("{0}")]
    Data(#[from] DataError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("{0}")]
    Engine(#[from] DataFusionError),
    #[error("{0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error("{0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("warehouse table '{table}': {source}")]
    Delta { table: String, #[source] source: DeltaTableError },
    #[error(transparent)]
    Sample(#[from] crate::sample::SampleError),
    #[error("another load is running (process {pid} holds {}); try again when it has finished", path.display())]
    Locked { path: PathBuf, pid: u32 },
    #[error("internal error (this is a bug in crmcube, please report it): {0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Whether a memory limit stopped the work (the CLI then says how to raise it).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Engine(e) if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)))
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Spec(_) => ErrorKind::Spec,
            Error::Query(_) => ErrorKind::Query,
            Error::Data(_) => ErrorKind::Data,
            Error::Io { .. } | Error::Delta { .. } | Error::Sample(_) => ErrorKind::Io,
            Error::Engine(e) => match e.find_root() {
                DataFusionError::Plan(_)
                | DataFusionError::SchemaError(..)
                | DataFusionError::SQL(..)
                | DataFusionError::NotImplemented(_) => ErrorKind::Query,
                DataFusionError::IoError(_) | DataFusionError::ObjectStore(_) => ErrorKind::Io,
                // Exit 1 (failed), not 3: the input is fine, the memory limit was too small.
                DataFusionError::ResourcesExhausted(_) => ErrorKind::Io,
                _ => ErrorKind::Internal,
            },
            Error::Locked { .. } => ErrorKind::Locked,
            Error::Arrow(_) | Error::Internal(_) => ErrorKind::Internal,
            Error::Parquet(_) => ErrorKind::Io,
        }
    }
}

/// Names within `candidates` closest to `name`, for "did you mean" hints.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score >= 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

/// A "valid names are ..., did you mean ...?" hint.
pub fn valid_names_hint<'a>(
    what: &str,
    name: &str,
    candidates: impl IntoIterator<Item = &'a str> + Clone,
) -> String {
    let list: Vec<String> = candidates.clone().into_iter().map(|c| format!("'{c}'")).collect();
    let mut hint = format!("valid {what} are {}", list.join(", "));
    if let Some(n) = nearest(name, candidates) {
        hint.push_str(&format!("; did you mean '{n}'?"));
    }
    hint
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_suggests_close_names_only() {
        let names = ["revenue", "margin", "orders"];
        assert_eq!(nearest("revenu", names), Some("revenue".to_string()));
        assert_eq!(nearest("zzz", names), None);
    }

    #[test]
    fn diagnostic_names_file_line_column_and_key() {
        let d = Diagnostic {
            file: "cubes/sales.yaml".into(),
            line: 14,
            column: 7,
            key: "cube 'sales' › measure 'revenu'".into(),
            message: "not found".into(),
            hint: Some("did you mean 'revenue'?".into()),
        };
        assert_eq!(
            d.to_string(),
            "cubes/sales.yaml:14:7: cube 'sales' › measure 'revenu': not found (did you mean 'revenue'?)"
        );
    }
}
