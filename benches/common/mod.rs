//! Shared by the benchmarks: the project they measure and percentiles.

use std::time::{Duration, Instant};

use crmcube::etl::load;
use crmcube::project::Project;
use crmcube::warehouse::Warehouse;

/// `CRMCUBE_BENCH_PROJECT=DIR` (an already loaded project), or the committed sample loaded into a
/// temporary warehouse (the load is timed and printed; the folder lives as long as the guard).
pub async fn bench_project() -> (Project, Option<tempfile::TempDir>) {
    if let Some(dir) = std::env::var_os("CRMCUBE_BENCH_PROJECT") {
        return (Project::open(std::path::Path::new(&dir)).unwrap(), None);
    }
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    for dir in ["transforms", "cubes"] {
        std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        for e in std::fs::read_dir(repo.join(dir)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), tmp.path().join(dir).join(e.file_name())).unwrap();
        }
    }
    let yaml = format!("version: 1\nname: bench\nsources: {}\n", repo.join("sample-data").display());
    std::fs::write(tmp.path().join("crmcube.yaml"), yaml).unwrap();
    let project = Project::open(tmp.path()).unwrap();
    let started = Instant::now();
    let report = load(&project, &Warehouse::new(project.warehouse.clone())).await.unwrap();
    let rows: u64 = report.tables.iter().filter(|t| t.kind == "source").map(|t| t.read).sum();
    let seconds = started.elapsed().as_secs_f64();
    println!("load of the sample: {rows} source rows in {seconds:.2} s ({:.0} rows/s)", rows as f64 / seconds);
    (project, Some(tmp))
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
