//! Broken metadata files: errors name file, line, column and key, suggest the nearest valid
//! name, and never panic.

use std::process::Command;

use crmcube::cube::CubeSet;
use crmcube::etl::TransformSet;

use crate::common::test_project;

/// Replaces `from` by `to` in a project file; returns the 1-based line where `to` now stands.
fn break_file(path: &std::path::Path, from: &str, to: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from} not in {}", path.display());
    let text = text.replacen(from, to, 1);
    std::fs::write(path, &text).unwrap();
    text.lines().position(|l| l.contains(to)).unwrap() + 1
}

fn errors(t: &crate::common::TestProject) -> String {
    match TransformSet::load(&t.project) {
        Err(e) => e.to_string(),
        Ok(set) => CubeSet::load(&t.project, &set).map(|_| String::new()).unwrap_or_else(|e| e.to_string()),
    }
}

#[test]
fn misspelled_reference_table_names_file_line_key_and_nearest_table() {
    let t = test_project();
    let line = break_file(&t.project.transforms.join("orders.yaml"), "table: dim_customer,", "table: dim_custmer,");
    let err = errors(&t);
    assert!(err.contains(&format!("orders.yaml:{line}:")), "{err}");
    assert!(err.contains("references › 'customer_id'") && err.contains("table 'dim_custmer' not found"), "{err}");
    assert!(err.contains("did you mean 'dim_customer'?"), "{err}");
}

#[test]
fn a_misspelled_refresh_by_table_names_file_line_and_nearest_table() {
    let t = test_project();
    let line = break_file(&t.project.transforms.join("customer_monthly.yaml"), "refresh_by: { table: fact_sales,", "refresh_by: { table: fact_sale,");
    let err = errors(&t);
    assert!(err.contains(&format!("customer_monthly.yaml:{line}:")), "{err}");
    assert!(err.contains("refresh_by › table") && err.contains("table 'fact_sale' not found"), "{err}");
    assert!(err.contains("did you mean 'fact_sales'?"), "{err}");
}

#[test]
fn misspelled_key_column_suggests_the_declared_column() {
    let t = test_project();
    let line = break_file(&t.project.transforms.join("orders.yaml"), "key: [order_id]", "key: [orderid]");
    let err = errors(&t);
    assert!(err.contains(&format!("orders.yaml:{line}:")) && err.contains("key 'orderid'"), "{err}");
    assert!(err.contains("did you mean 'order_id'?"), "{err}");
}

#[test]
fn unknown_yaml_key_in_a_cube_is_named_with_its_line() {
    let t = test_project();
    let line = break_file(&t.project.cubes.join("sales.yaml"), "foreign_key: order_date", "foreign_kye: order_date");
    let err = errors(&t);
    assert!(err.contains(&format!("sales.yaml:{line}:")), "{err}");
    assert!(err.contains("foreign_kye"), "{err}");
}

#[test]
fn misspelled_fact_table_suggests_the_warehouse_table() {
    let t = test_project();
    let line = break_file(&t.project.cubes.join("sales.yaml"), "fact: fact_sales", "fact: fact_sale");
    let err = errors(&t);
    assert!(err.contains(&format!("sales.yaml:{line}:")) && err.contains("cube 'sales' › fact"), "{err}");
    assert!(err.contains("did you mean 'fact_sales'?"), "{err}");
}

#[test]
fn wrong_value_type_is_reported_not_panicked_on() {
    let t = test_project();
    let line = break_file(&t.project.transforms.join("fact_invoice.yaml"), "reject_threshold: 0.02", "reject_threshold: lots");
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(t.dir.path()).arg("check").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("fact_invoice.yaml:{line}:")), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn check(t: &crate::common::TestProject) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(t.dir.path()).arg("check").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `crmcube check` plans every derived SELECT over empty tables of the declared types: a
/// misspelled column or table is named at the file's `sql:` line before any load, a table that
/// reads a broken one is not reported again, and the cubes' columns of derived tables are checked.
#[test]
fn check_plans_the_derived_tables_and_names_a_broken_select_at_its_file() {
    let t = test_project();
    break_file(&t.project.transforms.join("customer_value.yaml"), "purchase_days, monetary, margin", "purchase_days, monetary, margn");
    break_file(&t.project.transforms.join("credit_exposure.yaml"), "FROM customer_receivables", "FROM customer_receivable");
    let sql_line = |file: &str| std::fs::read_to_string(t.project.transforms.join(file)).unwrap().lines().position(|l| l.starts_with("sql:")).unwrap() + 1;
    let (code, _, err) = check(&t);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("customer_value.yaml:{}:1: table 'customer_value' › sql", sql_line("customer_value.yaml"))) && err.contains("margn"), "{err}");
    assert!(err.contains(&format!("credit_exposure.yaml:{}:1: table 'credit_exposure' › sql", sql_line("credit_exposure.yaml"))), "{err}");
    assert!(err.contains("table 'customer_receivable' not found") && err.contains("did you mean 'customer_receivables'?"), "{err}");
    // customer_clv's cube reads customer_value, which does not plan: no second problem for it.
    assert_eq!(err.matches(" › sql").count(), 2, "{err}");

    let t = test_project();
    let line = break_file(&t.project.cubes.join("customers.yaml"), "column: monetary", "column: monetry");
    let (code, _, err) = check(&t);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("customers.yaml:{line}:")) && err.contains("monetry"), "{err}");
}

/// A `refresh_by` the SELECT does not allow is a warning of `check` (the load recomputes the
/// table in full every night), not an error.
#[test]
fn check_warns_of_a_refresh_by_its_select_does_not_allow() {
    let t = test_project();
    std::fs::write(
        t.project.transforms.join("sales_rank.yaml"),
        "version: 1\ntable: sales_rank\nrefresh_by: { table: fact_sales, key: customer_id }\nsql: |\n  SELECT customer_id, row_number() OVER (ORDER BY sum(revenue) DESC) AS r FROM fact_sales GROUP BY 1\n",
    )
    .unwrap();
    let (code, out, err) = check(&t);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("ok: "), "{out}");
    assert!(err.contains("warning: transforms/sales_rank.yaml: table 'sales_rank' › refresh_by fact_sales.customer_id: a window over fact_sales is not partitioned by 'customer_id'"), "{err}");
    assert_eq!(err.matches("warning:").count(), 1, "the sample's own refreshes all apply: {err}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let t = test_project();
    break_file(&t.project.transforms.join("orders.yaml"), "key: [order_id]", "key: [orderid]");
    break_file(&t.project.transforms.join("fact_payment.yaml"), "table: fact_invoice,", "table: fact_invoices,");
    let err = errors(&t);
    assert!(err.contains("orders.yaml") && err.contains("fact_payment.yaml"), "{err}");
}

#[test]
fn a_misspelled_history_column_and_a_watermark_on_a_full_table_are_named() {
    let t = test_project();
    let file = t.project.transforms.join("dim_customer.yaml");
    let line = break_file(&file, "columns: [segment, region,", "columns: [segment, regoin,");
    let text = std::fs::read_to_string(&file).unwrap().replacen("reject_threshold: 0.02", "reject_threshold: 0.02\nwatermark: updated_at", 1);
    std::fs::write(&file, text).unwrap();
    let watermark = std::fs::read_to_string(&file).unwrap().lines().position(|l| l == "watermark: updated_at").unwrap() + 1;
    let err = errors(&t);
    assert!(err.contains(&format!("dim_customer.yaml:{line}:")) && err.contains("history › columns 'regoin'"), "{err}");
    assert!(err.contains("did you mean 'region'?"), "{err}");
    assert!(err.contains(&format!("dim_customer.yaml:{watermark}:")) && err.contains("`load: incremental`"), "{err}");
}

#[test]
fn bad_lifetime_value_settings_are_named_with_the_key_and_what_is_allowed() {
    let t = test_project();
    let file = t.dir.path().join("crmcube.yaml");
    let base = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{base}lifetime_value:\n  horizon_months: 0\n  monthly_discount: 1.5\n")).unwrap();
    let e = crmcube::project::Project::open(t.dir.path()).unwrap_err().to_string();
    assert!(e.contains("lifetime_value.horizon_months") && e.contains("1 to 1200"), "{e}");
    assert!(e.contains("lifetime_value.monthly_discount") && e.contains("1.5"), "{e}");
    std::fs::write(&file, format!("{base}lifetime_value:\n  time_unit: fortnight\n")).unwrap();
    let e = crmcube::project::Project::open(t.dir.path()).unwrap_err().to_string();
    assert!(e.contains("crmcube.yaml:") && e.contains("fortnight"), "{e}");
}
