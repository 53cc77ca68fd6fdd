//! Changes a client hands over are never lost: two writers edit one text in
//! their own Automerge documents and post every change to the node of their
//! own region (real `causeway node` processes on 127.0.0.1). Each writer's
//! changes depend on the other's, which reach its node only by
//! replication, so the nodes hold them; with a small held-change limit they
//! also refuse some (429), which the writers retry; one node is SIGKILLed
//! mid-run and restarted. Every change answered 200 must be in every node's
//! history at the end, and the text identical everywhere and equal to what
//! the writers hold (`causeway bench concurrent-editors` checks both and
//! fails otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;

use serde_json::Value;
use support::cluster::causeway_bin;

#[test]
fn held_and_refused_changes_survive_a_sigkill_and_converge() {
    let out = Command::new(causeway_bin())
        .args([
            "bench",
            "concurrent-editors",
            "--txns",
            "600",
            "--block",
            "25",
            "--max-held-per-doc",
            "40",
            "--kill-at",
            "250",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "the run failed:\n{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["identical"], true, "{r}");
    assert_eq!(r["held_at_end"], 0, "{r}");
    assert_eq!(r["killed"], 1, "{r}");
    assert_eq!(r["acknowledged"], r["changes_made"], "{r}");
    // Writer 0 starts only once writer 1 had a change refused (or posted
    // all of its changes), and every change of writer 1 depends on writer
    // 0's first block: writer 1's first 40 changes are held and the 41st is
    // refused, whatever the machine's speed.
    assert!(r["held_peak"].as_u64().unwrap() >= 40, "{r}");
    assert!(r["refused_and_retried"].as_u64().unwrap() > 0, "{r}");
}
