//! Backups of a store: a checkpoint taken while writes go on holds every
//! write made before it and none after, verifies without being written to,
//! refuses a damaged copy, and opens after `renew` as a store with a new id.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use causeway_engine::backup::{self, list_files};
use causeway_engine::{Engine, Error};
use common::{buffered, fresh, id};
use serde_json::json;

fn sizes(dir: &Path) -> BTreeMap<String, u64> {
    list_files(dir)
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.bytes))
        .collect()
}

#[test]
fn a_checkpoint_holds_what_came_before_it_and_restores_as_a_new_store() {
    let (_dir, engine) = fresh();
    for i in 0..20 {
        engine
            .put_json(&id(&format!("doc/{i}")), &json!({ "i": i }))
            .unwrap();
    }
    engine.delete(&id("doc/0")).unwrap();
    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("store");
    let checkpoint = engine.checkpoint(&copy).unwrap();
    engine
        .put_json(&id("doc/late"), &json!({"late": true}))
        .unwrap();
    assert_eq!(checkpoint.store_id, engine.store_id());
    assert_eq!(sizes(&copy).values().sum::<u64>(), checkpoint.bytes());
    assert!(matches!(
        engine.checkpoint(&copy),
        Err(Error::Backup { .. })
    ));

    // Verifying reads every document and writes nothing into the copy.
    let before = sizes(&copy);
    let mut seen = 0;
    let found = backup::verify(&copy, |done, total| {
        assert_eq!(total, 20);
        seen = done;
    })
    .unwrap();
    assert_eq!(seen, 20);
    assert_eq!((found.documents, found.deleted), (20, 1));
    assert_eq!(found.store_id, engine.store_id());
    assert_eq!(sizes(&copy), before);

    // Renewed, the copy opens as a store of its own.
    let renewed = backup::renew(&copy).unwrap();
    assert_ne!(renewed, engine.store_id());
    let restored = Engine::open(&copy, buffered()).unwrap();
    assert_eq!(restored.store_id(), renewed);
    assert_eq!(restored.get_json(&id("doc/7")).unwrap(), json!({"i": 7}));
    assert!(matches!(
        restored.get_json(&id("doc/0")),
        Err(Error::Deleted(_))
    ));
    assert!(matches!(
        restored.get_json(&id("doc/late")),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn a_damaged_copy_does_not_verify() {
    let (_dir, engine) = fresh();
    for i in 0..200 {
        engine
            .put_json(
                &id(&format!("doc/{i}")),
                &json!({ "text": "x".repeat(500 + i) }),
            )
            .unwrap();
    }
    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("store");
    engine.checkpoint(&copy).unwrap();
    backup::verify(&copy, |_, _| {}).unwrap();
    // Flip bytes in the middle of the largest table file.
    let largest = list_files(&copy)
        .unwrap()
        .into_iter()
        .filter(|f| f.name.ends_with(".sst"))
        .max_by_key(|f| f.bytes)
        .unwrap();
    let path = copy.join(&largest.name);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 3;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap();
    let err = backup::verify(&copy, |_, _| {}).unwrap_err();
    assert!(
        matches!(err, Error::Backup { .. } | Error::Corrupt { .. }),
        "{err}"
    );
}
