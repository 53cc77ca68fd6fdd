//! The report of a chaos run: JSON for machines, a short table for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::checker::Verdict;
use super::schedule::{Fault, FaultKind};
use super::topology::Traffic;
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
    /// Writes sent while the node that took them was paused or killed.
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
    /// Region names.
    pub regions: Vec<String>,
    /// Node names, region by region.
    pub nodes: Vec<String>,
    /// The nodes' `[network]` settings besides the timers.
    pub network: String,
    /// Traffic between regions, counted where it enters a region's
    /// namespace.
    pub wan: Wan,
    /// What the nodes' replication cores sent, by their own counters.
    pub sent: NodeCounters,
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
    /// The hostile member's run (`--byzantine 1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<ByzantineReport>,
}

/// Traffic that crossed region boundaries from the start of the fault
/// phase until convergence: node-to-node packets entering each region's
/// namespace from another region's nodes (after the fault rules; clients
/// and traffic inside a region are not counted).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Wan {
    /// Into each region, in region order.
    pub into_region: Vec<Traffic>,
    /// Into every region.
    pub total: Traffic,
    /// Bytes a second between regions before any write (connection
    /// keep-alives, discovery, idle anti-entropy rounds).
    pub idle_bytes_per_second: f64,
    /// Bytes per acknowledged write and other region: what carrying one
    /// write into one region cost, acknowledgements, reconciliation and
    /// repair included.
    pub bytes_per_write_and_region: f64,
    /// The same, less the idle rate over the measured time.
    pub bytes_per_write_and_region_over_idle: f64,
}

/// Counters of the nodes' `/metrics` at the end of a run, summed over the
/// nodes: messages and bytes the replication cores handed to the network
/// by kind, pushes resent, abandoned or untracked, and confirmations. A
/// node killed and restarted counts from its restart, so with kills these
/// are lower bounds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeCounters {
    /// `causeway_messages_sent_total` by kind.
    pub messages: BTreeMap<String, u64>,
    /// `causeway_bytes_sent_total` by kind.
    pub bytes: BTreeMap<String, u64>,
    /// `causeway_pushes_total` by kind (`resent`, `abandoned`, `untracked`).
    pub pushes: BTreeMap<String, u64>,
    /// `causeway_confirmations_total`.
    pub confirmations: u64,
    /// `causeway_peers_silenced_total`.
    pub silenced: u64,
    /// Nodes whose metrics could not be read.
    pub unread: usize,
}

impl NodeCounters {
    /// Reads and sums the counters of the nodes at `urls`.
    pub async fn of(urls: &[String]) -> NodeCounters {
        const PREFIXES: [&str; 5] = [
            "causeway_messages_sent_total{",
            "causeway_bytes_sent_total{",
            "causeway_pushes_total{",
            "causeway_confirmations_total",
            "causeway_peers_silenced_total",
        ];
        let client = reqwest::Client::new();
        let mut c = NodeCounters::default();
        for url in urls {
            let Ok(series) =
                crate::bench::node_process::metric_series(&client, url, &PREFIXES).await
            else {
                c.unread += 1;
                continue;
            };
            for (name, value) in series {
                c.add(&name, value as u64);
            }
        }
        c
    }

    /// Adds one series' value (`name{kind="..."}`).
    fn add(&mut self, series: &str, value: u64) {
        let kind = series
            .split_once("kind=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(kind, _)| kind.to_string());
        let map = if series.starts_with("causeway_messages_sent_total") {
            &mut self.messages
        } else if series.starts_with("causeway_bytes_sent_total") {
            &mut self.bytes
        } else if series.starts_with("causeway_pushes_total") {
            &mut self.pushes
        } else if series.starts_with("causeway_peers_silenced_total") {
            self.silenced += value;
            return;
        } else {
            self.confirmations += value;
            return;
        };
        if let Some(kind) = kind {
            *map.entry(kind).or_default() += value;
        }
    }
}

/// Traffic counted from `before` to `after`, region by region.
pub fn traffic_between(before: &[Traffic], after: &[Traffic]) -> Vec<Traffic> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| Traffic {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
        })
        .collect()
}

fn sum(traffic: &[Traffic]) -> Traffic {
    traffic.iter().fold(Traffic::default(), |t, r| Traffic {
        packets: t.packets + r.packets,
        bytes: t.bytes + r.bytes,
    })
}

impl Wan {
    /// The traffic `into_region` counted over `took`, per acknowledged
    /// write of `writes`, next to the `idle` traffic counted over its
    /// length.
    pub fn of(
        into_region: Vec<Traffic>,
        took: Duration,
        idle: (&[Traffic], Duration),
        writes: &[Write],
    ) -> Wan {
        let total = sum(&into_region);
        let idle_rate = sum(idle.0).bytes as f64 / idle.1.as_secs_f64().max(1e-3);
        let acked = writes.iter().filter(|w| w.outcome == Outcome::Ok).count();
        let others = into_region.len().saturating_sub(1);
        let per = (acked * others).max(1) as f64;
        let over_idle = (total.bytes as f64 - idle_rate * took.as_secs_f64()).max(0.0);
        Wan {
            into_region,
            total,
            idle_bytes_per_second: idle_rate,
            bytes_per_write_and_region: total.bytes as f64 / per,
            bytes_per_write_and_region_over_idle: over_idle / per,
        }
    }
}

/// Latency of acknowledged writes in a period.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Acknowledged writes sent in the period.
    pub writes: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

impl Latency {
    /// The acknowledged writes among `writes` sent in `[from, to)`.
    pub fn of(writes: &[Write], from: Duration, to: Duration) -> Latency {
        let mut ms: Vec<f64> = writes
            .iter()
            .filter(|w| w.outcome == Outcome::Ok && w.sent >= from && w.sent < to)
            .map(|w| w.latency.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if ms.is_empty() {
                0.0
            } else {
                ms[((ms.len() - 1) as f64 * q).round() as usize]
            }
        };
        Latency {
            writes: ms.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
        }
    }
}

/// What a hostile member did in the run and what came of it.
#[derive(Debug, Clone, Serialize)]
pub struct ByzantineReport {
    /// When the attack started, ms into the fault phase (the first half
    /// of the phase runs without it, as the reference).
    pub attack_started_ms: u64,
    /// The attacker's own account: messages by kind, and per node when it
    /// was disconnected and whether it got back in.
    pub attack: super::byzantine::AttackReport,
    /// Honest writes before the attack started.
    pub writes_before: Latency,
    /// Honest writes while it ran.
    pub writes_during: Latency,
    /// Regions whose node holds the attacker in its list of blocked peers
    /// at the end (its own record, `blocked-peers.json`).
    pub blocked_by: Vec<String>,
    /// Each honest node's resident memory at the end, MiB.
    pub rss_mib_at_end: BTreeMap<String, u64>,
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
                let own = |f: &Injected| f.fault.region == i && f.fault.node == w.node;
                if faults
                    .iter()
                    .any(|f| !f.fault.kind.is_network() && own(f) && during(w, f))
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
            "between regions   {} packets, {} bytes: {:.0} bytes per write and other region, {:.0} over the idle {:.0} bytes/s ({})",
            self.wan.total.packets,
            self.wan.total.bytes,
            self.wan.bytes_per_write_and_region,
            self.wan.bytes_per_write_and_region_over_idle,
            self.wan.idle_bytes_per_second,
            self.network
        );
        let _ = writeln!(
            t,
            "nodes sent        {} ({} bytes); pushes {:?}; {} peers silenced; {} confirmations{}",
            self.sent
                .messages
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.sent.bytes.values().sum::<u64>(),
            self.sent.pushes,
            self.sent.silenced,
            self.sent.confirmations,
            if self.sent.unread > 0 {
                format!(" ({} nodes unread)", self.sent.unread)
            } else {
                String::new()
            }
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
        if let Some(b) = &self.byzantine {
            let cut: Vec<String> = b
                .attack
                .targets
                .iter()
                .map(|t| {
                    t.disconnected_after_ms
                        .map_or("never".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0))
                })
                .collect();
            let sent: u64 = b.attack.sent.values().sum();
            let _ = writeln!(
                t,
                "byzantine member {} messages from {:.1} s; disconnected after {}; blocked by {}/{} nodes",
                sent,
                b.attack_started_ms as f64 / 1000.0,
                cut.join(", "),
                b.blocked_by.len(),
                self.regions.len()
            );
            let _ = writeln!(
                t,
                "honest write p99 {:.1} ms before ({} writes), {:.1} ms during the attack ({} writes)",
                b.writes_before.p99_ms,
                b.writes_before.writes,
                b.writes_during.p99_ms,
                b.writes_during.writes
            );
        }
        let _ = writeln!(t, "{}", if self.passed { "PASSED" } else { "FAILED" });
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_counters_sum_series_by_kind() {
        let mut c = NodeCounters::default();
        for (series, value) in [
            ("causeway_messages_sent_total{kind=\"push\"}", 3),
            ("causeway_messages_sent_total{kind=\"push\"}", 4),
            ("causeway_messages_sent_total{kind=\"ack\"}", 5),
            ("causeway_bytes_sent_total{kind=\"push\"}", 700),
            ("causeway_pushes_total{kind=\"resent\"}", 2),
            ("causeway_confirmations_total", 6),
            ("causeway_confirmations_total", 1),
            ("causeway_peers_silenced_total", 2),
        ] {
            c.add(series, value);
        }
        assert_eq!(c.messages["push"], 7);
        assert_eq!(c.messages["ack"], 5);
        assert_eq!(c.bytes["push"], 700);
        assert_eq!(c.pushes["resent"], 2);
        assert_eq!(c.confirmations, 7);
        assert_eq!(c.silenced, 2);
    }
}
