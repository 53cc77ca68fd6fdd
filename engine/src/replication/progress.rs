//! Progress tracking: which heads of each document each peer is known to
//! hold, learned from its deltas, its sync messages and its acknowledgements.
//!
//! The record is the latest report per peer and document. Reports travel on
//! different paths (gossip, sync, ack) and may arrive out of order, so a
//! record can briefly show older heads than the peer holds; it never shows
//! heads the peer did not report. Later issues derive lag metrics and session
//! guarantees from it.

use std::collections::BTreeMap;

use automerge::ChangeHash;

use crate::doc_id::DocId;

use super::ids::{NodeId, Region};

/// Documents tracked per peer. Reports for further documents are not
/// recorded (counted in [`Progress::untracked`]); the peer's next report for
/// a tracked document still updates it.
pub const MAX_TRACKED_DOCS_PER_PEER: usize = 1_000_000;

/// What one peer is known to hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerProgress {
    /// The peer's region, once its hello arrived.
    pub region: Option<Region>,
    /// Latest reported heads per document.
    pub docs: BTreeMap<DocId, Vec<ChangeHash>>,
}

/// Progress of every peer this node has heard from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    peers: BTreeMap<NodeId, PeerProgress>,
    untracked: u64,
}

impl Progress {
    /// Records the peer's region.
    pub fn set_region(&mut self, peer: &NodeId, region: &Region) {
        self.peers.entry(peer.clone()).or_default().region = Some(region.clone());
    }

    /// Records that `peer` holds `heads` of `doc`.
    pub fn record(&mut self, peer: &NodeId, doc: &DocId, heads: Vec<ChangeHash>) {
        let entry = self.peers.entry(peer.clone()).or_default();
        if let Some(known) = entry.docs.get_mut(doc) {
            *known = heads;
        } else if entry.docs.len() < MAX_TRACKED_DOCS_PER_PEER {
            entry.docs.insert(doc.clone(), heads);
        } else {
            self.untracked += 1;
        }
    }

    /// The latest heads `peer` reported for `doc`.
    pub fn known_heads(&self, peer: &NodeId, doc: &DocId) -> Option<&[ChangeHash]> {
        self.peers.get(peer)?.docs.get(doc).map(Vec::as_slice)
    }

    /// Every peer's progress, in node id order.
    pub fn peers(&self) -> impl Iterator<Item = (&NodeId, &PeerProgress)> {
        self.peers.iter()
    }

    /// Peers of `region` that reported exactly `heads` for `doc`.
    pub fn holders_in<'a>(
        &'a self,
        region: &'a Region,
        doc: &'a DocId,
        heads: &'a [ChangeHash],
    ) -> impl Iterator<Item = &'a NodeId> + 'a {
        self.peers
            .iter()
            .filter(move |(_, p)| p.region.as_ref() == Some(region))
            .filter(move |(_, p)| p.docs.get(doc).is_some_and(|h| h == heads))
            .map(|(id, _)| id)
    }

    /// Reports not recorded because a peer's table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }
}
