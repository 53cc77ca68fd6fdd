//! Cluster status, metrics and probes.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use causeway_engine::DocId;
use libp2p::PeerId;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::access::grant::Level;
use crate::access::Caller;

/// `GET /health`: the process answers, with the API requests in progress
/// (this probe takes no request slot).
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"status": "ok", "requests": state.admission.in_progress()}))
}

/// `GET /ready`: the networking task runs and listens (always ready for a
/// node without networking).
pub async fn ready(State(state): State<AppState>) -> Response {
    let Some(node) = &state.node else {
        return Json(json!({"status": "ready"})).into_response();
    };
    let not_ready =
        |message: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message);
    let status = match node.status().await {
        Ok(status) => status,
        Err(e) => return not_ready(e.to_string()).into_response(),
    };
    let catch_up = &status.catch_up;
    if status.listen_addrs.is_empty() {
        return not_ready("not listening yet".into()).into_response();
    }
    if status.disk.low {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "low_disk",
            "the disk holding this node's store is nearly full: it takes no writes until space is freed",
        )
        .with_detail(json!({"disk": status.disk}))
        .into_response();
    }
    if let Some(drain) = &status.drain {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this node is draining: it takes no new writes and stops once a peer holds everything it holds",
        )
        .with_detail(json!({"drain": drain}))
        .into_response();
    }
    if catch_up.ready {
        return Json(json!({"status": "ready", "catch_up": catch_up})).into_response();
    }
    let message = match &catch_up.from {
        Some(peer) => format!(
            "catching up from {peer}: {} documents left to sync",
            catch_up.documents_left
        ),
        None => format!(
            "catching up: no reconciliation with a peer of region {} has ended yet",
            status.region
        ),
    };
    not_ready(message)
        .with_detail(json!({"catch_up": catch_up}))
        .into_response()
}

/// How long `POST /v1/drain` waits for the drain to be done before it
/// answers 202 (the drain goes on).
pub const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// `POST /v1/drain`: stop taking writes and hand everything this node holds
/// to a peer. Answers 200 with the drain's status once a peer holds it all
/// (the daemon then stops), or 202 after [`DRAIN_WAIT`].
pub async fn drain(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_everything(Level::Admin)?;
    let Some(node) = &state.node else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_network",
            "this node runs no networking layer: there is no peer to drain to",
        ));
    };
    let unavailable = |e: crate::NodeError| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            e.to_string(),
        )
    };
    node.drain().await.map_err(unavailable)?;
    let done = tokio::time::timeout(
        DRAIN_WAIT,
        node.drained(std::time::Duration::from_millis(100)),
    )
    .await;
    let drain = node.status().await.map_err(unavailable)?.drain;
    let code = match done {
        Ok(Ok(())) => StatusCode::OK,
        _ => StatusCode::ACCEPTED,
    };
    Ok((code, Json(json!({"drain": drain}))).into_response())
}

/// `GET /v1/status`: this node, its peers and how far behind each is, and
/// the engine's figures.
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_valid()?;
    let stats = state.engine.stats();
    let engine = json!({
        "store_id": state.engine.store_id(),
        "cached_documents": stats.cached_documents,
        "cache_bytes": stats.cache_bytes,
        "cache_budget_bytes": stats.cache_budget_bytes,
        "wal_syncs": stats.wal_syncs,
        "held_changes": stats.held_changes,
        "held_bytes": stats.held_bytes,
        "held_documents": stats.held_documents,
        "held_refused": stats.held_refused,
        "shape_refused": stats.shape_refused,
        "automerge_panics": stats.automerge_panics,
        // Only documents the caller may read.
        "quarantined": state.engine.quarantined().iter()
            .filter(|q| DocId::new(&q.doc).is_ok_and(|d| caller.allows(Level::Read, &d)))
            .map(|q| json!({"doc": q.doc, "key": q.key, "reason": q.reason}))
            .collect::<Vec<_>>(),
        "subscriptions": stats.subscriptions,
    });
    let http: serde_json::Map<String, Value> = http_figures(&state)
        .into_iter()
        .map(|(name, _, value)| (name.to_string(), json!(value)))
        .collect();
    let network = match &state.node {
        Some(node) => serde_json::to_value(node.status().await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_unavailable",
                e.to_string(),
            )
        })?)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?,
        None => Value::Null,
    };
    let keys = &state.session.keys.ids;
    let access = json!({
        "tokens_required": state.auth.required(),
        "active_tokens": state.auth.active_tokens(),
        "caller": caller.label(),
        "session_keys": {"signing": keys.first(), "accepted": keys},
    });
    Ok(Json(
        json!({"node": network, "engine": engine, "http": http, "access": access}),
    ))
}

/// The HTTP layer's figures: name, help, value.
fn http_figures(state: &AppState) -> [(&'static str, &'static str, u64); 13] {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &state.connections;
    let auth = &state.auth.stats;
    let certs = |pick: fn(&super::tls::CertStore) -> &std::sync::atomic::AtomicU64| {
        state.certs.as_deref().map_or(0, |c| pick(c).load(Relaxed))
    };
    [
        (
            "tls_certificate_reloads",
            "Times a changed TLS certificate and key were loaded",
            certs(|c| &c.reloads),
        ),
        (
            "tls_certificate_reload_failures",
            "Times a changed TLS certificate and key did not load (the pair in use stayed)",
            certs(|c| &c.reload_failures),
        ),
        (
            "tls_handshakes_failed",
            "HTTP connections whose TLS handshake failed or took longer than http.idle_timeout_ms",
            c.tls_failed.load(Relaxed),
        ),
        (
            "requests_unauthorized",
            "HTTP requests refused for their token: missing, unknown, expired or revoked (401)",
            auth.refused.load(Relaxed),
        ),
        (
            "requests_forbidden",
            "HTTP requests and stream messages refused because the token's grants do not cover them (403)",
            auth.forbidden.load(Relaxed),
        ),
        (
            "tokens_file_reloads",
            "Times the tokens file was read again after a change",
            auth.reloads.load(Relaxed),
        ),
        (
            "tokens_file_reload_failures",
            "Times reading the changed tokens file failed (the tokens in force stayed)",
            auth.reload_failures.load(Relaxed),
        ),
        (
            "connections",
            "HTTP connections open",
            c.open.load(Relaxed) as u64,
        ),
        (
            "connections_accepted",
            "HTTP connections accepted since start",
            c.accepted.load(Relaxed),
        ),
        (
            "connections_idle_closed",
            "HTTP connections closed for idling past http.idle_timeout_ms",
            c.idle_closed.load(Relaxed),
        ),
        (
            "connections_evicted",
            "Idle HTTP connections closed to admit a new one at http.max_connections",
            c.evicted.load(Relaxed),
        ),
        (
            "watchers",
            "Watch streams open",
            (state.max_watchers - state.watchers.available_permits()) as u64,
        ),
        (
            "subscriptions",
            "Engine subscriptions open (watch streams and the networking layer's)",
            state.engine.stats().subscriptions as u64,
        ),
    ]
}

/// `GET /metrics`: Prometheus text format (this node's metrics and libp2p's).
pub async fn metrics(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_valid()?;
    let mut text = String::new();
    if let Some(node) = &state.node {
        prometheus_client::encoding::text::encode(&mut text, node.registry()).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
    }
    // The HTTP layer's gauges, before the closing `# EOF`.
    const EOF: &str = "# EOF\n";
    if text.ends_with(EOF) {
        text.truncate(text.len() - EOF.len());
    }
    for (name, help, value) in http_figures(&state) {
        text.push_str(&format!(
            "# HELP causeway_http_{name} {help}.\n# TYPE causeway_http_{name} gauge\ncauseway_http_{name} {value}\n"
        ));
    }
    if let Some(repo) = &state.repo {
        for (name, help, value) in repo.stats.figures() {
            text.push_str(&format!(
                "# HELP causeway_automerge_repo_{name} {help}.\n# TYPE causeway_automerge_repo_{name} gauge\ncauseway_automerge_repo_{name} {value}\n"
            ));
        }
    }
    text.push_str(EOF);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// `PUT /v1/blocked/{peer_id}` (block) and `DELETE /v1/blocked/{peer_id}`
/// (unblock): an operator cuts a peer off at the connection layer, in both
/// directions, until unblocked. Not persisted across restarts.
pub async fn block(
    State(state): State<AppState>,
    caller: Caller,
    method: axum::http::Method,
    Path(peer): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_everything(Level::Admin)?;
    let peer: PeerId = peer.parse().map_err(|e| {
        ApiError::bad_request("invalid_peer", format!("{peer:?} is not a peer id: {e}"))
    })?;
    let Some(node) = &state.node else {
        return Err(ApiError::bad_request(
            "no_network",
            "this engine runs without networking",
        ));
    };
    let blocked = method == axum::http::Method::PUT;
    node.block(vec![peer], blocked).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            e.to_string(),
        )
    })?;
    Ok(Json(
        json!({"peer_id": peer.to_string(), "blocked": blocked}),
    ))
}
