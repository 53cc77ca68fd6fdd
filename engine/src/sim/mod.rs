//! A deterministic cluster simulator (feature `sim`): N replication cores,
//! each over a real [`Engine`](crate::Engine) (RocksDB in a temporary
//! directory), joined by a simulated network, with client writes and faults,
//! all driven by one seed.
//!
//! A run has three phases:
//!
//! 1. **Setup.** Every node starts and connects to every other; node 0
//!    creates the text documents, which reach every node.
//! 2. **Faults.** [`SimConfig::steps`] steps, each a client write on a random
//!    live node or a fault action: a full partition (a random split, or one
//!    region cut off), a one-way partition, a heal, a crash (the core and its
//!    unsent messages are lost, the store stays) or a restart (store
//!    reopened, new actor). Messages meanwhile are lost, duplicated and
//!    delayed at the run's rates, on top of per-region-pair latency.
//! 3. **Heal and check.** Every fault ends; crashed nodes restart and every
//!    pair reconnects. The run continues until every replica holds the same
//!    heads for every document and the cluster is quiet, within
//!    [`SimConfig::convergence_bound`]. Then: identical JSON for every
//!    document on every node; every acknowledged write present everywhere;
//!    no queue beyond its bound; no honest node reported as misbehaving.
//!
//! Time is simulated and every random choice comes from the seed, so one
//! seed gives the same run, byte for byte ([`Report::trace`] digests every
//! delivered message and write). A run that fails carries the command that
//! replays it ([`Report::replay`]).
//!
//! What the simulation does not model: a crash that loses writes the engine
//! had not yet made durable (writes are acknowledged only after their fsync,
//! and the SIGKILL crash test covers the store itself), and byte corruption
//! on the wire (the transports authenticate every frame).

mod cluster;
mod config;
mod mesh;
mod network;
mod report;
mod spread;
mod wan;
mod workload;

use std::path::{Path, PathBuf};

pub use self::config::SimConfig;
pub use self::network::Latency;
pub use self::report::{quantile, Faults, Report, Summary};

#[cfg(feature = "fuzzing")]
pub(crate) use self::network::message_id;

/// Why a run could not be carried out (as opposed to a check failing, which
/// is reported in [`Report::violations`]).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// An engine operation failed: a storage failure, or a bug.
    #[error("engine: {0}")]
    Engine(#[from] crate::Error),
    /// The temporary directory for the stores could not be created.
    #[error("simulation directory in {path}: {source}")]
    Dir {
        /// Where it was to be created.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A generated node, region or cluster name was refused (a bug).
    #[error("generated name: {0}")]
    Name(#[from] crate::replication::ids::NameError),
    /// A client write was routed to a node that is down (a bug).
    #[error("node {0} is down")]
    NodeDown(usize),
    /// The configuration cannot be run (it names what is wrong).
    #[error("configuration: {0}")]
    Config(String),
}

/// A fresh temporary directory for stores under `base`, or by default under
/// `/dev/shm` where it exists (stores are opened often; tmpfs keeps that
/// fast), else the system temporary directory.
pub(crate) fn scratch_dir(
    base: Option<&Path>,
    prefix: &str,
) -> Result<tempfile::TempDir, SimError> {
    let base = match base {
        Some(d) => d.to_path_buf(),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .map_err(|source| SimError::Dir { path: base, source })
}

/// Runs one simulation.
pub fn run(config: &SimConfig) -> Result<Report, SimError> {
    cluster::Cluster::new(config)?.run()
}
