//! The replication protocol, free of I/O: what a node sends, to whom, and
//! what it does with what it receives.
//!
//! The [`Replicator`] is driven by its caller, quinn-proto style:
//!
//! 1. The caller commits local writes through the [`Engine`](crate::Engine)
//!    and then reports them with [`Replicator::handle_local_commit`] (so every
//!    change is durable before it can leave the node).
//! 2. Connections and disconnections go to [`Replicator::handle_connect`] and
//!    [`Replicator::handle_disconnect`]; received bytes to
//!    [`Replicator::handle_message`], whose [`Verdict`] tells a gossip layer
//!    whether to forward the message.
//! 3. The caller drains [`Replicator::poll_output`] (publish to all, send to
//!    one peer, report a misbehaving peer) and calls
//!    [`Replicator::handle_timeout`] once [`Replicator::poll_timeout`] is due.
//!
//! Time (`now`, a [`Duration`](std::time::Duration) since any fixed origin)
//! and randomness ([`random::Random`]) are arguments; the core reads no clock
//! and draws no random numbers of its own, so a simulator can replay it.
//!
//! * [`ids`]: validated names of nodes, regions and clusters.
//! * [`wire`]: the versioned CBOR envelope and every message, with limits.
//! * [`reconcile`]: range-based set reconciliation over `(document id,
//!   digest of heads)`, which finds the documents two nodes disagree on.
//! * [`progress`]: which heads each peer is known to hold.
//! * `held_share`: each peer's share of the changes held for missing
//!   dependencies.
//! * [`topology`]: the region trees and bridges pushed writes travel.
//! * [`random`]: randomness as an input.

mod held_share;
pub mod ids;
pub mod progress;
pub mod random;
pub mod reconcile;
mod replicator;
pub mod topology;
pub mod wire;

pub use self::replicator::{
    reason_name, BadFanout, Channel, Collection, CollectionPass, Dissemination, Fanout, Holder,
    Inbound, Members, Output, QueueDepths, Rejection, Replicator, ReplicatorConfig, Settlement,
    Stats, Verdict, COLLECTION_PAGE, CONTACT_RECORD_INTERVAL, MAX_ACK_READS, MAX_BUNDLES_IN_FLIGHT,
    MAX_CATCH_UP_DOCS, MAX_CONFIRMATIONS_PER_PEER, MAX_HELD_REPAIRS_PER_SCAN, MAX_PENDING_FETCHES,
    MAX_UNACKED_PUSHES, MAX_UNACKED_PUSH_BYTES, MIN_PUSH_RETRY, STALL_ROUNDS,
};
