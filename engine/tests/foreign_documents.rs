//! Documents whose history Causeway did not start: made by another Automerge
//! application (any actor, any root), imported with their change hashes
//! unchanged, and the lineage rule at the client boundary (see
//! `causeway_engine::lineage`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeSet;

use causeway_engine::automerge::sync::SyncDoc;
use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{
    ActorId, AutoCommit, Automerge, Change, ChangeHash, ObjType, ReadDoc, ScalarValue, ROOT,
};
use causeway_engine::{Engine, Error, Origin, SyncMessage, SyncState};
use common::{fresh, id};
use serde_json::json;

/// Every change of `doc`, in causal order.
fn changes_of(doc: &Automerge) -> Vec<Change> {
    doc.get_changes(&[])
}

fn raw(changes: &[Change]) -> Vec<Vec<u8>> {
    changes.iter().map(|c| c.raw_bytes().to_vec()).collect()
}

/// A document as an application would make it with its own actor: every
/// kind of Automerge value and object, a delete, text with a mark, and a
/// counter incremented in a later change.
fn every_kind() -> Automerge {
    let mut doc = AutoCommit::new().with_actor(ActorId::from([0xa1; 16]));
    doc.put(ROOT, "str", "plain string").unwrap();
    doc.put(ROOT, "int", -42i64).unwrap();
    doc.put(ROOT, "uint", ScalarValue::Uint(u64::MAX)).unwrap();
    doc.put(ROOT, "f64", 2.5f64).unwrap();
    doc.put(ROOT, "bool", true).unwrap();
    doc.put(ROOT, "null", ScalarValue::Null).unwrap();
    doc.put(ROOT, "bytes", ScalarValue::Bytes(vec![0, 1, 254, 255]))
        .unwrap();
    doc.put(ROOT, "timestamp", ScalarValue::Timestamp(1_764_892_800_000))
        .unwrap();
    doc.put(ROOT, "counter", ScalarValue::counter(10)).unwrap();
    doc.put(ROOT, "gone", "deleted below").unwrap();
    let text = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
    doc.splice_text(&text, 0, 0, "hello world").unwrap();
    let list = doc.put_object(ROOT, "list", ObjType::List).unwrap();
    doc.insert(&list, 0, 1i64).unwrap();
    doc.insert(&list, 1, "two").unwrap();
    let nested = doc.insert_object(&list, 2, ObjType::Map).unwrap();
    doc.put(&nested, "deep", 3i64).unwrap();
    doc.commit();
    doc.increment(ROOT, "counter", 5).unwrap();
    doc.delete(ROOT, "gone").unwrap();
    doc.splice_text(&text, 5, 6, ", Causeway").unwrap();
    doc.mark(
        &text,
        causeway_engine::automerge::marks::Mark::new("bold".into(), true, 0, 5),
        causeway_engine::automerge::marks::ExpandMark::After,
    )
    .unwrap();
    doc.commit();
    doc.document().clone()
}

/// Syncs `doc` between two engines, as peers, until neither has more to say.
fn sync_peers(a: &Engine, b: &Engine, doc: &causeway_engine::DocId) {
    let (mut sa, mut sb) = (SyncState::new(), SyncState::new());
    for _ in 0..1_000 {
        let mut progressed = false;
        if let Some(m) = a.generate_sync_message(doc, &mut sa, 1 << 20).unwrap() {
            let m = SyncMessage::decode(&m.encode()).unwrap();
            b.receive_sync_message(doc, &mut sb, m).unwrap();
            progressed = true;
        }
        if let Some(m) = b.generate_sync_message(doc, &mut sb, 1 << 20).unwrap() {
            let m = SyncMessage::decode(&m.encode()).unwrap();
            a.receive_sync_message(doc, &mut sa, m).unwrap();
            progressed = true;
        }
        if !progressed {
            return;
        }
    }
    panic!("sync did not quiesce");
}

/// The document `engine` holds, rebuilt by Automerge from the changes it
/// hands out: what any other Automerge application would load.
fn loaded(engine: &Engine, doc: &causeway_engine::DocId) -> Automerge {
    let mut am = Automerge::new();
    for bytes in engine.changes_since(doc, &[]).unwrap() {
        am.apply_changes([Change::from_bytes(bytes).unwrap()])
            .unwrap();
    }
    am
}

fn hashes(changes: &[Change]) -> BTreeSet<ChangeHash> {
    changes.iter().map(Change::hash).collect()
}

#[test]
fn a_document_with_every_value_kind_imports_byte_for_byte_and_replicates() {
    let original = every_kind();
    let changes = changes_of(&original);
    let doc = id("imported/kinds");
    let (_da, a) = fresh();
    let outcome = a.apply_changes(&doc, &raw(&changes)).unwrap();
    assert_eq!(outcome.applied, changes.len());
    assert_eq!(a.heads(&doc).unwrap(), original.get_heads());

    // The same changes, byte for byte: no genesis added, nothing rewritten.
    let stored: BTreeSet<Vec<u8>> = a.changes_since(&doc, &[]).unwrap().into_iter().collect();
    let sent: BTreeSet<Vec<u8>> = raw(&changes).into_iter().collect();
    assert_eq!(stored, sent);

    // A peer gets it by sync and hands out the same history; Automerge
    // loads it into the same document.
    let (_db, b) = fresh();
    sync_peers(&a, &b, &doc);
    assert_eq!(b.heads(&doc).unwrap(), original.get_heads());
    let at_b = loaded(&b, &doc);
    assert_eq!(at_b.save(), original.save());
    assert_eq!(hashes(&changes_of(&at_b)), hashes(&changes));

    let rendered = b.get_json(&doc).unwrap();
    assert_eq!(
        rendered,
        json!({
            "str": "plain string",
            "int": -42,
            "uint": u64::MAX,
            "f64": 2.5,
            "bool": true,
            "null": null,
            "bytes": [0, 1, 254, 255],
            "timestamp": 1_764_892_800_000i64,
            "counter": 15,
            "text": "hello, Causeway",
            "list": [1, "two", {"deep": 3}],
        })
    );
    // The mark came through too.
    let (_, text) = at_b.get(ROOT, "text").unwrap().unwrap();
    let marks = at_b.marks(&text).unwrap();
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].name(), "bold");
    assert_eq!((marks[0].start, marks[0].end), (0, 5));

    // A write through the engine continues the imported history.
    a.merge_json(&doc, &json!({"int": 7})).unwrap();
    let continued = loaded(&a, &doc);
    assert_eq!(continued.get_changes(&[]).len(), changes.len() + 1);
    let root_count = continued
        .get_changes(&[])
        .iter()
        .filter(|c| c.deps().is_empty())
        .count();
    assert_eq!(root_count, 1, "a native write added no genesis");
}

#[test]
fn a_concurrent_history_imports_in_any_order() {
    let mut first = AutoCommit::new().with_actor(ActorId::from([0xb1; 16]));
    first.put(ROOT, "title", "shared").unwrap();
    let items = first.put_object(ROOT, "items", ObjType::List).unwrap();
    first.commit();
    let mut second = first.fork().with_actor(ActorId::from([0xb2; 16]));
    for i in 0..3i64 {
        first.insert(&items, 0, i).unwrap();
        first.commit();
        second.insert(&items, 0, 100 + i).unwrap();
        second.put(ROOT, "title", format!("second {i}")).unwrap();
        second.commit();
    }
    first.merge(&mut second).unwrap();
    first.put(ROOT, "merged", true).unwrap();
    first.commit();
    let merged = first.document().clone();
    assert!(merged.get_heads().len() == 1);
    let mut changes = changes_of(&merged);
    // Newest first: every change but the root waits for its dependencies.
    changes.reverse();

    let (_d, engine) = fresh();
    let doc = id("imported/concurrent");
    let (tail, head) = changes.split_at(changes.len() - 1);
    let outcome = engine.apply_changes(&doc, &raw(tail)).unwrap();
    assert_eq!(outcome.applied, 0);
    assert_eq!(outcome.held, tail.len());
    let outcome = engine.apply_changes(&doc, &raw(head)).unwrap();
    // The root, and with it every held change.
    assert_eq!(outcome.applied, changes.len());
    assert_eq!(outcome.held, 0);
    assert_eq!(engine.heads(&doc).unwrap(), merged.get_heads());
    // The same changes; Automerge may order concurrent ones differently in
    // a saved document, so the change sets and contents are compared.
    assert_eq!(
        hashes(&changes_of(&loaded(&engine, &doc))),
        hashes(&changes)
    );
    let json = engine.get_json(&doc).unwrap();
    assert_eq!(json["items"].as_array().unwrap().len(), 6);
    assert_eq!(json["merged"], json!(true));
    assert_eq!(
        json,
        causeway_engine::json::render(&merged, None, 64).unwrap()
    );
}

#[test]
fn a_client_cannot_add_a_second_root_to_a_document_with_history() {
    let (_d, engine) = fresh();
    let doc = id("imported/one-root");
    let mut app = AutoCommit::new().with_actor(ActorId::from([0xc1; 16]));
    app.put(ROOT, "v", 1i64).unwrap();
    app.commit();
    engine
        .apply_changes(&doc, &raw(&changes_of(app.document())))
        .unwrap();
    let before = engine.heads(&doc).unwrap();

    // Another application's document sent to the same id.
    let mut stranger = AutoCommit::new().with_actor(ActorId::from([0xc2; 16]));
    stranger.put(ROOT, "w", 2i64).unwrap();
    stranger.commit();
    let err = engine
        .apply_changes(&doc, &raw(&changes_of(stranger.document())))
        .unwrap_err();
    assert!(matches!(err, Error::WrongDocument { .. }), "{err}");
    assert_eq!(engine.heads(&doc).unwrap(), before);

    // The same through a client sync session.
    let mut theirs = SyncState::new();
    let mut ours = SyncState::new();
    let mut stranger_doc = stranger.document().clone();
    let opening = engine
        .generate_sync_message(&doc, &mut ours, 1 << 20)
        .unwrap()
        .unwrap();
    stranger_doc
        .receive_sync_message(&mut theirs, opening)
        .unwrap();
    let mut carrying = None;
    while let Some(m) = stranger_doc.generate_sync_message(&mut theirs) {
        if !m.changes.is_empty() {
            carrying = Some(m);
            break;
        }
        engine
            .receive_client_sync_message(&doc, &mut ours, m)
            .unwrap();
        let Some(reply) = engine
            .generate_sync_message(&doc, &mut ours, 1 << 20)
            .unwrap()
        else {
            break;
        };
        // The stranger must not take our history, or it would have a
        // dependency-carrying change to send; drop the reply's changes.
        let mut reply = reply;
        reply.changes = causeway_engine::automerge::sync::ChunkList::empty();
        stranger_doc
            .receive_sync_message(&mut theirs, reply)
            .unwrap();
    }
    let carrying = carrying.expect("the stranger offers its root");
    let err = engine
        .receive_client_sync_message(&doc, &mut ours, carrying)
        .unwrap_err();
    assert!(matches!(err, Error::WrongDocument { .. }), "{err}");
    assert_eq!(engine.heads(&doc).unwrap(), before);

    // The document's own genesis is never foreign to it.
    let genesis = causeway_engine::lineage::genesis_change(&doc);
    engine
        .apply_changes(&doc, &[genesis.raw_bytes().to_vec()])
        .unwrap();
}

/// Node A writes `partitioned/x` through its JSON API (rooted in the id's
/// genesis) while node B imports an application's document under the same
/// id. When the partition heals, each takes the other's root from its peer,
/// and both end with the same merged document.
#[test]
fn histories_started_on_two_sides_of_a_partition_merge() {
    let doc = id("partitioned/x");
    let (_da, a) = fresh();
    let (_db, b) = fresh();
    a.put_json(&doc, &json!({"from_a": "native"})).unwrap();
    let mut app = AutoCommit::new().with_actor(ActorId::from([0xd1; 16]));
    app.put(ROOT, "from_b", "imported").unwrap();
    app.commit();
    b.apply_changes(&doc, &raw(&changes_of(app.document())))
        .unwrap();

    sync_peers(&a, &b, &doc);
    assert_eq!(a.heads(&doc).unwrap(), b.heads(&doc).unwrap());
    assert_eq!(a.heads(&doc).unwrap().len(), 2);
    let expected = json!({"from_a": "native", "from_b": "imported"});
    assert_eq!(a.get_json(&doc).unwrap(), expected);
    assert_eq!(b.get_json(&doc).unwrap(), expected);

    // Two imports of different histories meet the same way.
    let other = id("partitioned/y");
    let mut one = AutoCommit::new().with_actor(ActorId::from([0xd2; 16]));
    one.put(ROOT, "one", 1i64).unwrap();
    one.commit();
    let mut two = AutoCommit::new().with_actor(ActorId::from([0xd3; 16]));
    two.put(ROOT, "two", 2i64).unwrap();
    two.commit();
    a.apply_changes(&other, &raw(&changes_of(one.document())))
        .unwrap();
    b.apply_changes(&other, &raw(&changes_of(two.document())))
        .unwrap();
    sync_peers(&a, &b, &other);
    assert_eq!(a.get_json(&other).unwrap(), json!({"one": 1, "two": 2}));
    assert_eq!(b.get_json(&other).unwrap(), json!({"one": 1, "two": 2}));
}

#[test]
fn a_client_sync_imports_a_new_document_and_announces_it_as_a_client_write() {
    let (_d, engine) = fresh();
    let doc = id("imported/by-sync");
    let events = engine.subscribe("imported/").unwrap();
    let mut app = AutoCommit::new().with_actor(ActorId::from([0xe1; 16]));
    app.put(ROOT, "k", "v").unwrap();
    app.commit();
    let mut app = app.document().clone();
    let (mut theirs, mut ours) = (SyncState::new(), SyncState::new());
    for _ in 0..100 {
        let mut progressed = false;
        if let Some(m) = app.generate_sync_message(&mut theirs) {
            engine
                .receive_client_sync_message(&doc, &mut ours, m)
                .unwrap();
            progressed = true;
        }
        if let Some(m) = engine
            .generate_sync_message(&doc, &mut ours, 1 << 20)
            .unwrap()
        {
            app.receive_sync_message(&mut theirs, m).unwrap();
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    assert_eq!(engine.heads(&doc).unwrap(), app.get_heads());
    let event = events
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("an event for the import");
    assert_eq!(event.origin, Origin::Client);
    assert_eq!(event.doc, doc);
    // With its root, which no other replica could make.
    let sent: BTreeSet<&[u8]> = event.changes.iter().map(Vec::as_slice).collect();
    let made: Vec<Change> = changes_of(&app);
    assert!(made.iter().all(|c| sent.contains(c.raw_bytes())));
}

/// automerge-repo clients key what a server holds by its storage id, so it
/// must name the store for good: kept across reopening, distinct per store.
#[test]
fn the_store_id_is_a_uuid_kept_across_reopening() {
    let (dir, engine) = fresh();
    let first = engine.store_id().to_string();
    assert_eq!(first.len(), 36);
    assert_eq!(&first[14..15], "4", "a version 4 UUID: {first}");
    let engine = common::reopen(&dir, engine, common::buffered());
    assert_eq!(engine.store_id(), first);
    let (_other_dir, other) = fresh();
    assert_ne!(other.store_id(), first);
}
