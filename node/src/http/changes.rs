//! Binary Automerge changes, for clients that keep their own Automerge
//! document and sync it with a node over HTTP.
//!
//! Bodies are concatenated Automerge change chunks (what
//! `Automerge::save_after` produces and `Automerge::load_incremental`
//! accepts). `GET` answers with the changes the document has beyond the
//! `since` heads; `POST` applies a client's changes through the engine's
//! validated apply path.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use causeway_engine::audit::Actor;

use super::error::ApiError;
use super::names::{doc_id, parse_heads};
use super::session::{query, ReadQuery, ReadSession, WriteQuery, WriteSession};
use super::{blocking, AppState};
use crate::access::grant::Level;
use crate::access::Caller;

/// Changes one request may carry.
pub const MAX_CHANGES_PER_REQUEST: usize = 10_000;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Magic, checksum, chunk type.
const HEADER_LEN: usize = 9;

/// Splits a request body of concatenated change chunks, at most
/// [`MAX_CHANGES_PER_REQUEST`] of them. Only the framing is checked here; the
/// engine decodes and verifies each change.
pub fn split_chunks(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    split_chunks_up_to(bytes, MAX_CHANGES_PER_REQUEST)
}

/// Splits concatenated change chunks, at most `max` of them (a client
/// reading a whole history from `GET /v1/changes/{id}` passes `usize::MAX`).
pub fn split_chunks_up_to(mut bytes: &[u8], max: usize) -> Result<Vec<&[u8]>, String> {
    let mut chunks = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < HEADER_LEN || bytes[..4] != MAGIC {
            return Err(format!(
                "chunk {} does not start with the Automerge magic bytes",
                chunks.len()
            ));
        }
        let (len, leb) = uleb(&bytes[HEADER_LEN..])
            .ok_or_else(|| format!("chunk {} has a malformed length", chunks.len()))?;
        let end = HEADER_LEN
            .checked_add(leb)
            .and_then(|n| n.checked_add(len))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| format!("chunk {} is truncated", chunks.len()))?;
        if chunks.len() == max {
            return Err(format!("more than {max} changes in one request"));
        }
        chunks.push(&bytes[..end]);
        bytes = &bytes[end..];
    }
    Ok(chunks)
}

/// An unsigned LEB128 number of at most 64 bits: (value, bytes used).
fn uleb(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((usize::try_from(value).ok()?, i + 1));
        }
    }
    None
}

/// Query of `GET /v1/changes/{id}`.
#[derive(Debug, Deserialize)]
pub struct SinceQuery {
    /// Heads the client has, comma-separated hex (empty or absent: all).
    #[serde(default)]
    pub since: String,
    /// Session token, wait and staleness, as for document reads.
    #[serde(flatten)]
    pub session: ReadQuery,
}

/// Response header of `GET /v1/changes/{id}`: how many changes the node
/// holds for the document, waiting for their dependencies.
pub const HELD_HEADER: &str = "x-causeway-held";

/// Response header of `GET /v1/changes/{id}`: the dependencies those held
/// changes wait for, comma-separated hex, at most
/// [`MAX_REPORTED_MISSING`](causeway_engine::MAX_REPORTED_MISSING).
pub const MISSING_DEPS_HEADER: &str = "x-causeway-missing-deps";

/// `GET /v1/changes/{id}?since=h1,h2`: changes beyond the given heads, with
/// what the node holds for the document in [`HELD_HEADER`] and
/// [`MISSING_DEPS_HEADER`].
pub async fn since(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<SinceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let id = doc_id(&id)?;
    caller.require(Level::Read, &id)?;
    let since = parse_heads(&q.since)?;
    let session = ReadSession::parse(&state, &headers, &q.session)?;
    let ((changes, held), mut headers) = session
        .read(&state, id, move |engine, id, _| {
            Ok((engine.changes_since(id, &since)?, engine.held(id)?))
        })
        .await?;
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(HELD_HEADER, HeaderValue::from(held.changes));
    let missing: Vec<String> = held.missing.iter().map(ToString::to_string).collect();
    if let Ok(value) = HeaderValue::from_str(&missing.join(",")) {
        headers.insert(MISSING_DEPS_HEADER, value);
    }
    Ok((headers, changes.concat()).into_response())
}

/// `POST /v1/changes/{id}`: apply a client's changes (validated; changes
/// whose dependencies are missing are held).
pub async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<WriteQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let id = doc_id(&id)?;
    caller.require(Level::Write, &id)?;
    let session = WriteSession::parse(&state, &headers, &q)?;
    let bytes = body.map_err(|e| {
        ApiError::new(
            e.status(),
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "body_too_large"
            } else {
                "unreadable_body"
            },
            e.body_text(),
        )
    })?;
    let chunks: Vec<Vec<u8>> = split_chunks(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_change", e))?
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    // The engine holds (durably) the changes whose dependencies are missing,
    // or refuses the whole request at a held-change limit. A node publishes
    // the client's changes once they apply (the engine tells it), so they
    // replicate like a local commit.
    let engine = state.engine.acting_as(Actor::Client(caller.label()));
    let doc = id.clone();
    let outcome = blocking(move || Ok(engine.apply_changes(&doc, &chunks)?)).await?;
    let missing: Vec<String> = outcome
        .missing_deps
        .iter()
        .map(ToString::to_string)
        .collect();
    let body = json!({
        "applied": outcome.applied,
        "duplicates": outcome.duplicates,
        "held": outcome.held,
        "missing_deps": missing,
    });
    let Value::Object(body) = body else {
        unreachable!("json! of an object literal is an object")
    };
    session.answer(&state, id, outcome.heads, body).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    #[test]
    fn saved_changes_split_into_the_documents_changes() -> Result<(), Box<dyn std::error::Error>> {
        let mut doc = AutoCommit::new();
        for i in 0..5 {
            doc.put(ROOT, format!("k{i}"), i)?;
            doc.commit();
        }
        let changes: Vec<Vec<u8>> = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let joined = changes.concat();
        let split = split_chunks(&joined)?;
        assert_eq!(split.len(), 5);
        assert!(split.iter().zip(&changes).all(|(a, b)| *a == b.as_slice()));
        Ok(())
    }

    #[test]
    fn bad_framing_is_refused() {
        assert!(split_chunks(b"not automerge").is_err());
        let mut truncated = MAGIC.to_vec();
        truncated.extend([0, 0, 0, 0, 1, 100, 1, 2]);
        assert_eq!(
            split_chunks(&truncated).err().as_deref(),
            Some("chunk 0 is truncated")
        );
        assert_eq!(split_chunks(&[]).map(|c| c.len()), Ok(0));
    }
}
