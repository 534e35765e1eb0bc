//! Lifetime value models (`crmcube::analytics::clv`, fitted by every load into `clv_model` and
//! `customer_clv`) against the `lifetimes` package on the sample's customers: every parameter
//! and every customer's predictions within 1 %; the model inputs against customer_value.

use crate::common::{python, session, sql};

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 0.01 * want.abs().max(1e-9), "{what}: crmcube {got} vs lifetimes {want}");
}

#[tokio::test]
async fn the_loads_bgnbd_and_gamma_gamma_agree_with_the_lifetimes_package() {
    let ctx = session().await;
    // Inputs: repeat purchase days and weeks are customer_value's (checked there against the
    // base tables).
    let mismatches = sql(
        &ctx,
        "SELECT count(*) FROM customer_clv c JOIN customer_value v ON c.customer_id = v.customer_id
         WHERE c.repeat_purchases <> v.repeat_purchase_days
            OR abs(c.age * 7 - v.tenure_days) > 1e-6
            OR abs(c.recency * 7 - (v.tenure_days - v.recency_days)) > 1e-6",
    )
    .await;
    assert_eq!(mismatches, [["0"]]);
    assert_eq!(sql(&ctx, "SELECT count(*) FROM customer_clv").await, sql(&ctx, "SELECT count(*) FROM customer_value").await);
    // The mean repeat value by hand from the sales: the average of the customer's purchase days
    // after the first (each day's revenue summed), 0 without one.
    let wrong_means = sql(
        &ctx,
        "WITH days AS (SELECT customer_id, order_date, sum(revenue) AS v FROM fact_sales GROUP BY 1, 2),
              firsts AS (SELECT customer_id, min(order_date) AS first_day FROM days GROUP BY 1),
              repeats AS (SELECT d.customer_id, avg(CAST(d.v AS DOUBLE)) AS m FROM days d JOIN firsts f ON d.customer_id = f.customer_id
                          WHERE d.order_date > f.first_day GROUP BY 1)
         SELECT count(*) FROM customer_clv c LEFT JOIN repeats r ON r.customer_id = c.customer_id
         WHERE abs(c.mean_repeat_value - coalesce(r.m, 0)) > 1e-9 * greatest(1, abs(c.mean_repeat_value))",
    )
    .await;
    assert_eq!(wrong_means, [["0"]]);
    // The load reads the inputs from customer_value and customer_totals; from the sales alone
    // (what a project without customer_value, or with another observation end, uses), and with
    // the first days' revenue from customer_monthly or from the sales (a project without
    // customer_totals), they are the same numbers.
    use crmcube::etl::models::{FirstDays, summary_from_value_sql, summary_sql};
    let settings = crmcube::analytics::clv::Settings::default();
    let firsts = [FirstDays::Totals, FirstDays::Monthly, FirstDays::Sales];
    for summary in std::iter::once(summary_sql(&settings)).chain(firsts.map(|f| summary_from_value_sql(&settings, f))) {
        let same = format!(
            "SELECT count(*) FROM ({summary}) s JOIN customer_clv c ON c.customer_id = s.customer_id
             WHERE s.x = c.repeat_purchases AND s.t_x = c.recency AND s.t = c.age AND s.m = c.mean_repeat_value"
        );
        assert_eq!(sql(&ctx, &same).await, sql(&ctx, "SELECT count(*) FROM customer_clv").await, "{summary}");
    }
    let Some(python) = python() else { return };
    let model = &sql(&ctx, "SELECT r, alpha, a, b, p, q, v, customers, time_unit, horizon, horizon_months, monthly_discount FROM clv_model").await[0];
    // The sample project's defaults: weeks, 12 months ahead, 1 % a month.
    assert_eq!(model[8..].to_vec(), ["week", &format!("{}", 12.0 * 365.25 / 12.0 / 7.0), "12", "0.01"]);
    let rows = sql(
        &ctx,
        "SELECT customer_id, repeat_purchases, recency, age, mean_repeat_value, expected_purchases, p_alive, expected_average_value, clv
         FROM customer_clv ORDER BY customer_id",
    )
    .await;
    assert!(rows.iter().any(|r| r[1] == "0.0"), "one-purchase customers are part of the fit");
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("summary.csv");
    let mut text = String::from("customer_id,x,t_x,t,m\n");
    for r in &rows {
        text.push_str(&format!("{},{},{},{},{}\n", r[0], r[1], r[2], r[3], r[4]));
    }
    std::fs::write(&csv, text).unwrap();
    let out = std::process::Command::new(&python).arg(crate::common::repo().join("tests/clv_lifetimes.py")).arg(&csv).args(&model[9..12]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = |i: usize| model[i].parse::<f64>().unwrap();
    for (i, (m, name)) in [("bgnbd", "r"), ("bgnbd", "alpha"), ("bgnbd", "a"), ("bgnbd", "b"), ("gamma_gamma", "p"), ("gamma_gamma", "q"), ("gamma_gamma", "v")]
        .iter()
        .enumerate()
    {
        close(ours(i), theirs[m][name].as_f64().unwrap(), name);
    }
    let per_customer = theirs["customers"].as_array().unwrap();
    assert_eq!(per_customer.len(), rows.len());
    for (r, t) in rows.iter().zip(per_customer) {
        assert_eq!(r[0], t[0].as_str().unwrap());
        let f = |i: usize| r[i].parse::<f64>().unwrap();
        close(f(5), t[1].as_f64().unwrap(), &format!("{} expected purchases", r[0]));
        close(f(6), t[2].as_f64().unwrap(), &format!("{} P(alive)", r[0]));
        if f(1) > 0.0 {
            close(f(7), t[3].as_f64().unwrap(), &format!("{} expected value", r[0]));
        }
        close(f(8), t[4].as_f64().unwrap(), &format!("{} lifetime value", r[0]));
    }
}

/// The executive summary's lifetime value: at the last order date the models' own predictions
/// summed; at an earlier month end, every customer's purchases up to that day — taken by hand
/// from the order lines here — scored with the snapshot's fitted parameters.
#[tokio::test]
async fn the_executive_summary_values_customers_as_of_each_month_end() {
    use crmcube::analytics::clv::{BgNbd, Customer, GammaGamma, Settings, clv};
    let ctx = session().await;
    let lifetime_value = |date: &str| {
        let (ctx, date) = (ctx.clone(), date.to_string());
        async move {
            let options = crmcube::report::Options { date: Some(date.parse().unwrap()), ..Default::default() };
            let exec = crate::common::cells(&crmcube::report::run(&ctx, "exec", &options).await.unwrap().sections[0].batches);
            let row = exec.iter().find(|r| r[0] == "lifetime value").expect("a lifetime value row").clone();
            (row[1].parse::<f64>().unwrap(), row[2].parse::<f64>().unwrap())
        }
    };
    let last = sql(&ctx, "SELECT CAST(max(order_date) AS VARCHAR) FROM fact_sales").await[0][0].clone();
    let total: f64 = sql(&ctx, "SELECT sum(clv) FROM customer_clv").await[0][0].parse().unwrap();
    let (now, _) = lifetime_value(&last).await;
    assert!((now - total).abs() < 0.01, "exec {now} vs Σ customer_clv {total}");

    let m = &sql(&ctx, "SELECT r, alpha, a, b, p, q, v FROM clv_model").await[0];
    let f = |i: usize| m[i].parse::<f64>().unwrap();
    let bg = BgNbd { r: f(0), alpha: f(1), a: f(2), b: f(3), log_likelihood: 0.0 };
    let gg = GammaGamma { p: f(4), q: f(5), v: f(6), log_likelihood: 0.0 };
    let days = sql(
        &ctx,
        "SELECT o.customer_id, CAST(o.order_date AS VARCHAR),
                CAST(sum(CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2))) AS VARCHAR)
         FROM order_lines l JOIN orders o ON l.order_id = o.order_id JOIN dim_customer c ON o.customer_id = c.customer_id
         WHERE o.status = 'completed' AND o.order_date <= DATE '2025-02-28'
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .await;
    let end = chrono::NaiveDate::from_ymd_opt(2025, 2, 28).unwrap();
    let mut by_customer: std::collections::BTreeMap<&str, Vec<(chrono::NaiveDate, f64)>> = Default::default();
    for r in &days {
        by_customer.entry(r[0].as_str()).or_default().push((r[1].parse().unwrap(), r[2].parse().unwrap()));
    }
    let settings = Settings::default();
    let mut expected = 0.0;
    for purchases in by_customer.values() {
        let (first, last) = (purchases[0].0, purchases[purchases.len() - 1].0);
        let x = (purchases.len() - 1) as f64;
        let weeks = |d: chrono::NaiveDate| (d - first).num_days() as f64 / 7.0;
        let m = if x > 0.0 { purchases[1..].iter().map(|p| p.1).sum::<f64>() / x } else { 0.0 };
        expected += clv(&bg, &gg, &Customer { x, t_x: weeks(last), t: weeks(end), m }, &settings);
    }
    let (march, february) = lifetime_value("2025-03-15").await;
    assert!((february - expected).abs() < 0.01 * expected.abs().max(1.0) / 100.0, "February 2025: exec {february} vs by hand {expected}");
    assert!(march > february, "more customers have bought by the end of March");
}

/// The settings of `lifetime_value:` in crmcube.yaml: a changed setting refits the models at the
/// next load (nothing else changed), and measuring time in days instead of weeks rescales α by 7
/// while every customer's P(alive) stays — the model does not depend on the unit.
#[test]
fn changed_settings_refit_the_models_and_the_time_unit_only_rescales_alpha() {
    use crmcube::analytics::clv::{Settings, TimeUnit};
    let t = crate::common::test_project();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    let read = |w: &crmcube::warehouse::Warehouse, q: &'static str| {
        let w = w.clone();
        crate::common::block_on(async move { sql(&w.session().await.unwrap(), q).await })
    };
    let load = |p: &crmcube::project::Project, w: &crmcube::warehouse::Warehouse| {
        let (p, w) = (p.clone(), w.clone());
        crate::common::block_on(async move { crmcube::etl::load(&p, &w).await.unwrap() })
    };
    load(&p, &w);
    let weeks = read(&w, "SELECT alpha, r, time_unit, horizon_months FROM clv_model");
    let alive_weeks = read(&w, "SELECT customer_id, p_alive FROM customer_clv ORDER BY 1");
    let days = crmcube::project::Project { lifetime_value: Settings { time_unit: TimeUnit::Day, horizon_months: 6, ..Settings::default() }, ..p.clone() };
    let report = load(&days, &w);
    assert!(!report.unchanged, "a changed setting is a change");
    let refit: Vec<&str> = report.tables.iter().filter(|r| r.mode != "unchanged").map(|r| r.table.as_str()).collect();
    assert_eq!(refit, ["clv_model", "customer_clv"], "only the models are refitted");
    let in_days = read(&w, "SELECT alpha, r, time_unit, horizon_months FROM clv_model");
    assert_eq!((in_days[0][2].as_str(), in_days[0][3].as_str()), ("day", "6"));
    let (a_weeks, a_days): (f64, f64) = (weeks[0][0].parse().unwrap(), in_days[0][0].parse().unwrap());
    assert!((a_days / a_weeks - 7.0).abs() < 0.07, "α in days {a_days} ≈ 7 × α in weeks {a_weeks}");
    assert!((in_days[0][1].parse::<f64>().unwrap() / weeks[0][1].parse::<f64>().unwrap() - 1.0).abs() < 0.01, "r does not depend on the unit");
    let alive_days = read(&w, "SELECT customer_id, p_alive FROM customer_clv ORDER BY 1");
    for (a, b) in alive_weeks.iter().zip(&alive_days) {
        let (x, y): (f64, f64) = (a[1].parse().unwrap(), b[1].parse().unwrap());
        assert!(a[0] == b[0] && (x - y).abs() < 0.01, "{}: P(alive) {x} in weeks vs {y} in days", a[0]);
    }
    // The same settings again: nothing to do.
    assert!(load(&days, &w).unchanged);
}
