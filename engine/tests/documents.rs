//! The embedded API: writes, reads, history, replication primitives, deletion,
//! listing and events.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{ObjType, ReadDoc, ROOT};
use causeway_engine::{Engine, Error, Origin};
use common::{buffered, fresh, id, reopen};
use serde_json::json;

#[test]
fn json_round_trips_through_a_reopen() {
    let (dir, engine) = fresh();
    let doc = id("orders/1");
    let value = json!({
        "customer": "Ada", "total": 12.5, "count": 3, "big": u64::MAX, "paid": false,
        "note": null, "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}], "tags": ["x", "y"]
    });
    let committed = engine.put_json(&doc, &value).unwrap();
    assert_eq!(committed.new_changes, 2, "genesis plus the write");
    let engine = reopen(&dir, engine, buffered());
    assert_eq!(engine.get_json(&doc).unwrap(), value);
    assert_eq!(engine.heads(&doc).unwrap(), committed.heads);
}

#[test]
fn writing_the_same_json_twice_changes_nothing() {
    let (_dir, engine) = fresh();
    let doc = id("same");
    let value = json!({"a": "text", "b": [1, 2, {"c": true}]});
    let first = engine.put_json(&doc, &value).unwrap();
    let second = engine.put_json(&doc, &value).unwrap();
    assert_eq!(second.new_changes, 0);
    assert_eq!(first.heads, second.heads);
}

#[test]
fn merge_patch_follows_rfc_7386() {
    let (_dir, engine) = fresh();
    let doc = id("patch");
    engine
        .put_json(
            &doc,
            &json!({"a": "b", "c": {"d": "e", "f": "g"}, "keep": 1}),
        )
        .unwrap();
    engine
        .merge_json(&doc, &json!({"a": "z", "c": {"f": null}, "new": [1]}))
        .unwrap();
    assert_eq!(
        engine.get_json(&doc).unwrap(),
        json!({"a": "z", "c": {"d": "e"}, "keep": 1, "new": [1]})
    );
}

#[test]
fn transactions_get_the_full_automerge_api_and_roll_back_on_error() {
    let (_dir, engine) = fresh();
    let doc = id("tx");
    engine
        .create(&doc, |tx| {
            let text = tx.put_object(ROOT, "text", ObjType::Text)?;
            tx.splice_text(&text, 0, 0, "hello")?;
            tx.put(
                ROOT,
                "n",
                causeway_engine::automerge::ScalarValue::counter(1),
            )?;
            Ok(())
        })
        .unwrap();
    engine
        .update(&doc, |tx| tx.increment(ROOT, "n", 41))
        .unwrap();
    let before = engine.heads(&doc).unwrap();
    let err = engine
        .update(&doc, |tx| {
            tx.put(ROOT, "half", 1)?;
            tx.increment(ROOT, "missing", 1)
        })
        .unwrap_err();
    assert!(matches!(err, Error::Transaction { .. }), "{err}");
    assert_eq!(engine.heads(&doc).unwrap(), before);
    let text = engine
        .read(&doc, |d| {
            let (_, text) = d.get(ROOT, "text").unwrap().unwrap();
            d.text(&text).unwrap()
        })
        .unwrap();
    assert_eq!(text, "hello");
    assert_eq!(
        engine.get_json(&doc).unwrap(),
        json!({"text": "hello", "n": 42})
    );
}

#[test]
fn create_update_and_missing_documents() {
    let (_dir, engine) = fresh();
    let doc = id("c");
    assert!(matches!(
        engine.update(&doc, |_| Ok(())),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(engine.get_json(&doc), Err(Error::NotFound(_))));
    engine.create(&doc, |_| Ok(())).unwrap();
    assert!(matches!(
        engine.create(&doc, |_| Ok(())),
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(engine.get_json(&doc).unwrap(), json!({}));
}

#[test]
fn reads_at_old_heads_and_unknown_heads() {
    let (_dir, engine) = fresh();
    let doc = id("history");
    let v1 = engine.put_json(&doc, &json!({"v": 1})).unwrap();
    engine.put_json(&doc, &json!({"v": 2})).unwrap();
    assert_eq!(
        engine.get_json_at(&doc, &v1.heads).unwrap(),
        json!({"v": 1})
    );
    let other = fresh().1;
    let foreign = other.put_json(&id("x"), &json!({"z": 0})).unwrap().heads;
    assert!(matches!(
        engine.get_json_at(&doc, &foreign),
        Err(Error::UnknownHeads { .. })
    ));
    assert!(matches!(
        engine.changes_since(&doc, &foreign),
        Err(Error::UnknownHeads { .. })
    ));
}

#[test]
fn replicas_converge_whatever_the_delivery_order() {
    let (_a_dir, a) = fresh();
    let (_b_dir, b) = fresh();
    let doc = id("shared");
    a.put_json(&doc, &json!({"from_a": 1})).unwrap();
    let base = a.heads(&doc).unwrap();
    b.apply_changes(&doc, &a.changes_since(&doc, &[]).unwrap())
        .unwrap();
    for i in 0..5 {
        a.merge_json(&doc, &json!({ format!("a{i}"): i })).unwrap();
        b.merge_json(&doc, &json!({ format!("b{i}"): i })).unwrap();
    }
    let mut from_a = a.changes_since(&doc, &base).unwrap();
    from_a.reverse();
    let outcome = b.apply_changes(&doc, &from_a).unwrap();
    assert_eq!(outcome.applied, 5);
    a.apply_changes(&doc, &b.changes_since(&doc, &base).unwrap())
        .unwrap();
    assert_eq!(a.heads(&doc).unwrap(), b.heads(&doc).unwrap());
    assert_eq!(a.get_json(&doc).unwrap(), b.get_json(&doc).unwrap());
    let again = a
        .apply_changes(&doc, &b.changes_since(&doc, &[]).unwrap())
        .unwrap();
    assert_eq!(
        (again.applied, again.held),
        (0, 0),
        "re-delivery is a no-op"
    );
    assert!(again.duplicates > 0);
}

#[test]
fn changes_with_missing_dependencies_are_held_until_they_arrive() {
    let (_a_dir, a) = fresh();
    let (_b_dir, b) = fresh();
    let doc = id("held");
    for i in 0..4 {
        a.merge_json(&doc, &json!({ "k": i })).unwrap();
    }
    let all = a.changes_since(&doc, &[]).unwrap();
    let (early, late) = all.split_at(2);
    let outcome = b.apply_changes(&doc, late).unwrap();
    assert_eq!((outcome.applied, outcome.held), (0, late.len()));
    assert_eq!(outcome.missing_deps.len(), 1);
    assert_eq!(
        b.info(&doc).unwrap_err().to_string(),
        "document held does not exist"
    );
    let outcome = b.apply_changes(&doc, early).unwrap();
    assert_eq!(outcome.applied, all.len());
    assert_eq!(b.get_json(&doc).unwrap(), json!({"k": 3}));
    assert_eq!(b.info(&doc).unwrap().held_changes, 0);
}

#[test]
fn a_long_history_delivered_backwards_one_change_at_a_time_is_held_then_applied() {
    // Two writers' interleaved histories (merges included), delivered to a
    // third replica one change per call, newest first: each waits for its
    // predecessor, and the oldest releases all of them in one call. (The
    // genesis change is never delivered: every replica can make it.)
    let (_a_dir, a) = fresh();
    let (_b_dir, b) = fresh();
    let (_c_dir, c) = fresh();
    let doc = id("backwards");
    a.put_json(&doc, &json!({"start": 0})).unwrap();
    b.apply_changes(&doc, &a.changes_since(&doc, &[]).unwrap())
        .unwrap();
    for i in 0..150 {
        a.merge_json(&doc, &json!({ format!("a{i}"): i })).unwrap();
        b.merge_json(&doc, &json!({ format!("b{i}"): i })).unwrap();
        if i % 10 == 0 {
            let base = b.heads(&doc).unwrap();
            a.apply_changes(&doc, &b.changes_since(&doc, &[]).unwrap())
                .unwrap();
            b.apply_changes(&doc, &a.changes_since(&doc, &base).unwrap())
                .unwrap();
        }
    }
    a.apply_changes(&doc, &b.changes_since(&doc, &[]).unwrap())
        .unwrap();
    let all = a.changes_since(&doc, &[]).unwrap();
    assert!(all.len() > 300);
    for (n, change) in all[2..].iter().rev().enumerate() {
        let outcome = c.apply_changes(&doc, std::slice::from_ref(change)).unwrap();
        assert_eq!((outcome.applied, outcome.held), (0, n + 1), "change {n}");
        assert!(!outcome.missing_deps.is_empty());
        assert_eq!(c.held(&doc).unwrap().changes, n + 1);
    }
    let outcome = c.apply_changes(&doc, &all[1..2]).unwrap();
    assert_eq!((outcome.applied, outcome.held), (all.len(), 0));
    assert_eq!(c.heads(&doc).unwrap(), a.heads(&doc).unwrap());
    assert_eq!(c.get_json(&doc).unwrap(), a.get_json(&doc).unwrap());
    assert_eq!(c.info(&doc).unwrap().held_changes, 0);
}

#[test]
fn independently_created_documents_with_the_same_id_merge() {
    let (_a_dir, a) = fresh();
    let (_b_dir, b) = fresh();
    let doc = id("cart/7");
    a.put_json(&doc, &json!({"a": 1})).unwrap();
    b.put_json(&doc, &json!({"b": 2})).unwrap();
    a.apply_changes(&doc, &b.changes_since(&doc, &[]).unwrap())
        .unwrap();
    assert_eq!(a.get_json(&doc).unwrap(), json!({"a": 1, "b": 2}));
}

#[test]
fn deletion_is_a_replicated_tombstone() {
    let (_a_dir, a) = fresh();
    let (_b_dir, b) = fresh();
    let doc = id("gone");
    a.put_json(&doc, &json!({"x": 1})).unwrap();
    b.apply_changes(&doc, &a.changes_since(&doc, &[]).unwrap())
        .unwrap();
    let base = a.heads(&doc).unwrap();
    a.delete(&doc).unwrap();
    assert!(matches!(a.get_json(&doc), Err(Error::Deleted(_))));
    assert!(matches!(a.delete(&doc), Err(Error::Deleted(_))));
    assert!(a.list("", None, 10).unwrap().ids.is_empty());
    b.apply_changes(&doc, &a.changes_since(&doc, &base).unwrap())
        .unwrap();
    assert!(matches!(b.get_json(&doc), Err(Error::Deleted(_))));
    assert!(b.info(&doc).unwrap().deleted);
    // Writing after the delete recreates it, everywhere.
    b.put_json(&doc, &json!({"back": true})).unwrap();
    a.apply_changes(&doc, &b.changes_since(&doc, &[]).unwrap())
        .unwrap();
    assert_eq!(a.get_json(&doc).unwrap(), json!({"back": true}));
}

#[test]
fn a_write_concurrent_with_a_delete_survives_it() {
    let (_a_dir, a) = fresh();
    let (_b_dir, b) = fresh();
    let doc = id("race");
    a.put_json(&doc, &json!({"x": 1})).unwrap();
    let base = a.heads(&doc).unwrap();
    b.apply_changes(&doc, &a.changes_since(&doc, &[]).unwrap())
        .unwrap();
    a.delete(&doc).unwrap();
    b.merge_json(&doc, &json!({"y": 2})).unwrap();
    a.apply_changes(&doc, &b.changes_since(&doc, &base).unwrap())
        .unwrap();
    b.apply_changes(&doc, &a.changes_since(&doc, &base).unwrap())
        .unwrap();
    assert_eq!(a.get_json(&doc).unwrap(), json!({"y": 2}));
    assert_eq!(a.get_json(&doc).unwrap(), b.get_json(&doc).unwrap());
}

#[test]
fn listing_pages_through_a_prefix() {
    let (_dir, engine) = fresh();
    for i in 0..25 {
        engine
            .put_json(&id(&format!("t/a/{i:02}")), &json!({"i": i}))
            .unwrap();
    }
    engine.put_json(&id("t/b/0"), &json!({})).unwrap();
    engine.put_json(&id("t/a"), &json!({})).unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = engine.list("t/a/", after.as_ref(), 10).unwrap();
        seen.extend(page.ids.iter().map(|d| d.to_string()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("t/a/{i:02}")).collect();
    assert_eq!(seen, expected);
    assert!(matches!(
        engine.list("bad prefix", None, 10),
        Err(Error::InvalidDocId(_))
    ));
}

#[test]
fn subscribers_see_local_and_client_changes_after_they_are_durable() {
    let (_a_dir, a) = fresh();
    let (_b_dir, b) = fresh();
    let sub = b.subscribe("inbox/").unwrap();
    let other = b.subscribe("elsewhere/").unwrap();
    let doc = id("inbox/1");
    let local = b.put_json(&doc, &json!({"n": 1})).unwrap();
    let ev = sub.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        (ev.origin, ev.heads.clone(), ev.deleted),
        (Origin::Local, local.heads, false)
    );
    a.apply_changes(&doc, &b.changes_since(&doc, &[]).unwrap())
        .unwrap();
    a.merge_json(&doc, &json!({"n": 2})).unwrap();
    b.apply_changes(&doc, &a.changes_since(&doc, &[]).unwrap())
        .unwrap();
    // Changes handed over with `apply_changes` are a client's: the event
    // carries the new ones, for a node to publish.
    let ev = sub.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(ev.origin, Origin::Client);
    assert_eq!(ev.heads, b.heads(&doc).unwrap());
    assert_eq!(ev.changes.len(), 1);
    assert!(other.try_recv().is_none());
}

#[test]
fn slow_subscribers_lose_events_and_are_told() {
    let dir = tempfile::tempdir().unwrap();
    let config = causeway_engine::EngineConfig {
        subscriber_capacity: 2,
        ..buffered()
    };
    let engine = Engine::open(dir.path(), config).unwrap();
    let sub = engine.subscribe("").unwrap();
    for i in 0..5 {
        engine.put_json(&id("d"), &json!({ "i": i })).unwrap();
    }
    assert_eq!(sub.dropped(), 3);
    assert!(sub.try_recv().is_some());
}

#[test]
fn many_threads_write_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), causeway_engine::EngineConfig::default()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    engine
                        .merge_json(&id("shared"), &json!({ format!("t{t}-{i}"): i }))
                        .unwrap();
                    engine
                        .put_json(&id(&format!("own/{t}")), &json!({ "i": i }))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let shared = engine.get_json(&id("shared")).unwrap();
    assert_eq!(shared.as_object().unwrap().len(), 160);
    let syncs = engine.stats().wal_syncs;
    assert!(
        syncs > 0,
        "Sync durability committed without a single WAL fsync"
    );
    let engine = reopen(&dir, engine, causeway_engine::EngineConfig::default());
    assert_eq!(engine.get_json(&id("shared")).unwrap(), shared);
    assert_eq!(engine.list("own/", None, 100).unwrap().ids.len(), 8);
}

#[test]
fn the_engine_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
}

#[test]
fn the_document_cache_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 256 * 1024;
    let config = causeway_engine::EngineConfig {
        cache_budget_bytes: budget,
        ..buffered()
    };
    let engine = Engine::open(dir.path(), config).unwrap();
    let body: Vec<i64> = (0..50).collect();
    for i in 0..300 {
        engine
            .put_json(&id(&format!("many/{i}")), &json!({ "i": i, "body": body }))
            .unwrap();
        assert!(
            engine.stats().cache_bytes <= budget,
            "over budget after {i} writes: {:?}",
            engine.stats()
        );
    }
    let stats = engine.stats();
    assert!(stats.cache_evictions > 0, "{stats:?}");
    assert!(stats.cached_documents < 300, "{stats:?}");
    for i in 0..300 {
        assert_eq!(
            engine.get_json(&id(&format!("many/{i}"))).unwrap()["i"],
            json!(i)
        );
    }
    assert!(engine.stats().cache_bytes <= budget);
}
