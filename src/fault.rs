//! Fault injection for crash tests: `CRMCUBE_FAULT_POINT=N` kills the process with SIGKILL when
//! it reaches its N-th fault point.
//!
//! A load passes a fault point after extracting and after cleaning each source, after each
//! derived table, after writing each table, and on both sides of the snapshot manifest. The
//! crash tests kill a load at every one of them and check that the warehouse still opens at the
//! previous snapshot and that the next load produces what an uninterrupted load produces.
//! `CRMCUBE_FAULT_POINT=list` prints each point as it is reached (`fault point N: what`) and
//! kills nothing, for a test that kills a load at chosen points. Without the variable a fault
//! point costs one atomic increment.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// What `CRMCUBE_FAULT_POINT` asks for.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    /// Kill the process at the N-th point.
    Kill(u32),
    /// Print every point.
    List,
}

static TARGET: OnceLock<Option<Target>> = OnceLock::new();
static REACHED: AtomicU32 = AtomicU32::new(0);

/// Marks a fault point; `what` names it in the message printed just before the kill.
pub fn point(what: &str) {
    let target = *TARGET.get_or_init(|| std::env::var("CRMCUBE_FAULT_POINT").ok().and_then(|v| if v == "list" { Some(Target::List) } else { v.parse().ok().map(Target::Kill) }));
    let n = REACHED.fetch_add(1, Ordering::SeqCst) + 1;
    if target == Some(Target::List) {
        eprintln!("fault point {n}: {what}");
    } else if target == Some(Target::Kill(n)) {
        eprintln!("fault injection: killing the process at point {n} ({what})");
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        // `kill` is missing or failed: abort rather than go on past the fault point.
        std::process::abort();
    }
}

/// A pause for tests that change files while a load runs: with `CRMCUBE_PAUSE_AT=<what>` and
/// `CRMCUBE_PAUSE_FILE=<path>`, the process creates that file when it reaches `what` and waits
/// (up to a minute) until the test deletes it. Without the variables it does nothing.
pub fn pause(what: &str) {
    let (Ok(at), Ok(file)) = (std::env::var("CRMCUBE_PAUSE_AT"), std::env::var("CRMCUBE_PAUSE_FILE")) else { return };
    if at != what {
        return;
    }
    let file = std::path::PathBuf::from(file);
    if std::fs::write(&file, what).is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while file.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
