//! Two replication cores over real engines, wired back to back in memory:
//! deltas, reconciliation on connect, per-document sync, progress, and
//! refusal of bad messages.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::random::SplitMix64;
use causeway_engine::replication::wire::{
    Ack, AckEntry, Bytes, Delta, Envelope, Heads, Hello, Message, RangeBody, Reconcile, SyncFrame,
    GOSSIP_FORMAT_VERSION, HELLO_VERSION, MAX_CHANGES_PER_DELTA, MAX_GOSSIP_BYTES,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
use causeway_engine::replication::{
    reason_name, Channel, Inbound, Members, Output, Replicator, ReplicatorConfig, Verdict,
    MAX_ACK_READS,
};
use causeway_engine::{Engine, SyncState};
use common::{fresh, id};
use serde_json::json;
use tempfile::TempDir;

struct Node {
    _dir: TempDir,
    core: Replicator,
}

fn node(name: &str, region: &str) -> Node {
    node_with(name, region, |_| {})
}

fn node_with(name: &str, region: &str, tune: impl FnOnce(&mut ReplicatorConfig)) -> Node {
    let (dir, engine) = fresh();
    let mut config = ReplicatorConfig::new(
        NodeId::new(name).unwrap(),
        Region::new(region).unwrap(),
        ClusterId::new("test").unwrap(),
    );
    tune(&mut config);
    Node {
        _dir: dir,
        core: Replicator::new(engine, config, Duration::ZERO).unwrap(),
    }
}

/// Delivers `src`'s outputs to `dst`; returns how many there were.
fn deliver(src: &mut Node, from: &NodeId, dst: &mut Node, now: Duration) -> usize {
    deliver_watching(src, from, dst, now, &mut |_| {})
}

/// [`deliver`], showing `watch` each message on its way.
fn deliver_watching(
    src: &mut Node,
    from: &NodeId,
    dst: &mut Node,
    now: Duration,
    watch: &mut impl FnMut(&Message),
) -> usize {
    let mut delivered = 0;
    while let Some(out) = src.core.poll_output() {
        delivered += 1;
        let (channel, bytes) = match out {
            Output::Publish(bytes) => (Channel::Gossip, bytes),
            Output::Send { bytes, .. } => (Channel::Direct, bytes),
            Output::Misbehaving { peer, reason } => panic!("{peer} misbehaved: {reason}"),
        };
        watch(&Envelope::decode(&bytes, usize::MAX).unwrap().message);
        let inbound = Inbound {
            from,
            author: from,
            channel,
            bytes: &bytes,
        };
        dst.core.handle_message(now, inbound).unwrap();
    }
    delivered
}

/// Delivers outputs between the two nodes until both are quiet.
fn pump(a: &mut Node, an: &NodeId, b: &mut Node, bn: &NodeId, now: Duration) {
    while deliver(a, an, b, now) + deliver(b, bn, a, now) > 0 {}
}

fn commit(n: &mut Node, doc: &str, value: serde_json::Value) {
    let engine: Engine = n.core.engine().clone();
    let doc = id(doc);
    let before = engine.heads(&doc).unwrap_or_default();
    let c = engine.merge_json(&doc, &value).unwrap();
    let changes = engine.changes_since(&doc, &before).unwrap();
    n.core
        .handle_local_commit(Duration::ZERO, &doc, changes, &c.heads);
}

#[test]
fn deltas_reconciliation_and_sync_converge_two_nodes() {
    let mut a = node("a", "eu");
    let mut b = node("b", "us");
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let mut rng = SplitMix64::new(1);
    // Written before they ever met: found by reconciliation on connect.
    for i in 0..30 {
        commit(&mut a, &format!("pre/a{i}"), json!({"i": i}));
    }
    commit(&mut b, "pre/b", json!({"b": true}));
    while a.core.poll_output().is_some() {}
    while b.core.poll_output().is_some() {}
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    b.core.handle_connect(Duration::ZERO, &an, &mut rng);
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    for i in 0..30 {
        let doc = id(&format!("pre/a{i}"));
        assert_eq!(b.core.engine().get_json(&doc).unwrap(), json!({"i": i}));
    }
    assert_eq!(
        a.core.engine().get_json(&id("pre/b")).unwrap(),
        json!({"b": true})
    );
    assert!(a.core.is_idle() && b.core.is_idle());

    // A live write travels as a delta and is acknowledged.
    commit(&mut a, "live/1", json!({"x": 1}));
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    assert_eq!(
        b.core.engine().get_json(&id("live/1")).unwrap(),
        json!({"x": 1})
    );
    let now = Duration::from_secs(1);
    a.core.handle_timeout(now, &mut rng).unwrap();
    b.core.handle_timeout(now, &mut rng).unwrap();
    pump(&mut a, &an, &mut b, &bn, now);
    let heads = a.core.engine().heads(&id("live/1")).unwrap();
    assert_eq!(
        a.core.progress().known_heads(&bn, &id("live/1")),
        Some(&heads[..])
    );
    assert!(b.core.stats().delta_changes_applied > 0);
    assert!(a.core.stats().reconcile_differences + b.core.stats().reconcile_differences > 0);
}

#[test]
fn a_delta_with_missing_dependencies_triggers_a_sync_with_its_sender() {
    let mut a = node("a", "eu");
    let mut b = node("b", "us");
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let mut rng = SplitMix64::new(2);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    b.core.handle_connect(Duration::ZERO, &an, &mut rng);
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    commit(&mut a, "doc/1", json!({"v": 1}));
    // The first delta is lost.
    while a.core.poll_output().is_some() {}
    commit(&mut a, "doc/1", json!({"v": 2}));
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    assert_eq!(
        b.core.engine().get_json(&id("doc/1")).unwrap(),
        json!({"v": 2})
    );
    assert_eq!(
        a.core.engine().heads(&id("doc/1")).unwrap(),
        b.core.engine().heads(&id("doc/1")).unwrap()
    );
}

/// A delta for `doc` from node "c" in cluster `cluster`, with valid changes.
fn delta_bytes(cluster: &str, doc: &str) -> (Envelope, Vec<Vec<u8>>) {
    let (_dir, engine) = fresh();
    let doc = id(doc);
    let c = engine.put_json(&doc, &json!({"a": 1})).unwrap();
    let changes = engine.changes_since(&doc, &[]).unwrap();
    let env = Envelope {
        cluster: ClusterId::new(cluster).unwrap(),
        message: Message::Delta(Delta {
            origin: NodeId::new("c").unwrap(),
            region: Region::new("eu").unwrap(),
            doc: doc.clone(),
            changes: changes.iter().cloned().map(Bytes).collect(),
            heads: Heads::new(&c.heads),
        }),
    };
    (env, changes)
}

/// Replaces the first occurrence of `from` in `bytes` by `to` (same length).
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    bytes[at..at + from.len()].copy_from_slice(to);
    bytes
}

#[test]
fn every_kind_of_bad_message_is_refused_counted_and_changes_nothing() {
    let (good, _) = delta_bytes("test", "bad/doc");
    let good = good.encode();
    let tampered = {
        let (mut env, _) = delta_bytes("test", "bad/doc");
        let Message::Delta(d) = &mut env.message else {
            unreachable!()
        };
        let change = &mut d.changes.last_mut().unwrap().0;
        let middle = change.len() / 2;
        change[middle] ^= 0x01;
        env.encode()
    };
    let too_many_changes = {
        let (mut env, _) = delta_bytes("test", "bad/doc");
        let Message::Delta(d) = &mut env.message else {
            unreachable!()
        };
        d.changes = vec![Bytes(vec![0]); MAX_CHANGES_PER_DELTA + 1];
        env.encode()
    };
    let future_version = {
        let mut out = Vec::new();
        let (env, _) = delta_bytes("test", "bad/doc");
        ciborium::into_writer(&(PROTOCOL_VERSION + 1, "test", env.message), &mut out).unwrap();
        out
    };
    // A kind a newer build sends, in this protocol version.
    let unknown_kind = {
        let mut out = Vec::new();
        let batch = std::collections::BTreeMap::from([("batch", vec![1u8, 2])]);
        ciborium::into_writer(&(PROTOCOL_VERSION, "test", batch), &mut out).unwrap();
        out
    };
    // c's hello: wrong on gossip, and forged when b sends it directly.
    let hello_from_c = Envelope {
        cluster: ClusterId::new("test").unwrap(),
        message: Message::Hello(Hello {
            node: NodeId::new("c").unwrap(),
            region: Region::new("eu").unwrap(),
            version: PROTOCOL_VERSION,
            min_version: None,
            store: None,
        }),
    }
    .encode();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"\x83garbage".to_vec()),
        ("too_large", vec![0u8; MAX_GOSSIP_BYTES + 1]),
        ("unsupported_version", future_version),
        ("unknown_kind", unknown_kind),
        (
            "invalid_doc_id",
            patch(good.clone(), b"bad/doc", b"bad/do\0"),
        ),
        ("invalid_name", patch(good.clone(), b"eu", b"EU")),
        ("limit_exceeded", too_many_changes),
        ("wrong_cluster", delta_bytes("other", "bad/doc").0.encode()),
        ("bad_change", tampered),
        ("wrong_channel", hello_from_c.clone()),
    ];
    let mut a = node("a", "eu");
    let (bn, cn) = (NodeId::new("b").unwrap(), NodeId::new("c").unwrap());
    let mut rng = SplitMix64::new(3);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    while a.core.poll_output().is_some() {}
    for (reason, bytes) in &cases {
        let verdict = a
            .core
            .handle_message(Duration::ZERO, Inbound::gossip(&bn, &cn, bytes))
            .unwrap();
        assert_eq!(verdict, Verdict::Reject, "{reason}");
        assert_eq!(a.core.stats().rejected.get(reason), Some(&1), "{reason}");
        match a.core.poll_output() {
            Some(Output::Misbehaving { peer, reason: why }) => {
                assert_eq!(peer, bn);
                assert_eq!(reason_name(&why), *reason);
            }
            other => panic!("{reason}: expected a misbehaving report, got {other:?}"),
        }
        assert!(a.core.poll_output().is_none(), "{reason}: sent something");
        // Nothing was stored.
        assert!(
            a.core.engine().list("", None, 10).unwrap().ids.is_empty(),
            "{reason}"
        );
        assert!(a.core.engine().heads(&id("bad/doc")).is_err(), "{reason}");
    }
    // A hello on the direct channel naming another node than the sender:
    // b may not relabel c's region.
    let verdict = a
        .core
        .handle_message(Duration::ZERO, Inbound::direct(&bn, &hello_from_c))
        .unwrap();
    assert_eq!(verdict, Verdict::Reject);
    assert_eq!(a.core.stats().rejected.get("forged_identity"), Some(&1));
    match a.core.poll_output() {
        Some(Output::Misbehaving { peer, reason }) => {
            assert_eq!(
                (peer, reason_name(&reason)),
                (bn.clone(), "forged_identity")
            );
        }
        other => panic!("forged hello: expected a misbehaving report, got {other:?}"),
    }
    // The good delta (origin c) signed by b: b may not speak for c.
    let verdict = a
        .core
        .handle_message(Duration::ZERO, Inbound::gossip(&bn, &bn, &good))
        .unwrap();
    assert_eq!(verdict, Verdict::Reject);
    assert_eq!(a.core.stats().rejected.get("forged_identity"), Some(&2));
    assert!(a.core.engine().heads(&id("bad/doc")).is_err());
    assert!(
        a.core.progress().peer(&cn).is_none(),
        "c's region relabelled"
    );
    let rejected = &a.core.stats().rejected;
    assert_eq!(rejected.values().sum::<u64>(), cases.len() as u64 + 2);
    // The untampered delta is accepted, so the refusals were about the faults.
    let verdict = a
        .core
        .handle_message(Duration::ZERO, Inbound::gossip(&bn, &cn, &good))
        .unwrap();
    assert_eq!(verdict, Verdict::Accept);
    assert_eq!(
        a.core.engine().get_json(&id("bad/doc")).unwrap(),
        json!({"a": 1})
    );
}

#[test]
fn with_a_membership_list_regions_come_from_the_list_and_strangers_are_ignored() {
    let (good, _) = delta_bytes("test", "listed/doc");
    let good = good.encode();
    let mut a = node("a", "eu");
    let (bn, cn, xn) = (
        NodeId::new("b").unwrap(),
        NodeId::new("c").unwrap(),
        NodeId::new("x").unwrap(),
    );
    let region = |r: &str| Region::new(r).unwrap();
    // b is listed in "us" but says "eu"; c (the delta's origin) is listed
    // in "ap" while its delta says "eu"; x is not listed.
    let members: Members = [
        (NodeId::new("a").unwrap(), region("eu")),
        (bn.clone(), region("us")),
        (cn.clone(), region("ap")),
    ]
    .into_iter()
    .collect();
    // A region recorded before the list is corrected when the list comes.
    let mut rng = SplitMix64::new(5);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    let hello_from_b = Envelope {
        cluster: ClusterId::new("test").unwrap(),
        message: Message::Hello(Hello {
            node: bn.clone(),
            region: region("eu"),
            version: PROTOCOL_VERSION,
            min_version: None,
            store: None,
        }),
    }
    .encode();
    a.core
        .handle_message(Duration::ZERO, Inbound::direct(&bn, &hello_from_b))
        .unwrap();
    assert_eq!(
        a.core.progress().peer(&bn).unwrap().region,
        Some(region("eu"))
    );
    a.core.set_members(Duration::ZERO, Some(members)).unwrap();
    assert_eq!(
        a.core.progress().peer(&bn).unwrap().region,
        Some(region("us"))
    );
    a.core
        .handle_message(Duration::ZERO, Inbound::direct(&bn, &hello_from_b))
        .unwrap();
    assert_eq!(
        a.core.progress().peer(&bn).unwrap().region,
        Some(region("us"))
    );
    // A stranger's message, or a member's relayed by a stranger, changes
    // nothing and is not a refusal (no sanction).
    for (from, author) in [(&xn, &xn), (&xn, &cn), (&bn, &xn)] {
        let verdict = a
            .core
            .handle_message(Duration::ZERO, Inbound::gossip(from, author, &good))
            .unwrap();
        assert_eq!(verdict, Verdict::Ignore);
    }
    assert_eq!(a.core.stats().not_members, 3);
    assert!(a.core.stats().rejected.is_empty());
    assert!(a.core.engine().heads(&id("listed/doc")).is_err());
    assert!(a.core.progress().peer(&xn).is_none());
    // A member's delta applies; its region is the list's.
    let verdict = a
        .core
        .handle_message(Duration::ZERO, Inbound::gossip(&bn, &cn, &good))
        .unwrap();
    assert_eq!(verdict, Verdict::Accept);
    assert!(a.core.engine().heads(&id("listed/doc")).is_ok());
    assert_eq!(
        a.core.progress().peer(&cn).unwrap().region,
        Some(region("ap"))
    );
    assert_eq!(a.core.stats().region_claims_overridden, 2);
    let holders = a
        .core
        .holders(
            &id("listed/doc"),
            &a.core.engine().heads(&id("listed/doc")).unwrap(),
        )
        .unwrap();
    let c = holders.iter().find(|h| h.peer == cn).unwrap();
    assert_eq!((c.region.clone(), c.holds), (Some(region("ap")), true));
    // Without the list, claims are taken again.
    a.core.set_members(Duration::ZERO, None).unwrap();
    a.core
        .handle_message(Duration::ZERO, Inbound::direct(&bn, &hello_from_b))
        .unwrap();
    assert_eq!(
        a.core.progress().peer(&bn).unwrap().region,
        Some(region("eu"))
    );
}

/// A delta from `origin` carrying `changes` of `doc`.
fn delta_from(origin: &NodeId, doc: &str, changes: &[Vec<u8>]) -> Vec<u8> {
    Envelope {
        cluster: ClusterId::new("test").unwrap(),
        message: Message::Delta(Delta {
            origin: origin.clone(),
            region: Region::new("eu").unwrap(),
            doc: id(doc),
            changes: changes.iter().cloned().map(Bytes).collect(),
            heads: Heads::new(&[]),
        }),
    }
    .encode()
}

/// Hands `node` a delta of `changes` to `doc` that `from` made and sent
/// itself; its verdict.
fn gossip_delta(node: &mut Node, from: &NodeId, doc: &str, changes: &[Vec<u8>]) -> Verdict {
    let bytes = delta_from(from, doc, changes);
    node.core
        .handle_message(Duration::ZERO, Inbound::gossip(from, from, &bytes))
        .unwrap()
}

/// The changes of a document written `n` times, in causal order: its
/// genesis change (which every node derives from the id, see
/// `causeway_engine::lineage`), then one per write.
fn chain(doc: &str, n: usize) -> Vec<Vec<u8>> {
    let (_dir, engine) = fresh();
    for i in 0..n {
        engine.merge_json(&id(doc), &json!({ "i": i })).unwrap();
    }
    engine.changes_since(&id(doc), &[]).unwrap()
}

#[test]
fn one_peer_cannot_take_more_than_its_share_of_held_changes() {
    let mut a = node_with("a", "eu", |c| {
        c.max_held_changes_per_peer = 5;
    });
    let (bn, cn) = (NodeId::new("b").unwrap(), NodeId::new("c").unwrap());
    // b sends ten changes whose first write it withholds: five are
    // held, five refused, and the engine still has room for c.
    let b_changes = chain("held/b", 11);
    let verdict = gossip_delta(&mut a, &bn, "held/b", &b_changes[2..]);
    assert_eq!(verdict, Verdict::Accept, "the held changes are new");
    let stats = a.core.stats();
    assert_eq!((stats.held_refused, stats.held_budget_refused), (5, 5));
    assert_eq!(a.core.engine().stats().held_changes, 5);
    // More from b, to another document: nothing fits its share.
    let more = chain("held/b2", 3);
    gossip_delta(&mut a, &bn, "held/b2", &more[2..]);
    assert_eq!(a.core.stats().held_budget_refused, 7);
    // c's share is its own.
    let c_changes = chain("held/c", 4);
    gossip_delta(&mut a, &cn, "held/c", &c_changes[2..]);
    assert_eq!(a.core.stats().held_budget_refused, 7);
    assert_eq!(a.core.engine().stats().held_changes, 8);
    // b supplies the dependency: its held changes apply, its share is back,
    // and the refused ones are accepted now.
    gossip_delta(&mut a, &bn, "held/b", &b_changes[..2]);
    assert_eq!(a.core.engine().stats().held_changes, 3);
    gossip_delta(&mut a, &bn, "held/b", &b_changes[7..]);
    assert_eq!(a.core.stats().held_budget_refused, 7);
    assert_eq!(
        a.core.engine().heads(&id("held/b")).unwrap().len(),
        1,
        "every change of b's document applied"
    );
    assert_eq!(
        a.core.engine().get_json(&id("held/b")).unwrap(),
        json!({ "i": 10 })
    );
}

#[test]
fn in_a_batch_each_origin_is_charged_only_with_what_it_held() {
    let mut a = node_with("a", "eu", |c| {
        c.max_held_changes_per_peer = 3;
    });
    let (bn, cn) = (NodeId::new("b").unwrap(), NodeId::new("c").unwrap());
    // One document's history: b sends its start (applies), c three later
    // changes whose dependencies nobody sent (held). Both deltas arrive in
    // one batch.
    let x = chain("batch/x", 7);
    let from_b = delta_from(&bn, "batch/x", &x[..2]);
    let from_c = delta_from(&cn, "batch/x", &x[5..]);
    a.core
        .handle_messages(
            Duration::ZERO,
            [
                Inbound::gossip(&bn, &bn, &from_b),
                Inbound::gossip(&cn, &cn, &from_c),
            ],
        )
        .unwrap();
    assert_eq!(
        a.core.engine().stats().held_changes,
        3,
        "x[5..] wait for x[2..5]"
    );
    // b held nothing, so its whole share is left (three more held); c's is
    // spent (all four refused).
    let y = chain("batch/y", 4);
    gossip_delta(&mut a, &bn, "batch/y", &y[2..]);
    assert_eq!(a.core.stats().held_budget_refused, 0);
    let z = chain("batch/z", 5);
    gossip_delta(&mut a, &cn, "batch/z", &z[2..]);
    assert_eq!(a.core.stats().held_budget_refused, 4);
}

#[test]
fn one_ack_reads_a_bounded_number_of_documents() {
    let mut a = node("a", "eu");
    let bn = NodeId::new("b").unwrap();
    let engine = a.core.engine().clone();
    let docs = MAX_ACK_READS + 36;
    // The core's items are read when it is made: commit through it.
    for i in 0..docs {
        commit(&mut a, &format!("ack/{i}"), json!({ "i": i }));
    }
    let mut entries: Vec<AckEntry> = (0..docs)
        .map(|i| AckEntry {
            doc: id(&format!("ack/{i}")),
            heads: Heads::new(&[]),
        })
        .collect();
    // One more entry reports exactly our heads: recorded without a read.
    let ours = engine.heads(&id("ack/0")).unwrap();
    entries.push(AckEntry {
        doc: id("ack/0"),
        heads: Heads::new(&ours),
    });
    let ack = Envelope {
        cluster: ClusterId::new("test").unwrap(),
        message: Message::Ack(Ack { entries }),
    }
    .encode();
    let mut rng = SplitMix64::new(9);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    let verdict = a
        .core
        .handle_message(Duration::ZERO, Inbound::direct(&bn, &ack))
        .unwrap();
    assert_eq!(verdict, Verdict::Accept);
    assert_eq!(a.core.stats().ack_entries_skipped, 36);
    assert_eq!(
        a.core.progress().known_heads(&bn, &id("ack/0")),
        Some(ours.as_slice())
    );
}

#[test]
fn an_oversized_delta_is_announced_and_pulled_by_sync() {
    let mut a = node("a", "eu");
    let mut b = node("b", "us");
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let mut rng = SplitMix64::new(4);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    b.core.handle_connect(Duration::ZERO, &an, &mut rng);
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    // One change larger than a gossip message.
    let big: String = "x".repeat(MAX_GOSSIP_BYTES + 1024);
    commit(&mut a, "big/1", json!({ "blob": big }));
    assert_eq!(a.core.stats().messages_sent("announce"), 1);
    assert_eq!(a.core.stats().messages_sent("delta"), 0);
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    assert_eq!(
        b.core.engine().heads(&id("big/1")).unwrap(),
        a.core.engine().heads(&id("big/1")).unwrap()
    );
    assert!(b.core.stats().sync_changes_applied > 0);
}

/// The kinds of the messages `n` wants sent, draining them.
fn drain_kinds(n: &mut Node) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    while let Some(out) = n.core.poll_output() {
        if let Output::Send { bytes, .. } | Output::Publish(bytes) = out {
            let env = Envelope::decode(&bytes, usize::MAX).unwrap();
            kinds.push(match env.message {
                Message::Sync(_) => "sync",
                Message::Reconcile(_) => "reconcile",
                Message::Delta(_) => "delta",
                _ => "other",
            });
        }
    }
    kinds
}

#[test]
fn an_unanswered_sync_is_resent_then_given_up() {
    // Held-change repair (which would start the sync again) is pushed out
    // of the test's hour so that only the retries are counted.
    let mut a = node_with("a", "eu", |c| {
        c.max_sync_retries = 3;
        c.held_repair_after = Duration::from_secs(3600);
    });
    let mut b = node("b", "us");
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let mut rng = SplitMix64::new(5);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    b.core.handle_connect(Duration::ZERO, &an, &mut rng);
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    // B's first delta is lost; its second reaches A with a missing
    // dependency, so A starts a sync with B, whose answers never arrive.
    commit(&mut b, "doc/1", json!({"v": 1}));
    while b.core.poll_output().is_some() {}
    commit(&mut b, "doc/1", json!({"v": 2}));
    deliver(&mut b, &bn, &mut a, Duration::ZERO);
    assert_eq!(drain_kinds(&mut a), vec!["sync"]);
    assert!(!a.core.is_idle());
    let mut resends = 0;
    for k in 1..=10u32 {
        let now = Duration::from_secs(6) * k;
        a.core.handle_timeout(now, &mut rng).unwrap();
        resends += drain_kinds(&mut a).iter().filter(|k| **k == "sync").count();
    }
    assert_eq!(resends, 3);
    assert_eq!(a.core.stats().syncs_abandoned, 1);
    // Nothing of it is awaited any more; anti-entropy takes over.
    assert_eq!(a.core.queue_depths().open_syncs, 0);
}

#[test]
fn a_peer_cannot_open_more_sync_sessions_than_the_limit() {
    let mut a = node_with("a", "eu", |c| c.max_sync_sessions_per_peer = 2);
    let bn = NodeId::new("b").unwrap();
    let mut rng = SplitMix64::new(6);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    while a.core.poll_output().is_some() {}
    let (_dir, b) = fresh();
    for (k, doc) in ["s/1", "s/2", "s/3"].iter().enumerate() {
        let doc = id(doc);
        b.put_json(&doc, &json!({"k": k})).unwrap();
        let m = b
            .generate_sync_message(&doc, &mut SyncState::new(), 1 << 20)
            .unwrap()
            .unwrap();
        let frame = Envelope {
            cluster: ClusterId::new("test").unwrap(),
            message: Message::Sync(SyncFrame {
                doc: doc.clone(),
                msg: Bytes(m.encode()),
            }),
        }
        .encode();
        let verdict = a
            .core
            .handle_message(Duration::ZERO, Inbound::direct(&bn, &frame))
            .unwrap();
        // A lacks each document, so it answers and awaits B's reply: the
        // first two fill the limit, the third is ignored and changes nothing.
        if k < 2 {
            assert_eq!(verdict, Verdict::Accept);
            assert_eq!(drain_kinds(&mut a), vec!["sync"]);
        } else {
            assert_eq!(verdict, Verdict::Ignore);
            assert!(drain_kinds(&mut a).is_empty());
            assert!(a.core.engine().heads(&doc).is_err());
        }
    }
    assert_eq!(a.core.stats().syncs_refused, 1);
    assert_eq!(a.core.queue_depths().open_syncs, 2);
}

#[test]
fn a_late_older_report_does_not_undo_what_a_peer_is_known_to_hold() {
    // Direct messages can overtake each other. Once b is known to hold a's
    // heads, a report of b's older heads arriving late changes nothing;
    // found by tests/consistency.rs under load (`/v1/where` said us no
    // longer held a write it had acknowledged).
    let mut a = node("a", "eu");
    let mut b = node("b", "us");
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let mut rng = SplitMix64::new(1);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    b.core.handle_connect(Duration::ZERO, &an, &mut rng);
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    let doc = id("cart/1");
    let mut heads = Vec::new();
    for (i, value) in [json!({"apples": 1}), json!({"pears": 2})]
        .iter()
        .enumerate()
    {
        commit(&mut a, "cart/1", value.clone());
        let now = Duration::from_secs(i as u64 + 1);
        pump(&mut a, &an, &mut b, &bn, now);
        b.core.handle_timeout(now, &mut rng).unwrap();
        pump(&mut a, &an, &mut b, &bn, now);
        heads.push(a.core.engine().heads(&doc).unwrap());
        assert_eq!(
            a.core.progress().known_heads(&bn, &doc),
            Some(&heads[i][..])
        );
    }
    let stale = Envelope {
        cluster: ClusterId::new("test").unwrap(),
        message: Message::Ack(Ack {
            entries: vec![AckEntry {
                doc: doc.clone(),
                heads: Heads::new(&heads[0]),
            }],
        }),
    };
    let now = Duration::from_secs(3);
    a.core
        .handle_message(now, Inbound::direct(&bn, &stale.encode()))
        .unwrap();
    assert_eq!(
        a.core.progress().known_heads(&bn, &doc),
        Some(&heads[1][..])
    );
    let holders = a.core.holders(&doc, &heads[1]).unwrap();
    assert!(
        holders.iter().any(|h| h.peer == bn && h.holds),
        "{holders:?}"
    );
}

/// A core over an engine with the default durability (every write synced).
fn durable_node(name: &str, region: &str) -> (TempDir, Engine, Replicator) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), causeway_engine::EngineConfig::default()).unwrap();
    let config = ReplicatorConfig::new(
        NodeId::new(name).unwrap(),
        Region::new(region).unwrap(),
        ClusterId::new("test").unwrap(),
    );
    let core = Replicator::new(engine.clone(), config, Duration::ZERO).unwrap();
    (dir, engine, core)
}

#[test]
fn a_batch_of_received_messages_is_durable_with_one_fsync() {
    let mut a = node("a", "eu");
    let an = NodeId::new("a").unwrap();
    // Twenty deltas to two documents (a chain of ten each), as a writer
    // produces them, plus one that does not decode.
    let mut messages: Vec<(Channel, Vec<u8>)> = Vec::new();
    for i in 0..10 {
        commit(&mut a, "batch/x", json!({"i": i}));
        commit(&mut a, "batch/y", json!({"j": i}));
    }
    while let Some(out) = a.core.poll_output() {
        let Output::Publish(bytes) = out else {
            continue;
        };
        messages.push((Channel::Gossip, bytes));
    }
    assert_eq!(messages.len(), 20);
    // A copy of the third delta (to batch/x) with one change byte flipped:
    // refused, without keeping the other deltas to batch/x out.
    let mut tampered = Envelope::decode(&messages[2].1, MAX_GOSSIP_BYTES).unwrap();
    let Message::Delta(d) = &mut tampered.message else {
        unreachable!()
    };
    let change = &mut d.changes.last_mut().unwrap().0;
    let middle = change.len() / 2;
    change[middle] ^= 0x01;
    // A repeat of the first delta: nothing new, so not forwarded.
    let repeat = messages[0].clone();
    messages.insert(7, (Channel::Gossip, vec![0xff; 16]));
    messages.insert(12, (Channel::Gossip, tampered.encode()));
    messages.push(repeat);

    let (dir, engine, mut b) = durable_node("b", "us");
    let syncs_before = engine.stats().wal_syncs;
    let verdicts = b
        .handle_messages(
            Duration::ZERO,
            messages.iter().map(|(channel, bytes)| Inbound {
                from: &an,
                author: &an,
                channel: *channel,
                bytes,
            }),
        )
        .unwrap();
    assert_eq!(engine.stats().wal_syncs - syncs_before, 1);
    assert_eq!(verdicts.len(), 23);
    assert_eq!(verdicts[7], Verdict::Reject);
    assert_eq!(verdicts[12], Verdict::Reject);
    assert_eq!(verdicts[22], Verdict::Ignore);
    let accepted = verdicts.iter().filter(|v| **v == Verdict::Accept).count();
    assert_eq!(accepted, 20);
    for doc in ["batch/x", "batch/y"] {
        assert_eq!(
            b.engine().heads(&id(doc)).unwrap(),
            a.core.engine().heads(&id(doc)).unwrap()
        );
    }
    // What the batch applied is in the store, not only in memory.
    drop(b);
    let engine = common::reopen(&dir, engine, causeway_engine::EngineConfig::default());
    assert_eq!(engine.get_json(&id("batch/x")).unwrap(), json!({"i": 9}));
    assert_eq!(engine.get_json(&id("batch/y")).unwrap(), json!({"j": 9}));

    // One message at a time pays one fsync each.
    let (_dir, engine, mut c) = durable_node("c", "ap");
    let syncs_before = engine.stats().wal_syncs;
    for (channel, bytes) in &messages {
        let inbound = Inbound {
            from: &an,
            author: &an,
            channel: *channel,
            bytes,
        };
        c.handle_message(Duration::ZERO, inbound).unwrap();
    }
    assert_eq!(engine.stats().wal_syncs - syncs_before, 20);
    for doc in ["batch/x", "batch/y"] {
        assert_eq!(
            c.engine().heads(&id(doc)).unwrap(),
            a.core.engine().heads(&id(doc)).unwrap()
        );
    }
}

#[test]
fn a_burst_of_local_commits_is_published_as_one_delta_per_document() {
    let mut a = node("a", "eu");
    let mut b = node("b", "us");
    let an = NodeId::new("a").unwrap();
    let engine: Engine = a.core.engine().clone();
    let mut commits = Vec::new();
    let mut write = |doc: &str, value: serde_json::Value| {
        let doc = id(doc);
        let before = engine.heads(&doc).unwrap_or_default();
        let c = engine.merge_json(&doc, &value).unwrap();
        let changes = engine.changes_since(&doc, &before).unwrap();
        commits.push((doc, changes, c.heads));
    };
    // 1,030 commits to x interleaved with 5 to y: x needs two deltas
    // (at most MAX_CHANGES_PER_DELTA changes each), y one.
    for i in 0..1030 {
        write("burst/x", json!({"i": i}));
        if i % 200 == 0 {
            write("burst/y", json!({"j": i}));
        }
    }
    let total: usize = commits.iter().map(|(_, c, _)| c.len()).sum();
    a.core.handle_local_commits(Duration::ZERO, commits);
    let mut deltas = Vec::new();
    while let Some(out) = a.core.poll_output() {
        let Output::Publish(bytes) = out else {
            panic!("a burst publishes deltas only");
        };
        let env = Envelope::decode(&bytes, MAX_GOSSIP_BYTES).unwrap();
        let Message::Delta(d) = env.message else {
            panic!("too large to gossip");
        };
        assert!(d.changes.len() <= MAX_CHANGES_PER_DELTA);
        deltas.push((d.doc.to_string(), d.changes.len(), bytes));
    }
    let docs: Vec<&str> = deltas.iter().map(|(d, ..)| d.as_str()).collect();
    assert_eq!(docs, ["burst/x", "burst/y", "burst/x"]);
    assert_eq!(deltas.iter().map(|(_, n, _)| n).sum::<usize>(), total);
    for (_, _, bytes) in &deltas {
        let verdict = b
            .core
            .handle_message(Duration::ZERO, Inbound::gossip(&an, &an, bytes))
            .unwrap();
        assert_eq!(verdict, Verdict::Accept);
    }
    for doc in ["burst/x", "burst/y"] {
        assert_eq!(
            b.core.engine().heads(&id(doc)).unwrap(),
            engine.heads(&id(doc)).unwrap()
        );
    }
    assert_eq!(
        b.core.engine().get_json(&id("burst/x")).unwrap(),
        json!({"i": 1029})
    );
}

#[test]
fn a_client_change_held_for_a_dependency_is_repaired_from_a_peer_and_published() {
    // A client hands A a change made on top of B's copy; A lacks B's
    // change, so it holds the client's change. B's delta never reached A
    // (lost), so only the held-change repair can fetch it.
    let mut a = node_with("a", "eu", |c| c.held_repair_after = Duration::from_secs(2));
    let mut b = node("b", "us");
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let mut rng = SplitMix64::new(9);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    b.core.handle_connect(Duration::ZERO, &an, &mut rng);
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    let doc = id("notes/held");
    commit(&mut b, "notes/held", json!({"from_b": 1}));
    while b.core.poll_output().is_some() {}
    let client = {
        use causeway_engine::automerge::transaction::Transactable;
        use causeway_engine::automerge::{Automerge, AutomergeError, ROOT};
        let mut fork = Automerge::new();
        let history = b.core.engine().changes_since(&doc, &[]).unwrap();
        fork.load_incremental(&history.concat()).unwrap();
        let before = fork.get_heads();
        fork.transact::<_, _, AutomergeError>(|tx| tx.put(ROOT, "from_client", 1))
            .unwrap();
        fork.get_changes(&before)[0].raw_bytes().to_vec()
    };
    let engine = a.core.engine().clone();
    let events = engine.subscribe("notes/").unwrap();
    let outcome = engine
        .apply_changes(&doc, std::slice::from_ref(&client))
        .unwrap();
    assert_eq!((outcome.applied, outcome.held), (0, 1));
    // Before the repair is due nothing is asked.
    a.core
        .handle_timeout(Duration::from_secs(1), &mut rng)
        .unwrap();
    assert!(drain_kinds(&mut a).iter().all(|k| *k != "sync"));
    // The first look after it is due asks B, and the sync brings B's change.
    let now = Duration::from_secs(4);
    a.core.handle_timeout(now, &mut rng).unwrap();
    assert_eq!(a.core.stats().held_repairs, 1);
    pump(&mut a, &an, &mut b, &bn, now);
    assert_eq!(engine.stats().held_changes, 0);
    assert_eq!(
        engine.get_json(&doc).unwrap(),
        json!({"from_b": 1, "from_client": 1})
    );
    // The engine announces the client's change, with its bytes, for the
    // node to publish.
    let event = events.try_recv().unwrap();
    assert_eq!(event.origin, causeway_engine::Origin::Client);
    assert_eq!(event.changes.to_vec(), vec![client]);
}

#[test]
fn a_quarantined_document_stops_nothing_else_and_repair_refetches_it() {
    use causeway_engine::layout::{self, CF_CHANGE_LOG};
    let mut a = node("a", "eu");
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let bad = id("q/bad");
    commit(&mut a, "q/bad", json!({"from": "a"}));
    for i in 0..5 {
        commit(&mut a, &format!("q/ok{i}"), json!({"i": i}));
    }
    while a.core.poll_output().is_some() {}
    // b holds its own copy of the document, then one of its log entries
    // rots on disk.
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), common::buffered()).unwrap();
    engine.put_json(&bad, &json!({"from": "b"})).unwrap();
    drop(engine);
    {
        let opts = rocksdb::Options::default();
        let cfs = rocksdb::DB::list_cf(&opts, dir.path()).unwrap();
        let db = rocksdb::DB::open_cf(&opts, dir.path(), cfs).unwrap();
        let log = db.cf_handle(CF_CHANGE_LOG).unwrap();
        db.put_cf(log, layout::log_key(&bad, 1), b"rot").unwrap();
    }
    let engine = Engine::open(dir.path(), common::buffered()).unwrap();
    let config = ReplicatorConfig::new(
        bn.clone(),
        Region::new("us").unwrap(),
        ClusterId::new("test").unwrap(),
    );
    let mut b = Node {
        core: Replicator::new(engine.clone(), config, Duration::ZERO).unwrap(),
        _dir: dir,
    };
    let mut rng = SplitMix64::new(3);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    b.core.handle_connect(Duration::ZERO, &an, &mut rng);
    // Every message is handled without error (`deliver` unwraps).
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    for i in 0..5 {
        let doc = id(&format!("q/ok{i}"));
        assert_eq!(engine.get_json(&doc).unwrap(), json!({"i": i}));
    }
    assert!(engine.is_quarantined(&bad));
    // A live write to the quarantined document is ignored, not fatal.
    commit(&mut a, "q/bad", json!({"more": 1}));
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    assert!(matches!(
        engine.get_json(&bad),
        Err(causeway_engine::Error::Quarantined { .. })
    ));

    engine.repair(&bad).unwrap();
    let now = Duration::from_secs(120);
    a.core.handle_timeout(now, &mut rng).unwrap();
    b.core.handle_timeout(now, &mut rng).unwrap();
    pump(&mut a, &an, &mut b, &bn, now);
    assert_eq!(
        engine.get_json(&bad).unwrap(),
        a.core.engine().get_json(&bad).unwrap()
    );
    assert!(!engine.is_quarantined(&bad));
}

/// The peers `n` started reconciliation sessions with in its outputs; each
/// session is then answered (with nothing to compare), so it is over.
fn reconciled_with(n: &mut Node, now: Duration) -> Vec<NodeId> {
    let mut sessions = Vec::new();
    while let Some(out) = n.core.poll_output() {
        if let Output::Send { to, bytes } = out {
            let envelope = Envelope::decode(&bytes, usize::MAX).unwrap();
            if let Message::Reconcile(r) = envelope.message {
                sessions.push((to, r.session));
            }
        }
    }
    for (peer, session) in &sessions {
        let answer = Envelope {
            cluster: ClusterId::new("test").unwrap(),
            message: Message::Reconcile(Reconcile {
                session: *session,
                ranges: Vec::new(),
            }),
        }
        .encode();
        n.core
            .handle_message(now, Inbound::direct(peer, &answer))
            .unwrap();
    }
    while n.core.poll_output().is_some() {}
    sessions.into_iter().map(|(peer, _)| peer).collect()
}

#[test]
fn with_a_fanout_each_round_reconciles_with_a_few_peers_and_every_peer_gets_its_turn() {
    use causeway_engine::replication::Fanout;
    use std::collections::BTreeSet;
    let fanout = Fanout {
        local: 2,
        remote: 1,
    };
    let mut a = node_with("a", "eu", |c| c.reconcile_fanout = Some(fanout));
    let region = |r: &str| Region::new(r).unwrap();
    // Five peers in a's region, and two in each of three other regions.
    let mut members: Members = [(NodeId::new("a").unwrap(), region("eu"))].into();
    let mut local = BTreeSet::new();
    for i in 0..5 {
        let n = NodeId::new(format!("eu{i}")).unwrap();
        members.insert(n.clone(), region("eu"));
        local.insert(n);
    }
    for r in ["us", "ap", "sa"] {
        for i in 0..2 {
            members.insert(NodeId::new(format!("{r}{i}")).unwrap(), region(r));
        }
    }
    let mut rng = SplitMix64::new(9);
    // On connect, sessions start only while fewer than the fanout are
    // under way.
    for p in members.keys().filter(|n| n.as_str() != "a") {
        a.core.handle_connect(Duration::ZERO, p, &mut rng);
    }
    a.core
        .set_members(Duration::ZERO, Some(members.clone()))
        .unwrap();
    let at_connect = reconciled_with(&mut a, Duration::ZERO);
    assert_eq!(at_connect.len(), fanout.total(), "{at_connect:?}");

    let interval = Duration::from_secs(30);
    let (mut seen_local, mut seen_regions) = (BTreeSet::new(), BTreeSet::new());
    for round in 1..=3u32 {
        let now = interval * 2 * round;
        a.core.handle_timeout(now, &mut rng).unwrap();
        let chosen = reconciled_with(&mut a, now);
        let (here, there): (Vec<NodeId>, Vec<NodeId>) =
            chosen.into_iter().partition(|p| local.contains(p));
        assert_eq!(here.len(), fanout.local, "round {round}: {here:?}");
        assert_eq!(there.len(), fanout.remote, "round {round}: {there:?}");
        seen_local.extend(here);
        seen_regions.extend(there.iter().map(|p| members[p].clone()));
    }
    // Never-reconciled peers first: within ceil(5 / 2) rounds every peer of
    // the region, within three rounds every other region.
    assert_eq!(seen_local, local);
    assert_eq!(seen_regions.len(), 3, "{seen_regions:?}");

    // A peer a change is pending for comes before staler peers: every peer
    // of the region but one reports the change, and that one is among the
    // next round's, however recently it was reconciled with.
    commit(&mut a, "fanout/doc", json!({"k": 1}));
    let heads = a.core.engine().heads(&id("fanout/doc")).unwrap();
    let now = interval * 9;
    while a.core.poll_output().is_some() {}
    a.core.handle_timeout(now, &mut rng).unwrap();
    let latest = reconciled_with(&mut a, now);
    let pending = latest.iter().find(|p| local.contains(*p)).unwrap().clone();
    for p in local.iter().filter(|p| **p != pending) {
        let ack = Envelope {
            cluster: ClusterId::new("test").unwrap(),
            message: Message::Ack(Ack {
                entries: vec![AckEntry {
                    doc: id("fanout/doc"),
                    heads: Heads::new(&heads),
                }],
            }),
        }
        .encode();
        a.core
            .handle_message(now, Inbound::direct(p, &ack))
            .unwrap();
    }
    let now = interval * 12;
    a.core.handle_timeout(now, &mut rng).unwrap();
    let chosen = reconciled_with(&mut a, now);
    assert!(chosen.contains(&pending), "{pending} not in {chosen:?}");
}

#[test]
fn a_fanout_gives_the_slots_one_side_cannot_fill_to_the_other() {
    use causeway_engine::replication::Fanout;
    let fanout = Fanout {
        local: 2,
        remote: 1,
    };
    let region = |r: &str| Region::new(r).unwrap();
    let mut rng = SplitMix64::new(3);
    let interval = Duration::from_secs(30);
    // Alone in its region, with one peer in each of four other regions: 3
    // regions a round. Alone in a cluster of one region: 3 peers a round.
    for regions in [["us", "ap", "sa", "af"], ["eu", "eu", "eu", "eu"]] {
        let mut a = node_with("a", "eu", |c| c.reconcile_fanout = Some(fanout));
        let mut members: Members = [(NodeId::new("a").unwrap(), region("eu"))].into();
        for (i, r) in regions.iter().enumerate() {
            members.insert(NodeId::new(format!("p{i}")).unwrap(), region(r));
        }
        for p in members.keys().filter(|n| n.as_str() != "a") {
            a.core.handle_connect(Duration::ZERO, p, &mut rng);
        }
        a.core
            .set_members(Duration::ZERO, Some(members.clone()))
            .unwrap();
        let _ = reconciled_with(&mut a, Duration::ZERO);
        for round in 1..=2u32 {
            let now = interval * 2 * round;
            a.core.handle_timeout(now, &mut rng).unwrap();
            let chosen = reconciled_with(&mut a, now);
            assert_eq!(
                chosen.len(),
                fanout.total(),
                "{regions:?} round {round}: {chosen:?}"
            );
        }
    }
}

#[test]
fn a_write_made_while_a_peer_was_away_is_asked_about_when_it_connects() {
    let mut a = node("a", "eu");
    let b = NodeId::new("b").unwrap();
    let mut rng = SplitMix64::new(1);
    a.core.handle_connect(Duration::ZERO, &b, &mut rng);
    a.core.handle_disconnect(&b);
    commit(&mut a, "away/doc", json!({"k": 1}));
    while a.core.poll_output().is_some() {}
    // b comes back one second later, long before the next round (30 s): a
    // asks it about the write at once with a document sync.
    let now = Duration::from_secs(1);
    a.core.handle_connect(now, &b, &mut rng);
    assert_eq!(a.core.poll_timeout(), Duration::ZERO);
    a.core.handle_timeout(now, &mut rng).unwrap();
    let mut synced = Vec::new();
    while let Some(out) = a.core.poll_output() {
        if let Output::Send { to, bytes } = out {
            if let Message::Sync(s) = Envelope::decode(&bytes, usize::MAX).unwrap().message {
                synced.push((to, s.doc));
            }
        }
    }
    assert_eq!(synced, vec![(b, id("away/doc"))]);
}

#[test]
fn a_peer_back_with_a_new_store_id_is_not_believed_to_hold_what_it_had() {
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let mut a = node("a", "eu");
    let mut b = node("b", "us");
    let mut rng = SplitMix64::new(1);
    let now = Duration::ZERO;
    a.core.handle_connect(now, &bn, &mut rng);
    b.core.handle_connect(now, &an, &mut rng);
    commit(&mut a, "kept/doc", json!({"k": 1}));
    pump(&mut a, &an, &mut b, &bn, now);
    let doc = id("kept/doc");
    let heads = a.core.engine().heads(&doc).unwrap();
    assert_eq!(a.core.progress().known_heads(&bn, &doc), Some(&heads[..]));
    // The same store again (a reconnect): what b reported stands.
    a.core.handle_disconnect(&bn);
    b.core.handle_disconnect(&an);
    a.core.handle_connect(now, &bn, &mut rng);
    b.core.handle_connect(now, &an, &mut rng);
    pump(&mut a, &an, &mut b, &bn, now);
    assert_eq!(a.core.stats().peer_stores_renewed, 0);
    // b comes back with an empty store of its own (a lost disk; a restored
    // backup looks the same to a): its hello names a new store id, and a
    // forgets b's reports until b makes new ones.
    a.core.handle_disconnect(&bn);
    let mut b = node("b", "us");
    let later = Duration::from_secs(1);
    a.core.handle_connect(later, &bn, &mut rng);
    b.core.handle_connect(later, &an, &mut rng);
    deliver(&mut b, &bn, &mut a, later);
    assert_eq!(a.core.stats().peer_stores_renewed, 1);
    assert_eq!(a.core.progress().known_heads(&bn, &doc), None);
    // Reconciliation gives b the document back.
    pump(&mut a, &an, &mut b, &bn, later);
    assert_eq!(b.core.engine().heads(&doc).unwrap(), heads);
    assert_eq!(a.core.progress().known_heads(&bn, &doc), Some(&heads[..]));
}

#[test]
fn a_new_node_catches_up_with_a_peer_of_its_region_before_it_counts_as_ready() {
    let (an, bn, dn) = (
        NodeId::new("a").unwrap(),
        NodeId::new("b").unwrap(),
        NodeId::new("d").unwrap(),
    );
    let mut a = node("a", "us");
    let mut d = node("d", "eu");
    // d holds a few documents of its own: b receives d's list of them and
    // syncs them itself, and d syncs the rest, which it lacks.
    for i in 0..40 {
        commit(&mut a, &format!("held/{i}"), json!({ "i": i }));
    }
    for i in 0..5 {
        commit(&mut d, &format!("held/{i}"), json!({ "d": i }));
    }
    while a.core.poll_output().is_some() {}
    while d.core.poll_output().is_some() {}
    // b is new and empty, in eu, connected to a (us) and d (eu).
    let mut b = node("b", "eu");
    let mut rng = SplitMix64::new(7);
    let now = Duration::ZERO;
    assert_eq!(b.core.catch_up().done_at, None);
    for (x, xn) in [(&mut a, &an), (&mut d, &dn)] {
        b.core.handle_connect(now, xn, &mut rng);
        x.core.handle_connect(now, &bn, &mut rng);
    }
    // d's hello (and its session's first step) reach b; b's outputs to d
    // wait; everything with a goes through: a session
    // with another region's peer does not count while one of its own
    // region is connected.
    deliver(&mut d, &dn, &mut b, now);
    let mut to_d = Vec::new();
    loop {
        let mut moved = 0;
        while let Some(out) = b.core.poll_output() {
            moved += 1;
            match out {
                Output::Send { to, bytes } if to == dn => to_d.push(bytes),
                Output::Send { bytes, .. } => {
                    a.core.handle_message(now, direct(&bn, &bytes)).unwrap();
                }
                Output::Publish(_) => {}
                Output::Misbehaving { peer, reason } => panic!("{peer}: {reason}"),
            }
        }
        moved += deliver(&mut a, &an, &mut b, now);
        if moved == 0 {
            break;
        }
    }
    assert_eq!(
        b.core.engine().list("held/", None, 100).unwrap().ids.len(),
        40
    );
    let waiting = b.core.catch_up();
    assert_eq!((waiting.done_at, waiting.peer), (None, None));
    // With d: caught up once its session ended and its syncs are done,
    // so b holds d's changes to every document by then.
    for bytes in to_d {
        d.core.handle_message(now, direct(&bn, &bytes)).unwrap();
    }
    let holds_d = |b: &Node, d: &Node| {
        (0..40).all(|i| {
            let doc = id(&format!("held/{i}"));
            let ours = b.core.engine().heads(&doc).unwrap();
            let theirs = d.core.engine().heads(&doc).unwrap_or_default();
            theirs.iter().all(|h| ours.contains(h))
        })
    };
    // One message at a time, so that b's state is seen after each.
    loop {
        let mut moved = deliver(&mut b, &bn, &mut d, now);
        while let Some(out) = d.core.poll_output() {
            moved += 1;
            if let Output::Send { bytes, .. } = out {
                b.core.handle_message(now, direct(&dn, &bytes)).unwrap();
                if b.core.catch_up().done_at.is_some() {
                    assert!(holds_d(&b, &d), "caught up before the syncs were done");
                }
            }
        }
        if moved == 0 {
            break;
        }
    }
    assert!(holds_d(&b, &d));
    let done = b.core.catch_up();
    assert_eq!(done.peer, Some(dn));
    assert_eq!(done.done_at, Some(now));
    assert_eq!(done.documents_left, 0);
}

fn direct<'a>(from: &'a NodeId, bytes: &'a [u8]) -> Inbound<'a> {
    Inbound {
        from,
        author: from,
        channel: Channel::Direct,
        bytes,
    }
}

#[test]
fn a_peer_removed_from_the_membership_list_leaves_nothing_behind() {
    let (an, bn, cn) = (
        NodeId::new("a").unwrap(),
        NodeId::new("b").unwrap(),
        NodeId::new("c").unwrap(),
    );
    let mut a = node("a", "eu");
    let mut b = node("b", "us");
    let mut rng = SplitMix64::new(3);
    let now = Duration::ZERO;
    a.core.handle_connect(now, &bn, &mut rng);
    b.core.handle_connect(now, &an, &mut rng);
    // b writes; a gets it by sync, saving the sync state it shares with b.
    for i in 0..5 {
        commit(&mut b, &format!("kept/{i}"), json!({ "i": i }));
    }
    while b.core.poll_output().is_some() {}
    a.core.handle_disconnect(&bn);
    b.core.handle_disconnect(&an);
    a.core.handle_connect(now, &bn, &mut rng);
    b.core.handle_connect(now, &an, &mut rng);
    pump(&mut a, &an, &mut b, &bn, now);
    commit(&mut a, "mine", json!({"a": 1}));
    while a.core.poll_output().is_some() {}
    let engine = a.core.engine().clone();
    assert_eq!(engine.sync_state_peers().unwrap(), vec!["b".to_string()]);
    assert_eq!(a.core.progress().lag(&bn).documents, 1);
    // b leaves the cluster: the list names a and c only.
    a.core.handle_disconnect(&bn);
    let region = |r: &str| Region::new(r).unwrap();
    let members: Members = [(an.clone(), region("eu")), (cn, region("us"))].into();
    a.core.set_members(now, Some(members)).unwrap();
    assert!(a.core.progress().peer(&bn).is_none());
    assert_eq!(a.core.stats().departed_peers_forgotten, 1);
    assert!(engine.sync_state_peers().unwrap().is_empty());
    let fresh = engine.load_sync_state("b", &id("kept/0")).unwrap();
    assert!(fresh.shared_heads.is_empty());
}

/// The envelope version of encoded bytes (`[version, cluster, message]`
/// with a small version).
fn envelope_version(bytes: &[u8]) -> u8 {
    assert_eq!(bytes[0], 0x83);
    assert!(bytes[1] < 24, "a small version");
    bytes[1]
}

/// A hello from `node` speaking versions `min..=max`, as a newer build
/// sends it: in the hello version, whatever its range.
fn hello_speaking(node: &NodeId, min: u32, max: u32) -> Vec<u8> {
    Envelope {
        cluster: ClusterId::new("test").unwrap(),
        message: Message::Hello(Hello {
            node: node.clone(),
            region: Region::new("eu").unwrap(),
            version: max,
            min_version: Some(min),
            store: None,
        }),
    }
    .encode_at(HELLO_VERSION)
}

#[test]
fn protocol_versions_are_negotiated_per_peer_in_the_hello() {
    let (bn, dn) = (NodeId::new("b").unwrap(), NodeId::new("d").unwrap());
    let mut a = node("a", "eu");
    let mut rng = SplitMix64::new(5);
    let now = Duration::ZERO;
    a.core.handle_connect(now, &bn, &mut rng);
    a.core.handle_connect(now, &dn, &mut rng);
    // a's hello names its range, in the hello version.
    let mut hellos = 0;
    while let Some(out) = a.core.poll_output() {
        let Output::Send { bytes, .. } = out else {
            continue;
        };
        if let Message::Hello(h) = Envelope::decode(&bytes, usize::MAX).unwrap().message {
            assert_eq!(envelope_version(&bytes), HELLO_VERSION as u8);
            assert_eq!(h.versions(), SUPPORTED_VERSIONS);
            hellos += 1;
        }
    }
    assert_eq!(hellos, 2);

    // b is a newer build that also speaks every version a speaks: they
    // use the newest a speaks, and a answers b in it.
    let from_b = hello_speaking(&bn, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 5);
    let verdict = a.core.handle_message(now, direct(&bn, &from_b)).unwrap();
    assert_eq!(verdict, Verdict::Accept);
    let mut answered = false;
    while let Some(out) = a.core.poll_output() {
        match out {
            Output::Send { to, bytes } if to == bn => {
                assert_eq!(envelope_version(&bytes), PROTOCOL_VERSION as u8);
                answered = true;
            }
            Output::Misbehaving { peer, reason } => panic!("{peer} refused: {reason}"),
            _ => {}
        }
    }
    assert!(answered, "a acknowledges b's hello");

    // d speaks only versions newer than any a speaks: refused for an
    // honest reason, then nothing more goes to d and what d sends is
    // ignored, while b is served as before.
    let from_d = hello_speaking(&dn, PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3);
    let verdict = a.core.handle_message(now, direct(&dn, &from_d)).unwrap();
    assert_eq!(verdict, Verdict::Reject);
    assert_eq!(a.core.stats().rejected.get("no_common_version"), Some(&1));
    match a.core.poll_output() {
        Some(Output::Misbehaving { peer, reason }) => {
            assert_eq!(
                (peer, reason_name(&reason)),
                (dn.clone(), "no_common_version")
            );
            assert!(
                reason.to_string().contains(&SUPPORTED_VERSIONS.to_string()),
                "{reason}"
            );
        }
        other => panic!("expected the refusal of d, got {other:?}"),
    }
    assert!(a.core.poll_output().is_none());
    let again = hello_speaking(&dn, PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3);
    assert_eq!(
        a.core.handle_message(now, direct(&dn, &again)).unwrap(),
        Verdict::Ignore
    );
    commit(&mut a, "versions/doc", json!({"v": 1}));
    let later = Duration::from_secs(3600);
    a.core.handle_timeout(later, &mut rng).unwrap();
    let mut to_b = 0;
    while let Some(out) = a.core.poll_output() {
        match out {
            Output::Send { to, .. } => {
                assert_ne!(to, dn, "nothing is sent to a peer without a common version");
                to_b += 1;
            }
            Output::Publish(bytes) => {
                // Gossip goes in a version every compatible peer speaks,
                // and no newer than the last one that changed a gossiped
                // message, so that older builds behind relays read it.
                assert_eq!(envelope_version(&bytes), GOSSIP_FORMAT_VERSION as u8);
            }
            Output::Misbehaving { peer, reason } => panic!("{peer} refused: {reason}"),
        }
    }
    assert!(to_b > 0, "b is still reconciled with");
}

/// Documents `a` sent by kind, decoded from `bytes` it sent.
fn kind_of(bytes: &[u8]) -> &'static str {
    match Envelope::decode(bytes, usize::MAX).unwrap().message {
        Message::Sync(_) => "sync",
        Message::Bundle(_) => "bundle",
        Message::Reconcile(_) => "reconcile",
        Message::Ack(_) => "ack",
        Message::Hello(_) => "hello",
        _ => "other",
    }
}

/// `n` documents written on a new node "a", its outputs dropped.
fn node_holding(n: usize) -> Node {
    let mut a = node("a", "eu");
    for i in 0..n {
        commit(&mut a, &format!("many/{i:05}"), json!({ "i": i }));
    }
    while a.core.poll_output().is_some() {}
    a
}

/// A new node "b" connected to `a` at time zero (nothing delivered yet).
fn connect_new_node(a: &mut Node) -> (Node, NodeId, NodeId, SplitMix64) {
    let mut b = node("b", "eu");
    let (an, bn) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let mut rng = SplitMix64::new(3);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    b.core.handle_connect(Duration::ZERO, &an, &mut rng);
    (b, an, bn, rng)
}

fn holds_the_same(a: &Node, b: &Node, n: usize) -> bool {
    (0..n).all(|i| {
        let doc = id(&format!("many/{i:05}"));
        b.core.engine().heads(&doc).ok() == a.core.engine().heads(&doc).ok()
    })
}

#[test]
fn a_new_node_receives_documents_it_lacks_whole_in_bundles() {
    const DOCS: usize = 1_500;
    let mut a = node_holding(DOCS);
    let (mut b, an, bn, mut rng) = connect_new_node(&mut a);
    let now = Duration::ZERO;
    pump(&mut a, &an, &mut b, &bn, now);
    assert!(holds_the_same(&a, &b, DOCS));
    let (sent, received) = (a.core.stats(), b.core.stats());
    assert_eq!(sent.bundled_docs_sent, DOCS as u64);
    // At most MAX_BUNDLE_DOCS documents a bundle: two bundles, and not
    // one document sync either way.
    assert_eq!(sent.messages_sent("bundle"), 2);
    assert_eq!(
        sent.messages_sent("sync") + received.messages_sent("sync"),
        0
    );
    let changes: usize = (0..DOCS)
        .map(|i| {
            let doc = id(&format!("many/{i:05}"));
            a.core.engine().changes_since(&doc, &[]).unwrap().len()
        })
        .sum();
    assert_eq!(received.bundle_changes_applied, changes as u64);
    // Each bundle was answered (by one acknowledgement each): nothing
    // awaits an answer, so nothing falls back to a sync later.
    a.core
        .handle_timeout(Duration::from_secs(30), &mut rng)
        .unwrap();
    while let Some(out) = a.core.poll_output() {
        if let Output::Send { bytes, .. } = out {
            assert_ne!(kind_of(&bytes), "sync");
        }
    }
    assert_eq!(a.core.stats().bundled_docs_unanswered, 0);
    let caught_up = b.core.catch_up();
    assert_eq!(caught_up.done_at, Some(now));
    assert_eq!(caught_up.documents_left, 0);
}

#[test]
fn a_lost_bundle_falls_back_to_document_syncs() {
    const DOCS: usize = 30;
    let mut a = node_holding(DOCS);
    let (mut b, an, bn, mut rng) = connect_new_node(&mut a);
    let now = Duration::ZERO;
    // Everything goes through except a's bundles, which are lost.
    let mut lost = 0;
    loop {
        let mut moved = deliver(&mut b, &bn, &mut a, now);
        while let Some(out) = a.core.poll_output() {
            moved += 1;
            if let Output::Send { bytes, .. } = out {
                if kind_of(&bytes) == "bundle" {
                    lost += 1;
                } else {
                    b.core.handle_message(now, direct(&an, &bytes)).unwrap();
                }
            }
        }
        if moved == 0 {
            break;
        }
    }
    assert_eq!(lost, 1);
    assert!(b
        .core
        .engine()
        .list("many/", None, 100)
        .unwrap()
        .ids
        .is_empty());
    assert_eq!(b.core.catch_up().done_at, None, "caught up without them");
    // Unanswered after retry_after: each document gets a sync.
    let later = Duration::from_secs(6);
    a.core.handle_timeout(later, &mut rng).unwrap();
    assert_eq!(a.core.stats().bundled_docs_unanswered, DOCS as u64);
    pump(&mut a, &an, &mut b, &bn, later);
    assert!(holds_the_same(&a, &b, DOCS));
    assert!(a.core.stats().messages_sent("sync") >= DOCS as u64);
}

#[test]
fn a_peer_speaking_only_version_1_gets_document_syncs_not_bundles() {
    const DOCS: usize = 30;
    let mut a = node_holding(DOCS);
    let (mut b, an, bn, _) = connect_new_node(&mut a);
    let now = Duration::ZERO;
    // b says it speaks version 1 alone, as a build before bundles does.
    a.core
        .handle_message(now, direct(&bn, &hello_speaking(&bn, 1, 1)))
        .unwrap();
    assert_eq!(a.core.protocol_version(&bn), Some(1));
    loop {
        let mut moved = 0;
        while let Some(out) = b.core.poll_output() {
            moved += 1;
            if let Output::Send { bytes, .. } = out {
                if kind_of(&bytes) != "hello" {
                    a.core.handle_message(now, direct(&bn, &bytes)).unwrap();
                }
            }
        }
        while let Some(out) = a.core.poll_output() {
            moved += 1;
            if let Output::Send { bytes, .. } = out {
                assert_ne!(kind_of(&bytes), "bundle");
                assert_eq!(envelope_version(&bytes), 1);
                b.core.handle_message(now, direct(&an, &bytes)).unwrap();
            }
        }
        if moved == 0 {
            break;
        }
    }
    assert!(holds_the_same(&a, &b, DOCS));
    assert_eq!(a.core.stats().bundled_docs_sent, 0);
}

#[test]
fn a_bundle_is_answered_whole_even_with_acknowledgements_already_pending() {
    let mut a = node("a", "eu");
    let (mut b, an, bn, mut rng) = connect_new_node(&mut a);
    let now = Duration::ZERO;
    pump(&mut a, &an, &mut b, &bn, now);
    // b applies 3,500 of a's deltas: their acknowledgements wait for the
    // next flush, which no timeout brings here.
    for i in 0..3_500 {
        commit(&mut a, &format!("early/{i:05}"), json!({ "i": i }));
    }
    deliver(&mut a, &an, &mut b, now);
    assert!(b.core.queue_depths().pending_acks >= 3_000);
    // a has 1,000 more that b lacks, which reach it in one bundle while
    // those acknowledgements are pending.
    for i in 0..1_000 {
        commit(&mut a, &format!("many/{i:05}"), json!({ "i": i }));
    }
    while a.core.poll_output().is_some() {}
    // a's next anti-entropy round finds them (b's timer, which would
    // flush b's acknowledgements, does not run).
    let later = Duration::from_secs(40);
    a.core.handle_timeout(later, &mut rng).unwrap();
    assert!(b.core.queue_depths().pending_acks >= 3_000);
    pump(&mut a, &an, &mut b, &bn, later);
    assert!(holds_the_same(&a, &b, 1_000));
    assert_eq!(a.core.stats().bundled_docs_sent, 1_000);
    a.core
        .handle_timeout(later + Duration::from_secs(10), &mut rng)
        .unwrap();
    assert_eq!(a.core.stats().bundled_docs_unanswered, 0);
}

#[test]
fn a_few_differences_among_many_documents_are_found_by_a_sketch() {
    const DOCS: usize = 600;
    let mut a = node_holding(DOCS);
    let (mut b, an, bn, mut rng) = connect_new_node(&mut a);
    pump(&mut a, &an, &mut b, &bn, Duration::ZERO);
    assert!(holds_the_same(&a, &b, DOCS));
    // Writes the other side does not hear of: changed on each side, and a
    // new document on each side.
    for i in [7, 123, 400] {
        commit(&mut a, &format!("many/{i:05}"), json!({ "on": "a" }));
    }
    for i in [300, 599] {
        commit(&mut b, &format!("many/{i:05}"), json!({ "on": "b" }));
    }
    commit(&mut a, "many/only-a", json!({ "on": "a" }));
    commit(&mut b, "many/only-b", json!({ "on": "b" }));
    while a.core.poll_output().is_some() {}
    while b.core.poll_output().is_some() {}
    // a's next anti-entropy round reconciles with b.
    let later = Duration::from_secs(600);
    a.core.handle_timeout(later, &mut rng).unwrap();
    let mut sketch_bodies = 0;
    let mut watch = |m: &Message| {
        if let Message::Reconcile(r) = m {
            sketch_bodies += r
                .ranges
                .iter()
                .filter(|p| matches!(p.body, RangeBody::Sketch { .. }))
                .count();
        }
    };
    while deliver_watching(&mut a, &an, &mut b, later, &mut watch)
        + deliver_watching(&mut b, &bn, &mut a, later, &mut watch)
        > 0
    {}
    assert!(sketch_bodies > 0, "b answered with no sketch");
    assert_eq!(a.core.stats().sketches_decoded, 1);
    assert_eq!(a.core.stats().sketches_split, 0);
    assert!(holds_the_same(&a, &b, DOCS));
    for doc in ["many/only-a", "many/only-b"] {
        let doc = id(doc);
        assert_eq!(
            a.core.engine().heads(&doc).unwrap(),
            b.core.engine().heads(&doc).unwrap()
        );
    }
}
