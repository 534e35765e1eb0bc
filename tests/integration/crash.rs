//! Crash safety: a load killed with SIGKILL at any fault point leaves the previous snapshot
//! readable and unchanged, and the next load gives exactly what an uninterrupted load gives.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use crmcube::warehouse::{Warehouse, content_checksum};

use crate::common::{block_on, copy_dir, repo};

/// Fault points of one load (see `crmcube::fault`): 8 sources extracted and cleaned, 8 derived
/// tables, 2 model tables fitted, 6 rollups built, 25 tables written (19 + the rollups), and both
/// sides of the snapshot manifest.
const FAULT_POINTS: u32 = 8 + 8 + 8 + 2 + 6 + 25 + 2;

fn crmcube(project: &Path, args: &[&str], fault: Option<u32>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crmcube"));
    cmd.arg("--project").arg(project).args(args);
    if let Some(n) = fault {
        cmd.env("CRMCUBE_FAULT_POINT", n.to_string());
    }
    cmd.output().unwrap()
}

/// Snapshot id and (rows, checksum) of every table the current snapshot names.
fn state(warehouse: &Path) -> (u64, BTreeMap<String, (u64, String)>) {
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

#[test]
fn a_load_killed_at_any_fault_point_leaves_the_last_good_snapshot() {
    let tmp = tempfile::Builder::new().prefix("crmcube-crash").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // Night 1 is loaded; night 2's exports differ (another seed).
    let night1 = project_with_sources(tmp.path(), 1);
    let night2 = project_with_sources(tmp.path(), 2);
    assert!(crmcube(&night1, &["load"], None).status.success());
    let before = state(&night1.join("warehouse"));
    // What an uninterrupted second night produces.
    let reference = tmp.path().join("reference");
    copy_dir_all(&night1.join("warehouse"), &reference.join("warehouse"));
    let out = crmcube(&night2, &["--warehouse", reference.join("warehouse").to_str().unwrap(), "load"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (reference_id, reference_tables) = state(&reference.join("warehouse"));
    assert_eq!(reference_id, 2);
    assert_ne!(reference_tables, before.1, "night 2 changes the warehouse");

    assert!(FAULT_POINTS >= 20);
    for point in 1..=FAULT_POINTS {
        let warehouse = tmp.path().join(format!("killed-{point}"));
        copy_dir_all(&night1.join("warehouse"), &warehouse);
        let wh = warehouse.to_str().unwrap();
        let out = crmcube(&night2, &["--warehouse", wh, "load"], Some(point));
        assert_eq!(out.status.signal(), Some(9), "point {point}: the load was killed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(state(&warehouse), before, "point {point}: readers still see snapshot 1, unchanged");
        let out = crmcube(&night2, &["--warehouse", wh, "load"], None);
        assert!(out.status.success(), "point {point}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("stale load lock"), "point {point}: the dead load's lock is taken over");
        let (id, tables) = state(&warehouse);
        assert_eq!(id, 2, "point {point}");
        assert_eq!(tables, reference_tables, "point {point}: the rerun equals an uninterrupted load");
        std::fs::remove_dir_all(&warehouse).unwrap();
    }
    // Killed past its last fault point there is nothing left to test: one more point is a no-op.
    let out = crmcube(&night2, &["--warehouse", reference.join("warehouse").to_str().unwrap(), "load"], Some(FAULT_POINTS + 1));
    assert!(out.status.success(), "a load has exactly {FAULT_POINTS} fault points");
}

fn copy_dir_all(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir_all(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
