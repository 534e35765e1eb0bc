//! `crmcube quality`: quarantined rows by table and rule, checked against the dirt the sample
//! generator wrote (dirt.json) and against rows a test adds to a second night's export.

use std::collections::BTreeMap;
use std::process::Command;

use crmcube::etl::load;

use crate::common::{block_on, cells, dirt, edited_sources, loaded, test_project};

/// Rules of rows the export could not even be read as (the generator calls them all unparseable).
const UNREADABLE: [&str; 6] = ["fields", "quote", "truncated", "unreadable", "json", "type"];

/// (table, rule) → count in the newest snapshot, from the report's count table.
fn newest_counts(q: &crmcube::quality::Quality) -> BTreeMap<(String, String), i64> {
    let rows = cells(std::slice::from_ref(&q.counts));
    let newest = 2 + q.snapshots.len() - 1;
    rows.iter().map(|r| ((r[0].clone(), r[1].clone()), r[newest].replace(',', "").parse().unwrap())).collect()
}

#[test]
fn counts_by_rule_match_the_dirt_the_generator_wrote() {
    let w = loaded().test.warehouse.clone();
    let q = block_on(async move { crmcube::quality::quality(&w, 7, None, 2).await.unwrap() });
    assert_eq!(q.snapshots.len(), 1);
    let counts = newest_counts(&q);
    let dirt = dirt();
    for (table, file) in [("orders", "orders.csv"), ("order_lines", "order_lines.csv"), ("fact_invoice", "invoices.csv"), ("fact_payment", "payments.csv"), ("fact_interaction", "interactions.jsonl"), ("dim_customer", "customers.csv")] {
        let written = &dirt.files[file].dirt;
        let kind = |k: &str| written.get(k).copied().unwrap_or(0) as i64;
        let rule = |r: &str| counts.get(&(table.to_string(), r.to_string())).copied().unwrap_or(0);
        let orphans = kind("orphan_customer") + kind("orphan_product") + kind("orphan_invoice") + kind("orphan_order_cascade") + kind("orphan_invoice_cascade");
        assert_eq!(rule("reference"), orphans, "{table}: reference");
        assert_eq!(rule("min"), kind("negative_quantity"), "{table}: min");
        assert_eq!(UNREADABLE.iter().map(|r| rule(r)).sum::<i64>(), kind("unparseable"), "{table}: unparseable rows");
        assert_eq!(rule("required"), kind("blank_required"), "{table}: required");
    }
    // Every rule of the report is one of the documented words.
    let documented = ["fields", "quote", "truncated", "unreadable", "json", "required", "type", "min", "max", "allowed", "pattern", "duplicate", "reference"];
    assert!(counts.keys().all(|(_, r)| documented.contains(&r.as_str())), "{counts:?}");
    // Samples: at most two per (table, rule), each a real quarantine row of that rule.
    let samples = cells(std::slice::from_ref(&q.samples));
    let mut per: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in &samples {
        *per.entry((s[0].clone(), s[1].clone())).or_default() += 1;
    }
    assert_eq!(per.keys().collect::<Vec<_>>(), counts.keys().collect::<Vec<_>>());
    assert!(per.iter().all(|(k, n)| *n == (counts[k] as usize).min(2)), "{per:?}");
    assert!(samples.iter().filter(|s| s[1] == "min").all(|s| s[4] == "quantity" && s[5].contains("at least 1")), "{samples:?}");
    assert!(samples.iter().filter(|s| s[1] == "reference").all(|s| s[5].contains("not found in")), "{samples:?}");
}

#[test]
fn a_second_night_shows_the_new_failures_as_the_change() {
    let t = test_project();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    // Night 2: payments gain two rows with a bad date and one for an invoice that does not exist.
    let night2 = edited_sources(t.dir.path(), "payments.csv", |text| {
        format!("{text}PAY9000001,INV0000006,31/02/2026x,10.00,card\nPAY9000002,INV0000006,yesterday,11.00,card\nPAY9000003,INV7777777,2026-10-31,12.00,card\n")
    });
    block_on(async move {
        load(&p, &w).await.unwrap();
        load(&crmcube::project::Project { sources: night2, ..p.clone() }, &w).await.unwrap();
    });
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube"))
        .arg("--project")
        .arg(t.dir.path())
        .args(["quality", "--loads", "5", "--table", "fact_payment", "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["snapshots"], serde_json::json!([1, 2]));
    let dirt = &dirt().files["payments.csv"].dirt;
    let orphans = (dirt["orphan_invoice"] + dirt["orphan_invoice_cascade"]) as i64;
    let unparseable = dirt["unparseable"] as i64;
    let counts = doc["counts"].as_array().unwrap();
    let row = |rule: &str| counts.iter().find(|r| r["rule"] == rule).unwrap_or_else(|| panic!("no {rule} row: {counts:?}"));
    assert!(counts.iter().all(|r| r["table_name"] == "fact_payment"), "{counts:?}");
    assert_eq!((row("reference")["#1"].as_i64(), row("reference")["#2"].as_i64(), row("reference")["change"].as_i64()), (Some(orphans), Some(orphans + 1), Some(1)));
    assert_eq!((row("type")["#1"].as_i64(), row("type")["#2"].as_i64(), row("type")["change"].as_i64()), (Some(unparseable), Some(unparseable + 2), Some(2)));
    let samples = doc["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3 * counts.len(), "three samples of each rule: {samples:?}");
    assert!(samples.iter().all(|s| s["table_name"] == "fact_payment"), "{samples:?}");

    // A misspelt table is named with the nearest one; --as is refused (the quarantine is raw rows).
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(t.dir.path()).args(args).output().unwrap();
    let bad = run(&["quality", "--table", "fact_paymnet"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("did you mean 'fact_payment'"), "{}", String::from_utf8_lossy(&bad.stderr));
    let as_user = run(&["--as", "anyone", "quality"]);
    assert_eq!(as_user.status.code(), Some(2), "{}", String::from_utf8_lossy(&as_user.stderr));
}
