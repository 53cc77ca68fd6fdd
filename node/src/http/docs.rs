//! Documents as JSON: read (heads in a header), replace, merge-patch,
//! delete, list by prefix.

use automerge::ChangeHash;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use causeway_engine::{Committed, DocId, Engine, MAX_LIST_LIMIT};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::{blocking, AppState};

/// The response header that carries a document's heads: hex change hashes,
/// comma-separated.
pub const HEADS_HEADER: HeaderName = HeaderName::from_static("causeway-heads");

/// Parses a document id from the path.
pub fn doc_id(id: &str) -> Result<DocId, ApiError> {
    DocId::new(id).map_err(|e| ApiError::bad_request("invalid_doc_id", e.to_string()))
}

/// Heads as the header value and JSON use them.
pub fn heads_string(heads: &[ChangeHash]) -> String {
    heads
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses comma-separated hex heads (empty: no heads).
pub fn parse_heads(s: &str) -> Result<Vec<ChangeHash>, ApiError> {
    s.split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            h.parse::<ChangeHash>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_heads",
                    format!("{h:?} is not a change hash (64 hex digits)"),
                )
            })
        })
        .collect()
}

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

/// A response with `value` as JSON and `heads` in [`HEADS_HEADER`].
fn with_heads(value: Value, heads: &[ChangeHash]) -> Response {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&heads_string(heads)) {
        headers.insert(HEADS_HEADER, v);
    }
    (headers, Json(value)).into_response()
}

/// `GET /v1/docs/{id}`: the document as JSON.
pub async fn read(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = doc_id(&id)?;
    let engine = state.engine.clone();
    let (value, heads) = blocking(move || {
        // Read value and heads under one look at the document.
        let heads = engine.heads(&id)?;
        let value = engine.get_json_at(&id, &heads)?;
        Ok((value, heads))
    })
    .await?;
    Ok(with_heads(value, &heads))
}

/// `PUT /v1/docs/{id}`: replace the document's content with a JSON object
/// (creating it if needed).
pub async fn replace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    write_json(state, &id, body, |engine, id, value| {
        engine.put_json(id, value)
    })
    .await
}

/// `PATCH /v1/docs/{id}`: apply a JSON merge patch (RFC 7386).
pub async fn patch(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    write_json(state, &id, body, |engine, id, value| {
        engine.merge_json(id, value)
    })
    .await
}

/// Parses the id and the JSON body, runs `write`, answers with the heads.
async fn write_json(
    state: AppState,
    id: &str,
    body: Result<Bytes, BytesRejection>,
    write: fn(&Engine, &DocId, &Value) -> causeway_engine::Result<Committed<()>>,
) -> Result<Response, ApiError> {
    let id = doc_id(id)?;
    let value = json_body(body)?;
    let engine = state.engine.clone();
    let heads = blocking(move || Ok(write(&engine, &id, &value)?.heads)).await?;
    Ok(with_heads(json!({"heads": heads_string(&heads)}), &heads))
}

/// `DELETE /v1/docs/{id}`: delete (a replicated tombstone).
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = doc_id(&id)?;
    let engine = state.engine.clone();
    let heads = blocking(move || Ok(engine.delete(&id)?.heads)).await?;
    Ok(with_heads(json!({"heads": heads_string(&heads)}), &heads))
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

/// `GET /v1/docs?prefix=&after=&limit=`: live document ids in order.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_LIST_LIMIT}"),
        ));
    }
    let after = q.after.as_deref().map(doc_id).transpose()?;
    let engine = state.engine.clone();
    let page = blocking(move || Ok(engine.list(&q.prefix, after.as_ref(), limit)?)).await?;
    let ids: Vec<&str> = page.ids.iter().map(DocId::as_str).collect();
    Ok(Json(
        json!({"ids": ids, "next": page.next.as_ref().map(DocId::as_str)}),
    ))
}
