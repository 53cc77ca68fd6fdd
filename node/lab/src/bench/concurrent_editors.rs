//! `causeway bench concurrent-editors`: several writers edit one shared
//! text, each in its own Automerge document, and post every change as soon
//! as it is made to the node of its own region (`POST /v1/changes/{id}`),
//! as fast as the API accepts them. A writer's changes depend on the other
//! writers' changes, which reach its node only by replication, so nodes
//! hold them until their dependencies arrive; at a held-change limit the
//! node answers 429 and the writer retries. At the end the text must be
//! identical on every node and equal to what the writers hold, and every
//! change a node answered 200 must be in every node's history.
//!
//! The workload is an editing trace (`../shared/data/editing-traces/`) cut
//! into blocks of `--block` transactions, dealt to the writers in turn: a
//! writer merges the other writers' documents (in process, as collaborators
//! who see each other's edits) before editing its block, so each block
//! depends on the one before it. Editing runs ahead of posting; each writer
//! posts its own changes in its own order, one per request.
//!
//! Writer 0 starts posting only once every other writer has had a change
//! refused by its node (or has posted all of its changes): every change of
//! the others depends on writer 0's first block, so until then they are
//! all held, and the run holds changes up to the limit and refuses some
//! whatever the machine's speed. `--kill-at N` SIGKILLs the second node once N changes
//! were acknowledged and starts it again on the same data directory; its
//! writer retries until it answers.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use causeway_engine::automerge::{Automerge, AutomergeError, Change, ChangeHash, ObjId, ReadDoc};
use causeway_engine::{lineage, DocId};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::ingest::{apply_txn, tempdir_in};
use super::node_process::NodeProcess;
use super::summary::{self, f, thousands, Row};
use super::trace::{Trace, TraceArgs};
use super::{build_profile, Report};

/// Arguments of `causeway bench concurrent-editors`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The trace the writers share.
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Writers (2 or 3); writer `w` posts to the node of region `w`.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Transactions per block; blocks go to the writers in turn.
    #[arg(long, default_value_t = 50)]
    pub block: usize,
    /// `max_held_changes_per_doc` of every node (default: the engine's).
    #[arg(long)]
    pub max_held_per_doc: Option<usize>,
    /// SIGKILL the second node once this many changes were acknowledged,
    /// then start it again.
    #[arg(long)]
    pub kill_at: Option<u64>,
    /// Directory for the stores (default: the system temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

/// Changes a writer may have made and not yet posted; editing waits beyond.
const MAX_UNPOSTED_CHANGES: usize = 10_000;

/// How long the nodes may take to converge after the last post.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);

/// Pause before retrying a request the node could not take (down, or 429
/// without a hint).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long a writer keeps retrying one change before the run fails: a
/// node that stays down or refuses for this long is a failure to report,
/// not something to wait out.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// Figures shared by the posting tasks.
#[derive(Default)]
struct Counters {
    acknowledged: AtomicU64,
    refused: AtomicU64,
    unreachable: AtomicU64,
    held_peak: AtomicUsize,
    /// Hashes of every change a node answered 200 for.
    acked: Mutex<Vec<ChangeHash>>,
    /// Writers other than writer 0 that have had a change refused (or have
    /// posted everything).
    primed: AtomicUsize,
}

/// The cluster of a run: three nodes, their current HTTP addresses (the
/// second node's changes when it is restarted), and what they were started
/// with.
struct Cluster {
    nodes: Vec<NodeProcess>,
    urls: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
    /// Settings tables every node gets.
    tables: String,
}

/// What the posting phase did.
struct Posting {
    expected: String,
    made: usize,
    killed: u32,
    held_polled: usize,
    elapsed: Duration,
}

/// What the nodes hold at the end.
struct Outcome {
    converged: bool,
    lost: usize,
    held_at_end: usize,
    /// From the last post until the nodes held the writers' text.
    settled: Duration,
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> Result<()> {
    ensure!(
        (2..=REGIONS.len()).contains(&args.writers),
        "--writers must be 2 or 3"
    );
    ensure!(args.block > 0, "--block must be at least 1");
    let trace = args.trace.load()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut cluster = start_cluster(args, &client).await?;
    let id = DocId::new("bench/concurrent-editors")?;
    let counters = Arc::new(Counters::default());
    let posting = post_trace(args, &trace, &id, &client, &mut cluster, &counters).await?;
    ensure!(
        posting.expected == trace.end_content,
        "the writers' merged text differs from the trace's endContent"
    );
    let urls = cluster.urls.lock().expect("urls lock").clone();
    let acked = counters.acked.lock().expect("acked lock").clone();
    let outcome = check_nodes(&client, &urls, &id, &posting.expected, &acked).await?;
    report(args, &trace, &counters, &posting, &outcome);
    let acknowledged = counters.acknowledged.load(Ordering::SeqCst);
    ensure!(
        acknowledged == posting.made as u64,
        "{} changes made, {acknowledged} acknowledged",
        posting.made
    );
    ensure!(
        outcome.converged,
        "the nodes did not converge on the writers' text"
    );
    ensure!(
        outcome.lost == 0,
        "{} acknowledged changes missing on some node",
        outcome.lost
    );
    ensure!(
        outcome.held_at_end == 0,
        "{} changes still held at the end",
        outcome.held_at_end
    );
    Ok(())
}

/// Starts the three nodes and waits until they replicate with each other.
async fn start_cluster(args: &Args, client: &reqwest::Client) -> Result<Cluster> {
    let dir = tempdir_in(args.dir.as_deref())?;
    let tables = match args.max_held_per_doc {
        Some(n) => format!("[engine]\nmax_held_changes_per_doc = {n}\n"),
        None => String::new(),
    };
    let mut nodes: Vec<NodeProcess> = Vec::new();
    for region in REGIONS {
        let bootstrap: Vec<String> = nodes.iter().flat_map(|n| n.listen.clone()).collect();
        let node_dir = dir.path().join(region);
        nodes.push(NodeProcess::spawn_with(
            &node_dir, region, &bootstrap, &tables,
        )?);
    }
    super::steady_state::await_mesh(client, &nodes).await?;
    let urls = Arc::new(Mutex::new(nodes.iter().map(|n| n.http.clone()).collect()));
    Ok(Cluster {
        nodes,
        urls,
        dir,
        tables,
    })
}

/// Edits and posts the whole trace: one editing thread, one posting task
/// per writer; meanwhile polls the nodes' held counts and, at `--kill-at`,
/// SIGKILLs and restarts the second node.
async fn post_trace(
    args: &Args,
    trace: &Trace,
    id: &DocId,
    client: &reqwest::Client,
    cluster: &mut Cluster,
    counters: &Arc<Counters>,
) -> Result<Posting> {
    let started = Instant::now();
    let mut queues = Vec::new();
    let mut posters = Vec::new();
    for w in 0..args.writers {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(MAX_UNPOSTED_CHANGES);
        queues.push(tx);
        let writer = Writer {
            w,
            writers: args.writers,
            client: client.clone(),
            urls: cluster.urls.clone(),
            id: id.clone(),
            counters: counters.clone(),
        };
        posters.push(tokio::spawn(writer.post_all(rx)));
    }
    let editor = {
        let (trace, id) = (trace.clone(), id.clone());
        let (writers, block) = (args.writers, args.block);
        tokio::task::spawn_blocking(move || edit(&trace, &id, writers, block, queues))
    };
    let mut killed = 0u32;
    let mut held_polled = 0usize;
    while !posters.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        held_polled = held_polled.max(held_now(client, &cluster.urls).await);
        let acked = counters.acknowledged.load(Ordering::SeqCst);
        if killed == 0 && args.kill_at.is_some_and(|n| acked >= n) {
            restart_second_node(cluster).await?;
            killed += 1;
        }
        // A writer that failed ends the run now: the others may wait on it.
        let mut i = 0;
        while i < posters.len() {
            if posters[i].is_finished() {
                posters.swap_remove(i).await??;
            } else {
                i += 1;
            }
        }
    }
    let (expected, made) = editor.await??;
    Ok(Posting {
        expected,
        made,
        killed,
        held_polled,
        elapsed: started.elapsed(),
    })
}

/// Waits for the nodes to converge on `expected`, then counts acknowledged
/// changes missing from each node's history and changes still held.
async fn check_nodes(
    client: &reqwest::Client,
    urls: &[String],
    id: &DocId,
    expected: &str,
    acked: &[ChangeHash],
) -> Result<Outcome> {
    let started = Instant::now();
    let converged = converge(client, urls, id, expected).await?;
    let settled = started.elapsed();
    let mut lost = 0usize;
    let mut held_at_end = 0usize;
    for url in urls {
        let have = history(client, url, id).await?;
        lost += acked.iter().filter(|h| !have.contains(h)).count();
        held_at_end += held_on(client, url).await?;
    }
    Ok(Outcome {
        converged,
        lost,
        held_at_end,
        settled,
    })
}

/// Prints the JSON result and the table.
fn report(args: &Args, trace: &Trace, counters: &Counters, posting: &Posting, outcome: &Outcome) {
    let settled = outcome.settled;
    let acknowledged = counters.acknowledged.load(Ordering::SeqCst);
    let refused = counters.refused.load(Ordering::SeqCst);
    let unreachable = counters.unreachable.load(Ordering::SeqCst);
    let held_peak = posting
        .held_polled
        .max(counters.held_peak.load(Ordering::SeqCst));
    let seconds = posting.elapsed.as_secs_f64();
    let rate = acknowledged as f64 / seconds;
    let mut report = Report::default();
    report.record(
        json!({"bench": "concurrent-editors", "nodes": REGIONS.len(),
               "writers": args.writers, "txns": trace.txns.len(), "block": args.block,
               "changes_made": posting.made, "acknowledged": acknowledged,
               "refused_and_retried": refused, "unreachable_and_retried": unreachable,
               "held_peak": held_peak, "held_at_end": outcome.held_at_end,
               "max_held_per_doc": args.max_held_per_doc, "killed": posting.killed,
               "lost": outcome.lost, "identical": outcome.converged,
               "text_chars": posting.expected.chars().count(),
               "seconds_posting": seconds, "posts_per_second": rate,
               "seconds_to_converge_after_posting": settled.as_secs_f64(),
               "regions": &REGIONS[..], "build": build_profile()}),
        vec![
            args.writers.to_string(),
            acknowledged.to_string(),
            format!("{rate:.0}"),
            held_peak.to_string(),
            refused.to_string(),
            posting.killed.to_string(),
            outcome.lost.to_string(),
            format!("{:.1}", settled.as_secs_f64()),
        ],
    );
    report.print_table(&[
        "writers",
        "changes acknowledged",
        "posts/s",
        "held at peak",
        "refused (retried)",
        "nodes killed",
        "lost",
        "converge s",
    ]);
}

/// Edits the trace block by block, writer by writer, sending each change to
/// its writer's queue. Returns the merged text and the number of changes.
fn edit(
    trace: &Trace,
    id: &DocId,
    writers: usize,
    block: usize,
    queues: Vec<mpsc::Sender<Vec<u8>>>,
) -> Result<(String, usize)> {
    let genesis = lineage::genesis_change(id);
    let mut docs: Vec<Automerge> = (0..writers)
        .map(|_| {
            let mut doc = Automerge::new();
            doc.apply_changes([genesis.clone()])?;
            Ok(doc)
        })
        .collect::<Result<_, AutomergeError>>()?;
    let mut text: Option<ObjId> = None;
    let mut made = 0;
    for (b, txns) in trace.txns.chunks(block).enumerate() {
        let w = b % writers;
        let (before, rest) = docs.split_at_mut(w);
        let (doc, after) = rest.split_first_mut().context("writer index")?;
        for other in before.iter_mut().chain(after.iter_mut()) {
            doc.merge(other)?;
        }
        for txn in txns {
            let heads = doc.get_heads();
            let obj = match &text {
                Some(t) => t.clone(),
                None => {
                    let t = doc
                        .transact(|tx| super::ingest::start_text(tx, &trace.start_content))
                        .map_err(|f| f.error)?
                        .result;
                    send(&queues[w], doc, &heads)?;
                    made += 1;
                    text = Some(t.clone());
                    t
                }
            };
            let heads = doc.get_heads();
            doc.transact(|tx| apply_txn(tx, &obj, txn))
                .map_err(|f| f.error)?;
            made += send(&queues[w], doc, &heads)?;
        }
    }
    drop(queues);
    let mut merged = Automerge::new();
    for doc in &mut docs {
        merged.merge(doc)?;
    }
    let obj = text.context("the trace has no transactions")?;
    Ok((merged.text(&obj)?, made))
}

/// Sends the changes `doc` made since `heads` to a writer's queue.
fn send(queue: &mpsc::Sender<Vec<u8>>, doc: &Automerge, heads: &[ChangeHash]) -> Result<usize> {
    let changes = doc.get_changes(heads);
    for change in &changes {
        queue
            .blocking_send(change.raw_bytes().to_vec())
            .context("a writer's poster stopped")?;
    }
    Ok(changes.len())
}

/// One writer's posting task: its index, where it posts, what it counts.
struct Writer {
    w: usize,
    writers: usize,
    client: reqwest::Client,
    urls: Arc<Mutex<Vec<String>>>,
    id: DocId,
    counters: Arc<Counters>,
}

/// How a node answered one post.
enum Answer {
    /// 200: acknowledged, with the node's held count for the document.
    Taken(usize),
    /// 429: refused at a held-change limit; retry after the pause.
    Refused(Duration),
    /// No answer (the node is down): retry.
    Unreachable,
}

impl Answer {
    /// What the node answered, for an error message.
    fn describe(&self) -> String {
        match self {
            Answer::Taken(held) => format!("200 with {held} held"),
            Answer::Refused(pause) => format!("429, retry after {pause:?}"),
            Answer::Unreachable => "no answer, the node is down".to_string(),
        }
    }
}

impl Writer {
    /// Posts the writer's changes to its node, one per request, retrying
    /// each until the node answers 200. Writer 0 waits until every other
    /// writer has been refused once (or has posted everything).
    async fn post_all(self, mut queue: mpsc::Receiver<Vec<u8>>) -> Result<()> {
        let c = &self.counters;
        let mut primed = self.w == 0;
        while self.w == 0 && c.primed.load(Ordering::SeqCst) < self.writers - 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while let Some(change) = queue.recv().await {
            let hash = Change::from_bytes(change.clone())?.hash();
            let first_try = Instant::now();
            loop {
                let answer = self.post(&change).await?;
                if !matches!(answer, Answer::Taken(_)) && first_try.elapsed() > GIVE_UP_AFTER {
                    bail!(
                        "writer {}: change {hash} not taken after {GIVE_UP_AFTER:?} of retries (last answer: {})",
                        self.w,
                        answer.describe()
                    );
                }
                match answer {
                    Answer::Taken(held) => {
                        c.held_peak.fetch_max(held, Ordering::SeqCst);
                        c.acknowledged.fetch_add(1, Ordering::SeqCst);
                        c.acked.lock().expect("acked lock").push(hash);
                        break;
                    }
                    Answer::Refused(pause) => {
                        c.refused.fetch_add(1, Ordering::SeqCst);
                        if !primed {
                            primed = true;
                            c.primed.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::time::sleep(pause).await;
                    }
                    Answer::Unreachable => {
                        c.unreachable.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        }
        if !primed {
            c.primed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// One `POST /v1/changes/{id}` of `change` to the writer's node.
    async fn post(&self, change: &[u8]) -> Result<Answer> {
        let url = self.urls.lock().expect("urls lock")[self.w].clone();
        let sent = self
            .client
            .post(format!("{url}/v1/changes/{}", self.id))
            .body(change.to_vec())
            .send()
            .await;
        let Ok(response) = sent else {
            return Ok(Answer::Unreachable);
        };
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let pause = body["error"]["retry_after_ms"]
                .as_u64()
                .map_or(RETRY_PAUSE, Duration::from_millis);
            return Ok(Answer::Refused(pause));
        }
        if !status.is_success() {
            bail!("writer {}: POST answered {status}: {body}", self.w);
        }
        Ok(Answer::Taken(body["held"].as_u64().unwrap_or(0) as usize))
    }
}

/// SIGKILLs the second node and starts it again on its data directory,
/// dialing the others; its writer finds it at its new address.
async fn restart_second_node(cluster: &mut Cluster) -> Result<()> {
    let nodes = &mut cluster.nodes;
    nodes[1].child.kill()?;
    nodes[1].child.wait()?;
    let bootstrap: Vec<String> = [&nodes[0], &nodes[2]]
        .iter()
        .flat_map(|n| n.listen.clone())
        .collect();
    let node_dir = cluster.dir.path().join(REGIONS[1]);
    let tables = cluster.tables.clone();
    let node = tokio::task::spawn_blocking(move || {
        NodeProcess::spawn_with(&node_dir, REGIONS[1], &bootstrap, &tables)
    })
    .await??;
    cluster.urls.lock().expect("urls lock")[1].clone_from(&node.http);
    nodes[1] = node;
    Ok(())
}

/// The largest `held_changes` any node reports now (0 for a node that does
/// not answer).
async fn held_now(client: &reqwest::Client, urls: &Mutex<Vec<String>>) -> usize {
    let urls = urls.lock().expect("urls lock").clone();
    let mut peak = 0;
    for url in urls {
        peak = peak.max(held_on(client, &url).await.unwrap_or(0));
    }
    peak
}

async fn held_on(client: &reqwest::Client, url: &str) -> Result<usize> {
    let status: Value = client
        .get(format!("{url}/v1/status"))
        .send()
        .await?
        .json()
        .await?;
    Ok(status["engine"]["held_changes"].as_u64().unwrap_or(0) as usize)
}

/// Waits until every node's text is `expected`; false on timeout.
async fn converge(
    client: &reqwest::Client,
    urls: &[String],
    id: &DocId,
    expected: &str,
) -> Result<bool> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let mut all = true;
        for url in urls {
            let response = client.get(format!("{url}/v1/docs/{id}")).send().await?;
            let doc: Value = response.json().await.unwrap_or(Value::Null);
            all &= doc["text"].as_str() == Some(expected);
        }
        if all {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The hashes of every change of `id` the node at `url` holds.
async fn history(client: &reqwest::Client, url: &str, id: &DocId) -> Result<HashSet<ChangeHash>> {
    let bytes = client
        .get(format!("{url}/v1/changes/{id}"))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    // A whole history: more changes than one request may carry.
    let chunks = causeway_node::http::changes::split_chunks_up_to(&bytes, usize::MAX)
        .map_err(anyhow::Error::msg)?;
    chunks
        .into_iter()
        .map(|c| Ok(Change::from_bytes(c.to_vec())?.hash()))
        .collect()
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    summary::each(results, |r| {
        Row::new(
            format!(
                "concurrent-editors: {} writers post {} trace changes to their own region's node (held limit {}, one node SIGKILLed)",
                r["writers"],
                thousands(f(r, "acknowledged")),
                r["max_held_per_doc"]
            ),
            format!(
                "{:.0} posts/s; held at peak {}, refused and retried {}, lost {}; converged {:.1} s after the last post",
                f(r, "posts_per_second"),
                thousands(f(r, "held_peak")),
                thousands(f(r, "refused_and_retried")),
                r["lost"],
                f(r, "seconds_to_converge_after_posting")
            ),
            "—".into(),
            "—".into(),
        )
    })
}
