//! Cube query results against arithmetic over the cleaned base tables, done here in the test:
//! the base tables are read row by row and joined, summed and counted in Rust, never through
//! fact_sales or the cube planner.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crmcube::cube::CubeSet;
use crmcube::etl::TransformSet;
use crmcube::query::{CubeQuery, plan};

use crate::common::{ask, cents, loaded, session, sql};

/// One sales line, joined and computed by hand.
struct Line {
    order_id: String,
    year: String,
    month: String,
    customer: String,
    channel: String,
    region: String,
    province: String,
    revenue: i128,
    cost: i128,
}

/// Rounds a value in 1/100 cent to cents, half away from zero.
fn round_hundredths(v: i128) -> i128 {
    if v >= 0 { (v + 50) / 100 } else { (v - 50) / 100 }
}

async fn base_lines() -> Vec<Line> {
    let ctx = session().await;
    let orders: HashMap<String, Vec<String>> = sql(&ctx, "SELECT order_id, customer_id, channel, CAST(order_date AS VARCHAR), status FROM orders")
        .await
        .into_iter()
        .map(|r| (r[0].clone(), r))
        .collect();
    let customers: HashMap<String, Vec<String>> =
        sql(&ctx, "SELECT customer_id, region, province FROM dim_customer").await.into_iter().map(|r| (r[0].clone(), r)).collect();
    let products: HashMap<String, i128> =
        sql(&ctx, "SELECT product_id, unit_cost FROM dim_product").await.into_iter().map(|r| (r[0].clone(), cents(&r[1]))).collect();
    let mut lines = Vec::new();
    for l in sql(&ctx, "SELECT order_id, product_id, quantity, unit_price, discount_pct FROM order_lines").await {
        let o = &orders[&l[0]];
        if o[4] != "completed" {
            continue;
        }
        let c = &customers[&o[1]];
        let (qty, price, discount): (i128, i128, i128) = (l[2].parse().unwrap(), cents(&l[3]), l[4].parse().unwrap());
        lines.push(Line {
            order_id: l[0].clone(),
            year: o[3][..4].to_string(),
            month: o[3][..7].to_string(),
            customer: o[1].clone(),
            channel: o[2].clone(),
            region: c[1].clone(),
            province: c[2].clone(),
            revenue: round_hundredths(qty * price * (100 - discount)),
            cost: qty * products[&l[1]],
        });
    }
    assert!(lines.len() > 50_000, "the sample has enough completed lines");
    lines
}

fn query(measures: &[&str]) -> CubeQuery {
    CubeQuery { cube: "sales".into(), measures: measures.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn pct(num: i128, den: i128) -> f64 {
    (100.0 * num as f64 / den as f64 * 100.0).round() / 100.0
}

#[tokio::test]
async fn slice_of_one_region_and_year_matches_hand_arithmetic() {
    let lines = base_lines().await;
    let slice: Vec<&Line> = lines.iter().filter(|l| l.region == "East" && l.year == "2025").collect();
    let revenue: i128 = slice.iter().map(|l| l.revenue).sum();
    let cost: i128 = slice.iter().map(|l| l.cost).sum();
    let rows = ask(CubeQuery {
        filters: vec!["customer.region=East".into(), "time.year=2025".into()],
        ..query(&["revenue", "cost", "margin_pct"])
    })
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(cents(&rows[0][0]), revenue);
    assert_eq!(cents(&rows[0][1]), cost);
    assert_eq!(rows[0][2].parse::<f64>().unwrap(), pct(revenue - cost, revenue), "margin % is a ratio of sums");
}

#[tokio::test]
async fn drill_down_into_a_region_lists_its_provinces() {
    let lines = base_lines().await;
    let mut expected: BTreeMap<String, i128> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.region == "East") {
        *expected.entry(l.province.clone()).or_default() += l.revenue;
    }
    let rows = ask(CubeQuery { drill: vec!["customer.region=East".into()], ..query(&["revenue"]) }).await;
    let got: BTreeMap<String, i128> = rows
        .iter()
        .map(|r| {
            assert_eq!(r[0], "East");
            (r[1].clone(), cents(&r[2]))
        })
        .collect();
    assert_eq!(got, expected);
    assert!(expected.len() >= 2);
}

#[tokio::test]
async fn monthly_trend_has_month_over_month_change() {
    let lines = base_lines().await;
    let mut monthly: BTreeMap<String, i128> = BTreeMap::new();
    for l in &lines {
        *monthly.entry(l.month.clone()).or_default() += l.revenue;
    }
    let months: Vec<(&String, &i128)> = monthly.iter().collect();
    let rows = ask(CubeQuery { trend: Some("time.month".into()), last: Some(12), ..query(&["revenue"]) }).await;
    assert_eq!(rows.len(), 12);
    let tail = &months[months.len() - 12..];
    for (i, r) in rows.iter().enumerate() {
        let (month, revenue) = tail[i];
        let prev = *months[months.len() - 13 + i].1;
        assert_eq!(&r[0], month);
        assert_eq!(cents(&r[1]), *revenue);
        assert_eq!(cents(&r[2]), prev, "previous month of {month}");
        let change = ((*revenue - prev) as f64 * 100.0 / prev as f64 * 10.0).round() / 10.0;
        assert!((r[3].parse::<f64>().unwrap() - change).abs() < 1e-9, "{month}: {} vs {change}", r[3]);
    }
}

#[tokio::test]
async fn top_ten_customers_by_revenue() {
    let lines = base_lines().await;
    let mut by_customer: BTreeMap<String, i128> = BTreeMap::new();
    for l in &lines {
        *by_customer.entry(l.customer.clone()).or_default() += l.revenue;
    }
    let mut ranked: Vec<(String, i128)> = by_customer.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let rows = ask(CubeQuery {
        by: vec!["customer.customer".into()],
        order: vec!["revenue:desc".into()],
        limit: Some(10),
        ..query(&["revenue"])
    })
    .await;
    let got: Vec<(String, i128)> = rows.iter().map(|r| (r[0].clone(), cents(&r[2]))).collect();
    assert_eq!(got, ranked[..10].to_vec());
    // The key accounts carry a large share: the skew the sample promises.
    let total: i128 = ranked.iter().map(|r| r.1).sum();
    let top_tenth: i128 = ranked[..ranked.len() / 10].iter().map(|r| r.1).sum();
    assert!(top_tenth * 2 > total, "top 10% of customers carry over half of revenue");
}

#[tokio::test]
async fn distinct_counts_stay_exact_per_channel_and_overall() {
    let lines = base_lines().await;
    let mut orders: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut customers: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for l in &lines {
        orders.entry(l.channel.clone()).or_default().insert(&l.order_id);
        customers.entry(l.channel.clone()).or_default().insert(&l.customer);
    }
    let rows = ask(CubeQuery { by: vec!["channel.channel".into()], ..query(&["orders", "customers"]) }).await;
    assert_eq!(rows.len(), orders.len());
    for r in &rows {
        assert_eq!(r[1].parse::<usize>().unwrap(), orders[&r[0]].len(), "orders of {}", r[0]);
        assert_eq!(r[2].parse::<usize>().unwrap(), customers[&r[0]].len(), "customers of {}", r[0]);
    }
    let all_customers: BTreeSet<&str> = lines.iter().map(|l| l.customer.as_str()).collect();
    let total = ask(query(&["customers", "avg_order_value"])).await;
    assert_eq!(total[0][0].parse::<usize>().unwrap(), all_customers.len());
    let per_channel_sum: usize = customers.values().map(BTreeSet::len).sum();
    assert!(per_channel_sum > all_customers.len(), "distinct customers are not additive across channels");
    let revenue: i128 = lines.iter().map(|l| l.revenue).sum();
    let all_orders: BTreeSet<&str> = lines.iter().map(|l| l.order_id.as_str()).collect();
    let aov = (revenue as f64 / 100.0 / all_orders.len() as f64 * 100.0).round() / 100.0;
    assert!((total[0][1].parse::<f64>().unwrap() - aov).abs() < 1e-9, "average order value = revenue / distinct orders");
}

#[tokio::test]
async fn unknown_names_in_a_query_suggest_the_nearest_valid_one() {
    let project = &loaded().test.project;
    let transforms = TransformSet::load(project).unwrap();
    let cubes = CubeSet::load(project, &transforms).unwrap();
    let ctx = session().await;
    let cube = cubes.get("sales").unwrap();
    let err = plan(&ctx, cube, &query(&["revenu"])).await.unwrap_err().to_string();
    assert!(err.contains("no measure 'revenu'") && err.contains("did you mean 'revenue'?"), "{err}");
    let err = plan(&ctx, cube, &CubeQuery { by: vec!["customer.regoin".into()], ..query(&["revenue"]) }).await.unwrap_err().to_string();
    assert!(err.contains("did you mean 'customer.region'?"), "{err}");
    let err = cubes.get("sale").unwrap_err().to_string();
    assert!(err.contains("did you mean 'sales'?"), "{err}");
    let err = plan(&ctx, cube, &CubeQuery { filters: vec!["time.year=twenty".into()], ..query(&["revenue"]) }).await.unwrap_err().to_string();
    assert!(err.contains("'twenty' is not a valid value for level 'time.year'"), "{err}");
}
