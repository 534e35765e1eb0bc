//! Integration tests, one binary (one link): end-to-end loads of the committed sample export,
//! cube query results checked against independent computations, reloads, and metadata errors.

mod common;
mod access;
mod bad_input;
mod cli_output;
mod clv;
mod crash;
mod cube_queries;
mod customer_value;
mod flight;
mod fuzz_corpus;
mod incremental;
mod layout;
mod load_sample;
mod postgres;
mod metadata_errors;
mod olap_ops;
mod quality;
mod query_suite;
mod receivables;
mod reload;
mod rollups;
mod scan;
