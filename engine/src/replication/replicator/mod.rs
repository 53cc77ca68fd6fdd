//! The replication core: a state machine over one [`Engine`], driven by the
//! caller (the node, or the simulator) with time and randomness as inputs.
//!
//! Inputs are `handle_*` calls; outputs are drained with
//! [`Replicator::poll_output`], and [`Replicator::poll_timeout`] says when
//! [`Replicator::handle_timeout`] is next due. Every change the core emits is
//! already durable here: local changes are committed by the engine before
//! [`Replicator::handle_local_commit`] is called, and received changes are
//! durable before any `handle_*` call that applied them returns, so before
//! anything derived from them can be drained. Within one call the core
//! writes received changes without waiting for their fsync and syncs once at
//! the end, so [`Replicator::handle_messages`] applies a burst of messages
//! for the price of one WAL fsync.
//!
//! The core is one struct, [`Replicator`], whose work is split by seam:
//!
//! * `types`: what callers see: [`Inbound`], [`Output`], [`Verdict`],
//!   [`Rejection`], [`Stats`], [`Holder`], [`QueueDepths`], [`Members`].
//! * `delta`: local commits published as deltas (or announcements), and
//!   received deltas and announcements applied, batched per document.
//! * `sync`: per-document Automerge sync sessions with each peer: queues,
//!   windows, retries, and the repair of held changes.
//! * `reconciliation`: range-based set reconciliation sessions with each
//!   peer.
//! * `bundles`: the whole history of documents a peer lacks entirely, many
//!   to a message.
//! * `acks`: acknowledgements sent and received, and the progress they
//!   record.
//!
//! This module holds the struct, its configuration, message intake
//! (decoding, identity and membership checks, dispatch) and timers.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use automerge::{ChangeHash, ReadDoc};

use crate::doc_id::DocId;
use crate::doc_sync::SyncState;
use crate::engine::Engine;
use crate::error::{Error, Result};

use super::held_share::HeldShares;
use super::ids::{ClusterId, NodeId, Region};
use super::progress::{Delay, Progress};
use super::random::Random;
use super::reconcile::{self, Decoders, ItemSet, Params, Side};
use super::wire::{
    Ack, AckEntry, Announce, Bundle, BundledDoc, Bytes, Delta, Envelope, Heads, Hello, Message,
    Reconcile, SyncFrame, VersionRange, WireError, BUNDLE_VERSION, GOSSIP_FORMAT_VERSION,
    HELLO_VERSION, MAX_ACK_ENTRIES, MAX_BUNDLE_CHANGE_BYTES, MAX_BUNDLE_DOCS,
    MAX_CHANGES_PER_DELTA, MAX_FRAME_BYTES, MAX_GOSSIP_BYTES, MAX_SYNC_CHANGE_BYTES,
    MIN_PROTOCOL_VERSION, SKETCH_VERSION, SUPPORTED_VERSIONS,
};

mod acks;
mod bundles;
mod catch_up;
mod collection;
mod deadlines;
mod delta;
mod fetches;
mod push;
mod reconciliation;
mod round_trip;
mod sync;
mod types;

pub use self::acks::MAX_CONFIRMATIONS_PER_PEER;
pub use self::bundles::MAX_BUNDLES_IN_FLIGHT;
use self::catch_up::Settling;
pub use self::catch_up::{Settlement, MAX_CATCH_UP_DOCS, STALL_ROUNDS};
pub use self::collection::{Collection, CollectionPass, COLLECTION_PAGE, CONTACT_RECORD_INTERVAL};
use self::deadlines::Deadlines;
use self::delta::BatchedDelta;
use self::fetches::Fetches;
pub use self::fetches::MAX_PENDING_FETCHES;
use self::push::Unackeds;
pub use self::push::{Dissemination, MAX_UNACKED_PUSHES, MAX_UNACKED_PUSH_BYTES};
pub use self::reconciliation::{BadFanout, Fanout};
use self::round_trip::RoundTrip;
pub use self::round_trip::MIN_PUSH_RETRY;
pub use self::sync::MAX_HELD_REPAIRS_PER_SCAN;
use self::sync::{DocSync, HeldRepair};
pub use self::types::{
    reason_name, Channel, Holder, Inbound, Members, Output, QueueDepths, Rejection, Stats, Verdict,
    MAX_ACK_READS,
};

/// Configuration of a [`Replicator`]: plain data with defaults for a WAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatorConfig {
    /// This node.
    pub node: NodeId,
    /// This node's region.
    pub region: Region,
    /// The cluster; messages from other clusters are refused.
    pub cluster: ClusterId,
    /// Time between anti-entropy rounds with every connected peer (plus up to
    /// 25% random jitter). Default 30 s.
    pub anti_entropy_interval: Duration,
    /// A sync or reconciliation message unanswered this long is sent again.
    /// Default 5 s.
    pub retry_after: Duration,
    /// Document syncs running at once with one peer; more wait in a queue.
    /// Default 32.
    pub max_active_syncs_per_peer: usize,
    /// Documents waiting for a sync with one peer. When full, further
    /// documents are dropped (counted) and left to the next anti-entropy
    /// round. Default 100,000.
    pub max_queued_syncs_per_peer: usize,
    /// Sync sessions held in memory per peer. Finished (idle) sessions are
    /// kept, trimmed to their heads (a few hundred bytes), so that a message
    /// about a document in sync is not answered. At the limit, idle sessions
    /// are forgotten (one extra round trip the next time their document
    /// changes); if every session awaits an answer, a peer's message that
    /// would open one more is ignored and counted in
    /// [`Stats::syncs_refused`], and the peer retries it. Default 10,000.
    pub max_sync_sessions_per_peer: usize,
    /// Resends of an unanswered sync message before the session is given up
    /// (counted in [`Stats::syncs_abandoned`]); the next anti-entropy round
    /// finds the document again if it still differs. Default 5.
    pub max_sync_retries: u32,
    /// Acknowledgements are batched and sent this often. Default 100 ms.
    pub ack_interval: Duration,
    /// How often the core looks for documents with held changes (changes
    /// whose dependencies are missing, see [`held`](crate::held)) to ask a
    /// peer for what they wait for; at most [`MAX_HELD_REPAIRS_PER_SCAN`]
    /// documents per look. Default 1 s.
    pub held_repair_interval: Duration,
    /// A document's held changes are first repaired this long after the
    /// core first saw them (gossip usually delivers the dependencies
    /// sooner); each later attempt waits twice as long, up to the
    /// anti-entropy interval, and asks the next peer. Default 1 s.
    pub held_repair_after: Duration,
    /// Changes held for missing dependencies that one peer's messages may
    /// have caused at once (see the core's `held_share` module); beyond
    /// it, that peer's changes are refused and left to sync. Default
    /// 10,000 (a tenth of the engine's default `max_held_changes`).
    pub max_held_changes_per_peer: usize,
    /// Bytes of such changes, the same way. Default 32 MiB (an eighth of
    /// the engine's default `max_held_bytes`).
    pub max_held_bytes_per_peer: usize,
    /// Reconciliation tuning.
    pub reconcile: Params,
    /// Peers each anti-entropy round reconciles with (see [`Fanout`]).
    /// `None` (the default): every connected peer.
    pub reconcile_fanout: Option<Fanout>,
    /// How this node's own writes reach the cluster. Default
    /// [`Dissemination::Gossip`]. Pushes from peers are applied and relayed
    /// whatever this says.
    pub dissemination: Dissemination,
    /// Children of each node in a region's push tree. Default 4.
    pub tree_fanout: usize,
    /// A push not acknowledged this long is sent again (into another
    /// region, to the next bridge), before any acknowledgement from its
    /// peer was timed; after that, the peer's measured round trip plus four
    /// times its variation, at least [`Self::min_push_retry`] and at most
    /// this.
    /// Each resend waits twice as long as the one before. It should exceed
    /// the longest round trip between regions. Default 500 ms.
    pub push_retry_after: Duration,
    /// The shortest wait before a push is sent again, however quick its
    /// peer's measured round trip. Default [`MIN_PUSH_RETRY`] (10 ms), for
    /// peers whose acknowledgements come back within it; a node whose
    /// acknowledgements wait for a busy disk or core wants more (a node's
    /// `network.min_push_retry_ms`).
    pub min_push_retry: Duration,
    /// Sends of one push, the first included, before what it carries is
    /// left to repair. Default 3.
    pub max_push_sends: u32,
    /// Garbage collection of deleted documents (see the core's
    /// `collection` module). Default `None`: deleted documents are kept.
    pub collection: Option<Collection>,
}

impl ReplicatorConfig {
    /// Defaults for a node named `node` in `region` of `cluster`.
    pub fn new(node: NodeId, region: Region, cluster: ClusterId) -> Self {
        ReplicatorConfig {
            node,
            region,
            cluster,
            anti_entropy_interval: Duration::from_secs(30),
            retry_after: Duration::from_secs(5),
            max_active_syncs_per_peer: 32,
            max_queued_syncs_per_peer: 100_000,
            max_sync_sessions_per_peer: 10_000,
            max_sync_retries: 5,
            ack_interval: Duration::from_millis(100),
            held_repair_interval: Duration::from_secs(1),
            held_repair_after: Duration::from_secs(1),
            max_held_changes_per_peer: 10_000,
            max_held_bytes_per_peer: 32 << 20,
            reconcile: Params::default(),
            reconcile_fanout: None,
            dissemination: Dissemination::Gossip,
            tree_fanout: 4,
            push_retry_after: Duration::from_millis(500),
            min_push_retry: MIN_PUSH_RETRY,
            max_push_sends: 3,
            collection: None,
        }
    }
}

/// What the core knows about one connected peer.
struct Peer {
    /// Its region, once known (see [`Replicator::claim_region`]); kept here
    /// as well as in the progress table, which may forget a node.
    region: Option<Region>,
    /// How long its answers take (the acknowledgement of this node's hello,
    /// acknowledgements of pushes, steps of reconciliation sessions this
    /// node started).
    round_trip: RoundTrip,
    /// When this node's hello went out, until the peer's empty
    /// acknowledgement of it arrives.
    hello_at: Option<Duration>,
    syncs: BTreeMap<DocId, DocSync>,
    queued: BTreeSet<DocId>,
    queue: VecDeque<DocId>,
    reconcile_sent_at: Option<(u64, Duration)>,
    /// The decoders of the sketches of this node's session with it.
    decoders: Decoders,
    /// When a message of a reconciliation session with this peer (either
    /// side's) last arrived (`None`: not since it connected).
    reconciled_at: Option<Duration>,
    acks: BTreeMap<DocId, Heads>,
    /// Whole documents it lacks, queued and in flight (see `bundles`).
    bundles: bundles::Bundles,
    /// A push to it was given up unacknowledged: pushes go around it (to
    /// its children in a tree, to the next bridge of its region) until a
    /// message from it arrives. What it misses meanwhile is left to the
    /// document syncs, confirmations and reconciliation that also tell
    /// this node when it answers again.
    silent: bool,
    /// The protocol version negotiated with it: `None` until its hello
    /// arrives (messages go in [`MIN_PROTOCOL_VERSION`] until then).
    version: Option<u32>,
    /// Its hello named no version this build speaks: nothing is sent to
    /// it and what it sends is ignored (the node closes the connection).
    incompatible: bool,
}

/// The replication state machine of one node. See the [module docs](self).
pub struct Replicator {
    engine: Engine,
    /// The same engine, writing received changes and sync states without
    /// waiting for their fsync; every `handle_*` call that may write ends
    /// with [`Engine::sync_deferred`].
    writer: Engine,
    config: ReplicatorConfig,
    items: ItemSet,
    peers: BTreeMap<NodeId, Peer>,
    progress: Progress,
    outputs: VecDeque<Output>,
    /// The largest each queue has been (see
    /// [`Replicator::peak_queue_depths`]).
    peaks: QueueDepths,
    next_anti_entropy: Duration,
    next_ack_flush: Duration,
    next_held_scan: Duration,
    /// The protocol version gossip is encoded in (see
    /// [`Replicator::refresh_gossip_version`]).
    gossip_version: u32,
    /// Documents with held changes seen by the last looks, in id order;
    /// bounded by the engine's held-change limits (each has one at least).
    held_repairs: BTreeMap<DocId, HeldRepair>,
    /// Where the next look at held documents starts (exclusive).
    held_cursor: Option<DocId>,
    /// The cluster's members and their regions, if the operator lists them
    /// (see [`Replicator::set_members`]).
    members: Option<Members>,
    /// Held changes charged to the peers that sent them.
    held_shares: HeldShares,
    /// Sync messages awaiting an answer, by the time they were sent.
    deadlines: Deadlines,
    /// Documents asked of peers for this node's clients.
    fetches: Fetches,
    /// When a message of a reconciliation session with a peer of each other
    /// region last arrived (for [`Fanout`]); pruned to the regions of connected peers
    /// whenever it has more entries than there are peers.
    region_reconciled: BTreeMap<Region, Duration>,
    /// Round trips to each region's peers, pooled (for a peer with few
    /// samples of its own, see `RoundTrip::or_pooled`); one entry per
    /// region a peer was in.
    region_round_trip: BTreeMap<Region, RoundTrip>,
    /// Pushes awaiting acknowledgement.
    unacked: Unackeds,
    /// Peers whose pushes this call applied: their acknowledgements go
    /// out when it ends, not at the next flush.
    acks_now: BTreeSet<NodeId>,
    /// Peers back since the last call: connected again, or silenced and
    /// heard from (see [`Replicator::confirm_heard_again`]). Connected
    /// peers only (a disconnect removes its peer), so bounded by the peer
    /// table however often a peer reconnects.
    heard_again: BTreeSet<NodeId>,
    /// Whether this node has caught up since it started (see `catch_up`).
    catching_up: Settling,
    /// The drain, once started (see `catch_up`).
    draining: Option<Settling>,
    /// A drain's settlement started over: fresh sessions at the next
    /// timeout.
    drain_restart_due: bool,
    /// Garbage collection's cursor and counts.
    collector: collection::Collector,
    stats: Stats,
}

impl Replicator {
    /// A core over `engine`, reading every document's digest for
    /// reconciliation.
    pub fn new(engine: Engine, config: ReplicatorConfig, now: Duration) -> Result<Replicator> {
        let started = std::time::Instant::now();
        let mut items = ItemSet::new();
        engine.for_each_digest(|id, digest| items.insert(id, &digest))?;
        tracing::info!(
            documents = items.len(),
            seconds = started.elapsed().as_secs_f64(),
            "reconciliation item set loaded"
        );
        let held_shares = HeldShares::new(
            config.max_held_changes_per_peer,
            config.max_held_bytes_per_peer,
        );
        Ok(Replicator {
            writer: engine.deferring(),
            engine,
            peaks: QueueDepths::default(),
            next_anti_entropy: now + config.anti_entropy_interval,
            next_ack_flush: now + config.ack_interval,
            next_held_scan: now + config.held_repair_interval,
            gossip_version: MIN_PROTOCOL_VERSION,
            held_repairs: BTreeMap::new(),
            held_cursor: None,
            config,
            items,
            peers: BTreeMap::new(),
            progress: Progress::default(),
            outputs: VecDeque::new(),
            members: None,
            held_shares,
            deadlines: Deadlines::default(),
            fetches: Fetches::default(),
            region_reconciled: BTreeMap::new(),
            region_round_trip: BTreeMap::new(),
            unacked: Unackeds::default(),
            acks_now: BTreeSet::new(),
            heard_again: BTreeSet::new(),
            catching_up: Settling::default(),
            draining: None,
            drain_restart_due: false,
            collector: collection::Collector::default(),
            stats: Stats::default(),
        })
    }

    /// Sets the cluster's membership list: the nodes allowed to replicate
    /// and the region of each, as the operator wrote them down (`None`: no
    /// list, every node that reaches this one is a member and gives its own
    /// region).
    ///
    /// With a list, messages made or relayed by a node not on it are
    /// ignored (counted in [`Stats::not_members`]), and a node's region is
    /// only ever the list's: what a node says of its own region is not
    /// used, so `min_regions`, [`Replicator::holders`] and lag by region
    /// rest on what the operator wrote, not on what peers claim. Regions
    /// recorded before are corrected at once.
    ///
    /// Nodes not on the list are gone from the cluster: what they reported
    /// and this node's writes they had not confirmed are forgotten, and the
    /// Automerge sync states saved with them are deleted (also those of
    /// nodes this node has not heard from since it started), so departed
    /// peers leave nothing behind. Storage errors are returned (fatal).
    pub fn set_members(&mut self, now: Duration, members: Option<Members>) -> Result<()> {
        if let Some(list) = &members {
            let known: Vec<NodeId> = self.progress.peers().map(|(id, _)| id.clone()).collect();
            for node in known {
                match list.get(&node) {
                    Some(region) => self.progress.set_region(now, &node, region),
                    None => {
                        self.progress.forget(&node);
                        self.stats.departed_peers_forgotten += 1;
                    }
                }
            }
            for (id, p) in &mut self.peers {
                p.region = list.get(id).cloned();
            }
            for peer in self.engine.sync_state_peers()? {
                let member = NodeId::new(&peer).is_ok_and(|id| list.contains_key(&id));
                if !member && peer != self.config.node.as_str() {
                    self.engine.forget_sync_states(&peer)?;
                }
            }
        }
        self.members = members;
        Ok(())
    }

    /// Whether `node` may take part in replication: it is listed, or there
    /// is no membership list.
    pub fn admits(&self, node: &NodeId) -> bool {
        self.members
            .as_ref()
            .is_none_or(|members| members.contains_key(node))
    }

    /// The engine this core replicates.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// What every peer is known to hold.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// What every known peer holds of `doc`, judged against `want` (heads,
    /// usually from a session token): whether its latest report covers them
    /// (by this node's history of `doc`, see [`Engine::heads_cover`]), and
    /// since when that report is known. In node id order.
    pub fn holders(&self, doc: &DocId, want: &[ChangeHash]) -> Result<Vec<Holder>> {
        let mut out = Vec::new();
        for (peer, p) in self.progress.peers() {
            let report = p.docs.get(doc);
            let holds = match report {
                Some(r) => self.engine.heads_cover(doc, &r.heads, want)?,
                None => false,
            };
            out.push(Holder {
                peer: peer.clone(),
                region: p.region.clone(),
                heads: report.map(|r| r.heads.clone()),
                reported_at: report.map(|r| r.at),
                holds,
            });
        }
        Ok(out)
    }

    /// Propagation-delay samples since the last call (see
    /// [`Progress::take_delays`]).
    pub fn take_delays(&mut self) -> Vec<Delay> {
        self.progress.take_delays()
    }

    /// Documents whose peer reports changed since the last call (see
    /// [`Progress::take_touched`]).
    pub fn take_touched(&mut self) -> (BTreeSet<DocId>, bool) {
        self.progress.take_touched()
    }

    /// Documents in the reconciliation item set.
    pub fn item_count(&self) -> usize {
        self.items.len()
    }

    /// The configuration in force.
    pub fn config(&self) -> &ReplicatorConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Connected peers, in id order.
    pub fn connected(&self) -> impl Iterator<Item = &NodeId> {
        self.peers.keys()
    }

    /// The largest each queue has been since this core started (see
    /// [`Replicator::queue_depths`]), kept as they grow: O(1), for callers
    /// that check the bounds after every call.
    pub fn peak_queue_depths(&self) -> QueueDepths {
        self.peaks.max(QueueDepths {
            outputs: self.outputs.len(),
            ..QueueDepths::default()
        })
    }

    /// Notes the queues of `peer` for [`Replicator::peak_queue_depths`]
    /// (called where they grow).
    fn note_depths(&mut self, peer: &NodeId) {
        if let Some(p) = self.peers.get(peer) {
            self.peaks = self.peaks.max(QueueDepths {
                queued_syncs: p.queue.len(),
                open_syncs: p.syncs.len(),
                pending_acks: p.acks.len(),
                outputs: 0,
            });
        }
    }

    /// Current queue sizes (largest over all peers).
    pub fn queue_depths(&self) -> QueueDepths {
        let per_peer = self.peers.values().map(|p| QueueDepths {
            queued_syncs: p.queue.len(),
            open_syncs: p.syncs.len(),
            pending_acks: p.acks.len(),
            outputs: 0,
        });
        let init = QueueDepths {
            outputs: self.outputs.len(),
            ..QueueDepths::default()
        };
        per_peer.fold(init, QueueDepths::max)
    }

    /// Whether any sync or reconciliation is under way or waiting.
    pub fn is_idle(&self) -> bool {
        self.peers.values().all(|p| {
            p.queue.is_empty()
                && p.reconcile_sent_at.is_none()
                && p.syncs.values().all(|s| s.sent_at.is_none())
        })
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    pub fn poll_timeout(&self) -> Duration {
        if !self.heard_again.is_empty() {
            // Peers came back (see `confirm_heard_again`): due now.
            return Duration::ZERO;
        }
        // The oldest entry, even if its session went away since: that
        // costs one early wake-up, which drops it, where checking each
        // entry here would cost a look per entry on every call.
        let sync = self.deadlines.iter().next().map(|(at, _, _)| *at);
        let retry = self
            .peers
            .values()
            .filter_map(|p| p.reconcile_sent_at.map(|(_, at)| at))
            .chain(self.peers.values().filter_map(|p| p.bundles.oldest()))
            .chain(sync)
            .map(|at| at + self.config.retry_after)
            .min();
        let mut next = self.next_anti_entropy.min(self.next_held_scan);
        if self.peers.values().any(|p| !p.acks.is_empty()) {
            next = next.min(self.next_ack_flush);
        }
        if let Some(r) = retry {
            next = next.min(r);
        }
        if let Some(due) = self.unacked.next_due() {
            next = next.min(due);
        }
        if let Some(due) = self.collector.due(self.config.collection.as_ref()) {
            next = next.min(due);
        }
        next
    }

    /// The protocol version negotiated with `peer`: `None` before its
    /// hello, and when it speaks no version this build does.
    pub fn protocol_version(&self, peer: &NodeId) -> Option<u32> {
        self.peers.get(peer).and_then(|p| p.version)
    }

    /// A connection to `peer` opened: say hello and reconcile (with a
    /// [`Fanout`], only while fewer sessions than it allows per round are
    /// under way; otherwise the next round comes within `retry_after`, and
    /// the peer, never reconciled with, is early in line).
    pub fn handle_connect(&mut self, now: Duration, peer: &NodeId, random: &mut dyn Random) {
        self.peers.insert(
            peer.clone(),
            Peer {
                region: None,
                round_trip: RoundTrip::default(),
                hello_at: Some(now),
                syncs: BTreeMap::new(),
                queued: BTreeSet::new(),
                queue: VecDeque::new(),
                reconcile_sent_at: None,
                decoders: Decoders::default(),
                reconciled_at: None,
                acks: BTreeMap::new(),
                bundles: bundles::Bundles::default(),
                silent: false,
                version: None,
                incompatible: false,
            },
        );
        self.refresh_gossip_version();
        self.progress.connected(now, peer);
        // Writes of this node made while it was away are asked about at
        // the next call, not at the next round.
        self.heard_again.insert(peer.clone());
        let hello = Message::Hello(Hello {
            node: self.config.node.clone(),
            region: self.config.region.clone(),
            version: SUPPORTED_VERSIONS.max,
            min_version: Some(SUPPORTED_VERSIONS.min),
            store: Some(self.engine.store_id().to_string()),
        });
        self.send_at(peer, hello, HELLO_VERSION);
        let room = match self.config.reconcile_fanout {
            None => true,
            Some(fanout) => self.reconciling() < fanout.total(),
        };
        if room {
            self.start_reconcile(now, peer, random);
        } else {
            // Connections come in bursts (a start, a healed partition): a
            // round soon picks among them by need, not by who came first.
            self.next_anti_entropy = self.next_anti_entropy.min(now + self.config.retry_after);
        }
    }

    /// The connection to `peer` closed. In-flight work with it is dropped;
    /// anti-entropy repairs whatever it would have done.
    pub fn handle_disconnect(&mut self, peer: &NodeId) {
        self.peers.remove(peer);
        self.refresh_gossip_version();
        self.heard_again.remove(peer);
        self.deadlines.forget_peer(peer);
        self.fetches.forget_peer(peer);
        self.progress.disconnected(peer);
    }

    /// A message arrived (see [`Inbound`]). For gossip, the verdict says
    /// whether to forward it. Bad messages change nothing; the peer they
    /// came from is reported in an [`Output::Misbehaving`]. Storage errors
    /// are returned (they are fatal to the node).
    pub fn handle_message(&mut self, now: Duration, m: Inbound<'_>) -> Result<Verdict> {
        let verdict = match self.open(m) {
            Ok(message) => skip_quarantined(self.dispatch(now, m, message))?,
            Err(verdict) => verdict,
        };
        self.confirm_heard_again(now)?;
        self.engine.sync_deferred()?;
        self.flush_urgent_acks();
        self.check_settled(now);
        Ok(verdict)
    }

    /// Several messages arrived at `now`: handles each as
    /// [`Replicator::handle_message`] would and returns their verdicts in
    /// the same order. Deltas to one document are applied together, after
    /// the other messages, in one Automerge apply (whose cost grows with
    /// the document, not with the number of changes, so one apply per delta
    /// would make a receiver far slower than the writer). Everything the
    /// batch applied becomes durable with one WAL fsync before this returns.
    pub fn handle_messages<'a>(
        &mut self,
        now: Duration,
        messages: impl IntoIterator<Item = Inbound<'a>>,
    ) -> Result<Vec<Verdict>> {
        let mut verdicts = Vec::new();
        // Deltas per document, in order of first arrival; each with the
        // index of its verdict and its sender.
        let mut deltas: Vec<(DocId, Vec<BatchedDelta>)> = Vec::new();
        for m in messages {
            let i = verdicts.len();
            verdicts.push(Verdict::Ignore);
            match self.open(m) {
                Err(verdict) => verdicts[i] = verdict,
                Ok(Message::Delta(d)) if m.channel == Channel::Gossip => {
                    if let Err(verdict) = self.check_origin(m, &d.origin) {
                        verdicts[i] = verdict;
                        continue;
                    }
                    match deltas.iter_mut().find(|(doc, _)| *doc == d.doc) {
                        Some((_, run)) => run.push((i, m.from.clone(), d)),
                        None => deltas.push((d.doc.clone(), vec![(i, m.from.clone(), d)])),
                    }
                }
                Ok(message) => verdicts[i] = skip_quarantined(self.dispatch(now, m, message))?,
            }
        }
        for (doc, run) in deltas {
            skip_quarantined(
                self.on_deltas(now, &doc, run, &mut verdicts)
                    .map(|()| Verdict::Ignore),
            )?;
        }
        self.confirm_heard_again(now)?;
        self.engine.sync_deferred()?;
        self.flush_urgent_acks();
        self.check_settled(now);
        Ok(verdicts)
    }

    /// Refuses a message whose claimed origin is not its author.
    fn check_origin(
        &mut self,
        m: Inbound<'_>,
        origin: &NodeId,
    ) -> std::result::Result<(), Verdict> {
        if origin == m.author {
            return Ok(());
        }
        let reason = Rejection::ForgedIdentity {
            claimed: origin.clone(),
        };
        Err(self.reject(m.from, reason))
    }

    /// Records the region `node` claims for itself (the caller checked that
    /// the claim comes from `node`). With a membership list, the list's
    /// region is recorded instead, and a claim that differs is counted in
    /// [`Stats::region_claims_overridden`].
    fn claim_region(&mut self, now: Duration, node: &NodeId, claimed: &Region) {
        let region = match &self.members {
            None => claimed.clone(),
            Some(members) => match members.get(node) {
                Some(listed) => {
                    if listed != claimed {
                        self.stats.region_claims_overridden += 1;
                    }
                    listed.clone()
                }
                None => return,
            },
        };
        if let Some(p) = self.peers.get_mut(node) {
            p.region = Some(region.clone());
        }
        self.progress.set_region(now, node, &region);
    }

    /// Decodes an envelope and checks its cluster; a refusal is the verdict.
    fn open(&mut self, m: Inbound<'_>) -> std::result::Result<Message, Verdict> {
        let (from, bytes) = (m.from, m.bytes);
        if let Some(members) = &self.members {
            if !members.contains_key(m.author) || !members.contains_key(from) {
                // Not refused (no sanction): during a rolling change of the
                // list, an honest member may relay a newcomer this node
                // does not list yet.
                self.stats.not_members += 1;
                return Err(Verdict::Ignore);
            }
        }
        if self.peers.get(from).is_some_and(|p| p.incompatible) {
            return Err(Verdict::Ignore);
        }
        let limit = match m.channel {
            Channel::Gossip => MAX_GOSSIP_BYTES,
            Channel::Direct => MAX_FRAME_BYTES,
        };
        let envelope = match Envelope::decode(bytes, limit) {
            Ok(env) => env,
            Err(e) => return Err(self.reject(from, Rejection::Wire(e))),
        };
        if envelope.cluster != self.config.cluster {
            let reason = Rejection::WrongCluster {
                expected: self.config.cluster.clone(),
                found: envelope.cluster,
            };
            return Err(self.reject(from, reason));
        }
        if let Some(p) = self.peers.get_mut(from).filter(|p| p.silent) {
            p.silent = false;
            self.heard_again.insert(from.clone());
        }
        Ok(envelope.message)
    }

    /// Handles one opened message; what it applied may not be durable yet.
    fn dispatch(&mut self, now: Duration, m: Inbound<'_>, message: Message) -> Result<Verdict> {
        let from = m.from;
        match (m.channel, message) {
            (Channel::Gossip, Message::Delta(d)) => match self.check_origin(m, &d.origin) {
                Ok(()) => self.on_delta(now, from, d),
                Err(verdict) => Ok(verdict),
            },
            (Channel::Gossip, Message::Announce(a)) => match self.check_origin(m, &a.origin) {
                Ok(()) => self.on_announce(now, from, a),
                Err(verdict) => Ok(verdict),
            },
            (Channel::Direct, Message::Hello(h)) => {
                // A direct message comes from the connection's
                // authenticated peer: it may only introduce that peer.
                if let Err(verdict) = self.check_origin(m, &h.node) {
                    return Ok(verdict);
                }
                let Some(version) = SUPPORTED_VERSIONS.negotiate(h.versions()) else {
                    return Ok(self.refuse_incompatible(&h));
                };
                if let Some(p) = self.peers.get_mut(&h.node) {
                    p.version = Some(version);
                }
                self.refresh_gossip_version();
                self.claim_region(now, &h.node, &h.region);
                if let Some(store) = &h.store {
                    if self.progress.set_store(now, &h.node, store) {
                        self.stats.peer_stores_renewed += 1;
                        self.engine.forget_sync_states(h.node.as_str())?;
                    }
                }
                // An empty acknowledgement answers it, so that the peer
                // times its round trip to this node from the start.
                self.send(
                    &h.node,
                    Message::Ack(Ack {
                        entries: Vec::new(),
                    }),
                );
                Ok(Verdict::Accept)
            }
            (Channel::Direct, Message::Sync(s)) => self.on_sync(now, from, s),
            (Channel::Direct, Message::Reconcile(r)) => self.on_reconcile(now, from, r),
            (Channel::Direct, Message::Ack(a)) => self.on_ack(now, from, a),
            (Channel::Direct, Message::Push(p)) => self.on_push(now, from, p),
            (Channel::Direct, Message::Bundle(b)) => self.on_bundle(now, from, b),
            (_, m) => Ok(self.reject(from, Rejection::WrongChannel(kind(&m)))),
        }
    }

    /// Time passed: start due anti-entropy rounds, resend unanswered
    /// messages, flush acknowledgements, and start queued syncs.
    pub fn handle_timeout(&mut self, now: Duration, random: &mut dyn Random) -> Result<()> {
        if now >= self.next_anti_entropy {
            self.stats.anti_entropy_rounds += 1;
            let peers = self.round_peers(random);
            for peer in &peers {
                self.start_reconcile(now, peer, random);
            }
            self.confirm_writes(now)?;
            let interval = self.config.anti_entropy_interval;
            let jitter = random.below(interval.as_millis() as u64 / 4 + 1);
            self.next_anti_entropy = now + interval + Duration::from_millis(jitter);
        }
        if now >= self.next_ack_flush {
            self.flush_acks();
            self.next_ack_flush = now + self.config.ack_interval;
        }
        self.resend_pushes(now);
        self.confirm_heard_again(now)?;
        if now >= self.next_held_scan {
            self.repair_held(now)?;
            self.next_held_scan = now + self.config.held_repair_interval;
        }
        let retry_after = self.config.retry_after;
        let mut due = self.take_unanswered(now);
        let peers: Vec<NodeId> = self.peers.keys().cloned().collect();
        for peer in &peers {
            let Some(p) = self.peers.get_mut(peer) else {
                continue;
            };
            if p.reconcile_sent_at
                .is_some_and(|(_, at)| now >= at + retry_after)
            {
                p.reconcile_sent_at = None;
                self.start_reconcile(now, peer, random);
            }
            let docs = due.remove(peer).unwrap_or_default();
            self.resend_unanswered(now, peer, docs)?;
            self.resend_bundles(now, peer)?;
            self.start_queued(now, peer)?;
        }
        self.collect_garbage(now)?;
        self.check_settled(now);
        self.restart_drain_if_due(now, random);
        self.engine.sync_deferred()
    }

    fn peer_mut(&mut self, peer: &NodeId) -> Option<&mut Peer> {
        self.peers.get_mut(peer)
    }

    /// `message` in an envelope for gossip, in [`Replicator::gossip_version`].
    fn envelope(&self, message: Message) -> Vec<u8> {
        Envelope {
            cluster: self.config.cluster.clone(),
            message,
        }
        .encode_at(self.gossip_version)
    }

    /// The version gossip goes out in: one every connected peer speaks,
    /// the lowest negotiated, or [`MIN_PROTOCOL_VERSION`] while a peer's
    /// hello has not arrived (and with no peer at all); never newer than
    /// [`GOSSIP_FORMAT_VERSION`], so that older builds reached through
    /// relays read it.
    fn refresh_gossip_version(&mut self) {
        let mut versions = self.peers.values().filter(|p| !p.incompatible);
        self.gossip_version = versions
            .try_fold(SUPPORTED_VERSIONS.max, |low, p| {
                p.version.map(|v| low.min(v))
            })
            .filter(|_| !self.peers.is_empty())
            .unwrap_or(MIN_PROTOCOL_VERSION)
            .clamp(MIN_PROTOCOL_VERSION, GOSSIP_FORMAT_VERSION);
    }

    /// A peer's hello named no protocol version this build speaks: it is
    /// refused for good on this connection (an honest reason, no block).
    fn refuse_incompatible(&mut self, hello: &Hello) -> Verdict {
        if let Some(p) = self.peers.get_mut(&hello.node) {
            p.incompatible = true;
        }
        self.refresh_gossip_version();
        let reason = Rejection::NoCommonVersion {
            ours: SUPPORTED_VERSIONS,
            theirs: hello.versions(),
        };
        self.reject(&hello.node, reason)
    }

    /// Queues `bytes` (a `kind` message) for the network and counts it.
    fn output(&mut self, kind: &'static str, out: Output) {
        let len = match &out {
            Output::Publish(bytes) | Output::Send { bytes, .. } => bytes.len() as u64,
            Output::Misbehaving { .. } => 0,
        };
        let sent = self.stats.sent.entry(kind).or_default();
        sent.0 += 1;
        sent.1 += len;
        self.outputs.push_back(out);
        self.peaks.outputs = self.peaks.outputs.max(self.outputs.len());
    }

    /// Sends `message` to `to` in the version negotiated with it.
    fn send(&mut self, to: &NodeId, message: Message) {
        let version = match self.peers.get(to) {
            Some(p) if p.incompatible => return,
            Some(p) => p.version.unwrap_or(MIN_PROTOCOL_VERSION),
            None => MIN_PROTOCOL_VERSION,
        };
        self.send_at(to, message, version);
    }

    fn send_at(&mut self, to: &NodeId, message: Message, version: u32) {
        let name = kind(&message);
        let bytes = Envelope {
            cluster: self.config.cluster.clone(),
            message,
        }
        .encode_at(version);
        let to = to.clone();
        self.output(name, Output::Send { to, bytes });
    }

    fn reject(&mut self, from: &NodeId, reason: Rejection) -> Verdict {
        *self.stats.rejected.entry(reason_name(&reason)).or_default() += 1;
        // Counted here and summarised per peer by the caller: a warning per
        // message would let a hostile peer flood the log.
        tracing::debug!(peer = %from, %reason, "refused a message");
        self.outputs.push_back(Output::Misbehaving {
            peer: from.clone(),
            reason,
        });
        Verdict::Reject
    }
}

/// Engine errors that mean the sender sent bad changes (not our failure).
pub(super) fn is_bad_change(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidChange { .. }
            | Error::ChangeTooLarge { .. }
            | Error::WrongDocument { .. }
            | Error::ChangeRejected { .. }
            | Error::ShapeLimit { .. }
            | Error::InvalidSyncMessage { .. }
    )
}

/// A quarantined document's failure concerns that document only: the
/// message or batch is ignored (the engine logged the quarantine) and
/// replication goes on.
pub(super) fn skip_quarantined(result: Result<Verdict>) -> Result<Verdict> {
    match result {
        Err(Error::Quarantined { doc, .. }) => {
            tracing::debug!(%doc, "ignored a message about a quarantined document");
            Ok(Verdict::Ignore)
        }
        other => other,
    }
}

/// The rejection for an engine error that [`is_bad_change`].
pub(super) fn rejection(e: &Error) -> Rejection {
    match e {
        Error::ShapeLimit { .. } => Rejection::ShapeLimit(e.to_string()),
        Error::InvalidSyncMessage { .. } => Rejection::BadSync(e.to_string()),
        _ => Rejection::BadChange(e.to_string()),
    }
}

pub(super) fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Delta(_) => "delta",
        Message::Announce(_) => "announce",
        Message::Sync(_) => "sync",
        Message::Reconcile(_) => "reconcile",
        Message::Ack(_) => "ack",
        Message::Push(_) => "push",
        Message::Bundle(_) => "bundle",
    }
}
