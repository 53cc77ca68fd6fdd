//! Replays the committed fuzz corpora and crash regressions through the same
//! harnesses the cargo-fuzz targets run (`causeway_engine::fuzzing`), so CI
//! checks every input found so far without a fuzzer or a nightly toolchain.
//!
//! Inputs live in `fuzz/corpus/<target>/` (the corpus the fuzzers grew,
//! minimised) and `fuzz/regressions/<target>/` (every input that once failed,
//! kept after its fix). See `fuzz/README.md`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use causeway_engine::fuzzing;

/// Runs `harness` on every input of `target`; fails naming each input that
/// panics.
fn replay(target: &str, harness: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind).join(target)).ok())
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no committed inputs for {target}");
    let mut failed = Vec::new();
    for path in &inputs {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    eprintln!(
        "{target}: {} inputs replayed, {} failed",
        inputs.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{target} fails on: {failed:#?}");
}

#[test]
fn wire_decode_corpus() {
    replay("wire_decode", fuzzing::wire_decode::run);
}

#[test]
fn apply_changes_corpus() {
    replay("apply_changes", fuzzing::apply_changes::run);
}

#[test]
fn reconcile_corpus() {
    replay("reconcile", fuzzing::reconcile::run);
}

#[test]
fn convergence_corpus() {
    replay("convergence", fuzzing::convergence::run);
}

#[test]
fn sync_messages_corpus() {
    replay("sync_messages", fuzzing::sync_messages::run);
}

#[test]
fn documents_corpus() {
    replay("documents", fuzzing::documents::run);
}
