//! `causeway bench durable-writes`: small independent writes to many documents
//! from N concurrent writers with the default `Sync` durability, against a raw
//! RocksDB loop doing synced WriteBatches of the same sizes with the same N, in
//! the same run and on the same disk. A second reference does what any store
//! of Automerge documents must do per write: the same raw loop, each write
//! first making its Automerge change on a bare in-memory document and
//! fetching the change's bytes. Reports writes/s of each and the ratios.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{Automerge, ReadDoc, ROOT};
use causeway_engine::layout::DocMeta;
use causeway_engine::{DocId, Engine, EngineConfig};
use serde_json::json;
use std::sync::Mutex;

use super::ingest::tempdir_in;
use super::summary::{self, f, thousands, Row};
use super::{build_profile, Report};
use serde_json::Value;

/// Arguments of `causeway bench durable-writes`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Numbers of concurrent writers to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub writers: Vec<usize>,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Documents each writer spreads its writes over.
    #[arg(long, default_value_t = 64)]
    pub docs_per_writer: usize,
    /// Directory in which to create the stores (default: the system
    /// temporary directory). Both sides use it, so they share a disk.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Entries the engine's audit feed keeps (0: no feed), to measure what
    /// the feed costs a write. Default: the engine's default.
    #[arg(long)]
    pub audit_max_entries: Option<u64>,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    let run_for = Duration::from_secs_f64(args.seconds);
    eprintln!(
        "durable-writes: {}s per measurement, {} build",
        args.seconds,
        build_profile()
    );
    let mut report = Report::default();
    for &n in &args.writers {
        let engine = engine_run(args, n, run_for)?;
        let raw = raw_run(args, n, run_for, engine.change_bytes, engine.meta_bytes)?;
        let with_changes = raw_automerge_run(args, n, run_for, engine.meta_bytes)?;
        let ratio = engine.per_sec() / raw.per_sec();
        let ratio_changes = engine.per_sec() / with_changes.per_sec();
        report.record(
            json!({"bench": "durable-writes", "writers": n, "engine_writes_per_s": engine.per_sec(),
                   "raw_rocksdb_writes_per_s": raw.per_sec(), "ratio": ratio,
                   "raw_automerge_writes_per_s": with_changes.per_sec(), "ratio_vs_raw_automerge": ratio_changes,
                   "engine_wal_syncs": engine.syncs,
                   "change_bytes": engine.change_bytes, "meta_bytes": engine.meta_bytes,
                   "seconds": args.seconds, "build": build_profile(),
                   "audit_max_entries": args.audit_max_entries.unwrap_or(EngineConfig::default().audit_max_entries)}),
            vec![
                n.to_string(),
                format!("{:.0}", engine.per_sec()),
                format!("{:.0}", raw.per_sec()),
                format!("{ratio:.2}"),
                format!("{:.0}", with_changes.per_sec()),
                format!("{ratio_changes:.2}"),
                format!("{:.1}", engine.writes as f64 / engine.syncs.max(1) as f64),
            ],
        );
    }
    report.print_table(&[
        "writers",
        "engine writes/s",
        "raw RocksDB synced writes/s",
        "ratio",
        "raw + an Automerge change per write, writes/s",
        "ratio",
        "writes per fsync",
    ]);
    Ok(())
}

struct Measured {
    writes: u64,
    elapsed: Duration,
    syncs: u64,
    change_bytes: usize,
    meta_bytes: usize,
}

impl Measured {
    fn per_sec(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }
}

fn doc_id(writer: usize, i: usize) -> DocId {
    // Writer and document numbers only produce valid ids.
    #[allow(clippy::expect_used)]
    DocId::new(format!("bench/w{writer}/d{i}")).expect("valid id")
}

fn engine_run(args: &Args, n: usize, run_for: Duration) -> Result<Measured> {
    let dir = tempdir_in(args.dir.as_deref())?;
    let defaults = EngineConfig::default();
    let config = EngineConfig {
        audit_max_entries: args.audit_max_entries.unwrap_or(defaults.audit_max_entries),
        ..defaults
    };
    let engine = Engine::open(dir.path(), config).context("cannot open the benchmark store")?;
    for w in 0..n {
        for d in 0..args.docs_per_writer {
            engine.put_json(&doc_id(w, d), &json!({"n": 0}))?;
        }
    }
    let syncs_before = engine.stats().wal_syncs;
    let docs = args.docs_per_writer;
    let (writes, elapsed) = in_parallel(n, run_for, |w, i| {
        engine
            .put_json(&doc_id(w, i % docs), &json!({ "n": i + 1 }))
            .map(|_| ())
            .map_err(anyhow::Error::from)
    })?;
    let sample = doc_id(0, 0);
    let heads = engine.heads(&sample)?;
    let change_bytes = engine
        .changes_since(&sample, &[])?
        .last()
        .map_or(0, Vec::len);
    let mut meta = DocMeta::empty();
    meta.set_heads(&heads);
    meta.change_count = 1000;
    Ok(Measured {
        writes,
        elapsed,
        syncs: engine.stats().wal_syncs - syncs_before,
        change_bytes,
        meta_bytes: meta.encode().len(),
    })
}

fn raw_run(
    args: &Args,
    n: usize,
    run_for: Duration,
    change_bytes: usize,
    meta_bytes: usize,
) -> Result<Measured> {
    let raw = RawStore::open(args, meta_bytes)?;
    let change = vec![0x5a_u8; change_bytes];
    let docs = args.docs_per_writer;
    let (writes, elapsed) = in_parallel(n, run_for, |w, i| {
        raw.write(&doc_id(w, i % docs), i, &change)
    })?;
    Ok(Measured {
        writes,
        elapsed,
        syncs: 0,
        change_bytes,
        meta_bytes,
    })
}

/// The raw loop with the Automerge work every write needs: each writer owns
/// bare in-memory documents holding `{"n": 0}`; a write sets `n` in one of
/// them in one transaction, fetches the change's bytes (a commit returns only
/// its hash), and writes them with a metadata record of the engine's size in
/// one synced WriteBatch. Nothing else: no JSON diff, no cache, no events.
fn raw_automerge_run(
    args: &Args,
    n: usize,
    run_for: Duration,
    meta_bytes: usize,
) -> Result<Measured> {
    let raw = RawStore::open(args, meta_bytes)?;
    let docs = args.docs_per_writer;
    let writers = (0..n)
        .map(|_| -> Result<Mutex<Vec<Automerge>>> {
            let docs = (0..docs)
                .map(|_| {
                    let mut doc = Automerge::new();
                    doc.transact(|tx| tx.put(ROOT, "n", 0_i64))
                        .map_err(|f| anyhow::anyhow!("{}", f.error))?;
                    Ok(doc)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Mutex::new(docs))
        })
        .collect::<Result<Vec<_>>>()?;
    let (writes, elapsed) = in_parallel(n, run_for, |w, i| {
        let mut mine = writers[w]
            .lock()
            .map_err(|_| anyhow::anyhow!("writer's documents poisoned"))?;
        let doc = &mut mine[i % docs];
        let done = doc
            .transact(|tx| tx.put(ROOT, "n", i as i64 + 1))
            .map_err(|f| anyhow::anyhow!("{}", f.error))?;
        let change = done
            .hash
            .and_then(|h| doc.get_change_by_hash(&h))
            .context("the write made no change")?;
        raw.write(&doc_id(w, i % docs), i, change.raw_bytes())
    })?;
    // The size of a change, read once the timing is over.
    let change_bytes = writers[0]
        .lock()
        .map_err(|_| anyhow::anyhow!("writer's documents poisoned"))?[0]
        .get_last_local_change()
        .map_or(0, |c| c.raw_bytes().len());
    Ok(Measured {
        writes,
        elapsed,
        syncs: 0,
        change_bytes,
        meta_bytes,
    })
}

/// A raw RocksDB database (default options) taking synced WriteBatches
/// shaped like the engine's: a log entry and a metadata record.
struct RawStore {
    db: rocksdb::DB,
    sync: rocksdb::WriteOptions,
    meta: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl RawStore {
    fn open(args: &Args, meta_bytes: usize) -> Result<RawStore> {
        let dir = tempdir_in(args.dir.as_deref())?;
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db =
            rocksdb::DB::open(&opts, dir.path()).context("cannot open the raw RocksDB store")?;
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        Ok(RawStore {
            db,
            sync,
            meta: vec![0xa5_u8; meta_bytes],
            _dir: dir,
        })
    }

    /// Writes `change` as the `seq`th log entry of `id`, with its metadata
    /// record, in one synced WriteBatch.
    fn write(&self, id: &DocId, seq: usize, change: &[u8]) -> Result<()> {
        let mut log_key = id.as_bytes().to_vec();
        log_key.push(0);
        log_key.extend_from_slice(&(seq as u64).to_be_bytes());
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(&log_key, change);
        batch.put(id.as_bytes(), &self.meta);
        self.db
            .write_opt(batch, &self.sync)
            .map_err(anyhow::Error::from)
    }
}

/// Runs `write(writer, i)` in `n` threads until `run_for` has passed; returns
/// the number of writes and the elapsed time.
fn in_parallel<F>(n: usize, run_for: Duration, write: F) -> Result<(u64, Duration)>
where
    F: Fn(usize, usize) -> Result<()> + Sync,
{
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + run_for;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..n)
            .map(|w| {
                let (count, write) = (Arc::clone(&count), &write);
                s.spawn(move || -> Result<()> {
                    let mut i = 0;
                    while Instant::now() < deadline {
                        write(w, i)?;
                        count.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
        }
        Ok(())
    })?;
    Ok((count.load(Ordering::Relaxed), start.elapsed()))
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    summary::each(results, |r| {
        Row::new(
            format!("durable writes, {} writers", r["writers"]),
            format!("{} writes/s", thousands(f(r, "engine_writes_per_s"))),
            format!(
                "raw RocksDB synced writes {}/s; with an Automerge change made per write {}/s",
                thousands(f(r, "raw_rocksdb_writes_per_s")),
                thousands(f(r, "raw_automerge_writes_per_s"))
            ),
            format!(
                "{:.2}x ({:.2}x with the changes)",
                f(r, "ratio"),
                f(r, "ratio_vs_raw_automerge")
            ),
        )
    })
}
