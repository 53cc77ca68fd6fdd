//! The automerge-repo endpoint against a raw WebSocket client that sends
//! exactly what each test wants, including what no library would: the
//! handshake, version negotiation, malformed frames, ids that are not
//! automerge-repo ids, a peer id that changes mid-connection, tokens, the
//! per-connection document limit, replaced connections and pings.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use causeway_engine::automerge::sync::SyncDoc;
use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{AutoCommit, ROOT};
use causeway_engine::SyncState;
use causeway_node::automerge_repo::document_id;
use causeway_node::automerge_repo::wire::{PeerMetadata, RepoMessage};
use futures::{SinkExt, StreamExt};
use support::cluster::{create_token, NodeProc, Options};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects to `node`'s endpoint; `Err` holds the HTTP status of a refusal.
async fn connect(node: &NodeProc, query: &str) -> Result<Socket, u16> {
    let url = format!("ws://{}/automerge-repo{query}", node.http);
    match tokio_tungstenite::connect_async(url.into_client_request().unwrap()).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("connect: {e}"),
    }
}

async fn send(socket: &mut Socket, message: &RepoMessage) {
    socket
        .send(Message::Binary(message.encode().into()))
        .await
        .unwrap();
}

/// The next protocol message, or `None` once the server closed.
async fn next(socket: &mut Socket) -> Option<RepoMessage> {
    loop {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("an answer")
        {
            Some(Ok(Message::Binary(b))) => return Some(RepoMessage::decode(&b).unwrap()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
        }
    }
}

fn join(peer: &str, versions: Option<Vec<&str>>) -> RepoMessage {
    RepoMessage::Join {
        sender: peer.into(),
        metadata: Some(PeerMetadata {
            storage_id: None,
            is_ephemeral: true,
        }),
        versions: versions.map(|v| v.into_iter().map(String::from).collect()),
    }
}

/// Joins as `peer`; returns the server's `peer` answer.
async fn joined(node: &NodeProc, peer: &str) -> (Socket, RepoMessage) {
    let mut socket = connect(node, "").await.unwrap();
    send(&mut socket, &join(peer, Some(vec!["1"]))).await;
    let answer = next(&mut socket).await.expect("peer message");
    (socket, answer)
}

fn request(peer: &str, document: &str, data: Vec<u8>) -> RepoMessage {
    RepoMessage::Sync {
        request: true,
        sender: peer.into(),
        target: "server".into(),
        document: document.into(),
        data,
    }
}

/// The opening sync message of an empty document: "I have nothing".
fn empty_opening() -> Vec<u8> {
    let mut doc = AutoCommit::new();
    let message = doc
        .sync()
        .generate_sync_message(&mut SyncState::new())
        .unwrap();
    message.encode()
}

/// The opening sync message of a client document that has a change.
fn opening_with_content() -> Vec<u8> {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "k", "v").unwrap();
    doc.commit();
    let mut state = SyncState::new();
    let message = doc.sync().generate_sync_message(&mut state).unwrap();
    message.encode()
}

/// A node whose settings file ends with `tables`.
fn node_with(root: &std::path::Path, tables: &str) -> NodeProc {
    let options = Options {
        tables,
        ..Options::default()
    };
    NodeProc::start_with(root, "a", "eu", &[], options)
}

/// A client's sync message for `document` carrying what it has.
fn push(peer: &str, document: &str) -> RepoMessage {
    RepoMessage::Sync {
        request: false,
        sender: peer.into(),
        target: "server".into(),
        document: document.into(),
        data: opening_with_content(),
    }
}

fn id(seed: u8) -> String {
    document_id::encode(&[seed; 16])
}

fn is_error(m: &Option<RepoMessage>, needle: &str) -> bool {
    matches!(m, Some(RepoMessage::Error { message }) if message.contains(needle))
}

#[test]
fn the_handshake_names_the_node_and_its_store_and_survives_restart() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(root.path(), "a", "eu", &[]);
    let rt = runtime();
    let own_peer = format!("causeway-eu-{}", node.peer_id);
    let storage = |answer: &RepoMessage| match answer {
        RepoMessage::Peer {
            sender,
            target,
            metadata,
            version,
        } => {
            assert_eq!(sender, &own_peer);
            assert_eq!(target, "client-1");
            assert_eq!(version, "1");
            assert!(!metadata.is_ephemeral);
            metadata.storage_id.clone().expect("a storage id")
        }
        other => panic!("expected peer, got {other:?}"),
    };
    let (_s, answer) = rt.block_on(joined(&node, "client-1"));
    let first = storage(&answer);
    assert_eq!(first.len(), 36, "a UUID: {first}");
    // A join without a version list is version 1 (what automerge-repo's
    // own server assumes).
    let (_s, answer) = rt.block_on(async {
        let mut socket = connect(&node, "").await.unwrap();
        send(&mut socket, &join("client-1", None)).await;
        let answer = next(&mut socket).await.unwrap();
        (socket, answer)
    });
    assert_eq!(storage(&answer), first);
    node.terminate();
    node.restart();
    let (_s, answer) = rt.block_on(joined(&node, "client-1"));
    assert_eq!(
        storage(&answer),
        first,
        "the storage id is the store's, kept"
    );
}

#[test]
fn protocol_violations_get_an_error_and_a_close() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::start(root.path(), "a", "eu", &[]);
    let rt = runtime();
    rt.block_on(async {
        // A version this node does not speak.
        let mut s = connect(&node, "").await.unwrap();
        send(&mut s, &join("c", Some(vec!["2"]))).await;
        assert!(is_error(
            &next(&mut s).await,
            "unsupported protocol version"
        ));
        assert!(next(&mut s).await.is_none());

        // Anything before join.
        let mut s = connect(&node, "").await.unwrap();
        send(&mut s, &request("c", &id(1), empty_opening())).await;
        assert!(is_error(&next(&mut s).await, "expected a join"));
        assert!(next(&mut s).await.is_none());

        // Bytes that are not CBOR, after the handshake.
        let (mut s, _) = joined(&node, "c").await;
        s.send(Message::Binary(vec![0xff, 0x00].into()))
            .await
            .unwrap();
        assert!(is_error(&next(&mut s).await, "malformed"));
        assert!(next(&mut s).await.is_none());

        // A text frame.
        let (mut s, _) = joined(&node, "c").await;
        s.send(Message::Text("{}".into())).await.unwrap();
        assert!(is_error(&next(&mut s).await, "binary"));

        // Another peer id than the one that joined.
        let (mut s, _) = joined(&node, "c").await;
        send(&mut s, &request("someone-else", &id(1), empty_opening())).await;
        assert!(is_error(&next(&mut s).await, "is not the peer that joined"));

        // Sync data that is not an Automerge sync message.
        let (mut s, _) = joined(&node, "c").await;
        send(&mut s, &request("c", &id(1), vec![1, 2, 3])).await;
        assert!(is_error(
            &next(&mut s).await,
            "not an Automerge sync message"
        ));
    });
    let errors = node.metric("causeway_automerge_repo_protocol_errors", "");
    assert_eq!(errors, 6.0);
}

#[test]
fn an_id_that_is_not_an_automerge_repo_id_is_unavailable_and_the_connection_stays() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::start(root.path(), "a", "eu", &[]);
    let rt = runtime();
    rt.block_on(async {
        let (mut s, _) = joined(&node, "c").await;
        let short = document_id::encode(&[3; 16])[..10].to_string();
        for bad in ["orders/1", short.as_str()] {
            send(&mut s, &request("c", bad, empty_opening())).await;
            match next(&mut s).await {
                Some(RepoMessage::DocUnavailable { document, .. }) => assert_eq!(document, bad),
                other => panic!("expected doc-unavailable for {bad}, got {other:?}"),
            }
        }
        // A valid id the node lacks, with no peer to ask: unavailable.
        send(&mut s, &request("c", &id(4), empty_opening())).await;
        assert!(matches!(
            next(&mut s).await,
            Some(RepoMessage::DocUnavailable { .. })
        ));
        // Remote-heads messages are accepted and ignored.
        let heads = ciborium::Value::Map(vec![
            (
                ciborium::Value::Text("type".into()),
                ciborium::Value::Text("remote-heads-changed".into()),
            ),
            (
                ciborium::Value::Text("senderId".into()),
                ciborium::Value::Text("c".into()),
            ),
            (
                ciborium::Value::Text("newHeads".into()),
                ciborium::Value::Map(vec![]),
            ),
        ]);
        let mut frame = Vec::new();
        ciborium::into_writer(&heads, &mut frame).unwrap();
        s.send(Message::Binary(frame.into())).await.unwrap();
        // The connection still works: a client pushing a new document gets
        // a sync answer asking for it.
        send(&mut s, &push("c", &id(5))).await;
        assert!(matches!(
            next(&mut s).await,
            Some(RepoMessage::Sync { request: false, .. })
        ));
    });
}

#[test]
fn tokens_in_the_query_string_decide_who_connects_and_who_writes() {
    let root = tempfile::tempdir().unwrap();
    let tables = "[http]\nread_tokens = [\"reader-0123456789abcdef\"]\nwrite_tokens = [\"writer-0123456789abcdef\"]\n";
    let node = node_with(root.path(), tables);
    let rt = runtime();
    rt.block_on(async {
        assert_eq!(connect(&node, "").await.err(), Some(401));
        assert_eq!(connect(&node, "?token=wrong").await.err(), Some(401));

        // Read-only: the client's changes are not taken.
        let mut s = connect(&node, "?token=reader-0123456789abcdef")
            .await
            .unwrap();
        send(&mut s, &join("r", Some(vec!["1"]))).await;
        next(&mut s).await.unwrap();
        let doc = id(6);
        let mut client = AutoCommit::new();
        client.put(ROOT, "k", "v").unwrap();
        client.commit();
        let mut state = SyncState::new();
        let opening = client.sync().generate_sync_message(&mut state).unwrap();
        send(
            &mut s,
            &RepoMessage::Sync {
                request: false,
                sender: "r".into(),
                target: "server".into(),
                document: doc.clone(),
                data: opening.encode(),
            },
        )
        .await;
        // The node asks for the changes; the client sends them.
        let Some(RepoMessage::Sync { data, .. }) = next(&mut s).await else {
            panic!("expected the node's sync answer");
        };
        let reply = causeway_engine::SyncMessage::decode(&data).unwrap();
        client
            .sync()
            .receive_sync_message(&mut state, reply)
            .unwrap();
        let carrying = client.sync().generate_sync_message(&mut state).unwrap();
        assert!(!carrying.changes.is_empty());
        send(
            &mut s,
            &RepoMessage::Sync {
                request: false,
                sender: "r".into(),
                target: "server".into(),
                document: doc.clone(),
                data: carrying.encode(),
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let auth = [("authorization", "Bearer writer-0123456789abcdef")];
    let read = node.request("GET", &format!("/v1/docs/{}", id(6)), &auth, b"");
    assert_eq!(read.status, 404, "a read token wrote: {}", read.text());
    let metrics = node.request("GET", "/metrics", &auth, b"").text();
    assert!(
        metrics.contains("causeway_automerge_repo_read_only_refused 1\n"),
        "one change-carrying message dropped"
    );
    // A write token (here as a header, as non-browser clients may send it)
    // syncs both ways.
    rt.block_on(async {
        let url = format!("ws://{}/automerge-repo", node.http);
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", auth[0].1.parse().unwrap());
        let (mut s, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        send(&mut s, &join("w", Some(vec!["1"]))).await;
        assert!(matches!(next(&mut s).await, Some(RepoMessage::Peer { .. })));
    });
}

#[test]
fn a_scoped_token_syncs_only_the_documents_it_covers() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    // A token for one document (its id is the prefix) and one that reads
    // everything.
    let one = create_token(&dir, &[&format!("write:{}", id(7))], &[]);
    let reader = create_token(&dir, &["read:*"], &[]);
    let node = node_with(root.path(), "");
    let rt = runtime();
    rt.block_on(async {
        assert_eq!(connect(&node, "").await.err(), Some(401));
        let mut s = connect(&node, &format!("?token={one}")).await.unwrap();
        send(&mut s, &join("c", Some(vec!["1"]))).await;
        next(&mut s).await.unwrap();
        // Outside the token: unavailable, as if it did not exist.
        send(&mut s, &push("c", &id(8))).await;
        assert!(matches!(
            next(&mut s).await,
            Some(RepoMessage::DocUnavailable { document, .. }) if document == id(8)
        ));
        // Inside: synced.
        send(&mut s, &push("c", &id(7))).await;
        assert!(matches!(
            next(&mut s).await,
            Some(RepoMessage::Sync { document, .. }) if document == id(7)
        ));
    });
    let auth = format!("Bearer {reader}");
    let metrics = node
        .request("GET", "/metrics", &[("authorization", &auth)], b"")
        .text();
    assert!(
        metrics.contains("causeway_automerge_repo_documents_refused 1\n"),
        "{metrics}"
    );
}

#[test]
fn limits_hold_per_connection_and_a_peer_id_has_one_connection() {
    let root = tempfile::tempdir().unwrap();
    let tables = "[automerge_repo]\nmax_documents_per_connection = 2\nmax_connections = 3\nping_interval_ms = 200\nmax_message_bytes = 65536\n";
    let node = node_with(root.path(), tables);
    let rt = runtime();
    rt.block_on(async {
        let (mut s, _) = joined(&node, "c").await;
        for seed in 10..12 {
            send(&mut s, &push("c", &id(seed))).await;
            assert!(matches!(next(&mut s).await, Some(RepoMessage::Sync { .. })));
        }
        // A third document is refused on this connection.
        send(&mut s, &request("c", &id(12), opening_with_content())).await;
        assert!(matches!(
            next(&mut s).await,
            Some(RepoMessage::DocUnavailable { .. })
        ));

        // The server pings (every 200 ms here).
        let ping = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(Ok(Message::Ping(_))) = s.next().await {
                    return;
                }
            }
        })
        .await;
        assert!(ping.is_ok(), "no ping from the server");

        // The same peer id connecting again replaces the first connection.
        let (mut again, _) = joined(&node, "c").await;
        assert!(next(&mut s).await.is_none(), "the old connection closed");
        send(&mut again, &request("c", &id(13), empty_opening())).await;
        assert!(next(&mut again).await.is_some());

        // At most three connections.
        let (_two, _) = joined(&node, "d").await;
        let (_three, _) = joined(&node, "e").await;
        assert_eq!(connect(&node, "").await.err(), Some(503));

        // A message over max_message_bytes (64 KiB here) closes the
        // connection.
        let big = RepoMessage::Ephemeral {
            sender: "c".into(),
            target: "server".into(),
            document: id(13),
            session: "s".into(),
            count: 1,
            data: vec![0; 70_000],
        };
        send(&mut again, &big).await;
        assert!(
            next(&mut again).await.is_none(),
            "closed after an oversized message"
        );
    });
    assert_eq!(
        node.metric("causeway_automerge_repo_connections_replaced", ""),
        1.0
    );
}
