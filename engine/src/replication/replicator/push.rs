//! Region-aware dissemination ([`Dissemination::Regions`]): a local write
//! is pushed over direct messages to the children of the origin's region
//! tree and to one bridge in every other region; each receiver that found
//! something new in it relays it to its own children (see
//! [`topology`](super::super::topology)). Every push is kept until the
//! receiver's acknowledgement covers it, and sent again when it is not:
//! to the same child, past a child that went away to that child's
//! children, and into another region to the next bridge. What is still
//! missing after [`ReplicatorConfig::max_push_sends`] is left to repair
//! (held-change pulls and anti-entropy), and the peer it was last sent to
//! is passed over by later pushes until it is heard from again, so that
//! writes made while a peer is cut off do not each wait out their resends
//! into the cut.

use super::super::topology::{bridge_order, children_of, tree_children, tree_order};
use super::super::wire::Push;
use super::*;

/// Pushes kept for a resend, at most; further ones are sent but not
/// tracked (counted in [`Stats::pushes_untracked`]) and left to repair.
pub const MAX_UNACKED_PUSHES: usize = 16_384;
/// Bytes of changes in tracked pushes, at most, the same way.
pub const MAX_UNACKED_PUSH_BYTES: usize = 64 << 20;

/// How this node's own writes reach the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dissemination {
    /// Published by gossip ([`Output::Publish`]); relays forward what the
    /// core accepts.
    #[default]
    Gossip,
    /// Pushed over direct messages along region trees, one copy into each
    /// other region through a bridge (see `docs/protocol.md`,
    /// "Dissemination by region").
    Regions,
}

/// A push awaiting its receiver's acknowledgement.
pub(super) struct Unacked {
    push: Push,
    /// This node's heads once it held the changes: an acknowledgement
    /// that includes them (or reports this node's current heads) covers
    /// the push.
    heads: Vec<ChangeHash>,
    sent_at: Duration,
    /// When it is sent again if still unacknowledged.
    due: Duration,
    /// Times sent so far, to this peer and the ones it stood for.
    sends: u32,
    /// For a copy into another region: the region and the bridges tried.
    bridges: Option<(Region, Vec<NodeId>)>,
    bytes: usize,
}

/// Pushes awaiting acknowledgement, per receiver and document.
#[derive(Default)]
pub(super) struct Unackeds {
    by_peer: BTreeMap<(NodeId, DocId), Vec<Unacked>>,
    count: usize,
    bytes: usize,
}

impl Unackeds {
    fn insert(&mut self, to: NodeId, u: Unacked) -> bool {
        if self.count >= MAX_UNACKED_PUSHES || self.bytes + u.bytes > MAX_UNACKED_PUSH_BYTES {
            return false;
        }
        self.count += 1;
        self.bytes += u.bytes;
        self.by_peer
            .entry((to, u.push.doc.clone()))
            .or_default()
            .push(u);
        true
    }

    /// `peer` acknowledged `heads` of `doc`; `current` says whether those
    /// are this node's current heads. Drops the pushes they cover and
    /// returns when the ones sent once were sent (round-trip samples).
    pub(super) fn acked(
        &mut self,
        peer: &NodeId,
        doc: &DocId,
        heads: &[ChangeHash],
        current: bool,
    ) -> Vec<Duration> {
        let key = (peer.clone(), doc.clone());
        let Some(list) = self.by_peer.get_mut(&key) else {
            return Vec::new();
        };
        let (mut count, mut bytes, mut samples) = (0, 0, Vec::new());
        list.retain(|u| {
            let covered = current || u.heads.iter().all(|h| heads.contains(h));
            if covered {
                count += 1;
                bytes += u.bytes;
                if u.sends == 1 {
                    samples.push(u.sent_at);
                }
            }
            !covered
        });
        if list.is_empty() {
            self.by_peer.remove(&key);
        }
        self.count -= count;
        self.bytes -= bytes;
        samples
    }

    /// When the next resend is due.
    pub(super) fn next_due(&self) -> Option<Duration> {
        self.by_peer.values().flatten().map(|u| u.due).min()
    }

    /// Removes and returns the pushes due for a resend at `now`.
    fn take_due(&mut self, now: Duration) -> Vec<(NodeId, Unacked)> {
        let mut out = Vec::new();
        let keys: Vec<(NodeId, DocId)> = self
            .by_peer
            .iter()
            .filter(|(_, list)| list.iter().any(|u| u.due <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let Some(list) = self.by_peer.remove(&key) else {
                continue;
            };
            let (due, keep): (Vec<Unacked>, Vec<Unacked>) =
                list.into_iter().partition(|u| u.due <= now);
            for u in due {
                self.count -= 1;
                self.bytes -= u.bytes;
                out.push((key.0.clone(), u));
            }
            if !keep.is_empty() {
                self.by_peer.insert(key, keep);
            }
        }
        out
    }

    /// Whether no push is tracked.
    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl Replicator {
    /// Whether pushes go to `peer`: connected, and not found silent since
    /// it last spoke.
    fn pushable(&self, peer: &NodeId) -> bool {
        self.peers.get(peer).is_some_and(|p| !p.silent)
    }

    /// A push to `peer` was given up: it is passed over until it speaks.
    fn silence(&mut self, peer: &NodeId) {
        if let Some(p) = self.peers.get_mut(peer) {
            if !p.silent {
                p.silent = true;
                self.stats.peers_silenced += 1;
            }
        }
    }

    /// The members of `region` as this node knows them: from the
    /// membership list if there is one, else this node (if in `region`)
    /// and the connected peers whose region is known to be `region`.
    pub(super) fn region_members(&self, region: &Region) -> Vec<NodeId> {
        if let Some(list) = &self.members {
            return list
                .iter()
                .filter(|(_, r)| *r == region)
                .map(|(n, _)| n.clone())
                .collect();
        }
        let mut out: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.region.as_ref() == Some(region))
            .map(|(id, _)| id.clone())
            .collect();
        if *region == self.config.region {
            out.push(self.config.node.clone());
        }
        out
    }

    /// Regions other than this node's with a connected peer, and the
    /// members of each (see [`Replicator::region_members`]).
    fn remote_regions(&self) -> BTreeMap<Region, Vec<NodeId>> {
        let mut regions: BTreeSet<Region> = BTreeSet::new();
        match &self.members {
            Some(list) => regions.extend(list.values().cloned()),
            None => regions.extend(self.peers.values().filter_map(|p| p.region.clone())),
        }
        regions.remove(&self.config.region);
        regions
            .into_iter()
            .map(|r| {
                let members = self.region_members(&r);
                (r, members)
            })
            .collect()
    }

    /// Pushes a local write's `changes` to `doc` (leaving `heads`): to the
    /// children of this node's region tree, and to the first bridge of
    /// every other region that is connected and not silent.
    pub(super) fn push_local(
        &mut self,
        now: Duration,
        doc: &DocId,
        changes: Vec<Bytes>,
        heads: &[ChangeHash],
    ) {
        let me = self.config.node.clone();
        let push = Push {
            root: me.clone(),
            origin: me.clone(),
            doc: doc.clone(),
            changes,
        };
        let home = self.region_members(&self.config.region);
        let children = tree_children(&me, &me, &home, self.config.tree_fanout, |m| {
            self.pushable(m)
        });
        for child in children {
            self.send_push(now, &child, push.clone(), heads, 0, None);
        }
        for (region, members) in self.remote_regions() {
            let order = bridge_order(&me, &members);
            let Some(bridge) = order.into_iter().find(|m| self.pushable(m)) else {
                continue;
            };
            let mut copy = push.clone();
            copy.root = bridge.clone();
            let tried = vec![bridge.clone()];
            self.send_push(now, &bridge, copy, heads, 0, Some((region, tried)));
        }
    }

    /// A push arrived from `from`: applied as a delta is, acknowledged to
    /// `from` and to the origin it names, and relayed to this node's
    /// children in the tree rooted at its `root` if anything in it was new
    /// here and that root is this node or a member of its region.
    pub(super) fn on_push(&mut self, now: Duration, from: &NodeId, p: Push) -> Result<Verdict> {
        let changes: Vec<Vec<u8>> = p.changes.iter().map(|b| b.0.clone()).collect();
        let (outcome, new) = match self.apply_from_peer(from, &p.doc, &changes) {
            Ok(a) => (a.outcome, a.new),
            Err(e) if is_bad_change(&e) => return Ok(self.reject(from, rejection(&e))),
            Err(e) => return Err(e),
        };
        self.stats.push_changes_applied += outcome.applied as u64;
        self.account_held_from(&p.doc, &outcome, from);
        self.applied(&p.doc, &outcome);
        if !outcome.missing_deps.is_empty() || outcome.refused > 0 {
            self.enqueue_sync(from, &p.doc);
            self.start_queued(now, from)?;
        }
        if outcome.applied > 0 || outcome.duplicates > 0 {
            self.queue_ack(from, &p.doc, &outcome.heads);
            self.acks_now.insert(from.clone());
            if p.origin != *from {
                self.queue_ack(&p.origin, &p.doc, &outcome.heads);
            }
        }
        if new.contains(&true) {
            self.relay_push(now, from, p, &outcome.heads);
        }
        Ok(Verdict::Accept)
    }

    /// Sends `p` on to this node's children in its tree, unless its root is
    /// neither this node nor a member of this node's region.
    fn relay_push(&mut self, now: Duration, from: &NodeId, p: Push, heads: &[ChangeHash]) {
        let me = self.config.node.clone();
        let home = self.region_members(&self.config.region);
        if p.root != me && !home.contains(&p.root) {
            return;
        }
        let children = tree_children(&p.root, &me, &home, self.config.tree_fanout, |m| {
            self.pushable(m) && m != from && *m != p.origin
        });
        for child in children {
            self.send_push(now, &child, p.clone(), heads, 0, None);
        }
    }

    /// A message to `peer` sent at `sent` was answered at `now` (a push
    /// acknowledged after its first send, or a reconciliation step): one
    /// round-trip sample for the peer and its region.
    pub(super) fn time_round_trip(&mut self, peer: &NodeId, sent: Duration, now: Duration) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        p.round_trip.sample(sent, now);
        if let Some(region) = p.region.clone() {
            self.region_round_trip
                .entry(region)
                .or_default()
                .sample(sent, now);
        }
    }

    /// Sends `push` to `to` (sent `sends` times before, to it or to the
    /// peers it stands for) and keeps it for a resend, after `to`'s
    /// [`RoundTrip::retry_after`] (its region's while that has more samples
    /// and the peer few, see [`RoundTrip::or_pooled`]), until `to`
    /// acknowledges `heads`.
    fn send_push(
        &mut self,
        now: Duration,
        to: &NodeId,
        push: Push,
        heads: &[ChangeHash],
        sends: u32,
        bridges: Option<(Region, Vec<NodeId>)>,
    ) {
        let bytes = push.changes.iter().map(|c| c.0.len()).sum();
        self.send(to, Message::Push(push.clone()));
        let round_trip = match self.peers.get(to) {
            Some(p) => {
                let pooled = p
                    .region
                    .as_ref()
                    .and_then(|r| self.region_round_trip.get(r));
                p.round_trip.or_pooled(pooled.copied())
            }
            None => RoundTrip::default(),
        };
        let wait = round_trip.retry_after(
            (self.config.min_push_retry, self.config.push_retry_after),
            sends,
        );
        let tracked = Unacked {
            push,
            heads: heads.to_vec(),
            sent_at: now,
            due: now + wait,
            sends: sends + 1,
            bridges,
            bytes,
        };
        if !self.unacked.insert(to.clone(), tracked) {
            self.stats.pushes_untracked += 1;
        }
    }

    /// Sends again every push whose acknowledgement is overdue.
    pub(super) fn resend_pushes(&mut self, now: Duration) {
        for (to, u) in self.unacked.take_due(now) {
            self.resend_push(now, &to, u);
        }
    }

    /// Sends `u`, unacknowledged by `to`, again: into another region to the
    /// next pushable bridge (the same one if no other is), within the
    /// region to `to` if still pushable, else to `to`'s children in the
    /// tree. After [`ReplicatorConfig::max_push_sends`] it is given up and
    /// `to` is silenced: within the region, `to` gets a document sync
    /// (which has its own resends) and its children the push, so that one
    /// unreachable child does not leave its subtree to the next
    /// anti-entropy round.
    fn resend_push(&mut self, now: Duration, to: &NodeId, u: Unacked) {
        if u.sends >= self.config.max_push_sends {
            self.stats.pushes_abandoned += 1;
            self.silence(to);
            if u.bridges.is_none() && self.peers.contains_key(to) {
                self.enqueue_sync(to, &u.push.doc);
                self.push_to_stand_ins(now, to, u.push, &u.heads, 0);
            }
            return;
        }
        self.stats.pushes_resent += 1;
        let Unacked {
            mut push,
            heads,
            sends,
            bridges,
            ..
        } = u;
        if let Some((region, mut tried)) = bridges {
            let order = bridge_order(&self.config.node, &self.region_members(&region));
            let connected: Vec<&NodeId> = order.iter().filter(|m| self.pushable(m)).collect();
            let next = connected
                .iter()
                .find(|m| !tried.contains(m))
                .or_else(|| connected.first());
            let Some(&next) = next else {
                self.stats.pushes_abandoned += 1;
                return;
            };
            let next = next.clone();
            push.root = next.clone();
            tried.push(next.clone());
            self.send_push(now, &next, push, &heads, sends, Some((region, tried)));
            return;
        }
        if self.pushable(to) {
            self.send_push(now, to, push, &heads, sends, None);
            return;
        }
        if !self.push_to_stand_ins(now, to, push, &heads, sends) {
            self.stats.pushes_abandoned += 1;
        }
    }

    /// Sends `push` to the connected children of `to` in its region's tree
    /// (theirs, for children not connected), as `to` would have relayed
    /// it. False if `to` has no place in the tree.
    fn push_to_stand_ins(
        &mut self,
        now: Duration,
        to: &NodeId,
        push: Push,
        heads: &[ChangeHash],
        sends: u32,
    ) -> bool {
        // Without a membership list, a peer that went away has left this
        // node's view of the region: put it back to find its place.
        let mut home = self.region_members(&self.config.region);
        if !home.contains(to) {
            home.push(to.clone());
        }
        let order = tree_order(&push.root, &home);
        let Some(at) = order.iter().position(|m| m == to) else {
            return false;
        };
        let reachable = |m: &NodeId| self.pushable(m);
        let stand_ins = children_of(&order, at, self.config.tree_fanout, &reachable);
        for child in stand_ins {
            self.send_push(now, &child, push.clone(), heads, sends, None);
        }
        true
    }
}
