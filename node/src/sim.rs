//! `causeway sim`: runs the deterministic cluster simulator for one seed or a
//! range of seeds, printing one JSON object per run on stdout and a summary
//! on stderr. Exits non-zero if any run failed, after printing the command
//! that replays it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use causeway_engine::sim::{self, SimConfig, Summary};
use serde_json::json;

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
    /// Directory for the nodes' stores (default: /dev/shm, else the system
    /// temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl Args {
    /// The configuration of the run for `seed`.
    pub fn config(&self, seed: u64) -> SimConfig {
        let mut c = SimConfig::from_seed(seed);
        if let Some(n) = self.nodes {
            c.nodes = n;
        }
        if let Some(r) = self.regions {
            c.regions = r;
        }
        if let Some(s) = self.steps {
            c.steps = s;
        }
        c.heal = !self.no_heal;
        c.dir.clone_from(&self.dir);
        c
    }
}

/// Runs the seeds.
pub fn run(args: &Args) -> Result<()> {
    if args.nodes.is_some_and(|n| !(2..=64).contains(&n)) {
        bail!("--nodes must be between 2 and 64");
    }
    if args.regions.is_some_and(|r| r == 0) {
        bail!("--regions must be at least 1");
    }
    let started = Instant::now();
    let mut summary = Summary::default();
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let report = sim::run(&args.config(seed))?;
        println!("{}", report.to_json());
        if !report.passed() {
            eprintln!("seed {seed} FAILED: {:?}", report.violations);
            eprintln!("  replay: {}", report.replay);
        }
        summary.add(&report);
    }
    eprintln!("{}", summary.describe());
    eprintln!("wall time {:.1} s", started.elapsed().as_secs_f64());
    println!("{}", json!({"summary": summary.to_json()}));
    if !summary.failed.is_empty() {
        bail!("{} of {} runs failed", summary.failed.len(), summary.runs);
    }
    Ok(())
}
