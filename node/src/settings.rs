//! The node's settings file (TOML), merged with flags and environment by
//! the binary: flags > environment > file > defaults.
//!
//! See `docs/operations.md` and `examples/node.toml` for every key. Unknown
//! keys are errors, so a typo does not silently fall back to a default.
//! Errors name the file, the key and the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_engine::replication::ids::{ClusterId, Region};
use causeway_engine::replication::{Dissemination, Fanout};
use causeway_engine::{Durability, EngineConfig, ShapeLimits};
use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;

use crate::access::token_file::TOKENS_FILE;
use crate::automerge_repo::RepoConfig;
use crate::cluster_key::ClusterKey;
use crate::config::{NodeConfig, OPEN_LISTEN};
use crate::http::tls::TlsFiles;
use crate::http::{HttpConfig, SessionKey, MAX_SESSION_KEYS};
use crate::membership::Membership;

/// Why settings could not be loaded. The node does not start.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, key, reason).
        message: String,
    },
    /// A value breaks a rule.
    #[error("config {source_name}: key {key}: {reason}")]
    Invalid {
        /// The file, or "flags/environment".
        source_name: String,
        /// The key, as written in the file.
        key: String,
        /// Why.
        reason: String,
    },
}

/// The settings file, as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// Data directory: the store (`store/`) and the identity (`node.key`).
    pub data_dir: Option<PathBuf>,
    /// This node's region.
    pub region: Option<String>,
    /// The cluster id.
    pub cluster: Option<String>,
    /// The cluster key file (`causeway cluster init`), mode 0600.
    pub cluster_key_file: Option<PathBuf>,
    /// Further key files whose keys dialers may hold (a key rotation).
    #[serde(default)]
    pub accept_cluster_key_files: Vec<PathBuf>,
    /// The membership list (see `causeway::membership`): listed peers only,
    /// each in its listed region. Read again when it changes.
    pub membership_file: Option<PathBuf>,
    /// `[network]`.
    #[serde(default)]
    pub network: NetworkSection,
    /// `[http]`.
    #[serde(default)]
    pub http: HttpSection,
    /// `[engine]`.
    #[serde(default)]
    pub engine: EngineSection,
    /// `[automerge_repo]`.
    #[serde(default)]
    pub automerge_repo: AutomergeRepoSection,
}

/// `[automerge_repo]` of the settings file: the automerge-repo WebSocket
/// endpoint on the HTTP listener.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutomergeRepoSection {
    /// Serve the endpoint (default true).
    pub enabled: Option<bool>,
    /// Its HTTP path (default `/automerge-repo`).
    pub path: Option<String>,
    /// Connections open at once.
    pub max_connections: Option<usize>,
    /// Documents one connection may sync.
    pub max_documents_per_connection: Option<usize>,
    /// Largest message from a client, bytes.
    pub max_message_bytes: Option<usize>,
    /// Changes per sync message to a client, bytes.
    pub max_sync_change_bytes: Option<usize>,
    /// Ping interval, milliseconds.
    pub ping_interval_ms: Option<u64>,
    /// How long a request for a missing document waits for peers,
    /// milliseconds.
    pub missing_document_wait_ms: Option<u64>,
}

/// `[network]` of the settings file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Multiaddrs to listen on.
    pub listen: Option<Vec<String>>,
    /// Multiaddrs of peers to dial.
    pub bootstrap: Option<Vec<String>>,
    /// Peer ids allowed to connect (fails closed when present).
    pub allowlist: Option<Vec<String>>,
    /// Listen beyond loopback without a cluster key or allowlist.
    pub insecure_open_cluster: Option<bool>,
    /// Messages per second one peer may send.
    pub max_peer_messages_per_sec: Option<u32>,
    /// Bytes per second one peer may send.
    pub max_peer_bytes_per_sec: Option<u64>,
    /// Established connections in total.
    pub max_connections: Option<u32>,
    /// Established connections per peer.
    pub max_connections_per_peer: Option<u32>,
    /// Incoming connections in their handshake.
    pub max_pending_incoming: Option<u32>,
    /// First redial delay, milliseconds.
    pub reconnect_min_ms: Option<u64>,
    /// Largest redial delay, milliseconds.
    pub reconnect_max_ms: Option<u64>,
    /// Kademlia walk interval, seconds.
    pub discovery_interval_secs: Option<u64>,
    /// Anti-entropy interval, seconds.
    pub anti_entropy_interval_secs: Option<u64>,
    /// How this node's writes reach its peers: `"gossip"` or `"regions"`.
    pub dissemination: Option<String>,
    /// Peers per anti-entropy round: `"LOCAL,REMOTE"` or `"all"`.
    pub reconcile_fanout: Option<String>,
    /// Shortest wait before an unacknowledged push is sent again,
    /// milliseconds.
    pub min_push_retry_ms: Option<u64>,
    /// Direct message timeout, seconds.
    pub request_timeout_secs: Option<u64>,
    /// Idle connection timeout, seconds.
    pub idle_connection_timeout_secs: Option<u64>,
}

/// `[http]` of the settings file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address to listen on, such as `127.0.0.1:7780`.
    pub listen: Option<String>,
    /// PEM certificate chain to serve TLS with (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Serve plain HTTP on an address beyond loopback.
    pub insecure_plaintext: Option<bool>,
    /// The tokens file (default `DATA_DIR/tokens.toml`; see `causeway
    /// token`).
    pub tokens_file: Option<PathBuf>,
    /// Bearer tokens that read every document (prefer the tokens file).
    pub read_tokens: Option<Vec<String>>,
    /// Bearer tokens that may use every route (prefer the tokens file).
    pub write_tokens: Option<Vec<String>>,
    /// Largest request body, bytes.
    pub body_limit_bytes: Option<usize>,
    /// Watch streams open at once.
    pub max_watchers: Option<usize>,
    /// Secret session tokens are signed with (the same on every node of the
    /// cluster). Default: derived from the cluster id.
    pub session_secret: Option<String>,
    /// Named session token keys, for rotation: the first signs, all are
    /// accepted. Replaces `session_secret`.
    pub session_keys: Option<Vec<SessionKeySection>>,
    /// Default wait of session reads and durable writes, milliseconds.
    pub session_wait_ms: Option<u64>,
    /// Longest wait a request may ask for, milliseconds.
    pub max_session_wait_ms: Option<u64>,
    /// Requests waiting at once.
    pub max_waiters: Option<usize>,
    /// Watch streams one client (IP address) may hold open.
    pub max_watchers_per_client: Option<usize>,
    /// Connections open at once.
    pub max_connections: Option<usize>,
    /// How long a connection may idle without a request, milliseconds.
    pub idle_timeout_ms: Option<u64>,
    /// Requests handled at once.
    pub max_requests: Option<usize>,
    /// How long a request body may take to arrive, milliseconds.
    pub body_timeout_ms: Option<u64>,
    /// Web origins whose pages may call the API.
    pub allowed_origins: Option<Vec<String>>,
}

/// One `[[http.session_keys]]` entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionKeySection {
    /// The key's name.
    pub id: String,
    /// Its secret, at least 16 characters.
    pub secret: String,
}

/// `[engine]` of the settings file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// `"sync"` (default: acknowledged means fsynced) or `"buffered"`.
    pub durability: Option<String>,
    /// Document cache budget, MiB.
    pub cache_budget_mib: Option<usize>,
    /// Changes held for missing dependencies per document (see
    /// `EngineConfig::max_held_changes_per_doc`).
    pub max_held_changes_per_doc: Option<usize>,
    /// Bytes of held changes per document, MiB.
    pub max_held_mib_per_doc: Option<usize>,
    /// Held changes in all documents together.
    pub max_held_changes: Option<usize>,
    /// Bytes of held changes in all documents together, MiB.
    pub max_held_mib: Option<usize>,
    /// Deepest nesting of objects in a document (see `ShapeLimits`).
    pub max_depth: Option<usize>,
    /// Most operations in one change.
    pub max_ops_per_change: Option<usize>,
    /// Most objects one change may create.
    pub max_objects_per_change: Option<usize>,
    /// Largest stored size of one document, MiB.
    pub max_document_mib: Option<u64>,
    /// Free space on the store's file system below which client writes are
    /// refused (507), MiB; 0 turns the check off (see
    /// `NodeConfig::min_free_bytes`).
    pub min_free_mib: Option<u64>,
    /// Garbage collection's grace period, seconds; 0 turns collection off
    /// (see `NodeConfig::gc_grace`).
    pub gc_grace_secs: Option<u64>,
    /// Entries the audit feed keeps; 0: no feed.
    pub audit_max_entries: Option<u64>,
}

/// Everything `causeway node` needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Networking.
    pub node: NodeConfig,
    /// HTTP API.
    pub http: HttpConfig,
    /// Engine.
    pub engine: EngineConfig,
}

/// Overrides from flags or environment (already merged by clap).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir` / `CAUSEWAY_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--region` / `CAUSEWAY_REGION`.
    pub region: Option<String>,
    /// `--cluster` / `CAUSEWAY_CLUSTER`.
    pub cluster: Option<String>,
    /// `--listen` / `CAUSEWAY_LISTEN` (replaces the file's list).
    pub listen: Vec<String>,
    /// `--bootstrap` / `CAUSEWAY_BOOTSTRAP` (replaces the file's list).
    pub bootstrap: Vec<String>,
    /// `--http-listen` / `CAUSEWAY_HTTP_LISTEN`.
    pub http_listen: Option<String>,
    /// `--cluster-key-file` / `CAUSEWAY_CLUSTER_KEY_FILE`.
    pub cluster_key_file: Option<PathBuf>,
    /// `--accept-cluster-key-file` / `CAUSEWAY_ACCEPT_CLUSTER_KEY_FILES`
    /// (replaces the file's list).
    pub accept_cluster_key_files: Vec<PathBuf>,
    /// `--membership-file` / `CAUSEWAY_MEMBERSHIP_FILE`.
    pub membership_file: Option<PathBuf>,
    /// `--insecure-open-cluster` / `CAUSEWAY_INSECURE_OPEN_CLUSTER` (only
    /// turns the setting on).
    pub insecure_open_cluster: bool,
}

impl FileSettings {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<FileSettings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Applies `overrides` and defaults, and validates. `source_name` names
    /// the file in errors.
    pub fn resolve(
        mut self,
        overrides: Overrides,
        source_name: &str,
    ) -> Result<Settings, SettingsError> {
        let invalid = |key: &str, reason: String| SettingsError::Invalid {
            source_name: source_name.to_string(),
            key: key.to_string(),
            reason,
        };
        self.data_dir = overrides.data_dir.or(self.data_dir);
        self.region = overrides.region.or(self.region);
        self.cluster = overrides.cluster.or(self.cluster);
        if !overrides.listen.is_empty() {
            self.network.listen = Some(overrides.listen);
        }
        if !overrides.bootstrap.is_empty() {
            self.network.bootstrap = Some(overrides.bootstrap);
        }
        self.http.listen = overrides.http_listen.or(self.http.listen);
        self.cluster_key_file = overrides.cluster_key_file.or(self.cluster_key_file);
        if !overrides.accept_cluster_key_files.is_empty() {
            self.accept_cluster_key_files = overrides.accept_cluster_key_files;
        }
        self.membership_file = overrides.membership_file.or(self.membership_file);
        if overrides.insecure_open_cluster {
            self.network.insecure_open_cluster = Some(true);
        }

        let data_dir = self
            .data_dir
            .ok_or_else(|| invalid("data_dir", "is required".into()))?;
        let region = Region::new(self.region.unwrap_or_else(|| "default".into()))
            .map_err(|e| invalid("region", e.to_string()))?;
        let cluster = ClusterId::new(self.cluster.unwrap_or_else(|| "causeway".into()))
            .map_err(|e| invalid("cluster", e.to_string()))?;
        let tokens_file = self.http.tokens_file.clone();
        let mut http = http(self.http).map_err(|(k, r)| invalid(k, r))?;
        http.tokens_file = Some(tokens_file.unwrap_or_else(|| data_dir.join(TOKENS_FILE)));
        http.automerge_repo =
            automerge_repo(self.automerge_repo).map_err(|(k, r)| invalid(k, r))?;
        if http.session_keys.is_empty() {
            http.session_secret
                .get_or_insert_with(|| format!("causeway-session/cluster/{cluster}"));
        }
        let cluster_key = match &self.cluster_key_file {
            Some(path) => Some(
                ClusterKey::load(path).map_err(|e| invalid("cluster_key_file", e.to_string()))?,
            ),
            None => None,
        };
        let accepted = self
            .accept_cluster_key_files
            .iter()
            .map(|path| ClusterKey::load(path))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("accept_cluster_key_files", e.to_string()))?;
        let membership = match self.membership_file {
            Some(path) => {
                let list = Membership::load(&path)
                    .map_err(|e| invalid("membership_file", e.to_string()))?;
                Some((path, list))
            }
            None => None,
        };
        let mut node = network(self.network, region, cluster, cluster_key, membership)
            .map_err(|(k, r)| invalid(k, r))?;
        node.accepted_cluster_keys = accepted;
        if let Some(mib) = self.engine.min_free_mib {
            node.min_free_bytes = mib.saturating_mul(1 << 20);
        }
        if let Some(secs) = self.engine.gc_grace_secs {
            node.gc_grace = (secs > 0).then(|| Duration::from_secs(secs));
        }
        node.validate()
            .map_err(|e| invalid(network_key(e.field), e.reason))?;
        let engine = engine(self.engine).map_err(|(k, r)| invalid(k, r))?;
        Ok(Settings {
            data_dir,
            node,
            http,
            engine,
        })
    }
}

type KeyError = (&'static str, String);

fn addrs(key: &'static str, list: Vec<String>) -> Result<Vec<Multiaddr>, KeyError> {
    list.iter()
        .map(|s| {
            s.parse::<Multiaddr>()
                .map_err(|e| (key, format!("{s:?} is not a multiaddr: {e}")))
        })
        .collect()
}

fn secs(value: Option<u64>, default: Duration) -> Duration {
    value.map_or(default, Duration::from_secs)
}

fn network(
    n: NetworkSection,
    region: Region,
    cluster: ClusterId,
    cluster_key: Option<ClusterKey>,
    membership: Option<(PathBuf, Membership)>,
) -> Result<NodeConfig, KeyError> {
    let mut c = NodeConfig::new(region, cluster);
    c.cluster_key = cluster_key;
    if let Some((path, list)) = membership {
        c.membership = Some(list);
        c.membership_file = Some(path);
    }
    c.max_peer_messages_per_sec = n
        .max_peer_messages_per_sec
        .unwrap_or(c.max_peer_messages_per_sec);
    c.max_peer_bytes_per_sec = n.max_peer_bytes_per_sec.unwrap_or(c.max_peer_bytes_per_sec);
    c.insecure_open_cluster = n.insecure_open_cluster.unwrap_or(false);
    match n.listen {
        Some(list) => c.listen = addrs("network.listen", list)?,
        // A member of a keyed cluster is reachable by default; a node
        // without a key keeps the loopback default.
        None if c.cluster_key.is_some() => {
            c.listen = addrs("network.listen", vec![OPEN_LISTEN.into()])?
        }
        None => {}
    }
    if let Some(list) = n.bootstrap {
        c.bootstrap = addrs("network.bootstrap", list)?;
    }
    if let Some(list) = n.allowlist {
        let peers = list
            .iter()
            .map(|s| {
                s.parse::<PeerId>()
                    .map_err(|e| ("network.allowlist", format!("{s:?} is not a peer id: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        c.allowlist = Some(peers);
    }
    c.max_connections = n.max_connections.unwrap_or(c.max_connections);
    c.max_connections_per_peer = n
        .max_connections_per_peer
        .unwrap_or(c.max_connections_per_peer);
    c.max_pending_incoming = n.max_pending_incoming.unwrap_or(c.max_pending_incoming);
    c.reconnect_min = n
        .reconnect_min_ms
        .map_or(c.reconnect_min, Duration::from_millis);
    c.reconnect_max = n
        .reconnect_max_ms
        .map_or(c.reconnect_max, Duration::from_millis);
    c.discovery_interval = secs(n.discovery_interval_secs, c.discovery_interval);
    c.anti_entropy_interval = secs(n.anti_entropy_interval_secs, c.anti_entropy_interval);
    c.dissemination = match n.dissemination.as_deref() {
        None => c.dissemination,
        Some("gossip") => Dissemination::Gossip,
        Some("regions") => Dissemination::Regions,
        Some(other) => {
            return Err((
                "network.dissemination",
                format!("{other:?} is not a dissemination: use \"gossip\" or \"regions\""),
            ))
        }
    };
    if let Some(f) = n.reconcile_fanout.as_deref() {
        c.reconcile_fanout =
            Fanout::parse_setting(f).map_err(|e| ("network.reconcile_fanout", e.to_string()))?;
    }
    c.min_push_retry = n
        .min_push_retry_ms
        .map_or(c.min_push_retry, Duration::from_millis);
    c.request_timeout = secs(n.request_timeout_secs, c.request_timeout);
    c.idle_connection_timeout = secs(n.idle_connection_timeout_secs, c.idle_connection_timeout);
    c.validate().map_err(|e| (network_key(e.field), e.reason))?;
    Ok(c)
}

/// The settings-file key of a field [`NodeConfig::validate`] names.
fn network_key(field: &'static str) -> &'static str {
    match field {
        "listen" => "network.listen",
        "max_connections" => "network.max_connections",
        "max_connections_per_peer" => "network.max_connections_per_peer",
        "max_concurrent_streams" => "network.max_concurrent_streams",
        "reconnect_min" => "network.reconnect_min_ms",
        "discovery_interval" => "network.discovery_interval_secs",
        "anti_entropy_interval" => "network.anti_entropy_interval_secs",
        "request_timeout" => "network.request_timeout_secs",
        "idle_connection_timeout" => "network.idle_connection_timeout_secs",
        "min_push_retry" => "network.min_push_retry_ms",
        "max_peer_messages_per_sec" => "network.max_peer_messages_per_sec",
        "gc_grace" => "engine.gc_grace_secs",
        other => other,
    }
}

/// The most HTTP connections a node may be configured to hold open (each
/// costs a file descriptor and a task).
pub const MAX_CONNECTIONS_CEILING: usize = 65_536;

fn http(h: HttpSection) -> Result<HttpConfig, KeyError> {
    let mut c = HttpConfig::default();
    if let Some(listen) = h.listen {
        c.listen = listen.parse().map_err(|e| {
            (
                "http.listen",
                format!("{listen:?} is not an address such as 127.0.0.1:7780: {e}"),
            )
        })?;
    }
    c.tls = match (h.tls_cert_file, h.tls_key_file) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => {
            return Err((
                "http.tls_cert_file",
                "set both http.tls_cert_file and http.tls_key_file, or neither".into(),
            ))
        }
    };
    c.insecure_plaintext = h.insecure_plaintext.unwrap_or(false);
    if c.tls.is_none() && !c.insecure_plaintext && !c.listen.ip().is_loopback() {
        return Err((
            "http.listen",
            format!(
                "{} is not a loopback address: serve TLS there (http.tls_cert_file and \
                 http.tls_key_file), or set http.insecure_plaintext = true to send tokens and \
                 documents in cleartext",
                c.listen
            ),
        ));
    }
    c.read_tokens = h.read_tokens.unwrap_or_default();
    c.write_tokens = h.write_tokens.unwrap_or_default();
    if c.read_tokens
        .iter()
        .chain(&c.write_tokens)
        .any(|t| t.len() < 16)
    {
        return Err((
            "http.read_tokens",
            "tokens must be at least 16 characters".into(),
        ));
    }
    c.body_limit = h.body_limit_bytes.unwrap_or(c.body_limit);
    if c.body_limit == 0 {
        return Err(("http.body_limit_bytes", "must be at least 1".into()));
    }
    c.max_watchers = h.max_watchers.unwrap_or(c.max_watchers);
    if h.session_secret.as_ref().is_some_and(|s| s.len() < 16) {
        return Err((
            "http.session_secret",
            "must be at least 16 characters".into(),
        ));
    }
    c.session_secret = h.session_secret;
    let keys = h.session_keys.unwrap_or_default();
    if !keys.is_empty() && c.session_secret.is_some() {
        return Err((
            "http.session_keys",
            "set either http.session_secret or http.session_keys, not both".into(),
        ));
    }
    if keys.len() > MAX_SESSION_KEYS {
        return Err((
            "http.session_keys",
            format!("at most {MAX_SESSION_KEYS} keys"),
        ));
    }
    let mut ids = std::collections::BTreeSet::new();
    for key in &keys {
        if key.id.is_empty() || key.id.len() > 64 || !ids.insert(key.id.as_str()) {
            return Err((
                "http.session_keys",
                format!("key id {:?}: ids are 1 to 64 characters and unique", key.id),
            ));
        }
        if key.secret.len() < 16 {
            return Err((
                "http.session_keys",
                format!(
                    "key {:?}: the secret must be at least 16 characters",
                    key.id
                ),
            ));
        }
    }
    c.session_keys = keys
        .into_iter()
        .map(|k| SessionKey {
            id: k.id,
            secret: k.secret,
        })
        .collect();
    let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
    c.session_wait = ms(h.session_wait_ms, c.session_wait);
    c.max_session_wait = ms(h.max_session_wait_ms, c.max_session_wait);
    if c.session_wait > c.max_session_wait {
        return Err((
            "http.session_wait_ms",
            "must not exceed http.max_session_wait_ms".into(),
        ));
    }
    c.max_waiters = h.max_waiters.unwrap_or(c.max_waiters);
    c.max_watchers_per_client = h
        .max_watchers_per_client
        .unwrap_or(c.max_watchers_per_client);
    c.max_connections = h.max_connections.unwrap_or(c.max_connections);
    c.max_requests = h.max_requests.unwrap_or(c.max_requests);
    for (key, value) in [
        ("http.max_waiters", c.max_waiters),
        ("http.max_watchers_per_client", c.max_watchers_per_client),
        ("http.max_connections", c.max_connections),
        ("http.max_requests", c.max_requests),
    ] {
        if value == 0 {
            return Err((key, "must be at least 1".into()));
        }
    }
    if c.max_connections > MAX_CONNECTIONS_CEILING {
        return Err((
            "http.max_connections",
            format!("must not exceed {MAX_CONNECTIONS_CEILING}"),
        ));
    }
    c.idle_timeout = ms(h.idle_timeout_ms, c.idle_timeout);
    c.body_timeout = ms(h.body_timeout_ms, c.body_timeout);
    for (key, value) in [
        ("http.idle_timeout_ms", c.idle_timeout),
        ("http.body_timeout_ms", c.body_timeout),
    ] {
        if value < Duration::from_millis(100) {
            return Err((key, "must be at least 100".into()));
        }
    }
    c.allowed_origins = h.allowed_origins.unwrap_or_default();
    for origin in &c.allowed_origins {
        crate::http::admission::check_origin_setting(origin)
            .map_err(|reason| ("http.allowed_origins", reason))?;
    }
    Ok(c)
}

fn automerge_repo(a: AutomergeRepoSection) -> Result<RepoConfig, KeyError> {
    let mut c = RepoConfig::default();
    c.enabled = a.enabled.unwrap_or(c.enabled);
    if let Some(path) = a.path {
        let reserved = ["/v1", "/metrics", "/health", "/ready"];
        let clash = reserved
            .iter()
            .any(|r| path == *r || path.starts_with(&format!("{r}/")));
        if !path.starts_with('/') || clash || path.contains(['{', '}', '*', '?', '#']) {
            return Err((
                "automerge_repo.path",
                format!(
                    "{path:?} must start with / and not be under /v1, /metrics, /health or /ready"
                ),
            ));
        }
        c.path = path;
    }
    c.max_connections = a.max_connections.unwrap_or(c.max_connections);
    c.max_documents_per_connection = a
        .max_documents_per_connection
        .unwrap_or(c.max_documents_per_connection);
    c.max_message_bytes = a.max_message_bytes.unwrap_or(c.max_message_bytes);
    c.max_sync_change_bytes = a.max_sync_change_bytes.unwrap_or(c.max_sync_change_bytes);
    for (key, value) in [
        ("automerge_repo.max_connections", c.max_connections),
        (
            "automerge_repo.max_documents_per_connection",
            c.max_documents_per_connection,
        ),
        ("automerge_repo.max_message_bytes", c.max_message_bytes),
        (
            "automerge_repo.max_sync_change_bytes",
            c.max_sync_change_bytes,
        ),
    ] {
        if value == 0 {
            return Err((key, "must be at least 1".into()));
        }
    }
    if c.max_connections > MAX_CONNECTIONS_CEILING {
        return Err((
            "automerge_repo.max_connections",
            format!("must not exceed {MAX_CONNECTIONS_CEILING}"),
        ));
    }
    let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
    c.ping_interval = ms(a.ping_interval_ms, c.ping_interval);
    c.missing_document_wait = ms(a.missing_document_wait_ms, c.missing_document_wait);
    if c.ping_interval < Duration::from_millis(100) {
        return Err((
            "automerge_repo.ping_interval_ms",
            "must be at least 100".into(),
        ));
    }
    Ok(c)
}

fn engine(e: EngineSection) -> Result<EngineConfig, KeyError> {
    let durability = match e.durability.as_deref() {
        None | Some("sync") => Durability::Sync,
        Some("buffered") => Durability::Buffered,
        Some(other) => {
            return Err((
                "engine.durability",
                format!("{other:?} is not \"sync\" or \"buffered\""),
            ))
        }
    };
    let defaults = EngineConfig::default();
    let c = EngineConfig {
        durability,
        cache_budget_bytes: e
            .cache_budget_mib
            .map_or(defaults.cache_budget_bytes, |mib| mib << 20),
        max_held_changes_per_doc: e
            .max_held_changes_per_doc
            .unwrap_or(defaults.max_held_changes_per_doc),
        max_held_bytes_per_doc: e
            .max_held_mib_per_doc
            .map_or(defaults.max_held_bytes_per_doc, |mib| mib << 20),
        max_held_changes: e.max_held_changes.unwrap_or(defaults.max_held_changes),
        max_held_bytes: e
            .max_held_mib
            .map_or(defaults.max_held_bytes, |mib| mib << 20),
        shape: ShapeLimits {
            max_depth: e.max_depth.unwrap_or(defaults.shape.max_depth),
            max_ops_per_change: e
                .max_ops_per_change
                .unwrap_or(defaults.shape.max_ops_per_change),
            max_objects_per_change: e
                .max_objects_per_change
                .unwrap_or(defaults.shape.max_objects_per_change),
            max_document_bytes: e
                .max_document_mib
                .map_or(defaults.shape.max_document_bytes, |mib| mib << 20),
        },
        audit_max_entries: e.audit_max_entries.unwrap_or(defaults.audit_max_entries),
        ..defaults
    };
    c.validate().map_err(|err| ("engine", err.to_string()))?;
    Ok(c)
}

/// The timers of [`NodeConfig::loopback`] as `[network]` lines of a settings
/// file: redial after 100 ms to 2 s, discovery and anti-entropy every 5 s,
/// requests time out after 10 s. For nodes on one machine or LAN that the
/// benchmarks and the chaos harness start as child processes.
pub const LAN_TIMERS: &str = "reconnect_min_ms = 100
reconnect_max_ms = 2000
discovery_interval_secs = 5
anti_entropy_interval_secs = 5
request_timeout_secs = 10
";

/// Creates `dir` and writes `dir/node.toml` for a node of `cluster` in
/// `region` with its data in `dir`, the cluster key file `key_file` if
/// given, and the [`LAN_TIMERS`]; returns the file's path.
pub fn write_lan_settings(
    dir: &Path,
    region: &str,
    cluster: &str,
    key_file: Option<&Path>,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("node.toml");
    let key = key_file.map_or(String::new(), |k| {
        format!("cluster_key_file = {:?}\n", k.display().to_string())
    });
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\nregion = {region:?}\ncluster = {cluster:?}\n{key}[network]\n{LAN_TIMERS}",
            dir.display().to_string()
        ),
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, SettingsError> {
        let file: FileSettings = toml::from_str(text).map_err(|e| SettingsError::Parse {
            path: "test.toml".into(),
            message: e.to_string(),
        })?;
        file.resolve(Overrides::default(), "test.toml")
    }

    #[test]
    fn the_free_space_threshold_defaults_to_a_gib_and_zero_turns_it_off() {
        let threshold = |extra: &str| {
            parse(&format!("data_dir = \"/a\"\n{extra}"))
                .map(|s| s.node.min_free_bytes)
                .ok()
        };
        assert_eq!(threshold(""), Some(1 << 30));
        assert_eq!(threshold("[engine]\nmin_free_mib = 300"), Some(300 << 20));
        assert_eq!(threshold("[engine]\nmin_free_mib = 0"), Some(0));
    }

    #[test]
    fn the_gc_grace_defaults_to_ten_days_zero_turns_it_off_and_it_must_span_three_rounds() {
        let grace = |extra: &str| {
            parse(&format!("data_dir = \"/a\"\n{extra}"))
                .map(|s| s.node.gc_grace)
                .map_err(|e| e.to_string())
        };
        assert_eq!(grace(""), Ok(Some(Duration::from_secs(864_000))));
        assert_eq!(grace("[engine]\ngc_grace_secs = 0"), Ok(None));
        assert_eq!(
            grace("[engine]\ngc_grace_secs = 90"),
            Ok(Some(Duration::from_secs(90)))
        );
        // Three anti-entropy rounds of 30 s are 90 s.
        let err = grace("[engine]\ngc_grace_secs = 89").expect_err("below three rounds");
        assert!(err.contains("engine.gc_grace_secs"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() -> Result<(), Box<dyn std::error::Error>> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/node.toml");
        let mut file = FileSettings::load(&path)?;
        assert_eq!(
            file.cluster_key_file.as_deref(),
            Some(Path::new("/etc/causeway/cluster.key"))
        );
        // The example's key file is not on this machine: one made here.
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("cluster.key");
        ClusterKey::generate()?.create(&key)?;
        file.cluster_key_file = Some(key);
        let settings = file.resolve(Overrides::default(), "examples/node.toml")?;
        assert_eq!(settings.node.region.as_str(), "eu-west");
        assert!(settings.node.cluster_key.is_some());
        // Without the key, listening on every interface is refused.
        let mut file = FileSettings::load(&path)?;
        file.cluster_key_file = None;
        let err = file
            .resolve(Overrides::default(), "examples/node.toml")
            .err();
        assert!(
            matches!(&err, Some(SettingsError::Invalid { key, .. }) if key == "network.listen"),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn lan_settings_give_the_loopback_timers() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = write_lan_settings(&dir.path().join("n"), "eu", "c", None)?;
        let s = FileSettings::load(&path)?.resolve(Overrides::default(), "n")?;
        let lan = NodeConfig::loopback(Region::new("eu")?, ClusterId::new("c")?);
        assert_eq!(s.data_dir, dir.path().join("n"));
        assert_eq!(s.node.cluster.as_str(), "c");
        assert_eq!(
            (
                s.node.reconnect_min,
                s.node.reconnect_max,
                s.node.discovery_interval
            ),
            (lan.reconnect_min, lan.reconnect_max, lan.discovery_interval)
        );
        assert_eq!(
            (s.node.anti_entropy_interval, s.node.request_timeout),
            (lan.anti_entropy_interval, lan.request_timeout)
        );
        Ok(())
    }

    #[test]
    fn access_settings_resolve_and_are_checked() -> Result<(), Box<dyn std::error::Error>> {
        let s = parse("data_dir = \"/a\"")?;
        assert_eq!(s.http.tokens_file, Some(PathBuf::from("/a/tokens.toml")));
        let s = parse("data_dir = \"/a\"\n[http]\ntokens_file = \"/etc/causeway/tokens.toml\"")?;
        assert_eq!(
            s.http.tokens_file,
            Some(PathBuf::from("/etc/causeway/tokens.toml"))
        );
        let open = "data_dir = \"/a\"\n[http]\nlisten = \"0.0.0.0:7780\"\n";
        let e = parse(open).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("key http.listen") && e.contains("insecure_plaintext"),
            "{e}"
        );
        assert!(parse(&format!("{open}insecure_plaintext = true")).is_ok());
        let tls = parse(&format!(
            "{open}tls_cert_file = \"/c.pem\"\ntls_key_file = \"/k.pem\""
        ))?;
        assert_eq!(
            tls.http.tls.map(|t| (t.cert, t.key)),
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        let half = parse(&format!("{open}tls_cert_file = \"/c.pem\""));
        assert!(half.is_err_and(|e| e.to_string().contains("http.tls_cert_file")));
        let key = |id: &str, secret: &str| {
            format!("[[http.session_keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n")
        };
        let good = "0123456789abcdef";
        let s = parse(&format!(
            "data_dir = \"/a\"\n{}{}",
            key("new", good),
            key("old", good)
        ))?;
        let ids: Vec<&str> = s.http.session_keys.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["new", "old"]);
        for (bad, reason) in [
            (key("a", "short"), "at least 16"),
            (format!("{}{}", key("a", good), key("a", good)), "unique"),
            (key("", good), "unique"),
            (
                format!("[http]\nsession_secret = \"{good}\"\n{}", key("a", good)),
                "not both",
            ),
        ] {
            let text = format!("data_dir = \"/a\"\n{bad}");
            let e = parse(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("http.session_keys") && e.contains(reason),
                "{text}: {e}"
            );
        }
        Ok(())
    }

    #[test]
    fn flags_override_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let file: FileSettings = toml::from_str(
            "data_dir = \"/a\"\nregion = \"eu\"\n[network]\nlisten = [\"/ip4/127.0.0.1/tcp/1\"]",
        )?;
        let overrides = Overrides {
            region: Some("us".into()),
            listen: vec!["/ip4/127.0.0.1/tcp/2".into()],
            ..Overrides::default()
        };
        let s = file.resolve(overrides, "f")?;
        assert_eq!(s.node.region.as_str(), "us");
        assert_eq!(s.node.listen[0].to_string(), "/ip4/127.0.0.1/tcp/2");
        assert_eq!(s.data_dir, PathBuf::from("/a"));
        Ok(())
    }

    #[test]
    fn errors_name_the_key_and_reason() {
        let err = |text: &str| parse(text).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err("data_dir = \"/a\"\nregoin = \"x\"").contains("unknown field `regoin`"));
        assert!(err("data_dir = \"/a\"\nregion = \"EU West\"").contains("key region"));
        assert!(err("data_dir = \"/a\"\n[network]\nbootstrap = [\"nope\"]")
            .contains("key network.bootstrap"));
        assert!(err("data_dir = \"/a\"\n[network]\nmax_connections = 0")
            .contains("key network.max_connections"));
        assert!(
            err("data_dir = \"/a\"\n[http]\nlisten = \"localhost\"").contains("key http.listen")
        );
        assert!(err("data_dir = \"/a\"\n[engine]\ndurability = \"maybe\"")
            .contains("key engine.durability"));
        assert!(err("region = \"eu\"").contains("key data_dir: is required"));
        assert!(err("data_dir = 3").contains("invalid type"));
        for path in ["v1", "/v1/sync", "/metrics", "/ws/{id}"] {
            let text = format!("data_dir = \"/a\"\n[automerge_repo]\npath = \"{path}\"");
            assert!(err(&text).contains("key automerge_repo.path"), "{path}");
        }
        assert!(
            err("data_dir = \"/a\"\n[automerge_repo]\nmax_documents_per_connection = 0")
                .contains("key automerge_repo.max_documents_per_connection")
        );
        for fanout in ["0,0", "2", "two,one", "2,1,1"] {
            let text = format!("data_dir = \"/a\"\n[network]\nreconcile_fanout = \"{fanout}\"");
            assert!(
                err(&text).contains("key network.reconcile_fanout"),
                "{fanout}"
            );
        }
        let fanout = |text: &str| parse(text).map(|s| s.node.reconcile_fanout).ok();
        assert_eq!(
            fanout("data_dir = \"/a\"\n[network]\nreconcile_fanout = \"2,1\""),
            Some(Some(Fanout {
                local: 2,
                remote: 1
            }))
        );
        assert_eq!(
            fanout("data_dir = \"/a\"\n[network]\nreconcile_fanout = \"all\""),
            Some(None)
        );
        assert_eq!(fanout("data_dir = \"/a\""), Some(None));
        assert!(err("data_dir = \"/a\"\n[network]\nmin_push_retry_ms = 0")
            .contains("key network.min_push_retry_ms"));
        let retry = |text: &str| parse(text).map(|s| s.node.min_push_retry).ok();
        assert_eq!(
            retry("data_dir = \"/a\"\n[network]\nmin_push_retry_ms = 50"),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            retry("data_dir = \"/a\""),
            Some(crate::config::DEFAULT_MIN_PUSH_RETRY)
        );
        let ok = parse(
            "data_dir = \"/a\"\n[automerge_repo]\npath = \"/sync\"\nmissing_document_wait_ms = 250",
        );
        let repo = ok.map(|s| s.http.automerge_repo).ok();
        assert_eq!(repo.as_ref().map(|r| r.path.as_str()), Some("/sync"));
        assert_eq!(
            repo.map(|r| r.missing_document_wait),
            Some(Duration::from_millis(250))
        );
    }
}
