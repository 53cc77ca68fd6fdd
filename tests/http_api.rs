//! Bad input to a real node's HTTP API gets the documented status and error
//! code, and changes nothing. Also: invalid settings files and unreachable
//! bootstrap peers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::cluster::{causeway_bin, wait_until, NodeProc, Options};

/// method, path, headers, body, expected status, expected code.
type Case<'a> = (
    &'a str,
    String,
    Vec<(&'a str, &'a str)>,
    &'a [u8],
    u16,
    &'a str,
);

const READ: &str = "read-token-0123456789";
const WRITE: &str = "write-token-0123456789";

#[test]
fn bad_requests_get_their_documented_errors_and_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let tables = format!(
        "[http]\nread_tokens = [{READ:?}]\nwrite_tokens = [{WRITE:?}]\nbody_limit_bytes = 65536"
    );
    let node = NodeProc::start_with(
        root.path(),
        "a",
        "eu",
        &[],
        Options {
            tables: &tables,
            ..Options::default()
        },
    );
    let auth = format!("Bearer {WRITE}");
    let w = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let ok = node.request("PUT", "/v1/docs/notes/1", &w, br#"{"title":"draft"}"#);
    assert_eq!(ok.status, 200, "{}", ok.text());
    let heads = ok.header("causeway-heads").unwrap();

    let big = vec![b'x'; 100_000];
    let read_auth = format!("Bearer {READ}");
    let r = [("authorization", read_auth.as_str())];
    let cases: Vec<Case> = vec![
        (
            "PUT",
            "/v1/docs/notes/1".into(),
            w.to_vec(),
            b"{not json",
            400,
            "malformed_json",
        ),
        (
            "PUT",
            "/v1/docs/notes/1".into(),
            w.to_vec(),
            b"[1,2]",
            422,
            "not_an_object",
        ),
        (
            "PUT",
            "/v1/docs/notes/1".into(),
            w.to_vec(),
            &big,
            413,
            "body_too_large",
        ),
        (
            "PUT",
            "/v1/docs/bad%00id".into(),
            w.to_vec(),
            b"{}",
            400,
            "invalid_doc_id",
        ),
        (
            "GET",
            "/v1/docs/notes/none".into(),
            w.to_vec(),
            b"",
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/changes/notes/1?since=zz".into(),
            w.to_vec(),
            b"",
            400,
            "invalid_heads",
        ),
        (
            "POST",
            "/v1/changes/notes/1".into(),
            w.to_vec(),
            b"garbage",
            400,
            "invalid_change",
        ),
        (
            "GET",
            "/v1/docs?limit=5000".into(),
            w.to_vec(),
            b"",
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/docs/notes/1".into(),
            vec![],
            b"",
            401,
            "unauthorized",
        ),
        (
            "GET",
            "/v1/docs/notes/1".into(),
            vec![("authorization", "Bearer wrong-token-000000")],
            b"",
            401,
            "unauthorized",
        ),
        (
            "PUT",
            "/v1/docs/notes/1".into(),
            r.to_vec(),
            b"{\"title\":\"x\"}",
            403,
            "forbidden",
        ),
        (
            "GET",
            "/v1/nothing".into(),
            w.to_vec(),
            b"",
            404,
            "no_route",
        ),
        (
            "POST",
            "/v1/docs/notes/1".into(),
            w.to_vec(),
            b"{}",
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, headers, body, status, code) in &cases {
        let resp = node.request(method, path, headers, body);
        assert_eq!(
            (resp.status, resp.code().as_str()),
            (*status, *code),
            "{method} {path}: {}",
            resp.text()
        );
        let msg = resp.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!msg.is_empty(), "{method} {path}: empty message");
    }
    let after = node.request("GET", "/v1/docs/notes/1", &r, b"");
    assert_eq!(after.json(), json!({"title": "draft"}));
    assert_eq!(
        after.header("causeway-heads").unwrap(),
        heads,
        "a refused request changed the document"
    );
    assert_eq!(node.request("GET", "/health", &[], b"").status, 200);
    println!(
        "{} bad requests: each got its documented status and code; the document is unchanged",
        cases.len()
    );
}

#[test]
fn binary_changes_round_trip_through_the_api() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::start(root.path(), "a", "eu", &[]);
    node.write_doc("PUT", "cart/9", &json!({"items": 1}));
    let all = node.request("GET", "/v1/changes/cart/9", &[], b"");
    assert_eq!(all.status, 200);
    let heads = all.header("causeway-heads").unwrap();
    let none = node.request(
        "GET",
        &format!("/v1/changes/cart/9?since={heads}"),
        &[],
        b"",
    );
    assert!(
        none.body.is_empty(),
        "changes beyond the current heads: {} bytes",
        none.body.len()
    );
    // Posting the same changes again is idempotent.
    let again = node
        .request("POST", "/v1/changes/cart/9", &[], &all.body)
        .json();
    assert_eq!(again["applied"], 0);
    assert!(again["duplicates"].as_u64().unwrap() >= 1);
    // Another node takes them as a new document.
    let other = NodeProc::start(root.path(), "b", "us", &[]);
    let applied = other
        .request("POST", "/v1/changes/cart/9", &[], &all.body)
        .json();
    assert_eq!(applied["heads"], heads.as_str());
    assert_eq!(other.get_doc("cart/9").unwrap().0, json!({"items": 1}));
    println!(
        "{} bytes of changes moved between nodes; same heads on both",
        all.body.len()
    );
}

#[test]
fn an_invalid_settings_file_names_the_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    for (text, expect) in [
        (
            "data_dir = \"/tmp/x\"\n[network]\nmax_connections = 0\n",
            "key network.max_connections: must be at least 1",
        ),
        (
            "data_dir = \"/tmp/x\"\nregoin = \"eu\"\n",
            "unknown field `regoin`",
        ),
        (
            "data_dir = \"/tmp/x\"\n[http]\nlisten = \"nowhere\"\n",
            "key http.listen",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(causeway_bin())
            .args(["node", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains(expect),
            "stderr: {stderr}"
        );
    }
    println!("3 invalid settings files refused with file, key and reason");
}

#[test]
fn an_unreachable_bootstrap_peer_is_retried_while_the_node_serves() {
    let root = tempfile::tempdir().unwrap();
    // A port nothing listens on (bound and closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = NodeProc::start(
        root.path(),
        "a",
        "eu",
        &[format!("/ip4/127.0.0.1/tcp/{port}")],
    );
    node.write_doc("PUT", "still/works", &json!({"ok": true}));
    let t = wait_until(Duration::from_secs(20), "several failed dials", || {
        let status = node.status();
        status["node"]["peers"]
            .as_array()
            .is_none_or(|p| p.is_empty())
            && node_log(&node).matches("peer unreachable").count() >= 3
    });
    assert_eq!(node.request("GET", "/health", &[], b"").status, 200);
    assert_eq!(node.get_doc("still/works").unwrap().0, json!({"ok": true}));
    println!(
        "unreachable bootstrap peer: 3 failed dials logged in {:.1} s, node kept serving",
        t.as_secs_f64()
    );
}

fn node_log(node: &NodeProc) -> String {
    std::fs::read_to_string(node.dir.join("node.log")).unwrap_or_default()
}

#[test]
fn a_watcher_sees_local_and_replicated_changes_as_server_sent_events() {
    use std::io::{Read, Write};
    let root = tempfile::tempdir().unwrap();
    let a = NodeProc::start(root.path(), "a", "eu", &[]);
    let b = NodeProc::start(root.path(), "b", "us", &a.listen);
    let mut stream = std::net::TcpStream::connect(&a.http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let request = format!(
        "GET /v1/watch?prefix=feed/ HTTP/1.1\r\nHost: {}\r\n\r\n",
        a.http
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut seen = String::new();
    let mut read_until = |needle: &str, seen: &mut String| {
        let mut buf = [0u8; 4096];
        while !seen.contains(needle) {
            let n = stream
                .read(&mut buf)
                .expect("the watch stream ended or timed out");
            assert!(n > 0, "the watch stream closed; got: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    read_until("text/event-stream", &mut seen);
    let start = std::time::Instant::now();
    a.write_doc("PUT", "feed/local", &json!({"from": "a"}));
    read_until(r#""value":{"from":"a"}"#, &mut seen);
    // Outside the prefix: written before the remote write, so it would have
    // arrived before it if the filter let it through.
    a.write_doc("PUT", "other/x", &json!({"from": "a"}));
    b.write_doc("PUT", "feed/remote", &json!({"from": "b"}));
    read_until(r#""value":{"from":"b"}"#, &mut seen);
    assert!(seen.contains("event: change") && seen.contains(r#""doc":"feed/remote""#));
    assert!(
        !seen.contains("other/x"),
        "a document outside the prefix was sent: {seen}"
    );
    println!(
        "watcher on a saw its own write and b's replicated write within {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
}

#[test]
fn sigterm_stops_a_node_cleanly_and_nothing_acknowledged_is_lost() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(root.path(), "a", "eu", &[]);
    let heads = node.write_doc("PUT", "kept/1", &json!({"v": 1}));
    let status = node.terminate();
    assert!(status.success(), "exit status {status}");
    let log = node_log(&node);
    assert!(
        log.contains("reason=SIGTERM")
            && log.contains("network stopped")
            && log.contains("stopped"),
        "{log}"
    );
    node.restart();
    let (value, after) = node.get_doc("kept/1").unwrap();
    assert_eq!((value, after), (json!({"v": 1}), heads));
    println!(
        "SIGTERM: exit 0 after a graceful stop; the acknowledged write is there after restart"
    );
}

#[test]
fn metrics_expose_causeway_and_libp2p_figures_and_probes_answer() {
    let root = tempfile::tempdir().unwrap();
    let a = NodeProc::start(root.path(), "a", "eu", &[]);
    let b = NodeProc::start(root.path(), "b", "us", &a.listen);
    wait_until(Duration::from_secs(30), "a and b to replicate", || {
        a.replicating().len() == 1
    });
    a.write_doc("PUT", "m/1", &json!({"x": 1}));
    assert_eq!(a.request("GET", "/ready", &[], b"").status, 200);
    let mut text = String::new();
    wait_until(
        Duration::from_secs(10),
        "the delta to show in b's metrics",
        || {
            text = b.request("GET", "/metrics", &[], b"").text();
            text.contains("causeway_changes_applied_total{kind=\"delta\"} ")
                && !text.contains("causeway_changes_applied_total{kind=\"delta\"} 0\n")
        },
    );
    for needle in [
        "causeway_peers_replicating 1",
        "causeway_messages_sent_total{kind=\"hello\"}",
        "libp2p_swarm_",
        "libp2p_identify_",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    println!(
        "/metrics on b: {} lines, causeway_* and libp2p_* present; /ready 200",
        text.lines().count()
    );
}

#[test]
fn a_change_nesting_maps_2000_deep_is_refused_and_the_node_serves_on() {
    use causeway_engine::automerge::transaction::Transactable;
    use causeway_engine::automerge::{Automerge, ObjType, ROOT};
    use causeway_engine::{lineage::genesis_change, DocId};

    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::start(root.path(), "a", "eu", &[]);
    // 3.9 KB of binary changes that nest a map 2,000 levels deep: before
    // shape limits, every node that read this document overflowed its stack.
    let mut am = Automerge::new();
    am.apply_changes([genesis_change(&DocId::new("deep/1").unwrap())])
        .unwrap();
    let mut tx = am.transaction();
    let mut obj = tx.put_object(ROOT, "a", ObjType::Map).unwrap();
    for _ in 1..2_000 {
        obj = tx.put_object(&obj, "m", ObjType::Map).unwrap();
    }
    tx.commit();
    let body: Vec<u8> = am
        .get_changes(&[])
        .iter()
        .skip(1)
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect();

    let refused = node.request("POST", "/v1/changes/deep/1", &[], &body);
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (422, "shape_limit"),
        "{}",
        refused.text()
    );
    assert_eq!(refused.json()["error"]["limit"], "max_depth");
    assert_eq!(node.request("GET", "/v1/docs/deep/1", &[], b"").status, 404);
    node.write_doc("PUT", "deep/2", &json!({"fine": {"x": 1}}));
    assert_eq!(node.get_doc("deep/2").unwrap().0, json!({"fine": {"x": 1}}));
    let status = node.request("GET", "/v1/status", &[], b"").json();
    assert_eq!(status["engine"]["shape_refused"], 1);
    println!(
        "a {}-byte POST nesting 2,000 maps: 422 shape_limit, nothing stored, node serving",
        body.len()
    );
}
