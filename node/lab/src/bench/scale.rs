//! `causeway bench scale`: how changes spread through a large cluster, from
//! the deterministic simulator (`causeway sim --scale`): 300 replication
//! cores over real stores in 19 regions of the WAN matrix, about 20 client
//! writes a second, at several message-loss rates, with writes pushed
//! along region trees and, as the reference in the same run, gossiped as
//! gossipsub does.
//!
//! Each figure is per client write, against its floor in the same run: one
//! copy of a change into each remote region, one reception per replica, the
//! change's own bytes per replica, and the direct one-way latency from the
//! origin to its farthest replica (from the matrix). Simulator speed is
//! simulated node-seconds per second of wall time.

use std::time::Instant;

use anyhow::{bail, Result};
use causeway_engine::replication::Dissemination;
use causeway_engine::sim::{self, SimConfig};
use serde_json::{json, Value};

use super::summary::{self, f, Row};
use super::{build_profile, Report};

/// Arguments of `causeway bench scale`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 300)]
    pub nodes: usize,
    /// Regions (of the WAN matrix's 19).
    #[arg(long, default_value_t = 19)]
    pub regions: usize,
    /// Client writes (about 20 a second).
    #[arg(long, default_value_t = 200)]
    pub writes: usize,
    /// How writes leave their node, each run at every loss rate: `regions`
    /// (pushed along region trees) and `gossip` (the reference).
    #[arg(long, value_delimiter = ',', default_value = "regions,gossip", value_parser = ["regions", "gossip"])]
    pub dissemination: Vec<String>,
    /// Loss rates and seed.
    #[command(flatten)]
    pub runs: super::SimRuns,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    if args.regions == 0 || args.regions > SimConfig::MAX_WAN_REGIONS {
        bail!("--regions must be 1 to {}", SimConfig::MAX_WAN_REGIONS);
    }
    let mut report = Report::default();
    let runs = args.dissemination.iter().flat_map(|mode| {
        args.runs
            .loss_permille
            .iter()
            .map(move |&loss| (mode, loss))
    });
    for (mode, loss) in runs {
        let mut config = SimConfig::at_scale(
            args.runs.seed,
            args.nodes,
            args.regions,
            args.writes,
            loss,
            0,
        );
        config.dissemination = if mode == "gossip" {
            Dissemination::Gossip
        } else {
            Dissemination::Regions
        };
        let started = Instant::now();
        let outcome = sim::run(&config)?;
        let wall = started.elapsed().as_secs_f64();
        let node_seconds = args.nodes as f64 * outcome.simulated.as_secs_f64();
        let s = &outcome.spread;
        let speed = node_seconds / wall.max(1e-9);
        let result = json!({
            "bench": "scale",
            "dissemination": mode,
            "nodes": args.nodes,
            "regions": args.regions,
            "loss_permille": loss,
            "seed": args.runs.seed,
            "passed": outcome.passed(),
            "writes_acked": outcome.writes_acked,
            "writes_lost": outcome.writes_lost,
            "converged_after_heal_ms": outcome.converged_after_heal.map(|d| d.as_millis() as u64),
            "spread": s,
            "reconciliation": outcome.to_json()["reconciliation"],
            "simulated_s": outcome.simulated.as_secs_f64(),
            "wall_s": wall,
            "node_seconds_per_wall_second": speed,
            "replay": outcome.replay,
            "build": build_profile(),
        });
        report.record(
            result,
            vec![
                mode.clone(),
                format!("{}", loss as f64 / 10.0),
                format!("{}", s["copies_into_remote_region"]["mean"]),
                format!("{}", s["payload_receptions_per_replica"]),
                format!("{}", s["payload_bytes_per_replica_x_change"]),
                format!("{}", s["bytes_per_replica_x_change"]),
                format!("{}", s["last_over_floor"]["p99"]),
                format!("{}", s["delivered_by_broadcast"]),
                format!(
                    "{}",
                    outcome.to_json()["reconciliation"]["per_node_per_round"]
                ),
                format!("{speed:.0}"),
                format!("{}", outcome.writes_lost),
            ],
        );
        if !outcome.passed() {
            bail!(
                "the run failed: {:?}; replay: {}",
                outcome.violations,
                outcome.replay
            );
        }
    }
    report.print_table(&[
        "writes",
        "loss %",
        "copies into remote region",
        "receptions / replica",
        "payload bytes / replica (x change)",
        "all bytes / replica (x change)",
        "last replica p99 (x floor)",
        "by broadcast",
        "reconciliations / node / round",
        "node-s / wall-s",
        "lost",
    ]);
    Ok(())
}

/// This scenario's rows in the `causeway bench all` summary, from its JSON
/// results.
pub fn summary(results: &[Value]) -> Vec<Row> {
    summary::each(results, |r| {
        let s = &r["spread"];
        Row::new(
            format!(
                "scale: {} nodes in {} regions, {}% loss ({})",
                f(r, "nodes"),
                f(r, "regions"),
                f(r, "loss_permille") / 10.0,
                r["dissemination"].as_str().unwrap_or("?")
            ),
            format!(
                "{} copies into each remote region, {} receptions and {}x the change's bytes per replica, last replica p99 {} ms",
                s["copies_into_remote_region"]["mean"],
                s["payload_receptions_per_replica"],
                s["bytes_per_replica_x_change"],
                s["last_replica_ms"]["p99"]
            ),
            format!(
                "1 copy, 1 reception, 1x; direct path p99 {} ms",
                s["floor_ms"]["p99"]
            ),
            format!("{}x (last replica p99 over its floor)", s["last_over_floor"]["p99"]),
        )
    })
}
