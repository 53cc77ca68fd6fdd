//! Real `causeway node` processes on 127.0.0.1: real libp2p, real RocksDB,
//! the HTTP API. Each test prints the figures it saw.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::cluster::{causeway_bin, converged, three, wait_until, NodeProc, Options};

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn three_nodes_converge_on_writes_made_at_each() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path());
    let start = Instant::now();
    a.write_doc("PUT", "orders/1", &json!({"eu": 1}));
    b.write_doc("PATCH", "orders/1", &json!({"us": 2}));
    c.write_doc("PATCH", "orders/1", &json!({"ap": 3}));
    let t = wait_until(CONVERGE, "orders/1 on every node", || {
        converged(&[&a, &b, &c], "orders/1")
            && a.get_doc("orders/1").unwrap().0 == json!({"eu": 1, "us": 2, "ap": 3})
    });
    println!(
        "3 writes at 3 nodes converged {:.0} ms after the last write ({:.0} ms after the first)",
        t.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3
    );
}

#[test]
fn a_node_killed_with_sigkill_catches_up_after_restart() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut c) = three(root.path());
    c.write_doc("PUT", "before/kill", &json!({"ok": true}));
    c.kill();
    for i in 0..50 {
        let node = if i % 2 == 0 { &a } else { &b };
        node.write_doc("PUT", &format!("during/{i}"), &json!({"i": i}));
    }
    c.restart();
    // The note written on c just before the kill may or may not have left
    // it; either way every node must end up with it and the 50 documents.
    let all = [&a, &b, &c];
    let t = wait_until(CONVERGE, "the restarted node to catch up", || {
        all.iter().all(|n| n.list_all("").len() == 51)
            && converged(&all, "before/kill")
            && (0..50).all(|i| converged(&all, &format!("during/{i}")))
    });
    println!("SIGKILLed node: 50 documents written while it was down, all present {:.0} ms after restart", t.as_secs_f64() * 1e3);
}

#[test]
fn thousand_documents_converge_and_a_late_empty_node_receives_them_all() {
    let root = tempfile::tempdir().unwrap();
    let a = NodeProc::start(root.path(), "a", "eu", &[]);
    let b = NodeProc::start(root.path(), "b", "us", &a.listen);
    let start = Instant::now();
    for i in 0..1000 {
        let node = if i % 2 == 0 { &a } else { &b };
        node.write_doc(
            "PUT",
            &format!("docs/{i:04}"),
            &json!({"n": i, "by": node.name}),
        );
    }
    let wrote = start.elapsed();
    let t = wait_until(CONVERGE, "1,000 documents on both nodes", || {
        a.list_all("docs/").len() == 1000 && b.list_all("docs/").len() == 1000
    });
    println!(
        "1,000 documents written across 2 nodes in {:.1} s; both held all {:.0} ms later",
        wrote.as_secs_f64(),
        t.as_secs_f64() * 1e3
    );
    let joined = Instant::now();
    let c = NodeProc::start(root.path(), "c", "ap", &a.listen);
    let t = wait_until(CONVERGE, "the late node to hold 1,000 documents", || {
        c.list_all("docs/").len() == 1000
    });
    for i in (0..1000).step_by(7) {
        assert!(
            converged(&[&a, &b, &c], &format!("docs/{i:04}")),
            "docs/{i:04} differs"
        );
    }
    println!("late empty node held all 1,000 documents {:.0} ms after it started ({:.0} ms after it was listening)",
        joined.elapsed().as_secs_f64() * 1e3, t.as_secs_f64() * 1e3);
}

fn identity(dir: &std::path::Path) -> String {
    let out = Command::new(causeway_bin())
        .args(["identity", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_peer_not_on_the_allowlist_cannot_connect_or_inject_changes() {
    let root = tempfile::tempdir().unwrap();
    let (id_a, id_b) = (
        identity(&root.path().join("a")),
        identity(&root.path().join("b")),
    );
    let allow = format!("allowlist = [{id_a:?}, {id_b:?}]");
    let a = NodeProc::start_with(
        root.path(),
        "a",
        "eu",
        &[],
        Options {
            network: &allow,
            ..Options::default()
        },
    );
    let b = NodeProc::start_with(
        root.path(),
        "b",
        "us",
        &a.listen,
        Options {
            network: &allow,
            ..Options::default()
        },
    );
    assert_eq!(
        (a.peer_id.as_str(), b.peer_id.as_str()),
        (id_a.as_str(), id_b.as_str())
    );
    let both: Vec<String> = a.listen.iter().chain(&b.listen).cloned().collect();
    let intruder = NodeProc::start(root.path(), "x", "eu", &both);
    intruder.write_doc("PUT", "injected/1", &json!({"evil": true}));
    b.write_doc("PUT", "legit/1", &json!({"ok": true}));
    let t = wait_until(CONVERGE, "the allowed peers to converge", || {
        converged(&[&a, &b], "legit/1")
    });
    // Give the intruder several redial and anti-entropy rounds.
    std::thread::sleep(Duration::from_secs(4));
    for n in [&a, &b] {
        assert_eq!(
            n.get_doc("injected/1"),
            None,
            "{} accepted a change from a peer not on its allowlist",
            n.name
        );
        let peers = n.status()["node"]["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(peers
            .iter()
            .all(|p| p["peer_id"] != intruder.peer_id.as_str() || p["state"] != "replicating"));
    }
    assert!(
        intruder.replicating().is_empty(),
        "the intruder replicates with {:?}",
        intruder.replicating()
    );
    let failures: u64 = intruder.status()["node"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["dial_failures"].as_u64().unwrap_or(0))
        .sum();
    println!("allowed peers converged in {:.0} ms; intruder: 0 peers, 0 changes injected after 4 s ({failures} dials refused)", t.as_secs_f64() * 1e3);
}

#[test]
fn nodes_replicate_over_quic() {
    let root = tempfile::tempdir().unwrap();
    let quic = || Options {
        listen: "/ip4/127.0.0.1/udp/0/quic-v1",
        ..Options::default()
    };
    let a = NodeProc::start_with(root.path(), "a", "eu", &[], quic());
    assert!(
        a.listen.iter().all(|l| l.contains("/quic-v1/")),
        "{:?}",
        a.listen
    );
    let b = NodeProc::start_with(root.path(), "b", "us", &a.listen, quic());
    a.write_doc("PUT", "over/quic", &json!({"transport": "quic"}));
    let t = wait_until(CONVERGE, "the document over QUIC", || {
        converged(&[&a, &b], "over/quic")
    });
    let peers = b.status()["node"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(peers
        .iter()
        .any(|p| p["addresses"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains("quic"))))));
    println!(
        "two nodes listening on QUIC only converged in {:.0} ms",
        t.as_secs_f64() * 1e3
    );
}

#[test]
fn nodes_of_different_clusters_exchange_nothing() {
    let root = tempfile::tempdir().unwrap();
    let a = NodeProc::start(root.path(), "a", "eu", &[]);
    let other = Options {
        cluster: "other",
        ..Options::default()
    };
    let x = NodeProc::start_with(root.path(), "x", "eu", &a.listen, other);
    x.write_doc("PUT", "other/cluster", &json!({"leak": true}));
    a.write_doc("PUT", "test/cluster", &json!({"stay": true}));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(a.get_doc("other/cluster"), None);
    assert_eq!(x.get_doc("test/cluster"), None);
    assert!(a.replicating().is_empty() && x.replicating().is_empty());
    let log = std::fs::read_to_string(x.dir.join("node.log")).unwrap();
    let refusals = log
        .matches("disconnecting a peer of another cluster")
        .count();
    assert!(
        refusals >= 1,
        "the other cluster's node never identified the peer: {log}"
    );
    // Redials back off instead of reconnecting every reconnect_min_ms.
    assert!(
        refusals <= 10,
        "{refusals} reconnections in 4 s: the backoff does not grow"
    );
    println!("two clusters on one machine for 4 s: 0 documents exchanged, {refusals} connection(s) refused after identify");
}

#[test]
fn connection_limits_refuse_peers_beyond_the_maximum() {
    let root = tempfile::tempdir().unwrap();
    let one = Options {
        network: "max_connections = 1",
        ..Options::default()
    };
    let a = NodeProc::start_with(root.path(), "a", "eu", &[], one);
    let b = NodeProc::start(root.path(), "b", "us", &a.listen);
    wait_until(CONVERGE, "b to replicate with a", || {
        b.replicating().len() == 1
    });
    // c knows only a, which is full: it stays alone.
    let c = NodeProc::start(root.path(), "c", "ap", &a.listen);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(a.replicating(), vec![b.peer_id.clone()]);
    assert!(
        c.replicating().is_empty(),
        "c got past the limit: {:?}",
        c.replicating()
    );
    let failures: u64 = c.status()["node"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["dial_failures"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "a with max_connections = 1: b replicates, c was refused for 3 s ({failures} failed dials)"
    );
}

#[test]
fn nodes_that_push_along_region_trees_converge_without_gossiping_deltas() {
    let root = tempfile::tempdir().unwrap();
    // Rounds reconcile with one peer of the region and one of the other.
    let push = Options {
        network: "dissemination = \"regions\"\nreconcile_fanout = \"1,1\"",
        ..Options::default()
    };
    let start = |name, region, bootstrap: &[String]| {
        NodeProc::start_with(root.path(), name, region, bootstrap, Options { ..push })
    };
    let a = start("a", "eu", &[]);
    let b = start("b", "eu", &a.listen);
    let c = start("c", "us", &a.listen);
    let d = start("d", "us", &a.listen);
    let nodes = [&a, &b, &c, &d];
    wait_until(CONVERGE, "a full mesh of 4", || {
        nodes.iter().all(|n| n.replicating().len() == 3)
    });
    let start = Instant::now();
    for (i, n) in nodes.iter().enumerate() {
        n.write_doc("PATCH", "orders/1", &json!({ format!("n{i}"): i }));
    }
    let want = json!({"n0": 0, "n1": 1, "n2": 2, "n3": 3});
    let t = wait_until(CONVERGE, "orders/1 on every node", || {
        converged(&nodes, "orders/1") && a.get_doc("orders/1").unwrap().0 == want
    });
    println!(
        "4 writes pushed at 4 nodes in 2 regions converged {:.0} ms after the last ({:.0} ms after the first)",
        t.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3
    );
    // Metrics are observed every second.
    let applied = |n: &NodeProc, kind: &str| {
        n.metric(
            "causeway_changes_applied_total",
            &format!("kind=\"{kind}\""),
        )
    };
    wait_until(CONVERGE, "every node's metrics to show pushes", || {
        nodes.iter().all(|n| applied(n, "push") >= 3.0)
    });
    for n in nodes {
        println!(
            "changes applied from pushes {}, from deltas {}, from sync {}",
            applied(n, "push"),
            applied(n, "delta"),
            applied(n, "sync")
        );
        assert_eq!(applied(n, "delta"), 0.0, "nothing was gossiped");
    }
}
