//! Server-Sent Events for a document or a prefix.
//!
//! Each durable change (local or replicated) produces one `change` event:
//!
//! ```text
//! event: change
//! data: {"doc":"notes/1","heads":"ab12…","deleted":false,"value":{"title":"draft"}}
//! ```
//!
//! `value` is the document's JSON at those heads (`null` once deleted). A
//! watcher that falls behind loses events and gets one `lagged` event with
//! the count; it should re-read the documents it cares about.
//!
//! A node holds at most [`HttpConfig::max_watchers`](super::HttpConfig)
//! streams, and [`HttpConfig::max_watchers_per_client`](super::HttpConfig)
//! per client IP address. A stream's engine subscription ends when its
//! client goes away (noticed at the next keep-alive comment, every 15 s, at
//! the latest), and every stream ends when the node shuts down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use causeway_engine::{validate_prefix, Engine, Subscription};
use futures::stream::Stream;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use super::error::ApiError;
use super::names::{doc_id, heads_string};
use super::AppState;
use crate::access::grant::{self, Level};
use crate::access::Caller;

/// Events buffered per watcher between the engine and the HTTP stream.
pub const WATCH_QUEUE: usize = 256;

/// Watch streams open per client address.
#[derive(Debug)]
pub struct ClientWatchers {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientWatchers {
    /// At most `max` streams per client.
    pub fn new(max: usize) -> Arc<ClientWatchers> {
        Arc::new(ClientWatchers {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A stream slot for `client`, if it has fewer than the maximum.
    fn acquire(self: &Arc<Self>, client: IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(client).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            watchers: Arc::clone(self),
            client,
        })
    }
}

/// One client's stream slot, given back when dropped.
struct ClientSlot {
    watchers: Arc<ClientWatchers>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .watchers
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// What a stream holds until it ends.
struct Slots {
    _node: OwnedSemaphorePermit,
    _client: ClientSlot,
}

/// Query of `GET /v1/watch`.
#[derive(Debug, Deserialize)]
pub struct PrefixQuery {
    /// Watch documents whose id starts with this (empty: all).
    #[serde(default)]
    pub prefix: String,
}

/// `GET /v1/watch?prefix=`: changes to every document under a prefix.
/// Only documents the caller may read are shown (403 if it may read
/// nothing under the prefix).
pub async fn prefix(
    State(state): State<AppState>,
    caller: Caller,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    query: Result<Query<PrefixQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    validate_prefix(&q.prefix)
        .map_err(|e| ApiError::bad_request("invalid_doc_id", e.to_string()))?;
    caller.readable_under(&q.prefix)?;
    open(state, caller, client.ip(), q.prefix, None)
}

/// `GET /v1/watch/{id}`: changes to one document.
pub async fn document(
    State(state): State<AppState>,
    caller: Caller,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = doc_id(&id)?;
    caller.require(Level::Read, &id)?;
    open(
        state,
        caller,
        client.ip(),
        id.as_str().to_string(),
        Some(id.as_str().to_string()),
    )
}

fn open(
    state: AppState,
    caller: Caller,
    client: IpAddr,
    prefix: String,
    exact: Option<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    if *state.closing.borrow() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the node is shutting down",
        ));
    }
    let node = state.watchers.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_watchers",
            "the node's watch streams are all in use; retry later",
        )
    })?;
    let client = state.client_watchers.acquire(client).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_watchers",
            "this client holds as many watch streams as a client may; close one first",
        )
    })?;
    let slots = Slots {
        _node: node,
        _client: client,
    };
    let subscription = state.engine.subscribe(&prefix)?;
    let (tx, rx) = mpsc::channel(WATCH_QUEUE);
    let engine = state.engine.clone();
    std::thread::Builder::new()
        .name("causeway-watch".into())
        .spawn(move || forward(engine, caller, subscription, exact, tx))
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_watchers",
                e.to_string(),
            )
        })?;
    let stream = futures::stream::unfold(
        (rx, state.closing.clone(), slots),
        |(mut rx, mut closing, slots): (mpsc::Receiver<Event>, watch::Receiver<bool>, Slots)| async move {
            let event = tokio::select! {
                event = rx.recv() => event?,
                () = super::connections::until_closing(&mut closing) => return None,
            };
            Some((Ok(event), (rx, closing, slots)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Turns engine events into SSE events until the client goes away or its
/// token stops working; events of documents the caller may not read are
/// left out.
fn forward(
    engine: Engine,
    caller: Caller,
    subscription: Subscription,
    exact: Option<String>,
    tx: mpsc::Sender<Event>,
) {
    let mut reported_lag = 0;
    while !tx.is_closed() {
        let lagged = subscription.dropped();
        if lagged > reported_lag {
            let event = Event::default()
                .event("lagged")
                .data(json!({"lost": lagged - reported_lag}).to_string());
            reported_lag = lagged;
            if tx.blocking_send(event).is_err() {
                return;
            }
        }
        let Some(e) = subscription.recv_timeout(Duration::from_millis(500)) else {
            if caller.require_valid().is_err() {
                return;
            }
            continue;
        };
        if exact.as_deref().is_some_and(|id| id != e.doc.as_str()) {
            continue;
        }
        match caller.grants() {
            Err(_) => return,
            Ok(grants) if !grant::allows(&grants, Level::Read, &e.doc) => continue,
            Ok(_) => {}
        }
        let value = if e.deleted {
            serde_json::Value::Null
        } else {
            engine
                .get_json_at(&e.doc, &e.heads)
                .unwrap_or(serde_json::Value::Null)
        };
        let data = json!({
            "doc": e.doc.as_str(),
            "heads": heads_string(&e.heads),
            "deleted": e.deleted,
            "value": value,
        });
        if tx
            .blocking_send(Event::default().event("change").data(data.to_string()))
            .is_err()
        {
            return;
        }
    }
}
