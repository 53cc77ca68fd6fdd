//! `causeway bench steady-state`: a three-region cluster of real `causeway
//! node` processes on loopback, clients writing to a set of documents at a
//! fixed rate on every node for a while; reports propagation lag, each
//! node's CPU time and peak memory, and bytes on the wire per change
//! delivered per peer.
//!
//! Each node has one client writing JSON merge patches through its HTTP API,
//! one every 1/rate seconds, to a document picked at random (seeded); a
//! write by node `i` sets `w{i}` to the client's write counter, so a replica
//! showing `w{i} = s` holds every write of node `i` to that document up to
//! `s` (a node's writes to one document form a causal chain). Every node is
//! watched through `/v1/watch`; lag is the time from a write's
//! acknowledgement on its node to the first event on another node showing
//! it (zero if the event came first). After the write phase the benchmark
//! waits until every write is visible everywhere; a write that never shows
//! fails the run.
//!
//! Bytes on the wire are libp2p's transport counters of every node
//! (outbound, so each byte counts once), over the write phase, divided by
//! the changes delivered (acknowledged writes times the other nodes).
//! These count what the connections carry above encryption and
//! multiplexing; `many-docs-sync` measures below them with a proxy.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

use super::ingest::tempdir_in;
use super::node_process::{cpu_seconds, libp2p_bytes, proc_status_mib, NodeProcess};
use super::summary::{f, thousands, Row};
use super::{build_profile, Report};

/// Arguments of `causeway bench steady-state`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents written to.
    #[arg(long, default_value_t = 1000)]
    pub docs: usize,
    /// Writes per second on each node.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Length of the write phase, seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seed of the document choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

/// When observer `j` first saw `w{i} >= seq` in a document: per (j, i, doc),
/// increasing (seq, time) pairs.
type Seen = HashMap<(usize, usize, usize), Vec<(u64, Instant)>>;

/// Acknowledged writes: (node, doc, seq, acknowledged at).
type Acked = Vec<(usize, usize, u64, Instant)>;

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    ensure!(
        args.rate > 0 && args.docs > 0,
        "rate and docs must be positive"
    );
    let dir = tempdir_in(args.dir.as_deref())?;
    let mut nodes: Vec<NodeProcess> = Vec::new();
    for region in REGIONS {
        let bootstrap: Vec<String> = nodes.iter().flat_map(|n| n.listen.clone()).collect();
        nodes.push(NodeProcess::spawn(
            &dir.path().join(region),
            region,
            &bootstrap,
        )?);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    await_mesh(&client, &nodes).await?;

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let lagged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut watchers = Vec::new();
    for (j, node) in nodes.iter().enumerate() {
        watchers.push(tokio::spawn(watch(
            j,
            node.http.clone(),
            seen.clone(),
            lagged.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let before: Vec<(f64, f64)> = nodes
        .iter()
        .map(|n| Ok((cpu_seconds(n.child.id())?, 0.0)))
        .collect::<Result<_>>()?;
    let wire_before = wire_bytes(&client, &nodes).await?;
    let started = Instant::now();
    let phase = Duration::from_secs(args.seconds);
    let mut writers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        writers.push(tokio::spawn(write(
            i,
            node.http.clone(),
            client.clone(),
            args.rate,
            args.docs,
            args.seed,
            phase,
        )));
    }
    let mut acked: Acked = Vec::new();
    let mut failed = 0u64;
    for w in writers {
        let (ok, bad) = w.await??;
        acked.extend(ok);
        failed += bad;
    }
    let write_phase = started.elapsed();
    let cpu: Vec<f64> = nodes
        .iter()
        .zip(&before)
        .map(|(n, b)| Ok(cpu_seconds(n.child.id())? - b.0))
        .collect::<Result<_>>()?;

    // Wait until every acknowledged write shows on every other node.
    let deadline = Instant::now() + Duration::from_secs(120);
    let lags = loop {
        if let Some(lags) = lags_if_complete(&acked, &seen.lock().expect("seen lock"))? {
            break lags;
        }
        if Instant::now() > deadline {
            bail!("writes still missing on some node 120 s after the write phase");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let settled = started.elapsed();
    let wire = wire_bytes(&client, &nodes).await? - wire_before;
    let peak: Vec<f64> = nodes
        .iter()
        .map(|n| proc_status_mib(n.child.id(), "VmHWM:"))
        .collect::<Result<_>>()?;
    for w in watchers {
        w.abort();
    }

    let delivered = acked.len() as u64 * (nodes.len() as u64 - 1);
    let mut sorted = lags.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    let (p50, p99, max) = (pct(0.5), pct(0.99), pct(1.0));
    let per_change = wire as f64 / delivered as f64;
    let mut report = Report::default();
    report.record(
        json!({"bench": "steady-state", "nodes": nodes.len(), "docs": args.docs,
               "rate_per_node": args.rate, "seconds": write_phase.as_secs_f64(),
               "writes_acknowledged": acked.len(), "writes_failed": failed,
               "deliveries": delivered,
               "lag_ms_p50": p50, "lag_ms_p99": p99, "lag_ms_max": max,
               "settled_seconds_after_writes": (settled - write_phase).as_secs_f64(),
               "cpu_seconds": cpu, "peak_rss_mib": peak,
               "wire_bytes": wire, "wire_bytes_per_change_per_peer": per_change,
               "watch_events_lost": lagged.load(std::sync::atomic::Ordering::Relaxed),
               "regions": REGIONS, "build": build_profile()}),
        vec![
            format!("{}x{}/s", nodes.len(), args.rate),
            acked.len().to_string(),
            format!("{p50:.1}"),
            format!("{p99:.1}"),
            format!("{max:.1}"),
            cpu.iter()
                .map(|c| format!("{c:.1}"))
                .collect::<Vec<_>>()
                .join(" / "),
            peak.iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            format!("{per_change:.0}"),
        ],
    );
    report.print_table(&[
        "writers",
        "writes",
        "lag p50 ms",
        "lag p99 ms",
        "lag max ms",
        "CPU s per node",
        "peak RSS MiB per node",
        "wire bytes/change/peer",
    ]);
    ensure!(failed == 0, "{failed} writes failed");
    Ok(())
}

/// Lags in milliseconds of every acknowledged write on every other node,
/// or `None` while some write has not shown somewhere yet.
fn lags_if_complete(acked: &Acked, seen: &Seen) -> Result<Option<Vec<f64>>> {
    let mut lags = Vec::with_capacity(acked.len() * (REGIONS.len() - 1));
    for &(i, doc, seq, at) in acked {
        for j in (0..REGIONS.len()).filter(|&j| j != i) {
            let Some(obs) = seen.get(&(j, i, doc)) else {
                return Ok(None);
            };
            let k = obs.partition_point(|&(s, _)| s < seq);
            let Some(&(_, shown)) = obs.get(k) else {
                return Ok(None);
            };
            lags.push(shown.saturating_duration_since(at).as_secs_f64() * 1000.0);
        }
    }
    ensure!(!lags.is_empty(), "no write was acknowledged");
    Ok(Some(lags))
}

/// Waits (up to 30 s) until every node replicates with every other.
pub(crate) async fn await_mesh(client: &reqwest::Client, nodes: &[NodeProcess]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = true;
        for n in nodes {
            let status: Value = client
                .get(format!("{}/v1/status", n.http))
                .send()
                .await?
                .json()
                .await?;
            let replicating = status["node"]["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["state"] == "replicating")
                .count();
            all &= replicating + 1 == nodes.len();
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the nodes did not all connect within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Outbound transport bytes of every node, summed.
async fn wire_bytes(client: &reqwest::Client, nodes: &[NodeProcess]) -> Result<u64> {
    let mut total = 0;
    for n in nodes {
        total += libp2p_bytes(client, &n.http, Some("Outbound")).await?;
    }
    Ok(total)
}

/// A splitmix64 step: the document choice, reproducible from the seed.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

async fn write(
    i: usize,
    http: String,
    client: reqwest::Client,
    rate: u32,
    docs: usize,
    seed: u64,
    phase: Duration,
) -> Result<(Acked, u64)> {
    let mut random = seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut seq = 0u64;
    while started.elapsed() < phase {
        tick.tick().await;
        seq += 1;
        let doc = (next_random(&mut random) % docs as u64) as usize;
        let resp = client
            .patch(format!("{http}/v1/docs/steady/{doc:05}"))
            .json(&json!({ format!("w{i}"): seq }))
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => acked.push((i, doc, seq, Instant::now())),
            _ => failed += 1,
        }
    }
    Ok((acked, failed))
}

/// Follows node `j`'s watch stream, recording when each writer's counter
/// first reaches each value in each document.
async fn watch(
    j: usize,
    http: String,
    seen: Arc<Mutex<Seen>>,
    lagged: Arc<std::sync::atomic::AtomicU64>,
) -> Result<()> {
    let resp = reqwest::Client::new()
        .get(format!("{http}/v1/watch"))
        .query(&[("prefix", "steady/")])
        .send()
        .await?
        .error_for_status()?;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let now = Instant::now();
            if event.contains("event: lagged") {
                lagged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let parsed: Value = serde_json::from_str(data).context("watch event")?;
            let Some(doc) = parsed["doc"]
                .as_str()
                .and_then(|d| d.strip_prefix("steady/"))
                .and_then(|d| d.parse::<usize>().ok())
            else {
                continue;
            };
            let mut seen = seen.lock().expect("seen lock");
            for i in (0..REGIONS.len()).filter(|&i| i != j) {
                if let Some(s) = parsed["value"][format!("w{i}")].as_u64() {
                    let obs = seen.entry((j, i, doc)).or_default();
                    if obs.last().is_none_or(|&(last, _)| s > last) {
                        obs.push((s, now));
                    }
                }
            }
        }
    }
    Ok(())
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    let mut rows = Vec::new();
    for r in results {
        let list = |key: &str, digits: usize| {
            r[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| format!("{:.*}", digits, v.as_f64().unwrap_or(f64::NAN)))
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
                .unwrap_or_default()
        };
        let scenario = format!(
            "steady-state: {} nodes x {} writes/s on {} documents for {:.0} s",
            r["nodes"],
            r["rate_per_node"],
            thousands(f(r, "docs")),
            f(r, "seconds")
        );
        rows.push(Row::new(
            format!("{scenario}: propagation lag"),
            format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                f(r, "lag_ms_p50"),
                f(r, "lag_ms_p99"),
                f(r, "lag_ms_max")
            ),
            "—".into(),
            "—".into(),
        ));
        rows.push(Row::new(
            format!("{scenario}: CPU s and peak RSS MiB per node"),
            format!(
                "{} s; {} MiB",
                list("cpu_seconds", 1),
                list("peak_rss_mib", 0)
            ),
            "—".into(),
            "—".into(),
        ));
        rows.push(Row::new(
            format!("{scenario}: bytes per change per peer (above Noise and yamux)"),
            thousands(f(r, "wire_bytes_per_change_per_peer")),
            "—".into(),
            "—".into(),
        ));
    }
    rows
}
