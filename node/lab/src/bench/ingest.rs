//! `causeway bench ingest`: replay an editing trace into one document, one
//! transaction per trace transaction, through the engine (with `Sync` and with
//! `Buffered` durability) and, in the same run, into a bare in-memory
//! `automerge::Automerge` (also once fetching each change's bytes, and once
//! fetching them and writing each change with a metadata record to a raw
//! RocksDB without sync: the floor for any store that persists every change
//! with `Buffered`'s promise). Reports wall time of each and engine/bare
//! ratios, and fails if any run's final text differs from the trace's
//! `endContent`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{Automerge, ObjId, ObjType, ReadDoc, ROOT};
use causeway_engine::layout::DocMeta;
use causeway_engine::{DocId, Durability, Engine, EngineConfig};
use serde_json::json;

use super::summary::{f, thousands, Row};
use super::trace::{Trace, DEFAULT_TRACE};
use super::{build_profile, Report};
use serde_json::Value;

/// Arguments of `causeway bench ingest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Editing trace to replay (gzipped JSON).
    #[arg(long, default_value = DEFAULT_TRACE)]
    pub trace: PathBuf,
    /// Directory in which to create the benchmark stores (default: the
    /// system temporary directory). Use a directory on the disk you care about.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Replay only the first N transactions (smoke runs).
    #[arg(long)]
    pub txns: Option<usize>,
    /// Engine durabilities to measure (bare Automerge always runs, as the
    /// reference).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "buffered,sync"
    )]
    pub durability: Vec<DurabilityArg>,
}

/// A durability to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    /// `Durability::Buffered`: no fsync.
    Buffered,
    /// `Durability::Sync`: fsynced WAL, the default.
    Sync,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    let mut trace = Trace::load(&args.trace)?;
    if let Some(n) = args.txns {
        trace.truncate(n);
    }
    let name = args
        .trace
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    eprintln!(
        "ingest: {name}: {} transactions, {} patches, {} build",
        trace.txns.len(),
        trace.patch_count(),
        build_profile()
    );
    let mut report = Report::default();
    let bare = time(|| replay_bare(&trace, Bare::InMemory))?;
    report.record(
        json!({"bench": "ingest", "trace": name, "variant": "bare-automerge", "txns": trace.txns.len(), "wall_s": bare, "build": build_profile()}),
        vec!["bare automerge (in memory)".into(), format!("{bare:.2}"), "1.00".into()],
    );
    let extracting = time(|| replay_bare(&trace, Bare::Extracting))?;
    report.record(
        json!({"bench": "ingest", "trace": name, "variant": "bare-automerge-extracting-changes", "txns": trace.txns.len(),
               "wall_s": extracting, "ratio_vs_bare": extracting / bare, "build": build_profile()}),
        vec!["bare automerge + each change's bytes".into(), format!("{extracting:.2}"), format!("{:.2}", extracting / bare)],
    );
    if args.durability.contains(&DurabilityArg::Buffered) {
        let dir = tempdir_in(args.dir.as_deref())?;
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db =
            rocksdb::DB::open(&opts, dir.path()).context("cannot open the raw RocksDB store")?;
        let persisting = time(|| replay_bare(&trace, Bare::Persisting(&db)))?;
        // Its writes leave the OS's buffers before the engine's runs start,
        // so that their writeback does not land in the engine's time.
        db.flush_wal(true)?;
        report.record(
            json!({"bench": "ingest", "trace": name, "variant": "bare-automerge-raw-rocksdb-unsynced", "txns": trace.txns.len(),
                   "wall_s": persisting, "ratio_vs_bare": persisting / bare, "build": build_profile()}),
            vec!["bare automerge + each change written to raw RocksDB, no sync".into(), format!("{persisting:.2}"), format!("{:.2}", persisting / bare)],
        );
    }
    for arg in &args.durability {
        let (label, durability) = match arg {
            DurabilityArg::Buffered => ("engine-buffered", Durability::Buffered),
            DurabilityArg::Sync => ("engine-sync", Durability::Sync),
        };
        let dir = tempdir_in(args.dir.as_deref())?;
        let config = EngineConfig {
            durability,
            ..EngineConfig::default()
        };
        let engine = Engine::open(dir.path(), config).context("cannot open the benchmark store")?;
        let wall = time(|| replay_engine(&engine, &trace))?;
        let ratio = wall / bare;
        let syncs = engine.stats().wal_syncs;
        report.record(
            json!({"bench": "ingest", "trace": name, "variant": label, "durability": format!("{durability:?}"),
                   "txns": trace.txns.len(), "wall_s": wall, "ratio_vs_bare": ratio, "wal_syncs": syncs, "build": build_profile()}),
            vec![format!("engine, {durability:?}"), format!("{wall:.2}"), format!("{ratio:.2}")],
        );
    }
    report.print_table(&["variant", "wall s", "x bare"]);
    Ok(())
}

fn time(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

/// What a bare replay does with each change besides making it.
#[derive(Clone, Copy)]
enum Bare<'a> {
    /// Nothing: Automerge's own speed.
    InMemory,
    /// Fetches its bytes: the least any store that persists every change
    /// must do with Automerge's public API (a commit returns only the hash;
    /// the bytes are re-encoded on request).
    Extracting,
    /// Fetches its bytes and writes them, with a metadata record of the
    /// engine's size, in one WriteBatch without sync: what `Buffered`
    /// promises (in the OS's buffers before the write returns), with nothing
    /// else.
    Persisting(&'a rocksdb::DB),
}

/// Replays the trace into bare in-memory Automerge, doing `with` for each
/// change.
fn replay_bare(trace: &Trace, with: Bare<'_>) -> Result<()> {
    let mut doc = Automerge::new();
    let text = doc
        .transact(|tx| start_text(tx, &trace.start_content))
        .map_err(|f| anyhow::anyhow!("{}", f.error))?
        .result;
    let mut meta = DocMeta::empty();
    meta.set_heads(&doc.get_heads());
    meta.change_count = trace.txns.len() as u64;
    let meta = meta.encode();
    let mut bytes = 0usize;
    for (seq, txn) in trace.txns.iter().enumerate() {
        let done = doc
            .transact(|tx| apply_txn(tx, &text, txn))
            .map_err(|f| anyhow::anyhow!("{}", f.error))?;
        if matches!(with, Bare::InMemory) {
            continue;
        }
        let Some(change) = done.hash.and_then(|h| doc.get_change_by_hash(&h)) else {
            continue;
        };
        bytes += std::hint::black_box(change.raw_bytes().len());
        if let Bare::Persisting(db) = with {
            let mut key = b"bench/ingest\0".to_vec();
            key.extend_from_slice(&(seq as u64).to_be_bytes());
            let mut batch = rocksdb::WriteBatch::default();
            batch.put(&key, change.raw_bytes());
            batch.put(b"bench/ingest", &meta);
            db.write(batch)?;
        }
    }
    anyhow::ensure!(
        matches!(with, Bare::InMemory) || bytes > 0,
        "no change bytes extracted"
    );
    check_text(&doc.text(&text)?, trace, "bare automerge")
}

fn replay_engine(engine: &Engine, trace: &Trace) -> Result<()> {
    let id = DocId::new("bench/ingest")?;
    let text = engine
        .create(&id, |tx| start_text(tx, &trace.start_content))?
        .value;
    for txn in &trace.txns {
        engine.update(&id, |tx| apply_txn(tx, &text, txn))?;
    }
    let final_text = engine.read(&id, |doc| doc.text(&text))??;
    check_text(&final_text, trace, "engine")
}

/// Creates the trace's text object under `text`, holding `content`.
pub(crate) fn start_text(
    tx: &mut causeway_engine::automerge::transaction::Transaction<'_>,
    content: &str,
) -> Result<ObjId, causeway_engine::automerge::AutomergeError> {
    let text = tx.put_object(ROOT, "text", ObjType::Text)?;
    tx.splice_text(&text, 0, 0, content)?;
    Ok(text)
}

/// Applies one trace transaction to `text`.
pub(crate) fn apply_txn(
    tx: &mut causeway_engine::automerge::transaction::Transaction<'_>,
    text: &ObjId,
    txn: &super::trace::Txn,
) -> Result<(), causeway_engine::automerge::AutomergeError> {
    for patch in &txn.patches {
        tx.splice_text(text, patch.0, patch.1 as isize, &patch.2)?;
    }
    Ok(())
}

fn check_text(actual: &str, trace: &Trace, who: &str) -> Result<()> {
    if actual != trace.end_content {
        bail!(
            "{who}: final text differs from the trace's endContent ({} vs {} chars)",
            actual.chars().count(),
            trace.end_content.chars().count()
        );
    }
    Ok(())
}

/// A temporary directory in `parent`, or in the system temp dir.
pub fn tempdir_in(parent: Option<&Path>) -> Result<tempfile::TempDir> {
    let dir = match parent {
        Some(p) => tempfile::tempdir_in(p),
        None => tempfile::tempdir(),
    };
    dir.context("cannot create a temporary directory for the benchmark store")
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    let mut rows = Vec::new();
    let bare = results
        .iter()
        .find(|r| r["variant"] == "bare-automerge")
        .map_or(f64::NAN, |r| f(r, "wall_s"));
    let persisting = results
        .iter()
        .find(|r| r["variant"] == "bare-automerge-raw-rocksdb-unsynced")
        .map(|r| f(r, "wall_s"));
    for r in results.iter().filter(|r| r.get("durability").is_some()) {
        let durability = r["durability"].as_str().unwrap_or("?");
        let wall = f(r, "wall_s");
        let (reference, ratio) = match persisting {
            Some(floor) if durability == "Buffered" => (
                format!("bare Automerge in memory {bare:.2} s; with each change written to raw RocksDB, no sync, {floor:.2} s"),
                format!("{:.2}x ({:.2}x the floor with writes)", f(r, "ratio_vs_bare"), wall / floor),
            ),
            _ => (
                format!("bare Automerge in memory {bare:.2} s"),
                format!("{:.2}x", f(r, "ratio_vs_bare")),
            ),
        };
        rows.push(Row::new(
            format!(
                "ingest, `{durability}` ({} transactions, one change each)",
                thousands(f(r, "txns"))
            ),
            format!("{wall:.2} s"),
            reference,
            ratio,
        ));
    }
    rows
}
