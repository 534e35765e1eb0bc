//! # crmcube — an analytical CRM data warehouse and OLAP engine
//!
//! crmcube turns the nightly exports of an operational CRM (customers, orders, invoices,
//! payments, service contacts) into clean Delta/Parquet tables and answers cube queries over
//! them with DataFusion.
//!
//! ```text
//! OLTP exports (CSV / JSON lines; UTF-8 or GBK)              sample-data/, crmcube sample
//!       │  transforms/*.yaml: sources, column types, cleaning rules, keys, derived SQL
//!       ▼
//! etl: extract → clean → derive → commit                      etl/
//!       │  bad rows → quarantine table with file, line, column and reason
//!       ▼
//! warehouse: Delta tables + one atomic snapshot per load       warehouse/
//!       │  cubes/*.yaml: fact, dimensions with hierarchies, measures
//!       ▼
//! cube model → cube query → DataFusion plan                   cube/, query/
//!       ▼
//! command line (cli/)  ·  Arrow Flight SQL for BI tools (serve/)
//! ```
//!
//! ## Layout
//! - [`project`]: `crmcube.yaml` and the one YAML loader (errors with file, line, column).
//! - [`sample`]: the deterministic sample CRM export (dirty rows included).
//! - [`etl`]: metadata-driven load: [`etl::spec`] → [`etl::validate`] → [`etl::extract`] →
//!   [`etl::clean`] (DataFusion plans, [`etl::parse`] functions) → [`etl::load`].
//! - [`warehouse`]: Delta tables, snapshot manifests, registration in a DataFusion session.
//! - [`cube`]: cube models (spec → validated model), no DataFusion types.
//! - [`query`]: cube queries planned as DataFusion DataFrames.
//! - [`scan`]: `crmcube scan`, draft transforms from unknown exports.
//! - [`quality`]: `crmcube quality`, the quarantine by table and rule over recent loads.
//! - [`access`]: row-level access rules from table metadata, bound below SQL per user.
//! - [`serve`]: the Arrow Flight SQL server for BI tools (users, tokens, snapshots).
//! - [`cli`]: the `crmcube` commands and output formatting.
//! - [`error`]: error kinds shared by all of the above, mapped to exit codes.
//! - [`fuzzing`]: the fuzz targets' entry points (also replayed over the corpora by the tests).
//! - [`fault`]: fault points where crash tests kill a load.

pub mod access;
pub mod analytics;
pub mod cli;
pub mod cube;
pub mod error;
pub mod etl;
pub mod fault;
pub mod fuzzing;
pub mod project;
pub mod quality;
pub mod query;
pub mod report;
pub mod rollup;
pub mod sample;
pub mod scan;
pub mod serve;
pub mod warehouse;

pub use error::{Error, ErrorKind, Result};
