//! Shared fixtures: temporary copies of the sample project and one shared load of it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crmcube::etl::{LoadReport, load};
use crmcube::project::Project;
use crmcube::warehouse::Warehouse;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::SessionContext;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of the repository's project (metadata only) whose sources are the committed
/// sample-data and whose warehouse lives in a fresh temporary folder.
pub struct TestProject {
    pub dir: tempfile::TempDir,
    pub project: Project,
    pub warehouse: Warehouse,
}

pub fn test_project() -> TestProject {
    let dir = tempfile::Builder::new().prefix("crmcube-test").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    copy_dir(&repo().join("transforms"), &dir.path().join("transforms"));
    copy_dir(&repo().join("cubes"), &dir.path().join("cubes"));
    std::fs::write(
        dir.path().join("crmcube.yaml"),
        format!("version: 1\nname: test\nsources: {}\n", repo().join("sample-data").display()),
    )
    .unwrap();
    let project = Project::open(dir.path()).unwrap();
    let warehouse = Warehouse::new(project.warehouse.clone());
    TestProject { dir, project, warehouse }
}

/// Copies a folder with everything in it.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A copy of the sample exports under `dir` with one file's text changed by `edit`; returns the
/// folder (to use as a project's `sources`).
pub fn edited_sources(dir: &Path, file: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let to = dir.join(format!("sources-{}", dir.read_dir().map(|d| d.count()).unwrap_or(0)));
    copy_dir(&repo().join("sample-data"), &to);
    let text = std::fs::read_to_string(to.join(file)).unwrap();
    std::fs::write(to.join(file), edit(&text)).unwrap();
    to
}

/// The nightly set-up of the incremental tests: customers, orders and order lines read every
/// `customers*.csv`, `orders*.csv`, `order_lines*.csv`; with `incremental`, they also load
/// incrementally (customers with an `updated_at` watermark).
pub fn nightly_transforms(transforms: &Path, incremental: bool) {
    for (file, export, extra) in [
        ("dim_customer.yaml", "customers", "load: incremental\nwatermark: updated_at\n"),
        ("orders.yaml", "orders", "load: incremental\n"),
        ("order_lines.yaml", "order_lines", "load: incremental\n"),
    ] {
        let path = transforms.join(file);
        let mut text = std::fs::read_to_string(&path).unwrap().replace(&format!("path: {export}.csv"), &format!("path: '{export}*.csv'"));
        if incremental {
            text = text.replacen("\nsource:\n", &format!("\n{extra}source:\n"), 1);
        }
        std::fs::write(&path, text).unwrap();
    }
}

/// Runs an async block on a fresh runtime in its own thread (usable from any test).
pub fn block_on<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || tokio::runtime::Runtime::new().unwrap().block_on(f)).join().unwrap()
}

pub struct Loaded {
    pub test: TestProject,
    pub report: LoadReport,
}

/// One load of the sample, shared by every test that only reads it.
pub fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let test = test_project();
        let (p, w) = (test.project.clone(), test.warehouse.clone());
        let report = block_on(async move { load(&p, &w).await.unwrap() });
        Loaded { test, report }
    })
}

pub async fn session() -> SessionContext {
    loaded().test.warehouse.session().await.unwrap()
}

/// Every cell of a result as text (NULL as ""), row by row.
pub fn cells(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("");
    let mut rows = Vec::new();
    for b in batches {
        let f: Vec<_> = b.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap()).collect();
        for i in 0..b.num_rows() {
            rows.push(f.iter().map(|x| x.value(i).to_string()).collect());
        }
    }
    rows
}

pub async fn sql(ctx: &SessionContext, q: &str) -> Vec<Vec<String>> {
    cells(&ctx.sql(q).await.unwrap().collect().await.unwrap())
}

pub async fn scalar(ctx: &SessionContext, q: &str) -> String {
    let rows = sql(ctx, q).await;
    assert_eq!(rows.len(), 1, "{q} returned {} rows", rows.len());
    rows[0][0].clone()
}

/// The sample generator's own account of what it wrote (rows and dirty rows per file).
pub fn dirt() -> crmcube::sample::SampleSummary {
    serde_json::from_str(&std::fs::read_to_string(repo().join("sample-data/dirt.json")).unwrap()).unwrap()
}

/// Decoded text of a sample file.
pub fn sample_text(file: &str) -> String {
    let bytes = std::fs::read(repo().join("sample-data").join(file)).unwrap();
    if file == "customers.csv" {
        encoding_rs::GBK.decode_without_bom_handling_and_without_replacement(&bytes).unwrap().into_owned()
    } else {
        String::from_utf8(bytes).unwrap()
    }
}

/// Cents from a decimal's text ("1234.5" or "1234.50").
pub fn cents(text: &str) -> i128 {
    crmcube::etl::parse::parse_decimal(text, 2).unwrap_or_else(|| panic!("not an amount: {text}"))
}

/// The cubes of the shared test project.
pub fn cubes() -> crmcube::cube::CubeSet {
    let project = &loaded().test.project;
    let transforms = crmcube::etl::TransformSet::load(project).unwrap();
    crmcube::cube::CubeSet::load(project, &transforms).unwrap()
}

/// Runs a cube query (as `crmcube query` does) over the shared load; every cell as text.
pub async fn ask(q: crmcube::query::CubeQuery) -> Vec<Vec<String>> {
    let cubes = cubes();
    let ctx = session().await;
    cells(&crmcube::query::run(&ctx, cubes.get(&q.cube).unwrap(), &q).await.unwrap())
}

/// The Python of the test environment (`.ci/run` makes `.venv` from tests/requirements.txt).
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("CRMCUBE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var_os("CI").is_none(), "CI must provide {} with tests/requirements.txt installed (see .ci/run)", p.display());
    eprintln!("skipping: {} not found; run `bash .ci/run` or make the venv as the README says", p.display());
    None
}
