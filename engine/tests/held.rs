//! Held changes: accepted changes whose dependencies are missing are stored
//! durably, survive restarts and cache evictions, apply as soon as their
//! dependencies arrive, and are never dropped; at a limit a client's call is
//! refused as a whole and stores nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use causeway_engine::layout::{self, MARKER_FILE};
use causeway_engine::{DocId, Engine, EngineConfig, Error, HeldLimitKind, Origin};
use common::{buffered, fresh, id, reopen};
use serde_json::json;

/// A document with `n` one-key changes on a fresh engine, and all of its
/// changes (genesis first).
fn history(doc: &DocId, n: usize) -> (tempfile::TempDir, Engine, Vec<Vec<u8>>) {
    let (dir, a) = fresh();
    for i in 0..n {
        a.merge_json(doc, &json!({ format!("k{i}"): i })).unwrap();
    }
    let all = a.changes_since(doc, &[]).unwrap();
    (dir, a, all)
}

#[test]
fn held_changes_survive_a_restart_and_apply_when_their_dependencies_arrive() {
    let doc = id("held/restart");
    let (_a_dir, a, all) = history(&doc, 6);
    let dir = tempfile::tempdir().unwrap();
    let b = Engine::open(dir.path(), buffered()).unwrap();
    // Everything but the first real change: all of it waits for that one.
    let outcome = b.apply_changes(&doc, &all[2..]).unwrap();
    assert_eq!((outcome.applied, outcome.held), (0, all.len() - 2));
    assert_eq!(outcome.missing_deps.len(), 1);
    assert_eq!(b.stats().held_changes, all.len() - 2);

    let b = reopen(&dir, b, buffered());
    let stats = b.stats();
    assert_eq!(
        (stats.held_changes, stats.held_documents),
        (all.len() - 2, 1)
    );
    let info = b.held(&doc).unwrap();
    assert_eq!(info.changes, all.len() - 2);
    assert_eq!(info.missing, outcome.missing_deps);

    let outcome = b.apply_changes(&doc, &all[1..2]).unwrap();
    assert_eq!((outcome.applied, outcome.held), (all.len(), 0));
    assert_eq!(b.get_json(&doc).unwrap(), a.get_json(&doc).unwrap());
    let stats = b.stats();
    assert_eq!(
        (stats.held_changes, stats.held_bytes, stats.held_documents),
        (0, 0, 0)
    );

    // Released means deleted from the held store too.
    let b = reopen(&dir, b, buffered());
    assert_eq!(b.stats().held_changes, 0);
    assert_eq!(b.heads(&doc).unwrap(), a.heads(&doc).unwrap());
}

#[test]
fn held_changes_survive_eviction_from_the_cache() {
    let doc = id("held/evicted");
    let (_a_dir, a, all) = history(&doc, 4);
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        cache_budget_bytes: 64 << 10,
        ..buffered()
    };
    let b = Engine::open(dir.path(), config).unwrap();
    b.apply_changes(&doc, &all[2..]).unwrap();
    // Enough other documents to push the held one out of the cache.
    for i in 0..40 {
        b.put_json(&id(&format!("filler/{i}")), &json!({"i": i}))
            .unwrap();
    }
    assert!(b.stats().cache_evictions > 0);
    assert_eq!(b.held(&doc).unwrap().changes, all.len() - 2);
    let outcome = b.apply_changes(&doc, &all[1..2]).unwrap();
    assert_eq!(outcome.applied, all.len());
    assert_eq!(b.get_json(&doc).unwrap(), a.get_json(&doc).unwrap());
}

#[test]
fn a_client_call_over_the_per_document_limit_is_refused_and_stores_nothing() {
    let doc = id("held/limit");
    let (_a_dir, a, all) = history(&doc, 5);
    let (_b_dir, b) = {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            max_held_changes_per_doc: 2,
            ..buffered()
        };
        let engine = Engine::open(dir.path(), config).unwrap();
        (dir, engine)
    };
    // Two held: within the limit.
    b.apply_changes(&doc, &all[4..]).unwrap();
    assert_eq!(b.held(&doc).unwrap().changes, 2);
    // One more to hold would make three: refused, with what is missing.
    let err = b.apply_changes(&doc, &all[3..4]).unwrap_err();
    let Error::HeldLimit {
        limit,
        missing,
        missing_total,
        ..
    } = &err
    else {
        panic!("expected HeldLimit, got {err}");
    };
    assert_eq!(*limit, HeldLimitKind::DocumentChanges);
    assert_eq!((missing.len(), *missing_total), (1, 1));
    assert_eq!(b.held(&doc).unwrap().changes, 2, "nothing stored");
    assert_eq!(b.stats().held_refused, 1);
    // A call that also carries the dependencies needs no room: it applies.
    let outcome = b.apply_changes(&doc, &all[1..4]).unwrap();
    assert_eq!((outcome.applied, outcome.held), (all.len(), 0));
    assert_eq!(b.get_json(&doc).unwrap(), a.get_json(&doc).unwrap());
}

#[test]
fn the_engine_wide_limit_counts_every_document() {
    let config = EngineConfig {
        max_held_changes_per_doc: 2,
        max_held_changes: 3,
        ..buffered()
    };
    let dir = tempfile::tempdir().unwrap();
    let b = Engine::open(dir.path(), config.clone()).unwrap();
    let (one, two) = (id("held/one"), id("held/two"));
    let (_d1, _a1, first) = history(&one, 4);
    let (_d2, _a2, second) = history(&two, 4);
    b.apply_changes(&one, &first[3..]).unwrap();
    b.apply_changes(&two, &second[4..]).unwrap();
    let err = b.apply_changes(&two, &second[3..4]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::HeldLimit {
                limit: HeldLimitKind::EngineChanges,
                ..
            }
        ),
        "{err}"
    );
    // The count is rebuilt from the store on open.
    let b = reopen(&dir, b, config);
    assert_eq!(b.stats().held_changes, 3);
    assert!(b.apply_changes(&two, &second[3..4]).is_err());
    // Releasing one document's changes makes room for the other's.
    b.apply_changes(&one, &first[1..3]).unwrap();
    assert_eq!(b.stats().held_changes, 1);
    b.apply_changes(&two, &second[3..4]).unwrap();
    assert_eq!(b.stats().held_changes, 2);
}

#[test]
fn client_changes_released_later_are_announced_with_their_bytes() {
    let doc = id("held/announced");
    let (_a_dir, _a, all) = history(&doc, 3);
    let (_b_dir, b) = fresh();
    let events = b.subscribe("held/").unwrap();
    b.apply_changes(&doc, &all[2..]).unwrap();
    assert!(events.try_recv().is_none(), "held changes are not events");
    b.apply_changes(&doc, &all[1..2]).unwrap();
    let event = events.try_recv().unwrap();
    assert_eq!(event.origin, Origin::Client);
    // The client's changes in causal order (the genesis was made here).
    let mut expected = all[1..].to_vec();
    let got: Vec<Vec<u8>> = event.changes.to_vec();
    expected.retain(|c| got.contains(c));
    assert_eq!(got.len(), all.len() - 1);
    assert_eq!(got, expected);
}

#[test]
fn a_format_1_store_is_upgraded_in_place() {
    let doc = id("old/doc");
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), buffered()).unwrap();
    engine.put_json(&doc, &json!({"kept": true})).unwrap();
    drop(engine);
    // Make it what a format 1 build left: no held column family, format 1
    // in the record and in the marker file.
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(false);
        let mut db = rocksdb::DB::open_cf(&opts, dir.path(), layout::COLUMN_FAMILIES).unwrap();
        db.drop_cf(layout::CF_HELD).unwrap();
        let cf = db.cf_handle(layout::CF_NODE).unwrap();
        db.put_cf(cf, layout::KEY_FORMAT_VERSION, 1u32.to_be_bytes())
            .unwrap();
    }
    std::fs::write(dir.path().join(MARKER_FILE), "causeway-store\nformat 1\n").unwrap();

    let engine = Engine::open(dir.path(), buffered()).unwrap();
    assert_eq!(engine.get_json(&doc).unwrap(), json!({"kept": true}));
    let marker = std::fs::read_to_string(dir.path().join(MARKER_FILE)).unwrap();
    assert_eq!(
        marker,
        format!("causeway-store\nformat {}\n", layout::FORMAT_VERSION)
    );
    // The held store works after the upgrade.
    let other = id("old/held");
    let (_a_dir, _a, all) = history(&other, 3);
    engine.apply_changes(&other, &all[3..]).unwrap();
    let engine = reopen(&dir, engine, buffered());
    assert_eq!(engine.held(&other).unwrap().changes, 1);
}
