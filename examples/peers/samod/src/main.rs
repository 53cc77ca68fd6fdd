//! The samod side of `causeway bench many-docs-sync`.
//!
//! ```text
//! samod-peer populate DIR DOCS IDS_FILE
//!     Creates DOCS documents in a repo with filesystem storage at DIR
//!     ({n, owner}, then a second change adding state) and writes their
//!     document ids, in order, to IDS_FILE (a JSON array).
//! samod-peer serve DIR
//!     A repo on DIR accepting TCP connections on 127.0.0.1 (samod's
//!     length-delimited framing); prints {"ready": true, "port": P}.
//! samod-peer join DIR ADDR IDS_FILE DUMP_FILE WINDOW
//!     A repo with filesystem storage at DIR dialing tcp://ADDR; finds every
//!     id, WINDOW at a time (as the automerge-repo client does), stops the repo (which waits for storage), prints
//!     {"done": true, "found": N, "seconds": S}, waits for a line on stdin
//!     (or its end: the harness has read this process's CPU time and peak
//!     memory), then writes every document's contents to DUMP_FILE as
//!     {id: value} and prints {"dumped": N}.
//! ```
//!
//! Every setting is samod's default.

use std::error::Error;
use std::time::Instant;

use automerge::transaction::Transactable;
use automerge::{AutoSerde, Automerge, ObjType, ROOT};
use futures::stream::StreamExt;
use samod::storage::TokioFilesystemStorage;
use samod::{BackoffConfig, DocumentId, Repo, Url};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

fn print(value: serde_json::Value) {
    println!("{value}");
}

async fn open(dir: &str) -> Repo {
    Repo::build_tokio()
        .with_storage(TokioFilesystemStorage::new(dir))
        .load()
        .await
}

/// The same document Causeway's and automerge-repo's sides write: two
/// changes, strings as text.
fn document(i: usize) -> Result<Automerge> {
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    tx.put(ROOT, "n", i as i64)?;
    let owner = tx.put_object(ROOT, "owner", ObjType::Text)?;
    tx.splice_text(&owner, 0, 0, &format!("user-{}", i % 97))?;
    tx.commit();
    let mut tx = doc.transaction();
    let state = tx.put_object(ROOT, "state", ObjType::Text)?;
    tx.splice_text(&state, 0, 0, "open")?;
    tx.commit();
    Ok(doc)
}

async fn populate(dir: &str, docs: usize, ids_file: &str) -> Result<()> {
    let repo = open(dir).await;
    let mut ids = Vec::with_capacity(docs);
    for i in 0..docs {
        let handle = repo.create(document(i)?).await?;
        ids.push(handle.document_id().to_string());
    }
    repo.stop().await;
    std::fs::write(ids_file, serde_json::to_vec(&ids)?)?;
    print(serde_json::json!({ "populated": docs }));
    Ok(())
}

async fn serve(dir: &str) -> Result<()> {
    let repo = open(dir).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let acceptor = repo.make_acceptor(Url::parse(&format!("tcp://127.0.0.1:{port}"))?)?;
    print(serde_json::json!({ "ready": true, "port": port }));
    loop {
        let (io, _) = listener.accept().await?;
        acceptor.accept_tokio_io(io)?;
    }
}

async fn join(dir: &str, addr: &str, ids_file: &str, dump_file: &str, window: usize) -> Result<()> {
    let started = Instant::now();
    let ids: Vec<String> = serde_json::from_slice(&std::fs::read(ids_file)?)?;
    let repo = open(dir).await;
    let dialer = repo.dial_tcp(
        Url::parse(&format!("tcp://{addr}"))?,
        BackoffConfig::default(),
    )?;
    dialer.established().await.map_err(|e| format!("{e:?}"))?;
    let doc_ids = ids
        .iter()
        .map(|id| id.parse::<DocumentId>())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut finds = futures::stream::iter(doc_ids)
        .map(|id| repo.find(id))
        .buffer_unordered(window.max(1));
    let mut handles = Vec::with_capacity(ids.len());
    while let Some(found) = finds.next().await {
        handles.push(found?.ok_or("a document was not found")?);
    }
    repo.stop().await;
    let seconds = started.elapsed().as_secs_f64();
    print(serde_json::json!({ "done": true, "found": handles.len(), "seconds": seconds }));
    // The harness reads this process's CPU time and peak memory now, and
    // then writes a line (or closes stdin): only then may it exit.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let mut dump = serde_json::Map::new();
    for handle in &handles {
        let value = handle.with_document(|d| serde_json::to_value(AutoSerde::from(&*d)))?;
        dump.insert(handle.document_id().to_string(), value);
    }
    std::fs::write(dump_file, serde_json::to_vec(&dump)?)?;
    print(serde_json::json!({ "dumped": handles.len() }));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| "missing argument; see the comment at the top of main.rs".into())
    };
    match arg(0)? {
        "populate" => populate(arg(1)?, arg(2)?.parse()?, arg(3)?).await,
        "serve" => serve(arg(1)?).await,
        "join" => join(arg(1)?, arg(2)?, arg(3)?, arg(4)?, arg(5)?.parse()?).await,
        other => Err(format!("unknown mode {other}; see the comment at the top of main.rs").into()),
    }
}
