//! Garbage collection of deleted documents in real `causeway node`
//! processes on 127.0.0.1, with a membership list and a grace period of a
//! few seconds: deleted documents are collected on every node once all hold
//! the delete and the grace period passed, the store shrinks, and a store
//! out of contact for longer than the grace period is refused at start and
//! rebuilt from its peers without bringing deleted documents back.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::cluster::{cluster_key, identity, wait_until, NodeProc, Options};

/// Grace period of the test nodes: above three anti-entropy intervals
/// (3 s each in the test timers), the shortest a node accepts.
const GRACE_SECS: u64 = 10;
const KEPT: usize = 10;
const DELETED: usize = 40;

fn node(root: &Path, name: &str, bootstrap: &[String], key: &Path, list: &Path) -> NodeProc {
    let tables = format!("[engine]\ngc_grace_secs = {GRACE_SECS}\n");
    let options = Options {
        cluster_key_file: Some(key),
        membership_file: Some(list),
        tables: &tables,
        ..Options::default()
    };
    NodeProc::start_with(root, name, "eu", bootstrap, options)
}

fn gc(n: &NodeProc, field: &str) -> u64 {
    n.status()["node"]["gc"][field].as_u64().unwrap_or(0)
}

fn status_of(n: &NodeProc, doc: &str) -> u16 {
    n.request("GET", &format!("/v1/docs/{doc}"), &[], b"")
        .status
}

#[test]
fn deleted_documents_are_collected_everywhere_and_a_stale_store_must_be_rebuilt() {
    let root = tempfile::tempdir().unwrap();
    let key = cluster_key(root.path());
    let list = root.path().join("members.toml");
    let (a_id, b_id) = (identity(root.path(), "a"), identity(root.path(), "b"));
    std::fs::write(
        &list,
        format!(
            "[[member]]\npeer_id = {a_id:?}\nregion = \"eu\"\n\n\
             [[member]]\npeer_id = {b_id:?}\nregion = \"eu\"\n"
        ),
    )
    .unwrap();
    let a = node(root.path(), "a", &[], &key, &list);
    let mut b = node(root.path(), "b", &a.listen, &key, &list);
    let body = json!({"text": "x".repeat(2000)});
    for i in 0..KEPT {
        a.write_doc("PUT", &format!("kept/{i:02}"), &body);
    }
    for i in 0..DELETED {
        a.write_doc("PUT", &format!("gone/{i:02}"), &body);
    }
    wait_until(Duration::from_secs(60), "b to hold every document", || {
        b.list_all("").len() == KEPT + DELETED
    });
    let mut deleted_at = std::time::Instant::now();
    for i in 0..DELETED {
        deleted_at = std::time::Instant::now();
        let r = b.request("DELETE", &format!("/v1/docs/gone/{i:02}"), &[], b"");
        assert!(r.status < 300, "{}", r.text());
    }
    let collected = wait_until(
        Duration::from_secs(GRACE_SECS + 60),
        "both nodes to collect every deleted document",
        || {
            [&a, &b]
                .iter()
                .all(|n| gc(n, "documents_collected") == DELETED as u64)
        },
    );
    let after_delete = deleted_at.elapsed();
    for n in [&a, &b] {
        assert_eq!(gc(n, "grace_secs"), GRACE_SECS);
        assert_eq!(
            status_of(n, "gone/00"),
            410,
            "a collected document reads as deleted"
        );
        assert_eq!(status_of(n, "kept/00"), 200);
        // Metrics follow the core's counters on their own tick.
        wait_until(Duration::from_secs(10), "the collected metric", || {
            n.metric("causeway_documents_collected_total", "") == DELETED as f64
        });
    }
    assert!(
        after_delete >= Duration::from_secs(GRACE_SECS),
        "collected {after_delete:?} after the last delete, within the grace period"
    );

    // b goes away for longer than the grace period: its store may not
    // rejoin, because its peers may have collected deletes it lacks.
    assert!(b.terminate().success());
    std::thread::sleep(Duration::from_secs(GRACE_SECS + 3));
    let refused = b.refused_start();
    assert!(refused.contains("stale_store"), "{refused}");
    // Rebuilt: its store moved aside, it starts empty with its identity and
    // catches up from a, without the collected documents.
    std::fs::rename(b.dir.join("store"), b.dir.join("store.stale")).unwrap();
    b.restart();
    wait_until(
        Duration::from_secs(60),
        "the rebuilt b to hold the kept documents",
        || b.list_all("").len() == KEPT,
    );
    wait_until(Duration::from_secs(30), "the rebuilt b to be ready", || {
        b.request("GET", "/ready", &[], b"").status == 200
    });
    assert_eq!(
        status_of(&b, "gone/00"),
        404,
        "a collected document came back"
    );
    assert_eq!(a.list_all("").len(), KEPT);
    println!(
        "{DELETED} deleted documents collected on both nodes {:.1} s after the last delete \
         (grace {GRACE_SECS} s; waited {:.1} s); a store away {} s refused with stale_store; \
         rebuilt from its peer with {KEPT} documents and none of the collected ones",
        after_delete.as_secs_f64(),
        collected.as_secs_f64(),
        GRACE_SECS + 3,
    );
}
