//! The networking layer: libp2p around the engine's replication core.
//!
//! * [`behaviour`]: the libp2p behaviours and how the swarm is built.
//! * [`frame`]: length-prefixed frames for direct messages.
//! * [`driver`]: the task that owns the swarm and the core.
//! * [`ephemeral`]: automerge-repo clients' ephemeral messages between
//!   nodes.
//! * [`metrics`]: the node's `causeway_*` metrics.
//! * [`inbox`]: received messages waiting to be applied in one batch.
//! * [`backoff`]: redial delays for unreachable peers.
//! * [`outbox`]: at most a window of direct messages in flight per peer.
//! * [`private_network`]: the handshake under the cluster key, accepting
//!   several keys during a rotation.
//! * [`rate`]: per-peer message and byte rates on what is received.
//! * [`sanctions`]: peers that keep sending refused messages are blocked,
//!   across restarts.
//! * [`status`]: what the task reports about the cluster.
//! * [`regions`]: writes waiting for other regions; lag per peer and
//!   region.

pub mod backoff;
pub mod behaviour;
pub mod driver;
pub mod ephemeral;
pub mod frame;
pub mod inbox;
pub mod metrics;
pub mod outbox;
pub mod private_network;
pub mod rate;
pub mod regions;
pub mod sanctions;
pub mod status;

pub use self::regions::{PeerLag, RegionNeed, RegionWaiter};
pub use self::status::{Behind, CatchUpStatus, NetworkStatus, PeerState, PeerStatus, RegionStatus};

/// The runtime of a node's networking task: single-threaded. Its one
/// thread (a node's `causeway-net`) runs the task, and through it the
/// replication core's engine calls, and the tasks of the swarm's
/// connections.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
