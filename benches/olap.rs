//! Latency of each OLAP operation over a loaded warehouse: p50 and p95 of N runs.
//!
//! `cargo bench --bench olap` loads the committed sample into a temporary warehouse (outside the
//! timed loop), then runs each operation 20 times. `CRMCUBE_BENCH_PROJECT=DIR` measures another
//! project's warehouse instead (already loaded), e.g. a generated 10 M order-line export.

mod common;

use std::time::Instant;

use common::percentile;
use crmcube::cube::CubeSet;
use crmcube::etl::TransformSet;
use crmcube::query::{CubeQuery, run, sql};
use crmcube::warehouse::Warehouse;

fn q(measures: &[&str]) -> CubeQuery {
    CubeQuery { cube: "sales".into(), measures: measures.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn operations() -> Vec<(&'static str, CubeQuery)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        ("slice (region × year, one year)", CubeQuery { by: s(&["customer.region"]), filters: s(&["time.year=2025"]), ..q(&["revenue", "margin_pct"]) }),
        ("dice (3 dimensions)", CubeQuery { by: s(&["time.quarter"]), filters: s(&["customer.region=South,East", "product.category=Software", "channel.channel!=online"]), ..q(&["revenue"]) }),
        ("roll-up (years)", CubeQuery { by: s(&["time.year"]), ..q(&["revenue", "orders"]) }),
        ("drill path (3 levels)", CubeQuery { drill: s(&["time.year=2026", "time.quarter=2026-Q1", "time.month=2026-02"]), ..q(&["revenue"]) }),
        ("drill-through (100 rows)", CubeQuery { detail: true, filters: s(&["customer.province=Zhejiang"]), limit: Some(100), ..q(&[]) }),
        ("pivot (region × year)", CubeQuery { by: s(&["customer.region"]), pivot: Some("time.year".into()), ..q(&["revenue"]) }),
        ("trend (month, MA, YTD, YoY)", CubeQuery { trend: Some("time.month".into()), moving_average: Some(3), year_to_date: true, year_over_year: true, ..q(&["revenue"]) }),
        ("top 10 + others", CubeQuery { by: s(&["customer.customer"]), order: s(&["revenue:desc"]), limit: Some(10), others: true, ..q(&["revenue", "orders"]) }),
        ("compare 2025 vs 2024", CubeQuery { by: s(&["customer.region"]), compare: Some("time.year=2025:2024".into()), ..q(&["revenue", "orders"]) }),
        ("forecast 6 months", CubeQuery { trend: Some("time.month".into()), forecast: Some(6), ..q(&["revenue"]) }),
        ("distinct count (customers by channel)", CubeQuery { by: s(&["channel.channel"]), ..q(&["customers", "orders"]) }),
        (
            "balance by region, year end (semi-add.)",
            CubeQuery { cube: "receivables".into(), by: s(&["customer.region"]), filters: s(&["time.year=2025"]), ..q(&["balance", "invoiced"]) },
        ),
    ]
}

fn main() {
    let runs: usize = std::env::var("CRMCUBE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (project, _tmp) = common::bench_project().await;
        let transforms = TransformSet::load(&project).unwrap();
        let cubes = CubeSet::load(&project, &transforms).unwrap();
        let ctx = Warehouse::new(project.warehouse.clone()).session().await.unwrap();
        sql::register_cubes(&ctx, &cubes).await.unwrap();
        println!("\n{:<40} {:>10} {:>10}   ({runs} runs each)", "operation (cube query path)", "p50 ms", "p95 ms");
        for (name, query) in operations() {
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs {
                let t = Instant::now();
                let batches = run(&ctx, cubes.get(&query.cube).unwrap(), &query).await.unwrap();
                std::hint::black_box(batches);
                times.push(t.elapsed());
            }
            times.sort();
            println!("{:<40} {:>10.1} {:>10.1}", name, percentile(&times, 0.5).as_secs_f64() * 1e3, percentile(&times, 0.95).as_secs_f64() * 1e3);
        }
        let texts = [
            ("slice through cube SQL", "SELECT customer_region, revenue, margin_pct FROM cubes.sales WHERE time_year = 2025 GROUP BY 1"),
            ("balance by year through cube SQL", "SELECT time_year, balance FROM cubes.receivables GROUP BY 1"),
        ];
        for (name, text) in texts {
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs {
                let t = Instant::now();
                std::hint::black_box(sql::sql(&ctx, &cubes, text).await.unwrap().collect().await.unwrap());
                times.push(t.elapsed());
            }
            times.sort();
            println!("{:<40} {:>10.1} {:>10.1}", name, percentile(&times, 0.5).as_secs_f64() * 1e3, percentile(&times, 0.95).as_secs_f64() * 1e3);
        }
    });
}
