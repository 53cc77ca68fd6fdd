//! A peer can only speak for itself (real `causeway node` processes and a
//! hostile member holding the cluster key): hellos, deltas and
//! announcements that claim another node are refused and counted, a forged
//! report does not satisfy a `min_regions` write, and identities that
//! connect once do not keep a real peer from replicating.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/rogue.rs"]
mod rogue;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use causeway_engine::replication::ids::{NodeId, Region};
use causeway_engine::replication::wire::{
    Ack, Announce, Bytes, Delta, Heads, Hello, Message, PROTOCOL_VERSION,
};
use causeway_engine::{DocId, Engine, EngineConfig};
use rogue::Rogue;
use serde_json::{json, Value};
use support::cluster::{cluster_key, wait_until, NodeProc, Options};

const CONVERGE: Duration = Duration::from_secs(60);

fn node(root: &Path, name: &str, region: &str, bootstrap: &[String], key: &Path) -> NodeProc {
    let options = Options {
        cluster_key_file: Some(key),
        ..Options::default()
    };
    NodeProc::start_with(root, name, region, bootstrap, options)
}

/// Valid changes creating `doc` with `value`, made in a store of their own,
/// with the heads after them.
fn changes(doc: &str, value: &Value) -> (Vec<Bytes>, Heads) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), EngineConfig::default()).unwrap();
    let doc = DocId::new(doc).unwrap();
    let commit = engine.put_json(&doc, value).unwrap();
    let changes = engine.changes_since(&doc, &[]).unwrap();
    (
        changes.into_iter().map(Bytes).collect(),
        Heads::new(&commit.heads),
    )
}

fn node_id(peer_id: &str) -> NodeId {
    NodeId::new(peer_id).unwrap()
}

fn region(name: &str) -> Region {
    Region::new(name).unwrap()
}

/// The region a node's status gives for a peer.
fn region_of(node: &NodeProc, peer_id: &str) -> Option<String> {
    let status = node.status();
    status["node"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == peer_id)
        .and_then(|p| p["region"].as_str().map(str::to_string))
}

#[test]
fn a_member_cannot_speak_for_another_node() {
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    let a = node(root.path(), "a", "us", &[], &key);
    let b = node(root.path(), "b", "eu", &a.listen, &key);
    a.write_doc("PUT", "members/a", &json!({"from": "a"}));
    wait_until(CONVERGE, "b to hold a's write", || {
        b.get_doc("members/a").is_some() && region_of(&a, &b.peer_id).is_some()
    });
    let mut rogue = Rogue::connect(&key, "test", &a.listen[0], true);
    let b_id = node_id(&b.peer_id);

    // A hello naming b, on the rogue's own connection.
    let hello = rogue.envelope(Message::Hello(Hello {
        node: b_id.clone(),
        region: region("ap"),
        version: PROTOCOL_VERSION,
        min_version: None,
        store: None,
    }));
    assert!(!rogue.send(hello), "a hello naming b was accepted");
    // A delta b did not make, and an announcement that b holds a's write
    // in region ap, both signed by the rogue.
    let (forged, heads) = changes("forged/x", &json!({"by": "b?"}));
    rogue.publish(rogue.envelope(Message::Delta(Delta {
        origin: b_id.clone(),
        region: region("ap"),
        doc: DocId::new("forged/x").unwrap(),
        changes: forged.clone(),
        heads: heads.clone(),
    })));
    let (_, a_heads) = a.get_doc("members/a").unwrap();
    let a_heads: Vec<_> = a_heads.split(',').map(|h| h.parse().unwrap()).collect();
    rogue.publish(rogue.envelope(Message::Announce(Announce {
        origin: b_id.clone(),
        region: region("ap"),
        doc: DocId::new("members/a").unwrap(),
        heads: Heads::new(&a_heads),
    })));
    rogue.pump(Duration::from_secs(1));

    let refused = a.metric("causeway_messages_rejected_total", "forged_identity");
    assert_eq!(refused, 3.0, "forged messages refused by a");
    assert_eq!(a.get_doc("forged/x"), None);
    assert_eq!(region_of(&a, &b.peer_id).as_deref(), Some("eu"));
    let place = a.request("GET", "/v1/where/members/a", &[], b"").json();
    let regions: Vec<&str> = place["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["region"].as_str().unwrap())
        .collect();
    assert!(!regions.contains(&"ap"), "{place}");
    assert!(
        rogue.connected(),
        "three refusals are below the block threshold"
    );

    // The same changes under the rogue's own name are a member's write:
    // the refusals were about the forgery.
    rogue.publish(rogue.envelope(Message::Delta(Delta {
        origin: rogue.node_id(),
        region: region("ap"),
        doc: DocId::new("forged/x").unwrap(),
        changes: forged,
        heads,
    })));
    wait_until(CONVERGE, "a to take the rogue's own delta", || {
        rogue.pump(Duration::from_millis(100));
        a.get_doc("forged/x").is_some()
    });
    assert_eq!(
        a.metric("causeway_messages_rejected_total", "forged_identity"),
        3.0
    );
    println!(
        "forged hello, delta and announcement naming b: 3 refused and counted, \
         nothing stored, b's region still eu; the same delta under the rogue's own name stored"
    );
}

#[test]
fn a_forged_report_does_not_satisfy_min_regions() {
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    let a = node(root.path(), "a", "us", &[], &key);
    let mut rogue = Rogue::connect(&key, "test", &a.listen[0], true);
    // The rogue has seen a's subscription; a may not have taken the
    // rogue's yet, and until it does it publishes to no one. Warm-up
    // writes until one of a's deltas reaches the rogue.
    let mut warm_up = 0;
    wait_until(CONVERGE, "a's gossip to reach the rogue", || {
        warm_up += 1;
        a.write_doc("PUT", &format!("warm/{warm_up}"), &json!({ "n": warm_up }));
        rogue
            .pump(Duration::from_millis(200))
            .iter()
            .any(|env| matches!(env.message, Message::Delta(_)))
    });
    let nobody = node_id(&libp2p::PeerId::random().to_base58());
    let http = a.http.clone();
    let writer = std::thread::spawn(move || {
        let started = Instant::now();
        let r = support::cluster::http(
            &http,
            "PUT",
            "/v1/docs/wait/1?min_regions=1&timeout_ms=4000",
            &[("content-type", "application/json")],
            br#"{"x": 1}"#,
        );
        (r, started.elapsed())
    });
    // Every delta a publishes is answered at once by a report that a node
    // of region eu holds it: a forgery, signed by the rogue.
    let mut forged = 0;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until && !writer.is_finished() {
        for env in rogue.pump(Duration::from_millis(50)) {
            if let Message::Delta(d) = env.message {
                rogue.publish(rogue.envelope(Message::Announce(Announce {
                    origin: nobody.clone(),
                    region: region("eu"),
                    doc: d.doc,
                    heads: d.heads,
                })));
                forged += 1;
            }
        }
    }
    let (answer, waited) = writer.join().unwrap();
    assert!(forged >= 1, "a published no delta to the rogue");
    assert_eq!(answer.status, 202, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["durability"]["satisfied"], false, "{body}");
    assert_eq!(body["durability"]["regions"], json!([]), "{body}");
    assert_eq!(
        a.metric("causeway_messages_rejected_total", "forged_identity"),
        forged as f64
    );
    println!(
        "a min_regions=1 write with {forged} forged reports of region eu: \
         answered 202 unsatisfied after {:.1} s, the reports refused",
        waited.as_secs_f64()
    );
}

/// More identities than the peer table holds.
const THROWAWAY: usize = 1025;

#[test]
fn throwaway_identities_do_not_keep_a_real_peer_out() {
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    let a = node(root.path(), "a", "us", &[], &key);
    let start = Instant::now();
    let workers = 4;
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let (key, addr) = (key.clone(), a.listen[0].clone());
            std::thread::spawn(move || {
                for _ in (w..THROWAWAY).step_by(workers) {
                    let mut r = Rogue::connect(&key, "test", &addr, false);
                    let hello = r.envelope(Message::Hello(Hello {
                        node: r.node_id(),
                        region: region("eu"),
                        version: PROTOCOL_VERSION,
                        min_version: None,
                        store: None,
                    }));
                    assert!(r.send(hello), "a refused a member's own hello");
                    r.disconnect();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let flood = start.elapsed();
    let b = node(root.path(), "b", "eu", &a.listen, &key);
    b.write_doc("PUT", "real/b", &json!({"from": "b"}));
    let joined = wait_until(CONVERGE, "a to hold the real peer's write", || {
        a.get_doc("real/b").is_some()
    });
    let replicating = a.replicating();
    assert!(replicating.contains(&b.peer_id), "{replicating:?}");
    let forgotten = a.metric("causeway_peers_forgotten_total", "");
    assert!(forgotten >= 1.0, "the peer table made no room");
    println!(
        "{THROWAWAY} throwaway identities connected, said hello and left in {:.1} s; \
         then a real peer replicated within {:.1} s; {forgotten} forgotten; a's RSS {} MiB",
        flood.as_secs_f64(),
        joined.as_secs_f64(),
        a.rss_kib() / 1024
    );
}

#[test]
fn a_peer_over_its_rate_waits_and_loses_nothing_while_others_replicate() {
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    let options = Options {
        cluster_key_file: Some(&key),
        network: "max_peer_messages_per_sec = 50",
        ..Options::default()
    };
    let a = NodeProc::start_with(root.path(), "a", "us", &[], options);
    let b = node(root.path(), "b", "eu", &a.listen, &key);
    let mut rogue = Rogue::connect(&key, "test", &a.listen[0], false);
    // 100 messages of burst, then 50 a second: 300 valid (empty) acks, each
    // awaited, are answered over about four seconds, none dropped; b's
    // writes replicate meanwhile.
    let sent = 300;
    let flooding = std::thread::spawn(move || {
        let start = Instant::now();
        let accepted = (0..sent)
            .filter(|_| {
                let ack = rogue.envelope(Message::Ack(Ack { entries: vec![] }));
                rogue.send(ack)
            })
            .count();
        (accepted, start.elapsed())
    });
    b.write_doc("PUT", "during/flood", &json!({"from": "b"}));
    let replicated = wait_until(CONVERGE, "a to hold b's write during the flood", || {
        a.get_doc("during/flood").is_some()
    });
    let (accepted, took) = flooding.join().unwrap();
    assert_eq!(
        accepted, sent,
        "an over-rate message was dropped or refused"
    );
    let waited = a.metric("causeway_messages_rate_limited_total", "kind=\"direct\"");
    assert!(waited >= 1.0, "no message waited for the rate");
    println!(
        "{sent} direct messages from one peer at a rate of 50/s: all answered in {:.1} s, \
         {waited} waited for the rate; another peer's write replicated within {:.1} s",
        took.as_secs_f64(),
        replicated.as_secs_f64()
    );
}

#[test]
fn a_peer_that_keeps_sending_refused_messages_is_blocked_across_restarts() {
    use causeway_node::network::sanctions::REFUSALS_BEFORE_BLOCK;
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    let mut a = node(root.path(), "a", "us", &[], &key);
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let rogue_id = identity.public().to_peer_id().to_base58();
    let mut rogue = Rogue::connect_as(identity.clone(), &key, "test", &a.listen[0], false);
    let start = Instant::now();
    let mut sent = 0;
    while rogue.connected() && sent < 10 * REFUSALS_BEFORE_BLOCK {
        assert!(!rogue.send(b"\x83garbage".to_vec()), "garbage accepted");
        sent += 1;
        rogue.pump(Duration::from_millis(1));
    }
    let to_block = start.elapsed();
    assert!(
        !rogue.connected(),
        "still connected after {sent} refused messages"
    );
    assert!(
        (REFUSALS_BEFORE_BLOCK + 1..=REFUSALS_BEFORE_BLOCK + 2).contains(&sent),
        "disconnected after {sent} messages"
    );
    wait_until(CONVERGE, "a to count the block", || {
        a.metric("causeway_peers_blocked", "") == 1.0
    });
    assert_eq!(a.metric("causeway_peers_sanctioned_total", ""), 1.0);
    let log = std::fs::read_to_string(a.dir.join("node.log")).unwrap();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        lines("refused a message from a peer"),
        1,
        "one line, not one per message"
    );
    assert_eq!(
        lines("blocked a peer that kept sending refused messages"),
        1
    );
    let file = std::fs::read_to_string(a.dir.join("blocked-peers.json")).unwrap();
    assert!(file.contains(&rogue_id), "{file}");

    // Blocked after a restart (SIGKILL: the block was on disk at once);
    // another member is not.
    a.kill();
    a.restart();
    let again = Rogue::try_connect_as(identity, &key, "test", &a.listen[0], true);
    assert!(again.is_err(), "the blocked peer was let back in");
    let log = std::fs::read_to_string(a.dir.join("node.log")).unwrap();
    assert!(log.contains("peer still blocked for misbehaving"), "{log}");
    let mut member = Rogue::connect(&key, "test", &a.listen[0], true);
    let hello = member.envelope(Message::Hello(Hello {
        node: member.node_id(),
        region: region("eu"),
        version: PROTOCOL_VERSION,
        min_version: None,
        store: None,
    }));
    assert!(member.send(hello));
    a.write_doc("PUT", "after/block", &json!({"ok": true}));
    println!(
        "a peer sending undecodable messages: blocked and disconnected after {sent} refusals \
         in {:.2} s, one log line for them; still blocked after a restart, another member admitted",
        to_block.as_secs_f64()
    );
}
