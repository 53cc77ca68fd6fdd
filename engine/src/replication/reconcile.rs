//! Range-based set reconciliation over `(document id, digest of heads)` items
//! (Aljoscha Meyer, "Range-Based Set Reconciliation", 2023).
//!
//! Each node keeps an [`ItemSet`]: one item per stored document (deleted ones
//! included), ordered by id. Two nodes find the documents whose digests differ,
//! or that only one holds, without listing all documents:
//!
//! 1. The initiator sends the fingerprint of its whole set ([`initiate`]).
//! 2. A side receiving a fingerprint for a range compares it with its own.
//!    Equal: the range is settled (`Skip`). Different: if it holds few items
//!    there ([`Params::item_threshold`]) it lists them and asks for an answer;
//!    otherwise it splits its items there into [`Params::branching`] ranges of
//!    equal size and sends a fingerprint for each.
//! 3. A side receiving a list of items now knows every difference in that
//!    range. It starts per-document sync for them and answers with the items
//!    the other side lacks, plus a bitmap of the received items it lacks, so
//!    both sides know the difference.
//!
//! The exchange is stateless on both sides: each message is answered from the
//! current set alone ([`process`]). A message containing only settled ranges
//! and answers needs no reply, which ends the session. Cost grows with the
//! number of differences times the depth (log of the set size), not with the
//! set size.
//!
//! A fingerprint is the sum modulo 2^128 of the items' hashes (the first 16
//! bytes of SHA-256 over id, `0x00`, digest), together with the item count.
//! Sums let the set be updated in place; the peers are authenticated cluster
//! members, so fingerprints need not resist crafted collisions.

use std::collections::BTreeMap;
use std::ops::Bound;

use sha2::{Digest, Sha256};

use crate::doc_id::DocId;

use super::wire::{Bytes, Item, RangeBody, RangePart, FINGERPRINT_LEN, ITEM_DIGEST_LEN, MAX_ITEMS};

/// Tuning of the reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Ranges a differing range is split into. Default 8 (fewest bytes at
    /// N = 100,000 in `causeway bench reconcile`; see `docs/benchmarks.md`).
    pub branching: usize,
    /// A differing range with at most this many local items is listed rather
    /// than split. Default 8.
    pub item_threshold: usize,
    /// Most items listed in one message (at most [`MAX_ITEMS`]).
    pub max_items: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            branching: 8,
            item_threshold: 8,
            max_items: MAX_ITEMS,
        }
    }
}

/// A document's digest as reconciliation sees it.
pub type ItemDigest = [u8; ITEM_DIGEST_LEN];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    digest: ItemDigest,
    hash: u128,
}

/// The set of `(document id, digest)` items a node reconciles.
#[derive(Debug, Clone, Default)]
pub struct ItemSet {
    items: BTreeMap<DocId, Entry>,
}

/// A range's fingerprint and item count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    sum: u128,
    count: u64,
}

impl Fingerprint {
    fn add(self, e: &Entry) -> Fingerprint {
        Fingerprint {
            sum: self.sum.wrapping_add(e.hash),
            count: self.count + 1,
        }
    }
}

impl ItemSet {
    /// An empty set.
    pub fn new() -> Self {
        ItemSet::default()
    }

    /// Sets the digest of `doc` (from the full 32-byte digest of its heads).
    pub fn insert(&mut self, doc: DocId, digest: &[u8; 32]) {
        let mut short = [0u8; ITEM_DIGEST_LEN];
        short.copy_from_slice(&digest[..ITEM_DIGEST_LEN]);
        let hash = item_hash(&doc, &short);
        self.items.insert(
            doc,
            Entry {
                digest: short,
                hash,
            },
        );
    }

    /// Takes `doc` out of the set (a collected document, see
    /// [`collection`](crate::collection)).
    pub fn remove(&mut self, doc: &DocId) {
        self.items.remove(doc);
    }

    /// The item digest of `doc`, if the set holds it.
    pub fn get(&self, doc: &DocId) -> Option<&ItemDigest> {
        self.items.get(doc).map(|e| &e.digest)
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn range<'a>(
        &'a self,
        lower: Option<&'a DocId>,
        upper: Option<&'a DocId>,
    ) -> impl Iterator<Item = (&'a DocId, &'a Entry)> + 'a {
        let lo = lower.map_or(Bound::Unbounded, Bound::Included);
        let hi = upper.map_or(Bound::Unbounded, Bound::Excluded);
        // An inverted range is empty rather than a panic (a peer may send
        // bounds out of order).
        let valid = match (lower, upper) {
            (Some(l), Some(u)) => l < u,
            _ => true,
        };
        valid
            .then(|| self.items.range::<DocId, _>((lo, hi)))
            .into_iter()
            .flatten()
    }

    fn fingerprint(&self, lower: Option<&DocId>, upper: Option<&DocId>) -> Fingerprint {
        self.range(lower, upper)
            .fold(Fingerprint { sum: 0, count: 0 }, |fp, (_, e)| fp.add(e))
    }
}

/// What processing one reconciliation message produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processed {
    /// The answer; empty if none is due (the session is over on this side).
    pub reply: Vec<RangePart>,
    /// Documents that differ and for which this side starts per-document sync
    /// (it received the other side's full list for their range).
    pub to_sync: Vec<DocId>,
    /// Those of `to_sync` the other side holds none of (absent from the
    /// list it sent): their whole history can go to it at once, with no
    /// sync to run (see [`Bundle`](super::wire::Bundle)).
    pub absent_there: Vec<DocId>,
    /// Documents learned to differ from an answer (the other side syncs them).
    pub learned: Vec<DocId>,
    /// Ranges `[lower, upper)` (`None`: unbounded) whose fingerprints were
    /// equal: the other side held the same digests there when it sent them.
    pub equal_ranges: Vec<(Option<DocId>, Option<DocId>)>,
    /// Documents listed by the other side with the same digest as here.
    pub equal_docs: Vec<DocId>,
}

impl Processed {
    /// Whether the message showed the other side holding the same digest of
    /// `doc` as this side.
    pub fn shows_equal(&self, doc: &DocId) -> bool {
        self.equal_docs.binary_search(doc).is_ok()
            || self.equal_ranges.iter().any(|(lower, upper)| {
                lower.as_ref().is_none_or(|l| l <= doc) && upper.as_ref().is_none_or(|u| doc < u)
            })
    }
}

/// The first message of a reconciliation: the fingerprint of the whole set,
/// or the whole set listed if it is small.
pub fn initiate(set: &ItemSet, params: &Params) -> Vec<RangePart> {
    let fp = set.fingerprint(None, None);
    let body = if fp.count as usize <= params.item_threshold.min(item_budget(params)) {
        items_body(set, None, None)
    } else {
        fingerprint_body(fp)
    };
    vec![RangePart { upper: None, body }]
}

/// Answers one message. See the [module docs](self).
pub fn process(set: &ItemSet, incoming: &[RangePart], params: &Params) -> Processed {
    let mut out = Processed::default();
    let mut reply = Vec::new();
    let mut needs_reply = false;
    let mut budget = item_budget(params);
    let mut lower: Option<&DocId> = None;
    for part in incoming {
        let upper = part.upper.as_ref();
        match &part.body {
            RangeBody::Skip => push(&mut reply, upper, RangeBody::Skip),
            RangeBody::Fingerprint { fingerprint, count } => {
                needs_reply = true;
                let mine = set.fingerprint(lower, upper);
                if fingerprint.0 == to_bytes(mine.sum) && mine.count == *count {
                    out.equal_ranges.push((lower.cloned(), upper.cloned()));
                    push(&mut reply, upper, RangeBody::Skip);
                } else {
                    split(set, lower, upper, params, &mut budget, &mut reply);
                }
            }
            RangeBody::Items {
                items, reply: true, ..
            } => {
                needs_reply = true;
                answer_items(set, lower, upper, items, &mut budget, &mut reply, &mut out);
            }
            RangeBody::Items {
                items,
                reply: false,
                lacking,
            } => {
                learn_from_answer(set, lower, upper, items, lacking.as_ref(), &mut out);
                push(&mut reply, upper, RangeBody::Skip);
            }
        }
        lower = upper;
    }
    let open = reply.iter().any(|p| !matches!(p.body, RangeBody::Skip));
    if needs_reply || open {
        out.reply = reply;
    }
    for ids in [
        &mut out.to_sync,
        &mut out.absent_there,
        &mut out.learned,
        &mut out.equal_docs,
    ] {
        ids.sort_unstable();
        ids.dedup();
    }
    out
}

/// Whether a message asks for an answer: it holds a fingerprint or a list of
/// items to compare. [`process`] always answers such a message, so a session
/// whose last message asked for an answer and got none lost a message.
pub fn expects_answer(parts: &[RangePart]) -> bool {
    parts.iter().any(|p| {
        matches!(
            p.body,
            RangeBody::Fingerprint { .. } | RangeBody::Items { reply: true, .. }
        )
    })
}

/// Items listed per message under `params`.
fn item_budget(params: &Params) -> usize {
    params.max_items.min(MAX_ITEMS)
}

/// The sender's items in the range, asking for an answer.
fn items_body(set: &ItemSet, lower: Option<&DocId>, upper: Option<&DocId>) -> RangeBody {
    RangeBody::Items {
        items: set.range(lower, upper).map(to_item).collect(),
        reply: true,
        lacking: None,
    }
}

fn fingerprint_body(fp: Fingerprint) -> RangeBody {
    RangeBody::Fingerprint {
        fingerprint: Bytes(to_bytes(fp.sum).to_vec()),
        count: fp.count,
    }
}

/// Answers a differing fingerprint: list the range, or split it.
fn split(
    set: &ItemSet,
    lower: Option<&DocId>,
    upper: Option<&DocId>,
    params: &Params,
    budget: &mut usize,
    reply: &mut Vec<RangePart>,
) {
    let entries: Vec<(&DocId, &Entry)> = set.range(lower, upper).collect();
    if entries.len() <= params.item_threshold.max(1) && entries.len() <= *budget {
        *budget -= entries.len();
        push(reply, upper, items_body(set, lower, upper));
        return;
    }
    // Ranges shrink on every split (down to one item each), so the exchange
    // always reaches item lists. Each sub-range gets a fingerprint only:
    // listing the items of sub-ranges that turn out to be equal would cost
    // far more. A separator sorts after its chunk's last id and no later than
    // the next chunk's first, so each chunk is exactly its sub-range.
    let per = entries.len().div_ceil(params.branching.max(2)).max(1);
    let chunks: Vec<&[(&DocId, &Entry)]> = entries.chunks(per).collect();
    for (k, chunk) in chunks.iter().enumerate() {
        let bound = match chunks.get(k + 1) {
            Some(next) => Some(separator(chunk[chunk.len() - 1].0, next[0].0)),
            None => upper.cloned(),
        };
        let fp = chunk
            .iter()
            .fold(Fingerprint { sum: 0, count: 0 }, |fp, (_, e)| fp.add(e));
        push(reply, bound.as_ref(), fingerprint_body(fp));
    }
}

/// Answers a list of the other side's items for a range: report the
/// differences, return the items it lacks (as many as the budget allows, the
/// rest of the range continuing by fingerprint) and the bitmap of its items
/// this side lacks.
fn answer_items(
    set: &ItemSet,
    lower: Option<&DocId>,
    upper: Option<&DocId>,
    theirs: &[Item],
    budget: &mut usize,
    reply: &mut Vec<RangePart>,
    out: &mut Processed,
) {
    let mut lacking = vec![0u8; theirs.len().div_ceil(8)];
    for (k, item) in theirs.iter().enumerate() {
        if set.items.get(&item.doc).map(|e| &e.digest[..]) != Some(&item.digest.0[..]) {
            lacking[k / 8] |= 1 << (k % 8);
            out.to_sync.push(item.doc.clone());
        } else {
            out.equal_docs.push(item.doc.clone());
        }
    }
    let their_map: BTreeMap<&DocId, &[u8]> =
        theirs.iter().map(|i| (&i.doc, &i.digest.0[..])).collect();
    let extras: Vec<Item> = set
        .range(lower, upper)
        .filter(|(id, e)| their_map.get(id) != Some(&&e.digest[..]))
        .map(to_item)
        .collect();
    out.to_sync.extend(extras.iter().map(|i| i.doc.clone()));
    out.absent_there.extend(
        extras
            .iter()
            .filter(|i| !their_map.contains_key(&i.doc))
            .map(|i| i.doc.clone()),
    );
    let take = extras.len().min(*budget);
    *budget -= take;
    let lacking = Some(Bytes(lacking));
    if take == extras.len() {
        let items = extras;
        push(
            reply,
            upper,
            RangeBody::Items {
                items,
                reply: false,
                lacking,
            },
        );
        return;
    }
    // Too many to list here: list a prefix, continue the rest by fingerprint.
    let cut = extras[take].doc.clone();
    let items = extras.into_iter().take(take).collect();
    push(
        reply,
        Some(&cut),
        RangeBody::Items {
            items,
            reply: false,
            lacking,
        },
    );
    push(
        reply,
        upper,
        fingerprint_body(set.fingerprint(Some(&cut), upper)),
    );
}

/// Records what an answer says differs: every item it lists, and every item
/// this side holds in the range that the bitmap marks as lacking there. The
/// bitmap indexes the items this side listed earlier; if its set changed in
/// between, the mapping may be off. That only affects what this side learns:
/// the side that answered already started the syncs.
fn learn_from_answer(
    set: &ItemSet,
    lower: Option<&DocId>,
    upper: Option<&DocId>,
    theirs: &[Item],
    lacking: Option<&Bytes>,
    out: &mut Processed,
) {
    out.learned.extend(theirs.iter().map(|i| i.doc.clone()));
    if let Some(bitmap) = lacking {
        for (k, (id, _)) in set.range(lower, upper).enumerate() {
            if bitmap.0.get(k / 8).is_some_and(|b| b & (1 << (k % 8)) != 0) {
                out.learned.push(id.clone());
            }
        }
    }
}

/// Appends a range, merging adjacent settled ranges into one.
fn push(reply: &mut Vec<RangePart>, upper: Option<&DocId>, body: RangeBody) {
    if matches!(body, RangeBody::Skip) {
        if let Some(last) = reply.last_mut() {
            if matches!(last.body, RangeBody::Skip) {
                last.upper = upper.cloned();
                return;
            }
        }
    }
    reply.push(RangePart {
        upper: upper.cloned(),
        body,
    });
}

/// The shortest prefix of `next` that sorts after `prev` (`prev < next`).
/// A non-empty prefix of an id is a valid id; `next` itself is the fallback.
fn separator(prev: &DocId, next: &DocId) -> DocId {
    let (p, n) = (prev.as_bytes(), next.as_bytes());
    let common = p.iter().zip(n).take_while(|(a, b)| a == b).count();
    DocId::new(&next.as_str()[..(common + 1).min(n.len())]).unwrap_or_else(|_| next.clone())
}

fn to_item((id, e): (&DocId, &Entry)) -> Item {
    Item {
        doc: id.clone(),
        digest: Bytes(e.digest.to_vec()),
    }
}

fn to_bytes(sum: u128) -> [u8; FINGERPRINT_LEN] {
    sum.to_be_bytes()
}

fn item_hash(doc: &DocId, digest: &ItemDigest) -> u128 {
    let mut h = Sha256::new();
    h.update(doc.as_bytes());
    h.update([0u8]);
    h.update(digest);
    let out = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&out[..16]);
    u128::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use super::*;

    fn digest(n: u64) -> [u8; 32] {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&n.to_be_bytes());
        d
    }

    fn id(i: u64) -> DocId {
        DocId::new(format!("doc/{i:06}")).unwrap()
    }

    /// Runs a whole session; returns (to_sync on either side, learned on
    /// either side, messages). Checks that every document a side found
    /// absent on the other is one of its own the other lacks.
    fn run(a: &ItemSet, b: &ItemSet, params: &Params) -> (BTreeSet<DocId>, BTreeSet<DocId>, usize) {
        let mut msg = initiate(a, params);
        let mut synced = BTreeSet::new();
        let mut learned = BTreeSet::new();
        let mut messages = 1;
        let mut turn_b = true;
        loop {
            let (side, other) = if turn_b { (b, a) } else { (a, b) };
            let p = process(side, &msg, params);
            for doc in &p.absent_there {
                assert!(side.get(doc).is_some() && other.get(doc).is_none(), "{doc}");
                assert!(p.to_sync.binary_search(doc).is_ok(), "{doc}");
            }
            synced.extend(p.to_sync);
            learned.extend(p.learned);
            if p.reply.is_empty() {
                return (synced, learned, messages);
            }
            assert!(messages < 100, "no termination");
            messages += 1;
            msg = p.reply;
            turn_b = !turn_b;
        }
    }

    fn expected(a: &ItemSet, b: &ItemSet) -> BTreeSet<DocId> {
        let mut out = BTreeSet::new();
        for (id, e) in &a.items {
            if b.items.get(id) != Some(e) {
                out.insert(id.clone());
            }
        }
        for (id, e) in &b.items {
            if a.items.get(id) != Some(e) {
                out.insert(id.clone());
            }
        }
        out
    }

    #[test]
    fn equal_sets_settle_in_one_round_trip() {
        let mut a = ItemSet::new();
        for i in 0..10_000 {
            a.insert(id(i), &digest(i));
        }
        let (synced, _, messages) = run(&a, &a.clone(), &Params::default());
        assert!(synced.is_empty());
        assert_eq!(messages, 2);
    }

    #[test]
    fn finds_exactly_the_difference_including_one_sided_documents() {
        let mut a = ItemSet::new();
        let mut b = ItemSet::new();
        for i in 0..5_000 {
            a.insert(id(i), &digest(i));
            b.insert(id(i), &digest(i));
        }
        b.insert(id(17), &digest(99_999));
        a.insert(id(7_000), &digest(1));
        b.insert(id(8_000), &digest(1));
        let (synced, _, _) = run(&a, &b, &Params::default());
        assert_eq!(synced, expected(&a, &b));
    }

    #[test]
    fn documents_the_other_side_lacks_are_told_apart() {
        let mut a = ItemSet::new();
        let mut b = ItemSet::new();
        for i in 0..20 {
            a.insert(id(i), &digest(i));
        }
        b.insert(id(3), &digest(99));
        b.insert(id(50), &digest(50));
        let params = Params::default();
        // b lists its two items; a answers, finding 19 of its own absent
        // there and one (id 3) held at another digest.
        let p = process(&a, &initiate(&b, &params), &params);
        let absent: Vec<DocId> = (0..20).filter(|i| *i != 3).map(id).collect();
        assert_eq!(p.absent_there, absent);
        assert!(p.to_sync.contains(&id(3)) && p.to_sync.contains(&id(50)));
        assert!(!p.absent_there.contains(&id(50)));
    }

    #[test]
    fn an_empty_side_gets_everything_in_bounded_messages() {
        let mut a = ItemSet::new();
        for i in 0..50_000 {
            a.insert(id(i), &digest(i));
        }
        let params = Params {
            max_items: 1_000,
            ..Params::default()
        };
        let (synced, _, messages) = run(&ItemSet::new(), &a, &params);
        assert_eq!(synced.len(), 50_000);
        // One round trip per 1,000 items listed, plus the opening one.
        assert!(messages <= 2 * (50 + 1), "{messages} messages");
    }

    proptest::proptest! {
        #[test]
        fn reconciliation_finds_the_symmetric_difference(
            common in proptest::collection::btree_set(0u64..3_000, 0..400),
            only_a in proptest::collection::btree_set(3_000u64..6_000, 0..40),
            only_b in proptest::collection::btree_set(6_000u64..9_000, 0..40),
            changed in proptest::collection::btree_set(0u64..3_000, 0..40),
            branching in 2usize..20,
            threshold in 0usize..20,
        ) {
            let mut a = ItemSet::new();
            let mut b = ItemSet::new();
            for i in &common {
                a.insert(id(*i), &digest(*i));
                b.insert(id(*i), &digest(if changed.contains(i) { i + 1 } else { *i }));
            }
            for i in &only_a { a.insert(id(*i), &digest(*i)); }
            for i in &only_b { b.insert(id(*i), &digest(*i)); }
            let params = Params { branching, item_threshold: threshold, max_items: 64 };
            let (synced, learned, _) = run(&a, &b, &params);
            let want = expected(&a, &b);
            proptest::prop_assert_eq!(&synced, &want);
            proptest::prop_assert!(learned.is_subset(&want));
        }
    }
}
