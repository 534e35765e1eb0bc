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
    // Inputs: repeat purchase days and weeks from customer_value's own days (checked there
    // against the base tables).
    let mismatches = sql(
        &ctx,
        "SELECT count(*) FROM customer_clv c JOIN customer_value v ON c.customer_id = v.customer_id
         WHERE c.repeat_purchases <> v.repeat_purchase_days
            OR abs(c.age_weeks * 7 - v.tenure_days) > 1e-6
            OR abs(c.recency_weeks * 7 - (v.tenure_days - v.recency_days)) > 1e-6",
    )
    .await;
    assert_eq!(mismatches, [["0"]]);
    assert_eq!(sql(&ctx, "SELECT count(*) FROM customer_clv").await, sql(&ctx, "SELECT count(*) FROM customer_value").await);
    let Some(python) = python() else { return };
    let model = &sql(&ctx, "SELECT r, alpha, a, b, p, q, v, customers FROM clv_model").await[0];
    let rows = sql(
        &ctx,
        "SELECT customer_id, repeat_purchases, recency_weeks, age_weeks, mean_repeat_value, expected_purchases, p_alive, expected_average_value
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
    let out = std::process::Command::new(&python).arg(crate::common::repo().join("tests/clv_lifetimes.py")).arg(&csv).arg("52").output().unwrap();
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
    }
}
