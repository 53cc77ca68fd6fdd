//! Consistency controls of the HTTP API: session tokens on reads and
//! writes, cross-region durability on writes, and "where is my write?".
//!
//! * Every write answers with a session token (header [`SESSION_HEADER`] and
//!   the body's `session`): the document's heads after the write, merged with
//!   the token the request carried, if any.
//! * A read carrying a token (the header, or `?session=`) is answered only
//!   once this node holds everything the token covers, waiting up to
//!   `wait_ms` (bounded by [`HttpConfig::max_session_wait`]). If time runs out
//!   the answer is 409 `session_unavailable` with the missing heads, or, with
//!   `stale=true`, the current data flagged by [`STALE_HEADER`].
//! * A write may ask for `min_regions=K` or `regions=a,b`: it is committed
//!   here first, then answered once other regions hold it (200), or when
//!   `timeout_ms` passes with what is known so far (202).
//!
//! See `docs/consistency.md` for the guarantees.
//!
//! [`HttpConfig::max_session_wait`]: super::HttpConfig::max_session_wait

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use causeway_engine::replication::ids::Region;
use causeway_engine::{DocId, Engine, SessionToken};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::names::{doc_id, heads_string, parse_heads};
use super::{blocking, AppState};
use crate::access::grant::Level;
use crate::access::Caller;
use crate::network::RegionNeed;

/// Request and response header carrying a session token.
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("causeway-session");
/// Response header set to `true` on a read answered without everything its
/// token covers (only when the request allowed it with `stale=true`).
pub const STALE_HEADER: HeaderName = HeaderName::from_static("causeway-stale");
/// Most regions one write may name.
pub const MAX_NAMED_REGIONS: usize = 32;

/// Query parameters of reads.
#[derive(Debug, Default, Deserialize)]
pub struct ReadQuery {
    /// A session token (instead of the header).
    pub session: Option<String>,
    /// How long to wait for the token, in milliseconds.
    pub wait_ms: Option<u64>,
    /// Answer with current data, flagged, if the wait runs out.
    #[serde(default)]
    pub stale: bool,
}

/// Query parameters of writes.
#[derive(Debug, Default, Deserialize)]
pub struct WriteQuery {
    /// A session token to carry forward (instead of the header).
    pub session: Option<String>,
    /// Answer once at least this many other regions hold the write.
    pub min_regions: Option<usize>,
    /// Answer once these regions (comma-separated) hold the write.
    pub regions: Option<String>,
    /// How long to wait for the regions, in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// A read's session requirement, parsed before any work.
pub struct ReadSession {
    token: Option<SessionToken>,
    wait: Duration,
    stale_ok: bool,
}

/// A write's consistency options, parsed before anything is written.
pub struct WriteSession {
    token: Option<SessionToken>,
    need: Option<(RegionNeed, Duration)>,
}

/// Parses a query string, mapping failures to `invalid_query`.
pub fn query<T>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// Page size a request asked for: `asked`, or 100 if it did not say;
/// `invalid_query` unless 1 to `max`.
pub fn page_limit(asked: Option<usize>, max: usize) -> Result<usize, ApiError> {
    let limit = asked.unwrap_or(100);
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {max}"),
        ));
    }
    Ok(limit)
}

/// The token of a request: the header, else the query parameter.
fn request_token(
    state: &AppState,
    headers: &HeaderMap,
    param: Option<&str>,
) -> Result<Option<SessionToken>, ApiError> {
    let header = match headers.get(SESSION_HEADER) {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::bad_request("invalid_session", "the session header is not ASCII")
        })?),
        None => None,
    };
    let Some(text) = header.or(param).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    SessionToken::decode_any(text, &state.session.keys.accepted)
        .map(Some)
        .map_err(|e| ApiError::bad_request("invalid_session", e.to_string()))
}

impl ReadSession {
    /// Parses the token and wait of a read.
    pub fn parse(
        state: &AppState,
        headers: &HeaderMap,
        q: &ReadQuery,
    ) -> Result<ReadSession, ApiError> {
        let token = request_token(state, headers, q.session.as_deref())?;
        let limits = &state.session;
        let wait = q.wait_ms.map_or(limits.default_wait, Duration::from_millis);
        if wait > limits.max_wait {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("wait_ms may be at most {}", limits.max_wait.as_millis()),
            ));
        }
        Ok(ReadSession {
            token,
            wait,
            stale_ok: q.stale,
        })
    }

    /// Waits until the engine holds the token. `Ok(None)`: it does (or
    /// there is no token); `Ok(Some(missing))`: the wait ran out and the
    /// request allowed stale data; otherwise 409 `session_unavailable`.
    async fn settle(&self, state: &AppState) -> Result<Option<SessionToken>, ApiError> {
        let Some(token) = self.token.clone() else {
            return Ok(None);
        };
        let engine = state.engine.clone();
        let quick = token.clone();
        let missing = blocking(move || Ok(engine.session_missing(&quick)?)).await?;
        if missing.is_empty() {
            return Ok(None);
        }
        let permit = waiter_slot(state)?;
        let engine = state.engine.clone();
        let wait = self.wait;
        let started = Instant::now();
        let missing = blocking(move || {
            let _permit = permit;
            Ok(engine.wait_for_session(&token, wait)?)
        })
        .await?;
        if missing.is_empty() {
            return Ok(None);
        }
        if self.stale_ok {
            return Ok(Some(missing));
        }
        let waited = started.elapsed().as_millis() as u64;
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "session_unavailable",
            format!(
                "this node does not hold everything the session token covers yet (waited {waited} ms); retry, read elsewhere, or pass stale=true"
            ),
        )
        .with_detail(json!({"missing": token_json(&missing), "waited_ms": waited})))
    }

    /// Answers a read of `doc`: waits for the token (see
    /// [`settle`](Self::settle)), then runs `f` on the document's current
    /// heads and returns its result with the answer's headers: the heads,
    /// the token carried forward (still requiring what is missing, if the
    /// answer is stale) and [`STALE_HEADER`] when it is.
    pub async fn read<T, F>(
        self,
        state: &AppState,
        doc: DocId,
        f: F,
    ) -> Result<(T, HeaderMap), ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Engine, &DocId, &[ChangeHash]) -> causeway_engine::Result<T> + Send + 'static,
    {
        let stale = self.settle(state).await?;
        let is_stale = stale.is_some();
        let engine = state.engine.clone();
        let (value, heads, token) = blocking(move || {
            let heads = engine.heads(&doc)?;
            let value = f(&engine, &doc, &heads)?;
            let mut token = carry(&engine, self.token.as_ref(), &doc, &heads)?;
            if let Some(missing) = &stale {
                token.merge(missing);
            }
            Ok((value, heads, token))
        })
        .await?;
        let mut headers = session_headers(&heads, &token.encode(&state.session.keys.signing));
        if is_stale {
            headers.insert(STALE_HEADER, HeaderValue::from_static("true"));
        }
        Ok((value, headers))
    }
}

impl WriteSession {
    /// Parses the token and durability options of a write.
    pub fn parse(
        state: &AppState,
        headers: &HeaderMap,
        q: &WriteQuery,
    ) -> Result<WriteSession, ApiError> {
        let token = request_token(state, headers, q.session.as_deref())?;
        let need = match (q.min_regions, q.regions.as_deref()) {
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    "give min_regions or regions, not both",
                ))
            }
            (Some(0), None) => None,
            (Some(k), None) => Some(RegionNeed::Count(k)),
            (None, Some(list)) => Some(RegionNeed::Named(region_list(list)?)),
        };
        let need = match need {
            None => {
                if q.timeout_ms.is_some() {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        "timeout_ms applies only with min_regions or regions",
                    ));
                }
                None
            }
            Some(need) => {
                if state.node.is_none() {
                    return Err(ApiError::bad_request(
                        "no_network",
                        "this engine runs without networking; no other region can hold a write",
                    ));
                }
                let limits = &state.session;
                let timeout = q
                    .timeout_ms
                    .map_or(limits.default_wait, Duration::from_millis);
                if timeout > limits.max_wait {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!("timeout_ms may be at most {}", limits.max_wait.as_millis()),
                    ));
                }
                Some((need, timeout))
            }
        };
        Ok(WriteSession { token, need })
    }

    /// Answers a committed write of `doc` that left `heads`: the token, and
    /// the regions holding it if the request asked (200 when enough do, 202
    /// with what is known when the timeout passed; the write is durable here
    /// either way).
    pub async fn answer(
        self,
        state: &AppState,
        doc: DocId,
        heads: Vec<ChangeHash>,
        mut body: Map<String, Value>,
    ) -> Result<Response, ApiError> {
        let engine = state.engine.clone();
        let (token, d, h) = (self.token.clone(), doc.clone(), heads.clone());
        let carried = blocking(move || carry(&engine, token.as_ref(), &d, &h)).await?;
        let encoded = carried.encode(&state.session.keys.signing);
        body.insert("heads".into(), json!(heads_string(&heads)));
        body.insert("session".into(), json!(encoded));
        let mut status = StatusCode::OK;
        if let (Some((need, timeout)), Some(node)) = (self.need, state.node.as_ref()) {
            // The write is committed; without a free slot it is answered
            // like a timeout at once (202, regions so far unknown: none).
            let slot = waiter_slot(state).ok();
            let timeout = if slot.is_some() {
                timeout
            } else {
                Duration::ZERO
            };
            let required = need_json(&need);
            let wait = node
                .wait_for_regions(doc, heads.clone(), need, timeout)
                .await
                .map_err(node_error)?;
            if !wait.satisfied {
                status = StatusCode::ACCEPTED;
            }
            body.insert(
                "durability".into(),
                json!({
                    "durable_locally": true,
                    "required": required,
                    "satisfied": wait.satisfied,
                    "regions": wait.regions,
                }),
            );
        }
        let headers = session_headers(&heads, &encoded);
        Ok((status, headers, Json(Value::Object(body))).into_response())
    }
}

/// Headers of an answer: heads and session token.
pub fn session_headers(heads: &[ChangeHash], token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&heads_string(heads)) {
        headers.insert(super::names::HEADS_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(token) {
        headers.insert(SESSION_HEADER, v);
    }
    headers
}

/// The request's token carried forward past `doc` at `heads`: what the
/// client requires of other documents stays; for `doc` the token then
/// requires `heads` (and any heads it named that this node does not hold).
/// A token over the limits of
/// [`SessionToken::check_size`] starts over with `doc` alone.
fn carry(
    engine: &Engine,
    request: Option<&SessionToken>,
    doc: &DocId,
    heads: &[ChangeHash],
) -> Result<SessionToken, ApiError> {
    let mut token = request.cloned().unwrap_or_default();
    let earlier = SessionToken::for_doc(doc, token.heads(doc).unwrap_or_default());
    if engine.session_missing(&earlier)?.is_empty() {
        token.set(doc, heads);
    } else {
        token.insert(doc, heads);
    }
    if token.check_size().is_err() {
        // Over the limits: keep only this document. A document with more
        // than `MAX_SESSION_HEADS` concurrent heads still gives a token that
        // nodes refuse as too large (see docs/consistency.md).
        token = SessionToken::for_doc(doc, heads);
    }
    Ok(token)
}

/// A token as JSON: `{"doc": ["hash", ...]}`.
pub fn token_json(token: &SessionToken) -> Value {
    let map: Map<String, Value> = token
        .iter()
        .map(|(d, h)| {
            (
                d.to_string(),
                json!(h.iter().map(ToString::to_string).collect::<Vec<_>>()),
            )
        })
        .collect();
    Value::Object(map)
}

fn need_json(need: &RegionNeed) -> Value {
    match need {
        RegionNeed::Count(k) => json!({"min_regions": k}),
        RegionNeed::Named(names) => json!({"regions": names}),
    }
}

fn region_list(list: &str) -> Result<BTreeSet<String>, ApiError> {
    let names: BTreeSet<String> = list
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| {
            Region::new(r)
                .map(|r| r.to_string())
                .map_err(|e| ApiError::bad_request("invalid_query", format!("regions: {e}")))
        })
        .collect::<Result<_, _>>()?;
    if names.is_empty() || names.len() > MAX_NAMED_REGIONS {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("regions must name 1 to {MAX_NAMED_REGIONS} regions"),
        ));
    }
    Ok(names)
}

/// One of the `http.max_waiters` slots for a request that waits, or 503
/// `too_many_waiters`.
fn waiter_slot(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    state.waiters.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_waiters",
            "too many requests are waiting already; retry later",
        )
    })
}

fn node_error(e: crate::NodeError) -> ApiError {
    match e {
        crate::NodeError::Busy(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_waiters", m)
        }
        crate::NodeError::Engine(e) => e.into(),
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            other.to_string(),
        ),
    }
}

/// Query of `GET /v1/where/{id}`.
#[derive(Debug, Default, Deserialize)]
pub struct WhereQuery {
    /// A session token; its heads of the document are looked for. Default:
    /// this node's current heads.
    pub session: Option<String>,
    /// Heads to look for instead (comma-separated hex).
    pub heads: Option<String>,
}

/// `GET /v1/where/{id}?session=…`: which regions and peers are known to
/// hold the document at the token's heads (or this node's heads), and since
/// when.
pub async fn where_is(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<WhereQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let doc = doc_id(&id)?;
    caller.require(Level::Read, &doc)?;
    let token = request_token(&state, &headers, q.session.as_deref())?;
    let engine = state.engine.clone();
    let (d, explicit) = (
        doc.clone(),
        q.heads.as_deref().map(parse_heads).transpose()?,
    );
    let (want, holds_here) = blocking(move || {
        let want = match (explicit, token.as_ref().and_then(|t| t.heads(&d))) {
            (Some(h), _) => h,
            (None, Some(h)) => h.to_vec(),
            (None, None) => engine.heads(&d)?,
        };
        let here = engine
            .session_missing(&SessionToken::for_doc(&d, &want))?
            .is_empty();
        Ok((want, here))
    })
    .await?;
    let Some(node) = state.node.as_ref() else {
        return Err(ApiError::bad_request(
            "no_network",
            "this engine runs without networking; it knows no other replica",
        ));
    };
    let holders = node
        .holders(doc.clone(), want.clone())
        .await
        .map_err(node_error)?;
    let mut regions: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for h in &holders {
        let region = h.region.clone().unwrap_or_else(|| "unknown".into());
        regions.entry(region).or_default().push(json!({
            "peer_id": h.peer,
            "holds": h.holds,
            "heads": h.heads.as_ref().map(|h| heads_string(h)),
            "reported_ms_ago": h.reported_ago.map(|d| d.as_millis() as u64),
        }));
    }
    let regions: Vec<Value> = regions
        .into_iter()
        .map(|(region, peers)| {
            let holds = peers.iter().any(|p| p["holds"] == json!(true));
            json!({"region": region, "holds": holds, "peers": peers})
        })
        .collect();
    let body = json!({
        "doc": doc.as_str(),
        "heads": heads_string(&want),
        "local": {"peer_id": node.peer_id().to_string(), "region": node.region(), "holds": holds_here},
        "regions": regions,
    });
    Ok(Json(body).into_response())
}
