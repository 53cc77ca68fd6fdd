//! `causeway bench lag`: how long a write on node A takes to become visible
//! (durable) on nodes B and C of a three-region loopback cluster at low
//! load, next to the floor measured in the same run: a loopback TCP round
//! trip plus one synced RocksDB write of the same size.
//!
//! Writes are sequential: each waits until B and C hold it before the next,
//! so the figures are latency, not queueing. Lag is measured from the moment
//! A's write is acknowledged (durable on A) to the moment B's (or C's)
//! engine reports the change durable.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use causeway_engine::replication::ids::ClusterId;
use causeway_engine::{DocId, Subscription};
use serde_json::json;

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
    let payload = engines_change_size(&nodes[0].engine, &DocId::new("bench/lag")?)?;
    let rtt = loopback_rtts(writes, payload)?;
    let fsync = synced_writes(dir.path().join("raw"), 200, payload)?;
    local_cluster::shutdown(&nodes).await?;
    print(args, &lags, &rtt, &fsync, payload);
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

/// Mean bytes of the changes of `doc` (the size of one write on the wire).
fn engines_change_size(engine: &causeway_engine::Engine, doc: &DocId) -> Result<usize> {
    let all = engine.changes_since(doc, &[])?;
    Ok(all.iter().map(Vec::len).sum::<usize>() / all.len().max(1))
}

/// Round trips of `size` bytes over a loopback TCP connection.
fn loopback_rtts(n: usize, size: usize) -> Result<Vec<Duration>> {
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
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        rtts.push(t.elapsed());
    }
    drop(s);
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(rtts)
}

/// Synced single writes of `size` bytes to a raw RocksDB.
fn synced_writes(path: PathBuf, n: usize, size: usize) -> Result<Vec<Duration>> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, &path).context("cannot open the raw RocksDB")?;
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    let value = vec![1u8; size];
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        db.put_opt(format!("k{i}"), &value, &wo)?;
        times.push(t.elapsed());
    }
    Ok(times)
}

fn quantile(samples: &[Duration], q: f64) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
    ms.get(i).copied().unwrap_or(0.0)
}

fn print(
    args: &Args,
    lags: &[Vec<Duration>; 2],
    rtt: &[Duration],
    fsync: &[Duration],
    payload: usize,
) {
    let both: Vec<Duration> = lags.iter().flatten().copied().collect();
    let (p50, p99) = (quantile(&both, 0.5), quantile(&both, 0.99));
    let floor = quantile(rtt, 0.5) + quantile(fsync, 0.5);
    let mut report = Report::default();
    report.record(
        json!({"bench": "lag", "writes": args.writes, "replicas": 2, "change_bytes": payload,
               "b_p50_ms": quantile(&lags[0], 0.5), "b_p99_ms": quantile(&lags[0], 0.99),
               "c_p50_ms": quantile(&lags[1], 0.5), "c_p99_ms": quantile(&lags[1], 0.99),
               "p50_ms": p50, "p99_ms": p99, "max_ms": quantile(&both, 1.0),
               "loopback_rtt_p50_ms": quantile(rtt, 0.5), "loopback_rtt_p99_ms": quantile(rtt, 0.99),
               "fsync_p50_ms": quantile(fsync, 0.5), "floor_p50_ms": floor, "ratio_p50": p50 / floor,
               "build": build_profile()}),
        vec![
            format!("{}", args.writes),
            format!("{p50:.2}"),
            format!("{p99:.2}"),
            format!("{:.3}", quantile(rtt, 0.5)),
            format!("{:.2}", quantile(fsync, 0.5)),
            format!("{floor:.2}"),
            format!("{:.1}", p50 / floor),
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
            format!("loopback RTT + one fsync {:.2} ms", f(r, "floor_p50_ms")),
            format!("{:.1}x (p50)", f(r, "ratio_p50")),
        )
    })
}
