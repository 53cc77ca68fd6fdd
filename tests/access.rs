//! Scoped bearer tokens on a real node: a token for one prefix cannot read,
//! list, watch or write another, node routes need `admin:*`, and tokens
//! issued, revoked or expired in the tokens file take effect without a
//! restart (open watch streams included).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use support::cluster::{create_token, revoke_token, wait_until, NodeProc};

/// A watch stream: the connection and what it has received so far.
struct Watch {
    stream: TcpStream,
    seen: String,
}

impl Watch {
    fn open(addr: &str, path: &str, token: &str) -> Watch {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
        let mut watch = Watch {
            stream,
            seen: String::new(),
        };
        assert!(watch.read_until("\r\n\r\n", Duration::from_secs(10)));
        assert!(watch.seen.starts_with("HTTP/1.1 200"), "{}", watch.seen);
        watch
    }

    /// Reads until `text` arrives (true) or the stream closes or `limit`
    /// passes (false).
    fn read_until(&mut self, text: &str, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while !self.seen.contains(text) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Whether the node ends the stream (its last chunk, or closing the
    /// connection) within `limit`.
    fn ends_within(&mut self, limit: Duration) -> bool {
        self.read_until("\r\n0\r\n\r\n", limit) || self.closed()
    }

    fn closed(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        matches!(self.stream.read(&mut [0u8; 1]), Ok(0))
    }
}

/// method, path, headers, body.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a [u8]);

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn a_token_for_one_prefix_cannot_read_list_watch_or_write_another() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    let admin = create_token(&dir, &["admin:*"], &["--name", "operator"]);
    let writer = create_token(&dir, &["write:a/"], &[]);
    let reader = create_token(&dir, &["read:a/"], &[]);
    let node = NodeProc::start(root.path(), "a", "eu", &[]);
    let reader_token = reader.clone();
    let (admin, writer, reader) = (bearer(&admin), bearer(&writer), bearer(&reader));
    let json = ("content-type", "application/json");
    let as_admin = [("authorization", admin.as_str()), json];
    let as_writer = [("authorization", writer.as_str()), json];
    let as_reader = [("authorization", reader.as_str())];
    for id in ["a/1", "b/1"] {
        let put = node.request("PUT", &format!("/v1/docs/{id}"), &as_admin, br#"{"v":1}"#);
        assert_eq!(put.status, 200, "{}", put.text());
    }
    let b_heads = node
        .request("GET", "/v1/docs/b/1", &as_admin, b"")
        .header("causeway-heads")
        .unwrap();

    // Every route that touches b/ or the node as a whole, with a token for
    // a/: each is refused before it does anything.
    let peer = format!("/v1/blocked/{}", node.peer_id);
    let refused: Vec<Case> = vec![
        ("GET", "/v1/docs/b/1", &as_writer, b""),
        ("PUT", "/v1/docs/b/1", &as_writer, br#"{"v":2}"#),
        ("PATCH", "/v1/docs/b/1", &as_writer, br#"{"v":2}"#),
        ("DELETE", "/v1/docs/b/1", &as_writer, b""),
        ("PUT", "/v1/docs/b/2", &as_writer, br#"{"v":2}"#),
        ("GET", "/v1/changes/b/1", &as_writer, b""),
        ("POST", "/v1/changes/b/1", &as_writer, b"garbage"),
        ("GET", "/v1/where/b/1", &as_writer, b""),
        ("GET", "/v1/watch/b/1", &as_writer, b""),
        ("GET", "/v1/watch?prefix=b/", &as_writer, b""),
        ("GET", "/v1/docs?prefix=b/", &as_writer, b""),
        ("POST", "/v1/repair/a/1", &as_writer, b""),
        ("POST", "/v1/backup", &as_writer, b""),
        ("POST", "/v1/drain", &as_writer, b""),
        ("PUT", &peer, &as_writer, b""),
        ("DELETE", &peer, &as_writer, b""),
        // Read on a/ does not write a/.
        ("PUT", "/v1/docs/a/1", &as_reader, br#"{"v":2}"#),
        ("PATCH", "/v1/docs/a/1", &as_reader, br#"{"v":2}"#),
        ("DELETE", "/v1/docs/a/1", &as_reader, b""),
        ("POST", "/v1/changes/a/1", &as_reader, b"garbage"),
    ];
    for (method, path, headers, body) in &refused {
        let resp = node.request(method, path, headers, body);
        assert_eq!(
            (resp.status, resp.code().as_str()),
            (403, "forbidden"),
            "{method} {path}: {}",
            resp.text()
        );
    }
    let after = node.request("GET", "/v1/docs/b/1", &as_admin, b"");
    assert_eq!(after.json(), json!({"v": 1}));
    assert_eq!(after.header("causeway-heads").unwrap(), b_heads);
    assert_eq!(
        node.request("GET", "/v1/docs/b/2", &as_admin, b"").status,
        404
    );

    // What the grants do allow.
    assert_eq!(
        node.request("GET", "/v1/docs/a/1", &as_reader, b"").status,
        200
    );
    let put = node.request("PUT", "/v1/docs/a/2", &as_writer, br#"{"v":2}"#);
    assert_eq!(put.status, 200, "{}", put.text());
    let listed = node.request("GET", "/v1/docs?prefix=", &as_reader, b"");
    assert_eq!(listed.json(), json!({"ids": ["a/1", "a/2"], "next": null}));
    let everything = node.request("GET", "/v1/docs", &as_admin, b"");
    assert_eq!(everything.json()["ids"], json!(["a/1", "a/2", "b/1"]));
    for path in ["/v1/status", "/metrics"] {
        assert_eq!(node.request("GET", path, &as_reader, b"").status, 200);
    }

    // A watch of everything with a token for a/ shows a/ only.
    let mut watch = Watch::open(&node.http, "/v1/watch?prefix=", &reader_token);
    for id in ["b/3", "a/3"] {
        let put = node.request("PUT", &format!("/v1/docs/{id}"), &as_admin, br#"{"v":3}"#);
        assert_eq!(put.status, 200);
    }
    assert!(
        watch.read_until("\"doc\":\"a/3\"", Duration::from_secs(10)),
        "the watch did not show a/3: {}",
        watch.seen
    );
    assert!(!watch.seen.contains("b/3"), "{}", watch.seen);
    println!(
        "{} requests of a token for a/ on b/ or node routes: all 403, b/ unchanged; \
         the token's list and watch show a/ only",
        refused.len()
    );
}

#[test]
fn tokens_are_issued_revoked_and_expire_without_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::start(root.path(), "a", "eu", &[]);
    let dir = &node.dir;
    // No tokens file: the loopback API is open.
    assert_eq!(node.request("GET", "/v1/docs", &[], b"").status, 200);

    // The first token closes it, within a second or so.
    let token = create_token(dir, &["read:*"], &[]);
    let took = wait_until(
        Duration::from_secs(10),
        "the tokens file to be read",
        || node.request("GET", "/v1/docs", &[], b"").status == 401,
    );
    let auth = bearer(&token);
    let with = [("authorization", auth.as_str())];
    assert_eq!(node.request("GET", "/v1/docs", &with, b"").status, 200);
    let mut watch = Watch::open(&node.http, "/v1/watch?prefix=", &token);

    // Revoked: refused, and its open watch stream ends.
    revoke_token(dir, &token[4..20]);
    wait_until(Duration::from_secs(10), "the revocation to be read", || {
        node.request("GET", "/v1/docs", &with, b"").code() == "token_revoked"
    });
    assert!(
        watch.ends_within(Duration::from_secs(5)),
        "a revoked token's watch stream stayed open"
    );

    // Expired: a token past its expires_at is refused.
    let expiring = create_token(dir, &["read:*"], &["--expires-in", "1d"]);
    let auth = bearer(&expiring);
    let with = [("authorization", auth.as_str())];
    wait_until(Duration::from_secs(10), "the new token to be read", || {
        node.request("GET", "/v1/docs", &with, b"").status == 200
    });
    let path = dir.join("tokens.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let edited: String = text
        .lines()
        .map(|l| {
            if l.starts_with("expires_at") {
                format!("expires_at = {}\n", now - 1)
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let new = dir.join("tokens.edit");
    std::fs::write(&new, edited).unwrap();
    std::fs::rename(&new, &path).unwrap();
    wait_until(Duration::from_secs(10), "the expiry to be read", || {
        node.request("GET", "/v1/docs", &with, b"").code() == "token_expired"
    });
    println!(
        "the first token closed the API after {:.1} s; revocation and expiry took effect \
         without a restart, and the revoked token's watch stream ended",
        took.as_secs_f64()
    );
}

#[test]
fn session_keys_rotate_without_invalidating_outstanding_tokens() {
    let root = tempfile::tempdir().unwrap();
    let key = |id: &str| {
        format!("[[http.session_keys]]\nid = \"{id}\"\nsecret = \"secret-of-{id}-0123456789\"\n")
    };
    let (k1, k2) = (key("k1"), key("k2"));
    let mut node = NodeProc::start_with_tables(root.path(), "a", "eu", &k1);
    let with_keys = |node: &mut NodeProc, from: &str, to: &str| {
        let config = node.dir.join("node.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, text.replace(from, to)).unwrap();
        assert!(node.terminate().success());
        node.restart();
    };
    let json = [("content-type", "application/json")];
    let first = node.request("PUT", "/v1/docs/s/1", &json, br#"{"v":1}"#);
    let old = first.header("causeway-session").unwrap();
    let read = |node: &NodeProc, token: &str| {
        node.request("GET", &format!("/v1/docs/s/1?session={token}"), &[], b"")
    };

    // k2 signs, k1 is still accepted: the outstanding token reads.
    with_keys(&mut node, &k1, &format!("{k2}{k1}"));
    assert_eq!(
        read(&node, &old).status,
        200,
        "{}",
        read(&node, &old).text()
    );
    assert_eq!(
        node.status()["access"]["session_keys"],
        json!({"signing": "k2", "accepted": ["k2", "k1"]})
    );
    let second = node.request("PUT", "/v1/docs/s/1", &json, br#"{"v":2}"#);
    let new = second.header("causeway-session").unwrap();

    // k1 retired: its tokens are refused, k2's read.
    with_keys(&mut node, &format!("{k2}{k1}"), &k2);
    let refused = read(&node, &old);
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (400, "invalid_session")
    );
    assert_eq!(read(&node, &new).status, 200);
    println!("a token signed with k1 read after k2 took over signing, and was refused once k1 was removed");
}
