//! automerge-repo interop: the real `@automerge/automerge-repo` 2.5.6 and
//! `@automerge/automerge` 3.5.0 (npm, installed on first use) against a
//! cluster of real nodes in three regions (eu, us, ap), through each node's
//! automerge-repo WebSocket endpoint and its HTTP API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::cluster::{three, three_with, wait_until, NodeProc};
use support::repo_client::{heads, node_heads, Library, RepoClient};

const CONVERGE: Duration = Duration::from_secs(30);

/// Waits until every node holds `id` at `want` heads.
fn nodes_reach(nodes: &[&NodeProc], id: &str, want: &[String]) -> Duration {
    wait_until(
        CONVERGE,
        &format!("every node holding {id} at {want:?}"),
        || {
            nodes
                .iter()
                .all(|n| node_heads(n, id).as_deref() == Some(want))
        },
    )
}

/// A valid automerge-repo document id that no one has made (bs58check of
/// 16 bytes, computed with the same encoding as automerge-repo's).
fn fresh_document_id(seed: u8) -> String {
    let mut bytes = [seed; 16];
    bytes[0] = 0xc0;
    bytes[15] = u8::try_from(std::process::id() % 251).unwrap();
    causeway_node::automerge_repo::document_id::encode(&bytes)
}

/// A client of `creator` makes a document at the node in eu; a client of
/// `finder` in ap finds it with identical heads; changes made by either
/// reach the other, and every region holds them.
fn made_in_one_region_found_and_edited_in_another(
    nodes: &[&NodeProc; 3],
    creator: Library,
    finder: Library,
) {
    let [a, b, c] = *nodes;
    let mut at_a = RepoClient::of(creator, &a.http);
    let mut at_c = RepoClient::of(finder, &c.http);
    let content = json!({"title": "from eu", "n": 1});
    let (id, created) = at_a.create(content.clone());
    // Created at the node in eu once that node holds it (the client sends
    // it after create() returns).
    nodes_reach(&[a], &id, &created);
    let started = Instant::now();
    let found = at_c.call(json!({"cmd": "find", "id": id}));
    println!(
        "{creator:?} creates in eu, {finder:?} finds in ap: {:.0} ms (client's own figure {:.0} ms)",
        started.elapsed().as_secs_f64() * 1e3,
        found["ms"].as_f64().unwrap()
    );
    assert_eq!(heads(&found), created, "found with identical heads");
    assert_eq!(found["value"], content);

    // An ordinary Causeway document: every region holds it, the HTTP API
    // shows it.
    nodes_reach(nodes, &id, &created);
    assert_eq!(b.get_doc(&id).unwrap().0, content);

    // Changes made by either client reach the other.
    let from_c = heads(&at_c.call(json!({"cmd": "change", "id": id, "set": {"by_c": true}})));
    let value = at_a.wait_heads(&id, &from_c, CONVERGE);
    assert_eq!(value["by_c"], true);
    let from_a = heads(&at_a.call(json!({"cmd": "change", "id": id, "set": {"by_a": 1}})));
    let value = at_c.wait_heads(&id, &from_a, CONVERGE);
    assert_eq!(value["by_a"], 1);
    nodes_reach(nodes, &id, &from_a);

    // Where it is held: the other regions report holding it (their
    // progress reports arrive shortly after the change).
    wait_until(CONVERGE, "us and ap reported in /v1/where", || {
        let place = a
            .request("GET", &format!("/v1/where/{id}"), &[], b"")
            .json();
        let holding: Vec<&str> = place["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["holds"] == true)
            .filter_map(|r| r["region"].as_str())
            .collect();
        holding.contains(&"us") && holding.contains(&"ap")
    });
}

#[test]
fn a_js_document_made_in_one_region_is_found_and_edited_from_another() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path());
    made_in_one_region_found_and_edited_in_another(&[&a, &b, &c], Library::Js, Library::Js);
}

#[test]
fn samod_clients_interoperate_with_nodes_and_js_clients() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path());
    let nodes = [&a, &b, &c];
    made_in_one_region_found_and_edited_in_another(&nodes, Library::Samod, Library::Samod);
    made_in_one_region_found_and_edited_in_another(&nodes, Library::Samod, Library::Js);
    made_in_one_region_found_and_edited_in_another(&nodes, Library::Js, Library::Samod);

    // An unknown document is unavailable to samod too, and a document
    // written through the HTTP API is found.
    let mut at_b = RepoClient::samod(&b.http);
    let answer = at_b.call(json!({"cmd": "find", "id": fresh_document_id(3)}));
    assert_eq!(answer["unavailable"], true, "{answer}");
    assert!(answer["ms"].as_f64().unwrap() < 2000.0, "{answer}");
    let id = fresh_document_id(4);
    let written = a.write_doc("PUT", &id, &json!({"via": "http"}));
    let found = at_b.call(json!({"cmd": "find", "id": id}));
    assert_eq!(heads(&found), vec![written]);
}

#[test]
fn an_unknown_document_is_unavailable_quickly_and_pushed_when_it_appears() {
    let root = tempfile::tempdir().unwrap();
    // The longest wait is a minute here: the answer comes as soon as both
    // peers asked said they lack the document (after a grace of 250 ms),
    // not when the wait runs out.
    let (a, _b, c) = three_with(
        root.path(),
        "[automerge_repo]\nmissing_document_wait_ms = 60000\n",
    );
    let mut at_c = RepoClient::js(&c.http, None);
    let id = fresh_document_id(1);
    let answer = at_c.call(json!({"cmd": "find", "id": id}));
    let ms = answer["ms"].as_f64().unwrap();
    println!("find() of an unknown document: unavailable after {ms:.0} ms");
    assert_eq!(answer["unavailable"], true, "{answer}");
    assert!(ms < 30_000.0, "unavailable only after {ms} ms");

    // The request is remembered: written later through another region's
    // HTTP API, the document is pushed to the client that asked.
    let written = a.write_doc("PUT", &id, &json!({"late": "arrival"}));
    let mut want = vec![written];
    want.sort();
    let value = at_c.wait_heads(&id, &want, CONVERGE);
    assert_eq!(value, json!({"late": "arrival"}));
}

#[test]
fn ephemeral_messages_cross_regions() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path());
    let mut at_a = RepoClient::js(&a.http, None);
    let mut at_b = RepoClient::js(&b.http, None);
    let mut at_c = RepoClient::js(&c.http, None);
    let (id, created) = at_a.create(json!({"doc": "presence"}));
    nodes_reach(&[&a, &b, &c], &id, &created);
    at_b.call(json!({"cmd": "find", "id": id}));
    at_c.call(json!({"cmd": "find", "id": id}));
    // Each node relays to its own clients that asked for the document;
    // the other nodes' clients get it through the cluster.
    at_a.call(json!({"cmd": "broadcast", "id": id, "message": {"cursor": 7}}));
    for (name, client) in [("us", &mut at_b), ("ap", &mut at_c)] {
        let t = wait_until(Duration::from_secs(10), "an ephemeral message", || {
            let got = client.call(json!({"cmd": "messages", "id": id}));
            !got["messages"].as_array().unwrap().is_empty()
        });
        let got = client.call(json!({"cmd": "messages", "id": id}));
        println!("ephemeral message from eu reached a client in {name} within {t:?}");
        assert_eq!(got["messages"][0]["message"], json!({"cursor": 7}));
        assert_eq!(got["messages"].as_array().unwrap().len(), 1, "once: {got}");
    }
    // And back: from ap to eu.
    at_c.call(json!({"cmd": "broadcast", "id": id, "message": {"cursor": 9}}));
    wait_until(Duration::from_secs(10), "a message back to eu", || {
        let got = at_a.call(json!({"cmd": "messages", "id": id}));
        got["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["message"] == json!({"cursor": 9}))
    });
}

#[test]
fn http_and_js_clients_read_each_others_documents() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path());

    // Written through the HTTP API in us, read by a JS client in ap.
    let id = fresh_document_id(2);
    let written = b.write_doc("PUT", &id, &json!({"from": "http", "n": 1}));
    let mut at_c = RepoClient::js(&c.http, None);
    let found = at_c.call(json!({"cmd": "find", "id": id}));
    assert_eq!(found["value"], json!({"from": "http", "n": 1}));
    assert_eq!(heads(&found), vec![written]);

    // Changed by the JS client, read through the HTTP API everywhere.
    let changed = heads(&at_c.call(json!({"cmd": "change", "id": id, "set": {"n": 2}})));
    nodes_reach(&[&a, &b, &c], &id, &changed);
    assert_eq!(a.get_doc(&id).unwrap().0, json!({"from": "http", "n": 2}));

    // A document made by @automerge/automerge alone (every value kind and a
    // concurrent branch), posted as binary changes to one node, reads back
    // identical from every other, and Automerge loads what they return.
    let made = at_c.call(json!({"cmd": "make_doc"}));
    let bytes = data_encoding::BASE64
        .decode(made["changes"].as_str().unwrap().as_bytes())
        .unwrap();
    let posted = a.request(
        "POST",
        "/v1/changes/interop/js1",
        &[("content-type", "application/octet-stream")],
        &bytes,
    );
    assert_eq!(posted.status, 200, "{}", posted.text());
    let want = heads(&made);
    nodes_reach(&[&a, &b, &c], "interop/js1", &want);
    for node in [&b, &c] {
        let got = node.request("GET", "/v1/changes/interop/js1", &[], b"");
        assert_eq!(got.status, 200);
        let loaded =
            at_c.call(json!({"cmd": "load", "changes": data_encoding::BASE64.encode(&got.body)}));
        assert_eq!(heads(&loaded), want, "heads loaded from {}", node.name);
        assert!(
            same_json(&loaded["value"], &made["value"]),
            "value loaded from {}: {}",
            node.name,
            loaded["value"]
        );
        let rendered = node.get_doc("interop/js1").unwrap().0;
        assert!(
            same_json(&rendered, &made["value"]),
            "{} renders {rendered}",
            node.name
        );
    }
    println!("imported document: {}", made["value"]);
}

#[test]
fn a_client_that_reconnects_mid_sync_converges() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path());
    let storage = root.path().join("client-storage");
    let mut first = RepoClient::js(&a.http, Some(&storage));
    let (id, _) = first.create(json!({"log": []}));
    // Many changes, flushed to the client's storage, then the client is
    // killed while it is still sending them.
    let mut last = Vec::new();
    for i in 0..200 {
        let big = "x".repeat(2000);
        last =
            heads(&first.call(json!({"cmd": "change", "id": id, "set": {format!("k{i}"): big}})));
    }
    first.call(json!({"cmd": "flush"}));
    first.kill();
    let at_kill = node_heads(&a, &id);
    println!(
        "at the kill the node held {} (client at {last:?})",
        match &at_kill {
            Some(h) if *h == last => "everything".to_string(),
            Some(h) => format!("an earlier state {h:?}"),
            None => "nothing".into(),
        }
    );
    // The same client (same storage) connects again, to another region.
    let mut again = RepoClient::js(&c.http, Some(&storage));
    let state = again.call(json!({"cmd": "find", "id": id}));
    assert_eq!(
        heads(&state),
        last,
        "the client kept its changes; its storage: {:?}",
        storage_files(&storage)
    );
    nodes_reach(&[&a, &b, &c], &id, &last);
    assert_eq!(
        c.get_doc(&id).unwrap().0["k199"].as_str().unwrap().len(),
        2000
    );
}

/// Every file under `dir` with its size, for a failure message.
fn storage_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => pending.push(path),
                Ok(meta) => files.push((
                    path.strip_prefix(dir)
                        .unwrap_or(&path)
                        .display()
                        .to_string(),
                    meta.len(),
                )),
                Err(_) => {}
            }
        }
    }
    files.sort();
    files
}

/// JSON equality with numbers compared by value: Automerge's floats with an
/// integral value are `0.0` in Causeway's JSON and `0` in JavaScript's.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => x.as_f64() == y.as_f64(),
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// `make example-automerge-repo` keeps working: the example app against its
/// own three-region cluster (on ports shifted away from the defaults).
#[test]
fn the_automerge_repo_example_app_runs() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/automerge-repo-app/run.sh");
    let base = 200 + std::process::id() % 500;
    let out = std::process::Command::new("bash")
        .arg(script)
        .env("EXAMPLE_PORT_BASE", base.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("eu and ap converged"), "{stdout}");
    assert!(stdout.contains("us (HTTP API)"), "{stdout}");
}
