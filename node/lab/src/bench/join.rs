//! `causeway bench join`: idle memory of real `causeway node` processes (an
//! empty one, and one holding N documents), and the time for a new, empty
//! node to receive N existing documents from a peer and to answer `/ready`
//! with 200 (it must hold all N by then, or the benchmark fails).
//!
//! The nodes are this binary run as `causeway node` on 127.0.0.1 with the
//! loopback timers; memory is VmRSS from /proc after the node idled 3 s.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use causeway_engine::Durability;
use serde_json::json;

use super::ingest::tempdir_in;
use super::node_process::{count_docs, populate, NodeProcess};
use super::summary::{f, thousands, Row};
use super::{build_profile, Report};
use serde_json::Value;

/// Arguments of `causeway bench join`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents the first node holds.
    #[arg(long, default_value_t = 10_000)]
    pub docs: usize,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up waiting for the new node after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    let dir = tempdir_in(args.dir.as_deref())?;
    let empty = NodeProcess::spawn(&dir.path().join("empty"), "eu", &[])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_empty = empty.rss_mib()?;
    drop(empty);

    let a_dir = dir.path().join("a");
    let started = Instant::now();
    populate(&a_dir.join("store"), "join", args.docs, Durability::Sync)?;
    eprintln!(
        "join: wrote {} documents in {:.1} s",
        args.docs,
        started.elapsed().as_secs_f64()
    );
    let a = NodeProcess::spawn(&a_dir, "eu", &[])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_full = a.rss_mib()?;

    let client = reqwest::Client::new();
    let joined = Instant::now();
    let c = NodeProcess::spawn(&dir.path().join("c"), "ap", &a.listen)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut ready = None;
    loop {
        let held = count_docs(&client, &c.http, "join").await?;
        if ready.is_none() && is_ready(&client, &c.http).await? {
            // What it held when it first said ready: everything, counted
            // after the answer.
            let at_ready = count_docs(&client, &c.http, "join").await?;
            ready = Some((joined.elapsed(), at_ready));
        }
        if held >= args.docs && ready.is_some() {
            break;
        }
        if joined.elapsed() > timeout {
            bail!(
                "the new node did not receive {} documents and say it is ready within {timeout:?}",
                args.docs
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = joined.elapsed();
    let (ready_after, held_at_ready) = ready.unwrap_or((took, 0));
    if held_at_ready < args.docs {
        bail!(
            "the new node said it was ready holding {held_at_ready} of {} documents",
            args.docs
        );
    }
    let rss_c = c.rss_mib()?;
    let mut report = Report::default();
    report.record(
        json!({"bench": "join", "docs": args.docs, "join_seconds": took.as_secs_f64(),
               "ready_seconds": ready_after.as_secs_f64(),
               "docs_per_s": args.docs as f64 / took.as_secs_f64(),
               "idle_rss_mib_empty": idle_empty, "idle_rss_mib_with_docs": idle_full,
               "rss_mib_new_node_after_join": rss_c, "build": build_profile()}),
        vec![
            args.docs.to_string(),
            format!("{:.1}", took.as_secs_f64()),
            format!("{:.1}", ready_after.as_secs_f64()),
            format!("{:.0}", args.docs as f64 / took.as_secs_f64()),
            format!("{idle_empty:.1}"),
            format!("{idle_full:.1}"),
        ],
    );
    report.print_table(&[
        "docs",
        "join s",
        "ready s",
        "docs/s",
        "idle RSS MiB (empty)",
        "idle RSS MiB (with docs)",
    ]);
    Ok(())
}

/// Whether the node at `http` answers `/ready` with 200.
async fn is_ready(client: &reqwest::Client, http: &str) -> Result<bool> {
    let response = client.get(format!("{http}/ready")).send().await?;
    Ok(response.status().is_success())
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    let mut rows = Vec::new();
    for r in results {
        rows.push(Row::new(
            format!(
                "join: a new node receives {} documents",
                thousands(f(r, "docs"))
            ),
            format!(
                "{:.1} s ({} documents/s); `/ready` 200 after {:.1} s",
                f(r, "join_seconds"),
                thousands(f(r, "docs_per_s")),
                f(r, "ready_seconds")
            ),
            "—".into(),
            "—".into(),
        ));
        rows.push(Row::new(
            "idle memory of `causeway node`".into(),
            format!(
                "{:.1} MiB holding {} documents",
                f(r, "idle_rss_mib_with_docs"),
                thousands(f(r, "docs"))
            ),
            format!("empty node {:.1} MiB", f(r, "idle_rss_mib_empty")),
            format!(
                "{:.2}x",
                f(r, "idle_rss_mib_with_docs") / f(r, "idle_rss_mib_empty")
            ),
        ));
    }
    rows
}
