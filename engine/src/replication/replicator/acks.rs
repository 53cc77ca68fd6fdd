//! Acknowledgements: what this node tells peers it holds (batched, flushed
//! every `ack_interval`), and what peers tell it, recorded as progress
//! within the bounds one message may cost.

use super::*;

/// Documents per peer whose unconfirmed writes one anti-entropy round asks
/// the peer about (see [`Replicator::confirm_writes`]); the next round asks
/// about the rest.
pub const MAX_CONFIRMATIONS_PER_PEER: usize = 256;

impl Replicator {
    /// An acknowledgement: what the peer holds of this node's documents.
    pub(super) fn on_ack(&mut self, now: Duration, from: &NodeId, a: Ack) -> Result<Verdict> {
        if a.entries.is_empty() {
            // The answer to our hello (acknowledgements of documents are
            // never empty): the first round trip to the peer.
            let hello = self.peers.get_mut(from).and_then(|p| p.hello_at.take());
            if let Some(sent) = hello {
                self.time_round_trip(from, sent, now);
            }
            return Ok(Verdict::Accept);
        }
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
        let bundled = self
            .peers
            .get(from)
            .is_some_and(|p| p.bundles.pending() > 0);
        for e in a.entries {
            if bundled {
                self.bundle_acknowledged(from, &e.doc);
            }
            let Some(digest) = self.items.get(&e.doc) else {
                continue;
            };
            let theirs = e.heads.to_vec();
            let full = crate::layout::heads_digest(&theirs);
            let current = full[..digest.len()] == digest[..];
            if !self.unacked.is_empty() {
                let samples = self.unacked.acked(from, &e.doc, &theirs, current);
                for sent in samples {
                    self.time_round_trip(from, sent, now);
                }
            }
            if current {
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
        if bundled {
            self.pump_bundles(now, from)?;
        }
        Ok(Verdict::Accept)
    }

    /// Records a report of `peer`, comparing it with this node's heads
    /// (`ours`, or read from the engine if not given and the document is here).
    pub(super) fn record_progress(
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
        if let Some(target) = self.progress.record(now, peer, doc, heads.clone(), ours) {
            // The report leaves out our latest write's heads; it may still
            // hold them, under later changes.
            let covers = match self.engine.heads_cover(doc, &heads, &target) {
                Ok(covers) => covers,
                Err(Error::NotFound(_) | Error::Deleted(_) | Error::Quarantined { .. }) => false,
                Err(e) => return Err(e),
            };
            if covers {
                self.progress.confirm(now, peer, doc);
            }
        }
        Ok(())
    }

    /// Writes of this node a connected peer has not confirmed within
    /// `retry_after` (their acknowledgement was lost, or the peer got them
    /// by a repair whose report went elsewhere), asked about once per
    /// anti-entropy round: a document sync with the peer. Its answer
    /// confirms them, or carries what the peer lacks.
    pub(super) fn confirm_writes(&mut self, now: Duration) -> Result<()> {
        let Some(before) = now.checked_sub(self.config.retry_after) else {
            return Ok(());
        };
        for (peer, docs) in self
            .progress
            .unconfirmed(before, MAX_CONFIRMATIONS_PER_PEER)
        {
            for doc in &docs {
                self.enqueue_sync(&peer, doc);
            }
            self.stats.confirmations += docs.len() as u64;
            self.start_queued(now, &peer)?;
        }
        Ok(())
    }

    /// Peers came back: connected again (a node that restarted, a
    /// connection that was lost), or silenced and heard from again (a cut
    /// that healed). What this node wrote meanwhile did not reach them:
    /// every write they are marked for, however recent, is asked about
    /// now (a document sync each, as at a round) rather than at the next
    /// round.
    pub(super) fn confirm_heard_again(&mut self, now: Duration) -> Result<()> {
        for peer in std::mem::take(&mut self.heard_again) {
            let docs = self
                .progress
                .unconfirmed_by(&peer, None, MAX_CONFIRMATIONS_PER_PEER);
            if docs.is_empty() {
                continue;
            }
            for doc in &docs {
                self.enqueue_sync(&peer, doc);
            }
            self.stats.confirmations += docs.len() as u64;
            self.start_queued(now, &peer)?;
        }
        Ok(())
    }

    pub(super) fn queue_ack(&mut self, origin: &NodeId, doc: &DocId, heads: &[ChangeHash]) {
        if let Some(p) = self.peers.get_mut(origin) {
            if p.acks.len() < MAX_ACK_ENTRIES || p.acks.contains_key(doc) {
                p.acks.insert(doc.clone(), Heads::new(heads));
            }
        }
        self.note_depths(origin);
    }

    pub(super) fn flush_acks(&mut self) {
        let pending: Vec<(NodeId, BTreeMap<DocId, Heads>)> = self
            .peers
            .iter_mut()
            .filter(|(_, p)| !p.acks.is_empty())
            .map(|(id, p)| (id.clone(), std::mem::take(&mut p.acks)))
            .collect();
        for (peer, acks) in pending {
            self.send_acks(&peer, acks);
        }
    }

    /// Sends at once what is pending for the peers whose pushes were
    /// applied in this call: they wait for it before sending again.
    pub(super) fn flush_urgent_acks(&mut self) {
        for peer in std::mem::take(&mut self.acks_now) {
            let Some(p) = self.peers.get_mut(&peer) else {
                continue;
            };
            let acks = std::mem::take(&mut p.acks);
            if !acks.is_empty() {
                self.send_acks(&peer, acks);
            }
        }
    }

    pub(super) fn send_acks(&mut self, peer: &NodeId, acks: BTreeMap<DocId, Heads>) {
        let entries = acks
            .into_iter()
            .map(|(doc, heads)| AckEntry { doc, heads })
            .collect();
        self.send(peer, Message::Ack(Ack { entries }));
    }

    pub(super) fn holds_all(&self, doc: &DocId, heads: &[ChangeHash]) -> Result<bool> {
        self.engine
            .read(doc, |d| d.get_missing_deps(heads).is_empty())
            .or_else(|e| match e {
                Error::Deleted(_) => Ok(self.engine.heads(doc)?.iter().all(|h| heads.contains(h))),
                e => Err(e),
            })
    }
}
