//! One run: nodes (a real engine and core each), the network, the clients
//! and the fault schedule, driven by the event queue in simulated time.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use automerge::ActorId;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{Durability, EngineConfig};
use crate::doc_id::DocId;
use crate::engine::Engine;
use crate::error::Error;
use crate::events::{Origin, Subscription};
use crate::replication::ids::{ClusterId, NodeId, Region};
use crate::replication::random::{Random, SplitMix64};
use crate::replication::wire::MAX_ACK_ENTRIES;
use crate::replication::{Channel, Inbound, Output, Replicator, ReplicatorConfig, Stats, Verdict};

use super::config::SimConfig;
use super::mesh::Meshes;
use super::network::{chance, message_id, Event, Latency, Network, Packet};
use super::report::Report;
use super::spread::Spread;
use super::workload::{self, Write};
use super::SimError;

/// Gossip message ids a node remembers, as gossipsub's duplicate cache does.
const SEEN_CAPACITY: usize = 65_536;

/// Time allowed for the setup phase (text documents reaching every node).
const SETUP_BOUND: Duration = Duration::from_secs(120);

/// One node: its store, its core while it is up, and its gossip cache.
struct SimNode {
    id: NodeId,
    region: Region,
    dir: PathBuf,
    incarnation: u32,
    core: Option<Replicator>,
    random: SplitMix64,
    seen: HashSet<[u8; 16]>,
    seen_order: VecDeque<[u8; 16]>,
    timer_at: Option<Duration>,
    /// The engine's events, for the client changes it applied (at once or
    /// once released from held), which the node publishes as the node
    /// daemon does.
    events: Option<Subscription>,
    /// Counters of earlier incarnations, folded into the report.
    retired: Stats,
    /// Changes its core had applied when last looked at (see
    /// [`Cluster::converged`]).
    applied_seen: u64,
}

impl SimNode {
    /// Remembers a gossip message id; false if it was already seen.
    fn first_sight(&mut self, id: [u8; 16]) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.seen_order.push_back(id);
        if self.seen_order.len() > SEEN_CAPACITY {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// The whole simulated cluster.
pub(crate) struct Cluster {
    config: SimConfig,
    rng: SplitMix64,
    net: Network,
    meshes: Meshes,
    spread: Spread,
    nodes: Vec<SimNode>,
    /// Each node's position in `nodes`, by id.
    index: BTreeMap<NodeId, usize>,
    docs: Vec<DocId>,
    now: Duration,
    ledger: Vec<Write>,
    writes: u64,
    trace: Sha256,
    /// Bumped whenever some replica's documents may have changed: a write,
    /// a core that applied changes, a node started or crashed.
    state_epoch: u64,
    /// The last answer of [`Cluster::converged`] and the epoch it was for.
    converged_at_epoch: Option<(u64, bool)>,
    /// Documents some replica changed since [`Cluster::converged`] last
    /// looked (from the engines' events).
    dirty: BTreeSet<DocId>,
    /// Every document may have changed (a node started or crashed, or a
    /// subscription dropped events).
    dirty_all: bool,
    /// Documents whose replicas differed when last looked at.
    unconverged: BTreeSet<DocId>,
    /// Reconciliation sessions started and rounds run, over every core,
    /// when the fault phase began (the report counts from there).
    reconciliations_before: (u64, u64),
    report: Report,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Opens every node's store in a fresh temporary directory.
    pub(crate) fn new(config: &SimConfig) -> Result<Cluster, SimError> {
        if config.latency == Latency::Wan && config.regions > SimConfig::MAX_WAN_REGIONS {
            return Err(SimError::Config(format!(
                "{} regions; the WAN matrix has {}",
                config.regions,
                SimConfig::MAX_WAN_REGIONS
            )));
        }
        let dir = super::scratch_dir(config.dir.as_deref(), "causeway-sim-")?;
        let mut rng = SplitMix64::new(config.seed);
        let regions = config.regions.max(1);
        let region_of: Vec<usize> = (0..config.nodes).map(|i| i % regions).collect();
        let net = Network::new(&region_of, regions, config.latency, &mut rng);
        let meshes = Meshes::new(config.nodes, config.seed);
        let spread = Spread::new(&region_of, regions);
        let mut nodes = Vec::with_capacity(config.nodes);
        for (i, region) in region_of.iter().enumerate() {
            nodes.push(SimNode {
                id: NodeId::new(format!("n{i}"))?,
                region: Region::new(match config.latency {
                    Latency::Wan => super::wan::SITES[*region].code.to_string(),
                    Latency::Drawn => format!("r{region}"),
                })?,
                dir: dir.path().join(format!("n{i}")),
                incarnation: 0,
                core: None,
                random: SplitMix64::new(config.seed ^ (i as u64).wrapping_mul(0x9e37_79b9)),
                seen: HashSet::new(),
                seen_order: VecDeque::new(),
                timer_at: None,
                events: None,
                retired: Stats::default(),
                applied_seen: 0,
            });
        }
        let docs = (0..config.docs())
            .map(|d| {
                let kind = if d < config.text_docs { "text" } else { "keys" };
                DocId::new(format!("sim/{kind}-{d}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(crate::Error::from)?;
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.clone(), i))
            .collect();
        let mut cluster = Cluster {
            config: config.clone(),
            rng,
            net,
            meshes,
            spread,
            nodes,
            index,
            docs,
            now: Duration::ZERO,
            ledger: Vec::new(),
            writes: 0,
            trace: Sha256::new(),
            state_epoch: 0,
            converged_at_epoch: None,
            dirty: BTreeSet::new(),
            dirty_all: true,
            unconverged: BTreeSet::new(),
            reconciliations_before: (0, 0),
            report: Report::for_config(config),
            _dir: dir,
        };
        for i in 0..cluster.nodes.len() {
            cluster.start(i)?;
        }
        Ok(cluster)
    }

    /// Runs the three phases and checks the outcome.
    pub(crate) fn run(mut self) -> Result<Report, SimError> {
        self.connect_all()?;
        self.setup()?;
        if self.report.passed() {
            self.fault_phase()?;
            self.heal_and_settle()?;
            // Checked even when convergence failed, so that a failing run
            // still reports how many acknowledged writes are missing.
            self.check_replicas()?;
        }
        self.finish()
    }

    /// Creates the text documents on node 0 and lets them reach everyone.
    fn setup(&mut self) -> Result<(), SimError> {
        for d in 0..self.config.text_docs {
            let doc = self.docs[d].clone();
            let before = self.heads(0, &doc)?;
            let engine = self.engine(0)?;
            let committed = workload::create_text(&engine, &doc)?;
            let changes = engine.changes_since(&doc, &before)?;
            self.commit(0, &doc, changes, &committed.heads)?;
        }
        let deadline = self.now + SETUP_BOUND;
        if self.settle(deadline)?.is_none() {
            self.violation("setup: the text documents did not reach every node".into());
        }
        Ok(())
    }

    /// Client writes and fault actions, with message faults switched on.
    fn fault_phase(&mut self) -> Result<(), SimError> {
        self.net.loss_permille = self.config.loss_permille;
        self.net.duplicate_permille = self.config.duplicate_permille;
        self.net.delay_permille = self.config.delay_permille;
        self.spread.start();
        let stats = self.total_stats();
        self.reconciliations_before = (stats.reconciliations_started, stats.anti_entropy_rounds);
        for _ in 0..self.config.steps {
            let gap = self
                .rng
                .below(self.config.max_step_gap.as_millis() as u64 + 1);
            let until = self.now + Duration::from_millis(gap);
            self.run_until(until)?;
            if chance(&mut self.rng, self.config.fault_permille) {
                self.fault()?;
            } else {
                self.client_write()?;
            }
        }
        Ok(())
    }

    /// Ends every fault (unless the run keeps them) and runs until every
    /// replica has converged and the cluster is quiet.
    fn heal_and_settle(&mut self) -> Result<(), SimError> {
        if self.config.heal {
            self.net.loss_permille = 0;
            self.net.duplicate_permille = 0;
            self.net.delay_permille = 0;
            self.net.unblock_all();
            for i in 0..self.nodes.len() {
                if self.nodes[i].core.is_none() {
                    self.restart(i)?;
                }
            }
            self.connect_all()?;
        }
        let healed = self.now;
        let bound = self.config.convergence_bound();
        match self.settle(healed + bound)? {
            Some(converged) => {
                self.report.converged_after_heal = Some(converged - healed);
                self.report.quiet_after_heal = Some(self.now - healed);
                if self.config.heal {
                    self.check_lag_clears()?;
                }
            }
            None => self.violation(format!(
                "replicas did not converge and go quiet within {} s of the heal",
                bound.as_secs()
            )),
        }
        Ok(())
    }

    /// Once converged, every core's lag towards every other node must fall
    /// to zero within one anti-entropy round (acknowledgements and equal
    /// reconciliation ranges clear the pending marks).
    fn check_lag_clears(&mut self) -> Result<(), SimError> {
        let round = self.config.anti_entropy_interval * 5 / 4 + self.config.retry_after;
        self.run_until(self.now + round)?;
        let mut pending = 0;
        for node in &self.nodes {
            let Some(core) = &node.core else { continue };
            for other in self.nodes.iter().filter(|o| o.id != node.id) {
                let lag = core.progress().lag(&other.id);
                if lag.documents > 0 && pending == 0 {
                    self.report.violations.push(format!(
                        "{} still counts {} documents behind on {} one anti-entropy round after convergence",
                        node.id, lag.documents, other.id
                    ));
                }
                pending += lag.documents;
            }
        }
        self.report.lag_after_heal = pending;
        Ok(())
    }

    /// Runs events until every replica holds the same heads for every
    /// document, no message is in flight and every core is idle, or until
    /// `deadline`. Returns when convergence was first seen.
    fn settle(&mut self, deadline: Duration) -> Result<Option<Duration>, SimError> {
        let mut converged = None;
        loop {
            if converged.is_none() && self.converged_now()? {
                converged = Some(self.now);
            }
            if converged.is_some() && self.is_quiet() {
                return Ok(converged);
            }
            let Some((at, event)) = self.net.next_until(deadline) else {
                self.now = deadline;
                return Ok(None);
            };
            self.now = at;
            self.handle(event)?;
        }
    }

    /// Runs every event due by `until`.
    fn run_until(&mut self, until: Duration) -> Result<(), SimError> {
        while let Some((at, event)) = self.net.next_until(until) {
            self.now = at;
            self.handle(event)?;
        }
        self.now = until;
        Ok(())
    }

    fn handle(&mut self, event: Event) -> Result<(), SimError> {
        match event {
            Event::Deliver(packet) => self.deliver(packet),
            Event::Timer { node, incarnation } => {
                let n = &mut self.nodes[node];
                if n.incarnation != incarnation || n.timer_at != Some(self.now) {
                    return Ok(());
                }
                n.timer_at = None;
                if let Some(core) = n.core.as_mut() {
                    core.handle_timeout(self.now, &mut n.random)?;
                }
                self.drain(node)
            }
        }
    }

    fn deliver(&mut self, p: Packet) -> Result<(), SimError> {
        if !self.net.is_current(&p) || self.nodes[p.to].core.is_none() {
            return Ok(());
        }
        self.report.delivered.0 += 1;
        self.report.delivered.1 += p.bytes.len() as u64;
        let channel = match p.channel {
            Channel::Gossip => "gossip",
            Channel::Direct => "direct",
        };
        let by_channel = self.report.delivered_by_channel.entry(channel).or_default();
        by_channel.0 += 1;
        by_channel.1 += p.bytes.len() as u64;
        self.trace.update(self.now.as_nanos().to_be_bytes());
        self.trace
            .update([p.from as u8, p.to as u8, p.channel as u8]);
        self.trace.update(&p.bytes);
        self.spread
            .delivered(self.now, (p.from, p.to), p.channel, &p.bytes);
        let from_id = self.nodes[p.from].id.clone();
        let author_id = self.nodes[p.author].id.clone();
        let node = &mut self.nodes[p.to];
        if p.channel == Channel::Gossip && !node.first_sight(message_id(&p.bytes)) {
            return Ok(());
        }
        let Some(core) = node.core.as_mut() else {
            return Ok(());
        };
        let inbound = Inbound {
            from: &from_id,
            author: &author_id,
            channel: p.channel,
            bytes: &p.bytes,
        };
        let verdict = core.handle_message(self.now, inbound)?;
        if p.channel == Channel::Gossip && verdict == Verdict::Accept {
            let connected = self.net.peers_of(p.to);
            for peer in self.meshes.mesh_of(p.to, &connected) {
                if peer != p.from {
                    self.net.send(
                        self.now,
                        p.to,
                        peer,
                        p.author,
                        Channel::Gossip,
                        p.bytes.clone(),
                        &mut self.rng,
                        &mut self.report.faults,
                    );
                }
            }
        }
        self.drain(p.to)
    }

    /// Hands node `i`'s outputs to the network and re-arms its timer. First
    /// publishes the client changes its engine applied since the last
    /// drain, as the node daemon does.
    fn drain(&mut self, i: usize) -> Result<(), SimError> {
        let node = &mut self.nodes[i];
        let Some(core) = node.core.as_mut() else {
            return Ok(());
        };
        while let Some(event) = node.events.as_ref().and_then(Subscription::try_recv) {
            self.dirty.insert(event.doc.clone());
            if event.origin == Origin::Client {
                core.handle_local_commit(
                    self.now,
                    &event.doc,
                    event.changes.to_vec(),
                    &event.heads,
                );
            }
        }
        if node.events.as_ref().is_some_and(|e| e.dropped() > 0) {
            self.dirty_all = true;
        }
        let stats = core.stats();
        let applied = stats.delta_changes_applied
            + stats.push_changes_applied
            + stats.sync_changes_applied
            + stats.bundle_changes_applied;
        if applied != node.applied_seen {
            node.applied_seen = applied;
            self.state_epoch += 1;
        }
        // Kept by the core as its queues grow: O(1) per event.
        let depths = core.peak_queue_depths();
        self.report.max_queues = self.report.max_queues.max(depths);
        let mut outputs = Vec::new();
        while let Some(out) = core.poll_output() {
            outputs.push(out);
        }
        let due = core.poll_timeout().max(self.now + Duration::from_millis(1));
        for out in outputs {
            match out {
                Output::Publish(bytes) => {
                    self.nodes[i].first_sight(message_id(&bytes));
                    let bytes: Rc<[u8]> = bytes.into();
                    for peer in self.net.peers_of(i) {
                        self.send(i, peer, Channel::Gossip, bytes.clone());
                    }
                }
                Output::Send { to, bytes } => {
                    if let Some(&peer) = self.index.get(&to) {
                        self.send(i, peer, Channel::Direct, bytes.into());
                    }
                }
                Output::Misbehaving { peer, reason } => {
                    let at = self.now;
                    let me = self.nodes[i].id.clone();
                    self.violation(format!(
                        "{me} reported honest peer {peer} as misbehaving at {at:?}: {reason}"
                    ));
                }
            }
        }
        let node = &mut self.nodes[i];
        if node.timer_at != Some(due) {
            node.timer_at = Some(due);
            self.net.timer(due, i, node.incarnation);
        }
        Ok(())
    }

    /// Sends `bytes` made by `from` itself to `to`.
    fn send(&mut self, from: usize, to: usize, channel: Channel, bytes: Rc<[u8]>) {
        self.net.send(
            self.now,
            from,
            to,
            from,
            channel,
            bytes,
            &mut self.rng,
            &mut self.report.faults,
        );
    }

    /// One client write on a random live node.
    fn client_write(&mut self) -> Result<(), SimError> {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].core.is_some())
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let i = live[self.rng.below(live.len() as u64) as usize];
        let d = self.rng.below(self.docs.len() as u64) as usize;
        let doc = self.docs[d].clone();
        let text = d < self.config.text_docs && self.rng.below(2) == 0;
        let pick = self.rng.next_u64();
        self.writes += 1;
        let mark = format!("n{i}-{}", self.writes);
        if text && chance(&mut self.rng, self.config.client_change_permille) {
            let source = live[self.rng.below(live.len() as u64) as usize];
            return self.client_change(i, source, d, &mark, pick);
        }
        let before = self.heads(i, &doc)?;
        let engine = self.engine(i)?;
        let (write, heads) = if text {
            let token = format!("<{mark}>");
            let committed = workload::insert_text(&engine, &doc, &token, pick)?;
            if !committed.value {
                self.violation(format!("{doc} has no shared text on n{i} after setup"));
                return Ok(());
            }
            (Write::Text { doc: d, token }, committed.heads)
        } else {
            let committed = workload::write_key(&engine, &doc, &mark, self.writes)?;
            let write = Write::Key {
                doc: d,
                key: mark,
                value: self.writes,
            };
            (write, committed.heads)
        };
        // The engine returned: the write is durable and acknowledged.
        self.trace.update(format!("write {i} {write:?}").as_bytes());
        self.ledger.push(write);
        self.report.writes_acked += 1;
        let changes = engine.changes_since(&doc, &before)?;
        self.track(i, &changes);
        self.commit(i, &doc, changes, &heads)
    }

    /// A client write made on node `source`'s copy of text document `d`,
    /// handed to node `i` as one Automerge change (only the new change, not
    /// what it depends on). Acknowledged once `i` applied or held it.
    fn client_change(
        &mut self,
        i: usize,
        source: usize,
        d: usize,
        mark: &str,
        pick: u64,
    ) -> Result<(), SimError> {
        let doc = self.docs[d].clone();
        let token = format!("<{mark}>");
        let mut actor = Sha256::new();
        actor.update(self.config.seed.to_be_bytes());
        actor.update(b"client");
        actor.update(self.writes.to_be_bytes());
        let actor = ActorId::from(&actor.finalize()[..16]);
        let Some(change) = workload::fork_insert(&self.engine(source)?, &doc, &token, pick, actor)?
        else {
            self.violation(format!("{doc} has no shared text on n{source} after setup"));
            return Ok(());
        };
        let outcome = match self
            .engine(i)?
            .apply_changes(&doc, std::slice::from_ref(&change))
        {
            Ok(outcome) => outcome,
            Err(Error::HeldLimit { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        self.state_epoch += 1;
        self.trace
            .update(format!("client {i} {source} {token}").as_bytes());
        self.ledger.push(Write::Text { doc: d, token });
        self.report.writes_acked += 1;
        self.report.client_changes += 1;
        self.track(i, &[change]);
        self.report.client_changes_held +=
            u64::from(outcome.applied == 0 && outcome.duplicates == 0);
        self.drain(i)
    }

    /// Tracks how a client write's `changes`, acknowledged on node `i`,
    /// spread (see [`Spread`]).
    fn track(&mut self, i: usize, changes: &[Vec<u8>]) {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.nodes[j].core.is_some())
            .collect();
        let floor = up
            .iter()
            .filter(|&&j| j != i)
            .map(|&j| self.net.base_latency(i, j))
            .max()
            .unwrap_or_default();
        self.spread.track(i, self.now, changes, &up, floor);
    }

    /// Reports a local commit to node `i`'s core and sends what it publishes.
    fn commit(
        &mut self,
        i: usize,
        doc: &DocId,
        changes: Vec<Vec<u8>>,
        heads: &[automerge::ChangeHash],
    ) -> Result<(), SimError> {
        self.state_epoch += 1;
        self.report.committed.0 += changes.len() as u64;
        self.report.committed.1 += changes.iter().map(|c| c.len() as u64).sum::<u64>();
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.handle_local_commit(self.now, doc, changes, heads);
        }
        self.drain(i)
    }

    /// One fault action.
    fn fault(&mut self) -> Result<(), SimError> {
        let n = self.nodes.len();
        match self.rng.below(6) {
            0 | 1 => {
                // Full partition: a random split, or one region cut off.
                let side: Vec<bool> = if self.rng.below(2) == 0 {
                    random_split(&mut self.rng, n)
                } else {
                    let regions = self.config.regions.max(1);
                    let cut = self.rng.below(regions as u64) as usize;
                    (0..n).map(|i| i % regions == cut).collect()
                };
                self.report.faults.partitions += 1;
                for a in 0..n {
                    for b in 0..n {
                        if side[a] != side[b] {
                            self.net.set_blocked(a, b, true);
                            self.disconnect(a, b);
                        }
                    }
                }
            }
            2 => {
                let a = self.rng.below(n as u64) as usize;
                let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                self.report.faults.one_way_partitions += 1;
                self.net.set_blocked(a, b, true);
            }
            3 => {
                self.report.faults.heals += 1;
                self.net.unblock_all();
                self.connect_all()?;
            }
            4 => {
                let live: Vec<usize> = (0..n).filter(|&i| self.nodes[i].core.is_some()).collect();
                if live.len() > 1 {
                    let i = live[self.rng.below(live.len() as u64) as usize];
                    self.report.faults.crashes += 1;
                    self.crash(i);
                }
            }
            _ => {
                let down: Vec<usize> = (0..n).filter(|&i| self.nodes[i].core.is_none()).collect();
                if !down.is_empty() {
                    let i = down[self.rng.below(down.len() as u64) as usize];
                    self.report.faults.restarts += 1;
                    self.restart(i)?;
                    self.connect_node(i)?;
                }
            }
        }
        Ok(())
    }

    /// Opens node `i`'s store and starts a core over it.
    fn start(&mut self, i: usize) -> Result<(), SimError> {
        self.state_epoch += 1;
        self.dirty_all = true;
        let node = &mut self.nodes[i];
        node.applied_seen = 0;
        let mut actor = Sha256::new();
        actor.update(self.config.seed.to_be_bytes());
        actor.update((i as u64).to_be_bytes());
        actor.update(node.incarnation.to_be_bytes());
        let engine = Engine::open(
            &node.dir,
            EngineConfig {
                durability: Durability::Sync,
                actor: Some(ActorId::from(&actor.finalize()[..16])),
                store_id: Some(sim_store_id(self.config.seed, i)),
                footprint: crate::config::Footprint::Small,
                ..EngineConfig::default()
            },
        )?;
        let mut config =
            ReplicatorConfig::new(node.id.clone(), node.region.clone(), ClusterId::new("sim")?);
        config.anti_entropy_interval = self.config.anti_entropy_interval;
        config.retry_after = self.config.retry_after;
        config.max_active_syncs_per_peer = self.config.max_active_syncs_per_peer;
        config.max_queued_syncs_per_peer = self.config.max_queued_syncs_per_peer;
        config.reconcile_fanout = self.config.reconcile_fanout;
        config.reconcile.sketch_min_items = self.config.sketch_min_items;
        config.dissemination = self.config.dissemination;
        node.events = Some(engine.subscribe("")?);
        node.core = Some(Replicator::new(engine, config, self.now)?);
        node.timer_at = None;
        self.drain(i)
    }

    /// Node `i` crashes: its core, its unsent outputs, its gossip cache and
    /// every connection go; its store stays on disk.
    fn crash(&mut self, i: usize) {
        self.state_epoch += 1;
        self.dirty_all = true;
        for peer in 0..self.nodes.len() {
            self.disconnect(i, peer);
        }
        let node = &mut self.nodes[i];
        if let Some(core) = node.core.take() {
            node.retired.add(core.stats());
        }
        node.events = None;
        self.meshes.forget(i);
        node.seen.clear();
        node.seen_order.clear();
        node.timer_at = None;
    }

    /// Node `i` comes back with a new incarnation (and actor).
    fn restart(&mut self, i: usize) -> Result<(), SimError> {
        self.nodes[i].incarnation += 1;
        self.start(i)
    }

    fn connect_all(&mut self) -> Result<(), SimError> {
        for i in 0..self.nodes.len() {
            self.connect_node(i)?;
        }
        Ok(())
    }

    /// Opens connections from node `i` to every reachable live node.
    fn connect_node(&mut self, i: usize) -> Result<(), SimError> {
        for peer in 0..self.nodes.len() {
            let up = self.nodes[i].core.is_some() && self.nodes[peer].core.is_some();
            if peer != i && up && !self.net.is_connected(i, peer) && self.net.can_connect(i, peer) {
                self.net.set_connected(i, peer, true);
                for (a, b) in [(i, peer), (peer, i)] {
                    let b_id = self.nodes[b].id.clone();
                    let node = &mut self.nodes[a];
                    if let Some(core) = node.core.as_mut() {
                        core.handle_connect(self.now, &b_id, &mut node.random);
                    }
                }
                self.drain(i)?;
                self.drain(peer)?;
            }
        }
        Ok(())
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        if a == b || !self.net.is_connected(a, b) {
            return;
        }
        self.net.set_connected(a, b, false);
        for (x, y) in [(a, b), (b, a)] {
            let y_id = self.nodes[y].id.clone();
            if let Some(core) = self.nodes[x].core.as_mut() {
                core.handle_disconnect(&y_id);
            }
        }
    }

    /// [`Cluster::converged`], asked of the engines only when some replica
    /// may have changed since the last answer (most events are
    /// acknowledgements and reconciliation messages that change nothing).
    fn converged_now(&mut self) -> Result<bool, SimError> {
        if let Some((epoch, answer)) = self.converged_at_epoch {
            if epoch == self.state_epoch {
                return Ok(answer);
            }
        }
        let answer = self.converged()?;
        self.converged_at_epoch = Some((self.state_epoch, answer));
        Ok(answer)
    }

    /// Whether every live replica holds the same heads for every document.
    /// Only the documents changed since the last look are read again; a
    /// "yes" is confirmed by reading every document, so a change the events
    /// missed cannot make it wrong.
    fn converged(&mut self) -> Result<bool, SimError> {
        let docs: Vec<DocId> = if std::mem::take(&mut self.dirty_all) {
            self.dirty.clear();
            self.docs.clone()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        for doc in docs {
            if !self.docs.contains(&doc) {
                continue;
            }
            if self.doc_converged(&doc)? {
                self.unconverged.remove(&doc);
            } else {
                self.unconverged.insert(doc);
            }
        }
        if !self.unconverged.is_empty() {
            return Ok(false);
        }
        for doc in &self.docs {
            if !self.doc_converged(doc)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether every live replica holds the same heads of `doc`.
    fn doc_converged(&self, doc: &DocId) -> Result<bool, SimError> {
        let mut first: Option<Option<Vec<automerge::ChangeHash>>> = None;
        for node in &self.nodes {
            let Some(core) = &node.core else {
                continue;
            };
            let heads = match core.engine().heads(doc) {
                Ok(h) => Some(h),
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            match &first {
                None => first = Some(heads),
                Some(f) if *f != heads => return Ok(false),
                Some(_) => {}
            }
        }
        Ok(true)
    }

    fn is_quiet(&self) -> bool {
        self.net.in_flight() == 0
            && self
                .nodes
                .iter()
                .filter_map(|n| n.core.as_ref())
                .all(Replicator::is_idle)
    }

    /// The final checks: identical JSON everywhere, every acknowledged write
    /// present everywhere, queues within their bounds.
    fn check_replicas(&mut self) -> Result<(), SimError> {
        // Every live node's JSON of every document (`None`: absent).
        let mut views: Vec<(&NodeId, Vec<Option<Value>>)> = Vec::new();
        let mut problems = Vec::new();
        for node in &self.nodes {
            let Some(core) = &node.core else {
                problems.push(format!("{} is down at the end", node.id));
                continue;
            };
            let mut docs = Vec::new();
            for doc in &self.docs {
                docs.push(match core.engine().get_json(doc) {
                    Ok(json) => Some(json),
                    Err(Error::NotFound(_)) => None,
                    Err(e) => return Err(e.into()),
                });
            }
            views.push((&node.id, docs));
        }
        for (d, doc) in self.docs.iter().enumerate() {
            if views.iter().any(|(_, v)| v[d] != views[0].1[d]) {
                problems.push(format!("{doc}: replicas hold different JSON"));
            }
        }
        let mut lost = 0;
        for write in &self.ledger {
            let missing: Vec<&str> = views
                .iter()
                .filter(|(_, v)| !write.is_in(v[write.doc()].as_ref()))
                .map(|(id, _)| id.as_str())
                .collect();
            if !missing.is_empty() {
                lost += 1;
                if lost <= 5 {
                    problems.push(format!(
                        "acknowledged {write:?} missing on nodes {missing:?}"
                    ));
                }
            }
        }
        self.report.writes_lost = lost;
        for node in &self.nodes {
            let Some(core) = &node.core else { continue };
            let held = core.engine().stats().held_changes;
            if held > 0 {
                problems.push(format!("{} still holds {held} changes at the end", node.id));
            }
        }
        let q = self.report.max_queues;
        if q.queued_syncs > self.config.max_queued_syncs_per_peer {
            problems.push(format!("a sync queue reached {}", q.queued_syncs));
        }
        if q.pending_acks > MAX_ACK_ENTRIES {
            problems.push(format!("an ack batch reached {}", q.pending_acks));
        }
        self.report.violations.extend(problems);
        Ok(())
    }

    /// Every core's counters, retired incarnations included.
    fn total_stats(&self) -> Stats {
        let mut total = Stats::default();
        for node in &self.nodes {
            total.add(&node.retired);
            if let Some(core) = &node.core {
                total.add(core.stats());
            }
        }
        total
    }

    fn finish(mut self) -> Result<Report, SimError> {
        self.report.simulated = self.now;
        let total = self.total_stats();
        let (sessions, rounds) = self.reconciliations_before;
        self.report.reconciliations = (
            total.reconciliations_started.saturating_sub(sessions),
            total.anti_entropy_rounds.saturating_sub(rounds),
        );
        self.report.sent = total.sent;
        self.report.changes_applied = (
            total.delta_changes_applied + total.push_changes_applied,
            total.sync_changes_applied + total.bundle_changes_applied,
        );
        self.report.sketches = (total.sketches_decoded, total.sketches_split);
        self.report.syncs_dropped = total.syncs_dropped;
        self.report.syncs_abandoned = total.syncs_abandoned;
        self.report.trace = hex(&self.trace.finalize());
        self.report.spread = self.spread.to_json();
        Ok(self.report)
    }

    fn violation(&mut self, what: String) {
        self.report.violations.push(what);
    }

    fn engine(&self, i: usize) -> Result<Engine, SimError> {
        match &self.nodes[i].core {
            Some(core) => Ok(core.engine().clone()),
            None => Err(SimError::NodeDown(i)),
        }
    }

    fn heads(&self, i: usize, doc: &DocId) -> Result<Vec<automerge::ChangeHash>, SimError> {
        match self.engine(i)?.heads(doc) {
            Ok(h) => Ok(h),
            Err(Error::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The store id of node `i` in a run with `seed`: fixed, so that hellos
/// (which carry it) are the same bytes in every run of the seed.
fn sim_store_id(seed: u64, i: usize) -> String {
    let mut h = Sha256::new();
    h.update(b"store");
    h.update(seed.to_be_bytes());
    h.update((i as u64).to_be_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&h.finalize()[..16]);
    crate::layout::store_id_from(bytes)
}

/// A random split of `n` nodes into two non-empty sides.
fn random_split(rng: &mut SplitMix64, n: usize) -> Vec<bool> {
    if n < 64 {
        let mask = 1 + rng.below((1u64 << n) - 2);
        return (0..n).map(|i| mask >> i & 1 == 1).collect();
    }
    loop {
        let side: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
        if side.contains(&true) && side.contains(&false) {
            return side;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
