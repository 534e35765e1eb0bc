//! Row-level access rules (transforms/*.yaml `access:`): a sales rep of region East must not read
//! another region's rows through any SQL they can write. Every answer is checked against SQL over
//! the unrestricted tables with the region filter written by hand.

use std::collections::BTreeMap;
use std::process::Command;

use crmcube::access::{Principal, restrict};
use crmcube::etl::TransformSet;
use datafusion::prelude::SessionContext;

use crate::common::{cells, cubes, loaded, session, sql};

fn principal(user: &str, role: &str, region: Option<&str>) -> Principal {
    let attributes: BTreeMap<String, String> = region.map(|r| ("region".to_string(), r.to_string())).into_iter().collect();
    Principal { user: user.into(), role: role.into(), attributes }
}

async fn session_of(who: &Principal) -> Result<SessionContext, crmcube::Error> {
    let transforms = TransformSet::load(&loaded().test.project).unwrap();
    restrict(&session().await, &transforms, &cubes(), who, None).await.map(|(ctx, _)| ctx)
}

async fn rows(ctx: &SessionContext, q: &str) -> Vec<Vec<String>> {
    let df = crmcube::query::sql::sql(ctx, &cubes(), q).await.unwrap_or_else(|e| panic!("{q}: {e}"));
    let mut r = cells(&df.collect().await.unwrap_or_else(|e| panic!("{q}: {e}")));
    r.sort();
    r
}

/// (what a rep writes, the same question over the unrestricted tables limited to East by hand)
const PAIRS: &[(&str, &str)] = &[
    ("SELECT DISTINCT region FROM dim_customer", "SELECT 'East'"),
    ("SELECT count(*) FROM dim_customer", "SELECT count(*) FROM dim_customer WHERE region = 'East'"),
    (
        "SELECT count(*) FROM crmcube.warehouse.orders",
        "SELECT count(*) FROM orders o JOIN dim_customer c ON o.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    (
        "SELECT DISTINCT c.region FROM fact_sales s JOIN dim_customer c ON s.customer_id = c.customer_id",
        "SELECT 'East'",
    ),
    (
        "SELECT count(*) FROM fact_sales s LEFT JOIN dim_customer c ON s.customer_id = c.customer_id",
        "SELECT count(*) FROM fact_sales s JOIN dim_customer c ON s.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    (
        "SELECT count(*) FROM order_lines WHERE order_id IN (SELECT order_id FROM orders WHERE customer_id <> '')",
        "SELECT count(*) FROM order_lines l JOIN orders o ON l.order_id = o.order_id
         JOIN dim_customer c ON o.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    (
        "WITH x AS (SELECT * FROM fact_invoice) SELECT sum(amount) FROM x",
        "SELECT sum(i.amount) FROM fact_invoice i JOIN dim_customer c ON i.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    (
        "SELECT count(*), sum(amount) FROM (SELECT * FROM fact_payment) p",
        "SELECT count(*), sum(p.amount) FROM fact_payment p JOIN fact_invoice i ON p.invoice_id = i.invoice_id
         JOIN dim_customer c ON i.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    (
        "SELECT count(*) FROM fact_interaction WHERE customer_id IN (SELECT customer_id FROM fact_interaction)",
        "SELECT count(*) FROM fact_interaction f JOIN dim_customer c ON f.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    (
        "SELECT count(DISTINCT customer_id) FROM fact_receivable",
        "SELECT count(DISTINCT r.customer_id) FROM fact_receivable r JOIN dim_customer c ON r.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    (
        "SELECT customer_region, revenue FROM cubes.sales GROUP BY 1",
        "SELECT 'East', sum(s.revenue) FROM fact_sales s JOIN dim_customer c ON s.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    ("SELECT count(*) FROM quarantine", "SELECT 0"),
    // The lifetime value tables the load fits follow customer_value's rules.
    (
        "SELECT count(*), round(sum(clv), 2) FROM customer_clv",
        "SELECT count(*), round(sum(v.clv), 2) FROM customer_clv v JOIN dim_customer c ON v.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    ("SELECT count(*), max(alpha) FROM clv_model", "SELECT count(*), max(alpha) FROM clv_model"),
    (
        "SELECT customer_region, round(lifetime_value, 2) FROM cubes.clv GROUP BY 1",
        "SELECT 'East', round(sum(v.clv), 2) FROM customer_clv v JOIN dim_customer c ON v.customer_id = c.customer_id WHERE c.region = 'East'",
    ),
    // Unrestricted reference data stays whole.
    ("SELECT count(*) FROM dim_product", "SELECT count(*) FROM dim_product"),
];

#[tokio::test]
async fn a_rep_reads_only_their_regions_rows_through_any_sql() {
    let rep = session_of(&principal("rex", "rep", Some("East"))).await.unwrap();
    let all = session().await;
    for (asked, by_hand) in PAIRS {
        let got = rows(&rep, asked).await;
        let expected = {
            let mut e = sql(&all, by_hand).await;
            e.sort();
            e
        };
        assert_eq!(got, expected, "{asked}");
    }
    // The rows exist: the unrestricted session sees other regions.
    assert!(sql(&all, "SELECT count(DISTINCT region) FROM dim_customer").await[0][0].parse::<u32>().unwrap() > 1);
    // The stored tables have no name a rep can write.
    for q in ["SELECT * FROM __stored_dim_customer", "SELECT * FROM crmcube.warehouse.\"__stored_orders\""] {
        let e = match crmcube::query::sql::sql(&rep, &cubes(), q).await {
            Ok(df) => df.collect().await.err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{q} was answered")),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("not found"), "{q}: {e}");
    }
    // EXPLAIN plans without reading rows.
    assert!(!rows(&rep, "EXPLAIN SELECT * FROM dim_customer").await.is_empty());
}

#[tokio::test]
async fn the_cli_cube_path_follows_the_rules_too() {
    let rep = session_of(&principal("rex", "rep", Some("East"))).await.unwrap();
    let q = crmcube::query::CubeQuery {
        cube: "sales".into(),
        measures: vec!["revenue".into()],
        by: vec!["customer.region".into()],
        ..Default::default()
    };
    let got = cells(&crmcube::query::run(&rep, cubes().get("sales").unwrap(), &q).await.unwrap());
    let expected = sql(
        &session().await,
        "SELECT 'East', sum(s.revenue) FROM fact_sales s JOIN dim_customer c ON s.customer_id = c.customer_id WHERE c.region = 'East'",
    )
    .await;
    assert_eq!(got, expected);
}

#[tokio::test]
async fn managers_read_everything_and_unknown_roles_read_nothing_restricted() {
    let manager = session_of(&principal("mia", "manager", None)).await.unwrap();
    let all = session().await;
    for q in ["SELECT count(*) FROM fact_sales", "SELECT count(*) FROM quarantine", "SELECT count(*) FROM fact_payment"] {
        assert_eq!(rows(&manager, q).await, sql(&all, q).await, "{q}");
    }
    let intern = session_of(&principal("ivo", "intern", None)).await.unwrap();
    assert_eq!(rows(&intern, "SELECT count(*) FROM dim_customer").await, vec![vec!["0"]]);
    assert_eq!(rows(&intern, "SELECT count(*) FROM quarantine").await, vec![vec!["0"]]);
    assert_eq!(rows(&intern, "SELECT count(*) FROM customer_clv").await, vec![vec!["0"]]);
    assert_eq!(rows(&intern, "SELECT count(*) FROM clv_model").await, vec![vec!["0"]]);
    assert_eq!(rows(&intern, "SELECT count(*) FROM dim_product").await, sql(&all, "SELECT count(*) FROM dim_product").await);
}

#[tokio::test]
async fn a_rep_without_a_region_gets_an_error_naming_the_attribute() {
    let e = session_of(&principal("rex", "rep", None)).await.err().expect("refused").to_string();
    assert!(e.contains("'region'") && e.contains("rex") && e.contains("--attr region="), "{e}");
}

/// `crmcube --as USER` on the command line: the user comes from users.yaml.
#[test]
fn cli_as_user_applies_the_users_rules() {
    let t = crate::common::test_project();
    let mut users = crmcube::serve::auth::UsersFile { version: 1, users: Vec::new() };
    users.upsert("rex", "rep", "pw", [("region".to_string(), "East".to_string())].into()).unwrap();
    users.save(&t.project.users).unwrap();
    let warehouse = loaded().test.warehouse.root().to_path_buf();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_crmcube"))
            .arg("--project")
            .arg(t.dir.path())
            .arg("--warehouse")
            .arg(&warehouse)
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, out, err) = run(&["--as", "rex", "sql", "SELECT DISTINCT region FROM dim_customer", "--format", "csv"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "region\nEast");
    let (code, out, err) = run(&["--as", "rex", "query", "sales", "-m", "customers", "-b", "customer.region", "--format", "csv"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 2, "one region: {out}");
    assert!(out.contains("East"), "{out}");
    let (code, _, err) = run(&["--as", "rox", "sql", "SELECT 1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no user 'rox'") && err.contains("'rex'"), "{err}");
}
