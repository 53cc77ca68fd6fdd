//! Range-based reconciliation between two item sets drawn from the input,
//! with the parameters drawn too, every message passed through the wire
//! encoding as peers exchange it, once with sketches and once without; and
//! hostile messages (sketch bodies included) against a set, on either side
//! of a session.
//!
//! Must hold: the exchange ends; every message lists at most
//! `max_items` items; the documents the two sides start syncing or learn
//! about are exactly the symmetric difference of the sets (present on one
//! side only, or with different digests); a message from a hostile peer is
//! answered without a panic and within the item budget.

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::{Arbitrary, Unstructured};

use crate::doc_id::DocId;
use crate::replication::ids::ClusterId;
use crate::replication::reconcile::MAX_SESSION_CELLS;
use crate::replication::reconcile::{initiate, process, Decoders, ItemSet, Params, Side};
use crate::replication::wire::{
    Bytes, Envelope, Item, Message, RangeBody, RangePart, Reconcile, MAX_FRAME_BYTES,
    SKETCH_CELL_LEN, SKETCH_KEY_LEN,
};

/// Messages an exchange may take before it counts as not ending.
const MAX_ROUNDS: usize = 10_000;

/// Characters document ids are drawn from: few, so ids share prefixes and
/// range bounds have to split them finely.
const ID_CHARS: [char; 5] = ['a', 'b', '/', '-', 'z'];

/// Where an item is and whether the two sides agree on it.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Placement {
    Both,
    OnlyA,
    OnlyB,
    Differ,
}

/// One document of the input.
#[derive(Arbitrary, Debug)]
struct InputItem {
    id: Vec<u8>,
    placement: Placement,
    digest: u8,
}

/// A range of a hostile message.
#[derive(Arbitrary, Debug)]
struct HostilePart {
    upper: Option<Vec<u8>>,
    kind: u8,
    count: u64,
    fingerprint: Vec<u8>,
    items: Vec<(Vec<u8>, Vec<u8>)>,
    reply: bool,
    lacking: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    branching: u8,
    item_threshold: u8,
    max_items: u8,
    items: Vec<InputItem>,
    hostile: Vec<HostilePart>,
}

/// Runs one exchange; panics if a property fails.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let params = Params {
        branching: usize::from(input.branching % 16),
        item_threshold: usize::from(input.item_threshold % 16),
        max_items: 1 + usize::from(input.max_items % 64),
        // The high bits of the branching byte: sketches from ranges of any size.
        sketch_min_items: usize::from(input.branching / 16),
    };
    let (a, b, expected) = sets(&input.items);
    for sketches in [false, true] {
        assert_eq!(
            exchange(&a, &b, &params, sketches),
            expected,
            "wrong difference (sketches: {sketches})"
        );
    }
    hostile(&a, &input.hostile, &params);
}

/// The two sets and their symmetric difference.
fn sets(items: &[InputItem]) -> (ItemSet, ItemSet, BTreeSet<DocId>) {
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for item in items {
        let Some(id) = doc_id(&item.id) else { continue };
        let digest = [item.digest; 32];
        let other = [!item.digest; 32];
        a.remove(&id);
        b.remove(&id);
        match item.placement {
            Placement::Both => {
                a.insert(id.clone(), digest);
                b.insert(id, digest);
            }
            Placement::OnlyA => drop(a.insert(id, digest)),
            Placement::OnlyB => drop(b.insert(id, digest)),
            Placement::Differ => {
                a.insert(id.clone(), digest);
                b.insert(id, other);
            }
        }
    }
    let expected = a
        .keys()
        .chain(b.keys())
        .filter(|id| a.get(*id) != b.get(*id))
        .cloned()
        .collect();
    let set = |m: BTreeMap<DocId, [u8; 32]>| {
        let mut s = ItemSet::new();
        m.into_iter().for_each(|(id, d)| s.insert(id, &d));
        s
    };
    (set(a), set(b), expected)
}

/// Runs the exchange A starts (B answering with sketches if `sketches`);
/// returns every document either side found.
fn exchange(a: &ItemSet, b: &ItemSet, params: &Params, sketches: bool) -> BTreeSet<DocId> {
    let mut found = BTreeSet::new();
    let mut message = through_wire(initiate(a, params));
    let sides = [a, b];
    let mut decoders = Decoders::default();
    let mut turn = 1;
    for _ in 0..MAX_ROUNDS {
        check_budget(&message, params);
        let side = if turn == 0 {
            Side::Initiator {
                decoders: &mut decoders,
                sketches: true,
            }
        } else {
            Side::Responder { sketches }
        };
        let out = process(sides[turn], &message, params, side);
        found.extend(out.to_sync);
        found.extend(out.learned);
        if out.reply.is_empty() {
            return found;
        }
        message = through_wire(out.reply);
        turn ^= 1;
    }
    panic!("reconciliation did not end within {MAX_ROUNDS} messages");
}

/// Encodes and decodes a message as peers do.
fn through_wire(ranges: Vec<RangePart>) -> Vec<RangePart> {
    // The harness's cluster id is a valid constant.
    #[allow(clippy::expect_used)]
    let envelope = Envelope {
        cluster: ClusterId::new("fuzz").expect("cluster id"),
        message: Message::Reconcile(Reconcile { session: 1, ranges }),
    };
    match Envelope::decode(&envelope.encode(), MAX_FRAME_BYTES) {
        Ok(Envelope {
            message: Message::Reconcile(r),
            ..
        }) => {
            assert_eq!(Message::Reconcile(r.clone()), envelope.message);
            r.ranges
        }
        other => panic!("reconcile message does not survive the wire: {other:?}"),
    }
}

/// No message lists more items than the budget allows.
fn check_budget(message: &[RangePart], params: &Params) {
    let listed: usize = message
        .iter()
        .map(|p| match &p.body {
            RangeBody::Items { items, .. } => items.len(),
            RangeBody::Decoded { docs, keys } => docs.len() + keys.0.len() / SKETCH_KEY_LEN,
            _ => 0,
        })
        .sum();
    assert!(
        listed <= params.max_items,
        "a message lists {listed} items; the budget is {}",
        params.max_items
    );
}

/// A message no honest peer would send: answered without a panic, and the
/// answer within the budget.
fn hostile(set: &ItemSet, parts: &[HostilePart], params: &Params) {
    let message: Vec<RangePart> = parts.iter().take(64).map(hostile_part).collect();
    let mut decoders = Decoders::default();
    for sketches in [false, true] {
        let out = process(set, &message, params, Side::Responder { sketches });
        check_budget(&out.reply, params);
        let side = Side::Initiator {
            decoders: &mut decoders,
            sketches,
        };
        let out = process(set, &message, params, side);
        check_budget(&out.reply, params);
        // Without sketches, no reply holds a sketch body.
        let sketch_body = |p: &RangePart| {
            matches!(
                p.body,
                RangeBody::Sketch { .. }
                    | RangeBody::SketchRequest { .. }
                    | RangeBody::Decoded { .. }
            )
        };
        assert!(sketches || !out.reply.iter().any(sketch_body));
    }
    assert!(decoders.cells() <= MAX_SESSION_CELLS);
}

fn hostile_part(p: &HostilePart) -> RangePart {
    let bytes = |v: &[u8]| Bytes(v.iter().copied().take(32).collect());
    let body = match p.kind % 6 {
        0 => RangeBody::Skip,
        1 => RangeBody::Fingerprint {
            fingerprint: bytes(&p.fingerprint),
            count: p.count,
        },
        2 => RangeBody::Items {
            items: p
                .items
                .iter()
                .take(64)
                .filter_map(|(id, digest)| {
                    Some(Item {
                        doc: doc_id(id)?,
                        digest: bytes(digest),
                    })
                })
                .collect(),
            reply: p.reply,
            lacking: p.lacking.as_deref().map(bytes),
        },
        3 => RangeBody::Sketch {
            start: p.count % 64,
            cells: Bytes(
                p.fingerprint
                    .iter()
                    .copied()
                    .take(8 * SKETCH_CELL_LEN)
                    .collect(),
            ),
        },
        4 => RangeBody::SketchRequest {
            start: p.count,
            count: p.count.rotate_left(32),
        },
        _ => RangeBody::Decoded {
            docs: p
                .items
                .iter()
                .take(64)
                .filter_map(|(id, _)| doc_id(id))
                .collect(),
            keys: Bytes(p.fingerprint.iter().copied().take(64).collect()),
        },
    };
    RangePart {
        upper: p.upper.as_deref().and_then(doc_id),
        body,
    }
}

/// A valid document id spelled from `raw`, or `None`.
fn doc_id(raw: &[u8]) -> Option<DocId> {
    let id: String = raw
        .iter()
        .take(12)
        .map(|c| ID_CHARS[usize::from(*c) % ID_CHARS.len()])
        .collect();
    DocId::new(id).ok()
}
