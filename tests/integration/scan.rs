//! `crmcube scan` → `check` → `load` on exports it has never seen: the sample export (whose
//! hand-written transforms are the reference) and a GBK, semicolon-separated file.

use std::path::Path;
use std::process::Command;

use crate::common::{block_on, repo, session, sql};

fn crmcube(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).current_dir(dir).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn scanned_project() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("crmcube-scan").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    crate::common::copy_dir(&repo().join("sample-data"), &dir.path().join("exports"));
    std::fs::remove_file(dir.path().join("exports/dirt.json")).unwrap();
    std::fs::create_dir_all(dir.path().join("cubes")).unwrap();
    std::fs::write(dir.path().join("crmcube.yaml"), "version: 1\nname: scanned\nsources: exports\n").unwrap();
    dir
}

/// Every row of `columns` of a table as text, sorted.
async fn rows(ctx: &datafusion::prelude::SessionContext, table: &str, columns: &[String], filter: &str) -> Vec<Vec<String>> {
    let select: Vec<String> = columns.iter().map(|c| format!("CAST({c} AS VARCHAR) AS {c}")).collect();
    let mut r = sql(ctx, &format!("SELECT {} FROM {table} {filter}", select.join(", "))).await;
    r.sort();
    r
}

#[test]
fn scanned_drafts_load_the_sample_as_its_hand_written_transforms_do() {
    let dir = scanned_project();
    let (code, out, err) = crmcube(dir.path(), &["scan", "exports"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("wrote 8 draft(s)"), "{out}");
    // What scan found, against what the hand-written transforms say.
    let customers = std::fs::read_to_string(dir.path().join("transforms/customers.yaml")).unwrap();
    for expected in ["encoding: gbk", "key: [customer_id]", "duplicates: { latest_by: updated_at }", "formats: [\"%Y-%m-%d\", \"%d/%m/%Y\"]", "name: credit_limit, type: decimal"] {
        assert!(customers.contains(expected), "customers.yaml lacks {expected}:\n{customers}");
    }
    let lines = std::fs::read_to_string(dir.path().join("transforms/order_lines.yaml")).unwrap();
    for expected in ["key: [order_id, line_no]", "{ column: order_id, table: orders, key: order_id }", "{ column: product_id, table: products, key: product_id }", "name: quantity, type: integer"] {
        assert!(lines.contains(expected), "order_lines.yaml lacks {expected}:\n{lines}");
    }
    // Scanning again does not overwrite the drafts (they may have been edited).
    let (code, _, err) = crmcube(dir.path(), &["scan", "exports"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("does not overwrite") && err.contains("--force"), "{err}");

    let (code, out, err) = crmcube(dir.path(), &["check"]);
    assert_eq!((code, out.trim()), (Some(0), "ok: 8 transforms, 0 cubes"), "{err}");
    let (code, _, err) = crmcube(dir.path(), &["load"]);
    assert_eq!(code, Some(0), "{err}");

    let scanned_dir = dir.path().to_path_buf();
    block_on(async move {
        let hand = session().await;
        let project = crmcube::project::Project::open(&scanned_dir).unwrap();
        let scanned = crmcube::warehouse::Warehouse::new(project.warehouse).session().await.unwrap();
        for (draft, table) in [
            ("customers", "dim_customer"),
            ("sales_reps", "dim_sales_rep"),
            ("products", "dim_product"),
            ("orders", "orders"),
            ("invoices", "fact_invoice"),
            ("payments", "fact_payment"),
            ("interactions", "fact_interaction"),
            ("order_lines", "order_lines"),
        ] {
            let columns: Vec<String> = hand.table(table).await.unwrap().schema().fields().iter().map(|f| f.name().clone()).collect();
            let expected = rows(&hand, table, &columns, "").await;
            // The one business rule scan cannot guess: a quantity must be at least 1 (the
            // hand-written transform says so; the draft loads those rows).
            let filter = if table == "order_lines" { "WHERE quantity >= 1" } else { "" };
            let got = rows(&scanned, draft, &columns, filter).await;
            assert_eq!(got.len(), expected.len(), "{draft} vs {table}: rows");
            assert!(got == expected, "{draft} differs from {table}");
        }
        // The rows the min rule removes are exactly the generator's negative quantities.
        let negative = sql(&scanned, "SELECT count(*) FROM order_lines WHERE quantity < 1").await;
        assert_eq!(negative, vec![vec![crate::common::dirt().files["order_lines.csv"].dirt["negative_quantity"].to_string()]]);
    });
}

#[test]
fn a_gbk_semicolon_export_with_day_first_dates_is_read_right() {
    let dir = tempfile::Builder::new().prefix("crmcube-scan").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::create_dir_all(dir.path().join("exports")).unwrap();
    std::fs::create_dir_all(dir.path().join("cubes")).unwrap();
    std::fs::write(dir.path().join("crmcube.yaml"), "version: 1\nname: vendors\nsources: exports\n").unwrap();
    let mut text = String::from("VendorID;Vendor Name;Credit Limit;Since;Active\r\n");
    for i in 1..=40 {
        let (thousands, units, day, month, year) = (i * 7, 13 + i % 15, 13 + i % 15, 1 + i % 12, 10 + i % 10);
        let active = if i % 3 == 0 { "no" } else { "yes" };
        text.push_str(&format!("V{i:03};供应商{i};\"￥{thousands},{units:03}.50\";{day:02}.{month:02}.20{year};{active}\r\n"));
    }
    text.push_str("V041;坏的;n/a;01.01.2020;yes\r\n");
    let (bytes, _, _) = encoding_rs::GBK.encode(&text);
    std::fs::write(dir.path().join("exports/Vendor Master.csv"), &bytes).unwrap();

    let (code, out, err) = crmcube(dir.path(), &["scan", "exports/Vendor Master.csv", "--print"]);
    assert_eq!(code, Some(0), "{err}");
    for expected in [
        "table: vendor_master",
        "path: \"Vendor Master.csv\"",
        "encoding: gbk",
        "delimiter: \";\"",
        "key: [vendor_id]",
        "{ name: vendor_id, from: \"VendorID\", type: string, nullable: false }",
        "{ name: credit_limit, from: \"Credit Limit\", type: decimal, nullable: false }   # 1 value(s) do not parse",
        "{ name: since, from: \"Since\", type: date, nullable: false, formats: [\"%d.%m.%Y\"] }",
        "{ name: active, from: \"Active\", type: boolean, nullable: false }",
    ] {
        assert!(out.contains(expected), "the draft lacks {expected}:\n{out}");
    }
    let (code, _, err) = crmcube(dir.path(), &["scan", "exports"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = crmcube(dir.path(), &["load"]);
    assert_eq!(code, Some(0), "{err}");
    // Loaded values against the arithmetic that wrote them.
    let out = crmcube(dir.path(), &["sql", "SELECT count(*) AS n, sum(credit_limit) AS total, min(since) AS first, sum(CASE WHEN active THEN 1 ELSE 0 END) AS active FROM vendor_master", "--format", "csv"]).1;
    let total: f64 = (1..=40).map(|i| (i * 7 * 1000 + (13 + i % 15)) as f64 + 0.5).sum();
    let first = (1..=40).map(|i| format!("20{}-{:02}-{:02}", 10 + i % 10, 1 + i % 12, 13 + i % 15)).min().unwrap();
    let active = (1..=40).filter(|i| i % 3 != 0).count();
    assert_eq!(out.lines().nth(1).unwrap(), format!("40,{total:.2},{first},{active}"), "{out}");
    let quarantine = crmcube(dir.path(), &["sql", "SELECT line, rule, column_name FROM quarantine", "--format", "csv"]).1;
    assert_eq!(quarantine.lines().nth(1), Some("42,type,credit_limit"), "{quarantine}");
}
