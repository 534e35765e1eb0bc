//! ETL: turns CRM exports into clean warehouse tables, driven by `transforms/*.yaml`.
//!
//! Data flows through the submodules in this order:
//! [`spec`] (the YAML as written) → [`validate`] (the resolved [`validate::Transform`] model) →
//! [`extract`] (files — or PostgreSQL rows staged as CSV by [`postgres`] — → text batches, unreadable records rejected) → [`clean`] (typed, validated,
//! de-duplicated, references checked; a DataFusion plan using [`parse`]) → [`load`] (derived
//! tables by SQL — appended ([`load`]'s `grows_with`) or refreshed by key ([`keyed`]) on a night of
//! new rows — then one atomic warehouse snapshot). Every rejected row lands in the
//! `quarantine` table with its file, line, column and reason. [`plan`] plans every table over no rows
//! for `crmcube check`.

pub mod clean;
pub mod extract;
pub mod keyed;
pub mod load;
pub mod models;
pub mod parse;
pub mod plan;
pub mod postgres;
pub mod spec;
pub mod validate;

pub use load::{LoadOptions, LoadReport, QUARANTINE_TABLE, TableReport, load, load_with};
pub use validate::{TransformBody, TransformSet};
