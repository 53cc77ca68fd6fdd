//! `causeway bench backup`: taking and restoring a backup of a store of N
//! small documents, against a plain `cp -r` of the stopped store on the
//! same disk; and the time for a node restored from the backup to hold
//! what was written after it.
//!
//! Four runs over one store: `cp -r` of the stopped store (the reference:
//! it neither takes a consistent copy of a running store nor checks
//! anything); `causeway backup --url` from a running node (checkpoint,
//! stream over loopback HTTP, SHA-256 of every file, every document loaded
//! and checked); `--data-dir` from the stopped node (checkpoint, hashes,
//! verification, no HTTP); `causeway restore` (every file hashed again,
//! every document verified again, copied and fsynced). The page cache is
//! warm for all of them. Then M more documents are written to the
//! original node, the restored one is started with it as its bootstrap
//! peer, and the time until it lists all N + M documents is measured.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use causeway_engine::Durability;
use causeway_node::backup;
use serde_json::{json, Value};

use super::ingest::tempdir_in;
use super::node_process::{count_docs, populate, NodeProcess};
use super::summary::{f, thousands, Row};
use super::{build_profile, Report};

/// Arguments of `causeway bench backup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents in the store.
    #[arg(long, default_value_t = 100_000)]
    pub docs: usize,
    /// Documents written after the backup, which the restored node gets
    /// from its peer.
    #[arg(long, default_value_t = 1_000)]
    pub later_docs: usize,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up waiting for the restored node after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    let dir = tempdir_in(args.dir.as_deref())?;
    let a_dir = dir.path().join("a");
    let started = Instant::now();
    populate(
        &a_dir.join("store"),
        "backup",
        args.docs,
        Durability::Buffered,
    )?;
    eprintln!(
        "backup: wrote {} documents in {:.1} s",
        args.docs,
        started.elapsed().as_secs_f64()
    );
    let store_bytes = dir_bytes(&a_dir.join("store"))?;
    let copy = timed(|| {
        let status = Command::new("cp")
            .arg("-r")
            .arg(a_dir.join("store"))
            .arg(dir.path().join("cp"))
            .status()?;
        if !status.success() {
            bail!("cp -r failed: {status}");
        }
        Ok(())
    })?;

    let a = NodeProcess::spawn(&a_dir, "eu", &[])?;
    let online_dir = dir.path().join("online");
    let online =
        backup::take_from_node(&reqwest::Client::new(), &a.http, None, &online_dir).await?;
    drop(a);
    let offline = backup::take_from_data_dir(&a_dir, &dir.path().join("offline"))?;
    let r_dir = dir.path().join("restored");
    let restored = backup::restore(&online_dir, &r_dir)?;

    populate(
        &a_dir.join("store"),
        "later",
        args.later_docs,
        Durability::Buffered,
    )?;
    let a = NodeProcess::spawn(&a_dir, "eu", &[])?;
    let r = NodeProcess::spawn(&r_dir, "eu", &a.listen)?;
    let caught_up = Instant::now();
    let client = reqwest::Client::new();
    let timeout = Duration::from_secs(args.timeout_secs);
    while count_docs(&client, &r.http, "later").await? < args.later_docs {
        if caught_up.elapsed() > timeout {
            bail!(
                "the restored node did not receive {} documents within {timeout:?}",
                args.later_docs
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caught_up = caught_up.elapsed();
    if count_docs(&client, &r.http, "backup").await? != args.docs {
        bail!(
            "the restored node does not list the backup's {} documents",
            args.docs
        );
    }

    let mut report = Report::default();
    let mb = store_bytes as f64 / 1e6;
    let cp_s = copy.as_secs_f64();
    for (how, bytes, docs, seconds) in [
        ("cp -r (stopped store)", store_bytes, args.docs as u64, cp_s),
        (
            "backup --url (running node)",
            online.bytes,
            online.documents,
            online.seconds,
        ),
        (
            "backup --data-dir (stopped)",
            offline.bytes,
            offline.documents,
            offline.seconds,
        ),
        (
            "restore",
            restored.bytes,
            restored.documents,
            restored.seconds,
        ),
    ] {
        report.record(
            json!({"bench": "backup", "how": how, "docs": docs, "store_mb": mb,
                   "bytes": bytes, "seconds": seconds,
                   "mb_per_s": bytes as f64 / 1e6 / seconds,
                   "docs_per_s": docs as f64 / seconds,
                   "x_cp": seconds / cp_s, "build": build_profile()}),
            vec![
                how.to_string(),
                thousands(docs as f64),
                format!("{:.1}", bytes as f64 / 1e6),
                format!("{seconds:.2}"),
                format!("{:.0}", bytes as f64 / 1e6 / seconds),
                thousands(docs as f64 / seconds),
                format!("{:.1}x", seconds / cp_s),
            ],
        );
    }
    report.record(
        json!({"bench": "backup", "how": "restored node catches up",
               "docs": args.docs, "later_docs": args.later_docs,
               "seconds": caught_up.as_secs_f64(), "build": build_profile()}),
        vec![
            format!("restored node gets {} later documents", args.later_docs),
            thousands(args.later_docs as f64),
            "—".into(),
            format!("{:.2}", caught_up.as_secs_f64()),
            "—".into(),
            thousands(args.later_docs as f64 / caught_up.as_secs_f64()),
            "—".into(),
        ],
    );
    report.print_table(&["how", "docs", "MB", "s", "MB/s", "docs/s", "x cp -r"]);
    Ok(())
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

/// Bytes of the files directly in `dir`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    let cp = results
        .iter()
        .find(|r| r["how"] == "cp -r (stopped store)")
        .map_or(0.0, |r| f(r, "mb_per_s"));
    results
        .iter()
        .filter(|r| r["how"] != "cp -r (stopped store)")
        .map(|r| match r["how"].as_str() {
            Some("restored node catches up") => Row::new(
                format!(
                    "a node restored from a backup of {} documents gets {} written since",
                    thousands(f(r, "docs")),
                    thousands(f(r, "later_docs"))
                ),
                format!("{:.2} s", f(r, "seconds")),
                "—".into(),
                "—".into(),
            ),
            how => Row::new(
                format!(
                    "{}, {} documents",
                    how.unwrap_or("?"),
                    thousands(f(r, "docs"))
                ),
                format!(
                    "{:.0} MB/s, {} documents/s",
                    f(r, "mb_per_s"),
                    thousands(f(r, "docs_per_s"))
                ),
                format!("cp -r {cp:.0} MB/s"),
                format!("{:.1}x the time", f(r, "x_cp")),
            ),
        })
        .collect()
}
