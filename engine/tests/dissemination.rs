//! Region-aware dissemination between replication cores over real engines,
//! wired in memory: a write pushed along region trees reaches every member
//! once, enters each other region once, and what is lost or cut off is sent
//! again, past a node that went away, or through the next bridge.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::random::SplitMix64;
use causeway_engine::replication::wire::{Envelope, Message, MAX_FRAME_BYTES};
use causeway_engine::replication::{
    Dissemination, Inbound, Output, Replicator, ReplicatorConfig, MIN_PUSH_RETRY,
};
use causeway_engine::Engine;
use common::{fresh, id};
use serde_json::json;
use tempfile::TempDir;

struct Member {
    _dir: TempDir,
    name: NodeId,
    region: Region,
    core: Replicator,
    up: bool,
}

/// Nodes in regions, every pair connected, messages in one FIFO queue.
struct Cluster {
    nodes: Vec<Member>,
    queue: VecDeque<(usize, usize, Vec<u8>)>,
    now: Duration,
    rng: SplitMix64,
    /// Pushes delivered: (from, to).
    pushes: Vec<(usize, usize)>,
}

impl Cluster {
    /// `per_region` nodes in each of `regions`, with tree fanout `fanout`.
    fn new(regions: &[&str], per_region: usize, fanout: usize) -> Cluster {
        let mut nodes = Vec::new();
        for r in regions {
            for k in 0..per_region {
                let (dir, engine) = fresh();
                let name = NodeId::new(format!("{r}{k}")).unwrap();
                let region = Region::new(*r).unwrap();
                let mut config = ReplicatorConfig::new(
                    name.clone(),
                    region.clone(),
                    ClusterId::new("test").unwrap(),
                );
                config.dissemination = Dissemination::Regions;
                config.tree_fanout = fanout;
                let core = Replicator::new(engine, config, Duration::ZERO).unwrap();
                nodes.push(Member {
                    _dir: dir,
                    name,
                    region,
                    core,
                    up: true,
                });
            }
        }
        let mut c = Cluster {
            nodes,
            queue: VecDeque::new(),
            now: Duration::ZERO,
            rng: SplitMix64::new(7),
            pushes: Vec::new(),
        };
        let n = c.nodes.len();
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    let peer = c.nodes[b].name.clone();
                    c.nodes[a].core.handle_connect(c.now, &peer, &mut c.rng);
                }
            }
        }
        c.run(|_, _, _| true);
        c.pushes.clear();
        c
    }

    fn index(&self, name: &NodeId) -> usize {
        self.nodes.iter().position(|m| m.name == *name).unwrap()
    }

    /// Moves every node's outputs to the queue.
    fn collect(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(out) = self.nodes[i].core.poll_output() {
                match out {
                    Output::Send { to, bytes } => {
                        let j = self.index(&to);
                        self.queue.push_back((i, j, bytes));
                    }
                    Output::Publish(_) => panic!("a push cluster published by gossip"),
                    Output::Misbehaving { peer, reason } => panic!("{peer} misbehaved: {reason}"),
                }
            }
        }
    }

    /// Delivers messages until none are left; `keep(from, to, message)`
    /// says whether one arrives (false: lost).
    fn run(&mut self, mut keep: impl FnMut(usize, usize, &Message) -> bool) {
        self.collect();
        while let Some((from, to, bytes)) = self.queue.pop_front() {
            let message = Envelope::decode(&bytes, MAX_FRAME_BYTES).unwrap().message;
            if !self.nodes[to].up || !keep(from, to, &message) {
                continue;
            }
            if matches!(message, Message::Push(_)) {
                self.pushes.push((from, to));
            }
            let name = self.nodes[from].name.clone();
            let now = self.now;
            self.nodes[to]
                .core
                .handle_message(now, Inbound::direct(&name, &bytes))
                .unwrap();
            self.collect();
        }
    }

    /// Advances time by `by` and runs every node's timers (acks flush,
    /// unacknowledged pushes are resent), delivering what follows.
    fn tick(&mut self, by: Duration, keep: impl FnMut(usize, usize, &Message) -> bool) {
        self.now += by;
        for i in 0..self.nodes.len() {
            if self.nodes[i].up {
                let now = self.now;
                self.nodes[i]
                    .core
                    .handle_timeout(now, &mut self.rng)
                    .unwrap();
            }
        }
        self.run(keep);
    }

    /// Node `i` writes `value` to `doc`.
    fn write(&mut self, i: usize, doc: &str, value: serde_json::Value) {
        let engine: Engine = self.nodes[i].core.engine().clone();
        let doc = id(doc);
        let before = engine.heads(&doc).unwrap_or_default();
        let c = engine.merge_json(&doc, &value).unwrap();
        let changes = engine.changes_since(&doc, &before).unwrap();
        let now = self.now;
        self.nodes[i]
            .core
            .handle_local_commit(now, &doc, changes, &c.heads);
    }

    /// Node `i` writes `value` to `doc`; the first push it sends to a node
    /// in `to` is lost, the rest is delivered. Returns that node.
    fn write_losing_first_push(
        &mut self,
        i: usize,
        doc: &str,
        value: serde_json::Value,
        to: std::ops::Range<usize>,
    ) -> usize {
        let mut lost = None;
        self.write(i, doc, value);
        self.run(|from, dst, m| match m {
            Message::Push(_) if from == i && to.contains(&dst) && lost.is_none() => {
                lost = Some(dst);
                false
            }
            _ => true,
        });
        lost.expect("a push to drop")
    }

    /// Node `i` goes away: every peer sees it disconnect.
    fn take_down(&mut self, i: usize) {
        self.nodes[i].up = false;
        let name = self.nodes[i].name.clone();
        for (j, m) in self.nodes.iter_mut().enumerate() {
            if j != i {
                m.core.handle_disconnect(&name);
            }
        }
    }

    /// Whether every node that is up holds `value` in `doc`.
    fn everyone_has(&self, doc: &str, value: &serde_json::Value) -> bool {
        self.nodes
            .iter()
            .filter(|m| m.up)
            .all(|m| m.core.engine().get_json(&id(doc)).ok().as_ref() == Some(value))
    }

    fn region_of(&self, i: usize) -> &Region {
        &self.nodes[i].region
    }

    /// Pushes delivered into each region from another one.
    fn copies_into(&self) -> BTreeMap<Region, usize> {
        let mut out = BTreeMap::new();
        for &(from, to) in &self.pushes {
            if self.region_of(from) != self.region_of(to) {
                *out.entry(self.region_of(to).clone()).or_default() += 1;
            }
        }
        out
    }

    fn resent(&self) -> u64 {
        self.nodes
            .iter()
            .map(|m| m.core.stats().pushes_resent)
            .sum()
    }
}

/// Longer than the acknowledgement interval (100 ms): acks flow.
const ACKS: Duration = Duration::from_millis(150);
/// Then past the push retry before any round trip is measured (500 ms):
/// what is unacknowledged is resent.
const WAIT: Duration = Duration::from_millis(500);

#[test]
fn a_write_reaches_every_member_once_and_enters_each_other_region_once() {
    let mut c = Cluster::new(&["eu", "us", "ap"], 6, 2);
    c.write(0, "doc/1", json!({"v": 1}));
    c.run(|_, _, _| true);
    let value = json!({"v": 1});
    assert!(c.everyone_has("doc/1", &value));
    // Each of the 17 other nodes received the write in exactly one push.
    let mut received: BTreeMap<usize, usize> = BTreeMap::new();
    for &(_, to) in &c.pushes {
        *received.entry(to).or_default() += 1;
    }
    assert_eq!(received.len(), 17);
    assert!(received.values().all(|&n| n == 1), "{received:?}");
    assert!(!received.contains_key(&0));
    let into = c.copies_into();
    assert_eq!(
        into.values().copied().collect::<Vec<_>>(),
        [1, 1],
        "{into:?}"
    );
    // With a fanout of 2, the origin itself sends 2 pushes in its region
    // and one per other region.
    let from_origin = c.pushes.iter().filter(|(from, _)| *from == 0).count();
    assert_eq!(from_origin, 4);
    // Acknowledgements cover every push: nothing is sent again.
    c.tick(ACKS, |_, _, _| true);
    c.tick(WAIT, |_, _, _| true);
    assert_eq!(c.resent(), 0);
    assert_eq!(c.pushes.len(), 17);
}

#[test]
fn a_lost_push_is_sent_again_and_a_lost_bridge_copy_goes_to_the_next_bridge() {
    let mut c = Cluster::new(&["eu", "us"], 5, 2);
    // The first push into "us" is lost: the origin tries the next bridge.
    let mut first_bridge = None;
    c.write(0, "doc/1", json!({"v": 1}));
    c.run(|from, to, m| {
        let into_us = from < 5 && to >= 5;
        match m {
            Message::Push(_) if into_us && first_bridge.is_none() => {
                first_bridge = Some(to);
                false
            }
            _ => true,
        }
    });
    let first = first_bridge.expect("a copy went to us");
    assert!(!c.everyone_has("doc/1", &json!({"v": 1})));
    c.tick(ACKS, |_, _, _| true);
    c.tick(WAIT, |_, _, _| true);
    assert!(c.everyone_has("doc/1", &json!({"v": 1})));
    let bridges: Vec<usize> = c
        .pushes
        .iter()
        .filter(|(from, to)| *from < 5 && *to >= 5)
        .map(|(_, to)| *to)
        .collect();
    assert_eq!(bridges.len(), 1);
    assert_ne!(bridges[0], first, "the resend went to another bridge");
    assert!(c.resent() >= 1);

    // A push lost inside a region is sent again to the same child, as soon
    // as the child's measured round trip allows: here (instant delivery)
    // after MIN_PUSH_RETRY.
    c.pushes.clear();
    let lost = c.write_losing_first_push(0, "doc/2", json!({"v": 2}), 0..5);
    c.tick(MIN_PUSH_RETRY / 2, |_, _, _| true);
    assert!(!c.pushes.contains(&(0, lost)));
    c.tick(MIN_PUSH_RETRY / 2, |_, _, _| true);
    assert!(c.everyone_has("doc/2", &json!({"v": 2})));
    assert!(c.pushes.contains(&(0, lost)));
}

#[test]
fn members_that_went_away_are_skipped_and_their_subtrees_still_get_the_write() {
    let mut c = Cluster::new(&["eu", "us"], 8, 2);
    // Down before the write: every relay skips it.
    c.take_down(1);
    c.write(0, "doc/1", json!({"v": 1}));
    c.run(|_, _, _| true);
    assert!(c.everyone_has("doc/1", &json!({"v": 1})));

    // Gone after the push reached the network (and lost with it): the
    // resend goes to its children in the tree instead.
    c.pushes.clear();
    let gone = c.write_losing_first_push(0, "doc/2", json!({"v": 2}), 0..8);
    c.take_down(gone);
    assert!(!c.everyone_has("doc/2", &json!({"v": 2})));
    c.tick(ACKS, |_, _, _| true);
    c.tick(WAIT, |_, _, _| true);
    assert!(c.everyone_has("doc/2", &json!({"v": 2})));
}

#[test]
fn a_child_that_never_acknowledges_gets_a_sync_and_its_children_the_push() {
    let mut c = Cluster::new(&["eu"], 8, 2);
    // Every push from the origin to one of its children is lost: after
    // `max_push_sends` sends the origin gives up pushing to it, syncs the
    // document with it, and pushes to its children in its place, all well
    // before an anti-entropy round (30 s) could repair them.
    let child = c.write_losing_first_push(0, "doc/1", json!({"v": 1}), 0..8);
    let lose = |from: usize, to: usize, m: &Message| {
        !(from == 0 && to == child && matches!(m, Message::Push(_)))
    };
    for _ in 0..6 {
        c.tick(WAIT, lose);
    }
    assert!(c.now < Duration::from_secs(10));
    assert!(c.everyone_has("doc/1", &json!({"v": 1})));
    assert_eq!(c.nodes[0].core.stats().pushes_abandoned, 1);
    assert!(c.nodes[child].core.stats().sync_changes_applied >= 1);
    // The origin's own two children, and the lost child's children.
    let targets: std::collections::BTreeSet<usize> = c
        .pushes
        .iter()
        .filter(|&&(from, _)| from == 0)
        .map(|&(_, to)| to)
        .collect();
    assert!(targets.len() > 2, "the origin pushed to {targets:?}");
}

#[test]
fn a_child_cut_off_is_passed_over_until_it_speaks_again() {
    let mut c = Cluster::new(&["eu"], 8, 2);
    // The origin and one of its children are cut off from each other,
    // both ways. The origin gives up a push to it and silences it.
    let child = c.write_losing_first_push(0, "doc/1", json!({"v": 1}), 0..8);
    let cut = move |from: usize, to: usize, _: &Message| {
        !((from == 0 && to == child) || (from == child && to == 0))
    };
    for _ in 0..6 {
        c.tick(WAIT, cut);
    }
    assert_eq!(c.nodes[0].core.stats().peers_silenced, 1);
    // The next write goes around it at once: no push into the cut, none
    // resent, and every other node has it.
    let resent = c.nodes[0].core.stats().pushes_resent;
    let mut into_cut = 0;
    let mut watch = |from: usize, to: usize, m: &Message| {
        if from == 0 && to == child && matches!(m, Message::Push(_)) {
            into_cut += 1;
        }
        cut(from, to, m)
    };
    c.write(0, "doc/2", json!({"v": 2}));
    c.run(&mut watch);
    for _ in 0..4 {
        c.tick(WAIT, &mut watch);
    }
    assert_eq!(into_cut, 0);
    assert_eq!(c.nodes[0].core.stats().pushes_resent, resent);
    let others_have = |c: &Cluster| {
        (0..8)
            .filter(|&i| i != child)
            .all(|i| c.nodes[i].core.engine().get_json(&id("doc/2")).ok() == Some(json!({"v": 2})))
    };
    assert!(others_have(&c));
    // The cut heals: the child answers the origin's sync of doc/1, is
    // asked at once about doc/2, which it missed, is pushed to again, and
    // has everything, well before an anti-entropy round (30 s).
    for _ in 0..8 {
        c.tick(WAIT, |_, _, _| true);
    }
    c.pushes.clear();
    c.write(0, "doc/3", json!({"v": 3}));
    c.tick(WAIT, |_, _, _| true);
    assert!(c.pushes.contains(&(0, child)), "{:?}", c.pushes);
    assert!(c.now < Duration::from_secs(10));
    assert!(c.everyone_has("doc/1", &json!({"v": 1})));
    assert!(c.everyone_has("doc/2", &json!({"v": 2})));
    assert!(c.everyone_has("doc/3", &json!({"v": 3})));
}
