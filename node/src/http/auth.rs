//! Bearer tokens on the HTTP API (see [`crate::access`]).
//!
//! The middleware [`check`] turns a request's `Authorization: Bearer`
//! token into a [`Caller`] (401 if the node needs a token and the request
//! has none that works) and hands it to the handler, which checks the
//! caller's grants against the documents it touches (403 `forbidden`).
//! `/health` and `/ready` need no token.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::access::{AuthError, Caller, Denied};

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The query string of routes a browser opens directly (the dashboard, the
/// automerge-repo WebSocket): it cannot set an `Authorization` header
/// there, so the token may come as `?token=`.
#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    /// A bearer token.
    pub token: Option<String>,
}

/// Who makes a request to such a route: the token of the query string, else
/// of the `Authorization` header. Refused unless the caller may read some
/// document.
pub fn reader(
    state: &AppState,
    query: Result<Query<TokenQuery>, QueryRejection>,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let token = query
        .ok()
        .and_then(|Query(q)| q.token)
        .or_else(|| bearer(headers).map(str::to_string));
    let caller = state.auth.authenticate(token.as_deref())?;
    caller.readable_under("")?;
    Ok(caller)
}

/// Middleware: finds who made the request, refusing requests without a
/// working token when the node requires one.
pub async fn check(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = state.auth.authenticate(bearer(request.headers()))?;
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        let code = match e {
            AuthError::Missing | AuthError::Unknown => "unauthorized",
            AuthError::Expired(_) => "token_expired",
            AuthError::Revoked(_) => "token_revoked",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> ApiError {
        match e {
            Denied::Token(e) => e.into(),
            Denied::Scope { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::error!(path = %parts.uri.path(), "a route runs without the token check");
            super::internal()
        })
    }
}
