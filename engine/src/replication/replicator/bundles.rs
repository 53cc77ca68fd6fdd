//! Bundles: the whole history of documents a peer holds none of, many
//! documents to a message (see [`Bundle`]).
//!
//! Reconciliation tells which of the documents it found differing the peer
//! lacks entirely (`absent_there`). To a peer that speaks
//! [`BUNDLE_VERSION`], those go into its bundle queue instead of its sync
//! queue: there is nothing to negotiate, only a history to hand over, and a
//! new node joining a cluster lacks every document. The receiver applies
//! each document as it would a sync's changes and acknowledges its heads;
//! that acknowledgement is the bundle's answer. At most
//! [`MAX_BUNDLES_IN_FLIGHT`] bundles await answers per peer. A document
//! still unacknowledged `retry_after` after it went out falls back to a
//! per-document sync, which has its own resends and give-ups, so a lost
//! bundle costs time, never a document.
//!
//! Deleted documents go by sync: the peer may have collected one, and only
//! a sync learns that without sending the history back. While the node
//! drains, every document goes by sync: a drain counts a peer as holding
//! what this node syncs with it only once the syncs are answered, which is
//! what it waits for. A bundle that reaches a node which collected one of
//! its documents starts a sync for that document instead.

use super::*;

/// Bundles sent to one peer and not yet answered, at most.
pub const MAX_BUNDLES_IN_FLIGHT: usize = 4;

/// One peer's bundle queue and the bundles awaiting its answer.
#[derive(Debug, Default)]
pub(super) struct Bundles {
    queue: VecDeque<DocId>,
    queued: BTreeSet<DocId>,
    /// Documents sent and not yet acknowledged, by the bundle that carried
    /// them.
    awaiting: BTreeMap<DocId, u64>,
    /// Bundles in flight: when each went out and how many of its documents
    /// are still unacknowledged.
    in_flight: BTreeMap<u64, (Duration, usize)>,
    next_bundle: u64,
}

impl Bundles {
    /// Documents queued or awaiting an answer.
    pub(super) fn pending(&self) -> usize {
        self.queue.len() + self.awaiting.len()
    }

    /// Whether `doc` is queued or awaiting an answer.
    pub(super) fn holds(&self, doc: &DocId) -> bool {
        self.queued.contains(doc) || self.awaiting.contains_key(doc)
    }

    /// When the oldest bundle in flight went out.
    pub(super) fn oldest(&self) -> Option<Duration> {
        self.in_flight.values().map(|(at, _)| *at).min()
    }

    /// The peer acknowledged `doc`: its bundle no longer waits for it.
    fn acknowledged(&mut self, doc: &DocId) {
        let Some(bundle) = self.awaiting.remove(doc) else {
            return;
        };
        if let Some((_, left)) = self.in_flight.get_mut(&bundle) {
            *left -= 1;
            if *left == 0 {
                self.in_flight.remove(&bundle);
            }
        }
    }

    /// Takes out the bundles sent at or before `cutoff`: the documents
    /// they still await.
    fn take_overdue(&mut self, cutoff: Duration) -> Vec<DocId> {
        let overdue: BTreeSet<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (at, _))| *at <= cutoff)
            .map(|(id, _)| *id)
            .collect();
        if overdue.is_empty() {
            return Vec::new();
        }
        self.in_flight.retain(|id, _| !overdue.contains(id));
        let mut docs = Vec::new();
        self.awaiting.retain(|doc, bundle| {
            let keep = !overdue.contains(bundle);
            if !keep {
                docs.push(doc.clone());
            }
            keep
        });
        docs
    }
}

impl Replicator {
    /// Whether documents `peer` lacks entirely go to it in bundles: it
    /// speaks [`BUNDLE_VERSION`] and this node is not draining.
    pub(super) fn bundles_to(&self, peer: &NodeId) -> bool {
        self.draining.is_none()
            && self
                .peers
                .get(peer)
                .and_then(|p| p.version)
                .is_some_and(|v| v >= BUNDLE_VERSION)
    }

    /// Queues `doc` for a bundle to `peer`, within the same bound as its
    /// sync queue (overflow is counted as a dropped sync and left to
    /// anti-entropy).
    pub(super) fn enqueue_bundle(&mut self, peer: &NodeId, doc: &DocId) {
        let max = self.config.max_queued_syncs_per_peer;
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.bundles.holds(doc) {
            return;
        }
        if p.bundles.queue.len() >= max {
            self.stats.syncs_dropped += 1;
            return;
        }
        p.bundles.queued.insert(doc.clone());
        p.bundles.queue.push_back(doc.clone());
    }

    /// Sends bundles to `peer` while fewer than [`MAX_BUNDLES_IN_FLIGHT`]
    /// await an answer. A document that cannot go whole (collected, with
    /// more changes than a bundle takes, or a history larger than its byte
    /// budget) is synced instead.
    pub(super) fn pump_bundles(&mut self, now: Duration, peer: &NodeId) -> Result<()> {
        loop {
            let ready = self.peers.get(peer).is_some_and(|p| {
                !p.bundles.queue.is_empty() && p.bundles.in_flight.len() < MAX_BUNDLES_IN_FLIGHT
            });
            if !ready {
                return Ok(());
            }
            let mut docs = Vec::new();
            let mut bytes = 0;
            while docs.len() < MAX_BUNDLE_DOCS {
                let Some(doc) = self
                    .peer_mut(peer)
                    .and_then(|p| p.bundles.queue.pop_front())
                else {
                    break;
                };
                let changes = match self.engine.whole_history(&doc) {
                    Ok(Some(c)) => c,
                    Err(Error::Quarantined { .. } | Error::NotFound(_)) => {
                        self.forget_bundled(peer, &doc);
                        continue;
                    }
                    Ok(None) | Err(Error::Deleted(_)) => {
                        // Deleted, or collected here: the peer may have
                        // collected it too, and only a sync learns that
                        // without sending the history back.
                        self.forget_bundled(peer, &doc);
                        self.enqueue_sync(peer, &doc);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let size: usize = changes.iter().map(Vec::len).sum();
                if changes.len() > MAX_CHANGES_PER_DELTA || size > MAX_BUNDLE_CHANGE_BYTES {
                    self.forget_bundled(peer, &doc);
                    self.enqueue_sync(peer, &doc);
                    continue;
                }
                if bytes + size > MAX_BUNDLE_CHANGE_BYTES {
                    // The next bundle starts with it.
                    if let Some(p) = self.peer_mut(peer) {
                        p.bundles.queue.push_front(doc);
                    }
                    break;
                }
                bytes += size;
                docs.push(BundledDoc {
                    doc,
                    changes: changes.into_iter().map(Bytes).collect(),
                });
            }
            if docs.is_empty() {
                continue;
            }
            let Some(p) = self.peer_mut(peer) else {
                return Ok(());
            };
            let id = p.bundles.next_bundle;
            p.bundles.next_bundle += 1;
            for d in &docs {
                p.bundles.queued.remove(&d.doc);
                p.bundles.awaiting.insert(d.doc.clone(), id);
            }
            p.bundles.in_flight.insert(id, (now, docs.len()));
            self.stats.bundled_docs_sent += docs.len() as u64;
            self.send(peer, Message::Bundle(Bundle { docs }));
        }
    }

    /// `doc` left `peer`'s bundle queue without going out.
    fn forget_bundled(&mut self, peer: &NodeId, doc: &DocId) {
        if let Some(p) = self.peer_mut(peer) {
            p.bundles.queued.remove(doc);
        }
    }

    /// The peer acknowledged `doc`: a bundle that carried it has its answer.
    pub(super) fn bundle_acknowledged(&mut self, peer: &NodeId, doc: &DocId) {
        if let Some(p) = self.peer_mut(peer) {
            p.bundles.acknowledged(doc);
        }
    }

    /// Documents of bundles to `peer` unanswered after `retry_after` fall
    /// back to per-document syncs; then more bundles go out.
    pub(super) fn resend_bundles(&mut self, now: Duration, peer: &NodeId) -> Result<()> {
        let cutoff = now.saturating_sub(self.config.retry_after);
        let overdue = match self.peer_mut(peer) {
            Some(p) if p.bundles.oldest().is_some_and(|at| at <= cutoff) => {
                p.bundles.take_overdue(cutoff)
            }
            _ => Vec::new(),
        };
        self.stats.bundled_docs_unanswered += overdue.len() as u64;
        for doc in &overdue {
            self.enqueue_sync(peer, doc);
        }
        self.pump_bundles(now, peer)
    }

    /// A bundle from `from`: each document's changes applied as a sync's
    /// would be, and acknowledged at the end of this call.
    pub(super) fn on_bundle(&mut self, now: Duration, from: &NodeId, b: Bundle) -> Result<Verdict> {
        let Some(p) = self.peer_mut(from) else {
            return Ok(Verdict::Ignore);
        };
        if p.acks.len() + b.docs.len() > MAX_ACK_ENTRIES {
            // Room for the whole answer: acknowledgements beyond the bound
            // would be dropped, and their documents synced after a wait.
            let pending = std::mem::take(&mut p.acks);
            self.send_acks(from, pending);
        }
        for d in b.docs {
            match self.engine.collected(&d.doc) {
                Ok(None) => {}
                Ok(Some(marker)) => {
                    // Collected here: a sync decides whether the peer holds
                    // more than the tombstone (a write after the delete).
                    self.queue_ack(from, &d.doc, &marker);
                    self.enqueue_sync(from, &d.doc);
                    continue;
                }
                Err(Error::Quarantined { .. }) => continue,
                Err(e) => return Err(e),
            }
            let changes: Vec<Vec<u8>> = d.changes.into_iter().map(|b| b.0).collect();
            let outcome = match self.apply_from_peer(from, &d.doc, &changes) {
                Ok(a) => a.outcome,
                Err(e) if is_bad_change(&e) => return Ok(self.reject(from, rejection(&e))),
                Err(Error::Quarantined { .. }) => continue,
                Err(e) => return Err(e),
            };
            self.stats.bundle_changes_applied += outcome.applied as u64;
            self.account_held_from(&d.doc, &outcome, from);
            self.applied(&d.doc, &outcome);
            if !outcome.missing_deps.is_empty() || outcome.refused > 0 {
                // Not all of it could apply here: the sync finds what
                // is missing.
                self.enqueue_sync(from, &d.doc);
            } else {
                // This node now holds all the peer held of it.
                self.synced_while_settling(now, from, &d.doc, None)?;
            }
            self.queue_ack(from, &d.doc, &outcome.heads);
            if outcome.applied > 0 {
                // As for changes that came by sync: other peers learn
                // that this node holds them.
                let others: Vec<NodeId> =
                    self.peers.keys().filter(|p| *p != from).cloned().collect();
                for peer in others {
                    self.queue_ack(&peer, &d.doc, &outcome.heads);
                }
            }
        }
        // The bundle's answer goes at once, in one acknowledgement (a
        // bundle holds fewer documents than one may list).
        let acks = self.peer_mut(from).map(|p| std::mem::take(&mut p.acks));
        if let Some(acks) = acks.filter(|a| !a.is_empty()) {
            self.send_acks(from, acks);
        }
        self.start_queued(now, from)?;
        Ok(Verdict::Accept)
    }
}
