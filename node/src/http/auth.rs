//! Optional bearer-token authentication.
//!
//! With no tokens configured the API is open (bind it to a private
//! address). Otherwise every route except `/health` and `/ready` needs
//! `Authorization: Bearer <token>`; a read token may use GET routes only.

use std::collections::BTreeSet;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::AppState;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// GET routes.
    Read,
    /// Every route.
    Write,
}

/// The configured tokens.
#[derive(Debug, Default)]
pub struct Tokens {
    read: BTreeSet<String>,
    write: BTreeSet<String>,
}

impl Tokens {
    /// Tokens from configuration.
    pub fn new(read: &[String], write: &[String]) -> Tokens {
        Tokens {
            read: read.iter().cloned().collect(),
            write: write.iter().cloned().collect(),
        }
    }

    /// Whether any token is configured (else the API is open).
    pub fn enabled(&self) -> bool {
        !self.read.is_empty() || !self.write.is_empty()
    }

    /// What `token` may do, if anything.
    pub fn access(&self, token: &str) -> Option<Access> {
        if self.write.contains(token) {
            Some(Access::Write)
        } else if self.read.contains(token) {
            Some(Access::Read)
        } else {
            None
        }
    }
}

/// Middleware: refuses requests without a sufficient token.
pub async fn check(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.tokens.enabled() {
        return Ok(next.run(request).await);
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let unauthorized =
        |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let access = match token {
        None => {
            return Err(unauthorized(
                "this node requires an Authorization: Bearer token",
            ))
        }
        Some(t) => state
            .tokens
            .access(t)
            .ok_or_else(|| unauthorized("the bearer token is not valid"))?,
    };
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if access == Access::Read && !reads {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may only read",
        ));
    }
    Ok(next.run(request).await)
}
