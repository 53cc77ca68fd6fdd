//! What the networking task tells clients about replication progress:
//! writes waiting for other regions, and lag per peer and per region.

use std::collections::{BTreeMap, BTreeSet};

use causeway_engine::automerge::ChangeHash;
use causeway_engine::replication::ids::NodeId;
use causeway_engine::DocId;
use tokio::sync::oneshot;

use super::status::{Behind, RegionStatus};
use crate::NodeError;

/// Which other regions a write waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionNeed {
    /// At least this many regions besides the node's own.
    Count(usize),
    /// Every one of these regions.
    Named(BTreeSet<String>),
}

impl RegionNeed {
    /// Whether `regions` (holding the write) are enough.
    pub fn satisfied_by(&self, regions: &BTreeSet<String>) -> bool {
        match self {
            RegionNeed::Count(k) => regions.len() >= *k,
            RegionNeed::Named(names) => names.is_subset(regions),
        }
    }
}

/// A write waiting until other regions hold it.
#[derive(Debug)]
pub struct RegionWaiter {
    /// The document.
    pub doc: DocId,
    /// Its heads after the write.
    pub heads: Vec<ChangeHash>,
    /// Which regions must hold them.
    pub need: RegionNeed,
    /// Answered with the regions holding them once `need` is met (or an
    /// error); dropped by the waiting side when it gives up.
    pub reply: oneshot::Sender<Result<Vec<String>, NodeError>>,
}

/// How far behind one peer is.
#[derive(Debug, Clone)]
pub struct PeerLag {
    /// The peer.
    pub peer: NodeId,
    /// Its region, if known.
    pub region: Option<String>,
    /// How far behind.
    pub behind: Behind,
}

/// Per region, the least behind of its peers.
pub fn region_lags(lags: &[PeerLag]) -> Vec<RegionStatus> {
    let mut regions: BTreeMap<&str, RegionStatus> = BTreeMap::new();
    for l in lags {
        let name = l.region.as_deref().unwrap_or("unknown");
        let r = regions.entry(name).or_insert_with(|| RegionStatus {
            region: name.to_string(),
            peers: 0,
            behind: l.behind,
        });
        r.peers += 1;
        if (l.behind.documents, l.behind.changes) < (r.behind.documents, r.behind.changes) {
            r.behind = l.behind;
        }
    }
    regions.into_values().collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lag(peer: &str, region: &str, documents: u64, changes: u64) -> PeerLag {
        PeerLag {
            peer: NodeId::new(peer).unwrap(),
            region: Some(region.to_string()),
            behind: Behind {
                documents,
                changes,
                lag_seconds: documents as f64,
            },
        }
    }

    #[test]
    fn a_region_is_as_far_behind_as_its_best_peer() {
        let regions = region_lags(&[
            lag("a", "eu", 3, 9),
            lag("b", "eu", 1, 2),
            lag("c", "us", 0, 0),
        ]);
        assert_eq!(regions.len(), 2);
        assert_eq!((regions[0].region.as_str(), regions[0].peers), ("eu", 2));
        assert_eq!(
            (regions[0].behind.documents, regions[0].behind.changes),
            (1, 2)
        );
        assert_eq!(regions[1].behind, Behind::default());
    }

    #[test]
    fn region_needs() {
        let held: BTreeSet<String> = ["us".to_string(), "ap".to_string()].into();
        assert!(RegionNeed::Count(2).satisfied_by(&held));
        assert!(!RegionNeed::Count(3).satisfied_by(&held));
        assert!(RegionNeed::Named(["us".to_string()].into()).satisfied_by(&held));
        assert!(
            !RegionNeed::Named(["sa".to_string(), "us".to_string()].into()).satisfied_by(&held)
        );
    }
}
