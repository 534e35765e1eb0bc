//! What a person sees: table output and error messages of the command line, as insta snapshots.
//! (The numbers in them are checked against independent computations in the other modules;
//! these snapshots pin the layout and the wording.)

use std::process::Command;

use crate::common::loaded;

fn crmcube(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(loaded().test.dir.path()).args(args).output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn table_output_aligns_columns_and_groups_thousands() {
    let (code, out, _) = crmcube(&["query", "sales", "-m", "revenue,margin_pct,orders", "-b", "customer.region", "-w", "time.year=2025", "--order", "revenue:desc"]);
    assert_eq!(code, Some(0));
    insta::assert_snapshot!(out);
}

#[test]
fn trend_output_shows_previous_period_and_change() {
    let (code, out, _) = crmcube(&["query", "sales", "-m", "revenue", "--trend", "time.quarter", "--last", "4"]);
    assert_eq!(code, Some(0));
    insta::assert_snapshot!(out);
}

#[test]
fn labels_with_chinese_names_stay_aligned() {
    let (code, out, _) = crmcube(&["query", "sales", "-m", "revenue", "-b", "customer.customer", "--order", "revenue:desc", "--limit", "3", "--others"]);
    assert_eq!(code, Some(0));
    insta::assert_snapshot!(out);
}

#[test]
fn unknown_measure_error_lists_valid_names_and_exits_2() {
    let (code, out, err) = crmcube(&["query", "sales", "-m", "revenu"]);
    assert_eq!(code, Some(2));
    assert!(out.is_empty());
    insta::assert_snapshot!(err);
}

#[test]
fn unknown_level_and_bad_value_errors() {
    let (code, _, err) = crmcube(&["query", "sales", "-m", "revenue", "-b", "customer.regoin"]);
    assert_eq!(code, Some(2));
    insta::assert_snapshot!("unknown_level", err);
    let (code, _, err) = crmcube(&["query", "sales", "-m", "revenue", "-w", "time.year=twenty"]);
    assert_eq!(code, Some(2));
    insta::assert_snapshot!("bad_filter_value", err);
    let (code, _, err) = crmcube(&["query", "sale", "-m", "revenue"]);
    assert_eq!(code, Some(2));
    insta::assert_snapshot!("unknown_cube", err);
}

#[test]
fn a_query_over_the_memory_limit_fails_with_a_hint_not_a_kill() {
    let join = "SELECT a.customer_id, count(*) FROM fact_sales a JOIN fact_sales b ON a.customer_id = b.customer_id GROUP BY 1";
    let (code, _, err) = crmcube(&["--memory-limit", "1", "sql", join]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Resources exhausted") && err.contains("raise --memory-limit"), "{err}");
    // Within a limit the work fits in, the command answers.
    let (code, out, err) = crmcube(&["--memory-limit", "64", "sql", "SELECT count(*) FROM dim_customer", "--format", "csv"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().count() == 2, "{out}");
}

/// `crmcube --memory-limit MIB load` in a fresh project: the exit code and stderr (with the
/// debug log).
fn load_under(t: &crate::common::TestProject, mib: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube"))
        .env("CRMCUBE_LOG", "debug")
        .arg("--project")
        .arg(t.dir.path())
        .args(["--memory-limit", mib, "load"])
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_nothing_committed(t: &crate::common::TestProject) {
    assert!(t.warehouse.current().unwrap().is_none(), "nothing was committed");
    assert!(!t.warehouse.root().join("LOCK").exists(), "the lock is released");
}

#[test]
fn a_load_over_the_memory_limit_fails_with_a_hint_and_commits_nothing() {
    let t = crate::common::test_project();
    let (code, err) = load_under(&t, "4");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Resources exhausted") && err.contains("a load needs room to hold its largest exports' text"), "{err}");
    assert_nothing_committed(&t);
}

#[test]
fn a_load_counts_the_exports_it_reads_against_the_memory_limit_and_reads_its_tables_back_when_they_do_not_fit() {
    // The sample's exports are 12 MB. The text read from them and each cleaning step's rows live
    // outside any DataFusion operator; under 12 MiB one of those reservations is refused (which
    // one depends on the order of the work).
    let t = crate::common::test_project();
    let (code, err) = load_under(&t, "12");
    assert_eq!(code, Some(1), "{err}");
    let ours = ["extracting table '", "cleaning table '"];
    assert!(ours.iter().any(|o| err.contains(o)) && err.contains("MiB") && err.contains("Resources exhausted"), "{err}");
    assert!(err.contains("raise --memory-limit"), "{err}");
    assert_nothing_committed(&t);

    // Within a limit the load fits in, it commits the same tables, row for row, as a load
    // without a limit. Under 64 MiB the tables kept in memory for the later ones reach a quarter
    // of it: the later tables read some of them from the files just written.
    let (code, err) = load_under(&t, "64");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("read from its files from here on"), "no table was read back from its files under 64 MiB: {err}");
    let bounded = t.warehouse.current().unwrap().expect("a snapshot");
    let unbounded = loaded().test.warehouse.current().unwrap().expect("a snapshot");
    let rows = |s: &crmcube::warehouse::Snapshot| s.tables.iter().map(|(n, e)| (n.clone(), e.rows)).collect::<Vec<_>>();
    assert_eq!(rows(&bounded), rows(&unbounded));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = runtime.block_on(async { (t.warehouse.session().await.unwrap(), loaded().test.warehouse.session().await.unwrap()) });
    for table in bounded.tables.keys() {
        let (x, y) = runtime.block_on(async {
            (crmcube::warehouse::content_checksum(&a, table).await.unwrap(), crmcube::warehouse::content_checksum(&b, table).await.unwrap())
        });
        assert_eq!(x, y, "table {table} differs from the unbounded load's");
    }
}
