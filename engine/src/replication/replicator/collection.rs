//! Garbage collection of deleted documents by causal stability.
//!
//! A deleted document is collected (its history removed, a marker left; see
//! [`collection`](crate::collection)) once
//!
//! 1. the cluster has a membership list ([`Replicator::set_members`]):
//!    without one nobody knows who else may still lack the delete;
//! 2. every other member's latest report for the document names exactly
//!    its tombstone heads: every member holds the delete, and nothing
//!    written after it (a write after the delete recreates the document,
//!    and its heads then differ);
//! 3. the grace period ([`Collection::grace`]) has passed since the delete
//!    was made, by the time in the tombstone change (the deleting node's
//!    clock; a tombstone without a time, from a build that set none, counts
//!    from when this process started).
//!
//! The grace period is what protects against data that comes back from the
//! past: a store restored from a backup taken before the delete, or a node
//! away from the cluster since before it. Such a store may hold the
//! document without its tombstone, and after collection nothing would
//! delete it again. Every store therefore records when it last reconciled
//! with a member ([`Engine::record_contact`]), and a node refuses to start
//! on a store out of contact for longer than the grace period (the
//! operator rebuilds it from its peers instead). A backup taken before a
//! delete is older than the grace period by the time the delete is
//! collected, so its restore is refused the same way.
//!
//! The marker is kept for one more grace period, while peers that have not
//! collected the document yet still reconcile it: it answers them that this
//! node holds the tombstone, so neither sends the history again. Then it is
//! dropped and the document is unknown here.
//!
//! The collector reads [`COLLECTION_PAGE`] metadata records per look, every
//! [`Collection::interval`], so a pass over a large store is spread over
//! many looks and holds nothing in memory beyond its cursor.

use super::*;

/// Metadata records one look reads at most; the next look goes on from
/// where this one stopped.
pub const COLLECTION_PAGE: usize = 1_000;

/// The last contact is written at most this often, or a tenth of the grace
/// period if that is shorter (it is one small record, but written on every
/// look otherwise).
pub const CONTACT_RECORD_INTERVAL: Duration = Duration::from_secs(60);

/// When deleted documents are collected (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collection {
    /// How long after a delete its document may be collected, once every
    /// member holds the delete; also how long a marker outlives it, and
    /// the longest a store may be out of contact and still rejoin. It must
    /// exceed the longest outage a node is to come back from, plus the
    /// clock skew between nodes.
    pub grace: Duration,
    /// Time between looks (each reads [`COLLECTION_PAGE`] records).
    pub interval: Duration,
    /// The wall-clock time (since the Unix epoch) at which the caller's
    /// `now` was zero: tombstones, markers and the last contact carry wall
    /// times.
    pub clock_origin: Duration,
}

/// What the collector found in its last complete pass over the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectionPass {
    /// Deleted documents not collected (waiting for members or for the
    /// grace period).
    pub waiting: u64,
    /// Markers of collected documents.
    pub markers: u64,
}

/// The collector's state.
#[derive(Debug, Default)]
pub(super) struct Collector {
    /// Where the next look starts (exclusive); `None`: at the beginning.
    cursor: Option<DocId>,
    next_at: Duration,
    /// Counts of the pass under way.
    current: CollectionPass,
    /// Counts of the last complete pass.
    pub(super) last: Option<CollectionPass>,
    /// The last contact written, as wall-clock seconds.
    contact_written: Option<u64>,
    /// The reconciliation it was written for (the caller's time).
    contact_heard: Option<Duration>,
}

impl Collector {
    /// When the next look is due (never without a configuration).
    pub(super) fn due(&self, config: Option<&Collection>) -> Option<Duration> {
        config.map(|_| self.next_at)
    }
}

impl Replicator {
    /// Wall-clock seconds since the Unix epoch at `now`.
    fn wall_secs(&self, now: Duration, collection: &Collection) -> u64 {
        (collection.clock_origin + now).as_secs()
    }

    /// Takes one look (see the [module docs](self)) if one is due.
    pub(super) fn collect_garbage(&mut self, now: Duration) -> Result<()> {
        let Some(collection) = self.config.collection else {
            return Ok(());
        };
        if now < self.collector.next_at {
            return Ok(());
        }
        self.collector.next_at = now + collection.interval;
        self.record_contact(&collection)?;
        if self.members.is_none() {
            return Ok(());
        }
        let wall = self.wall_secs(now, &collection);
        let grace = collection.grace.as_secs();
        let started = self.wall_secs(Duration::ZERO, &collection);
        let (page, next) = self
            .engine
            .tombstones(self.collector.cursor.as_ref(), COLLECTION_PAGE)?;
        let mut peers = None;
        for tombstone in page {
            match tombstone.collected_at {
                Some(at) => {
                    // Strictly more: times are whole seconds, rounded down.
                    if wall.saturating_sub(at) > grace
                        && self.writer.forget_marker(&tombstone.doc, at)?
                    {
                        self.stats.markers_forgotten += 1;
                    } else {
                        self.collector.current.markers += 1;
                    }
                }
                None => {
                    let stable = self.stable(&tombstone.doc, &tombstone.heads);
                    if !stable {
                        self.ask_members(now, &tombstone.doc, &tombstone.heads)?;
                    }
                    let deleted_at = match tombstone.deleted_at {
                        Some(t) => Some(t),
                        // Only records written before the time was kept.
                        None if stable => self.engine.deleted_at(&tombstone.doc)?,
                        None => None,
                    };
                    let due = stable
                        && deleted_at
                            .map(|t| if t == 0 { started } else { t })
                            .is_some_and(|t| wall.saturating_sub(t) > grace);
                    if !due {
                        self.collector.current.waiting += 1;
                        continue;
                    }
                    if peers.is_none() {
                        peers = Some(self.engine.sync_state_peers()?);
                    }
                    let peers = peers.as_deref().unwrap_or_default();
                    if self
                        .writer
                        .collect(&tombstone.doc, &tombstone.heads, wall, peers)?
                    {
                        self.items.remove(&tombstone.doc);
                        self.stats.documents_collected += 1;
                        self.collector.current.markers += 1;
                        tracing::debug!(doc = %tombstone.doc, "deleted document collected");
                    } else {
                        self.collector.current.waiting += 1;
                    }
                }
            }
        }
        if next.is_none() {
            self.collector.last = Some(std::mem::take(&mut self.collector.current));
        }
        self.collector.cursor = next;
        Ok(())
    }

    /// Whether every other member's latest report for `doc` names exactly
    /// `heads`.
    fn stable(&self, doc: &DocId, heads: &[ChangeHash]) -> bool {
        let Some(members) = &self.members else {
            return false;
        };
        let mut want = heads.to_vec();
        want.sort_unstable();
        members
            .keys()
            .filter(|m| **m != self.config.node)
            .all(|m| self.reports(m, doc, &want))
    }

    /// Writes the last contact if a member reconciled with this node since
    /// it was last written, and the record is older than
    /// [`CONTACT_RECORD_INTERVAL`].
    fn record_contact(&mut self, collection: &Collection) -> Result<()> {
        let members = self.members.as_ref();
        let latest = self
            .peers
            .iter()
            .filter(|(id, _)| members.is_none_or(|m| m.contains_key(*id)))
            .filter_map(|(_, p)| p.reconciled_at)
            .max();
        let Some(latest) = latest.filter(|at| Some(*at) > self.collector.contact_heard) else {
            return Ok(());
        };
        let wall = self.wall_secs(latest, collection);
        let every = CONTACT_RECORD_INTERVAL.min(collection.grace / 10).as_secs();
        let due = self
            .collector
            .contact_written
            .is_none_or(|at| wall.saturating_sub(at) >= every);
        if due {
            self.engine.record_contact(wall)?;
            self.collector.contact_written = Some(wall);
            self.collector.contact_heard = Some(latest);
        }
        Ok(())
    }

    /// Asks each connected member whose latest report for `doc` is not
    /// `heads` what it holds: a sync session, answered with its heads.
    /// Members that merely never mentioned a document both hold would
    /// otherwise never report it.
    fn ask_members(&mut self, now: Duration, doc: &DocId, heads: &[ChangeHash]) -> Result<()> {
        let Some(members) = &self.members else {
            return Ok(());
        };
        let mut want = heads.to_vec();
        want.sort_unstable();
        let ask: Vec<NodeId> = members
            .keys()
            .filter(|m| **m != self.config.node && self.peers.contains_key(*m))
            .filter(|m| !self.reports(m, doc, &want))
            .cloned()
            .collect();
        for peer in ask {
            self.stats.collection_asks += 1;
            self.enqueue_sync(&peer, doc);
            self.start_queued(now, &peer)?;
        }
        Ok(())
    }

    /// Whether `member`'s latest report for `doc` is exactly `want`
    /// (sorted).
    fn reports(&self, member: &NodeId, doc: &DocId, want: &[ChangeHash]) -> bool {
        self.progress.known_heads(member, doc).is_some_and(|h| {
            let mut theirs = h.to_vec();
            theirs.sort_unstable();
            theirs == want
        })
    }

    /// What the collector found in its last complete pass (`None`: it has
    /// not finished one, or collection is off).
    pub fn collection_pass(&self) -> Option<CollectionPass> {
        self.collector.last
    }
}
