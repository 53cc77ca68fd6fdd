//! What the networking task reports about itself and its peers.

use serde::Serialize;

/// A snapshot of this node's view of the cluster.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetworkStatus {
    /// This node's peer id.
    pub peer_id: String,
    /// This node's region.
    pub region: String,
    /// The cluster.
    pub cluster: String,
    /// Addresses this node listens on.
    pub listen_addrs: Vec<String>,
    /// Every peer this node knows of: connected, being dialled, or blocked.
    pub peers: Vec<PeerStatus>,
    /// Replication lag per region of the known peers, in region order.
    pub regions: Vec<RegionStatus>,
    /// Local commits the networking task missed because its event queue was
    /// full (anti-entropy repairs them).
    pub local_events_dropped: u64,
    /// Whether this node has caught up with its region since it started.
    pub catch_up: CatchUpStatus,
    /// The drain, once `causeway node drain` (`POST /v1/drain`) started it.
    pub drain: Option<DrainStatus>,
    /// The store's disk.
    pub disk: DiskStatus,
    /// This build's version (`causeway --version`).
    pub build_version: String,
    /// The protocol versions this build speaks, oldest and newest.
    pub protocol_versions: [u32; 2],
    /// Garbage collection of deleted documents.
    pub gc: GcStatus,
}

/// Garbage collection of deleted documents (see `docs/operations.md`,
/// "Garbage collection").
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GcStatus {
    /// The grace period, seconds; `None`: collection is off (no
    /// membership list, or `engine.gc_grace_secs = 0`).
    pub grace_secs: Option<u64>,
    /// Deleted documents collected since the node started.
    pub documents_collected: u64,
    /// Markers of collected documents dropped since the node started.
    pub markers_forgotten: u64,
    /// In the last complete pass over the store: deleted documents waiting
    /// (for a member to report the delete, or for the grace period).
    pub waiting: Option<u64>,
    /// In the last complete pass: markers of collected documents.
    pub markers: Option<u64>,
}

/// The store's disk, looked at every second.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DiskStatus {
    /// Free bytes on its file system for unprivileged users (`None`: not
    /// known yet, or the look failed).
    pub free_bytes: Option<u64>,
    /// Bytes of the store's files.
    pub store_bytes: u64,
    /// The setting below which writes are refused (0: no check).
    pub min_free_bytes: u64,
    /// Writes are refused for low disk space.
    pub low: bool,
}

/// A drain: the node takes no writes and hands everything it holds to a
/// peer; once `done`, that peer holds all of it and the node stops.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DrainStatus {
    /// A peer holds everything this node holds.
    pub done: bool,
    /// The peer, once a session with it ended.
    pub peer: Option<String>,
    /// Documents queued or being synced, and those the peer has yet to
    /// sync.
    pub documents_left: usize,
}

/// Catching up after a start (see
/// `causeway_engine::replication::CatchUp`): a node is ready for clients
/// once it has reconciled with a peer of its region (any peer if none of
/// its region is connected) and synced every document found differing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CatchUpStatus {
    /// Caught up, or nothing to catch up from (no bootstrap peers and no
    /// membership list: the node is on its own).
    pub ready: bool,
    /// When it caught up, milliseconds after the networking task started.
    pub caught_up_after_ms: Option<f64>,
    /// The peer it is catching up from, once a session with one ended.
    pub from: Option<String>,
    /// Documents queued or being synced with any peer.
    pub documents_left: usize,
    /// Changes applied from document syncs since the start (what has been
    /// fetched; how much is still to come is not known in advance: an
    /// Automerge sync learns it as it goes).
    pub sync_changes_applied: u64,
}

/// How far behind a region is: that of its best-replicated known peer
/// (a region holds a change once any of its nodes does).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegionStatus {
    /// The region.
    pub region: String,
    /// Known peers in it.
    pub peers: u32,
    /// The least behind of its peers.
    pub behind: Behind,
}

/// Connection state of a peer.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Connected and replicating.
    Replicating,
    /// Connected, not yet identified as a member of this cluster.
    Connected,
    /// Not connected; redialled with backoff.
    Disconnected,
    /// Blocked by the operator.
    Blocked,
}

/// One peer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerStatus {
    /// The peer id.
    pub peer_id: String,
    /// The peer's region, once it said hello.
    pub region: Option<String>,
    /// Connection state.
    pub state: PeerState,
    /// Addresses known for it.
    pub addresses: Vec<String>,
    /// Last ping round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Failed dials since the last success.
    pub dial_failures: u32,
    /// The last dial or connection error.
    pub last_error: Option<String>,
    /// What it is known to lack.
    pub behind: Behind,
    /// The protocol version this node speaks with it, once its hello
    /// arrived (see docs/protocol.md, "Versions and rolling upgrades").
    pub protocol_version: Option<u32>,
}

/// How far behind a peer is: changes this node made or received after it
/// first heard from the peer, that the peer has not reported holding yet
/// (see `causeway_engine::replication::progress`).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Behind {
    /// Documents with changes the peer is not known to have.
    pub documents: u64,
    /// Those changes, summed over documents.
    pub changes: u64,
    /// How long the oldest of them has been here, in seconds (0: none).
    pub lag_seconds: f64,
}
