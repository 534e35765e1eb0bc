//! Model tables a load fits after the derived tables: the customer lifetime value models
//! ([`crate::analytics::clv`]) over `fact_sales`.
//!
//! `clv_model` holds one row per snapshot — the fitted BG/NBD and Gamma-Gamma parameters, their
//! log-likelihoods, the customers fitted and the settings — so every snapshot keeps the model its
//! predictions came from; `customer_clv` holds each buying customer's inputs and predictions.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef};
use datafusion::prelude::SessionContext;

use crate::analytics::clv::{self, Customer};
use crate::error::{Error, Result};

/// Per customer, in the settings' time unit: repeat purchase days (x), first → last purchase
/// (t_x), first purchase → the observation end (t; the last order date unless the settings name
/// one, and later purchases are ignored), mean value of the repeat purchase days (m: the days'
/// total less the first day's, over x). The total is summed in decimal and only then made a float
/// and divided (a float sum depends on the order rows arrive in, and two loads of the same exports
/// must give the same tables; a decimal division would cut the mean to six places). The purchase
/// days are read once (DataFusion plans each mention of a CTE as a scan of its own; a join back
/// to the first day cost a second and third pass over fact_sales).
pub fn summary_sql(settings: &clv::Settings) -> String {
    let (cut, end) = match settings.observation_end {
        Some(d) => (format!("WHERE order_date <= DATE '{d}'"), format!("SELECT DATE '{d}' AS end_day")),
        None => (String::new(), "SELECT max(order_date) AS end_day FROM fact_sales".to_string()),
    };
    let days = settings.time_unit.days();
    format!(
        "WITH days AS (
    SELECT customer_id, order_date, sum(revenue) AS value FROM fact_sales {cut} GROUP BY 1, 2
  ), firsts AS (
    SELECT customer_id, min(order_date) AS first_day, max(order_date) AS last_day, count(*) - 1 AS x,
           sum(value) - first_value(value ORDER BY order_date) AS repeat_value
    FROM days GROUP BY 1
  ), obs AS ({end})
  SELECT f.customer_id, CAST(f.x AS DOUBLE) AS x, CAST(f.last_day - f.first_day AS DOUBLE) / {days:?} AS t_x,
         CAST(o.end_day - f.first_day AS DOUBLE) / {days:?} AS t,
         CASE WHEN f.x > 0 THEN CAST(f.repeat_value AS DOUBLE) / CAST(f.x AS DOUBLE) ELSE 0 END AS m
  FROM firsts f CROSS JOIN obs o ORDER BY 1"
    )
}

/// Where [`summary_from_value_sql`] reads each customer's first purchase day's revenue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstDays {
    /// `customer_totals`' first_day_revenue: a row a customer.
    Totals,
    /// `customer_monthly`'s first_day_revenue, of the customer's first month's row (3 M rows at
    /// 10 M order lines: 0.1 s).
    Monthly,
    /// fact_sales, by a join on the customer's first day (0.3 s; grouping every row by day took
    /// 2.3–2.6 s).
    Sales,
}

/// The same summary from `customer_value`, which the load derives from the same purchase days
/// just before: x = repeat purchase days, t_x = last − first purchase, t = observation end − first
/// purchase, m = (monetary − the first day's revenue) / x, the total in decimal as above. Only
/// the first days' revenue is read elsewhere (`firsts`); the same numbers from each. Only with
/// the default observation end (the last order date, customer_value's).
pub fn summary_from_value_sql(settings: &clv::Settings, firsts: FirstDays) -> String {
    let days = settings.time_unit.days();
    let firsts = match firsts {
        FirstDays::Totals => "SELECT customer_id, first_day_revenue AS revenue FROM customer_totals",
        FirstDays::Monthly => {
            "SELECT m.customer_id, m.first_day_revenue AS revenue
    FROM customer_monthly m JOIN customer_value v ON m.customer_id = v.customer_id AND m.first_day = v.first_purchase"
        }
        FirstDays::Sales => {
        "SELECT s.customer_id, sum(s.revenue) AS revenue
    FROM fact_sales s JOIN customer_value v ON s.customer_id = v.customer_id AND s.order_date = v.first_purchase
    GROUP BY 1"
        }
    };
    format!(
        "WITH firsts AS (
    {firsts}
  )
  SELECT v.customer_id, CAST(v.purchase_days - 1 AS DOUBLE) AS x,
         CAST(v.last_purchase - v.first_purchase AS DOUBLE) / {days:?} AS t_x,
         CAST(v.observation_end - v.first_purchase AS DOUBLE) / {days:?} AS t,
         CASE WHEN v.purchase_days > 1 THEN CAST(v.monetary - f.revenue AS DOUBLE) / CAST(v.purchase_days - 1 AS DOUBLE) ELSE 0 END AS m
  FROM customer_value v JOIN firsts f ON f.customer_id = v.customer_id ORDER BY 1"
    )
}

/// The columns of `customer_value` [`summary_from_value_sql`] reads; without one of them (a
/// project's own customer_value) the summary is read from fact_sales alone.
pub const VALUE_COLUMNS: [&str; 6] = ["customer_id", "purchase_days", "first_purchase", "last_purchase", "observation_end", "monetary"];

/// The columns of `customer_monthly` it reads the first days' revenue from, when it has them.
pub const MONTHLY_COLUMNS: [&str; 3] = ["customer_id", "first_day", "first_day_revenue"];

/// The columns of `customer_totals` it reads them from first.
pub const TOTALS_COLUMNS: [&str; 2] = ["customer_id", "first_day_revenue"];

/// The SQL of the models' summary in `ctx`: from customer_value when it has [`VALUE_COLUMNS`]
/// and the settings keep the default observation end, else [`summary_sql`].
async fn summary_source(ctx: &SessionContext, settings: &clv::Settings) -> String {
    let has = |df: &datafusion::dataframe::DataFrame, columns: &[&str]| columns.iter().all(|c| df.schema().has_column_with_unqualified_name(c));
    if settings.observation_end.is_none()
        && let Ok(value) = ctx.table("customer_value").await
        && has(&value, &VALUE_COLUMNS)
    {
        let firsts = if ctx.table("customer_totals").await.is_ok_and(|m| has(&m, &TOTALS_COLUMNS)) {
            FirstDays::Totals
        } else if ctx.table("customer_monthly").await.is_ok_and(|m| has(&m, &MONTHLY_COLUMNS)) {
            FirstDays::Monthly
        } else {
            FirstDays::Sales
        };
        return summary_from_value_sql(settings, firsts);
    }
    summary_sql(settings)
}

/// The tables [`clv_tables`] returns.
pub const TABLES: [&str; 2] = ["clv_model", "customer_clv"];

/// The customers of [`summary_sql`], with their ids.
pub async fn summary(ctx: &SessionContext, settings: &clv::Settings) -> Result<(Vec<String>, Vec<Customer>)> {
    let mut ids = Vec::new();
    let mut customers = Vec::new();
    for b in ctx.sql(&summary_source(ctx, settings).await).await?.collect().await? {
        let id = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let id = id.as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::Internal("customer ids are not text".into()))?;
        let f = |i: usize| -> Result<Float64Array> {
            let c = datafusion::arrow::compute::cast(b.column(i), &DataType::Float64)?;
            Ok(c.as_any().downcast_ref::<Float64Array>().cloned().ok_or_else(|| Error::Internal("not a number".into()))?)
        };
        let (x, t_x, t, m) = (f(1)?, f(2)?, f(3)?, f(4)?);
        for i in 0..b.num_rows() {
            ids.push(id.value(i).to_string());
            customers.push(Customer { x: x.value(i), t_x: t_x.value(i), t: t.value(i), m: m.value(i) });
        }
    }
    Ok((ids, customers))
}

/// Fits the models over the customers of `ctx` and returns the `clv_model` and `customer_clv`
/// tables. A fit that fails (too few customers, no repeat buyers) leaves both tables empty and
/// says why in the log: the rest of the load does not depend on it.
pub async fn clv_tables(ctx: &SessionContext, settings: &clv::Settings) -> Result<Vec<(String, SchemaRef, Vec<RecordBatch>)>> {
    let model_schema = Arc::new(Schema::new(
        ["r", "alpha", "a", "b", "bgnbd_log_likelihood", "p", "q", "v", "gamma_gamma_log_likelihood"]
            .iter()
            .map(|n| Field::new(*n, DataType::Float64, false))
            .chain([
                Field::new("customers", DataType::Int64, false),
                Field::new("repeat_customers", DataType::Int64, false),
                Field::new("time_unit", DataType::Utf8, false),
                Field::new("horizon_months", DataType::Int64, false),
                Field::new("horizon", DataType::Float64, false),
                Field::new("monthly_discount", DataType::Float64, false),
                Field::new("observation_end", DataType::Date32, true),
            ])
            .collect::<Vec<_>>(),
    ));
    let customer_schema = Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Utf8, false),
        Field::new("repeat_purchases", DataType::Float64, false),
        Field::new("recency", DataType::Float64, false),
        Field::new("age", DataType::Float64, false),
        Field::new("mean_repeat_value", DataType::Float64, false),
        Field::new("p_alive", DataType::Float64, false),
        Field::new("expected_purchases", DataType::Float64, false),
        Field::new("expected_average_value", DataType::Float64, false),
        Field::new("clv", DataType::Float64, false),
    ]));
    let started = std::time::Instant::now();
    let (ids, customers) = summary(ctx, settings).await?;
    let summarised = started.elapsed().as_millis() as u64;
    let fitted = clv::fit_bgnbd(&customers).and_then(|bg| {
        let bg_ms = started.elapsed().as_millis() as u64 - summarised;
        let gg = clv::fit_gamma_gamma(&customers)?;
        tracing::debug!(customers = customers.len(), summary_ms = summarised, bgnbd_ms = bg_ms, gamma_gamma_ms = started.elapsed().as_millis() as u64 - summarised - bg_ms, "lifetime value: summarised and fitted");
        Ok((bg, gg))
    });
    let (bg, gg) = match fitted {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(customers = customers.len(), "the lifetime value models did not fit: {e}; clv_model and customer_clv are empty");
            return Ok(vec![
                ("clv_model".into(), model_schema, Vec::new()),
                ("customer_clv".into(), customer_schema, Vec::new()),
            ]);
        }
    };
    tracing::info!(r = bg.r, alpha = bg.alpha, a = bg.a, b = bg.b, ll = bg.log_likelihood, p = gg.p, q = gg.q, v = gg.v, "lifetime value models fitted");
    let repeat = customers.iter().filter(|c| c.x > 0.0 && c.m > 0.0).count() as i64;
    let f = |v: f64| -> Arc<dyn Array> { Arc::new(Float64Array::from(vec![v])) };
    let model = RecordBatch::try_new(
        model_schema.clone(),
        vec![
            f(bg.r),
            f(bg.alpha),
            f(bg.a),
            f(bg.b),
            f(bg.log_likelihood),
            f(gg.p),
            f(gg.q),
            f(gg.v),
            f(gg.log_likelihood),
            Arc::new(Int64Array::from(vec![customers.len() as i64])),
            Arc::new(Int64Array::from(vec![repeat])),
            Arc::new(StringArray::from(vec![settings.time_unit.name()])),
            Arc::new(Int64Array::from(vec![settings.horizon_months as i64])),
            f(settings.horizon()),
            f(settings.monthly_discount),
            Arc::new(Date32Array::from(vec![settings.observation_end.map(Date32Type::from_naive_date)])),
        ],
    )?;
    let predictions = clv::predict(&bg, &gg, &customers, settings);
    let col = |g: &dyn Fn(&Customer) -> f64| -> Arc<dyn Array> { Arc::new(Float64Array::from_iter_values(customers.iter().map(g))) };
    let predicted = |g: fn(&clv::Prediction) -> f64| -> Arc<dyn Array> { Arc::new(Float64Array::from_iter_values(predictions.iter().map(g))) };
    let rows = RecordBatch::try_new(
        customer_schema.clone(),
        vec![
            Arc::new(StringArray::from(ids)),
            col(&|c| c.x),
            col(&|c| c.t_x),
            col(&|c| c.t),
            col(&|c| c.m),
            predicted(|p| p.p_alive),
            predicted(|p| p.expected_purchases),
            predicted(|p| p.expected_average_value),
            predicted(|p| p.clv),
        ],
    )?;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "lifetime value: predicted");
    Ok(vec![("clv_model".into(), model_schema, vec![model]), ("customer_clv".into(), customer_schema, vec![rows])])
}
