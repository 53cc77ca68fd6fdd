//! The clients of a chaos run: in every region, writers that keep adding
//! unique keys to shared documents through their own node's HTTP API, and
//! record what each write's answer was.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Client;
use serde::Serialize;
use serde_json::json;

/// Prefix of every document the workload writes.
pub const DOC_PREFIX: &str = "chaos/";

/// What a client learnt about its write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// 200: the node acknowledged it (durable there).
    Ok,
    /// Refused: the connection was never made, or the node answered with an
    /// error. The write must not appear.
    Failed,
    /// Timed out or cut off after the request may have arrived: it may or
    /// may not have happened.
    Unknown,
}

/// One write: `key = value` merged into document `doc`.
#[derive(Debug, Clone)]
pub struct Write {
    /// The region whose node took the write.
    pub region: usize,
    /// Which of the region's nodes.
    pub node: usize,
    /// Document id.
    pub doc: String,
    /// The key, unique in the whole run.
    pub key: String,
    /// The value (the writer's sequence number).
    pub value: u64,
    /// When it was sent, from the start of the fault phase.
    pub sent: Duration,
    /// How long the answer took (or the request until it gave up).
    pub latency: Duration,
    /// The answer.
    pub outcome: Outcome,
}

/// How the clients write.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Writers per region.
    pub writers: usize,
    /// Writes per second per writer (at most; a write waits for its answer).
    pub rate: f64,
    /// Documents the writes are spread over (every region writes to all).
    pub docs: usize,
    /// A write with no answer by then is unknown.
    pub timeout: Duration,
}

/// Document `i` of the workload.
pub fn doc_id(i: usize) -> String {
    format!("{DOC_PREFIX}{i}")
}

/// One writer: until `stop`, merge-patches `{"<region>-<writer>-<seq>": seq}`
/// into document `seq mod docs` at `url` (node `node` of region `region`);
/// returns every write.
pub async fn writer(
    url: String,
    (region, node): (usize, usize),
    region_name: String,
    writer: usize,
    config: WorkloadConfig,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Write> {
    let client = match Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .build()
    {
        Ok(c) => c,
        Err(_) => return Vec::new(),
    };
    let interval = Duration::from_secs_f64(1.0 / config.rate);
    let mut writes = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        let doc = doc_id(seq as usize % config.docs);
        let key = format!("{region_name}-{writer}-{seq}");
        let response = client
            .patch(format!("{url}/v1/docs/{doc}"))
            .json(&json!({ key.clone(): seq }))
            .send()
            .await;
        let outcome = match response {
            Ok(r) if r.status() == reqwest::StatusCode::OK => Outcome::Ok,
            Ok(_) => Outcome::Failed,
            Err(e) if e.is_connect() => Outcome::Failed,
            Err(_) => Outcome::Unknown,
        };
        writes.push(Write {
            region,
            node,
            doc,
            key,
            value: seq,
            sent: began.duration_since(start),
            latency: began.elapsed(),
            outcome,
        });
        seq += 1;
        tokio::time::sleep(interval.saturating_sub(began.elapsed())).await;
    }
    writes
}
