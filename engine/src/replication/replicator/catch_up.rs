//! Catching up after a start. A node has caught up once a reconciliation
//! session it started with a peer of its own region (with any peer, if no
//! connected peer is of its region, or of a region not known yet, when the
//! session ends) has ended and every document that session found differing
//! has been synced with that peer: those this node syncs (it received the
//! peer's list of them) and those the peer syncs (this node learned of
//! them from the peer's answers), each done once a sync message about it
//! from the peer has been answered and this node's session for it is idle.
//! Until then the node is not ready for clients: one rebuilt on an empty
//! disk or restored from an old backup would otherwise answer 404s and
//! stale documents while it fetches what its region holds. Catching up
//! happens once per start; a later partition does not undo it.
//!
//! If syncs were dropped at the queue bound or given up unanswered, more
//! documents were learned of than [`MAX_CATCH_UP_DOCS`], the peer went
//! away, or the peer synced none of the documents it was awaited for
//! within [`STALL_ROUNDS`] times `retry_after` (it may have dropped them
//! at its own bound), the documents may still be missing, so the node does
//! not count itself caught up: the next anti-entropy round comes at once,
//! and the next session that ends starts the count again.

use super::*;

/// Documents one catch-up waits for the peer to sync; a session that
/// learns of more does not count (the next one, after these are synced,
/// learns of fewer).
pub const MAX_CATCH_UP_DOCS: usize = 100_000;

/// How many `retry_after` intervals catching up waits for the peer to sync
/// one more of the documents it is awaited for before starting over.
pub const STALL_ROUNDS: u32 = 4;

/// Where catching up stands (see the [module docs](self)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// When this node caught up (the core's `now`); `None` while it has
    /// not.
    pub done_at: Option<Duration>,
    /// The peer it is catching up from: the one whose session ended first
    /// while it counts (see the module docs); `None` before.
    pub from: Option<NodeId>,
    /// Documents left: queued or being synced with any peer, and those the
    /// peer it catches up from has yet to sync.
    pub documents_left: usize,
}

/// What catching up remembers between calls.
#[derive(Debug, Clone, Default)]
pub(super) struct CatchingUp {
    done_at: Option<Duration>,
    from: Option<NodeId>,
    /// Syncs dropped and given up when `from` was chosen.
    losses_at_start: u64,
    /// Documents learned to differ from answers in this node's own session
    /// with each peer, while it is under way (the peer syncs them).
    learning: BTreeMap<NodeId, BTreeSet<DocId>>,
    /// Peers whose session learned of more than [`MAX_CATCH_UP_DOCS`].
    overflowed: BTreeSet<NodeId>,
    /// Of those, the ones `from` has yet to sync.
    awaiting: BTreeSet<DocId>,
    /// When `from` was chosen or last synced one of `awaiting`.
    progressed_at: Duration,
}

impl Replicator {
    /// Where catching up stands.
    pub fn catch_up(&self) -> CatchUp {
        let state = &self.catching_up;
        let mut left = state.awaiting.len();
        for (id, p) in &self.peers {
            let ours = state.from.as_ref() == Some(id);
            let counted = |doc: &DocId| ours && state.awaiting.contains(doc);
            left += p.queue.iter().filter(|d| !counted(d)).count();
            left += p
                .syncs
                .iter()
                .filter(|(d, s)| s.sent_at.is_some() && !counted(d))
                .count();
        }
        CatchUp {
            done_at: state.done_at,
            from: state.from.clone(),
            documents_left: left,
        }
    }

    /// Documents a message of this node's own session with `peer` showed
    /// the peer syncs.
    pub(super) fn learned_while_catching_up(&mut self, peer: &NodeId, docs: &[DocId]) {
        let state = &mut self.catching_up;
        if state.done_at.is_some() || docs.is_empty() {
            return;
        }
        let learning = state.learning.entry(peer.clone()).or_default();
        learning.extend(docs.iter().cloned());
        if learning.len() > MAX_CATCH_UP_DOCS {
            state.learning.remove(peer);
            state.overflowed.insert(peer.clone());
        }
    }

    /// A reconciliation session this node started with `peer` ended.
    pub(super) fn own_session_ended(&mut self, now: Duration, peer: &NodeId) {
        let learned = self.catching_up.learning.remove(peer).unwrap_or_default();
        let overflowed = self.catching_up.overflowed.remove(peer);
        let state = &self.catching_up;
        if state.done_at.is_some() || state.from.is_some() {
            return;
        }
        // A peer whose hello has not arrived may be of this region.
        let own = Some(&self.config.region);
        let counts = self
            .peers
            .get(peer)
            .is_some_and(|p| p.region.as_ref() == own)
            || !self
                .peers
                .values()
                .any(|p| p.region.is_none() || p.region.as_ref() == own);
        if !counts {
            return;
        }
        if overflowed {
            self.next_anti_entropy = self.next_anti_entropy.min(now);
            return;
        }
        self.catching_up.from = Some(peer.clone());
        self.catching_up.losses_at_start = self.sync_losses();
        self.catching_up.awaiting = learned;
        self.catching_up.progressed_at = now;
        self.check_caught_up(now);
    }

    /// A sync message about `doc` from `peer` was handled: if `peer` is the
    /// one this node catches up from and this node's session for `doc` is
    /// idle, `doc` is synced.
    pub(super) fn synced_while_catching_up(&mut self, now: Duration, peer: &NodeId, doc: &DocId) {
        if self.catching_up.from.as_ref() != Some(peer) {
            return;
        }
        let idle = self
            .peers
            .get(peer)
            .and_then(|p| p.syncs.get(doc))
            .is_none_or(|s| s.sent_at.is_none());
        if idle && self.catching_up.awaiting.remove(doc) {
            self.catching_up.progressed_at = now;
        }
    }

    /// Ends catching up if everything the chosen peer's session found is
    /// synced; starts over if the peer went away or syncs were lost
    /// meanwhile.
    pub(super) fn check_caught_up(&mut self, now: Duration) {
        let Some(from) = &self.catching_up.from else {
            return;
        };
        if self.catching_up.done_at.is_some() {
            return;
        }
        let Some(p) = self.peers.get(from) else {
            self.start_catching_up_again(now);
            return;
        };
        if !p.queue.is_empty() || p.syncs.values().any(|s| s.sent_at.is_some()) {
            return;
        }
        if !self.catching_up.awaiting.is_empty() {
            let stall = self.config.retry_after * STALL_ROUNDS;
            if now >= self.catching_up.progressed_at + stall {
                self.start_catching_up_again(now);
            }
            return;
        }
        if self.sync_losses() > self.catching_up.losses_at_start {
            self.start_catching_up_again(now);
            return;
        }
        self.catching_up.done_at = Some(now);
        self.catching_up.learning.clear();
        self.catching_up.overflowed.clear();
        tracing::info!(peer = %from, "caught up");
    }

    fn start_catching_up_again(&mut self, now: Duration) {
        self.catching_up.from = None;
        self.catching_up.awaiting.clear();
        self.next_anti_entropy = self.next_anti_entropy.min(now);
    }

    fn sync_losses(&self) -> u64 {
        self.stats.syncs_dropped + self.stats.syncs_abandoned
    }
}
