//! Holt-Winters forecasting with additive trend and seasonality.
//!
//! Method: triple exponential smoothing (level, trend, additive season of length `m`). The
//! smoothing parameters α, β, γ are chosen by grid search (steps of 0.05) minimising the sum of
//! squared one-step-ahead errors. A series shorter than two seasons falls back to Holt's linear
//! method (no season). The 95 % prediction interval uses the additive Holt-Winters forecast
//! variance σ²·(1 + Σⱼ₌₁..ₕ₋₁ (α(1 + jβ) + γ·[j mod m = 0])²) (Hyndman et al., *Forecasting with
//! Exponential Smoothing*, class 1 models), with σ² the sum of squared one-step errors over
//! (n − 3), n the number of one-step forecasts and 3 the fitted parameters.

/// One forecast period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForecastPoint {
    pub value: f64,
    pub lower: f64,
    pub upper: f64,
}

/// A fitted model and its forecasts.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    pub alpha: f64,
    pub beta: f64,
    pub gamma: f64,
    /// Season length used (1 = no season).
    pub season: usize,
    pub points: Vec<ForecastPoint>,
}

/// Season length of a time level: 12 months, 4 quarters, 7 days; none for years.
pub fn season_length(level: &str) -> usize {
    match level {
        "month" => 12,
        "quarter" => 4,
        "day" => 7,
        _ => 1,
    }
}

struct Fit {
    sse: f64,
    n: usize,
    level: f64,
    trend: f64,
    seasonal: Vec<f64>,
}

fn fit(y: &[f64], m: usize, alpha: f64, beta: f64, gamma: f64) -> Fit {
    let (mut level, mut trend, mut seasonal, start) = if m > 1 {
        // The first season's mean sits at its middle; the level starts at its end, and the
        // seasonal terms are the first season's deviations from the detrended line.
        let first: f64 = y[..m].iter().sum::<f64>() / m as f64;
        let second: f64 = y[m..2 * m].iter().sum::<f64>() / m as f64;
        let trend = (second - first) / m as f64;
        let middle = (m as f64 - 1.0) / 2.0;
        let seasonal = y[..m].iter().enumerate().map(|(i, v)| v - (first + trend * (i as f64 - middle))).collect::<Vec<_>>();
        (first + trend * middle, trend, seasonal, m)
    } else {
        (y[0], y[1] - y[0], vec![0.0], 1)
    };
    let mut sse = 0.0;
    let mut n = 0;
    for (t, &obs) in y.iter().enumerate().skip(start) {
        let s = if m > 1 { seasonal[t % m] } else { 0.0 };
        let predicted = level + trend + s;
        sse += (obs - predicted).powi(2);
        n += 1;
        let new_level = alpha * (obs - s) + (1.0 - alpha) * (level + trend);
        trend = beta * (new_level - level) + (1.0 - beta) * trend;
        if m > 1 {
            seasonal[t % m] = gamma * (obs - new_level) + (1.0 - gamma) * s;
        }
        level = new_level;
    }
    Fit { sse, n, level, trend, seasonal }
}

/// Forecasts `horizon` periods after `y`, with season length `season` (1 for none).
pub fn holt_winters(y: &[f64], season: usize, horizon: usize) -> Result<Forecast, String> {
    if y.len() < 3 {
        return Err(format!("a forecast needs at least 3 periods of history, found {}", y.len()));
    }
    if y.iter().any(|v| !v.is_finite()) {
        return Err("the series has a missing or infinite value".into());
    }
    let m = if season > 1 && y.len() >= 2 * season { season } else { 1 };
    let grid: Vec<f64> = (1..20).map(|i| i as f64 * 0.05).collect();
    let gammas: Vec<f64> = if m > 1 { grid.clone() } else { vec![0.0] };
    let mut best: Option<(f64, f64, f64, Fit)> = None;
    for &a in &grid {
        for &b in &grid {
            for &g in &gammas {
                let f = fit(y, m, a, b, g);
                if best.as_ref().is_none_or(|x| f.sse < x.3.sse) {
                    best = Some((a, b, g, f));
                }
            }
        }
    }
    let (alpha, beta, gamma, f) = best.expect("the grid is not empty");
    // Mean squared one-step error, corrected for the three fitted parameters.
    let sigma2 = f.sse / (f.n.saturating_sub(3).max(1)) as f64;
    let n = y.len();
    let points = (1..=horizon)
        .map(|h| {
            let s = if m > 1 { f.seasonal[(n + h - 1) % m] } else { 0.0 };
            let value = f.level + h as f64 * f.trend + s;
            let var: f64 = sigma2
                * (1.0
                    + (1..h)
                        .map(|j| {
                            let seasonal = if m > 1 && j % m == 0 { gamma } else { 0.0 };
                            (alpha * (1.0 + j as f64 * beta) + seasonal).powi(2)
                        })
                        .sum::<f64>());
            let half = 1.96 * var.sqrt();
            ForecastPoint { value, lower: value - half, upper: value + half }
        })
        .collect();
    Ok(Forecast { alpha, beta, gamma, season: m, points })
}

/// The label of the period after `label` at a time level (`2026-10` → `2026-11`,
/// `2026-Q4` → `2027-Q1`, `2026` → `2027`, `2026-10-31` → `2026-11-01`).
pub fn next_period(level: &str, label: &str) -> Result<String, String> {
    let bad = || format!("cannot read '{label}' as a {level}");
    match level {
        "year" => Ok((label.parse::<i32>().map_err(|_| bad())? + 1).to_string()),
        "quarter" => {
            let (y, q) = label.split_once("-Q").ok_or_else(bad)?;
            let (y, q): (i32, u32) = (y.parse().map_err(|_| bad())?, q.parse().map_err(|_| bad())?);
            Ok(if q >= 4 { format!("{}-Q1", y + 1) } else { format!("{y}-Q{}", q + 1) })
        }
        "month" => {
            let (y, mo) = label.split_once('-').ok_or_else(bad)?;
            let (y, mo): (i32, u32) = (y.parse().map_err(|_| bad())?, mo.parse().map_err(|_| bad())?);
            Ok(if mo >= 12 { format!("{}-01", y + 1) } else { format!("{y}-{:02}", mo + 1) })
        }
        "day" => {
            let d = chrono::NaiveDate::parse_from_str(label, "%Y-%m-%d").map_err(|_| bad())?;
            Ok((d + chrono::Days::new(1)).format("%Y-%m-%d").to_string())
        }
        other => Err(format!("level '{other}' is not a time level (year, quarter, month, day)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seasonal_series(n: usize) -> Vec<f64> {
        (0..n).map(|t| 100.0 + 2.0 * t as f64 + 10.0 * (2.0 * std::f64::consts::PI * t as f64 / 12.0).sin()).collect()
    }

    #[test]
    fn recovers_a_known_trend_and_season() {
        let all = seasonal_series(60);
        let fc = holt_winters(&all[..48], 12, 12).unwrap();
        assert_eq!(fc.season, 12);
        for (h, p) in fc.points.iter().enumerate() {
            let truth = all[48 + h];
            assert!((p.value - truth).abs() < 0.01 * truth, "h={h}: {} vs {truth}", p.value);
            assert!(p.lower <= p.value && p.value <= p.upper);
        }
    }

    #[test]
    fn interval_covers_noisy_truth_and_widens_with_the_horizon() {
        // A deterministic pseudo-noise of ±3 on the seasonal series.
        let noisy: Vec<f64> = seasonal_series(60).iter().enumerate().map(|(t, v)| v + 3.0 * ((t * 7919 % 13) as f64 / 6.0 - 1.0)).collect();
        let fc = holt_winters(&noisy[..48], 12, 12).unwrap();
        let covered = fc.points.iter().enumerate().filter(|(h, p)| p.lower <= noisy[48 + h] && noisy[48 + h] <= p.upper).count();
        assert!(covered >= 11, "{covered} of 12 inside the 95% interval");
        assert!(fc.points[11].upper - fc.points[11].lower > fc.points[0].upper - fc.points[0].lower);
    }

    #[test]
    fn short_series_fall_back_to_a_linear_trend() {
        let fc = holt_winters(&[10.0, 12.0, 14.0, 16.0, 18.0], 12, 2).unwrap();
        assert_eq!(fc.season, 1);
        assert!((fc.points[0].value - 20.0).abs() < 0.5 && (fc.points[1].value - 22.0).abs() < 0.5, "{:?}", fc.points);
        assert!(holt_winters(&[1.0, 2.0], 12, 1).is_err());
    }

    #[test]
    fn next_periods_roll_over_years() {
        assert_eq!(next_period("month", "2026-12").unwrap(), "2027-01");
        assert_eq!(next_period("month", "2026-09").unwrap(), "2026-10");
        assert_eq!(next_period("quarter", "2026-Q4").unwrap(), "2027-Q1");
        assert_eq!(next_period("year", "2026").unwrap(), "2027");
        assert_eq!(next_period("day", "2024-02-28").unwrap(), "2024-02-29");
        assert!(next_period("region", "East").is_err());
    }
}
