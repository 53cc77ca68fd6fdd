//! `causeway bench automerge-repo`: what automerge-repo clients (npm
//! `@automerge/automerge-repo` 2.5.6, the JavaScript peer of
//! `examples/peers/automerge-repo`) wait for when they use Causeway, against
//! automerge-repo's own sync server set-up on the same machine in the same
//! run:
//!
//! * **find()**: a client creates a document and a second client finds it at
//!   once, one document at a time. On Causeway the creator talks to the node
//!   in `eu` and the finder to the node in `ap`, so every find crosses a
//!   region (loopback); on the sync server both talk to the one server.
//! * **join**: a client with empty storage connects and finds N documents
//!   the server holds (`{n, owner, state}`, two changes each, as in
//!   many-docs-sync), a window at a time, until it holds them all and
//!   flushed its storage. On Causeway the documents were written in `eu` and
//!   the client connects to `ap`.
//!
//! Both sides' contents are read back and checked.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use causeway_engine::{DocId, Engine, EngineConfig};
use causeway_node::automerge_repo::document_id;
use serde_json::{json, Value};

use super::ingest::tempdir_in;
use super::many_docs_sync::check_contents;
use super::node_process::{count_docs, NodeProcess};
use super::peers::{self, path, Peer, PeerKind, PeerProcess};
use super::summary::{f, ratio, Row};
use super::{build_profile, Report};

/// Arguments of `causeway bench automerge-repo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents created and found one by one.
    #[arg(long, default_value_t = 100)]
    pub finds: usize,
    /// Documents the server holds when a new client joins.
    #[arg(long, default_value_t = 1000)]
    pub docs: usize,
    /// Documents the joining client looks up at a time.
    #[arg(long, default_value_t = 100)]
    pub window: usize,
    /// Where the peers' sources are (default: examples/peers of this
    /// repository).
    #[arg(long)]
    pub peers_dir: Option<PathBuf>,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up on a step after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// What one server set-up measured.
struct Side {
    /// `causeway` or `automerge-repo`.
    engine: &'static str,
    server: &'static str,
    find_ms: Vec<f64>,
    join_seconds: f64,
}

impl Side {
    fn json(&self, args: &Args, versions: &Value) -> Value {
        let (p50, p99) = (
            percentile(&self.find_ms, 0.50),
            percentile(&self.find_ms, 0.99),
        );
        json!({"bench": "automerge-repo", "engine": self.engine, "server": self.server,
               "finds": args.finds,
               "find_ms_p50": p50, "find_ms_p99": p99,
               "find_ms_max": self.find_ms.iter().copied().fold(0.0, f64::max),
               "docs": args.docs, "lookup_window": args.window,
               "join_seconds": self.join_seconds,
               "join_docs_per_s": args.docs as f64 / self.join_seconds,
               "contents_identical": true, "versions": versions,
               "build": build_profile()})
    }
}

/// Runs the scenario.
pub async fn run(args: &Args) -> Result<()> {
    let peers_dir = args.peers_dir.clone().unwrap_or_else(peers::default_dir);
    let peer = peers::install(PeerKind::AutomergeRepo, &peers_dir).await?;
    let root = tempdir_in(args.dir.as_deref())?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let causeway = causeway_side(args, &peer, &root.path().join("causeway"), timeout).await?;
    let server = sync_server_side(args, &peer, &root.path().join("sync-server"), timeout).await?;
    let mut report = Report::default();
    for side in [&causeway, &server] {
        let cells = vec![
            side.server.to_string(),
            format!("{:.1}", percentile(&side.find_ms, 0.50)),
            format!("{:.1}", percentile(&side.find_ms, 0.99)),
            format!("{:.2}", side.join_seconds),
            format!("{:.0}", args.docs as f64 / side.join_seconds),
            ratio(causeway.join_seconds, side.join_seconds),
        ];
        report.record(side.json(args, &peer.versions), cells);
    }
    report.print_table(&[
        "server",
        "find() p50 ms",
        "find() p99 ms",
        "join s",
        "docs/s",
        "Causeway join time ÷ this",
    ]);
    Ok(())
}

/// Three nodes (eu, us, ap); eu's store holds the join's documents before
/// it starts, and the others replicate them before anything is measured.
async fn causeway_side(args: &Args, peer: &Peer, dir: &Path, timeout: Duration) -> Result<Side> {
    let ids = write_documents(&dir.join("a/store"), args.docs)?;
    let a = NodeProcess::spawn(&dir.join("a"), "eu", &[])?;
    let b = NodeProcess::spawn(&dir.join("b"), "us", &a.listen)?;
    let mut both = a.listen.clone();
    both.extend(b.listen.iter().cloned());
    let c = NodeProcess::spawn(&dir.join("c"), "ap", &both)?;
    let client = reqwest::Client::new();
    let started = Instant::now();
    for node in [&b, &c] {
        while count_docs(&client, &node.http, "").await? < args.docs {
            ensure!(
                started.elapsed() < timeout,
                "the nodes did not replicate the documents"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "automerge-repo bench: {} documents in every region after {:.1} s",
        args.docs,
        started.elapsed().as_secs_f64()
    );
    let ws = |node: &NodeProcess| format!("{}/automerge-repo", node.http.replacen("http", "ws", 1));
    let find_ms = find_latency(peer, dir, &ws(&a), &ws(&c), args.finds, timeout).await?;
    let addr = format!("{}/automerge-repo", c.http.trim_start_matches("http://"));
    let join_seconds = join(peer, dir, &addr, &ids, args, timeout).await?;
    Ok(Side {
        engine: "causeway",
        server: "causeway (3 regions)",
        find_ms,
        join_seconds,
    })
}

/// automerge-repo's sync server (`peer.mjs serve`: a repo with Node
/// filesystem storage and `sharePolicy: false`): an empty one for the
/// finds, then one holding the join's documents.
async fn sync_server_side(args: &Args, peer: &Peer, dir: &Path, timeout: Duration) -> Result<Side> {
    std::fs::create_dir_all(dir)?;
    let (mut finds_server, port) = serve(peer, &dir.join("finds-server")).await?;
    let url = format!("ws://127.0.0.1:{port}");
    let find_ms = find_latency(peer, dir, &url, &url, args.finds, timeout).await?;
    drop(finds_server.child.start_kill());

    let ids_file = dir.join("ids.json");
    peer.populate(&dir.join("server"), args.docs, &ids_file)
        .await?;
    let ids: Vec<String> = serde_json::from_slice(&std::fs::read(&ids_file)?)?;
    let (_server, port) = serve(peer, &dir.join("server")).await?;
    let join_seconds = join(peer, dir, &format!("127.0.0.1:{port}"), &ids, args, timeout).await?;
    Ok(Side {
        engine: "automerge-repo",
        server: "automerge-repo sync server",
        find_ms,
        join_seconds,
    })
}

async fn serve(peer: &Peer, dir: &Path) -> Result<(PeerProcess, u16)> {
    let mut server = peer.start("serve", &[path(dir)], &dir.with_extension("log"))?;
    let ready = server.next_json(Duration::from_secs(60)).await?;
    let port = ready["port"].as_u64().context("serve printed no port")?;
    Ok((server, u16::try_from(port)?))
}

/// `finds` documents created through `url_a` and found through `url_c`;
/// the time of each find in milliseconds.
async fn find_latency(
    peer: &Peer,
    dir: &Path,
    url_a: &str,
    url_c: &str,
    finds: usize,
    timeout: Duration,
) -> Result<Vec<f64>> {
    let mut p = peer.start(
        "find-latency",
        &[url_a.to_string(), url_c.to_string(), finds.to_string()],
        &dir.join("find-latency.log"),
    )?;
    let out = p.next_json(timeout).await?;
    let ms: Vec<f64> = out["find_ms"]
        .as_array()
        .context("find-latency printed no find_ms")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    ensure!(ms.len() == finds, "{} finds of {finds}", ms.len());
    Ok(ms)
}

/// A client with empty storage finds every id through `addr` (host:port and
/// path); returns its time, after checking what it holds.
async fn join(
    peer: &Peer,
    dir: &Path,
    addr: &str,
    ids: &[String],
    args: &Args,
    timeout: Duration,
) -> Result<f64> {
    let ids_file = dir.join("join-ids.json");
    std::fs::write(&ids_file, serde_json::to_vec(ids)?)?;
    let dump_file = dir.join("dump.json");
    let mut p = peer.start(
        "join",
        &[
            path(&dir.join("client")),
            addr.to_string(),
            path(&ids_file),
            path(&dump_file),
            args.window.to_string(),
        ],
        &dir.join("join.log"),
    )?;
    let done = p.next_json(timeout).await?;
    let seconds = done["seconds"]
        .as_f64()
        .context("join printed no seconds")?;
    p.release().await?;
    p.next_json(timeout).await?;
    let dump: serde_json::Map<String, Value> = serde_json::from_slice(&std::fs::read(&dump_file)?)?;
    ensure!(
        dump.len() == ids.len(),
        "the client holds {} of {}",
        dump.len(),
        ids.len()
    );
    check_contents("join", dump.into_values(), ids.len())?;
    Ok(seconds)
}

/// Writes `small_document(i)` (two changes) under `docs` fresh
/// automerge-repo document ids into the store at `store`; returns the ids.
fn write_documents(store: &Path, docs: usize) -> Result<Vec<String>> {
    let engine = Engine::open(store, EngineConfig::default())?;
    let mut ids = Vec::with_capacity(docs);
    for i in 0..docs {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(causeway_engine::automerge::ActorId::random().to_bytes());
        let id = document_id::encode(&bytes);
        let doc = DocId::new(id.clone())?;
        engine.put_json(&doc, &json!({"n": i, "owner": format!("user-{}", i % 97)}))?;
        engine.merge_json(&doc, &json!({"state": "open"}))?;
        ids.push(id);
    }
    if ids.len() != docs {
        bail!("wrote {} documents of {docs}", ids.len());
    }
    Ok(ids)
}

/// The `q` quantile of `values` (nearest rank).
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// This scenario's rows in the `causeway bench all` summary.
pub fn summary(results: &[Value]) -> Vec<Row> {
    let side = |engine: &str| results.iter().find(|r| r["engine"] == engine);
    let Some(ours) = side("causeway") else {
        return Vec::new();
    };
    let none = Value::Null;
    let theirs = side("automerge-repo").unwrap_or(&none);
    let ms = |v: &Value| format!("{:.1} / {:.1} ms", f(v, "find_ms_p50"), f(v, "find_ms_p99"));
    vec![
        Row::new(
            format!(
                "automerge-repo client: find() of a document just created by another client, p50 / p99 ({} documents; Causeway: created in eu, found in ap; reference: automerge-repo's sync server, one server)",
                ours["finds"]
            ),
            ms(ours),
            ms(theirs),
            format!("{:.2}x (p50)", f(ours, "find_ms_p50") / f(theirs, "find_ms_p50")),
        ),
        Row::new(
            format!(
                "automerge-repo client with empty storage finds {} documents a server holds ({} at a time)",
                ours["docs"], ours["lookup_window"]
            ),
            format!("{:.2} s", f(ours, "join_seconds")),
            format!("{:.2} s", f(theirs, "join_seconds")),
            ratio(f(ours, "join_seconds"), f(theirs, "join_seconds")),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
