//! PostgreSQL sources against a real server: the test runs Debian's `postgresql` (which
//! `.ci/run` installs) on a free loopback port in a temporary folder, fills two tables, and
//! loads them three nights running with the `crmcube` binary. What the warehouse holds is
//! compared with what the database answers to hand-written SQL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::common::{block_on, sql};

/// A PostgreSQL server of its own, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server, or None (outside CI) when PostgreSQL is not installed.
    fn start() -> Option<Server> {
        let mut bins: Vec<PathBuf> = glob::glob("/usr/lib/postgresql/*/bin").unwrap().filter_map(|p| p.ok()).filter(|p| p.join("initdb").exists()).collect();
        bins.sort();
        let Some(bin) = bins.pop() else {
            assert!(std::env::var_os("CI").is_none(), "CI must install PostgreSQL (Debian's postgresql; see .ci/run)");
            eprintln!("skipping: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        // In the system's temporary folder, which the `postgres` user can reach (the target
        // folder may sit under a home folder it cannot enter).
        let dir = tempfile::Builder::new().prefix("crmcube-pg").tempdir().unwrap();
        let data = dir.path().join("data");
        // PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.
        let owner = if output(Command::new("id").arg("-u")) == "0" {
            let uid: u32 = output(Command::new("id").args(["-u", "postgres"])).parse().unwrap();
            let gid: u32 = output(Command::new("id").args(["-g", "postgres"])).parse().unwrap();
            assert!(Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(dir.path()).status().unwrap().success());
            Some((uid, gid))
        } else {
            None
        };
        let command = |program: &str| {
            let mut c = Command::new(bin.join(program));
            if let Some((uid, gid)) = owner {
                std::os::unix::process::CommandExt::uid(&mut c, uid);
                std::os::unix::process::CommandExt::gid(&mut c, gid);
            }
            c
        };
        let init = command("initdb").arg("-D").arg(&data).args(["-U", "crm", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]).output().unwrap();
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = command("postgres")
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = Server { child, port, _dir: dir };
        for _ in 0..100 {
            if command("pg_isready").args(["-h", "127.0.0.1", "-p", &port.to_string()]).output().unwrap().status.success() {
                return Some(server);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("PostgreSQL did not start on port {port}");
    }

    /// Runs SQL statements; returns the rows of the last as text (NULL as "NULL").
    fn sql(&self, statements: &str) -> Vec<Vec<String>> {
        let url = format!("host=127.0.0.1 port={} user=crm dbname=postgres", self.port);
        let statements = statements.to_string();
        block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let mut rows = Vec::new();
            for message in client.simple_query(&statements).await.unwrap() {
                match message {
                    tokio_postgres::SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_string()).collect()),
                    tokio_postgres::SimpleQueryMessage::CommandComplete(_) => {}
                    _ => {}
                }
            }
            rows
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGINT: a fast shutdown that also removes the shared memory.
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn output(c: &mut Command) -> String {
    String::from_utf8(c.output().unwrap().stdout).unwrap().trim().to_string()
}

const CUSTOMERS: &str = r#"version: 1
table: customers
description: Customers, straight from the CRM database; only rows changed since the last load are read.
load: incremental
watermark: updated_at
source:
  postgres:
    url: "postgres://crm:${CRMCUBE_TEST_PG_PASSWORD}@127.0.0.1:${CRMCUBE_TEST_PG_PORT}/postgres"
    table: crm.customers
key: [customer_id]
reject_threshold: 0.5
columns:
  - { name: customer_id, type: string, nullable: false }
  - { name: name, type: string }
  - { name: region, type: string, enum: [East, West, North, South] }
  - { name: credit_limit, type: decimal }
  - { name: updated_at, type: timestamp, formats: ["%Y-%m-%d %H:%M:%S"] }
"#;

const ORDERS: &str = r#"version: 1
table: orders
source:
  postgres:
    url: "postgres://crm:${CRMCUBE_TEST_PG_PASSWORD}@127.0.0.1:${CRMCUBE_TEST_PG_PORT}/postgres"
    query: "SELECT order_id, customer_id, amount, order_date FROM crm.orders WHERE status <> 'test'"
key: [order_id]
reject_threshold: 0.5
references:
  - { column: customer_id, table: customers, key: customer_id }
columns:
  - { name: order_id, type: integer, nullable: false }
  - { name: customer_id, type: string, nullable: false }
  - { name: amount, type: decimal, min: 0 }
  - { name: order_date, type: date, formats: ["%Y-%m-%d"] }
"#;

fn project(dir: &Path) {
    std::fs::create_dir_all(dir.join("transforms")).unwrap();
    std::fs::create_dir_all(dir.join("cubes")).unwrap();
    std::fs::create_dir_all(dir.join("exports")).unwrap();
    std::fs::write(dir.join("crmcube.yaml"), "version: 1\nname: pg\nsources: exports\n").unwrap();
    std::fs::write(dir.join("transforms/customers.yaml"), CUSTOMERS).unwrap();
    std::fs::write(dir.join("transforms/orders.yaml"), ORDERS).unwrap();
}

/// `crmcube load --json` in `dir` against the server on `port`: (exit code, report, stderr).
fn load(dir: &Path, port: u16) -> (Option<i32>, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube"))
        .arg("--project")
        .arg(dir)
        .args(["load", "--json"])
        .env("CRMCUBE_TEST_PG_PORT", port.to_string())
        .env("CRMCUBE_TEST_PG_PASSWORD", "s3cret")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), report, String::from_utf8_lossy(&out.stderr).to_string())
}

fn table<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["tables"].as_array().unwrap().iter().find(|t| t["table"] == name).unwrap_or_else(|| panic!("no {name} in {report}"))
}

/// The warehouse's rows of a query over the current snapshot.
fn warehouse(dir: &Path, q: &str) -> Vec<Vec<String>> {
    let (dir, q) = (dir.to_path_buf(), q.to_string());
    block_on(async move {
        let project = crmcube::project::Project::open(&dir).unwrap();
        let ctx = crmcube::warehouse::Warehouse::new(project.warehouse).session().await.unwrap();
        sql(&ctx, &q).await
    })
}

#[test]
fn a_postgres_source_loads_incrementally_by_watermark_and_matches_the_database() {
    let Some(pg) = Server::start() else { return };
    pg.sql(
        "CREATE SCHEMA crm;
         CREATE TABLE crm.customers (customer_id text PRIMARY KEY, name text, region text, credit_limit numeric(12,2), updated_at timestamp NOT NULL);
         CREATE TABLE crm.orders (order_id integer PRIMARY KEY, customer_id text, amount numeric(12,2), order_date date, status text);
         INSERT INTO crm.customers VALUES
           ('C1', '张伟', 'East', 1000.00, '2026-01-01 09:00:00'),
           ('C2', 'Ann O''Neil', 'East', NULL, '2026-01-02 09:00:00'),
           ('C3', 'Bo, \"the\" buyer', 'North', 250.50, '2026-01-03 09:00:00'),
           ('C4', 'Mars Corp', 'Mars', 10.00, '2026-01-03 10:00:00'),
           ('C5', 'Eve', 'South', 99999.99, '2026-01-04 09:00:00');
         INSERT INTO crm.orders VALUES
           (1, 'C1', 120.00, '2026-01-05', 'done'), (2, 'C2', 80.25, '2026-01-06', 'done'),
           (3, 'C2', 19.75, '2026-01-07', 'done'), (4, 'C9', 5.00, '2026-01-07', 'done'),
           (5, 'C5', 1.00, '2026-01-08', 'test'), (6, 'C3', -3.00, '2026-01-08', 'done');",
    );
    // The server trusts loopback connections; the password in the URL comes from the environment.
    let dir = tempfile::Builder::new().prefix("crmcube-pgproject").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    project(dir.path());
    let valid_customers = "SELECT customer_id, name, region, coalesce(credit_limit::text, 'NULL'), to_char(updated_at, 'YYYY-MM-DD\"T\"HH24:MI:SS') FROM crm.customers WHERE region IN ('East', 'West', 'North', 'South') ORDER BY 1";
    let loaded_customers = "SELECT customer_id, name, region, coalesce(CAST(credit_limit AS VARCHAR), 'NULL') AS credit_limit, CAST(updated_at AS VARCHAR) AS updated_at FROM customers ORDER BY 1";
    let valid_orders = "SELECT o.order_id::text, o.customer_id, o.amount::text, o.order_date::text FROM crm.orders o JOIN crm.customers c USING (customer_id)
                        WHERE o.status <> 'test' AND o.amount >= 0 AND c.region IN ('East', 'West', 'North', 'South') ORDER BY o.order_id";
    let loaded_orders = "SELECT CAST(order_id AS VARCHAR) AS id, customer_id, CAST(amount AS VARCHAR) AS amount, CAST(order_date AS VARCHAR) AS day FROM orders ORDER BY order_id";

    // Night 1: everything is new.
    let (code, report, err) = load(dir.path(), pg.port);
    assert_eq!(code, Some(0), "{err}");
    let c = table(&report, "customers");
    assert_eq!((c["mode"].as_str(), c["read"].as_u64(), c["loaded"].as_u64(), c["quarantined"].as_u64()), (Some("full"), Some(5), Some(4), Some(1)), "{c}");
    assert_eq!(c["watermark_after"], "2026-01-04T09:00:00");
    let o = table(&report, "orders");
    assert_eq!((o["read"].as_u64(), o["loaded"].as_u64(), o["quarantined"].as_u64()), (Some(5), Some(3), Some(2)), "{o}");
    assert_eq!(warehouse(dir.path(), loaded_customers), pg.sql(valid_customers));
    assert_eq!(warehouse(dir.path(), loaded_orders), pg.sql(valid_orders));
    let quarantine = warehouse(dir.path(), "SELECT table_name, rule, column_name, source_file FROM quarantine ORDER BY 1, 2");
    assert_eq!(
        quarantine,
        vec![
            vec!["customers", "allowed", "region", "warehouse/staging/customers.csv"],
            vec!["orders", "min", "amount", "warehouse/staging/orders.csv"],
            vec!["orders", "reference", "customer_id", "warehouse/staging/orders.csv"],
        ]
    );

    // Night 2: a customer moves, one is added, one order is added: only the changed customers
    // are read (the watermark condition runs in the database).
    pg.sql(
        "UPDATE crm.customers SET region = 'West', updated_at = '2026-02-01 08:00:00' WHERE customer_id = 'C2';
         INSERT INTO crm.customers VALUES ('C6', 'Zoë', 'West', 500.00, '2026-02-02 08:00:00');
         INSERT INTO crm.orders VALUES (7, 'C6', 42.00, '2026-02-03', 'done');",
    );
    let (code, report, err) = load(dir.path(), pg.port);
    assert_eq!(code, Some(0), "{err}");
    let c = table(&report, "customers");
    assert_eq!(
        (c["mode"].as_str(), c["read"].as_u64(), c["loaded"].as_u64(), c["updated"].as_u64(), c["rows"].as_u64()),
        (Some("incremental"), Some(2), Some(2), Some(1), Some(5)),
        "{c}"
    );
    assert_eq!((c["watermark_before"].as_str(), c["watermark_after"].as_str()), (Some("2026-01-04T09:00:00"), Some("2026-02-02T08:00:00")));
    assert_eq!(warehouse(dir.path(), loaded_customers), pg.sql(valid_customers));
    assert_eq!(warehouse(dir.path(), loaded_orders), pg.sql(valid_orders));
    assert!(report["files"]["changed"].as_array().unwrap().is_empty(), "a database source is not a rewritten export: {report}");

    // Night 3: nothing changed in the database: no snapshot is written.
    let (code, report, err) = load(dir.path(), pg.port);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(report["unchanged"], true, "{report}");

    // A server that does not answer: exit 1 (failed, worth a retry), the table and the URL
    // named without the password, the warehouse untouched.
    let (code, _, err) = load(dir.path(), free_port());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("table 'customers'") && err.contains("cannot connect") && err.contains("crm:***@127.0.0.1"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    assert_eq!(warehouse(dir.path(), loaded_customers), pg.sql(valid_customers));

    // A column the database does not have: the database's message and the SELECT that ran.
    let transforms = dir.path().join("transforms/orders.yaml");
    std::fs::write(&transforms, ORDERS.replace("name: amount,", "name: amount, from: total,")).unwrap();
    let (code, _, err) = load(dir.path(), pg.port);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("orders.yaml") && err.contains("column \"total\" does not exist") && err.contains("SELECT"), "{err}");
}

#[test]
fn scanning_a_database_drafts_transforms_that_load_its_tables() {
    let Some(pg) = Server::start() else { return };
    pg.sql(
        "CREATE SCHEMA crm;
         CREATE TABLE crm.\"Customers\" (\"CustomerID\" text PRIMARY KEY, name text NOT NULL, credit numeric(12,2), since date, active boolean, seen timestamp, score double precision);
         CREATE TABLE crm.notes (note_id integer PRIMARY KEY, customer_id text NOT NULL REFERENCES crm.\"Customers\", body text, rate numeric(9,4));
         INSERT INTO crm.\"Customers\" VALUES ('C1', '张伟', 1000.50, '2024-02-29', true, '2026-01-01 09:00:00', 0.25),
                                            ('C2', 'Ann', NULL, NULL, false, '2026-01-01 09:00:00.123456', NULL);
         INSERT INTO crm.notes VALUES (1, 'C1', 'called', 1.2345), (2, 'C1', NULL, NULL), (3, 'C2', 'mailed, \"twice\"', 0.5);",
    );
    let dir = tempfile::Builder::new().prefix("crmcube-pgscan").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::create_dir_all(dir.path().join("cubes")).unwrap();
    std::fs::write(dir.path().join("crmcube.yaml"), "version: 1\nname: pgscan\nsources: .\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(dir.path()).args(args).env("PGPASSWORD", "unused").output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let url = format!("postgres://crm:secret@127.0.0.1:{}/postgres", pg.port);
    let (code, out, err) = run(&["scan", &url]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("customers") && out.contains("notes") && out.contains("customer_id → customers.customer_id"), "{out}");
    let draft = std::fs::read_to_string(dir.path().join("transforms/customers.yaml")).unwrap();
    for expected in [
        "url: \"postgres://crm:${PGPASSWORD}@127.0.0.1",
        "table: \"crm.Customers\"",
        "key: [customer_id]",
        "{ name: customer_id, from: \"CustomerID\", type: string, nullable: false }",
        "{ name: name, type: string, nullable: false }",
        "{ name: credit, type: decimal }",
        "{ name: since, type: date, formats: [\"%Y-%m-%d\"] }",
        "{ name: active, type: boolean }",
        "{ name: score, type: float }",
    ] {
        assert!(draft.contains(expected), "the draft lacks {expected}:\n{draft}");
    }
    assert!(!draft.contains("secret"), "{draft}");
    let notes = std::fs::read_to_string(dir.path().join("transforms/notes.yaml")).unwrap();
    assert!(notes.contains("{ column: customer_id, table: customers, key: customer_id }") && notes.contains("scale: 4"), "{notes}");

    let (code, _, err) = run(&["check"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run(&["load"]);
    assert_eq!(code, Some(0), "{err}");
    // The warehouse holds what the database holds, value for value.
    assert_eq!(
        warehouse(dir.path(), "SELECT customer_id, name, coalesce(CAST(credit AS VARCHAR), 'NULL') AS c, coalesce(CAST(since AS VARCHAR), 'NULL') AS s, CAST(active AS VARCHAR) AS a, CAST(seen AS VARCHAR) AS t, coalesce(CAST(score AS VARCHAR), 'NULL') AS f FROM customers ORDER BY 1"),
        pg.sql("SELECT \"CustomerID\", name, coalesce(credit::text, 'NULL'), coalesce(since::text, 'NULL'), CASE WHEN active THEN 'true' ELSE 'false' END, to_char(seen, 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), coalesce(score::text, 'NULL') FROM crm.\"Customers\" ORDER BY 1")
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.trim_end_matches(".000000").to_string()).collect())
            .collect::<Vec<Vec<String>>>()
    );
    assert_eq!(
        warehouse(dir.path(), "SELECT CAST(note_id AS VARCHAR) AS id, customer_id, coalesce(body, 'NULL') AS b, coalesce(CAST(rate AS VARCHAR), 'NULL') AS r FROM notes ORDER BY note_id"),
        pg.sql("SELECT note_id::text, customer_id, coalesce(body, 'NULL'), coalesce(rate::text, 'NULL') FROM crm.notes ORDER BY note_id")
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
