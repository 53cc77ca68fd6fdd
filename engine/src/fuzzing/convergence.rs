//! Replicas converging through the real replication core under any schedule
//! the input describes.
//!
//! Three to five replicas, each a real [`Engine`] (RocksDB) and a
//! [`Replicator`], in three regions, joined by an in-memory network whose
//! every move the input chooses: edits on any live replica, delivery of any
//! message in flight (so any reordering), drops, duplicates, full and one-way
//! partitions, heals, time passing (timers: anti-entropy, retries, acks),
//! restarts (the core and everything in flight to or from it lost, the store
//! reopened with a new actor), save and load of a document, and snapshots of
//! documents for the merge-law checks. Stores fold their change logs into
//! snapshots every few changes, and with a zero cache budget reload every
//! document from disk on each use.
//!
//! Must hold at the end, after every fault is healed and messages are
//! delivered reliably until the cluster is quiet: every replica has the same
//! heads and the same JSON for every document; no honest replica was reported
//! as misbehaving; and the merge laws on the documents seen along the way
//! (commutative, associative, idempotent, and the final state containing
//! every earlier one).

use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use automerge::{ActorId, Automerge, ChangeHash};
use serde_json::Value;

use crate::config::{CompactionPolicy, EngineConfig};
use crate::doc_id::DocId;
use crate::engine::Engine;
use crate::error::Error;
use crate::json::to_json;
use crate::replication::ids::{ClusterId, NodeId, Region};
use crate::replication::random::SplitMix64;
use crate::replication::{Channel, Inbound, Output, Replicator, ReplicatorConfig, Verdict};
use crate::sim::message_id;

use super::edit::Edit;

/// Steps read from one input.
const MAX_STEPS: usize = 256;
/// Messages in flight; beyond it new messages are dropped (a lossy network).
const MAX_IN_FLIGHT: usize = 4096;
/// Snapshots kept for the merge-law checks.
const MAX_SNAPSHOTS: usize = 4;
/// Simulated time the final phase may take to converge and go quiet.
const SETTLE_BOUND: Duration = Duration::from_secs(30 * 60);
/// Messages the final phase may deliver before it counts as a storm.
const SETTLE_MESSAGES: usize = 200_000;

/// One move of the schedule.
#[derive(Arbitrary, Debug)]
enum Step {
    Edit { replica: u8, doc: bool, edit: Edit },
    Deliver { pick: u16 },
    Drop { pick: u16 },
    Duplicate { pick: u16 },
    DeliverAll,
    Partition { mask: u8 },
    OneWay { from: u8, to: u8 },
    Heal,
    Tick { millis: u16 },
    Restart { replica: u8 },
    SaveLoad { replica: u8, doc: bool },
    Snapshot { replica: u8, doc: bool },
}

#[derive(Arbitrary, Debug)]
struct Scenario {
    extra_replicas: u8,
    zero_cache: bool,
    steps: Vec<Step>,
}

/// A message on its way.
struct Packet {
    from: usize,
    to: usize,
    /// The replica that made it (for gossip, the signed author).
    author: usize,
    epoch: u64,
    channel: Channel,
    bytes: Rc<[u8]>,
}

struct Replica {
    id: NodeId,
    region: Region,
    dir: std::path::PathBuf,
    incarnation: u16,
    core: Option<Replicator>,
    random: SplitMix64,
    seen: HashSet<[u8; 16]>,
}

struct Cluster {
    replicas: Vec<Replica>,
    docs: [DocId; 2],
    zero_cache: bool,
    now: Duration,
    in_flight: VecDeque<Packet>,
    /// `a * n + b`: messages from `a` to `b` are dropped.
    blocked: Vec<bool>,
    /// `a * n + b`: a connection is open (kept symmetric).
    connected: Vec<bool>,
    epoch: Vec<u64>,
    snapshots: Vec<(usize, Vec<u8>)>,
    _dir: tempfile::TempDir,
}

/// Runs one schedule; panics if a property fails.
pub fn run(data: &[u8]) {
    let Ok(scenario) = Scenario::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut cluster = Cluster::new(
        3 + usize::from(scenario.extra_replicas % 3),
        scenario.zero_cache,
    );
    cluster.connect_all();
    for step in scenario.steps.iter().take(MAX_STEPS) {
        cluster.step(step);
    }
    cluster.heal();
    cluster.settle();
    cluster.check_replicas();
    cluster.check_merge_laws();
}

impl Cluster {
    fn new(n: usize, zero_cache: bool) -> Cluster {
        let dir = super::store_dir("causeway-fuzz-convergence-");
        let replicas = (0..n)
            .map(|i| Replica {
                id: valid(NodeId::new(format!("n{i}"))),
                region: valid(Region::new(format!("r{}", i % 3))),
                dir: dir.path().join(format!("n{i}")),
                incarnation: 0,
                core: None,
                random: SplitMix64::new(i as u64),
                seen: HashSet::new(),
            })
            .collect();
        let mut cluster = Cluster {
            replicas,
            docs: [valid(DocId::new("fuzz/a")), valid(DocId::new("fuzz/b"))],
            zero_cache,
            now: Duration::ZERO,
            in_flight: VecDeque::new(),
            blocked: vec![false; n * n],
            connected: vec![false; n * n],
            epoch: vec![0; n * n],
            snapshots: Vec::new(),
            _dir: dir,
        };
        for i in 0..n {
            cluster.start(i);
        }
        cluster
    }

    fn n(&self) -> usize {
        self.replicas.len()
    }

    fn step(&mut self, step: &Step) {
        let n = self.n();
        match step {
            Step::Edit { replica, doc, edit } => self.edit(usize::from(*replica) % n, *doc, edit),
            Step::Deliver { pick } => {
                if let Some(p) = self.take(*pick) {
                    self.deliver(p);
                }
            }
            Step::Drop { pick } => drop(self.take(*pick)),
            Step::Duplicate { pick } => {
                if let Some(p) = self.take(*pick) {
                    let copy = Packet {
                        bytes: p.bytes.clone(),
                        ..p
                    };
                    self.deliver(copy);
                    self.deliver(p);
                }
            }
            Step::DeliverAll => {
                for _ in 0..self.in_flight.len() {
                    if let Some(p) = self.in_flight.pop_front() {
                        self.deliver(p);
                    }
                }
            }
            Step::Partition { mask } => self.partition(*mask),
            Step::OneWay { from, to } => {
                let (a, b) = (usize::from(*from) % n, usize::from(*to) % n);
                if a != b {
                    self.blocked[a * n + b] = true;
                }
            }
            Step::Heal => self.heal(),
            Step::Tick { millis } => {
                self.now += Duration::from_millis(u64::from(*millis));
                self.fire_timers();
            }
            Step::Restart { replica } => self.restart(usize::from(*replica) % n),
            Step::SaveLoad { replica, doc } => self.save_load(usize::from(*replica) % n, *doc),
            Step::Snapshot { replica, doc } => {
                let d = usize::from(*doc);
                if self.snapshots.len() < MAX_SNAPSHOTS {
                    if let Some(bytes) = self.save(usize::from(*replica) % n, d) {
                        self.snapshots.push((d, bytes));
                    }
                }
            }
        }
    }

    /// Opens replica `i`'s store (a new actor per incarnation) and core.
    fn start(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        let config = EngineConfig {
            cache_budget_bytes: if self.zero_cache { 0 } else { 64 << 20 },
            compaction: CompactionPolicy {
                max_log_changes: 4,
                max_log_bytes: 4 << 20,
            },
            actor: Some(ActorId::from([
                i as u8 + 1,
                (r.incarnation >> 8) as u8,
                r.incarnation as u8,
            ])),
            footprint: crate::config::Footprint::Small,
            ..EngineConfig::default()
        };
        let engine = Engine::open(&r.dir, config).unwrap_or_else(|e| panic!("open n{i}: {e}"));
        let config = ReplicatorConfig::new(
            r.id.clone(),
            r.region.clone(),
            valid(ClusterId::new("fuzz")),
        );
        let core =
            Replicator::new(engine, config, self.now).unwrap_or_else(|e| panic!("core n{i}: {e}"));
        r.core = Some(core);
        r.seen.clear();
        self.drain(i);
    }

    fn edit(&mut self, i: usize, doc: bool, edit: &Edit) {
        let doc = self.docs[usize::from(doc)].clone();
        let Some(core) = self.replicas[i].core.as_mut() else {
            return;
        };
        let engine = core.engine().clone();
        let before = match engine.heads(&doc) {
            Ok(h) => h,
            Err(Error::NotFound(_)) => Vec::new(),
            Err(e) => panic!("heads: {e}"),
        };
        let committed = match engine.upsert(&doc, |tx| edit.apply(tx)) {
            Ok(c) => c,
            // The edit did not apply to this replica's document (Automerge
            // refused it); nothing was written.
            Err(Error::Transaction { .. }) => return,
            Err(e) => panic!("edit on n{i}: {e}"),
        };
        if committed.new_changes == 0 {
            return;
        }
        let changes = engine
            .changes_since(&doc, &before)
            .unwrap_or_else(|e| panic!("changes since: {e}"));
        core.handle_local_commit(self.now, &doc, changes, &committed.heads);
        self.drain(i);
    }

    /// Removes a message in flight, chosen by `pick`.
    fn take(&mut self, pick: u16) -> Option<Packet> {
        if self.in_flight.is_empty() {
            return None;
        }
        let at = usize::from(pick) % self.in_flight.len();
        self.in_flight.remove(at)
    }

    fn deliver(&mut self, p: Packet) {
        let n = self.n();
        let link = p.from * n + p.to;
        if !self.connected[link] || self.epoch[link] != p.epoch || self.blocked[link] {
            return;
        }
        let from = self.replicas[p.from].id.clone();
        let author = self.replicas[p.author].id.clone();
        let now = self.now;
        let r = &mut self.replicas[p.to];
        if p.channel == Channel::Gossip && !r.seen.insert(message_id(&p.bytes)) {
            return;
        }
        let Some(core) = r.core.as_mut() else { return };
        let verdict = core
            .handle_message(
                now,
                Inbound {
                    from: &from,
                    author: &author,
                    channel: p.channel,
                    bytes: &p.bytes,
                },
            )
            .unwrap_or_else(|e| panic!("n{} handling a message: {e}", p.to));
        if p.channel == Channel::Gossip && verdict == Verdict::Accept {
            for peer in self.peers(p.to) {
                if peer != p.from {
                    self.send(p.to, peer, p.author, Channel::Gossip, p.bytes.clone());
                }
            }
        }
        self.drain(p.to);
    }

    /// Takes replica `i`'s outputs into the network.
    fn drain(&mut self, i: usize) {
        let mut outputs = Vec::new();
        if let Some(core) = self.replicas[i].core.as_mut() {
            while let Some(out) = core.poll_output() {
                outputs.push(out);
            }
        }
        for out in outputs {
            match out {
                Output::Publish(bytes) => {
                    self.replicas[i].seen.insert(message_id(&bytes));
                    let bytes: Rc<[u8]> = bytes.into();
                    for peer in self.peers(i) {
                        self.send(i, peer, i, Channel::Gossip, bytes.clone());
                    }
                }
                Output::Send { to, bytes } => {
                    if let Some(peer) = self.replicas.iter().position(|r| r.id == to) {
                        self.send(i, peer, i, Channel::Direct, bytes.into());
                    }
                }
                Output::Misbehaving { peer, reason } => {
                    panic!("n{i} reported honest peer {peer} as misbehaving: {reason:?}")
                }
            }
        }
    }

    /// Queues `bytes` made by `author` from `from` to `to`.
    fn send(&mut self, from: usize, to: usize, author: usize, channel: Channel, bytes: Rc<[u8]>) {
        let link = from * self.n() + to;
        if self.connected[link] && self.in_flight.len() < MAX_IN_FLIGHT {
            self.in_flight.push_back(Packet {
                from,
                to,
                author,
                epoch: self.epoch[link],
                channel,
                bytes,
            });
        }
    }

    fn peers(&self, i: usize) -> Vec<usize> {
        let n = self.n();
        (0..n).filter(|&b| self.connected[i * n + b]).collect()
    }

    fn fire_timers(&mut self) {
        for i in 0..self.n() {
            let now = self.now;
            let r = &mut self.replicas[i];
            let Some(core) = r.core.as_mut() else {
                continue;
            };
            if core.poll_timeout() <= now {
                core.handle_timeout(now, &mut r.random)
                    .unwrap_or_else(|e| panic!("n{i} timeout: {e}"));
                self.drain(i);
            }
        }
    }

    /// Splits the replicas by the bits of `mask`; links across are cut.
    fn partition(&mut self, mask: u8) {
        let n = self.n();
        for a in 0..n {
            for b in 0..n {
                if (mask >> a & 1) != (mask >> b & 1) {
                    self.blocked[a * n + b] = true;
                    self.disconnect(a, b);
                }
            }
        }
    }

    fn connect_all(&mut self) {
        let n = self.n();
        for a in 0..n {
            for b in a + 1..n {
                let reachable = !(self.blocked[a * n + b] && self.blocked[b * n + a]);
                if reachable && !self.connected[a * n + b] {
                    self.connect(a, b);
                }
            }
        }
    }

    fn connect(&mut self, a: usize, b: usize) {
        let n = self.n();
        if self.replicas[a].core.is_none() || self.replicas[b].core.is_none() {
            return;
        }
        for link in [a * n + b, b * n + a] {
            self.connected[link] = true;
            self.epoch[link] += 1;
        }
        for (x, y) in [(a, b), (b, a)] {
            let now = self.now;
            let peer = self.replicas[y].id.clone();
            let r = &mut self.replicas[x];
            if let Some(core) = r.core.as_mut() {
                core.handle_connect(now, &peer, &mut r.random);
            }
        }
        self.drain(a);
        self.drain(b);
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        let n = self.n();
        if a == b || !self.connected[a * n + b] {
            return;
        }
        for link in [a * n + b, b * n + a] {
            self.connected[link] = false;
            self.epoch[link] += 1;
        }
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.replicas[y].id.clone();
            if let Some(core) = self.replicas[x].core.as_mut() {
                core.handle_disconnect(&peer);
            }
        }
    }

    /// Replica `i` crashes and comes back: its connections, what is in
    /// flight on them and its core's state are lost; its store stays.
    fn restart(&mut self, i: usize) {
        for peer in 0..self.n() {
            self.disconnect(i, peer);
        }
        let r = &mut self.replicas[i];
        r.core = None;
        r.incarnation = r.incarnation.wrapping_add(1);
        self.start(i);
        self.connect_all();
    }

    fn engine(&self, i: usize) -> Option<Engine> {
        self.replicas[i].core.as_ref().map(|c| c.engine().clone())
    }

    /// The document saved by Automerge, if replica `i` holds it.
    fn save(&self, i: usize, d: usize) -> Option<Vec<u8>> {
        match self.engine(i)?.read(&self.docs[d], Automerge::save) {
            Ok(bytes) => Some(bytes),
            Err(Error::NotFound(_)) => None,
            Err(e) => panic!("save: {e}"),
        }
    }

    /// Saving and loading a document gives back the same heads and JSON.
    fn save_load(&self, i: usize, doc: bool) {
        let d = usize::from(doc);
        let Some(bytes) = self.save(i, d) else { return };
        let loaded = Automerge::load(&bytes).unwrap_or_else(|e| panic!("load of a save: {e}"));
        let Some(engine) = self.engine(i) else { return };
        let heads = engine
            .heads(&self.docs[d])
            .unwrap_or_else(|e| panic!("heads: {e}"));
        assert_eq!(
            sorted(loaded.get_heads()),
            sorted(heads),
            "save/load changed the heads"
        );
        let json = engine
            .get_json(&self.docs[d])
            .unwrap_or_else(|e| panic!("json: {e}"));
        assert_eq!(
            to_json(&loaded.hydrate(None)),
            json,
            "save/load changed the document"
        );
    }

    fn heal(&mut self) {
        self.blocked.fill(false);
        self.connect_all();
    }

    /// Delivers every message in order and lets timers fire until every
    /// replica holds the same heads and the cluster is quiet.
    fn settle(&mut self) {
        let deadline = self.now + SETTLE_BOUND;
        let mut delivered = 0;
        loop {
            if self.in_flight.is_empty() && self.converged() && self.quiet() {
                return;
            }
            if let Some(p) = self.in_flight.pop_front() {
                delivered += 1;
                assert!(delivered < SETTLE_MESSAGES, "message storm after the heal");
                self.deliver(p);
                continue;
            }
            let next = self
                .replicas
                .iter()
                .filter_map(|r| r.core.as_ref().map(Replicator::poll_timeout))
                .min()
                .unwrap_or(deadline);
            assert!(
                next <= deadline,
                "replicas did not converge within {} s of the heal",
                SETTLE_BOUND.as_secs()
            );
            self.now = self.now.max(next);
            self.fire_timers();
        }
    }

    fn converged(&self) -> bool {
        self.docs.iter().all(|doc| {
            let mut views = self.replicas.iter().map(|r| match r.core.as_ref() {
                Some(core) => match core.engine().heads(doc) {
                    Ok(h) => sorted(h),
                    Err(Error::NotFound(_)) => Vec::new(),
                    Err(e) => panic!("heads: {e}"),
                },
                None => Vec::new(),
            });
            let first = views.next();
            views.all(|v| Some(v) == first)
        })
    }

    fn quiet(&self) -> bool {
        self.replicas
            .iter()
            .filter_map(|r| r.core.as_ref())
            .all(Replicator::is_idle)
    }

    /// Every replica holds the same JSON for every document.
    fn check_replicas(&self) {
        for doc in &self.docs {
            let views: Vec<Option<Value>> = (0..self.n())
                .map(|i| match self.engine(i).map(|e| e.get_json(doc)) {
                    Some(Ok(json)) => Some(json),
                    Some(Err(Error::NotFound(_))) | None => None,
                    Some(Err(e)) => panic!("json: {e}"),
                })
                .collect();
            assert!(
                views.iter().all(|v| v == &views[0]),
                "{doc}: replicas hold different JSON: {views:?}"
            );
        }
    }

    /// Merge is commutative, associative and idempotent on the documents
    /// seen along the way, and the final state contains each of them.
    fn check_merge_laws(&self) {
        for d in 0..self.docs.len() {
            let seen: Vec<Automerge> = self
                .snapshots
                .iter()
                .filter(|(doc, _)| *doc == d)
                .map(|(_, bytes)| load(bytes))
                .collect();
            let Some(final_state) = self.save(0, d).map(|b| load(&b)) else {
                continue;
            };
            for (k, a) in seen.iter().enumerate() {
                assert_same(&merged(a, a), a, "merge is not idempotent");
                assert_same(
                    &merged(&final_state, a),
                    &final_state,
                    "final state lacks a snapshot",
                );
                for b in &seen[k + 1..] {
                    assert_same(&merged(a, b), &merged(b, a), "merge is not commutative");
                    let c = &final_state;
                    assert_same(
                        &merged(&merged(a, b), c),
                        &merged(a, &merged(b, c)),
                        "merge is not associative",
                    );
                }
            }
        }
    }
}

fn load(bytes: &[u8]) -> Automerge {
    Automerge::load(bytes).unwrap_or_else(|e| panic!("load of a save: {e}"))
}

fn merged(a: &Automerge, b: &Automerge) -> Automerge {
    let mut out = a.clone();
    out.merge(&mut b.clone())
        .unwrap_or_else(|e| panic!("merge: {e}"));
    out
}

fn assert_same(x: &Automerge, y: &Automerge, what: &str) {
    assert_eq!(
        sorted(x.get_heads()),
        sorted(y.get_heads()),
        "{what} (heads)"
    );
    assert_eq!(
        to_json(&x.hydrate(None)),
        to_json(&y.hydrate(None)),
        "{what} (JSON)"
    );
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort_unstable();
    heads
}

/// Unwraps a name the harness builds from constants (always valid).
fn valid<T, E: std::fmt::Debug>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("harness name: {e:?}"))
}
