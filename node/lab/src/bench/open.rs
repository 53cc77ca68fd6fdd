//! `causeway bench open`: opening a store of N small documents (default
//! 1,000,000) as a node does, step by step, against reading the same
//! records straight from RocksDB in the same process.
//!
//! The store is written once (`populate`, two changes per document) and
//! compacted. Then, with the page cache warm (the run does not drop it),
//! three times each, keeping the fastest:
//!
//! * the reference: RocksDB opened read-only and every record of the
//!   `doc_meta` column family iterated (keys and values touched, nothing
//!   decoded): the floor for any open that reads one record per document;
//! * `Engine::open`;
//! * the replication core built over the engine (`Replicator::new`, which
//!   loads the reconciliation item set);
//!
//! and the process's resident memory after the last open; then a `causeway
//! node` process started on the store: the time from its start to its
//! ready line, and its resident memory 3 s later.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use causeway_engine::layout;
use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::{Replicator, ReplicatorConfig};
use causeway_engine::{Durability, Engine, EngineConfig};
use serde_json::{json, Value};

use super::ingest::tempdir_in;
use super::node_process::{populate, proc_status_mib, NodeProcess};
use super::summary::{f, thousands, Row};
use super::{build_profile, Report};

/// Arguments of `causeway bench open`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents in the store.
    #[arg(long, default_value_t = 1_000_000)]
    pub docs: usize,
    /// Directory for the store (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Opens of each kind; the fastest counts.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Keep the store afterwards (its directory is printed).
    #[arg(long)]
    pub keep: bool,
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    ensure!(
        args.docs > 0 && args.repeat > 0,
        "need documents and a repeat"
    );
    let dir = tempdir_in(args.dir.as_deref())?;
    let store = dir.path().join("store");
    let started = Instant::now();
    populate(&store, "open", args.docs, Durability::Buffered)?;
    Engine::open(&store, config())?.compact()?;
    eprintln!(
        "open: wrote {} documents in {:.1} s",
        args.docs,
        started.elapsed().as_secs_f64()
    );

    let mut scan = Duration::MAX;
    let mut engine_open = Duration::MAX;
    let mut core_new = Duration::MAX;
    let mut items = 0;
    for _ in 0..args.repeat {
        let (took, records) = raw_scan(&store)?;
        ensure!(records == args.docs, "{records} records, not {}", args.docs);
        scan = scan.min(took);

        let t = Instant::now();
        let engine = Engine::open(&store, config())?;
        engine_open = engine_open.min(t.elapsed());
        let t = Instant::now();
        let core = Replicator::new(engine, core_config()?, Duration::ZERO)?;
        core_new = core_new.min(t.elapsed());
        items = core.item_count();
    }
    ensure!(items == args.docs, "{items} items, not {}", args.docs);
    let rss = proc_status_mib(std::process::id(), "VmRSS:")?;
    let total = engine_open + core_new;

    let t = Instant::now();
    let node = NodeProcess::spawn(dir.path(), "eu", &[])?;
    let node_open = t.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let node_rss = node.rss_mib()?;
    drop(node);
    if args.keep {
        eprintln!("open: the store is kept in {}", store.display());
        std::mem::forget(dir);
    }

    let mut report = Report::default();
    report.record(
        json!({"bench": "open", "docs": args.docs,
               "raw_scan_seconds": scan.as_secs_f64(),
               "engine_open_seconds": engine_open.as_secs_f64(),
               "replicator_seconds": core_new.as_secs_f64(),
               "open_seconds": total.as_secs_f64(),
               "rss_mib": rss, "node_open_seconds": node_open.as_secs_f64(),
               "node_rss_mib": node_rss, "build": build_profile()}),
        vec![
            thousands(args.docs as f64),
            format!("{:.3}", scan.as_secs_f64()),
            format!("{:.3}", engine_open.as_secs_f64()),
            format!("{:.3}", core_new.as_secs_f64()),
            format!("{:.3}", total.as_secs_f64()),
            format!("{:.2}x", total.as_secs_f64() / scan.as_secs_f64()),
            format!("{rss:.0}"),
            format!("{:.3}", node_open.as_secs_f64()),
            format!("{node_rss:.0}"),
        ],
    );
    report.print_table(&[
        "documents",
        "raw RocksDB scan s",
        "Engine::open s",
        "item set s",
        "open s",
        "over scan",
        "bench RSS MiB",
        "node start to ready s",
        "node RSS MiB",
    ]);
    Ok(())
}

fn config() -> EngineConfig {
    EngineConfig {
        durability: Durability::Buffered,
        ..EngineConfig::default()
    }
}

fn core_config() -> Result<ReplicatorConfig> {
    Ok(ReplicatorConfig::new(
        NodeId::new("open-bench")?,
        Region::new("eu")?,
        ClusterId::new("bench")?,
    ))
}

/// Opens the store read-only and touches every `doc_meta` record: how long
/// that took, and how many there were.
fn raw_scan(store: &Path) -> Result<(Duration, usize)> {
    let t = Instant::now();
    let log = tempfile::tempdir()?;
    let mut opts = rocksdb::Options::default();
    opts.set_db_log_dir(log.path());
    let mut names = vec![rocksdb::DEFAULT_COLUMN_FAMILY_NAME];
    names.extend(layout::COLUMN_FAMILIES);
    let db = rocksdb::DB::open_cf_for_read_only(&opts, store, names, false)?;
    let cf = db
        .cf_handle(layout::CF_DOC_META)
        .ok_or_else(|| anyhow::anyhow!("no {} column family", layout::CF_DOC_META))?;
    let (mut records, mut bytes) = (0usize, 0usize);
    for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        records += 1;
        bytes += k.len() + v.len();
    }
    let took = t.elapsed();
    std::hint::black_box(bytes);
    Ok((took, records))
}

/// This scenario's row in the `causeway bench all` summary.
pub fn summary(results: &[Value]) -> Vec<Row> {
    results
        .iter()
        .map(|r| {
            Row::new(
                format!(
                    "open a store of {} documents (engine and item set)",
                    thousands(f(r, "docs"))
                ),
                format!(
                    "{:.2} s in process; a node ready in {:.2} s, RSS {:.0} MiB",
                    f(r, "open_seconds"),
                    f(r, "node_open_seconds"),
                    f(r, "node_rss_mib")
                ),
                format!("raw RocksDB scan {:.2} s", f(r, "raw_scan_seconds")),
                format!("{:.2}x", f(r, "open_seconds") / f(r, "raw_scan_seconds")),
            )
        })
        .collect()
}
