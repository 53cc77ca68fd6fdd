//! Draining real `causeway node` processes on 127.0.0.1 before
//! decommissioning one: it refuses writes (503 `draining`) and answers
//! `/ready` 503 from the moment the drain starts, hands everything it holds
//! to a peer, even writes that peer had never seen, and exits 0 once the
//! peer holds them all.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::cluster::{causeway_bin, wait_until, NodeProc};

/// Documents only the drained node holds when its drain starts.
const DOCS: usize = 200;

fn block(node: &NodeProc, peer: &str, blocked: bool) {
    let method = if blocked { "PUT" } else { "DELETE" };
    let r = node.request(method, &format!("/v1/blocked/{peer}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_drained_node_hands_every_write_to_a_peer_and_exits() {
    let root = tempfile::tempdir().unwrap();
    let a = NodeProc::start(root.path(), "a", "eu", &[]);
    let mut b = NodeProc::start(root.path(), "b", "eu", &a.listen);
    wait_until(Duration::from_secs(60), "a and b to replicate", || {
        a.replicating().len() == 1 && b.replicating().len() == 1
    });
    // b is cut off from a and takes writes a never sees.
    block(&a, &b.peer_id, true);
    block(&b, &a.peer_id, true);
    for i in 0..DOCS {
        b.write_doc("PUT", &format!("d/{i:04}"), &json!({ "i": i }));
    }
    assert!(a.list_all("d/").is_empty());

    // The drain starts while b still cannot reach a: it cannot finish.
    let url = format!("http://{}", b.http);
    let started = Instant::now();
    let drain = std::thread::spawn(move || {
        Command::new(causeway_bin())
            .args(["node", "drain", "--url", &url])
            .output()
            .unwrap()
    });
    // Writes go on until the drain begins; each after it is refused.
    let (mut accepted, mut attempt) = (0, 0);
    wait_until(Duration::from_secs(10), "b to refuse writes", || {
        attempt += 1;
        let r = b.request(
            "PUT",
            &format!("/v1/docs/d/late-{attempt}"),
            &[("content-type", "application/json")],
            b"{\"late\": true}",
        );
        if r.status == 200 {
            accepted += 1;
        }
        r.status == 503 && r.code() == "draining"
    });
    let ready = b.request("GET", "/ready", &[], b"");
    assert_eq!((ready.status, ready.code()), (503, "draining".to_string()));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !drain.is_finished(),
        "the drain ended while no peer was reachable"
    );

    // b reaches a again: the drain finishes, b exits, a holds every write.
    block(&a, &b.peer_id, false);
    block(&b, &a.peer_id, false);
    let out = drain.join().unwrap();
    assert!(
        out.status.success(),
        "causeway node drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = started.elapsed();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["done"], true);
    assert_eq!(status["peer"].as_str(), Some(a.peer_id.as_str()));
    // a holds them all when the drain says done, before b's own shutdown
    // hands anything over.
    let held = a.list_all("d/");
    assert_eq!(
        held.len(),
        DOCS + accepted,
        "documents of b on a when drained"
    );
    let exit = b.child.wait().unwrap();
    assert!(exit.success(), "b exited with {exit}");
    assert!(
        a.get_doc(&format!("d/late-{attempt}")).is_none(),
        "a write refused while draining"
    );
    println!(
        "drained b to a: {} documents only b held, all on a {:.2} s after the drain started \
         (b cut off for the first 0.5 s); b refused writes meanwhile and exited 0",
        DOCS + accepted,
        took.as_secs_f64()
    );
}
