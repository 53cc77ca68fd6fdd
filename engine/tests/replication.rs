//! Two replication cores over real engines, wired back to back in memory:
//! deltas, reconciliation on connect, per-document sync, progress, and
//! refusal of bad messages.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::random::SplitMix64;
use causeway_engine::replication::wire::{Envelope, Message, MAX_GOSSIP_BYTES};
use causeway_engine::replication::{Channel, Output, Replicator, ReplicatorConfig, Verdict};
use causeway_engine::Engine;
use common::{fresh, id};
use serde_json::json;
use tempfile::TempDir;

struct Node {
    _dir: TempDir,
    core: Replicator,
}

fn node(name: &str, region: &str) -> Node {
    let (dir, engine) = fresh();
    let config = ReplicatorConfig::new(
        NodeId::new(name).unwrap(),
        Region::new(region).unwrap(),
        ClusterId::new("test").unwrap(),
    );
    Node {
        _dir: dir,
        core: Replicator::new(engine, config, Duration::ZERO).unwrap(),
    }
}

/// Delivers `src`'s outputs to `dst`; returns how many there were.
fn deliver(src: &mut Node, from: &NodeId, dst: &mut Node, now: Duration) -> usize {
    let mut delivered = 0;
    while let Some(out) = src.core.poll_output() {
        delivered += 1;
        let (channel, bytes) = match out {
            Output::Publish(bytes) => (Channel::Gossip, bytes),
            Output::Send { bytes, .. } => (Channel::Direct, bytes),
            Output::Misbehaving { peer, reason } => panic!("{peer} misbehaved: {reason}"),
        };
        dst.core.handle_message(now, from, channel, &bytes).unwrap();
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
    n.core.handle_local_commit(&doc, changes, &c.heads);
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

#[test]
fn bad_messages_are_refused_with_a_reason_and_change_nothing() {
    let mut a = node("a", "eu");
    let bn = NodeId::new("b").unwrap();
    let mut rng = SplitMix64::new(3);
    a.core.handle_connect(Duration::ZERO, &bn, &mut rng);
    while a.core.poll_output().is_some() {}
    let now = Duration::ZERO;
    let verdict = a
        .core
        .handle_message(now, &bn, Channel::Gossip, b"\x83garbage")
        .unwrap();
    assert_eq!(verdict, Verdict::Reject);

    // A delta from another cluster.
    let mut other = node("c", "eu");
    let mut other_cfg_engine = other.core.engine().clone();
    let doc = id("x/1");
    let c = other_cfg_engine.put_json(&doc, &json!({"a": 1})).unwrap();
    let changes = other_cfg_engine.changes_since(&doc, &[]).unwrap();
    let foreign = Replicator::new(
        std::mem::replace(&mut other_cfg_engine, other.core.engine().clone()),
        ReplicatorConfig::new(
            NodeId::new("c").unwrap(),
            Region::new("eu").unwrap(),
            ClusterId::new("elsewhere").unwrap(),
        ),
        now,
    );
    let mut foreign = foreign.unwrap();
    foreign.handle_local_commit(&doc, changes.clone(), &c.heads);
    let Some(Output::Publish(bytes)) = foreign.poll_output() else {
        panic!("no delta")
    };
    assert_eq!(
        a.core
            .handle_message(now, &bn, Channel::Gossip, &bytes)
            .unwrap(),
        Verdict::Reject
    );

    // A delta whose change bytes were tampered with.
    other
        .core
        .handle_local_commit(&doc, changes.clone(), &c.heads);
    let Some(Output::Publish(bytes)) = other.core.poll_output() else {
        panic!("no delta")
    };
    let mut env = Envelope::decode(&bytes, MAX_GOSSIP_BYTES).unwrap();
    let Message::Delta(delta) = &mut env.message else {
        panic!("not a delta")
    };
    let change = &mut delta.changes.last_mut().unwrap().0;
    let middle = change.len() / 2;
    change[middle] ^= 0x01;
    let bytes = env.encode();
    let v = a
        .core
        .handle_message(now, &bn, Channel::Gossip, &bytes)
        .unwrap();
    assert_eq!(v, Verdict::Reject);
    assert!(a.core.engine().heads(&doc).is_err());
    let rejected = &a.core.stats().rejected;
    assert_eq!(rejected.get("malformed"), Some(&1));
    assert_eq!(rejected.get("wrong_cluster"), Some(&1));
    assert_eq!(rejected.values().sum::<u64>(), 3, "{rejected:?}");
}
