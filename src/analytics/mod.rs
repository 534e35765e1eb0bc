//! Analytical models used by cube queries: forecasting of trends.
//!
//! Customer-value models (RFM, lifetime value, cohorts, aging, service levels) will live here too;
//! everything in this module is plain arithmetic over numbers, with no DataFusion types, so it is
//! tested against series whose answer is known.

pub mod forecast;

pub use forecast::{Forecast, ForecastPoint, holt_winters, next_period, season_length};
