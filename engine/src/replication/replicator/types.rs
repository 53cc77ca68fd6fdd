//! What callers of the replication core see: the messages it takes
//! ([`Inbound`], on a [`Channel`]), what it asks for ([`Output`]), its
//! verdicts and refusals ([`Verdict`], [`Rejection`]), its counters
//! ([`Stats`], [`QueueDepths`]), and the membership list it may be given
//! ([`Members`]).

use super::*;

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
    /// A hello naming protocol versions none of which this build speaks:
    /// a build too old or too new to talk to this one.
    #[error("the peer speaks protocol versions {theirs}, this node {ours}")]
    NoCommonVersion {
        /// The versions this build speaks.
        ours: VersionRange,
        /// The versions the peer's hello names.
        theirs: VersionRange,
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
    /// Changes applied from pushes.
    pub push_changes_applied: u64,
    /// Changes applied from bundles (whole documents from a peer).
    pub bundle_changes_applied: u64,
    /// Documents sent in bundles.
    pub bundled_docs_sent: u64,
    /// Documents sent in bundles and not acknowledged within
    /// `retry_after`, synced instead.
    pub bundled_docs_unanswered: u64,
    /// Pushes sent again for want of an acknowledgement (to the same
    /// peer, its stand-ins in the tree, or the next bridge).
    pub pushes_resent: u64,
    /// Pushes given up after `max_push_sends`, left to repair.
    pub pushes_abandoned: u64,
    /// Times a peer was found silent (a push to it given up): pushes went
    /// around it until it next spoke.
    pub peers_silenced: u64,
    /// Hellos from a peer announcing a different store id than before (its
    /// store was restored from a backup or started over): what it reported
    /// was forgotten and the sync states kept with it deleted.
    pub peer_stores_renewed: u64,
    /// Nodes whose progress was forgotten because a membership list no
    /// longer names them.
    pub departed_peers_forgotten: u64,
    /// Deleted documents collected (see the core's `collection` module).
    pub documents_collected: u64,
    /// Markers of collected documents dropped after the grace period.
    pub markers_forgotten: u64,
    /// Sync sessions started to learn whether a member holds a delete.
    pub collection_asks: u64,

    /// Pushes not kept for a resend because [`MAX_UNACKED_PUSHES`] or
    /// [`MAX_UNACKED_PUSH_BYTES`] were reached.
    pub pushes_untracked: u64,
    /// Documents found to differ by reconciliation.
    pub reconcile_differences: u64,
    /// Ranges of this node's reconciliation sessions whose sketch it
    /// decoded.
    pub sketches_decoded: u64,
    /// Ranges of this node's sessions whose sketch did not decode within
    /// the bounds (or not to a difference of the two sets) and were split
    /// instead.
    pub sketches_split: u64,
    /// Reconciliation sessions this node started (on connect, in
    /// anti-entropy rounds, and again after an unanswered message).
    pub reconciliations_started: u64,
    /// Anti-entropy rounds this node ran.
    pub anti_entropy_rounds: u64,
    /// Documents a peer was asked about (by a document sync) because it
    /// had not confirmed this node's writes to them for a round, or came
    /// back (connected again, or spoke after being silenced) with writes
    /// of this node unconfirmed.
    pub confirmations: u64,
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
    /// `ack`, `push`, `bundle`) sent.
    pub fn messages_sent(&self, kind: &str) -> u64 {
        self.sent.get(kind).map_or(0, |(messages, _)| *messages)
    }

    /// Adds `other`'s counts to these (for example, over restarts).
    pub fn add(&mut self, other: &Stats) {
        self.delta_changes_applied += other.delta_changes_applied;
        self.sync_changes_applied += other.sync_changes_applied;
        self.push_changes_applied += other.push_changes_applied;
        self.bundle_changes_applied += other.bundle_changes_applied;
        self.bundled_docs_sent += other.bundled_docs_sent;
        self.bundled_docs_unanswered += other.bundled_docs_unanswered;
        self.pushes_resent += other.pushes_resent;
        self.pushes_abandoned += other.pushes_abandoned;
        self.pushes_untracked += other.pushes_untracked;
        self.reconcile_differences += other.reconcile_differences;
        self.sketches_decoded += other.sketches_decoded;
        self.sketches_split += other.sketches_split;
        self.reconciliations_started += other.reconciliations_started;
        self.anti_entropy_rounds += other.anti_entropy_rounds;
        self.confirmations += other.confirmations;
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

/// A stable name per rejection reason, for counters.
pub fn reason_name(r: &Rejection) -> &'static str {
    match r {
        Rejection::Wire(WireError::TooLarge { .. }) => "too_large",
        Rejection::Wire(WireError::UnsupportedVersion { .. }) => "unsupported_version",
        Rejection::Wire(WireError::UnknownKind(_)) => "unknown_kind",
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
        Rejection::NoCommonVersion { .. } => "no_common_version",
    }
}
