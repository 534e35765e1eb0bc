//! Customer value (customer_value, customer_cohort, `crmcube report`): every number checked
//! against SQL written by hand over the base tables and arithmetic done here.

use std::collections::BTreeMap;

use crate::common::{cents, session, sql};

/// Completed orders per customer from the base tables: (order_id, order_date, revenue cents, margin cents).
const ORDERS: &str = "SELECT o.customer_id, o.order_id, CAST(o.order_date AS VARCHAR),
        CAST(sum(CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2))) AS VARCHAR),
        CAST(sum(CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2)) - CAST(l.quantity * p.unit_cost AS DECIMAL(18, 2))) AS VARCHAR)
    FROM order_lines l JOIN orders o ON l.order_id = o.order_id JOIN dim_product p ON l.product_id = p.product_id
    WHERE o.status = 'completed' GROUP BY 1, 2, 3";

struct Order {
    date: chrono::NaiveDate,
    revenue: i128,
    margin: i128,
}

async fn orders_by_customer() -> BTreeMap<String, Vec<Order>> {
    let mut out: BTreeMap<String, Vec<Order>> = BTreeMap::new();
    for r in sql(&session().await, ORDERS).await {
        out.entry(r[0].clone()).or_default().push(Order { date: r[2].parse().unwrap(), revenue: cents(&r[3]), margin: cents(&r[4]) });
    }
    out
}

/// NTILE(5) over `n` rows sorted: the bucket of row `i` (0-based), as SQL defines it (the first
/// n mod 5 buckets hold one row more).
fn ntile(i: usize, n: usize) -> usize {
    let (size, extra) = (n / 5, n % 5);
    let big = extra * (size + 1);
    if i < big { i / (size + 1) + 1 } else { extra + (i - big) / size + 1 }
}

/// The segment rules as README states them.
fn segment(r: usize, f: usize, m: usize) -> &'static str {
    match (r, f, m) {
        (4.., 4.., 4..) => "Champions",
        (..=2, 4.., 4..) => "Can't lose",
        (3.., 3.., _) => "Loyal",
        (4.., 1, _) => "New",
        (3.., _, _) => "Potential",
        (_, 3.., _) => "At risk",
        (2, _, _) => "Hibernating",
        _ => "Lost",
    }
}

#[tokio::test]
async fn customer_value_matches_the_base_tables_and_the_documented_rules() {
    let orders = orders_by_customer().await;
    let end = orders.values().flatten().map(|o| o.date).max().unwrap();
    let rows = sql(
        &session().await,
        "SELECT customer_id, CAST(first_purchase AS VARCHAR), CAST(last_purchase AS VARCHAR), recency_days, tenure_days, orders,
                repeat_purchase_days, CAST(monetary AS VARCHAR), CAST(margin AS VARCHAR), r_score, f_score, m_score, segment,
                revenue_rank, abc_class, CAST(observation_end AS VARCHAR)
         FROM customer_value ORDER BY customer_id",
    )
    .await;
    assert_eq!(rows.len(), orders.len(), "one row per buying customer");
    assert!(rows.len() > 2000);
    struct Expected {
        id: String,
        recency: i64,
        orders: usize,
        monetary: i128,
    }
    let mut expected = Vec::new();
    for (row, (id, os)) in rows.iter().zip(&orders) {
        assert_eq!(&row[0], id);
        let first = os.iter().map(|o| o.date).min().unwrap();
        let last = os.iter().map(|o| o.date).max().unwrap();
        let days: std::collections::BTreeSet<_> = os.iter().map(|o| o.date).collect();
        let monetary: i128 = os.iter().map(|o| o.revenue).sum();
        let margin: i128 = os.iter().map(|o| o.margin).sum();
        let recency = (end - last).num_days();
        assert_eq!(row[15], end.to_string());
        assert_eq!((row[1].as_str(), row[2].as_str()), (first.to_string().as_str(), last.to_string().as_str()), "{id}");
        assert_eq!(row[3].parse::<i64>().unwrap(), recency, "{id} recency");
        assert_eq!(row[4].parse::<i64>().unwrap(), (end - first).num_days(), "{id} tenure");
        assert_eq!(row[5].parse::<usize>().unwrap(), os.len(), "{id} orders");
        assert_eq!(row[6].parse::<usize>().unwrap(), days.len() - 1, "{id}: repeat purchase days after the first");
        assert_eq!((cents(&row[7]), cents(&row[8])), (monetary, margin), "{id} monetary, margin");
        if os.len() == 1 {
            assert_eq!((row[6].as_str(), &row[3]), ("0", &row[4]), "{id}: one purchase: no repeats, recency = tenure");
        }
        expected.push(Expected { id: id.clone(), recency, orders: os.len(), monetary });
    }
    // Quintile scores by rank (ties broken by customer id), recomputed here.
    let n = expected.len();
    let score = |order: Vec<usize>| -> Vec<usize> {
        let mut s = vec![0; n];
        for (rank, i) in order.into_iter().enumerate() {
            s[i] = ntile(rank, n);
        }
        s
    };
    let by = |key: &dyn Fn(&Expected) -> (i128, String)| {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by_key(|&i| key(&expected[i]));
        score(idx)
    };
    let r = by(&|e| (-(e.recency as i128), e.id.clone()));
    let f = by(&|e| (e.orders as i128, e.id.clone()));
    let m = by(&|e| (e.monetary, e.id.clone()));
    let total: i128 = expected.iter().map(|e| e.monetary).sum();
    let mut by_value: Vec<usize> = (0..n).collect();
    by_value.sort_by_key(|&i| (-expected[i].monetary, expected[i].id.clone()));
    let mut before = 0i128;
    let mut rank_of = vec![0; n];
    let mut class_of = vec![""; n];
    for (rank, &i) in by_value.iter().enumerate() {
        rank_of[i] = rank + 1;
        class_of[i] = if before * 100 < total * 80 { "A" } else if before * 100 < total * 95 { "B" } else { "C" };
        before += expected[i].monetary;
    }
    let mut segments: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        let got: Vec<usize> = row[9..12].iter().map(|x| x.parse().unwrap()).collect();
        assert_eq!(got, [r[i], f[i], m[i]], "{} scores", row[0]);
        assert_eq!(row[12], segment(r[i], f[i], m[i]), "{} segment", row[0]);
        assert_eq!(row[13].parse::<usize>().unwrap(), rank_of[i], "{} rank", row[0]);
        assert_eq!(row[14], class_of[i], "{} class", row[0]);
        *segments.entry(segment(r[i], f[i], m[i])).or_default() += 1;
    }
    // The sample is rich enough that every segment has members.
    assert_eq!(segments.len(), 8, "{segments:?}");
}

#[tokio::test]
async fn cohorts_count_returning_customers_and_their_revenue() {
    let orders = orders_by_customer().await;
    let month = |d: chrono::NaiveDate| d.format("%Y-%m").to_string();
    // (cohort, month) → (customers, revenue cents); cohort sizes.
    let mut cells: BTreeMap<(String, String), (usize, i128)> = BTreeMap::new();
    let mut sizes: BTreeMap<String, usize> = BTreeMap::new();
    for os in orders.values() {
        let cohort = month(os.iter().map(|o| o.date).min().unwrap());
        *sizes.entry(cohort.clone()).or_default() += 1;
        let mut per_month: BTreeMap<String, i128> = BTreeMap::new();
        for o in os {
            *per_month.entry(month(o.date)).or_default() += o.revenue;
        }
        for (m, revenue) in per_month {
            let c = cells.entry((cohort.clone(), m)).or_default();
            c.0 += 1;
            c.1 += revenue;
        }
    }
    let rows = sql(
        &session().await,
        "SELECT cohort, month, months_since, cohort_customers, customers, retention_pct, CAST(revenue AS VARCHAR) FROM customer_cohort ORDER BY 1, 2",
    )
    .await;
    // Every cohort has a row for every month up to the last order month (zeros included).
    let index = |m: &str| m[..4].parse::<i32>().unwrap() * 12 + m[5..].parse::<i32>().unwrap();
    let last = cells.keys().map(|(_, m)| index(m)).max().unwrap();
    let grid: i32 = sizes.keys().map(|c| last - index(c) + 1).sum();
    assert_eq!(rows.len() as i32, grid, "one row per cohort and month");
    let rows: Vec<Vec<String>> = rows.into_iter().filter(|r| r[4] != "0").collect();
    assert_eq!(rows.len(), cells.len());
    for (row, ((cohort, m), (customers, revenue))) in rows.iter().zip(&cells) {
        assert_eq!((&row[0], &row[1]), (cohort, m));
        let since = (m[..4].parse::<i32>().unwrap() - cohort[..4].parse::<i32>().unwrap()) * 12 + m[5..].parse::<i32>().unwrap()
            - cohort[5..].parse::<i32>().unwrap();
        assert_eq!(row[2].parse::<i32>().unwrap(), since);
        assert_eq!(row[3].parse::<usize>().unwrap(), sizes[cohort]);
        assert_eq!(row[4].parse::<usize>().unwrap(), *customers);
        let pct = 100.0 * *customers as f64 / sizes[cohort] as f64;
        assert!((row[5].parse::<f64>().unwrap() - pct).abs() < 0.006, "{cohort} {m}: {} vs {pct}", row[5]);
        assert_eq!(cents(&row[6]), *revenue);
        if since == 0 {
            assert_eq!(*customers, sizes[cohort], "everyone buys in their first month");
        }
    }
}

#[tokio::test]
async fn key_accounts_report_concentration_matches_arithmetic() {
    let orders = orders_by_customer().await;
    let mut values: Vec<i128> = orders.values().map(|os| os.iter().map(|o| o.revenue).sum()).collect();
    values.sort_by(|a, b| b.cmp(a));
    let total: i128 = values.iter().sum();
    let ctx = session().await;
    let report = crmcube::report::run(&ctx, "key-accounts", &crmcube::report::Options { top: 5, ..Default::default() }).await.unwrap();
    assert_eq!(report.sections.len(), 4);
    let top = crate::common::cells(&report.sections[0].batches);
    assert_eq!(top.len(), 5);
    for (i, row) in top.iter().enumerate() {
        assert_eq!(row[0], (i + 1).to_string());
        assert_eq!(cents(&row[4]), values[i], "rank {}", i + 1);
    }
    let concentration = crate::common::cells(&report.sections[1].batches);
    for (row, pct) in concentration.iter().zip([1usize, 10, 20]) {
        let k = (values.len() * pct).div_ceil(100);
        let share = 100.0 * values[..k].iter().sum::<i128>() as f64 / total as f64;
        assert_eq!(row[1], k.to_string());
        assert!((row[2].parse::<f64>().unwrap() - share).abs() < 0.051, "top {pct} %: {} vs {share}", row[2]);
    }
    // The Pareto curve ends at 100 % of customers and of revenue.
    let curve = crate::common::cells(&report.sections[3].batches);
    assert_eq!(curve.last().unwrap()[0], "100");
    assert!((curve.last().unwrap()[1].parse::<f64>().unwrap() - 100.0).abs() < 1e-6);
    // Unknown report names get the list.
    let err = crmcube::report::run(&ctx, "rmf", &Default::default()).await.err().unwrap().to_string();
    assert!(err.contains("rfm"), "{err}");
}

/// Receivables and credit on data made by hand, each case's answer worked out below:
/// A (East, limit 1000): I1 300 paid in full before its due date; I2 400 due 2025-07-01, 100 paid;
///   I3 200 due 2025-03-31, unpaid; open order O7 350 (not invoiced).
/// B (West, no credit limit): I4 250 due 2025-06-14, unpaid.
/// C (East, limit 500): I5 600 due 2025-05-15, paid 2025-07-05 (after the first date asked);
///   I6 100 invoiced 2025-07-02 for O6; open order O8 50.
async fn hand_made() -> datafusion::prelude::SessionContext {
    let ctx = datafusion::prelude::SessionContext::new();
    for sql in [
        "CREATE TABLE dim_customer AS SELECT column1 AS customer_id, column2 AS name, column3 AS region, CAST(column4 AS DECIMAL(18, 2)) AS credit_limit
         FROM (VALUES ('A', 'Ann', 'East', 1000), ('B', 'Bo', 'West', NULL), ('C', 'Cy', 'East', 500))",
        "CREATE TABLE fact_invoice AS SELECT column1 AS invoice_id, column2 AS order_id, column3 AS customer_id, CAST(column4 AS DATE) AS invoice_date,
                CAST(column5 AS DATE) AS due_date, CAST(column6 AS DECIMAL(18, 2)) AS amount
         FROM (VALUES ('I1', 'O1', 'A', '2025-05-01', '2025-05-31', 300), ('I2', 'O9', 'A', '2025-06-01', '2025-07-01', 400),
                      ('I3', 'O3', 'A', '2025-03-01', '2025-03-31', 200), ('I4', 'O4', 'B', '2025-05-15', '2025-06-14', 250),
                      ('I5', 'O5', 'C', '2025-04-15', '2025-05-15', 600), ('I6', 'O6', 'C', '2025-07-02', '2025-08-01', 100))",
        "CREATE TABLE fact_payment AS SELECT column1 AS invoice_id, CAST(column2 AS DATE) AS payment_date, CAST(column3 AS DECIMAL(18, 2)) AS amount
         FROM (VALUES ('I1', '2025-05-20', 300), ('I2', '2025-06-15', 100), ('I5', '2025-07-05', 600))",
        "CREATE TABLE fact_sales AS SELECT column1 AS order_id, column5 AS line_no, column2 AS customer_id, CAST(column3 AS DATE) AS order_date, CAST(column4 AS DECIMAL(18, 2)) AS revenue
         FROM (VALUES ('O9', 'A', '2025-06-01', 400, 1), ('O7', 'A', '2025-06-29', 300, 1), ('O7', 'A', '2025-06-29', 50, 2),
                      ('O8', 'C', '2025-06-30', 50, 1), ('O6', 'C', '2025-07-01', 100, 1))",
    ] {
        ctx.sql(sql).await.unwrap().collect().await.unwrap();
    }
    ctx
}

/// Runs the SQL of the derived table `table` (transforms/<table>.yaml) over the tables of `ctx`,
/// and of the derived tables it reads that `ctx` lacks (as views, by their own SQL).
async fn derived(ctx: &datafusion::prelude::SessionContext, table: &str, select: &str) -> Vec<Vec<String>> {
    let project = &crate::common::loaded().test.project;
    let transforms = crmcube::etl::TransformSet::load(project).unwrap();
    let sql_of = |t: &str| match &transforms.get(t).unwrap().body {
        crmcube::etl::TransformBody::Derived { sql, .. } => sql.clone(),
        _ => panic!("{t} is derived"),
    };
    let sql = sql_of(table);
    // The derived tables it reads, and those they read, each before the tables reading it.
    let inputs = ["customer_monthly", "customer_totals", "customer_receivables", "open_order_lines"];
    let mut read = vec![sql.clone()];
    for input in inputs.iter().rev() {
        if read.iter().any(|s| s.contains(input)) {
            read.push(sql_of(input));
        }
    }
    for input in inputs {
        if read.iter().any(|s| s.contains(input)) && !ctx.table_exist(input).unwrap() {
            ctx.register_table(input, ctx.sql(&sql_of(input)).await.unwrap().into_view()).unwrap();
        }
    }
    let df = ctx.sql(&sql).await.unwrap();
    let view = datafusion::prelude::SessionContext::new();
    view.register_table(table, df.into_view()).unwrap();
    crate::common::cells(&view.sql(select).await.unwrap().collect().await.unwrap())
}

async fn report(ctx: &datafusion::prelude::SessionContext, name: &str, date: &str, threshold: f64) -> Vec<Vec<Vec<String>>> {
    let options = crmcube::report::Options { top: 10, date: Some(date.parse().unwrap()), threshold_pct: threshold, check: None };
    crmcube::report::run(ctx, name, &options).await.unwrap().sections.iter().map(|s| crate::common::cells(&s.batches)).collect()
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

#[tokio::test]
async fn aging_buckets_dso_and_accounts_to_chase_on_hand_made_invoices() {
    let ctx = hand_made().await;
    let s = report(&ctx, "aging", "2025-06-30", 90.0).await;
    // I2: 300 open, due tomorrow → current; I5: 46 days → 31–60; I3: 91 days → over 90; I4: 16 days.
    // I1 (paid in full, early) and I6 (invoiced after the date) are not open.
    assert_eq!(
        s[0],
        [
            row(&["East", "300.00", "0.00", "600.00", "0.00", "200.00", "1100.00"]),
            row(&["West", "0.00", "250.00", "0.00", "0.00", "0.00", "250.00"]),
            row(&["(total)", "300.00", "250.00", "600.00", "0.00", "200.00", "1350.00"]),
        ]
    );
    // Invoiced in the 90 days to 2025-06-30: East I1 300 + I2 400 + I5 600 = 1300 (I3 is older),
    // West I4 250; in all 1550. DSO = open × 90 / invoiced.
    let dso = |open: f64, invoiced: f64| format!("{:.1}", open * 90.0 / invoiced);
    assert_eq!(
        s[1],
        [
            row(&["East", "1100.00", "1300.00", &dso(1100.0, 1300.0)]),
            row(&["West", "250.00", "250.00", &dso(250.0, 250.0)]),
            row(&["(total)", "1350.00", "1550.00", &dso(1350.0, 1550.0)]),
        ]
    );
    // Per customer: A owes 500 and was invoiced I1 + I2 = 700; B 250 of 250; C 600 of 600.
    assert_eq!(
        s[2],
        [
            row(&["C", "Cy", "East", "600.00", "1", "46", "600.00", &dso(600.0, 600.0)]),
            row(&["B", "Bo", "West", "250.00", "1", "16", "250.00", &dso(250.0, 250.0)]),
            row(&["A", "Ann", "East", "200.00", "1", "91", "500.00", &dso(500.0, 700.0)]),
        ]
    );
    // Ten days later I5 is paid and I6 is current: C has nothing overdue.
    let later = report(&ctx, "aging", "2025-07-10", 90.0).await;
    assert!(later[2].iter().all(|r| r[0] != "C"), "{:?}", later[2]);
}

/// receivable_aging (transforms/receivable_aging.yaml) on the hand-made invoices, month end by month end.
#[tokio::test]
async fn the_aging_table_buckets_open_invoices_at_every_month_end() {
    let ctx = hand_made().await;
    ctx.sql("CREATE TABLE dim_date AS SELECT d AS date, to_char(d, '%Y-%m') AS month FROM (SELECT unnest(range(DATE '2025-03-01', DATE '2025-09-01', INTERVAL '1' DAY)) AS d)")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let rows = derived(
        &ctx,
        "receivable_aging",
        "SELECT CAST(snapshot_date AS VARCHAR), customer_id, bucket, invoices, CAST(open_amount AS VARCHAR), CAST(overdue_amount AS VARCHAR)
         FROM receivable_aging ORDER BY 1, 2, 3",
    )
    .await;
    let r = |d: &str, c: &str, b: &str, n: &str, open: &str, overdue: &str| row(&[d, c, b, n, open, overdue]);
    let expected = vec![
        // March: I3 (A, 200, due 03-31) is due that very day: current.
        r("2025-03-31", "A", "0 current", "1", "200.00", "0.00"),
        // April: I3 30 days late; I5 (C, 600) issued 04-15, due 05-15.
        r("2025-04-30", "A", "1-30", "1", "200.00", "200.00"),
        r("2025-04-30", "C", "0 current", "1", "600.00", "0.00"),
        // May: I1 issued and paid in full before the month end (05-20) is not open; I4 (B, 250) due 06-14.
        r("2025-05-31", "A", "61-90", "1", "200.00", "200.00"),
        r("2025-05-31", "B", "0 current", "1", "250.00", "0.00"),
        r("2025-05-31", "C", "1-30", "1", "600.00", "600.00"),
        // June (as the aging report on 2025-06-30): I2 400 − 100 paid on 06-15 = 300, due 07-01.
        r("2025-06-30", "A", "0 current", "1", "300.00", "0.00"),
        r("2025-06-30", "A", "91+", "1", "200.00", "200.00"),
        r("2025-06-30", "B", "1-30", "1", "250.00", "250.00"),
        r("2025-06-30", "C", "31-60", "1", "600.00", "600.00"),
        // July, the last invoice's month: I5 paid 07-05; I6 (C, 100) issued 07-02, due 08-01.
        r("2025-07-31", "A", "1-30", "1", "300.00", "300.00"),
        r("2025-07-31", "A", "91+", "1", "200.00", "200.00"),
        r("2025-07-31", "B", "31-60", "1", "250.00", "250.00"),
        r("2025-07-31", "C", "0 current", "1", "100.00", "0.00"),
    ];
    assert_eq!(rows, expected);
}

/// credit_exposure (transforms/credit_exposure.yaml) on the hand-made data, as of its last day.
#[tokio::test]
async fn the_credit_table_rates_every_customer_as_of_the_last_day() {
    let ctx = hand_made().await;
    let rows = derived(
        &ctx,
        "credit_exposure",
        "SELECT customer_id, CAST(as_of AS VARCHAR), CAST(receivables AS VARCHAR), CAST(open_orders AS VARCHAR), CAST(exposure AS VARCHAR),
                CAST(limited_exposure AS VARCHAR), utilisation_pct, band
         FROM credit_exposure ORDER BY 1",
    )
    .await;
    // As of 2025-07-05 (I5's payment, the latest date): A owes I2 300 + I3 200 and has O7 (350)
    // not invoiced: 850 of 1000. B owes I4 250 with no limit. C owes I6 100 (I5 paid) plus O8 50
    // not invoiced (O6 is invoiced as I6): 150 of 500.
    assert_eq!(
        rows,
        [
            row(&["A", "2025-07-05", "500.00", "350.00", "850.00", "850.00", "85.0", "75-90"]),
            row(&["B", "2025-07-05", "250.00", "0.00", "250.00", "0.00", "", "no limit"]),
            row(&["C", "2025-07-05", "100.00", "50.00", "150.00", "150.00", "30.0", "0-50"]),
        ]
    );
}

#[tokio::test]
async fn credit_exposure_alerts_and_orders_past_the_limit_on_hand_made_data() {
    let ctx = hand_made().await;
    // A: 500 open + O7 350 = 850 of 1000 (85 %); B has no limit; C: 600 + O8 50 = 650 of 500 (130 %).
    let s = report(&ctx, "credit", "2025-06-30", 90.0).await;
    assert_eq!(s[0], [row(&["C", "Cy", "East", "500.00", "600.00", "50.00", "650.00", "130.0"])]);
    assert_eq!(s[1], [row(&["3", "1", "1", "1", "1750.00"])]);
    assert_eq!(s[2], [row(&["O8", "C", "2025-06-30", "50.00", "500.00", "650.00"])]);
    let s = report(&ctx, "credit", "2025-06-30", 80.0).await;
    assert_eq!(s[0].iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["C", "A"]);
    assert_eq!(s[0][1][7], "85.0");
    // After I5 is paid (and O6 invoiced as I6): C owes 100 + O8 50 = 150 of 500.
    let s = report(&ctx, "credit", "2025-07-10", 0.0).await;
    let c = s[0].iter().find(|r| r[0] == "C").unwrap();
    assert_eq!(&c[4..8], ["100.00", "50.00", "150.00", "30.0"]);
    assert!(s[0].iter().all(|r| r[0] != "B"), "a customer without a limit is never on the alert list");
}

/// The control point before accepting an order: `report credit --customer C --amount X`.
#[tokio::test]
async fn a_new_order_is_checked_against_the_credit_limit() {
    let ctx = hand_made().await;
    let check = |customer: &str, amount: f64| {
        let (ctx, customer) = (ctx.clone(), customer.to_string());
        async move {
            let options = crmcube::report::Options { date: Some("2025-06-30".parse().unwrap()), check: Some((customer, amount)), ..Default::default() };
            crmcube::report::run(&ctx, "credit", &options).await.map(|r| crate::common::cells(&r.sections[0].batches))
        }
    };
    // A: exposure 850 of 1000 on 2025-06-30 (see above).
    assert_eq!(check("A", 100.0).await.unwrap(), [row(&["A", "Ann", "1000.00", "850.00", "100.00", "950.00", "95.0", "accept: 50.00 left"])]);
    assert_eq!(check("A", 200.0).await.unwrap()[0][7], "REFUSE: 50.00 over the limit");
    assert_eq!(check("B", 10.0).await.unwrap()[0][7], "no limit: refer to credit control");
    let e = check("Z'; DROP TABLE x; --", 1.0).await.unwrap_err().to_string();
    assert!(e.contains("no customer") && e.contains("DROP"), "{e}");
}

/// Service levels from hand-made contacts, through the real SQL of transforms/service_level.yaml.
/// June 2025, phone (answer within 20 s, 4.80 a contact): P1 waits 10 s, talks 300 s, resolved,
/// rated 5; P2 waits 40 s, talks 60 s and is then abandoned (abandoned after answering); P3 is
/// abandoned in the queue. Email (within a day, 1.60): E1 answered after 23 h, 600 s, resolved, 4.
#[tokio::test]
async fn service_levels_from_hand_made_contacts_with_an_abandon_after_answering() {
    let ctx = datafusion::prelude::SessionContext::new();
    for sql in [
        "CREATE TABLE dim_date AS SELECT CAST(column1 AS DATE) AS date, column2 AS month FROM (VALUES ('2025-06-01', '2025-06'), ('2025-06-02', '2025-06'))",
        "CREATE TABLE fact_interaction AS SELECT column1 AS interaction_id, column2 AS channel, CAST(column3 AS TIMESTAMP) AS queued_at,
                CAST(column4 AS TIMESTAMP) AS answered_at, CAST(column5 AS TIMESTAMP) AS ended_at, column6 AS outcome, CAST(column7 AS INT) AS satisfaction
         FROM (VALUES ('P1', 'phone', '2025-06-02 10:00:00', '2025-06-02 10:00:10', '2025-06-02 10:05:10', 'resolved', 5),
                      ('P2', 'phone', '2025-06-02 11:00:00', '2025-06-02 11:00:40', '2025-06-02 11:01:40', 'abandoned', NULL),
                      ('P3', 'phone', '2025-06-02 12:00:00', NULL, NULL, 'abandoned', NULL),
                      ('E1', 'email', '2025-06-02 09:00:00', '2025-06-03 08:00:00', '2025-06-03 08:10:00', 'resolved', 4))",
    ] {
        ctx.sql(sql).await.unwrap().collect().await.unwrap();
    }
    let project = &crate::common::loaded().test.project;
    let transforms = crmcube::etl::TransformSet::load(project).unwrap();
    let crmcube::etl::TransformBody::Derived { sql, .. } = &transforms.get("service_level").unwrap().body else { panic!("derived") };
    let df = ctx.sql(sql).await.unwrap();
    ctx.register_table("service_level", df.into_view()).unwrap();
    let options = crmcube::report::Options { date: Some("2025-06-30".parse().unwrap()), ..Default::default() };
    let report = crmcube::report::run(&ctx, "service", &options).await.unwrap();
    let rows = crate::common::cells(&report.sections[0].batches);
    // channel, contacts, answered, abandoned, abandonment %, service level %, avg wait s, avg handle s, FCR %, satisfaction, cost/contact
    assert_eq!(
        rows,
        [
            row(&["phone", "3", "2", "2", "66.67", "33.33", "25.0", "180.0", "50.0", "5.0", "4.8"]),
            row(&["email", "1", "1", "0", "0.0", "100.0", "82800.0", "600.0", "100.0", "4.0", "1.6"]),
        ]
    );
    // All channels: 4 contacts, 2 answered in time (P1, E1), waits 10 + 40 + 82800 over 3 answered.
    let month = &crate::common::cells(&report.sections[1].batches)[0];
    assert_eq!(&month[..7], row(&["2025-06", "4", "3", "2", "50.0", "50.0", &format!("{:.1}", (10.0 + 40.0 + 82800.0) / 3.0)]).as_slice());
    assert!((month[10].parse::<f64>().unwrap() - (3.0 * 4.80 + 1.60) / 4.0).abs() < 0.005, "{}", month[10]);
}

/// The stage rules as README states them, applied month by month to each customer's purchases.
#[tokio::test]
async fn lifecycle_stages_and_flows_follow_the_documented_rules() {
    use chrono::Datelike;
    let orders = orders_by_customer().await;
    let end = orders.values().flatten().map(|o| o.date).max().unwrap();
    let index = |d: chrono::NaiveDate| d.year() * 12 + d.month() as i32;
    let name = |i: i32| format!("{:04}-{:02}", (i - 1) / 12, (i - 1) % 12 + 1);
    let mut expected: Vec<(String, String, String, String)> = Vec::new();
    for (id, os) in &orders {
        let months: std::collections::BTreeSet<i32> = os.iter().map(|o| index(o.date)).collect();
        let first = *months.first().unwrap();
        let (mut last, mut previous_gap, mut previous_stage) = (first, 0, String::new());
        for m in first..=index(end) {
            if months.contains(&m) {
                last = m;
            }
            let gap = m - last;
            let stage = if m == first {
                "new"
            } else if gap == 0 && previous_gap >= 6 {
                "reactivated"
            } else if gap <= 2 {
                "active"
            } else if gap <= 5 {
                "at_risk"
            } else {
                "lost"
            };
            expected.push((id.clone(), name(m), stage.to_string(), previous_stage.clone()));
            previous_gap = gap;
            previous_stage = stage.to_string();
        }
    }
    let got: Vec<(String, String, String, String)> = sql(
        &session().await,
        "SELECT customer_id, month, stage, coalesce(previous_stage, '') FROM customer_lifecycle ORDER BY 1, 2",
    )
    .await
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone(), r[2].clone(), r[3].clone()))
    .collect();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e);
    }
    // Every stage occurs, and the flows of the last month add up to its customers.
    for stage in ["new", "active", "at_risk", "lost", "reactivated"] {
        assert!(expected.iter().any(|e| e.2 == stage), "{stage}");
    }
    let report = crmcube::report::run(&session().await, "lifecycle", &Default::default()).await.unwrap();
    let flows = crate::common::cells(&report.sections[1].batches);
    let last = name(index(end));
    let in_last = expected.iter().filter(|e| e.1 == last).count();
    assert_eq!(flows.iter().map(|r| r[2].parse::<usize>().unwrap()).sum::<usize>(), in_last);
    let lost_from_risk = expected.iter().filter(|e| e.1 == last && e.3 == "at_risk" && e.2 == "lost").count();
    assert!(flows.contains(&row(&["at_risk", "lost", &lost_from_risk.to_string()])), "{flows:?}");
}

#[tokio::test]
async fn the_executive_summary_agrees_with_the_other_reports_and_the_base_tables() {
    let ctx = session().await;
    let options = crmcube::report::Options { date: Some("2025-03-15".parse().unwrap()), ..Default::default() };
    let exec = crate::common::cells(&crmcube::report::run(&ctx, "exec", &options).await.unwrap().sections[0].batches);
    let value = |metric: &str, column: usize| -> f64 { exec.iter().find(|r| r[0] == metric).unwrap()[column].parse().unwrap() };
    // Revenue of March and February 2025 from order lines by hand.
    let revenue = |month: &'static str| {
        let ctx = ctx.clone();
        async move {
            let q = format!(
                "SELECT CAST(sum(CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2))) AS VARCHAR)
                 FROM order_lines l JOIN orders o ON l.order_id = o.order_id
                 WHERE o.status = 'completed' AND to_char(o.order_date, '%Y-%m') = '{month}'"
            );
            cents(&sql(&ctx, &q).await[0][0]) as f64 / 100.0
        }
    };
    let (march, february) = (revenue("2025-03").await, revenue("2025-02").await);
    assert!((value("revenue", 1) - march).abs() < 0.006 && (value("revenue", 2) - february).abs() < 0.006);
    assert!((value("revenue", 3) - (march - february)).abs() < 0.011);
    assert!((value("revenue", 4) - (1000.0 * (march - february) / february).round() / 10.0).abs() < 1e-9);
    assert_eq!(exec.iter().find(|r| r[0] == "revenue").unwrap()[5], if march > february { "▲" } else { "▼" });
    // Active customers: the lifecycle stages new, active and reactivated of March.
    let lifecycle = crmcube::report::run(&ctx, "lifecycle", &options).await.unwrap();
    let stages = crate::common::cells(&lifecycle.sections[0].batches);
    let march_row = stages.iter().find(|r| r[0] == "2025-03").unwrap();
    let active: f64 = [1, 2, 5].iter().map(|i| march_row[*i].parse::<f64>().unwrap()).sum();
    assert_eq!(value("active customers", 1), active);
    // DSO at the month end equals the aging report's on 2025-03-31.
    let aging = crmcube::report::run(&ctx, "aging", &crmcube::report::Options { date: Some("2025-03-31".parse().unwrap()), ..Default::default() })
        .await
        .unwrap();
    let dso: f64 = crate::common::cells(&aging.sections[1].batches).iter().find(|r| r[0] == "(total)").unwrap()[3].parse().unwrap();
    assert!((value("DSO (days)", 1) - dso).abs() < 0.051, "{} vs {dso}", value("DSO (days)", 1));
}
