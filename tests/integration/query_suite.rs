//! The OLAP query suite of tests/queries/*.yaml: every case through the cube query path, the
//! cube SQL path (`cubes.sales`) and a hand-written SQL over the base tables; all three agree.

use crmcube::cube::CubeSet;
use crmcube::etl::TransformSet;
use crmcube::query::{CubeQuery, run, sql as cube_sql};
use serde::Deserialize;

use crate::common::{cells, loaded, repo, session, sql};

/// Completed order lines with every attribute the suite filters or groups on, joined by hand.
const BASE: &str = "WITH s AS (
  SELECT o.order_id, o.customer_id, c.name AS customer_name, o.rep_id, r.region AS rep_region, r.name AS rep_name,
         o.channel,
         CASE o.channel WHEN 'online' THEN 'digital' WHEN 'partner' THEN 'indirect' ELSE 'direct' END AS channel_group,
         o.order_date, CAST(date_part('year', o.order_date) AS INT) AS yr,
         concat(CAST(date_part('year', o.order_date) AS INT), '-Q', CAST(date_part('quarter', o.order_date) AS INT)) AS qtr,
         to_char(o.order_date, '%Y-%m') AS mon,
         c.region, c.province, c.city, p.category, p.subcategory, l.product_id, p.name AS product_name, l.quantity,
         CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2)) AS revenue,
         CAST(l.quantity * p.unit_cost AS DECIMAL(18, 2)) AS cost
  FROM order_lines l
  JOIN orders o ON l.order_id = o.order_id
  JOIN dim_customer c ON o.customer_id = c.customer_id
  JOIN dim_product p ON l.product_id = p.product_id
  LEFT JOIN dim_sales_rep r ON o.rep_id = r.rep_id
  WHERE o.status = 'completed')";

/// Every customer's open balance at every month end, summed by hand from invoices and payments
/// (not read from fact_receivable), for the receivables cases.
const BASE_RECEIVABLES: &str = "WITH ends AS (
  SELECT month AS mon, max(year) AS yr, max(quarter) AS qtr, max(date) AS month_end FROM dim_date GROUP BY month
), flows AS (
  SELECT customer_id, invoice_date AS day, amount FROM fact_invoice
  UNION ALL
  SELECT i.customer_id, p.payment_date AS day, -p.amount AS amount FROM fact_payment p JOIN fact_invoice i ON p.invoice_id = i.invoice_id
), b AS (
  SELECT e.mon, e.yr, e.qtr, e.month_end, c.customer_id, c.name, c.region, c.province, c.segment, coalesce(sum(f.amount), 0) AS balance
  FROM ends e CROSS JOIN dim_customer c LEFT JOIN flows f ON f.customer_id = c.customer_id AND f.day <= e.month_end
  GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9)";

/// Every invoice open at a few month ends (`d`), with its days overdue and bucket, for the aging cases.
const BASE_AGING: &str = "WITH ends AS (
  SELECT column1 AS d FROM (VALUES (DATE '2024-12-31'), (DATE '2025-06-30'), (DATE '2025-12-31'))
), paid AS (
  SELECT e.d, p.invoice_id, sum(p.amount) AS paid FROM ends e JOIN fact_payment p ON p.payment_date <= e.d GROUP BY 1, 2
), open AS (
  SELECT e.d, i.customer_id, e.d - i.due_date AS late, i.amount - coalesce(p.paid, 0) AS open
  FROM ends e JOIN fact_invoice i ON i.invoice_date <= e.d LEFT JOIN paid p ON p.d = e.d AND p.invoice_id = i.invoice_id
  WHERE i.amount - coalesce(p.paid, 0) > 0
), a AS (
  SELECT o.*, c.region, c.province,
         CASE WHEN late <= 0 THEN '0 current' WHEN late <= 30 THEN '1-30' WHEN late <= 60 THEN '31-60' WHEN late <= 90 THEN '61-90' ELSE '91+' END AS bucket
  FROM open o JOIN dim_customer c ON c.customer_id = o.customer_id)";

/// Every customer's credit exposure with all the data: invoices less payments, plus completed
/// orders (order lines by hand) that have no invoice; utilisation and band, for the credit cases.
const BASE_CREDIT: &str = "WITH paid AS (
  SELECT invoice_id, sum(amount) AS paid FROM fact_payment GROUP BY 1
), owed AS (
  SELECT i.customer_id, sum(i.amount - coalesce(p.paid, 0)) AS receivables
  FROM fact_invoice i LEFT JOIN paid p ON p.invoice_id = i.invoice_id WHERE i.amount > coalesce(p.paid, 0) GROUP BY 1
), ordered AS (
  SELECT o.customer_id, sum(CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2))) AS open_orders
  FROM order_lines l JOIN orders o ON l.order_id = o.order_id JOIN dim_product p ON p.product_id = l.product_id
  WHERE o.status = 'completed' AND o.order_id NOT IN (SELECT order_id FROM fact_invoice) GROUP BY 1
), x AS (
  SELECT c.customer_id, c.name, c.region, c.credit_limit, coalesce(w.receivables, 0) AS receivables, coalesce(d.open_orders, 0) AS open_orders,
         coalesce(w.receivables, 0) + coalesce(d.open_orders, 0) AS exposure
  FROM dim_customer c LEFT JOIN owed w ON w.customer_id = c.customer_id LEFT JOIN ordered d ON d.customer_id = c.customer_id
), e AS (
  SELECT *, CASE WHEN credit_limit > 0 THEN round(100 * CAST(exposure AS DOUBLE) / CAST(credit_limit AS DOUBLE), 1) END AS utilisation,
         CASE WHEN credit_limit IS NULL OR credit_limit <= 0 THEN 'no limit'
              WHEN round(100 * CAST(exposure AS DOUBLE) / CAST(credit_limit AS DOUBLE), 1) < 50 THEN '0-50'
              WHEN round(100 * CAST(exposure AS DOUBLE) / CAST(credit_limit AS DOUBLE), 1) < 75 THEN '50-75'
              WHEN round(100 * CAST(exposure AS DOUBLE) / CAST(credit_limit AS DOUBLE), 1) < 90 THEN '75-90'
              WHEN round(100 * CAST(exposure AS DOUBLE) / CAST(credit_limit AS DOUBLE), 1) <= 100 THEN '90-100'
              ELSE '>100' END AS band
  FROM x)";

/// The hand-written CTEs a cube's base_sql runs after.
fn base(cube: &str) -> &'static str {
    match cube {
        "sales" | "cohorts" => BASE,
        "receivables" => BASE_RECEIVABLES,
        "lifecycle" | "clv" => "",
        "aging" => BASE_AGING,
        "credit" => BASE_CREDIT,
        other => panic!("no hand-written base for cube {other}: add one to query_suite.rs"),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// The cube asked: the file's name (tests/queries/<cube>.yaml).
    #[serde(skip)]
    pub cube: String,
    pub name: String,
    pub query: serde_json::Value,
    pub cube_sql: String,
    base_sql: String,
    #[serde(default)]
    pub ordered: bool,
    #[serde(default)]
    columns: Option<usize>,
    /// Columns (0-based) left out of the comparison.
    #[serde(default)]
    skip_columns: Vec<usize>,
    /// The answer is no rows (otherwise an empty answer fails: three empty results agree on nothing).
    #[serde(default)]
    empty: bool,
}

/// Cells compared by value: numbers to two decimals, text as is.
fn normalise(rows: Vec<Vec<String>>, case: &Case) -> Vec<Vec<String>> {
    let (columns, ordered) = (case.columns, case.ordered);
    let mut rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .take(columns.unwrap_or(usize::MAX))
                .enumerate()
                .filter(|(i, _)| !case.skip_columns.contains(i))
                .map(|(_, c)| c)
                .map(|c| match c.parse::<f64>() {
                    Ok(v) if !c.contains('-') || c.starts_with('-') => format!("{v:.2}"),
                    _ => c,
                })
                .collect()
        })
        .collect();
    if !ordered {
        rows.sort();
    }
    rows
}

/// The cases of every tests/queries/<cube>.yaml, each tagged with its cube.
pub fn cases() -> Vec<Case> {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("tests/queries")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out = Vec::new();
    for path in files.iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        let cube = path.file_stem().unwrap().to_string_lossy().to_string();
        let cases: Vec<Case> = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.extend(cases.into_iter().map(|c| Case { cube: cube.clone(), ..c }));
    }
    out
}

#[tokio::test]
async fn every_suite_query_agrees_across_cube_query_cube_sql_and_base_sql() {
    let cases = cases();
    assert!(cases.len() >= 40, "the suite has {} cases", cases.len());
    let project = &loaded().test.project;
    let transforms = TransformSet::load(project).unwrap();
    let cubes = CubeSet::load(project, &transforms).unwrap();
    let ctx = session().await;
    cube_sql::register_cubes(&ctx, &cubes).await.unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let mut q: CubeQuery = serde_json::from_value(case.query.clone()).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        q.cube = case.cube.clone();
        let via_query = cells(&run(&ctx, cubes.get(&case.cube).unwrap(), &q).await.unwrap_or_else(|e| panic!("{}: {e}", case.name)));
        let via_cube_sql = cells(
            &cube_sql::sql(&ctx, &cubes, &case.cube_sql).await.unwrap_or_else(|e| panic!("{}: {e}", case.name)).collect().await.unwrap(),
        );
        let via_base = sql(&ctx, &format!("{} {}", base(&case.cube), case.base_sql)).await;
        let (a, b, c) = (
            normalise(via_query, case),
            normalise(via_cube_sql, case),
            normalise(via_base, case),
        );
        if c.is_empty() != case.empty {
            failures.push(format!("{}: the hand-written SQL returns {} rows", case.name, c.len()));
        }
        if a != c || b != c {
            failures.push(format!(
                "{}:\n  cube query {:?}\n  cube sql   {:?}\n  base sql   {:?}",
                case.name,
                &a[..a.len().min(3)],
                &b[..b.len().min(3)],
                &c[..c.len().min(3)]
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases disagree:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
