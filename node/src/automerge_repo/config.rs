//! Settings of the automerge-repo endpoint (`[automerge_repo]` in the
//! settings file).

use std::time::Duration;

/// Settings of the automerge-repo endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoConfig {
    /// Whether the endpoint is served. Default true.
    pub enabled: bool,
    /// The HTTP path of the WebSocket endpoint. Default `/automerge-repo`.
    pub path: String,
    /// Connections open at once; more are refused with 503. Default 1,024.
    pub max_connections: usize,
    /// Documents one connection may sync; a request for more is answered
    /// `doc-unavailable`. Default 10,000.
    pub max_documents_per_connection: usize,
    /// Largest message a client may send, in bytes (a sync message carries
    /// whole changes). Default 16 MiB.
    pub max_message_bytes: usize,
    /// Changes one sync message to a client carries at most, in bytes
    /// (more follow in later messages; a single larger change goes alone).
    /// Default 4 MiB.
    pub max_sync_change_bytes: usize,
    /// How often the node pings each client; a client that has not
    /// answered two pings is disconnected. Default 15 s.
    pub ping_interval: Duration,
    /// The longest a request for a document this node lacks waits for the
    /// peers it asked before `doc-unavailable` is answered (sooner once
    /// every asked peer said it lacks it, after
    /// [`MISSING_DOCUMENT_GRACE`](super::connection::MISSING_DOCUMENT_GRACE)).
    /// Default 1 s.
    pub missing_document_wait: Duration,
}

impl Default for RepoConfig {
    fn default() -> Self {
        RepoConfig {
            enabled: true,
            path: "/automerge-repo".into(),
            max_connections: 1024,
            max_documents_per_connection: 10_000,
            max_message_bytes: 16 << 20,
            max_sync_change_bytes: 4 << 20,
            ping_interval: Duration::from_secs(15),
            missing_document_wait: Duration::from_secs(1),
        }
    }
}
