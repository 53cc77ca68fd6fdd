//! Smoke runs of the benchmarks with tiny sizes (debug build): each must run
//! end to end, pass its own checks, and print its JSON result. The figures
//! mean nothing here; see docs/benchmarks.md for release runs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;

use serde_json::Value;
use support::cluster::causeway_bin;

/// Runs `causeway bench <args>` from the repository root (where the default
/// trace path resolves) and returns its JSON results.
fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(causeway_bin())
        .arg("bench")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench {args:?} failed:\n{stderr}");
    eprintln!("{stderr}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn replicate_trace_runs_end_to_end() {
    let results = bench(&["replicate-trace", "--txns", "300"]);
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r["txns"], 300);
    assert!(r["ingest_a_s"].as_f64().unwrap() > 0.0);
    // Replicas hold A's final heads only after A wrote them.
    assert!(r["replicated_b_s"].as_f64().unwrap() >= r["ingest_a_s"].as_f64().unwrap());
    assert!(r["replicated_c_s"].as_f64().unwrap() >= r["ingest_a_s"].as_f64().unwrap());
}
