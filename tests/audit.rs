//! The audit feed on real nodes: writes through the HTTP API name their
//! token, replicated writes the peer they came from; the feed resumes from
//! a cursor across a restart and answers "who deleted this document".
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::cluster::{create_token, wait_until, NodeProc};

fn feed(node: &NodeProc, admin: &str, query: &str) -> Value {
    let auth = format!("Bearer {admin}");
    let resp = node.request(
        "GET",
        &format!("/v1/audit{query}"),
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

fn actors(page: &Value) -> Vec<String> {
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_feed_names_tokens_and_peers_and_resumes_across_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let admin = create_token(&a_dir, &["admin:*"], &[]);
    let writer = create_token(&a_dir, &["write:n/"], &["--name", "writer"]);
    let deleter = create_token(&a_dir, &["write:n/"], &["--name", "deleter"]);
    std::fs::copy(a_dir.join("tokens.toml"), b_dir.join("tokens.toml")).unwrap();
    let mut a = NodeProc::start(root.path(), "a", "eu", &[]);
    let b = NodeProc::start(root.path(), "b", "us", &a.listen);
    let id = |token: &str| format!("client:token:{}", &token[4..20]);

    let as_writer = format!("Bearer {writer}");
    let as_deleter = format!("Bearer {deleter}");
    let json = ("content-type", "application/json");
    let put = a.request(
        "PUT",
        "/v1/docs/n/1",
        &[("authorization", &as_writer), json],
        br#"{"v":1}"#,
    );
    assert_eq!(put.status, 200, "{}", put.text());
    let del = a.request(
        "DELETE",
        "/v1/docs/n/1",
        &[("authorization", &as_deleter)],
        b"",
    );
    assert_eq!(del.status, 200, "{}", del.text());

    let page = feed(&a, &admin, "");
    assert_eq!(actors(&page), [id(&writer), id(&deleter)]);
    assert_eq!(page["entries"][1]["deleted"], true);
    assert_eq!(
        page["entries"][1]["heads"].as_str(),
        del.header("causeway-heads").as_deref()
    );
    let cursor = page["cursor"].as_u64().unwrap();

    // On b, the same writes came from a.
    wait_until(Duration::from_secs(30), "b to hold the delete", || {
        feed(&b, &admin, "?doc=n/1")["entries"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["deleted"] == true))
    });
    let on_b = feed(&b, &admin, "?doc=n/1");
    assert!(
        actors(&on_b)
            .iter()
            .all(|a_| *a_ == format!("peer:{}", a.peer_id)),
        "{on_b}"
    );

    // Restarted, a goes on numbering after the cursor.
    assert!(a.terminate().success());
    a.restart();
    let put = a.request(
        "PUT",
        "/v1/docs/n/2",
        &[("authorization", &as_writer), json],
        br#"{"v":2}"#,
    );
    assert_eq!(put.status, 200);
    let next = feed(&a, &admin, &format!("?after={cursor}"));
    assert_eq!(actors(&next), [id(&writer)]);
    assert_eq!(next["entries"][0]["doc"], "n/2");
    assert_eq!(next["entries"][0]["seq"].as_u64(), Some(cursor + 1));

    // Who deleted n/1?
    let n1 = feed(&a, &admin, "?doc=n/1");
    let deleted_by: Vec<&str> = n1["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["deleted"] == true)
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(deleted_by, [id(&deleter)]);

    // The feed is for admin:* tokens only.
    let refused = a.request("GET", "/v1/audit", &[("authorization", &as_writer)], b"");
    assert_eq!(refused.status, 403);
    println!(
        "audit: two token writes named on a, the same writes named peer:{} on b, \
         the feed resumed after cursor {cursor} across a restart",
        a.peer_id
    );
}
