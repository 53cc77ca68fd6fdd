//! What the task reports: the cluster status for `causeway status` and
//! `/v1/status`, and the metrics observed every second.

use super::*;

impl Driver {
    pub(super) fn observe(&mut self) {
        self.watch_disk();
        let lags = self.lags();
        self.metrics.observe_lag(&lags, &region_lags(&lags));
        let members = self.config.membership.as_ref().map_or(0, |m| m.len());
        self.metrics.members.set(members as i64);
        let replicating = self.peers.values().filter(|p| p.replicating).count();
        self.metrics.peers_replicating.set(replicating as i64);
        self.metrics
            .local_events_dropped
            .set(self.local_events_dropped as i64);
        let stats = self.core.stats().clone();
        self.metrics.observe(&stats, self.core.queue_depths());
        let engine = self.core.engine().stats();
        self.metrics.held_changes.set(engine.held_changes as i64);
        self.metrics.held_bytes.set(engine.held_bytes as i64);
        self.metrics.shape_refused.set(engine.shape_refused as i64);
        self.metrics
            .automerge_panics
            .set(engine.automerge_panics as i64);
        self.metrics
            .quarantined_documents
            .set(engine.quarantined_documents as i64);
        self.metrics
            .direct_queued
            .set(self.traffic.outbox.longest_queue() as i64);
    }

    /// Looks at the store's disk: free space and the store's size, into
    /// the metrics and the status; refuses writes below
    /// `min_free_bytes`, and takes them again once free space is back above
    /// it by a margin.
    fn watch_disk(&mut self) {
        let engine = self.core.engine().clone();
        let path = engine.path();
        let free = rustix::fs::statvfs(path)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .ok();
        let store_bytes = store_bytes(path);
        let min = self.config.min_free_bytes;
        if let Some(free) = free.filter(|_| min > 0) {
            let low = engine.is_low_disk();
            let margin = min / LOW_DISK_MARGIN_DIVISOR;
            if !low && free < min {
                warn!(
                    free_bytes = free,
                    min_free_bytes = min,
                    "disk nearly full: writes are refused until space is freed"
                );
                engine.set_low_disk(true);
            } else if low && free >= min.saturating_add(margin) {
                info!(free_bytes = free, "disk space back: writes are taken again");
                engine.set_low_disk(false);
            }
        }
        let low = engine.is_low_disk();
        self.disk = DiskStatus {
            free_bytes: free,
            store_bytes,
            min_free_bytes: min,
            low,
        };
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.metrics.disk_free_bytes.set(free.map_or(0, gauge));
        self.metrics.store_bytes.set(gauge(store_bytes));
        self.metrics.low_disk.set(i64::from(low));
    }

    pub(super) fn status(&mut self) -> NetworkStatus {
        let lags = self.lags();
        let mut peers = Vec::new();
        for (id, p) in &self.peers {
            let node = node_id(id);
            let progress = self.core.progress().peer(&node);
            let region = progress.and_then(|pp| pp.region.as_ref().map(ToString::to_string));
            let state = if self.guard.blocked.contains(id) {
                PeerState::Blocked
            } else if p.replicating {
                PeerState::Replicating
            } else if p.connections > 0 {
                PeerState::Connected
            } else {
                PeerState::Disconnected
            };
            let target = self.dialer.targets.iter().find(|t| t.peer == Some(*id));
            let behind = lags
                .iter()
                .find(|l| l.peer == node)
                .map_or_else(Behind::default, |l| l.behind);
            peers.push(PeerStatus {
                peer_id: id.to_string(),
                region,
                state,
                addresses: p.addrs.iter().map(ToString::to_string).collect(),
                rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                dial_failures: target.map_or(0, |t| t.backoff.failures()),
                last_error: target.and_then(|t| t.last_error.clone()),
                behind,
                protocol_version: self.core.protocol_version(&node),
            });
        }
        NetworkStatus {
            peer_id: self.swarm.local_peer_id().to_string(),
            region: self.config.region.to_string(),
            cluster: self.config.cluster.to_string(),
            listen_addrs: self.listen_addrs.iter().map(ToString::to_string).collect(),
            peers,
            regions: region_lags(&lags),
            local_events_dropped: self.local_events_dropped,
            catch_up: self.catch_up_status(),
            disk: self.disk.clone(),
            build_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_versions: [SUPPORTED_VERSIONS.min, SUPPORTED_VERSIONS.max],
            gc: self.gc_status(),
            drain: self.core.drain().map(|d| DrainStatus {
                done: d.done_at.is_some(),
                peer: d.peer.map(|n| n.to_string()),
                documents_left: d.documents_left,
            }),
        }
    }

    /// Garbage collection's settings and counts.
    fn gc_status(&self) -> GcStatus {
        let stats = self.core.stats();
        let pass = self.core.collection_pass();
        GcStatus {
            grace_secs: self.core.config().collection.map(|c| c.grace.as_secs()),
            documents_collected: stats.documents_collected,
            markers_forgotten: stats.markers_forgotten,
            waiting: pass.map(|p| p.waiting),
            markers: pass.map(|p| p.markers),
        }
    }

    /// Catching up: ready once the core caught up, or at once for a node
    /// given no one to catch up from.
    fn catch_up_status(&self) -> CatchUpStatus {
        let core = self.core.catch_up();
        let alone = self.config.bootstrap.is_empty() && self.config.membership.is_none();
        CatchUpStatus {
            ready: alone || core.done_at.is_some(),
            caught_up_after_ms: core.done_at.map(|d| d.as_secs_f64() * 1000.0),
            from: core.peer.map(|n| n.to_string()),
            documents_left: core.documents_left,
            sync_changes_applied: self.core.stats().sync_changes_applied,
        }
    }

    /// How far behind every peer the core has heard from is.
    pub(super) fn lags(&self) -> Vec<PeerLag> {
        let now = self.now();
        let progress = self.core.progress();
        progress
            .peers()
            .map(|(node, p)| {
                let lag = progress.lag(node);
                PeerLag {
                    peer: node.clone(),
                    region: p.region.as_ref().map(ToString::to_string),
                    behind: Behind {
                        documents: lag.documents,
                        changes: lag.changes,
                        lag_seconds: lag.seconds(now),
                    },
                }
            })
            .collect()
    }
}

/// Bytes of the files directly in the store directory (RocksDB keeps no
/// subdirectories); files that vanish meanwhile (compactions) count 0.
fn store_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .filter(|meta| meta.is_file())
        .map(|meta| meta.len())
        .sum()
}
