//! Real `causeway node` processes for the benchmarks that measure whole
//! nodes: this binary run as `causeway node` on 127.0.0.1 with the loopback
//! timers, each with its own data directory, plus what the benchmarks read
//! from them (/proc figures, document listings).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use causeway_engine::{DocId, Durability, Engine, EngineConfig};
use serde_json::{json, Value};

/// A `causeway node` child process, killed when dropped.
pub struct NodeProcess {
    /// The child.
    pub child: Child,
    /// Its HTTP API base URL.
    pub http: String,
    /// Its libp2p listen addresses.
    pub listen: Vec<String>,
    /// Its libp2p peer id.
    pub peer_id: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    /// Starts a node with its data in `dir` (settings written there), TCP on
    /// an ephemeral port, dialing `bootstrap`; returns once it printed its
    /// ready line. Its log goes to `dir/node.log`.
    pub fn spawn(dir: &Path, region: &str, bootstrap: &[String]) -> Result<Self> {
        Self::spawn_with(dir, region, bootstrap, "")
    }

    /// [`NodeProcess::spawn`] with `tables` (TOML tables such as
    /// `[engine]`) appended to the settings file.
    pub fn spawn_with(
        dir: &Path,
        region: &str,
        bootstrap: &[String],
        tables: &str,
    ) -> Result<Self> {
        let config = causeway_node::settings::write_lan_settings(dir, region, "bench", None)?;
        if !tables.is_empty() {
            let mut text = std::fs::read_to_string(&config)?;
            text.push('\n');
            text.push_str(tables);
            std::fs::write(&config, text)?;
        }
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
        // `warn` unless CAUSEWAY_BENCH_NODE_LOG names a level (to look into
        // a run: `info` logs each step of a node's start).
        let level = std::env::var("CAUSEWAY_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into());
        let mut child = cmd
            .env("RUST_LOG", level)
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
        Ok(Self {
            child,
            http: info["http"].as_str().unwrap_or_default().to_string(),
            listen,
            peer_id: info["peer_id"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// The TCP port of its first `/tcp/` listen address.
    pub fn tcp_port(&self) -> Result<u16> {
        self.listen
            .iter()
            .find_map(|a| {
                let mut parts = a.split('/');
                parts.find(|p| *p == "tcp")?;
                parts.next()?.parse().ok()
            })
            .context("the node listens on no TCP address")
    }

    /// Resident memory now, MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        proc_status_mib(self.child.id(), "VmRSS:")
    }
}

/// A `kB` field of /proc/PID/status (`VmRSS:`, `VmHWM:`), in MiB.
pub fn proc_status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// User plus system CPU time a process has used, seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after ')'.
    let ticks: f64 = fields
        .get(11..13)
        .context("short /proc stat")?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    Ok(ticks / USER_HZ)
}

/// Clock ticks per second in /proc: 100 on every Linux architecture.
const USER_HZ: f64 = 100.0;

/// The small document number `i` of the many-documents benchmarks, as it
/// reads once both of its changes are applied. Every peer writes the same.
pub fn small_document(i: usize) -> Value {
    json!({"n": i, "owner": format!("user-{}", i % 97), "state": "open"})
}

/// Writes documents `prefix/0000000` .. into the store at `store` from 8
/// threads: `small_document(i)` as two changes (a put, then a merge).
pub fn populate(store: &Path, prefix: &str, n: usize, durability: Durability) -> Result<()> {
    let config = EngineConfig {
        durability,
        ..EngineConfig::default()
    };
    let engine = Engine::open(store, config)?;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let engine = engine.clone();
                s.spawn(move || -> Result<()> {
                    for i in (t..n).step_by(8) {
                        let id = DocId::new(format!("{prefix}/{i:07}"))?;
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

/// How many documents under `prefix/` the node at `http` lists.
pub async fn count_docs(client: &reqwest::Client, http: &str, prefix: &str) -> Result<usize> {
    Ok(list_docs(client, http, prefix).await?.len())
}

/// The ids of every document under `prefix/` the node at `http` lists.
pub async fn list_docs(client: &reqwest::Client, http: &str, prefix: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    // `prefix/`, or every document for "".
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    loop {
        let mut req = client
            .get(format!("{http}/v1/docs"))
            .query(&[("prefix", prefix.as_str()), ("limit", "1000")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let page: Value = req.send().await?.error_for_status()?.json().await?;
        ids.extend(
            page["ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from)),
        );
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok(ids),
        }
    }
}

/// The series of the /metrics of the node at `http` whose names start with
/// one of `prefixes`, by series (name and labels as written).
pub async fn metric_series(
    client: &reqwest::Client,
    http: &str,
    prefixes: &[&str],
) -> Result<std::collections::BTreeMap<String, f64>> {
    let text = client
        .get(format!("{http}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse::<f64>().ok()?))
        })
        .collect())
}

/// The sum of libp2p's transport byte counters in the /metrics of the node
/// at `http`: both directions, or only `"Outbound"` / `"Inbound"`. They
/// count what the node's connections carry above Noise and yamux.
pub async fn libp2p_bytes(
    client: &reqwest::Client,
    http: &str,
    direction: Option<&str>,
) -> Result<u64> {
    let series = metric_series(client, http, &["libp2p_bandwidth_bytes_total{"]).await?;
    let wanted = direction.map(|d| format!("direction=\"{d}\""));
    let total: f64 = series
        .iter()
        .filter(|(name, _)| wanted.as_ref().is_none_or(|w| name.contains(w.as_str())))
        .map(|(_, value)| value)
        .sum();
    Ok(total as u64)
}
