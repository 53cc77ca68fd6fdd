//! The engines Causeway is compared with, installed and driven by the
//! benchmarks themselves: automerge-repo (JavaScript, from npm, at the exact
//! versions of `examples/peers/automerge-repo/package-lock.json`) and samod
//! (Rust, from crates.io, at the versions of `examples/peers/samod/Cargo.lock`,
//! a separate Cargo workspace so Causeway never depends on it).
//!
//! Both speak the same small command protocol (see `peer.mjs` and samod's
//! `main.rs`): `populate DIR DOCS IDS_FILE`, `serve DIR` (prints
//! `{"ready": true, "port": P}`), `join DIR ADDR IDS_FILE DUMP_FILE` (prints
//! `{"done": true, "found": N, "seconds": S}`, then writes the contents).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Which engine a peer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerKind {
    /// `@automerge/automerge-repo` on Node.js.
    AutomergeRepo,
    /// The `samod` crate.
    Samod,
}

impl PeerKind {
    /// Its name in results.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::AutomergeRepo => "automerge-repo",
            PeerKind::Samod => "samod",
        }
    }
}

/// An installed peer: how to run it and the versions it runs.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Which engine.
    pub kind: PeerKind,
    program: PathBuf,
    prefix: Vec<String>,
    /// Exact versions of what runs, for the results.
    pub versions: Value,
}

/// The directory holding the peers' sources (`examples/peers` of this
/// repository) unless `--peers-dir` says otherwise.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/peers")
}

/// Installs (npm install / cargo build --release) and describes one peer.
pub async fn install(kind: PeerKind, dir: &Path) -> Result<Peer> {
    match kind {
        PeerKind::AutomergeRepo => install_automerge_repo(&dir.join("automerge-repo")).await,
        PeerKind::Samod => install_samod(&dir.join("samod")).await,
    }
}

async fn run_quietly(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn install_automerge_repo(dir: &Path) -> Result<Peer> {
    if !dir.join("node_modules/@automerge/automerge-repo").exists() {
        // `npm install` rather than `npm ci`: the lock file leaves out
        // cbor-extract's optional per-platform packages, which `npm ci`
        // counts as out of sync. The direct dependencies are exact versions
        // and the lock file pins the rest; what ran is read back below.
        eprintln!("peers: npm install in {}", dir.display());
        run_quietly(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund"])
                .current_dir(dir),
            "npm install (needs Node.js and npm: make deps installs them)",
        )
        .await?;
    }
    let node = Command::new("node").arg("--version").output().await?;
    let mut versions = serde_json::Map::new();
    versions.insert(
        "node".into(),
        json!(String::from_utf8_lossy(&node.stdout).trim()),
    );
    for package in [
        "@automerge/automerge-repo",
        "@automerge/automerge-repo-network-websocket",
        "@automerge/automerge-repo-storage-nodefs",
        "@automerge/automerge",
        "ws",
    ] {
        let manifest = dir.join("node_modules").join(package).join("package.json");
        let text = std::fs::read_to_string(&manifest)
            .with_context(|| format!("reading {}", manifest.display()))?;
        let parsed: Value = serde_json::from_str(&text)?;
        versions.insert(package.into(), parsed["version"].clone());
    }
    Ok(Peer {
        kind: PeerKind::AutomergeRepo,
        program: "node".into(),
        prefix: vec![dir.join("peer.mjs").display().to_string()],
        versions: Value::Object(versions),
    })
}

async fn install_samod(dir: &Path) -> Result<Peer> {
    eprintln!("peers: cargo build --release in {}", dir.display());
    run_quietly(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--locked", "--manifest-path"])
            .arg(dir.join("Cargo.toml")),
        "cargo build of the samod peer",
    )
    .await?;
    let lock = std::fs::read_to_string(dir.join("Cargo.lock"))?;
    let mut versions = serde_json::Map::new();
    for package in ["samod", "samod-core", "automerge", "tokio"] {
        versions.insert(package.into(), json!(locked_version(&lock, package)?));
    }
    Ok(Peer {
        kind: PeerKind::Samod,
        program: dir.join("target/release/causeway-bench-samod-peer"),
        prefix: Vec::new(),
        versions: Value::Object(versions),
    })
}

/// The version of `package` in a Cargo.lock.
fn locked_version(lock: &str, package: &str) -> Result<String> {
    let needle = format!("name = \"{package}\"\nversion = \"");
    let start = lock
        .find(&needle)
        .with_context(|| format!("{package} is not in Cargo.lock"))?
        + needle.len();
    let len = lock[start..].find('"').context("malformed Cargo.lock")?;
    Ok(lock[start..start + len].to_string())
}

/// A running peer process and its stdout lines.
pub struct PeerProcess {
    /// The child (killed when dropped).
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Its stdin: a joining peer waits for a line on it after its result,
    /// so that its CPU time and peak memory can be read before it exits.
    stdin: Option<ChildStdin>,
}

impl PeerProcess {
    /// The next JSON line it prints, within `timeout`.
    pub async fn next_json(&mut self, timeout: Duration) -> Result<Value> {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .context("timed out waiting for the peer")??
            .context("the peer exited early; see its log")?;
        serde_json::from_str(&line).with_context(|| format!("peer printed {line:?}"))
    }

    /// The process id.
    pub fn pid(&self) -> Result<u32> {
        self.child.id().context("the peer has exited")
    }

    /// Lets a joining peer go on once it was measured (see
    /// [`PeerProcess::stdin`]).
    pub async fn release(&mut self) -> Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            stdin.write_all(b"measured\n").await?;
            stdin.shutdown().await?;
        }
        Ok(())
    }
}

impl Peer {
    /// Starts `MODE ARGS...`, its stderr to `log`.
    pub fn start(&self, mode: &str, args: &[String], log: &Path) -> Result<PeerProcess> {
        let mut child = Command::new(&self.program)
            .args(&self.prefix)
            .arg(mode)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the {} peer", self.kind.name()))?;
        let stdout = child.stdout.take().context("peer stdout")?;
        let stdin = child.stdin.take();
        Ok(PeerProcess {
            child,
            lines: BufReader::new(stdout).lines(),
            stdin,
        })
    }

    /// Runs `populate` to completion.
    pub async fn populate(&self, dir: &Path, docs: usize, ids: &Path) -> Result<()> {
        let mut p = self.start(
            "populate",
            &[path(dir), docs.to_string(), path(ids)],
            &dir.with_extension("populate.log"),
        )?;
        let done = p.next_json(Duration::from_secs(3600)).await?;
        if done["populated"].as_u64() != Some(docs as u64) {
            bail!("{} populate printed {done}", self.kind.name());
        }
        p.child.wait().await?;
        Ok(())
    }
}

/// A path as an argument.
pub fn path(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_locked_version() -> Result<()> {
        let lock = "[[package]]\nname = \"samod\"\nversion = \"0.16.0\"\nsource = \"x\"\n";
        assert_eq!(locked_version(lock, "samod")?, "0.16.0");
        assert!(locked_version(lock, "automerge").is_err());
        Ok(())
    }
}
