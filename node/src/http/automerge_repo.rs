//! The route of the automerge-repo endpoint (see
//! [`crate::automerge_repo`]): the token check (the query string may carry
//! the token, since browsers cannot set headers on a WebSocket), the
//! connection limit and the upgrade.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::{reader, TokenQuery};
use super::error::ApiError;
use super::AppState;
use crate::automerge_repo::serve;

/// `GET <path>`: upgrades to a WebSocket and serves one automerge-repo
/// client. With tokens configured, a token is needed (`?token=` or
/// `Authorization: Bearer`). The connection then syncs the documents the
/// token may read (others are unavailable to it) and applies changes to
/// those it may write (other change-carrying messages are dropped).
pub async fn upgrade(
    State(state): State<AppState>,
    query: Result<Query<TokenQuery>, QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(hub) = state.repo.clone() else {
        return ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route").into_response();
    };
    // Something to sync: the caller may read some document.
    let caller = match reader(&state, query, &headers) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::bad_request(
                "not_a_websocket",
                format!("this endpoint speaks automerge-repo over WebSocket: {e}"),
            )
            .into_response()
        }
    };
    let Ok(slot) = Arc::clone(&hub.slots).try_acquire_owned() else {
        hub.stats.refused.fetch_add(1, Ordering::Relaxed);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!(
                "this node serves at most {} automerge-repo connections",
                hub.config.max_connections
            ),
        )
        .into_response();
    };
    let max = hub.config.max_message_bytes;
    let closing = state.closing.clone();
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| serve(hub, socket, caller, slot, closing))
}
