//! Documents asked of peers for a client of this node
//! ([`Replicator::fetch`]): which asked peers have not yet said they lack
//! it, so that "no peer has it" is known as soon as the last one answers
//! rather than when the client's wait runs out.

use super::*;

/// Documents being asked for at once; asking for another forgets the one
/// first in id order (its client then waits out its own deadline).
pub const MAX_PENDING_FETCHES: usize = 256;

/// The asked peers of each document being fetched, and the documents every
/// asked peer said it lacks.
#[derive(Default)]
pub(super) struct Fetches {
    asked: BTreeMap<DocId, BTreeSet<NodeId>>,
    misses: Vec<DocId>,
}

impl Fetches {
    /// `doc` is being asked of `peers`.
    pub(super) fn start(&mut self, doc: &DocId, peers: BTreeSet<NodeId>) {
        if peers.is_empty() {
            return;
        }
        if !self.asked.contains_key(doc) && self.asked.len() >= MAX_PENDING_FETCHES {
            self.asked.pop_first();
        }
        self.asked.insert(doc.clone(), peers);
    }

    /// `doc` is here now.
    pub(super) fn found(&mut self, doc: &DocId) {
        self.asked.remove(doc);
    }

    /// `peer` said it lacks `doc` too.
    pub(super) fn lacks(&mut self, peer: &NodeId, doc: &DocId) {
        if let Some(peers) = self.asked.get_mut(doc) {
            peers.remove(peer);
            if peers.is_empty() {
                self.asked.remove(doc);
                self.miss(doc.clone());
            }
        }
    }

    /// `peer` disconnected: it will not answer.
    pub(super) fn forget_peer(&mut self, peer: &NodeId) {
        let mut missed = Vec::new();
        self.asked.retain(|doc, peers| {
            peers.remove(peer);
            if peers.is_empty() {
                missed.push(doc.clone());
            }
            !peers.is_empty()
        });
        for doc in missed {
            self.miss(doc);
        }
    }

    fn miss(&mut self, doc: DocId) {
        if self.misses.len() < MAX_PENDING_FETCHES {
            self.misses.push(doc);
        }
    }

    /// The documents every asked peer lacked, since the last call.
    pub(super) fn take_misses(&mut self) -> Vec<DocId> {
        std::mem::take(&mut self.misses)
    }

    /// Whether `doc` is being asked for.
    pub(super) fn pending(&self, doc: &DocId) -> bool {
        self.asked.contains_key(doc)
    }
}

impl Replicator {
    /// Asks connected peers for `doc`, which a client of this node wants and
    /// this node may lack: queues a sync of it with at most `max_peers` of
    /// them: up to half of them (at least one) from this node's region, the
    /// rest one per other region, each in node id order. A peer that has it
    /// sends it; one that lacks it answers that it has nothing, and once
    /// every asked peer did, [`Replicator::take_fetch_misses`] names the
    /// document. Returns how many peers were asked.
    pub fn fetch(&mut self, now: Duration, doc: &DocId, max_peers: usize) -> Result<usize> {
        let own = &self.config.region;
        let region_of = |peer: &NodeId| self.progress.peer(peer).and_then(|p| p.region.clone());
        let mut chosen: Vec<NodeId> = Vec::new();
        let mut regions_seen: BTreeSet<Option<Region>> = BTreeSet::new();
        let (local, remote): (Vec<&NodeId>, Vec<&NodeId>) = self
            .peers
            .keys()
            .partition(|p| region_of(p).as_ref() == Some(own));
        chosen.extend(local.into_iter().take((max_peers / 2).max(1)).cloned());
        for peer in remote {
            if regions_seen.insert(region_of(peer)) {
                chosen.push(peer.clone());
            }
        }
        chosen.truncate(max_peers);
        self.fetches.start(doc, chosen.iter().cloned().collect());
        for peer in &chosen {
            self.enqueue_sync(peer, doc);
            self.start_queued(now, peer)?;
        }
        Ok(chosen.len())
    }

    /// Documents asked for with [`Replicator::fetch`] that every asked peer
    /// said it lacks (or that every asked peer disconnected before
    /// answering), since the last call.
    pub fn take_fetch_misses(&mut self) -> Vec<DocId> {
        self.fetches.take_misses()
    }

    /// A sync answer from `from` about `doc` arrived: if `doc` is being
    /// fetched, it is here now (`we_hold`), or `from` lacks it too
    /// (`they_lack`).
    pub(super) fn fetch_answered(
        &mut self,
        from: &NodeId,
        doc: &DocId,
        they_lack: bool,
    ) -> Result<()> {
        if !self.fetches.pending(doc) {
            return Ok(());
        }
        let we_hold = match self.engine.heads(doc) {
            Ok(heads) => !heads.is_empty(),
            Err(Error::NotFound(_)) => false,
            Err(e) => return Err(e),
        };
        if we_hold {
            self.fetches.found(doc);
        } else if they_lack {
            self.fetches.lacks(from, doc);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeId {
        NodeId::new(n).expect("node id")
    }

    #[test]
    fn a_miss_once_every_asked_peer_lacks_it_or_left() {
        let mut f = Fetches::default();
        let (a, b) = (DocId::new("a").expect("id"), DocId::new("b").expect("id"));
        f.start(&a, [node("p"), node("q")].into_iter().collect());
        f.start(&b, [node("p")].into_iter().collect());
        f.lacks(&node("p"), &a);
        assert!(f.take_misses().is_empty(), "q has not answered");
        f.forget_peer(&node("p"));
        assert_eq!(f.take_misses(), vec![b.clone()]);
        f.lacks(&node("q"), &a);
        assert_eq!(f.take_misses(), vec![a.clone()]);
        f.start(&a, [node("q")].into_iter().collect());
        f.found(&a);
        f.lacks(&node("q"), &a);
        assert!(f.take_misses().is_empty(), "found, not missed");
    }
}
