//! The HTTP API of a node (axum). See `docs/api.md` for every route with
//! curl examples.
//!
//! * [`docs`]: documents as JSON (read, replace, merge-patch, delete, list).
//! * [`changes`]: binary Automerge changes for clients that keep their own
//!   document.
//! * [`watch`]: Server-Sent Events for a document or a prefix.
//! * [`session`]: session tokens, cross-region durability, "where is my
//!   write?".
//! * [`cluster`]: status, `/metrics`, `/health`, `/ready`.
//! * [`backup`]: a consistent copy of the store, streamed.
//! * [`audit`]: the audit feed: who wrote what, when.
//! * [`auth`]: bearer tokens and what each route needs of their grants
//!   (see [`crate::access`]).
//! * [`admission`]: allowed origins, request slots, body deadline.
//! * [`automerge_repo`]: the upgrade to the automerge-repo WebSocket
//!   endpoint.
//! * [`connections`]: connection limits, idle timeout, graceful shutdown.
//! * [`ui`]: the dashboard page at `/ui`.
//! * [`tls`]: TLS with rustls, certificates reloaded when they change.
//! * [`names`]: document ids and heads as requests and answers write them.
//! * [`error`]: every failure as a status and a JSON body with a stable code.
//!
//! Engine calls block (a write waits for its fsync), so handlers run them
//! on tokio's blocking pool.

pub mod admission;
pub mod audit;
pub mod auth;
pub mod automerge_repo;
pub mod backup;
pub mod changes;
pub mod cluster;
pub mod connections;
pub mod docs;
pub mod error;
pub mod names;
pub mod session;
pub mod tls;
pub mod ui;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use causeway_engine::{Engine, TokenKey};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use self::admission::Admission;
use self::connections::ConnectionStats;
use self::error::ApiError;
use self::watch::ClientWatchers;
use crate::access::Authenticator;
use crate::NodeHandle;

/// Settings of the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Address to listen on. Default `127.0.0.1:7780`.
    pub listen: SocketAddr,
    /// Serve TLS with this certificate and key. Without it, plain HTTP is
    /// served only on loopback unless `insecure_plaintext` is set.
    pub tls: Option<tls::TlsFiles>,
    /// Serve plain HTTP on an address beyond loopback (tokens and
    /// documents then cross the network in cleartext: for a network of
    /// your own, or behind a proxy on the same host that terminates TLS).
    pub insecure_plaintext: bool,
    /// The tokens file (see [`crate::access::token_file`]). Once it exists,
    /// every request needs a token. `causeway node` uses
    /// `DATA_DIR/tokens.toml`.
    pub tokens_file: Option<std::path::PathBuf>,
    /// Tokens of the settings file that may read every document (kept for
    /// settings files written before the tokens file; prefer the tokens
    /// file). With none of these and no tokens file, the API is open.
    pub read_tokens: Vec<String>,
    /// Tokens of the settings file that may use every route (`admin:*`).
    pub write_tokens: Vec<String>,
    /// Largest request body, in bytes. Default 8 MiB.
    pub body_limit: usize,
    /// Watch streams (SSE) open at once; more get 503. Default 256.
    pub max_watchers: usize,
    /// The secret session tokens are signed with; every node of a cluster
    /// needs the same. `None`: a key derived from a fixed string, which
    /// detects edited tokens but not forged ones (`causeway node` derives
    /// it from the cluster id instead). Ignored when `session_keys` has
    /// keys.
    pub session_secret: Option<String>,
    /// Session token keys with ids, for rotation: the first signs new
    /// tokens, every one is accepted. Rotate by putting a new key first on
    /// every node, then removing the old one once the tokens it signed no
    /// longer matter (they cover heads, so an old token that fails only
    /// costs a client its read-your-writes wait).
    pub session_keys: Vec<SessionKey>,
    /// How long a read with a session token, or a write asking for other
    /// regions, waits when the request does not say. Default 5 s.
    pub session_wait: Duration,
    /// The longest wait a request may ask for. Default 30 s.
    pub max_session_wait: Duration,
    /// Requests waiting at once for a session token or for other regions.
    /// Reads beyond it get 503 `too_many_waiters`; writes beyond it are
    /// committed and answered at once with what is known. Default 256.
    pub max_waiters: usize,
    /// Watch streams one client (one IP address) may hold open at once;
    /// more get 429 `too_many_watchers`. Default 32.
    pub max_watchers_per_client: usize,
    /// Connections open at once. At the limit the connection idle longest
    /// (no request in progress) is closed to admit a new one; if every
    /// connection is busy, new ones wait in the listen backlog. Default
    /// 1,024.
    pub max_connections: usize,
    /// How long a connection may go without a request in progress (before
    /// its first request's headers are complete, or between requests)
    /// before it is closed. Default 10 s.
    pub idle_timeout: Duration,
    /// Requests being handled at once (a watch stream counts until its
    /// headers are sent); more get 503 `overloaded`. Default 512.
    pub max_requests: usize,
    /// How long a request's body may take to arrive; slower ones get 408
    /// `request_timeout` and change nothing. Default 30 s.
    pub body_timeout: Duration,
    /// The automerge-repo WebSocket endpoint on this listener.
    pub automerge_repo: crate::automerge_repo::RepoConfig,
    /// Web origins (`scheme://host[:port]`) whose pages may call the API.
    /// A request with any other `Origin` header gets 403
    /// `origin_not_allowed`, so a web page cannot use a node on the
    /// visitor's machine or network. Requests without `Origin` (curl,
    /// servers, other nodes) are not affected. Default: none.
    pub allowed_origins: Vec<String>,
}

/// A named session token key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKey {
    /// Its name, for operators (shown in `/v1/status`).
    pub id: String,
    /// The secret (at least 16 characters).
    pub secret: String,
}

/// Most session token keys in force at once.
pub const MAX_SESSION_KEYS: usize = 8;

/// The session token keys in force.
#[derive(Debug, Clone)]
pub struct SessionKeys {
    /// Signs new tokens.
    pub signing: TokenKey,
    /// Checks tokens: the signing key first, then older ones.
    pub accepted: Vec<TokenKey>,
    /// Their ids, in the same order.
    pub ids: Vec<String>,
}

impl SessionKeys {
    /// The keys `config` names.
    pub fn of(config: &HttpConfig) -> SessionKeys {
        let named: Vec<(String, &str)> = if config.session_keys.is_empty() {
            let secret = config
                .session_secret
                .as_deref()
                .unwrap_or(DEFAULT_SESSION_SECRET);
            vec![("default".to_string(), secret)]
        } else {
            config
                .session_keys
                .iter()
                .map(|k| (k.id.clone(), k.secret.as_str()))
                .collect()
        };
        let accepted: Vec<TokenKey> = named
            .iter()
            .map(|(_, secret)| TokenKey::from_secret(secret.as_bytes()))
            .collect();
        SessionKeys {
            signing: accepted[0].clone(),
            accepted,
            ids: named.into_iter().map(|(id, _)| id).collect(),
        }
    }
}

/// Session settings in force, shared by handlers.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// The keys tokens are signed and checked with.
    pub keys: SessionKeys,
    /// Default wait.
    pub default_wait: Duration,
    /// Longest wait.
    pub max_wait: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7780)),
            tls: None,
            insecure_plaintext: false,
            tokens_file: None,
            read_tokens: Vec::new(),
            write_tokens: Vec::new(),
            body_limit: 8 << 20,
            max_watchers: 256,
            session_secret: None,
            session_keys: Vec::new(),
            session_wait: Duration::from_secs(5),
            max_session_wait: Duration::from_secs(30),
            max_waiters: 256,
            max_watchers_per_client: 32,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(10),
            max_requests: 512,
            body_timeout: Duration::from_secs(30),
            allowed_origins: Vec::new(),
            automerge_repo: crate::automerge_repo::RepoConfig::default(),
        }
    }
}

/// The token secret when none is configured.
pub const DEFAULT_SESSION_SECRET: &str = "causeway-session";

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// The networking layer, when the node runs one.
    pub node: Option<NodeHandle>,
    /// Who may do what.
    pub auth: Arc<Authenticator>,
    /// Free watch slots.
    pub watchers: Arc<Semaphore>,
    /// How many watch slots there are.
    pub max_watchers: usize,
    /// Session token key and waits.
    pub session: SessionLimits,
    /// Free slots for requests that wait (session reads, durable writes).
    pub waiters: Arc<Semaphore>,
    /// Watch streams per client.
    pub client_watchers: Arc<ClientWatchers>,
    /// Origin, request slot and body checks.
    pub admission: Arc<Admission>,
    /// Turns true when the node shuts down: watch streams end.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// Connection figures, filled by [`connections::serve`].
    pub connections: Arc<ConnectionStats>,
    /// The automerge-repo endpoint, when enabled.
    pub repo: Option<Arc<crate::automerge_repo::Hub>>,
    /// The TLS certificate served, if any.
    pub certs: Option<Arc<tls::CertStore>>,
}

/// An HTTP API ready to serve: its router and what the connection layer
/// shares with it.
pub struct Api {
    /// The routes.
    pub router: Router,
    /// Connection figures (the router's `/metrics` reports them).
    pub connections: Arc<ConnectionStats>,
}

/// The API over `engine` (and `node`, for status and metrics), checking
/// tokens with `auth` (see [`Authenticator::new`]) and reporting the
/// figures of `certs` (the TLS certificate served, if any). Watch streams
/// end when `closing` turns true.
pub fn router(
    engine: Engine,
    node: Option<NodeHandle>,
    config: &HttpConfig,
    auth: Arc<Authenticator>,
    certs: Option<Arc<tls::CertStore>>,
    closing: tokio::sync::watch::Receiver<bool>,
) -> Api {
    let connections = Arc::new(ConnectionStats::default());
    let repo_config = &config.automerge_repo;
    let repo = repo_config.enabled.then(|| {
        crate::automerge_repo::Hub::start(engine.clone(), node.clone(), repo_config.clone())
    });
    let state = AppState {
        repo,
        engine,
        node,
        auth,
        certs,
        watchers: Arc::new(Semaphore::new(config.max_watchers)),
        max_watchers: config.max_watchers,
        session: SessionLimits {
            keys: SessionKeys::of(config),
            default_wait: config.session_wait.min(config.max_session_wait),
            max_wait: config.max_session_wait,
        },
        waiters: Arc::new(Semaphore::new(config.max_waiters)),
        client_watchers: ClientWatchers::new(config.max_watchers_per_client),
        admission: Arc::new(Admission::new(config)),
        closing,
        connections: Arc::clone(&connections),
    };
    let api = Router::new()
        .route("/v1/docs", get(docs::list))
        .route(
            "/v1/docs/{*id}",
            get(docs::read)
                .put(docs::replace)
                .patch(docs::patch)
                .delete(docs::delete),
        )
        .route(
            "/v1/changes/{*id}",
            get(changes::since).post(changes::apply),
        )
        .route("/v1/where/{*id}", get(session::where_is))
        .route("/v1/watch", get(watch::prefix))
        .route("/v1/watch/{*id}", get(watch::document))
        .route("/v1/status", get(cluster::status))
        .route("/v1/repair/{*id}", axum::routing::post(docs::repair))
        .route("/v1/backup", axum::routing::post(backup::backup))
        .route("/v1/drain", axum::routing::post(cluster::drain))
        .route(
            "/v1/blocked/{peer}",
            axum::routing::put(cluster::block).delete(cluster::block),
        )
        .route("/v1/audit", get(audit::feed))
        .route("/metrics", get(cluster::metrics))
        // Outermost last: the token is checked before a request slot is
        // taken and the body read.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admission::admit,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ));
    let mut router = Router::new()
        .route("/health", get(cluster::health))
        .route("/ready", get(cluster::ready))
        // Its own token check: the first navigation carries it in the query.
        .route("/ui", get(ui::page));
    if repo_config.enabled {
        // Its own token check (the query string may carry the token) and
        // connection limit; no request slot, since a connection lasts.
        router = router.route(&repo_config.path, get(automerge_repo::upgrade));
    }
    let router = router
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admission::origin,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("an HTTP handler panicked");
                axum::response::IntoResponse::into_response(internal())
            },
        ))
        .with_state(state);
    Api {
        router,
        connections,
    }
}

/// Serves `api` on `listener` with the connection limits of `config` until
/// `closing` turns true (see [`connections`]), over TLS with the
/// certificate of `tls` if given.
pub async fn serve(
    listener: TcpListener,
    api: Api,
    config: &HttpConfig,
    tls: Option<TlsAcceptor>,
    closing: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    connections::serve(listener, api.router, config, tls, api.connections, closing).await
}

/// 500 `internal`, without the details (they go to the log).
fn internal() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the node failed handling this request; its log says why",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "no_route",
        "no such route",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Runs a blocking engine call on the blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "an HTTP request's engine call failed");
        internal()
    })?
}
