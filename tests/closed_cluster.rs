//! A closed cluster by default (real `causeway node` processes on
//! 127.0.0.1): only nodes holding the cluster key connect, a node without a
//! key and default settings cannot join one, and a node without a key
//! refuses to listen beyond loopback unless the operator opts in.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::json;
use support::cluster::{causeway_bin, wait_until, NodeProc, Options};

const CONVERGE: Duration = Duration::from_secs(60);

fn cluster_init(path: &Path) -> Output {
    Command::new(causeway_bin())
        .args(["cluster", "init", "--out"])
        .arg(path)
        .output()
        .unwrap()
}

/// A node named `name` holding the key in `key` (if any).
fn node(root: &Path, name: &str, bootstrap: &[String], key: Option<&Path>) -> NodeProc {
    let options = Options {
        cluster_key_file: key,
        ..Options::default()
    };
    NodeProc::start_with(root, name, "eu", bootstrap, options)
}

fn log(node: &NodeProc) -> String {
    std::fs::read_to_string(node.dir.join("node.log")).unwrap()
}

#[test]
fn cluster_init_writes_a_private_key_once() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("cluster.key");
    let out = cluster_init(&path);
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read(&path).unwrap();
    // Never replaced: the cluster's nodes may hold it.
    let again = cluster_init(&path);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{again:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), first);
}

#[test]
fn a_stranger_with_default_settings_cannot_join_a_keyed_cluster() {
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("cluster.key");
    let other_key = root.path().join("other.key");
    assert!(cluster_init(&key).status.success());
    assert!(cluster_init(&other_key).status.success());
    let a = node(root.path(), "a", &[], Some(&key));
    let b = node(root.path(), "b", &a.listen, Some(&key));
    // A stranger with default settings (same cluster id, no key), and a
    // node holding another cluster's key, both dialling a.
    let stranger = node(root.path(), "stranger", &a.listen, None);
    let other = node(root.path(), "other", &a.listen, Some(&other_key));
    let start = Instant::now();
    stranger.write_doc("PUT", "victim", &json!({"owned": true}));
    other.write_doc("PUT", "victim2", &json!({"owned": true}));
    a.write_doc("PUT", "members/a", &json!({"from": "a"}));
    b.write_doc("PUT", "members/b", &json!({"from": "b"}));
    wait_until(CONVERGE, "a and b to exchange their writes", || {
        a.get_doc("members/b").is_some() && b.get_doc("members/a").is_some()
    });
    // Past an anti-entropy round (3 s in tests) and several redials.
    std::thread::sleep(Duration::from_secs(5));
    for member in [&a, &b] {
        assert_eq!(member.get_doc("victim"), None, "{}", member.name);
        assert_eq!(member.get_doc("victim2"), None, "{}", member.name);
        assert_eq!(member.replicating().len(), 1, "{}", member.name);
    }
    for outsider in [&stranger, &other] {
        assert_eq!(outsider.get_doc("members/a"), None, "{}", outsider.name);
        assert!(outsider.replicating().is_empty(), "{}", outsider.name);
    }
    assert!(log(&a).contains("cluster key: only nodes holding it can connect"));
    assert!(log(&stranger).contains("no cluster key: listening on loopback only"));
    println!(
        "a keyed pair and two outsiders (no key; another key) for {:.1} s: \
         the members replicate, 0 documents exchanged with the outsiders",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn without_a_key_a_node_listens_beyond_loopback_only_when_told_to() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("open");
    let out = Command::new(causeway_bin())
        .args(["node", "--data-dir"])
        .arg(&dir)
        .args([
            "--listen",
            "/ip4/0.0.0.0/tcp/0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("network.listen") && stderr.contains("causeway cluster init"),
        "{stderr}"
    );
    // With the explicit setting it starts, and warns.
    let options = Options {
        listen: "/ip4/0.0.0.0/tcp/0",
        network: "insecure_open_cluster = true",
        ..Options::default()
    };
    let open = NodeProc::start_with(root.path(), "open", "eu", &[], options);
    assert!(
        log(&open).contains("any peer that reaches this node can join the cluster"),
        "{}",
        log(&open)
    );
    println!("a node without a key on 0.0.0.0: refused at start; with insecure_open_cluster: started, with a warning");
}
