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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use causeway_engine::automerge::ChangeHash;
use causeway_engine::replication::ids::NodeId;
use causeway_engine::replication::random::SplitMix64;
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

use super::backoff::Backoff;
use super::behaviour::{Behaviour, BehaviourEvent, Protocols};
use super::codec::Receipt;
use super::inbox::{self, Inbox, Received, Reply};
use super::outbox::{Offer, Outbox};
use super::progress::{region_lags, PeerLag, RegionWaiter};
use super::rate::{Offer as RateOffer, Rates};
use super::sanctions::{Sanction, Sanctions};
use super::status::{Behind, NetworkStatus, PeerState, PeerStatus};
use crate::config::NodeConfig;
use crate::membership::MembershipFile;
use crate::metrics::{KindLabel, NodeMetrics};
use crate::NodeError;

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
/// Local commits taken from the queue in one turn and published together
/// (see [`Replicator::handle_local_commits`]).
pub const MAX_LOCAL_BURST: usize = 1024;
/// Writes waiting at once for other regions to hold them; more are refused.
pub const MAX_REGION_WAITERS: usize = 1024;

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
    /// Stop listening, flush, close connections and end the task.
    Shutdown,
}

/// A dial target: a bootstrap address, or a peer learnt from discovery.
#[derive(Debug)]
struct Target {
    addr: Option<Multiaddr>,
    peer: Option<PeerId>,
    backoff: Backoff,
    next_dial: Instant,
    pending: Option<ConnectionId>,
    last_error: Option<String>,
}

impl Target {
    /// A target due now.
    fn new(addr: Option<Multiaddr>, peer: Option<PeerId>, config: &NodeConfig) -> Target {
        Target {
            addr,
            peer,
            backoff: Backoff::new(config.reconnect_min, config.reconnect_max),
            next_dial: Instant::now(),
            pending: None,
            last_error: None,
        }
    }
}

/// What the task knows of one peer.
#[derive(Debug, Default)]
struct Peer {
    addrs: BTreeSet<Multiaddr>,
    /// When it last connected or was learnt of.
    seen: Option<Instant>,
    connections: u32,
    replicating: bool,
    rtt: Option<Duration>,
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
    targets: Vec<Target>,
    peers: BTreeMap<PeerId, Peer>,
    /// Peers blocked now, by an operator or a sanction.
    blocked: BTreeSet<PeerId>,
    /// Peers an operator blocked (a sanction ending does not unblock them).
    operator_blocked: BTreeSet<PeerId>,
    /// Peers identified as members of another cluster: not rediscovered.
    foreign: BTreeSet<PeerId>,
    listen_addrs: Vec<Multiaddr>,
    listeners: Vec<ListenerId>,
    in_flight: HashMap<request_response::OutboundRequestId, PeerId>,
    outbox: Outbox<PeerId>,
    local_events_dropped: u64,
    waiters: Vec<RegionWaiter>,
    inbox: Inbox,
    /// The latest local commits, oldest first, at most
    /// [`RECENT_COMMITS_KEPT`].
    recent: VecDeque<(DocId, Vec<ChangeHash>)>,
    sanctions: Sanctions,
    /// Each peer's message and byte rate, and its direct messages waiting
    /// for it.
    rates: Rates<Received>,
    /// The membership file, watched for changes (if the list came from one).
    membership_file: Option<MembershipFile>,
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
}

/// The inputs of the task besides the swarm.
pub struct Inputs {
    /// Local commits (durable), from the engine's subscription.
    pub local: mpsc::Receiver<DocEvent>,
    /// Commands from handles.
    pub commands: mpsc::Receiver<Command>,
    /// How many local commits the subscription lost so far.
    pub local_dropped: Box<dyn Fn() -> u64 + Send>,
    /// Set by the task when it stops: the feeder of `local` then forwards
    /// what is queued and closes it.
    pub stopping: Arc<AtomicBool>,
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
            targets,
            peers: BTreeMap::new(),
            blocked,
            operator_blocked: BTreeSet::new(),
            foreign: BTreeSet::new(),
            listen_addrs: Vec::new(),
            listeners: Vec::new(),
            in_flight: HashMap::new(),
            outbox,
            local_events_dropped: 0,
            waiters: Vec::new(),
            inbox: Inbox::default(),
            recent: VecDeque::new(),
            sanctions,
            rates,
            membership_file,
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
                Some(event) = inputs.local.recv() => {
                    self.publish_local(burst(event, &mut inputs.local));
                }
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
                    self.local_events_dropped = (inputs.local_dropped)();
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
        }
        self.shutdown(inputs).await;
        Ok(())
    }

    /// Publishes local commits and remembers them for shutdown.
    fn publish_local(&mut self, events: Vec<DocEvent>) {
        for e in &events {
            if self.recent.len() == RECENT_COMMITS_KEPT {
                self.recent.pop_front();
            }
            self.recent.push_back((e.doc.clone(), e.heads.clone()));
        }
        let now = self.now();
        self.core.handle_local_commits(
            now,
            events
                .into_iter()
                .map(|e| (e.doc, e.changes.to_vec(), e.heads)),
        );
    }

    /// How many remembered local commits some connected peer has not
    /// reported holding yet (a peer that reported holding a document's
    /// newest remembered heads holds the older ones too).
    fn recent_not_held(&self) -> usize {
        let connected: BTreeSet<&NodeId> = self.core.connected().collect();
        if connected.is_empty() {
            return 0;
        }
        let mut seen = BTreeSet::new();
        self.recent
            .iter()
            .rev()
            .filter(|(doc, _)| seen.insert(doc.clone()))
            .filter(|(doc, heads)| match self.core.holders(doc, heads) {
                Ok(holders) => {
                    let holding = holders
                        .iter()
                        .filter(|h| h.holds && connected.contains(&h.peer))
                        .count();
                    holding < connected.len()
                }
                Err(_) => false,
            })
            .count()
    }

    /// Sends one direct message (the outbox counted it in flight).
    fn send_direct(&mut self, peer: PeerId, bytes: Vec<u8>) {
        let id = self.swarm.behaviour_mut().direct.send_request(&peer, bytes);
        self.in_flight.insert(id, peer);
    }

    /// A direct message was answered or failed: its slot in the peer's
    /// window goes to the next queued message.
    fn direct_completed(&mut self, request_id: request_response::OutboundRequestId) {
        if let Some(peer) = self.in_flight.remove(&request_id) {
            if let Some(next) = self.outbox.completed(&peer) {
                self.send_direct(peer, next);
            }
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Takes the swarm events that are ready without waiting, while the
    /// inbox has room, then applies the messages they brought.
    fn gather(&mut self) -> Result<(), DriverError> {
        // Non-message events count too, so that a stream of them cannot
        // keep this turn going.
        let mut budget = inbox::MAX_BATCH_MESSAGES;
        while !self.inbox.is_empty() && self.inbox.has_room() && budget > 0 {
            let Some(Some(event)) = self.swarm.next().now_or_never() else {
                break;
            };
            self.on_swarm_event(event)?;
            budget -= 1;
        }
        self.apply_received()
    }

    /// Hands the inbox to the core in one batch (durable on return), then
    /// sends each message's verdict where it goes.
    fn apply_received(&mut self) -> Result<(), DriverError> {
        if self.inbox.is_empty() {
            return Ok(());
        }
        let batch = self.inbox.take();
        let verdicts = self
            .core
            .handle_messages(self.now(), batch.iter().map(Received::inbound))?;
        self.metrics.received_batches.inc();
        self.metrics.received_batched.inc_by(batch.len() as u64);
        for (message, verdict) in batch.into_iter().zip(verdicts) {
            match message.reply {
                Reply::Gossip { id, source } => {
                    self.swarm
                        .behaviour_mut()
                        .gossip
                        .report_message_validation_result(&id, &source, inbox::acceptance(verdict));
                }
                Reply::Direct(channel) => {
                    // The peer may be gone already; nothing to do then.
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .direct
                        .send_response(channel, inbox::receipt(verdict));
                }
            }
        }
        Ok(())
    }

    /// Hands every output of the core to the swarm.
    fn drain(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Publish(bytes) => {
                    let topic = self.protocols.topic.clone();
                    if let Err(e) = self.swarm.behaviour_mut().gossip.publish(topic, bytes) {
                        debug!(error = %e, "gossip publication reached no peer");
                        self.metrics.publish_failures.inc();
                    }
                }
                Output::Send { to, bytes } => match PeerId::from_str(to.as_str()) {
                    Ok(peer) => match self.outbox.offer(&peer, bytes) {
                        Offer::Send(bytes) => self.send_direct(peer, bytes),
                        Offer::Queued => {}
                        Offer::QueuedDroppingOldest => {
                            self.metrics.direct_dropped.inc();
                        }
                    },
                    Err(e) => {
                        warn!(peer = %to, error = %e, "the core addressed a peer id that does not parse")
                    }
                },
                Output::Misbehaving { peer, reason } => match PeerId::from_str(peer.as_str()) {
                    Ok(peer) => self.sanction(peer, &reason),
                    Err(e) => {
                        warn!(%peer, error = %e, "the core reported a peer id that does not parse")
                    }
                },
            }
        }
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

    fn on_gossip(&mut self, event: gossipsub::Event) -> Result<(), DriverError> {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return Ok(());
        };
        if !self
            .rates
            .admit(&propagation_source, message.data.len(), Instant::now())
        {
            // Over the relay's rate: dropped unforwarded, not penalised;
            // anti-entropy repairs what it carried.
            self.metrics
                .rate_limited
                .get_or_create(&kind("gossip"))
                .inc();
            self.swarm
                .behaviour_mut()
                .gossip
                .report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    inbox::acceptance(Verdict::Ignore),
                );
            return Ok(());
        }
        // Strict validation: gossipsub checked the author's signature, so
        // a message without one does not reach here; refuse it if it did.
        let author = message.source;
        if let (true, Some(author)) = (message.topic == self.protocols.topic.hash(), author) {
            self.inbox.push(Received {
                from: node_id(&propagation_source),
                author: node_id(&author),
                channel: Channel::Gossip,
                bytes: message.data,
                reply: Reply::Gossip {
                    id: message_id,
                    source: propagation_source,
                },
            });
        } else {
            self.swarm
                .behaviour_mut()
                .gossip
                .report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    inbox::acceptance(Verdict::Reject),
                );
        }
        Ok(())
    }

    fn on_direct(
        &mut self,
        event: request_response::Event<Vec<u8>, Receipt>,
    ) -> Result<(), DriverError> {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    // A request on this cluster's protocol proves the peer is
                    // a member, even before identify says so.
                    self.start_replicating(peer);
                    let len = request.len();
                    let received = Received {
                        from: node_id(&peer),
                        author: node_id(&peer),
                        channel: Channel::Direct,
                        bytes: request,
                        reply: Reply::Direct(channel),
                    };
                    match self.rates.offer(peer, len, received, Instant::now()) {
                        RateOffer::Now(received) => self.inbox.push(received),
                        RateOffer::Later => {
                            self.metrics
                                .rate_limited
                                .get_or_create(&kind("direct"))
                                .inc();
                        }
                        // Unanswered: the peer's core sends it again later.
                        RateOffer::Dropped(_) => {
                            self.metrics
                                .rate_limited
                                .get_or_create(&kind("direct_dropped"))
                                .inc();
                        }
                    }
                }
                request_response::Message::Response { request_id, .. } => {
                    self.direct_completed(request_id);
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.direct_completed(request_id);
                self.metrics.send_failures.inc();
                debug!(%peer, %error, "direct message failed; the core retries the work");
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound direct message failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
        Ok(())
    }

    fn on_connected(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        // The backoff resets only once the peer replicates: a connection to
        // a peer of another cluster is a failure too.
        for t in &mut self.targets {
            if t.pending == Some(id) || t.peer == Some(peer) {
                t.pending = t.pending.filter(|p| *p != id);
                t.peer = Some(peer);
            }
        }
        if let Some(p) = self.peer_entry(peer) {
            p.connections += 1;
            if let ConnectedPoint::Dialer { address, .. } = endpoint {
                remember(p, address.clone());
            }
        }
        debug!(%peer, "connected");
    }

    fn on_disconnected(&mut self, peer: PeerId, cause: String) {
        // What waited for its rate cannot be answered any more.
        drop(self.rates.forget(&peer));
        let dropped = self.outbox.disconnected(&peer);
        self.metrics.direct_dropped.inc_by(dropped as u64);
        let mut was_replicating = false;
        if let Some(p) = self.peers.get_mut(&peer) {
            p.connections = 0;
            was_replicating = std::mem::take(&mut p.replicating);
        }
        if was_replicating {
            self.core.handle_disconnect(&node_id(&peer));
            info!(%peer, %cause, "stopped replicating with peer");
        } else {
            // Closed before replication started (refused by the peer's
            // limits or allowlist, for example): a failed attempt.
            self.fail_targets(
                peer,
                &format!("connection closed before replication started: {cause}"),
            );
        }
        if self.foreign.contains(&peer) {
            self.peers.remove(&peer);
            return;
        }
        if !self.blocked.contains(&peer) {
            self.ensure_target(peer);
        }
    }

    /// Counts a failed attempt on every target naming `peer`: the next dial
    /// waits for the backoff.
    fn fail_targets(&mut self, peer: PeerId, error: &str) {
        let now = Instant::now();
        for t in self.targets.iter_mut().filter(|t| t.peer == Some(peer)) {
            t.next_dial = now + t.backoff.fail();
            t.last_error = Some(error.to_string());
        }
    }

    /// Adds a dial target for a known `peer` that has none.
    fn ensure_target(&mut self, peer: PeerId) {
        if self.peers.contains_key(&peer) && !self.targets.iter().any(|t| t.peer == Some(peer)) {
            self.targets
                .push(Target::new(None, Some(peer), &self.config));
        }
    }

    fn on_dial_failure(&mut self, id: ConnectionId, peer: Option<PeerId>, error: String) {
        let now = Instant::now();
        for t in &mut self.targets {
            if t.pending == Some(id) {
                t.pending = None;
                let wait = t.backoff.fail();
                t.next_dial = now + wait;
                let name = t
                    .addr
                    .as_ref()
                    .map_or_else(|| format!("{peer:?}"), ToString::to_string);
                warn!(target = %name, failures = t.backoff.failures(), retry_in = ?wait, %error,
                    "peer unreachable; the node keeps running and retries");
                t.last_error = Some(error.clone());
            }
        }
    }

    fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        if info.protocol_version != self.protocols.identify
            || !info.protocols.contains(&self.protocols.sync)
        {
            let error = format!(
                "peer speaks {}, not this cluster's protocol",
                info.protocol_version
            );
            warn!(%peer, %error, "disconnecting a peer of another cluster");
            self.fail_targets(peer, &error);
            if self.foreign.len() < MAX_KNOWN_PEERS {
                self.foreign.insert(peer);
            }
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        for addr in info.listen_addrs.iter().filter(|a| is_dialable(a)) {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
        if let Some(p) = self.peer_entry(peer) {
            for addr in info.listen_addrs.into_iter().filter(is_dialable) {
                remember(p, addr);
            }
        }
        self.start_replicating(peer);
    }

    fn start_replicating(&mut self, peer: PeerId) {
        let now = self.now();
        let Some(p) = self.peer_entry(peer) else {
            return;
        };
        if p.replicating || p.connections == 0 {
            return;
        }
        p.replicating = true;
        self.core
            .handle_connect(now, &node_id(&peer), &mut self.random);
        self.foreign.remove(&peer);
        for t in self.targets.iter_mut().filter(|t| t.peer == Some(peer)) {
            t.backoff.reset();
            t.last_error = None;
        }
        info!(%peer, "replicating with peer");
    }

    /// A discovered member: remember its addresses and dial it if needed.
    fn learn(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id()
            || self.blocked.contains(&peer)
            || self.foreign.contains(&peer)
        {
            return;
        }
        if let Some(p) = self.peer_entry(peer) {
            for addr in addrs.into_iter().filter(is_dialable) {
                remember(p, addr);
            }
            if p.connections == 0 {
                self.ensure_target(peer);
            }
        }
    }

    /// Dials every target whose backoff expired and that is not connected.
    fn redial(&mut self) {
        let now = Instant::now();
        let connected: BTreeSet<PeerId> = self.swarm.connected_peers().copied().collect();
        // Targets learnt by discovery are dropped once connected; bootstrap
        // addresses stay for good.
        self.targets
            .retain(|t| t.addr.is_some() || t.peer.is_none_or(|p| !connected.contains(&p)));
        for i in 0..self.targets.len() {
            let t = &self.targets[i];
            let skip = t.pending.is_some()
                || t.next_dial > now
                || t.peer
                    .is_some_and(|p| connected.contains(&p) || self.blocked.contains(&p));
            if skip {
                continue;
            }
            let opts = match (&t.addr, t.peer) {
                (Some(addr), _) => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                (None, Some(peer)) => {
                    let addrs = self
                        .peers
                        .get(&peer)
                        .map(|p| p.addrs.iter().cloned().collect())
                        .unwrap_or_default();
                    DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build()
                }
                (None, None) => continue,
            };
            let id = opts.connection_id();
            let t = &mut self.targets[i];
            match self.swarm.dial(opts) {
                Ok(()) => t.pending = Some(id),
                Err(e) => {
                    let wait = t.backoff.fail();
                    t.next_dial = now + wait;
                    t.last_error = Some(e.to_string());
                    debug!(error = %e, retry_in = ?wait, "dial refused locally");
                }
            }
        }
    }

    /// Walks the Kademlia table for members beyond the bootstrap list.
    fn discover(&mut self) {
        // Fails only while no peer is known yet; the next round retries.
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
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
            Command::Shutdown => {}
        }
    }

    /// Hands the direct messages whose peers' rates allow it now to the
    /// core.
    fn release_waiting(&mut self) -> Result<(), DriverError> {
        if !self.rates.is_waiting() {
            return Ok(());
        }
        for received in self.rates.release(Instant::now()) {
            self.inbox.push(received);
        }
        self.apply_received()?;
        self.drain();
        Ok(())
    }

    /// Reads the membership file again if it changed, and applies the new
    /// list: newcomers may connect, removed members are disconnected, and
    /// regions follow the list. A list that cannot be read, or that does
    /// not list this node in its region, is not used (the node keeps its
    /// list and says why).
    fn reload_membership(&mut self) {
        let Some(file) = &mut self.membership_file else {
            return;
        };
        let Some(result) = file.reload() else {
            return;
        };
        let path = file.path().display().to_string();
        let local = *self.swarm.local_peer_id();
        let list = match result.map_err(|e| e.to_string()).and_then(|list| {
            list.admits_self(&local, &self.config.region)?;
            Ok(list)
        }) {
            Ok(list) => list,
            Err(reason) => {
                warn!(file = %path, %reason, "the membership file changed but cannot be used; the node keeps its list");
                self.metrics.membership_reload_failures.inc();
                return;
            }
        };
        let old = self.config.membership.take().unwrap_or_default();
        if list == old {
            self.config.membership = Some(old);
            return;
        }
        let added: Vec<PeerId> = list.peers().filter(|p| !old.contains(p)).copied().collect();
        let removed: Vec<PeerId> = old.peers().filter(|p| !list.contains(p)).copied().collect();
        if let Some(allowlist) = self.swarm.behaviour_mut().allowlist.as_mut() {
            for peer in &added {
                allowlist.allow_peer(*peer);
            }
            for peer in &removed {
                allowlist.disallow_peer(*peer);
            }
        }
        for peer in &removed {
            let _ = self.swarm.disconnect_peer_id(*peer);
            self.targets.retain(|t| t.peer != Some(*peer));
        }
        self.core.set_members(self.now(), Some(list.to_core()));
        self.metrics.members.set(list.len() as i64);
        info!(file = %path, members = list.len(), added = ?added, removed = ?removed,
            "membership list changed");
        self.config.membership = Some(list);
    }

    /// Counts a refused message of `peer`; blocks it past the threshold
    /// (see [`super::sanctions`]). Logs the first refusal of a window and
    /// each block, nothing else.
    fn sanction(&mut self, peer: PeerId, reason: &Rejection) {
        let name = reason_name(reason);
        let sanction = self
            .sanctions
            .refused(Instant::now(), SystemTime::now(), peer, name);
        match sanction {
            Sanction::First => {
                warn!(%peer, reason = name, detail = %reason,
                    "refused a message from a peer (further refusals are summarised each minute)");
            }
            Sanction::Counted => {}
            Sanction::Block {
                duration,
                reasons,
                unsaved,
            } => {
                warn!(%peer, blocked_for = ?duration, refusals = ?reasons,
                    "blocked a peer that kept sending refused messages");
                if let Some(e) = unsaved {
                    warn!(%peer, error = %e, "cannot record the block; it holds until restart");
                }
                self.metrics.peers_sanctioned.inc();
                self.block_peer(peer);
            }
        }
    }

    /// Ends the blocks that are over and logs one summary line per peer
    /// whose refusals were counted without a line each.
    fn review_sanctions(&mut self) {
        for s in self.sanctions.summaries(Instant::now()) {
            warn!(peer = %s.peer, refusals = s.refusals, reasons = ?s.reasons,
                "refused messages from a peer in the last minute");
        }
        match self.sanctions.expire(SystemTime::now()) {
            Ok(ended) => {
                for peer in ended {
                    info!(%peer, "the block of a misbehaving peer ended");
                    if !self.operator_blocked.contains(&peer) {
                        self.unblock_peer(peer);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot record the end of a block"),
        }
        self.metrics.peers_blocked.set(self.blocked.len() as i64);
    }

    /// An operator's block or unblock (an unblock also ends a sanction).
    fn block(&mut self, peer: PeerId, blocked: bool) {
        if blocked {
            self.operator_blocked.insert(peer);
            self.block_peer(peer);
            info!(%peer, "blocked peer");
        } else {
            self.operator_blocked.remove(&peer);
            if let Err(e) = self.sanctions.pardon(&peer) {
                warn!(%peer, error = %e, "cannot record the end of a block");
            }
            self.unblock_peer(peer);
            info!(%peer, "unblocked peer");
        }
    }

    fn block_peer(&mut self, peer: PeerId) {
        self.swarm.behaviour_mut().blocklist.block_peer(peer);
        self.blocked.insert(peer);
    }

    fn unblock_peer(&mut self, peer: PeerId) {
        self.swarm.behaviour_mut().blocklist.unblock_peer(peer);
        self.blocked.remove(&peer);
        let now = Instant::now();
        for t in self.targets.iter_mut().filter(|t| t.peer == Some(peer)) {
            t.backoff.reset();
            t.next_dial = now;
        }
        self.ensure_target(peer);
    }

    /// The entry of `peer`, made if new. When [`MAX_KNOWN_PEERS`] are known
    /// already, the disconnected peer seen least recently (not blocked,
    /// not a bootstrap peer) is forgotten to make room, so identities that
    /// connect once cannot keep real peers out; `None` if there is none.
    fn peer_entry(&mut self, peer: PeerId) -> Option<&mut Peer> {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_KNOWN_PEERS {
            let bootstrap: BTreeSet<PeerId> = self
                .targets
                .iter()
                .filter(|t| t.addr.is_some())
                .filter_map(|t| t.peer)
                .collect();
            let stalest = self
                .peers
                .iter()
                .filter(|(id, p)| {
                    p.connections == 0 && !self.blocked.contains(id) && !bootstrap.contains(id)
                })
                .min_by_key(|(_, p)| p.seen)
                .map(|(id, _)| *id)?;
            self.forget(stalest);
        }
        let p = self.peers.entry(peer).or_default();
        p.seen = Some(Instant::now());
        Some(p)
    }

    /// Drops everything known of a disconnected peer: its entry, its dial
    /// targets learnt by discovery, its routing entry.
    fn forget(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        self.targets
            .retain(|t| t.addr.is_some() || t.peer != Some(peer));
        self.swarm.behaviour_mut().kad.remove_peer(&peer);
        self.metrics.peers_forgotten.inc();
        debug!(%peer, "forgot a disconnected peer to make room");
    }

    fn observe(&mut self) {
        let lags = self.lags();
        self.metrics.observe_lag(&lags, &region_lags(&lags));
        let members = self.config.membership.as_ref().map_or(0, |m| m.len());
        self.metrics.members.set(members as i64);
        let replicating = self.peers.values().filter(|p| p.replicating).count();
        self.metrics.peers_replicating.set(replicating as i64);
        self.metrics
            .local_events_dropped
            .set(self.local_events_dropped as i64);
        let stats = self.core.stats().clone();
        self.metrics.observe(&stats, self.core.queue_depths());
        let engine = self.core.engine().stats();
        self.metrics.held_changes.set(engine.held_changes as i64);
        self.metrics.held_bytes.set(engine.held_bytes as i64);
        self.metrics.shape_refused.set(engine.shape_refused as i64);
        self.metrics
            .automerge_panics
            .set(engine.automerge_panics as i64);
        self.metrics
            .quarantined_documents
            .set(engine.quarantined_documents as i64);
        self.metrics
            .direct_queued
            .set(self.outbox.longest_queue() as i64);
    }

    fn status(&mut self) -> NetworkStatus {
        let lags = self.lags();
        let mut peers = Vec::new();
        for (id, p) in &self.peers {
            let node = node_id(id);
            let progress = self.core.progress().peer(&node);
            let region = progress.and_then(|pp| pp.region.as_ref().map(ToString::to_string));
            let state = if self.blocked.contains(id) {
                PeerState::Blocked
            } else if p.replicating {
                PeerState::Replicating
            } else if p.connections > 0 {
                PeerState::Connected
            } else {
                PeerState::Disconnected
            };
            let target = self.targets.iter().find(|t| t.peer == Some(*id));
            let behind = lags
                .iter()
                .find(|l| l.peer == node)
                .map_or_else(Behind::default, |l| l.behind);
            peers.push(PeerStatus {
                peer_id: id.to_string(),
                region,
                state,
                addresses: p.addrs.iter().map(ToString::to_string).collect(),
                rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                dial_failures: target.map_or(0, |t| t.backoff.failures()),
                last_error: target.and_then(|t| t.last_error.clone()),
                behind,
            });
        }
        NetworkStatus {
            peer_id: self.swarm.local_peer_id().to_string(),
            region: self.config.region.to_string(),
            cluster: self.config.cluster.to_string(),
            listen_addrs: self.listen_addrs.iter().map(ToString::to_string).collect(),
            peers,
            regions: region_lags(&lags),
            local_events_dropped: self.local_events_dropped,
        }
    }

    /// How far behind every peer the core has heard from is.
    fn lags(&self) -> Vec<PeerLag> {
        let now = self.now();
        let progress = self.core.progress();
        progress
            .peers()
            .map(|(node, p)| {
                let lag = progress.lag(node);
                PeerLag {
                    peer: node.clone(),
                    region: p.region.as_ref().map(ToString::to_string),
                    behind: Behind {
                        documents: lag.documents,
                        changes: lag.changes,
                        lag_seconds: lag.seconds(now),
                    },
                }
            })
            .collect()
    }

    /// Registers a write waiting for other regions, answering at once if it
    /// is already satisfied.
    fn await_regions(&mut self, waiter: RegionWaiter) {
        if self.waiters.len() >= MAX_REGION_WAITERS {
            self.waiters.retain(|w| !w.reply.is_closed());
        }
        if self.waiters.len() >= MAX_REGION_WAITERS {
            let _ = waiter.reply.send(Err(NodeError::Busy(format!(
                "{MAX_REGION_WAITERS} writes are already waiting for other regions"
            ))));
            return;
        }
        self.waiters.push(waiter);
        let last = self.waiters.len() - 1;
        self.check_waiter(last);
    }

    /// Answers the waiting writes whose documents' progress changed.
    fn check_waiters(&mut self) {
        let (touched, overflow) = self.core.take_touched();
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &self.waiters[i];
            if w.reply.is_closed() {
                self.waiters.swap_remove(i);
                continue;
            }
            if (overflow || touched.contains(&w.doc)) && self.check_waiter(i) {
                continue;
            }
            i += 1;
        }
    }

    /// Answers waiter `i` and removes it if its regions hold the write.
    fn check_waiter(&mut self, i: usize) -> bool {
        let w = &self.waiters[i];
        let regions = match self.regions_holding(&w.doc, &w.heads) {
            Ok(r) => r,
            Err(e) => {
                let w = self.waiters.swap_remove(i);
                let _ = w.reply.send(Err(NodeError::Engine(e)));
                return true;
            }
        };
        if !w.need.satisfied_by(&regions) {
            return false;
        }
        let w = self.waiters.swap_remove(i);
        let _ = w.reply.send(Ok(regions.into_iter().collect()));
        true
    }

    /// Regions other than this node's known to hold `heads` of `doc`.
    fn regions_holding(
        &self,
        doc: &DocId,
        heads: &[ChangeHash],
    ) -> Result<BTreeSet<String>, causeway_engine::Error> {
        let own = &self.config.region;
        Ok(self
            .core
            .holders(doc, heads)?
            .into_iter()
            .filter(|h| h.holds)
            .filter_map(|h| h.region)
            .filter(|r| r != own)
            .map(|r| r.to_string())
            .collect())
    }

    /// Stops listening, publishes the local commits still queued (it tells
    /// the queue's feeder to stop, so the queue ends), then waits until
    /// direct messages are delivered and every connected peer holds the
    /// latest local commits, so that a write acknowledged just before the
    /// stop is not left on this node alone: while that progresses, for up to
    /// [`SHUTDOWN_HANDOFF_MAX`], and no more than [`SHUTDOWN_FLUSH`] without
    /// progress.
    async fn shutdown(mut self, mut inputs: Inputs) {
        info!("shutting down: no new connections, handing the latest writes to peers");
        for id in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(id);
        }
        inputs.stopping.store(true, Ordering::Release);
        let until = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
        loop {
            let event = tokio::select! {
                event = inputs.local.recv() => event,
                () = tokio::time::sleep_until(until) => None,
            };
            let Some(event) = event else { break };
            self.publish_local(burst(event, &mut inputs.local));
            self.drain();
        }
        self.drain();
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
                    let now_left = (self.in_flight.len(), self.recent_not_held());
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

/// `first` and the local commits already queued behind it (up to
/// [`MAX_LOCAL_BURST`]): they go out together, one delta per document and
/// burst.
fn burst(first: DocEvent, local: &mut mpsc::Receiver<DocEvent>) -> Vec<DocEvent> {
    let mut events = vec![first];
    while events.len() < MAX_LOCAL_BURST {
        match local.try_recv() {
            Ok(event) => events.push(event),
            Err(_) => break,
        }
    }
    events
}

/// The replication core's name for `peer`: its base58 peer id.
pub fn node_id(peer: &PeerId) -> NodeId {
    // A base58 peer id is printable ASCII of at most 128 bytes.
    #[allow(clippy::expect_used)]
    NodeId::new(peer.to_base58()).expect("a peer id is a valid node id")
}

/// A metric label.
fn kind(kind: &str) -> KindLabel {
    KindLabel {
        kind: kind.to_string(),
    }
}

/// The peer id at the end of `addr`, if it names one.
fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

fn is_dialable(addr: &Multiaddr) -> bool {
    !addr
        .iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified()))
}

fn remember(p: &mut Peer, addr: Multiaddr) {
    if p.addrs.len() < MAX_ADDRS_PER_PEER {
        p.addrs.insert(addr);
    }
}
