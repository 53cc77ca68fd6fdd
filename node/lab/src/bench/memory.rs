//! `causeway bench memory`: a `causeway node` process whose store holds N
//! small documents (default 1,000,000), with a client writing to a working
//! set of them (default 1,000) through the HTTP API; reports the time to
//! open (process start to ready), resident memory idle and while written
//! to, the peak, and the document cache budget in force, next to an empty
//! node's idle memory measured in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use causeway_engine::Durability;
use serde_json::{json, Value};

use super::ingest::tempdir_in;
use super::node_process::{populate, proc_status_mib, NodeProcess};
use super::summary::{self, f, thousands, Row};
use super::{build_profile, Report};

/// Arguments of `causeway bench memory`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents in the store.
    #[arg(long, default_value_t = 1_000_000)]
    pub docs: usize,
    /// Documents being written (spread evenly over the store).
    #[arg(long, default_value_t = 1000)]
    pub written: usize,
    /// Writes per second during the write phase.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Length of the write phase, seconds.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    ensure!(
        args.written > 0 && args.written <= args.docs && args.rate > 0,
        "need 0 < written <= docs and a positive rate"
    );
    let dir = tempdir_in(args.dir.as_deref())?;
    let empty = NodeProcess::spawn(&dir.path().join("empty"), "eu", &[])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let empty_rss = empty.rss_mib()?;
    drop(empty);

    let node_dir = dir.path().join("full");
    let started = Instant::now();
    populate(
        &node_dir.join("store"),
        "mem",
        args.docs,
        Durability::Buffered,
    )?;
    let populate_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "memory: wrote {} documents in {populate_seconds:.1} s",
        args.docs
    );
    let store_mib = dir_size(&node_dir.join("store"))? as f64 / (1 << 20) as f64;

    let started = Instant::now();
    let node = NodeProcess::spawn(&node_dir, "eu", &[])?;
    let open_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = node.rss_mib()?;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let stride = args.docs / args.written;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let phase = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let (mut writes, mut failed, mut k) = (0u64, 0u64, 0usize);
    while started.elapsed() < phase {
        tick.tick().await;
        let id = format!("mem/{:07}", (k % args.written) * stride);
        k += 1;
        let resp = client
            .patch(format!("{}/v1/docs/{id}", node.http))
            .json(&json!({ "visits": k }))
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => writes += 1,
            _ => failed += 1,
        }
    }
    let writing_rss = node.rss_mib()?;
    let peak_rss = proc_status_mib(node.child.id(), "VmHWM:")?;
    let status: Value = client
        .get(format!("{}/v1/status", node.http))
        .send()
        .await?
        .json()
        .await?;
    let engine = &status["engine"];
    let budget_mib = engine["cache_budget_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    let cache_mib = engine["cache_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;

    let mut report = Report::default();
    report.record(
        json!({"bench": "memory", "docs": args.docs, "written": args.written,
               "writes": writes, "writes_failed": failed, "rate": args.rate,
               "populate_seconds": populate_seconds, "store_mib": store_mib,
               "open_seconds": open_seconds, "idle_rss_mib": idle_rss,
               "writing_rss_mib": writing_rss, "peak_rss_mib": peak_rss,
               "empty_node_idle_rss_mib": empty_rss,
               "cache_budget_mib": budget_mib, "cache_mib": cache_mib,
               "cached_documents": engine["cached_documents"],
               "build": build_profile()}),
        vec![
            args.docs.to_string(),
            format!("{open_seconds:.2}"),
            format!("{idle_rss:.1}"),
            format!("{writing_rss:.1}"),
            format!("{peak_rss:.1}"),
            format!("{empty_rss:.1}"),
            format!("{budget_mib:.0}"),
        ],
    );
    report.print_table(&[
        "documents",
        "open s",
        "idle RSS MiB",
        "RSS writing MiB",
        "peak RSS MiB",
        "empty node RSS MiB",
        "cache budget MiB",
    ]);
    ensure!(failed == 0, "{failed} writes failed");
    Ok(())
}

/// Bytes of the files under `dir`.
fn dir_size(dir: &std::path::Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    summary::each(results, |r| {
        Row::new(
            format!(
                "memory: {} documents stored, {} being written",
                thousands(f(r, "docs")),
                thousands(f(r, "written"))
            ),
            format!(
                "RSS {:.0} MiB idle, {:.0} MiB writing, peak {:.0} MiB (cache budget {:.0} MiB); open {:.2} s",
                f(r, "idle_rss_mib"),
                f(r, "writing_rss_mib"),
                f(r, "peak_rss_mib"),
                f(r, "cache_budget_mib"),
                f(r, "open_seconds")
            ),
            format!("empty node {:.0} MiB", f(r, "empty_node_idle_rss_mib")),
            format!(
                "{:.2}x (peak)",
                f(r, "peak_rss_mib") / f(r, "empty_node_idle_rss_mib")
            ),
        )
    })
}
