//! `GET /v1/audit?after=&limit=&doc=`: the audit feed (see
//! [`causeway_engine::audit`]): who made each accepted write, what it
//! changed and when, resumable from a cursor. Needs `admin:*`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use causeway_engine::audit::{AuditEntry, MAX_AUDIT_PAGE};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::names::{doc_id, heads_string};
use super::session::{page_limit, query};
use super::{blocking, AppState};
use crate::access::grant::Level;
use crate::access::Caller;

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    /// Entries after this cursor (a previous answer's `cursor`); default:
    /// from the oldest kept.
    pub after: Option<u64>,
    /// Page size, 1 to 1000. Default 100.
    pub limit: Option<usize>,
    /// Only entries of this document.
    pub doc: Option<String>,
}

/// An entry as the API shows it.
pub fn entry_json(e: &AuditEntry) -> Value {
    json!({
        "seq": e.seq,
        "at_ms": e.at_ms,
        "actor": e.actor.to_string(),
        "doc": e.doc.as_str(),
        "heads": heads_string(&e.heads),
        "changes": e.changes,
        "deleted": e.deleted,
    })
}

/// `GET /v1/audit`: a page of the feed.
pub async fn feed(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require_everything(Level::Admin)?;
    let q = query(q)?;
    let limit = page_limit(q.limit, MAX_AUDIT_PAGE)?;
    let doc = q.doc.as_deref().map(doc_id).transpose()?;
    let engine = state.engine.clone();
    let page = blocking(move || Ok(engine.audit(q.after, limit, doc.as_ref())?)).await?;
    Ok(Json(json!({
        "entries": page.entries.iter().map(entry_json).collect::<Vec<_>>(),
        "cursor": page.cursor,
        "more": page.more,
        "missed": page.missed,
    })))
}
