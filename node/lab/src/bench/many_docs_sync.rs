//! `causeway bench many-docs-sync`: a peer holding N small documents (two
//! changes each) and an empty peer that joins; the time and the bytes until
//! the new peer holds every document, for Causeway and, on the same machine
//! with the same documents, for automerge-repo (its sync server set-up with
//! Node filesystem storage, and a JavaScript client repo) and samod.
//!
//! Every side's traffic goes through the same byte-counting loopback proxy
//! (see `proxy.rs`). Time runs from starting the joining process to the
//! moment it holds everything durably: for Causeway, when the new node's
//! HTTP API lists all N documents (polled every 50 ms; its store has them,
//! fsynced); for the peers, when their client has found every document and
//! flushed its storage (they print that moment). Then each side's contents
//! are read back and checked against the expected documents; a mismatch
//! on Causeway's side fails the run. A peer that fails (exits, times out,
//! or holds the wrong contents) is reported as a result with `failed` and
//! the reason, and the run goes on to the next peer.
//!
//! The peers differ from Causeway in one way that matters: an automerge-repo
//! client only syncs documents it asks for by id, so it is given the list
//! of ids (out of band, before its clock starts); a Causeway node discovers
//! what its peer holds by itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use causeway_engine::Durability;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};

use super::ingest::tempdir_in;
use super::node_process::{
    cpu_seconds, libp2p_bytes, list_docs, populate, proc_status_mib, small_document, NodeProcess,
};
use super::peers::{self, path, Peer, PeerKind};
use super::proxy::ByteProxy;
use super::summary::{f, ratio, thousands, Row};
use super::{build_profile, Report};

/// Arguments of `causeway bench many-docs-sync`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents the first peer holds.
    #[arg(long, default_value_t = 10_000)]
    pub docs: usize,
    /// Engines to compare with (repeat, or comma-separated; `--peers` with
    /// no value for Causeway alone).
    #[arg(long, value_enum, value_delimiter = ',', num_args = 0..,
          default_values_t = [PeerKind::AutomergeRepo, PeerKind::Samod])]
    pub peers: Vec<PeerKind>,
    /// Where the peers' sources are (default: examples/peers of this
    /// repository).
    #[arg(long)]
    pub peers_dir: Option<PathBuf>,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Documents the peers' clients look up at a time. automerge-repo's
    /// client fails with all 10,000 at once (some lookups reject as
    /// unavailable); both peers use the same window.
    #[arg(long, default_value_t = 100)]
    pub window: usize,
    /// Give up on a side after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
}

/// What one side measured.
struct Side {
    engine: &'static str,
    seconds: f64,
    bytes: u64,
    connections: u64,
    joiner_cpu: f64,
    server_cpu: f64,
    joiner_peak_rss: f64,
    populate_seconds: f64,
    versions: Value,
    /// Lookups at a time (the peers' clients).
    window: Option<usize>,
}

impl Side {
    fn json(&self, docs: usize) -> Value {
        json!({"bench": "many-docs-sync", "engine": self.engine, "docs": docs,
               "seconds": self.seconds, "docs_per_s": docs as f64 / self.seconds,
               "bytes": self.bytes, "bytes_per_doc": self.bytes as f64 / docs as f64,
               "connections": self.connections,
               "joiner_cpu_seconds": self.joiner_cpu, "server_cpu_seconds": self.server_cpu,
               "joiner_peak_rss_mib": self.joiner_peak_rss,
               "populate_seconds": self.populate_seconds,
               "contents_identical": true, "versions": self.versions,
               "lookup_window": self.window,
               "build": build_profile()})
    }
}

/// A peer that did not finish: reported as a result with its reason, so the
/// run goes on to the next peer and the summary says what happened.
struct Failure {
    engine: &'static str,
    reason: String,
    versions: Value,
    window: usize,
}

impl Failure {
    fn json(&self, docs: usize) -> Value {
        json!({"bench": "many-docs-sync", "engine": self.engine, "docs": docs,
               "failed": true, "reason": self.reason, "versions": self.versions,
               "lookup_window": self.window, "build": build_profile()})
    }
}

/// The last line of a peer's log that reports an error, if any: Node prints
/// an uncaught exception as `Error: ...` or `TypeError: ...`, a Rust `main`
/// returning an error prints `Error: ...`, a panic `thread '...' panicked`.
fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let is_error = |l: &str| {
        l.split_once(": ").is_some_and(|(kind, _)| {
            kind.ends_with("Error") && kind.chars().all(|c| c.is_ascii_alphanumeric())
        }) || (l.starts_with("thread '") && l.contains("panicked"))
    };
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| is_error(l))
        .map(str::to_owned)
}

/// Checks that `values` are exactly documents 0..docs of `small_document`.
pub(crate) fn check_contents(
    engine: &str,
    values: impl IntoIterator<Item = Value>,
    docs: usize,
) -> Result<()> {
    let mut seen = vec![false; docs];
    let mut count = 0;
    for value in values {
        let n = value["n"]
            .as_u64()
            .with_context(|| format!("{engine}: a document without a number: {value}"))?
            as usize;
        ensure!(
            n < docs && !seen[n],
            "{engine}: document {n} is unexpected or repeated"
        );
        ensure!(
            value == small_document(n),
            "{engine}: document {n} reads {value}, expected {}",
            small_document(n)
        );
        seen[n] = true;
        count += 1;
    }
    ensure!(count == docs, "{engine}: holds {count} of {docs} documents");
    Ok(())
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    ensure!(args.window >= 1, "--window must be at least 1");
    let dir = tempdir_in(args.dir.as_deref())?;
    let peers_dir = args.peers_dir.clone().unwrap_or_else(peers::default_dir);
    let mut installed = Vec::new();
    for kind in &args.peers {
        installed.push(peers::install(*kind, &peers_dir).await?);
    }
    let (causeway, sides) = match measure(args, &installed, dir.path()).await {
        Ok(sides) => sides,
        Err(e) => {
            let kept = dir.keep();
            return Err(e.context(format!("stores and logs kept in {}", kept.display())));
        }
    };
    if sides.iter().any(Result::is_err) {
        let kept = dir.keep();
        eprintln!(
            "many-docs-sync: a peer failed; its stores and logs are kept in {}",
            kept.display()
        );
    }

    let mut report = Report::default();
    report.record(
        causeway.json(args.docs),
        row(&causeway, &causeway, args.docs).into(),
    );
    for side in &sides {
        match side {
            Ok(side) => report.record(side.json(args.docs), row(&causeway, side, args.docs).into()),
            Err(failure) => {
                let mut cells = vec![failure.engine.to_string(), "failed".to_string()];
                cells.resize(COLUMNS.len(), "—".to_string());
                report.record(failure.json(args.docs), cells);
            }
        }
    }
    report.print_table(&COLUMNS);
    Ok(())
}

/// The stderr table's columns, one per cell of [`row`].
const COLUMNS: [&str; 9] = [
    "engine",
    "join s",
    "docs/s",
    "bytes/doc",
    "joiner CPU s",
    "server CPU s",
    "joiner peak RSS MiB",
    "Causeway time ÷ this",
    "Causeway bytes ÷ this",
];

/// One table row: `side`'s figures and Causeway's ratios to them.
fn row(causeway: &Side, side: &Side, docs: usize) -> [String; COLUMNS.len()] {
    [
        side.engine.to_string(),
        format!("{:.2}", side.seconds),
        format!("{:.0}", docs as f64 / side.seconds),
        format!("{:.0}", side.bytes as f64 / docs as f64),
        format!("{:.1}", side.joiner_cpu),
        format!("{:.1}", side.server_cpu),
        format!("{:.0}", side.joiner_peak_rss),
        ratio(causeway.seconds, side.seconds),
        ratio(causeway.bytes as f64, side.bytes as f64),
    ]
}

/// Causeway's side, then each peer's. Causeway failing is an error; a peer
/// failing is that peer's result, and the run goes on to the next one.
async fn measure(
    args: &Args,
    installed: &[Peer],
    dir: &Path,
) -> Result<(Side, Vec<Result<Side, Failure>>)> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let causeway = causeway_side(&dir.join("causeway"), args.docs, timeout).await?;
    let mut sides = Vec::new();
    for peer in installed {
        let dir = dir.join(peer.kind.name());
        let side = peer_side(peer, &dir, args.docs, args.window, timeout)
            .await
            .map_err(|e| {
                let mut reason = format!("{e:#}");
                let logs = ["join.log", "serve.log", "server.populate.log"];
                if let Some((log, line)) = logs
                    .iter()
                    .find_map(|log| Some((log, last_error_line(&dir.join(log))?)))
                {
                    reason.push_str(&format!("; its {log} ends with {line:?}"));
                }
                eprintln!("many-docs-sync: {} failed: {reason}", peer.kind.name());
                Failure {
                    engine: peer.kind.name(),
                    reason,
                    versions: peer.versions.clone(),
                    window: args.window,
                }
            });
        sides.push(side);
    }
    Ok((causeway, sides))
}

async fn causeway_side(dir: &Path, docs: usize, timeout: Duration) -> Result<Side> {
    let a_dir = dir.join("a");
    let started = Instant::now();
    populate(&a_dir.join("store"), "sync", docs, Durability::Sync)?;
    let populate_seconds = started.elapsed().as_secs_f64();
    let a = NodeProcess::spawn(&a_dir, "eu", &[])?;
    let proxy = ByteProxy::start(([127, 0, 0, 1], a.tcp_port()?).into()).await?;
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", proxy.addr.port(), a.peer_id);
    let client = reqwest::Client::new();

    let started = Instant::now();
    let c = NodeProcess::spawn(&dir.join("c"), "ap", &[bootstrap])?;
    let ids = loop {
        let ids = list_docs(&client, &c.http, "sync").await?;
        if ids.len() >= docs {
            break ids;
        }
        if started.elapsed() > timeout {
            bail!(
                "causeway: the new node holds {} of {docs} documents after {timeout:?}",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut seconds = started.elapsed().as_secs_f64();
    let bytes = proxy.counters.total();
    let joiner_cpu = cpu_seconds(c.child.id())?;
    let server_cpu = cpu_seconds(a.child.id())?;
    let joiner_peak_rss = proc_status_mib(c.child.id(), "VmHWM:")?;

    // Every listed document must also be complete (both changes); if one is
    // not yet, wait for it and move the finish line accordingly.
    let mut values = read_all(&client, &c.http, &ids).await?;
    let mut incomplete: Vec<usize> = (0..ids.len())
        .filter(|&k| values[k]["state"] != "open")
        .collect();
    while !incomplete.is_empty() {
        ensure!(
            started.elapsed() < timeout,
            "causeway: documents stay incomplete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let again: Vec<String> = incomplete.iter().map(|&k| ids[k].clone()).collect();
        let fresh = read_all(&client, &c.http, &again).await?;
        for (&k, v) in incomplete.iter().zip(fresh) {
            values[k] = v;
        }
        incomplete.retain(|&k| values[k]["state"] != "open");
        seconds = started.elapsed().as_secs_f64();
    }
    check_contents("causeway", values, docs)?;
    let connections = proxy
        .counters
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        connections == 1,
        "causeway: {connections} connections went through the proxy, expected 1"
    );
    // The new node's own count of its transport bytes must not exceed the
    // proxy's (it would if it also reached the first node another way).
    let own = libp2p_bytes(&client, &c.http, None).await?;
    ensure!(
        own > 0,
        "no libp2p_bandwidth_bytes_total in the new node's /metrics"
    );
    let proxied = proxy.counters.total();
    eprintln!("causeway: the new node counted {own} transport bytes, the proxy {proxied}");
    ensure!(
        own <= proxied,
        "causeway: the new node counted {own} transport bytes, the proxy only {proxied}"
    );
    Ok(Side {
        engine: "causeway",
        seconds,
        bytes,
        connections,
        joiner_cpu,
        server_cpu,
        joiner_peak_rss,
        populate_seconds,
        versions: json!({"causeway": env!("CARGO_PKG_VERSION")}),
        window: None,
    })
}

/// Reads documents over HTTP, 32 at a time, in the order of `ids`.
async fn read_all(client: &reqwest::Client, http: &str, ids: &[String]) -> Result<Vec<Value>> {
    futures::stream::iter(ids)
        .map(|id| async move {
            let value: Value = client
                .get(format!("{http}/v1/docs/{id}"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            Ok::<_, anyhow::Error>(value)
        })
        .buffered(32)
        .try_collect()
        .await
}

async fn peer_side(
    peer: &Peer,
    dir: &Path,
    docs: usize,
    window: usize,
    timeout: Duration,
) -> Result<Side> {
    let name = peer.kind.name();
    std::fs::create_dir_all(dir)?;
    let ids_file = dir.join("ids.json");
    let started = Instant::now();
    peer.populate(&dir.join("server"), docs, &ids_file).await?;
    let populate_seconds = started.elapsed().as_secs_f64();

    let mut server = peer.start(
        "serve",
        &[path(&dir.join("server"))],
        &dir.join("serve.log"),
    )?;
    let ready = server.next_json(Duration::from_secs(60)).await?;
    let port = ready["port"].as_u64().context("serve printed no port")? as u16;
    let proxy = ByteProxy::start(([127, 0, 0, 1], port).into()).await?;

    let dump_file = dir.join("dump.json");
    let started = Instant::now();
    let mut joiner = peer.start(
        "join",
        &[
            path(&dir.join("client")),
            proxy.addr.to_string(),
            path(&ids_file),
            path(&dump_file),
            window.to_string(),
        ],
        &dir.join("join.log"),
    )?;
    let done = joiner.next_json(timeout).await?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = proxy.counters.total();
    ensure!(
        done["found"].as_u64() == Some(docs as u64),
        "{name}: the client printed {done}"
    );
    let joiner_cpu = cpu_seconds(joiner.pid()?)?;
    let server_cpu = cpu_seconds(server.pid()?)?;
    let joiner_peak_rss = proc_status_mib(joiner.pid()?, "VmHWM:")?;
    // The joiner waits for this before it dumps and exits (reading a
    // process that already exited found no VmHWM).
    joiner.release().await?;
    joiner.next_json(timeout).await?;
    let status = joiner.child.wait().await?;
    ensure!(status.success(), "{name}: the client exited with {status}");

    let ids: Vec<String> = serde_json::from_slice(&std::fs::read(&ids_file)?)?;
    let mut dump: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(&dump_file)?)?;
    let values = ids
        .iter()
        .map(|id| {
            dump.remove(id)
                .with_context(|| format!("{name}: {id} missing"))
        })
        .collect::<Result<Vec<_>>>()?;
    check_contents(name, values, docs)?;
    Ok(Side {
        engine: name,
        seconds,
        bytes,
        connections: proxy
            .counters
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        joiner_cpu,
        server_cpu,
        joiner_peak_rss,
        populate_seconds,
        versions: peer.versions.clone(),
        window: Some(window),
    })
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    let mut rows = Vec::new();
    let ours = results.iter().find(|r| r["engine"] == "causeway");
    for r in results.iter().filter(|r| r["engine"] != "causeway") {
        let Some(c) = ours else { break };
        let versions = r["versions"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let docs = thousands(f(c, "docs"));
        let engine = r["engine"].as_str().unwrap_or("?");
        let setup = format!(
            "{versions}; the client looks up {} documents at a time",
            r["lookup_window"]
        );
        if r["failed"] == true {
            rows.push(Row::new(
                format!("many-docs-sync: {docs} documents to a new peer ({setup})"),
                format!("{:.2} s", f(c, "seconds")),
                format!(
                    "{engine} **failed**: {}",
                    r["reason"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .replace('|', "\\|")
                        .replace('\n', " ")
                ),
                "—".into(),
            ));
            continue;
        }
        rows.push(Row::new(
            format!("many-docs-sync: {docs} documents to a new peer, time ({setup})"),
            format!("{:.2} s", f(c, "seconds")),
            format!("{engine} {:.2} s", f(r, "seconds")),
            ratio(f(c, "seconds"), f(r, "seconds")),
        ));
        rows.push(Row::new(
            format!("many-docs-sync: {docs} documents to a new peer, bytes"),
            format!("{} bytes/document", thousands(f(c, "bytes_per_doc"))),
            format!(
                "{engine} {} bytes/document",
                thousands(f(r, "bytes_per_doc"))
            ),
            ratio(f(c, "bytes"), f(r, "bytes")),
        ));
    }
    if results.len() == 1 {
        if let Some(c) = ours {
            rows.push(Row::new(
                "many-docs-sync (no peers)".into(),
                format!("{:.2} s", f(c, "seconds")),
                "—".into(),
                "—".into(),
            ));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_peer_is_reported_with_the_last_error_in_its_log() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("join.log");
        assert_eq!(last_error_line(&log), None, "no log, no line");
        std::fs::write(
            &log,
            "error receiving message {\n  err: Error: Websocket not ready (2)\n}\n\
             Error: Document abc is unavailable\n    at Repo.js:545:32\n\nNode.js v20\n",
        )?;
        assert_eq!(
            last_error_line(&log).as_deref(),
            Some("Error: Document abc is unavailable")
        );
        std::fs::write(
            &log,
            "x.mjs:102\n\nTypeError: Cannot read properties of undefined\n",
        )?;
        assert_eq!(
            last_error_line(&log).as_deref(),
            Some("TypeError: Cannot read properties of undefined")
        );
        std::fs::write(&log, "thread 'main' panicked at src/main.rs:3:5:\nboom\n")?;
        assert_eq!(
            last_error_line(&log).as_deref(),
            Some("thread 'main' panicked at src/main.rs:3:5:")
        );
        let failure = Failure {
            engine: "automerge-repo",
            reason: "the peer exited early".into(),
            versions: json!({"automerge-repo": "2.5.6"}),
            window: 100,
        };
        let result = failure.json(10);
        assert_eq!(result["failed"], true);
        assert_eq!(result["engine"], "automerge-repo");
        assert!(result.get("seconds").is_none(), "a failure has no time");
        Ok(())
    }

    #[test]
    fn contents_must_be_exactly_the_expected_documents() {
        let good: Vec<Value> = (0..3).map(small_document).collect();
        assert!(check_contents("t", good.clone(), 3).is_ok());
        assert!(check_contents("t", good[..2].to_vec(), 3).is_err());
        let mut repeated = good.clone();
        repeated[2] = small_document(1);
        assert!(check_contents("t", repeated, 3).is_err());
        let mut changed = good;
        changed[0]["state"] = json!("closed");
        assert!(check_contents("t", changed, 3).is_err());
    }
}
