//! Errors of the HTTP API: a status and a JSON body with a stable code.
//!
//! ```json
//! {"error": {"code": "not_found", "message": "document notes/1 does not exist"}}
//! ```
//!
//! The codes are part of the API (see `docs/api.md`); messages may change.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use causeway_engine::Error as EngineError;
use serde_json::json;

/// An API failure. Nothing was changed by the request that got it, except
/// for `storage_failure`, after which the node stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable error code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Machine-readable facts about the failure, merged into the error
    /// object (for example the missing heads of `session_unavailable`).
    pub detail: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// The error with `detail` (a JSON object) added to its body.
    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = Some(detail);
        self
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (self.detail, error.as_object_mut())
        {
            obj.extend(extra);
        }
        let body = json!({ "error": error });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            let retry = axum::http::HeaderValue::from_static("1");
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, retry);
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        use StatusCode as S;
        let (status, code) = match &e {
            EngineError::InvalidDocId(_) => (S::BAD_REQUEST, "invalid_doc_id"),
            EngineError::InvalidPeer(_) => (S::BAD_REQUEST, "invalid_peer"),
            EngineError::NotFound(_) => (S::NOT_FOUND, "not_found"),
            EngineError::Deleted(_) => (S::GONE, "deleted"),
            EngineError::AlreadyExists(_) => (S::CONFLICT, "already_exists"),
            EngineError::NotAnObject { .. } => (S::UNPROCESSABLE_ENTITY, "not_an_object"),
            EngineError::InvalidChange { .. } => (S::BAD_REQUEST, "invalid_change"),
            EngineError::ChangeTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "change_too_large"),
            EngineError::WrongDocument { .. } => (S::BAD_REQUEST, "wrong_document"),
            EngineError::ChangeRejected { .. } => (S::BAD_REQUEST, "change_rejected"),
            EngineError::UnknownHeads { .. } => (S::NOT_FOUND, "unknown_heads"),
            EngineError::HeldLimit { .. } => (S::TOO_MANY_REQUESTS, "held_limit"),
            EngineError::ShapeLimit { .. } => (S::UNPROCESSABLE_ENTITY, "shape_limit"),
            EngineError::InvalidSyncMessage { .. } => (S::BAD_REQUEST, "invalid_sync_message"),
            EngineError::Transaction { .. } => (S::UNPROCESSABLE_ENTITY, "transaction_failed"),
            EngineError::Corrupt { .. } => (S::INTERNAL_SERVER_ERROR, "corrupt_document"),
            EngineError::Quarantined { .. } => (S::SERVICE_UNAVAILABLE, "quarantined"),
            EngineError::NotQuarantined(_) => (S::CONFLICT, "not_quarantined"),
            EngineError::Storage(_) => (S::INTERNAL_SERVER_ERROR, "storage_failure"),
            EngineError::Backup { .. } => (S::INTERNAL_SERVER_ERROR, "backup_failed"),
            EngineError::Draining => (S::SERVICE_UNAVAILABLE, "draining"),
            EngineError::LowDisk => (S::INSUFFICIENT_STORAGE, "insufficient_storage"),
            EngineError::NotAStore { .. }
            | EngineError::FormatTooNew { .. }
            | EngineError::Locked { .. }
            | EngineError::Config(_) => (S::INTERNAL_SERVER_ERROR, "engine_unavailable"),
        };
        let error = match &e {
            // Storage details (paths, RocksDB's words) stay in the log.
            EngineError::Storage(_)
            | EngineError::NotAStore { .. }
            | EngineError::FormatTooNew { .. }
            | EngineError::Locked { .. }
            | EngineError::Config(_) => {
                tracing::error!(error = %e, "a request failed in the engine");
                ApiError::new(status, code, "the node's storage failed; its log says why")
            }
            EngineError::Backup { .. } => {
                tracing::error!(error = %e, "a backup failed");
                ApiError::new(status, code, "the backup failed; the node's log says why")
            }
            EngineError::Quarantined { doc, .. } => ApiError::new(
                status,
                code,
                format!(
                    "document {doc} is quarantined (a stored record of it is corrupt; \
                     `causeway status` says which); repair it with `causeway doc repair`"
                ),
            ),
            EngineError::Corrupt { doc, .. } => {
                tracing::error!(error = %e, "a request found corrupt data");
                ApiError::new(
                    status,
                    code,
                    format!(
                        "the stored data of document {doc} is corrupt; see `causeway doc repair`"
                    ),
                )
            }
            _ => ApiError::new(status, code, e.to_string()),
        };
        match &e {
            EngineError::ShapeLimit {
                change, violation, ..
            } => error.with_detail(json!({
                "limit": violation.name(),
                "change": change.map(|h| h.to_string()),
            })),
            EngineError::HeldLimit {
                limit,
                missing,
                missing_total,
                heads,
                ..
            } => error.with_detail(json!({
                "limit": limit.name(),
                "missing_deps": hex_list(missing),
                "missing_deps_total": missing_total,
                "heads": hex_list(heads),
                "retry_after_ms": HELD_LIMIT_RETRY_MS,
            })),
            _ => error,
        }
    }
}

/// What a refusal at a held-change limit suggests a client waits before
/// retrying, in milliseconds (also as `Retry-After`, rounded up to 1 s):
/// time for replication to deliver the dependencies the held changes wait
/// for.
pub const HELD_LIMIT_RETRY_MS: u64 = 200;

fn hex_list(hashes: &[causeway_engine::automerge::ChangeHash]) -> Vec<String> {
    hashes.iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn storage_and_corruption_details_stay_out_of_answers() {
        let storage = ApiError::from(EngineError::Storage(
            "IO error: /srv/causeway/store/000123.sst: No space left on device".into(),
        ));
        assert_eq!(storage.code, "storage_failure");
        assert!(!storage.message.contains("/srv"), "{}", storage.message);
        let corrupt = ApiError::from(EngineError::Corrupt {
            doc: "notes/1".into(),
            key: "docs/notes/1".into(),
            reason: "snapshot checksum mismatch at byte 77".into(),
        });
        assert_eq!(corrupt.code, "corrupt_document");
        assert!(corrupt.message.contains("notes/1"), "{}", corrupt.message);
        assert!(!corrupt.message.contains("checksum"), "{}", corrupt.message);
    }
}
