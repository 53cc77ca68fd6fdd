//! Per-document Automerge sync sessions with each peer: a queue and a
//! window of active sessions per peer, resends and give-ups, idle sessions
//! trimmed to their heads, and the repair of held changes (a sync started
//! to fetch what they wait for).

use super::*;
use crate::audit::Actor;

/// Documents with held changes one look of the core examines at most (see
/// [`ReplicatorConfig::held_repair_interval`]); the next look goes on from
/// where this one stopped.
pub const MAX_HELD_REPAIRS_PER_SCAN: usize = 64;

/// One document's sync with one peer. A session that awaits nothing stays in
/// memory (idle, trimmed to its heads) while the peer is connected: Automerge
/// answers any message from a state that has not spoken yet, so two sides
/// that forgot their sessions after every exchange would answer each other
/// forever.
pub(super) struct DocSync {
    pub(super) state: SyncState,
    /// When the last message was sent, while an answer is awaited.
    pub(super) sent_at: Option<Duration>,
    /// The shared heads last persisted, to skip rewriting them unchanged.
    pub(super) saved: Vec<ChangeHash>,
    /// Resends of the message now awaiting an answer.
    pub(super) retries: u32,
}

impl DocSync {
    /// A session that starts over from `shared_heads`, as after a restart:
    /// its first message is always sent and always answered.
    pub(super) fn restart(shared_heads: Vec<ChangeHash>) -> DocSync {
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

/// When a document's held changes are next repaired, and how often they
/// were.
pub(super) struct HeldRepair {
    pub(super) next_at: Duration,
    pub(super) attempts: u32,
}

impl Replicator {
    pub(super) fn on_sync(
        &mut self,
        now: Duration,
        from: &NodeId,
        frame: SyncFrame,
    ) -> Result<Verdict> {
        if frame.msg.0.is_empty() {
            // "In sync": the answer to our last message. Nothing to send back.
            let session = self
                .peers
                .get_mut(from)
                .and_then(|p| p.syncs.get_mut(&frame.doc));
            if let Some(s) = session {
                if let Some(at) = s.sent_at.take() {
                    self.deadlines.settled(at, from, &frame.doc);
                }
                s.retries = 0;
            }
            // Nothing to add to what we said: a peer asked for a document
            // we lack, and that has nothing to send, lacks it too.
            self.fetch_answered(from, &frame.doc, true)?;
            // Sends only if our heads moved since; otherwise the session goes
            // idle and its shared heads are persisted.
            self.pump_sync(now, from, &frame.doc, false)?;
            self.synced_while_settling(now, from, &frame.doc, None)?;
            self.start_queued(now, from)?;
            return Ok(Verdict::Accept);
        }
        let message = match crate::guarded::sync_message(&frame.msg.0) {
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
            .acting_as(Actor::Peer(from.as_str().to_string()))
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
        self.account_held_from(&frame.doc, &outcome, from);
        self.applied(&frame.doc, &outcome);
        self.fetch_answered(from, &frame.doc, their_heads.is_empty())?;
        self.record_progress(
            now,
            from,
            &frame.doc,
            their_heads.clone(),
            Some(&outcome.heads),
        )?;
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
        self.note_depths(from);
        self.pump_sync(now, from, &frame.doc, true)?;
        self.synced_while_settling(now, from, &frame.doc, Some(&their_heads))?;
        self.start_queued(now, from)?;
        Ok(Verdict::Accept)
    }

    /// Queues a per-document sync with `peer` (bounded; overflow is counted
    /// and left to anti-entropy).
    pub(super) fn enqueue_sync(&mut self, peer: &NodeId, doc: &DocId) {
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
        self.note_depths(peer);
    }

    /// Starts queued syncs while fewer than the limit are active.
    pub(super) fn start_queued(&mut self, now: Duration, peer: &NodeId) -> Result<()> {
        let max = self.config.max_active_syncs_per_peer;
        loop {
            let Some(p) = self.peers.get_mut(peer) else {
                return Ok(());
            };
            if p.queue.is_empty() {
                // Checked first: counting active sessions walks every
                // session with the peer, idle ones included.
                return Ok(());
            }
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
            self.note_depths(peer);
            self.pump_sync(now, peer, &doc, false)?;
        }
    }

    /// Sends the next sync message for `doc` to `peer`, if any is due, and
    /// then awaits its answer. When none is due and `answering` a message from
    /// the peer, sends the empty "in sync" answer instead. A session that
    /// awaits nothing is idle: its shared heads are persisted if they moved,
    /// and it stays in memory, trimmed, until the idle limit.
    pub(super) fn pump_sync(
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
                if let Some(at) = sync.sent_at.replace(now) {
                    self.deadlines.settled(at, peer, doc);
                }
                self.deadlines.sent(now, peer, doc);
                m.encode()
            }
            // Nothing due: either we still await the peer's answer, or the
            // peer's message left us in sync.
            None => Vec::new(),
        };
        if msg.is_empty() && answering {
            // "In sync" says which heads we hold only to a peer that knows
            // which of its messages it answers; an acknowledgement says it
            // plainly (a peer asking whether we hold its writes waits for
            // this, see `confirm_writes`).
            match self.engine.heads(doc) {
                Ok(heads) => self.queue_ack(peer, doc, &heads),
                Err(Error::NotFound(_) | Error::Quarantined { .. }) => {}
                Err(e) => return Err(e),
            }
        }
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
    pub(super) fn make_room(&mut self, peer: &NodeId) -> bool {
        let max = self.config.max_sync_sessions_per_peer;
        let Some(p) = self.peers.get_mut(peer) else {
            return false;
        };
        if p.syncs.len() >= max {
            p.syncs.retain(|_, s| s.sent_at.is_some());
        }
        p.syncs.len() < max
    }

    /// Looks at the next [`MAX_HELD_REPAIRS_PER_SCAN`] documents with held
    /// changes and, for each whose repair is due, queues a sync with a peer
    /// that may have what they wait for: first the peers whose latest report
    /// names heads this node lacks, then the others, a different one on each
    /// attempt. (A delta whose changes were held already queued a sync with
    /// its sender.) Documents no longer holding anything are forgotten.
    pub(super) fn repair_held(&mut self, now: Duration) -> Result<()> {
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
    pub(super) fn repair_candidates(&self, doc: &DocId) -> Result<Vec<NodeId>> {
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
    /// Whether the sync message for `doc` sent to `peer` at `at` still
    /// awaits its answer.
    pub(super) fn awaits(&self, at: Duration, peer: &NodeId, doc: &DocId) -> bool {
        self.peers
            .get(peer)
            .and_then(|p| p.syncs.get(doc))
            .is_some_and(|s| s.sent_at == Some(at))
    }

    /// Takes out of the deadline table every sync message unanswered for
    /// `retry_after` at `now`: per peer, the documents whose message still
    /// awaits its answer, in id order (entries left behind by a session
    /// that went away are dropped).
    pub(super) fn take_unanswered(&mut self, now: Duration) -> BTreeMap<NodeId, Vec<DocId>> {
        let mut due: BTreeMap<NodeId, Vec<DocId>> = BTreeMap::new();
        let Some(cutoff) = now.checked_sub(self.config.retry_after) else {
            return due;
        };
        for (at, peer, doc) in self.deadlines.take_sent_by(cutoff) {
            if self.awaits(at, &peer, &doc) {
                due.entry(peer).or_default().push(doc);
            }
        }
        for docs in due.values_mut() {
            docs.sort_unstable();
        }
        due
    }

    /// Sends again, from the shared heads, the unanswered sync messages to
    /// `peer` for `stale` (see [`Replicator::take_unanswered`]); gives up
    /// sessions resent `max_sync_retries` times (counted).
    pub(super) fn resend_unanswered(
        &mut self,
        now: Duration,
        peer: &NodeId,
        stale: Vec<DocId>,
    ) -> Result<()> {
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
        Ok(())
    }
}
