//! Progress tracking: which heads of each document each peer is known to
//! hold, learned from its deltas, its sync messages, its acknowledgements and
//! reconciliation, and which of this node's own writes a peer has not
//! confirmed yet (replication lag).
//!
//! The record is the latest report per peer and document, with the time it
//! arrived. Reports travel on different paths (gossip, sync, ack) and may
//! arrive out of order, so a record can briefly show older heads than the
//! peer holds; it never shows heads the peer did not report.
//!
//! Lag is kept for this node's own writes only: a node answers for what it
//! wrote, and the nodes it wrote to answer to it. A local commit marks the
//! document *pending* for every known peer from that moment, with the
//! commit's heads as its target (a later commit moves the target and adds
//! to the count, the time stays). A report that includes the target, or
//! that the caller finds covers it by causal history, ends the mark and
//! yields one propagation-delay sample (the time the oldest unconfirmed
//! write waited). Changes applied from peers mark nothing, so the work of a
//! change is one walk over the peers at its origin, not at every replica,
//! and a mark never waits for a report about someone else's change.
//! "Behind" means not known to hold this node's writes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use automerge::ChangeHash;

use crate::doc_id::DocId;

use super::ids::{NodeId, Region};

/// Documents whose reports are kept per peer. Reports for further documents
/// are not recorded (counted in [`Progress::untracked`]).
pub const MAX_TRACKED_DOCS_PER_PEER: usize = 1_000_000;
/// Documents pending per peer (about 100 bytes each). A peer that stays
/// away (or was removed for good) accumulates marks up to this; further
/// documents are not marked (counted in [`Progress::untracked`]), so its
/// documents-behind figure saturates here while its lag in seconds, from
/// the oldest mark, keeps growing.
pub const MAX_PENDING_DOCS_PER_PEER: usize = 100_000;
/// Nodes whose progress is kept. A report from a further node takes the
/// place of the node heard from least recently among those not connected
/// (its reports are forgotten); if every tracked node is connected, the
/// report is not recorded (counted in [`Progress::untracked`]). So nodes
/// that appear once (throwaway identities, departed peers) cannot crowd
/// out the peers this node replicates with. Above the largest cluster the
/// simulator runs (1,000 nodes): a member whose progress is not kept counts
/// as never heard from.
pub const MAX_TRACKED_NODES: usize = 1024;
/// Propagation-delay samples kept until the caller takes them; older ones
/// are dropped (counted in [`Progress::delays_dropped`]).
pub const MAX_DELAY_SAMPLES: usize = 4096;
/// Documents whose reports changed, kept until the caller takes them; past
/// this the set is marked as overflowed and the caller should re-check all.
pub const MAX_TOUCHED_DOCS: usize = 4096;

/// One report: the heads a peer holds, and when this node learnt it (the
/// caller's `now`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The heads.
    pub heads: Vec<ChangeHash>,
    /// When the report arrived.
    pub at: Duration,
}

/// A document this node wrote that a peer has not confirmed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// When the oldest write the peer has not confirmed was committed.
    pub since: Duration,
    /// Changes this node committed since, for the document.
    pub changes: u64,
    /// The heads of this node's latest commit to the document: a report
    /// covering them confirms every write the mark counts.
    pub target: Vec<ChangeHash>,
}

/// What one peer is known to hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerProgress {
    /// The peer's region, once its hello (or a delta it made) arrived.
    pub region: Option<Region>,
    /// Latest report per document.
    pub docs: BTreeMap<DocId, Report>,
    /// Documents with writes of this node it has not confirmed.
    pub pending: BTreeMap<DocId, Pending>,
    /// When this node last heard of it (the caller's `now`).
    pub heard: Duration,
    /// Whether it is connected to this node (then it is never forgotten to
    /// make room).
    pub connected: bool,
    /// The id of the store it announced in its latest hello: its
    /// incarnation. A store restored from a backup, or rebuilt empty, has a
    /// new one (see `backup`).
    pub store: Option<String>,
}

/// How far behind one peer is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Documents with changes the peer is not known to have.
    pub documents: u64,
    /// Those changes.
    pub changes: u64,
    /// Since when the oldest of them is here (`None`: nothing pending).
    pub oldest: Option<Duration>,
}

impl Lag {
    /// Replication lag at `now`: how long the oldest change the peer is not
    /// known to have has been here.
    pub fn seconds(&self, now: Duration) -> f64 {
        self.oldest
            .map_or(0.0, |since| now.saturating_sub(since).as_secs_f64())
    }
}

/// A propagation-delay sample: a peer came to hold this node's heads of a
/// document `delay` after the oldest change it lacked arrived here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delay {
    /// The peer.
    pub peer: NodeId,
    /// Its region, if known.
    pub region: Option<Region>,
    /// The delay.
    pub delay: Duration,
}

/// Progress of every peer this node has heard from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    peers: BTreeMap<NodeId, PeerProgress>,
    untracked: u64,
    forgotten: u64,
    delays: VecDeque<Delay>,
    delays_dropped: u64,
    touched: BTreeSet<DocId>,
    touched_overflow: bool,
}

impl Progress {
    /// The progress of `peer`, heard from at `now`: made if new, in place
    /// of a node heard from less recently if [`MAX_TRACKED_NODES`] are
    /// tracked already; `None` if all of those are connected.
    fn entry(&mut self, now: Duration, peer: &NodeId) -> Option<&mut PeerProgress> {
        if !self.peers.contains_key(peer) && self.peers.len() >= MAX_TRACKED_NODES {
            let stalest = self
                .peers
                .iter()
                .filter(|(_, p)| !p.connected)
                .min_by_key(|(_, p)| p.heard)
                .map(|(id, _)| id.clone());
            let Some(stalest) = stalest else {
                self.untracked += 1;
                return None;
            };
            self.peers.remove(&stalest);
            self.forgotten += 1;
        }
        let p = self.peers.entry(peer.clone()).or_default();
        p.heard = p.heard.max(now);
        Some(p)
    }

    /// Records the region `peer` gave for itself (the caller checked that
    /// the claim comes from `peer`).
    pub fn set_region(&mut self, now: Duration, peer: &NodeId, region: &Region) {
        if let Some(p) = self.entry(now, peer) {
            p.region = Some(region.clone());
        }
    }

    /// Records the store id `peer` announced in its hello at `now`. If it
    /// differs from the one recorded before, the peer's store went back (a
    /// restore from a backup) or started over (a new disk): every report it
    /// made is forgotten, so it is not believed to hold what it may have
    /// lost, and `true` is returned. Its pending marks stay: this node's
    /// writes it never confirmed are still unconfirmed. Writes it confirmed
    /// before are not marked again; reconciliation brings them back to it.
    pub fn set_store(&mut self, now: Duration, peer: &NodeId, store: &str) -> bool {
        let Some(p) = self.entry(now, peer) else {
            return false;
        };
        let renewed = p.store.as_deref().is_some_and(|known| known != store);
        p.store = Some(store.to_string());
        if !renewed {
            return false;
        }
        let docs = std::mem::take(&mut p.docs);
        for doc in docs.keys() {
            self.touch(doc);
        }
        true
    }

    /// Forgets everything about `peer` (it left the cluster): its
    /// reports, its region and the writes of this node it had not
    /// confirmed.
    pub fn forget(&mut self, peer: &NodeId) {
        if let Some(p) = self.peers.remove(peer) {
            for doc in p.docs.keys().chain(p.pending.keys()) {
                self.touch(doc);
            }
        }
    }

    /// `peer` connected at `now`: it keeps its place in the table while
    /// connected.
    pub fn connected(&mut self, now: Duration, peer: &NodeId) {
        if let Some(p) = self.entry(now, peer) {
            p.connected = true;
        }
    }

    /// `peer` disconnected: its place may go to another node.
    pub fn disconnected(&mut self, peer: &NodeId) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.connected = false;
        }
    }

    /// Records that `peer` holds `heads` of `doc`, learnt at `now`. `ours`
    /// are this node's current heads of `doc`, if it holds the document: a
    /// report that includes them, or the pending mark's target, ends the
    /// mark. Returns the target of a mark the report leaves pending, for
    /// the caller to judge by causal history (then [`Progress::confirm`]).
    pub fn record(
        &mut self,
        now: Duration,
        peer: &NodeId,
        doc: &DocId,
        heads: Vec<ChangeHash>,
        ours: Option<&[ChangeHash]>,
    ) -> Option<Vec<ChangeHash>> {
        self.touch(doc);
        let entry = self.entry(now, peer)?;
        let holds_ours = ours.is_some_and(|ours| includes(&heads, ours));
        let target = entry.pending.get(doc).map(|p| p.target.clone());
        let holds_target = target.as_ref().is_some_and(|t| includes(&heads, t));
        let report = Report { heads, at: now };
        let recorded = if let Some(known) = entry.docs.get_mut(doc) {
            *known = report;
            true
        } else if entry.docs.len() < MAX_TRACKED_DOCS_PER_PEER {
            entry.docs.insert(doc.clone(), report);
            true
        } else {
            false
        };
        if !recorded {
            self.untracked += 1;
        }
        if holds_ours || holds_target {
            self.confirm(now, peer, doc);
            return None;
        }
        target
    }

    /// This node committed `changes` changes to `doc` at `now`, giving it
    /// `heads`: every known peer has the document pending until it confirms
    /// them (one walk over the peers, at the origin of a write only).
    pub fn local_change(&mut self, now: Duration, doc: &DocId, heads: &[ChangeHash], changes: u64) {
        for p in self.peers.values_mut() {
            if let Some(pending) = p.pending.get_mut(doc) {
                pending.changes += changes;
                pending.target = heads.to_vec();
            } else if p.pending.len() < MAX_PENDING_DOCS_PER_PEER {
                p.pending.insert(
                    doc.clone(),
                    Pending {
                        since: now,
                        changes,
                        target: heads.to_vec(),
                    },
                );
            } else {
                self.untracked += 1;
            }
        }
    }

    /// Connected peers with documents pending since `before` or earlier
    /// (writes unconfirmed for that long): at most `per_peer` documents
    /// each, in id order.
    pub fn unconfirmed(&self, before: Duration, per_peer: usize) -> Vec<(NodeId, Vec<DocId>)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.connected)
            .filter_map(|(id, _)| {
                let docs = self.unconfirmed_by(id, Some(before), per_peer);
                (!docs.is_empty()).then(|| (id.clone(), docs))
            })
            .collect()
    }

    /// The documents pending for `peer` since `before` or earlier (`None`:
    /// however recent), at most `limit`, in id order.
    pub fn unconfirmed_by(
        &self,
        peer: &NodeId,
        before: Option<Duration>,
        limit: usize,
    ) -> Vec<DocId> {
        let Some(p) = self.peers.get(peer) else {
            return Vec::new();
        };
        p.pending
            .iter()
            .filter(|(_, m)| before.is_none_or(|b| m.since <= b))
            .take(limit)
            .map(|(doc, _)| doc.clone())
            .collect()
    }

    /// Ends the pending mark of `doc` for `peer` (it was found to hold this
    /// node's writes), taking a delay sample.
    pub fn confirm(&mut self, now: Duration, peer: &NodeId, doc: &DocId) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let Some(pending) = p.pending.remove(doc) else {
            return;
        };
        if self.delays.len() >= MAX_DELAY_SAMPLES {
            self.delays.pop_front();
            self.delays_dropped += 1;
        }
        self.delays.push_back(Delay {
            peer: peer.clone(),
            region: p.region.clone(),
            delay: now.saturating_sub(pending.since),
        });
    }

    fn touch(&mut self, doc: &DocId) {
        if self.touched.len() < MAX_TOUCHED_DOCS {
            self.touched.insert(doc.clone());
        } else if !self.touched.contains(doc) {
            self.touched_overflow = true;
        }
    }

    /// The latest report of `peer` for `doc`.
    pub fn report(&self, peer: &NodeId, doc: &DocId) -> Option<&Report> {
        self.peers.get(peer)?.docs.get(doc)
    }

    /// The latest heads `peer` reported for `doc`.
    pub fn known_heads(&self, peer: &NodeId, doc: &DocId) -> Option<&[ChangeHash]> {
        self.report(peer, doc).map(|r| r.heads.as_slice())
    }

    /// Documents `peer` has pending, in id order.
    pub fn pending_docs(&self, peer: &NodeId) -> Vec<DocId> {
        self.peers
            .get(peer)
            .map(|p| p.pending.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// How far behind `peer` is (all zero for a peer never heard from).
    pub fn lag(&self, peer: &NodeId) -> Lag {
        let Some(p) = self.peers.get(peer) else {
            return Lag::default();
        };
        Lag {
            documents: p.pending.len() as u64,
            changes: p.pending.values().map(|x| x.changes).sum(),
            oldest: p.pending.values().map(|x| x.since).min(),
        }
    }

    /// Every peer's progress, in node id order.
    pub fn peers(&self) -> impl Iterator<Item = (&NodeId, &PeerProgress)> {
        self.peers.iter()
    }

    /// One peer's progress.
    pub fn peer(&self, peer: &NodeId) -> Option<&PeerProgress> {
        self.peers.get(peer)
    }

    /// Propagation-delay samples since the last call, oldest first.
    pub fn take_delays(&mut self) -> Vec<Delay> {
        self.delays.drain(..).collect()
    }

    /// Documents whose reports changed since the last call, and whether
    /// more changed than [`MAX_TOUCHED_DOCS`] (then any document may have).
    pub fn take_touched(&mut self) -> (BTreeSet<DocId>, bool) {
        let overflow = std::mem::take(&mut self.touched_overflow);
        (std::mem::take(&mut self.touched), overflow)
    }

    /// Reports not recorded, and documents not marked pending, because a
    /// peer's table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// Nodes forgotten to make room for another (see [`MAX_TRACKED_NODES`]).
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Delay samples dropped because nobody took them.
    pub fn delays_dropped(&self) -> u64 {
        self.delays_dropped
    }
}

/// Whether `heads` include every hash of `ours`.
fn includes(heads: &[ChangeHash], ours: &[ChangeHash]) -> bool {
    ours.iter().all(|h| heads.contains(h))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn h(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    #[test]
    fn pending_until_a_report_covers_our_latest_write() {
        let mut p = Progress::default();
        let (b, doc) = (NodeId::new("b").unwrap(), DocId::new("d").unwrap());
        let ms = Duration::from_millis;
        p.set_region(ms(0), &b, &Region::new("eu").unwrap());
        p.local_change(ms(10), &doc, &[h(1)], 1);
        p.local_change(ms(20), &doc, &[h(2)], 2);
        let lag = p.lag(&b);
        assert_eq!(
            (lag.documents, lag.changes, lag.oldest),
            (1, 3, Some(ms(10)))
        );
        assert!((lag.seconds(ms(1010)) - 1.0).abs() < 1e-9);
        // A report without the latest commit's heads leaves the mark, and
        // hands its target back for a check by causal history.
        assert_eq!(
            p.record(ms(30), &b, &doc, vec![h(1)], None),
            Some(vec![h(2)])
        );
        assert_eq!(p.lag(&b).documents, 1);
        assert_eq!(p.record(ms(50), &b, &doc, vec![h(2), h(9)], None), None);
        assert_eq!(p.lag(&b), Lag::default());
        let delays = p.take_delays();
        assert_eq!(delays.len(), 1);
        assert_eq!(delays[0].delay, ms(40));
        assert_eq!(p.report(&b, &doc).unwrap().at, ms(50));
        // A report of this node's current heads confirms whatever the
        // target, and so does the caller, having judged a report.
        p.local_change(ms(60), &doc, &[h(3)], 1);
        assert_eq!(p.record(ms(70), &b, &doc, vec![h(4)], Some(&[h(4)])), None);
        assert_eq!(p.lag(&b), Lag::default());
        p.local_change(ms(80), &doc, &[h(5)], 1);
        assert_eq!(
            p.record(ms(90), &b, &doc, vec![h(6)], Some(&[h(7)])),
            Some(vec![h(5)])
        );
        p.confirm(ms(95), &b, &doc);
        assert_eq!(p.lag(&b), Lag::default());
        let (touched, overflow) = p.take_touched();
        assert!(touched.contains(&doc) && !overflow);
    }

    #[test]
    fn a_peer_with_a_new_store_id_is_not_believed_to_hold_what_it_reported() {
        let mut p = Progress::default();
        let (b, doc, other) = (
            NodeId::new("b").unwrap(),
            DocId::new("d").unwrap(),
            DocId::new("e").unwrap(),
        );
        let ms = Duration::from_millis;
        assert!(!p.set_store(ms(0), &b, "store-1"));
        p.record(ms(10), &b, &doc, vec![h(1)], None);
        p.local_change(ms(20), &other, &[h(2)], 1);
        // The same store again (a reconnect, a restart): nothing forgotten.
        assert!(!p.set_store(ms(30), &b, "store-1"));
        assert_eq!(p.known_heads(&b, &doc), Some(&[h(1)][..]));
        p.take_touched();
        // A restored store: its reports go, its pending marks stay, and
        // the documents it reported on are touched for the caller.
        assert!(p.set_store(ms(40), &b, "store-2"));
        assert_eq!(p.known_heads(&b, &doc), None);
        assert_eq!(p.lag(&b).documents, 1);
        let (touched, _) = p.take_touched();
        assert!(touched.contains(&doc));
        assert_eq!(p.peer(&b).unwrap().store.as_deref(), Some("store-2"));
    }

    #[test]
    fn writes_unconfirmed_for_a_while_are_listed_for_connected_peers() {
        let mut p = Progress::default();
        let ms = Duration::from_millis;
        let (b, c) = (NodeId::new("b").unwrap(), NodeId::new("c").unwrap());
        p.connected(ms(0), &b);
        p.set_region(ms(0), &c, &Region::new("eu").unwrap());
        let docs: Vec<DocId> = (0..4)
            .map(|i| DocId::new(format!("d{i}")).unwrap())
            .collect();
        for (i, doc) in docs.iter().enumerate() {
            p.local_change(ms(10 * i as u64), doc, &[h(i as u8)], 1);
        }
        // c is known but not connected: nothing to ask it.
        assert_eq!(
            p.unconfirmed(ms(20), 10),
            vec![(b.clone(), docs[..3].to_vec())]
        );
        assert_eq!(
            p.unconfirmed(ms(30), 2),
            vec![(b.clone(), docs[..2].to_vec())]
        );
        assert!(p.unconfirmed(ms(5), 10)[0].1 == docs[..1]);
    }
}
