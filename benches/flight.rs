//! The Flight SQL server under load, side by side with the same queries run in-process.
//!
//! `cargo bench --bench flight` loads the committed sample into a temporary warehouse (or uses
//! `CRMCUBE_BENCH_PROJECT=DIR`, already loaded), starts `crmcube serve`'s service on 127.0.0.1
//! port 0 in this process, and measures with arrow-flight's Flight SQL client:
//!
//! 1. streaming: a result of ≥ `CRMCUBE_BENCH_ROWS` rows (default 10 M: fact_sales cross joined
//!    with a number series) fetched over loopback, in MB/s of Arrow buffers and rows/s, next to
//!    the same plan drained in-process — the ratio is the cost of the wire;
//! 2. concurrency: a cube query run by 1 client and by `CRMCUBE_BENCH_CLIENTS` (default 32)
//!    clients at once, each on its own connection, p50/p99 latency per query — once answered
//!    from a rollup (the server's default) and once from the base tables (a second server
//!    started with rollups off).

mod common;

use std::sync::Arc;
use std::time::Instant;

use arrow_flight::sql::client::FlightSqlServiceClient;
use crmcube::cube::CubeSet;
use common::percentile;
use crmcube::etl::TransformSet;
use crmcube::serve::auth::{Authenticator, UsersFile};
use crmcube::serve::{ServerConfig, Service};
use crmcube::warehouse::Warehouse;
use datafusion::arrow::array::RecordBatch;
use futures::StreamExt;
use tonic::transport::Channel;

const CUBE_QUERY: &str = "SELECT customer_region, revenue, orders FROM cubes.sales WHERE time_year = 2025 GROUP BY 1";

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn buffer_bytes(b: &RecordBatch) -> usize {
    b.columns().iter().map(|c| c.to_data().get_slice_memory_size().unwrap_or(0)).sum()
}

async fn client(addr: std::net::SocketAddr) -> FlightSqlServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::new(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut c = FlightSqlServiceClient::new(channel);
    c.handshake("bench", "bench").await.unwrap();
    c
}

/// Runs `sql` and drains the result; (rows, Arrow buffer bytes).
async fn drain(c: &mut FlightSqlServiceClient<Channel>, sql: &str) -> (usize, usize) {
    let info = c.execute(sql.to_string(), None).await.unwrap();
    let mut stream = c.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
    let (mut rows, mut bytes) = (0, 0);
    while let Some(b) = stream.next().await {
        let b = b.unwrap();
        rows += b.num_rows();
        bytes += buffer_bytes(&b);
    }
    (rows, bytes)
}

fn main() {
    let target_rows: usize = env("CRMCUBE_BENCH_ROWS", 10_000_000);
    let clients: usize = env("CRMCUBE_BENCH_CLIENTS", 32);
    let runs: usize = env("CRMCUBE_BENCH_RUNS", 20);
    let setup = tokio::runtime::Runtime::new().unwrap();
    let (project, _tmp) = setup.block_on(common::bench_project());
    let warehouse = Warehouse::new(project.warehouse.clone());
    let transforms = TransformSet::load(&project).unwrap();
    let cubes = CubeSet::load(&project, &transforms).unwrap();
    let mut users = UsersFile { version: 1, users: Vec::new() };
    users.upsert("bench", "manager", "bench", Default::default()).unwrap();
    // Two servers on one runtime, as `crmcube serve` runs: rollups on (default) and off.
    let server_rt = Arc::new(tokio::runtime::Runtime::new().unwrap());
    let mut servers = Vec::new();
    for (label, rollups) in [("rollup", true), ("base tables", false)] {
        let config = ServerConfig { max_queries: clients, rollups, ..ServerConfig::default() };
        let service = Service::new(warehouse.clone(), transforms.clone(), cubes.clone(), Authenticator::new(users.clone(), config.token_ttl), config);
        let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        servers.push((label, listener.local_addr().unwrap()));
        server_rt.spawn(crmcube::serve::serve(service, listener, None, std::future::pending()));
    }
    let addr = servers[0].1;

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = warehouse.session().await.unwrap();
        crmcube::query::sql::register_cubes(&ctx, &cubes).await.unwrap();
        let snapshot = warehouse.current().unwrap().unwrap();
        let notes = crmcube::rollup::install(&ctx, &cubes, &snapshot).await.unwrap();
        let facts: usize = crmcube::query::sql::sql(&ctx, &cubes, "SELECT count(*) FROM fact_sales")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()[0]
            .column(0)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap()
            .value(0) as usize;
        let copies = target_rows.div_ceil(facts.max(1));
        let big = format!(
            "SELECT s.order_id, s.line_no, s.order_date, s.customer_id, s.channel, s.product_id, s.quantity, s.revenue, s.cost, g.value AS copy \
             FROM fact_sales s CROSS JOIN generate_series(1, {copies}) g"
        );

        println!("streaming a {}-row result ({facts} fact rows × {copies})", facts * copies);
        println!("{:<28} {:>12} {:>10} {:>10} {:>12}", "", "rows", "MB", "seconds", "MB/s");
        let started = Instant::now();
        let mut stream = crmcube::query::sql::sql(&ctx, &cubes, &big).await.unwrap().execute_stream().await.unwrap();
        let (mut rows, mut bytes) = (0, 0);
        while let Some(b) = stream.next().await {
            let b = b.unwrap();
            rows += b.num_rows();
            bytes += buffer_bytes(&b);
        }
        let local = started.elapsed().as_secs_f64();
        let mb = bytes as f64 / 1e6;
        println!("{:<28} {:>12} {:>10.0} {:>10.2} {:>12.0}", "in-process (no wire)", rows, mb, local, mb / local);
        let mut c = client(addr).await;
        let started = Instant::now();
        let (rows_f, bytes_f) = drain(&mut c, &big).await;
        let remote = started.elapsed().as_secs_f64();
        assert_eq!(rows_f, rows, "Flight SQL returns every row");
        let mb_f = bytes_f as f64 / 1e6;
        println!("{:<28} {:>12} {:>10.0} {:>10.2} {:>12.0}", "Flight SQL over loopback", rows_f, mb_f, remote, mb_f / remote);
        println!("ratio Flight / in-process time: {:.2}; {:.1} M rows/s over Flight", remote / local, rows_f as f64 / remote / 1e6);

        crmcube::query::sql::sql(&ctx, &cubes, CUBE_QUERY).await.unwrap().collect().await.unwrap();
        println!("\ncube query: {CUBE_QUERY}\n({})", notes.lock().unwrap().join("; "));
        println!("{:<44} {:>8} {:>10} {:>10} {:>10}", "", "queries", "p50 ms", "p99 ms", "q/s");
        for (label, addr) in servers.clone() {
        for n in [1, clients] {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..n {
                tasks.push(tokio::spawn(async move {
                    let mut c = client(addr).await;
                    let mut times = Vec::with_capacity(runs);
                    for _ in 0..runs {
                        let t = Instant::now();
                        let (rows, _) = drain(&mut c, CUBE_QUERY).await;
                        assert!(rows > 0);
                        times.push(t.elapsed());
                    }
                    times
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            let wall = started.elapsed().as_secs_f64();
            all.sort();
            println!(
                "{:<44} {:>8} {:>10.1} {:>10.1} {:>10.0}",
                format!("{n} client(s) over Flight SQL, {label}"),
                all.len(),
                percentile(&all, 0.5).as_secs_f64() * 1e3,
                percentile(&all, 0.99).as_secs_f64() * 1e3,
                all.len() as f64 / wall
            );
        }
        }
        let mut local = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let batches = crmcube::query::sql::sql(&ctx, &cubes, CUBE_QUERY).await.unwrap().collect().await.unwrap();
            assert!(!batches.is_empty());
            local.push(t.elapsed());
        }
        local.sort();
        println!(
            "{:<44} {:>8} {:>10.1} {:>10.1}",
            "in-process, 1 caller, rollup",
            local.len(),
            percentile(&local, 0.5).as_secs_f64() * 1e3,
            percentile(&local, 0.99).as_secs_f64() * 1e3
        );
    });
}
