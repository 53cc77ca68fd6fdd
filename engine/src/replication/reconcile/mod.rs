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
//!
//! ## Sketches
//!
//! Splitting costs about `branching` fingerprints per difference per level
//! of the tree. Between peers that speak [`SKETCH_VERSION`], the side
//! answering a session ([`Side::Responder`]) answers a differing
//! fingerprint of a large range whose counts are close instead with the
//! first cells of a rateless IBLT of its items there ([`sketch`],
//! `RangeBody::Sketch`): about 1.35 to 2 cells of 13 bytes per difference
//! decode it. The side that started the session ([`Side::Initiator`])
//! subtracts its own cells and peels; it asks for more cells
//! (`SketchRequest`) until everything peels, then sends its differing
//! documents and the keys of the peer's differing items (`Decoded`). The
//! peer starts syncs for all of them and answers with its differing items
//! the initiator lacks entirely, as it answers a list. A range whose sketch
//! does not decode within [`MAX_SKETCH_CELLS`], or decodes to keys the
//! initiator does not hold (the sets changed in between), is split
//! instead. A difference of d documents thus costs about one item, one
//! 8-byte key and two cells each, in O(log d) round trips.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;

use sha2::{Digest, Sha256};

use crate::doc_id::DocId;

use super::wire::{
    Bytes, Item, RangeBody, RangePart, FINGERPRINT_LEN, ITEM_DIGEST_LEN, MAX_ITEMS,
    MAX_SKETCH_CELLS, SKETCH_KEY_LEN,
};

pub mod sketch;

use sketch::{Cell, Decoder, Key, Outcome};

#[cfg(doc)]
use super::wire::SKETCH_VERSION;

/// First cells of a sketch sent for a range whose item counts are equal.
pub const SKETCH_FIRST_CELLS: usize = 32;
/// Default of [`Params::sketch_min_items`]: ranges holding fewer items (on
/// the larger side) are listed or split, never sketched, since listing
/// them costs less than the first cells.
pub const SKETCH_MIN_ITEMS: usize = 64;
/// Most cells the initiator of one session holds for decoding, over all
/// its ranges (about 16 bytes each).
pub const MAX_SESSION_CELLS: usize = 4 * MAX_SKETCH_CELLS;

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
    /// A differing range is answered with a sketch only if one side holds
    /// at least this many items there (and the peer reads sketches).
    /// Default [`SKETCH_MIN_ITEMS`].
    pub sketch_min_items: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            branching: 8,
            item_threshold: 8,
            max_items: MAX_ITEMS,
            sketch_min_items: SKETCH_MIN_ITEMS,
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

impl Entry {
    /// The item's key in a sketch.
    fn key(&self) -> Key {
        (self.hash >> 64) as Key
    }
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
    /// (it received the other side's full list for their range, or its
    /// decoded sketch).
    pub to_sync: Vec<DocId>,
    /// Those of `to_sync` the other side holds none of (absent from the
    /// list it sent): their whole history can go to it at once, with no
    /// sync to run (see [`Bundle`](super::wire::Bundle)).
    pub absent_there: Vec<DocId>,
    /// Documents learned to differ from an answer (the other side syncs
    /// them), or from a decoded sketch (the other side sends them whole).
    pub learned: Vec<DocId>,
    /// Ranges `[lower, upper)` (`None`: unbounded) whose fingerprints were
    /// equal: the other side held the same digests there when it sent them.
    pub equal_ranges: Vec<(Option<DocId>, Option<DocId>)>,
    /// Documents listed by the other side with the same digest as here.
    pub equal_docs: Vec<DocId>,
    /// Ranges `[lower, upper)` a sketch showed equal on both sides but for
    /// the documents listed (sorted): every other document this side holds
    /// there, the other side held at the same digest.
    pub equal_except: Vec<(Option<DocId>, Option<DocId>, Vec<DocId>)>,
    /// Ranges whose sketch this side decoded.
    pub sketches_decoded: usize,
    /// Ranges whose sketch this side gave up on and split instead (it did
    /// not decode within the bounds, or not to a difference of the sets).
    pub sketches_split: usize,
}

impl Processed {
    /// Whether the message showed the other side holding the same digest of
    /// `doc` as this side.
    pub fn shows_equal(&self, doc: &DocId) -> bool {
        self.equal_docs.binary_search(doc).is_ok()
            || self
                .equal_ranges
                .iter()
                .any(|(lower, upper)| contains(lower.as_ref(), upper.as_ref(), doc))
            || self.equal_except.iter().any(|(lower, upper, except)| {
                contains(lower.as_ref(), upper.as_ref(), doc) && except.binary_search(doc).is_err()
            })
    }

    /// Whether the message showed anything equal on both sides.
    pub fn shows_any_equal(&self) -> bool {
        !self.equal_ranges.is_empty()
            || !self.equal_docs.is_empty()
            || !self.equal_except.is_empty()
    }
}

/// Whether `doc` lies in `[lower, upper)`.
fn contains(lower: Option<&DocId>, upper: Option<&DocId>, doc: &DocId) -> bool {
    lower.is_none_or(|l| l <= doc) && upper.is_none_or(|u| doc < u)
}

/// Which side of a session processes a message.
#[derive(Debug)]
pub enum Side<'a> {
    /// The side that started the session: it decodes the sketches the other
    /// side sends, keeping their state in `decoders` for the session.
    /// Without `sketches` (the peer no longer reads them, say it came back
    /// speaking an older version), a sketch received is not answered in
    /// kind: its range is split instead.
    Initiator {
        /// The session's decoders.
        decoders: &'a mut Decoders,
        /// Whether replies may hold sketch bodies.
        sketches: bool,
    },
    /// The side answering: it keeps no state. `sketches`: the initiator
    /// reads sketches (it speaks [`SKETCH_VERSION`]); otherwise differing
    /// ranges are only split and listed.
    Responder {
        /// Whether to answer with sketches.
        sketches: bool,
    },
}

/// The initiator's state of one session: a decoder for each range the
/// other side answered with a sketch, by the range's lower bound.
#[derive(Debug, Clone, Default)]
pub struct Decoders {
    ranges: BTreeMap<Option<DocId>, Decoding>,
    cells: usize,
}

#[derive(Debug, Clone)]
struct Decoding {
    upper: Option<DocId>,
    decoder: Decoder,
    /// Fewest cells the next window may hold: [`SKETCH_FIRST_CELLS`] for
    /// the first, then as many as this side asked for. A shorter window
    /// ends the range's decoding, so that a peer cannot stretch a session
    /// over rounds that add next to nothing.
    asked: usize,
    /// This side's differing documents, once decoded and sent.
    listed: Vec<DocId>,
}

impl Decoders {
    /// Cells held, over all ranges.
    pub fn cells(&self) -> usize {
        self.cells
    }

    fn drop_range(&mut self, lower: Option<&DocId>) -> Option<Decoding> {
        let d = self.ranges.remove(&lower.cloned())?;
        self.cells -= d.decoder.len();
        Some(d)
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
pub fn process(
    set: &ItemSet,
    incoming: &[RangePart],
    params: &Params,
    mut side: Side<'_>,
) -> Processed {
    let mut out = Processed::default();
    let mut reply = Vec::new();
    let mut needs_reply = false;
    let mut budget = item_budget(params);
    let mut cells = MAX_SKETCH_CELLS;
    let mut lower: Option<&DocId> = None;
    for part in incoming {
        let upper = part.upper.as_ref();
        match (&part.body, &mut side) {
            (RangeBody::Skip, _) => push(&mut reply, upper, RangeBody::Skip),
            (RangeBody::Fingerprint { fingerprint, count }, side) => {
                needs_reply = true;
                let mine = set.fingerprint(lower, upper);
                let sketches = matches!(side, Side::Responder { sketches: true });
                if fingerprint.0 == to_bytes(mine.sum) && mine.count == *count {
                    out.equal_ranges.push((lower.cloned(), upper.cloned()));
                    push(&mut reply, upper, RangeBody::Skip);
                } else if let Some(first) =
                    first_window(sketches, mine.count, *count, params).filter(|n| *n <= cells)
                {
                    cells -= first;
                    push(&mut reply, upper, sketch_body(set, lower, upper, 0, first));
                } else {
                    split(set, lower, upper, params, &mut budget, &mut reply);
                }
            }
            (
                RangeBody::Items {
                    items, reply: true, ..
                },
                _,
            ) => {
                needs_reply = true;
                answer_items(set, lower, upper, items, &mut budget, &mut reply, &mut out);
            }
            (
                RangeBody::Items {
                    items,
                    reply: false,
                    lacking,
                },
                side,
            ) => {
                let decoded = match side {
                    Side::Initiator { decoders, .. } => {
                        decoders.drop_range(lower).filter(|d| !d.listed.is_empty())
                    }
                    Side::Responder { .. } => None,
                };
                match decoded {
                    Some(d) => {
                        learn_from_decoded_answer(d.listed, items, lacking.as_ref(), &mut out)
                    }
                    None => learn_from_answer(set, lower, upper, items, lacking.as_ref(), &mut out),
                }
                push(&mut reply, upper, RangeBody::Skip);
            }
            (
                RangeBody::Sketch {
                    start,
                    cells: theirs,
                },
                Side::Initiator {
                    decoders,
                    sketches: true,
                },
            ) => {
                needs_reply = true;
                let range = Range { set, lower, upper };
                decode(
                    range,
                    *start,
                    theirs,
                    decoders,
                    params,
                    &mut budget,
                    &mut reply,
                    &mut out,
                );
            }
            (
                RangeBody::Sketch { .. },
                Side::Initiator {
                    decoders,
                    sketches: false,
                },
            ) => {
                // The peer sent cells but may not be sent a request or a
                // decoded difference now: split the range instead.
                needs_reply = true;
                decoders.drop_range(lower);
                out.sketches_split += 1;
                split(set, lower, upper, params, &mut budget, &mut reply);
            }
            (RangeBody::SketchRequest { start, count }, Side::Responder { sketches: true }) => {
                needs_reply = true;
                let end = start.saturating_add(*count);
                if *count as usize <= cells && end <= MAX_SKETCH_CELLS as u64 {
                    cells -= *count as usize;
                    let (start, count) = (*start as usize, *count as usize);
                    push(
                        &mut reply,
                        upper,
                        sketch_body(set, lower, upper, start, count),
                    );
                } else {
                    split(set, lower, upper, params, &mut budget, &mut reply);
                }
            }
            (RangeBody::Decoded { docs, keys }, Side::Responder { sketches: true }) => {
                needs_reply = true;
                let range = Range { set, lower, upper };
                answer_decoded(range, docs, keys, &mut budget, &mut reply, &mut out);
            }
            // A sketch body the roles of this session do not have: nothing
            // is done for the range.
            (
                RangeBody::Sketch { .. }
                | RangeBody::SketchRequest { .. }
                | RangeBody::Decoded { .. },
                _,
            ) => push(&mut reply, upper, RangeBody::Skip),
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
    for (_, _, except) in &mut out.equal_except {
        except.sort_unstable();
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
            RangeBody::Fingerprint { .. }
                | RangeBody::Items { reply: true, .. }
                | RangeBody::Sketch { .. }
                | RangeBody::SketchRequest { .. }
                | RangeBody::Decoded { .. }
        )
    })
}

/// A range of this side's set.
#[derive(Clone, Copy)]
struct Range<'a> {
    set: &'a ItemSet,
    lower: Option<&'a DocId>,
    upper: Option<&'a DocId>,
}

impl<'a> Range<'a> {
    fn entries(&self) -> impl Iterator<Item = (&'a DocId, &'a Entry)> + 'a {
        self.set.range(self.lower, self.upper)
    }

    fn keys(&self) -> impl Iterator<Item = Key> + 'a {
        self.entries().map(|(_, e)| e.key())
    }
}

/// How many cells to answer a differing fingerprint with (`None`: split or
/// list it instead). Sketches go only to a peer that reads them, for a
/// range large enough, where neither side holds most of the items alone
/// (then listing them is as cheap, and bundles follow). At least `|ours -
/// theirs|` items differ, so the first window covers 1.6 cells for each.
fn first_window(sketches: bool, ours: u64, theirs: u64, params: &Params) -> Option<usize> {
    let larger = ours.max(theirs);
    let apart = ours.abs_diff(theirs);
    let large = larger as usize >= params.sketch_min_items.max(1);
    if !sketches || !large || apart.saturating_mul(2) > larger {
        return None;
    }
    let first = SKETCH_FIRST_CELLS.max((apart as usize).saturating_mul(8).div_ceil(5));
    (first <= MAX_SKETCH_CELLS).then_some(first)
}

/// Cells `[start, start + count)` of the sketch of this side's items in a range.
fn sketch_body(
    set: &ItemSet,
    lower: Option<&DocId>,
    upper: Option<&DocId>,
    start: usize,
    count: usize,
) -> RangeBody {
    let keys = set.range(lower, upper).map(|(_, e)| e.key());
    RangeBody::Sketch {
        start: start as u64,
        cells: Bytes(sketch::to_bytes(&sketch::encode(keys, start, count))),
    }
}

/// Adds the peer's cells for a range to its decoder and answers: the
/// decoded difference, a request for more cells, or (the cells did not
/// fit what came before, or will not decode within the bounds) a split of
/// the range.
#[allow(clippy::too_many_arguments)]
fn decode(
    range: Range<'_>,
    start: u64,
    theirs: &Bytes,
    decoders: &mut Decoders,
    params: &Params,
    budget: &mut usize,
    reply: &mut Vec<RangePart>,
    out: &mut Processed,
) {
    let Range { set, lower, upper } = range;
    let fall_back = |decoders: &mut Decoders,
                     budget: &mut usize,
                     reply: &mut Vec<RangePart>,
                     out: &mut Processed| {
        decoders.drop_range(lower);
        out.sketches_split += 1;
        split(set, lower, upper, params, budget, reply);
    };
    let Some(cells) = Cell::read_all(&theirs.0) else {
        return fall_back(decoders, budget, reply, out);
    };
    if start == 0 {
        decoders.drop_range(lower);
        decoders.ranges.insert(
            lower.cloned(),
            Decoding {
                upper: upper.cloned(),
                decoder: Decoder::default(),
                asked: SKETCH_FIRST_CELLS,
                listed: Vec::new(),
            },
        );
    }
    let fits = decoders.ranges.get(&lower.cloned()).is_some_and(|d| {
        d.upper.as_ref() == upper
            && d.decoder.len() as u64 == start
            && cells.len() >= d.asked
            && d.listed.is_empty()
    });
    if !fits || decoders.cells + cells.len() > MAX_SESSION_CELLS {
        return fall_back(decoders, budget, reply, out);
    }
    decoders.cells += cells.len();
    let Some(decoding) = decoders.ranges.get_mut(&lower.cloned()) else {
        return fall_back(decoders, budget, reply, out);
    };
    match decoding.decoder.extend(&cells, range.keys()) {
        Outcome::Inconsistent => fall_back(decoders, budget, reply, out),
        Outcome::Needs(want) => {
            let have = decoding.decoder.len();
            let want = want.min(MAX_SKETCH_CELLS);
            if want <= have {
                return fall_back(decoders, budget, reply, out);
            }
            decoding.asked = want - have;
            push(
                reply,
                upper,
                RangeBody::SketchRequest {
                    start: have as u64,
                    count: (want - have) as u64,
                },
            );
        }
        Outcome::Decoded => {
            let ours: HashSet<Key> = decoding.decoder.ours().iter().copied().collect();
            let docs: Vec<DocId> = range
                .entries()
                .filter(|(_, e)| ours.contains(&e.key()))
                .map(|(id, _)| id.clone())
                .collect();
            let keys = decoding.decoder.theirs();
            // Every key decoded as this side's must be one of its items;
            // otherwise the cells were not a difference of the two sets.
            if docs.len() != ours.len() || docs.len() + keys.len() > *budget {
                return fall_back(decoders, budget, reply, out);
            }
            *budget -= docs.len() + keys.len();
            out.sketches_decoded += 1;
            let keys = Bytes(keys.iter().flat_map(|k| k.to_be_bytes()).collect());
            decoders.cells -= decoding.decoder.len();
            decoding.decoder.release_cells();
            decoding.listed = docs.clone();
            out.equal_except
                .push((lower.cloned(), upper.cloned(), docs.clone()));
            push(reply, upper, RangeBody::Decoded { docs, keys });
        }
    }
}

/// Answers a decoded sketch: every document it names differs (the
/// initiator's listed, this side's by key). This side syncs those it holds
/// of both; its own the initiator lacks entirely go back listed, as in an
/// answer to a list (the initiator learns of them; this side bundles
/// them); the initiator's this side lacks entirely are marked in the
/// answer's bitmap, for the initiator to send whole.
fn answer_decoded(
    range: Range<'_>,
    docs: &[DocId],
    keys: &Bytes,
    budget: &mut usize,
    reply: &mut Vec<RangePart>,
    out: &mut Processed,
) {
    let wanted: HashSet<Key> = keys
        .0
        .chunks_exact(SKETCH_KEY_LEN)
        .map(|c| {
            let mut k = [0u8; SKETCH_KEY_LEN];
            k.copy_from_slice(c);
            Key::from_be_bytes(k)
        })
        .collect();
    let mut lacking = vec![0u8; docs.len().div_ceil(8)];
    let mut differing = Vec::new();
    for (k, doc) in docs.iter().enumerate() {
        if !contains(range.lower, range.upper, doc) {
            continue;
        }
        differing.push(doc.clone());
        if range.set.get(doc).is_some() {
            out.to_sync.push(doc.clone());
        } else {
            lacking[k / 8] |= 1 << (k % 8);
            out.learned.push(doc.clone());
        }
    }
    let theirs: BTreeSet<&DocId> = docs.iter().collect();
    let mut extras = Vec::new();
    let mut resolved = 0;
    for (id, e) in range.entries() {
        if !wanted.contains(&e.key()) {
            continue;
        }
        resolved += 1;
        differing.push(id.clone());
        out.to_sync.push(id.clone());
        if !theirs.contains(id) {
            out.absent_there.push(id.clone());
            extras.push(to_item((id, e)));
        }
    }
    if resolved == wanted.len() {
        // A key that matched nothing here came from a set that changed
        // since: then nothing is claimed equal.
        out.equal_except
            .push((range.lower.cloned(), range.upper.cloned(), differing));
    }
    push_answer(range, extras, Some(Bytes(lacking)), budget, reply);
}

/// Reads the answer to a decoded sketch: its items and this side's listed
/// documents the bitmap does not mark, the other side syncs or bundles;
/// those it marks (it lacks them entirely), this side sends.
fn learn_from_decoded_answer(
    listed: Vec<DocId>,
    theirs: &[Item],
    lacking: Option<&Bytes>,
    out: &mut Processed,
) {
    out.learned.extend(theirs.iter().map(|i| i.doc.clone()));
    for (k, doc) in listed.into_iter().enumerate() {
        let absent = lacking
            .and_then(|b| b.0.get(k / 8))
            .is_some_and(|b| b & (1 << (k % 8)) != 0);
        if absent {
            out.to_sync.push(doc.clone());
            out.absent_there.push(doc);
        } else {
            out.learned.push(doc);
        }
    }
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
    let range = Range { set, lower, upper };
    push_answer(range, extras, Some(Bytes(lacking)), budget, reply);
}

/// Sends an answer: this side's items the other lacks (as many as the
/// budget allows, the rest of the range continuing by fingerprint).
fn push_answer(
    range: Range<'_>,
    extras: Vec<Item>,
    lacking: Option<Bytes>,
    budget: &mut usize,
    reply: &mut Vec<RangePart>,
) {
    let take = extras.len().min(*budget);
    *budget -= take;
    if take == extras.len() {
        let items = extras;
        push(
            reply,
            range.upper,
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
        range.upper,
        fingerprint_body(range.set.fingerprint(Some(&cut), range.upper)),
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

    /// Runs a whole session A starts (B answering with sketches if
    /// `sketches`); returns (to_sync on either side, learned on either
    /// side, messages). Checks that every document a side found absent on
    /// the other is one of its own the other lacks.
    fn session(
        a: &ItemSet,
        b: &ItemSet,
        params: &Params,
        sketches: bool,
    ) -> (BTreeSet<DocId>, BTreeSet<DocId>, usize) {
        let mut decoders = Decoders::default();
        let mut msg = initiate(a, params);
        let mut synced = BTreeSet::new();
        let mut learned = BTreeSet::new();
        let mut knows = [BTreeSet::new(), BTreeSet::new()];
        let mut messages = 1;
        let mut turn_b = true;
        loop {
            let (side, other, role) = if turn_b {
                (b, a, Side::Responder { sketches })
            } else {
                (
                    a,
                    b,
                    Side::Initiator {
                        decoders: &mut decoders,
                        sketches: true,
                    },
                )
            };
            let p = process(side, &msg, params, role);
            for doc in &p.absent_there {
                assert!(side.get(doc).is_some() && other.get(doc).is_none(), "{doc}");
                assert!(p.to_sync.binary_search(doc).is_ok(), "{doc}");
            }
            for doc in side.items.keys() {
                if p.shows_equal(doc) {
                    assert_eq!(side.get(doc), other.get(doc), "{doc} shown equal");
                }
            }
            let knowing = &mut knows[usize::from(turn_b)];
            knowing.extend(p.to_sync.iter().chain(&p.learned).cloned());
            synced.extend(p.to_sync);
            learned.extend(p.learned);
            if p.reply.is_empty() {
                assert!(decoders.cells() <= MAX_SESSION_CELLS);
                // Each side knows every difference: the one it syncs or
                // sends, and the one the other side does.
                assert_eq!(knows[0], knows[1]);
                return (synced, learned, messages);
            }
            assert!(messages < 100, "no termination");
            messages += 1;
            msg = p.reply;
            turn_b = !turn_b;
        }
    }

    fn run(a: &ItemSet, b: &ItemSet, params: &Params) -> (BTreeSet<DocId>, BTreeSet<DocId>, usize) {
        session(a, b, params, true)
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
        let p = answer(&a, &initiate(&b, &params));
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

    #[test]
    fn a_few_differences_in_a_large_set_cost_about_an_item_each() {
        let (a, b) = changed_every(20_000, 1_000);
        let want = expected(&a, &b);
        assert_eq!(want.len(), 20);
        let params = Params::default();
        let mut decoders = Decoders::default();
        let mut msg = initiate(&a, &params);
        let (mut bytes, mut messages, mut decoded, mut found) = (0, 0, 0, BTreeSet::new());
        loop {
            bytes += encoded(&msg);
            messages += 1;
            let p = if messages % 2 == 1 {
                process(&b, &msg, &params, Side::Responder { sketches: true })
            } else {
                process(
                    &a,
                    &msg,
                    &params,
                    Side::Initiator {
                        decoders: &mut decoders,
                        sketches: true,
                    },
                )
            };
            assert_eq!(p.sketches_split, 0);
            decoded += p.sketches_decoded;
            found.extend(p.to_sync.iter().chain(&p.learned).cloned());
            if p.reply.is_empty() {
                break;
            }
            msg = p.reply;
        }
        assert_eq!(found, want);
        assert_eq!(decoded, 1);
        // Any protocol sends each differing item once.
        let floor: usize = want
            .iter()
            .map(|doc| {
                encoded(&Item {
                    doc: doc.clone(),
                    digest: Bytes(vec![0; ITEM_DIGEST_LEN]),
                })
            })
            .sum();
        assert!(bytes <= 3 * floor, "{bytes} bytes, floor {floor}");
        assert!(messages <= 8, "{messages} messages");
    }

    /// Two sets of `n` documents, every `every`-th at another digest in b.
    fn changed_every(n: u64, every: u64) -> (ItemSet, ItemSet) {
        let mut a = ItemSet::new();
        let mut b = ItemSet::new();
        for i in 0..n {
            a.insert(id(i), &digest(i));
            b.insert(id(i), &digest(if i % every == 0 { i + 1 } else { i }));
        }
        (a, b)
    }

    /// The answering side's reply to `msg`, with sketches, default params.
    fn answer(set: &ItemSet, msg: &[RangePart]) -> Processed {
        process(
            set,
            msg,
            &Params::default(),
            Side::Responder { sketches: true },
        )
    }

    /// The CBOR size of a value.
    fn encoded<T: serde::Serialize>(value: &T) -> usize {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out.len()
    }

    #[test]
    fn an_initiator_that_may_not_send_sketch_bodies_splits_the_range() {
        let (a, b) = changed_every(2_000, 100);
        let params = Params::default();
        let answer = answer(&b, &initiate(&a, &params));
        assert!(matches!(answer.reply[0].body, RangeBody::Sketch { .. }));
        let mut decoders = Decoders::default();
        let side = Side::Initiator {
            decoders: &mut decoders,
            sketches: false,
        };
        let p = process(&a, &answer.reply, &params, side);
        assert_eq!(p.sketches_split, 1);
        assert!(p.reply.iter().all(|part| matches!(
            part.body,
            RangeBody::Fingerprint { .. } | RangeBody::Items { .. } | RangeBody::Skip
        )));
        assert_eq!(decoders.cells(), 0);
    }

    /// `msg` with every sketch window cut to its first `keep` cells.
    fn cut_windows(msg: &[RangePart], keep: usize) -> Vec<RangePart> {
        let mut msg = msg.to_vec();
        for part in &mut msg {
            if let RangeBody::Sketch { cells, .. } = &mut part.body {
                cells.0.truncate(keep * super::super::wire::SKETCH_CELL_LEN);
            }
        }
        msg
    }

    fn as_initiator<'a>(decoders: &'a mut Decoders) -> Side<'a> {
        Side::Initiator {
            decoders,
            sketches: true,
        }
    }

    #[test]
    fn a_window_shorter_than_asked_for_ends_decoding_with_a_split() {
        // 250 differences: more than the first 32 cells decode.
        let (a, b) = changed_every(5_000, 20);
        let params = Params::default();
        let first = answer(&b, &initiate(&a, &params)).reply;

        let mut decoders = Decoders::default();
        let cut = cut_windows(&first, SKETCH_FIRST_CELLS - 1);
        let p = process(&a, &cut, &params, as_initiator(&mut decoders));
        assert_eq!(p.sketches_split, 1, "a first window under the first cells");
        assert_eq!(decoders.cells(), 0);

        let mut decoders = Decoders::default();
        let p = process(&a, &first, &params, as_initiator(&mut decoders));
        let asked = p
            .reply
            .iter()
            .find_map(|part| match part.body {
                RangeBody::SketchRequest { count, .. } => Some(count as usize),
                _ => None,
            })
            .unwrap();
        let second = answer(&b, &p.reply).reply;
        let mut whole = decoders.clone();
        let p = process(
            &a,
            &cut_windows(&second, asked - 1),
            &params,
            as_initiator(&mut decoders),
        );
        assert_eq!(p.sketches_split, 1, "one cell fewer than asked for");
        assert_eq!(decoders.cells(), 0);
        // The whole window goes on decoding.
        let p = process(&a, &second, &params, as_initiator(&mut whole));
        assert_eq!(p.sketches_split, 0);
        assert!(whole.cells() > SKETCH_FIRST_CELLS || p.sketches_decoded == 1);
    }

    #[test]
    fn a_set_changing_between_sketch_windows_is_split_instead() {
        let (mut a, b) = changed_every(5_000, 20);
        let params = Params::default();
        let mut decoders = Decoders::default();
        let mut msg = initiate(&a, &params);
        let mut found = BTreeSet::new();
        let mut changed = false;
        let mut split = 0;
        for turn in 0..100 {
            let p = if turn % 2 == 0 {
                process(&b, &msg, &params, Side::Responder { sketches: true })
            } else {
                let p = process(
                    &a,
                    &msg,
                    &params,
                    Side::Initiator {
                        decoders: &mut decoders,
                        sketches: true,
                    },
                );
                if !changed && decoders.cells() > 0 {
                    // a's set changes while it decodes: the next window
                    // subtracts other cells than the first did.
                    for i in 0..500 {
                        a.insert(id(i), &digest(i + 7));
                    }
                    changed = true;
                }
                split += p.sketches_split;
                p
            };
            found.extend(p.to_sync.iter().chain(&p.learned).cloned());
            if p.reply.is_empty() {
                break;
            }
            msg = p.reply;
        }
        assert!(changed && split > 0, "changed {changed}, split {split}");
        // What was found is real; the next session finds the rest.
        assert!(found.is_subset(
            &expected(&a, &b)
                .union(&(0..5_000).step_by(20).map(id).collect())
                .cloned()
                .collect()
        ));
        let (synced, _, _) = run(&a, &b, &params);
        assert_eq!(synced, expected(&a, &b));
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
            sketch_min_items in 0usize..100,
        ) {
            let mut a = ItemSet::new();
            let mut b = ItemSet::new();
            for i in &common {
                a.insert(id(*i), &digest(*i));
                b.insert(id(*i), &digest(if changed.contains(i) { i + 1 } else { *i }));
            }
            for i in &only_a { a.insert(id(*i), &digest(*i)); }
            for i in &only_b { b.insert(id(*i), &digest(*i)); }
            let params = Params { branching, item_threshold: threshold, max_items: 64, sketch_min_items };
            let (synced, learned, _) = run(&a, &b, &params);
            let want = expected(&a, &b);
            proptest::prop_assert_eq!(&synced, &want);
            proptest::prop_assert!(learned.is_subset(&want));
        }
    }
}
