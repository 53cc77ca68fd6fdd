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

/// A directory for the nodes' data, holding a new cluster key.
fn root_with_key() -> (tempfile::TempDir, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("cluster.key");
    assert!(cluster_init(&key).status.success());
    (root, key)
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

#[test]
fn members_join_and_leave_under_load_without_losing_writes() {
    let (root, key) = root_with_key();
    let a = node(root.path(), "a", &[], Some(&key));
    let mut b = node(root.path(), "b", &a.listen, Some(&key));
    wait_until(CONVERGE, "a and b to replicate", || {
        a.replicating().len() == 1 && b.replicating().len() == 1
    });
    let docs = 8;
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut members: Vec<String> = vec!["a".into(), "b".into()];
    let (mut c, mut d) = (None, None);
    let start = Instant::now();
    for i in 0..600usize {
        match i {
            // A member joins (holding the key, bootstrapping at a).
            150 => c = Some(node(root.path(), "c", &a.listen, Some(&key))),
            // A member leaves: SIGTERM, which hands its latest writes over.
            300 => {
                assert!(b.terminate().success());
                members.retain(|m| m != "b");
            }
            // Another joins, knowing only c.
            450 => {
                let c = c.as_ref().unwrap();
                d = Some(node(root.path(), "d", &c.listen, Some(&key)));
            }
            _ => {}
        }
        if i == 150 || i == 450 {
            members.push(if i == 150 { "c" } else { "d" }.into());
        }
        let target = &members[i % members.len()];
        let node = match target.as_str() {
            "a" => &a,
            "b" => &b,
            "c" => c.as_ref().unwrap(),
            _ => d.as_ref().unwrap(),
        };
        let doc = format!("load/{}", i % docs);
        let k = format!("k{i}");
        node.write_doc("PATCH", &doc, &json!({ k.clone(): i }));
        acked.push((doc, k));
    }
    let writing = start.elapsed();
    let (c, d) = (c.unwrap(), d.unwrap());
    let remaining = [&a, &c, &d];
    let took = wait_until(CONVERGE, "the remaining members to converge", || {
        (0..docs).all(|n| support::cluster::converged(&remaining, &format!("load/{n}")))
    });
    let lost = support::cluster::lost_writes(&acked, &remaining);
    assert_eq!(lost, 0, "acknowledged writes missing on a remaining member");
    println!(
        "{} writes acknowledged in {:.1} s while c joined, b left (SIGTERM) and d joined \
         (knowing only c); the remaining members converged {:.1} s later; 0 lost",
        acked.len(),
        writing.as_secs_f64(),
        took.as_secs_f64()
    );
}

/// A member holding `own` and accepting `accepted` as well.
fn keyed(
    root: &Path,
    name: &str,
    bootstrap: &[String],
    own: &Path,
    accepted: &[&Path],
) -> NodeProc {
    let options = Options {
        cluster_key_file: Some(own),
        accept_cluster_key_files: accepted,
        ..Options::default()
    };
    NodeProc::start_with(root, name, "eu", bootstrap, options)
}

#[test]
fn the_cluster_key_rotates_under_load_without_downtime() {
    let root = tempfile::tempdir().unwrap();
    let (old, new) = (root.path().join("old.key"), root.path().join("new.key"));
    assert!(cluster_init(&old).status.success());
    assert!(cluster_init(&new).status.success());
    let a = keyed(root.path(), "a", &[], &old, &[]);
    let b = keyed(root.path(), "b", &a.listen, &old, &[]);
    let c = keyed(root.path(), "c", &a.listen, &old, &[]);
    let mut nodes = [a, b, c];
    wait_until(CONVERGE, "a full mesh under the old key", || {
        nodes.iter().all(|n| n.replicating().len() == 2)
    });
    // Three rolling restarts, one node at a time, writes going to the
    // others: accept the new key; dial under it, still accepting the old;
    // drop the old.
    let steps: [(&Path, &[&Path]); 3] = [(&old, &[&new]), (&new, &[&old]), (&new, &[])];
    let mut acked: Vec<String> = Vec::new();
    let mut seq = 0;
    let start = Instant::now();
    for (own, accepted) in steps {
        for i in 0..nodes.len() {
            assert!(nodes[i].terminate().success());
            // The others take writes while node i is down.
            for j in (0..nodes.len()).filter(|&j| j != i) {
                for _ in 0..10 {
                    let k = format!("k{seq}");
                    nodes[j].write_doc("PATCH", "rotation/doc", &json!({ k.clone(): seq }));
                    acked.push(k);
                    seq += 1;
                }
            }
            let others: Vec<String> = (0..nodes.len())
                .filter(|&j| j != i)
                .flat_map(|j| nodes[j].listen.clone())
                .collect();
            let name = nodes[i].name.clone();
            nodes[i] = keyed(root.path(), &name, &others, own, accepted);
            wait_until(CONVERGE, "the restarted node to rejoin both others", || {
                nodes.iter().all(|n| n.replicating().len() == 2)
            });
        }
    }
    let rotation = start.elapsed();
    let refs: Vec<&NodeProc> = nodes.iter().collect();
    wait_until(CONVERGE, "the members to converge", || {
        support::cluster::converged(&refs, "rotation/doc")
    });
    for n in &nodes {
        let (value, _) = n.get_doc("rotation/doc").unwrap();
        let missing = acked
            .iter()
            .filter(|k| value.get(k.as_str()).is_none())
            .count();
        assert_eq!(missing, 0, "acknowledged writes missing on {}", n.name);
    }
    // A node that still holds only the old key is out.
    let stale = node(root.path(), "stale", &nodes[0].listen, Some(&old));
    stale.write_doc("PUT", "stale/doc", &json!({"x": 1}));
    std::thread::sleep(Duration::from_secs(5));
    assert!(stale.replicating().is_empty());
    for n in &nodes {
        assert_eq!(n.get_doc("stale/doc"), None, "{}", n.name);
        assert_eq!(n.replicating().len(), 2, "{}", n.name);
    }
    println!(
        "key rotated by three rolling restarts of 3 nodes in {:.1} s, {} writes acknowledged \
         meanwhile, 0 lost; a node holding only the old key is refused afterwards",
        rotation.as_secs_f64(),
        acked.len()
    );
}

#[test]
fn a_connection_stalled_in_the_key_handshake_is_dropped() {
    use std::io::{Read, Write};
    let (root, key) = root_with_key();
    let a = node(root.path(), "a", &[], Some(&key));
    // The TCP address of a's libp2p listener.
    let addr: Vec<&str> = a.listen[0].split('/').collect();
    let mut stranger = std::net::TcpStream::connect(format!("{}:{}", addr[2], addr[4])).unwrap();
    // A nonce's worth and a little more, then silence.
    stranger.write_all(&[7u8; 30]).unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let mut got = 0;
    let closed = loop {
        match stranger.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    let waited = start.elapsed();
    assert!(
        closed,
        "the node kept a stalled handshake open for {waited:?}"
    );
    assert!(got <= 24, "the node sent more than its nonce: {got} bytes");
    a.write_doc("PUT", "still/serving", &json!({"ok": true}));
    println!(
        "a connection that stalls in the key handshake is closed after {:.1} s",
        waited.as_secs_f64()
    );
}
