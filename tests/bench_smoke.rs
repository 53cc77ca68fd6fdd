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

/// `causeway bench all --quick`: every scenario at tiny sizes, including
/// the comparison peers (installed by the run), and the markdown summary.
#[test]
fn every_scenario_runs_end_to_end_at_smoke_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let markdown = dir.path().join("summary.md");
    let results = bench(&["all", "--quick", "--markdown", markdown.to_str().unwrap()]);
    let summary = std::fs::read_to_string(&markdown).unwrap();
    assert!(!summary.contains("failed"), "{summary}");
    for scenario in [
        "ingest",
        "durable-writes",
        "reconcile",
        "delta-path",
        "lag",
        "join",
        "replicate-trace",
        "many-docs-sync",
        "steady-state",
        "memory",
        "concurrent-editors",
    ] {
        assert!(
            summary.contains(&format!("causeway bench {scenario} ")),
            "no row for {scenario}:\n{summary}"
        );
    }
    let of =
        |bench: &str| -> Vec<&Value> { results.iter().filter(|r| r["bench"] == bench).collect() };

    // Every engine ends with the same 50 documents, checked by the run.
    let sync = of("many-docs-sync");
    let engines: Vec<&str> = sync.iter().map(|r| r["engine"].as_str().unwrap()).collect();
    assert_eq!(engines, ["causeway", "automerge-repo", "samod"]);
    for r in &sync {
        assert_eq!(r["docs"], 50);
        assert_eq!(r["contents_identical"], true);
        assert!(r["bytes"].as_u64().unwrap() > 0);
        assert!(!r["versions"].as_object().unwrap().is_empty());
    }

    let steady = of("steady-state");
    assert_eq!(steady.len(), 1);
    assert_eq!(steady[0]["writes_failed"], 0);
    assert!(steady[0]["writes_acknowledged"].as_u64().unwrap() > 0);
    assert!(steady[0]["lag_ms_max"].as_f64().unwrap() >= steady[0]["lag_ms_p50"].as_f64().unwrap());

    let editors = of("concurrent-editors");
    assert_eq!(editors.len(), 1);
    assert_eq!(editors[0]["lost"], 0);
    assert_eq!(editors[0]["identical"], true);

    let memory = of("memory");
    assert_eq!(memory.len(), 1);
    assert_eq!(memory[0]["docs"], 2000);
    assert!(
        memory[0]["peak_rss_mib"].as_f64().unwrap() >= memory[0]["idle_rss_mib"].as_f64().unwrap()
    );
}
