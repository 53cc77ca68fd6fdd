//! Session tokens, cross-region holders and lag over three replication
//! cores in three regions, wired in memory, with a partition: a token read
//! in another region sees its write once the region holds it and never
//! before; during the partition the write is durable only locally, the lag
//! towards the cut-off regions grows; after the heal everything converges,
//! both other regions hold the write and the lag falls to zero.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::random::SplitMix64;
use causeway_engine::replication::wire::{Envelope, Message};
use causeway_engine::replication::{
    Channel, Fanout, Inbound, Output, Replicator, ReplicatorConfig,
};
use causeway_engine::{DocId, SessionToken};
use common::{fresh, id};
use serde_json::json;
use tempfile::TempDir;

struct Net {
    _dirs: Vec<TempDir>,
    cores: Vec<Replicator>,
    names: Vec<NodeId>,
    /// Nodes cut off from every other node.
    isolated: BTreeSet<usize>,
    /// Directed pairs whose acknowledgements are lost.
    drop_acks: BTreeSet<(usize, usize)>,
    now: Duration,
    rng: SplitMix64,
}

impl Net {
    fn new(regions: &[&str]) -> Net {
        Net::with(regions, |_| {})
    }

    /// Cores in `regions`, each configured by `tune`.
    fn with(regions: &[&str], tune: impl Fn(&mut ReplicatorConfig)) -> Net {
        let mut dirs = Vec::new();
        let mut cores = Vec::new();
        let mut names = Vec::new();
        for (i, region) in regions.iter().enumerate() {
            let (dir, engine) = fresh();
            let name = NodeId::new(format!("n{i}")).unwrap();
            let mut config = ReplicatorConfig::new(
                name.clone(),
                Region::new(*region).unwrap(),
                ClusterId::new("test").unwrap(),
            );
            tune(&mut config);
            cores.push(Replicator::new(engine, config, Duration::ZERO).unwrap());
            dirs.push(dir);
            names.push(name);
        }
        let mut net = Net {
            _dirs: dirs,
            cores,
            names,
            isolated: BTreeSet::new(),
            drop_acks: BTreeSet::new(),
            now: Duration::ZERO,
            rng: SplitMix64::new(7),
        };
        net.connect_all();
        net
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        a != b && !self.isolated.contains(&a) && !self.isolated.contains(&b)
    }

    fn connect_all(&mut self) {
        for a in 0..self.cores.len() {
            for b in 0..self.cores.len() {
                if self.linked(a, b) {
                    let peer = self.names[b].clone();
                    self.cores[a].handle_connect(self.now, &peer, &mut self.rng);
                }
            }
        }
    }

    fn isolate(&mut self, i: usize) {
        for b in 0..self.cores.len() {
            if self.linked(i, b) {
                let (pi, pb) = (self.names[i].clone(), self.names[b].clone());
                self.cores[i].handle_disconnect(&pb);
                self.cores[b].handle_disconnect(&pi);
            }
        }
        self.isolated.insert(i);
    }

    fn heal(&mut self) {
        let cut: Vec<usize> = std::mem::take(&mut self.isolated).into_iter().collect();
        for i in cut {
            for b in 0..self.cores.len() {
                if self.linked(i, b) {
                    let (pi, pb) = (self.names[i].clone(), self.names[b].clone());
                    self.cores[i].handle_connect(self.now, &pb, &mut self.rng);
                    self.cores[b].handle_connect(self.now, &pi, &mut self.rng);
                }
            }
        }
    }

    /// Delivers every output (gossip to every linked node, direct messages
    /// to their target if linked) until all are quiet, advancing time past
    /// the acknowledgement interval.
    fn settle(&mut self) {
        for _ in 0..10 {
            let mut moved = true;
            while moved {
                moved = false;
                for src in 0..self.cores.len() {
                    while let Some(out) = self.cores[src].poll_output() {
                        moved = true;
                        self.route(src, out);
                    }
                }
            }
            self.now += Duration::from_millis(150);
            for core in &mut self.cores {
                core.handle_timeout(self.now, &mut self.rng).unwrap();
            }
        }
    }

    fn route(&mut self, src: usize, out: Output) {
        let from = self.names[src].clone();
        let targets: Vec<(usize, Channel, Vec<u8>)> = match out {
            Output::Publish(bytes) => (0..self.cores.len())
                .filter(|&b| self.linked(src, b))
                .map(|b| (b, Channel::Gossip, bytes.clone()))
                .collect(),
            Output::Send { to, bytes } => {
                let b = self.names.iter().position(|n| *n == to).unwrap();
                let lost = self.drop_acks.contains(&(src, b))
                    && matches!(
                        Envelope::decode(&bytes, usize::MAX).map(|e| e.message),
                        Ok(Message::Ack(_))
                    );
                if self.linked(src, b) && !lost {
                    vec![(b, Channel::Direct, bytes)]
                } else {
                    Vec::new()
                }
            }
            Output::Misbehaving { peer, reason } => panic!("{peer} misbehaved: {reason}"),
        };
        for (b, channel, bytes) in targets {
            self.cores[b]
                .handle_message(
                    self.now,
                    Inbound {
                        from: &from,
                        author: &from,
                        channel,
                        bytes: &bytes,
                    },
                )
                .unwrap();
        }
    }

    /// A client's write at node `i`; returns its session token.
    fn write(&mut self, i: usize, doc: &DocId, value: serde_json::Value) -> SessionToken {
        let engine = self.cores[i].engine().clone();
        let before = engine.heads(doc).unwrap_or_default();
        let c = engine.merge_json(doc, &value).unwrap();
        let changes = engine.changes_since(doc, &before).unwrap();
        self.cores[i].handle_local_commit(self.now, doc, changes, &c.heads);
        c.session
    }

    /// Other regions than node `i`'s known to hold `token`'s heads of `doc`.
    fn regions_holding(&self, i: usize, doc: &DocId, token: &SessionToken) -> BTreeSet<String> {
        self.cores[i]
            .holders(doc, token.heads(doc).unwrap())
            .unwrap()
            .into_iter()
            .filter(|h| h.holds)
            .filter_map(|h| h.region.map(|r| r.to_string()))
            .collect()
    }
}

#[test]
fn a_token_read_in_another_region_sees_the_write_partition_or_not() {
    let mut net = Net::new(&["eu", "us", "ap"]);
    net.settle();
    let doc = id("cart/1");

    // Connected: the token written in eu is held in us after delivery, and
    // the read there shows the write.
    let token = net.write(0, &doc, json!({"apples": 1}));
    net.settle();
    let us = net.cores[1].engine().clone();
    assert!(us.session_missing(&token).unwrap().is_empty());
    assert_eq!(us.get_json(&doc).unwrap(), json!({"apples": 1}));
    assert_eq!(
        net.regions_holding(0, &doc, &token),
        BTreeSet::from(["ap".to_string(), "us".to_string()])
    );
    for peer in &net.names[1..] {
        assert_eq!(net.cores[0].progress().lag(peer).documents, 0);
    }

    // eu cut off: a second write is durable in eu only. A token read in us
    // would wait and then get "not yet" (what is missing), never the old value.
    net.isolate(0);
    let token2 = net.write(0, &doc, json!({"pears": 2}));
    net.settle();
    let missing = us
        .wait_for_session(&token2, Duration::from_millis(30))
        .unwrap();
    assert_eq!(missing.heads(&doc), token2.heads(&doc));
    assert!(net.regions_holding(0, &doc, &token2).is_empty());
    // Lag towards both other regions rises with time during the cut.
    let during = net.cores[0].progress().lag(&net.names[1]);
    assert_eq!((during.documents, during.changes), (1, 1));
    assert!(
        during.seconds(net.now) >= 1.0,
        "lag {during:?} at {:?}",
        net.now
    );

    // Meanwhile us keeps writing to the same document.
    net.write(1, &doc, json!({"plums": 3}));
    net.settle();

    // Heal: anti-entropy brings everyone together; the token is held in us,
    // both other regions hold the write, lag is zero everywhere.
    net.heal();
    net.settle();
    assert!(us.session_missing(&token2).unwrap().is_empty());
    let expected = json!({"apples": 1, "pears": 2, "plums": 3});
    for core in &net.cores {
        assert_eq!(core.engine().get_json(&doc).unwrap(), expected);
    }
    assert_eq!(
        net.regions_holding(0, &doc, &token2),
        BTreeSet::from(["ap".to_string(), "us".to_string()])
    );
    for (i, core) in net.cores.iter().enumerate() {
        for (j, peer) in net.names.iter().enumerate() {
            if i != j {
                let lag = core.progress().lag(peer);
                assert_eq!(lag.documents, 0, "node {i} towards {j}: {lag:?}");
            }
        }
    }
    // Delay samples were taken when the pending marks cleared.
    let delays = net.cores[0].take_delays();
    assert!(delays.iter().any(|d| d.delay >= Duration::from_secs(1)));
}

#[test]
fn a_peer_that_got_a_write_through_a_third_node_is_cleared_by_reconciliation() {
    // eu writes while cut off; its delta reaches us by another path (as a
    // gossip relay would deliver it), so us cannot acknowledge it to eu.
    // After the heal eu and us reconcile as equal, with no sync between
    // them: reconciliation alone must clear eu's pending mark for us.
    let mut net = Net::new(&["eu", "us", "ap"]);
    net.settle();
    let doc = id("doc/relay");
    net.isolate(0);
    let token = net.write(0, &doc, json!({"x": 1}));
    let Some(Output::Publish(delta)) = net.cores[0].poll_output() else {
        panic!("a local commit publishes a delta");
    };
    let eu = net.names[0].clone();
    net.cores[1]
        .handle_message(net.now, Inbound::gossip(&eu, &eu, &delta))
        .unwrap();
    net.settle();
    assert_eq!(net.cores[0].progress().lag(&net.names[1]).documents, 1);
    net.heal();
    net.settle();
    assert_eq!(net.cores[0].progress().lag(&net.names[1]).documents, 0);
    assert!(net.regions_holding(0, &doc, &token).contains("us"));
}

#[test]
fn a_write_whose_acknowledgement_was_lost_is_confirmed_at_the_next_round() {
    // n0 and n1 share a region; rounds reconcile only with another region,
    // so n0 never reconciles with n1. n1 gets n0's write, but every
    // acknowledgement it sends n0 is lost: n0 must ask n1 at its next
    // round (a document sync), whose "in sync" answer confirms the write.
    let mut net = Net::with(&["eu", "eu", "ap"], |c| {
        c.reconcile_fanout = Some(Fanout {
            local: 0,
            remote: 1,
        })
    });
    net.settle();
    net.drop_acks.insert((1, 0));
    let doc = id("doc/unacked");
    let token = net.write(0, &doc, json!({"x": 1}));
    net.settle();
    let n1 = net.names[1].clone();
    assert_eq!(
        net.cores[1].engine().heads(&doc).unwrap(),
        token.heads(&doc).unwrap()
    );
    assert_eq!(net.cores[0].progress().lag(&n1).documents, 1);
    assert_eq!(net.cores[0].stats().confirmations, 0);
    // The next round, then the answer.
    net.drop_acks.clear();
    let round = ReplicatorConfig::new(
        n1.clone(),
        Region::new("eu").unwrap(),
        ClusterId::new("test").unwrap(),
    )
    .anti_entropy_interval;
    net.now += round * 5 / 4;
    net.settle();
    assert_eq!(net.cores[0].stats().confirmations, 1);
    assert_eq!(net.cores[0].progress().lag(&n1).documents, 0);
    assert!(net.cores[0]
        .holders(&doc, token.heads(&doc).unwrap())
        .unwrap()
        .iter()
        .any(|h| h.peer == n1 && h.holds));
}

#[test]
fn peak_queue_depths_keep_the_largest_queues_seen() {
    let mut net = Net::new(&["eu", "us", "ap"]);
    net.settle();
    let doc = id("doc/peaks");
    net.write(0, &doc, json!({"x": 1}));
    // The delta waits in the outputs until the caller takes it.
    assert!(net.cores[0].queue_depths().outputs >= 1);
    net.settle();
    for core in &net.cores {
        let (now, peak) = (core.queue_depths(), core.peak_queue_depths());
        assert_eq!(now.outputs, 0);
        assert!(peak.outputs >= 1, "{peak:?}");
        assert!(peak.queued_syncs >= now.queued_syncs && peak.open_syncs >= now.open_syncs);
    }
    // The replicas queued an acknowledgement to the origin; it went out.
    for core in &net.cores[1..] {
        assert_eq!(core.queue_depths().pending_acks, 0);
        assert!(core.peak_queue_depths().pending_acks >= 1);
    }
}
