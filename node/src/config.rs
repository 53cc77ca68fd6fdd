//! Configuration of a networked node: validated plain data with defaults.
//!
//! [`NodeConfig`] is what [`Node::start`](crate::Node::start) takes; the
//! binary builds it from a TOML file, environment and flags
//! ([`crate::settings`]). Every bound the networking layer keeps is a field
//! here, with its default in the doc comment.

use std::path::PathBuf;
use std::time::Duration;

use causeway_engine::replication::ids::{ClusterId, Region};
use causeway_engine::replication::{Dissemination, Fanout};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::cluster_key::ClusterKey;
use crate::membership::Membership;

/// Why a [`NodeConfig`] is not usable. A caller error: fix the named field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The field, as named in the TOML file.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// How a node joins the network and what it bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's region (a label such as `eu-west`).
    pub region: Region,
    /// The cluster. Nodes of different clusters do not exchange anything:
    /// the cluster is part of every protocol name and of every envelope.
    pub cluster: ClusterId,
    /// Addresses to listen on (TCP, and QUIC without a cluster key).
    /// Default `/ip4/127.0.0.1/tcp/7700` and
    /// `/ip4/127.0.0.1/udp/7700/quic-v1`: loopback only, because a node
    /// reachable from elsewhere needs a cluster key, an allowlist or
    /// [`NodeConfig::insecure_open_cluster`] (see [`NodeConfig::validate`]).
    /// The `causeway` binary listens on [`OPEN_LISTEN`] when a cluster key
    /// is given and no address is named.
    pub listen: Vec<Multiaddr>,
    /// The cluster's shared secret: every connection begins with a
    /// handshake under it, so only members can connect (see
    /// [`crate::cluster_key`]). Default none.
    pub cluster_key: Option<ClusterKey>,
    /// Further keys this node accepts from dialers besides its own (it
    /// dials under its own): the step of a key rotation in which some nodes
    /// hold the new key and some the old (see `docs/operations.md`). Needs
    /// `cluster_key`. Default none.
    pub accepted_cluster_keys: Vec<ClusterKey>,
    /// Allows listening beyond loopback with neither a cluster key nor an
    /// allowlist, so that any peer that can reach the node may join the
    /// cluster and change any document. Default false.
    pub insecure_open_cluster: bool,
    /// Peers to dial at start and to keep redialling while unreachable
    /// (with exponential backoff). Each may end in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// When set, only these peers may connect or be connected to; an empty
    /// list admits nobody (fails closed). `None`: any peer of the cluster.
    pub allowlist: Option<Vec<PeerId>>,
    /// The cluster's membership list (see [`crate::membership`]): only
    /// listed peers may connect, and each node's region is the list's,
    /// whatever the node claims. This node must be listed, in its own
    /// region. Not together with `allowlist`. Default none.
    pub membership: Option<Membership>,
    /// The file `membership` was read from; the node reads it again when
    /// it changes, so members are added and removed without restarts.
    /// Default none (the list is fixed).
    pub membership_file: Option<PathBuf>,
    /// Messages a peer may send per second, gossip and direct together,
    /// averaged over a second or two: beyond it, its messages wait (direct
    /// streams are not read) or are dropped unforwarded (gossip, repaired
    /// by anti-entropy), and are counted. Default
    /// [`DEFAULT_PEER_MESSAGES_PER_SEC`].
    pub max_peer_messages_per_sec: u32,
    /// Bytes a peer may send per second, the same way. Default
    /// [`DEFAULT_PEER_BYTES_PER_SEC`].
    pub max_peer_bytes_per_sec: u64,
    /// Established connections in total. Default 256.
    pub max_connections: u32,
    /// Established connections per peer. Default 2.
    pub max_connections_per_peer: u32,
    /// Incoming connections still in their handshake. Default 64.
    pub max_pending_incoming: u32,
    /// First redial delay for an unreachable peer; doubles per failure.
    /// Default 1 s.
    pub reconnect_min: Duration,
    /// Largest redial delay. Default 60 s.
    pub reconnect_max: Duration,
    /// How often to walk the Kademlia table for cluster members beyond the
    /// bootstrap list. Default 30 s.
    pub discovery_interval: Duration,
    /// Time between anti-entropy rounds with every peer. Default 30 s.
    pub anti_entropy_interval: Duration,
    /// How this node's own writes reach its peers: gossip (published to
    /// every peer, relayed by gossipsub meshes) or pushed along region
    /// trees over direct connections (see `docs/protocol.md`,
    /// "Dissemination by region"). Default gossip.
    pub dissemination: Dissemination,
    /// Peers each anti-entropy round reconciles with: a few of this node's
    /// region and of other regions (see `docs/protocol.md`,
    /// "Reconciliation"), or, `None`, every connected peer. Default `None`.
    pub reconcile_fanout: Option<Fanout>,
    /// The shortest wait before a push not acknowledged is sent again,
    /// however quick the peer's measured round trip (see
    /// [`ReplicatorConfig::min_push_retry`](causeway_engine::replication::ReplicatorConfig::min_push_retry)).
    /// A node's acknowledgements wait for its disk and its turn on a core,
    /// so this is well above a LAN round trip. Default
    /// [`DEFAULT_MIN_PUSH_RETRY`].
    pub min_push_retry: Duration,
    /// A direct message unanswered this long fails (and the replication core
    /// retries the work). Default 30 s.
    pub request_timeout: Duration,
    /// Direct messages in flight on one connection. Default 64.
    pub max_concurrent_streams: usize,
    /// Close connections idle this long. Default 60 s.
    pub idle_connection_timeout: Duration,
    /// Where blocks of misbehaving peers are kept across restarts (see
    /// [`crate::network::sanctions`]); `None` keeps them in memory. The
    /// `causeway` binary uses `blocked-peers.json` in its data directory.
    pub sanctions_file: Option<PathBuf>,
    /// Free space on the store's file system below which the node refuses
    /// writes from clients (507 `insufficient_storage`) while reads and
    /// replication go on; it takes writes again once free space is back
    /// above it by [`LOW_DISK_MARGIN_DIVISOR`]. Checked every second. Default
    /// [`DEFAULT_MIN_FREE_BYTES`] (1 GiB); 0 turns the check off.
    pub min_free_bytes: u64,
    /// Garbage collection's grace period (see
    /// [`Collection`](causeway_engine::replication::Collection)): a deleted
    /// document that every member holds is collected this long after the
    /// delete, and a store out of contact with the cluster for longer may
    /// not rejoin ([`NodeError::StaleStore`](crate::node::NodeError)).
    /// Only with a membership list; `None` turns collection off. Default
    /// [`DEFAULT_GC_GRACE`].
    pub gc_grace: Option<Duration>,
}

/// Default of [`NodeConfig::gc_grace`]: 10 days, as Cassandra's
/// `gc_grace_seconds`: longer than a node is expected to stay away and
/// still rejoin rather than be rebuilt.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(10 * 24 * 3600);

/// The shortest grace period, in anti-entropy intervals.
pub const GC_GRACE_OVER_ANTI_ENTROPY: u32 = 3;

/// How often garbage collection looks at the next page of deleted
/// documents.
pub const GC_INTERVAL: Duration = Duration::from_secs(1);

/// Default of [`NodeConfig::min_free_bytes`]: 1 GiB, room for RocksDB to
/// finish a compaction of a store of a few GiB.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 1 << 30;

/// Free space above [`NodeConfig::min_free_bytes`] a node waits for before it
/// takes writes again, so it does not flap at the threshold: an eighth of
/// it.
pub const LOW_DISK_MARGIN_DIVISOR: u64 = 8;

impl NodeConfig {
    /// Defaults for a WAN node of `cluster` in `region`.
    pub fn new(region: Region, cluster: ClusterId) -> Self {
        NodeConfig {
            region,
            cluster,
            listen: vec![
                multiaddr("/ip4/127.0.0.1/tcp/7700"),
                multiaddr("/ip4/127.0.0.1/udp/7700/quic-v1"),
            ],
            cluster_key: None,
            accepted_cluster_keys: Vec::new(),
            insecure_open_cluster: false,
            bootstrap: Vec::new(),
            allowlist: None,
            membership: None,
            membership_file: None,
            max_peer_messages_per_sec: DEFAULT_PEER_MESSAGES_PER_SEC,
            max_peer_bytes_per_sec: DEFAULT_PEER_BYTES_PER_SEC,
            max_connections: 256,
            max_connections_per_peer: 2,
            max_pending_incoming: 64,
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            discovery_interval: Duration::from_secs(30),
            anti_entropy_interval: Duration::from_secs(30),
            dissemination: Dissemination::Gossip,
            reconcile_fanout: None,
            min_push_retry: DEFAULT_MIN_PUSH_RETRY,
            request_timeout: Duration::from_secs(30),
            max_concurrent_streams: 64,
            idle_connection_timeout: Duration::from_secs(60),
            sanctions_file: None,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            gc_grace: Some(DEFAULT_GC_GRACE),
        }
    }

    /// A preset for nodes on one machine or LAN: listens on an ephemeral TCP
    /// port of 127.0.0.1, redials after 100 ms (at most 2 s), and runs
    /// anti-entropy every 5 s.
    pub fn loopback(region: Region, cluster: ClusterId) -> Self {
        NodeConfig {
            listen: vec![multiaddr("/ip4/127.0.0.1/tcp/0")],
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            discovery_interval: Duration::from_secs(5),
            anti_entropy_interval: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ..NodeConfig::new(region, cluster)
        }
    }

    /// Checks the bounds; returns the first field that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.to_string(),
            })
        };
        if self.listen.is_empty() {
            return fail("listen", "at least one address is needed");
        }
        if let Some(reason) = self.listen.iter().find_map(|a| self.listen_refusal(a)) {
            return Err(ConfigError {
                field: "listen",
                reason,
            });
        }
        if self.cluster_key.is_none() && !self.accepted_cluster_keys.is_empty() {
            return fail(
                "accept_cluster_key_files",
                "further keys are accepted only beside the node's own cluster_key_file",
            );
        }
        if self.allowlist.is_some() && self.membership.is_some() {
            return fail(
                "membership_file",
                "a membership list is the allowlist too; use one of network.allowlist and \
                 network.membership_file",
            );
        }
        if self.membership_file.is_some() && self.membership.is_none() {
            return fail(
                "membership_file",
                "the list read from the file is needed too (membership)",
            );
        }
        if self.max_peer_messages_per_sec == 0 || self.max_peer_bytes_per_sec == 0 {
            return fail(
                "max_peer_messages_per_sec",
                "per-peer rates must be above zero",
            );
        }
        if self.max_connections == 0 {
            return fail("max_connections", "must be at least 1");
        }
        if self.max_connections_per_peer == 0 {
            return fail("max_connections_per_peer", "must be at least 1");
        }
        if self.max_concurrent_streams == 0 {
            return fail("max_concurrent_streams", "must be at least 1");
        }
        if self
            .gc_grace
            .is_some_and(|g| g < GC_GRACE_OVER_ANTI_ENTROPY * self.anti_entropy_interval)
        {
            return fail(
                "gc_grace",
                "must be at least three anti-entropy intervals: a running node's last contact \
                 with the cluster is up to one interval old, and a restart must not find it \
                 older than the grace period",
            );
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return fail(
                "reconnect_min",
                "must be above zero and at most reconnect_max",
            );
        }
        for (field, value) in [
            ("discovery_interval", self.discovery_interval),
            ("anti_entropy_interval", self.anti_entropy_interval),
            ("request_timeout", self.request_timeout),
            ("idle_connection_timeout", self.idle_connection_timeout),
            ("min_push_retry", self.min_push_retry),
        ] {
            if value.is_zero() {
                return fail(field, "must be above zero");
            }
        }
        Ok(())
    }

    /// Why the node must not listen on `addr`, if it must not: an address
    /// beyond loopback with nothing that keeps strangers out, or QUIC,
    /// which cannot carry the cluster key.
    fn listen_refusal(&self, addr: &Multiaddr) -> Option<String> {
        let quic = addr
            .iter()
            .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic));
        if self.cluster_key.is_some() && quic {
            return Some(format!(
                "{addr}: QUIC cannot carry the cluster key's handshake; listen on TCP"
            ));
        }
        let open =
            self.cluster_key.is_none() && self.allowlist.is_none() && self.membership.is_none();
        if open && !self.insecure_open_cluster && !is_loopback(addr) {
            return Some(format!(
                "{addr} is reachable beyond this machine, but the node has no cluster key, \
                 so anyone who reaches it could join the cluster and change any document: \
                 create a key with `causeway cluster init` and set cluster_key_file, or set \
                 network.allowlist, or set network.insecure_open_cluster = true"
            ));
        }
        None
    }
}

/// Messages per second a peer may send by default: several times what a
/// peer sends while it hands a new node 10,000 documents (the
/// `many-docs-sync` benchmark).
pub const DEFAULT_PEER_MESSAGES_PER_SEC: u32 = 10_000;

/// Bytes per second a peer may send by default (64 MiB/s, above what one
/// WAN link carries).
pub const DEFAULT_PEER_BYTES_PER_SEC: u64 = 64 << 20;

/// A node's shortest wait before resending an unacknowledged push by
/// default: Linux's floor for TCP retransmissions. A peer's push is
/// acknowledged once it is durable there (an fsync and a turn on a core),
/// and a resend sooner than that mostly duplicates a copy already on its
/// way; a push that was lost costs at most this beyond the round trip.
pub const DEFAULT_MIN_PUSH_RETRY: Duration = Duration::from_millis(200);

/// Listen addresses of a node with a cluster key when none are named: TCP
/// port 7700 on every interface.
pub const OPEN_LISTEN: &str = "/ip4/0.0.0.0/tcp/7700";

/// Whether `addr` can only be reached from this machine.
pub fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

/// Parses a multiaddr written in this file; the literals are valid.
fn multiaddr(s: &str) -> Multiaddr {
    #[allow(clippy::expect_used)]
    s.parse().expect("literal multiaddr is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        let region = Region::new("eu").unwrap_or_else(|e| panic!("{e}"));
        let cluster = ClusterId::new("test").unwrap_or_else(|e| panic!("{e}"));
        NodeConfig::new(region, cluster)
    }

    #[test]
    fn defaults_and_presets_are_valid() {
        assert_eq!(config().validate(), Ok(()));
        let c = config();
        assert_eq!(NodeConfig::loopback(c.region, c.cluster).validate(), Ok(()));
    }

    #[test]
    fn each_bad_bound_names_its_field() {
        let mut c = config();
        c.max_connections = 0;
        assert_eq!(c.validate().map_err(|e| e.field), Err("max_connections"));
        let mut c = config();
        c.reconnect_min = Duration::from_secs(120);
        assert_eq!(c.validate().map_err(|e| e.field), Err("reconnect_min"));
        let mut c = config();
        c.listen.clear();
        assert_eq!(c.validate().map_err(|e| e.field), Err("listen"));
        let mut c = config();
        c.request_timeout = Duration::ZERO;
        assert_eq!(c.validate().map_err(|e| e.field), Err("request_timeout"));
    }

    fn refusal(c: &NodeConfig) -> ConfigError {
        c.validate()
            .err()
            .unwrap_or_else(|| panic!("{:?} was accepted", c.listen))
    }

    #[test]
    fn listening_beyond_loopback_needs_a_key_an_allowlist_or_an_explicit_opt_in() {
        let open = |c: &mut NodeConfig| c.listen = vec![multiaddr(OPEN_LISTEN)];
        let mut c = config();
        open(&mut c);
        let err = refusal(&c);
        assert_eq!(err.field, "listen");
        assert!(err.reason.contains("causeway cluster init"), "{err}");
        c.listen = vec![
            multiaddr("/ip6/::1/tcp/1"),
            multiaddr("/ip4/127.0.0.2/tcp/1"),
        ];
        assert_eq!(c.validate(), Ok(()));
        c.listen = vec![multiaddr("/dns4/localhost/tcp/1")];
        assert!(c.validate().is_err(), "a name may resolve anywhere");
        let mut c = config();
        open(&mut c);
        c.insecure_open_cluster = true;
        assert_eq!(c.validate(), Ok(()));
        let mut c = config();
        open(&mut c);
        c.allowlist = Some(Vec::new());
        assert_eq!(c.validate(), Ok(()));
        let mut c = config();
        open(&mut c);
        c.cluster_key = Some(ClusterKey::generate().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(c.validate(), Ok(()));
        c.listen.push(multiaddr("/ip4/0.0.0.0/udp/7700/quic-v1"));
        let err = refusal(&c);
        assert!(err.reason.contains("QUIC"), "{err}");
    }
}
