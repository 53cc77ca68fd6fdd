//! Writes seed inputs for the `wire_decode` fuzz target: one real, valid
//! encoding of every wire message kind (with real Automerge changes and sync
//! messages inside), a session token, a sync state and a change, so the
//! fuzzer starts from the formats rather than from nothing.
//!
//! ```text
//! cargo run --example fuzz_seeds    # writes fuzz/corpus/wire_decode/seed-*
//! ```

use std::path::Path;

use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::reconcile::{initiate, ItemSet, Params};
use causeway_engine::replication::wire::{
    Ack, AckEntry, Announce, Bytes, Delta, Envelope, Heads, Hello, Message, Push, Reconcile,
    SyncFrame, PROTOCOL_VERSION,
};
use causeway_engine::{DocId, Engine, EngineConfig, SessionToken, SyncState, TokenKey};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let engine = Engine::open(dir.path(), EngineConfig::default())?;
    let doc = DocId::new("notes/1")?;
    engine.put_json(&doc, &json!({"title": "draft", "tags": ["a", "b"]}))?;
    let committed = engine.merge_json(&doc, &json!({"done": false}))?;
    let changes: Vec<Bytes> = engine
        .changes_since(&doc, &[])?
        .into_iter()
        .map(Bytes)
        .collect();
    let heads = Heads::new(&committed.heads);
    let mut sync = SyncState::new();
    let sync_msg = engine
        .generate_sync_message(&doc, &mut sync, 1 << 20)?
        .ok_or("no sync message")?;
    let mut set = ItemSet::new();
    for i in 0..20 {
        set.insert(DocId::new(format!("notes/{i}"))?, &[i as u8; 32]);
    }
    let (node, region) = (NodeId::new("n1")?, Region::new("eu-west")?);
    let messages = [
        Message::Hello(Hello {
            node: node.clone(),
            region: region.clone(),
            version: PROTOCOL_VERSION,
            min_version: None,
            store: Some("6c50c17a-6987-49ee-916b-de8202e58719".into()),
        }),
        Message::Delta(Delta {
            origin: node.clone(),
            region: region.clone(),
            doc: doc.clone(),
            changes: changes.clone(),
            heads: heads.clone(),
        }),
        Message::Announce(Announce {
            origin: node.clone(),
            region,
            doc: doc.clone(),
            heads: heads.clone(),
        }),
        Message::Sync(SyncFrame {
            doc: doc.clone(),
            msg: Bytes(sync_msg.encode()),
        }),
        Message::Reconcile(Reconcile {
            session: 7,
            ranges: initiate(&set, &Params::default()),
        }),
        Message::Ack(Ack {
            entries: vec![AckEntry {
                doc: doc.clone(),
                heads,
            }],
        }),
        Message::Push(Push {
            root: NodeId::new("n2")?,
            origin: node,
            doc: doc.clone(),
            changes: changes.clone(),
        }),
    ];
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/wire_decode");
    std::fs::create_dir_all(&out)?;
    let cluster = ClusterId::new("demo")?;
    for (i, message) in messages.into_iter().enumerate() {
        let bytes = Envelope {
            cluster: cluster.clone(),
            message,
        }
        .encode();
        std::fs::write(out.join(format!("seed-message-{i}")), bytes)?;
    }
    let token = SessionToken::for_doc(&doc, &committed.heads);
    let key = TokenKey::from_secret(b"causeway fuzz");
    std::fs::write(out.join("seed-token"), token.encode(&key))?;
    std::fs::write(out.join("seed-sync-state"), sync.encode())?;
    std::fs::write(out.join("seed-change"), &changes[1].0)?;
    println!("seeds written to {}", out.display());
    Ok(())
}
