//! Where a pushed write goes: the region tree a copy travels within a
//! region, and the bridge that carries it into each other region.
//!
//! Both rest on rendezvous hashing over names, so every node that sees the
//! same members computes the same answer without talking to anyone:
//!
//! * **Bridges.** The members of a region, ordered by the hash of
//!   `(origin, member)`, are the bridges the origin tries in turn for that
//!   region: the first one it is connected to gets the copy, the next one
//!   if that copy goes unacknowledged. Different origins land on different
//!   bridges, so no node carries a region's whole inbound traffic.
//! * **Trees.** A copy entering a region names its *root* (the bridge, or
//!   the origin in its own region). The region's members, the root first
//!   and the rest ordered by the hash of `(root, member)`, form a complete
//!   `fanout`-ary tree: the member at position `p` relays to positions
//!   `p * fanout + 1 ..= p * fanout + fanout`. A child the relay cannot
//!   reach is skipped over: its own children are sent to instead, so one
//!   node that is down does not cut off its subtree.
//!
//! The hash is FNV-1a with a SplitMix64 finish: stable across builds and
//! platforms, which the trees need (every node must order alike), and cheap
//! enough to order a region per message.

use super::ids::NodeId;

/// `members` (which should include `root`) in tree order: `root` first,
/// the rest by rendezvous hash of `(root, member)`, ties by id.
pub fn tree_order(root: &NodeId, members: &[NodeId]) -> Vec<NodeId> {
    let mut rest: Vec<(u64, &NodeId)> = members
        .iter()
        .filter(|m| *m != root)
        .map(|m| (rendezvous(root, m), m))
        .collect();
    rest.sort_unstable();
    rest.dedup_by(|a, b| a.1 == b.1);
    let mut order = Vec::with_capacity(rest.len() + 1);
    order.push(root.clone());
    order.extend(rest.into_iter().map(|(_, m)| m.clone()));
    order
}

/// The members `me` relays a copy to, in the tree over `members` rooted at
/// `root` with `fanout` children per node: its children that `reachable`
/// accepts, and in place of each one it rejects, that one's children, the
/// same way. Empty if `me` is not in the tree.
pub fn tree_children(
    root: &NodeId,
    me: &NodeId,
    members: &[NodeId],
    fanout: usize,
    reachable: impl Fn(&NodeId) -> bool,
) -> Vec<NodeId> {
    let order = tree_order(root, members);
    let Some(at) = order.iter().position(|m| m == me) else {
        return Vec::new();
    };
    children_of(&order, at, fanout, &reachable)
}

/// [`tree_children`] of position `at` in `order`.
pub fn children_of(
    order: &[NodeId],
    at: usize,
    fanout: usize,
    reachable: &dyn Fn(&NodeId) -> bool,
) -> Vec<NodeId> {
    let fanout = fanout.max(1);
    let mut out = Vec::new();
    let mut stack: Vec<usize> = child_positions(at, fanout, order.len()).rev().collect();
    while let Some(q) = stack.pop() {
        if reachable(&order[q]) {
            out.push(order[q].clone());
        } else {
            stack.extend(child_positions(q, fanout, order.len()).rev());
        }
    }
    out
}

fn child_positions(at: usize, fanout: usize, len: usize) -> std::ops::Range<usize> {
    let first = at.saturating_mul(fanout).saturating_add(1).min(len);
    let end = first.saturating_add(fanout).min(len);
    first..end
}

/// `members` of one region in the order `origin` tries them as bridges.
pub fn bridge_order(origin: &NodeId, members: &[NodeId]) -> Vec<NodeId> {
    let mut ranked: Vec<(u64, &NodeId)> =
        members.iter().map(|m| (rendezvous(origin, m), m)).collect();
    ranked.sort_unstable();
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().map(|(_, m)| m.clone()).collect()
}

/// The rendezvous hash of `(key, member)`.
pub fn rendezvous(key: &NodeId, member: &NodeId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = key
        .as_str()
        .bytes()
        .chain([0xff])
        .chain(member.as_str().bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64's finish spreads FNV's low-entropy high bits.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ids(n: usize) -> Vec<NodeId> {
        (0..n)
            .map(|i| NodeId::new(format!("n{i}")).unwrap())
            .collect()
    }

    #[test]
    fn every_member_is_reached_exactly_once_from_any_root() {
        let members = ids(23);
        for fanout in [1, 2, 4, 6] {
            for root in &members {
                let mut got: BTreeMap<NodeId, usize> = BTreeMap::new();
                let mut frontier = vec![root.clone()];
                while let Some(me) = frontier.pop() {
                    for c in tree_children(root, &me, &members, fanout, |_| true) {
                        *got.entry(c.clone()).or_default() += 1;
                        frontier.push(c);
                    }
                }
                assert_eq!(got.len(), members.len() - 1, "fanout {fanout}");
                assert!(got.values().all(|&n| n == 1));
                assert!(!got.contains_key(root));
            }
        }
    }

    #[test]
    fn a_member_that_is_down_is_skipped_and_its_subtree_still_reached() {
        let members = ids(30);
        let root = &members[0];
        let order = tree_order(root, &members);
        let down = order[1].clone();
        let up = |m: &NodeId| *m != down;
        let mut reached = vec![root.clone()];
        let mut frontier = vec![root.clone()];
        while let Some(me) = frontier.pop() {
            for c in tree_children(root, &me, &members, 3, up) {
                reached.push(c.clone());
                frontier.push(c);
            }
        }
        reached.sort();
        let mut want: Vec<NodeId> = members.iter().filter(|m| **m != down).cloned().collect();
        want.sort();
        assert_eq!(reached, want);
    }

    #[test]
    fn bridges_spread_over_a_region_and_do_not_depend_on_listing_order() {
        let region = ids(16);
        let mut reversed = region.clone();
        reversed.reverse();
        let mut first: BTreeMap<NodeId, usize> = BTreeMap::new();
        for origin in (0..200).map(|i| NodeId::new(format!("o{i}")).unwrap()) {
            let order = bridge_order(&origin, &region);
            assert_eq!(order, bridge_order(&origin, &reversed));
            assert_eq!(order.len(), region.len());
            *first.entry(order[0].clone()).or_default() += 1;
        }
        // 200 origins over 16 bridges: every bridge is first for some, none
        // for more than a quarter.
        assert_eq!(first.len(), 16);
        assert!(first.values().all(|&n| n <= 50), "{first:?}");
    }
}
