//! The membership list (real `causeway node` processes, and a member
//! holding the cluster key that lies about its region): only listed peers
//! replicate, a node's region is the list's whatever it claims, and the
//! list changes under load without restarts or lost writes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/rogue.rs"]
mod rogue;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use causeway_engine::replication::ids::Region;
use causeway_engine::replication::wire::{Announce, Hello, Message, PROTOCOL_VERSION};
use libp2p::identity::Keypair;
use rogue::Rogue;
use serde_json::{json, Value};
use support::cluster::{causeway_bin, cluster_key, identity, wait_until, NodeProc, Options};

const CONVERGE: Duration = Duration::from_secs(60);

/// Writes the list atomically (a new file renamed over the old one).
fn write_list(path: &Path, members: &[(&str, &str)]) {
    let text: String = members
        .iter()
        .map(|(peer, region)| format!("[[member]]\npeer_id = {peer:?}\nregion = {region:?}\n\n"))
        .collect();
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn node(
    root: &Path,
    name: &str,
    region: &str,
    bootstrap: &[String],
    key: &Path,
    list: Option<&Path>,
) -> NodeProc {
    let options = Options {
        cluster_key_file: Some(key),
        membership_file: list,
        ..Options::default()
    };
    NodeProc::start_with(root, name, region, bootstrap, options)
}

#[test]
fn a_key_holder_not_on_the_list_cannot_replicate() {
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    let list = root.path().join("members.toml");
    let (a_id, b_id) = (identity(root.path(), "a"), identity(root.path(), "b"));
    write_list(&list, &[(&a_id, "us"), (&b_id, "eu")]);
    let a = node(root.path(), "a", "us", &[], &key, Some(&list));
    let b = node(root.path(), "b", "eu", &a.listen, &key, Some(&list));
    // c holds the key but is not listed.
    let c = node(root.path(), "c", "eu", &a.listen, &key, None);
    wait_until(CONVERGE, "a and b to replicate", || {
        a.replicating() == vec![b_id.clone()]
    });
    let stranger = c.write_doc("PUT", "from/c", &json!({"c": 1}));
    a.write_doc("PUT", "from/a", &json!({"a": 1}));
    wait_until(CONVERGE, "b to hold a's write", || {
        b.get_doc("from/a").is_some()
    });
    // Well past c's redials (100 ms to 1 s) and an anti-entropy round (3 s).
    std::thread::sleep(Duration::from_secs(5));
    assert!(a.replicating() == vec![b_id.clone()] && c.replicating().is_empty());
    assert!(c.get_doc("from/a").is_none(), "c received a's write");
    assert!(a.get_doc("from/c").is_none() && b.get_doc("from/c").is_none());
    println!(
        "a key holder not on the list: 0 of its writes accepted (heads {stranger}), 0 received"
    );
    // A node not listed in its own region does not start.
    let out = Command::new(causeway_bin())
        .args(["node", "--config"])
        .arg(root.path().join("b").join("node.toml"))
        .args(["--region", "ap", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(root.path().join("b2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not on the membership list"), "{stderr}");
}

/// A member listed in region `listed` that claims region `ap` in its hello
/// and answers every delta of `target` with a report, in its own name, that
/// it holds the write. Returns the answer to a `min_regions=1` write on
/// `target` (in region `us`) and the number of lying reports.
fn lie_about_region(target: &NodeProc, key: &Path, rogue_key: Keypair) -> (Value, u32) {
    let mut rogue = Rogue::connect_as(rogue_key, key, "test", &target.listen[0], true);
    let hello = rogue.envelope(Message::Hello(Hello {
        node: rogue.node_id(),
        region: Region::new("ap").unwrap(),
        version: PROTOCOL_VERSION,
        min_version: None,
        store: None,
    }));
    assert!(rogue.send(hello));
    let http = target.http.clone();
    let writer = std::thread::spawn(move || {
        support::cluster::http(
            &http,
            "PUT",
            "/v1/docs/wait/1?min_regions=1&timeout_ms=4000",
            &[("content-type", "application/json")],
            br#"{"x": 1}"#,
        )
    });
    let mut lies = 0;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until && !writer.is_finished() {
        for env in rogue.pump(Duration::from_millis(50)) {
            if let Message::Delta(d) = env.message {
                rogue.publish(rogue.envelope(Message::Announce(Announce {
                    origin: rogue.node_id(),
                    region: Region::new("ap").unwrap(),
                    doc: d.doc,
                    heads: d.heads,
                })));
                lies += 1;
            }
        }
    }
    let answer = writer.join().unwrap();
    assert!(lies >= 1, "the target published no delta to the rogue");
    (answer.json(), lies)
}

#[test]
fn a_region_claim_against_the_list_does_not_satisfy_min_regions() {
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    // Without a list, the lie works: the report counts as region ap.
    let open = node(root.path(), "open", "us", &[], &key, None);
    let (body, lies) = lie_about_region(&open, &key, Keypair::generate_ed25519());
    assert_eq!(body["durability"]["satisfied"], true, "{body}");
    assert_eq!(body["durability"]["regions"], json!(["ap"]), "{body}");
    println!("without a membership list: {lies} reports claiming region ap satisfied a min_regions=1 write");
    // With one that lists the liar in us, it does not.
    let list = root.path().join("members.toml");
    let liar = Keypair::generate_ed25519();
    let liar_id = liar.public().to_peer_id().to_base58();
    let a_id = identity(root.path(), "a");
    write_list(&list, &[(&a_id, "us"), (&liar_id, "us")]);
    let a = node(root.path(), "a", "us", &[], &key, Some(&list));
    let (body, lies) = lie_about_region(&a, &key, liar);
    assert_eq!(body["durability"]["satisfied"], false, "{body}");
    assert_eq!(body["durability"]["regions"], json!([]), "{body}");
    assert!(a.metric("causeway_region_claims_overridden_total", "") >= 1.0);
    let status = a.status();
    let peer = status["node"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == liar_id.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(peer["region"], "us", "{status}");
    println!("with the list: {lies} such reports, the write answered 202 unsatisfied, the liar shown in us");
}

#[test]
fn the_list_changes_under_load_without_restarts_or_lost_writes() {
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    let list = root.path().join("members.toml");
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| identity(root.path(), n))
        .collect();
    write_list(&list, &[(&ids[0], "us"), (&ids[1], "eu")]);
    let a = node(root.path(), "a", "us", &[], &key, Some(&list));
    let b = node(root.path(), "b", "eu", &a.listen, &key, Some(&list));
    wait_until(CONVERGE, "a and b to replicate", || {
        a.replicating().len() == 1 && b.replicating().len() == 1
    });
    let docs = 8;
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut c = None;
    let start = Instant::now();
    for i in 0..400usize {
        match i {
            // c is added to the list (every node reads the same file), then
            // started.
            100 => {
                write_list(&list, &[(&ids[0], "us"), (&ids[1], "eu"), (&ids[2], "ap")]);
                std::thread::sleep(Duration::from_millis(1500));
                c = Some(node(root.path(), "c", "ap", &a.listen, &key, Some(&list)));
            }
            // b is removed: disconnected by a and c without a restart.
            250 => write_list(&list, &[(&ids[0], "us"), (&ids[2], "ap")]),
            _ => {}
        }
        let node = match (i % 2, &c) {
            (1, Some(c)) => c,
            _ => &a,
        };
        let doc = format!("load/{}", i % docs);
        let k = format!("k{i}");
        node.write_doc("PATCH", &doc, &json!({ k.clone(): i }));
        acked.push((doc, k));
    }
    let writing = start.elapsed();
    let c = c.unwrap();
    wait_until(CONVERGE, "b to be cut off", || {
        !a.replicating().contains(&ids[1]) && !c.replicating().contains(&ids[1])
    });
    assert_eq!(a.replicating(), vec![ids[2].clone()]);
    let remaining = [&a, &c];
    let took = wait_until(CONVERGE, "a and c to converge", || {
        (0..docs).all(|n| support::cluster::converged(&remaining, &format!("load/{n}")))
    });
    let lost = support::cluster::lost_writes(&acked, &remaining);
    assert_eq!(lost, 0, "acknowledged writes missing on a or c");
    assert_eq!(a.metric("causeway_members", ""), 2.0);
    // b is not readmitted by a later write.
    let late = a.write_doc("PATCH", "load/0", &json!({"late": true}));
    std::thread::sleep(Duration::from_secs(2));
    let on_b = b.get_doc("load/0").map(|(v, _)| v).unwrap_or_default();
    assert!(
        on_b.get("late").is_none(),
        "b received {late} after removal"
    );
    println!(
        "{} writes acknowledged in {:.1} s while c was added to the list and started and b \
         was removed; a and c converged {:.1} s later; 0 lost; b cut off",
        acked.len(),
        writing.as_secs_f64(),
        took.as_secs_f64()
    );
}
