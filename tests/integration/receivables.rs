//! The semi-additive balance of the receivables cube, against invoices and payments summed by
//! hand up to each period's last month end.

use std::collections::BTreeMap;

use crmcube::query::CubeQuery;

use crate::common::{ask, cents, session, sql};

fn receivables(measures: &[&str]) -> CubeQuery {
    CubeQuery { cube: "receivables".into(), measures: measures.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// Open balance per region at `date`: everything invoiced minus everything paid up to it.
async fn balance_by_region_at(date: &str) -> BTreeMap<String, i128> {
    let ctx = session().await;
    let invoiced = sql(&ctx, &format!("SELECT c.region, sum(i.amount) FROM fact_invoice i JOIN dim_customer c ON i.customer_id = c.customer_id WHERE i.invoice_date <= DATE '{date}' GROUP BY 1")).await;
    let paid = sql(&ctx, &format!("SELECT c.region, sum(p.amount) FROM fact_payment p JOIN fact_invoice i ON p.invoice_id = i.invoice_id JOIN dim_customer c ON i.customer_id = c.customer_id WHERE p.payment_date <= DATE '{date}' GROUP BY 1")).await;
    let mut out: BTreeMap<String, i128> = invoiced.into_iter().map(|r| (r[0].clone(), cents(&r[1]))).collect();
    for r in paid {
        *out.entry(r[0].clone()).or_default() -= cents(&r[1]);
    }
    out
}

#[tokio::test]
async fn a_year_shows_its_last_month_end_balance_not_a_sum_of_months() {
    let rows = ask(CubeQuery { by: vec!["customer.region".into()], filters: vec!["time.year=2025".into()], ..receivables(&["balance", "invoiced"]) }).await;
    let expected = balance_by_region_at("2025-12-31").await;
    let ctx = session().await;
    let invoiced: BTreeMap<String, i128> = sql(&ctx, "SELECT c.region, sum(i.amount) FROM fact_invoice i JOIN dim_customer c ON i.customer_id = c.customer_id WHERE date_part('year', i.invoice_date) = 2025 GROUP BY 1")
        .await
        .into_iter()
        .map(|r| (r[0].clone(), cents(&r[1])))
        .collect();
    assert_eq!(rows.len(), expected.len());
    for r in &rows {
        assert_eq!(cents(&r[1]), expected[&r[0]], "balance of {} at 2025-12-31", r[0]);
        assert_eq!(cents(&r[2]), invoiced[&r[0]], "invoiced in 2025 by {} is additive over months", r[0]);
    }
    assert!(expected.values().all(|b| *b > 0), "customers owe money at the year end");
}

#[tokio::test]
async fn each_month_shows_its_own_month_end_balance() {
    let rows = ask(CubeQuery { by: vec!["time.month".into()], filters: vec!["time.year=2025".into()], ..receivables(&["balance"]) }).await;
    assert_eq!(rows.len(), 12);
    for r in [&rows[0], &rows[5], &rows[11]] {
        let month = &r[0];
        let end = chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").unwrap() + chrono::Months::new(1) - chrono::Days::new(1);
        let total: i128 = balance_by_region_at(&end.to_string()).await.values().sum();
        assert_eq!(cents(&r[1]), total, "balance at the end of {month}");
    }
}

#[tokio::test]
async fn a_balance_through_cube_sql_is_the_year_end_balance_and_joins_are_refused_with_a_hint() {
    let cubes = crate::common::cubes();
    let ctx = session().await;
    crmcube::query::sql::register_cubes(&ctx, &cubes).await.unwrap();
    let ask_sql = |text: &'static str| {
        let (ctx, cubes) = (ctx.clone(), &cubes);
        async move { crate::common::cells(&crmcube::query::sql::sql(&ctx, cubes, text).await.unwrap().collect().await.unwrap()) }
    };
    // The measure is the balance at the slice's last month end; SUM(balance) is the raw column.
    let expected: i128 = balance_by_region_at("2025-12-31").await.values().sum();
    let rows = ask_sql("SELECT balance FROM cubes.receivables WHERE time_year = 2025").await;
    assert_eq!(cents(&rows[0][0]), expected);
    let raw = ask_sql("SELECT SUM(balance) FROM cubes.receivables WHERE time_year = 2025").await;
    let by_hand = sql(&ctx, "SELECT sum(balance) FROM fact_receivable WHERE date_part('year', snapshot_date) = 2025").await;
    assert_eq!(cents(&raw[0][0]), cents(&by_hand[0][0]));
    assert!(cents(&raw[0][0]) > 2 * expected, "twelve month ends summed are far more than one");
    let err = crmcube::query::sql::sql(&ctx, &cubes, "SELECT c.region, balance FROM cubes.receivables r JOIN dim_customer c ON r.customer_customer = c.customer_id GROUP BY 1")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("semi-additive") && err.contains("alone in FROM") && err.contains("outer query"), "{err}");
}

/// A snapshot without a cube's tables (loaded before the cube was added) still serves every
/// other cube; asking for the missing one names the missing table.
#[tokio::test]
async fn a_cube_whose_tables_are_missing_leaves_the_others_usable() {
    let cubes = crate::common::cubes();
    let ctx = session().await;
    ctx.deregister_table("receivable_aging").unwrap();
    crmcube::query::sql::register_cubes(&ctx, &cubes).await.unwrap();
    let rows = sql(&ctx, "SELECT count(*) FROM cubes.sales").await;
    assert_ne!(rows, [["0"]]);
    let q = CubeQuery { cube: "aging".into(), measures: vec!["open_amount".into()], ..Default::default() };
    let e = crmcube::query::run(&ctx, cubes.get("aging").unwrap(), &q).await.unwrap_err().to_string();
    assert!(e.contains("receivable_aging"), "{e}");
}

/// fact_receivable is the whole customer × month-end grid, quiet months included, and every
/// row's figures are the invoices and payments of its month and up to its month end (by hand,
/// from fact_invoice and fact_payment; the table computes balances over its flow months only).
#[tokio::test]
async fn every_customer_has_every_month_end_with_its_flows_and_balance() {
    let ctx = session().await;
    let grid = sql(
        &ctx,
        "SELECT (SELECT count(*) FROM fact_receivable) AS a, (SELECT count(*) FROM (SELECT DISTINCT customer_id, snapshot_date FROM fact_receivable)) AS b, \
         (SELECT count(*) FROM dim_customer) * (SELECT count(DISTINCT month) FROM dim_date) AS c",
    )
    .await;
    assert_eq!(grid[0][0], grid[0][2], "one row per customer and month: {grid:?}");
    assert_eq!(grid[0][1], grid[0][2], "no customer month twice: {grid:?}");
    // Range joins of each month end with the invoices and payments up to it, for 40 customers.
    let by_hand = "WITH ends AS (SELECT max(date) AS month_end, min(date) AS month_start FROM dim_date GROUP BY month), \
         some AS (SELECT customer_id FROM dim_customer ORDER BY customer_id LIMIT 40), \
         inv AS (SELECT customer_id, invoice_date AS d, amount FROM fact_invoice WHERE customer_id IN (SELECT customer_id FROM some)), \
         pay AS (SELECT i.customer_id, p.payment_date AS d, p.amount FROM fact_payment p JOIN fact_invoice i ON p.invoice_id = i.invoice_id \
                 WHERE i.customer_id IN (SELECT customer_id FROM some)), \
         cells AS (SELECT s.customer_id, e.month_end, e.month_start FROM some s CROSS JOIN ends e), \
         inv_m AS (SELECT x.customer_id, x.month_end, sum(CASE WHEN v.d >= x.month_start THEN v.amount ELSE 0 END) AS flow, sum(v.amount) AS upto \
                   FROM cells x JOIN inv v ON v.customer_id = x.customer_id AND v.d <= x.month_end GROUP BY 1, 2), \
         pay_m AS (SELECT x.customer_id, x.month_end, sum(CASE WHEN v.d >= x.month_start THEN v.amount ELSE 0 END) AS flow, sum(v.amount) AS upto \
                   FROM cells x JOIN pay v ON v.customer_id = x.customer_id AND v.d <= x.month_end GROUP BY 1, 2) \
         SELECT x.customer_id, x.month_end, coalesce(a.flow, 0) AS invoiced, coalesce(b.flow, 0) AS paid, coalesce(a.upto, 0) - coalesce(b.upto, 0) AS balance \
         FROM cells x LEFT JOIN inv_m a ON a.customer_id = x.customer_id AND a.month_end = x.month_end \
         LEFT JOIN pay_m b ON b.customer_id = x.customer_id AND b.month_end = x.month_end";
    let expected = sql(&ctx, &format!("SELECT customer_id, CAST(month_end AS VARCHAR), CAST(invoiced AS VARCHAR), CAST(paid AS VARCHAR), CAST(balance AS VARCHAR) FROM ({by_hand}) ORDER BY 1, 2")).await;
    let stored = sql(
        &ctx,
        "SELECT customer_id, CAST(snapshot_date AS VARCHAR), CAST(invoiced AS VARCHAR), CAST(paid AS VARCHAR), CAST(balance AS VARCHAR) FROM fact_receivable \
         WHERE customer_id IN (SELECT customer_id FROM dim_customer ORDER BY customer_id LIMIT 40) ORDER BY 1, 2",
    )
    .await;
    let numbers = |rows: Vec<Vec<String>>| rows.into_iter().map(|r| (r[0].clone(), r[1].clone(), cents(&r[2]), cents(&r[3]), cents(&r[4]))).collect::<Vec<_>>();
    let (expected, stored) = (numbers(expected), numbers(stored));
    assert_eq!(stored, expected);
    // The 40 customers include quiet months before a first invoice and between flows.
    assert!(stored.iter().any(|r| r.2 == 0 && r.3 == 0 && r.4 != 0), "a quiet month carrying a balance");
    assert!(stored.iter().any(|r| r.2 == 0 && r.3 == 0 && r.4 == 0), "a month before anything was owed");
}
