//! `causeway bench reconcile`: the cost of document-set reconciliation between
//! two nodes holding N documents of which d differ (half of them changed on
//! one side, a quarter present only on each side).
//!
//! Drives the engine's reconciliation (`replication::reconcile`) between two
//! item sets exactly as the replication core does, encodes every message in
//! the real wire envelope, and reports bytes and round trips until both sides
//! know the differing set, next to the floor: the encoded size of the d
//! differing items, which any protocol must transfer at least once.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::{ensure, Result};
use causeway_engine::replication::ids::ClusterId;
use causeway_engine::replication::reconcile::{self, Decoders, ItemSet, Params, Side};
use causeway_engine::replication::wire::{
    Bytes, Envelope, Item, Message, Reconcile, ITEM_DIGEST_LEN,
};
use causeway_engine::DocId;
use serde_json::json;

use super::summary::{self, f, thousands, Row};
use super::{build_profile, Report};
use serde_json::Value;

/// Arguments of `causeway bench reconcile`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Documents on each node.
    #[arg(long, default_value_t = 100_000)]
    pub docs: usize,
    /// Numbers of differing documents to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,10,100,1000")]
    pub differences: Vec<usize>,
    /// Ranges a differing range is split into.
    #[arg(long, default_value_t = Params::default().branching)]
    pub branching: usize,
    /// Largest range listed item by item instead of split.
    #[arg(long, default_value_t = Params::default().item_threshold)]
    pub item_threshold: usize,
    /// Reconcile by splitting and listing only, as with a peer that speaks
    /// protocol version 1 (no sketches).
    #[arg(long)]
    pub no_sketches: bool,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    let params = Params {
        branching: args.branching,
        item_threshold: args.item_threshold,
        ..Params::default()
    };
    eprintln!(
        "reconcile: N = {} documents per node, branching {}, item threshold {}, sketches {}, {} build",
        args.docs,
        params.branching,
        params.item_threshold,
        if args.no_sketches { "off" } else { "on" },
        build_profile()
    );
    let mut report = Report::default();
    for &d in &args.differences {
        let (a, b, differing) = sets(args.docs, d)?;
        let started = Instant::now();
        let session = run_session(&a, &b, &params, !args.no_sketches);
        let elapsed = started.elapsed();
        ensure!(
            session.a_knows == differing && session.b_knows == differing,
            "reconciliation missed differences (d = {d})"
        );
        let floor: usize = differing.iter().map(item_bytes).sum();
        let target = 2 * floor + 4096;
        report.record(
            json!({"bench": "reconcile", "docs": args.docs, "differences": d,
                   "bytes": session.bytes, "messages": session.messages,
                   "round_trips": session.messages.div_ceil(2), "floor_bytes": floor,
                   "bytes_over_floor": if floor > 0 { session.bytes as f64 / floor as f64 } else { f64::NAN },
                   "within_target": session.bytes <= target,
                   "branching": params.branching, "item_threshold": params.item_threshold,
                   "sketches": !args.no_sketches,
                   "cpu_ms": elapsed.as_secs_f64() * 1e3, "build": build_profile()}),
            vec![
                d.to_string(),
                session.bytes.to_string(),
                floor.to_string(),
                if floor > 0 {
                    format!("{:.1}", session.bytes as f64 / floor as f64)
                } else {
                    "-".into()
                },
                target.to_string(),
                session.messages.div_ceil(2).to_string(),
                format!("{:.1}", elapsed.as_secs_f64() * 1e3),
            ],
        );
    }
    report.print_table(&[
        "differences",
        "bytes",
        "floor",
        "bytes/floor",
        "target (2 floor + 4 KB)",
        "round trips",
        "cpu ms (both sides)",
    ]);
    Ok(())
}

struct Session {
    bytes: usize,
    messages: usize,
    a_knows: BTreeSet<DocId>,
    b_knows: BTreeSet<DocId>,
}

/// A starts; messages alternate until one side has nothing to answer. B
/// answers with sketches if `sketches`.
fn run_session(a: &ItemSet, b: &ItemSet, params: &Params, sketches: bool) -> Session {
    let cluster = ClusterId::new("bench").unwrap_or_else(|_| unreachable!("valid label"));
    let mut s = Session {
        bytes: 0,
        messages: 0,
        a_knows: BTreeSet::new(),
        b_knows: BTreeSet::new(),
    };
    let mut decoders = Decoders::default();
    let mut ranges = reconcile::initiate(a, params);
    let mut to_b = true;
    loop {
        let env = Envelope {
            cluster: cluster.clone(),
            message: Message::Reconcile(Reconcile { session: 1, ranges }),
        };
        s.bytes += env.encode().len();
        s.messages += 1;
        let Message::Reconcile(msg) = env.message else {
            unreachable!("built above")
        };
        let (set, knows, side) = if to_b {
            (b, &mut s.b_knows, Side::Responder { sketches })
        } else {
            (
                a,
                &mut s.a_knows,
                Side::Initiator {
                    decoders: &mut decoders,
                    sketches: true,
                },
            )
        };
        let out = reconcile::process(set, &msg.ranges, params, side);
        knows.extend(out.to_sync);
        knows.extend(out.learned);
        if out.reply.is_empty() {
            return s;
        }
        ranges = out.reply;
        to_b = !to_b;
    }
}

/// Two sets of `docs` items differing in `d` documents; also the differing ids.
fn sets(docs: usize, d: usize) -> Result<(ItemSet, ItemSet, BTreeSet<DocId>)> {
    let id = |i: usize| DocId::new(format!("tenant-{:02}/doc-{i:08}", i % 37));
    let digest = |i: usize, salt: u8| {
        let mut out = [salt; 32];
        out[..8].copy_from_slice(&(i as u64).to_be_bytes());
        out
    };
    let (mut a, mut b) = (ItemSet::new(), ItemSet::new());
    let mut differing = BTreeSet::new();
    // Spread the differences evenly over the id space.
    let stride = docs.checked_div(d).map_or(usize::MAX, |s| s.max(1));
    for i in 0..docs {
        let doc = id(i)?;
        let k = i / stride;
        let differs = d > 0 && i % stride == 0 && k < d;
        match (differs, k % 4) {
            (false, _) => {
                a.insert(doc.clone(), &digest(i, 0));
                b.insert(doc, &digest(i, 0));
            }
            (true, 0 | 1) => {
                a.insert(doc.clone(), &digest(i, 0));
                b.insert(doc.clone(), &digest(i, 1));
                differing.insert(doc);
            }
            (true, 2) => {
                a.insert(doc.clone(), &digest(i, 0));
                differing.insert(doc);
            }
            (true, _) => {
                b.insert(doc.clone(), &digest(i, 0));
                differing.insert(doc);
            }
        }
    }
    Ok((a, b, differing))
}

/// Encoded size of one item: the least a protocol could send per difference.
fn item_bytes(id: &DocId) -> usize {
    let item = Item {
        doc: id.clone(),
        digest: Bytes(vec![0; ITEM_DIGEST_LEN]),
    };
    let mut out = Vec::new();
    ciborium::into_writer(&item, &mut out).map_or(0, |()| out.len())
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    summary::each(results, |r| {
        Row::new(
            format!(
                "reconcile, {} documents, {} differences",
                thousands(f(r, "docs")),
                r["differences"]
            ),
            format!(
                "{} bytes, {} round trips",
                thousands(f(r, "bytes")),
                r["round_trips"]
            ),
            format!("floor {} bytes", thousands(f(r, "floor_bytes"))),
            if f(r, "floor_bytes") > 0.0 {
                format!("{:.1}x floor", f(r, "bytes_over_floor"))
            } else {
                "—".into()
            },
        )
    })
}
