//! Bad input gets a specific error and leaves the store unchanged (invariant 9),
//! and corrupt data is reported with its document and key (invariant 7).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::fs;

use causeway_engine::layout::{self, CF_CHANGE_LOG, CF_SNAPSHOT, MARKER_FILE};
use causeway_engine::{CompactionPolicy, DocId, DocIdError, Engine, EngineConfig, Error};
use common::{buffered, fresh, id, reopen};
use serde_json::json;

#[test]
fn invalid_document_ids_are_typed_errors() {
    assert!(matches!(DocId::new(""), Err(DocIdError::Empty)));
    assert!(matches!(
        DocId::new("a b"),
        Err(DocIdError::InvalidChar {
            found: ' ',
            index: 1
        })
    ));
    assert!(matches!(
        DocId::new("x".repeat(300)),
        Err(DocIdError::TooLong { len: 300 })
    ));
    let (_dir, engine) = fresh();
    assert!(matches!(
        engine.subscribe("no spaces"),
        Err(Error::InvalidDocId(_))
    ));
}

#[test]
fn json_that_is_not_an_object_is_refused() {
    let (_dir, engine) = fresh();
    let doc = id("j");
    engine.put_json(&doc, &json!({"keep": 1})).unwrap();
    for bad in [json!([1, 2]), json!("s"), json!(3), json!(null)] {
        let err = engine.put_json(&doc, &bad).unwrap_err();
        assert!(matches!(err, Error::NotAnObject { .. }), "{err}");
        assert!(matches!(
            engine.merge_json(&doc, &bad),
            Err(Error::NotAnObject { .. })
        ));
    }
    assert_eq!(engine.get_json(&doc).unwrap(), json!({"keep": 1}));
    let fresh_doc = id("never");
    assert!(engine.put_json(&fresh_doc, &json!([])).is_err());
    assert!(matches!(
        engine.get_json(&fresh_doc),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn undecodable_and_oversized_changes_apply_nothing() {
    let (_a_dir, a) = fresh();
    let doc = id("d");
    a.put_json(&doc, &json!({"v": 1})).unwrap();
    let before = a.heads(&doc).unwrap();
    let good = a.changes_since(&doc, &[]).unwrap();

    let mut flipped = good[1].clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    // Altered contents that still decode, and a damaged checksum: both fail
    // the checksum comparison.
    let mut altered = good[1].clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 0x01;
    let mut bad_checksum = good[1].clone();
    bad_checksum[4] ^= 0x01;
    let inputs: Vec<Vec<Vec<u8>>> = vec![
        vec![b"not a change".to_vec()],
        vec![Vec::new()],
        vec![good[0].clone(), flipped],
        vec![good[0].clone(), altered],
        vec![good[0].clone(), bad_checksum],
        vec![good[0].clone(), good[1][..good[1].len() / 2].to_vec()],
    ];
    let (_b_dir, b) = fresh();
    for input in &inputs {
        let err = b.apply_changes(&doc, input).unwrap_err();
        assert!(matches!(err, Error::InvalidChange { .. }), "{err}");
        assert!(
            matches!(b.heads(&doc), Err(Error::NotFound(_))),
            "nothing applied"
        );
        let err = a.apply_changes(&doc, input).unwrap_err();
        assert!(matches!(err, Error::InvalidChange { .. }), "{err}");
        assert_eq!(a.heads(&doc).unwrap(), before);
    }

    let dir = tempfile::tempdir().unwrap();
    let small = Engine::open(
        dir.path(),
        EngineConfig {
            max_change_bytes: 64,
            ..buffered()
        },
    )
    .unwrap();
    let big = a
        .merge_json(&doc, &json!({"blob": "x".repeat(500)}))
        .unwrap();
    let changes = a.changes_since(&doc, &before).unwrap();
    assert_eq!(changes.len(), big.new_changes);
    let err = small.apply_changes(&doc, &changes).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ChangeTooLarge {
                index: 0,
                limit: 64,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn changes_from_another_document_are_refused_where_it_has_history() {
    let (_dir, engine) = fresh();
    let (a, b) = (id("a"), id("b"));
    engine.put_json(&a, &json!({"a": 1})).unwrap();
    engine.put_json(&b, &json!({"b": 1})).unwrap();
    let before = engine.heads(&b).unwrap();
    let err = engine
        .apply_changes(&b, &engine.changes_since(&a, &[]).unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::WrongDocument { .. }), "{err}");
    assert_eq!(engine.heads(&b).unwrap(), before);
    assert_eq!(engine.get_json(&b).unwrap(), json!({"b": 1}));
    // A document without history takes them: that is an import (a copy of
    // `a` under another id; see engine/tests/foreign_documents.rs).
    engine
        .apply_changes(&id("c"), &engine.changes_since(&a, &[]).unwrap())
        .unwrap();
    assert_eq!(engine.get_json(&id("c")).unwrap(), json!({"a": 1}));
}

#[test]
fn a_store_from_a_newer_format_is_refused_untouched() {
    let (dir, engine) = fresh();
    engine.put_json(&id("x"), &json!({})).unwrap();
    drop(engine);
    let marker = dir.path().join(MARKER_FILE);
    fs::write(&marker, "causeway-store\nformat 99\n").unwrap();
    let listing_before = dir_listing(dir.path());
    let err = Engine::open(dir.path(), buffered()).err().expect("refused");
    assert!(
        matches!(
            err,
            Error::FormatTooNew {
                found: 99,
                supported: layout::FORMAT_VERSION,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade Causeway"), "{err}");
    assert_eq!(dir_listing(dir.path()), listing_before);
}

#[test]
fn directories_that_are_not_stores_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let err = Engine::open(dir.path(), buffered()).err().expect("refused");
    assert!(matches!(err, Error::NotAStore { .. }), "{err}");
    assert_eq!(dir_listing(dir.path()), vec!["notes.txt".to_string()]);

    let file = dir.path().join("notes.txt");
    assert!(matches!(
        Engine::open(&file, buffered()),
        Err(Error::NotAStore { .. })
    ));

    let foreign = tempfile::tempdir().unwrap();
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, foreign.path()).unwrap();
        db.put(b"k", b"v").unwrap();
    }
    let err = Engine::open(foreign.path(), buffered())
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("RocksDB database that Causeway did not create"),
        "{err}"
    );

    let missing = dir.path().join("absent");
    let config = EngineConfig {
        create_if_missing: false,
        ..buffered()
    };
    assert!(matches!(
        Engine::open(&missing, config),
        Err(Error::NotAStore { .. })
    ));
    assert!(!missing.exists());
}

#[test]
fn a_store_opened_twice_is_locked() {
    let (dir, _engine) = fresh();
    assert!(matches!(
        Engine::open(dir.path(), buffered()),
        Err(Error::Locked { .. })
    ));
}

#[test]
fn invalid_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        compaction: CompactionPolicy {
            max_log_changes: 0,
            max_log_bytes: 1,
        },
        ..buffered()
    };
    assert!(matches!(
        Engine::open(dir.path(), config),
        Err(Error::Config(_))
    ));
}

#[test]
fn corrupt_records_are_reported_with_document_and_key_and_spare_other_documents() {
    let (dir, engine) = fresh();
    let (bad_log, bad_snap, good) = (id("bad-log"), id("bad-snap"), id("good"));
    engine.put_json(&bad_log, &json!({"v": 1})).unwrap();
    engine.put_json(&good, &json!({"v": 2})).unwrap();
    let compacting = EngineConfig {
        compaction: CompactionPolicy {
            max_log_changes: 1,
            max_log_bytes: 1 << 20,
        },
        ..buffered()
    };
    drop(engine);
    let engine = Engine::open(dir.path(), compacting.clone()).unwrap();
    engine.put_json(&bad_snap, &json!({"v": 3})).unwrap();
    drop(engine);
    {
        let db = open_raw(dir.path());
        let log = db.cf_handle(CF_CHANGE_LOG).unwrap();
        db.put_cf(log, layout::log_key(&bad_log, 1), b"garbage")
            .unwrap();
        let snap = db.cf_handle(CF_SNAPSHOT).unwrap();
        assert!(
            db.get_cf(snap, bad_snap.as_bytes()).unwrap().is_some(),
            "compaction wrote a snapshot"
        );
        db.put_cf(snap, bad_snap.as_bytes(), b"garbage").unwrap();
    }
    let engine = Engine::open(dir.path(), buffered()).unwrap();
    let err = engine.get_json(&bad_log).unwrap_err();
    assert!(matches!(err, Error::Quarantined { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("document bad-log is quarantined: corrupt data at key change_log/bad-log#1"),
        "{err}"
    );
    let err = engine.get_json(&bad_snap).unwrap_err();
    assert!(
        err.to_string()
            .contains("document bad-snap is quarantined: corrupt data at key snapshot/bad-snap"),
        "{err}"
    );
    // Quarantined: every use answers at once, writes included, and the
    // document is out of the digests replication reconciles.
    assert!(matches!(
        engine.put_json(&bad_snap, &json!({"v": 4})),
        Err(Error::Quarantined { .. })
    ));
    let quarantined: Vec<String> = engine.quarantined().into_iter().map(|q| q.doc).collect();
    assert_eq!(quarantined, ["bad-log", "bad-snap"]);
    assert_eq!(engine.stats().quarantined_documents, 2);
    let mut digests = Vec::new();
    engine
        .for_each_digest(|id, _| digests.push(id.to_string()))
        .unwrap();
    assert_eq!(digests, ["good"]);
    assert_eq!(engine.get_json(&good).unwrap(), json!({"v": 2}));
    engine.put_json(&id("new"), &json!({"ok": true})).unwrap();

    // Repair discards the local copy; a readable document is not touched.
    assert!(matches!(
        engine.repair(&good),
        Err(Error::NotQuarantined(_))
    ));
    engine.repair(&bad_snap).unwrap();
    assert!(matches!(
        engine.get_json(&bad_snap),
        Err(Error::NotFound(_))
    ));
    assert_eq!(engine.quarantined().len(), 1);
    engine.put_json(&bad_snap, &json!({"v": 5})).unwrap();

    let engine = reopen(&dir, engine, buffered());
    assert_eq!(engine.get_json(&id("new")).unwrap(), json!({"ok": true}));
    assert_eq!(engine.get_json(&bad_snap).unwrap(), json!({"v": 5}));
    // The corrupt record is still on disk: met again, quarantined again.
    assert!(matches!(
        engine.get_json(&bad_log),
        Err(Error::Quarantined { .. })
    ));
}

#[test]
fn a_corrupt_doc_meta_entry_quarantines_its_document_and_the_store_opens() {
    let (dir, engine) = fresh();
    let (bad, good) = (id("meta/bad"), id("meta/good"));
    engine.put_json(&bad, &json!({"v": 1})).unwrap();
    engine.put_json(&good, &json!({"v": 2})).unwrap();
    drop(engine);
    {
        let db = open_raw(dir.path());
        let meta = db.cf_handle(layout::CF_DOC_META).unwrap();
        db.put_cf(meta, bad.as_bytes(), b"\xffgarbage").unwrap();
    }
    let engine = Engine::open(dir.path(), buffered()).unwrap();
    let mut digests = Vec::new();
    engine
        .for_each_digest(|id, _| digests.push(id.to_string()))
        .unwrap();
    assert_eq!(digests, ["meta/good"]);
    assert!(engine.is_quarantined(&bad));
    let page = engine.list("meta/", None, 10).unwrap();
    assert_eq!(page.ids, std::slice::from_ref(&good));
    assert!(matches!(engine.heads(&bad), Err(Error::Quarantined { .. })));
    assert_eq!(engine.get_json(&good).unwrap(), json!({"v": 2}));
    engine.repair(&bad).unwrap();
    assert!(matches!(engine.heads(&bad), Err(Error::NotFound(_))));
}

fn open_raw(path: &std::path::Path) -> rocksdb::DB {
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, path).unwrap();
    rocksdb::DB::open_cf(&opts, path, cfs).unwrap()
}

fn dir_listing(path: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_store_missing_its_current_file_is_not_replaced_by_an_empty_one() {
    let (dir, engine) = fresh();
    engine.put_json(&id("kept"), &json!({"v": 1})).unwrap();
    drop(engine);
    fs::rename(dir.path().join("CURRENT"), dir.path().join("CURRENT.moved")).unwrap();
    let err = Engine::open(dir.path(), buffered()).err().expect("refused");
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("CURRENT file is missing"), "{err}");
    fs::rename(dir.path().join("CURRENT.moved"), dir.path().join("CURRENT")).unwrap();
    let engine = Engine::open(dir.path(), buffered()).unwrap();
    assert_eq!(engine.get_json(&id("kept")).unwrap(), json!({"v": 1}));
}

/// Found by the `wire_decode` fuzzer: change bytes on which Automerge 0.12's
/// decoder panics (an operation counter overflowing an `unwrap`) instead of
/// returning an error. A peer or HTTP client sending them must get a typed
/// error, and the document must stay as it was.
#[test]
fn change_bytes_that_panic_automerge_are_a_typed_error() {
    let bytes = include_bytes!("../../fuzz/regressions/wire_decode/automerge-op-counter-overflow");
    let (_dir, engine) = fresh();
    let doc = id("notes/1");
    let before = engine.put_json(&doc, &json!({"a": 1})).unwrap().heads;
    let err = engine.apply_changes(&doc, &[bytes.as_slice()]).unwrap_err();
    assert!(
        matches!(err, Error::InvalidChange { index: 0, .. }),
        "{err}"
    );
    assert_eq!(engine.heads(&doc).unwrap(), before);
    assert_eq!(engine.get_json(&doc).unwrap(), json!({"a": 1}));
}

#[test]
fn a_change_whose_sequence_number_skips_ahead_is_refused_and_changes_nothing() {
    // Found by the apply_changes fuzzer: intact dependencies and checksum,
    // but a `seq` that skips ahead of its actor's history. Automerge 0.12
    // asserts on it while applying; the engine must refuse it instead.
    let (_a_dir, a) = fresh();
    let (_b_dir, b) = fresh();
    let doc = id("notes/seq");
    a.put_json(&doc, &json!({"a": 1})).unwrap();
    a.merge_json(&doc, &json!({"b": 2})).unwrap();
    let all = a.changes_since(&doc, &[]).unwrap();
    let (last, earlier) = all.split_last().unwrap();
    b.apply_changes(&doc, earlier).unwrap();
    let before = (b.heads(&doc).unwrap(), b.get_json(&doc).unwrap());

    let mut expanded = causeway_engine::automerge::Change::from_bytes(last.clone())
        .unwrap()
        .decode();
    expanded.seq = 40_000;
    let forged = causeway_engine::automerge::Change::from(expanded)
        .raw_bytes()
        .to_vec();
    let err = b.apply_changes(&doc, &[forged]).unwrap_err();
    assert!(matches!(err, Error::ChangeRejected { .. }), "{err}");
    assert_eq!((b.heads(&doc).unwrap(), b.get_json(&doc).unwrap()), before);

    // The document is intact: the genuine change still applies.
    assert_eq!(b.apply_changes(&doc, &[last]).unwrap().applied, 1);
    assert_eq!(b.get_json(&doc).unwrap(), a.get_json(&doc).unwrap());
}
