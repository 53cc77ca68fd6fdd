//! `causeway bench join`: idle memory of real `causeway node` processes (an
//! empty one, and one holding N documents), and the time for a new, empty
//! node to receive N existing documents from a peer.
//!
//! The nodes are this binary run as `causeway node` on 127.0.0.1 with the
//! loopback timers; memory is VmRSS from /proc after the node idled 3 s.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use causeway_engine::{DocId, Engine, EngineConfig};
use serde_json::{json, Value};

use super::ingest::tempdir_in;
use super::{build_profile, Report};

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

/// A `causeway node` child process.
struct Proc {
    child: Child,
    http: String,
    listen: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, region: &str, bootstrap: &[String]) -> Result<Proc> {
    let config = crate::settings::write_lan_settings(dir, region, "bench")?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["node", "--config"]).arg(&config);
    cmd.args([
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    for b in bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let log = std::fs::File::create(dir.join("node.log"))?;
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let line = BufReader::new(stdout)
        .lines()
        .next()
        .context("the node exited before it was ready")??;
    let info: Value = serde_json::from_str(&line)?;
    let listen = info["listen"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    Ok(Proc {
        child,
        http: info["http"].as_str().unwrap_or_default().to_string(),
        listen,
    })
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc")?;
    Ok(kb / 1024.0)
}

/// Writes `n` small documents (two changes each) from 8 threads.
fn populate(store: &Path, n: usize) -> Result<()> {
    let engine = Engine::open(store, EngineConfig::default())?;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let engine = engine.clone();
                s.spawn(move || -> Result<()> {
                    for i in (t..n).step_by(8) {
                        let id = DocId::new(format!("join/{i:06}"))?;
                        engine
                            .put_json(&id, &json!({"n": i, "owner": format!("user-{}", i % 97)}))?;
                        engine.merge_json(&id, &json!({"state": "open"}))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(())
    })
}

async fn count(client: &reqwest::Client, http: &str) -> Result<usize> {
    let mut total = 0;
    let mut after: Option<String> = None;
    loop {
        let mut req = client
            .get(format!("{http}/v1/docs"))
            .query(&[("prefix", "join/"), ("limit", "1000")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let page: Value = req.send().await?.json().await?;
        total += page["ids"].as_array().map_or(0, Vec::len);
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok(total),
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    let dir = tempdir_in(args.dir.as_deref())?;
    let empty = spawn(&dir.path().join("empty"), "eu", &[])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_empty = rss_mib(empty.child.id())?;
    drop(empty);

    let a_dir = dir.path().join("a");
    let started = Instant::now();
    populate(&a_dir.join("store"), args.docs)?;
    eprintln!(
        "join: wrote {} documents in {:.1} s",
        args.docs,
        started.elapsed().as_secs_f64()
    );
    let a = spawn(&a_dir, "eu", &[])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_full = rss_mib(a.child.id())?;

    let client = reqwest::Client::new();
    let joined = Instant::now();
    let c = spawn(&dir.path().join("c"), "ap", &a.listen)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    while count(&client, &c.http).await? < args.docs {
        if joined.elapsed() > timeout {
            bail!(
                "the new node did not receive {} documents within {timeout:?}",
                args.docs
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = joined.elapsed();
    let rss_c = rss_mib(c.child.id())?;
    let mut report = Report::default();
    report.record(
        json!({"bench": "join", "docs": args.docs, "join_seconds": took.as_secs_f64(),
               "docs_per_s": args.docs as f64 / took.as_secs_f64(),
               "idle_rss_mib_empty": idle_empty, "idle_rss_mib_with_docs": idle_full,
               "rss_mib_new_node_after_join": rss_c, "build": build_profile()}),
        vec![
            args.docs.to_string(),
            format!("{:.1}", took.as_secs_f64()),
            format!("{:.0}", args.docs as f64 / took.as_secs_f64()),
            format!("{idle_empty:.1}"),
            format!("{idle_full:.1}"),
        ],
    );
    report.print_table(&[
        "docs",
        "join s",
        "docs/s",
        "idle RSS MiB (empty)",
        "idle RSS MiB (with docs)",
    ]);
    Ok(())
}
