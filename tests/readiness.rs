//! Readiness of real `causeway node` processes on 127.0.0.1: a node with
//! no one to catch up from is ready when it listens; a node rebuilt on an
//! empty disk answers `/ready` 503, with what it still has to fetch, until
//! it has caught up with its region, and holds every document the moment
//! it first answers 200.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::cluster::{wait_until, NodeProc};

/// Documents the region holds before the new node starts.
const DOCS: usize = 400;

fn signal(node: &NodeProc, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_rebuilt_node_is_ready_only_once_it_holds_what_its_region_holds() {
    let root = tempfile::tempdir().unwrap();
    let a = NodeProc::start(root.path(), "a", "eu", &[]);
    // a has no one to catch up from.
    assert_eq!(a.request("GET", "/ready", &[], b"").status, 200);
    for i in 0..DOCS {
        a.write_doc("PUT", &format!("r/{i:04}"), &json!({ "i": i }));
    }
    // c starts empty in the same region while a cannot answer (stopped):
    // not ready, and its answer says why.
    signal(&a, "-STOP");
    let c = NodeProc::start(root.path(), "c", "eu", &a.listen);
    let started = Instant::now();
    let r = c.request("GET", "/ready", &[], b"");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), "not_ready");
    let body = r.json();
    assert!(body["error"]["catch_up"]["from"].is_null(), "{body}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.request("GET", "/ready", &[], b"").status, 503);
    // a comes back: c catches up, and holds everything when it says ready.
    signal(&a, "-CONT");
    let resumed = Instant::now();
    let mut left_seen = 0;
    wait_until(Duration::from_secs(120), "c to be ready", || {
        let r = c.request("GET", "/ready", &[], b"");
        if r.status == 503 {
            let left = r.json()["error"]["catch_up"]["documents_left"]
                .as_u64()
                .unwrap_or(0);
            left_seen = left_seen.max(left);
        }
        r.status == 200
    });
    let ready_after = resumed.elapsed();
    let held = c.list_all("r/").len();
    assert_eq!(held, DOCS, "documents on c when it first answered ready");
    let status = c.status();
    let catch_up = &status["node"]["catch_up"];
    assert_eq!(catch_up["ready"], true);
    assert_eq!(catch_up["from"].as_str(), Some(a.peer_id.as_str()));
    println!(
        "a node rebuilt empty: not ready for {:.1} s while its peer was stopped; ready {:.2} s after the peer resumed, \
         holding all {held} documents (at most {left_seen} seen left to sync)",
        (resumed - started).as_secs_f64(),
        ready_after.as_secs_f64()
    );
}
