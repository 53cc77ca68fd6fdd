//! The report of a chaos run: JSON for machines, a short table for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::checker::Verdict;
use super::schedule::{Fault, FaultKind};
use super::workload::{Outcome, Write};

/// Writes by outcome.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    /// Sent.
    pub attempted: usize,
    /// Acknowledged.
    pub ok: usize,
    /// Refused.
    pub failed: usize,
    /// Timed out or cut off.
    pub unknown: usize,
}

impl Counts {
    fn add(&mut self, outcome: Outcome) {
        self.attempted += 1;
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Unknown => self.unknown += 1,
        }
    }

    /// Share of attempted writes acknowledged (1 when none were attempted).
    pub fn ok_ratio(&self) -> f64 {
        if self.attempted == 0 {
            1.0
        } else {
            self.ok as f64 / self.attempted as f64
        }
    }
}

/// A fault as it happened: scheduled, then started and healed at these
/// times (from the start of the fault phase).
#[derive(Debug, Clone, Serialize)]
pub struct Injected {
    /// The scheduled fault.
    #[serde(flatten)]
    pub fault: Fault,
    /// When it actually started, ms.
    pub started_ms: u64,
    /// When it was actually healed, ms.
    pub healed_ms: u64,
}

/// Writes in one region.
#[derive(Debug, Clone, Serialize)]
pub struct RegionWrites {
    /// Region name.
    pub region: String,
    /// Every write sent to this region's node.
    pub all: Counts,
    /// Writes sent while a network fault (partition, one-way, bridge or
    /// loss) was in force: every node was running, so each must succeed.
    pub during_network_faults: Counts,
    /// Writes sent while this region's own node was paused or killed.
    pub during_own_process_faults: Counts,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command that replays this schedule.
    pub command: String,
    /// Seed of the schedule.
    pub seed: u64,
    /// Length of the fault phase, seconds.
    pub duration_s: u64,
    /// Region names, one node each.
    pub regions: Vec<String>,
    /// Writers per region, writes per second per writer, documents.
    pub workload: String,
    /// Network timers of every node.
    pub node_timers: String,
    /// Faults in the order injected.
    pub faults: Vec<Injected>,
    /// Faults injected by kind.
    pub faults_by_kind: BTreeMap<String, usize>,
    /// Every write.
    pub writes: Counts,
    /// Per region.
    pub per_region: Vec<RegionWrites>,
    /// What the checker found.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Whether every node held identical documents after the final heal.
    pub converged: bool,
    /// Time from the final heal until every node held identical documents.
    pub convergence_ms: Option<u64>,
    /// Documents written.
    pub documents: usize,
    /// Direct messages nodes dropped because a peer opened more streams
    /// than `max_concurrent_streams` (libp2p's "at capacity" warning, counted
    /// in the nodes' logs); the senders' windows should keep this at 0.
    pub inbound_streams_dropped: usize,
    /// Converged, no acknowledged write lost, no divergence, no refused
    /// write present.
    pub passed: bool,
    /// Where the nodes' data and logs are, when kept.
    pub data_dir: Option<String>,
}

/// Counts `writes` overall, per region, and per region during faults.
pub fn region_writes(names: &[String], writes: &[Write], faults: &[Injected]) -> Vec<RegionWrites> {
    let during = |w: &Write, f: &Injected| {
        let ms = w.sent.as_millis() as u64;
        f.started_ms <= ms && ms < f.healed_ms
    };
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut r = RegionWrites {
                region: name.clone(),
                all: Counts::default(),
                during_network_faults: Counts::default(),
                during_own_process_faults: Counts::default(),
            };
            for w in writes.iter().filter(|w| w.region == i) {
                r.all.add(w.outcome);
                if faults
                    .iter()
                    .any(|f| f.fault.kind.is_network() && during(w, f))
                {
                    r.during_network_faults.add(w.outcome);
                }
                if faults
                    .iter()
                    .any(|f| !f.fault.kind.is_network() && f.fault.region == i && during(w, f))
                {
                    r.during_own_process_faults.add(w.outcome);
                }
            }
            r
        })
        .collect()
}

/// Faults by kind, every kind listed.
pub fn by_kind(faults: &[Injected]) -> BTreeMap<String, usize> {
    FaultKind::ALL
        .iter()
        .map(|k| {
            let n = faults.iter().filter(|f| f.fault.kind == *k).count();
            (k.to_string(), n)
        })
        .collect()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("did not converge".into(), |d| {
        format!("{} ms", d.as_millis())
    })
}

impl Report {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let kinds: Vec<String> = self
            .faults_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(t, "chaos run: {}", self.command);
        let _ = writeln!(
            t,
            "faults injected   {} ({})",
            self.faults.len(),
            kinds.join(", ")
        );
        let w = &self.writes;
        let _ = writeln!(
            t,
            "writes            {} attempted: {} ok, {} failed, {} unknown",
            w.attempted, w.ok, w.failed, w.unknown
        );
        let v = &self.verdict;
        let _ = writeln!(t, "acked writes lost {}", v.acked_lost);
        let _ = writeln!(
            t,
            "unknown writes    {} present, {} absent",
            v.unknown_present, v.unknown_absent
        );
        let _ = writeln!(t, "failed but present {}", v.failed_present);
        let _ = writeln!(
            t,
            "divergent         {} replicas, {} documents (of {})",
            v.divergent_replicas, v.divergent_documents, self.documents
        );
        let _ = writeln!(
            t,
            "streams dropped   {} (inbound at capacity)",
            self.inbound_streams_dropped
        );
        let _ = writeln!(
            t,
            "converged after   {}",
            ms(self.convergence_ms.map(Duration::from_millis))
        );
        let _ = writeln!(
            t,
            "{:<8} {:>22} {:>26} {:>24}",
            "region", "writes ok/attempted", "during network faults", "own node paused/killed"
        );
        for r in &self.per_region {
            let cell =
                |c: &Counts| format!("{}/{} ({:.1}%)", c.ok, c.attempted, 100.0 * c.ok_ratio());
            let _ = writeln!(
                t,
                "{:<8} {:>22} {:>26} {:>24}",
                r.region,
                cell(&r.all),
                cell(&r.during_network_faults),
                cell(&r.during_own_process_faults)
            );
        }
        let _ = writeln!(t, "{}", if self.passed { "PASSED" } else { "FAILED" });
        t
    }
}
