//! Crash safety: a load killed with SIGKILL at any fault point leaves the previous snapshot
//! readable and unchanged, and the next load gives exactly what an uninterrupted load gives.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use crmcube::warehouse::{Warehouse, content_checksum};

use crate::common::{block_on, copy_dir, repo};

/// Fault points of night 2's full load (see `crmcube::fault`): 8 sources extracted and cleaned,
/// 12 derived tables and the customer history (dim_channel and dim_date recompute to the same rows
/// for both nights and are kept, unwritten), 2 model tables fitted, 7 rollups built, 31 tables
/// written (24 + the rollups), and both sides of the snapshot manifest.
const FAULT_POINTS: u32 = 8 + 8 + 13 + 2 + 7 + 31 + 2;

fn crmcube(project: &Path, args: &[&str], fault: Option<u32>) -> std::process::Output {
    crmcube_faulting(project, args, fault.map(|n| n.to_string()).as_deref())
}

/// `crmcube` with `CRMCUBE_FAULT_POINT` set to `fault`: a point's number, or `list`.
fn crmcube_faulting(project: &Path, args: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crmcube"));
    cmd.arg("--project").arg(project).args(args);
    if let Some(fault) = fault {
        cmd.env("CRMCUBE_FAULT_POINT", fault);
    }
    cmd.output().unwrap()
}

/// Snapshot id and (rows, checksum) of every table the current snapshot names.
fn state(warehouse: &Path) -> Snapshot {
    let w = Warehouse::new(warehouse);
    block_on(async move {
        let snapshot = w.current().unwrap().expect("a snapshot");
        let ctx = w.session().await.unwrap();
        let mut tables = BTreeMap::new();
        for (name, entry) in &snapshot.tables {
            tables.insert(name.clone(), (entry.rows, content_checksum(&ctx, name).await.unwrap()));
        }
        (snapshot.id, tables)
    })
}

fn project_with_sources(dir: &Path, seed: u64) -> std::path::PathBuf {
    let root = dir.join(format!("night-{seed}"));
    copy_dir(&repo().join("transforms"), &root.join("transforms"));
    copy_dir(&repo().join("cubes"), &root.join("cubes"));
    std::fs::write(root.join("crmcube.yaml"), "version: 1\nname: crash\nsources: exports\n").unwrap();
    let out = crmcube(&root, &["sample", "--customers", "300", "--years", "2", "--seed", &seed.to_string(), "--out", root.join("exports").to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    root
}

/// Loads `night1`, then kills the load of `night2` (same warehouse) at fault point 1, 2, …: after
/// each kill readers see night 1 unchanged, and a rerun equals an uninterrupted night-2 load.
/// With `points`, the load must have exactly that many; without, the points are counted until a
/// load runs through. Returns the number of points.
fn kill_at_every_point(tmp: &Path, night1: &Path, night2: &Path, points: Option<u32>) -> u32 {
    let (before, reference, listed, _) = two_nights(tmp, night1, night2);
    let mut point = 1;
    while killed_at(tmp, night1, night2, point, &before, &reference) {
        point += 1;
        assert!(points.is_none_or(|n| point <= n + 1), "more fault points than {points:?}");
    }
    // Past the load's last fault point: nothing was killed.
    assert!(points.is_none_or(|n| n + 1 == point), "the load has {} fault points, not {points:?}", point - 1);
    assert_eq!(listed.len() as u32, point - 1, "the points listed are the points killed at: {listed:?}");
    point - 1
}

/// Loads `night1`, then `night2` over a copy of its warehouse, uninterrupted: the state after
/// night 1, after night 2 (the reference a killed and rerun night must equal), and night 2's
/// fault points in order (what each marks, see `crmcube::fault`) and its `--json` report.
fn two_nights(tmp: &Path, night1: &Path, night2: &Path) -> (Snapshot, Snapshot, Vec<String>, serde_json::Value) {
    assert!(crmcube(night1, &["load"], None).status.success());
    let before = state(&night1.join("warehouse"));
    let reference = tmp.join("reference");
    copy_dir(&night1.join("warehouse"), &reference.join("warehouse"));
    let out = crmcube_faulting(night2, &["--warehouse", reference.join("warehouse").to_str().unwrap(), "load", "--json"], Some("list"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let points: Vec<String> = String::from_utf8_lossy(&out.stderr).lines().filter_map(|l| l.split_once("fault point ")?.1.split_once(": ").map(|(_, what)| what.to_string())).collect();
    let after = state(&reference.join("warehouse"));
    assert_eq!(after.0, 2);
    assert_ne!(after.1, before.1, "night 2 changes the warehouse");
    (before, after, points, serde_json::from_slice(&out.stdout).unwrap())
}

/// A snapshot's id and its tables' (rows, checksum), as [`state`] reads them.
type Snapshot = (u64, BTreeMap<String, (u64, String)>);

/// Loads `night2` over a copy of night 1's warehouse, killed at fault point `point`: readers
/// still see night 1 (`before`), and a rerun equals an uninterrupted night-2 load (`reference`).
/// False when the load ran through (it has fewer points); it then equals the reference itself.
fn killed_at(tmp: &Path, night1: &Path, night2: &Path, point: u32, before: &Snapshot, reference: &Snapshot) -> bool {
    let warehouse = tmp.join(format!("killed-{point}"));
    copy_dir(&night1.join("warehouse"), &warehouse);
    let wh = warehouse.to_str().unwrap();
    let out = crmcube(night2, &["--warehouse", wh, "load"], Some(point));
    if out.status.success() {
        assert_eq!(&state(&warehouse), reference);
        return false;
    }
    assert_eq!(out.status.signal(), Some(9), "point {point}: the load was killed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(&state(&warehouse), before, "point {point}: readers still see snapshot 1, unchanged");
    let out = crmcube(night2, &["--warehouse", wh, "load"], None);
    assert!(out.status.success(), "point {point}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale load lock"), "point {point}: the dead load's lock is taken over");
    let (id, tables) = state(&warehouse);
    assert_eq!(id, 2, "point {point}");
    assert_eq!(tables, reference.1, "point {point}: the rerun equals an uninterrupted load");
    std::fs::remove_dir_all(&warehouse).unwrap();
    true
}

#[test]
fn a_load_killed_at_any_fault_point_leaves_the_last_good_snapshot() {
    let tmp = tempfile::Builder::new().prefix("crmcube-crash").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // Night 1 is loaded; night 2's exports differ (another seed).
    let night1 = project_with_sources(tmp.path(), 1);
    let night2 = project_with_sources(tmp.path(), 2);
    kill_at_every_point(tmp.path(), &night1, &night2, Some(FAULT_POINTS));
}

/// The same for an incremental night: new files appended to order lines and orders, a customer
/// upserted (and its history versioned). An append must never inherit the rows of a killed
/// load's Delta version that no snapshot names.
#[test]
fn an_incremental_load_killed_at_any_fault_point_leaves_the_last_good_snapshot() {
    let tmp = tempfile::Builder::new().prefix("crmcube-crash-incr").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (night1, night2) = incremental_nights(tmp.path(), true);
    let points = kill_at_every_point(tmp.path(), &night1, &night2, None);
    assert!(points >= 20, "only {points} fault points");
}

/// A night of new orders only, killed at each fault point of the tables it appends to or
/// refreshes by key and by partition (fact_sales, open_order_lines, customer_monthly from its
/// files, customer_totals and customer_lifecycle from customer_monthly's refresh in memory) and
/// of the rollups it appends to: readers keep night 1, and the rerun equals an uninterrupted
/// night. The points are found by name, from a run that lists them.
#[test]
fn a_night_of_new_orders_killed_at_its_refreshes_by_key_leaves_the_last_good_snapshot() {
    let tmp = tempfile::Builder::new().prefix("crmcube-crash-keys").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (night1, night2) = incremental_nights(tmp.path(), false);
    let (before, reference, points, report) = two_nights(tmp.path(), &night1, &night2);
    let tables = ["fact_sales", "open_order_lines", "customer_monthly", "customer_totals", "customer_lifecycle", "rollup_sales_month_region"];
    let chosen: Vec<u32> = (1..).zip(&points).filter(|(_, what)| tables.iter().any(|t| what.ends_with(&format!(" {t}")))).map(|(n, _)| n).collect();
    // A point after each is made and after each is written.
    assert_eq!(chosen.len(), 2 * tables.len(), "{points:?}");
    for point in chosen {
        assert!(killed_at(tmp.path(), &night1, &night2, point, &before, &reference), "point {point} is reached");
    }
    // The night went the ways named above (the uninterrupted run's own report).
    for t in tables {
        let mode = report["tables"].as_array().unwrap().iter().find(|r| r["table"] == t).map(|r| r["mode"].clone());
        assert_eq!(mode, Some("incremental".into()), "{t}: {report}");
    }
}

/// Compaction after two incremental nights (appended tables have two files each), killed at
/// every fault point: readers keep the last snapshot, the rerun compacts, and the compacted
/// snapshot has the same rows in every table.
#[test]
fn a_compaction_killed_at_any_fault_point_leaves_the_last_good_snapshot() {
    let tmp = tempfile::Builder::new().prefix("crmcube-crash-compact").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (night1, night2) = incremental_nights(tmp.path(), true);
    let loaded = night1.join("warehouse");
    assert!(crmcube(&night1, &["load"], None).status.success());
    let out = crmcube(&night2, &["--warehouse", loaded.to_str().unwrap(), "load"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = state(&loaded);
    let compact = ["compact", "--min-files", "2", "--json"];
    let mut point = 1;
    loop {
        let warehouse = tmp.path().join(format!("compact-{point}"));
        copy_dir(&loaded, &warehouse);
        let wh = warehouse.to_str().unwrap();
        let out = crmcube(&night1, &[&["--warehouse", wh][..], &compact[..]].concat(), Some(point));
        if out.status.success() {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let tables = report["tables"].as_array().unwrap();
            assert!(!tables.is_empty(), "{report}");
            assert!(tables.iter().all(|t| t["files_after"].as_u64() < t["files_before"].as_u64() && t["how"] == "optimize"), "{report}");
            assert!(tables.iter().any(|t| t["table"] == "order_lines"), "{report}");
            assert_eq!(point - 1, tables.len() as u32 + 2, "a point after each table and two around the manifest");
            assert_eq!(state(&warehouse), (before.0 + 1, before.1.clone()), "the compacted snapshot has the same rows");
            // Compacting again finds nothing to do.
            let again = crmcube(&night1, &["--warehouse", wh, "compact", "--min-files", "2"], None);
            assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to compact"), "{}", String::from_utf8_lossy(&again.stdout));
            return;
        }
        assert_eq!(out.status.signal(), Some(9), "point {point}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(state(&warehouse), before, "point {point}: readers still see the last snapshot, unchanged");
        let out = crmcube(&night1, &[&["--warehouse", wh][..], &compact[..]].concat(), None);
        assert!(out.status.success(), "point {point}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(state(&warehouse), (before.0 + 1, before.1.clone()), "point {point}: the rerun compacts to the same rows");
        // The next night's load builds on the compacted snapshot.
        let out = crmcube(&night2, &["--warehouse", wh, "load", "--json"], None);
        assert!(out.status.success(), "point {point}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::remove_dir_all(&warehouse).unwrap();
        point += 1;
        assert!(point < 40, "compaction never ran through");
    }
}

/// Night 1: a sample export loaded with customers, orders and order lines incremental. Night 2:
/// the same project and exports plus tonight's files: a new order of two lines, and, when
/// `moved`, the customer moved and the order after every date of the export (else on its last
/// order date, so that no dimension changes: new orders only).
fn incremental_nights(tmp: &Path, moved: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let night1 = project_with_sources(tmp, 1);
    crate::common::nightly_transforms(&night1.join("transforms"), true);
    let night2 = tmp.join("night-2");
    copy_dir(&night1.join("transforms"), &night2.join("transforms"));
    copy_dir(&night1.join("cubes"), &night2.join("cubes"));
    copy_dir(&night1.join("exports"), &night2.join("exports"));
    std::fs::copy(night1.join("crmcube.yaml"), night2.join("crmcube.yaml")).unwrap();
    let exports = night2.join("exports");
    let date = if moved {
        std::fs::write(
            exports.join("customers_2.csv"),
            "customer_id,name,segment,region,province,city,credit_limit,email,signup_date,updated_at\n\
             C000001,Moved,smb,West,Sichuan,Chengdu,1000.00,m@example.com,2023-01-16,2099-01-01 00:00:00\n",
        )
        .unwrap();
        "2099-01-02".to_string()
    } else {
        let orders = std::fs::read_to_string(exports.join("orders.csv")).unwrap();
        let iso = |d: &&str| d.len() == 10 && d.as_bytes()[4] == b'-' && d.as_bytes()[7] == b'-';
        orders.lines().skip(1).filter_map(|l| l.split(',').nth(4)).filter(iso).max().unwrap().to_string()
    };
    std::fs::write(
        exports.join("orders_2.csv"),
        format!("order_id,customer_id,rep_id,channel,order_date,status,updated_at\nO9000001,C000001,R001,online,{date},completed,{date} 10:00:00\n"),
    )
    .unwrap();
    std::fs::write(
        exports.join("order_lines_2.csv"),
        "order_id,line_no,product_id,quantity,unit_price,discount_pct\nO9000001,1,P0001,2,10.00,0\nO9000001,2,P0002,1,5.00,0\n",
    )
    .unwrap();
    (night1, night2)
}


/// A tmpfs of a given size mounted for one test (root only), unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// None (outside CI) when this process may not mount.
    fn mount(at: &Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"]).arg(at).output().unwrap();
        if !out.status.success() {
            assert!(std::env::var_os("CI").is_none(), "CI must be able to mount a tmpfs (root): {}", String::from_utf8_lossy(&out.stderr));
            eprintln!("skipping: cannot mount a tmpfs here: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(SmallDisk(at.to_path_buf()))
    }

    fn resize(&self, bytes: u64) {
        let out = Command::new("mount").args(["-o", &format!("remount,size={bytes}")]).arg(&self.0).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Bytes in use (tmpfs counts whole pages).
    fn used(&self) -> u64 {
        let out = Command::new("df").args(["--output=used", "-B1"]).arg(&self.0).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The disk fills during a load, at many different moments (the free space grows by 96 KiB per
/// try, until the load fits): the load fails with exit 1 naming the cause, readers keep the last
/// snapshot unchanged, and once there is room the next load equals an uninterrupted one.
#[test]
fn a_load_that_fills_the_disk_leaves_the_last_good_snapshot() {
    let tmp = tempfile::Builder::new().prefix("crmcube-diskfull").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let night1 = project_with_sources(tmp.path(), 1);
    let night2 = project_with_sources(tmp.path(), 2);
    assert!(crmcube(&night1, &["load"], None).status.success());
    let before = state(&night1.join("warehouse"));
    let reference = tmp.path().join("reference");
    copy_dir(&night1.join("warehouse"), &reference);
    assert!(crmcube(&night2, &["--warehouse", reference.to_str().unwrap(), "load"], None).status.success());
    let expected = state(&reference);

    let mut failures = 0;
    for attempt in 0.. {
        let at = tmp.path().join(format!("disk-{attempt}"));
        let Some(disk) = SmallDisk::mount(&at, 64 << 20) else { return };
        let warehouse = at.join("warehouse");
        copy_dir(&night1.join("warehouse"), &warehouse);
        disk.resize(disk.used() + (attempt + 1) * (96 << 10));
        let wh = warehouse.to_str().unwrap();
        let out = crmcube(&night2, &["--warehouse", wh, "load"], None);
        if out.status.success() {
            assert_eq!(state(&warehouse), expected);
            break;
        }
        failures += 1;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "attempt {attempt}: a full disk is a failed run: {err}");
        assert!(err.contains("No space left on device"), "attempt {attempt}: the cause is named: {err}");
        assert_eq!(state(&warehouse), before, "attempt {attempt}: readers still see snapshot 1, unchanged");
        assert!(!warehouse.join("LOCK").exists(), "attempt {attempt}: the failed load released its lock");
        disk.resize(64 << 20);
        let out = crmcube(&night2, &["--warehouse", wh, "load"], None);
        assert!(out.status.success(), "attempt {attempt}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(state(&warehouse), expected, "attempt {attempt}: with room again, the load equals an uninterrupted one");
        assert!(attempt < 40, "the load never fit");
    }
    eprintln!("the disk filled during {failures} loads before one fit");
    assert!(failures >= 5, "the disk filled at only {failures} moments");
}

/// `crmcube refresh --all` killed at each of its fault points (one per rollup, two around the
/// manifest): readers keep the last snapshot, and the rerun rebuilds the same rollup rows.
#[test]
fn a_rollup_refresh_killed_at_any_fault_point_leaves_the_last_good_snapshot() {
    let tmp = tempfile::Builder::new().prefix("crmcube-crash-refresh").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let night1 = project_with_sources(tmp.path(), 1);
    assert!(crmcube(&night1, &["load"], None).status.success());
    let loaded = night1.join("warehouse");
    let before = state(&loaded);
    let rollups = before.1.keys().filter(|t| t.starts_with("rollup_")).count() as u32;
    for point in 1..=rollups + 3 {
        let warehouse = tmp.path().join(format!("refresh-{point}"));
        copy_dir(&loaded, &warehouse);
        let wh = warehouse.to_str().unwrap();
        let out = crmcube(&night1, &["--warehouse", wh, "refresh", "--all"], Some(point));
        if point == rollups + 3 {
            assert!(out.status.success(), "the refresh has {} fault points: {}", rollups + 2, String::from_utf8_lossy(&out.stderr));
        } else {
            assert_eq!(out.status.signal(), Some(9), "point {point}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(state(&warehouse), before, "point {point}: readers still see the last snapshot, unchanged");
            let out = crmcube(&night1, &["--warehouse", wh, "refresh", "--all"], None);
            assert!(out.status.success(), "point {point}: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert_eq!(state(&warehouse), (before.0 + 1, before.1.clone()), "point {point}: the rebuilt rollups have the same rows");
        std::fs::remove_dir_all(&warehouse).unwrap();
    }
}
