//! The libp2p behaviours a node runs, and how the swarm is built.
//!
//! * gossipsub carries deltas and announcements on one topic per cluster.
//!   Messages are content-addressed (their id is a hash of their bytes),
//!   signed by their author, and validated explicitly: nothing is forwarded
//!   before the replication core has validated and applied it.
//! * request-response ([`FrameCodec`]) carries direct messages: hello,
//!   per-document sync, reconciliation, acknowledgements.
//! * identify and ping tell who a peer is and whether it is alive; Kademlia
//!   finds cluster members beyond the bootstrap list.
//! * connection limits, an optional allowlist (fails closed), and a
//!   blocklist (operators and the demo cut peers off with it).
//!
//! With a cluster key ([`crate::cluster_key`]) every connection is TCP and
//! begins with libp2p's private-network handshake under that key, so only
//! members can connect at all; without one, TCP and QUIC are open to any
//! peer that can reach the node, which is why such a node listens on
//! loopback unless the operator says otherwise ([`NodeConfig::validate`]).
//!
//! Every protocol name carries the cluster id, so nodes of different clusters
//! cannot even open a stream to each other.

use std::sync::Arc;
use std::time::Duration;

use causeway_engine::replication::ids::ClusterId;
use causeway_engine::replication::wire::MAX_GOSSIP_BYTES;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::core::ConnectedPoint;
use libp2p::futures::future::Either;
use libp2p::gossipsub::{PeerScoreParams, PeerScoreThresholds, TopicScoreParams};
use libp2p::identity::Keypair;
use libp2p::kad::store::MemoryStore;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, connection_limits, gossipsub, identify, kad, noise, ping, quic,
    request_response, tcp, yamux, PeerId, StreamProtocol, Swarm, SwarmBuilder,
};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use super::frame::FrameCodec;
use super::private_network;
use crate::cluster_key::ClusterKey;
use crate::config::NodeConfig;

/// Events a connection may queue for the swarm before it stops reading
/// (libp2p's default is 7). The driver applies what is queued in one batch
/// (`network::inbox`), so this is also the largest batch one busy peer can
/// fill while the driver applies the previous one; at most this many
/// gossip messages (256 KiB each at most) wait per connection.
pub const EVENTS_PER_CONNECTION: usize = 64;

/// How long a connection may take from TCP to a multiplexed, authenticated
/// connection (the key's handshake, Noise, yamux); a peer that stalls in
/// it is dropped, so stalled handshakes cannot hold the slots of
/// `max_pending_incoming`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Gossip messages one RPC may carry; more are dropped by gossipsub.
pub const MAX_GOSSIP_MESSAGES_PER_RPC: usize = 256;

/// Why the swarm could not be built. The node does not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A transport could not be set up.
    #[error("cannot set up the {what} transport: {reason}")]
    Transport {
        /// Which transport.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A behaviour's configuration was refused.
    #[error("cannot set up {what}: {reason}")]
    Behaviour {
        /// Which behaviour.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// The names a cluster's nodes speak.
#[derive(Debug, Clone)]
pub struct Protocols {
    /// Direct messages (request-response).
    pub sync: StreamProtocol,
    /// Kademlia.
    pub kad: StreamProtocol,
    /// identify's protocol version string.
    pub identify: String,
    /// The gossip topic for deltas.
    pub topic: gossipsub::IdentTopic,
    /// The gossip topic for automerge-repo clients' ephemeral messages
    /// (see [`ephemeral`](super::ephemeral)).
    pub ephemeral_topic: gossipsub::IdentTopic,
}

impl Protocols {
    /// The protocol names of `cluster`.
    pub fn new(cluster: &ClusterId) -> Result<Protocols, BuildError> {
        let name = |suffix: &str| {
            StreamProtocol::try_from_owned(format!("/causeway/{cluster}/{suffix}")).map_err(|e| {
                BuildError::Behaviour {
                    what: "protocol names",
                    reason: e.to_string(),
                }
            })
        };
        Ok(Protocols {
            sync: name("sync/1")?,
            kad: name("kad/1")?,
            identify: format!("/causeway/{cluster}/1"),
            topic: gossipsub::IdentTopic::new(format!("causeway/{cluster}/deltas")),
            ephemeral_topic: gossipsub::IdentTopic::new(format!("causeway/{cluster}/ephemeral")),
        })
    }
}

pub use self::composed::{Behaviour, BehaviourEvent};

/// The derived behaviour; its generated event enum (one variant per
/// behaviour, named after the field) has no doc comments of its own.
mod composed {
    #![allow(missing_docs)]

    use super::*;

    /// Every behaviour of a node, in one swarm.
    #[derive(NetworkBehaviour)]
    pub struct Behaviour {
        /// Refuses peers not on the allowlist (only when one is configured).
        pub allowlist: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
        /// Refuses blocked peers.
        pub blocklist: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
        /// Connection limits.
        pub limits: connection_limits::Behaviour,
        /// Deltas and announcements.
        pub gossip: gossipsub::Behaviour,
        /// Direct messages.
        pub direct: request_response::Behaviour<FrameCodec>,
        /// Who the peer is, which protocols and addresses it has.
        pub identify: identify::Behaviour,
        /// Liveness and round-trip time.
        pub ping: ping::Behaviour,
        /// Member discovery.
        pub kad: kad::Behaviour<MemoryStore>,
    }
}

/// Builds the swarm for `config` under `key`, recording libp2p's metrics in
/// `registry`.
pub fn build_swarm(
    key: Keypair,
    config: &NodeConfig,
    protocols: &Protocols,
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>, BuildError> {
    let cluster_key = config.cluster_key;
    let keys: Vec<ClusterKey> = cluster_key
        .into_iter()
        .chain(config.accepted_cluster_keys.iter().copied())
        .collect();
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| transport(key, keys))
        .map_err(|e| BuildError::Transport {
            what: if cluster_key.is_some() {
                "TCP with the cluster key"
            } else {
                "TCP and QUIC"
            },
            reason: e.to_string(),
        })?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key| behaviour(key, config, protocols, registry))
        .map_err(|e| BuildError::Behaviour {
            what: "behaviours",
            reason: e.to_string(),
        })?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_connection_timeout)
                .with_per_connection_event_buffer_size(EVENTS_PER_CONNECTION)
        })
        .build();
    Ok(swarm)
}

/// The transport: with cluster keys (the node's own first, then the
/// others it accepts), TCP whose connections begin with the private-network
/// handshake ([`private_network`]): under the node's own key when it dials,
/// under whichever of its keys the dialer holds when it accepts; then Noise
/// and yamux, as always. Without one, TCP with Noise and yamux, and QUIC.
fn transport(
    key: &Keypair,
    cluster_keys: Vec<ClusterKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let noise = noise::Config::new(key)?;
    Ok(match cluster_keys.first().copied() {
        Some(own) => {
            let keys = Arc::new(cluster_keys);
            tcp.and_then(move |socket, endpoint: ConnectedPoint| {
                let keys = Arc::clone(&keys);
                async move {
                    if endpoint.is_dialer() {
                        private_network::dial(socket, &own).await
                    } else {
                        private_network::accept(socket, &keys)
                            .await
                            .map(|(stream, _)| stream)
                    }
                }
            })
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed()
        }
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .or_transport(quic::tokio::Transport::new(quic::Config::new(key)))
            .map(|either, _| match either {
                Either::Left((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
                Either::Right((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
            })
            .boxed(),
    })
}

fn behaviour(
    key: &Keypair,
    config: &NodeConfig,
    protocols: &Protocols,
    registry: &mut Registry,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let allowed: Option<Vec<PeerId>> = match (&config.allowlist, &config.membership) {
        (Some(peers), _) => Some(peers.clone()),
        (None, Some(members)) => Some(members.peers().copied().collect()),
        (None, None) => None,
    };
    let allowlist = allowed.map(|peers| {
        let mut list = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for peer in peers {
            list.allow_peer(peer);
        }
        list
    });
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.max_pending_incoming));
    let direct = request_response::Behaviour::with_codec(
        FrameCodec,
        [(
            protocols.sync.clone(),
            request_response::ProtocolSupport::Full,
        )],
        request_response::Config::default()
            .with_request_timeout(config.request_timeout)
            .with_max_concurrent_streams(config.max_concurrent_streams),
    );
    let identify = identify::Behaviour::new(
        identify::Config::new(protocols.identify.clone(), key.public()).with_agent_version(
            format!(
                "causeway/{} region={}",
                env!("CARGO_PKG_VERSION"),
                config.region
            ),
        ),
    );
    let mut kad = kad::Behaviour::with_config(
        peer_id,
        MemoryStore::new(peer_id),
        kad::Config::new(protocols.kad.clone()),
    );
    kad.set_mode(Some(kad::Mode::Server));
    let mut gossip = gossip(key, registry)?;
    gossip.with_peer_score(peer_score(protocols), PeerScoreThresholds::default())?;
    gossip.subscribe(&protocols.topic)?;
    gossip.subscribe(&protocols.ephemeral_topic)?;
    Ok(Behaviour {
        allowlist: Toggle::from(allowlist),
        blocklist: Default::default(),
        limits: connection_limits::Behaviour::new(limits),
        gossip,
        direct,
        identify,
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
        kad,
    })
}

/// Weight of an invalid message (one the replication core refused) in a
/// peer's gossip score; the penalty is this times the square of the
/// peer's decayed count of them, so three refusals in a row (-90) put the
/// peer below the graylist threshold (-80): its gossip is ignored until the
/// count decays.
pub const INVALID_MESSAGE_WEIGHT: f64 = -10.0;
/// Decay of that count per second (halves in about 69 s).
pub const INVALID_MESSAGE_DECAY: f64 = 0.99;

/// gossipsub peer scoring (libp2p's thresholds: -10 gossip, -50 publish,
/// -80 graylist). Only what a hostile peer does counts against it:
/// invalid messages (refused by the replication core) and broken gossip
/// promises. Mesh delivery rates are not scored (an idle cluster delivers
/// nothing, and that is no fault), nor are peers sharing an IP address
/// (nodes behind one NAT, or all on one machine in tests), nor slow peers
/// (the driver's own back-pressure handles those).
fn peer_score(protocols: &Protocols) -> PeerScoreParams {
    let topic = TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_MESSAGE_WEIGHT,
        invalid_message_deliveries_decay: INVALID_MESSAGE_DECAY,
        ..TopicScoreParams::default()
    };
    PeerScoreParams {
        topics: [
            (protocols.topic.hash(), topic.clone()),
            (protocols.ephemeral_topic.hash(), topic),
        ]
        .into_iter()
        .collect(),
        app_specific_weight: 0.0,
        ip_colocation_factor_weight: 0.0,
        behaviour_penalty_weight: -1.0,
        behaviour_penalty_threshold: 10.0,
        behaviour_penalty_decay: 0.9,
        decay_interval: Duration::from_secs(1),
        slow_peer_weight: 0.0,
        ..PeerScoreParams::default()
    }
}

fn gossip(
    key: &Keypair,
    registry: &mut Registry,
) -> Result<gossipsub::Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(&Sha256::digest(&m.data)[..20])
        })
        // The envelope limit plus room for gossipsub's own framing.
        .max_transmit_size(MAX_GOSSIP_BYTES + 4096)
        .max_publish_messages(MAX_GOSSIP_MESSAGES_PER_RPC)
        .heartbeat_interval(Duration::from_millis(500))
        .build()?;
    let behaviour =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)?
            .with_metrics(registry, gossipsub::MetricsConfig::default());
    Ok(behaviour)
}
