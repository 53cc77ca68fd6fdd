//! The node's own Prometheus metrics, registered beside libp2p's in one
//! registry that `/metrics` encodes.
//!
//! The replication core keeps plain counters ([`Stats`]); the networking
//! task copies their growth into these every second, so a scrape sees
//! figures at most a second old.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use causeway_engine::replication::ids::Region;
use causeway_engine::replication::{QueueDepths, Stats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::{PeerLag, RegionStatus};

/// A label with one value.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The message kind or reason.
    pub kind: String,
}

/// A per-peer label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The peer id.
    pub peer: String,
    /// The peer's region ("unknown" before its hello).
    pub region: String,
}

/// Metrics of one node.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    messages_sent: Family<KindLabel, Counter>,
    bytes_sent: Family<KindLabel, Counter>,
    rejected: Family<KindLabel, Counter>,
    changes_applied: Family<KindLabel, Counter>,
    syncs_dropped: Counter,
    syncs_abandoned: Counter,
    held_repairs: Counter,
    held_refused: Counter,
    held_budget_refused: Counter,
    not_members: Counter,
    region_claims_overridden: Counter,
    reconcile_differences: Counter,
    sketches: Family<KindLabel, Counter>,
    pushes: Family<KindLabel, Counter>,
    bundled_documents: Family<KindLabel, Counter>,
    confirmations: Counter,
    reconciliations: Counter,
    silenced: Counter,
    stores_renewed: Counter,
    documents_collected: Counter,
    markers_forgotten: Counter,
    /// Members on the membership list (0 without one).
    pub members: Gauge,
    /// Changes of the membership file that could not be used (the node
    /// kept its list).
    pub membership_reload_failures: Counter,
    /// Messages over a peer's rate, by channel (gossip: dropped unforwarded;
    /// direct: read later).
    pub rate_limited: Family<KindLabel, Counter>,
    /// automerge-repo ephemeral messages between nodes, by what happened:
    /// `published`, `received` (relayed to this node's clients), `refused`
    /// (malformed or from a non-member), `unsent` (gossip had no peer).
    pub ephemeral: Family<KindLabel, Counter>,
    /// Free bytes on the store's file system (for unprivileged users).
    pub disk_free_bytes: Gauge,
    /// Bytes of the store's files.
    pub store_bytes: Gauge,
    /// 1 while writes are refused for low disk space.
    pub low_disk: Gauge,
    /// Changes held for missing dependencies, in all documents.
    pub held_changes: Gauge,
    /// Bytes of those changes.
    pub held_bytes: Gauge,
    /// Changes refused since start for breaking a shape limit (the
    /// engine's count, clients' and peers' changes alike).
    pub shape_refused: Gauge,
    /// Automerge panics caught since start (each became an error).
    pub automerge_panics: Gauge,
    /// Documents quarantined for corrupt stored data.
    pub quarantined_documents: Gauge,
    /// Gossip publications that reached no peer (left to anti-entropy).
    pub publish_failures: Counter,
    /// Direct messages that failed (timeout, connection lost, dial failure).
    pub send_failures: Counter,
    /// Direct messages dropped unsent from a full per-peer queue, or queued
    /// when their peer disconnected (left to the core's retries).
    pub direct_dropped: Counter,
    /// Batches of received messages applied (one WAL fsync each at most).
    pub received_batches: Counter,
    /// Received messages applied in those batches.
    pub received_batched: Counter,
    /// Direct messages waiting for a free slot in a peer's window (longest
    /// queue over peers).
    pub direct_queued: Gauge,
    /// Local commits the networking task missed because its event queue was
    /// full (left to anti-entropy).
    pub local_events_dropped: Gauge,
    /// Peers replication runs with.
    pub peers_replicating: Gauge,
    /// Peers blocked now (by an operator or for misbehaving).
    pub peers_blocked: Gauge,
    /// Peers blocked for misbehaving since start.
    pub peers_sanctioned: Counter,
    /// Disconnected peers forgotten to make room in the peer table.
    pub peers_forgotten: Counter,
    /// The per-peer lag labels set by the last [`NodeMetrics::observe_lag`]
    /// (a label not set again is removed: departed peers leave no series).
    peer_labels: std::collections::HashSet<PeerLabel>,
    /// Queue depths of the replication core (largest over peers).
    queue_depth: Family<KindLabel, Gauge>,
    documents_behind: Family<PeerLabel, Gauge>,
    changes_behind: Family<PeerLabel, Gauge>,
    lag_seconds: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    region_documents_behind: Family<RegionLabel, Gauge>,
    region_changes_behind: Family<RegionLabel, Gauge>,
    region_lag_seconds: Family<RegionLabel, Gauge<f64, AtomicU64>>,
    propagation_delay: Family<RegionLabel, Histogram, fn() -> Histogram>,
    last: Stats,
}

/// A per-region label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabel {
    /// The region ("unknown" for peers not yet heard from).
    pub region: String,
}

/// Buckets of the propagation-delay histogram: 1 ms to about 65 s.
fn delay_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl NodeMetrics {
    /// Registers the metrics in `registry` under the `causeway` prefix.
    pub fn register(registry: &mut Registry) -> NodeMetrics {
        let m = NodeMetrics {
            messages_sent: Family::default(),
            bytes_sent: Family::default(),
            rejected: Family::default(),
            changes_applied: Family::default(),
            syncs_dropped: Counter::default(),
            syncs_abandoned: Counter::default(),
            held_repairs: Counter::default(),
            held_refused: Counter::default(),
            held_budget_refused: Counter::default(),
            not_members: Counter::default(),
            region_claims_overridden: Counter::default(),
            members: Gauge::default(),
            membership_reload_failures: Counter::default(),
            rate_limited: Family::default(),
            ephemeral: Family::default(),
            reconcile_differences: Counter::default(),
            sketches: Family::default(),
            pushes: Family::default(),
            bundled_documents: Family::default(),
            confirmations: Counter::default(),
            reconciliations: Counter::default(),
            silenced: Counter::default(),
            stores_renewed: Counter::default(),
            documents_collected: Counter::default(),
            markers_forgotten: Counter::default(),
            disk_free_bytes: Gauge::default(),
            store_bytes: Gauge::default(),
            low_disk: Gauge::default(),
            held_changes: Gauge::default(),
            held_bytes: Gauge::default(),
            shape_refused: Gauge::default(),
            automerge_panics: Gauge::default(),
            quarantined_documents: Gauge::default(),
            publish_failures: Counter::default(),
            send_failures: Counter::default(),
            direct_dropped: Counter::default(),
            received_batches: Counter::default(),
            received_batched: Counter::default(),
            direct_queued: Gauge::default(),
            local_events_dropped: Gauge::default(),
            peers_replicating: Gauge::default(),
            peers_blocked: Gauge::default(),
            peers_sanctioned: Counter::default(),
            peers_forgotten: Counter::default(),
            peer_labels: Default::default(),
            queue_depth: Family::default(),
            documents_behind: Family::default(),
            changes_behind: Family::default(),
            lag_seconds: Family::default(),
            region_documents_behind: Family::default(),
            region_changes_behind: Family::default(),
            region_lag_seconds: Family::default(),
            propagation_delay: Family::new_with_constructor(delay_histogram),
            last: Stats::default(),
        };
        let r = registry.sub_registry_with_prefix("causeway");
        m.register_counters(r);
        m.register_gauges(r);
        m
    }

    fn register_counters(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "messages_sent",
            "Replication messages handed to the network, by kind",
            m.messages_sent.clone(),
        );
        r.register(
            "bytes_sent",
            "Bytes of replication messages handed to the network, by kind",
            m.bytes_sent.clone(),
        );
        r.register(
            "messages_rejected",
            "Received messages refused, by reason",
            m.rejected.clone(),
        );
        r.register(
            "changes_applied",
            "Changes applied from peers, by path (delta, sync, push or bundle)",
            m.changes_applied.clone(),
        );
        r.register(
            "syncs_dropped",
            "Document syncs not queued because a queue was full",
            m.syncs_dropped.clone(),
        );
        r.register(
            "syncs_abandoned",
            "Document syncs given up after unanswered resends",
            m.syncs_abandoned.clone(),
        );
        r.register(
            "held_repairs",
            "Syncs started to fetch what held changes wait for",
            m.held_repairs.clone(),
        );
        r.register(
            "held_refused_peer_changes",
            "Peers' changes refused at a held-change limit (left to anti-entropy)",
            m.held_refused.clone(),
        );
        r.register(
            "held_budget_refused_peer_changes",
            "Peers' changes refused because their sender's held-change budget was spent",
            m.held_budget_refused.clone(),
        );
        r.register(
            "messages_from_non_members",
            "Messages ignored because their author or relay is not on the membership list",
            m.not_members.clone(),
        );
        r.register(
            "region_claims_overridden",
            "Region claims that differ from the membership list (the list's region is used)",
            m.region_claims_overridden.clone(),
        );
        r.register(
            "membership_reload_failures",
            "Changes of the membership file that could not be used (the node kept its list)",
            m.membership_reload_failures.clone(),
        );
        r.register(
            "messages_rate_limited",
            "Messages over their peer's rate, by channel (gossip dropped, direct read later)",
            m.rate_limited.clone(),
        );
        r.register(
            "ephemeral_messages",
            "automerge-repo ephemeral messages between nodes (published, received, refused, unsent)",
            m.ephemeral.clone(),
        );
        r.register(
            "disk_free_bytes",
            "Free bytes on the file system of the store (for unprivileged users)",
            m.disk_free_bytes.clone(),
        );
        r.register(
            "store_bytes",
            "Bytes of the store's files",
            m.store_bytes.clone(),
        );
        r.register(
            "low_disk",
            "1 while writes are refused because free space is below min_free_mib",
            m.low_disk.clone(),
        );
        r.register(
            "held_changes",
            "Changes held for missing dependencies, in all documents",
            m.held_changes.clone(),
        );
        r.register(
            "held_bytes",
            "Bytes of changes held for missing dependencies",
            m.held_bytes.clone(),
        );
        r.register(
            "shape_refused_changes",
            "Changes refused since start for breaking a document shape limit",
            m.shape_refused.clone(),
        );
        r.register(
            "automerge_panics",
            "Automerge panics on input caught since start (each became an error)",
            m.automerge_panics.clone(),
        );
        r.register(
            "quarantined_documents",
            "Documents quarantined because their stored data is corrupt",
            m.quarantined_documents.clone(),
        );
        r.register(
            "reconcile_differences",
            "Documents found to differ by reconciliation",
            m.reconcile_differences.clone(),
        );
        r.register(
            "reconcile_sketches",
            "Ranges of this node's reconciliation sessions whose sketch it decoded (decoded) \
             or gave up on and split instead (split)",
            m.sketches.clone(),
        );
        r.register(
            "pushes",
            "Pushes sent again for want of an acknowledgement (resent), given up and left \
             to repair (abandoned), or not kept for a resend at a bound (untracked)",
            m.pushes.clone(),
        );
        r.register(
            "bundled_documents",
            "Documents sent whole, in bundles, to a peer that held none of them (sent), and \
             of those, the ones it did not acknowledge in time, synced instead (unanswered)",
            m.bundled_documents.clone(),
        );
        r.register(
            "peers_silenced",
            "Times a peer was passed over by pushes after one to it was given up (until it spoke)",
            m.silenced.clone(),
        );
        r.register(
            "peer_stores_renewed",
            "Hellos announcing a different store id than the peer had (restored from a backup \
             or rebuilt empty): its reports were forgotten and its sync states deleted",
            m.stores_renewed.clone(),
        );
        r.register(
            "confirmations",
            "Documents a peer was asked about because it had not confirmed this node's \
             writes to them for a round, or came back with them unconfirmed",
            m.confirmations.clone(),
        );
        r.register(
            "documents_collected",
            "Deleted documents collected: every member held the delete for the grace period, \
             so their history was removed and a marker kept",
            m.documents_collected.clone(),
        );
        r.register(
            "gc_markers_forgotten",
            "Markers of collected documents dropped a grace period after collection",
            m.markers_forgotten.clone(),
        );
        r.register(
            "reconciliations_started",
            "Reconciliation sessions this node started (on connect, in rounds, resent)",
            m.reconciliations.clone(),
        );
        r.register(
            "publish_failures",
            "Gossip publications that reached no peer",
            m.publish_failures.clone(),
        );
        r.register(
            "send_failures",
            "Direct messages that failed",
            m.send_failures.clone(),
        );
        r.register(
            "direct_messages_dropped",
            "Direct messages dropped unsent (full per-peer queue, or peer gone)",
            m.direct_dropped.clone(),
        );
        r.register(
            "received_batches",
            "Batches of received messages applied, each durable with one WAL fsync at most",
            m.received_batches.clone(),
        );
        r.register(
            "received_batch_messages",
            "Received messages applied in batches",
            m.received_batched.clone(),
        );
    }

    fn register_gauges(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "members",
            "Members on the membership list (0 without one)",
            m.members.clone(),
        );
        r.register(
            "local_events_dropped",
            "Local commits missed by the networking task",
            m.local_events_dropped.clone(),
        );
        r.register(
            "peers_replicating",
            "Peers replication runs with",
            m.peers_replicating.clone(),
        );
        r.register(
            "peers_blocked",
            "Peers blocked now, by an operator or for misbehaving",
            m.peers_blocked.clone(),
        );
        r.register(
            "peers_sanctioned",
            "Peers blocked for sending refused messages",
            m.peers_sanctioned.clone(),
        );
        r.register(
            "peers_forgotten",
            "Disconnected peers forgotten to make room in the peer table",
            m.peers_forgotten.clone(),
        );
        r.register(
            "direct_queue_depth",
            "Direct messages waiting for a slot in a peer's window, longest queue",
            m.direct_queued.clone(),
        );
        r.register(
            "queue_depth",
            "Replication core queue depths, largest over peers",
            m.queue_depth.clone(),
        );
        r.register(
            "peer_documents_behind",
            "Documents a peer is known to lack",
            m.documents_behind.clone(),
        );
        r.register(
            "peer_changes_behind",
            "Changes a peer is known to lack",
            m.changes_behind.clone(),
        );
        r.register(
            "peer_lag_seconds",
            "How long the oldest change a peer is not known to have has been here",
            m.lag_seconds.clone(),
        );
        r.register(
            "region_documents_behind",
            "Documents a region is known to lack (its least behind peer)",
            m.region_documents_behind.clone(),
        );
        r.register(
            "region_changes_behind",
            "Changes a region is known to lack (its least behind peer)",
            m.region_changes_behind.clone(),
        );
        r.register(
            "region_lag_seconds",
            "Replication lag of a region (its least behind peer)",
            m.region_lag_seconds.clone(),
        );
        r.register(
            "propagation_delay_seconds",
            "Time from a change arriving here to a peer acknowledging it, by the peer's region",
            m.propagation_delay.clone(),
        );
    }

    /// Sets the lag gauges of every peer and region.
    pub fn observe_lag(&mut self, peers: &[PeerLag], regions: &[RegionStatus]) {
        let mut labels = std::collections::HashSet::with_capacity(peers.len());
        for l in peers {
            let label = PeerLabel {
                peer: l.peer.to_string(),
                region: l.region.clone().unwrap_or_else(|| "unknown".into()),
            };
            labels.insert(label.clone());
            let b = &l.behind;
            self.documents_behind
                .get_or_create(&label)
                .set(b.documents as i64);
            self.changes_behind
                .get_or_create(&label)
                .set(b.changes as i64);
            self.lag_seconds.get_or_create(&label).set(b.lag_seconds);
        }
        for gone in self.peer_labels.difference(&labels) {
            self.documents_behind.remove(gone);
            self.changes_behind.remove(gone);
            self.lag_seconds.remove(gone);
        }
        self.peer_labels = labels;
        for r in regions {
            let label = RegionLabel {
                region: r.region.clone(),
            };
            let b = &r.behind;
            self.region_documents_behind
                .get_or_create(&label)
                .set(b.documents as i64);
            self.region_changes_behind
                .get_or_create(&label)
                .set(b.changes as i64);
            self.region_lag_seconds
                .get_or_create(&label)
                .set(b.lag_seconds);
        }
    }

    /// Records one propagation-delay sample towards a peer of `region`.
    pub fn observe_delay(&self, region: Option<&Region>, delay: Duration) {
        let label = RegionLabel {
            region: region.map_or_else(|| "unknown".into(), ToString::to_string),
        };
        self.propagation_delay
            .get_or_create(&label)
            .observe(delay.as_secs_f64());
    }

    /// Copies the growth of the core's counters since the last call.
    pub fn observe(&mut self, stats: &Stats, depths: QueueDepths) {
        let label = |kind: &str| KindLabel {
            kind: kind.to_string(),
        };
        for (kind, (messages, bytes)) in &stats.sent {
            let (m0, b0) = self.last.sent.get(kind).copied().unwrap_or_default();
            self.messages_sent
                .get_or_create(&label(kind))
                .inc_by(messages - m0);
            self.bytes_sent
                .get_or_create(&label(kind))
                .inc_by(bytes - b0);
        }
        for (reason, n) in &stats.rejected {
            let n0 = self.last.rejected.get(reason).copied().unwrap_or_default();
            self.rejected.get_or_create(&label(reason)).inc_by(n - n0);
        }
        let applied = &self.changes_applied;
        applied
            .get_or_create(&label("delta"))
            .inc_by(stats.delta_changes_applied - self.last.delta_changes_applied);
        applied
            .get_or_create(&label("sync"))
            .inc_by(stats.sync_changes_applied - self.last.sync_changes_applied);
        applied
            .get_or_create(&label("push"))
            .inc_by(stats.push_changes_applied - self.last.push_changes_applied);
        applied
            .get_or_create(&label("bundle"))
            .inc_by(stats.bundle_changes_applied - self.last.bundle_changes_applied);
        for (outcome, now, before) in [
            (
                "decoded",
                stats.sketches_decoded,
                self.last.sketches_decoded,
            ),
            ("split", stats.sketches_split, self.last.sketches_split),
        ] {
            self.sketches
                .get_or_create(&label(outcome))
                .inc_by(now - before);
        }
        for (outcome, now, before) in [
            ("sent", stats.bundled_docs_sent, self.last.bundled_docs_sent),
            (
                "unanswered",
                stats.bundled_docs_unanswered,
                self.last.bundled_docs_unanswered,
            ),
        ] {
            self.bundled_documents
                .get_or_create(&label(outcome))
                .inc_by(now - before);
        }
        self.syncs_dropped
            .inc_by(stats.syncs_dropped - self.last.syncs_dropped);
        self.syncs_abandoned
            .inc_by(stats.syncs_abandoned - self.last.syncs_abandoned);
        self.held_repairs
            .inc_by(stats.held_repairs - self.last.held_repairs);
        self.held_refused
            .inc_by(stats.held_refused - self.last.held_refused);
        self.held_budget_refused
            .inc_by(stats.held_budget_refused - self.last.held_budget_refused);
        self.not_members
            .inc_by(stats.not_members - self.last.not_members);
        self.region_claims_overridden
            .inc_by(stats.region_claims_overridden - self.last.region_claims_overridden);
        self.reconcile_differences
            .inc_by(stats.reconcile_differences - self.last.reconcile_differences);
        for (outcome, now, before) in [
            ("resent", stats.pushes_resent, self.last.pushes_resent),
            (
                "abandoned",
                stats.pushes_abandoned,
                self.last.pushes_abandoned,
            ),
            (
                "untracked",
                stats.pushes_untracked,
                self.last.pushes_untracked,
            ),
        ] {
            self.pushes
                .get_or_create(&label(outcome))
                .inc_by(now - before);
        }
        self.confirmations
            .inc_by(stats.confirmations - self.last.confirmations);
        self.silenced
            .inc_by(stats.peers_silenced - self.last.peers_silenced);
        self.stores_renewed
            .inc_by(stats.peer_stores_renewed - self.last.peer_stores_renewed);
        self.documents_collected
            .inc_by(stats.documents_collected - self.last.documents_collected);
        self.markers_forgotten
            .inc_by(stats.markers_forgotten - self.last.markers_forgotten);
        self.reconciliations
            .inc_by(stats.reconciliations_started - self.last.reconciliations_started);
        for (kind, depth) in [
            ("queued_syncs", depths.queued_syncs),
            ("open_syncs", depths.open_syncs),
            ("pending_acks", depths.pending_acks),
            ("outputs", depths.outputs),
        ] {
            self.queue_depth
                .get_or_create(&label(kind))
                .set(depth as i64);
        }
        self.last = stats.clone();
    }
}
