//! The short chaos schedules: `causeway chaos` against three real nodes in
//! three network namespaces, one fault of every kind while clients write in
//! every region, then the checker; and a schedule with a hostile member. Needs root (CI runs as root); elsewhere
//! it says so and stops, unless CAUSEWAY_CHAOS_REQUIRED is set, when it
//! fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;

use serde_json::Value;
use support::cluster::causeway_bin;

/// Runs `causeway chaos ARGS` and returns its report once it passed; `None`
/// when not root (the test is skipped, unless CAUSEWAY_CHAOS_REQUIRED is
/// set, when it fails). Stderr (schedule, faults as they happen, the table)
/// goes to the test output.
fn chaos(args: &[&str]) -> Option<Value> {
    if !causeway_lab::chaos::is_root() {
        assert!(
            std::env::var_os("CAUSEWAY_CHAOS_REQUIRED").is_none(),
            "the chaos test needs root (network namespaces and nftables)"
        );
        eprintln!("SKIPPED: the chaos test needs root (network namespaces and nftables)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let status = Command::new(causeway_bin())
        .arg("chaos")
        .args(args)
        .arg("--report")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    let report = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("the chaos run ({status}) wrote no report: {e}"));
    let report: Value = serde_json::from_slice(&report).unwrap();
    assert!(status.success(), "the chaos run failed: {report:#}");
    Some(report)
}

#[test]
fn a_short_chaos_schedule_loses_no_acknowledged_write() {
    let Some(report) = chaos(&["--seed", "1", "--duration", "60", "--max-fault-secs", "6"]) else {
        return;
    };
    for (kind, n) in report["faults_by_kind"].as_object().unwrap() {
        assert!(n.as_u64().unwrap() >= 1, "no {kind} fault was injected");
    }
    assert_eq!(report["acked_lost"], 0, "{:#}", report["lost_examples"]);
    assert_eq!(report["divergent_replicas"], 0);
    assert_eq!(report["divergent_documents"], 0);
    assert_eq!(report["failed_present"], 0);
    assert_eq!(report["converged"], true);
    // Regression: after a pause, peers sent every queued direct message at
    // once and the resumed node dropped dozens of streams (libp2p "at
    // capacity"); the per-peer outbox window prevents it.
    assert_eq!(report["inbound_streams_dropped"], 0);
    assert!(report["writes"]["ok"].as_u64().unwrap() > 1000);
    for region in report["per_region"].as_array().unwrap() {
        // While only the network is faulty every node runs, so writes keep
        // succeeding on every side of a partition: none is refused, and at
        // most a few time out on a loaded machine.
        let during = &region["during_network_faults"];
        let (attempted, ok) = (
            during["attempted"].as_u64().unwrap(),
            during["ok"].as_u64().unwrap(),
        );
        assert!(attempted > 0, "{region}");
        assert_eq!(during["failed"], 0, "{region}");
        assert!(ok * 100 >= attempted * 95, "{region}");
    }
}

#[test]
fn a_byzantine_member_is_cut_off_while_honest_writes_go_on() {
    let args = [
        "--seed",
        "2",
        "--duration",
        "40",
        "--max-fault-secs",
        "4",
        "--byzantine",
        "1",
    ];
    let Some(report) = chaos(&args) else {
        return;
    };
    assert_eq!(report["acked_lost"], 0, "{:#}", report["lost_examples"]);
    assert_eq!(report["divergent_replicas"], 0);
    assert_eq!(report["converged"], true);
    let b = &report["byzantine"];
    // Every node holds the attacker in its list of blocked peers and had
    // cut it off by the end (a reconnection after a kill fault may have
    // been admitted before the node blocked it).
    assert_eq!(b["blocked_by"].as_array().unwrap().len(), 3, "{b:#}");
    for t in b["attack"]["targets"].as_array().unwrap() {
        assert!(t["disconnected_after_ms"].is_u64(), "{t}");
    }
    let sent = b["attack"]["sent"].as_object().unwrap();
    for kind in ["malformed", "oversized_delta", "ack_flood", "sync_flood"] {
        assert!(sent[kind].as_u64().unwrap() > 0, "no {kind} sent: {b:#}");
    }
    assert!(
        b["writes_during"]["writes"].as_u64().unwrap() > 100,
        "{b:#}"
    );
    for (region, mib) in b["rss_mib_at_end"].as_object().unwrap() {
        assert!(mib.as_u64().unwrap() < 1024, "{region} grew to {mib} MiB");
    }
}

/// Three nodes in each of three region namespaces, the same schedule twice:
/// writes pushed along region trees with bounded reconciliation, then
/// gossiped with reconciliation with every peer. Both lose nothing through
/// partitions, loss and a killed node, and each run's nodes say they
/// disseminated as configured. The bytes between regions per write and the
/// push resends are printed, not compared: they are measured figures of
/// one schedule on a machine whose load varies (docs/testing.md, "Three
/// nodes a region").
#[test]
fn three_nodes_a_region_push_through_bridges_and_lose_nothing() {
    let run = |dissemination: &str, fanout: &str| {
        let args = [
            "--seed",
            "3",
            "--duration",
            "30",
            "--max-fault-secs",
            "4",
            "--nodes-per-region",
            "3",
            "--writers",
            "3",
            "--rate",
            "5",
            "--dissemination",
            dissemination,
            "--reconcile-fanout",
            fanout,
        ];
        chaos(&args)
    };
    let Some(pushed) = run("regions", "2,1") else {
        return;
    };
    let gossiped = run("gossip", "all").unwrap();
    for report in [&pushed, &gossiped] {
        assert_eq!(report["nodes"].as_array().unwrap().len(), 9);
        assert_eq!(report["acked_lost"], 0, "{:#}", report["lost_examples"]);
        assert_eq!(report["divergent_replicas"], 0);
        assert_eq!(report["converged"], true);
        assert!(report["writes"]["ok"].as_u64().unwrap() > 500);
        let kinds = report["faults_by_kind"].as_object().unwrap();
        assert!(kinds["partition"].as_u64().unwrap() >= 1, "{kinds:?}");
        assert!(kinds["kill"].as_u64().unwrap() >= 1, "{kinds:?}");
    }
    let per_write = |r: &Value| {
        r["wan"]["bytes_per_write_and_region_over_idle"]
            .as_f64()
            .unwrap()
    };
    let sent = |r: &Value, kind: &str| r["sent"]["messages"][kind].as_u64().unwrap_or(0);
    for report in [&pushed, &gossiped] {
        assert_eq!(report["sent"]["unread"], 0, "{:#}", report["sent"]);
    }
    assert!(sent(&pushed, "push") > 0 && sent(&pushed, "delta") == 0);
    assert!(sent(&gossiped, "delta") > 0 && sent(&gossiped, "push") == 0);
    println!(
        "bytes between regions per write and region, over idle: pushed {:.0}, gossiped {:.0}; \
         pushed run's pushes: {}",
        per_write(&pushed),
        per_write(&gossiped),
        pushed["sent"]["pushes"]
    );
    assert!(per_write(&pushed) > 0.0 && per_write(&gossiped) > 0.0);
}
