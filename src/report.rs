//! `crmcube report NAME`: the customer-value questions, answered from the derived tables every
//! load rebuilds (`customer_value`, `customer_cohort`; see transforms/ and README "Customer
//! value" for what each column counts).
//!
//! A report is a few titled sections, each one SQL query over those tables in the session it
//! is given — so `--as USER` access rules and `--as-of` snapshots apply as to any query — and
//! optionally one section to draw as a chart.

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::prelude::SessionContext;

use crate::error::{QueryError, Result};

/// The reports there are, with what each answers.
pub const REPORTS: [(&str, &str); 9] = [
    ("clv", "predicted lifetime value (BG/NBD + Gamma-Gamma fitted at load): the model, top customers, value by RFM segment"),
    ("exec", "executive summary for the month of --date against the month before: revenue, margin, customers, churn, DSO, service level, lifetime value"),
    ("rfm", "customers by RFM segment: how many, how recent, how frequent, what they are worth"),
    ("key-accounts", "top customers, revenue concentration (top 1 %, 10 %, 20 %), ABC classes, Pareto curve"),
    ("cohorts", "retention % of each first-purchase month's customers over the following months"),
    ("aging", "open receivables by days overdue and region, DSO, and the overdue accounts to chase (--date)"),
    ("credit", "credit exposure (open receivables + uninvoiced orders) against limits; accounts at ≥ --threshold %; orders past the limit"),
    ("lifecycle", "customers by lifecycle stage per month, and the flows between stages in the month of --date (where customers are lost)"),
    ("service", "service levels per channel for the month of --date (default the latest), and the monthly trend"),
];

/// Service-level rates from the sums of `service_level` (ratios of sums at any grouping).
const SERVICE_RATES: &str = "sum(contacts) AS contacts, sum(answered) AS answered, sum(abandoned) AS abandoned,
    round(100 * CAST(sum(abandoned) AS DOUBLE) / CAST(sum(contacts) AS DOUBLE), 2) AS abandonment_pct,
    round(100 * CAST(sum(answered_in_time) AS DOUBLE) / CAST(sum(contacts) AS DOUBLE), 2) AS service_level_pct,
    round(CAST(sum(wait_seconds) AS DOUBLE) / NULLIF(CAST(sum(answered) AS DOUBLE), 0), 1) AS avg_wait_s,
    round(CAST(sum(handle_seconds) AS DOUBLE) / NULLIF(CAST(sum(handled) AS DOUBLE), 0), 1) AS avg_handle_s,
    round(100 * CAST(sum(resolved) AS DOUBLE) / NULLIF(CAST(sum(answered) AS DOUBLE), 0), 2) AS fcr_pct,
    round(CAST(sum(satisfaction_points) AS DOUBLE) / NULLIF(CAST(sum(rated) AS DOUBLE), 0), 2) AS satisfaction,
    round(CAST(sum(cost) AS DOUBLE) / CAST(sum(contacts) AS DOUBLE), 2) AS cost_per_contact";

/// What a report is asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rows of the report's lists.
    pub top: usize,
    /// The day receivables and exposure are taken at (default: the latest invoice date).
    pub date: Option<chrono::NaiveDate>,
    /// Credit utilisation (%) from which an account is on the alert list.
    pub threshold_pct: f64,
    /// The credit report's order check: would a new order of this customer and amount pass?
    pub check: Option<(String, f64)>,
}

impl Default for Options {
    fn default() -> Self {
        Self { top: 20, date: None, threshold_pct: 90.0, check: None }
    }
}

/// Invoices open at `{date}`: amount minus payments made up to that day, if anything is left.
const OPEN_INVOICES: &str = "paid AS (
    SELECT invoice_id, sum(amount) AS paid FROM fact_payment WHERE payment_date <= {date} GROUP BY invoice_id
  ), open_invoices AS (
    SELECT i.invoice_id, i.customer_id, i.due_date, i.amount - coalesce(p.paid, 0) AS open_amount,
           {date} - i.due_date AS days_overdue
    FROM fact_invoice i LEFT JOIN paid p ON p.invoice_id = i.invoice_id
    WHERE i.invoice_date <= {date} AND i.amount - coalesce(p.paid, 0) > 0
  )";

/// Per customer: invoiced in the 90 days ending on `{date}` (the denominator of DSO).
const INVOICED_90D: &str = "invoiced_90d AS (
    SELECT customer_id, sum(amount) AS invoiced FROM fact_invoice
    WHERE invoice_date > {date} - INTERVAL '90 days' AND invoice_date <= {date} GROUP BY customer_id
  )";

/// Per customer at `{date}`: open receivables, and completed orders placed but not invoiced yet.
const EXPOSURE: &str = "receivables AS (
    SELECT customer_id, sum(open_amount) AS receivables FROM open_invoices GROUP BY customer_id
  ), open_orders AS (
    SELECT s.customer_id, s.order_id, min(s.order_date) AS order_date, sum(s.revenue) AS order_value
    FROM fact_sales s LEFT JOIN fact_invoice i ON i.order_id = s.order_id AND i.invoice_date <= {date}
    WHERE s.order_date <= {date} AND i.invoice_id IS NULL
    GROUP BY s.customer_id, s.order_id
  ), exposure AS (
    SELECT c.customer_id, c.name, c.region, c.credit_limit,
           coalesce(r.receivables, 0) AS receivables,
           coalesce((SELECT sum(o.order_value) FROM open_orders o WHERE o.customer_id = c.customer_id), 0) AS open_orders
    FROM dim_customer c LEFT JOIN receivables r ON r.customer_id = c.customer_id
  )";

/// One titled result of a report.
pub struct Section {
    pub title: String,
    pub batches: Vec<RecordBatch>,
    /// Drawn by `--chart` only, not printed (too many rows to read).
    pub chart_only: bool,
}

pub struct Report {
    pub sections: Vec<Section>,
    /// The section `--chart` draws, and its columns to draw (all numeric ones when empty).
    pub chart: Option<(usize, Vec<String>)>,
}

/// Months after the first purchase a cohort report shows as columns.
pub const COHORT_MONTHS: i64 = 12;

/// The executive summary: each metric for the month of `date` and the month before.
async fn exec(ctx: &SessionContext, date: chrono::NaiveDate) -> Result<Report> {
    use chrono::{Datelike, Months};
    use datafusion::arrow::array::{Float64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let first = date.with_day(1).expect("day 1 exists");
    let periods = [first, first - Months::new(1)];
    // Each metric as SQL of one number for the month {month} ending on {month_end}.
    let metrics: [(&str, String); 7] = [
        ("revenue", "SELECT CAST(sum(revenue) AS DOUBLE) FROM fact_sales WHERE to_char(order_date, '%Y-%m') = '{month}'".into()),
        ("margin %", "SELECT 100 * CAST(sum(revenue) - sum(cost) AS DOUBLE) / CAST(sum(revenue) AS DOUBLE) FROM fact_sales WHERE to_char(order_date, '%Y-%m') = '{month}'".into()),
        ("orders", "SELECT CAST(count(DISTINCT order_id) AS DOUBLE) FROM fact_sales WHERE to_char(order_date, '%Y-%m') = '{month}'".into()),
        ("active customers", "SELECT CAST(count(*) AS DOUBLE) FROM customer_lifecycle WHERE month = '{month}' AND stage IN ('new', 'active', 'reactivated')".into()),
        ("customers lost", "SELECT CAST(count(*) AS DOUBLE) FROM customer_lifecycle WHERE month = '{month}' AND stage = 'lost' AND previous_stage <> 'lost'".into()),
        (
            "DSO (days)",
            format!(
                "WITH {OPEN_INVOICES}, {INVOICED_90D} SELECT CAST((SELECT sum(open_amount) FROM open_invoices) AS DOUBLE) * 90
                 / CAST(sum(invoiced) AS DOUBLE) FROM invoiced_90d"
            ),
        ),
        ("service level %", "SELECT 100 * CAST(sum(answered_in_time) AS DOUBLE) / CAST(sum(contacts) AS DOUBLE) FROM service_level WHERE month = '{month}'".into()),
    ];
    let mut names: Vec<&str> = metrics.iter().map(|(m, _)| *m).collect();
    let mut values = vec![[None::<f64>; 2]; metrics.len()];
    let mut lifetime_value = [None::<f64>; 2];
    for (p, start) in periods.iter().enumerate() {
        let end = (*start + Months::new(1)).pred_opt().expect("a day before");
        for (i, (_, sql)) in metrics.iter().enumerate() {
            let sql = sql.replace("{month}", &start.format("%Y-%m").to_string()).replace("{date}", &format!("DATE '{end}'"));
            let batches = ctx.sql(&sql).await?.collect().await?;
            values[i][p] = batches.first().and_then(|b| {
                let c = b.column(0).as_any().downcast_ref::<Float64Array>()?;
                (b.num_rows() > 0 && c.is_valid(0)).then(|| c.value(0))
            });
        }
        lifetime_value[p] = lifetime_value_at(ctx, end).await?;
    }
    names.push("lifetime value");
    values.push(lifetime_value);
    let round = |v: f64| (v * 100.0).round() / 100.0;
    let mark = |now: Option<f64>, before: Option<f64>| match (now, before) {
        (Some(a), Some(b)) if a > b => "▲",
        (Some(a), Some(b)) if a < b => "▼",
        (Some(_), Some(_)) => "=",
        _ => "",
    };
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new("metric", DataType::Utf8, false),
        Field::new(first.format("%Y-%m").to_string(), DataType::Float64, true),
        Field::new(periods[1].format("%Y-%m").to_string(), DataType::Float64, true),
        Field::new("change", DataType::Float64, true),
        Field::new("change_pct", DataType::Float64, true),
        Field::new("trend", DataType::Utf8, false),
    ]));
    let now: Vec<Option<f64>> = values.iter().map(|v| v[0].map(round)).collect();
    let before: Vec<Option<f64>> = values.iter().map(|v| v[1].map(round)).collect();
    let change: Vec<Option<f64>> = now.iter().zip(&before).map(|(a, b)| Some(round((*a)? - (*b)?))).collect();
    let pct: Vec<Option<f64>> =
        values.iter().map(|v| match (v[0], v[1]) { (Some(a), Some(b)) if b != 0.0 => Some((1000.0 * (a - b) / b.abs()).round() / 10.0), _ => None }).collect();
    let marks: Vec<&str> = values.iter().map(|v| mark(v[0], v[1])).collect();
    let batch = RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(StringArray::from(names)),
            std::sync::Arc::new(Float64Array::from(now)),
            std::sync::Arc::new(Float64Array::from(before)),
            std::sync::Arc::new(Float64Array::from(change)),
            std::sync::Arc::new(Float64Array::from(pct)),
            std::sync::Arc::new(StringArray::from(marks)),
        ],
    )?;
    Ok(Report {
        sections: vec![Section {
            title: format!("Executive summary: {} against {} (definitions in README)", first.format("%Y-%m"), periods[1].format("%Y-%m")),
            batches: vec![batch],
            chart_only: false,
        }],
        chart: None,
    })
}

/// Predicted lifetime value of every customer who had bought by `end` (or by the last order
/// date, if earlier): the snapshot's fitted models (`clv_model`, with its time unit, horizon and
/// discount) applied to each customer's purchases up to that day. At the last order date it is
/// the sum of `customer_clv.clv`; a month earlier, the same models scoring the customers as they
/// were then. None when the load fitted no model.
pub async fn lifetime_value_at(ctx: &SessionContext, end: chrono::NaiveDate) -> Result<Option<f64>> {
    use crate::analytics::clv::{self, BgNbd, GammaGamma, Settings, TimeUnit};
    let model = ctx
        .sql("SELECT r, alpha, a, b, p, q, v, CAST(horizon_months AS DOUBLE), monthly_discount, time_unit FROM clv_model")
        .await?
        .collect()
        .await?;
    let Some(row) = model.iter().find(|b| b.num_rows() > 0) else { return Ok(None) };
    let number = |i: usize| -> Result<f64> {
        let c = datafusion::arrow::compute::cast(row.column(i), &datafusion::arrow::datatypes::DataType::Float64)?;
        Ok(c.as_any().downcast_ref::<datafusion::arrow::array::Float64Array>().map(|a| a.value(0)).unwrap_or(f64::NAN))
    };
    // The unit as the load wrote it, read back with the settings' own names.
    let unit = datafusion::arrow::util::display::array_value_to_string(row.column(9), 0)?;
    let time_unit: TimeUnit = serde_json::from_value(serde_json::Value::String(unit.clone()))
        .map_err(|_| crate::error::Error::Internal(format!("clv_model has an unknown time unit '{unit}'")))?;
    let bg = BgNbd { r: number(0)?, alpha: number(1)?, a: number(2)?, b: number(3)?, log_likelihood: f64::NAN };
    let gg = GammaGamma { p: number(4)?, q: number(5)?, v: number(6)?, log_likelihood: f64::NAN };
    let last = latest_date(ctx, "SELECT max(order_date) FROM fact_sales", "orders").await?;
    let settings = Settings { time_unit, horizon_months: number(7)? as u32, monthly_discount: number(8)?, observation_end: Some(end.min(last)) };
    let (_, customers) = crate::etl::models::summary(ctx, &settings).await?;
    Ok(Some(clv::predict(&bg, &gg, &customers, &settings).iter().map(|p| p.clv).sum()))
}

/// The date `sql` answers (one date, e.g. the latest invoice date): the day a report defaults to.
async fn latest_date(ctx: &SessionContext, sql: &str, what: &str) -> Result<chrono::NaiveDate> {
    let batches = ctx.sql(&format!("SELECT CAST(({sql}) AS VARCHAR)")).await?.collect().await?;
    let text = batches
        .first()
        .filter(|b| b.num_rows() > 0 && b.column(0).is_valid(0))
        .map(|b| datafusion::arrow::util::display::array_value_to_string(b.column(0), 0))
        .transpose()?;
    match text {
        Some(t) => t.parse().map_err(|_| crate::error::Error::Internal(format!("'{t}' is not a date"))),
        None => Err(QueryError::new(format!("there are no {what} yet")).with_hint(Some("pass --date YYYY-MM-DD".into())).into()),
    }
}

/// Runs report `name`.
pub async fn run(ctx: &SessionContext, name: &str, options: &Options) -> Result<Report> {
    let top = options.top;
    let date = match options.date {
        Some(d) => d,
        None if matches!(name, "aging" | "credit") => latest_date(ctx, "SELECT max(invoice_date) FROM fact_invoice", "invoices").await?,
        None if matches!(name, "lifecycle" | "exec") => latest_date(ctx, "SELECT max(order_date) FROM fact_sales", "orders").await?,
        None if name == "service" => latest_date(ctx, "SELECT max(month_first) FROM service_level", "service contacts").await?,
        None => chrono::NaiveDate::MIN,
    };
    // A date is formatted by chrono, never pasted from user text.
    let with_date = |sql: &str| sql.replace("{date}", &format!("DATE '{date}'"));
    let queries: Vec<(String, String)> = match name {
        "rfm" => vec![(
            "RFM segments (scores are quintiles 1–5; rules in README, Customer value)".into(),
            "SELECT segment, count(*) AS customers,
                    round(100 * CAST(count(*) AS DOUBLE) / CAST(sum(count(*)) OVER () AS DOUBLE), 1) AS customers_pct,
                    round(avg(CAST(recency_days AS DOUBLE)), 1) AS avg_recency_days,
                    round(avg(CAST(orders AS DOUBLE)), 2) AS avg_orders,
                    sum(monetary) AS revenue,
                    round(100 * CAST(sum(monetary) AS DOUBLE) / CAST(sum(sum(monetary)) OVER () AS DOUBLE), 1) AS revenue_pct
             FROM customer_value GROUP BY segment ORDER BY revenue DESC"
                .into(),
        )],
        "key-accounts" => {
            let mut q = vec![(
                format!("Top {top} customers by revenue"),
                format!(
                    "SELECT v.revenue_rank AS rank, v.customer_id, c.name, c.region, v.monetary AS revenue,
                            v.revenue_share_pct AS share_pct, v.cumulative_share_pct AS cumulative_pct, v.abc_class AS class
                     FROM customer_value v LEFT JOIN dim_customer c ON v.customer_id = c.customer_id
                     WHERE v.revenue_rank <= {top} ORDER BY v.revenue_rank"
                ),
            )];
            q.push((
                "Concentration: share of revenue from the top customers".into(),
                "WITH n AS (SELECT count(*) AS customers, sum(monetary) AS revenue FROM customer_value)
                 SELECT concat('top ', CAST(p.pct AS VARCHAR), ' %') AS customers_ranked,
                        CAST(ceil(n.customers * p.pct / 100.0) AS BIGINT) AS customers,
                        round(100 * CAST(sum(v.monetary) AS DOUBLE) / CAST(n.revenue AS DOUBLE), 1) AS revenue_pct
                 FROM (VALUES (1), (10), (20)) AS p(pct) CROSS JOIN n
                 JOIN customer_value v ON v.revenue_rank <= ceil(n.customers * p.pct / 100.0)
                 GROUP BY p.pct, n.customers, n.revenue ORDER BY p.pct"
                    .into(),
            ));
            q.push((
                "ABC classes (A: the customers bringing the first 80 % of revenue, B: the next 15 %, C: the rest)".into(),
                "SELECT abc_class AS class, count(*) AS customers, sum(monetary) AS revenue,
                        round(100 * CAST(sum(monetary) AS DOUBLE) / CAST(sum(sum(monetary)) OVER () AS DOUBLE), 1) AS revenue_pct
                 FROM customer_value GROUP BY abc_class ORDER BY abc_class"
                    .into(),
            ));
            q.push((
                "Pareto curve: cumulative revenue % by customers ranked, %".into(),
                // One point per percent of customers, counted as the concentration rows are.
                "WITH n AS (SELECT count(*) AS customers FROM customer_value)
                 SELECT p.value AS customers_pct, v.cumulative_share_pct AS cumulative_revenue_pct
                 FROM generate_series(1, 100) p CROSS JOIN n
                 JOIN customer_value v ON v.revenue_rank = CAST(ceil(n.customers * p.value / 100.0) AS BIGINT)
                 ORDER BY 1"
                    .into(),
            ));
            q
        }
        "cohorts" => {
            let columns: Vec<String> =
                (0..COHORT_MONTHS).map(|k| format!("max(CASE WHEN months_since = {k} THEN retention_pct END) AS m{k}")).collect();
            vec![(
                format!("Retention % by first-purchase month (m0 = the first month, m1 one month later, …; last {top} cohorts)"),
                format!(
                    "SELECT * FROM (SELECT cohort, max(cohort_customers) AS customers, {} FROM customer_cohort GROUP BY cohort ORDER BY cohort DESC LIMIT {top}) ORDER BY cohort",
                    columns.join(", ")
                ),
            )]
        }
        "aging" => {
            let bucket = |cond: &str| format!("sum(CASE WHEN {cond} THEN open_amount ELSE 0 END)");
            vec![
                (
                    format!("Open receivables on {date} by days overdue (due date to {date})"),
                    with_date(&format!(
                        "WITH {OPEN_INVOICES}, by_region AS (
                           SELECT c.region, {} AS current, {} AS d1_30, {} AS d31_60, {} AS d61_90, {} AS over_90,
                                  sum(open_amount) AS open_total
                           FROM open_invoices o JOIN dim_customer c ON c.customer_id = o.customer_id GROUP BY c.region)
                         SELECT region, current, d1_30, d31_60, d61_90, over_90, open_total FROM (
                           SELECT *, 0 AS total_row FROM by_region
                           UNION ALL
                           SELECT '(total)', sum(current), sum(d1_30), sum(d31_60), sum(d61_90), sum(over_90), sum(open_total), 1 FROM by_region)
                         ORDER BY total_row, region",
                        bucket("days_overdue <= 0"),
                        bucket("days_overdue BETWEEN 1 AND 30"),
                        bucket("days_overdue BETWEEN 31 AND 60"),
                        bucket("days_overdue BETWEEN 61 AND 90"),
                        bucket("days_overdue > 90"),
                    )),
                ),
                (
                    "Days sales outstanding by region: open receivables / invoiced in the 90 days to the date × 90".into(),
                    with_date(&format!(
                        "WITH {OPEN_INVOICES}, {INVOICED_90D}, by_region AS (
                           SELECT c.region, sum(o.open_amount) AS open_receivables, max(v.invoiced) AS invoiced_90d
                           FROM open_invoices o JOIN dim_customer c ON c.customer_id = o.customer_id
                           LEFT JOIN (SELECT c.region, sum(i.invoiced) AS invoiced FROM invoiced_90d i JOIN dim_customer c ON c.customer_id = i.customer_id GROUP BY 1) v
                             ON v.region = c.region
                           GROUP BY c.region)
                         SELECT region, open_receivables, invoiced_90d,
                                round(CAST(open_receivables AS DOUBLE) * 90 / CAST(invoiced_90d AS DOUBLE), 1) AS dso_days
                         FROM (SELECT *, 0 AS total_row FROM by_region
                               UNION ALL
                               SELECT '(total)', (SELECT sum(open_amount) FROM open_invoices), (SELECT sum(invoiced) FROM invoiced_90d), 1)
                         ORDER BY total_row, region"
                    )),
                ),
                (
                    format!("Overdue accounts to chase (largest overdue amount first, top {top})"),
                    with_date(&format!(
                        "WITH {OPEN_INVOICES}
                         , {INVOICED_90D}
                         SELECT o.customer_id, c.name, c.region,
                                sum(CASE WHEN days_overdue > 0 THEN open_amount ELSE 0 END) AS overdue,
                                count(CASE WHEN days_overdue > 0 THEN 1 END) AS overdue_invoices,
                                max(days_overdue) AS most_days_overdue,
                                sum(open_amount) AS open_total,
                                round(CAST(sum(open_amount) AS DOUBLE) * 90 / CAST(max(v.invoiced) AS DOUBLE), 1) AS dso_days
                         FROM open_invoices o JOIN dim_customer c ON c.customer_id = o.customer_id
                         LEFT JOIN invoiced_90d v ON v.customer_id = o.customer_id
                         GROUP BY o.customer_id, c.name, c.region
                         HAVING max(days_overdue) > 0
                         ORDER BY overdue DESC, o.customer_id LIMIT {top}"
                    )),
                ),
            ]
        }
        "credit" if options.check.is_some() => {
            let (customer, amount) = options.check.as_ref().expect("matched");
            if !amount.is_finite() || *amount < 0.0 {
                return Err(QueryError::new(format!("an order amount must be a positive number, not {amount}")).into());
            }
            // The customer id becomes a quoted literal; the amount a number printed by Rust.
            let id = format!("'{}'", customer.replace('\'', "''"));
            let known = ctx.sql(&format!("SELECT customer_id FROM dim_customer WHERE customer_id = {id}")).await?.count().await?;
            if known == 0 {
                return Err(QueryError::new(format!("no customer '{customer}' in dim_customer"))
                    .with_hint(Some("give a customer_id, e.g. crmcube sql \"SELECT customer_id, name FROM dim_customer LIMIT 5\"".into()))
                    .into());
            }
            vec![(
                format!("Order check on {date}: a new order of {amount:.2} by {customer} against the credit limit"),
                with_date(&format!(
                    "WITH {OPEN_INVOICES}, {EXPOSURE}, checked AS (
                       SELECT customer_id, name, credit_limit, receivables + open_orders AS exposure,
                              CAST({amount:.2} AS DECIMAL(18, 2)) AS new_order
                       FROM exposure WHERE customer_id = {id})
                     SELECT customer_id, name, credit_limit, exposure, new_order, exposure + new_order AS exposure_after,
                            CASE WHEN credit_limit > 0 THEN round(100 * CAST(exposure + new_order AS DOUBLE) / CAST(credit_limit AS DOUBLE), 1) END AS utilisation_after_pct,
                            CASE WHEN credit_limit IS NULL OR credit_limit = 0 THEN 'no limit: refer to credit control'
                                 WHEN exposure + new_order > credit_limit THEN concat('REFUSE: ', CAST(exposure + new_order - credit_limit AS VARCHAR), ' over the limit')
                                 ELSE concat('accept: ', CAST(credit_limit - exposure - new_order AS VARCHAR), ' left') END AS verdict
                     FROM checked"
                )),
            )]
        }
        "credit" => {
            let t = options.threshold_pct;
            vec![
                (
                    format!("Credit exposure on {date}: accounts using ≥ {t} % of their limit (exposure = open receivables + uninvoiced orders)"),
                    with_date(&format!(
                        "WITH {OPEN_INVOICES}, {EXPOSURE}
                         SELECT customer_id, name, region, credit_limit, receivables, open_orders,
                                receivables + open_orders AS exposure,
                                round(100 * CAST(receivables + open_orders AS DOUBLE) / CAST(credit_limit AS DOUBLE), 1) AS utilisation_pct
                         FROM exposure
                         WHERE credit_limit > 0 AND 100 * (receivables + open_orders) >= {t} * credit_limit
                         ORDER BY utilisation_pct DESC, customer_id LIMIT {top}"
                    )),
                ),
                (
                    "Accounts by credit utilisation".into(),
                    with_date(&format!(
                        "WITH {OPEN_INVOICES}, {EXPOSURE}
                         SELECT count(*) AS customers,
                                count(CASE WHEN credit_limit IS NULL OR credit_limit = 0 THEN 1 END) AS no_limit,
                                count(CASE WHEN credit_limit > 0 AND 100 * (receivables + open_orders) >= {t} * credit_limit THEN 1 END) AS at_threshold,
                                count(CASE WHEN credit_limit > 0 AND receivables + open_orders > credit_limit THEN 1 END) AS over_limit,
                                sum(receivables + open_orders) AS exposure
                         FROM exposure"
                    )),
                ),
                (
                    format!("Open orders past the credit limit (exposure after each order, in order date order; top {top})"),
                    with_date(&format!(
                        "WITH {OPEN_INVOICES}, {EXPOSURE}, running AS (
                           SELECT o.order_id, o.customer_id, o.order_date, o.order_value, e.credit_limit,
                                  e.receivables + sum(o.order_value) OVER (PARTITION BY o.customer_id ORDER BY o.order_date, o.order_id
                                                                           ROWS UNBOUNDED PRECEDING) AS exposure_after
                           FROM open_orders o JOIN exposure e ON e.customer_id = o.customer_id)
                         SELECT order_id, customer_id, order_date, order_value, credit_limit, exposure_after
                         FROM running WHERE credit_limit > 0 AND exposure_after > credit_limit
                         ORDER BY order_date DESC, order_id LIMIT {top}"
                    )),
                ),
            ]
        }
        "exec" => return exec(ctx, date).await,
        "clv" => vec![
            (
                "Lifetime value models fitted by the load of this snapshot (α and times in the time unit)".into(),
                "SELECT customers, repeat_customers, round(r, 4) AS r, round(alpha, 4) AS alpha, round(a, 4) AS a, round(b, 4) AS b,
                        round(bgnbd_log_likelihood, 2) AS bgnbd_ll, round(p, 4) AS p, round(q, 4) AS q, round(v, 2) AS v,
                        round(gamma_gamma_log_likelihood, 2) AS gamma_gamma_ll, time_unit, horizon_months, monthly_discount, observation_end
                 FROM clv_model"
                    .into(),
            ),
            (
                format!("Top {top} customers by predicted lifetime value (over the model's horizon, discounted monthly)"),
                format!(
                    "SELECT v.customer_id, c.name, c.region, CAST(v.repeat_purchases AS BIGINT) AS repeat_purchases,
                            round(v.p_alive, 3) AS p_alive, round(v.expected_purchases, 2) AS expected_purchases,
                            round(v.expected_average_value, 2) AS expected_value, round(v.clv, 2) AS lifetime_value
                     FROM customer_clv v LEFT JOIN dim_customer c ON c.customer_id = v.customer_id
                     ORDER BY lifetime_value DESC, v.customer_id LIMIT {top}"
                ),
            ),
            (
                "Predicted value by RFM segment".into(),
                "SELECT s.segment, count(*) AS customers, round(avg(v.p_alive), 3) AS avg_p_alive,
                        round(sum(v.expected_purchases), 1) AS expected_purchases, round(sum(v.clv), 2) AS lifetime_value,
                        round(100 * sum(v.clv) / sum(sum(v.clv)) OVER (), 1) AS lifetime_value_pct
                 FROM customer_clv v JOIN customer_value s ON s.customer_id = v.customer_id
                 GROUP BY s.segment ORDER BY lifetime_value DESC"
                    .into(),
            ),
        ],
        "lifecycle" => {
            let month = date.format("%Y-%m").to_string();
            let stage = |s: &str| format!("count(CASE WHEN stage = '{s}' THEN 1 END) AS {s}");
            let stages: Vec<String> = ["new", "active", "at_risk", "lost", "reactivated"].iter().map(|s| stage(s)).collect();
            vec![
                (
                    format!("Customers by lifecycle stage (last {top} months to {month}; thresholds in README, Customer lifecycle)"),
                    format!(
                        "SELECT * FROM (SELECT month AS time_month, {} FROM customer_lifecycle WHERE month <= '{month}'
                         GROUP BY month ORDER BY month DESC LIMIT {top}) ORDER BY time_month",
                        stages.join(", ")
                    ),
                ),
                (
                    format!("Flows into {month}: stage the month before → stage in {month}"),
                    format!(
                        "SELECT coalesce(previous_stage, '(first purchase)') AS from_stage, stage AS to_stage, count(*) AS customers
                         FROM customer_lifecycle WHERE month = '{month}' GROUP BY 1, 2 ORDER BY customers DESC, 1, 2"
                    ),
                ),
            ]
        }
        "service" => {
            let month = date.format("%Y-%m").to_string();
            vec![
                (
                    format!("Service levels per channel, {month} (thresholds and costs: transforms/service_level.yaml)"),
                    format!("SELECT channel, {SERVICE_RATES} FROM service_level WHERE month = '{month}' GROUP BY channel ORDER BY contacts DESC, channel"),
                ),
                (
                    format!("All channels by month (last {top} months)"),
                    format!(
                        "SELECT * FROM (SELECT month AS time_month, {SERVICE_RATES} FROM service_level WHERE month <= '{month}'
                         GROUP BY month ORDER BY month DESC LIMIT {top}) ORDER BY time_month"
                    ),
                ),
            ]
        }
        other => {
            return Err(QueryError::new(format!("no report named '{other}'"))
                .with_hint(Some(format!(
                    "{}; `crmcube report` lists what each answers",
                    crate::error::valid_names_hint("reports", other, REPORTS.iter().map(|(n, _)| *n))
                )))
                .into());
        }
    };
    let mut sections = Vec::new();
    for (title, sql) in queries {
        let batches = ctx.sql(&sql).await?.collect().await?;
        let chart_only = title.starts_with("Pareto");
        sections.push(Section { title, batches, chart_only });
    }
    let chart = match name {
        "rfm" => Some((0, vec!["customers_pct".to_string(), "revenue_pct".to_string()])),
        "key-accounts" => Some((3, Vec::new())),
        "lifecycle" => Some((0, vec!["active".to_string(), "at_risk".to_string(), "lost".to_string(), "reactivated".to_string()])),
        "service" => Some((1, vec!["service_level_pct".to_string(), "abandonment_pct".to_string(), "fcr_pct".to_string()])),
        _ => None,
    };
    Ok(Report { sections, chart })
}
