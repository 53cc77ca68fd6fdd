//! A real `causeway node` process in a region's network namespace, with the
//! signals the harness sends it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use super::topology::{namespace, node_addr};

/// Port of the libp2p listener of a region's first node; its `k`-th node
/// listens on the next `k` (the nodes of a region share its address).
pub const P2P_PORT: u16 = 7700;
/// Port of the HTTP API of a region's first node, the same way.
pub const HTTP_PORT: u16 = 7780;

/// How long a node may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One node of a region.
#[derive(Debug)]
pub struct NodeProcess {
    /// Region index.
    pub index: usize,
    /// Which of the region's nodes (0 for the first).
    pub slot: usize,
    /// Its name in reports (see [`super::schedule::node_name`]).
    pub name: String,
    /// Data directory (store, identity, settings, log).
    pub dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// Kept open so the node's stdout never breaks.
    _stdout: Option<Lines<BufReader<ChildStdout>>>,
}

impl NodeProcess {
    /// Writes the settings of node `slot` of region `index` (the region
    /// named `region`; the node named `name`, of `cluster`, holding the
    /// cluster key in `root/cluster.key`, which is created on first use,
    /// with `network` as extra lines of its `[network]` table) under
    /// `root/name`; returns the process, not yet started.
    pub fn prepare(
        root: &Path,
        (index, slot): (usize, usize),
        (region, name): (&str, &str),
        cluster: &str,
        bootstrap: &[String],
        network: &str,
    ) -> Result<NodeProcess> {
        // LAN timers, so that healing is bounded by seconds (the WAN
        // defaults redial after up to 60 s and run anti-entropy every 30 s).
        let dir = root.join(name);
        causeway_node::local_cluster::cluster_key(root)?;
        let key = root.join("cluster.key");
        let config =
            causeway_node::settings::write_lan_settings(&dir, region, cluster, Some(&key))?;
        // The `[network]` table is the file's last. The HTTP API listens on
        // the namespace's address, which only the harness reaches: plain
        // HTTP, named as such.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&config)?
            .write_all(format!("{network}\n[http]\ninsecure_plaintext = true\n").as_bytes())?;
        let addr = node_addr(index);
        let (p2p, http) = ports(slot);
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            namespace(index),
            std::env::current_exe()?.display().to_string(),
            "node".into(),
            "--config".into(),
            config.display().to_string(),
            "--listen".into(),
            format!("/ip4/{addr}/tcp/{p2p}"),
            "--http-listen".into(),
            format!("{addr}:{http}"),
        ];
        for b in bootstrap {
            args.push("--bootstrap".into());
            args.push(b.clone());
        }
        Ok(NodeProcess {
            index,
            slot,
            name: name.to_string(),
            dir,
            args,
            child: None,
            _stdout: None,
        })
    }

    /// The node's HTTP API base URL.
    pub fn url(&self) -> String {
        format!("http://{}:{}", node_addr(self.index), ports(self.slot).1)
    }

    /// Starts the process (`ip netns exec` replaces itself with the node, so
    /// the child's pid is the node's) and waits for its ready line.
    pub async fn start(&mut self) -> Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))?;
        let mut child = Command::new("ip")
            .args(&self.args)
            .env("RUST_LOG", "info,libp2p=warn,yamux=error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a node with `ip netns exec`")?;
        let mut lines = BufReader::new(child.stdout.take().context("node stdout")?).lines();
        match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) if line.starts_with('{') => {}
            _ => bail!(
                "node {} in {} did not start; see {}",
                self.name,
                namespace(self.index),
                self.dir.join("node.log").display()
            ),
        }
        self.child = Some(child);
        self._stdout = Some(lines);
        Ok(())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        self._stdout = None;
        Ok(())
    }

    /// Sends `signal` (such as "STOP" or "CONT") to the running process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("the node is not running")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// Lines of the node's log (all its runs) that contain `text`.
    pub fn log_lines_containing(&self, text: &str) -> usize {
        std::fs::read_to_string(self.dir.join("node.log"))
            .map_or(0, |log| log.lines().filter(|l| l.contains(text)).count())
    }

    /// The node's resident set size now, KiB (`None` if not running).
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref().and_then(Child::id)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Whether the process is running (started and not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// The libp2p and HTTP ports of a region's node `slot`.
pub fn ports(slot: usize) -> (u16, u16) {
    (P2P_PORT + slot as u16, HTTP_PORT + slot as u16)
}
