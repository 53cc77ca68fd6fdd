//! # causeway-node
//!
//! The `causeway` binary and the code around the engine that is not the engine:
//! today the embedded demo and the benchmarks; later the libp2p swarm, the HTTP
//! API and the node configuration. All decisions about data stay in
//! `causeway-engine`.

pub mod bench;
pub mod demo;
pub mod sim;
