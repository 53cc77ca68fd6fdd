//! `causeway bench gc`: the size of a store of N small documents, all
//! deleted, before garbage collection, after it (with the markers it keeps
//! for a second grace period) and once the markers are gone; against the
//! same store before the deletes, and an empty store, in the same run.
//!
//! The store is written (`populate`: two changes per document), measured,
//! every document deleted, measured again; then a replication core with a
//! membership list of itself alone (every member holds every delete at
//! once) and a grace period of one second collects it, driven through its
//! timers as a node drives it, one page of [`COLLECTION_PAGE`] documents
//! per look, and the time that takes is measured. Every size is taken after
//! a full RocksDB compaction, which is what reclaims the space of deleted
//! records in the end (a running node's background compactions get there
//! by themselves, later), and counts every file of the store but RocksDB's
//! info logs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Result};
use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::random::SplitMix64;
use causeway_engine::replication::{Collection, Replicator, ReplicatorConfig, COLLECTION_PAGE};
use causeway_engine::{DocId, Durability, Engine, EngineConfig};
use serde_json::{json, Value};

use super::ingest::tempdir_in;
use super::node_process::populate;
use super::summary::{f, thousands, Row};
use super::{build_profile, Report};

/// Arguments of `causeway bench gc`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents written, then deleted.
    #[arg(long, default_value_t = 100_000)]
    pub docs: usize,
    /// Directory for the store (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Grace period of the run: collection is due one second after a delete.
const GRACE: Duration = Duration::from_secs(1);

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    ensure!(args.docs > 0, "need at least one document");
    let dir = tempdir_in(args.dir.as_deref())?;
    let store = dir.path().join("store");
    let config = EngineConfig {
        durability: Durability::Buffered,
        ..EngineConfig::default()
    };
    let empty = dir.path().join("empty");
    Engine::open(&empty, config.clone())?.compact()?;
    let empty_bytes = dir_size(&empty)?;

    populate(&store, "gc", args.docs, Durability::Buffered)?;
    let engine = Engine::open(&store, config)?;
    let written = measure(&engine)?;
    let started = Instant::now();
    for i in 0..args.docs {
        engine.delete(&DocId::new(format!("gc/{i:07}"))?)?;
    }
    let delete_seconds = started.elapsed().as_secs_f64();
    let deleted = measure(&engine)?;
    eprintln!(
        "gc: {} documents written ({:.1} MiB), deleted in {delete_seconds:.1} s ({:.1} MiB)",
        args.docs,
        mib(written),
        mib(deleted)
    );

    // Past the grace period of every tombstone, by the clock the deletes
    // were stamped with.
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    let mut core = collector(&engine)?;
    let started = Instant::now();
    let mut now = Duration::ZERO;
    let mut random = SplitMix64::new(1);
    let mut looks = 0u64;
    while core.stats().documents_collected < args.docs as u64 {
        now += Duration::from_secs(1);
        core.handle_timeout(now, &mut random)?;
        looks += 1;
        ensure!(
            looks <= 2 * (args.docs / COLLECTION_PAGE + 2) as u64,
            "collection stalled at {} of {} documents",
            core.stats().documents_collected,
            args.docs
        );
    }
    let collect_seconds = started.elapsed().as_secs_f64();
    let collected = measure(&engine)?;
    // A second grace period later the markers go.
    while core.stats().markers_forgotten < args.docs as u64 {
        now += Duration::from_secs(1);
        core.handle_timeout(now, &mut random)?;
    }
    let forgotten = measure(&engine)?;
    ensure!(
        engine.tombstones(None, 1)?.0.is_empty(),
        "a deleted document is left after collection"
    );

    let mut report = Report::default();
    for (stage, bytes) in [
        ("written", written),
        ("all deleted", deleted),
        ("collected (markers kept)", collected),
        ("markers dropped", forgotten),
    ] {
        report.record(
            json!({"bench": "gc", "stage": stage, "docs": args.docs, "store_bytes": bytes,
                   "written_bytes": written, "empty_store_bytes": empty_bytes,
                   "delete_seconds": delete_seconds, "collect_seconds": collect_seconds,
                   "collect_docs_per_s": args.docs as f64 / collect_seconds,
                   "looks": looks, "page": COLLECTION_PAGE, "build": build_profile()}),
            vec![
                stage.to_string(),
                thousands(args.docs as f64),
                format!("{:.2}", mib(bytes)),
                format!("{:.3}", bytes as f64 / written as f64),
            ],
        );
    }
    report.print_table(&["stage", "documents", "store MiB", "over written"]);
    eprintln!(
        "collected {} documents in {collect_seconds:.2} s of work ({:.0} documents/s; a node \
         spreads it over {looks} looks, one a second); empty store {:.3} MiB",
        args.docs,
        args.docs as f64 / collect_seconds,
        mib(empty_bytes)
    );
    Ok(())
}

/// A replication core over `engine` that collects: a cluster of one
/// member, a grace period of [`GRACE`].
fn collector(engine: &Engine) -> Result<Replicator> {
    let node = NodeId::new("gc-bench")?;
    let region = Region::new("eu")?;
    let mut config = ReplicatorConfig::new(node.clone(), region.clone(), ClusterId::new("bench")?);
    config.collection = Some(Collection {
        grace: GRACE,
        interval: Duration::from_secs(1),
        clock_origin: SystemTime::now().duration_since(UNIX_EPOCH)?,
    });
    let mut core = Replicator::new(engine.clone(), config, Duration::ZERO)?;
    core.set_members(Duration::ZERO, Some([(node, region)].into()))?;
    Ok(core)
}

/// The store's size after a full compaction.
fn measure(engine: &Engine) -> Result<u64> {
    engine.compact()?;
    dir_size(engine.path())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Bytes of the store's files under `dir`, RocksDB's info logs (`LOG`,
/// `LOG.old.*`, which grow with every compaction run here) left out.
fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else if !entry.file_name().to_string_lossy().starts_with("LOG") {
            total += meta.len();
        }
    }
    Ok(total)
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results: the store at each stage against the store before the deletes,
/// and with the last stage, the collection's pace.
pub fn summary(results: &[Value]) -> Vec<Row> {
    let size = |r: &Value, key: &str| f(r, key) / (1 << 20) as f64;
    let mut rows: Vec<Row> = results
        .iter()
        .map(|r| {
            Row::new(
                format!(
                    "gc: store of {} documents, {}",
                    thousands(f(r, "docs")),
                    r["stage"].as_str().unwrap_or("?")
                ),
                format!("{:.2} MiB", size(r, "store_bytes")),
                format!("before the deletes {:.2} MiB", size(r, "written_bytes")),
                format!("{:.3}x", f(r, "store_bytes") / f(r, "written_bytes")),
            )
        })
        .collect();
    if let Some(r) = results.last() {
        rows.push(Row::new(
            format!(
                "gc: collecting {} deleted documents",
                thousands(f(r, "docs"))
            ),
            format!("{:.0} documents/s", f(r, "collect_docs_per_s")),
            "—".into(),
            "—".into(),
        ));
    }
    rows
}
