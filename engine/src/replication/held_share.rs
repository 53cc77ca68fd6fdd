//! Each peer's share of the changes held for missing dependencies.
//!
//! The engine bounds held changes per document and in total
//! ([`EngineConfig::max_held_changes`](crate::EngineConfig)), but a total is
//! shared: one member sending changes whose dependencies never come (made
//! up, or withheld) could fill it, and every other peer's out-of-order
//! changes would then be refused until repair. [`HeldShares`] charges each
//! new held change to the peer that sent it and gives each peer at most
//! [`ReplicatorConfig::max_held_changes_per_peer`](super::ReplicatorConfig)
//! changes and
//! [`ReplicatorConfig::max_held_bytes_per_peer`](super::ReplicatorConfig)
//! bytes; beyond its share a peer's changes are refused (left to sync, like
//! those over a limit), whatever room the engine has.
//!
//! A charge is lifted when its document's held changes shrink: to what the
//! document still holds, and to nothing once it holds none. Charges are not
//! stored: after a restart, held changes count against the engine's limits
//! only. A peer's charge may outlive its changes when another peer's changes
//! to the same document stay held (the charge then shrinks only to that
//! count); it is never larger than what the document holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::doc_id::DocId;
use crate::held::HeldBudget;

use super::ids::NodeId;
use super::progress::MAX_TRACKED_NODES;

/// One peer's charges.
#[derive(Debug, Default)]
struct Share {
    /// Per document: changes and bytes charged.
    docs: HashMap<DocId, (usize, usize)>,
    /// The sums over `docs`.
    total: (usize, usize),
}

/// Held changes charged to the peers that sent them.
#[derive(Debug)]
pub(crate) struct HeldShares {
    /// Changes and bytes one peer may have held.
    max: (usize, usize),
    peers: BTreeMap<NodeId, Share>,
    /// For each document with charges, the peers charged.
    by_doc: HashMap<DocId, BTreeSet<NodeId>>,
}

impl HeldShares {
    /// Shares of at most `max_changes` changes and `max_bytes` bytes.
    pub(crate) fn new(max_changes: usize, max_bytes: usize) -> HeldShares {
        HeldShares {
            max: (max_changes, max_bytes),
            peers: BTreeMap::new(),
            by_doc: HashMap::new(),
        }
    }

    /// What `peer` may still have held. A peer not charged yet when
    /// [`MAX_TRACKED_NODES`] peers are may hold nothing (its changes wait
    /// for sync from a peer that delivers them in order).
    pub(crate) fn budget(&self, peer: &NodeId) -> HeldBudget {
        let used = match self.peers.get(peer) {
            Some(share) => share.total,
            None if self.peers.len() >= MAX_TRACKED_NODES => self.max,
            None => (0, 0),
        };
        HeldBudget {
            changes: self.max.0.saturating_sub(used.0),
            bytes: self.max.1.saturating_sub(used.1),
        }
    }

    /// The smallest budget of `peers` (for changes several sent together).
    pub(crate) fn least_budget<'a>(
        &self,
        peers: impl IntoIterator<Item = &'a NodeId>,
    ) -> HeldBudget {
        peers.into_iter().map(|p| self.budget(p)).fold(
            HeldBudget {
                changes: self.max.0,
                bytes: self.max.1,
            },
            |a, b| HeldBudget {
                changes: a.changes.min(b.changes),
                bytes: a.bytes.min(b.bytes),
            },
        )
    }

    /// Charges `held` (changes, bytes) newly held in `doc` to `peer`.
    pub(crate) fn charge(&mut self, peer: &NodeId, doc: &DocId, held: (usize, usize)) {
        if held.0 == 0 {
            return;
        }
        if !self.peers.contains_key(peer) && self.peers.len() >= MAX_TRACKED_NODES {
            return;
        }
        let share = self.peers.entry(peer.clone()).or_default();
        let entry = share.docs.entry(doc.clone()).or_default();
        entry.0 += held.0;
        entry.1 += held.1;
        share.total.0 += held.0;
        share.total.1 += held.1;
        self.by_doc
            .entry(doc.clone())
            .or_default()
            .insert(peer.clone());
    }

    /// `doc` holds `held` changes now: no peer's charge for it stays above
    /// that (bytes shrink in proportion).
    pub(crate) fn settle(&mut self, doc: &DocId, held: usize) {
        let Some(charged) = self.by_doc.get(doc) else {
            return;
        };
        let mut cleared = Vec::new();
        for peer in charged {
            let Some(share) = self.peers.get_mut(peer) else {
                continue;
            };
            let Some(entry) = share.docs.get_mut(doc) else {
                continue;
            };
            if entry.0 <= held {
                continue;
            }
            let bytes = entry.1 * held / entry.0;
            share.total.0 -= entry.0 - held;
            share.total.1 -= entry.1 - bytes;
            *entry = (held, bytes);
            if held == 0 {
                share.docs.remove(doc);
                cleared.push(peer.clone());
            }
        }
        for peer in cleared {
            if self.peers.get(&peer).is_some_and(|s| s.docs.is_empty()) {
                self.peers.remove(&peer);
            }
        }
        if held == 0 {
            self.by_doc.remove(doc);
        }
    }

    /// Changes charged to `peer` now.
    #[cfg(test)]
    fn charged(&self, peer: &NodeId) -> usize {
        self.peers.get(peer).map_or(0, |s| s.total.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap_or_else(|e| panic!("{e}"))
    }

    fn doc(name: &str) -> DocId {
        DocId::new(name).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_peer_spends_its_share_and_gets_it_back_as_changes_release() {
        let mut shares = HeldShares::new(10, 1000);
        let (p, q) = (node("p"), node("q"));
        shares.charge(&p, &doc("d1"), (6, 600));
        shares.charge(&p, &doc("d2"), (3, 30));
        assert_eq!(
            shares.budget(&p),
            HeldBudget {
                changes: 1,
                bytes: 370
            }
        );
        assert_eq!(shares.budget(&q).changes, 10);
        assert_eq!(shares.least_budget([&p, &q]).changes, 1);
        // d1 holds 2 now (some released): p's charge shrinks to 2.
        shares.settle(&doc("d1"), 2);
        assert_eq!(shares.charged(&p), 5);
        assert_eq!(shares.budget(&p).bytes, 1000 - 200 - 30);
        shares.settle(&doc("d1"), 0);
        shares.settle(&doc("d2"), 0);
        assert_eq!(shares.charged(&p), 0);
        assert!(shares.peers.is_empty() && shares.by_doc.is_empty());
    }

    #[test]
    fn the_table_of_peers_is_bounded() {
        let mut shares = HeldShares::new(10, 1000);
        for i in 0..MAX_TRACKED_NODES {
            shares.charge(&node(&format!("p{i}")), &doc("d"), (1, 1));
        }
        let late = node("late");
        assert_eq!(shares.budget(&late).changes, 0);
        shares.charge(&late, &doc("d"), (1, 1));
        assert_eq!(shares.peers.len(), MAX_TRACKED_NODES);
    }
}
