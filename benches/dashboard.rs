//! A BI dashboard three ways, side by side: crmcube with rollups, crmcube without rollups, and
//! DuckDB over the same Parquet files. `cargo bench --bench dashboard`. Without rollups is timed
//! twice: as `crmcube --no-rollups` answers (grouping the fact by its keys before joining large
//! dimensions where that is exact, `rollup::eager`) and plain (the star join as it is).
//!
//! Each of the dashboard's queries is the SQL a BI tool sends to `cubes.sales` (planned by
//! crmcube in-process, as the Flight SQL server does) and the SQL an analyst would write for
//! DuckDB over the star schema's Parquet files (found from the Delta logs by
//! `benches/dashboard_duckdb.py`, not by crmcube). All three answers are compared (numbers to
//! the cent); p50 and p95 of `CRMCUBE_BENCH_RUNS` runs (default 20) are printed with the ratios.
//! Each query runs once untimed first (the answer compared), in the session a dashboard would
//! keep: the timed runs of a query that reads only small rollups run the physical plan the
//! session kept from that first run (`rollup::OnePartition`), as a dashboard's repeated queries
//! do over Flight SQL. A first run plans it, about 0.2-0.5 ms more.
//!
//! `CRMCUBE_BENCH_PROJECT=DIR` measures an already loaded project (e.g. 10 M order lines from
//! `crmcube sample --customers 400000 --years 3`); DuckDB runs when `CRMCUBE_PYTHON` (or
//! `.venv/bin/python`) has the `duckdb` package.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::percentile;
use crmcube::cube::CubeSet;
use crmcube::etl::TransformSet;
use crmcube::query::sql;
use crmcube::warehouse::Warehouse;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::ArrayFormatter;
use datafusion::prelude::SessionContext;

/// DuckDB's FROM clauses: the fact with the dimensions a query needs (LEFT JOINs, as the cube).
const DATE: &str = "LEFT JOIN dim_date d ON f.order_date = d.date";
const CUSTOMER: &str = "LEFT JOIN dim_customer c ON f.customer_id = c.customer_id";
const PRODUCT: &str = "LEFT JOIN dim_product p ON f.product_id = p.product_id";
const REP: &str = "LEFT JOIN dim_sales_rep r ON f.rep_id = r.rep_id";
const MARGIN_PCT: &str = "round(100 * CAST(sum(f.revenue) - sum(f.cost) AS DOUBLE) / CAST(sum(f.revenue) AS DOUBLE), 2)";

struct Query {
    name: &'static str,
    cube_sql: &'static str,
    duckdb: String,
    /// The SQL orders its rows (top-N): compare in order.
    ordered: bool,
}

fn dashboard() -> Vec<Query> {
    let q = |name, cube_sql, duckdb: String| Query { name, cube_sql, duckdb, ordered: false };
    vec![
        q(
            "KPIs by month × region, 2025",
            "SELECT time_month, customer_region, revenue, margin_pct, orders, customers FROM cubes.sales WHERE time_year = 2025 GROUP BY 1, 2",
            format!("SELECT d.month, c.region, sum(f.revenue), {MARGIN_PCT}, count(DISTINCT f.order_id), count(DISTINCT f.customer_id) FROM fact_sales f {DATE} {CUSTOMER} WHERE d.year = 2025 GROUP BY 1, 2"),
        ),
        q(
            "revenue trend by month",
            "SELECT time_month, revenue, orders FROM cubes.sales GROUP BY 1",
            format!("SELECT d.month, sum(f.revenue), count(DISTINCT f.order_id) FROM fact_sales f {DATE} GROUP BY 1"),
        ),
        q(
            "revenue, margin by year × region",
            "SELECT time_year, customer_region, revenue, margin FROM cubes.sales GROUP BY 1, 2",
            format!("SELECT d.year, c.region, sum(f.revenue), sum(f.revenue) - sum(f.cost) FROM fact_sales f {DATE} {CUSTOMER} GROUP BY 1, 2"),
        ),
        q(
            "category × channel, 2025",
            "SELECT product_category, channel_channel, revenue, quantity FROM cubes.sales WHERE time_year = 2025 GROUP BY 1, 2",
            format!("SELECT p.category, f.channel, sum(f.revenue), sum(f.quantity) FROM fact_sales f {DATE} {PRODUCT} WHERE d.year = 2025 GROUP BY 1, 2"),
        ),
        q(
            "drill: provinces of East, 2025",
            "SELECT customer_province, revenue, margin_pct FROM cubes.sales WHERE customer_region = 'East' AND time_year = 2025 GROUP BY 1",
            format!("SELECT c.province, sum(f.revenue), {MARGIN_PCT} FROM fact_sales f {DATE} {CUSTOMER} WHERE c.region = 'East' AND d.year = 2025 GROUP BY 1"),
        ),
        q(
            "distinct customers by year × region",
            "SELECT time_year, customer_region, customers, orders FROM cubes.sales GROUP BY 1, 2",
            format!("SELECT d.year, c.region, count(DISTINCT f.customer_id), count(DISTINCT f.order_id) FROM fact_sales f {DATE} {CUSTOMER} GROUP BY 1, 2"),
        ),
        q(
            "slice: online Software by quarter",
            "SELECT time_quarter, revenue FROM cubes.sales WHERE channel_channel = 'online' AND product_category = 'Software' GROUP BY 1",
            format!("SELECT d.quarter, sum(f.revenue) FROM fact_sales f {DATE} {PRODUCT} WHERE f.channel = 'online' AND p.category = 'Software' GROUP BY 1"),
        ),
        q(
            "year over year by quarter",
            "SELECT time_year, time_quarter, revenue FROM cubes.sales GROUP BY 1, 2",
            format!("SELECT d.year, d.quarter, sum(f.revenue) FROM fact_sales f {DATE} GROUP BY 1, 2"),
        ),
        q(
            "yearly KPIs",
            "SELECT time_year, revenue, orders, customers, avg_order_value FROM cubes.sales GROUP BY 1",
            format!("SELECT d.year, sum(f.revenue), count(DISTINCT f.order_id), count(DISTINCT f.customer_id), round(CAST(sum(f.revenue) AS DOUBLE) / count(DISTINCT f.order_id), 2) FROM fact_sales f {DATE} GROUP BY 1"),
        ),
        q(
            "drill: Hardware subcategories by quarter",
            "SELECT time_quarter, product_subcategory, revenue FROM cubes.sales WHERE product_category = 'Hardware' GROUP BY 1, 2",
            format!("SELECT d.quarter, p.subcategory, sum(f.revenue) FROM fact_sales f {DATE} {PRODUCT} WHERE p.category = 'Hardware' GROUP BY 1, 2"),
        ),
        Query {
            name: "top 10 customers, 2025",
            cube_sql: "SELECT customer_customer, customer_customer_name, revenue FROM cubes.sales WHERE time_year = 2025 GROUP BY 1, 2 ORDER BY revenue DESC, 1 LIMIT 10",
            duckdb: format!("SELECT f.customer_id, c.name, sum(f.revenue) AS r FROM fact_sales f {DATE} {CUSTOMER} WHERE d.year = 2025 GROUP BY 1, 2 ORDER BY r DESC, 1 LIMIT 10"),
            ordered: true,
        },
        Query {
            name: "top 10 products",
            cube_sql: "SELECT product_product, product_product_name, revenue, quantity FROM cubes.sales GROUP BY 1, 2 ORDER BY revenue DESC, 1 LIMIT 10",
            duckdb: format!("SELECT f.product_id, p.name, sum(f.revenue) AS r, sum(f.quantity) FROM fact_sales f {PRODUCT} GROUP BY 1, 2 ORDER BY r DESC, 1 LIMIT 10"),
            ordered: true,
        },
        q(
            "drill: cities of Zhejiang",
            "SELECT customer_city, revenue, orders FROM cubes.sales WHERE customer_province = 'Zhejiang' GROUP BY 1",
            format!("SELECT c.city, sum(f.revenue), count(DISTINCT f.order_id) FROM fact_sales f {CUSTOMER} WHERE c.province = 'Zhejiang' GROUP BY 1"),
        ),
        q(
            "rep regions, 2026",
            "SELECT rep_region, revenue FROM cubes.sales WHERE time_year = 2026 GROUP BY 1",
            format!("SELECT r.region, sum(f.revenue) FROM fact_sales f {DATE} {REP} WHERE d.year = 2026 GROUP BY 1"),
        ),
    ]
}

/// Cells as text, numbers to the cent; sorted unless the query orders its rows.
fn normalise(rows: Vec<Vec<String>>, ordered: bool) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
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

fn cells(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        let f: Vec<ArrayFormatter<'_>> = b.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap()).collect();
        for i in 0..b.num_rows() {
            out.push(f.iter().map(|x| x.value(i).to_string()).collect());
        }
    }
    out
}

/// The times of `runs` timed runs (after one to warm up), sorted, each split into its phases.
struct Timed {
    total: Vec<Duration>,
    /// SQL → logical plan (parse, the cube's measure rewrite), sorted.
    plan: Vec<Duration>,
    /// Logical → physical plan (analyzer rules, the rollup rule among them; optimizer;
    /// physical planning, which plans the cube's star join when no rollup answered), sorted.
    physical: Vec<Duration>,
    /// Running the physical plan to its last batch, sorted.
    execute: Vec<Duration>,
}

/// Runs `text` once to warm up and `runs` times timed; returns the times and the answer.
async fn time(ctx: &SessionContext, cubes: &CubeSet, text: &str, runs: usize) -> (Timed, Vec<Vec<String>>) {
    let answer = cells(&sql::sql(ctx, cubes, text).await.unwrap().collect().await.unwrap());
    let mut t = Timed { total: Vec::new(), plan: Vec::new(), physical: Vec::new(), execute: Vec::new() };
    for _ in 0..runs {
        let start = Instant::now();
        let df = sql::sql(ctx, cubes, text).await.unwrap();
        let planned = Instant::now();
        let task = df.task_ctx();
        let physical = df.create_physical_plan().await.unwrap();
        let optimized = Instant::now();
        let batches = datafusion::physical_plan::collect(physical, std::sync::Arc::new(task)).await.unwrap();
        let done = Instant::now();
        t.total.push(done - start);
        t.plan.push(planned - start);
        t.physical.push(optimized - planned);
        t.execute.push(done - optimized);
        std::hint::black_box(batches);
    }
    for v in [&mut t.total, &mut t.plan, &mut t.physical, &mut t.execute] {
        v.sort();
    }
    (t, answer)
}

struct DuckDb {
    millis: Vec<f64>,
    rows: Vec<Vec<String>>,
}

/// The DuckDB side, or None (with the reason printed) when no Python with duckdb is at hand.
fn duckdb(warehouse: &std::path::Path, tables: &BTreeMap<String, u64>, queries: &[Query], runs: usize) -> Option<Vec<DuckDb>> {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("CRMCUBE_PYTHON").map(std::path::PathBuf::from).or_else(|| {
        let venv = repo.join(".venv/bin/python");
        venv.exists().then_some(venv)
    });
    let Some(python) = python else {
        println!("DuckDB: skipped (set CRMCUBE_PYTHON to a Python with the duckdb package, e.g. .venv/bin/python)");
        return None;
    };
    let request = serde_json::json!({
        "warehouse": warehouse,
        "tables": tables,
        "runs": runs,
        "queries": queries.iter().map(|q| serde_json::json!({"name": q.name, "sql": q.duckdb})).collect::<Vec<_>>(),
    });
    let mut child = std::process::Command::new(&python)
        .arg(repo.join("benches/dashboard_duckdb.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python starts");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), request.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the DuckDB side failed");
    let answers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    Some(
        answers
            .into_iter()
            .map(|a| DuckDb {
                millis: a["millis"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect(),
                rows: serde_json::from_value(a["rows"].clone()).unwrap(),
            })
            .collect(),
    )
}

fn main() {
    let runs: usize = std::env::var("CRMCUBE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (project, _tmp) = common::bench_project().await;
        let transforms = TransformSet::load(&project).unwrap();
        let cubes = CubeSet::load(&project, &transforms).unwrap();
        let warehouse = Warehouse::new(project.warehouse.clone());
        let snapshot = warehouse.current().unwrap().expect("a loaded warehouse");
        let fact_rows = snapshot.tables.get("fact_sales").map(|t| t.rows).unwrap_or(0);
        let with = warehouse.session().await.unwrap();
        sql::register_cubes(&with, &cubes).await.unwrap();
        let notes = crmcube::rollup::install(&with, &cubes, &snapshot).await.unwrap();
        // Without rollups, as `crmcube --no-rollups` answers: the base tables, grouped by the
        // fact's keys before the large dimensions are joined where that is exact and pays.
        let without = warehouse.session().await.unwrap();
        sql::register_cubes(&without, &cubes).await.unwrap();
        let no_rollups = crmcube::rollup::Rewrites { rollups: false, eager: true };
        crmcube::rollup::install_with(&without, &cubes, &snapshot, no_rollups).await.unwrap();
        // And with no rewrite at all: the cube's star join as it is, to show what grouping first gains.
        let plain = warehouse.session().await.unwrap();
        sql::register_cubes(&plain, &cubes).await.unwrap();

        let queries = dashboard();
        let base: BTreeMap<String, u64> =
            ["fact_sales", "dim_date", "dim_customer", "dim_product", "dim_sales_rep"].iter().map(|t| (t.to_string(), snapshot.tables[*t].version)).collect();
        let duck = duckdb(&warehouse.root().canonicalize().unwrap(), &base, &queries, runs);

        println!("\ndashboard over {fact_rows} order lines, {runs} runs per query (p50 / p95 in ms)");
        println!(
            "{:<42} {:<36} {:>15} {:>15} {:>15} {:>15} {:>10} {:>10} {:>6}",
            "query", "answered from", "rollups", "no rollups", "plain", "DuckDB", "Duck/roll", "Duck/base", "same"
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut all_same = true;
        let mut phases = Vec::new();
        for (i, q) in queries.iter().enumerate() {
            notes.lock().unwrap().clear();
            let (t_with, a_with) = time(&with, &cubes, q.cube_sql, runs).await;
            let source = notes
                .lock()
                .unwrap()
                .iter()
                .find_map(|n| {
                    let rollup = n.strip_prefix("rollup ").and_then(|n| n.split_once(' ')).map(|(r, _)| r.to_string());
                    let eager = n.strip_prefix("eager aggregation: ").and_then(|n| n.split("grouped by ").nth(1)).and_then(|k| k.split(" (").next());
                    rollup.or_else(|| eager.map(|k| format!("base: grouped by {k}")))
                })
                .unwrap_or_else(|| "base tables".into());
            let (t_without, a_without) = time(&without, &cubes, q.cube_sql, runs).await;
            let (t_plain, a_plain) = time(&plain, &cubes, q.cube_sql, runs).await;
            let p50 = |v: &[Duration]| ms(percentile(v, 0.5));
            phases.push((q.name, source.clone(), p50(&t_with.plan), p50(&t_with.physical), p50(&t_with.execute)));
            let (t_with, t_without) = (t_with.total, t_without.total);
            let (p50w, p95w, p50b, p95b) = (p50(&t_with), ms(percentile(&t_with, 0.95)), p50(&t_without), ms(percentile(&t_without, 0.95)));
            let p50p = p50(&t_plain.total);
            let mut same = normalise(a_with, q.ordered) == normalise(a_without.clone(), q.ordered)
                && normalise(a_plain, q.ordered) == normalise(a_without.clone(), q.ordered);
            let (duck_cell, r_roll, r_base) = match &duck {
                Some(d) => {
                    let mut m = d[i].millis.clone();
                    m.sort_by(f64::total_cmp);
                    let (p50d, p95d) = (m[(m.len() - 1) / 2], m[((m.len() - 1) as f64 * 0.95).round() as usize]);
                    same &= normalise(d[i].rows.clone(), q.ordered) == normalise(a_without, q.ordered);
                    (format!("{p50d:.1} / {p95d:.1}"), format!("{:.1}×", p50d / p50w), format!("{:.2}×", p50d / p50b))
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            all_same &= same;
            println!(
                "{:<42} {:<36} {:>15} {:>15} {:>15} {:>15} {:>10} {:>10} {:>6}",
                q.name,
                source,
                format!("{p50w:.1} / {p95w:.1}"),
                format!("{p50b:.1} / {p95b:.1}"),
                format!("{p50p:.1} / {:.1}", ms(percentile(&t_plain.total, 0.95))),
                duck_cell,
                r_roll,
                r_base,
                if same { "yes" } else { "NO" }
            );
        }
        println!("Duck/roll, Duck/base: DuckDB's p50 over crmcube's (above 1 = crmcube faster)");
        println!("\nwhere the time with rollups goes (p50 of each phase, ms): SQL → logical plan, → physical plan (analyzer with the rollup rule, optimizer), execution");
        println!("{:<42} {:<36} {:>8} {:>9} {:>8}", "query", "answered from", "plan", "physical", "execute");
        for (name, source, plan, physical, execute) in phases {
            println!("{name:<42} {source:<36} {plan:>8.2} {physical:>9.2} {execute:>8.2}");
        }
        assert!(all_same, "the three ways disagree on some answer (marked NO)");
    });
}
