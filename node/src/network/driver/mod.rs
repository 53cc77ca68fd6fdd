//! The networking task: the one owner of the swarm and of the replication
//! core, translating between them.
//!
//! Each turn of the loop takes one input (a swarm event, a local commit, a
//! command from a handle, the core's timer or the redial tick), hands it to
//! the replication core or the swarm, then drains every output the core
//! produced. Received messages are gathered first: after a swarm event the
//! loop takes every further swarm event already ready, up to a bound, and
//! hands their messages to the core in one batch (one WAL fsync; see
//! [`inbox`](super::inbox)). Engine calls block this task; that is the
//! point: a received change is durable before anything derived from it
//! leaves, and a slow disk slows replication instead of queueing unbounded
//! work.
//!
//! The task's work is split by part, each adding an `impl Driver` block:
//!
//! * `dialer`: dial targets with their backoff, connections coming and
//!   going, identify and discovery, the table of known peers.
//! * `traffic`: messages in (gossip and direct, within each peer's rate,
//!   gathered into the inbox) and out (the core's outputs, through the
//!   outbox's per-peer window), and local commits published.
//! * `guard`: who may take part: the membership list read again when it
//!   changes, sanctions of misbehaving peers, operators' blocks.
//! * `waiters`: writes waiting until other regions hold them.
//! * `report`: status and metrics.
//!
//! This module holds the task's state, its loop, commands and shutdown.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use causeway_engine::automerge::ChangeHash;
use causeway_engine::replication::ids::NodeId;
use causeway_engine::replication::random::SplitMix64;
use causeway_engine::replication::wire::SUPPORTED_VERSIONS;
use causeway_engine::replication::{
    reason_name, Channel, Holder, Output, Rejection, Replicator, Verdict,
};
use causeway_engine::{DocEvent, DocId};
use futures::{FutureExt, StreamExt};
use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::metrics::{Metrics as Libp2pMetrics, Recorder};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{gossipsub, identify, kad, request_response, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::{NodeConfig, LOW_DISK_MARGIN_DIVISOR};
use crate::membership::MembershipFile;
use crate::network::backoff::Backoff;
use crate::network::behaviour::{Behaviour, BehaviourEvent, Protocols};
use crate::network::frame::Receipt;
use crate::network::inbox::{self, Inbox, Received, Reply};
use crate::network::metrics::{KindLabel, NodeMetrics};
use crate::network::outbox::{Offer, Outbox};
use crate::network::rate::{Offer as RateOffer, Rates};
use crate::network::regions::{region_lags, PeerLag, RegionWaiter};
use crate::network::sanctions::{Sanction, Sanctions};
use crate::network::status::{
    Behind, CatchUpStatus, DiskStatus, DrainStatus, GcStatus, NetworkStatus, PeerState, PeerStatus,
};
use crate::NodeError;

mod dialer;
mod ephemeral;
mod guard;
mod local_commits;
mod report;
mod traffic;
mod waiters;

use self::dialer::{peer_of, Dialer, Target};
use self::guard::Guard;
pub use self::local_commits::{LocalCommits, LOCAL_EVENT_QUEUE, MAX_LOCAL_BURST};
use self::traffic::Traffic;
use crate::network::ephemeral::EphemeralRelay;

/// Addresses remembered per peer.
pub const MAX_ADDRS_PER_PEER: usize = 8;

/// Peers remembered (connected or not); discoveries beyond this are ignored.
pub const MAX_KNOWN_PEERS: usize = 1024;

/// How long shutdown waits without progress for the local commits still
/// queued, for direct messages already sent to be received, and for
/// connected peers to report that they hold this node's latest local
/// commits. Each step forward (a message delivered, a commit reported held)
/// starts the wait again, up to [`SHUTDOWN_HANDOFF_MAX`] in all.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// The longest shutdown hands writes to peers, however steadily they
/// progress (below the 90 s a service manager usually allows a stop).
pub const SHUTDOWN_HANDOFF_MAX: Duration = Duration::from_secs(30);

/// Latest local commits remembered (document and heads), so that shutdown
/// can wait until connected peers hold them.
pub const RECENT_COMMITS_KEPT: usize = 4096;

/// How often shutdown checks whether peers hold the latest local commits.
const HANDOFF_CHECK: Duration = Duration::from_millis(20);

/// Writes waiting at once for other regions to hold them; more are refused.
pub const MAX_REGION_WAITERS: usize = 1024;
/// Peers asked for a document a client wants and this node lacks.
pub const MAX_FETCH_PEERS: usize = 4;

/// A request from a [`NodeHandle`](crate::NodeHandle) to the task.
#[derive(Debug)]
pub enum Command {
    /// Report the status.
    Status(oneshot::Sender<NetworkStatus>),
    /// Report the addresses the node listens on (cheap; for probes).
    Listening(oneshot::Sender<Vec<Multiaddr>>),
    /// Block (or unblock) peers: their connections close and new ones are
    /// refused, in both directions.
    Block {
        /// The peers.
        peers: Vec<PeerId>,
        /// Block (true) or unblock (false).
        blocked: bool,
        /// Answered once done.
        done: oneshot::Sender<()>,
    },
    /// What every known peer holds of a document, judged against heads;
    /// each with the core's `now` at the time of the answer.
    Holders {
        /// The document.
        doc: DocId,
        /// The heads asked about.
        heads: Vec<ChangeHash>,
        /// The answer.
        reply: oneshot::Sender<Result<Vec<(Holder, Duration)>, causeway_engine::Error>>,
    },
    /// Answer once other regions hold a write.
    AwaitRegions(RegionWaiter),
    /// Ask connected peers for a document a client wants (see
    /// [`Replicator::fetch`]); answered with how many were asked.
    Fetch {
        /// The document.
        doc: DocId,
        /// How many peers were asked.
        reply: oneshot::Sender<usize>,
    },
    /// Publish an automerge-repo client's ephemeral message to the other
    /// nodes.
    PublishEphemeral(EphemeralRelay),
    /// Stop taking writes and hand everything this node holds to a peer
    /// (see [`Replicator::start_drain`]); answered once started.
    Drain(oneshot::Sender<()>),
    /// Whether a drain was started and is done (cheap; polled).
    Drained(oneshot::Sender<bool>),
    /// Stop listening, flush, close connections and end the task.
    Shutdown,
}

/// What the task knows of one peer.
#[derive(Debug, Default)]
pub(super) struct Peer {
    pub(super) addrs: BTreeSet<Multiaddr>,
    /// When it last connected or was learnt of.
    pub(super) seen: Option<Instant>,
    pub(super) connections: u32,
    pub(super) replicating: bool,
    pub(super) rtt: Option<Duration>,
}

/// The networking task's state.
pub struct Driver {
    swarm: Swarm<Behaviour>,
    core: Replicator,
    config: NodeConfig,
    protocols: Protocols,
    metrics: NodeMetrics,
    libp2p_metrics: Libp2pMetrics,
    start: Instant,
    random: SplitMix64,
    /// Dial targets and peers of other clusters.
    dialer: Dialer,
    peers: BTreeMap<PeerId, Peer>,
    listen_addrs: Vec<Multiaddr>,
    listeners: Vec<ListenerId>,
    /// Messages received and sent, and local commits published.
    traffic: Traffic,
    local_events_dropped: u64,
    /// The store's disk, as last looked at (see `report`).
    disk: DiskStatus,
    waiters: Vec<RegionWaiter>,
    /// Who may take part: membership, sanctions, blocks.
    guard: Guard,
    /// Ephemeral messages from other nodes, to this node's clients.
    ephemeral: tokio::sync::broadcast::Sender<Arc<EphemeralRelay>>,
    /// Documents fetched for clients that no asked peer has.
    fetch_misses: tokio::sync::broadcast::Sender<DocId>,
}

/// What a [`Driver`] is made of.
pub struct Parts {
    /// The swarm.
    pub swarm: Swarm<Behaviour>,
    /// The replication core.
    pub core: Replicator,
    /// The configuration.
    pub config: NodeConfig,
    /// The cluster's protocol names.
    pub protocols: Protocols,
    /// The node's metrics.
    pub metrics: NodeMetrics,
    /// libp2p's metrics, in the same registry.
    pub libp2p_metrics: Libp2pMetrics,
    /// The origin of the core's time.
    pub start: Instant,
    /// Seed of the core's randomness (jitter only).
    pub seed: u64,
    /// Blocks of misbehaving peers (those in force are applied at once).
    pub sanctions: Sanctions,
    /// Where ephemeral messages from other nodes go.
    pub ephemeral: tokio::sync::broadcast::Sender<Arc<EphemeralRelay>>,
    /// Where documents that no asked peer has go (see
    /// [`Replicator::take_fetch_misses`]).
    pub fetch_misses: tokio::sync::broadcast::Sender<DocId>,
}

/// The inputs of the task besides the swarm.
pub struct Inputs {
    /// Local commits (durable), from the engine's subscription.
    pub local: LocalCommits,
    /// Commands from handles.
    pub commands: mpsc::Receiver<Command>,
}

/// Why the task ended with an error. The node is stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The engine failed (storage errors are fatal).
    #[error("the engine failed: {0}")]
    Engine(#[from] causeway_engine::Error),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

impl Driver {
    /// A task over the swarm and core in `parts`.
    pub fn new(parts: Parts) -> Driver {
        let Parts {
            swarm,
            core,
            config,
            protocols,
            metrics,
            libp2p_metrics,
            start,
            seed,
            sanctions,
            ephemeral,
            fetch_misses,
        } = parts;
        let targets = config
            .bootstrap
            .iter()
            .map(|addr| Target::new(Some(addr.clone()), peer_of(addr), &config))
            .collect();
        // Half the peer's inbound stream limit (assuming its settings are
        // ours), so two connections to it cannot exceed it either.
        let outbox = Outbox::new(config.max_concurrent_streams / 2);
        let rates = Rates::new(
            config.max_peer_messages_per_sec,
            config.max_peer_bytes_per_sec,
        );
        let membership_file = config.membership_file.clone().map(MembershipFile::watching);
        let mut swarm = swarm;
        let blocked: BTreeSet<PeerId> = sanctions.blocked(SystemTime::now()).into_iter().collect();
        for peer in &blocked {
            swarm.behaviour_mut().blocklist.block_peer(*peer);
            info!(%peer, "peer still blocked for misbehaving");
        }
        Driver {
            swarm,
            core,
            config,
            protocols,
            metrics,
            libp2p_metrics,
            start,
            random: SplitMix64::new(seed),
            dialer: Dialer {
                targets,
                foreign: BTreeSet::new(),
            },
            peers: BTreeMap::new(),
            listen_addrs: Vec::new(),
            listeners: Vec::new(),
            traffic: Traffic {
                in_flight: HashMap::new(),
                outbox,
                inbox: Inbox::default(),
                recent: VecDeque::new(),
                rates,
            },
            local_events_dropped: 0,
            disk: DiskStatus::default(),
            waiters: Vec::new(),
            guard: Guard {
                blocked,
                operator_blocked: BTreeSet::new(),
                sanctions,
                membership_file,
            },
            ephemeral,
            fetch_misses,
        }
    }

    /// Starts listening on the configured addresses.
    pub fn listen(&mut self) -> Result<(), DriverError> {
        for addr in self.config.listen.clone() {
            let id = self
                .swarm
                .listen_on(addr.clone())
                .map_err(|e| DriverError::Listen {
                    addr,
                    reason: e.to_string(),
                })?;
            self.listeners.push(id);
        }
        Ok(())
    }

    /// Runs until a [`Command::Shutdown`] (or every handle is gone), or a
    /// fatal engine error.
    pub async fn run(mut self, mut inputs: Inputs) -> Result<(), DriverError> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut discovery = tokio::time::interval(self.config.discovery_interval);
        let mut metrics_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let deadline = self.start + self.core.poll_timeout();
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    self.on_swarm_event(event)?;
                    self.gather()?;
                }
                events = inputs.local.next_burst() => self.publish_local(events),
                command = inputs.commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(command) => self.on_command(command),
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    let now = self.now();
                    self.core.handle_timeout(now, &mut self.random)?;
                }
                _ = tick.tick() => {
                    self.redial();
                    self.release_waiting()?;
                }
                _ = discovery.tick() => self.discover(),
                _ = metrics_tick.tick() => {
                    self.local_events_dropped = inputs.local.dropped();
                    self.observe();
                    self.review_sanctions();
                    self.reload_membership();
                }
            }
            self.drain();
            self.check_waiters();
            for d in self.core.take_delays() {
                self.metrics.observe_delay(d.region.as_ref(), d.delay);
            }
            for doc in self.core.take_fetch_misses() {
                // No receiver (no automerge-repo endpoint) is not an error.
                let _ = self.fetch_misses.send(doc);
            }
        }
        self.shutdown(inputs).await;
        Ok(())
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> Result<(), DriverError> {
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(event) => return self.on_behaviour_event(event),
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.on_connected(peer_id, connection_id, &endpoint);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.connections = num_established;
                }
                if num_established == 0 {
                    let cause = cause.map_or_else(|| "closed".to_string(), |c| c.to_string());
                    debug!(peer = %peer_id, %cause, "disconnected");
                    self.on_disconnected(peer_id, cause);
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                debug!(from = %send_back_addr, peer = ?peer_id, %error, "refused an incoming connection");
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                self.on_dial_failure(connection_id, peer_id, error.to_string());
            }
            _ => {}
        }
        Ok(())
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) -> Result<(), DriverError> {
        match event {
            BehaviourEvent::Gossip(event) => {
                self.libp2p_metrics.record(&event);
                self.on_gossip(event)?;
            }
            BehaviourEvent::Direct(event) => self.on_direct(event)?,
            BehaviourEvent::Identify(event) => {
                self.libp2p_metrics.record(&event);
                if let identify::Event::Received { peer_id, info, .. } = event {
                    self.on_identified(peer_id, info);
                }
            }
            BehaviourEvent::Ping(event) => {
                self.libp2p_metrics.record(&event);
                if let (Ok(rtt), Some(p)) = (event.result, self.peers.get_mut(&event.peer)) {
                    p.rtt = Some(rtt);
                }
            }
            BehaviourEvent::Kad(event) => {
                self.libp2p_metrics.record(&event);
                if let kad::Event::RoutingUpdated {
                    peer, addresses, ..
                } = event
                {
                    self.learn(peer, addresses.into_vec());
                }
            }
            BehaviourEvent::Allowlist(v) | BehaviourEvent::Blocklist(v) => match v {},
            BehaviourEvent::Limits(v) => match v {},
        }
        Ok(())
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listening(reply) => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Block {
                peers,
                blocked,
                done,
            } => {
                for peer in peers {
                    self.block(peer, blocked);
                }
                let _ = done.send(());
            }
            Command::Holders { doc, heads, reply } => {
                let now = self.now();
                let holders = self
                    .core
                    .holders(&doc, &heads)
                    .map(|list| list.into_iter().map(|h| (h, now)).collect());
                let _ = reply.send(holders);
            }
            Command::AwaitRegions(waiter) => self.await_regions(waiter),
            Command::Fetch { doc, reply } => {
                let now = self.now();
                let asked = match self.core.fetch(now, &doc, MAX_FETCH_PEERS) {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(%doc, error = %e, "cannot ask peers for a document");
                        0
                    }
                };
                let _ = reply.send(asked);
            }
            Command::PublishEphemeral(relay) => self.publish_ephemeral(&relay),
            Command::Drain(done) => {
                if self.core.drain().is_none() {
                    info!("draining: no new writes; handing everything this node holds to a peer");
                    self.core.engine().start_draining();
                    let now = self.now();
                    self.core.start_drain(now, &mut self.random);
                }
                let _ = done.send(());
            }
            Command::Drained(reply) => {
                let done = self.core.drain().is_some_and(|d| d.done_at.is_some());
                let _ = reply.send(done);
            }
            Command::Shutdown => {}
        }
    }

    /// Stops listening, publishes the local commits still queued (every
    /// write acknowledged by now is: its event is queued before the write
    /// returns; for up to [`SHUTDOWN_FLUSH`], in case an embedding app
    /// goes on writing faster than they go out), then waits until
    /// the direct messages sent by then are delivered and every connected
    /// peer holds the latest local commits, so that a write acknowledged
    /// just before the stop is not left on this node alone: while that
    /// progresses, for up to [`SHUTDOWN_HANDOFF_MAX`], and no more than
    /// [`SHUTDOWN_FLUSH`] without progress.
    async fn shutdown(mut self, inputs: Inputs) {
        info!("shutting down: no new connections, handing the latest writes to peers");
        for id in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(id);
        }
        let until = Instant::now() + SHUTDOWN_FLUSH;
        while Instant::now() < until {
            let events = inputs.local.take();
            if events.is_empty() {
                break;
            }
            self.publish_local(events);
            self.drain();
        }
        self.drain();
        // The messages to wait for: those out now. Answers this node goes
        // on sending to peers' syncs meanwhile are not waited for (under
        // steady traffic some would always be in flight); those peers
        // repair what they miss.
        let waited: Vec<request_response::OutboundRequestId> =
            self.traffic.in_flight.keys().copied().collect();
        let mut check = tokio::time::interval(HANDOFF_CHECK);
        let cap = tokio::time::Instant::now() + SHUTDOWN_HANDOFF_MAX;
        let mut stall = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
        let mut left = (usize::MAX, usize::MAX);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    let handled = self.on_swarm_event(event).and_then(|()| self.gather());
                    if let Err(e) = handled {
                        warn!(error = %e, "stopped handing writes to peers");
                        break;
                    }
                    self.drain();
                }
                _ = check.tick() => {
                    let in_flight = waited
                        .iter()
                        .filter(|id| self.traffic.in_flight.contains_key(id))
                        .count();
                    let now_left = (in_flight, self.recent_not_held());
                    if now_left == (0, 0) {
                        info!("the latest writes are held by every connected peer");
                        break;
                    }
                    if now_left.0 < left.0 || now_left.1 < left.1 {
                        stall = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
                    }
                    left = now_left;
                }
                () = tokio::time::sleep_until(stall.min(cap)) => {
                    warn!(
                        in_flight = left.0,
                        writes_not_held = left.1,
                        "shutdown hand-off stopped; anti-entropy delivers the rest once this node is back"
                    );
                    break;
                }
            }
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        info!("network stopped");
    }
}

pub use crate::identity::node_id;

/// A metric label.
pub(super) fn kind(kind: &str) -> KindLabel {
    KindLabel {
        kind: kind.to_string(),
    }
}
