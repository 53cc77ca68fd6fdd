//! The document-shape classes of hostile client input against a real pair of
//! `causeway node` processes on 127.0.0.1: each class is sent many times to
//! node a, which must refuse every copy with 422 `shape_limit`, store
//! nothing of the refused request (a document grown to its size limit
//! keeps what was accepted before), stay up, keep its honest data, and keep replicating other
//! documents to node b. Prints the node's RSS and write latency before and
//! after every class, for the table in docs/testing.md.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use causeway_engine::automerge::transaction::{Transactable, Transaction};
use causeway_engine::automerge::{Automerge, AutomergeError, ObjType, ROOT};
use causeway_engine::{lineage::genesis_change, DocId};
use serde_json::{json, Value};
use support::cluster::{converged, wait_until, NodeProc, Options};

/// Copies of each class sent.
const COPIES: usize = 50;
/// Small writes timed before and after each class.
const PROBES: usize = 100;
/// Shape limits of both nodes, small enough for cheap inputs to cross.
const SHAPE: &str =
    "[engine]\nmax_ops_per_change = 5000\nmax_objects_per_change = 200\nmax_document_mib = 8\n";

/// The binary changes a client made for document `id` with `edit`, without
/// the genesis change (the node has its own).
fn client_changes(
    id: &str,
    edit: impl FnOnce(&mut Transaction<'_>) -> Result<(), AutomergeError>,
) -> Vec<u8> {
    let mut am = Automerge::new();
    am.apply_changes([genesis_change(&DocId::new(id).unwrap())])
        .unwrap();
    let mut tx = am.transaction();
    edit(&mut tx).unwrap();
    tx.commit();
    am.get_changes(&[])
        .iter()
        .skip(1)
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect()
}

/// Objects nested `levels` deep at root key `a`; a list at every level
/// where `lists(level)` says so, a map elsewhere.
fn nest(
    levels: usize,
    lists: fn(usize) -> bool,
) -> impl Fn(&mut Transaction<'_>) -> Result<(), AutomergeError> {
    move |tx| {
        let mut obj = tx.put_object(ROOT, "a", ObjType::Map)?;
        let mut in_list = false;
        for level in 1..levels {
            let kind = if lists(level) {
                ObjType::List
            } else {
                ObjType::Map
            };
            obj = if in_list {
                tx.insert_object(&obj, 0, kind)?
            } else {
                tx.put_object(&obj, "m", kind)?
            };
            in_list = lists(level);
        }
        Ok(())
    }
}

/// One hostile class: what it is, and how to send copy `i` of it; the
/// sender returns the status and error code of the request that must be
/// refused.
struct Class {
    name: &'static str,
    copies: usize,
    /// The status and code every copy is refused with.
    refusal: (u16, &'static str),
    /// Whether the refused requests carry changes, which the engine
    /// counts in `shape_refused` (a JSON body is refused before it becomes
    /// one).
    changes: bool,
    send: fn(&NodeProc, usize) -> (u16, String),
}

impl Class {
    /// Changes that break a shape limit: every copy refused with 422
    /// `shape_limit` and counted in `shape_refused`.
    fn changes(name: &'static str, send: fn(&NodeProc, usize) -> (u16, String)) -> Class {
        Class {
            name,
            copies: COPIES,
            refusal: (422, "shape_limit"),
            changes: true,
            send,
        }
    }

    /// A JSON body refused with `refusal` before it becomes a change.
    fn json(
        name: &'static str,
        refusal: (u16, &'static str),
        send: fn(&NodeProc, usize) -> (u16, String),
    ) -> Class {
        Class {
            name,
            copies: COPIES,
            refusal,
            changes: false,
            send,
        }
    }
}

/// `len` characters of 64 kinds, hardly compressible, different for each
/// `part` and `copy`.
fn noise(len: u64, part: u64, copy: usize) -> String {
    (0..len)
        .map(|k| {
            // splitmix64 of the position, the part and the copy.
            let mut z = k ^ (part << 24) ^ ((copy as u64) << 40);
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            char::from(b'!' + ((z ^ (z >> 31)) >> 58) as u8)
        })
        .collect()
}

/// `PUT` of a JSON object nesting `levels` deep.
fn put_nested(node: &NodeProc, copy: usize, levels: usize) -> (u16, String) {
    let value = (0..levels).fold(json!(copy), |v, _| json!({ "m": v }));
    let r = node.request(
        "PUT",
        &format!("/v1/docs/hostile/json-{levels}-{copy}"),
        &[("content-type", "application/json")],
        value.to_string().as_bytes(),
    );
    (r.status, r.code())
}

fn post_changes(node: &NodeProc, id: &str, body: &[u8]) -> (u16, String) {
    let r = node.request("POST", &format!("/v1/changes/{id}"), &[], body);
    (r.status, r.code())
}

fn classes() -> Vec<Class> {
    vec![
        Class::changes("a change nesting maps 2,000 deep", |node, i| {
            let id = format!("hostile/maps-{i}");
            post_changes(node, &id, &client_changes(&id, nest(2_000, |_| false)))
        }),
        Class::changes(
            "a change nesting lists and maps 2,000 deep, alternating",
            |node, i| {
                let id = format!("hostile/mixed-{i}");
                post_changes(node, &id, &client_changes(&id, nest(2_000, |l| l % 2 == 1)))
            },
        ),
        Class::changes("a change of 5,001 operations (limit 5,000)", |node, i| {
            let id = format!("hostile/ops-{i}");
            let changes = client_changes(&id, |tx| {
                (0..5_001).try_for_each(|k| tx.put(ROOT, format!("k{k}"), k))
            });
            post_changes(node, &id, &changes)
        }),
        Class::changes("a change creating 201 objects (limit 200)", |node, i| {
            let id = format!("hostile/objects-{i}");
            let changes = client_changes(&id, |tx| {
                (0..201)
                    .try_for_each(|k| tx.put_object(ROOT, format!("o{k}"), ObjType::Map).map(drop))
            });
            post_changes(node, &id, &changes)
        }),
        Class {
            copies: 3,
            ..Class::changes(
                "a document grown past 8 MiB stored (POSTs of 4 changes of 300 KB)",
                |node, i| {
                    // Accepted up to the limit: these documents are kept.
                    let id = format!("grown/size-{i}");
                    let mut am = Automerge::new();
                    am.apply_changes([genesis_change(&DocId::new(&id).unwrap())])
                        .unwrap();
                    for round in 0..40u64 {
                        let heads = am.get_heads();
                        for part in 0..4u64 {
                            let mut tx = am.transaction();
                            let key = format!("p{round}-{part}");
                            tx.put(ROOT, key, noise(300_000, round * 4 + part, i))
                                .unwrap();
                            tx.commit();
                        }
                        let body: Vec<u8> = am
                            .get_changes(&heads)
                            .iter()
                            .flat_map(|c| c.raw_bytes().to_vec())
                            .collect();
                        let (status, code) = post_changes(node, &id, &body);
                        if status != 200 {
                            return (status, code);
                        }
                    }
                    panic!("{id} grew past 40 MB without a refusal")
                },
            )
        },
        Class::json(
            "a JSON body nesting 100 deep (limit 64)",
            (422, "shape_limit"),
            |node, i| put_nested(node, i, 100),
        ),
        Class::json(
            "a JSON body nesting 999 deep (past the JSON parser's 128)",
            (400, "malformed_json"),
            |node, i| put_nested(node, i, 999),
        ),
    ]
}

#[test]
fn document_shape_classes_are_refused_and_the_cluster_serves_on() {
    let root = tempfile::tempdir().unwrap();
    let options = || Options {
        tables: SHAPE,
        ..Options::default()
    };
    let a = NodeProc::start_with(root.path(), "a", "eu", &[], options());
    let b = NodeProc::start_with(root.path(), "b", "us", &a.listen, options());
    wait_until(Duration::from_secs(30), "a and b connect", || {
        !a.replicating().is_empty() && !b.replicating().is_empty()
    });
    let honest = json!({"title": "kept", "items": [1, 2, 3]});
    a.write_doc("PUT", "honest/doc", &honest);
    let mut refused = 0u64;
    for (n, class) in classes().iter().enumerate() {
        let (p50_0, p99_0) = a.write_latency(PROBES, &format!("{n}-before"));
        let rss_0 = a.rss_kib();
        for i in 0..class.copies {
            let (status, code) = (class.send)(&a, i);
            assert_eq!(
                (status, code.as_str()),
                class.refusal,
                "{}, copy {i}",
                class.name
            );
            refused += u64::from(class.changes);
        }
        let (p50_1, p99_1) = a.write_latency(PROBES, &format!("{n}-after"));
        let rss_1 = a.rss_kib();
        // Other documents still replicate: a write made now reaches b.
        let id = format!("honest/after-{n}");
        a.write_doc("PUT", &id, &json!({"class": n}));
        let took = wait_until(
            Duration::from_secs(30),
            "a write after the class reaches b",
            || converged(&[&a, &b], &id),
        );
        println!(
            "{}, {} copies: all {} {}; RSS {} -> {} MiB; writes p50/p99 \
             {p50_0:.1}/{p99_0:.1} ms before, {p50_1:.1}/{p99_1:.1} ms after; \
             a write made after it on b in {} ms",
            class.name,
            class.copies,
            class.refusal.0,
            class.refusal.1,
            rss_0 / 1024,
            rss_1 / 1024,
            took.as_millis()
        );
    }
    // Nothing of the refused input is stored, the honest document is intact
    // on both nodes, and the node counted every refusal.
    assert_eq!(a.list_all("hostile/"), Vec::<String>::new());
    assert_eq!(b.list_all("hostile/"), Vec::<String>::new());
    for node in [&a, &b] {
        assert_eq!(
            node.get_doc("honest/doc").map(|d| d.0),
            Some(honest.clone())
        );
    }
    let counted: Value = a.status()["engine"]["shape_refused"].clone();
    assert_eq!(counted, json!(refused), "refusals counted");
}
