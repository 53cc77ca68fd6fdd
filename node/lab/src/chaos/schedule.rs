//! The seeded fault schedule of a chaos run: which fault, on which regions,
//! when and for how long. The same seed, duration, region count and fault
//! length give the same schedule, printed before the run so it can be
//! replayed (the network's and processes' timing is real, so a replay
//! repeats the faults, not every packet).

use std::fmt;
use std::time::Duration;

use causeway_engine::replication::random::{Random, SplitMix64};
use serde::Serialize;

use super::topology::NetState;

/// Every kind of fault the harness injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// One region cut off from every other, both directions.
    Partition,
    /// Packets from one region to another dropped; the reverse flows.
    OneWay,
    /// A share of the packets to and from one region dropped at random.
    Loss,
    /// One node stopped with SIGSTOP, continued with SIGCONT.
    Pause,
    /// One node killed with SIGKILL, restarted on the same data afterwards.
    Kill,
    /// Two regions cut from each other while both still reach the third.
    Bridge,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Partition,
        FaultKind::OneWay,
        FaultKind::Loss,
        FaultKind::Pause,
        FaultKind::Kill,
        FaultKind::Bridge,
    ];

    /// Whether the fault is in the network (every node keeps running).
    pub fn is_network(self) -> bool {
        !matches!(self, FaultKind::Pause | FaultKind::Kill)
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// Start, from the beginning of the fault phase.
    #[serde(rename = "at_ms", serialize_with = "millis")]
    pub at: Duration,
    /// How long it lasts; then it is healed (or the node continued or
    /// restarted).
    #[serde(rename = "for_ms", serialize_with = "millis")]
    pub length: Duration,
    /// What it is.
    pub kind: FaultKind,
    /// The region it hits; for `one_way`, the sender whose packets drop.
    pub region: usize,
    /// The second region of `one_way` (receiver) and `bridge`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other: Option<usize>,
    /// The share of packets `loss` drops, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_percent: Option<u8>,
    /// For `pause` and `kill`, which of the region's nodes (0 with one node
    /// per region).
    #[serde(skip_serializing_if = "is_zero")]
    pub node: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The name of node `node` of region `name`: the region's name when it has
/// one node, else `name-node`.
pub fn node_name(name: &str, node: usize, per_region: usize) -> String {
    if per_region > 1 {
        format!("{name}-{node}")
    } else {
        name.to_string()
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Fault {
    /// The network rules while this fault is active (none for process
    /// faults).
    pub fn net_state(&self, regions: usize) -> NetState {
        let mut state = NetState::default();
        match self.kind {
            FaultKind::Partition => {
                for r in (0..regions).filter(|&r| r != self.region) {
                    state.blocked.insert((self.region, r));
                    state.blocked.insert((r, self.region));
                }
            }
            FaultKind::OneWay => {
                if let Some(to) = self.other {
                    state.blocked.insert((self.region, to));
                }
            }
            FaultKind::Bridge => {
                if let Some(other) = self.other {
                    state.blocked.insert((self.region, other));
                    state.blocked.insert((other, self.region));
                }
            }
            FaultKind::Loss => {
                state
                    .loss
                    .insert(self.region, self.loss_percent.unwrap_or(0));
            }
            FaultKind::Pause | FaultKind::Kill => {}
        }
        state
    }

    /// A one-line description naming the regions (of `per_region` nodes
    /// each).
    pub fn describe(&self, names: &[&str], per_region: usize) -> String {
        let r = names[self.region];
        let n = node_name(r, self.node, per_region);
        let o = self.other.map_or("?", |o| names[o]);
        match self.kind {
            FaultKind::Partition => format!("partition: {r} cut off from every other region"),
            FaultKind::OneWay => format!("one-way: packets {r} -> {o} dropped, {o} -> {r} flow"),
            FaultKind::Loss => format!(
                "loss: {}% of packets to and from {r} dropped",
                self.loss_percent.unwrap_or(0)
            ),
            FaultKind::Pause => format!("pause: node {n} stopped (SIGSTOP)"),
            FaultKind::Kill => format!("kill: node {n} killed (SIGKILL), restarted after"),
            FaultKind::Bridge => {
                format!("bridge: {r} and {o} cut from each other, both reach the rest")
            }
        }
    }
}

/// How a schedule is drawn.
#[derive(Debug, Clone, Copy)]
pub struct ScheduleConfig {
    /// The seed.
    pub seed: u64,
    /// Length of the fault phase.
    pub duration: Duration,
    /// Regions (at least 3).
    pub regions: usize,
    /// The longest fault; each lasts between half of this and this.
    pub max_fault: Duration,
    /// Nodes in each region (`pause` and `kill` hit one of them).
    pub nodes_per_region: usize,
}

/// Calm time before the first fault, so that writes start on a healthy
/// cluster.
const WARMUP: Duration = Duration::from_secs(3);

/// The faults of a run, in time order and never overlapping: each is healed
/// before the next starts, after a calm gap of one to three seconds. The
/// first six are one of each kind in a seeded order, so even a short run
/// covers every kind; the rest are drawn at random.
pub fn generate(config: ScheduleConfig) -> Vec<Fault> {
    let mut rng = SplitMix64::new(config.seed);
    let mut kinds = FaultKind::ALL.to_vec();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let max_ms = config.max_fault.as_millis().max(2) as u64;
    let regions = config.regions as u64;
    let mut faults = Vec::new();
    let mut at = WARMUP;
    loop {
        let kind = kinds
            .get(faults.len())
            .copied()
            .unwrap_or_else(|| FaultKind::ALL[rng.below(FaultKind::ALL.len() as u64) as usize]);
        let length = Duration::from_millis(max_ms / 2 + rng.below(max_ms / 2 + 1));
        let gap = Duration::from_millis(1000 + rng.below(2001));
        if at + length > config.duration {
            return faults;
        }
        let region = rng.below(regions) as usize;
        let other = matches!(kind, FaultKind::OneWay | FaultKind::Bridge)
            .then(|| (region + 1 + rng.below(regions - 1) as usize) % config.regions);
        let loss_percent = (kind == FaultKind::Loss).then(|| 10 + rng.below(41) as u8);
        // Drawn only with several nodes a region, so that schedules of one
        // node a region stay what they were.
        let node = if config.nodes_per_region > 1 && !kind.is_network() {
            rng.below(config.nodes_per_region as u64) as usize
        } else {
            0
        };
        faults.push(Fault {
            at,
            length,
            kind,
            region,
            other,
            loss_percent,
            node,
        });
        at += length + gap;
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            FaultKind::Partition => "partition",
            FaultKind::OneWay => "one_way",
            FaultKind::Loss => "loss",
            FaultKind::Pause => "pause",
            FaultKind::Kill => "kill",
            FaultKind::Bridge => "bridge",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(seed: u64, secs: u64) -> ScheduleConfig {
        ScheduleConfig {
            seed,
            duration: Duration::from_secs(secs),
            regions: 3,
            max_fault: Duration::from_secs(6),
            nodes_per_region: 1,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(generate(config(7, 300)), generate(config(7, 300)));
        assert_ne!(generate(config(7, 300)), generate(config(8, 300)));
    }

    #[test]
    fn faults_do_not_overlap_fit_the_run_and_cover_every_kind() {
        for seed in 0..50 {
            let faults = generate(config(seed, 60));
            let mut kinds: Vec<_> = faults.iter().map(|f| f.kind).collect();
            kinds.sort();
            kinds.dedup();
            assert_eq!(kinds, FaultKind::ALL.to_vec(), "seed {seed}");
            for w in faults.windows(2) {
                assert!(w[0].at + w[0].length < w[1].at, "seed {seed}");
            }
            let last = faults.last().expect("at least one fault");
            assert!(last.at + last.length <= Duration::from_secs(60));
            for f in &faults {
                assert!(f.other != Some(f.region));
                assert!(f.region < 3 && f.other.is_none_or(|o| o < 3));
            }
        }
    }

    #[test]
    fn several_nodes_a_region_pick_the_node_and_keep_the_network_faults() {
        let one = generate(config(5, 120));
        let three = generate(ScheduleConfig {
            nodes_per_region: 3,
            ..config(5, 120)
        });
        assert!(one.iter().all(|f| f.node == 0));
        assert!(three.iter().all(|f| f.node < 3));
        assert!(three.iter().any(|f| f.node > 0), "{three:?}");
        assert!(three
            .iter()
            .filter(|f| f.kind.is_network())
            .all(|f| f.node == 0));
        // The first six faults are one of each kind, drawn alike.
        let kinds = |s: &[Fault]| s.iter().take(6).map(|f| f.kind).collect::<Vec<_>>();
        assert_eq!(kinds(&one), kinds(&three));
    }

    #[test]
    fn a_bridge_leaves_both_regions_reaching_the_third() {
        let f = Fault {
            at: Duration::ZERO,
            length: Duration::from_secs(1),
            kind: FaultKind::Bridge,
            region: 0,
            other: Some(2),
            loss_percent: None,
            node: 0,
        };
        let state = f.net_state(3);
        assert_eq!(state.blocked, [(0, 2), (2, 0)].into_iter().collect());
    }
}
