//! The Flight SQL server on 127.0.0.1 port 0, driven by arrow-flight's `FlightSqlServiceClient`
//! (and, in `flight_adbc_*`, by the Python ADBC driver against the `crmcube serve` binary).
//! Answers are compared with the same SQL run in-process and with hand-written SQL.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetImportedKeys, CommandGetPrimaryKeys, CommandGetTables};
use crmcube::cube::CubeSet;
use crmcube::etl::TransformSet;
use crmcube::project::Project;
use crmcube::serve::auth::{Authenticator, UsersFile};
use crmcube::serve::{ServerConfig, Service};
use crmcube::warehouse::Warehouse;
use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use futures::TryStreamExt;
use prost::Message;
use tonic::transport::Channel;

use crate::common::{block_on, cells, loaded, python, session, sql};

const USER: &str = "ann";
const PASSWORD: &str = "correct horse";
/// A sales rep of region East (access rules in transforms/*.yaml).
const REP: &str = "rex";

/// A server running on its own thread and runtime; told to stop on drop (not waited for: the
/// test's own client connections close only after the test's runtime ends).
struct TestServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    fn start(project: &Project, warehouse: Warehouse, config: ServerConfig) -> Self {
        Self::start_tls(project, warehouse, config, None)
    }

    fn start_tls(project: &Project, warehouse: Warehouse, config: ServerConfig, tls: Option<crmcube::serve::Tls>) -> Self {
        let transforms = TransformSet::load(project).unwrap();
        let cubes = CubeSet::load(project, &transforms).unwrap();
        let mut users = UsersFile { version: 1, users: Vec::new() };
        users.upsert(USER, "manager", PASSWORD, Default::default()).unwrap();
        users.upsert(REP, "rep", PASSWORD, [("region".to_string(), "East".to_string())].into()).unwrap();
        let auth = Authenticator::new(users, config.token_ttl);
        let service = Service::new(warehouse, transforms, cubes, auth, config);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                crmcube::serve::serve(service, listener, tls, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            })
        });
        let addr = addr_rx.recv().unwrap();
        TestServer { addr, stop: Some(stop) }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One server over the shared sample load, for the tests that only read.
fn shared() -> SocketAddr {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let l = loaded();
            TestServer::start(&l.test.project, l.test.warehouse.clone(), ServerConfig::default())
        })
        .addr
}

async fn connect(addr: SocketAddr) -> FlightSqlServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::new(format!("http://{addr}")).unwrap().connect().await.unwrap();
    FlightSqlServiceClient::new(channel)
}

async fn logged_in(addr: SocketAddr) -> FlightSqlServiceClient<Channel> {
    let mut client = connect(addr).await;
    client.handshake(USER, PASSWORD).await.unwrap();
    client
}

/// Runs SQL as a statement and fetches every batch of every endpoint.
async fn fetch(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<Vec<RecordBatch>, arrow_flight::error::FlightError> {
    let info = client.execute(sql.to_string(), None).await.map_err(|e| arrow_flight::error::FlightError::ExternalError(Box::new(e)))?;
    collect(client, info).await
}

async fn collect(
    client: &mut FlightSqlServiceClient<Channel>,
    info: arrow_flight::FlightInfo,
) -> Result<Vec<RecordBatch>, arrow_flight::error::FlightError> {
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let stream = client.do_get(endpoint.ticket.unwrap()).await.map_err(|e| arrow_flight::error::FlightError::ExternalError(Box::new(e)))?;
        batches.extend(stream.try_collect::<Vec<_>>().await?);
    }
    Ok(batches)
}

/// Rows of a metadata call as text.
async fn metadata(client: &mut FlightSqlServiceClient<Channel>, info: arrow_flight::FlightInfo) -> Vec<Vec<String>> {
    cells(&collect(client, info).await.unwrap())
}

/// The same SQL through `crmcube sql`'s planner, in-process.
async fn in_process(text: &str) -> Vec<Vec<String>> {
    let ctx = session().await;
    let cubes = crate::common::cubes();
    crmcube::query::sql::register_cubes(&ctx, &cubes).await.unwrap();
    cells(&crmcube::query::sql::sql(&ctx, &cubes, text).await.unwrap().collect().await.unwrap())
}

#[tokio::test]
async fn login_is_required_and_wrong_passwords_are_refused() {
    let addr = shared();
    let mut anonymous = connect(addr).await;
    let e = anonymous.execute("SELECT 1".into(), None).await.unwrap_err().to_string();
    assert!(e.contains("Unauthenticated") || e.contains("no bearer token"), "{e}");
    let e = anonymous.get_catalogs().await.unwrap_err().to_string();
    assert!(e.contains("no bearer token"), "{e}");

    let e = connect(addr).await.handshake(USER, "wrong").await.unwrap_err().to_string();
    assert!(e.contains("wrong user name or password"), "{e}");
    let e = connect(addr).await.handshake("mallory", PASSWORD).await.unwrap_err().to_string();
    assert!(e.contains("wrong user name or password"), "{e}");

    let mut forged = connect(addr).await;
    forged.set_token("0".repeat(64));
    let e = forged.execute("SELECT 1".into(), None).await.unwrap_err().to_string();
    assert!(e.contains("unknown or has expired"), "{e}");
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let l = loaded();
    let config = ServerConfig { token_ttl: Duration::ZERO, ..ServerConfig::default() };
    let server = TestServer::start(&l.test.project, l.test.warehouse.clone(), config);
    let mut client = logged_in(server.addr).await;
    let e = client.execute("SELECT 1".into(), None).await.unwrap_err().to_string();
    assert!(e.contains("expired"), "{e}");
}

#[tokio::test]
async fn catalogs_schemas_tables_and_types_are_listed() {
    let mut client = logged_in(shared()).await;
    let info = client.get_catalogs().await.unwrap();
    assert_eq!(metadata(&mut client, info).await, vec![vec!["crmcube".to_string()]]);

    let info = client.get_db_schemas(CommandGetDbSchemas { catalog: None, db_schema_filter_pattern: None }).await.unwrap();
    let schemas: Vec<String> = metadata(&mut client, info).await.into_iter().map(|r| r[1].clone()).collect();
    for s in ["cubes", "information_schema", "warehouse"] {
        assert!(schemas.contains(&s.to_string()), "{s} missing from {schemas:?}");
    }

    // No catalog named, schemas asked for: every table, each with its Arrow schema.
    let info = client
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: None,
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let batches = collect(&mut client, info).await.unwrap();
    assert_eq!(batches[0].schema().fields().len(), 5, "table_schema column present");
    let rows = cells(&batches);
    let find = |schema: &str, table: &str| rows.iter().find(|r| r[1] == schema && r[2] == table).map(|r| r[3].clone());
    assert_eq!(find("warehouse", "fact_sales").as_deref(), Some("TABLE"));
    assert_eq!(find("warehouse", "dim_customer").as_deref(), Some("TABLE"));
    assert_eq!(find("cubes", "sales").as_deref(), Some("VIEW"));
    assert_eq!(find("cubes", "receivables").as_deref(), Some("VIEW"));
    let snapshot = loaded().test.warehouse.current().unwrap().unwrap();
    let warehouse_tables = rows.iter().filter(|r| r[1] == "warehouse").count();
    assert_eq!(warehouse_tables, snapshot.tables.len(), "one row per table of the snapshot");

    let info = client
        .get_tables(CommandGetTables {
            catalog: Some("crmcube".into()),
            db_schema_filter_pattern: Some("cubes".into()),
            table_name_filter_pattern: Some("sal%".into()),
            table_types: vec!["VIEW".into()],
            include_schema: false,
        })
        .await
        .unwrap();
    assert_eq!(metadata(&mut client, info).await, vec![vec!["crmcube", "cubes", "sales", "VIEW"]]);

    let info = client.get_table_types().await.unwrap();
    assert_eq!(metadata(&mut client, info).await, vec![vec!["TABLE"], vec!["VIEW"]]);
}

#[tokio::test]
async fn keys_come_from_the_transform_metadata() {
    let mut client = logged_in(shared()).await;
    let info = client
        .get_primary_keys(CommandGetPrimaryKeys { catalog: None, db_schema: None, table: "dim_customer".into() })
        .await
        .unwrap();
    let rows = metadata(&mut client, info).await;
    assert_eq!(rows, vec![vec!["crmcube", "warehouse", "dim_customer", "customer_id", "dim_customer_pkey", "1"]]);

    let info = client
        .get_imported_keys(CommandGetImportedKeys { catalog: None, db_schema: None, table: "orders".into() })
        .await
        .unwrap();
    let rows = metadata(&mut client, info).await;
    // (pk table, pk column) ← (fk table, fk column), as transforms/orders.yaml declares.
    let pairs: Vec<(String, String, String)> = rows.iter().map(|r| (r[2].clone(), r[3].clone(), r[7].clone())).collect();
    assert!(pairs.contains(&("dim_customer".into(), "customer_id".into(), "customer_id".into())), "{pairs:?}");
    assert!(rows.iter().all(|r| r[6] == "orders"));

    for info in [client.get_sql_info(vec![]).await.unwrap(), client.get_xdbc_type_info(Default::default()).await.unwrap()] {
        assert!(!collect(&mut client, info).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_cube_query_matches_the_cli_path_and_the_base_tables() {
    let mut client = logged_in(shared()).await;
    let text = "SELECT customer_region, revenue, orders FROM cubes.sales WHERE time_year = 2025 GROUP BY 1 ORDER BY 1";
    let remote = cells(&fetch(&mut client, text).await.unwrap());
    assert_eq!(remote, in_process(text).await);
    // Independently: revenue (each line to the cent) of completed order lines by the customer's region.
    let ctx = session().await;
    let base = sql(
        &ctx,
        "SELECT c.region, sum(CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2))), count(DISTINCT o.order_id)
         FROM order_lines l JOIN orders o ON l.order_id = o.order_id JOIN dim_customer c ON o.customer_id = c.customer_id
         WHERE o.status = 'completed' AND date_part('year', o.order_date) = 2025 GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(remote.len(), base.len());
    for (r, b) in remote.iter().zip(&base) {
        assert_eq!((&r[0], crate::common::cents(&r[1]), &r[2]), (&b[0], crate::common::cents(&b[1]), &b[2]));
    }
}

#[tokio::test]
async fn prepared_statements_bind_parameters() {
    let mut client = logged_in(shared()).await;
    let mut stmt = client
        .prepare("SELECT customer_region, revenue FROM cubes.sales WHERE time_year = ? GROUP BY 1 ORDER BY 1".into(), None)
        .await
        .unwrap();
    assert_eq!(stmt.parameter_schema().unwrap().fields().len(), 1, "one parameter");
    for year in [2024i64, 2025] {
        let params = RecordBatch::try_new(
            std::sync::Arc::new(Schema::new(vec![Field::new("$1", DataType::Int64, false)])),
            vec![std::sync::Arc::new(Int64Array::from(vec![year]))],
        )
        .unwrap();
        stmt.set_parameters(params).unwrap();
        let info = stmt.execute().await.unwrap();
        let remote = cells(&collect(&mut client, info).await.unwrap());
        let expected = in_process(&format!(
            "SELECT customer_region, revenue FROM cubes.sales WHERE time_year = {year} GROUP BY 1 ORDER BY 1"
        ))
        .await;
        assert!(!remote.is_empty());
        assert_eq!(remote, expected, "year {year}");
    }
    stmt.close().await.unwrap();
}

#[tokio::test]
async fn a_rep_over_flight_sql_reads_only_their_region() {
    let mut client = connect(shared()).await;
    client.handshake(REP, PASSWORD).await.unwrap();
    let regions = cells(&fetch(&mut client, "SELECT DISTINCT customer_region FROM cubes.sales").await.unwrap());
    assert_eq!(regions, vec![vec!["East".to_string()]]);
    let orders = cells(&fetch(&mut client, "SELECT count(*) FROM orders o JOIN dim_customer c USING (customer_id)").await.unwrap());
    let expected = sql(
        &session().await,
        "SELECT count(*) FROM orders o JOIN dim_customer c ON o.customer_id = c.customer_id WHERE c.region = 'East'",
    )
    .await;
    assert_eq!(orders, expected);
}

#[tokio::test]
async fn bad_sql_is_an_invalid_argument_with_the_planner_message() {
    let mut client = logged_in(shared()).await;
    let e = client.execute("SELECT revenue FROM cubes.salse".into(), None).await.unwrap_err().to_string();
    assert!(e.contains("InvalidArgument") || e.contains("invalid argument"), "{e}");
    assert!(e.contains("salse"), "{e}");
    let e = client.execute("SELEC 1".into(), None).await.unwrap_err().to_string();
    assert!(e.contains("does not parse"), "{e}");
    // Statements that would change something are refused as such, and nothing is written.
    for text in ["CREATE TABLE copied AS SELECT 1 AS x", "INSERT INTO orders SELECT * FROM orders", "SET datafusion.execution.target_partitions = 1", "DROP TABLE orders"] {
        let e = client.execute(text.into(), None).await.unwrap_err().to_string();
        assert!(e.contains("only queries are answered") && e.contains("read-only"), "{text}: {e}");
    }
    let orders = cells(&fetch(&mut client, "SELECT count(*) FROM orders").await.unwrap());
    assert_eq!(orders, sql(&session().await, "SELECT count(*) FROM orders").await);
}

#[tokio::test]
async fn the_olap_suite_gives_the_same_results_over_flight_sql() {
    let mut client = logged_in(shared()).await;
    let cases = crate::query_suite::cases();
    let mut failures = Vec::new();
    for case in &cases {
        let remote = cells(&fetch(&mut client, &case.cube_sql).await.unwrap_or_else(|e| panic!("{}: {e}", case.name)));
        let local = in_process(&case.cube_sql).await;
        let sorted = |mut v: Vec<Vec<String>>| {
            v.sort();
            v
        };
        if sorted(remote.clone()) != sorted(local.clone()) {
            failures.push(format!("{}: flight {:?} vs in-process {:?}", case.name, &remote[..remote.len().min(2)], &local[..local.len().min(2)]));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// A fresh warehouse: a small export loaded first, the committed sample second. The small export
/// has 200 customers: with 40, one unparseable customer row (0.3 % of rows) is over the
/// customers' 2 % reject threshold and the load rightly refuses it.
#[test]
fn a_new_load_is_seen_without_restart_and_planned_tickets_keep_their_snapshot() {
    let t = crate::common::test_project();
    let small = t.dir.path().join("small-export");
    crmcube::sample::generate(&crmcube::sample::SampleConfig { customers: 200, years: 1, seed: 7 }, &small).unwrap();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    let mut first = p.clone();
    first.sources = small;
    block_on(async move { crmcube::etl::load(&first, &w).await.unwrap() });
    let server = TestServer::start(&t.project, t.warehouse.clone(), ServerConfig::default());
    let addr = server.addr;
    let count = "SELECT count(*) FROM dim_customer";
    let w = t.warehouse.clone();
    block_on(async move {
        let mut client = logged_in(addr).await;
        let before = cells(&fetch(&mut client, count).await.unwrap());
        let planned = client.execute(count.into(), None).await.unwrap();
        crmcube::etl::load(&p, &w).await.unwrap();
        let after = cells(&fetch(&mut client, count).await.unwrap());
        let late = cells(&collect(&mut client, planned).await.unwrap());
        let expected_before = crate::common::scalar(&w.session_at(Some(1)).await.unwrap(), count).await;
        let expected_after = crate::common::scalar(&w.session_at(Some(2)).await.unwrap(), count).await;
        assert_ne!(expected_before, expected_after, "the two loads differ");
        assert_eq!(before, vec![vec![expected_before.clone()]]);
        assert_eq!(after, vec![vec![expected_after]], "the new snapshot without a restart");
        assert_eq!(late, vec![vec![expected_before]], "a ticket planned before the load answers from its snapshot");
    });
}

/// The `crmcube serve` binary driven by the Python ADBC Flight SQL driver.
#[test]
fn flight_adbc_python_client_logs_in_browses_and_queries() {
    let Some(python) = python() else { return };
    let l = loaded();
    let project = l.test.dir.path();
    // A user added the way an administrator does it: password on standard input.
    let users = project.join("users.yaml");
    let mut add = Command::new(env!("CARGO_BIN_EXE_crmcube"))
        .arg("--project")
        .arg(project)
        .args(["user", "add", "bi", "--role", "manager"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    add.stdin.take().unwrap().write_all(b"adbc-secret\n").unwrap();
    assert!(add.wait().unwrap().success());
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(text.contains("$argon2id$") && !text.contains("adbc-secret"), "{text}");

    let mut server = Command::new(env!("CARGO_BIN_EXE_crmcube"))
        .arg("--project")
        .arg(project)
        .args(["serve", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();

    let out = Command::new(&python)
        .arg(crate::common::repo().join("tests/flight_adbc.py"))
        .args([&format!("grpc://{addr}"), "bi", "adbc-secret"])
        .output()
        .unwrap();
    // SIGTERM: the server stops gracefully and exits 0.
    Command::new("kill").arg("-TERM").arg(server.id().to_string()).status().unwrap();
    let status = server.wait().unwrap();
    assert!(
        out.status.success(),
        "python: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.success(), "serve exits 0 on SIGTERM, got {status:?}");

    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let refused = |key: &str| report[key].as_str().unwrap_or_default().to_string();
    assert!(refused("wrong_password").contains("wrong user name or password"), "{report}");
    assert!(refused("no_credentials").to_lowercase().contains("unauthenticated") || refused("no_credentials").contains("no bearer token"), "{report}");
    let catalogs: Vec<String> = serde_json::from_value(report["catalogs"].clone()).unwrap();
    assert_eq!(catalogs, vec!["crmcube"]);
    let schemas: Vec<String> = serde_json::from_value(report["schemas"].clone()).unwrap();
    assert_eq!(schemas, vec!["cubes", "information_schema", "warehouse"]);
    let columns: Vec<String> = serde_json::from_value(report["fact_sales_columns"].clone()).unwrap();
    assert!(columns.contains(&"revenue".to_string()) && columns.contains(&"customer_id".to_string()), "{columns:?}");
    let tables: Vec<String> = serde_json::from_value(report["tables"].clone()).unwrap();
    for t in ["warehouse.fact_sales", "warehouse.dim_customer", "cubes.sales", "cubes.receivables"] {
        assert!(tables.contains(&t.to_string()), "{t} missing from {tables:?}");
    }
    let types: Vec<String> = serde_json::from_value(report["table_types"].clone()).unwrap();
    assert_eq!(types, vec!["TABLE", "VIEW"]);

    let expected = block_on(in_process("SELECT customer_region, revenue FROM cubes.sales WHERE time_year = 2025 GROUP BY 1 ORDER BY 1"));
    for key in ["cube_query", "prepared"] {
        let rows: Vec<Vec<String>> = serde_json::from_value(report[key].clone()).unwrap();
        assert_eq!(rows.len(), expected.len(), "{key}: {rows:?}");
        for (r, e) in rows.iter().zip(&expected) {
            assert_eq!(r[0], e[0], "{key}");
            assert_eq!(crate::common::cents(&r[1]), crate::common::cents(&e[1]), "{key}: {r:?} vs {e:?}");
        }
    }
}

#[tokio::test]
async fn tls_with_a_configured_certificate() {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = generated.cert.pem();
    let tls = crmcube::serve::Tls { cert: cert.clone().into_bytes(), key: generated.signing_key.serialize_pem().into_bytes() };
    let l = loaded();
    let server = TestServer::start_tls(&l.test.project, l.test.warehouse.clone(), ServerConfig::default(), Some(tls));
    let client_tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&cert))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::new(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(client_tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlightSqlServiceClient::new(channel);
    client.handshake(USER, PASSWORD).await.unwrap();
    let q = "SELECT count(*) FROM dim_product";
    assert_eq!(cells(&fetch(&mut client, q).await.unwrap()), sql(&session().await, q).await);

    // A client speaking plain HTTP/2 to the TLS port gets nowhere.
    let plain = async {
        let channel = tonic::transport::Endpoint::new(format!("http://{}", server.addr))?.connect().await?;
        FlightSqlServiceClient::new(channel).handshake(USER, PASSWORD).await.map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    assert!(tokio::time::timeout(Duration::from_secs(30), plain).await.map(|r| r.is_err()).unwrap_or(true));
}

#[tokio::test]
async fn a_cancelled_stream_stops_its_query_and_frees_its_slot() {
    let l = loaded();
    // One query at a time: if the abandoned query kept running, the next one would wait forever.
    let config = ServerConfig { max_queries: 1, ..ServerConfig::default() };
    let server = TestServer::start(&l.test.project, l.test.warehouse.clone(), config);
    let mut client = logged_in(server.addr).await;
    let huge = "SELECT s.*, g.value FROM fact_sales s CROSS JOIN generate_series(1, 100000) g";
    let info = client.execute(huge.into(), None).await.unwrap();
    let mut stream = client.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
    let first = futures::StreamExt::next(&mut stream).await.unwrap().unwrap();
    assert!(first.num_rows() > 0);
    drop(stream);
    let q = "SELECT count(*) FROM dim_product";
    let next = tokio::time::timeout(Duration::from_secs(60), fetch(&mut client, q)).await;
    let next = next.expect("the cancelled query still holds the only query slot").unwrap();
    assert_eq!(cells(&next), sql(&session().await, q).await);
}

#[tokio::test]
async fn a_query_past_its_memory_limit_fails_clearly() {
    let l = loaded();
    let config = ServerConfig { query_memory: Some(1 << 20), ..ServerConfig::default() };
    let server = TestServer::start(&l.test.project, l.test.warehouse.clone(), config);
    let mut client = logged_in(server.addr).await;
    // A hash join's build side cannot spill: 1 MiB is not enough for a self-join of the facts.
    let q = "SELECT a.customer_id, count(*) FROM fact_sales a JOIN fact_sales b ON a.customer_id = b.customer_id GROUP BY 1";
    let e = fetch(&mut client, q).await.unwrap_err().to_string();
    assert!(e.contains("Resources exhausted") || e.contains("ResourcesExhausted"), "{e}");
    // The server lives on: a small query still runs.
    let q = "SELECT count(*) FROM dim_product";
    assert_eq!(cells(&fetch(&mut client, q).await.unwrap()), sql(&session().await, q).await);
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let mut client = logged_in(shared()).await;
    let e = client.do_get(arrow_flight::Ticket::new(b"not a ticket".to_vec())).await.unwrap_err().to_string();
    assert!(e.to_lowercase().contains("invalid") || e.contains("InvalidArgument"), "{e}");
    let forged = arrow_flight::sql::TicketStatementQuery { statement_handle: b"{}".to_vec().into() };
    let ticket = arrow_flight::Ticket::new(arrow_flight::sql::ProstMessageExt::as_any(&forged).encode_to_vec());
    let e = client.do_get(ticket).await.unwrap_err().to_string();
    assert!(e.contains("malformed statement ticket"), "{e}");
}

/// Sixteen clients query without pause while three loads commit: every answer is exactly one
/// snapshot's totals (never a mix of two loads), and no call fails.
#[test]
fn sixteen_clients_query_while_three_loads_commit() {
    let t = crate::common::test_project();
    let small = t.dir.path().join("small-export");
    crmcube::sample::generate(&crmcube::sample::SampleConfig { customers: 60, years: 1, seed: 11 }, &small).unwrap();
    let mut small_project = t.project.clone();
    small_project.sources = small;
    let full_project = t.project.clone();
    let w = t.warehouse.clone();
    let first = small_project.clone();
    block_on(async move { crmcube::etl::load(&first, &w).await.unwrap() });
    let server = TestServer::start(&t.project, t.warehouse.clone(), ServerConfig { max_queries: 16, ..ServerConfig::default() });
    let addr = server.addr;
    const QUERIES: [&str; 2] = [
        "SELECT count(*), sum(revenue) FROM fact_sales",
        "SELECT revenue, orders, customers FROM cubes.sales",
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let stop = stop.clone();
            runtime.spawn(async move {
                let mut client = logged_in(addr).await;
                let mut answers: Vec<(usize, Vec<Vec<String>>)> = Vec::new();
                let mut errors = Vec::new();
                let mut n = i;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let q = n % QUERIES.len();
                    match fetch(&mut client, QUERIES[q]).await {
                        Ok(b) => answers.push((q, cells(&b))),
                        Err(e) => errors.push(e.to_string()),
                    }
                    n += 1;
                }
                (answers, errors)
            })
        })
        .collect();
    for project in [full_project.clone(), small_project, full_project] {
        let w = t.warehouse.clone();
        block_on(async move { crmcube::etl::load(&project, &w).await.unwrap() });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<_> = runtime.block_on(async { futures::future::join_all(clients).await });
    let w = t.warehouse.clone();
    let known: Vec<Vec<Vec<Vec<String>>>> = block_on(async move {
        let cubes = crate::common::cubes();
        let mut known = Vec::new();
        for id in 1..=4 {
            let ctx = w.session_at(Some(id)).await.unwrap();
            crmcube::query::sql::register_cubes(&ctx, &cubes).await.unwrap();
            let mut per = Vec::new();
            for q in QUERIES {
                per.push(cells(&crmcube::query::sql::sql(&ctx, &cubes, q).await.unwrap().collect().await.unwrap()));
            }
            known.push(per);
        }
        known
    });
    assert_ne!(known[0], known[1], "the two exports give different totals");
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for r in results {
        let (answers, errors) = r.unwrap();
        assert!(errors.is_empty(), "{} calls failed, first: {}", errors.len(), errors[0]);
        for (q, answer) in answers {
            total += 1;
            let snapshot = known.iter().position(|k| k[q] == answer);
            let snapshot = snapshot.unwrap_or_else(|| panic!("{:?} is no snapshot's answer to {}", answer, QUERIES[q]));
            seen.insert(snapshot);
        }
    }
    assert!(total >= 32, "only {total} answers");
    assert!(seen.len() >= 2, "the clients saw the loads: snapshots seen {seen:?}");
}
