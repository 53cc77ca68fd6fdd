//! Hostile input from clients and peers: changes that break a document shape
//! limit are refused before anything is stored, documents already beyond
//! the limits are read as errors rather than walked, and sync messages that
//! would make Automerge fail or do unbounded work are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use causeway_engine::automerge::sync::{BloomFilter, Have, SyncDoc};
use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{Automerge, ChangeHash, ObjType, ReadDoc, ScalarValue, ROOT};
use causeway_engine::json;
use causeway_engine::lineage::genesis_change;
use causeway_engine::{
    DocId, Engine, EngineConfig, Error, ShapeLimits, ShapeViolation, SyncMessage, SyncState,
};
use common::{buffered, fresh, id, reopen};
use serde_json::json;

/// A client's own copy of `doc`: its history starts at the document's
/// genesis, as every copy's does.
fn client_copy(doc: &DocId) -> Automerge {
    let mut am = Automerge::new();
    am.apply_changes([genesis_change(doc)]).unwrap();
    am
}

/// Nests maps `levels` deep under key `key` of the root, in one change.
fn nest(am: &mut Automerge, key: &str, levels: usize) {
    let mut tx = am.transaction();
    let mut obj = tx.put_object(ROOT, key, ObjType::Map).unwrap();
    for _ in 1..levels {
        obj = tx.put_object(&obj, "m", ObjType::Map).unwrap();
    }
    tx.put(&obj, "leaf", 1).unwrap();
    tx.commit();
}

/// Nests `more` maps under the deepest map of a `nest(am, "a", levels)`
/// chain, in one change; returns that change's bytes.
fn nest_under(am: &mut Automerge, levels: usize, more: usize) -> Vec<Vec<u8>> {
    let heads = am.get_heads();
    let mut obj = ROOT;
    for depth in 0..levels {
        let key = if depth == 0 { "a" } else { "m" };
        obj = am.get(&obj, key).unwrap().unwrap().1;
    }
    let mut tx = am.transaction();
    for _ in 0..more {
        obj = tx.put_object(&obj, "m2", ObjType::Map).unwrap();
    }
    tx.commit();
    am.get_changes(&heads)
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

/// Every change of `am` but its genesis, as bytes.
fn changes(am: &Automerge) -> Vec<Vec<u8>> {
    am.get_changes(&[])
        .iter()
        .skip(1)
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

fn depth_violation(e: &Error) -> Option<(usize, usize)> {
    match e {
        Error::ShapeLimit {
            violation: ShapeViolation::Depth { depth, limit },
            ..
        } => Some((*depth, *limit)),
        _ => None,
    }
}

#[test]
fn a_change_nesting_2000_maps_is_refused_and_nothing_is_stored() {
    let doc = id("hostile/deep");
    let mut am = client_copy(&doc);
    nest(&mut am, "a", 2_000);
    let bytes = changes(&am);
    let (_dir, engine) = fresh();

    let err = engine.apply_changes(&doc, &bytes).unwrap_err();
    assert_eq!(depth_violation(&err), Some((2_000, 64)), "{err}");
    assert!(matches!(engine.heads(&doc), Err(Error::NotFound(_))));
    assert_eq!(engine.stats().shape_refused, 1);
    // The engine goes on serving: a reasonable document still writes.
    engine.put_json(&doc, &json!({"fine": {"x": 1}})).unwrap();
    assert_eq!(engine.get_json(&doc).unwrap(), json!({"fine": {"x": 1}}));
}

#[test]
fn depth_counts_the_objects_a_document_already_holds() {
    let doc = id("hostile/stacked");
    let mut am = client_copy(&doc);
    nest(&mut am, "a", 60);
    let (_dir, engine) = fresh();
    engine.apply_changes(&doc, &changes(&am)).unwrap();
    // Five more levels under the deepest map: 65 in all, each change small.
    let heads = am.get_heads();
    let new = nest_under(&mut am, 60, 5);
    let err = engine.apply_changes(&doc, &new).unwrap_err();
    assert_eq!(depth_violation(&err), Some((65, 64)), "{err}");
    assert_eq!(engine.heads(&doc).unwrap(), heads);
}

#[test]
fn operations_and_objects_per_change_are_bounded() {
    let doc = id("hostile/wide");
    let limits = ShapeLimits {
        max_ops_per_change: 500,
        max_objects_per_change: 50,
        ..ShapeLimits::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        shape: limits,
        ..buffered()
    };
    let engine = Engine::open(dir.path(), config).unwrap();

    let mut many_ops = client_copy(&doc);
    let mut tx = many_ops.transaction();
    for i in 0..501 {
        tx.put(ROOT, format!("k{i}"), i as i64).unwrap();
    }
    tx.commit();
    let err = engine.apply_changes(&doc, &changes(&many_ops)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeLimit {
                violation: ShapeViolation::Ops {
                    ops: 501,
                    limit: 500
                },
                ..
            }
        ),
        "{err}"
    );

    let mut many_objects = client_copy(&doc);
    let mut tx = many_objects.transaction();
    for i in 0..51 {
        tx.put_object(ROOT, format!("o{i}"), ObjType::List).unwrap();
    }
    tx.commit();
    let err = engine
        .apply_changes(&doc, &changes(&many_objects))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeLimit {
                violation: ShapeViolation::Objects {
                    objects: 51,
                    limit: 50
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(engine.heads(&doc), Err(Error::NotFound(_))));
}

#[test]
fn a_document_grows_only_to_its_size_limit() {
    let doc = id("hostile/large");
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        max_change_bytes: 64 << 10,
        shape: ShapeLimits {
            max_document_bytes: 200 << 10,
            ..ShapeLimits::default()
        },
        ..buffered()
    };
    let engine = Engine::open(dir.path(), config).unwrap();
    let mut refused = None;
    for i in 0..20 {
        // About 50 KB of pseudo-random text per write, which compresses
        // little.
        let mut x = i as u64 + 1;
        let text: String = (0..50_000)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                char::from(b'a' + ((x >> 59) % 26) as u8)
            })
            .collect();
        if let Err(e) = engine.merge_json(&doc, &json!({ format!("t{i}"): text })) {
            refused = Some((i, e));
            break;
        }
    }
    let (at, err) = refused.expect("the size limit was never reached");
    assert!(at >= 3, "refused too early, at write {at}");
    assert!(
        matches!(
            err,
            Error::ShapeLimit {
                violation: ShapeViolation::DocumentBytes { .. },
                ..
            }
        ),
        "{err}"
    );
    // The refused write left the document as it was.
    let value = engine.get_json(&doc).unwrap();
    assert_eq!(value.as_object().unwrap().len(), at);
}

#[test]
fn local_writes_keep_the_shape_too() {
    let doc = id("hostile/local");
    let (_dir, engine) = fresh();
    let mut value = json!(1);
    for _ in 0..1_000 {
        value = json!({ "m": value });
    }
    // Measured without recursion: no stack overflow on the way in.
    let err = engine.put_json(&doc, &value).unwrap_err();
    assert_eq!(depth_violation(&err), Some((999, 64)), "{err}");
    let err = engine
        .upsert(&doc, |tx| {
            let mut obj = tx.put_object(ROOT, "x", ObjType::Map)?;
            for _ in 0..70 {
                obj = tx.put_object(&obj, "m", ObjType::Map)?;
            }
            Ok(())
        })
        .unwrap_err();
    assert_eq!(depth_violation(&err), Some((71, 64)), "{err}");
    assert!(matches!(engine.heads(&doc), Err(Error::NotFound(_))));
    engine.put_json(&doc, &json!({"ok": true})).unwrap();
}

#[test]
fn json_writes_at_the_largest_depth_limit_take_bounded_stack() {
    let doc = id("hostile/json-deep");
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        shape: ShapeLimits {
            max_depth: 256,
            ..ShapeLimits::default()
        },
        ..EngineConfig::default()
    };
    let engine = Engine::open(dir.path(), config).unwrap();
    // 256 levels below the root, maps and lists alternating, a text at the
    // bottom: as deep as the largest depth limit allows.
    let nested = |leaf: serde_json::Value| {
        (0..255).fold(leaf, |v, i| {
            if i % 2 == 0 {
                json!([v])
            } else {
                json!({ "m": v })
            }
        })
    };
    let value = json!({ "m": nested(json!("bottom")) });
    let patch = json!({ "m": null, "p": nested(json!({ "q": 1 })) });
    let patched = json!({ "p": nested(json!({ "q": 1 })) });
    // The same 256 KiB of stack the reads are held to: writing recursively,
    // one level per frame, overflowed it.
    let read_back = std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn_scoped(s, || {
                engine.put_json(&doc, &value).unwrap();
                let written = engine.get_json(&doc).unwrap() == value;
                engine.merge_json(&doc, &patch).unwrap();
                (written, engine.get_json(&doc).unwrap() == patched)
            })
            .unwrap()
            .join()
            .unwrap()
    });
    assert_eq!(read_back, (true, true));
    let deeper = json!({ "x": nested(json!({ "y": [1] })) });
    let err = engine.put_json(&doc, &deeper).unwrap_err();
    assert_eq!(depth_violation(&err), Some((257, 256)), "{err}");
}

#[test]
fn a_stored_document_beyond_the_depth_limit_is_an_error_to_read() {
    let doc = id("hostile/old-deep");
    let dir = tempfile::tempdir().unwrap();
    let roomy = EngineConfig {
        shape: ShapeLimits {
            max_depth: 200,
            ..ShapeLimits::default()
        },
        ..buffered()
    };
    let engine = Engine::open(dir.path(), roomy).unwrap();
    let mut am = client_copy(&doc);
    nest(&mut am, "a", 150);
    engine.apply_changes(&doc, &changes(&am)).unwrap();
    assert!(engine.get_json(&doc).is_ok());

    let engine = reopen(&dir, engine, buffered());
    let err = engine.get_json(&doc).unwrap_err();
    assert_eq!(depth_violation(&err), Some((65, 64)), "{err}");
    let heads = engine.heads(&doc).unwrap();
    assert!(depth_violation(&engine.get_json_at(&doc, &heads).unwrap_err()).is_some());
    // Its changes still replicate: only walking it is refused.
    assert_eq!(engine.changes_since(&doc, &[]).unwrap().len(), 2);
}

#[test]
fn rendering_any_depth_takes_bounded_stack() {
    let doc = id("hostile/render");
    let mut am = client_copy(&doc);
    nest(&mut am, "a", 20_000);
    // 256 KiB of stack, an eighth of a tokio worker's: Automerge's own
    // recursive hydrate of this document would not fit in it. The walk
    // takes the same stack at the largest depth limit as at the default.
    let verdicts = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || [64, 256].map(|limit| json::render(&am, None, limit).map(|_| ())))
        .unwrap()
        .join()
        .unwrap();
    let too_deep = |depth, limit| Err(ShapeViolation::Depth { depth, limit });
    assert_eq!(verdicts, [too_deep(65, 64), too_deep(257, 256)]);
}

#[test]
fn render_gives_what_hydrate_gives() {
    let doc = id("hostile/same");
    let mut a = client_copy(&doc);
    let mut tx = a.transaction();
    tx.put(ROOT, "n", 1).unwrap();
    tx.put(ROOT, "f", 2.5).unwrap();
    tx.put(ROOT, "s", ScalarValue::Str("plain".into())).unwrap();
    tx.put(ROOT, "c", ScalarValue::counter(3)).unwrap();
    tx.put(ROOT, "b", ScalarValue::Bytes(vec![1, 2])).unwrap();
    tx.put(ROOT, "t", ScalarValue::Timestamp(7)).unwrap();
    tx.put(ROOT, "z", ScalarValue::Null).unwrap();
    let text = tx.put_object(ROOT, "text", ObjType::Text).unwrap();
    tx.splice_text(&text, 0, 0, "hello").unwrap();
    let list = tx.put_object(ROOT, "list", ObjType::List).unwrap();
    tx.insert(&list, 0, true).unwrap();
    let inner = tx.insert_object(&list, 1, ObjType::Map).unwrap();
    tx.put(&inner, "k", "v").unwrap();
    tx.commit();
    let before = a.get_heads();
    let mut b = a.fork();
    let mut tx = a.transaction();
    tx.increment(ROOT, "c", 4).unwrap();
    tx.put(ROOT, "n", 10).unwrap();
    tx.splice_text(&text, 5, 0, " world").unwrap();
    tx.commit();
    let mut tx = b.transaction();
    tx.increment(ROOT, "c", 5).unwrap();
    tx.put(ROOT, "n", 20).unwrap();
    tx.delete(&list, 0).unwrap();
    tx.commit();
    a.merge(&mut b).unwrap();

    let hydrated = json::to_json(&a.hydrate(None));
    assert_eq!(json::render(&a, None, 64).unwrap(), hydrated);
    assert_eq!(hydrated["c"], json!(12));
    let then = json::to_json(&a.hydrate(Some(&before)));
    assert_eq!(json::render(&a, Some(&before), 64).unwrap(), then);
}

#[test]
fn a_held_change_that_breaks_the_depth_limit_when_released_is_discarded() {
    let doc = id("hostile/held-deep");
    let mut am = client_copy(&doc);
    nest(&mut am, "a", 62);
    let first = changes(&am);
    let heads = am.get_heads();
    // Under the deepest map, three levels more: 65, but only once the
    // first change is known.
    let second = nest_under(&mut am, 62, 3);
    let (_dir, engine) = fresh();

    let outcome = engine.apply_changes(&doc, &second).unwrap();
    assert_eq!(outcome.held, 1);
    let outcome = engine.apply_changes(&doc, &first).unwrap();
    assert_eq!((outcome.applied, outcome.held), (2, 0), "genesis and first");
    assert_eq!(engine.heads(&doc).unwrap(), heads);
    assert_eq!(engine.stats().held_changes, 0);
    assert_eq!(engine.stats().shape_refused, 1);
}

/// A sync message from a peer, carrying one `have` whose Bloom filter is
/// the given encoding.
fn message_with_bloom(bloom: &[u8]) -> SyncMessage {
    let mut message = peer_message();
    message.have = vec![Have {
        last_sync: vec![],
        bloom: BloomFilter::try_from(bloom).unwrap(),
    }];
    message
}

/// What a peer that holds nothing of a document first says about it.
fn peer_message() -> SyncMessage {
    let empty = Automerge::new();
    empty.generate_sync_message(&mut SyncState::new()).unwrap()
}

/// LEB128 of the filter's three parameters, then its bits.
fn bloom(entries: u32, bits_per_entry: u32, probes: u32, bits: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for mut v in [entries, bits_per_entry, probes] {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    out.extend(std::iter::repeat_n(0xff, bits));
    out
}

fn engine_with_doc(doc: &DocId) -> (tempfile::TempDir, Engine) {
    let (dir, engine) = fresh();
    engine.put_json(doc, &json!({"x": 1})).unwrap();
    (dir, engine)
}

fn assert_refused(engine: &Engine, doc: &DocId, message: SyncMessage, what: &str) {
    let mut sync = SyncState::new();
    let err = engine
        .receive_sync_message(doc, &mut sync, message)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidSyncMessage { .. }),
        "{what}: {err}"
    );
    assert!(err.to_string().contains(what), "{err}");
    assert!(sync.their_have.is_none(), "{what}: sync state changed");
    // Answering afterwards works (and does not panic).
    engine
        .generate_sync_message(doc, &mut sync, 1 << 20)
        .unwrap();
}

#[test]
fn a_bloom_filter_with_zero_bits_is_refused() {
    let doc = id("hostile/bloom-zero");
    let (_dir, engine) = engine_with_doc(&doc);
    let message = message_with_bloom(&bloom(1, 0, 7, 0));
    assert_refused(&engine, &doc, message, "bits per entry");
}

#[test]
fn a_bloom_filter_asking_for_huge_probe_counts_is_refused() {
    let doc = id("hostile/bloom-probes");
    let (_dir, engine) = engine_with_doc(&doc);
    let message = message_with_bloom(&bloom(1, 10, u32::MAX, 2));
    assert_refused(&engine, &doc, message, "probes");
}

#[test]
fn oversized_hash_lists_and_have_counts_are_refused() {
    let doc = id("hostile/lists");
    let (_dir, engine) = engine_with_doc(&doc);
    let many: Vec<ChangeHash> = (0..16_385u32)
        .map(|i| {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_be_bytes());
            ChangeHash(h)
        })
        .collect();
    let mut message = peer_message();
    message.need = many.clone();
    assert_refused(&engine, &doc, message, "need lists 16385 hashes");
    let mut message = peer_message();
    message.have = vec![Have {
        last_sync: many,
        bloom: BloomFilter::default(),
    }];
    assert_refused(&engine, &doc, message, "have.last_sync lists");
    let mut message = peer_message();
    message.have = (0..5)
        .map(|_| Have {
            last_sync: vec![],
            bloom: BloomFilter::default(),
        })
        .collect();
    assert_refused(&engine, &doc, message, "5 have entries");
}

#[test]
fn a_well_formed_bloom_filter_still_syncs() {
    let doc = id("hostile/bloom-ok");
    let (_dir, engine) = engine_with_doc(&doc);
    let (_peer_dir, peer) = fresh();
    // Two engines sync the document through the bounded path.
    let (mut ours, mut theirs) = (SyncState::new(), SyncState::new());
    for _ in 0..10 {
        let a = engine
            .generate_sync_message(&doc, &mut ours, 1 << 20)
            .unwrap();
        if let Some(m) = a.clone() {
            peer.receive_sync_message(&doc, &mut theirs, m).unwrap();
        }
        let b = peer
            .generate_sync_message(&doc, &mut theirs, 1 << 20)
            .unwrap();
        if let Some(m) = b.clone() {
            engine.receive_sync_message(&doc, &mut ours, m).unwrap();
        }
        if a.is_none() && b.is_none() {
            break;
        }
    }
    assert_eq!(peer.get_json(&doc).unwrap(), json!({"x": 1}));
}

/// Regression: reading made-up document ids (a hostile peer's
/// acknowledgements named 4,096 per message) loaded an empty document into
/// the cache for each, and a node grew to 5 GiB under 300 such messages.
#[test]
fn looking_up_unknown_documents_loads_nothing() {
    let (_dir, engine) = fresh();
    engine.put_json(&id("real/doc"), &json!({"a": 1})).unwrap();
    let cached = engine.stats().cached_documents;
    for i in 0..10_000 {
        let made_up = id(&format!("made/up/{i}"));
        assert!(matches!(engine.heads(&made_up), Err(Error::NotFound(_))));
        assert!(matches!(engine.info(&made_up), Err(Error::NotFound(_))));
    }
    assert_eq!(engine.stats().cached_documents, cached);
    assert_eq!(engine.heads(&id("real/doc")).unwrap().len(), 1);
}
