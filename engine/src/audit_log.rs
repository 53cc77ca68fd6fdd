//! The audit feed's records and numbering, below the documents that stage
//! entries into their batches (see [`crate::audit`] for the feed).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::ChangeHash;
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::doc_id::DocId;
use crate::error::{Error, Result};
use crate::layout;
use crate::store::{Store, Wait};

/// Who made a write.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Actor {
    /// The application embedding the engine (a handle that named no one).
    Local,
    /// A client of the node, by the name the node gives it (such as
    /// `token:3f9c0a1b2c3d4e5f`).
    Client(String),
    /// A peer, by its node id: the changes came from it (several ids,
    /// comma-separated, when one write applied a batch of changes from
    /// several peers).
    Peer(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Local => f.write_str("local"),
            Actor::Client(who) => write!(f, "client:{who}"),
            Actor::Peer(who) => write!(f, "peer:{who}"),
        }
    }
}

/// One accepted write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Its number in the feed.
    pub seq: u64,
    /// When it was written, Unix milliseconds (this node's clock).
    pub at_ms: u64,
    /// Who made it.
    pub actor: Actor,
    /// The document.
    pub doc: DocId,
    /// The document's heads after it.
    pub heads: Vec<ChangeHash>,
    /// Changes it applied.
    pub changes: u64,
    /// Whether the document is deleted after it (a delete, or a write that
    /// kept a concurrent delete).
    pub deleted: bool,
}

/// One read of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditPage {
    /// Entries after the cursor asked for, oldest first.
    pub entries: Vec<AuditEntry>,
    /// Pass as `after` to go on: the last entry looked at (which a document
    /// filter may have left out), or the cursor asked for if none was.
    pub cursor: Option<u64>,
    /// Whether more entries may be read at once (the page or the scan was
    /// full).
    pub more: bool,
    /// Entries after the cursor asked for that the feed no longer keeps.
    pub missed: u64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    at_ms: u64,
    actor: Actor,
    doc: String,
    heads: Vec<serde_bytes::ByteBuf>,
    changes: u64,
    deleted: bool,
}

/// The feed's numbering and the entries not yet durable.
#[derive(Debug)]
pub(crate) struct AuditLog {
    max_entries: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Numbered, not yet durable (nor failed).
    unsettled: BTreeSet<u64>,
    /// Written through a deferring handle: durable at the next
    /// `sync_deferred`.
    deferred: Vec<u64>,
}

/// An entry staged in a batch, to settle once the batch is written.
#[must_use]
pub(crate) struct Staged(Option<u64>);

pub(crate) fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

impl AuditLog {
    /// The feed of `store`, keeping `max_entries` (0: no feed). Entries
    /// beyond the bound (kept under a larger one before) are deleted now:
    /// each write deletes only the one entry that falls out of the bound.
    pub(crate) fn open(store: &Store, max_entries: u64) -> Result<AuditLog> {
        let last = store.last_key(layout::CF_AUDIT)?;
        let next = last.and_then(|k| seq_of(&k)).map_or(0, |s| s + 1);
        let keep_from = next.saturating_sub(max_entries);
        let mut first = None;
        store.scan_from(layout::CF_AUDIT, &[], |k, _| {
            first = seq_of(k);
            Ok(false)
        })?;
        if first.is_some_and(|f| f < keep_from) {
            let mut batch = WriteBatch::default();
            let cf = store.cf(layout::CF_AUDIT);
            batch.delete_range_cf(cf, key(0), key(keep_from));
            store.write(batch, Wait::Durable)?;
        }
        Ok(AuditLog {
            max_entries,
            state: Mutex::new(State {
                next,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an entry for a write of `changes` changes to `doc` by `actor`
    /// to `batch`.
    pub(crate) fn stage(
        &self,
        store: &Store,
        batch: &mut WriteBatch,
        actor: &Actor,
        doc: &DocId,
        heads: &[ChangeHash],
        (changes, deleted): (u64, bool),
    ) -> Staged {
        if self.max_entries == 0 {
            return Staged(None);
        }
        let record = Record {
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            actor: actor.clone(),
            doc: doc.as_str().to_string(),
            heads: heads.iter().map(|h| h.0.to_vec().into()).collect(),
            changes,
            deleted,
        };
        let mut value = Vec::new();
        // Strings, integers and byte strings always serialise into a Vec.
        #[allow(clippy::expect_used)]
        ciborium::into_writer(&record, &mut value).expect("CBOR into a Vec");
        let seq = {
            let mut state = self.lock();
            let seq = state.next;
            state.next += 1;
            state.unsettled.insert(seq);
            seq
        };
        let cf = store.cf(layout::CF_AUDIT);
        batch.put_cf(cf, key(seq), value);
        if let Some(old) = seq.checked_sub(self.max_entries) {
            batch.delete_cf(cf, key(old));
        }
        Staged(Some(seq))
    }

    /// Settles `staged` after its batch was written with `wait` (or failed:
    /// `ok` false).
    pub(crate) fn settle(&self, staged: Staged, wait: Wait, ok: bool) {
        let Some(seq) = staged.0 else { return };
        let mut state = self.lock();
        if ok && wait == Wait::Deferred {
            state.deferred.push(seq);
        } else {
            state.unsettled.remove(&seq);
        }
    }

    /// Every deferred write is durable now.
    pub(crate) fn settle_deferred(&self) {
        let mut state = self.lock();
        let deferred = std::mem::take(&mut state.deferred);
        for seq in deferred {
            state.unsettled.remove(&seq);
        }
    }

    /// Entries numbered below this are durable (or failed): readable.
    pub(crate) fn readable_below(&self) -> u64 {
        let state = self.lock();
        state.unsettled.first().copied().unwrap_or(state.next)
    }
}

pub(crate) fn decode(seq: u64, value: &[u8]) -> Result<AuditEntry> {
    let corrupt = |reason: String| Error::Corrupt {
        doc: String::new(),
        key: layout::describe_key(layout::CF_AUDIT, &key(seq)),
        reason,
    };
    let r: Record = ciborium::from_reader(value).map_err(|e| corrupt(e.to_string()))?;
    let doc = DocId::new(r.doc).map_err(|e| corrupt(e.to_string()))?;
    let heads = r
        .heads
        .iter()
        .map(|h| ChangeHash::try_from(h.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| corrupt("a head is not 32 bytes".into()))?;
    Ok(AuditEntry {
        seq,
        at_ms: r.at_ms,
        actor: r.actor,
        doc,
        heads,
        changes: r.changes,
        deleted: r.deleted,
    })
}
