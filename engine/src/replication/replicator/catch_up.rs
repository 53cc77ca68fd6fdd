//! Settling with a peer: a reconciliation session this node started has
//! ended, and every document it found differing has been synced with that
//! peer, both those this node syncs (it received the peer's list of them)
//! and those the peer syncs (this node learned of them from the peer's
//! answers), each done once a sync message about it from the peer has been
//! handled and this node's session for it is idle. Both stores then hold
//! each other's changes to those documents, and their other documents
//! were equal. Catching up needs only this node's side: a document is also
//! done once this node holds every head the peer named in a sync message
//! about it, which steady writes to the document cannot put off.
//!
//! Two things wait for a settlement. **Catching up** after a start: the
//! first own session with a peer of this node's region (with any peer, if
//! no connected peer is of its region, or of a region not known yet) whose
//! documents all get synced. Until then the node is not ready for clients:
//! one rebuilt on an empty disk or restored from an old backup would
//! otherwise answer 404s and stale documents. It happens once per start; a
//! later partition does not undo it. **Draining** ([`Replicator::start_drain`]):
//! with writes stopped, a fresh session with every connected peer; the
//! first of them to settle (any region) holds everything this node holds,
//! so the node can stop without losing a write.
//!
//! If syncs were dropped at the queue bound or given up unanswered, more
//! documents were learned of than [`MAX_CATCH_UP_DOCS`], the peer went
//! away, or the peer synced none of the documents it was awaited for
//! within [`STALL_ROUNDS`] times `retry_after` (it may have dropped them
//! at its own bound), the documents may still be missing, so that
//! settlement does not count and the wait starts over: for catching up the
//! next anti-entropy round comes at once and the next session that ends
//! starts the count again; a drain starts fresh sessions.

use super::*;

/// Documents one settlement waits for the peer to sync; a session that
/// learns of more does not count (the next one, after these are synced,
/// learns of fewer).
pub const MAX_CATCH_UP_DOCS: usize = 100_000;

/// How many `retry_after` intervals a settlement waits for the peer to sync
/// one more of the documents it is awaited for before starting over.
pub const STALL_ROUNDS: u32 = 4;

/// Where a settlement stands (see the [module docs](self)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    /// When it was reached (the core's `now`); `None` while it was not.
    pub done_at: Option<Duration>,
    /// The peer it is with: the one whose counting session ended first;
    /// `None` before.
    pub peer: Option<NodeId>,
    /// Documents left: queued or being synced with any peer, and those the
    /// peer has yet to sync.
    pub documents_left: usize,
}

/// What one settlement remembers between calls.
#[derive(Debug, Clone, Default)]
pub(super) struct Settling {
    done_at: Option<Duration>,
    peer: Option<NodeId>,
    /// For a drain: the sessions that count (started after writes
    /// stopped; at most one a peer at a time, and a drain lasts until it
    /// is done). `None`: any own session of a peer of this region.
    sessions: Option<BTreeSet<u64>>,
    /// Syncs dropped and given up when `peer` was chosen.
    losses_at_start: u64,
    /// Documents learned to differ from answers in this node's own session
    /// with each peer, while it is under way (the peer syncs them).
    learning: BTreeMap<NodeId, BTreeSet<DocId>>,
    /// Peers whose session learned of more than [`MAX_CATCH_UP_DOCS`].
    overflowed: BTreeSet<NodeId>,
    /// Of those, the ones `peer` has yet to sync.
    awaiting: BTreeSet<DocId>,
    /// When `peer` was chosen or last synced one of `awaiting`.
    progressed_at: Duration,
}

/// What a look at a settlement found.
enum Look {
    Waiting,
    Done,
    StartOver,
}

impl Settling {
    fn active(&self) -> bool {
        self.done_at.is_none()
    }

    fn counts(&self, session: u64) -> bool {
        self.sessions.as_ref().is_none_or(|s| s.contains(&session))
    }

    fn start_over(&mut self) {
        self.peer = None;
        self.awaiting.clear();
    }
}

impl Replicator {
    /// Catching up after this start: done once `done_at` is set.
    pub fn catch_up(&self) -> Settlement {
        self.settlement(&self.catching_up)
    }

    /// The drain, once [`Replicator::start_drain`] was called.
    pub fn drain(&self) -> Option<Settlement> {
        self.draining.as_ref().map(|d| self.settlement(d))
    }

    /// Starts draining at `now`: the caller has stopped local writes
    /// ([`Engine::start_draining`]). Starts a fresh reconciliation session
    /// with every connected peer (dropping any under way); the first that
    /// settles holds everything this node holds ([`Replicator::drain`]).
    pub fn start_drain(&mut self, now: Duration, random: &mut dyn Random) {
        self.draining = Some(Settling {
            sessions: Some(BTreeSet::new()),
            ..Settling::default()
        });
        self.drain_sessions(now, random);
    }

    /// Fresh sessions with every connected peer (peers that connect later
    /// get theirs on connect; every session started while draining counts).
    fn drain_sessions(&mut self, now: Duration, random: &mut dyn Random) {
        let peers: Vec<NodeId> = self.peers.keys().cloned().collect();
        for peer in peers {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.reconcile_sent_at = None;
            }
            self.start_reconcile(now, &peer, random);
        }
    }

    /// Session `session` starts: while a drain waits, it counts for it.
    /// Sessions no longer under way are forgotten, so the set is bounded by
    /// the peer table.
    pub(super) fn session_started(&mut self, session: u64) {
        if !self.draining.as_ref().is_some_and(Settling::active) {
            return;
        }
        let live: BTreeSet<u64> = self
            .peers
            .values()
            .filter_map(|p| p.reconcile_sent_at.map(|(id, _)| id))
            .collect();
        if let Some(d) = self.draining.as_mut() {
            let sessions = d.sessions.get_or_insert_with(BTreeSet::new);
            sessions.insert(session);
            sessions.retain(|id| live.contains(id));
        }
    }

    fn settlement(&self, s: &Settling) -> Settlement {
        let mut left = s.awaiting.len();
        for (id, p) in &self.peers {
            let theirs = s.peer.as_ref() == Some(id);
            let counted = |doc: &DocId| theirs && s.awaiting.contains(doc);
            left += p.queue.iter().filter(|d| !counted(d)).count();
            left += p.bundles.pending();
            left += p
                .syncs
                .iter()
                .filter(|(d, st)| st.sent_at.is_some() && !counted(d))
                .count();
        }
        Settlement {
            done_at: s.done_at,
            peer: s.peer.clone(),
            documents_left: left,
        }
    }

    /// Documents a message of this node's own session `session` with
    /// `peer` showed differing: `learned`, those the peer syncs, and
    /// `to_sync`, those this node syncs. Catching up awaits both by
    /// document; a drain awaits `learned` and takes this node's own syncs
    /// as done when none is queued or under way.
    pub(super) fn learned_while_settling(
        &mut self,
        peer: &NodeId,
        session: u64,
        learned: &[DocId],
        to_sync: &[DocId],
    ) {
        if learned.is_empty() && to_sync.is_empty() {
            return;
        }
        for (s, own) in [
            (Some(&mut self.catching_up), to_sync),
            (self.draining.as_mut(), &[][..]),
        ] {
            let Some(s) = s else { continue };
            if !s.active() || !s.counts(session) || learned.len() + own.len() == 0 {
                continue;
            }
            let learning = s.learning.entry(peer.clone()).or_default();
            learning.extend(learned.iter().chain(own).cloned());
            if learning.len() > MAX_CATCH_UP_DOCS {
                s.learning.remove(peer);
                s.overflowed.insert(peer.clone());
            }
        }
    }

    /// This node's own session `session` with `peer` ended.
    pub(super) fn own_session_ended(&mut self, now: Duration, peer: &NodeId, session: u64) {
        // A peer whose hello has not arrived may be of this region.
        let own = Some(&self.config.region);
        let of_region = self
            .peers
            .get(peer)
            .is_some_and(|p| p.region.as_ref() == own)
            || !self
                .peers
                .values()
                .any(|p| p.region.is_none() || p.region.as_ref() == own);
        let losses = self.sync_losses();
        let mut again = false;
        for (s, counts) in [
            (Some(&mut self.catching_up), of_region),
            (self.draining.as_mut(), true),
        ] {
            let Some(s) = s else { continue };
            let learned = s.learning.remove(peer).unwrap_or_default();
            let overflowed = s.overflowed.remove(peer);
            if !s.active() || s.peer.is_some() || !counts || !s.counts(session) {
                continue;
            }
            if overflowed {
                again = true;
                continue;
            }
            s.peer = Some(peer.clone());
            s.losses_at_start = losses;
            s.awaiting = learned;
            s.progressed_at = now;
        }
        if again {
            self.next_anti_entropy = self.next_anti_entropy.min(now);
        }
        self.check_settled(now);
    }

    /// A sync message about `doc` from `peer` was handled (`their_heads`:
    /// the heads it named; `None` for the empty "in sync" answer): if a
    /// settlement is with `peer` and this node's session for `doc` is idle,
    /// `doc` is synced. Catching up also takes `doc` as synced once this
    /// node holds every head the peer named: it then has all the peer held
    /// when it wrote, and under steady writes to `doc` the two sessions may
    /// never be idle at once.
    pub(super) fn synced_while_settling(
        &mut self,
        now: Duration,
        peer: &NodeId,
        doc: &DocId,
        their_heads: Option<&[ChangeHash]>,
    ) -> Result<()> {
        let awaits = |s: &Settling| s.peer.as_ref() == Some(peer) && s.awaiting.contains(doc);
        let catching_up = awaits(&self.catching_up);
        if !catching_up && !self.draining.as_ref().is_some_and(awaits) {
            return Ok(());
        }
        let idle = self
            .peers
            .get(peer)
            .and_then(|p| p.syncs.get(doc))
            .is_none_or(|s| s.sent_at.is_none());
        let holds_theirs = match their_heads {
            Some(heads) if catching_up && !idle => self.holds_peer_heads(doc, heads)?,
            _ => false,
        };
        for (s, synced) in [
            (Some(&mut self.catching_up), idle || holds_theirs),
            (self.draining.as_mut(), idle),
        ] {
            let Some(s) = s.filter(|_| synced) else {
                continue;
            };
            if s.peer.as_ref() == Some(peer) && s.awaiting.remove(doc) {
                s.progressed_at = now;
            }
        }
        Ok(())
    }

    /// Whether this node holds every change in `heads` of `doc` (all of a
    /// peer's history up to them).
    fn holds_peer_heads(&self, doc: &DocId, heads: &[ChangeHash]) -> Result<bool> {
        match self.holds_all(doc, heads) {
            Ok(holds) => Ok(holds),
            Err(Error::NotFound(_)) => Ok(heads.is_empty()),
            Err(Error::Quarantined { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Ends each settlement whose peer's syncs are all done; starts over
    /// those whose peer went away, stalled or lost syncs meanwhile.
    pub(super) fn check_settled(&mut self, now: Duration) {
        let catch_up = self.look(now, &self.catching_up, true);
        let drain = self.draining.as_ref().map(|d| self.look(now, d, false));
        match catch_up {
            Look::Done => {
                let s = &mut self.catching_up;
                s.done_at = Some(now);
                s.learning.clear();
                s.overflowed.clear();
                tracing::info!(peer = ?s.peer, "caught up");
            }
            Look::StartOver => {
                self.catching_up.start_over();
                self.next_anti_entropy = self.next_anti_entropy.min(now);
            }
            Look::Waiting => {}
        }
        match drain {
            Some(Look::Done) => {
                if let Some(d) = self.draining.as_mut() {
                    d.done_at = Some(now);
                    tracing::info!(peer = ?d.peer, "drained: a peer holds everything this node holds");
                }
            }
            Some(Look::StartOver) => {
                if let Some(d) = self.draining.as_mut() {
                    d.start_over();
                }
                self.drain_restart_due = true;
            }
            _ => {}
        }
    }

    /// Where settlement `s` stands; `by_document`: every document it waits
    /// for is in `awaiting` (catching up), so other syncs with the peer,
    /// which steady writes keep going, do not hold it up.
    fn look(&self, now: Duration, s: &Settling, by_document: bool) -> Look {
        let Some(peer) = s.peer.as_ref().filter(|_| s.active()) else {
            return Look::Waiting;
        };
        let Some(p) = self.peers.get(peer) else {
            return Look::StartOver;
        };
        // Cheap checks first: this runs after every message, and a walk of
        // the peer's sync sessions (up to `max_sync_sessions_per_peer`) is
        // left for when nothing else is outstanding.
        if !by_document && (!p.queue.is_empty() || p.bundles.pending() > 0) {
            return Look::Waiting;
        }
        let syncing = || p.syncs.values().any(|st| st.sent_at.is_some());
        if !s.awaiting.is_empty() {
            let stalled = now >= s.progressed_at + self.config.retry_after * STALL_ROUNDS;
            return if stalled && !syncing() {
                Look::StartOver
            } else {
                Look::Waiting
            };
        }
        if !by_document && syncing() {
            return Look::Waiting;
        }
        if self.sync_losses() > s.losses_at_start {
            return Look::StartOver;
        }
        Look::Done
    }

    /// A drain that started over gets fresh sessions (called with a source
    /// of randomness, from `handle_timeout`).
    pub(super) fn restart_drain_if_due(&mut self, now: Duration, random: &mut dyn Random) {
        if std::mem::take(&mut self.drain_restart_due) {
            if let Some(d) = self.draining.as_mut() {
                d.sessions = Some(BTreeSet::new());
            }
            self.drain_sessions(now, random);
        }
    }

    fn sync_losses(&self) -> u64 {
        self.stats.syncs_dropped + self.stats.syncs_abandoned
    }
}
