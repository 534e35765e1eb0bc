//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run with cargo-fuzz), kept in the
//! library so the test suite replays every input of the kept corpora through the same code
//! (`tests/integration/fuzz_corpus.rs`): a crash found once stays fixed.
//!
//! Each takes arbitrary bytes and must neither panic nor break an invariant; errors are fine
//! (they are what bad input should produce), but they must render as text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::cube::CubeSet;
use crate::etl::validate::{SourceTransform, TransformBody, TransformSet};
use crate::project::{Project, parse_yaml};

/// The repository's sample project (metadata only), as every target's fixed context.
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"))
}

/// The sample's transforms and cubes.
fn metadata_set() -> &'static (TransformSet, CubeSet) {
    static SET: OnceLock<(TransformSet, CubeSet)> = OnceLock::new();
    SET.get_or_init(|| {
        let project = Project::open(&repo()).expect("the repository is a project");
        let transforms = TransformSet::load(&project).expect("the sample's transforms are valid");
        let cubes = CubeSet::load(&project, &transforms).expect("the sample's cubes are valid");
        (transforms, cubes)
    })
}

/// The metadata loader: the bytes as `crmcube.yaml`, as a transform file (validated with the
/// sample's transforms, so references resolve) and as a cube file over the sample's tables.
/// Every diagnostic must render.
pub fn metadata(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = Path::new("fuzz.yaml");
    let render = |e: crate::error::Error| drop(e.to_string());
    if let Err(e) = parse_yaml::<crate::project::ProjectSpec>(file, text) {
        render(e);
    }
    let (transforms, _) = metadata_set();
    match parse_yaml::<crate::etl::spec::TransformSpec>(file, text) {
        Ok(spec) => {
            let mut specs: Vec<(PathBuf, crate::etl::spec::TransformSpec)> = Vec::new();
            specs.push((file.to_path_buf(), spec));
            let mut errors = Vec::new();
            let set = crate::etl::validate::resolve(specs, &[], &mut errors);
            for e in &errors {
                drop(e.to_string());
            }
            if errors.is_empty() {
                assert_eq!(set.transforms.iter().filter(|t| !matches!(t.body, TransformBody::History(_))).count(), 1, "one file, one table");
            }
        }
        Err(e) => render(e),
    }
    match parse_yaml::<crate::cube::spec::CubeSpec>(file, text) {
        Ok(spec) => {
            let tables: Vec<&str> = transforms.transforms.iter().map(|t| t.name.as_str()).chain(crate::etl::models::TABLES).collect();
            let mut errors = Vec::new();
            let cube = crate::cube::resolve(file, &spec, &tables, &mut errors);
            for e in &errors {
                drop(e.to_string());
            }
            if errors.is_empty() {
                // A valid cube's rollup fingerprints and level lists are computable.
                for r in &cube.rollups {
                    drop(r.fingerprint(&cube));
                    drop(r.level_refs(&cube));
                }
            }
        }
        Err(e) => render(e),
    }
}

/// A small loaded warehouse (the sample generator at 300 customers, one year) for the query
/// target; built once per process under the system's temporary folder.
fn warehouse_session() -> &'static datafusion::prelude::SessionContext {
    static CTX: OnceLock<datafusion::prelude::SessionContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("crmcube-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        let sample = crate::sample::SampleConfig { customers: 300, years: 1, seed: 3 };
        crate::sample::generate(&sample, &dir.join("exports")).expect("the sample generates");
        // The repository's transforms and cubes, read where they are.
        let yaml = format!(
            "version: 1\nname: fuzz\nsources: exports\ntransforms: {}\ncubes: {}\n",
            repo().join("transforms").display(),
            repo().join("cubes").display()
        );
        std::fs::write(dir.join("crmcube.yaml"), yaml).expect("crmcube.yaml");
        let project = Project::open(&dir).expect("a project");
        let warehouse = crate::warehouse::Warehouse::new(project.warehouse.clone());
        runtime().block_on(async {
            crate::etl::load(&project, &warehouse).await.expect("the small sample loads");
            let ctx = warehouse.session().await.expect("a session");
            crate::query::sql::register_cubes(&ctx, &metadata_set().1).await.expect("cubes register");
            ctx
        })
    })
}

/// The cube query parser and compiler: the bytes as a query file (YAML keys of
/// [`crate::query::CubeQuery`]) run against the small warehouse, and as SQL planned through the
/// cube rewrite (not executed: an arbitrary join could run for long).
pub fn cube_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let ctx = warehouse_session();
    let cubes = &metadata_set().1;
    if let Ok(mut q) = parse_yaml::<crate::query::CubeQuery>(Path::new("query.yaml"), text) {
        if q.cube.is_empty() {
            q.cube = "sales".into();
        }
        if let Ok(cube) = cubes.get(&q.cube) {
            // Keep the work small whatever the input asks.
            q.limit = Some(q.limit.unwrap_or(50).min(50));
            if let Err(e) = runtime().block_on(crate::query::run(ctx, cube, &q)) {
                drop(e.to_string());
            }
        }
    }
    if text.len() < 2_000 {
        match runtime().block_on(crate::query::sql::sql(ctx, cubes, text)) {
            Ok(df) => drop(df.logical_plan().display_indent().to_string()),
            Err(e) => drop(e.to_string()),
        }
    }
}

/// The CSV cleaning path: the bytes as the orders export (UTF-8, or GBK when they are not), split, typed,
/// checked and de-duplicated; every record read is loaded, quarantined or a resolved duplicate.
pub fn csv_clean(data: &[u8]) {
    static ORDERS: OnceLock<SourceTransform> = OnceLock::new();
    let spec = ORDERS.get_or_init(|| {
        let t = metadata_set().0.get("orders").expect("the sample has orders");
        let TransformBody::Source(s) = &t.body else { panic!("orders is a source") };
        // References need the referenced tables; the fuzz target checks the rest.
        SourceTransform { references: Vec::new(), ..s.clone() }
    });
    static CTX: OnceLock<datafusion::prelude::SessionContext> = OnceLock::new();
    // One partition: the inputs are small, and fewer threads of work mean more inputs a second.
    let ctx = CTX.get_or_init(|| datafusion::prelude::SessionContext::new_with_config(datafusion::prelude::SessionConfig::new().with_target_partitions(1)));
    // UTF-8 when the bytes are, else GBK (both decoders, without doubling the slow part).
    let encodings = match std::str::from_utf8(data) {
        Ok(_) => [crate::etl::spec::SourceEncoding::Utf8],
        Err(_) => [crate::etl::spec::SourceEncoding::Gbk],
    };
    for encoding in encodings {
        let mut spec = spec.clone();
        spec.source.encoding = encoding;
        let extracted = match crate::etl::extract::extract_bytes("orders", &spec, data, "orders.csv") {
            Ok(e) => e,
            Err(e) => {
                drop(e.to_string());
                continue;
            }
        };
        let read = extracted.read;
        let rejected = extracted.rejects.len() as u64;
        let cleaned = runtime().block_on(crate::etl::clean::clean(ctx, "orders", &spec, extracted.batches, &extracted.texts, None)).expect("cleaning never fails on text");
        assert_eq!(read, cleaned.loaded + cleaned.quarantined + cleaned.duplicates + rejected, "every record read is accounted for");
    }
}
