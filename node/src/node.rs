//! A networked peer around an [`Engine`]: what `causeway node` runs, and what
//! an edge app runs in-process to be a peer itself.
//!
//! [`Node::start`] spawns one thread, `causeway-net`, with its own
//! single-threaded tokio runtime
//! ([`network::runtime`](crate::network::runtime)); the
//! [`Driver`](crate::network::driver) on it owns the libp2p swarm and the
//! replication core. Local writes reach it through the engine's event
//! subscription, whose committing thread wakes it, so anything committed
//! through the engine (by the HTTP API or by the app directly) is
//! replicated. The returned [`NodeHandle`] talks to the
//! thread through bounded channels.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use causeway_engine::automerge::ChangeHash;
use causeway_engine::replication::{Collection, Replicator, ReplicatorConfig, MAX_PENDING_FETCHES};
use causeway_engine::{DocId, Engine};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::{ConfigError, NodeConfig, GC_INTERVAL};
use crate::membership::Membership;
use crate::network::behaviour::{build_swarm, BuildError, Protocols};
use crate::network::driver::{node_id, Command, Driver, Inputs, LocalCommits, Parts};
use crate::network::ephemeral::{EphemeralRelay, EPHEMERAL_QUEUE};
use crate::network::metrics::NodeMetrics;
use crate::network::sanctions::Sanctions;
use crate::network::{NetworkStatus, RegionNeed, RegionWaiter};

/// Commands queued from handles to the networking task.
pub const COMMAND_QUEUE: usize = 64;

/// What one peer is known to hold of a document (see
/// [`NodeHandle::holders`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHolding {
    /// The peer id.
    pub peer: String,
    /// Its region, if known.
    pub region: Option<String>,
    /// Whether its latest report covers the heads asked about.
    pub holds: bool,
    /// The heads it last reported, if any.
    pub heads: Option<Vec<ChangeHash>>,
    /// How long ago that report arrived.
    pub reported_ago: Option<Duration>,
}

/// How far a write got (see [`NodeHandle::wait_for_regions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionWait {
    /// Whether the regions asked for hold it.
    pub satisfied: bool,
    /// Regions other than this node's known to hold it, in name order.
    pub regions: Vec<String>,
}

/// Why a node could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is invalid (caller error).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The swarm could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The engine refused (storage errors are fatal).
    #[error(transparent)]
    Engine(#[from] causeway_engine::Error),
    /// The runtime or the thread could not be created.
    #[error("cannot start the networking thread: {0}")]
    Thread(std::io::Error),
    /// The blocks of misbehaving peers could not be read.
    #[error(transparent)]
    Sanctions(#[from] crate::network::sanctions::SanctionsError),
    /// Too much work of this kind is waiting already; try again later.
    #[error("busy: {0}")]
    Busy(String),
    /// The networking task is gone (stopped, or failed with this reason).
    #[error("the node stopped: {0}")]
    Stopped(String),
    /// The store holds documents but last reconciled with a member of the
    /// cluster longer ago than the garbage collection grace period: its
    /// peers may have collected documents deleted since, and this store
    /// would bring them back (see `docs/operations.md`, "Garbage
    /// collection").
    #[error(
        "stale_store: this store last reconciled with a member of the cluster {age_secs} s ago, \
         longer than the garbage collection grace period (engine.gc_grace_secs = {grace_secs}); \
         its peers may have collected documents deleted since, and this store would bring them \
         back. Move its store (the `store` directory in the data directory) aside and start the \
         node again with its identity: it rebuilds from its peers (docs/operations.md, \
         \"Garbage collection\")"
    )]
    StaleStore {
        /// Seconds since the last contact.
        age_secs: u64,
        /// The grace period, seconds.
        grace_secs: u64,
    },
}

/// A networked node. See [`Node::start`].
#[derive(Debug)]
pub struct Node;

/// A running node: ask for its status, block peers, scrape its metrics,
/// shut it down. Cheap to clone. When every clone is dropped without
/// [`NodeHandle::shutdown`], the node shuts down the same way.
#[derive(Clone)]
pub struct NodeHandle {
    peer_id: PeerId,
    region: String,
    commands: mpsc::Sender<Command>,
    registry: Arc<Registry>,
    done: watch::Receiver<Option<Result<(), String>>>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    ephemeral: broadcast::Sender<Arc<EphemeralRelay>>,
    fetch_misses: broadcast::Sender<DocId>,
}

impl Node {
    /// Starts a peer for `engine` with identity `key`: listens, dials the
    /// bootstrap peers, and replicates every document of the engine with
    /// the cluster. Returns once the networking thread runs (listening
    /// happens right after; see [`NodeHandle::listen_addrs`]).
    pub fn start(
        engine: Engine,
        key: Keypair,
        config: NodeConfig,
    ) -> Result<NodeHandle, NodeError> {
        config.validate()?;
        let collection = collection(&engine, &config)?;
        let peer_id = key.public().to_peer_id();
        if let Some(members) = &config.membership {
            members
                .admits_self(&peer_id, &config.region)
                .map_err(|reason| ConfigError {
                    field: "membership_file",
                    reason,
                })?;
        }
        let region = config.region.to_string();
        let node = node_id(&peer_id);
        let mut registry = Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let libp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
        let protocols = Protocols::new(&config.cluster)?;
        let runtime = crate::network::runtime().map_err(NodeError::Thread)?;
        let swarm = {
            let _context = runtime.enter();
            build_swarm(key, &config, &protocols, &mut registry)?
        };
        let mut core_config =
            ReplicatorConfig::new(node, config.region.clone(), config.cluster.clone());
        core_config.collection = collection;
        core_config.anti_entropy_interval = config.anti_entropy_interval;
        core_config.dissemination = config.dissemination;
        core_config.reconcile_fanout = config.reconcile_fanout;
        core_config.min_push_retry = config.min_push_retry;
        let start = Instant::now();
        let mut core = Replicator::new(engine.clone(), core_config, Duration::ZERO)?;
        core.set_members(
            Duration::ZERO,
            config.membership.as_ref().map(Membership::to_core),
        )?;
        let local = LocalCommits::subscribe(&engine)?;
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let seed = seed(&peer_id);
        let sanctions = match &config.sanctions_file {
            Some(path) => Sanctions::load(path, Instant::now())?,
            None => Sanctions::in_memory(),
        };
        let (ephemeral, _) = broadcast::channel(EPHEMERAL_QUEUE);
        let (fetch_misses, _) = broadcast::channel(MAX_PENDING_FETCHES);
        let mut driver = Driver::new(Parts {
            sanctions,
            ephemeral: ephemeral.clone(),
            fetch_misses: fetch_misses.clone(),
            swarm,
            core,
            config,
            protocols,
            metrics,
            libp2p_metrics,
            start,
            seed,
        });
        let (done_tx, done) = watch::channel(None);
        let inputs = Inputs { local, commands };
        let thread = std::thread::Builder::new()
            .name("causeway-net".into())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    driver.listen()?;
                    driver.run(inputs).await
                });
                if let Err(e) = &result {
                    tracing::error!(error = %e, "the networking task failed; the node stops");
                }
                let _ = done_tx.send(Some(result.map_err(|e| e.to_string())));
            })
            .map_err(NodeError::Thread)?;
        Ok(NodeHandle {
            peer_id,
            region,
            commands: commands_tx,
            registry: Arc::new(registry),
            done,
            thread: Arc::new(Mutex::new(Some(thread))),
            ephemeral,
            fetch_misses,
        })
    }
}

/// Garbage collection's settings for this node: on with a membership list
/// and a grace period. Refuses a store that holds documents and has been out
/// of contact with the cluster for longer than the grace period.
fn collection(engine: &Engine, config: &NodeConfig) -> Result<Option<Collection>, NodeError> {
    let Some(grace) = config.gc_grace.filter(|_| config.membership.is_some()) else {
        return Ok(None);
    };
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if let Some(last) = engine.last_contact()? {
        let age_secs = wall.as_secs().saturating_sub(last);
        let holds_documents = !engine.list("", None, 1)?.ids.is_empty();
        if age_secs > grace.as_secs() && holds_documents {
            return Err(NodeError::StaleStore {
                age_secs,
                grace_secs: grace.as_secs(),
            });
        }
    }
    Ok(Some(Collection {
        grace,
        interval: GC_INTERVAL,
        clock_origin: wall,
    }))
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The metrics registry (this node's and libp2p's), for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A snapshot of the node's view of the cluster.
    pub async fn status(&self) -> Result<NetworkStatus, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Status(tx)).await?;
        rx.await.map_err(|_| self.stopped())
    }

    /// The addresses the node listens on now (empty before the first
    /// listener is up), each ending in `/p2p/<peer id>`. Cheap: suitable for
    /// readiness probes.
    pub async fn listening(&self) -> Result<Vec<Multiaddr>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Listening(tx)).await?;
        let addrs = rx.await.map_err(|_| self.stopped())?;
        let p2p = libp2p::multiaddr::Protocol::P2p(self.peer_id);
        Ok(addrs.into_iter().map(|a| a.with(p2p.clone())).collect())
    }

    /// The addresses the node listens on, once it listens on at least one
    /// (waiting up to `timeout`); each ends in `/p2p/<peer id>`.
    pub async fn listen_addrs(&self, timeout: Duration) -> Result<Vec<Multiaddr>, NodeError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let addrs = self.listening().await?;
            if !addrs.is_empty() {
                return Ok(addrs);
            }
            if tokio::time::Instant::now() >= until {
                return Err(NodeError::Stopped("no listen address came up".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts draining: the engine takes no new writes, and the node hands
    /// everything it holds to a peer; [`NodeHandle::status`]'s `drain`
    /// says when a peer holds all of it. Calling it again changes nothing.
    pub async fn drain(&self) -> Result<(), NodeError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Drain(done)).await?;
        rx.await.map_err(|_| self.stopped())
    }

    /// Waits until a drain started by [`NodeHandle::drain`] is done,
    /// looking every `every`.
    pub async fn drained(&self, every: Duration) -> Result<(), NodeError> {
        loop {
            let (reply, rx) = oneshot::channel();
            self.send(Command::Drained(reply)).await?;
            if rx.await.map_err(|_| self.stopped())? {
                return Ok(());
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Blocks (`true`) or unblocks (`false`) `peers`: their connections close
    /// and new ones are refused in both directions until unblocked.
    pub async fn block(&self, peers: Vec<PeerId>, blocked: bool) -> Result<(), NodeError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Block {
            peers,
            blocked,
            done,
        })
        .await?;
        rx.await.map_err(|_| self.stopped())
    }

    /// What every peer this node knows of holds of `doc`, judged against
    /// `heads` (see [`Replicator::holders`]), in peer id order.
    pub async fn holders(
        &self,
        doc: DocId,
        heads: Vec<ChangeHash>,
    ) -> Result<Vec<PeerHolding>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Holders { doc, heads, reply }).await?;
        let list = rx.await.map_err(|_| self.stopped())??;
        Ok(list
            .into_iter()
            .map(|(h, now)| PeerHolding {
                peer: h.peer.to_string(),
                region: h.region.map(|r| r.to_string()),
                holds: h.holds,
                heads: h.heads,
                reported_ago: h.reported_at.map(|at| now.saturating_sub(at)),
            })
            .collect())
    }

    /// Waits until regions other than this node's hold `heads` of `doc`, as
    /// `need` says, or until `timeout`. The write itself is already durable
    /// here; this only reports how far it got. Returns whether `need` was
    /// met and the regions known to hold the heads.
    pub async fn wait_for_regions(
        &self,
        doc: DocId,
        heads: Vec<ChangeHash>,
        need: RegionNeed,
        timeout: Duration,
    ) -> Result<RegionWait, NodeError> {
        let (reply, rx) = oneshot::channel();
        let waiter = RegionWaiter {
            doc: doc.clone(),
            heads: heads.clone(),
            need,
            reply,
        };
        self.send(Command::AwaitRegions(waiter)).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(regions))) => Ok(RegionWait {
                satisfied: true,
                regions,
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(self.stopped()),
            Err(_) => {
                let own = self.region.clone();
                let mut regions: Vec<String> = self
                    .holders(doc, heads)
                    .await?
                    .into_iter()
                    .filter(|h| h.holds)
                    .filter_map(|h| h.region)
                    .filter(|r| *r != own)
                    .collect();
                regions.sort();
                regions.dedup();
                Ok(RegionWait {
                    satisfied: false,
                    regions,
                })
            }
        }
    }

    /// Asks connected peers for `doc` (at most
    /// [`MAX_FETCH_PEERS`](crate::network::driver::MAX_FETCH_PEERS): some of
    /// this node's region, one of each other region). Returns how many were
    /// asked; the document arrives, if any of them has it, like any other
    /// replicated change, and if none has it, [`NodeHandle::fetch_misses`]
    /// names it once the last one said so.
    pub async fn fetch(&self, doc: DocId) -> Result<usize, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Fetch { doc, reply }).await?;
        rx.await.map_err(|_| self.stopped())
    }

    /// Documents asked for with [`NodeHandle::fetch`] that every asked peer
    /// said it lacks, from now on (at most
    /// [`MAX_PENDING_FETCHES`] waiting; a receiver further behind misses
    /// the oldest).
    pub fn fetch_misses(&self) -> broadcast::Receiver<DocId> {
        self.fetch_misses.subscribe()
    }

    /// Publishes an automerge-repo client's ephemeral message to the other
    /// nodes; fails only if the node stopped. Drops the message (counted in
    /// the `unsent` metric) when no other node is reachable.
    pub async fn publish_ephemeral(&self, relay: EphemeralRelay) -> Result<(), NodeError> {
        self.send(Command::PublishEphemeral(relay)).await
    }

    /// Ephemeral messages that clients of other nodes publish, from now on.
    /// A receiver that falls [`EPHEMERAL_QUEUE`] messages behind misses the
    /// oldest.
    pub fn ephemeral(&self) -> broadcast::Receiver<Arc<EphemeralRelay>> {
        self.ephemeral.subscribe()
    }

    /// This node's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Resolves when the node has stopped, with the reason if it failed.
    pub async fn stopped_with(&self) -> Result<(), String> {
        let mut done = self.done.clone();
        loop {
            if let Some(result) = done.borrow().clone() {
                return result;
            }
            if done.changed().await.is_err() {
                return Err("the networking thread vanished".into());
            }
        }
    }

    /// Stops listening, publishes the local commits made so far, waits
    /// (while they progress, see
    /// [`SHUTDOWN_HANDOFF_MAX`](crate::network::driver::SHUTDOWN_HANDOFF_MAX))
    /// until direct messages are delivered and connected peers hold the
    /// latest local commits, closes connections and joins the networking thread.
    /// Writes committed after this call are not published. The engine stays
    /// open; it belongs to the caller.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        let _ = self.commands.send(Command::Shutdown).await;
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| NodeError::Stopped(e.to_string()))?
                .map_err(|_| NodeError::Stopped("the networking thread panicked".into()))?;
        }
        self.stopped_with().await.map_err(NodeError::Stopped)
    }

    async fn send(&self, command: Command) -> Result<(), NodeError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| self.stopped())
    }

    fn stopped(&self) -> NodeError {
        let reason = match self.done.borrow().clone() {
            Some(Err(e)) => e,
            _ => "shut down".to_string(),
        };
        NodeError::Stopped(reason)
    }
}

/// Seed for the core's jitter: distinct per node and per start.
fn seed(peer: &PeerId) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let bytes = peer.to_bytes();
    bytes
        .iter()
        .fold(nanos, |acc, b| acc.rotate_left(8) ^ u64::from(*b))
}
