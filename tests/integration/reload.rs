//! Re-running loads, failed loads, and reading the warehouse with another engine.

use std::collections::BTreeMap;
use std::process::Command;

use crmcube::ErrorKind;
use crmcube::etl::load;
use crmcube::warehouse::content_checksum;

use crate::common::{block_on, loaded, test_project};

async fn checksums(w: &crmcube::warehouse::Warehouse) -> BTreeMap<String, (u64, String)> {
    let ctx = w.session().await.unwrap();
    let snapshot = w.current().unwrap().unwrap();
    let mut out = BTreeMap::new();
    for (name, entry) in &snapshot.tables {
        out.insert(name.clone(), (entry.rows, content_checksum(&ctx, name).await.unwrap()));
    }
    out
}

/// Re-running a night's load is a no-op; loading the same exports into an empty warehouse gives
/// the same tables, row for row.
#[test]
fn loading_the_same_exports_twice_is_a_no_op_and_a_fresh_load_is_identical() {
    let t = test_project();
    let other = test_project();
    let (p, w, w2) = (t.project.clone(), t.warehouse.clone(), other.warehouse.clone());
    block_on(async move {
        let first = load(&p, &w).await.unwrap();
        let before = checksums(&w).await;
        let second = load(&p, &w).await.unwrap();
        assert_eq!((first.snapshot, second.snapshot), (1, 1), "no second snapshot");
        assert!(!first.unchanged && second.unchanged);
        assert_eq!(w.snapshots().unwrap().len(), 1);
        assert!(second.tables.iter().all(|t| t.mode == "unchanged" && t.read == 0), "{:?}", second.tables);
        assert_eq!(before, checksums(&w).await);
        assert_eq!(before.len(), 34, "twenty-three tables, a history, the quarantine, two model tables and seven rollups");

        let fresh = load(&p, &w2).await.unwrap();
        assert_eq!(before, checksums(&w2).await, "row counts and content checksums of every table");
        let counts = |r: &crmcube::etl::LoadReport| {
            r.tables.iter().map(|t| (t.table.clone(), t.read, t.loaded, t.quarantined, t.duplicates)).collect::<Vec<_>>()
        };
        assert_eq!(counts(&first), counts(&fresh), "per-table read/loaded/quarantined/duplicates");
    });
}

#[test]
fn a_load_over_its_reject_threshold_commits_nothing_and_exits_3() {
    let t = test_project();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    let before = block_on(async move {
        load(&p, &w).await.unwrap();
        checksums(&w).await
    });
    // Tighten one threshold below the sample's dirt rate: the next load must fail whole.
    let spec = t.project.transforms.join("order_lines.yaml");
    let text = std::fs::read_to_string(&spec).unwrap().replace("reject_threshold: 0.03", "reject_threshold: 0.001");
    std::fs::write(&spec, text).unwrap();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    let err = block_on(async move { load(&p, &w).await.unwrap_err() });
    assert_eq!(err.kind(), ErrorKind::Data);
    let msg = err.to_string();
    assert!(msg.contains("table 'order_lines'") && msg.contains("reject threshold") && msg.contains("order_lines.yaml"), "{msg}");

    let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(t.dir.path()).arg("load").output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));

    let w = t.warehouse.clone();
    let after = block_on(async move {
        assert_eq!(w.current().unwrap().unwrap().id, 1, "CURRENT still names the first snapshot");
        checksums(&w).await
    });
    assert_eq!(before, after, "readers see the previous snapshot unchanged");
}

#[test]
fn duckdb_reads_warehouse_tables_with_the_same_row_counts() {
    let Some(python) = crate::common::python() else { return };
    let l = loaded();
    let snapshot = l.test.warehouse.current().unwrap().unwrap();
    for table in ["fact_sales", "dim_customer", "quarantine"] {
        let entry = &snapshot.tables[table];
        let out = Command::new(&python)
            .arg(crate::common::repo().join("tests/duckdb_count.py"))
            .arg(l.test.warehouse.table_path(table))
            .arg(entry.version.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let count: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(count, entry.rows, "{table}: DuckDB count vs snapshot");
        assert_eq!(count, l.report.table(table).map(|t| t.loaded).unwrap_or(count));
    }
}

#[test]
fn a_live_lock_refuses_a_second_load_and_a_stale_one_is_taken_over() {
    let t = test_project();
    std::fs::create_dir_all(&t.project.warehouse).unwrap();
    let lock = t.project.warehouse.join("LOCK");
    // A running process holds the lock: the load stops with exit code 4 and writes nothing.
    let mut holder = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(&lock, holder.id().to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(t.dir.path()).arg("load").output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another load is running"));
    assert!(!t.project.warehouse.join("CURRENT").exists());
    // Its process dies without releasing the lock (SIGKILL): the next load takes it over.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(t.dir.path()).arg("load").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("taking over the stale load lock"));
    assert!(!lock.exists(), "a finished load releases the lock");
}

#[test]
fn history_lists_snapshots_and_as_of_reads_an_older_one() {
    let t = test_project();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    block_on(async move {
        load(&p, &w).await.unwrap();
    });
    // The second night drops one export row: the second snapshot has fewer order lines.
    let sources = t.dir.path().join("exports");
    crate::common::copy_dir(&crate::common::repo().join("sample-data"), &sources);
    let lines = std::fs::read_to_string(sources.join("order_lines.csv")).unwrap();
    let kept: Vec<&str> = lines.lines().take(1001).collect();
    std::fs::write(sources.join("order_lines.csv"), kept.join("\n") + "\n").unwrap();
    let crmcube = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(t.dir.path()).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    crmcube(&["load", "--source", sources.to_str().unwrap()]);
    let history = crmcube(&["history"]);
    assert_eq!(history.lines().count(), 3, "{history}");
    let count = |as_of: Option<&str>| {
        let mut args = vec!["sql", "SELECT count(*) AS n FROM order_lines", "--format", "csv"];
        if let Some(a) = as_of {
            args.extend(["--as-of", a]);
        }
        crmcube(&args).lines().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let (first, second) = (count(Some("1")), count(None));
    assert!(first > 60_000, "{first}");
    assert!(second <= 1000, "{second}");
    assert_eq!(count(Some("2")), second);
    // A snapshot that does not exist is named, with the current one.
    let out = Command::new(env!("CARGO_BIN_EXE_crmcube")).arg("--project").arg(t.dir.path()).args(["sql", "SELECT 1", "--as-of", "9"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("snapshot 9 was never committed; the current snapshot is 2"), "{stderr}");
}

#[test]
fn vacuum_deletes_old_snapshots_files_but_keeps_retained_snapshots_readable() {
    let t = test_project();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    let parquet_files = |w: &crmcube::warehouse::Warehouse| {
        std::fs::read_dir(w.table_path("order_lines")).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "parquet")).count()
    };
    // Three nights whose order lines differ (a trailing blank line), so each commits a snapshot
    // and rewrites order_lines (the derived tables compute the same rows; small ones are kept).
    let edited = crate::common::edited_sources(t.dir.path(), "order_lines.csv", |text| format!("{text}\n"));
    let next_night = edited.clone();
    let (files_before, second_before) = block_on(async move {
        for sources in [p.sources.clone(), edited, p.sources.clone()] {
            let night = crmcube::project::Project { sources, ..p.clone() };
            load(&night, &w).await.unwrap();
        }
        let ctx = w.session_at(Some(2)).await.unwrap();
        (parquet_files(&w), content_checksum(&ctx, "order_lines").await.unwrap())
    });
    let w = t.warehouse.clone();
    let (report, files_after, second_after, first_gone, current) = block_on(async move {
        let report = w.vacuum(2).await.unwrap();
        let ctx = w.session_at(Some(2)).await.unwrap();
        let second = content_checksum(&ctx, "order_lines").await.unwrap();
        let first_gone = w.session_at(Some(1)).await.is_err();
        (report, parquet_files(&w), second, first_gone, w.current().unwrap().unwrap().id)
    });
    assert_eq!((report.snapshots_removed, report.snapshots_kept), (1, 2));
    assert!(report.files_deleted > 0 && files_after < files_before, "{files_before} → {files_after}");
    assert_eq!(second_after, second_before, "a retained snapshot reads the same rows after vacuum");
    assert!(first_gone, "a vacuumed snapshot is no longer readable");
    assert_eq!(current, 3);
    let (p, w) = (crmcube::project::Project { sources: next_night, ..t.project.clone() }, t.warehouse.clone());
    let next = block_on(async move { load(&p, &w).await.unwrap().snapshot });
    assert_eq!(next, 4, "loads go on after a vacuum");
}

/// A full-refresh table is not wiped by an export that arrives empty, unless the run says so.
#[test]
fn an_empty_export_does_not_wipe_its_table_without_allow_empty() {
    let t = test_project();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    let before = block_on(async move {
        load(&p, &w).await.unwrap();
        checksums(&w).await
    });
    // Tonight's export: every file as before, but the service contacts arrived empty.
    let exports = t.dir.path().join("tonight");
    crate::common::copy_dir(&t.project.sources, &exports);
    std::fs::write(exports.join("interactions.jsonl"), "").unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_crmcube"))
            .arg("--project")
            .arg(t.dir.path())
            .args(["load", "--source"])
            .arg(&exports)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let had = before["fact_interaction"].0;
    assert!(had > 0);
    assert!(
        stderr.contains("table 'fact_interaction'") && stderr.contains(&format!("holds {had}")) && stderr.contains("--allow-empty fact_interaction"),
        "{stderr}"
    );
    let w = t.warehouse.clone();
    let after = block_on(async move {
        assert_eq!(w.current().unwrap().unwrap().id, 1, "nothing committed");
        checksums(&w).await
    });
    assert_eq!(before, after);

    let out = run(&["--allow-empty", "fact_interactoin"]);
    assert_eq!(out.status.code(), Some(2), "a misspelt table is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean 'fact_interaction'"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = run(&["--allow-empty", "fact_interaction"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let w = t.warehouse.clone();
    let after = block_on(async move { checksums(&w).await });
    assert_eq!(after["fact_interaction"].0, 0, "emptied on request");
    assert_eq!(after["fact_sales"], before["fact_sales"], "other tables unchanged");
}

/// Every snapshot records the export files it read; a file rewritten after it was loaded is
/// reported (and the load goes on: a full export is allowed to change).
#[test]
fn the_snapshot_records_its_files_and_a_changed_export_is_reported() {
    let t = test_project();
    let (p, w) = (t.project.clone(), t.warehouse.clone());
    let first = block_on(async move { load(&p, &w).await.unwrap() });
    assert_eq!(first.files.since, None);
    assert_eq!(first.files.new.len(), first.files.read, "everything is new to an empty warehouse");
    let snapshot = t.warehouse.current().unwrap().unwrap();
    let reps = &snapshot.files["sales_reps.csv"];
    let bytes = std::fs::read(t.project.sources.join("sales_reps.csv")).unwrap();
    assert_eq!(reps.bytes, bytes.len() as u64);
    assert_eq!(reps.sha256.len(), 64);

    // Tonight: the same exports, but one rep's name corrected in place.
    let exports = t.dir.path().join("tonight");
    crate::common::copy_dir(&t.project.sources, &exports);
    let text = String::from_utf8(bytes).unwrap();
    let name = text.lines().nth(1).unwrap().split(',').nth(1).unwrap().to_string();
    std::fs::write(exports.join("sales_reps.csv"), text.replacen(&name, &format!("{name} Jr"), 1)).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_crmcube"))
            .arg("--project")
            .arg(t.dir.path())
            .args(["load", "--json", "--source"])
            .arg(&exports)
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"]["changed"], serde_json::json!(["sales_reps.csv"]), "{}", report["files"]);
    assert_eq!(report["files"]["new"], serde_json::json!([]));
    assert_eq!(report["files"]["gone"], serde_json::json!([]));
    assert_eq!(report["files"]["since"], serde_json::json!(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("export file changed"), "a warning on stderr");
    // The same night again: nothing changed since the snapshot just written.
    let report: serde_json::Value = serde_json::from_slice(&run().stdout).unwrap();
    assert_eq!(report["files"]["changed"], serde_json::json!([]));
    assert_eq!(report["files"]["since"], serde_json::json!(2));
}

/// An export left alone since before a load is recorded with its stamp, and the next load
/// trusts its checksum without reading it; rewritten in place with as many bytes and its
/// modification time set back (as `cp -p` would), it is read again and reported.
#[cfg(unix)]
#[test]
fn a_settled_export_is_trusted_by_its_stamp_until_it_is_rewritten() {
    let t = test_project();
    // A copy of the exports: this test rewrites one.
    let exports = t.dir.path().join("exports");
    crate::common::copy_dir(&t.project.sources, &exports);
    let project = crmcube::project::Project { sources: exports.clone(), ..t.project.clone() };
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let loaded = || {
        let (p, w) = (project.clone(), t.warehouse.clone());
        block_on(async move { load(&p, &w).await.unwrap() })
    };
    loaded();
    let snapshot = t.warehouse.current().unwrap().unwrap();
    assert!(snapshot.files.values().all(|f| f.stamp.is_some()), "every export had settled: {:?}", snapshot.files);

    let again = loaded();
    assert!(again.unchanged, "nothing new: no snapshot");

    let path = exports.join("sales_reps.csv");
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let name = text.lines().nth(1).unwrap().split(',').nth(1).unwrap().to_string();
    let renamed: String = name.chars().rev().collect();
    assert_ne!(renamed, name);
    std::fs::write(&path, text.replacen(&name, &renamed, 1)).unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), text.len() as u64);

    let rewritten = loaded();
    assert!(!rewritten.unchanged);
    assert_eq!(rewritten.files.changed, ["sales_reps.csv"]);
    let snapshot = t.warehouse.current().unwrap().unwrap();
    assert_eq!(snapshot.files["sales_reps.csv"].sha256, crmcube::warehouse::SourceFile::of("x".into(), std::fs::read(&path).unwrap().as_slice()).sha256);
}

/// An export rewritten while the load reads it (a CRM job still writing it): the load stops
/// with the file named, nothing is committed, and the next load — the file complete — commits.
/// The load is a real `crmcube load` process held after its survey (`CRMCUBE_PAUSE_AT`) while
/// the test appends to the export.
#[test]
fn a_file_that_changes_while_the_load_reads_it_stops_the_load() {
    let t = test_project();
    let sources = crate::common::edited_sources(t.dir.path(), "orders.csv", |text| text.to_string());
    std::fs::write(t.dir.path().join("crmcube.yaml"), format!("version: 1\nname: test\nsources: {}\n", sources.display())).unwrap();
    let project = crmcube::project::Project::open(t.dir.path()).unwrap();
    let (p, w) = (project.clone(), t.warehouse.clone());
    block_on(async move { load(&p, &w).await.unwrap() });
    let pause = t.dir.path().join("paused");
    let child = Command::new(env!("CARGO_BIN_EXE_crmcube"))
        .arg("--project")
        .arg(t.dir.path())
        .arg("load")
        .env("CRMCUBE_PAUSE_AT", "surveyed")
        .env("CRMCUBE_PAUSE_FILE", &pause)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let waited = std::time::Instant::now();
    while !pause.exists() {
        assert!(waited.elapsed().as_secs() < 120, "the load never reached its survey");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The CRM appends an order while the load is between its survey and its read.
    let orders = sources.join("orders.csv");
    let mut text = std::fs::read_to_string(&orders).unwrap();
    text.push_str("O9000001,C000001,R001,online,2026-10-30,completed,2026-10-30 10:00:00\n");
    std::fs::write(&orders, text).unwrap();
    std::fs::remove_file(&pause).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("orders.csv") && stderr.contains("changed while this load read it"), "{stderr}");
    assert_eq!(t.warehouse.current().unwrap().unwrap().id, 1, "nothing committed");
    // The export is complete now: the next load takes it, new order included.
    let (p, w) = (project.clone(), t.warehouse.clone());
    let report = block_on(async move { load(&p, &w).await.unwrap() });
    assert_eq!(report.snapshot, 2);
    let (p, w) = (project, t.warehouse.clone());
    let found = block_on(async move {
        let ctx = w.session().await.unwrap();
        crate::common::sql(&ctx, "SELECT count(*) FROM orders WHERE order_id = 'O9000001'").await
    });
    drop(p);
    assert_eq!(found, [["1"]]);
}
