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
use super::reconcile::{self, ItemSet, Params};
use super::wire::{
    Ack, AckEntry, Announce, Bytes, Delta, Envelope, Heads, Hello, Message, Reconcile, SyncFrame,
    WireError, MAX_ACK_ENTRIES, MAX_CHANGES_PER_DELTA, MAX_FRAME_BYTES, MAX_GOSSIP_BYTES,
    MAX_SYNC_CHANGE_BYTES, PROTOCOL_VERSION,
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
    /// have caused at once (see [`held_share`](super::held_share)); beyond
    /// it, that peer's changes are refused and left to sync. Default
    /// 10,000 (a tenth of the engine's default `max_held_changes`).
    pub max_held_changes_per_peer: usize,
    /// Bytes of such changes, the same way. Default 32 MiB (an eighth of
    /// the engine's default `max_held_bytes`).
    pub max_held_bytes_per_peer: usize,
    /// Reconciliation tuning.
    pub reconcile: Params,
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
        }
    }
}

/// Documents with held changes one look of the core examines at most (see
/// [`ReplicatorConfig::held_repair_interval`]); the next look goes on from
/// where this one stopped.
pub const MAX_HELD_REPAIRS_PER_SCAN: usize = 64;

/// Entries of one acknowledgement compared with their document's heads
/// read from the engine, at most; entries that report exactly this node's
/// heads are recorded without a read and do not count.
pub const MAX_ACK_READS: usize = 64;

/// A cluster's membership list: each member node and its region (see
/// [`Replicator::set_members`]).
pub type Members = BTreeMap<NodeId, Region>;

/// What one peer is known to hold of a document (see
/// [`Replicator::holders`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The peer.
    pub peer: NodeId,
    /// Its region, if known.
    pub region: Option<Region>,
    /// The heads it last reported for the document, if any.
    pub heads: Option<Vec<ChangeHash>>,
    /// When that report arrived (the caller's `now`).
    pub reported_at: Option<Duration>,
    /// Whether that report covers the heads asked about: the peer has held
    /// them at least since `reported_at`.
    pub holds: bool,
}

/// Something the core wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Publish to every peer by gossip.
    Publish(Vec<u8>),
    /// Send to one peer.
    Send {
        /// The peer.
        to: NodeId,
        /// The encoded envelope.
        bytes: Vec<u8>,
    },
    /// A peer sent something it should not have; the networking layer may
    /// penalise or disconnect it.
    Misbehaving {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: Rejection,
    },
}

/// Why a received message was refused. The message changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// It did not decode, or broke a wire limit.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// It came from another cluster.
    #[error("message for cluster {found}, this is {expected}")]
    WrongCluster {
        /// This node's cluster.
        expected: ClusterId,
        /// The cluster in the message.
        found: ClusterId,
    },
    /// Its changes did not decode, failed their checksum, were too large, or
    /// belong to another document.
    #[error("bad change: {0}")]
    BadChange(String),
    /// Its changes break a shape limit (nesting depth, operations or
    /// objects per change, document size).
    #[error("shape limit: {0}")]
    ShapeLimit(String),
    /// A sync message beyond the bounds on the work one message may cause.
    #[error("bad sync message: {0}")]
    BadSync(String),
    /// A message type that does not belong on the channel it came on.
    #[error("{0} is not accepted on this channel")]
    WrongChannel(&'static str),
    /// A message speaking for another node than the one the transport
    /// authenticated: a `Hello` naming someone else than the connection's
    /// peer, or a delta or announcement whose origin is not its signed
    /// author.
    #[error("the message speaks for {claimed}, not for its author")]
    ForgedIdentity {
        /// The node the message claims to come from.
        claimed: NodeId,
    },
}

/// What the gossip layer should do with a received gossip message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: forward it to other peers.
    Accept,
    /// Not forwarded, sender not penalised (for example, already seen).
    Ignore,
    /// Invalid: not forwarded, sender penalised.
    Reject,
}

/// The channel a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Gossip (deltas and announcements).
    Gossip,
    /// A direct message from one peer.
    Direct,
}

/// A received message, with who it comes from as the transport
/// authenticated it. The core binds every claim a message makes about
/// identity, origin and region to [`Inbound::author`]: a message claiming
/// another node is refused as [`Rejection::ForgedIdentity`].
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// The peer the message arrived from: its sender, or for gossip the
    /// peer that relayed it (the one a refusal penalises).
    pub from: &'a NodeId,
    /// The node that made the message: for gossip, the author whose
    /// signature the gossip layer checked; for a direct message, `from`.
    pub author: &'a NodeId,
    /// The channel it arrived on.
    pub channel: Channel,
    /// The encoded envelope.
    pub bytes: &'a [u8],
}

impl<'a> Inbound<'a> {
    /// A direct message from `from` (the connection's authenticated peer).
    pub fn direct(from: &'a NodeId, bytes: &'a [u8]) -> Self {
        Inbound {
            from,
            author: from,
            channel: Channel::Direct,
            bytes,
        }
    }

    /// A gossip message signed by `author`, relayed by `from` (the same
    /// node when the author sent it itself).
    pub fn gossip(from: &'a NodeId, author: &'a NodeId, bytes: &'a [u8]) -> Self {
        Inbound {
            from,
            author,
            channel: Channel::Gossip,
            bytes,
        }
    }
}

/// Counters, for metrics and the simulator's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Changes applied from deltas.
    pub delta_changes_applied: u64,
    /// Changes applied from sync messages.
    pub sync_changes_applied: u64,
    /// Documents found to differ by reconciliation.
    pub reconcile_differences: u64,
    /// Documents not queued for sync because a queue was full.
    pub syncs_dropped: u64,
    /// Peer messages ignored because every sync session with the peer was
    /// awaiting an answer ([`ReplicatorConfig::max_sync_sessions_per_peer`]).
    pub syncs_refused: u64,
    /// Sync sessions given up after [`ReplicatorConfig::max_sync_retries`]
    /// unanswered resends, or because Automerge failed answering the peer.
    pub syncs_abandoned: u64,
    /// Syncs started to fetch what a document's held changes wait for.
    pub held_repairs: u64,
    /// Peers' changes refused because holding them would have exceeded a
    /// held-change limit (left to sync and anti-entropy).
    pub held_refused: u64,
    /// Of those, changes refused because their sender's share of held
    /// changes was spent ([`ReplicatorConfig::max_held_changes_per_peer`]).
    pub held_budget_refused: u64,
    /// Acknowledgement entries not recorded because their message had
    /// [`MAX_ACK_READS`] entries compared already.
    pub ack_entries_skipped: u64,
    /// Messages ignored because their author or relay is not on the
    /// membership list ([`Replicator::set_members`]).
    pub not_members: u64,
    /// Region claims (in a hello, delta or announcement) that differ from
    /// the membership list, which was used instead.
    pub region_claims_overridden: u64,
    /// Messages refused, by reason.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Messages handed to the network, by kind: `(messages, bytes)`. A
    /// published message counts once, however many peers receive it.
    pub sent: BTreeMap<&'static str, (u64, u64)>,
}

impl Stats {
    /// Messages of `kind` (`hello`, `delta`, `announce`, `sync`, `reconcile`,
    /// `ack`) sent.
    pub fn messages_sent(&self, kind: &str) -> u64 {
        self.sent.get(kind).map_or(0, |(messages, _)| *messages)
    }

    /// Adds `other`'s counts to these (for example, over restarts).
    pub fn add(&mut self, other: &Stats) {
        self.delta_changes_applied += other.delta_changes_applied;
        self.sync_changes_applied += other.sync_changes_applied;
        self.reconcile_differences += other.reconcile_differences;
        self.syncs_dropped += other.syncs_dropped;
        self.syncs_refused += other.syncs_refused;
        self.syncs_abandoned += other.syncs_abandoned;
        self.held_repairs += other.held_repairs;
        self.held_refused += other.held_refused;
        self.held_budget_refused += other.held_budget_refused;
        self.not_members += other.not_members;
        self.ack_entries_skipped += other.ack_entries_skipped;
        self.region_claims_overridden += other.region_claims_overridden;
        for (reason, n) in &other.rejected {
            *self.rejected.entry(reason).or_default() += n;
        }
        for (kind, (m, b)) in &other.sent {
            let e = self.sent.entry(kind).or_default();
            e.0 += m;
            e.1 += b;
        }
    }
}

/// The sizes of the core's per-peer queues (largest over all peers), for
/// metrics and the simulator's bounds check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepths {
    /// Documents waiting to start a sync with one peer. Bounded by
    /// [`ReplicatorConfig::max_queued_syncs_per_peer`].
    pub queued_syncs: usize,
    /// Sync sessions with one peer held in memory (awaiting an answer, or
    /// idle). Bounded by [`ReplicatorConfig::max_sync_sessions_per_peer`]
    /// plus the [`ReplicatorConfig::max_active_syncs_per_peer`] this node
    /// starts itself.
    pub open_syncs: usize,
    /// Acknowledgements waiting for the next flush to one peer. Bounded by
    /// [`MAX_ACK_ENTRIES`].
    pub pending_acks: usize,
    /// Outputs not yet drained by the caller.
    pub outputs: usize,
}

impl QueueDepths {
    /// The larger of each depth.
    pub fn max(self, other: QueueDepths) -> QueueDepths {
        QueueDepths {
            queued_syncs: self.queued_syncs.max(other.queued_syncs),
            open_syncs: self.open_syncs.max(other.open_syncs),
            pending_acks: self.pending_acks.max(other.pending_acks),
            outputs: self.outputs.max(other.outputs),
        }
    }
}

/// One document's sync with one peer. A session that awaits nothing stays in
/// memory (idle, trimmed to its heads) while the peer is connected: Automerge
/// answers any message from a state that has not spoken yet, so two sides
/// that forgot their sessions after every exchange would answer each other
/// forever.
struct DocSync {
    state: SyncState,
    /// When the last message was sent, while an answer is awaited.
    sent_at: Option<Duration>,
    /// The shared heads last persisted, to skip rewriting them unchanged.
    saved: Vec<ChangeHash>,
    /// Resends of the message now awaiting an answer.
    retries: u32,
}

impl DocSync {
    /// A session that starts over from `shared_heads`, as after a restart:
    /// its first message is always sent and always answered.
    fn restart(shared_heads: Vec<ChangeHash>) -> DocSync {
        let mut state = SyncState::new();
        state.shared_heads.clone_from(&shared_heads);
        DocSync {
            state,
            sent_at: None,
            saved: shared_heads,
            retries: 0,
        }
    }
}

/// What the core knows about one connected peer.
struct Peer {
    syncs: BTreeMap<DocId, DocSync>,
    queued: BTreeSet<DocId>,
    queue: VecDeque<DocId>,
    reconcile_sent_at: Option<(u64, Duration)>,
    acks: BTreeMap<DocId, Heads>,
}

/// Local commits to one document gathered by
/// [`Replicator::handle_local_commits`] into one delta.
struct Burst {
    doc: DocId,
    changes: Vec<Vec<u8>>,
    /// Total bytes of `changes`.
    bytes: usize,
    /// The heads after the last commit.
    heads: Vec<ChangeHash>,
}

/// `changes` cut, in order, into runs that fit one delta: at most
/// [`MAX_CHANGES_PER_DELTA`] changes and half of [`MAX_GOSSIP_BYTES`] of
/// change bytes each, except that a single larger change is a run of its own.
/// No changes make one empty run (a delta that only reports heads).
fn delta_parts(changes: Vec<Vec<u8>>) -> Vec<Vec<Vec<u8>>> {
    let mut parts: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    let mut bytes = 0;
    for change in changes {
        let last = parts.len() - 1;
        if !parts[last].is_empty()
            && (parts[last].len() == MAX_CHANGES_PER_DELTA
                || bytes + change.len() > MAX_GOSSIP_BYTES / 2)
        {
            parts.push(Vec::new());
            bytes = 0;
        }
        bytes += change.len();
        if let Some(part) = parts.last_mut() {
            part.push(change);
        }
    }
    parts
}

/// When a document's held changes are next repaired, and how often they
/// were.
struct HeldRepair {
    next_at: Duration,
    attempts: u32,
}

/// A delta waiting in [`Replicator::handle_messages`] for the rest of its
/// document's batch: the index of its verdict, its sender, the delta.
type BatchedDelta = (usize, NodeId, Delta);

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
    next_anti_entropy: Duration,
    next_ack_flush: Duration,
    next_held_scan: Duration,
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
    stats: Stats,
}

impl Replicator {
    /// A core over `engine`, reading every document's digest for
    /// reconciliation.
    pub fn new(engine: Engine, config: ReplicatorConfig, now: Duration) -> Result<Replicator> {
        let mut items = ItemSet::new();
        engine.for_each_digest(|id, digest| items.insert(id, &digest))?;
        let held_shares = HeldShares::new(
            config.max_held_changes_per_peer,
            config.max_held_bytes_per_peer,
        );
        Ok(Replicator {
            writer: engine.deferring(),
            engine,
            next_anti_entropy: now + config.anti_entropy_interval,
            next_ack_flush: now + config.ack_interval,
            next_held_scan: now + config.held_repair_interval,
            held_repairs: BTreeMap::new(),
            held_cursor: None,
            config,
            items,
            peers: BTreeMap::new(),
            progress: Progress::default(),
            outputs: VecDeque::new(),
            members: None,
            held_shares,
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
    pub fn set_members(&mut self, now: Duration, members: Option<Members>) {
        if let Some(list) = &members {
            let known: Vec<NodeId> = self.progress.peers().map(|(id, _)| id.clone()).collect();
            for node in known {
                match list.get(&node) {
                    Some(region) => self.progress.set_region(now, &node, region),
                    None => self.progress.clear_region(&node),
                }
            }
        }
        self.members = members;
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

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Connected peers, in id order.
    pub fn connected(&self) -> impl Iterator<Item = &NodeId> {
        self.peers.keys()
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
        let retry = self
            .peers
            .values()
            .flat_map(|p| {
                p.syncs
                    .values()
                    .filter_map(|s| s.sent_at)
                    .chain(p.reconcile_sent_at.map(|(_, at)| at))
            })
            .map(|at| at + self.config.retry_after)
            .min();
        let mut next = self.next_anti_entropy.min(self.next_held_scan);
        if self.peers.values().any(|p| !p.acks.is_empty()) {
            next = next.min(self.next_ack_flush);
        }
        if let Some(r) = retry {
            next = next.min(r);
        }
        next
    }

    /// A local write committed (durably) `changes` to `doc` at `now`,
    /// leaving `heads`. Publishes them as deltas of at most
    /// [`MAX_CHANGES_PER_DELTA`] changes and half of [`MAX_GOSSIP_BYTES`] of
    /// change bytes each, in the order given (a client may hand over more
    /// than one delta holds); each carries `heads`, which the origin holds
    /// once it committed them all. A write with a change too large to
    /// gossip on its own is announced instead, and pulled. Every known peer
    /// has the document pending until it reports these heads.
    pub fn handle_local_commit(
        &mut self,
        now: Duration,
        doc: &DocId,
        changes: Vec<Vec<u8>>,
        heads: &[ChangeHash],
    ) {
        self.items
            .insert(doc.clone(), &crate::layout::heads_digest(heads));
        self.progress
            .local_change(now, doc, heads, changes.len() as u64, &[]);
        let deltas: Vec<Vec<u8>> = delta_parts(changes)
            .into_iter()
            .map(|part| {
                self.envelope(Message::Delta(Delta {
                    origin: self.config.node.clone(),
                    region: self.config.region.clone(),
                    doc: doc.clone(),
                    changes: part.into_iter().map(Bytes).collect(),
                    heads: Heads::new(heads),
                }))
            })
            .collect();
        if deltas.iter().all(|d| d.len() <= MAX_GOSSIP_BYTES) {
            for bytes in deltas {
                self.output("delta", Output::Publish(bytes));
            }
        } else {
            // Receivers pull the whole write by sync, which sends every
            // change they lack: deltas of the other parts would repeat them.
            let announce = Message::Announce(Announce {
                origin: self.config.node.clone(),
                region: self.config.region.clone(),
                doc: doc.clone(),
                heads: Heads::new(heads),
            });
            let bytes = self.envelope(announce);
            self.output("announce", Output::Publish(bytes));
        }
    }

    /// Several local writes committed (durably) at `now`, each as
    /// `(doc, changes, heads)`, in commit order. The commits to one document
    /// are published together, as few deltas as the limits allow (at most
    /// [`MAX_CHANGES_PER_DELTA`] changes and half of [`MAX_GOSSIP_BYTES`] of
    /// change bytes each), each carrying the heads after its last commit;
    /// otherwise as [`Replicator::handle_local_commit`]. A writer faster than
    /// the network then costs one gossip message per burst, not per commit.
    pub fn handle_local_commits(
        &mut self,
        now: Duration,
        commits: impl IntoIterator<Item = (DocId, Vec<Vec<u8>>, Vec<ChangeHash>)>,
    ) {
        let mut bursts: Vec<Burst> = Vec::new();
        for (doc, changes, heads) in commits {
            let bytes: usize = changes.iter().map(Vec::len).sum();
            if let Some(i) = bursts.iter().position(|b| b.doc == doc) {
                let b = &bursts[i];
                if b.changes.len() + changes.len() > MAX_CHANGES_PER_DELTA
                    || b.bytes + bytes > MAX_GOSSIP_BYTES / 2
                {
                    let full = bursts.remove(i);
                    self.handle_local_commit(now, &full.doc, full.changes, &full.heads);
                }
            }
            match bursts.iter_mut().find(|b| b.doc == doc) {
                Some(b) => {
                    b.changes.extend(changes);
                    b.bytes += bytes;
                    b.heads = heads;
                }
                None => bursts.push(Burst {
                    doc,
                    changes,
                    bytes,
                    heads,
                }),
            }
        }
        for b in bursts {
            self.handle_local_commit(now, &b.doc, b.changes, &b.heads);
        }
    }

    /// A connection to `peer` opened: say hello and reconcile.
    pub fn handle_connect(&mut self, now: Duration, peer: &NodeId, random: &mut dyn Random) {
        self.peers.insert(
            peer.clone(),
            Peer {
                syncs: BTreeMap::new(),
                queued: BTreeSet::new(),
                queue: VecDeque::new(),
                reconcile_sent_at: None,
                acks: BTreeMap::new(),
            },
        );
        self.progress.connected(now, peer);
        let hello = Message::Hello(Hello {
            node: self.config.node.clone(),
            region: self.config.region.clone(),
            version: PROTOCOL_VERSION,
        });
        self.send(peer, hello);
        self.start_reconcile(now, peer, random);
    }

    /// The connection to `peer` closed. In-flight work with it is dropped;
    /// anti-entropy repairs whatever it would have done.
    pub fn handle_disconnect(&mut self, peer: &NodeId) {
        self.peers.remove(peer);
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
        self.engine.sync_deferred()?;
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
        self.engine.sync_deferred()?;
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
                self.claim_region(now, &h.node, &h.region);
                Ok(Verdict::Accept)
            }
            (Channel::Direct, Message::Sync(s)) => self.on_sync(now, from, s),
            (Channel::Direct, Message::Reconcile(r)) => self.on_reconcile(now, from, r),
            (Channel::Direct, Message::Ack(a)) => {
                // An acknowledgement reports what the peer holds of this
                // node's documents: entries for documents not held here
                // are ignored (looked up in memory, in the reconciliation
                // items, so that made-up ids cost no storage reads), and
                // acks cannot grow this node's state.
                //
                // An entry reporting exactly our heads (the usual answer to
                // what we sent) is recorded from the item's digest, without
                // reading the document; at most MAX_ACK_READS others per
                // message are compared with the document's heads (which may
                // load it), the rest skipped and counted, so that one ack
                // cannot make the network thread load thousands of
                // documents.
                let mut reads = 0;
                for e in a.entries {
                    let Some(digest) = self.items.get(&e.doc) else {
                        continue;
                    };
                    let theirs = e.heads.to_vec();
                    let full = crate::layout::heads_digest(&theirs);
                    if full[..digest.len()] == digest[..] {
                        let ours = theirs.clone();
                        self.record_progress(now, from, &e.doc, theirs, Some(&ours))?;
                        continue;
                    }
                    if reads == MAX_ACK_READS {
                        self.stats.ack_entries_skipped += 1;
                        continue;
                    }
                    reads += 1;
                    let ours = match self.engine.heads(&e.doc) {
                        Ok(h) => h,
                        Err(Error::NotFound(_) | Error::Quarantined { .. }) => continue,
                        Err(e) => return Err(e),
                    };
                    self.record_progress(now, from, &e.doc, theirs, Some(&ours))?;
                }
                Ok(Verdict::Accept)
            }
            (_, m) => Ok(self.reject(from, Rejection::WrongChannel(kind(&m)))),
        }
    }

    /// Time passed: start due anti-entropy rounds, resend unanswered
    /// messages, flush acknowledgements, and start queued syncs.
    pub fn handle_timeout(&mut self, now: Duration, random: &mut dyn Random) -> Result<()> {
        if now >= self.next_anti_entropy {
            let peers: Vec<NodeId> = self.peers.keys().cloned().collect();
            for peer in &peers {
                self.start_reconcile(now, peer, random);
            }
            let interval = self.config.anti_entropy_interval;
            let jitter = random.below(interval.as_millis() as u64 / 4 + 1);
            self.next_anti_entropy = now + interval + Duration::from_millis(jitter);
        }
        if now >= self.next_ack_flush {
            self.flush_acks();
            self.next_ack_flush = now + self.config.ack_interval;
        }
        if now >= self.next_held_scan {
            self.repair_held(now)?;
            self.next_held_scan = now + self.config.held_repair_interval;
        }
        let retry_after = self.config.retry_after;
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
            let stale: Vec<DocId> = self.peers[peer]
                .syncs
                .iter()
                .filter(|(_, s)| s.sent_at.is_some_and(|at| now >= at + retry_after))
                .map(|(d, _)| d.clone())
                .collect();
            let max_retries = self.config.max_sync_retries;
            for doc in stale {
                let Some(p) = self.peer_mut(peer) else {
                    continue;
                };
                let Some(s) = p.syncs.get_mut(&doc) else {
                    continue;
                };
                if s.retries >= max_retries {
                    p.syncs.remove(&doc);
                    self.stats.syncs_abandoned += 1;
                    continue;
                }
                // The answer was lost: forget what was in flight and start
                // over from the shared heads.
                let retries = s.retries + 1;
                let saved = std::mem::take(&mut s.saved);
                *s = DocSync {
                    saved,
                    retries,
                    ..DocSync::restart(s.state.shared_heads.clone())
                };
                self.pump_sync(now, peer, &doc, false)?;
            }
            self.start_queued(now, peer)?;
        }
        self.engine.sync_deferred()
    }

    fn on_delta(&mut self, now: Duration, from: &NodeId, d: Delta) -> Result<Verdict> {
        if d.origin == self.config.node {
            return Ok(Verdict::Ignore);
        }
        let changes: Vec<Vec<u8>> = d.changes.into_iter().map(|b| b.0).collect();
        let writer = self
            .writer
            .within_held_budget(self.held_shares.budget(&d.origin));
        let (outcome, new) = match writer.apply_peer_changes(&d.doc, &changes) {
            Ok(o) => o,
            Err(e) if is_bad_change(&e) => return Ok(self.reject(from, rejection(&e))),
            Err(e) => return Err(e),
        };
        self.claim_region(now, &d.origin, &d.region);
        self.stats.delta_changes_applied += outcome.applied as u64;
        self.account_held(&d.doc, &outcome, &[&d.origin]);
        self.applied(now, &d.doc, &outcome, &[from, &d.origin]);
        let ours = (!outcome.heads.is_empty()).then_some(outcome.heads.as_slice());
        self.progress
            .record(now, &d.origin, &d.doc, d.heads.to_vec(), ours);
        if !outcome.missing_deps.is_empty() || outcome.refused > 0 {
            self.enqueue_sync(from, &d.doc);
            self.start_queued(now, from)?;
        }
        if outcome.applied > 0 || outcome.duplicates > 0 {
            self.queue_ack(&d.origin, &d.doc, &outcome.heads);
            if *from != d.origin {
                // The relay holds it too and tracks whether we do.
                self.queue_ack(from, &d.doc, &outcome.heads);
            }
        }
        // Forwarded only if some change was new here (applied or held now).
        if !new.contains(&true) {
            return Ok(Verdict::Ignore);
        }
        Ok(Verdict::Accept)
    }

    /// Deltas to `doc` received in one batch, each with the index of its
    /// verdict in `verdicts` and its sender: applied in one call, then each
    /// handled as [`Replicator::on_delta`] would have. If any change is bad,
    /// nothing was applied and each delta is handled on its own, so that
    /// only the bad ones are refused.
    fn on_deltas(
        &mut self,
        now: Duration,
        doc: &DocId,
        run: Vec<BatchedDelta>,
        verdicts: &mut [Verdict],
    ) -> Result<()> {
        let mut run: Vec<BatchedDelta> = run
            .into_iter()
            .filter(|(i, _, d)| {
                let own = d.origin == self.config.node;
                if own {
                    verdicts[*i] = Verdict::Ignore;
                }
                !own
            })
            .collect();
        if run.len() <= 1 {
            if let Some((i, from, d)) = run.pop() {
                verdicts[i] = self.on_delta(now, &from, d)?;
            }
            return Ok(());
        }
        let result = {
            let changes: Vec<&[u8]> = run
                .iter()
                .flat_map(|(_, _, d)| d.changes.iter().map(|b| b.0.as_slice()))
                .collect();
            let budget = self
                .held_shares
                .least_budget(run.iter().map(|(_, _, d)| &d.origin));
            self.writer
                .within_held_budget(budget)
                .apply_peer_changes(doc, &changes)
        };
        let (outcome, new) = match result {
            Ok(o) => o,
            Err(e) if is_bad_change(&e) => {
                for (i, from, d) in run {
                    verdicts[i] = self.on_delta(now, &from, d)?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.stats.delta_changes_applied += outcome.applied as u64;
        // Each origin of the run is charged with all it held: a share runs
        // out early rather than late.
        let origins: BTreeSet<NodeId> = run.iter().map(|(_, _, d)| d.origin.clone()).collect();
        self.account_held(doc, &outcome, &origins.iter().collect::<Vec<_>>());
        // The peers that sent or relayed every delta of the run hold all of
        // its changes; a peer behind only some of them is not a source.
        let (first_from, first_origin) = (run[0].1.clone(), run[0].2.origin.clone());
        let sources: Vec<NodeId> = [first_from, first_origin]
            .into_iter()
            .filter(|p| run.iter().all(|(_, f, d)| f == p || d.origin == *p))
            .collect();
        let sources: Vec<&NodeId> = sources.iter().collect();
        self.applied(now, doc, &outcome, &sources);
        let ours = (!outcome.heads.is_empty()).then_some(outcome.heads.as_slice());
        for (_, _, d) in &run {
            self.claim_region(now, &d.origin, &d.region);
            self.progress
                .record(now, &d.origin, doc, d.heads.to_vec(), ours);
        }
        if !outcome.missing_deps.is_empty() || outcome.refused > 0 {
            let senders: BTreeSet<NodeId> = run.iter().map(|(_, f, _)| f.clone()).collect();
            for from in &senders {
                self.enqueue_sync(from, doc);
                self.start_queued(now, from)?;
            }
        }
        let mut at = 0;
        for (i, from, d) in &run {
            if outcome.applied > 0 || outcome.duplicates > 0 {
                self.queue_ack(&d.origin, doc, &outcome.heads);
                if *from != d.origin {
                    self.queue_ack(from, doc, &outcome.heads);
                }
            }
            let n = d.changes.len();
            let fresh = new.get(at..at + n).is_some_and(|m| m.contains(&true));
            verdicts[*i] = if fresh {
                Verdict::Accept
            } else {
                Verdict::Ignore
            };
            at += n;
        }
        Ok(())
    }

    fn on_announce(&mut self, now: Duration, from: &NodeId, a: Announce) -> Result<Verdict> {
        if a.origin == self.config.node {
            return Ok(Verdict::Ignore);
        }
        self.claim_region(now, &a.origin, &a.region);
        self.record_progress(now, &a.origin, &a.doc, a.heads.to_vec(), None)?;
        let missing = match self.engine.heads(&a.doc) {
            Ok(_) => !self.holds_all(&a.doc, &a.heads.to_vec())?,
            Err(Error::NotFound(_)) => true,
            Err(e) => return Err(e),
        };
        if missing {
            self.enqueue_sync(from, &a.doc);
            self.start_queued(now, from)?;
        }
        Ok(Verdict::Accept)
    }

    fn on_sync(&mut self, now: Duration, from: &NodeId, frame: SyncFrame) -> Result<Verdict> {
        if frame.msg.0.is_empty() {
            // "In sync": the answer to our last message. Nothing to send back.
            let session = self
                .peer_mut(from)
                .and_then(|p| p.syncs.get_mut(&frame.doc));
            if let Some(s) = session {
                s.sent_at = None;
                s.retries = 0;
            }
            // Sends only if our heads moved since; otherwise the session goes
            // idle and its shared heads are persisted.
            self.pump_sync(now, from, &frame.doc, false)?;
            self.start_queued(now, from)?;
            return Ok(Verdict::Accept);
        }
        let message = match crate::codec::sync_message(&frame.msg.0) {
            Ok(m) => m,
            Err(e) => {
                let reason = Rejection::Wire(WireError::Malformed(format!("sync message: {e}")));
                return Ok(self.reject(from, reason));
            }
        };
        let Some(p) = self.peers.get(from) else {
            return Ok(Verdict::Ignore);
        };
        if !p.syncs.contains_key(&frame.doc) && !self.make_room(from) {
            self.stats.syncs_refused += 1;
            return Ok(Verdict::Ignore);
        }
        let their_heads = message.heads.clone();
        let (mut state, saved) = match self.peers.get(from).and_then(|p| p.syncs.get(&frame.doc)) {
            Some(s) => (s.state.clone(), s.saved.clone()),
            None => {
                let state = self.engine.load_sync_state(from.as_str(), &frame.doc)?;
                let saved = state.shared_heads.clone();
                (state, saved)
            }
        };
        // Automerge never resends a change it recorded as sent, trusting the
        // transport to deliver it; ours may lose it. The peer's message says
        // (by its Bloom filter and needs) what it still lacks, so answer all
        // of that. Crossing messages may then carry a change twice, which
        // applying ignores.
        state.sent_hashes.clear();
        let outcome = match self
            .writer
            .within_held_budget(self.held_shares.budget(from))
            .receive_sync_message(&frame.doc, &mut state, message)
        {
            Ok(o) => o,
            Err(e) if is_bad_change(&e) => return Ok(self.reject(from, rejection(&e))),
            Err(e) => return Err(e),
        };
        tracing::debug!(
            peer = %from,
            doc = %frame.doc,
            applied = outcome.applied,
            held = outcome.held,
            missing = ?outcome.missing_deps,
            "sync message received"
        );
        self.stats.sync_changes_applied += outcome.applied as u64;
        self.account_held(&frame.doc, &outcome, &[from]);
        self.applied(now, &frame.doc, &outcome, &[from]);
        self.record_progress(now, from, &frame.doc, their_heads, Some(&outcome.heads))?;
        if outcome.applied > 0 {
            // Changes that came by sync (a repair, a join) reach other peers
            // by their own syncs, which this node does not see: tell them
            // what it holds now, so that their lag towards it clears. The
            // sending peer learns it from the sync answer.
            let others: Vec<NodeId> = self.peers.keys().filter(|p| *p != from).cloned().collect();
            for peer in others {
                self.queue_ack(&peer, &frame.doc, &outcome.heads);
            }
        }
        if let Some(p) = self.peer_mut(from) {
            let sync = DocSync {
                state,
                sent_at: None,
                saved,
                retries: 0,
            };
            p.syncs.insert(frame.doc.clone(), sync);
        }
        self.pump_sync(now, from, &frame.doc, true)?;
        self.start_queued(now, from)?;
        Ok(Verdict::Accept)
    }

    fn on_reconcile(&mut self, now: Duration, from: &NodeId, r: Reconcile) -> Result<Verdict> {
        if !self.peers.contains_key(from) {
            return Ok(Verdict::Ignore);
        }
        let processed = reconcile::process(&self.items, &r.ranges, &self.config.reconcile);
        self.stats.reconcile_differences += processed.to_sync.len() as u64;
        // Pending documents the peer turned out to hold as they are here.
        let shows_equal = !processed.equal_ranges.is_empty() || !processed.equal_docs.is_empty();
        let pending = if shows_equal {
            self.progress.pending_docs(from)
        } else {
            Vec::new()
        };
        for doc in pending {
            if processed.shows_equal(&doc) {
                let ours = match self.engine.heads(&doc) {
                    Ok(heads) => heads,
                    Err(Error::Quarantined { .. }) => continue,
                    Err(e) => return Err(e),
                };
                self.progress
                    .record(now, from, &doc, ours.clone(), Some(&ours));
            }
        }
        for doc in &processed.to_sync {
            self.enqueue_sync(from, doc);
        }
        let Some(p) = self.peer_mut(from) else {
            return Ok(Verdict::Ignore);
        };
        tracing::debug!(
            peer = %from,
            session = r.session,
            received = r.ranges.len(),
            reply = processed.reply.len(),
            differing = processed.to_sync.len(),
            ours = p.reconcile_sent_at.is_some_and(|(id, _)| id == r.session),
            "reconciliation message"
        );
        if p.reconcile_sent_at.is_some_and(|(id, _)| id == r.session) {
            // Our own session: wait for the answer to this reply, if it asks
            // for one; otherwise the session is over.
            p.reconcile_sent_at =
                reconcile::expects_answer(&processed.reply).then_some((r.session, now));
        }
        if !processed.reply.is_empty() {
            let msg = Message::Reconcile(Reconcile {
                session: r.session,
                ranges: processed.reply,
            });
            self.send(from, msg);
        }
        self.start_queued(now, from)?;
        Ok(Verdict::Accept)
    }

    fn start_reconcile(&mut self, now: Duration, peer: &NodeId, random: &mut dyn Random) {
        let session = random.next_u64();
        let Some(p) = self.peer_mut(peer) else {
            return;
        };
        if p.reconcile_sent_at.is_some() {
            return;
        }
        p.reconcile_sent_at = Some((session, now));
        let ranges = reconcile::initiate(&self.items, &self.config.reconcile);
        self.send(peer, Message::Reconcile(Reconcile { session, ranges }));
    }

    /// Looks at the next [`MAX_HELD_REPAIRS_PER_SCAN`] documents with held
    /// changes and, for each whose repair is due, queues a sync with a peer
    /// that may have what they wait for: first the peers whose latest report
    /// names heads this node lacks, then the others, a different one on each
    /// attempt. (A delta whose changes were held already queued a sync with
    /// its sender.) Documents no longer holding anything are forgotten.
    fn repair_held(&mut self, now: Duration) -> Result<()> {
        let page = self
            .engine
            .held_documents(self.held_cursor.as_ref(), MAX_HELD_REPAIRS_PER_SCAN);
        // A short page reached the end; the next look starts over.
        let upper = if page.len() < MAX_HELD_REPAIRS_PER_SCAN {
            None
        } else {
            page.last().cloned()
        };
        // Forget documents in the scanned range that hold nothing now.
        let lower = self.held_cursor.take();
        self.held_repairs.retain(|doc, _| {
            let above = lower.as_ref().is_none_or(|l| doc > l);
            let below = upper.as_ref().is_none_or(|u| doc <= u);
            !(above && below) || page.binary_search(doc).is_ok()
        });
        self.held_cursor = upper;
        for doc in page {
            if self.engine.is_quarantined(&doc) {
                continue;
            }
            let first_at = now + self.config.held_repair_after;
            let repair = self.held_repairs.entry(doc.clone()).or_insert(HeldRepair {
                next_at: first_at,
                attempts: 0,
            });
            if now < repair.next_at {
                continue;
            }
            let attempts = repair.attempts;
            repair.attempts += 1;
            let backoff = self.config.held_repair_after * 2u32.saturating_pow(attempts.min(16));
            repair.next_at = now + backoff.min(self.config.anti_entropy_interval);
            let candidates = self.repair_candidates(&doc)?;
            if candidates.is_empty() {
                continue;
            }
            let peer = candidates[attempts as usize % candidates.len()].clone();
            tracing::debug!(%doc, %peer, attempt = attempts, "asking a peer for what held changes wait for");
            self.stats.held_repairs += 1;
            self.enqueue_sync(&peer, &doc);
            self.start_queued(now, &peer)?;
        }
        Ok(())
    }

    /// Connected peers to ask for `doc`'s missing dependencies: those whose
    /// latest report has heads this node lacks first, then the rest, each
    /// group in id order.
    fn repair_candidates(&self, doc: &DocId) -> Result<Vec<NodeId>> {
        let mut ahead = Vec::new();
        let mut rest = Vec::new();
        for peer in self.peers.keys() {
            let news = match self.progress.known_heads(peer, doc) {
                Some(heads) if !heads.is_empty() => match self.engine.heads(doc) {
                    Ok(_) => !self.holds_all(doc, heads)?,
                    Err(Error::NotFound(_)) => true,
                    Err(e) => return Err(e),
                },
                _ => false,
            };
            if news {
                ahead.push(peer.clone());
            } else {
                rest.push(peer.clone());
            }
        }
        ahead.extend(rest);
        Ok(ahead)
    }

    /// Queues a per-document sync with `peer` (bounded; overflow is counted
    /// and left to anti-entropy).
    fn enqueue_sync(&mut self, peer: &NodeId, doc: &DocId) {
        let max = self.config.max_queued_syncs_per_peer;
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let awaiting = p.syncs.get(doc).is_some_and(|s| s.sent_at.is_some());
        if awaiting || p.queued.contains(doc) {
            return;
        }
        if p.queue.len() >= max {
            self.stats.syncs_dropped += 1;
            return;
        }
        p.queued.insert(doc.clone());
        p.queue.push_back(doc.clone());
    }

    /// Starts queued syncs while fewer than the limit are active.
    fn start_queued(&mut self, now: Duration, peer: &NodeId) -> Result<()> {
        let max = self.config.max_active_syncs_per_peer;
        loop {
            let Some(p) = self.peers.get_mut(peer) else {
                return Ok(());
            };
            let active = p.syncs.values().filter(|s| s.sent_at.is_some()).count();
            if active >= max {
                return Ok(());
            }
            let Some(doc) = p.queue.pop_front() else {
                return Ok(());
            };
            p.queued.remove(&doc);
            // Something says the peer's copy differs from what this session
            // last heard (reconciliation, a delta with missing dependencies,
            // an announcement): start over so a message is sure to go out.
            let sync = match p.syncs.remove(&doc) {
                Some(s) if s.sent_at.is_some() => s,
                Some(s) => DocSync {
                    saved: s.saved,
                    ..DocSync::restart(s.state.shared_heads)
                },
                None => {
                    // Our own syncs are bounded by the active limit; this
                    // only makes room among idle sessions.
                    self.make_room(peer);
                    let shared = self.engine.load_sync_state(peer.as_str(), &doc)?;
                    DocSync::restart(shared.shared_heads)
                }
            };
            if let Some(p) = self.peers.get_mut(peer) {
                p.syncs.insert(doc.clone(), sync);
            }
            self.pump_sync(now, peer, &doc, false)?;
        }
    }

    /// Sends the next sync message for `doc` to `peer`, if any is due, and
    /// then awaits its answer. When none is due and `answering` a message from
    /// the peer, sends the empty "in sync" answer instead. A session that
    /// awaits nothing is idle: its shared heads are persisted if they moved,
    /// and it stays in memory, trimmed, until the idle limit.
    fn pump_sync(
        &mut self,
        now: Duration,
        peer: &NodeId,
        doc: &DocId,
        answering: bool,
    ) -> Result<()> {
        let Some(mut sync) = self.peer_mut(peer).and_then(|p| p.syncs.remove(doc)) else {
            return Ok(());
        };
        let message =
            match self
                .engine
                .generate_sync_message(doc, &mut sync.state, MAX_SYNC_CHANGE_BYTES)
            {
                Ok(m) => m,
                Err(Error::Quarantined { .. }) => {
                    // Nothing to say about it until it is repaired.
                    return Ok(());
                }
                Err(e @ Error::InvalidSyncMessage { .. }) => {
                    // The session is given up; the next round starts afresh.
                    self.stats.syncs_abandoned += 1;
                    tracing::warn!(peer = %peer, %doc, error = %e, "sync session dropped");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
        let msg = match message {
            Some(m) => {
                tracing::debug!(
                    peer = %peer,
                    %doc,
                    heads = m.heads.len(),
                    need = m.need.len(),
                    have = m.have.len(),
                    changes = m.changes.len(),
                    "sync message"
                );
                sync.sent_at = Some(now);
                m.encode()
            }
            // Nothing due: either we still await the peer's answer, or the
            // peer's message left us in sync.
            None => Vec::new(),
        };
        if !msg.is_empty() || answering {
            let frame = Message::Sync(SyncFrame {
                doc: doc.clone(),
                msg: Bytes(msg),
            });
            self.send(peer, frame);
        }
        if sync.sent_at.is_none() {
            if sync.saved != sync.state.shared_heads {
                // Written after the changes behind these heads, so a crash
                // that loses those changes (their fsync deferred) loses this
                // record too: RocksDB recovers a prefix of the WAL.
                self.writer
                    .save_sync_states(peer.as_str(), &[(doc, &sync.state)])?;
                sync.saved.clone_from(&sync.state.shared_heads);
            }
            // Idle: keep only what decides whether to answer the next message.
            sync.state.sent_hashes.clear();
            sync.state.their_have = None;
            sync.state.their_need = None;
        }
        if let Some(p) = self.peer_mut(peer) {
            p.syncs.insert(doc.clone(), sync);
        }
        Ok(())
    }

    /// Whether `peer` has room for one more sync session, forgetting its idle
    /// sessions if it is at the limit.
    fn make_room(&mut self, peer: &NodeId) -> bool {
        let max = self.config.max_sync_sessions_per_peer;
        let Some(p) = self.peers.get_mut(peer) else {
            return false;
        };
        if p.syncs.len() >= max {
            p.syncs.retain(|_, s| s.sent_at.is_some());
        }
        p.syncs.len() < max
    }

    /// Changes from `sources` were applied to `doc` at `now` (or none, if
    /// `outcome` says so): update the document's item and the peers'
    /// pending marks.
    /// Counts what a peer's changes to `doc` held and refused, charges
    /// what they newly held to `senders`, and lifts charges the document no
    /// longer holds.
    fn account_held(&mut self, doc: &DocId, outcome: &crate::ApplyOutcome, senders: &[&NodeId]) {
        self.stats.held_refused += outcome.refused as u64;
        self.stats.held_budget_refused += outcome.over_budget as u64;
        for peer in senders {
            self.held_shares.charge(peer, doc, outcome.newly_held);
        }
        self.held_shares.settle(doc, outcome.held);
    }

    fn applied(
        &mut self,
        now: Duration,
        doc: &DocId,
        outcome: &crate::ApplyOutcome,
        sources: &[&NodeId],
    ) {
        if outcome.applied == 0 {
            return;
        }
        // Only documents the engine holds are items (not held changes).
        self.items
            .insert(doc.clone(), &crate::layout::heads_digest(&outcome.heads));
        self.progress
            .local_change(now, doc, &outcome.heads, outcome.applied as u64, sources);
    }

    /// Records a report of `peer`, comparing it with this node's heads
    /// (`ours`, or read from the engine if not given and the document is here).
    fn record_progress(
        &mut self,
        now: Duration,
        peer: &NodeId,
        doc: &DocId,
        heads: Vec<ChangeHash>,
        ours: Option<&[ChangeHash]>,
    ) -> Result<()> {
        let read;
        let ours = match ours {
            Some(o) => Some(o),
            None => {
                read = match self.engine.heads(doc) {
                    Ok(h) => Some(h),
                    Err(Error::NotFound(_) | Error::Quarantined { .. }) => None,
                    Err(e) => return Err(e),
                };
                read.as_deref()
            }
        };
        let ours = ours.filter(|o| !o.is_empty());
        if let Some(o) = ours {
            // Direct messages travel on separate streams and can overtake
            // each other, so a report can be older than the one recorded.
            // If the peer is known to hold all of our heads (stores never
            // lose changes), a report of heads that are all in our history
            // yet leave some of ours out describes its past: keep what we
            // know. Heads with a change we lack are news and are recorded.
            let known_to_hold = self
                .progress
                .known_heads(peer, doc)
                .is_some_and(|k| o.iter().all(|h| k.contains(h)));
            if known_to_hold
                && !o.iter().all(|h| heads.contains(h))
                && self.holds_all(doc, &heads)?
            {
                return Ok(());
            }
        }
        self.progress.record(now, peer, doc, heads, ours);
        Ok(())
    }

    fn queue_ack(&mut self, origin: &NodeId, doc: &DocId, heads: &[ChangeHash]) {
        if let Some(p) = self.peers.get_mut(origin) {
            if p.acks.len() < MAX_ACK_ENTRIES || p.acks.contains_key(doc) {
                p.acks.insert(doc.clone(), Heads::new(heads));
            }
        }
    }

    fn flush_acks(&mut self) {
        let pending: Vec<(NodeId, BTreeMap<DocId, Heads>)> = self
            .peers
            .iter_mut()
            .filter(|(_, p)| !p.acks.is_empty())
            .map(|(id, p)| (id.clone(), std::mem::take(&mut p.acks)))
            .collect();
        for (peer, acks) in pending {
            let entries = acks
                .into_iter()
                .map(|(doc, heads)| AckEntry { doc, heads })
                .collect();
            self.send(&peer, Message::Ack(Ack { entries }));
        }
    }

    fn holds_all(&self, doc: &DocId, heads: &[ChangeHash]) -> Result<bool> {
        self.engine
            .read(doc, |d| d.get_missing_deps(heads).is_empty())
            .or_else(|e| match e {
                Error::Deleted(_) => Ok(self.engine.heads(doc)?.iter().all(|h| heads.contains(h))),
                e => Err(e),
            })
    }

    fn peer_mut(&mut self, peer: &NodeId) -> Option<&mut Peer> {
        self.peers.get_mut(peer)
    }

    fn envelope(&self, message: Message) -> Vec<u8> {
        Envelope {
            cluster: self.config.cluster.clone(),
            message,
        }
        .encode()
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
    }

    fn send(&mut self, to: &NodeId, message: Message) {
        let name = kind(&message);
        let bytes = self.envelope(message);
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
fn is_bad_change(e: &Error) -> bool {
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
fn skip_quarantined(result: Result<Verdict>) -> Result<Verdict> {
    match result {
        Err(Error::Quarantined { doc, .. }) => {
            tracing::debug!(%doc, "ignored a message about a quarantined document");
            Ok(Verdict::Ignore)
        }
        other => other,
    }
}

/// The rejection for an engine error that [`is_bad_change`].
fn rejection(e: &Error) -> Rejection {
    match e {
        Error::ShapeLimit { .. } => Rejection::ShapeLimit(e.to_string()),
        Error::InvalidSyncMessage { .. } => Rejection::BadSync(e.to_string()),
        _ => Rejection::BadChange(e.to_string()),
    }
}

/// A stable name per rejection reason, for counters.
pub fn reason_name(r: &Rejection) -> &'static str {
    match r {
        Rejection::Wire(WireError::TooLarge { .. }) => "too_large",
        Rejection::Wire(WireError::UnsupportedVersion { .. }) => "unsupported_version",
        Rejection::Wire(WireError::InvalidDocId(_)) => "invalid_doc_id",
        Rejection::Wire(WireError::InvalidName(_)) => "invalid_name",
        Rejection::Wire(WireError::LimitExceeded { .. }) => "limit_exceeded",
        Rejection::Wire(WireError::Malformed(_)) => "malformed",
        Rejection::WrongCluster { .. } => "wrong_cluster",
        Rejection::BadChange(_) => "bad_change",
        Rejection::ShapeLimit(_) => "shape_limit",
        Rejection::BadSync(_) => "bad_sync",
        Rejection::WrongChannel(_) => "wrong_channel",
        Rejection::ForgedIdentity { .. } => "forged_identity",
    }
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Delta(_) => "delta",
        Message::Announce(_) => "announce",
        Message::Sync(_) => "sync",
        Message::Reconcile(_) => "reconcile",
        Message::Ack(_) => "ack",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_larger_than_a_delta_is_cut_into_deltas_peers_accept() {
        let small = vec![vec![1u8; 10]; 2 * MAX_CHANGES_PER_DELTA + 5];
        let parts = delta_parts(small);
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_CHANGES_PER_DELTA, MAX_CHANGES_PER_DELTA, 5]);

        let wide = vec![vec![2u8; MAX_GOSSIP_BYTES / 5]; 5];
        let parts = delta_parts(wide);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);

        let huge = vec![vec![3u8; 10], vec![4u8; MAX_GOSSIP_BYTES], vec![5u8; 10]];
        let parts = delta_parts(huge);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);

        assert_eq!(delta_parts(Vec::new()), vec![Vec::<Vec<u8>>::new()]);
    }
}
