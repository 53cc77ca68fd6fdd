//! Documents as JSON: read (heads in a header), replace, merge-patch,
//! delete, list by prefix.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use causeway_engine::audit::Actor;
use causeway_engine::{Committed, DocId, Engine, ListPage, MAX_LIST_LIMIT};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::names::doc_id;
use super::session::{page_limit, query, ReadQuery, ReadSession, WriteQuery, WriteSession};
use super::{blocking, AppState};
use crate::access::grant::Level;
use crate::access::Caller;

/// Reads a JSON request body; malformed or oversized bodies get their own
/// codes.
pub fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                e.body_text(),
            )
        } else {
            ApiError::bad_request("unreadable_body", e.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
    })
}

/// `GET /v1/docs/{id}`: the document as JSON, with its heads and a session
/// token in headers. With a session token, answered once this node holds
/// what the token covers (see [`session`](super::session)).
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let id = doc_id(&id)?;
    caller.require(Level::Read, &id)?;
    let session = ReadSession::parse(&state, &headers, &q)?;
    // Value and heads under one look at the document.
    let (value, headers) = session
        .read(&state, id, |engine, id, heads| {
            engine.get_json_at(id, heads)
        })
        .await?;
    Ok((headers, Json(value)).into_response())
}

/// `PUT /v1/docs/{id}`: replace the document's content with a JSON object
/// (creating it if needed).
pub async fn replace(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<WriteQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let write = Write {
        caller,
        id,
        headers,
        q,
        body: Some(body),
    };
    commit(state, write, |engine, id, value| engine.put_json(id, value)).await
}

/// `PATCH /v1/docs/{id}`: apply a JSON merge patch (RFC 7386).
pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<WriteQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let write = Write {
        caller,
        id,
        headers,
        q,
        body: Some(body),
    };
    commit(state, write, |engine, id, value| {
        engine.merge_json(id, value)
    })
    .await
}

/// `DELETE /v1/docs/{id}`: delete (a replicated tombstone).
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<WriteQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let write = Write {
        caller,
        id,
        headers,
        q,
        body: None,
    };
    commit(state, write, |engine, id, _| engine.delete(id)).await
}

/// What a write request brought.
struct Write {
    caller: Caller,
    id: String,
    headers: HeaderMap,
    q: Result<Query<WriteQuery>, QueryRejection>,
    body: Option<Result<Bytes, BytesRejection>>,
}

/// Parses everything a write brought (refusing bad input before anything
/// is written), runs `op`, and answers with heads, session token and, if
/// asked, the regions holding the write.
async fn commit(
    state: AppState,
    write: Write,
    op: fn(&Engine, &DocId, &Value) -> causeway_engine::Result<Committed<()>>,
) -> Result<Response, ApiError> {
    let q = query(write.q)?;
    let id = doc_id(&write.id)?;
    write.caller.require(Level::Write, &id)?;
    let value = write
        .body
        .map(json_body)
        .transpose()?
        .unwrap_or(Value::Null);
    let session = WriteSession::parse(&state, &write.headers, &q)?;
    let engine = state.engine.acting_as(Actor::Client(write.caller.label()));
    let doc = id.clone();
    let heads = blocking(move || Ok(op(&engine, &doc, &value)?.heads)).await?;
    session.answer(&state, id, heads, Map::new()).await
}

/// `POST /v1/repair/{id}`: discards the local copy of a quarantined
/// document (anti-entropy fetches it again from peers); 409
/// `not_quarantined` for a document whose data reads.
pub async fn repair(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = doc_id(&id)?;
    caller.require(Level::Admin, &id)?;
    let engine = state.engine.clone();
    let doc = id.clone();
    blocking(move || Ok(engine.repair(&doc)?)).await?;
    Ok(Json(json!({"doc": id.as_str(), "repaired": true})))
}

/// Query of `GET /v1/docs`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Only ids starting with this.
    #[serde(default)]
    pub prefix: String,
    /// Continue after this id (the previous page's `next`).
    pub after: Option<String>,
    /// Page size, 1 to 1000. Default 100.
    pub limit: Option<usize>,
}

/// `GET /v1/docs?prefix=&after=&limit=`: live document ids in order,
/// only those the caller may read (403 if it may read nothing under the
/// prefix).
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = page_limit(q.limit, MAX_LIST_LIMIT)?;
    let after = q.after.as_deref().map(doc_id).transpose()?;
    causeway_engine::validate_prefix(&q.prefix)
        .map_err(|e| ApiError::bad_request("invalid_doc_id", e.to_string()))?;
    let ranges = caller.readable_under(&q.prefix)?;
    let engine = state.engine.clone();
    let page = blocking(move || Ok(list_ranges(&engine, &ranges, after, limit)?)).await?;
    let ids: Vec<&str> = page.ids.iter().map(DocId::as_str).collect();
    Ok(Json(
        json!({"ids": ids, "next": page.next.as_ref().map(DocId::as_str)}),
    ))
}

/// Lists live documents under any of `ranges` (disjoint prefixes in order)
/// after `after`, at most `limit`: one page over several prefixes, as
/// [`Engine::list`] gives one over a single prefix.
fn list_ranges(
    engine: &Engine,
    ranges: &[String],
    after: Option<DocId>,
    limit: usize,
) -> causeway_engine::Result<ListPage> {
    let mut ids: Vec<DocId> = Vec::new();
    let mut after = after;
    for range in ranges {
        if ids.len() == limit {
            // Full: is there anything left at all?
            if !engine.list(range, after.as_ref(), 1)?.ids.is_empty() {
                let next = ids.last().cloned();
                return Ok(ListPage { ids, next });
            }
            continue;
        }
        let page = engine.list(range, after.as_ref(), limit - ids.len())?;
        ids.extend(page.ids);
        if page.next.is_some() {
            let next = ids.last().cloned();
            return Ok(ListPage { ids, next });
        }
        after = ids.last().cloned().or(after);
    }
    Ok(ListPage { ids, next: None })
}
