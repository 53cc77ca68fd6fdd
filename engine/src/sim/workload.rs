//! Client writes and the ledger of acknowledged ones.
//!
//! Two kinds of write, each leaving a mark that must survive every merge:
//!
//! * a **key write** sets a root key no other write uses (`n<node>-<seq>`) to
//!   its sequence number;
//! * a **text insert** splices a token `<n<node>-<seq>>` into the document's
//!   shared text, at a boundary between earlier tokens, so no later insert,
//!   local or concurrent, can land inside it.
//!
//! A write is acknowledged when the engine returned from its durable commit.
//! At the end, every acknowledged mark must be in every replica.

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, AutomergeError, ObjType, ROOT};
use serde_json::{json, Value};

use crate::doc_id::DocId;
use crate::engine::{Committed, Engine};
use crate::error::Result;

/// The field holding a text document's shared text.
pub(crate) const TEXT_FIELD: &str = "text";

/// An acknowledged write and the mark it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write {
    /// Root key `key` set to `value`.
    Key { doc: usize, key: String, value: u64 },
    /// `token` inserted into the shared text.
    Text { doc: usize, token: String },
}

impl Write {
    /// The document index written.
    pub(crate) fn doc(&self) -> usize {
        match self {
            Write::Key { doc, .. } | Write::Text { doc, .. } => *doc,
        }
    }

    /// Whether `json` (the document on one replica) holds this write's mark.
    pub(crate) fn is_in(&self, json: Option<&Value>) -> bool {
        match (self, json) {
            (Write::Key { key, value, .. }, Some(doc)) => doc.get(key) == Some(&json!(value)),
            (Write::Text { token, .. }, Some(doc)) => doc
                .get(TEXT_FIELD)
                .and_then(Value::as_str)
                .is_some_and(|text| text.contains(token.as_str())),
            (_, None) => false,
        }
    }
}

/// Creates the shared text of `doc` (empty).
pub(crate) fn create_text(engine: &Engine, doc: &DocId) -> Result<Committed<()>> {
    engine.merge_json(doc, &json!({ TEXT_FIELD: "" }))
}

/// Sets root key `key` to `value`.
pub(crate) fn write_key(
    engine: &Engine,
    doc: &DocId,
    key: &str,
    value: u64,
) -> Result<Committed<()>> {
    engine.merge_json(doc, &json!({ key: value }))
}

/// Inserts `token` into the shared text at the boundary `pick` selects
/// (modulo the number of boundaries). Returns `false` in the value, writing
/// nothing, if the document has no shared text.
pub(crate) fn insert_text(
    engine: &Engine,
    doc: &DocId,
    token: &str,
    pick: u64,
) -> Result<Committed<bool>> {
    engine.upsert(doc, |tx| splice_token(tx, token, pick))
}

/// The transaction of [`insert_text`] and [`fork_insert`]: `token` spliced
/// in at the boundary `pick` selects; `false` if there is no shared text.
fn splice_token(
    tx: &mut impl Transactable,
    token: &str,
    pick: u64,
) -> Result<bool, AutomergeError> {
    let text = match tx.get(ROOT, TEXT_FIELD)? {
        Some((automerge::Value::Object(ObjType::Text), id)) => id,
        _ => return Ok(false),
    };
    let current = tx.text(&text)?;
    let boundaries = boundaries(&current);
    let at = boundaries[(pick % boundaries.len() as u64) as usize];
    tx.splice_text(&text, at, 0, token)?;
    Ok(true)
}

/// A client's change made on `source`'s copy of `doc`: `token` inserted at
/// the boundary `pick` selects, by the actor `actor`. The client keeps its
/// own Automerge document (here, a fork of that copy) and hands only its
/// new change to its node, which may lack the change's dependencies.
/// `None` if `source` has no shared text in `doc`.
pub(crate) fn fork_insert(
    source: &Engine,
    doc: &DocId,
    token: &str,
    pick: u64,
    actor: ActorId,
) -> Result<Option<Vec<u8>>> {
    let history = source.changes_since(doc, &[])?;
    let mut fork = Automerge::new();
    fork.load_incremental(&history.concat())
        .map_err(|e| crate::Error::ChangeRejected {
            doc: doc.clone(),
            reason: e.to_string(),
        })?;
    fork.set_actor(actor);
    let before = fork.get_heads();
    let result = fork.transact(|tx| splice_token(tx, token, pick));
    match result {
        Ok(success) if success.result => Ok(fork
            .get_changes(&before)
            .first()
            .map(|c| c.raw_bytes().to_vec())),
        Ok(_) => Ok(None),
        Err(failure) => Err(crate::Error::Transaction {
            doc: doc.clone(),
            source: Box::new(failure.error),
        }),
    }
}

/// Positions between tokens: the start, and after every `>`. Tokens are
/// ASCII, so byte and character positions agree.
fn boundaries(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('>').map(|(i, _)| i + 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_never_fall_inside_a_token() {
        assert_eq!(boundaries(""), vec![0]);
        assert_eq!(boundaries("<n0-1><n1-2>"), vec![0, 6, 12]);
    }

    #[test]
    fn marks_are_found_only_where_written() {
        let key = Write::Key {
            doc: 0,
            key: "n0-1".into(),
            value: 1,
        };
        let text = Write::Text {
            doc: 0,
            token: "<n0-2>".into(),
        };
        let doc = json!({"n0-1": 1, "text": "<n1-3><n0-2>"});
        assert!(key.is_in(Some(&doc)) && text.is_in(Some(&doc)));
        let other = json!({"n0-1": 2, "text": "<n1-3>"});
        assert!(!key.is_in(Some(&other)) && !text.is_in(Some(&other)));
        assert!(!key.is_in(None));
    }
}
