//! Garbage collection of deleted documents across three replication cores
//! over real engines, wired in a full mesh in memory: collection waits for
//! every member and for the grace period, collected documents stay
//! collected while peers reconcile, markers go after a second grace
//! period, and writes made after a delete reach nodes that collected it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::random::SplitMix64;
use causeway_engine::replication::{
    Channel, Collection, Inbound, Members, Output, Replicator, ReplicatorConfig,
};
use causeway_engine::{Engine, Error};
use common::{fresh, id};
use serde_json::json;
use tempfile::TempDir;

const GRACE: Duration = Duration::from_secs(600);
const DELETED: usize = 20;

struct Node {
    _dir: TempDir,
    core: Replicator,
    connected: bool,
}

struct Mesh {
    nodes: BTreeMap<NodeId, Node>,
    now: Duration,
    rng: SplitMix64,
}

fn node_id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

impl Mesh {
    /// Nodes named `names`, all members; `collecting` names those that
    /// collect.
    fn new(names: &[&str], collecting: &[&str]) -> Mesh {
        let origin = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let members: Members = names
            .iter()
            .map(|n| (node_id(n), Region::new("eu").unwrap()))
            .collect();
        let mut nodes = BTreeMap::new();
        for name in names {
            let (dir, engine) = fresh();
            let mut config = ReplicatorConfig::new(
                node_id(name),
                Region::new("eu").unwrap(),
                ClusterId::new("test").unwrap(),
            );
            config.anti_entropy_interval = Duration::from_secs(10);
            if collecting.contains(name) {
                config.collection = Some(Collection {
                    grace: GRACE,
                    interval: Duration::from_secs(1),
                    clock_origin: origin,
                });
            }
            let mut core = Replicator::new(engine, config, Duration::ZERO).unwrap();
            core.set_members(Duration::ZERO, Some(members.clone()))
                .unwrap();
            nodes.insert(
                node_id(name),
                Node {
                    _dir: dir,
                    core,
                    connected: false,
                },
            );
        }
        Mesh {
            nodes,
            now: Duration::ZERO,
            rng: SplitMix64::new(7),
        }
    }

    fn engine(&self, name: &str) -> Engine {
        self.nodes[&node_id(name)].core.engine().clone()
    }

    fn core(&mut self, name: &str) -> &mut Replicator {
        &mut self.nodes.get_mut(&node_id(name)).unwrap().core
    }

    /// Connects `name` to every connected node.
    fn connect(&mut self, name: &str) {
        let me = node_id(name);
        let others: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(n, node)| **n != me && node.connected)
            .map(|(n, _)| n.clone())
            .collect();
        for other in others {
            let now = self.now;
            let rng = &mut self.rng;
            let nodes = &mut self.nodes;
            nodes
                .get_mut(&me)
                .unwrap()
                .core
                .handle_connect(now, &other, rng);
            nodes
                .get_mut(&other)
                .unwrap()
                .core
                .handle_connect(now, &me, rng);
        }
        self.nodes.get_mut(&me).unwrap().connected = true;
        self.pump();
    }

    fn disconnect(&mut self, name: &str) {
        let me = node_id(name);
        let others: Vec<NodeId> = self.nodes.keys().filter(|n| **n != me).cloned().collect();
        for other in others {
            self.nodes
                .get_mut(&other)
                .unwrap()
                .core
                .handle_disconnect(&me);
            self.nodes
                .get_mut(&me)
                .unwrap()
                .core
                .handle_disconnect(&other);
        }
        let node = self.nodes.get_mut(&me).unwrap();
        node.connected = false;
        while node.core.poll_output().is_some() {}
    }

    /// Delivers every output between connected nodes until all are quiet;
    /// a disconnected node's outputs are dropped.
    fn pump(&mut self) {
        loop {
            let mut moved = 0;
            let names: Vec<NodeId> = self.nodes.keys().cloned().collect();
            for from in &names {
                let mut outs = Vec::new();
                let node = self.nodes.get_mut(from).unwrap();
                while let Some(out) = node.core.poll_output() {
                    outs.push(out);
                }
                if !node.connected {
                    continue;
                }
                for out in outs {
                    moved += 1;
                    let (channel, bytes, to) = match out {
                        Output::Publish(bytes) => (Channel::Gossip, bytes, None),
                        Output::Send { to, bytes } => (Channel::Direct, bytes, Some(to)),
                        Output::Misbehaving { peer, reason } => {
                            panic!("{from} says {peer} misbehaved: {reason}")
                        }
                    };
                    for dst in &names {
                        if dst == from
                            || to.as_ref().is_some_and(|t| t != dst)
                            || !self.nodes[dst].connected
                        {
                            continue;
                        }
                        let inbound = Inbound {
                            from,
                            author: from,
                            channel,
                            bytes: &bytes,
                        };
                        let now = self.now;
                        self.nodes
                            .get_mut(dst)
                            .unwrap()
                            .core
                            .handle_message(now, inbound)
                            .unwrap();
                    }
                }
            }
            if moved == 0 {
                return;
            }
        }
    }

    /// Runs every connected node's timers each second until `to`.
    fn run_until(&mut self, to: Duration) {
        while self.now < to {
            self.now += Duration::from_secs(1);
            let now = self.now;
            for node in self.nodes.values_mut().filter(|n| n.connected) {
                node.core.handle_timeout(now, &mut self.rng).unwrap();
            }
            self.pump();
        }
    }

    fn commit(&mut self, name: &str, doc: &str, value: serde_json::Value) {
        let engine = self.engine(name);
        let doc = id(doc);
        // A collected document's heads name changes it no longer holds.
        let before = match engine.collected(&doc).unwrap() {
            Some(_) => Vec::new(),
            None => engine.heads(&doc).unwrap_or_default(),
        };
        let c = engine.merge_json(&doc, &value).unwrap();
        let changes = engine.changes_since(&doc, &before).unwrap();
        let now = self.now;
        self.core(name)
            .handle_local_commit(now, &doc, changes, &c.heads);
        self.pump();
    }

    fn delete(&mut self, name: &str, doc: &str) {
        let engine = self.engine(name);
        let doc = id(doc);
        let before = engine.heads(&doc).unwrap();
        let c = engine.delete(&doc).unwrap();
        let changes = engine.changes_since(&doc, &before).unwrap();
        let now = self.now;
        self.core(name)
            .handle_local_commit(now, &doc, changes, &c.heads);
        self.pump();
    }

    fn collected(&self, name: &str) -> u64 {
        self.nodes[&node_id(name)].core.stats().documents_collected
    }
}

fn gone(i: usize) -> String {
    format!("gone/{i:02}")
}

/// Three nodes that all collect, with `DELETED` documents written on a and
/// deleted on b, and one kept document.
fn deleted_everywhere() -> Mesh {
    let mut mesh = Mesh::new(&["a", "b", "c"], &["a", "b", "c"]);
    for n in ["a", "b", "c"] {
        mesh.connect(n);
    }
    mesh.commit("a", "kept", json!({"k": 1}));
    for i in 0..DELETED {
        mesh.commit("a", &gone(i), json!({"i": i}));
    }
    for i in 0..DELETED {
        mesh.delete("b", &gone(i));
    }
    mesh
}

#[test]
fn a_delete_every_member_holds_is_collected_after_the_grace_period_and_its_marker_after_another() {
    let mut mesh = deleted_everywhere();
    // Held by everyone, but the grace period has not passed.
    mesh.run_until(GRACE / 2);
    for n in ["a", "b", "c"] {
        assert_eq!(
            mesh.collected(n),
            0,
            "{n} collected within the grace period"
        );
        let (tombstones, _) = mesh.engine(n).tombstones(None, 100).unwrap();
        assert_eq!(tombstones.len(), DELETED, "{n}");
    }
    mesh.run_until(GRACE + Duration::from_secs(30));
    for n in ["a", "b", "c"] {
        let engine = mesh.engine(n);
        assert_eq!(mesh.collected(n), DELETED as u64, "{n}");
        for i in 0..DELETED {
            let doc = id(&gone(i));
            assert!(engine.collected(&doc).unwrap().is_some(), "{n} {doc}");
            assert!(matches!(engine.get_json(&doc), Err(Error::Deleted(_))));
            assert!(matches!(
                engine.changes_since(&doc, &[]),
                Err(Error::Deleted(_))
            ));
        }
        assert_eq!(engine.get_json(&id("kept")).unwrap(), json!({"k": 1}));
        assert!(engine.last_contact().unwrap().is_some(), "{n}");
    }
    // Reconciling on: nothing is sent back, nothing is applied.
    let applied: u64 = mesh
        .nodes
        .values()
        .map(|n| n.core.stats().sync_changes_applied)
        .sum();
    mesh.run_until(GRACE + Duration::from_secs(120));
    let after: u64 = mesh
        .nodes
        .values()
        .map(|n| n.core.stats().sync_changes_applied)
        .sum();
    assert_eq!(after, applied, "collected history was sent again");
    // A second grace period later the markers go too.
    mesh.run_until(2 * GRACE + Duration::from_secs(60));
    for n in ["a", "b", "c"] {
        let engine = mesh.engine(n);
        assert_eq!(
            mesh.nodes[&node_id(n)].core.stats().markers_forgotten,
            DELETED as u64,
            "{n}"
        );
        let (tombstones, _) = engine.tombstones(None, 100).unwrap();
        assert!(tombstones.is_empty(), "{n}: {tombstones:?}");
        assert!(matches!(
            engine.get_json(&id(&gone(0))),
            Err(Error::NotFound(_))
        ));
        assert_eq!(engine.get_json(&id("kept")).unwrap(), json!({"k": 1}));
    }
}

#[test]
fn a_member_that_has_not_got_the_delete_holds_collection_back() {
    let mut mesh = Mesh::new(&["a", "b", "c"], &["a", "b", "c"]);
    for n in ["a", "b", "c"] {
        mesh.connect(n);
    }
    mesh.commit("a", "doc", json!({"x": 1}));
    mesh.disconnect("c");
    mesh.delete("a", "doc");
    mesh.run_until(2 * GRACE);
    for n in ["a", "b"] {
        assert_eq!(mesh.collected(n), 0, "{n} collected what c may not hold");
    }
    // c comes back, gets the delete, and everyone collects.
    mesh.connect("c");
    mesh.run_until(2 * GRACE + Duration::from_secs(60));
    for n in ["a", "b", "c"] {
        assert_eq!(mesh.collected(n), 1, "{n}");
    }
}

/// Two nodes where only a collects: b writes a document and deletes it,
/// and a has collected it once the grace period passed.
fn collected_by_a_alone() -> Mesh {
    let mut mesh = Mesh::new(&["a", "b"], &["a"]);
    for n in ["a", "b"] {
        mesh.connect(n);
    }
    mesh.commit("b", "doc", json!({"old": true}));
    mesh.delete("b", "doc");
    mesh.run_until(GRACE + Duration::from_secs(30));
    assert_eq!(mesh.collected("a"), 1);
    mesh
}

#[test]
fn a_write_made_after_the_delete_reaches_a_node_that_collected_it() {
    // b keeps the tombstone and writes after it.
    let mut mesh = collected_by_a_alone();
    let (a, b) = (mesh.engine("a"), mesh.engine("b"));
    // b still holds the history and reconciles it with a, which answers
    // that it holds the tombstone: nothing is sent back.
    let applied = mesh.core("a").stats().sync_changes_applied;
    mesh.run_until(GRACE + Duration::from_secs(90));
    assert!(a.collected(&id("doc")).unwrap().is_some());
    assert_eq!(mesh.core("a").stats().sync_changes_applied, applied);
    assert!(b.get_json(&id("doc")).is_err());

    mesh.commit("b", "doc", json!({"new": 1}));
    mesh.run_until(GRACE + Duration::from_secs(150));
    assert_eq!(b.get_json(&id("doc")).unwrap(), json!({"new": 1}));
    assert_eq!(a.get_json(&id("doc")).unwrap(), json!({"new": 1}));
    assert_eq!(a.heads(&id("doc")).unwrap(), b.heads(&id("doc")).unwrap());
    assert!(a.collected(&id("doc")).unwrap().is_none());
}

#[test]
fn a_write_on_the_node_that_collected_starts_the_document_afresh_and_converges() {
    let mut mesh = collected_by_a_alone();
    mesh.commit("a", "doc", json!({"again": 2}));
    mesh.run_until(GRACE + Duration::from_secs(90));
    let (a, b) = (mesh.engine("a"), mesh.engine("b"));
    assert_eq!(a.get_json(&id("doc")).unwrap(), json!({"again": 2}));
    assert_eq!(b.get_json(&id("doc")).unwrap(), json!({"again": 2}));
    assert_eq!(a.heads(&id("doc")).unwrap(), b.heads(&id("doc")).unwrap());
}
