//! What a request must pass before a handler sees it: an allowed `Origin`,
//! a free request slot, and a body that arrives in time and fits.
//!
//! * **Origin.** Browsers send `Origin` with every cross-origin request, and
//!   with every non-GET request; curl, servers and SDKs do not. A request
//!   whose `Origin` is not in [`HttpConfig::allowed_origins`] gets 403
//!   `origin_not_allowed` before anything else happens, so a web page a
//!   user visits cannot write to (or watch) a node on their machine.
//! * **Request slots.** At most [`HttpConfig::max_requests`] requests are
//!   handled at once; more get 503 `overloaded` with `Retry-After`.
//!   `/health` and `/ready` do not take a slot.
//! * **Body deadline.** The body is read before the handler runs, within
//!   [`HttpConfig::body_timeout`] (else 408 `request_timeout`) and
//!   [`HttpConfig::body_limit`] (else 413 `body_too_large`); nothing is
//!   changed by a refused request.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::ApiError;
use super::{AppState, HttpConfig};

/// What [`origin`] and [`admit`] check against.
#[derive(Debug)]
pub struct Admission {
    /// Allowed origins, lowercase, without a trailing slash.
    origins: Vec<String>,
    /// Free request slots.
    requests: Arc<Semaphore>,
    /// Largest body.
    body_limit: usize,
    /// Longest body read.
    body_timeout: Duration,
    /// How many request slots there are.
    max_requests: usize,
}

impl Admission {
    /// The checks `config` asks for.
    pub fn new(config: &HttpConfig) -> Admission {
        Admission {
            origins: config
                .allowed_origins
                .iter()
                .map(|o| normalize(o))
                .collect(),
            requests: Arc::new(Semaphore::new(config.max_requests)),
            body_limit: config.body_limit,
            body_timeout: config.body_timeout,
            max_requests: config.max_requests,
        }
    }

    /// Requests holding a slot now.
    pub fn in_progress(&self) -> usize {
        self.max_requests - self.requests.available_permits()
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        origin
            .to_str()
            .is_ok_and(|o| self.origins.iter().any(|allowed| *allowed == normalize(o)))
    }
}

fn normalize(origin: &str) -> String {
    origin.trim_end_matches('/').to_ascii_lowercase()
}

/// Checks one `http.allowed_origins` entry: `http://` or `https://`, a
/// host, an optional port, no path.
pub fn check_origin_setting(origin: &str) -> Result<(), String> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("{origin:?} does not start with http:// or https://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '*']) {
        return Err(format!(
            "{origin:?} is not an origin such as https://app.example.com:8443"
        ));
    }
    Ok(())
}

/// Middleware on every route: refuses a request whose `Origin` is not
/// allowed.
pub async fn origin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        if !state.admission.allows(origin) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "requests from this web origin are not allowed (see http.allowed_origins)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Middleware on the API routes: takes a request slot and reads the body
/// within its deadline and limit.
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let admission = &state.admission;
    let Ok(_slot) = admission.requests.clone().try_acquire_owned() else {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the node is handling as many requests as it allows; retry shortly",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, admission.body_limit);
    let bytes = match tokio::time::timeout(admission.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return body_error(&e, admission.body_limit).into_response(),
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    admission.body_timeout.as_millis()
                ),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn body_error(e: &axum::Error, limit: usize) -> ApiError {
    let too_large =
        std::error::Error::source(e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
    if too_large {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body exceeds {limit} bytes"),
        )
    } else {
        ApiError::bad_request("unreadable_body", "the request body could not be read")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_settings_are_checked_and_compared_without_case_or_slash() {
        assert!(check_origin_setting("https://app.example.com").is_ok());
        assert!(check_origin_setting("http://localhost:3000/").is_ok());
        for bad in [
            "app.example.com",
            "https://",
            "https://a/b",
            "https://*.x",
            "null",
        ] {
            assert!(check_origin_setting(bad).is_err(), "{bad}");
        }
        let config = HttpConfig {
            allowed_origins: vec!["https://App.example.com/".into()],
            ..HttpConfig::default()
        };
        let a = Admission::new(&config);
        assert!(a.allows(&HeaderValue::from_static("https://app.example.com")));
        assert!(!a.allows(&HeaderValue::from_static("https://evil.example.com")));
        assert!(!a.allows(&HeaderValue::from_static("null")));
    }
}
