//! Property tests: whatever sequence of writes, deletes, compactions and
//! reopens, the store reads back exactly what a plain JSON model says.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use causeway_engine::{CompactionPolicy, Engine, EngineConfig, Error};
use common::{buffered, id};
use proptest::prelude::*;
use serde_json::{Map, Value as Json};

#[derive(Debug, Clone)]
enum Op {
    Put(usize, Map<String, Json>),
    Merge(usize, Map<String, Json>),
    Delete(usize),
    Reopen,
}

const DOCS: usize = 3;

fn leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        (-1000i32..1000).prop_map(|i| Json::from(f64::from(i) + 0.5)),
        "[a-zé😀 ]{0,8}".prop_map(Json::String),
    ]
}

fn value() -> impl Strategy<Value = Json> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Map<String, Json>> {
    prop::collection::btree_map("[a-d]{1,2}", value(), 0..5).prop_map(|m| m.into_iter().collect())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..DOCS, object()).prop_map(|(d, o)| Op::Put(d, o)),
        4 => (0..DOCS, object()).prop_map(|(d, o)| Op::Merge(d, o)),
        1 => (0..DOCS).prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

/// RFC 7386 applied to the model.
fn merge_patch(target: &mut Json, patch: &Json) {
    let Json::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Json::Object(Map::new());
    }
    let Json::Object(map) = target else {
        unreachable!()
    };
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Json::Null), v);
        }
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        compaction: CompactionPolicy {
            max_log_changes: 3,
            max_log_bytes: 4096,
        },
        ..buffered()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_reads_back_the_model(ops in prop::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::open(dir.path(), config()).unwrap();
        let mut model: Vec<Option<Json>> = vec![None; DOCS];
        for op in ops {
            match op {
                Op::Put(d, obj) => {
                    engine.put_json(&id(&format!("doc{d}")), &Json::Object(obj.clone())).unwrap();
                    model[d] = Some(Json::Object(obj));
                }
                Op::Merge(d, obj) => {
                    engine.merge_json(&id(&format!("doc{d}")), &Json::Object(obj.clone())).unwrap();
                    let mut target = model[d].take().unwrap_or(Json::Object(Map::new()));
                    merge_patch(&mut target, &Json::Object(obj));
                    model[d] = Some(target);
                }
                Op::Delete(d) => {
                    let result = engine.delete(&id(&format!("doc{d}")));
                    prop_assert_eq!(result.is_ok(), model[d].is_some());
                    model[d] = None;
                }
                Op::Reopen => {
                    drop(engine);
                    engine = Engine::open(dir.path(), config()).unwrap();
                }
            }
            for (d, expected) in model.iter().enumerate() {
                let got = engine.get_json(&id(&format!("doc{d}")));
                match expected {
                    Some(v) => prop_assert_eq!(&got.unwrap(), v),
                    None => prop_assert!(matches!(got, Err(Error::NotFound(_) | Error::Deleted(_)))),
                }
            }
        }
        let live = model.iter().filter(|m| m.is_some()).count();
        prop_assert_eq!(engine.list("doc", None, 10).unwrap().ids.len(), live);
    }

    #[test]
    fn replicas_fed_in_any_order_converge(ops in prop::collection::vec((0..2usize, object()), 1..12), seed in any::<u64>()) {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Engine::open(da.path(), config()).unwrap();
        let b = Engine::open(db.path(), config()).unwrap();
        let doc = id("shared");
        for (side, obj) in &ops {
            let engine = if *side == 0 { &a } else { &b };
            engine.merge_json(&doc, &Json::Object(obj.clone())).unwrap();
        }
        let shuffled = |engine: &Engine| {
            let mut changes = engine.changes_since(&doc, &[]).unwrap_or_default();
            let mut s = seed;
            for i in (1..changes.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                changes.swap(i, (s >> 33) as usize % (i + 1));
            }
            changes
        };
        let (to_b, to_a) = (shuffled(&a), shuffled(&b));
        for c in &to_b {
            b.apply_changes(&doc, std::slice::from_ref(c)).unwrap();
        }
        for c in &to_a {
            a.apply_changes(&doc, std::slice::from_ref(c)).unwrap();
        }
        prop_assert_eq!(a.heads(&doc).unwrap(), b.heads(&doc).unwrap());
        prop_assert_eq!(a.get_json(&doc).unwrap(), b.get_json(&doc).unwrap());
        prop_assert_eq!(a.info(&doc).unwrap().held_changes, 0);
    }
}
