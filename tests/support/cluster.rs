//! Real `causeway node` processes on 127.0.0.1 for integration tests, and a
//! minimal HTTP/1.1 client to talk to them (no client library, so the tests
//! see exactly what is on the wire).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The `causeway` binary of this workspace's target directory.
pub fn causeway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join("causeway");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p causeway-cli`",
        bin.display()
    );
    bin
}

/// A running node process.
pub struct NodeProc {
    pub name: String,
    pub dir: PathBuf,
    pub child: Child,
    pub peer_id: String,
    pub http: String,
    pub listen: Vec<String>,
    args: Vec<String>,
    /// The binary it runs.
    bin: PathBuf,
}

/// Settings written to every test node's config file: fast timers for
/// loopback.
pub const TEST_TIMERS: &str = r#"
reconnect_min_ms = 100
reconnect_max_ms = 1000
discovery_interval_secs = 2
anti_entropy_interval_secs = 3
request_timeout_secs = 10
"#;

/// What a test node differs in from the defaults.
pub struct Options<'a> {
    /// Extra lines in the settings file's `[network]` table.
    pub network: &'a str,
    /// Extra tables after it.
    pub tables: &'a str,
    /// The libp2p listen address.
    pub listen: &'a str,
    /// The cluster id.
    pub cluster: &'a str,
    /// The cluster key file, if the node holds one.
    pub cluster_key_file: Option<&'a Path>,
    /// Further key files it accepts from dialers (a key rotation).
    pub accept_cluster_key_files: &'a [&'a Path],
    /// The membership list, if the node reads one.
    pub membership_file: Option<&'a Path>,
    /// The binary to run, if not this build's `causeway`.
    pub bin: Option<&'a Path>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            network: "",
            tables: "",
            listen: "/ip4/127.0.0.1/tcp/0",
            cluster: "test",
            cluster_key_file: None,
            accept_cluster_key_files: &[],
            membership_file: None,
            bin: None,
        }
    }
}

impl NodeProc {
    /// Starts a node named `name` with its data under `root/name`.
    pub fn start(root: &Path, name: &str, region: &str, bootstrap: &[String]) -> NodeProc {
        Self::start_with(root, name, region, bootstrap, Options::default())
    }

    /// Like [`NodeProc::start`], with `tables` added to the settings file.
    pub fn start_with_tables(root: &Path, name: &str, region: &str, tables: &str) -> NodeProc {
        let options = Options {
            tables,
            ..Options::default()
        };
        Self::start_with(root, name, region, &[], options)
    }

    /// Like [`NodeProc::start`], with `options`.
    pub fn start_with(
        root: &Path,
        name: &str,
        region: &str,
        bootstrap: &[String],
        options: Options,
    ) -> NodeProc {
        let Options {
            network,
            tables,
            listen,
            cluster,
            cluster_key_file,
            accept_cluster_key_files,
            membership_file,
            bin,
        } = options;
        let mut key = cluster_key_file.map_or(String::new(), |k| {
            format!("cluster_key_file = {:?}\n", k.display().to_string())
        });
        if !accept_cluster_key_files.is_empty() {
            let files: Vec<String> = accept_cluster_key_files
                .iter()
                .map(|k| format!("{:?}", k.display().to_string()))
                .collect();
            key += &format!("accept_cluster_key_files = [{}]\n", files.join(", "));
        }
        if let Some(m) = membership_file {
            key += &format!("membership_file = {:?}\n", m.display().to_string());
        }
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("node.toml");
        let text = format!(
            "data_dir = {:?}\nregion = {region:?}\ncluster = {cluster:?}\n{key}[network]\n{network}\n{TEST_TIMERS}\n{tables}\n",
            dir.display().to_string()
        );
        std::fs::write(&config, text).unwrap();
        let mut args = vec![
            "node".to_string(),
            "--config".into(),
            config.display().to_string(),
            "--listen".into(),
            listen.into(),
            "--http-listen".into(),
            "127.0.0.1:0".into(),
        ];
        for b in bootstrap {
            args.push("--bootstrap".into());
            args.push(b.clone());
        }
        let bin = bin.map_or_else(causeway_bin, Path::to_path_buf);
        Self::spawn(name, dir, args, bin)
    }

    fn spawn(name: &str, dir: PathBuf, args: Vec<String>, bin: PathBuf) -> NodeProc {
        let log = std::fs::File::create(dir.join("node.log")).unwrap();
        let mut child = Command::new(&bin)
            .args(&args)
            .env("RUST_LOG", "info,libp2p=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn causeway node");
        let stdout = child.stdout.take().unwrap();
        let info = read_ready_line(stdout, &dir);
        NodeProc {
            name: name.to_string(),
            dir,
            child,
            peer_id: info["peer_id"].as_str().unwrap().to_string(),
            http: info["http"]
                .as_str()
                .unwrap()
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_string(),
            listen: info["listen"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect(),
            args,
            bin,
        }
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the node again with the same data directory and flags.
    pub fn restart(&mut self) {
        let fresh = Self::spawn(
            &self.name,
            self.dir.clone(),
            self.args.clone(),
            self.bin.clone(),
        );
        *self = fresh;
    }

    /// Runs the node's command again (after it stopped) expecting it to
    /// refuse to start within 30 s: returns what it wrote to stderr.
    pub fn refused_start(&self) -> String {
        let err = self.dir.join("refused.log");
        let mut child = Command::new(&self.bin)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn causeway node");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} started instead of refusing to", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "{} exited 0", self.name);
        std::fs::read_to_string(&err).unwrap()
    }

    /// Stops the node with SIGTERM (a clean exit is required) and starts
    /// `bin` on the same data directory and settings, dialing `bootstrap`
    /// as well as its own bootstrap peers: an upgrade of one node.
    pub fn upgrade(&mut self, bin: &Path, bootstrap: &[String]) {
        let status = self.terminate();
        assert!(status.success(), "{} stopped with {status}", self.name);
        let mut args = self.args.clone();
        for b in bootstrap {
            args.push("--bootstrap".into());
            args.push(b.clone());
        }
        let fresh = Self::spawn(&self.name, self.dir.clone(), args, bin.to_path_buf());
        *self = fresh;
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }

    /// A request to this node's HTTP API.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        http(&self.http, method, path, headers, body)
    }

    /// GET a document's JSON (None if it does not exist here).
    pub fn get_doc(&self, id: &str) -> Option<(Value, String)> {
        let r = self.request("GET", &format!("/v1/docs/{id}"), &[], b"");
        (r.status == 200).then(|| (r.json(), r.header("causeway-heads").unwrap_or_default()))
    }

    /// PUT or PATCH a document; panics unless the node accepted it.
    pub fn write_doc(&self, method: &str, id: &str, value: &Value) -> String {
        let r = self.request(
            method,
            &format!("/v1/docs/{id}"),
            &[("content-type", "application/json")],
            value.to_string().as_bytes(),
        );
        assert_eq!(
            r.status,
            200,
            "{method} {id} on {}: {}",
            self.name,
            r.text()
        );
        r.json()["heads"].as_str().unwrap().to_string()
    }

    /// Every live document id on this node.
    pub fn list_all(&self, prefix: &str) -> Vec<String> {
        let mut ids = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/v1/docs?prefix={prefix}&limit=1000");
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let page = self.request("GET", &path, &[], b"").json();
            ids.extend(
                page["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string()),
            );
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return ids,
            }
        }
    }

    /// The node's resident set, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status of a running node")
    }

    /// p50 and p99 of `n` sequential small writes (`PUT probe/{tag}-{i}`),
    /// milliseconds.
    pub fn write_latency(&self, n: usize, tag: &str) -> (f64, f64) {
        let mut ms: Vec<f64> = (0..n)
            .map(|i| {
                let start = Instant::now();
                self.write_doc(
                    "PUT",
                    &format!("probe/{tag}-{i}"),
                    &serde_json::json!({"i": i}),
                );
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        (ms[n / 2], ms[(n * 99 / 100).min(n - 1)])
    }

    /// The sum of every sample of metric `name` on this node whose labels
    /// contain `labels` (all of them for "").
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.request("GET", "/metrics", &[], b"").text();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.strip_prefix(name))
            .filter(|rest| rest.starts_with([' ', '{']) && rest.contains(labels))
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The node's `/v1/status`.
    pub fn status(&self) -> Value {
        self.request("GET", "/v1/status", &[], b"").json()
    }

    /// Peers this node replicates with.
    pub fn replicating(&self) -> Vec<String> {
        let status = self.status();
        status["node"]["peers"]
            .as_array()
            .map(|peers| {
                peers
                    .iter()
                    .filter(|p| p["state"] == "replicating")
                    .map(|p| p["peer_id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_ready_line(stdout: ChildStdout, dir: &Path) -> Value {
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) => {
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"))
        }
        _ => panic!(
            "node did not start; its log:\n{}",
            std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
        ),
    }
}

/// A response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    /// The `error.code` of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    try_http(addr, method, path, headers, body).expect("a complete response head")
}

/// Like [`http`], but `None` if the server closes without a complete
/// response head (or never accepts).
pub fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<HttpResponse> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    raw.windows(4)
        .any(|w| w == b"\r\n\r\n")
        .then(|| parse_response(&raw))
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked")
    {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..pos]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[pos + 2..pos + 2 + size]);
        data = &data[pos + 2 + size + 2..];
    }
    out
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes;
/// returns the time it took.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Whether every node holds `id` with the same heads and content.
pub fn converged(nodes: &[&NodeProc], id: &str) -> bool {
    let seen: Vec<_> = nodes.iter().map(|n| n.get_doc(id)).collect();
    seen.iter().all(Option::is_some) && seen.windows(2).all(|w| w[0] == w[1])
}

/// How long [`three`] waits for the mesh.
pub const MESH_TIMEOUT: Duration = Duration::from_secs(60);

/// Three nodes in regions eu, us and ap; b and c know only a's address
/// and find each other by discovery. Returns once all three replicate with
/// each other.
pub fn three(root: &std::path::Path) -> (NodeProc, NodeProc, NodeProc) {
    three_with(root, "")
}

/// [`three`], with `tables` at the end of every node's settings file.
pub fn three_with(root: &std::path::Path, tables: &str) -> (NodeProc, NodeProc, NodeProc) {
    let options = || Options {
        tables,
        ..Options::default()
    };
    let a = NodeProc::start_with(root, "a", "eu", &[], options());
    let b = NodeProc::start_with(root, "b", "us", &a.listen, options());
    let c = NodeProc::start_with(root, "c", "ap", &a.listen, options());
    let t = wait_until(MESH_TIMEOUT, "a full mesh", || {
        [&a, &b, &c].iter().all(|n| n.replicating().len() == 2)
    });
    println!(
        "full mesh of 3 nodes after {:.0} ms (b and c found each other by discovery)",
        t.as_secs_f64() * 1e3
    );
    (a, b, c)
}

/// The peer id of the node whose data will be in `root/name` (its identity
/// is created now, as an operator does before the first start).
pub fn identity(root: &Path, name: &str) -> String {
    let out = Command::new(causeway_bin())
        .args(["identity", "--data-dir"])
        .arg(root.join(name))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A token issued with `causeway token create` into the tokens file of
/// the node whose data is in `dir`, with `grants` and further `args`.
pub fn create_token(dir: &Path, grants: &[&str], args: &[&str]) -> String {
    let mut command = Command::new(causeway_bin());
    command.args(["token", "create", "--data-dir"]).arg(dir);
    for g in grants {
        command.args(["--grant", g]);
    }
    let out = command.args(args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Revokes token `id` of the node whose data is in `dir`.
pub fn revoke_token(dir: &Path, id: &str) {
    let out = Command::new(causeway_bin())
        .args(["token", "revoke", "--data-dir"])
        .arg(dir)
        .arg(id)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A new cluster key in `root/cluster.key` (`causeway cluster init`).
pub fn cluster_key(root: &Path) -> PathBuf {
    let path = root.join("cluster.key");
    let out = Command::new(causeway_bin())
        .args(["cluster", "init", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    path
}

/// Documents a [`writer`] spreads its keys over.
pub const WRITER_DOCS: usize = 25;

/// Writes `{key: i}` into `load/{i % WRITER_DOCS}` on the node at `addr`
/// until `stop`, recording every acknowledged write as (document, key);
/// keys start with `tag`.
pub fn writer(
    addr: String,
    tag: &'static str,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut i = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let (doc, key) = (format!("load/{}", i % WRITER_DOCS), format!("{tag}{i}"));
            let body = json!({ &key: i }).to_string();
            let r = http(
                &addr,
                "PATCH",
                &format!("/v1/docs/{doc}"),
                &[("content-type", "application/json")],
                body.as_bytes(),
            );
            assert_eq!(r.status, 200, "PATCH {doc} on {tag}: {}", r.text());
            acked.lock().unwrap().push((doc, key));
            i += 1;
        }
    })
}

/// Acknowledged writes (document, key) missing on any of `nodes`, counted
/// once per node that lacks them.
pub fn lost_writes(acked: &[(String, String)], nodes: &[&NodeProc]) -> usize {
    missing_writes(acked, nodes).iter().map(Vec::len).sum()
}

/// The keys of acknowledged writes (document, key) each of `nodes` lacks,
/// in the order of `acked`; each document is read once per node (a missing
/// document lacks all its writes).
pub fn missing_writes<'a>(acked: &'a [(String, String)], nodes: &[&NodeProc]) -> Vec<Vec<&'a str>> {
    nodes
        .iter()
        .map(|node| {
            let mut docs: std::collections::HashMap<&str, Option<Value>> = Default::default();
            acked
                .iter()
                .filter(|(doc, key)| {
                    let value = docs
                        .entry(doc.as_str())
                        .or_insert_with(|| node.get_doc(doc).map(|(v, _)| v));
                    value.as_ref().is_none_or(|v| v.get(key).is_none())
                })
                .map(|(_, key)| key.as_str())
                .collect()
        })
        .collect()
}
