//! A hostile cluster member: it holds the cluster key and speaks the
//! protocol through the node's own swarm, but sends whatever it is told.
//!
//! [`Rogue`] is one connection to one node, used by the integration tests
//! to send forged and malformed messages one at a time. [`attack`] is what
//! `causeway chaos --byzantine 1` runs beside the honest nodes: one identity
//! connected to every node, sending a mix of malformed envelopes, oversized
//! deltas, deltas replayed under another node's name (forged origins),
//! replays of what it received, acknowledgement floods naming documents
//! nobody has, and sync requests for made-up documents, until it is cut
//! off; it then keeps trying to come back. The report says when each node
//! disconnected it and whether any let it back in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_engine::automerge::sync::{self, SyncDoc};
use causeway_engine::automerge::AutoCommit;
use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::wire::{
    Ack, AckEntry, Bytes, Delta, Envelope, Heads, Message, SyncFrame, MAX_ACK_ENTRIES,
    MAX_CHANGES_PER_DELTA, MAX_GOSSIP_BYTES,
};
use causeway_engine::DocId;
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, request_response, Multiaddr, PeerId, Swarm};
use serde::Serialize;

use causeway_node::cluster_key::ClusterKey;
use causeway_node::network::behaviour::{build_swarm, Behaviour, BehaviourEvent, Protocols};
use causeway_node::network::driver::node_id;
use causeway_node::network::frame::Receipt;
use causeway_node::NodeConfig;

/// How long a [`Rogue`] waits for a connection or a receipt.
pub const ROGUE_WAIT: Duration = Duration::from_secs(20);

/// One hostile connection to one node.
pub struct Rogue {
    swarm: Swarm<Behaviour>,
    protocols: Protocols,
    cluster: ClusterId,
    /// The node it is connected to.
    pub target: PeerId,
}

/// A swarm event as the rogue's callers see it.
type Event = SwarmEvent<BehaviourEvent>;

impl Rogue {
    /// Connects as `identity`, holding `key`, to the node listening on
    /// `addr` (which ends in `/p2p/<peer id>`); with `gossip`, waits until
    /// the node takes its gossip. Must run inside a tokio runtime. The
    /// error says why the node would not have it.
    pub async fn connect(
        identity: Keypair,
        key: ClusterKey,
        cluster: &ClusterId,
        addr: &Multiaddr,
        gossip: bool,
    ) -> Result<Rogue, String> {
        Self::connect_within(identity, key, cluster, addr, gossip, ROGUE_WAIT).await
    }

    /// [`Rogue::connect`], giving up after `wait`.
    pub async fn connect_within(
        identity: Keypair,
        key: ClusterKey,
        cluster: &ClusterId,
        addr: &Multiaddr,
        gossip: bool,
        wait: Duration,
    ) -> Result<Rogue, String> {
        let mut config =
            NodeConfig::loopback(Region::new("rogue").map_err(str_err)?, cluster.clone());
        config.cluster_key = Some(key);
        let protocols = Protocols::new(cluster).map_err(str_err)?;
        let mut registry = prometheus_client::registry::Registry::default();
        let swarm = build_swarm(identity, &config, &protocols, &mut registry).map_err(str_err)?;
        let target = addr
            .iter()
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
                _ => None,
            })
            .ok_or_else(|| format!("{addr} names no peer id"))?;
        let mut rogue = Rogue {
            swarm,
            protocols,
            cluster: cluster.clone(),
            target,
        };
        rogue.swarm.dial(addr.clone()).map_err(str_err)?;
        let topic = rogue.protocols.topic.hash();
        let mut refused = None;
        let found = rogue
            .run_until(wait, |event| match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => !gossip && *peer_id == target,
                SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Subscribed {
                    peer_id,
                    topic: t,
                })) => gossip && *peer_id == target && *t == topic,
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    refused = Some(error.to_string());
                    true
                }
                SwarmEvent::ConnectionClosed { peer_id, cause, .. } if *peer_id == target => {
                    refused = Some(format!("closed: {cause:?}"));
                    true
                }
                _ => false,
            })
            .await;
        match (found, refused) {
            (_, Some(why)) => Err(why),
            (false, None) => Err(format!("no connection within {wait:?}")),
            (true, None) => Ok(rogue),
        }
    }

    /// Its name in the replication protocol.
    pub fn node_id(&self) -> NodeId {
        node_id(self.swarm.local_peer_id())
    }

    /// `message` in an envelope of the cluster.
    pub fn envelope(&self, message: Message) -> Vec<u8> {
        Envelope {
            cluster: self.cluster.clone(),
            message,
        }
        .encode()
    }

    /// Sends a direct message to the target and waits for its receipt:
    /// whether it was accepted (false also when the stream failed).
    pub async fn send(&mut self, bytes: Vec<u8>) -> bool {
        let target = self.target;
        let id = self
            .swarm
            .behaviour_mut()
            .direct
            .send_request(&target, bytes);
        let mut accepted = false;
        self.run_until(ROGUE_WAIT, |event| match event {
            SwarmEvent::Behaviour(BehaviourEvent::Direct(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            })) if *request_id == id => {
                accepted = *response == Receipt::Accepted;
                true
            }
            SwarmEvent::Behaviour(BehaviourEvent::Direct(
                request_response::Event::OutboundFailure { request_id, .. },
            )) => *request_id == id,
            _ => false,
        })
        .await;
        accepted
    }

    /// Sends a direct message without waiting for its receipt.
    pub fn send_only(&mut self, bytes: Vec<u8>) {
        let target = self.target;
        self.swarm
            .behaviour_mut()
            .direct
            .send_request(&target, bytes);
    }

    /// Publishes `bytes` by gossip, signed by this identity.
    pub fn publish(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        let topic = self.protocols.topic.clone();
        self.swarm
            .behaviour_mut()
            .gossip
            .publish(topic, bytes)
            .map(|_| ())
            .map_err(str_err)
    }

    /// Drives the swarm for `d`; returns the envelopes received by gossip.
    pub async fn pump(&mut self, d: Duration) -> Vec<Envelope> {
        let mut received = Vec::new();
        self.run_until(d, |event| {
            if let SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                message,
                ..
            })) = event
            {
                if let Ok(env) = Envelope::decode(&message.data, MAX_GOSSIP_BYTES) {
                    received.push(env);
                }
            }
            false
        })
        .await;
        received
    }

    /// Whether the target is still connected.
    pub fn connected(&self) -> bool {
        self.swarm.is_connected(&self.target)
    }

    /// Closes the connection and waits (a little) until it is closed.
    pub async fn disconnect(mut self) {
        let target = self.target;
        let _ = self.swarm.disconnect_peer_id(target);
        self.run_until(Duration::from_secs(5), |event| {
            matches!(event, SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } if *peer_id == target)
        })
        .await;
    }

    /// Drives the swarm until `done` says so or `timeout` passes (false),
    /// answering the target's own requests so that it carries on.
    async fn run_until(&mut self, timeout: Duration, mut done: impl FnMut(&Event) -> bool) -> bool {
        let swarm = &mut self.swarm;
        tokio::time::timeout(timeout, async {
            loop {
                let event = swarm.select_next_some().await;
                if let SwarmEvent::Behaviour(BehaviourEvent::Direct(
                    request_response::Event::Message {
                        message: request_response::Message::Request { channel, .. },
                        ..
                    },
                )) = event
                {
                    let _ = swarm
                        .behaviour_mut()
                        .direct
                        .send_response(channel, Receipt::Accepted);
                    continue;
                }
                if done(&event) {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }
}

fn str_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// What the attack is aimed at.
pub struct AttackConfig {
    /// The cluster key the attacker holds.
    pub key: ClusterKey,
    /// The cluster.
    pub cluster: ClusterId,
    /// Every honest node's address, each ending in `/p2p/<peer id>`.
    pub targets: Vec<Multiaddr>,
    /// Attack messages sent per second to each connected node.
    pub rate: u32,
    /// The attacker's identity.
    pub identity: Keypair,
}

/// One node's answer to the attack.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// The node's peer id.
    pub peer_id: String,
    /// Whether the attacker connected at all (a fault may keep it out at
    /// first; it keeps trying).
    pub connected: bool,
    /// Time from the attack's start until the node last disconnected the
    /// attacker (and refused it since), ms; `None` if connected at the end.
    pub disconnected_after_ms: Option<u64>,
    /// Attempts to come back after a disconnection.
    pub reconnects_tried: u32,
    /// Attempts the node let in (the disconnection was a fault of the run,
    /// not a block).
    pub reconnects_admitted: u32,
}

/// What the attacker did and what came of it.
#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    /// The attacker's peer id.
    pub peer_id: String,
    /// Messages sent, by kind.
    pub sent: BTreeMap<&'static str, u64>,
    /// Per honest node.
    pub targets: Vec<TargetReport>,
}

impl AttackReport {
    /// Whether every node disconnected the attacker and let it back in
    /// never.
    pub fn cut_off_everywhere(&self) -> bool {
        self.targets
            .iter()
            .all(|t| t.disconnected_after_ms.is_some() && t.reconnects_admitted == 0)
    }
}

/// How long the attacker waits between attempts to come back.
const RECONNECT_EVERY: Duration = Duration::from_secs(2);
/// How long the first connection to a node may take (a node cut off by a
/// fault then waits for the next attempt).
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long one attempt to come back may take (the attack pauses meanwhile).
const RECONNECT_WAIT: Duration = Duration::from_millis(500);
/// Once told to stop, how long the attack goes on watching its connections
/// (without coming back on any) for those still open to be closed: a node
/// that blocked the attacker a moment before the stop closes its
/// connection within milliseconds, but the attack notices only at its next
/// look.
const CLOSE_WATCH: Duration = Duration::from_secs(5);

/// Runs the attack until `stop` (then watches its open connections for up
/// to [`CLOSE_WATCH`] more, so that a node that blocked it just before is
/// seen to cut it off): one identity, connected to every target.
pub async fn attack(config: AttackConfig, stop: Arc<AtomicBool>) -> AttackReport {
    let identity = config.identity.clone();
    let me = identity.public().to_peer_id();
    let start = Instant::now();
    let mut sent: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut rogues: Vec<Option<Rogue>> = Vec::new();
    let mut reports = Vec::new();
    for addr in &config.targets {
        let rogue = Rogue::connect_within(
            identity.clone(),
            config.key,
            &config.cluster,
            addr,
            true,
            FIRST_CONNECT_WAIT,
        )
        .await;
        let peer_id = addr
            .iter()
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(peer) => Some(peer.to_base58()),
                _ => None,
            })
            .unwrap_or_default();
        reports.push(TargetReport {
            peer_id,
            connected: rogue.is_ok(),
            disconnected_after_ms: None,
            reconnects_tried: 0,
            reconnects_admitted: 0,
        });
        rogues.push(rogue.ok());
    }
    let names: Vec<NodeId> = reports
        .iter()
        .filter_map(|r| NodeId::new(&r.peer_id).ok())
        .collect();
    let mut replayable: Vec<Delta> = Vec::new();
    let mut arsenal = None;
    let mut next_reconnect = Instant::now() + RECONNECT_EVERY;
    let mut turn = 0u64;
    let tick = Duration::from_millis(20);
    let per_tick = (config.rate as u64 * tick.as_millis() as u64 / 1000).max(1);
    let mut stopping: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            let since = *stopping.get_or_insert_with(Instant::now);
            if rogues.iter().all(Option::is_none) || since.elapsed() >= CLOSE_WATCH {
                break;
            }
        }
        for (i, slot) in rogues.iter_mut().enumerate() {
            let Some(rogue) = slot else { continue };
            if !rogue.connected() {
                if reports[i].disconnected_after_ms.is_none() {
                    reports[i].disconnected_after_ms = Some(start.elapsed().as_millis() as u64);
                }
                *slot = None;
                continue;
            }
            let arsenal = arsenal.get_or_insert_with(|| Arsenal::new(rogue));
            for _ in 0..per_tick {
                let kind = hostile_message(rogue, arsenal, turn, &names, &replayable);
                if let Some(kind) = kind {
                    *sent.entry(kind).or_default() += 1;
                }
                turn += 1;
            }
            for env in rogue.pump(Duration::from_millis(1)).await {
                if let Message::Delta(d) = env.message {
                    if replayable.len() < 64 {
                        replayable.push(d);
                    }
                }
            }
        }
        if stopping.is_none() && Instant::now() >= next_reconnect {
            next_reconnect = Instant::now() + RECONNECT_EVERY;
            for (i, addr) in config.targets.iter().enumerate() {
                let cut_off = reports[i].disconnected_after_ms.is_some();
                if rogues[i].is_some() || (reports[i].connected && !cut_off) {
                    continue;
                }
                reports[i].reconnects_tried += 1;
                let again = Rogue::connect_within(
                    identity.clone(),
                    config.key,
                    &config.cluster,
                    addr,
                    true,
                    RECONNECT_WAIT,
                )
                .await;
                if let Ok(rogue) = again {
                    // That disconnection was no block (a fault of the
                    // run, say): the attack goes on.
                    reports[i].connected = true;
                    reports[i].reconnects_admitted += u32::from(cut_off);
                    reports[i].disconnected_after_ms = None;
                    rogues[i] = Some(rogue);
                }
            }
        }
        tokio::time::sleep(tick).await;
    }
    AttackReport {
        peer_id: me.to_base58(),
        sent,
        targets: reports,
    }
}

/// The attacker's messages that do not depend on what it received, made
/// once (the attack should cost the nodes, not the attacker).
struct Arsenal {
    malformed: Vec<u8>,
    oversized: Vec<u8>,
    ack_flood: Vec<u8>,
    /// An Automerge sync message of an empty document.
    sync_message: Vec<u8>,
}

impl Arsenal {
    fn new(rogue: &Rogue) -> Arsenal {
        let doc = |n: u64| DocId::new(format!("byzantine/{n}")).ok();
        let oversized = match (doc(0), Region::new("byzantine")) {
            (Some(doc), Ok(region)) => rogue.envelope(Message::Delta(Delta {
                origin: rogue.node_id(),
                region,
                doc,
                // More changes than a delta may carry (each a byte of junk).
                changes: vec![Bytes(vec![0]); MAX_CHANGES_PER_DELTA + 1],
                heads: Heads::new(&[]),
            })),
            _ => Vec::new(),
        };
        // Acknowledgements of documents nobody has, as many as fit.
        let entries = (0..MAX_ACK_ENTRIES as u64)
            .filter_map(doc)
            .map(|doc| AckEntry {
                doc,
                heads: Heads::new(&[]),
            })
            .collect();
        let mut empty = AutoCommit::new();
        let sync_message = empty
            .sync()
            .generate_sync_message(&mut sync::State::new())
            .map(|m| m.encode())
            .unwrap_or_default();
        Arsenal {
            malformed: b"\x83not an envelope".to_vec(),
            oversized,
            ack_flood: rogue.envelope(Message::Ack(Ack { entries })),
            sync_message,
        }
    }
}

/// Sends the `turn`th hostile message to `rogue`; returns its kind
/// (`None` if there was nothing to send: no delta received yet to forge
/// or replay).
fn hostile_message(
    rogue: &mut Rogue,
    arsenal: &Arsenal,
    turn: u64,
    honest: &[NodeId],
    replayable: &[Delta],
) -> Option<&'static str> {
    let received = replayable.get(turn as usize % replayable.len().max(1));
    match turn % 6 {
        0 => {
            rogue.send_only(arsenal.malformed.clone());
            Some("malformed")
        }
        1 => {
            let _ = rogue.publish(arsenal.oversized.clone());
            Some("oversized_delta")
        }
        2 => {
            // A delta the attacker received, replayed in another node's name.
            let d = received?;
            let other = honest.iter().find(|n| **n != d.origin)?;
            let forged = Delta {
                origin: other.clone(),
                ..d.clone()
            };
            let _ = rogue.publish(rogue.envelope(Message::Delta(forged)));
            Some("forged_origin")
        }
        3 => {
            // A delta replayed as it was (its id is a hash of its bytes, so
            // gossip drops it as a duplicate wherever it was seen).
            let d = received?;
            let _ = rogue.publish(rogue.envelope(Message::Delta(d.clone())));
            Some("replayed")
        }
        4 => {
            rogue.send_only(arsenal.ack_flood.clone());
            Some("ack_flood")
        }
        _ => {
            // A sync request for a made-up document.
            let doc = DocId::new(format!("byzantine/sync/{turn}")).ok()?;
            let frame = SyncFrame {
                doc,
                msg: Bytes(arsenal.sync_message.clone()),
            };
            rogue.send_only(rogue.envelope(Message::Sync(frame)));
            Some("sync_flood")
        }
    }
}
