//! Analytical models: forecasting of trends (cube queries) and customer lifetime value.
//!
//! Customer-value models (RFM, lifetime value, cohorts, aging, service levels) will live here too;
//! everything in this module is plain arithmetic over numbers, with no DataFusion types, so it is
//! tested against series whose answer is known.

pub mod clv;
pub mod forecast;

pub use forecast::{Forecast, ForecastPoint, holt_winters, next_period, season_length};
