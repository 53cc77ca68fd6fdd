//! Range-based set reconciliation sessions with each peer (see
//! [`reconcile`](crate::replication::reconcile) for the algorithm): started
//! on connect and every anti-entropy round, answered, and turned into
//! document syncs for the differences found.

use super::*;

impl Replicator {
    pub(super) fn on_reconcile(
        &mut self,
        now: Duration,
        from: &NodeId,
        r: Reconcile,
    ) -> Result<Verdict> {
        if !self.peers.contains_key(from) {
            return Ok(Verdict::Ignore);
        }
        let processed = reconcile::process(&self.items, &r.ranges, &self.config.reconcile);
        self.stats.reconcile_differences += processed.to_sync.len() as u64;
        // Pending documents the peer turned out to hold as they are here.
        let shows_equal = !processed.equal_ranges.is_empty() || !processed.equal_docs.is_empty();
        let pending = if shows_equal {
            self.progress.pending_docs(from)
        } else {
            Vec::new()
        };
        for doc in pending {
            if processed.shows_equal(&doc) {
                let ours = match self.engine.heads(&doc) {
                    Ok(heads) => heads,
                    Err(Error::Quarantined { .. }) => continue,
                    Err(e) => return Err(e),
                };
                self.progress
                    .record(now, from, &doc, ours.clone(), Some(&ours));
            }
        }
        for doc in &processed.to_sync {
            self.enqueue_sync(from, doc);
        }
        let Some(p) = self.peer_mut(from) else {
            return Ok(Verdict::Ignore);
        };
        tracing::debug!(
            peer = %from,
            session = r.session,
            received = r.ranges.len(),
            reply = processed.reply.len(),
            differing = processed.to_sync.len(),
            ours = p.reconcile_sent_at.is_some_and(|(id, _)| id == r.session),
            "reconciliation message"
        );
        if p.reconcile_sent_at.is_some_and(|(id, _)| id == r.session) {
            // Our own session: wait for the answer to this reply, if it asks
            // for one; otherwise the session is over.
            p.reconcile_sent_at =
                reconcile::expects_answer(&processed.reply).then_some((r.session, now));
        }
        if !processed.reply.is_empty() {
            let msg = Message::Reconcile(Reconcile {
                session: r.session,
                ranges: processed.reply,
            });
            self.send(from, msg);
        }
        self.start_queued(now, from)?;
        Ok(Verdict::Accept)
    }

    pub(super) fn start_reconcile(
        &mut self,
        now: Duration,
        peer: &NodeId,
        random: &mut dyn Random,
    ) {
        let session = random.next_u64();
        let Some(p) = self.peer_mut(peer) else {
            return;
        };
        if p.reconcile_sent_at.is_some() {
            return;
        }
        p.reconcile_sent_at = Some((session, now));
        let ranges = reconcile::initiate(&self.items, &self.config.reconcile);
        self.send(peer, Message::Reconcile(Reconcile { session, ranges }));
    }
}
