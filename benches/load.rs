//! Nightly load costs: a full load of an export, then an incremental night adding 1 % new
//! orders, side by side with its peer (the full load) as a ratio. `cargo bench --bench load`.
//!
//! The export is `CRMCUBE_BENCH_EXPORTS=DIR` (e.g. 10 M order lines from
//! `crmcube sample --customers 400000 --years 3 --seed 7 --out DIR`) or a sample generated here
//! (`CRMCUBE_BENCH_CUSTOMERS`, default 20 000). Night 1 is that export without the last 1 % of
//! its orders; night 2 delivers them (and their lines) as new files. Orders and order lines load
//! `incremental`; every other table keeps the repository's transform. Each load runs as its own
//! `crmcube load` process under `/usr/bin/time`, so peak RSS is the load's own;
//! `CRMCUBE_BENCH_MEMORY_LIMIT=MIB` runs them under `--memory-limit`.
//!
//! `CRMCUBE_BENCH_NIGHT=all` makes night 2 a whole day's activity, as a real export brings: also
//! the invoices, payments and service interactions dated on or after the first new order's day
//! (invoices, payments and interactions then load `incremental` too; rows whose day does not
//! read stay in night 1). The receivables, credit and service tables are then recomputed as
//! well; the default night (new orders only) is the kindest case.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Splits `text` (a CSV with a header) into the lines `keep` accepts and the others, both with
/// the header.
fn split(text: &str, mut keep: impl FnMut(&str) -> bool) -> (String, String) {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let (mut a, mut b) = (format!("{header}\n"), format!("{header}\n"));
    for l in lines {
        let to = if keep(l) { &mut a } else { &mut b };
        to.push_str(l);
        to.push('\n');
    }
    (a, b)
}

struct Run {
    seconds: f64,
    peak_mib: Option<f64>,
    report: serde_json::Value,
}

fn load(project: &Path) -> Run {
    let bin = env!("CARGO_BIN_EXE_crmcube");
    let timed = Path::new("/usr/bin/time").exists();
    let mut cmd = if timed {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "peak_rss_kib=%M", bin]);
        c
    } else {
        Command::new(bin)
    };
    cmd.arg("--project").arg(project);
    // `CRMCUBE_BENCH_MEMORY_LIMIT=MIB` runs each load under `--memory-limit`.
    if let Ok(mib) = std::env::var("CRMCUBE_BENCH_MEMORY_LIMIT") {
        cmd.args(["--memory-limit", &mib]);
    }
    cmd.args(["load", "--json"]);
    let started = Instant::now();
    let out = cmd.output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "load failed: {stderr}");
    let peak_mib = stderr.lines().find_map(|l| l.strip_prefix("peak_rss_kib=")).and_then(|v| v.trim().parse::<f64>().ok()).map(|k| k / 1024.0);
    Run { seconds, peak_mib, report: serde_json::from_slice(&out.stdout).unwrap() }
}

fn rows(report: &serde_json::Value, table: &str, field: &str) -> u64 {
    report["tables"].as_array().unwrap().iter().find(|t| t["table"] == table).map(|t| t[field].as_u64().unwrap()).unwrap_or(0)
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let exports = match std::env::var_os("CRMCUBE_BENCH_EXPORTS") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            let customers = std::env::var("CRMCUBE_BENCH_CUSTOMERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
            let out = tmp.path().join("generated");
            let cfg = crmcube::sample::SampleConfig { customers, years: 3, seed: 7 };
            crmcube::sample::generate(&cfg, &out).unwrap();
            out
        }
    };

    // Night 1: everything but the last 1 % of orders (file order is date order) and their lines.
    let project = tmp.path().join("project");
    let sources = project.join("exports");
    copy_dir(&repo.join("transforms"), &project.join("transforms"));
    copy_dir(&repo.join("cubes"), &project.join("cubes"));
    copy_dir(&exports, &sources);
    std::fs::write(project.join("crmcube.yaml"), "version: 1\nname: load-bench\nsources: exports\n").unwrap();
    let whole_night = std::env::var("CRMCUBE_BENCH_NIGHT").is_ok_and(|v| v == "all");
    let mut incremental = vec![("orders.yaml", "orders", "csv"), ("order_lines.yaml", "order_lines", "csv")];
    if whole_night {
        incremental.extend([("fact_invoice.yaml", "invoices", "csv"), ("fact_payment.yaml", "payments", "csv"), ("fact_interaction.yaml", "interactions", "jsonl")]);
    }
    for (file, export, ext) in &incremental {
        let path = project.join("transforms").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("path: {export}.{ext}")), "{file} reads {export}.{ext}");
        let text = text.replace(&format!("path: {export}.{ext}"), &format!("path: '{export}*.{ext}'"));
        std::fs::write(&path, text.replacen("\nsource:\n", "\nload: incremental\nsource:\n", 1)).unwrap();
    }
    let orders = std::fs::read_to_string(sources.join("orders.csv")).unwrap();
    let total = orders.lines().count() - 1;
    let first_new = total - total / 100;
    let mut n = 0;
    let (old_orders, new_orders) = split(&orders, |_| {
        n += 1;
        n <= first_new
    });
    let new_ids: HashSet<&str> = new_orders.lines().skip(1).filter_map(|l| l.split(',').next()).collect();
    let lines = std::fs::read_to_string(sources.join("order_lines.csv")).unwrap();
    let (old_lines, new_lines) = split(&lines, |l| !new_ids.contains(l.split(',').next().unwrap_or("")));
    std::fs::write(sources.join("orders.csv"), &old_orders).unwrap();
    std::fs::write(sources.join("order_lines.csv"), &old_lines).unwrap();
    // A whole night: the other dated exports from the first new order's day on.
    let mut later: Vec<(String, String)> = Vec::new();
    if whole_night {
        // Days as the transforms read them: 2026-10-22, or 22/10/2026 (the other format they
        // accept). A row whose day does not read (the sample's dirt: 'not a date') stays in
        // night 1, where it was quarantined anyway; moved, the whole export's 4,143 such
        // payments would make night 2's reject rate 8 %.
        let day = |d: &str| -> Option<String> {
            let b = d.as_bytes();
            let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
            match b {
                [_, _, _, _, b'-', _, _, b'-', _, _] if digits(0..4) && digits(5..7) && digits(8..10) => Some(d.to_string()),
                [_, _, b'/', _, _, b'/', _, _, _, _] if digits(0..2) && digits(3..5) && digits(6..10) => Some(format!("{}-{}-{}", &d[6..10], &d[3..5], &d[0..2])),
                _ => None,
            }
        };
        let first_day = new_orders.lines().skip(1).filter_map(|l| l.split(',').nth(4).and_then(day)).next().unwrap();
        let tonight = |d: Option<String>| d.is_some_and(|d| d >= first_day);
        for (export, date_field) in [("invoices.csv", 3), ("payments.csv", 2)] {
            let text = std::fs::read_to_string(sources.join(export)).unwrap();
            let (old, new) = split(&text, |l| !tonight(l.split(',').nth(date_field).and_then(day)));
            std::fs::write(sources.join(export), old).unwrap();
            later.push((export.replace(".csv", "_night2.csv"), new));
        }
        // JSON lines, no header: an interaction's day is its queued_at.
        let text = std::fs::read_to_string(sources.join("interactions.jsonl")).unwrap();
        let queued = |l: &str| l.split("\"queued_at\":\"").nth(1).and_then(|r| r.get(..10)).and_then(day);
        let (old, new): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| !tonight(queued(l)));
        std::fs::write(sources.join("interactions.jsonl"), old.join("\n") + "\n").unwrap();
        later.push(("interactions_night2.jsonl".into(), new.join("\n") + "\n"));
    }
    let line_count = lines.lines().count() - 1;
    let new_line_count = new_lines.lines().count() - 1;
    drop((orders, lines));

    let full = load(&project);
    std::fs::write(sources.join("orders_night2.csv"), &new_orders).unwrap();
    std::fs::write(sources.join("order_lines_night2.csv"), &new_lines).unwrap();
    for (name, text) in &later {
        std::fs::write(sources.join(name), text).unwrap();
    }
    let incremental = load(&project);
    let noop = load(&project);

    let read = |r: &serde_json::Value| -> u64 {
        r["tables"].as_array().unwrap().iter().filter(|t| t["kind"] == "source").map(|t| t["read"].as_u64().unwrap()).sum()
    };
    let night1_lines = rows(&full.report, "order_lines", "read");
    println!("export: {line_count} order lines; night 1 {night1_lines}, night 2 adds {new_line_count} ({:.2} %)", 100.0 * new_line_count as f64 / line_count as f64);
    if whole_night {
        let rows = |(name, text): &(String, String)| format!("{name} {}", text.lines().filter(|l| !l.is_empty()).count() - usize::from(!name.ends_with(".jsonl")));
        println!("night 2 is a whole day's activity: also {}", later.iter().map(rows).collect::<Vec<_>>().join(", "));
    }
    let peak = |r: &Run| r.peak_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "n/a".into());
    println!("{:<34} {:>10} {:>14} {:>18} {:>12}", "load", "seconds", "source rows", "order lines/s", "peak RSS");
    for (name, r) in [("full (night 1)", &full), ("incremental (night 2, +1 %)", &incremental), ("same night again (no-op)", &noop)] {
        let lines = rows(&r.report, "order_lines", "read");
        println!(
            "{name:<34} {:>10.2} {:>14} {:>18.0} {:>12}",
            r.seconds,
            read(&r.report),
            lines as f64 / r.seconds,
            peak(r)
        );
    }
    println!("incremental / full time: {:.3} (target ≤ 0.05)", incremental.seconds / full.seconds);
    println!("full load: {:.0} order lines/s (target ≥ 1,000,000)", night1_lines as f64 / full.seconds);
    // Rollups: the incremental night refreshes by partition (crate::rollup::partitions).
    let rollups = |r: &serde_json::Value| -> (u64, Vec<String>) {
        let mut ms = 0;
        let mut modes = Vec::new();
        for t in r["tables"].as_array().unwrap().iter().filter(|t| t["kind"] == "rollup") {
            ms += t["millis"].as_u64().unwrap();
            let parts = t["partitions"].as_array().map(|p| p.len()).unwrap_or(0);
            let name = t["table"].as_str().unwrap().trim_start_matches("rollup_");
            let parts = if parts > 0 { format!(", {parts} partition(s)") } else { String::new() };
            modes.push(format!("{name} {} ms ({}{parts})", t["millis"], t["mode"].as_str().unwrap()));
        }
        (ms, modes)
    };
    let ((full_ms, full_modes), (incr_ms, incr_modes)) = (rollups(&full.report), rollups(&incremental.report));
    println!("rollups: full build {full_ms} ms, incremental refresh {incr_ms} ms, ratio {:.3} (target ≤ 0.05)", incr_ms as f64 / full_ms.max(1) as f64);
    println!("  full night:        {}", full_modes.join("; "));
    println!("  incremental night: {}", incr_modes.join("; "));
    for (night, r) in [("full load", &full), ("incremental night", &incremental)] {
        let mut slowest: Vec<(u64, String, String)> = r.report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["millis"].as_u64().unwrap(), t["table"].as_str().unwrap().to_string(), t["mode"].as_str().unwrap().to_string()))
            .collect();
        slowest.sort_by(|a, b| b.cmp(a));
        println!("{night}, slowest tables (ms, excluding extraction and writes):");
        for (ms, table, mode) in slowest.iter().take(8) {
            println!("  {ms:>8} {table} ({mode})");
        }
    }
    assert!(noop.report["unchanged"].as_bool().unwrap(), "re-running night 2 is a no-op");
}
