//! Consistency controls against real `causeway node` processes on
//! 127.0.0.1: session tokens carried between regions, writes asking for
//! other regions, "where is my write?", and lag metrics through a partition.
//! Each test prints the figures it saw.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::cluster::{converged, three, wait_until, HttpResponse, NodeProc};

const CONVERGE: Duration = Duration::from_secs(60);

fn write(node: &NodeProc, method: &str, path: &str, body: &Value) -> HttpResponse {
    node.request(
        method,
        path,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn read(node: &NodeProc, path: &str, token: &str) -> HttpResponse {
    node.request("GET", path, &[("causeway-session", token)], b"")
}

/// `(documents, lag_seconds)` of `region` in the node's status.
fn region_lag(node: &NodeProc, region: &str) -> (u64, f64) {
    let status = node.status();
    let r = status["node"]["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["region"] == region)
        .unwrap_or_else(|| panic!("no region {region} in {status}"))
        .clone();
    (
        r["behind"]["documents"].as_u64().unwrap(),
        r["behind"]["lag_seconds"].as_f64().unwrap(),
    )
}

/// Blocks (`PUT`) or unblocks (`DELETE`) every other node at `node`.
fn cut(node: &NodeProc, others: &[&NodeProc], method: &str) {
    for o in others {
        let r = node.request(method, &format!("/v1/blocked/{}", o.peer_id), &[], b"");
        assert_eq!(r.status, 200, "{method} block: {}", r.text());
    }
}

#[test]
fn a_session_token_carries_a_write_across_regions_through_a_partition() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path());

    // Read-your-writes across regions: write in eu, read in us with the token.
    let w = write(&a, "PUT", "/v1/docs/cart/1", &json!({"apples": 1}));
    assert_eq!(w.status, 200, "{}", w.text());
    let t1 = w.json()["session"].as_str().unwrap().to_string();
    assert_eq!(w.header("causeway-session").as_deref(), Some(t1.as_str()));
    let start = Instant::now();
    let r = read(&b, "/v1/docs/cart/1?wait_ms=10000", &t1);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"apples": 1}));
    println!(
        "token read in us answered {:.1} ms after the write in eu returned",
        start.elapsed().as_secs_f64() * 1e3
    );

    // Cut eu off. A write there is durable in eu only.
    cut(&a, &[&b, &c], "PUT");
    wait_until(CONVERGE, "eu cut off", || a.replicating().is_empty());
    let w = write(
        &a,
        "PATCH",
        "/v1/docs/cart/1?min_regions=2&timeout_ms=1500",
        &json!({"pears": 2}),
    );
    assert_eq!(w.status, 202, "{}", w.text());
    let body = w.json();
    assert_eq!(body["durability"]["satisfied"], json!(false));
    assert_eq!(body["durability"]["durable_locally"], json!(true));
    assert_eq!(body["durability"]["regions"], json!([]));
    let t2 = body["session"].as_str().unwrap().to_string();
    println!("write asking for 2 regions during the partition: 202 after 1.5 s, regions []");

    // The token read in us waits, then says what is missing instead of
    // answering with data older than the client's write.
    let r = read(&b, "/v1/docs/cart/1?wait_ms=800", &t2);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.code(), "session_unavailable");
    assert!(r.json()["error"]["missing"]["cart/1"].is_array());
    let r = read(&b, "/v1/docs/cart/1?wait_ms=100&stale=true", &t2);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("causeway-stale").as_deref(), Some("true"));
    assert_eq!(r.json(), json!({"apples": 1}));
    // The stale answer's token still requires the missing write.
    let carried = r.header("causeway-session").unwrap();
    assert_eq!(
        read(&b, "/v1/docs/cart/1?wait_ms=100", &carried).status,
        409
    );

    // Lag towards us and ap rises while cut off.
    wait_until(CONVERGE, "lag towards us to pass 1 s", || {
        region_lag(&a, "us").1 >= 1.0
    });
    let (docs, lag) = region_lag(&a, "us");
    assert_eq!(docs, 1);
    let metrics = a.request("GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("causeway_region_lag_seconds{region=\"us\"}"),
        "{metrics}"
    );
    println!("during the partition: eu sees us 1 document behind, lag {lag:.1} s");

    // Heal: the token read in us now succeeds, everyone converges, both
    // other regions are known to hold the write, and lag falls to zero.
    let healed = Instant::now();
    cut(&a, &[&b, &c], "DELETE");
    let r = read(&b, "/v1/docs/cart/1?wait_ms=30000", &t2);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"apples": 1, "pears": 2}));
    let waited = healed.elapsed();
    wait_until(CONVERGE, "cart/1 converged", || {
        converged(&[&a, &b, &c], "cart/1")
    });
    let t = wait_until(CONVERGE, "lag back to zero", || {
        region_lag(&a, "us") == (0, 0.0) && region_lag(&a, "ap") == (0, 0.0)
    });
    let place = a
        .request("GET", "/v1/where/cart/1", &[("causeway-session", &t2)], b"")
        .json();
    let holding: Vec<&str> = place["regions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["holds"] == json!(true))
        .map(|r| r["region"].as_str().unwrap())
        .collect();
    assert_eq!(holding, ["ap", "us"], "{place}");
    assert_eq!(place["local"]["holds"], json!(true));
    println!(
        "after the heal: token read in us answered after {:.0} ms, lag zero after {:.0} ms; where: {holding:?}",
        waited.as_secs_f64() * 1e3,
        t.as_secs_f64() * 1e3
    );

    // A write asking for both other regions by name, now connected.
    let w = write(
        &a,
        "PATCH",
        "/v1/docs/cart/1?regions=us,ap&timeout_ms=10000",
        &json!({"plums": 3}),
    );
    assert_eq!(w.status, 200, "{}", w.text());
    assert_eq!(w.json()["durability"]["regions"], json!(["ap", "us"]));
}

#[test]
fn bad_session_tokens_and_options_are_refused_and_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let a = NodeProc::start(root.path(), "a", "eu", &[]);
    let w = write(&a, "PUT", "/v1/docs/d/1", &json!({"v": 1}));
    let token = w.json()["session"].as_str().unwrap().to_string();
    let mut edited = token.clone().into_bytes();
    let last = edited.len() - 3;
    edited[last] = if edited[last] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    for bad in ["garbage!", edited.as_str(), "AQ"] {
        let r = read(&a, "/v1/docs/d/1", bad);
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_session".into()),
            "{bad}"
        );
        let r = a.request(
            "PUT",
            "/v1/docs/d/1",
            &[
                ("causeway-session", bad),
                ("content-type", "application/json"),
            ],
            br#"{"v": 2}"#,
        );
        assert_eq!((r.status, r.code()), (400, "invalid_session".into()));
    }
    for query in [
        "min_regions=1&regions=us",
        "regions=Not%20A%20Region",
        "timeout_ms=5",
        "min_regions=1&timeout_ms=999999999",
    ] {
        let r = write(
            &a,
            "PATCH",
            &format!("/v1/docs/d/1?{query}"),
            &json!({"v": 3}),
        );
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_query".into()),
            "{query}"
        );
    }
    assert_eq!(a.get_doc("d/1").unwrap().0, json!({"v": 1}));
    // The genuine token is accepted and held at once.
    let r = read(&a, "/v1/docs/d/1?wait_ms=100", &token);
    assert_eq!(r.status, 200);
}
