//! `crmcube report NAME`: the customer-value questions, answered from the derived tables every
//! load rebuilds (`customer_value`, `customer_cohort`; see transforms/ and README "Customer
//! value" for what each column counts).
//!
//! A report is a few titled sections, each one SQL query over those tables in the session it
//! is given — so `--as USER` access rules and `--as-of` snapshots apply as to any query — and
//! optionally one section to draw as a chart.

use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;

use crate::error::{QueryError, Result};

/// The reports there are, with what each answers.
pub const REPORTS: [(&str, &str); 3] = [
    ("rfm", "customers by RFM segment: how many, how recent, how frequent, what they are worth"),
    ("key-accounts", "top customers, revenue concentration (top 1 %, 10 %, 20 %), ABC classes, Pareto curve"),
    ("cohorts", "retention % of each first-purchase month's customers over the following months"),
];

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

/// Runs report `name`; `top` bounds its lists.
pub async fn run(ctx: &SessionContext, name: &str, top: usize) -> Result<Report> {
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
        _ => None,
    };
    Ok(Report { sections, chart })
}
