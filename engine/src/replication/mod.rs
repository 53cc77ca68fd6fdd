//! The replication protocol, free of I/O: what a node sends, to whom, and
//! what it does with what it receives.
//!
//! * [`ids`]: validated names of nodes, regions and clusters.
//! * [`wire`]: the versioned CBOR envelope and every message, with limits.
//! * [`reconcile`]: range-based set reconciliation over `(document id,
//!   digest of heads)`, which finds the documents two nodes disagree on.

pub mod ids;
pub mod reconcile;
pub mod wire;
