//! What a simulation run reports: faults injected, writes acknowledged and
//! lost, convergence time, traffic, queue depths, and any violated check.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::replication::QueueDepths;

use super::config::SimConfig;

/// Faults injected, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Messages dropped by random loss.
    pub messages_lost: u64,
    /// Messages delivered twice.
    pub messages_duplicated: u64,
    /// Messages held back by up to a second.
    pub messages_delayed: u64,
    /// Full partitions started (connections across them closed).
    pub partitions: u64,
    /// One-way partitions started.
    pub one_way_partitions: u64,
    /// Messages dropped by a one-way partition.
    pub partition_drops: u64,
    /// Partitions healed during the fault phase.
    pub heals: u64,
    /// Node crashes (in-memory state and unsent messages lost).
    pub crashes: u64,
    /// Node restarts (store reopened, new incarnation).
    pub restarts: u64,
}

impl Faults {
    /// Every count by name.
    pub fn to_json(&self) -> Value {
        json!({
            "messages_lost": self.messages_lost,
            "messages_duplicated": self.messages_duplicated,
            "messages_delayed": self.messages_delayed,
            "partitions": self.partitions,
            "one_way_partitions": self.one_way_partitions,
            "partition_drops": self.partition_drops,
            "heals": self.heals,
            "crashes": self.crashes,
            "restarts": self.restarts,
        })
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Faults) {
        self.messages_lost += other.messages_lost;
        self.messages_duplicated += other.messages_duplicated;
        self.messages_delayed += other.messages_delayed;
        self.partitions += other.partitions;
        self.one_way_partitions += other.one_way_partitions;
        self.partition_drops += other.partition_drops;
        self.heals += other.heals;
        self.crashes += other.crashes;
        self.restarts += other.restarts;
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The run's seed.
    pub seed: u64,
    /// The command that replays the run.
    pub replay: String,
    /// Faults injected.
    pub faults: Faults,
    /// Client writes acknowledged (durably committed on their node).
    pub writes_acked: u64,
    /// Of those, writes a client made on another node's copy and handed to
    /// its node as a change, which held it when its dependencies were
    /// missing there.
    pub client_changes: u64,
    /// Client changes their node held (at the time of the write).
    pub client_changes_held: u64,
    /// Acknowledged writes missing from some replica at the end.
    pub writes_lost: u64,
    /// How long after the heal convergence may take
    /// ([`SimConfig::convergence_bound`]).
    pub bound: Duration,
    /// Simulated time from the heal until every replica held the same heads
    /// for every document (`None`: not within the bound).
    pub converged_after_heal: Option<Duration>,
    /// Simulated time from the heal until no message was in flight and no
    /// core had work under way.
    pub quiet_after_heal: Option<Duration>,
    /// Pending lag marks (documents behind, summed over every node and
    /// peer) one anti-entropy round after convergence; must be 0.
    pub lag_after_heal: u64,
    /// Simulated time of the whole run.
    pub simulated: Duration,
    /// Messages delivered, and their bytes.
    pub delivered: (u64, u64),
    /// Reconciliation sketches decoded, and given up on and split instead
    /// (over every node).
    pub sketches: (u64, u64),
    /// Messages delivered by channel (`gossip`: deltas and announcements,
    /// relays included; `direct`: the rest): `(messages, bytes)`.
    pub delivered_by_channel: BTreeMap<&'static str, (u64, u64)>,
    /// Local changes committed by clients (and setup): `(changes, bytes)`.
    pub committed: (u64, u64),
    /// Messages handed to the network by the cores, by kind:
    /// `(messages, bytes)`, summed over nodes and incarnations.
    pub sent: BTreeMap<&'static str, (u64, u64)>,
    /// Changes applied from the broadcast path (deltas and pushes) and
    /// from sync messages, over all nodes.
    pub changes_applied: (u64, u64),
    /// Largest queue depths seen in any core.
    pub max_queues: QueueDepths,
    /// Documents not queued for sync because a queue was full.
    pub syncs_dropped: u64,
    /// Sync sessions given up after unanswered resends.
    pub syncs_abandoned: u64,
    /// SHA-256 over every delivered message and client write, in order: two
    /// runs of one seed must agree on it.
    pub trace: String,
    /// How the fault phase's client writes spread (see `docs/testing.md`,
    /// "Dissemination figures").
    pub spread: Value,
    /// Reconciliation sessions started and anti-entropy rounds run, from
    /// the fault phase on, over every node.
    pub reconciliations: (u64, u64),
    /// Checks that failed; empty when the run passed.
    pub violations: Vec<String>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The report as JSON (durations in milliseconds).
    pub fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        let sent = pairs(&self.sent);
        json!({
            "seed": self.seed,
            "passed": self.passed(),
            "faults": self.faults.to_json(),
            "writes_acked": self.writes_acked,
            "client_changes": self.client_changes,
            "client_changes_held": self.client_changes_held,
            "writes_lost": self.writes_lost,
            "converged_after_heal_ms": ms(self.converged_after_heal),
            "bound_ms": self.bound.as_millis() as u64,
            "quiet_after_heal_ms": ms(self.quiet_after_heal),
            "lag_after_heal": self.lag_after_heal,
            "simulated_ms": self.simulated.as_millis() as u64,
            "delivered": {"messages": self.delivered.0, "bytes": self.delivered.1},
            "delivered_by_channel": pairs(&self.delivered_by_channel),
            "committed": {"changes": self.committed.0, "bytes": self.committed.1},
            "sent": sent,
            "changes_applied": {"broadcast": self.changes_applied.0, "sync": self.changes_applied.1},
            "sketches": {"decoded": self.sketches.0, "split": self.sketches.1},
            "max_queues": {
                "queued_syncs": self.max_queues.queued_syncs,
                "open_syncs": self.max_queues.open_syncs,
                "pending_acks": self.max_queues.pending_acks,
            },
            "syncs_dropped": self.syncs_dropped,
            "syncs_abandoned": self.syncs_abandoned,
            "trace": self.trace,
            "spread": self.spread,
            "reconciliation": self.reconciliation_json(),
            "violations": self.violations,
            "replay": self.replay,
        })
    }

    /// Reconciliation sessions started, anti-entropy rounds run, and
    /// sessions per round (those started on connect or after an unanswered
    /// message included).
    fn reconciliation_json(&self) -> Value {
        let (sessions, rounds) = self.reconciliations;
        let per_round = sessions as f64 / (rounds.max(1) as f64);
        json!({
            "sessions": sessions,
            "rounds": rounds,
            "per_node_per_round": (per_round * 100.0).round() / 100.0,
        })
    }

    /// Starts a report for `config`.
    pub(crate) fn for_config(config: &SimConfig) -> Report {
        Report {
            seed: config.seed,
            replay: config.replay_command(),
            bound: config.convergence_bound(),
            ..Report::default()
        }
    }
}

/// Figures over many runs.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Runs added.
    pub runs: u64,
    /// Replay commands and violations of the runs that failed.
    pub failed: Vec<(String, Vec<String>)>,
    /// Faults injected, summed.
    pub faults: Faults,
    /// Writes acknowledged, summed.
    pub writes_acked: u64,
    /// Writes lost, summed.
    pub writes_lost: u64,
    /// Out-of-order client changes among the writes, summed.
    pub client_changes: u64,
    /// Of those, the ones their node held, summed.
    pub client_changes_held: u64,
    /// Time to converge after the heal, per run that converged, sorted.
    pub converged: Vec<Duration>,
    /// Messages delivered and their bytes, summed.
    pub delivered: (u64, u64),
    /// Messages sent by kind, summed.
    pub sent: BTreeMap<&'static str, (u64, u64)>,
    /// Changes applied from the broadcast path (deltas and pushes) and from
    /// sync, summed.
    pub changes_applied: (u64, u64),
    /// Reconciliation sketches decoded and split, summed.
    pub sketches: (u64, u64),
}

impl Summary {
    /// Adds one run.
    pub fn add(&mut self, r: &Report) {
        self.runs += 1;
        if !r.passed() {
            self.failed.push((r.replay.clone(), r.violations.clone()));
        }
        self.faults.add(&r.faults);
        self.writes_acked += r.writes_acked;
        self.writes_lost += r.writes_lost;
        self.client_changes += r.client_changes;
        self.client_changes_held += r.client_changes_held;
        if let Some(c) = r.converged_after_heal {
            let at = self.converged.partition_point(|x| *x <= c);
            self.converged.insert(at, c);
        }
        self.delivered.0 += r.delivered.0;
        self.delivered.1 += r.delivered.1;
        for (kind, (m, b)) in &r.sent {
            let e = self.sent.entry(kind).or_default();
            e.0 += m;
            e.1 += b;
        }
        self.changes_applied.0 += r.changes_applied.0;
        self.changes_applied.1 += r.changes_applied.1;
        self.sketches.0 += r.sketches.0;
        self.sketches.1 += r.sketches.1;
    }

    /// The figures as JSON (durations in milliseconds).
    pub fn to_json(&self) -> Value {
        let ms = |q: f64| quantile(&self.converged, q).map(|d| d.as_millis() as u64);
        let sent = pairs(&self.sent);
        json!({
            "runs": self.runs,
            "failed": self.failed.len(),
            "faults": self.faults.to_json(),
            "writes_acked": self.writes_acked,
            "client_changes": self.client_changes,
            "client_changes_held": self.client_changes_held,
            "writes_lost": self.writes_lost,
            "converged_after_heal_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": ms(1.0)},
            "delivered": {"messages": self.delivered.0, "bytes": self.delivered.1},
            "sent": sent,
            "changes_applied": {"broadcast": self.changes_applied.0, "sync": self.changes_applied.1},
            "sketches": {"decoded": self.sketches.0, "split": self.sketches.1},
        })
    }

    /// A few lines for people: runs, faults, writes, convergence.
    pub fn describe(&self) -> String {
        let ms = |q: f64| {
            quantile(&self.converged, q)
                .map_or_else(|| "-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()))
        };
        let f = &self.faults;
        format!(
            "runs {} (failed {})\n\
             faults: {} lost, {} duplicated, {} delayed messages; {} partitions, \
             {} one-way ({} messages dropped), {} heals, {} crashes, {} restarts\n\
             writes acknowledged {} ({} out-of-order client changes, {} held), lost {}\n\
             converged after heal: p50 {}, p99 {}, max {}",
            self.runs,
            self.failed.len(),
            f.messages_lost,
            f.messages_duplicated,
            f.messages_delayed,
            f.partitions,
            f.one_way_partitions,
            f.partition_drops,
            f.heals,
            f.crashes,
            f.restarts,
            self.writes_acked,
            self.client_changes,
            self.client_changes_held,
            self.writes_lost,
            ms(0.5),
            ms(0.99),
            ms(1.0),
        )
    }
}

/// `(messages, bytes)` counts by name as JSON.
fn pairs(counts: &BTreeMap<&'static str, (u64, u64)>) -> BTreeMap<&'static str, Value> {
    counts
        .iter()
        .map(|(k, (m, b))| (*k, json!({"messages": m, "bytes": b})))
        .collect()
}

/// The `q`-quantile (0.0 to 1.0) of `sorted` by nearest rank; `None` if empty.
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&d, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&d, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&d, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&d[..1], 0.5), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
