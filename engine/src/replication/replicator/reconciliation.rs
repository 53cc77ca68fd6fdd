//! Range-based set reconciliation sessions with each peer (see
//! [`reconcile`](crate::replication::reconcile) for the algorithm): started
//! on connect and every anti-entropy round, answered, and turned into
//! document syncs for the differences found. With a [`Fanout`], each round
//! reconciles with a bounded number of peers, chosen by need and staleness.

use super::*;

/// How many peers one anti-entropy round reconciles with, whatever the size
/// of the cluster: `local` peers of this node's region and `remote` peers of
/// other regions.
///
/// Peers whose session with this node is still under way are left out.
/// Peers of the region come in order of need (this node's writes they have
/// not confirmed), then staleness (longest since a message of a session
/// with them arrived, either side's; never first), then at random. The
/// remote peers come one per region, from the regions whose last session
/// message is oldest, each the stalest peer of its region (need is not
/// weighed there). Over rounds every connected peer's turn comes: a node
/// reconciles with each peer of its region within
/// `ceil(region peers / local)` rounds and with each other region within
/// `ceil(other regions / remote)` rounds (once their sessions get through).
/// Slots one side cannot fill go to the other (a node alone in its region
/// reconciles with `local + remote` other regions a round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Peers of this node's region per round.
    pub local: usize,
    /// Peers of other regions per round (one per region).
    pub remote: usize,
}

impl Fanout {
    /// Sessions per round at most.
    pub fn total(self) -> usize {
        self.local + self.remote
    }
}

/// Why a fanout did not parse (see [`Fanout::parse_setting`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a fanout: give LOCAL,REMOTE peers per round, for example \"2,1\", at least one in all, or \"all\"")]
pub struct BadFanout(pub String);

impl Fanout {
    /// A fanout as settings and command lines give it: `LOCAL,REMOTE`, or
    /// `all` (`None`: every connected peer).
    pub fn parse_setting(s: &str) -> std::result::Result<Option<Fanout>, BadFanout> {
        if s == "all" {
            return Ok(None);
        }
        s.parse().map(Some)
    }
}

impl std::str::FromStr for Fanout {
    type Err = BadFanout;

    /// `LOCAL,REMOTE`, for example `2,1`; at least one peer in all.
    fn from_str(s: &str) -> std::result::Result<Fanout, BadFanout> {
        let bad = || BadFanout(s.to_string());
        let (local, remote) = s.split_once(',').ok_or_else(bad)?;
        let number = |p: &str| p.trim().parse::<usize>().map_err(|_| bad());
        let fanout = Fanout {
            local: number(local)?,
            remote: number(remote)?,
        };
        if fanout.total() == 0 {
            return Err(bad());
        }
        Ok(fanout)
    }
}

/// A candidate of a round: not needed first, then never or longest ago
/// reconciled, then a random draw, then the id (so the order is total).
type Rank = (bool, Option<Duration>, u64, NodeId);

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
        self.reconciled(now, from);
        let processed = {
            let Some(p) = self.peers.get_mut(from) else {
                return Ok(Verdict::Ignore);
            };
            // This node decodes the sketches of its own session; it answers
            // the peer's with sketches. Either only while the peer reads
            // them: its version can fall back to unknown within a session
            // (it reconnected, its hello is not in yet).
            let sketches = p.version.is_some_and(|v| v >= SKETCH_VERSION);
            let side = if p.reconcile_sent_at.is_some_and(|(id, _)| id == r.session) {
                Side::Initiator {
                    decoders: &mut p.decoders,
                    sketches,
                }
            } else {
                Side::Responder { sketches }
            };
            reconcile::process(&self.items, &r.ranges, &self.config.reconcile, side)
        };
        self.stats.reconcile_differences += processed.to_sync.len() as u64;
        self.stats.sketches_decoded += processed.sketches_decoded as u64;
        self.stats.sketches_split += processed.sketches_split as u64;
        // Pending documents the peer turned out to hold as they are here.
        let pending = if processed.shows_any_equal() {
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
                let _ = self
                    .progress
                    .record(now, from, &doc, ours.clone(), Some(&ours));
            }
        }
        // Documents the peer lacks entirely go whole, in bundles, where it
        // reads them; the rest (and everything, to an older peer) by sync.
        // This node holds all the peer holds of a document the peer lacks,
        // so only the synced ones (`own`) hold up its own catching up.
        let bundling = self.bundles_to(from);
        let (bundled, own): (Vec<DocId>, Vec<DocId>) = processed
            .to_sync
            .iter()
            .cloned()
            .partition(|doc| bundling && processed.absent_there.binary_search(doc).is_ok());
        for doc in &bundled {
            self.enqueue_bundle(from, doc);
        }
        for doc in &own {
            self.enqueue_sync(from, doc);
        }
        if let Some((_, sent)) = self
            .peers
            .get(from)
            .and_then(|p| p.reconcile_sent_at)
            .filter(|(id, _)| *id == r.session)
        {
            // A step of our own session answered: as good a round trip as
            // a push's (a resent step starts a new session).
            self.time_round_trip(from, sent, now);
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
            let ended = p.reconcile_sent_at.is_none();
            if ended {
                p.decoders = Decoders::default();
            }
            self.learned_while_settling(from, r.session, &processed.learned, &own);
            if ended {
                self.own_session_ended(now, from, r.session);
            }
        }
        if !processed.reply.is_empty() {
            let msg = Message::Reconcile(Reconcile {
                session: r.session,
                ranges: processed.reply,
            });
            self.send(from, msg);
        }
        self.pump_bundles(now, from)?;
        self.start_queued(now, from)?;
        Ok(Verdict::Accept)
    }

    /// The peers this anti-entropy round reconciles with.
    pub(super) fn round_peers(&mut self, random: &mut dyn Random) -> Vec<NodeId> {
        let Some(fanout) = self.config.reconcile_fanout else {
            return self
                .peers
                .iter()
                .filter(|(_, p)| !p.incompatible)
                .map(|(id, _)| id.clone())
                .collect();
        };
        let mut local: Vec<Rank> = Vec::new();
        let mut remote: BTreeMap<Option<Region>, Vec<Rank>> = BTreeMap::new();
        // A peer whose session with us is still under way waits its turn.
        let idle = self
            .peers
            .iter()
            .filter(|(_, p)| p.reconcile_sent_at.is_none() && !p.incompatible);
        for (id, p) in idle {
            let needed = self.progress.lag(id).documents > 0;
            let rank = (!needed, p.reconciled_at, random.next_u64(), id.clone());
            let region = self.peers.get(id).and_then(|q| q.region.clone());
            if region.as_ref() == Some(&self.config.region) {
                local.push(rank);
            } else {
                remote.entry(region).or_default().push(rank);
            }
        }
        local.sort();
        // Slots one side cannot use go to the other: a node alone in its
        // region reconciles with `local + remote` other regions, a
        // cluster of one region with `local + remote` peers.
        let spare_local = fanout.local.saturating_sub(local.len());
        let spare_remote = fanout.remote.saturating_sub(remote.len());
        let mut chosen: Vec<NodeId> = local
            .into_iter()
            .take(fanout.local + spare_remote)
            .map(|r| r.3)
            .collect();
        let mut regions: Vec<(Option<Duration>, u64, Vec<Rank>)> = remote
            .into_iter()
            .map(|(region, mut ranks)| {
                ranks.sort_by_key(|r| (r.1, r.2));
                let last = region.and_then(|r| self.region_reconciled.get(&r).copied());
                (last, random.next_u64(), ranks)
            })
            .collect();
        regions.sort_by_key(|r| (r.0, r.1));
        chosen.extend(
            regions
                .into_iter()
                .take(fanout.remote + spare_local)
                .filter_map(|(_, _, ranks)| ranks.into_iter().next().map(|r| r.3)),
        );
        chosen
    }

    /// Reconciliation sessions this node started that await an answer.
    pub(super) fn reconciling(&self) -> usize {
        self.peers
            .values()
            .filter(|p| p.reconcile_sent_at.is_some())
            .count()
    }

    /// A session with `peer` is under way at `now`: a message of it (one
    /// this node started or one the peer started) arrived. A session sent
    /// into a partition does not count, so the cut-off peers and regions
    /// stay stalest and come first once it heals.
    fn reconciled(&mut self, now: Duration, peer: &NodeId) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.reconciled_at = Some(now);
        }
        let region = self.peers.get(peer).and_then(|q| q.region.clone());
        if let Some(region) = region.filter(|r| *r != self.config.region) {
            self.region_reconciled.insert(region, now);
        }
        if self.region_reconciled.len() > self.peers.len() {
            // Regions no connected peer is in any more.
            let live: BTreeSet<Region> = self
                .peers
                .keys()
                .filter_map(|id| self.peers.get(id).and_then(|q| q.region.clone()))
                .collect();
            self.region_reconciled.retain(|r, _| live.contains(r));
        }
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
        p.decoders = Decoders::default();
        self.stats.reconciliations_started += 1;
        self.session_started(session);
        let ranges = reconcile::initiate(&self.items, &self.config.reconcile);
        self.send(peer, Message::Reconcile(Reconcile { session, ranges }));
    }
}
