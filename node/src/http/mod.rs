//! The HTTP API of a node (axum). See `docs/api.md` for every route with
//! curl examples.
//!
//! * [`docs`]: documents as JSON (read, replace, merge-patch, delete, list).
//! * [`changes`]: binary Automerge changes for clients that keep their own
//!   document.
//! * [`watch`]: Server-Sent Events for a document or a prefix.
//! * [`cluster`]: status, `/metrics`, `/health`, `/ready`.
//! * [`auth`]: optional bearer tokens, read-only or read-write.
//! * [`error`]: every failure as a status and a JSON body with a stable code.
//!
//! Engine calls block (a write waits for its fsync), so handlers run them
//! on tokio's blocking pool.

pub mod auth;
pub mod changes;
pub mod cluster;
pub mod docs;
pub mod error;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use causeway_engine::Engine;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use self::auth::Tokens;
use self::error::ApiError;
use crate::NodeHandle;

/// Settings of the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Address to listen on. Default `127.0.0.1:7780`.
    pub listen: SocketAddr,
    /// Bearer tokens that may read. With no tokens at all (read or write),
    /// the API is open.
    pub read_tokens: Vec<String>,
    /// Bearer tokens that may read and write.
    pub write_tokens: Vec<String>,
    /// Largest request body, in bytes. Default 8 MiB.
    pub body_limit: usize,
    /// Watch streams (SSE) open at once; more get 503. Default 256.
    pub max_watchers: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7780)),
            read_tokens: Vec::new(),
            write_tokens: Vec::new(),
            body_limit: 8 << 20,
            max_watchers: 256,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// The networking layer, when the node runs one.
    pub node: Option<NodeHandle>,
    /// Who may do what.
    pub tokens: Arc<Tokens>,
    /// Free watch slots.
    pub watchers: Arc<Semaphore>,
}

/// The API's router over `engine` (and `node`, for status and metrics).
pub fn router(engine: Engine, node: Option<NodeHandle>, config: &HttpConfig) -> Router {
    let state = AppState {
        engine,
        node,
        tokens: Arc::new(Tokens::new(&config.read_tokens, &config.write_tokens)),
        watchers: Arc::new(Semaphore::new(config.max_watchers)),
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
        .route("/v1/watch", get(watch::prefix))
        .route("/v1/watch/{*id}", get(watch::document))
        .route("/v1/status", get(cluster::status))
        .route("/metrics", get(cluster::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ));
    Router::new()
        .route("/health", get(cluster::health))
        .route("/ready", get(cluster::ready))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then finishes
/// the requests in progress.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
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
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request's task failed: {e}"),
        )
    })?
}
