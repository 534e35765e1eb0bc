//! The bad-input corpus, tests/badinput/cases.yaml: each case breaks one or more files of a small
//! generated project (an export, a transform, a cube) and states what must happen. Every case
//! also holds to the rules of issue 8: the load never panics; when it succeeds, every source
//! table accounts for every record it read (read = loaded + quarantined + duplicates + skipped)
//! and the bad rows are in the quarantine with their reason and line; when it fails, the error
//! names what it must and the warehouse still opens at the snapshot it had, untouched.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crmcube::project::Project;
use crmcube::warehouse::Warehouse;
use serde::Deserialize;

use crate::common::{block_on, cells, copy_dir, repo, sql};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    edits: Vec<FileEdit>,
    expect: Expect,
}

/// One change to one file of the project (`exports/…`, `transforms/…`, `cubes/…`); exactly one
/// of the edit keys is given.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEdit {
    file: String,
    /// Text added at the end (a line: end it with \n).
    append: Option<String>,
    /// Replace the first occurrence of `[from, to]` (`all: true`: every one).
    replace: Option<[String; 2]>,
    #[serde(default)]
    all: bool,
    /// The whole file's new text.
    write: Option<String>,
    /// Raw bytes added at the end.
    append_bytes: Option<Vec<u8>>,
    /// Raw bytes put at the start.
    prepend_bytes: Option<Vec<u8>>,
    /// Keep only the first N bytes.
    truncate: Option<usize>,
    /// Every "\n" becomes "\r\n".
    crlf: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// The load commits, and the quarantine holds rows of this table with this reason.
    quarantine: Option<Quarantined>,
    /// The load commits and this table's rows changed by `change` from the baseline.
    rows: Option<Rows>,
    /// The load fails; its message contains every fragment.
    error: Option<Vec<String>>,
    /// … and none of these (no noise after the real error).
    #[serde(default)]
    not: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Quarantined {
    table: String,
    /// Part of the reason.
    reason: String,
    /// The line of the rejected record: a number, or `last` (the file's last line).
    line: Option<serde_json::Value>,
    /// Rows of this table quarantined beyond the baseline's (default: not counted; the row with
    /// the reason must be there).
    count: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rows {
    table: String,
    change: i64,
}

/// A small generated project loaded once: the template every case copies.
struct Baseline {
    dir: tempfile::TempDir,
    rows: std::collections::BTreeMap<String, u64>,
    quarantined: std::collections::BTreeMap<String, u64>,
}

fn baseline() -> &'static Baseline {
    static B: OnceLock<Baseline> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("crmcube-badinput").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        crmcube::sample::generate(&crmcube::sample::SampleConfig { customers: 60, years: 1, seed: 5 }, &dir.path().join("exports")).unwrap();
        copy_dir(&repo().join("transforms"), &dir.path().join("transforms"));
        copy_dir(&repo().join("cubes"), &dir.path().join("cubes"));
        // Small files: one bad row must not cross a table's reject threshold.
        for entry in std::fs::read_dir(dir.path().join("transforms")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, text.replace("reject_threshold: 0.02", "reject_threshold: 0.5")).unwrap();
        }
        std::fs::write(dir.path().join("crmcube.yaml"), "version: 1\nname: bad-input\nsources: exports\n").unwrap();
        let project = Project::open(dir.path()).unwrap();
        let warehouse = Warehouse::new(project.warehouse.clone());
        let report = block_on(async move { crmcube::etl::load(&project, &warehouse).await.unwrap() });
        let rows = report.tables.iter().map(|t| (t.table.clone(), t.rows)).collect();
        let quarantined = report.tables.iter().map(|t| (t.table.clone(), t.quarantined)).collect();
        Baseline { dir, rows, quarantined }
    })
}

fn apply(root: &Path, e: &FileEdit) -> PathBuf {
    let path = root.join(&e.file);
    let mut bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", e.file));
    if let Some(text) = &e.append {
        bytes.extend_from_slice(expand(text).as_bytes());
    }
    if let Some([from, to]) = &e.replace {
        let text = String::from_utf8(bytes).unwrap_or_else(|_| panic!("{}: replace needs a UTF-8 file", e.file));
        assert!(text.contains(from.as_str()), "{}: '{from}' is not in the file", e.file);
        bytes = if e.all { text.replace(from.as_str(), to) } else { text.replacen(from.as_str(), to, 1) }.into_bytes();
    }
    if let Some(text) = &e.write {
        bytes = text.clone().into_bytes();
    }
    if let Some(extra) = &e.append_bytes {
        bytes.extend_from_slice(extra);
    }
    if let Some(start) = &e.prepend_bytes {
        bytes.splice(0..0, start.iter().copied());
    }
    if let Some(n) = e.truncate {
        bytes.truncate(n);
    }
    if e.crlf == Some(true) {
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 20);
        for b in bytes {
            if b == b'\n' {
                out.push(b'\r');
            }
            out.push(b);
        }
        bytes = out;
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `{xN}` in a case's text stands for N × 'x' (a long field without a long YAML file).
fn expand(text: &str) -> String {
    let re = regex::Regex::new(r"\{x([0-9]+)\}").unwrap();
    re.replace_all(text, |c: &regex::Captures| "x".repeat(c[1].parse().unwrap())).into_owned()
}

/// Runs one case in a copy of the baseline; returns what went wrong, if anything.
fn run_case(case: &Case) -> Result<(), String> {
    let base = baseline();
    let dir = tempfile::Builder::new().prefix("crmcube-case").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    copy_dir(base.dir.path(), dir.path());
    let mut last_lines = std::collections::BTreeMap::new();
    for e in &case.edits {
        let path = apply(dir.path(), e);
        let text = std::fs::read(&path).unwrap();
        let lines = text.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
        last_lines.insert(e.file.clone(), lines as i64);
    }
    let root = dir.path().to_path_buf();
    let outcome = std::panic::catch_unwind(|| {
        block_on(async move {
            let project = Project::open(&root)?;
            let warehouse = Warehouse::new(project.warehouse.clone());
            let before = warehouse.current()?.expect("the baseline snapshot");
            let result = crmcube::etl::load(&project, &warehouse).await;
            let after = warehouse.current()?.expect("a snapshot");
            Ok::<_, crmcube::Error>((result, before, after, warehouse))
        })
    });
    let (result, before, after, warehouse) = match outcome {
        Err(_) => return Err("the load panicked".into()),
        Ok(Err(e)) => {
            // The project itself did not open (bad crmcube.yaml): an error, nothing loaded.
            return match &case.expect.error {
                Some(fragments) => check_message(&e.to_string(), fragments, &case.expect.not),
                None => Err(format!("the project did not open: {e}")),
            };
        }
        Ok(Ok(x)) => x,
    };
    match (&case.expect.error, result) {
        (Some(fragments), Err(e)) => {
            check_message(&e.to_string(), fragments, &case.expect.not)?;
            if before.id != after.id || before.tables.keys().ne(after.tables.keys()) {
                return Err(format!("a failed load moved the warehouse from snapshot {} to {}", before.id, after.id));
            }
            // The previous snapshot still reads.
            let rows = block_on(async move {
                let ctx = warehouse.session().await.unwrap();
                sql(&ctx, "SELECT count(*) FROM dim_customer").await
            });
            let want = base.rows.get("dim_customer").copied().unwrap_or_default().to_string();
            if rows != [[want.clone()]] {
                return Err(format!("after the failed load dim_customer reads {rows:?}, not {want}"));
            }
            Ok(())
        }
        (Some(_), Ok(report)) => Err(format!("expected an error, but snapshot {} was committed", report.snapshot)),
        (None, Err(e)) => Err(format!("the load failed: {e}")),
        (None, Ok(report)) => {
            for t in report.tables.iter().filter(|t| t.kind == "source") {
                if t.read != t.loaded + t.quarantined + t.duplicates + t.skipped && t.mode != "unchanged" {
                    return Err(format!("{}: read {} ≠ loaded {} + quarantined {} + duplicates {} + skipped {}", t.table, t.read, t.loaded, t.quarantined, t.duplicates, t.skipped));
                }
            }
            let table = |name: &str| report.tables.iter().find(|t| t.table == name).ok_or_else(|| format!("no table {name} in the report"));
            if let Some(q) = &case.expect.quarantine {
                let t = table(&q.table)?;
                let extra = t.quarantined - base.quarantined.get(&q.table).copied().unwrap_or_default().min(t.quarantined);
                if let Some(n) = q.count
                    && extra != n
                {
                    return Err(format!("{}: {extra} more rows quarantined, expected {n}", q.table));
                }
                let reasons = block_on({
                    let (w, table) = (warehouse.clone(), q.table.clone());
                    async move {
                        let ctx = w.session().await.unwrap();
                        let r = ctx
                            .sql(&format!("SELECT line, reason, source_file FROM quarantine WHERE table_name = '{table}' ORDER BY line"))
                            .await
                            .unwrap()
                            .collect()
                            .await
                            .unwrap();
                        cells(&r)
                    }
                });
                let line = match &q.line {
                    Some(serde_json::Value::String(s)) if s == "last" => {
                        Some(*last_lines.values().next().expect("an edited file"))
                    }
                    Some(serde_json::Value::Number(n)) => n.as_i64(),
                    _ => None,
                };
                let hit = reasons.iter().any(|r| r[1].contains(&q.reason) && line.is_none_or(|l| r[0] == l.to_string()));
                if !hit {
                    return Err(format!("no quarantine row of {} with reason '{}' at line {line:?}: {:?}", q.table, q.reason, &reasons[..reasons.len().min(6)]));
                }
            }
            if let Some(r) = &case.expect.rows {
                let t = table(&r.table)?;
                let want = base.rows[&r.table] as i64 + r.change;
                if t.rows as i64 != want {
                    return Err(format!("{}: {} rows, expected {want} (baseline {} {:+})", r.table, t.rows, base.rows[&r.table], r.change));
                }
            }
            if case.expect.quarantine.is_none() && case.expect.rows.is_none() {
                return Err("the case expects nothing: give quarantine, rows or error".into());
            }
            Ok(())
        }
    }
}

fn check_message(message: &str, fragments: &[String], not: &[String]) -> Result<(), String> {
    let missing: Vec<&String> = fragments.iter().filter(|f| !message.contains(f.as_str())).collect();
    let present: Vec<&String> = not.iter().filter(|f| message.contains(f.as_str())).collect();
    match (missing.is_empty(), present.is_empty()) {
        (true, true) => Ok(()),
        (false, _) => Err(format!("the error lacks {missing:?}: {message}")),
        (true, false) => Err(format!("the error should not say {present:?}: {message}")),
    }
}

#[test]
fn every_bad_input_is_quarantined_or_stops_the_load_with_a_clear_error() {
    let text = std::fs::read_to_string(repo().join("tests/badinput/cases.yaml")).unwrap();
    let cases: Vec<Case> = serde_saphyr::from_str(&text).unwrap();
    assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
    let failures: Vec<String> = cases.iter().filter_map(|c| run_case(c).err().map(|e| format!("{}: {e}", c.name))).collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
