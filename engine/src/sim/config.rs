//! What one simulation run does. Everything is derived from the seed by
//! [`SimConfig::from_seed`]; the size fields may then be overridden, and the
//! replay command names both.

use std::path::PathBuf;
use std::time::Duration;

use crate::replication::random::{Random, SplitMix64};

use super::network::Latency;
use crate::replication::reconcile::SKETCH_MIN_ITEMS;
use crate::replication::{Dissemination, Fanout};

#[cfg(doc)]
use crate::replication::reconcile::Params;

/// One simulation run. Chances are in parts per thousand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// The seed every random choice of the run derives from.
    pub seed: u64,
    /// Nodes in the cluster (at least 2).
    pub nodes: usize,
    /// Regions; node `i` is in region `i % regions`.
    pub regions: usize,
    /// Where link latencies come from. With [`Latency::Wan`], at most
    /// [`SimConfig::MAX_WAN_REGIONS`] regions.
    pub latency: Latency,
    /// Steps of the fault phase; each is a client write or a fault action.
    pub steps: usize,
    /// Documents with a shared text, created before the fault phase; clients
    /// insert text into them and write keys.
    pub text_docs: usize,
    /// Documents created by whichever client writes them first, during the
    /// fault phase (so some exist on one side of a partition only).
    pub key_docs: usize,
    /// Simulated time between steps: uniform in `0..=max_step_gap`.
    pub max_step_gap: Duration,
    /// Chance that a message is lost, during the fault phase.
    pub loss_permille: u32,
    /// Chance that a message is delivered twice, during the fault phase.
    pub duplicate_permille: u32,
    /// Chance that a message is held back by up to a second (so it overtakes
    /// or is overtaken by later ones), during the fault phase.
    pub delay_permille: u32,
    /// Chance that a step is a fault action (partition, one-way partition,
    /// heal, crash, restart) rather than a client write.
    pub fault_permille: u32,
    /// Chance that a client write to a text document is made on another
    /// node's copy and handed to its own node as an Automerge change
    /// ([`Engine::apply_changes`](crate::Engine::apply_changes)), which
    /// holds it if its dependencies have not reached that node yet.
    pub client_change_permille: u32,
    /// Passed to every core.
    pub max_active_syncs_per_peer: usize,
    /// Passed to every core.
    pub max_queued_syncs_per_peer: usize,
    /// Passed to every core.
    pub anti_entropy_interval: Duration,
    /// Passed to every core.
    pub retry_after: Duration,
    /// Passed to every core (`None`: every connected peer each round).
    pub reconcile_fanout: Option<Fanout>,
    /// Passed to every core ([`Params::sketch_min_items`]): half the seeded
    /// runs answer differing ranges of any size with sketches, so that
    /// their few documents take that path too.
    pub sketch_min_items: usize,
    /// Passed to every core: how writes leave their node (gossip, or pushed
    /// along region trees).
    pub dissemination: Dissemination,
    /// Whether the network heals after the fault phase. `false` keeps the
    /// partitions, crashes and loss in place, which must make the checks
    /// fail; it exists to test the checks themselves.
    pub heal: bool,
    /// Where the nodes' stores go (a fresh temporary directory inside it).
    /// `None`: `/dev/shm` if present, else the system temporary directory.
    pub dir: Option<PathBuf>,
}

/// The reconciliation fanout of runs at scale: 2 peers of the region and 1
/// of another per round.
pub const SCALE_FANOUT: Fanout = Fanout {
    local: 2,
    remote: 1,
};

impl SimConfig {
    /// The run for `seed`: 3 to 5 nodes in 2 or 3 regions, 200 to 400 steps,
    /// fault rates and core limits drawn per seed.
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut r = SplitMix64::new(seed ^ 0x005e_ed0f_ca05_eea7);
        let mut between = |lo: u64, hi: u64| lo + r.below(hi - lo + 1);
        let nodes = between(3, 5) as usize;
        let regions = between(2, 3) as usize;
        let mut config = SimConfig {
            seed,
            nodes,
            regions,
            latency: Latency::Drawn,
            steps: between(200, 400) as usize,
            text_docs: between(1, 3) as usize,
            key_docs: between(2, 6) as usize,
            max_step_gap: Duration::from_millis(between(20, 300)),
            loss_permille: between(0, 100) as u32,
            duplicate_permille: between(0, 50) as u32,
            delay_permille: between(0, 100) as u32,
            fault_permille: between(20, 80) as u32,
            max_active_syncs_per_peer: between(1, 8) as usize,
            max_queued_syncs_per_peer: between(2, 64) as usize,
            anti_entropy_interval: Duration::from_secs(between(10, 30)),
            retry_after: Duration::from_secs(between(2, 5)),
            reconcile_fanout: None,
            sketch_min_items: SKETCH_MIN_ITEMS,
            dissemination: Dissemination::Gossip,
            client_change_permille: 0,
            heal: true,
            dir: None,
        };
        // Drawn last, so the fields above keep their values per seed.
        config.client_change_permille = between(100, 500) as u32;
        if between(0, 1) == 1 {
            config.dissemination = Dissemination::Regions;
        }
        if between(0, 1) == 1 {
            config.reconcile_fanout = Some(Fanout {
                local: between(1, 2) as usize,
                remote: 1,
            });
        }
        if between(0, 1) == 1 {
            config.sketch_min_items = 1;
        }
        config
    }

    /// Regions the WAN matrix has.
    pub const MAX_WAN_REGIONS: usize = super::wan::SITES.len();

    /// A run at scale for `seed`: `nodes` in `regions` of the WAN matrix,
    /// about 20 client writes a second over 100 key documents and 2 texts
    /// for `steps` steps, messages lost at `loss_permille`, and no other
    /// fault unless `fault_permille` asks for them (partitions, regions cut
    /// off, crashes and restarts, as in seeded runs). Writes are pushed
    /// along region trees ([`Dissemination::Regions`]), and each
    /// anti-entropy round reconciles with 2 peers of the node's region and
    /// 1 of another ([`Fanout`]).
    pub fn at_scale(
        seed: u64,
        nodes: usize,
        regions: usize,
        steps: usize,
        loss_permille: u32,
        fault_permille: u32,
    ) -> SimConfig {
        SimConfig {
            seed,
            nodes,
            regions,
            latency: Latency::Wan,
            steps,
            text_docs: 2,
            key_docs: 100,
            max_step_gap: Duration::from_millis(100),
            loss_permille,
            duplicate_permille: 0,
            delay_permille: 0,
            fault_permille,
            client_change_permille: 100,
            max_active_syncs_per_peer: 32,
            max_queued_syncs_per_peer: 10_000,
            anti_entropy_interval: Duration::from_secs(30),
            retry_after: Duration::from_secs(5),
            reconcile_fanout: Some(SCALE_FANOUT),
            sketch_min_items: SKETCH_MIN_ITEMS,
            dissemination: Dissemination::Regions,
            heal: true,
            dir: None,
        }
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run -p causeway-cli -- sim --seed {} --nodes {} --regions {} --steps {}",
            self.seed, self.nodes, self.regions, self.steps
        );
        if self.latency == Latency::Wan {
            cmd.push_str(&format!(
                " --scale --loss {} --faults {}",
                self.loss_permille, self.fault_permille
            ));
        }
        let derived = match self.latency {
            Latency::Wan => Dissemination::Regions,
            Latency::Drawn => SimConfig::from_seed(self.seed).dissemination,
        };
        if self.dissemination != derived {
            cmd.push_str(match self.dissemination {
                Dissemination::Gossip => " --dissemination gossip",
                Dissemination::Regions => " --dissemination regions",
            });
        }
        let derived = match self.latency {
            Latency::Wan => Some(SCALE_FANOUT),
            Latency::Drawn => SimConfig::from_seed(self.seed).reconcile_fanout,
        };
        if self.reconcile_fanout != derived {
            match self.reconcile_fanout {
                Some(f) => cmd.push_str(&format!(" --reconcile-fanout {},{}", f.local, f.remote)),
                None => cmd.push_str(" --reconcile-fanout all"),
            }
        }
        if !self.heal {
            cmd.push_str(" --no-heal");
        }
        cmd
    }

    /// Documents in the run's key space.
    pub fn docs(&self) -> usize {
        self.text_docs + self.key_docs
    }

    /// How long after the heal the replicas must have converged.
    ///
    /// After the heal every pair of nodes is connected. A pair that stayed
    /// connected through the fault phase repairs what it lost at its next
    /// anti-entropy round (at most 1.25 intervals away, with jitter); each
    /// round queues at most `max_queued_syncs_per_peer` documents, so a
    /// backlog takes `docs / max_queued` rounds. Unanswered messages are
    /// retried after `retry_after`. Ten seconds cover the round trips.
    pub fn convergence_bound(&self) -> Duration {
        let rounds = self.docs().div_ceil(self.max_queued_syncs_per_peer.max(1)) as u32;
        self.anti_entropy_interval * 5 / 4 * rounds + self.retry_after * 2 + Duration::from_secs(10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_drawn_within_their_ranges_and_replay() {
        for seed in 0..200 {
            let c = SimConfig::from_seed(seed);
            assert_eq!(c, SimConfig::from_seed(seed));
            assert!((3..=5).contains(&c.nodes) && (2..=3).contains(&c.regions));
            assert!((200..=400).contains(&c.steps));
            assert!(c.loss_permille <= 100 && c.max_active_syncs_per_peer >= 1);
            assert!(c.replay_command().contains(&format!("--seed {seed} ")));
        }
        assert_ne!(SimConfig::from_seed(1), SimConfig::from_seed(2));
    }
}
