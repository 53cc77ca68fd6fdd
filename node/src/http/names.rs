//! What requests and answers name: document ids from the path, and heads
//! (hex change hashes, comma-separated) in headers, query strings and JSON.

use automerge::ChangeHash;
use axum::http::HeaderName;
use causeway_engine::DocId;

use super::error::ApiError;

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
