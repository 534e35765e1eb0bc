//! The fuzz targets' kept corpora (fuzz/corpus/<target>/) and any crash reproducers
//! (fuzz/artifacts/<target>/), replayed through the same entry points the fuzzers call: what a
//! fuzzer found once stays fixed, and CI runs this without a fuzzer or a nightly toolchain.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = crate::common::repo().join("fuzz");
    let mut inputs = 0;
    for dir in [root.join("corpus").join(target), root.join("artifacts").join(target)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} makes the target fail", file.display());
            inputs += 1;
        }
    }
    assert!(inputs > 0, "no corpus for {target} under {}", Path::new("fuzz/corpus").join(target).display());
}

#[test]
fn the_metadata_corpus_replays_cleanly() {
    replay("metadata", crmcube::fuzzing::metadata);
}

#[test]
fn the_cube_query_corpus_replays_cleanly() {
    replay("cube_query", crmcube::fuzzing::cube_query);
}

#[test]
fn the_csv_clean_corpus_replays_cleanly() {
    replay("csv_clean", crmcube::fuzzing::csv_clean);
}
