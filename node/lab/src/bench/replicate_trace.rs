//! `causeway bench replicate-trace`: an editing trace written on node A of a
//! three-region loopback cluster (three full nodes in this process, each with
//! its own store and libp2p swarm), one change per trace transaction, as fast
//! as A's engine accepts them (default durability: every change fsynced);
//! reports the time until nodes B and C hold A's final heads, next to A's
//! own ingest time in the same run. Replication that keeps up finishes
//! shortly after the ingest; the target is within 1.2x of it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use causeway_engine::automerge::{ChangeHash, ReadDoc, ROOT};
use causeway_engine::replication::ids::ClusterId;
use causeway_engine::{DocId, Engine};
use serde_json::json;

use super::ingest::{apply_txn, start_text, tempdir_in};
use super::summary::{f, thousands, Row};
use super::trace::{Trace, TraceArgs};
use super::{build_profile, Report};
use causeway_node::local_cluster;
use serde_json::Value;

/// Arguments of `causeway bench replicate-trace`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The trace to write on node A.
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up waiting for B and C this long after A's ingest ended, seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    let mut trace = Trace::load(&args.trace.trace)?;
    let full = args.trace.txns.is_none_or(|n| n >= trace.txns.len());
    if let Some(n) = args.trace.txns {
        trace.txns.truncate(n.max(1));
    }
    let name = args
        .trace
        .trace
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    eprintln!(
        "replicate-trace: {name}: {} transactions on A of 3 nodes, {} build",
        trace.txns.len(),
        build_profile()
    );
    let dir = tempdir_in(args.dir.as_deref())?;
    let regions = ["eu-west", "us-east", "ap-south"];
    let nodes = local_cluster::start(dir.path(), &ClusterId::new("bench")?, &regions).await?;
    local_cluster::await_mesh(&nodes, Duration::from_secs(30)).await?;
    let engines: Vec<Engine> = nodes.iter().map(|n| n.engine.clone()).collect();
    let id = DocId::new("bench/replicate-trace")?;

    let start = Instant::now();
    let (ingest, heads) = tokio::task::spawn_blocking({
        let (engine, id, trace) = (engines[0].clone(), id.clone(), trace.clone());
        move || -> Result<(Duration, Vec<ChangeHash>)> {
            let text = engine
                .create(&id, |tx| start_text(tx, &trace.start_content))?
                .value;
            for txn in &trace.txns {
                engine.update(&id, |tx| apply_txn(tx, &text, txn))?;
            }
            Ok((start.elapsed(), engine.heads(&id)?))
        }
    })
    .await??;
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut arrived = [None, None];
    while arrived.iter().any(Option::is_none) {
        for (slot, engine) in arrived.iter_mut().zip(&engines[1..]) {
            if slot.is_none() && engine.heads(&id).is_ok_and(|h| h == heads) {
                *slot = Some(start.elapsed());
            }
        }
        if start.elapsed() > ingest + timeout {
            bail!("B and C did not hold A's final heads within {timeout:?} after the ingest");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let text = |e: &Engine| -> Result<String> {
        e.read(&id, |d| -> Result<String> {
            let (_, obj) = d
                .get(ROOT, "text")?
                .ok_or_else(|| anyhow::anyhow!("no text"))?;
            Ok(d.text(&obj)?)
        })?
    };
    let final_text = text(&engines[0])?;
    if full && final_text != trace.end_content {
        bail!("A's final text differs from the trace's endContent");
    }
    for e in &engines[1..] {
        if text(e)? != final_text {
            bail!("a replica's text differs from A's");
        }
    }
    // The metrics are refreshed once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let paths: Vec<[f64; 4]> = nodes[1..]
        .iter()
        .map(|n| {
            [
                metric(n, r#"causeway_changes_applied_total{kind="delta"}"#),
                metric(n, r#"causeway_changes_applied_total{kind="sync"}"#),
                metric(n, "causeway_received_batches_total"),
                metric(n, "causeway_received_batch_messages_total"),
            ]
        })
        .collect();
    let fsyncs: Vec<u64> = engines.iter().map(|e| e.stats().wal_syncs).collect();
    let dropped = nodes[0].node.status().await?.local_events_dropped;
    local_cluster::shutdown(&nodes).await?;
    eprintln!(
        "changes applied by B: {} by delta, {} by sync; by C: {} by delta, {} by sync; \
         local commits A's network task missed (queue full): {dropped}",
        paths[0][0], paths[0][1], paths[1][0], paths[1][1]
    );
    let mean_batch = |p: &[f64; 4]| if p[2] > 0.0 { p[3] / p[2] } else { 0.0 };
    eprintln!(
        "received messages applied in batches: B {} in {} (mean {:.1}), C {} in {} (mean {:.1}); \
         WAL fsyncs: A {}, B {}, C {}",
        paths[0][3],
        paths[0][2],
        mean_batch(&paths[0]),
        paths[1][3],
        paths[1][2],
        mean_batch(&paths[1]),
        fsyncs[0],
        fsyncs[1],
        fsyncs[2]
    );

    let [b, c] = arrived.map(|t| t.unwrap_or_default().as_secs_f64());
    let ingest_s = ingest.as_secs_f64();
    let mut report = Report::default();
    report.record(
        json!({"bench": "replicate-trace", "trace": name, "txns": trace.txns.len(), "nodes": 3,
               "ingest_a_s": ingest_s, "replicated_b_s": b, "replicated_c_s": c,
               "ratio_b": b / ingest_s, "ratio_c": c / ingest_s, "target_ratio": 1.2,
               "b_changes_by_delta": paths[0][0], "b_changes_by_sync": paths[0][1],
               "c_changes_by_delta": paths[1][0], "c_changes_by_sync": paths[1][1],
               "a_local_events_dropped": dropped,
               "b_mean_batch": mean_batch(&paths[0]), "c_mean_batch": mean_batch(&paths[1]),
               "a_fsyncs": fsyncs[0], "b_fsyncs": fsyncs[1], "c_fsyncs": fsyncs[2],
               "build": build_profile()}),
        vec![
            trace.txns.len().to_string(),
            format!("{ingest_s:.2}"),
            format!("{b:.2}"),
            format!("{c:.2}"),
            format!("{:.2}", b.max(c) / ingest_s),
        ],
    );
    report.print_table(&[
        "txns",
        "A ingest s",
        "B holds all s",
        "C holds all s",
        "x ingest",
    ]);
    Ok(())
}

/// The value of the metric line starting with `series` in `node`'s
/// registry (0 if absent).
fn metric(node: &local_cluster::LocalNode, series: &str) -> f64 {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, node.node.registry()).is_err() {
        return 0.0;
    }
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    let mut rows = Vec::new();
    for r in results {
        let slowest = f(r, "replicated_b_s").max(f(r, "replicated_c_s"));
        rows.push(Row::new(
            format!(
                "replicate-trace: {} changes written on A; B and C hold A's heads",
                thousands(f(r, "txns"))
            ),
            format!("{slowest:.1} s (slower of B, C)"),
            format!("A's own ingest {:.1} s", f(r, "ingest_a_s")),
            format!("{:.2}x (target 1.2x)", slowest / f(r, "ingest_a_s")),
        ));
    }
    rows
}
