//! The delta path: local commits gathered into deltas (announced instead,
//! to be pulled by sync, when too large to gossip), and received deltas and
//! announcements applied, batched per document, with what they newly held
//! charged to their senders' shares.

use super::*;
use crate::audit::Actor;

/// Local commits to one document gathered by
/// [`Replicator::handle_local_commits`] into one delta.
pub(super) struct Burst {
    pub(super) doc: DocId,
    pub(super) changes: Vec<Vec<u8>>,
    /// Total bytes of `changes`.
    pub(super) bytes: usize,
    /// The heads after the last commit.
    pub(super) heads: Vec<ChangeHash>,
}

/// `changes` cut, in order, into runs that fit one delta: at most
/// [`MAX_CHANGES_PER_DELTA`] changes and half of [`MAX_GOSSIP_BYTES`] of
/// change bytes each, except that a single larger change is a run of its own.
/// No changes make one empty run (a delta that only reports heads).
pub(super) fn delta_parts(changes: Vec<Vec<u8>>) -> Vec<Vec<Vec<u8>>> {
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

/// A delta waiting in [`Replicator::handle_messages`] for the rest of its
/// document's batch: the index of its verdict, its sender, the delta.
pub(super) type BatchedDelta = (usize, NodeId, Delta);

impl Replicator {
    /// A local write committed (durably) `changes` to `doc` at `now`,
    /// leaving `heads`. Publishes them as deltas of at most
    /// [`MAX_CHANGES_PER_DELTA`] changes and half of [`MAX_GOSSIP_BYTES`] of
    /// change bytes each, in the order given (a client may hand over more
    /// than one delta holds); each carries `heads`, which the origin holds
    /// once it committed them all. A write with a change too large to
    /// gossip on its own is announced instead, and pulled. With
    /// [`Dissemination::Regions`], the parts are pushed instead (see the
    /// `push` module). Every known peer has the document pending until it
    /// confirms these heads.
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
            .local_change(now, doc, heads, changes.len() as u64);
        if self.config.dissemination == Dissemination::Regions {
            // Direct messages take a part of any size up to a frame, so
            // nothing is announced.
            for part in delta_parts(changes) {
                if !part.is_empty() {
                    self.push_local(now, doc, part.into_iter().map(Bytes).collect(), heads);
                }
            }
            return;
        }
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

    pub(super) fn on_delta(&mut self, now: Duration, from: &NodeId, d: Delta) -> Result<Verdict> {
        if d.origin == self.config.node {
            return Ok(Verdict::Ignore);
        }
        let changes: Vec<Vec<u8>> = d.changes.into_iter().map(|b| b.0).collect();
        let writer = self
            .writer
            .within_held_budget(self.held_shares.budget(&d.origin))
            .acting_as(Actor::Peer(from.as_str().to_string()));
        let (outcome, new) = match writer.apply_peer_changes(&d.doc, &changes) {
            Ok(a) => (a.outcome, a.new),
            Err(e) if is_bad_change(&e) => return Ok(self.reject(from, rejection(&e))),
            Err(e) => return Err(e),
        };
        self.claim_region(now, &d.origin, &d.region);
        self.stats.delta_changes_applied += outcome.applied as u64;
        self.account_held_from(&d.doc, &outcome, &d.origin);
        self.applied(&d.doc, &outcome);
        let ours = (!outcome.heads.is_empty()).then_some(outcome.heads.as_slice());
        // A write of ours this report leaves unconfirmed waits for the
        // origin's acknowledgement or a confirmation round.
        let _ = self
            .progress
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
    pub(super) fn on_deltas(
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
            let mut senders: Vec<&str> = run.iter().map(|(_, from, _)| from.as_str()).collect();
            senders.sort_unstable();
            senders.dedup();
            self.writer
                .within_held_budget(budget)
                .acting_as(Actor::Peer(senders.join(",")))
                .apply_peer_changes(doc, &changes)
        };
        let (outcome, new, held) = match result {
            Ok(a) => (a.outcome, a.new, a.held),
            Err(e) if is_bad_change(&e) => {
                for (i, from, d) in run {
                    verdicts[i] = self.on_delta(now, &from, d)?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.stats.delta_changes_applied += outcome.applied as u64;
        // Each origin is charged with the changes of its own deltas that
        // are held now (the run as a whole stayed within the smallest
        // remaining share).
        let mut charges: BTreeMap<NodeId, (usize, usize)> = BTreeMap::new();
        let mut at = 0;
        for (_, _, d) in &run {
            for (k, change) in d.changes.iter().enumerate() {
                if held.get(at + k) == Some(&true) {
                    let c = charges.entry(d.origin.clone()).or_default();
                    c.0 += 1;
                    c.1 += change.0.len();
                }
            }
            at += d.changes.len();
        }
        self.account_held(doc, &outcome, &charges);
        self.applied(doc, &outcome);
        let ours = (!outcome.heads.is_empty()).then_some(outcome.heads.as_slice());
        for (_, _, d) in &run {
            self.claim_region(now, &d.origin, &d.region);
            let _ = self
                .progress
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

    pub(super) fn on_announce(
        &mut self,
        now: Duration,
        from: &NodeId,
        a: Announce,
    ) -> Result<Verdict> {
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

    /// Changes from `sources` were applied to `doc` at `now` (or none, if
    /// `outcome` says so): update the document's item and the peers'
    /// pending marks.
    /// Counts what peers' changes to `doc` held and refused, charges each
    /// sender with what it newly held (changes, bytes), and lifts charges
    /// the document no longer holds.
    pub(super) fn account_held(
        &mut self,
        doc: &DocId,
        outcome: &crate::ApplyOutcome,
        charges: &BTreeMap<NodeId, (usize, usize)>,
    ) {
        self.stats.held_refused += outcome.refused as u64;
        self.stats.held_budget_refused += outcome.over_budget as u64;
        for (peer, held) in charges {
            self.held_shares.charge(peer, doc, *held);
        }
        self.held_shares.settle(doc, outcome.held);
    }

    /// Applies `changes` to `doc` sent directly by `from`: within its held
    /// budget, audited as its changes, durable at the call's end.
    pub(super) fn apply_from_peer(
        &self,
        from: &NodeId,
        doc: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<crate::received::PeerApplied> {
        self.writer
            .within_held_budget(self.held_shares.budget(from))
            .acting_as(Actor::Peer(from.as_str().to_string()))
            .apply_peer_changes(doc, changes)
    }

    /// [`Replicator::account_held`] for changes from one sender.
    pub(super) fn account_held_from(
        &mut self,
        doc: &DocId,
        outcome: &crate::ApplyOutcome,
        sender: &NodeId,
    ) {
        let charges = BTreeMap::from([(sender.clone(), outcome.newly_held)]);
        self.account_held(doc, outcome, &charges);
    }

    /// Changes of peers were applied to `doc`: it is an item with its new
    /// heads. (They mark no peer pending: lag is kept for own writes.)
    pub(super) fn applied(&mut self, doc: &DocId, outcome: &crate::ApplyOutcome) {
        if outcome.applied == 0 {
            return;
        }
        // Only documents the engine holds are items (not held changes).
        self.items
            .insert(doc.clone(), &crate::layout::heads_digest(&outcome.heads));
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
