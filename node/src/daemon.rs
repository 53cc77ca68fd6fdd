//! `causeway node`: the daemon an operator runs in each region.
//!
//! Opens the store and the identity in the data directory, starts the
//! networking layer and the HTTP API, and runs until SIGTERM or SIGINT:
//! then it stops accepting HTTP requests, ends watch streams, finishes the
//! requests in progress, hands the writes it acknowledged to its peers (see
//! [`crate::NodeHandle::shutdown`]), closes connections and closes the store.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use causeway_engine::Engine;
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::access::Authenticator;
use crate::cluster_key::ClusterKey;
use crate::http::tls::CertStore;
use crate::settings::{FileSettings, Overrides, Settings};
use crate::{http, identity, Node};

/// The file in the data directory that keeps blocks of misbehaving peers.
pub const SANCTIONS_FILE: &str = "blocked-peers.json";

/// Flags of `causeway node` (each also read from a `CAUSEWAY_*` variable).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Settings file (TOML); see examples/node.toml.
    #[arg(long, short, env = "CAUSEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (store and identity).
    #[arg(long, env = "CAUSEWAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's region.
    #[arg(long, env = "CAUSEWAY_REGION")]
    pub region: Option<String>,
    /// Cluster id.
    #[arg(long, env = "CAUSEWAY_CLUSTER")]
    pub cluster: Option<String>,
    /// Multiaddr to listen on (repeat for several; replaces the file's).
    #[arg(long, env = "CAUSEWAY_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Multiaddr of a peer to dial (repeat for several; replaces the file's).
    #[arg(long, env = "CAUSEWAY_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Address of the HTTP API, such as 127.0.0.1:7780.
    #[arg(long, env = "CAUSEWAY_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// The cluster key file (`causeway cluster init`); only nodes holding
    /// the same key can connect.
    #[arg(long, env = "CAUSEWAY_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// A further key file whose key dialers may hold, during a key rotation
    /// (repeat for several; replaces the file's list). The node still dials
    /// under its own key.
    #[arg(long, env = "CAUSEWAY_ACCEPT_CLUSTER_KEY_FILES", value_delimiter = ',')]
    pub accept_cluster_key_file: Vec<PathBuf>,
    /// The membership list (TOML, `[[member]] peer_id, region`): only
    /// listed peers may connect, each counted in its listed region. Read
    /// again when the file changes.
    #[arg(long, env = "CAUSEWAY_MEMBERSHIP_FILE")]
    pub membership_file: Option<PathBuf>,
    /// Listen beyond loopback without a cluster key or allowlist: anyone
    /// who reaches the node can join the cluster and change any document.
    #[arg(long, env = "CAUSEWAY_INSECURE_OPEN_CLUSTER")]
    pub insecure_open_cluster: bool,
}

impl Args {
    /// The settings these flags and the file (if any) describe.
    pub fn settings(&self) -> Result<Settings> {
        let (file, name) = match &self.config {
            Some(path) => (FileSettings::load(path)?, path.display().to_string()),
            None => (FileSettings::default(), "flags/environment".to_string()),
        };
        let overrides = Overrides {
            data_dir: self.data_dir.clone(),
            region: self.region.clone(),
            cluster: self.cluster.clone(),
            listen: self.listen.clone(),
            bootstrap: self.bootstrap.clone(),
            http_listen: self.http_listen.clone(),
            cluster_key_file: self.cluster_key_file.clone(),
            accept_cluster_key_files: self.accept_cluster_key_file.clone(),
            membership_file: self.membership_file.clone(),
            insecure_open_cluster: self.insecure_open_cluster,
        };
        Ok(file.resolve(overrides, &name)?)
    }
}

/// Runs the daemon until a signal, or until the networking layer fails.
pub async fn run(settings: Settings) -> Result<()> {
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            settings.data_dir.display()
        )
    })?;
    let auth = Authenticator::new(
        settings.http.tokens_file.clone(),
        &settings.http.read_tokens,
        &settings.http.write_tokens,
    )
    .context("cannot start with this tokens file")?;
    let certs = match &settings.http.tls {
        Some(files) => {
            Some(CertStore::open(files.clone()).context("cannot start with this TLS certificate")?)
        }
        None => None,
    };
    let acceptor = certs.as_ref().map(CertStore::acceptor).transpose()?;
    let (key, created) = identity::load_or_create(&settings.data_dir)?;
    let peer_id = key.public().to_peer_id();
    if created {
        info!(%peer_id, "created a new node identity");
    }
    crate::http::backup::remove_leftovers(&settings.data_dir);
    let store = settings.data_dir.join("store");
    let engine = tokio::task::spawn_blocking({
        let config = settings.engine.clone();
        move || Engine::open(&store, config)
    })
    .await??;
    let listener = TcpListener::bind(settings.http.listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", settings.http.listen))?;
    let mut node_config = settings.node.clone();
    node_config.sanctions_file = Some(settings.data_dir.join(SANCTIONS_FILE));
    let node = Node::start(engine.clone(), key, node_config)?;
    let addrs = node
        .listen_addrs(std::time::Duration::from_secs(10))
        .await?;
    let http_addr = listener.local_addr()?;
    info!(%peer_id, region = %settings.node.region, cluster = %settings.node.cluster,
        http = %http_addr, "node running");
    for addr in &addrs {
        info!(%addr, "peers can dial");
    }
    let config = &settings.node;
    match &config.cluster_key {
        Some(key) => {
            let accepted: Vec<String> =
                config.accepted_cluster_keys.iter().map(ClusterKey::fingerprint).collect();
            info!(fingerprint = %key.fingerprint(), also_accepted = ?accepted,
                "cluster key: only nodes holding it can connect")
        }
        // Judged by the configured addresses: a wildcard reports one
        // address per interface, and the first may be loopback alone.
        None if config.listen.iter().all(crate::config::is_loopback) => info!(
            "no cluster key: listening on loopback only (create one with `causeway cluster init` \
             and set cluster_key_file to take part in a cluster across machines)"
        ),
        None if config.allowlist.is_some() => info!("no cluster key: only allowlisted peers can connect"),
        None => warn!("no cluster key and no allowlist: any peer that reaches this node can join the cluster (insecure_open_cluster)"),
    }
    if let (Some(list), Some(path)) = (&config.membership, &config.membership_file) {
        info!(members = list.len(), file = %path.display(),
            "membership list: only listed peers can connect, each in its listed region");
    }
    // The line operators and scripts look for, on stdout.
    println!(
        "{}",
        serde_json::json!({
            "peer_id": peer_id.to_string(),
            "http": format!("{}://{http_addr}", if certs.is_some() { "https" } else { "http" }),
            "listen": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    );
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let api = http::router(
        engine.clone(),
        Some(node.clone()),
        &settings.http,
        Arc::clone(&auth),
        certs.clone(),
        closing.clone(),
    );
    tokio::spawn(Arc::clone(&auth).watch(closing.clone()));
    if let Some(certs) = &certs {
        info!(cert = %certs.files().cert.display(),
            "the HTTP API serves TLS; the certificate is read again when it changes or on SIGHUP");
        tokio::spawn(Arc::clone(certs).watch(closing.clone()));
    } else if !http_addr.ip().is_loopback() {
        warn!(%http_addr, "the HTTP API serves plain HTTP beyond loopback (http.insecure_plaintext): \
            tokens and documents cross the network in cleartext");
    }
    let server = tokio::spawn({
        let config = settings.http.clone();
        async move { http::serve(listener, api, &config, acceptor, closing).await }
    });
    match (auth.required(), auth.file()) {
        (true, Some(file)) => info!(active = auth.active_tokens(), file = %file.display(),
            "the HTTP API needs a bearer token; the tokens file is read again when it changes"),
        (true, None) => info!("the HTTP API needs a bearer token (settings file tokens)"),
        (false, _) if http_addr.ip().is_loopback() => info!(
            "the HTTP API takes requests without a token (loopback only); `causeway token create` closes it"),
        (false, _) => warn!(
            "the HTTP API takes requests without a token from anyone who reaches it; \
             `causeway token create` closes it"),
    }
    let reason = wait_for_stop(&node, &auth, certs.as_deref()).await?;
    info!(%reason, "stopping: no new HTTP requests, watch streams end");
    let _ = closing_tx.send(true);
    server.await.context("the HTTP server task failed")??;
    let network = node.shutdown().await;
    drop(engine);
    info!("stopped");
    network.map_err(Into::into)
}

/// How often the daemon looks whether a drain is done.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Waits for a reason to stop, reading the tokens file and the TLS
/// certificate again on SIGHUP.
async fn wait_for_stop(
    node: &crate::NodeHandle,
    auth: &Authenticator,
    certs: Option<&CertStore>,
) -> Result<String> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Fused: a drain wait that ended in an error is not polled again after
    // a SIGHUP restarts the select.
    let drained = node.drained(DRAIN_POLL).fuse();
    let stopped = node.stopped_with();
    tokio::pin!(drained, stopped);
    loop {
        return Ok(tokio::select! {
            _ = term.recv() => "SIGTERM".to_string(),
            _ = int.recv() => "SIGINT".to_string(),
            _ = hup.recv() => {
                info!("SIGHUP: reading the tokens file and TLS certificate again");
                auth.reload_and_log();
                if let Some(certs) = certs {
                    certs.reload_and_log(true);
                }
                continue;
            }
            Ok(()) = &mut drained => "drained: a peer holds everything this node held".to_string(),
            result = &mut stopped => {
                let reason = result.err().unwrap_or_else(|| "the networking task ended".into());
                warn!(%reason, "the networking layer stopped");
                reason
            }
        });
    }
}
