//! The node's own Prometheus metrics, registered beside libp2p's in one
//! registry that `/metrics` encodes.
//!
//! The replication core keeps plain counters ([`Stats`]); the networking
//! task copies their growth into these every second, so a scrape sees
//! figures at most a second old.

use causeway_engine::replication::{QueueDepths, Stats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
#[derive(Debug, Clone, Default)]
pub struct NodeMetrics {
    messages_sent: Family<KindLabel, Counter>,
    bytes_sent: Family<KindLabel, Counter>,
    rejected: Family<KindLabel, Counter>,
    changes_applied: Family<KindLabel, Counter>,
    syncs_dropped: Counter,
    syncs_abandoned: Counter,
    reconcile_differences: Counter,
    /// Gossip publications that reached no peer (left to anti-entropy).
    pub publish_failures: Counter,
    /// Direct messages that failed (timeout, connection lost, dial failure).
    pub send_failures: Counter,
    /// Local commits the networking task missed because its event queue was
    /// full (left to anti-entropy).
    pub local_events_dropped: Gauge,
    /// Peers replication runs with.
    pub peers_replicating: Gauge,
    /// Queue depths of the replication core (largest over peers).
    queue_depth: Family<KindLabel, Gauge>,
    /// Documents each peer is known to lack.
    pub documents_behind: Family<PeerLabel, Gauge>,
    /// Changes each peer is known to lack.
    pub changes_behind: Family<PeerLabel, Gauge>,
    last: Stats,
}

impl NodeMetrics {
    /// Registers the metrics in `registry` under the `causeway` prefix.
    pub fn register(registry: &mut Registry) -> NodeMetrics {
        let m = NodeMetrics::default();
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
            "Changes applied from peers, by path (delta or sync)",
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
            "reconcile_differences",
            "Documents found to differ by reconciliation",
            m.reconcile_differences.clone(),
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
    }

    fn register_gauges(&self, r: &mut Registry) {
        let m = self;
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
        self.syncs_dropped
            .inc_by(stats.syncs_dropped - self.last.syncs_dropped);
        self.syncs_abandoned
            .inc_by(stats.syncs_abandoned - self.last.syncs_abandoned);
        self.reconcile_differences
            .inc_by(stats.reconcile_differences - self.last.reconcile_differences);
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
