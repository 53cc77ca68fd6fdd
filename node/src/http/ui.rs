//! `GET /ui`: a dashboard of the cluster as this node sees it, served by
//! the node: regions and nodes with their connection state, per-region lag
//! over the last five minutes, documents behind, recent writes and the
//! regions holding each (from `/v1/where`), quarantined documents. It
//! updates every second from `/v1/status`, `/v1/watch` and `/v1/where`.
//!
//! With tokens in force the page needs a token that may read some
//! document: `/ui?token=…` the first time (a browser cannot put a header on
//! a navigation); the page keeps it for the tab's session, takes it out of
//! the address bar and sends it as `Authorization: Bearer` on its API calls,
//! which check it like any client's (a token for `a/` sees only `a/` in
//! recent writes).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::auth::{reader, TokenQuery};
use super::error::ApiError;
use super::AppState;

/// The page.
pub const PAGE: &str = include_str!("ui/dashboard.html");

/// What the page may load and run: its own inline script and style, and
/// API calls to this node; nothing else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /ui`: the dashboard page.
pub async fn page(
    State(state): State<AppState>,
    q: Result<Query<TokenQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    reader(&state, q, &headers)?;
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    // The address may carry the token: never send it on.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    Ok(response)
}
