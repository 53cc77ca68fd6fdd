//! automerge-repo clients driven one JSON command per line: in Node.js
//! (`tests/interop/js/client.mjs`, the real npm libraries at the versions of
//! `tests/interop/js/package-lock.json`) and in Rust with samod
//! (`tests/interop/samod`, at the versions of its `Cargo.lock`). Each is
//! installed or built on first use.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

/// How long one command may take before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// The npm project of the interop clients.
pub fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/js")
}

/// The samod client's crate.
pub fn samod_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/samod")
}

/// Which library a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// `@automerge/automerge-repo` in Node.js.
    Js,
    /// samod in Rust.
    Samod,
}

/// Test processes run in parallel: one installs or builds while the others
/// wait on a lock file.
fn install_lock(name: &str) -> File {
    let lock =
        File::create(std::env::temp_dir().join(format!("causeway-interop-{name}.lock"))).unwrap();
    lock.lock().unwrap();
    lock
}

/// Builds the samod client (its own workspace and lock file; a debug build
/// in `target/interop-samod`).
pub fn build_samod() -> PathBuf {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop-samod");
    let lock = install_lock("samod");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--locked", "--quiet", "--manifest-path"])
        .arg(samod_dir().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("cargo");
    assert!(status.success(), "building the samod client");
    drop(lock);
    target.join("debug/causeway-interop-samod-client")
}

/// Installs the clients' npm packages unless they are there at the pinned
/// versions.
pub fn install() {
    let dir = js_dir();
    let lock = install_lock("npm");
    let installed = |package: &str, version: &str| {
        let manifest = dir.join("node_modules").join(package).join("package.json");
        std::fs::read_to_string(manifest)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .is_some_and(|v| v["version"] == version)
    };
    let ready = installed("@automerge/automerge", "3.5.0")
        && installed("@automerge/automerge-repo", "2.5.6")
        && installed("@automerge/automerge-repo-network-websocket", "2.5.6");
    if !ready {
        // `npm install` rather than `npm ci`: the lock file leaves out
        // cbor-extract's optional per-platform packages, which `npm ci`
        // would then refuse to add.
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm (install Node.js and npm: make deps)");
        assert!(status.success(), "npm install in {}", dir.display());
    }
    drop(lock);
}

/// One automerge-repo client process connected to a node.
pub struct RepoClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl RepoClient {
    /// A JavaScript client of the node whose HTTP address is `http`
    /// (`host:port`), with filesystem storage in `storage` if given.
    pub fn js(http: &str, storage: Option<&Path>) -> RepoClient {
        install();
        let mut command = Command::new("node");
        command.arg(js_dir().join("client.mjs")).arg(endpoint(http));
        if let Some(dir) = storage {
            command.arg(dir);
        }
        Self::spawn(command)
    }

    /// A samod client of the node whose HTTP address is `http`.
    pub fn samod(http: &str) -> RepoClient {
        let mut command = Command::new(build_samod());
        command.arg(endpoint(http));
        Self::spawn(command)
    }

    /// A client of `library`, without storage.
    pub fn of(library: Library, http: &str) -> RepoClient {
        match library {
            Library::Js => Self::js(http, None),
            Library::Samod => Self::samod(http),
        }
    }

    fn spawn(mut command: Command) -> RepoClient {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the client (Node.js: make deps)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        RepoClient {
            child,
            stdin,
            lines,
        }
    }

    /// Runs one command and returns its answer; panics on an error answer.
    pub fn call(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let line = self
            .lines
            .recv_timeout(COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("no answer to {command}: {e}"));
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert!(
            answer.get("error").is_none(),
            "{command} failed: {}",
            answer["error"]
        );
        answer
    }

    /// Creates a document; returns its id and heads.
    pub fn create(&mut self, value: Value) -> (String, Vec<String>) {
        let answer = self.call(json!({"cmd": "create", "value": value}));
        (answer["id"].as_str().unwrap().to_string(), heads(&answer))
    }

    /// Waits until the client's copy of `id` has `want` as heads; returns
    /// the value then, or panics after `timeout`.
    pub fn wait_heads(&mut self, id: &str, want: &[String], timeout: Duration) -> Value {
        let answer = self.call(json!({
            "cmd": "wait", "id": id, "heads": want, "timeout_ms": timeout.as_millis() as u64
        }));
        assert_eq!(
            answer["ok"], true,
            "client never reached heads {want:?} of {id}: has {}",
            answer["heads"]
        );
        answer["value"].clone()
    }

    /// Kills the process at once (no goodbye, nothing flushed).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The automerge-repo endpoint of the node at `http`.
pub fn endpoint(http: &str) -> String {
    format!("ws://{http}/automerge-repo")
}

impl Drop for RepoClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sorted `heads` of an answer.
pub fn heads(answer: &Value) -> Vec<String> {
    let mut heads: Vec<String> = answer["heads"]
        .as_array()
        .unwrap_or_else(|| panic!("no heads in {answer}"))
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    heads.sort();
    heads
}

/// A node's heads of `id` from its HTTP API (`Causeway-Heads`), sorted, or
/// `None` if it does not hold the document.
pub fn node_heads(node: &super::cluster::NodeProc, id: &str) -> Option<Vec<String>> {
    let (_, header) = node.get_doc(id)?;
    let mut heads: Vec<String> = header
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    heads.sort();
    Some(heads)
}
