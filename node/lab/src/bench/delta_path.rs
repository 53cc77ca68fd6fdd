//! `causeway bench delta-path`: what it costs to deliver a change to every
//! replica, on a simulated multi-region cluster, with and without message
//! loss.
//!
//! Runs the deterministic simulator (`causeway_engine::sim`) with client
//! writes and no partitions or crashes, once per loss rate, and divides the
//! traffic delivered (every message of every kind: deltas and their gossip
//! relays, syncs, reconciliation, acknowledgements, hellos) by the changes
//! delivered (changes applied on a replica other than their origin). The
//! reference is the floor: each change carried once to each other replica,
//! as bare change bytes in one message.

use anyhow::{bail, ensure, Result};
use causeway_engine::sim::{self, SimConfig};
use serde_json::json;

use super::summary::{self, f, thousands, Row};
use super::Report;
use serde_json::Value;

/// Arguments of `causeway bench delta-path`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Regions (nodes are spread evenly).
    #[arg(long, default_value_t = 3)]
    pub regions: usize,
    /// Client writes.
    #[arg(long, default_value_t = 2000)]
    pub writes: usize,
    /// Loss rates and seed.
    #[command(flatten)]
    pub runs: super::SimRuns,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    if args.nodes < 2 || args.regions == 0 {
        bail!("need at least 2 nodes and 1 region");
    }
    eprintln!(
        "delta path: {} nodes in {} regions, {} writes, seed {} (simulated network)",
        args.nodes, args.regions, args.writes, args.runs.seed
    );
    let mut report = Report::default();
    for &loss in &args.runs.loss_permille {
        let mut config = SimConfig::from_seed(args.runs.seed);
        config.nodes = args.nodes;
        config.regions = args.regions;
        config.steps = args.writes;
        config.text_docs = 2;
        config.key_docs = 6;
        config.fault_permille = 0;
        config.duplicate_permille = 0;
        config.delay_permille = 0;
        config.loss_permille = loss;
        config.max_active_syncs_per_peer = 32;
        config.max_queued_syncs_per_peer = 1000;
        config.anti_entropy_interval = std::time::Duration::from_secs(30);
        config.retry_after = std::time::Duration::from_secs(5);
        let r = sim::run(&config)?;
        ensure!(
            r.passed(),
            "the run failed: {:?} ({})",
            r.violations,
            r.replay
        );
        let (changes, change_bytes) = r.committed;
        let delivered = r.changes_applied.0 + r.changes_applied.1;
        // Every replica converged (checked by the run), so each change
        // reached every other replica once, by delta or by sync. (Slightly
        // fewer than changes x (nodes - 1): a document's genesis change is
        // made locally by every node that creates it.)
        ensure!(delivered > 0, "no change was delivered");
        let per = |x: u64| x as f64 / delivered as f64;
        let floor_bytes = change_bytes as f64 / changes as f64;
        let channel = |name: &str| {
            r.delivered_by_channel
                .get(name)
                .copied()
                .unwrap_or_default()
        };
        let (gossip, direct) = (channel("gossip"), channel("direct"));
        let bytes_per = per(r.delivered.1);
        report.record(
            json!({
                "bench": "delta_path", "nodes": args.nodes, "regions": args.regions,
                "loss_permille": loss, "changes": changes, "changes_delivered": delivered,
                "by_delta": r.changes_applied.0, "by_sync": r.changes_applied.1,
                "messages_per_change": per(r.delivered.0),
                "gossip_messages_per_change": per(gossip.0),
                "direct_messages_per_change": per(direct.0),
                "bytes_per_change": bytes_per,
                "gossip_bytes_per_change": per(gossip.1),
                "direct_bytes_per_change": per(direct.1),
                "floor_bytes_per_change": floor_bytes,
                "ratio_to_floor": bytes_per / floor_bytes,
                "messages_lost": r.faults.messages_lost,
                "converged_after_heal_ms": r.converged_after_heal.map(|d| d.as_millis() as u64),
            }),
            vec![
                format!("{:.1}%", f64::from(loss) / 10.0),
                changes.to_string(),
                format!(
                    "{:.0}% / {:.0}%",
                    100.0 * per(r.changes_applied.0),
                    100.0 * per(r.changes_applied.1)
                ),
                format!(
                    "{:.2} ({:.2} + {:.2})",
                    per(r.delivered.0),
                    per(gossip.0),
                    per(direct.0)
                ),
                format!(
                    "{:.0} ({:.0} + {:.0})",
                    bytes_per,
                    per(gossip.1),
                    per(direct.1)
                ),
                format!("{floor_bytes:.0}"),
                format!("{:.1}x", bytes_per / floor_bytes),
            ],
        );
    }
    report.print_table(&[
        "loss",
        "changes",
        "by delta / sync",
        "msgs per delivered change (gossip + direct)",
        "bytes per delivered change (gossip + direct)",
        "floor B",
        "vs floor",
    ]);
    Ok(())
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    summary::each(results, |r| {
        Row::new(
            format!(
                "delta path (simulated), {} nodes in {} regions, {:.1}% loss",
                r["nodes"],
                r["regions"],
                f(r, "loss_permille") / 10.0
            ),
            format!(
                "{:.2} messages, {} bytes per delivered change",
                f(r, "messages_per_change"),
                thousands(f(r, "bytes_per_change"))
            ),
            format!(
                "floor 1 message, {} bytes",
                thousands(f(r, "floor_bytes_per_change"))
            ),
            format!("{:.1}x bytes", f(r, "ratio_to_floor")),
        )
    })
}
