//! `causeway bench lag`: how long a write on node A takes to become visible
//! (durable) on nodes B and C of a three-region loopback cluster at low
//! load, next to the floor measured in the same run: a loopback TCP round
//! trip plus one synced RocksDB write of the same size. The same run also
//! measures each part of the path alone: two synced writes at once (B and C
//! share the disk), Automerge's apply, a signature and its check, and the
//! nodes' libp2p stack carrying the deltas with nothing of Causeway behind
//! it ([`gossip_path`]).
//!
//! Writes are sequential: each waits until B and C hold it before the next,
//! so the figures are latency, not queueing. Lag is measured from the moment
//! A's write is acknowledged (durable on A) to the moment B's (or C's)
//! engine reports the change durable.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use causeway_engine::replication::ids::ClusterId;
use causeway_engine::{DocId, Subscription};
use serde_json::json;

use super::gossip_path;
use super::ingest::tempdir_in;
use super::summary::{self, f, thousands, Row};
use super::{build_profile, Report};
use causeway_node::local_cluster;
use serde_json::Value;

/// Arguments of `causeway bench lag`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Writes on node A.
    #[arg(long, default_value_t = 1000)]
    pub writes: usize,
    /// Pause between writes, milliseconds (low load).
    #[arg(long, default_value_t = 2)]
    pub pause_ms: u64,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    let dir = tempdir_in(args.dir.as_deref())?;
    let regions = ["eu-west", "us-east", "ap-south"];
    let nodes = local_cluster::start(dir.path(), &ClusterId::new("bench")?, &regions).await?;
    local_cluster::await_mesh(&nodes, Duration::from_secs(30)).await?;
    let doc = DocId::new("bench/lag")?;
    let engines: Vec<_> = nodes.iter().map(|n| n.engine.clone()).collect();
    let writes = args.writes;
    let pause = Duration::from_millis(args.pause_ms);
    let lags = tokio::task::spawn_blocking(move || -> Result<[Vec<Duration>; 2]> {
        let subs = [
            engines[1].subscribe("bench/")?,
            engines[2].subscribe("bench/")?,
        ];
        let mut lags = [Vec::with_capacity(writes), Vec::with_capacity(writes)];
        for i in 0..writes {
            let heads = engines[0]
                .merge_json(&doc, &json!({ format!("k{}", i % 100): i }))?
                .heads;
            let acked = Instant::now();
            for (sub, lag) in subs.iter().zip(&mut lags) {
                lag.push(await_heads(sub, &heads, acked)?);
            }
            std::thread::sleep(pause);
        }
        Ok(lags)
    })
    .await??;
    let changes = nodes[0]
        .engine
        .changes_since(&DocId::new("bench/lag")?, &[])?;
    let payload = changes.iter().map(Vec::len).sum::<usize>() / changes.len().max(1);
    let refs = References::measure(dir.path(), &changes, payload, writes, pause)?;
    local_cluster::shutdown(&nodes).await?;
    print(args, &lags, &refs, payload);
    Ok(())
}

/// Waits until `sub` reports `heads`; returns the time since `since`.
fn await_heads(
    sub: &Subscription,
    heads: &[automerge::ChangeHash],
    since: Instant,
) -> Result<Duration> {
    loop {
        match sub.recv_timeout(Duration::from_secs(10)) {
            Some(e) if e.heads == heads => return Ok(since.elapsed()),
            Some(_) => {}
            None => bail!("a write did not arrive within 10 s"),
        }
    }
}

/// What the path of one write must do at the least, each measured alone
/// in this run, with the writes' own pause between samples (after an idle
/// pause an fsync or a wake-up costs more than in a tight loop, so a
/// reference measured back to back would flatter the floor's side).
struct References {
    /// Loopback TCP round trips of one change's size, paced.
    rtt: Vec<Duration>,
    /// The same, back to back (the floor as measured before pacing).
    rtt_back_to_back: Vec<Duration>,
    /// Synced RocksDB writes of one change's size, paced.
    fsync: Vec<Duration>,
    /// The same, back to back.
    fsync_back_to_back: Vec<Duration>,
    /// Two synced writes at once, to two RocksDBs on this disk, paced (B
    /// and C share this machine's disk): each write's time.
    fsync_pair: Vec<Duration>,
    /// Bare Automerge applying the benchmark's changes one by one to an
    /// in-memory document, as each receiver must, paced.
    apply: Vec<Duration>,
    /// An ed25519 signature of a message of the change's size and its
    /// verification (gossipsub signs every message; the receiver checks
    /// it), paced.
    sign_verify: Vec<Duration>,
    /// The benchmark's deltas gossiped from A to B and C by the nodes'
    /// libp2p stack alone (see [`gossip_path`]), paced.
    gossip: Vec<Duration>,
}

impl References {
    /// Measures each reference `n` times (the changes' apply once each),
    /// for messages and writes of `size` bytes.
    fn measure(
        dir: &Path,
        changes: &[Vec<u8>],
        size: usize,
        n: usize,
        pause: Duration,
    ) -> Result<References> {
        Ok(References {
            rtt: loopback_rtts(n, size, pause)?,
            rtt_back_to_back: loopback_rtts(n, size, Duration::ZERO)?,
            fsync: synced_writes(&dir.join("raw-paced"), n, size, pause)?,
            fsync_back_to_back: synced_writes(&dir.join("raw"), n, size, Duration::ZERO)?,
            fsync_pair: synced_write_pairs(dir, n, size, pause)?,
            apply: automerge_applies(changes, pause)?,
            sign_verify: signatures(n, size, pause)?,
            gossip: gossip_path::gossip_times(changes, pause)?,
        })
    }

    /// The floor of the performance goal: a loopback round trip and one
    /// fsync.
    fn floor(&self) -> f64 {
        quantile(&self.rtt, 0.5) + quantile(&self.fsync, 0.5)
    }

    /// The same floor from back-to-back samples.
    fn floor_back_to_back(&self) -> f64 {
        quantile(&self.rtt_back_to_back, 0.5) + quantile(&self.fsync_back_to_back, 0.5)
    }

    /// Everything the path must do with this design on this machine: the
    /// round trip, the receivers' fsyncs at once, the Automerge apply, one
    /// signature and its check.
    fn path_floor(&self) -> f64 {
        quantile(&self.rtt, 0.5)
            + quantile(&self.fsync_pair, 0.5)
            + quantile(&self.apply, 0.5)
            + quantile(&self.sign_verify, 0.5)
    }

    /// The path without Causeway's own code: the nodes' libp2p stack
    /// carrying the delta (signature and its check included), the
    /// receivers' fsyncs at once and the Automerge apply.
    fn libp2p_path(&self) -> f64 {
        quantile(&self.gossip, 0.5) + quantile(&self.fsync_pair, 0.5) + quantile(&self.apply, 0.5)
    }
}

/// Times `n` runs of `f`, sleeping `pause` before each.
fn paced(
    n: usize,
    pause: Duration,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        std::thread::sleep(pause);
        let t = Instant::now();
        f(i)?;
        times.push(t.elapsed());
    }
    Ok(times)
}

/// Round trips of `size` bytes over a loopback TCP connection, `pause`
/// apart.
fn loopback_rtts(n: usize, size: usize, pause: Duration) -> Result<Vec<Duration>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut buf = vec![7u8; size];
    let rtts = paced(n, pause, |_| {
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        Ok(())
    })?;
    drop(s);
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(rtts)
}

fn raw_db(path: &Path) -> Result<rocksdb::DB> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    rocksdb::DB::open(&opts, path).context("cannot open the raw RocksDB")
}

fn synced() -> rocksdb::WriteOptions {
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// Synced single writes of `size` bytes to a raw RocksDB, `pause` apart.
fn synced_writes(path: &Path, n: usize, size: usize, pause: Duration) -> Result<Vec<Duration>> {
    let db = raw_db(path)?;
    let (wo, value) = (synced(), vec![1u8; size]);
    paced(n, pause, |i| {
        Ok(db.put_opt(format!("k{i}"), &value, &wo)?)
    })
}

/// Pairs of synced writes made at once, each to its own raw RocksDB in
/// `dir`, started together every `pause`; the time of each write.
fn synced_write_pairs(dir: &Path, n: usize, size: usize, pause: Duration) -> Result<Vec<Duration>> {
    // Opened first, and a failed write still meets the barrier every
    // round: otherwise the other thread would wait there for ever.
    let dbs = [raw_db(&dir.join("raw-b"))?, raw_db(&dir.join("raw-c"))?];
    let barrier = std::sync::Barrier::new(dbs.len());
    let mut all = Vec::with_capacity(2 * n);
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = dbs
            .iter()
            .map(|db| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<Vec<Duration>> {
                    let (wo, value) = (synced(), vec![1u8; size]);
                    let mut times = Vec::with_capacity(n);
                    let mut failed = None;
                    for i in 0..n {
                        std::thread::sleep(pause);
                        barrier.wait();
                        if failed.is_some() {
                            continue;
                        }
                        let t = Instant::now();
                        match db.put_opt(format!("k{i}"), &value, &wo) {
                            Ok(()) => times.push(t.elapsed()),
                            Err(e) => failed = Some(e),
                        }
                    }
                    match failed {
                        Some(e) => Err(e.into()),
                        None => Ok(times),
                    }
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(times) => all.extend(times?),
                Err(_) => bail!("a synced-write thread panicked"),
            }
        }
        Ok(())
    })?;
    Ok(all)
}

/// Each of `changes` applied to a bare in-memory Automerge document that
/// holds the ones before it, `pause` apart.
fn automerge_applies(changes: &[Vec<u8>], pause: Duration) -> Result<Vec<Duration>> {
    let decoded = changes
        .iter()
        .map(|c| automerge::Change::from_bytes(c.clone()))
        .collect::<Result<Vec<_>, _>>()
        .context("the benchmark's own changes do not decode")?;
    let n = decoded.len();
    let mut doc = automerge::Automerge::new();
    let mut pending = decoded.into_iter();
    paced(n, pause, |_| {
        let change = pending.next().context("fewer changes than counted")?;
        Ok(doc.apply_changes([change])?)
    })
}

/// One ed25519 signature of `size` bytes and its verification, `pause`
/// apart.
fn signatures(n: usize, size: usize, pause: Duration) -> Result<Vec<Duration>> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let public = key.public();
    let message = vec![3u8; size];
    paced(n, pause, |_| {
        let signature = key.sign(&message)?;
        if !public.verify(&message, &signature) {
            bail!("a fresh signature did not verify");
        }
        Ok(())
    })
}

fn quantile(samples: &[Duration], q: f64) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
    ms.get(i).copied().unwrap_or(0.0)
}

fn print(args: &Args, lags: &[Vec<Duration>; 2], refs: &References, payload: usize) {
    let both: Vec<Duration> = lags.iter().flatten().copied().collect();
    let (p50, p99) = (quantile(&both, 0.5), quantile(&both, 0.99));
    let p50_of = |samples: &[Duration]| quantile(samples, 0.5);
    let (floor, path_floor) = (refs.floor(), refs.path_floor());
    let libp2p_path = refs.libp2p_path();
    let floor_back_to_back = refs.floor_back_to_back();
    let mut report = Report::default();
    report.record(
        json!({"bench": "lag", "writes": args.writes, "pause_ms": args.pause_ms, "replicas": 2,
               "change_bytes": payload,
               "b_p50_ms": quantile(&lags[0], 0.5), "b_p99_ms": quantile(&lags[0], 0.99),
               "c_p50_ms": quantile(&lags[1], 0.5), "c_p99_ms": quantile(&lags[1], 0.99),
               "p50_ms": p50, "p99_ms": p99, "max_ms": quantile(&both, 1.0),
               "loopback_rtt_p50_ms": p50_of(&refs.rtt),
               "loopback_rtt_p99_ms": quantile(&refs.rtt, 0.99),
               "fsync_p50_ms": p50_of(&refs.fsync),
               "floor_p50_ms": floor, "ratio_p50": p50 / floor,
               "loopback_rtt_back_to_back_p50_ms": p50_of(&refs.rtt_back_to_back),
               "fsync_back_to_back_p50_ms": p50_of(&refs.fsync_back_to_back),
               "floor_back_to_back_p50_ms": floor_back_to_back,
               "ratio_back_to_back_p50": p50 / floor_back_to_back,
               "fsync_pair_p50_ms": p50_of(&refs.fsync_pair),
               "automerge_apply_p50_ms": p50_of(&refs.apply),
               "sign_verify_p50_ms": p50_of(&refs.sign_verify),
               "path_floor_p50_ms": path_floor, "ratio_path_p50": p50 / path_floor,
               "gossip_p50_ms": p50_of(&refs.gossip), "gossip_p99_ms": quantile(&refs.gossip, 0.99),
               "libp2p_path_p50_ms": libp2p_path, "ratio_libp2p_path_p50": p50 / libp2p_path,
               "beyond_libp2p_path_p50_ms": p50 - libp2p_path,
               "build": build_profile()}),
        vec![
            format!("{}", args.writes),
            format!("{p50:.2}"),
            format!("{p99:.2}"),
            format!("{:.3}", p50_of(&refs.rtt)),
            format!("{:.3}", p50_of(&refs.fsync)),
            format!("{floor:.3}"),
            format!("{:.1}", p50 / floor),
            format!("{:.3}", p50_of(&refs.fsync_pair)),
            format!("{:.3}", p50_of(&refs.apply)),
            format!("{:.3}", p50_of(&refs.sign_verify)),
            format!("{path_floor:.3}"),
            format!("{:.1}", p50 / path_floor),
            format!("{:.3}", p50_of(&refs.gossip)),
            format!("{libp2p_path:.3}"),
            format!("{:.2}", p50 / libp2p_path),
        ],
    );
    report.print_table(&[
        "writes",
        "lag p50 ms",
        "lag p99 ms",
        "loopback RTT ms",
        "fsync ms",
        "floor ms",
        "p50/floor",
        "2 fsyncs at once ms",
        "Automerge apply ms",
        "sign + verify ms",
        "path floor ms",
        "p50/path floor",
        "libp2p gossip ms",
        "libp2p path ms",
        "p50/libp2p path",
    ]);
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    summary::each(results, |r| {
        Row::new(
            format!(
                "lag: write on A to durable on B and C ({} writes)",
                thousands(f(r, "writes"))
            ),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                f(r, "p50_ms"),
                f(r, "p99_ms"),
                f(r, "max_ms")
            ),
            format!(
                "loopback RTT + one fsync {:.2} ms (back to back {:.2} ms); with 2 fsyncs at once, Automerge's apply and a signature checked {:.2} ms; the nodes' libp2p stack alone carrying the delta, 2 fsyncs at once and Automerge's apply {:.2} ms",
                f(r, "floor_p50_ms"),
                f(r, "floor_back_to_back_p50_ms"),
                f(r, "path_floor_p50_ms"),
                f(r, "libp2p_path_p50_ms")
            ),
            format!(
                "{:.1}x (p50; {:.1}x back to back; {:.1}x the path's parts; {:.2}x the libp2p path)",
                f(r, "ratio_p50"),
                f(r, "ratio_back_to_back_p50"),
                f(r, "ratio_path_p50"),
                f(r, "ratio_libp2p_path_p50")
            ),
        )
    })
}
