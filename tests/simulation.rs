//! The deterministic cluster simulator, over many seeds: replication cores on
//! real stores, a faulty network, crashes, and the convergence checks (see
//! `causeway_engine::sim`).
//!
//! `CAUSEWAY_SIM_SEEDS` sets how many seeds the sharded tests run (default
//! 300, split over four tests so they run in parallel). A failing seed is
//! appended to `tests/sim-regressions.txt`, which every run replays first,
//! and its replay command is printed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use causeway_engine::sim::{self, Report, SimConfig, Summary};

const SHARDS: u64 = 4;

fn seeds() -> u64 {
    std::env::var("CAUSEWAY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

fn regressions_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sim-regressions.txt")
}

/// A regression line: `seed=N nodes=N regions=N steps=N`.
fn line_of(c: &SimConfig) -> String {
    format!(
        "seed={} nodes={} regions={} steps={}",
        c.seed, c.nodes, c.regions, c.steps
    )
}

fn parse_line(line: &str) -> Option<SimConfig> {
    let line = line.split('#').next()?.trim();
    if line.is_empty() {
        return None;
    }
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("regression line {line:?} lacks {name}"))
    };
    let mut c = SimConfig::from_seed(field("seed"));
    c.nodes = field("nodes") as usize;
    c.regions = field("regions") as usize;
    c.steps = field("steps") as usize;
    Some(c)
}

/// Keeps a failing run as a regression case (once).
fn keep(config: &SimConfig, report: &Report) {
    let path = regressions_file();
    let line = line_of(config);
    let known = std::fs::read_to_string(&path).unwrap_or_default();
    if known
        .lines()
        .any(|l| l.split('#').next().unwrap_or("").trim() == line)
    {
        return;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let first = report.violations.first().map_or("", String::as_str);
    writeln!(f, "{line} # {}", first.replace('\n', " ")).unwrap();
}

fn run_all(configs: impl IntoIterator<Item = SimConfig>) -> Summary {
    let mut summary = Summary::default();
    for config in configs {
        let report = sim::run(&config).unwrap();
        if !report.passed() {
            eprintln!(
                "FAILED {:?}\n  replay: {}",
                report.violations, report.replay
            );
            keep(&config, &report);
        }
        summary.add(&report);
    }
    eprintln!("{}", summary.describe());
    println!("{}", summary.to_json());
    summary
}

fn assert_passed(summary: &Summary) {
    let replays: Vec<&str> = summary.failed.iter().map(|(r, _)| r.as_str()).collect();
    assert!(
        replays.is_empty(),
        "failing runs, replay with:\n{}",
        replays.join("\n")
    );
    assert_eq!(summary.writes_lost, 0);
    assert!(summary.writes_acked > 0);
}

fn shard(k: u64) {
    let n = seeds();
    let configs = (0..n).filter(|s| s % SHARDS == k).map(SimConfig::from_seed);
    let summary = run_all(configs);
    assert_passed(&summary);
    // The runs were not trivially quiet: faults of every kind happened.
    if summary.runs >= 50 {
        let f = &summary.faults;
        for (kind, count) in [
            ("lost", f.messages_lost),
            ("duplicated", f.messages_duplicated),
            ("delayed", f.messages_delayed),
            ("partitions", f.partitions),
            ("one-way partitions", f.one_way_partitions),
            ("crashes", f.crashes),
            ("restarts", f.restarts),
        ] {
            assert!(count > 0, "no {kind} in {} runs", summary.runs);
        }
    }
}

#[test]
fn seeds_shard_0() {
    shard(0);
}

#[test]
fn seeds_shard_1() {
    shard(1);
}

#[test]
fn seeds_shard_2() {
    shard(2);
}

#[test]
fn seeds_shard_3() {
    shard(3);
}

#[test]
fn regression_seeds_pass() {
    let text = std::fs::read_to_string(regressions_file()).unwrap();
    let configs: Vec<SimConfig> = text.lines().filter_map(parse_line).collect();
    let summary = run_all(configs);
    assert_passed(&summary);
}

#[test]
fn one_seed_replays_byte_for_byte() {
    let config = SimConfig::from_seed(7);
    let (a, b) = (sim::run(&config).unwrap(), sim::run(&config).unwrap());
    assert!(a.passed(), "{:?}", a.violations);
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.to_json(), b.to_json());
    let other = sim::run(&SimConfig::from_seed(8)).unwrap();
    assert_ne!(a.trace, other.trace);
}

#[test]
fn the_checks_fail_when_the_network_never_heals() {
    let mut config = SimConfig::from_seed(3);
    config.heal = false;
    config.loss_permille = 1000;
    let report = sim::run(&config).unwrap();
    assert!(!report.passed());
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("did not converge")),
        "{:?}",
        report.violations
    );
    assert!(report.replay.contains("--no-heal"));
    // Writes made on one node never reached the others: the ledger check
    // sees them missing.
    assert!(report.writes_lost > 0, "{:?}", report.to_json());
    assert!(report.writes_lost <= report.writes_acked);
}

#[test]
fn regression_lines_round_trip() {
    let c = SimConfig::from_seed(42);
    let parsed = parse_line(&format!("{} # why it failed", line_of(&c))).unwrap();
    assert_eq!(parsed, c);
    assert!(parse_line("# a comment").is_none());
}

/// A run at scale: 60 nodes in 6 regions of the WAN matrix, with loss and
/// faults, writes pushed along region trees, reconciliation with 3 peers a
/// round. Every check of a seeded run
/// holds, and the dissemination figures are measured (printed with
/// `--no-capture`).
#[test]
fn a_run_at_scale_converges_and_measures_how_writes_spread() {
    let config = SimConfig::at_scale(11, 60, 6, 120, 10, 20);
    let report = sim::run(&config).unwrap();
    let json = report.to_json();
    println!("{}", serde_json::to_string_pretty(&json["spread"]).unwrap());
    println!("reconciliation {}", json["reconciliation"]);
    assert!(
        report.passed(),
        "{:?}\n{}",
        report.violations,
        report.replay
    );
    assert_eq!(report.writes_lost, 0);
    assert!(report.writes_acked > 100, "{}", report.writes_acked);
    let spread = &report.spread;
    let pairs = spread["replica_pairs"].as_u64().unwrap();
    let reached = spread["reached_by_broadcast"].as_u64().unwrap();
    assert!(pairs > 0 && reached <= pairs, "{spread}");
    // Six regions spanning the continents: the farthest replica of a write
    // is 60 to 120 ms away one way.
    let floor = spread["floor_ms"]["p50"].as_f64().unwrap();
    assert!((60.0..=120.0).contains(&floor), "{spread}");
    // Writes are pushed along region trees: each enters another region
    // about once and reaches a replica about once (losses and partitions
    // leave some to repair, resends and a second bridge add a few), and
    // the push path carried most of them.
    let copies = spread["copies_into_remote_region"]["mean"]
        .as_f64()
        .unwrap();
    assert!((0.5..=1.2).contains(&copies), "{spread}");
    let receptions = spread["payload_receptions_per_replica"].as_f64().unwrap();
    assert!((0.5..=1.2).contains(&receptions), "{spread}");
    assert!(reached * 2 > pairs, "{spread}");
    // Each round reconciles with 2 peers of the region and 1 of another;
    // sessions started on reconnects and resent after a loss add a few.
    // Reconciling with every peer would be 59 a round.
    let per_round = json["reconciliation"]["per_node_per_round"]
        .as_f64()
        .unwrap();
    assert!(per_round < 10.0, "{}", json["reconciliation"]);
    assert!(report.replay.contains("--scale --loss 10 --faults 20"));
}
