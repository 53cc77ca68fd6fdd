//! # causeway-node
//!
//! Everything around the engine that is networked, asynchronous or
//! configurable: the libp2p swarm that carries the replication core's
//! messages between nodes ([`network`]), the embeddable [`Node`], the HTTP
//! API ([`http`]), the automerge-repo sync server ([`automerge_repo`]), configuration ([`config`], [`settings`]), identity,
//! metrics, and what the `causeway` binary's node, client, demo and
//! simulator subcommands run. All decisions about data stay in
//! `causeway-engine`; benchmarks and the chaos harness are in
//! `causeway-lab`, the binary in `causeway-cli`.
//!
//! ## Running a peer inside an app
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use causeway_engine::replication::ids::{ClusterId, Region};
//! use causeway_engine::{Engine, EngineConfig};
//! use causeway_node::{identity, Node, NodeConfig};
//!
//! let engine = Engine::open("data/store", EngineConfig::default())?;
//! let (key, _) = identity::load_or_create("data".as_ref())?;
//! let mut config = NodeConfig::new(Region::new("edge")?, ClusterId::new("shop")?);
//! config.bootstrap = vec!["/dns4/eu.example.net/tcp/7700".parse()?];
//! let node = Node::start(engine.clone(), key, config)?;
//! // ... write through `engine` as usual; every commit is replicated ...
//! node.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod access;
pub mod automerge_repo;
pub mod backup;
pub mod client;
pub mod cluster_key;
pub mod config;
pub mod daemon;
pub mod demo;
mod guarded_file;
pub mod http;
pub mod identity;
pub mod local_cluster;
pub mod membership;
pub mod network;
mod node;
pub mod settings;

pub use self::network::metrics;
pub mod sim;

pub use self::config::{ConfigError, NodeConfig};
pub use self::network::driver::LOCAL_EVENT_QUEUE;
pub use self::node::{Node, NodeError, NodeHandle, PeerHolding, RegionWait, COMMAND_QUEUE};
