//! `causeway sim`: runs the deterministic cluster simulator for one seed or a
//! range of seeds, printing one JSON object per run on stdout and a summary
//! on stderr. Exits non-zero if any run failed, after printing the command
//! that replays it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use causeway_engine::replication::{Dissemination, Fanout};
use causeway_engine::sim::{self, SimConfig, Summary};
use serde_json::json;

/// Most nodes in one run.
pub const MAX_NODES: usize = 1000;

/// Arguments of `causeway sim`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// First seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of seeds, from `--seed` on.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Nodes per run (default: drawn from the seed, 3 to 5).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Regions per run (default: drawn from the seed, 2 or 3).
    #[arg(long)]
    pub regions: Option<usize>,
    /// Steps of the fault phase (default: drawn from the seed, 200 to 400).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Keep the faults after the fault phase (the checks must then fail).
    #[arg(long)]
    pub no_heal: bool,
    /// The scale profile: links from the 19-region WAN matrix, about 20
    /// client writes a second, no faults besides `--loss` and `--faults`
    /// (default 300 nodes in 19 regions, 600 steps).
    #[arg(long)]
    pub scale: bool,
    /// With `--scale`: chance that a message is lost, per thousand.
    #[arg(long, default_value_t = 0, requires = "scale")]
    pub loss: u32,
    /// With `--scale`: chance that a step is a fault action (partition,
    /// region cut off, crash, restart) rather than a write, per thousand.
    #[arg(long, default_value_t = 0, requires = "scale")]
    pub faults: u32,
    /// Each anti-entropy round reconciles with LOCAL peers of the node's
    /// region and REMOTE peers of other regions (`LOCAL,REMOTE`, for
    /// example `2,1`), or with every connected peer (`all`). Default: drawn
    /// from the seed; `2,1` with `--scale`.
    #[arg(long, value_name = "LOCAL,REMOTE|all", value_parser = parse_fanout)]
    pub reconcile_fanout: Option<FanoutArg>,
    /// How writes leave their node: `gossip` (published to every peer and
    /// relayed by meshes) or `regions` (pushed along region trees, one copy
    /// into each other region). Default: drawn from the seed; `regions`
    /// with `--scale`.
    #[arg(long, value_parser = ["gossip", "regions"])]
    pub dissemination: Option<String>,
    /// Directory for the nodes' stores (default: /dev/shm, else the system
    /// temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// A `--reconcile-fanout` value (`None`: every connected peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutArg(pub Option<Fanout>);

fn parse_fanout(s: &str) -> Result<FanoutArg, String> {
    Fanout::parse_setting(s)
        .map(FanoutArg)
        .map_err(|e| e.to_string())
}

impl Args {
    /// The configuration of the run for `seed`.
    pub fn config(&self, seed: u64) -> SimConfig {
        let mut c = if self.scale {
            SimConfig::at_scale(seed, 300, 19, 600, self.loss, self.faults)
        } else {
            SimConfig::from_seed(seed)
        };
        if let Some(n) = self.nodes {
            c.nodes = n;
        }
        if let Some(r) = self.regions {
            c.regions = r;
        }
        if let Some(s) = self.steps {
            c.steps = s;
        }
        if let Some(FanoutArg(f)) = self.reconcile_fanout {
            c.reconcile_fanout = f;
        }
        match self.dissemination.as_deref() {
            Some("gossip") => c.dissemination = Dissemination::Gossip,
            Some("regions") => c.dissemination = Dissemination::Regions,
            _ => {}
        }
        c.heal = !self.no_heal;
        c.dir.clone_from(&self.dir);
        c
    }
}

/// Runs the seeds.
pub fn run(args: &Args) -> Result<()> {
    if args.nodes.is_some_and(|n| !(2..=MAX_NODES).contains(&n)) {
        bail!("--nodes must be between 2 and {MAX_NODES}");
    }
    if args.regions.is_some_and(|r| r == 0) {
        bail!("--regions must be at least 1");
    }
    if args.scale && args.regions.is_some_and(|r| r > SimConfig::MAX_WAN_REGIONS) {
        bail!(
            "--scale has {} regions at most (the WAN matrix)",
            SimConfig::MAX_WAN_REGIONS
        );
    }
    if args.loss > 1000 || args.faults > 1000 {
        bail!("--loss and --faults are per thousand: at most 1000");
    }
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut node_seconds = 0.0;
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let config = args.config(seed);
        let report = sim::run(&config)?;
        node_seconds += config.nodes as f64 * report.simulated.as_secs_f64();
        println!("{}", report.to_json());
        if !report.passed() {
            eprintln!("seed {seed} FAILED: {:?}", report.violations);
            eprintln!("  replay: {}", report.replay);
        }
        summary.add(&report);
    }
    eprintln!("{}", summary.describe());
    let wall = started.elapsed().as_secs_f64();
    eprintln!(
        "wall time {wall:.1} s; {:.0} simulated node-seconds per wall second",
        node_seconds / wall.max(1e-9)
    );
    println!("{}", json!({"summary": summary.to_json()}));
    if !summary.failed.is_empty() {
        bail!("{} of {} runs failed", summary.failed.len(), summary.runs);
    }
    Ok(())
}
