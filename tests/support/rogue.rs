//! A hostile cluster member for tests: it holds the cluster key and speaks
//! the protocol (the node library's own swarm), but sends whatever the test
//! makes: hellos naming other nodes, deltas and announcements with forged
//! origins, anything. Blocking calls over a runtime of its own.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::wire::{Envelope, Message, MAX_GOSSIP_BYTES};
use causeway_node::cluster_key::ClusterKey;
use causeway_node::network::behaviour::{build_swarm, Behaviour, BehaviourEvent, Protocols};
use causeway_node::network::codec::Receipt;
use causeway_node::network::driver::node_id;
use causeway_node::NodeConfig;
use libp2p::futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, request_response, Multiaddr, PeerId, Swarm};

const WAIT: Duration = Duration::from_secs(20);

/// A connected hostile member.
pub struct Rogue {
    rt: tokio::runtime::Runtime,
    swarm: Swarm<Behaviour>,
    protocols: Protocols,
    cluster: ClusterId,
    /// The node it is connected to.
    pub target: PeerId,
}

impl Rogue {
    /// Connects to the node listening on `addr` (ending in `/p2p/<id>`) as
    /// a fresh identity, holding the key in `key_file`, and waits until the
    /// node takes its gossip (when `gossip` is set).
    pub fn connect(key_file: &Path, cluster: &str, addr: &str, gossip: bool) -> Rogue {
        Self::connect_as(Keypair::generate_ed25519(), key_file, cluster, addr, gossip)
    }

    /// [`Rogue::connect`] as `identity`.
    pub fn connect_as(
        identity: Keypair,
        key_file: &Path,
        cluster: &str,
        addr: &str,
        gossip: bool,
    ) -> Rogue {
        Self::try_connect_as(identity, key_file, cluster, addr, gossip)
            .unwrap_or_else(|e| panic!("the rogue could not connect: {e}"))
    }

    /// [`Rogue::connect_as`], or why the node would not have it.
    pub fn try_connect_as(
        identity: Keypair,
        key_file: &Path,
        cluster: &str,
        addr: &str,
        gossip: bool,
    ) -> Result<Rogue, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cluster = ClusterId::new(cluster).unwrap();
        let mut config = NodeConfig::loopback(Region::new("rogue").unwrap(), cluster.clone());
        config.cluster_key = Some(ClusterKey::load(key_file).unwrap());
        let protocols = Protocols::new(&cluster).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let swarm = {
            let _context = rt.enter();
            build_swarm(identity, &config, &protocols, &mut registry).unwrap()
        };
        let addr = Multiaddr::from_str(addr).unwrap();
        let target = addr
            .iter()
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
                _ => None,
            })
            .expect("the address names its peer");
        let mut rogue = Rogue {
            rt,
            swarm,
            protocols,
            cluster,
            target,
        };
        {
            let _context = rogue.rt.enter();
            rogue.swarm.dial(addr).unwrap();
        }
        let topic = rogue.protocols.topic.hash();
        let mut refused = None;
        rogue.run_until(WAIT, "the connection", |event| match event {
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
        });
        match refused {
            Some(why) => Err(why),
            None => Ok(rogue),
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

    /// Sends a direct message to the target; whether it was accepted.
    pub fn send(&mut self, bytes: Vec<u8>) -> bool {
        let target = self.target;
        let id = {
            let _context = self.rt.enter();
            self.swarm
                .behaviour_mut()
                .direct
                .send_request(&target, bytes)
        };
        let mut receipt = None;
        self.run_until(WAIT, "the receipt", |event| {
            if let SwarmEvent::Behaviour(BehaviourEvent::Direct(
                request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                },
            )) = event
            {
                if *request_id == id {
                    receipt = Some(*response == Receipt::Accepted);
                    return true;
                }
            }
            if let SwarmEvent::Behaviour(BehaviourEvent::Direct(
                request_response::Event::OutboundFailure { request_id, .. },
            )) = event
            {
                if *request_id == id {
                    receipt = Some(false);
                    return true;
                }
            }
            false
        });
        receipt.unwrap()
    }

    /// Publishes `bytes` by gossip (signed by this identity) and lets the
    /// swarm send it.
    pub fn publish(&mut self, bytes: Vec<u8>) {
        assert!(bytes.len() <= MAX_GOSSIP_BYTES);
        let topic = self.protocols.topic.clone();
        {
            let _context = self.rt.enter();
            self.swarm
                .behaviour_mut()
                .gossip
                .publish(topic, bytes)
                .expect("the target takes this rogue's gossip");
        }
        self.pump(Duration::from_millis(200));
    }

    /// Drives the swarm for `d`, answering whatever arrives; returns the
    /// envelopes received by gossip.
    pub fn pump(&mut self, d: Duration) -> Vec<Envelope> {
        let mut received = Vec::new();
        let _ = self.run_until(d, "", |event| {
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
        });
        received
    }

    /// Whether the target is still connected.
    pub fn connected(&self) -> bool {
        self.swarm.is_connected(&self.target)
    }

    /// Closes the connection and waits until it is closed.
    pub fn disconnect(mut self) {
        let target = self.target;
        {
            let _context = self.rt.enter();
            let _ = self.swarm.disconnect_peer_id(target);
        }
        let _ = self.run_until(Duration::from_secs(5), "", |event| {
            matches!(event, SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } if *peer_id == target)
        });
    }

    /// Drives the swarm until `done` says so (panics after `timeout`
    /// naming `what`, unless `what` is empty: then just returns).
    fn run_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&SwarmEvent<BehaviourEvent>) -> bool,
    ) -> bool {
        let swarm = &mut self.swarm;
        let found = self.rt.block_on(async {
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
                        // Answer the target's own requests so it carries on.
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
        });
        assert!(
            found || what.is_empty(),
            "the rogue waited {timeout:?} for {what}"
        );
        found
    }
}
