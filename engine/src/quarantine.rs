//! Documents set aside because their stored data cannot be read.
//!
//! A corrupt record (a snapshot, change, held change or `doc_meta` entry
//! that does not decode, a log that does not apply, heads that do not match
//! the history) concerns one document. The engine quarantines that document
//! the first time it meets the record: every later use of it fails at once
//! with [`Error::Quarantined`](crate::Error::Quarantined), it is left out of
//! the digests replication reconciles, and the rest of the store and of
//! replication carries on. [`Engine::repair`](crate::Engine::repair)
//! discards the local copy; anti-entropy then fetches the document again
//! from the peers that hold it.
//!
//! Storage I/O errors are not corruption: they stay fatal to the engine
//! (`Error::Storage`).
//!
//! The quarantine lives in memory. A corrupt record stays on disk until it is
//! repaired, so after a restart the document is quarantined again when it is
//! next met (at start-up for a `doc_meta` entry, when replication lists the
//! digests; on first use for the rest).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::Error;

/// A quarantined document: what was found wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The document (its stored key, printable, if that is not a valid id).
    pub doc: String,
    /// The RocksDB column family and key of the corrupt record, printable.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Quarantined {
    /// The error every use of the document answers with.
    pub(crate) fn error(&self) -> Error {
        Error::Quarantined {
            doc: self.doc.clone(),
            key: self.key.clone(),
            reason: self.reason.clone(),
        }
    }
}

/// The quarantined documents of one engine.
#[derive(Debug, Default)]
pub(crate) struct Quarantine {
    docs: Mutex<BTreeMap<String, Quarantined>>,
}

impl Quarantine {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Quarantined>> {
        // Every update is one insert or remove: the map stays valid.
        self.docs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Quarantines the document a corrupt-data error names, and returns
    /// the error its uses now answer with. Other errors pass through.
    pub(crate) fn admit(&self, error: Error) -> Error {
        let Error::Corrupt { doc, key, reason } = error else {
            return error;
        };
        let entry = Quarantined { doc, key, reason };
        let answer = entry.error();
        let mut docs = self.lock();
        if !docs.contains_key(&entry.doc) {
            tracing::error!(doc = %entry.doc, key = %entry.key, reason = %entry.reason, "document quarantined: its stored data is corrupt");
            docs.insert(entry.doc.clone(), entry);
        }
        answer
    }

    /// The quarantine entry of `doc`, if it is quarantined.
    pub(crate) fn get(&self, doc: &str) -> Option<Quarantined> {
        self.lock().get(doc).cloned()
    }

    /// Releases `doc`; says whether it was quarantined.
    pub(crate) fn release(&self, doc: &str) -> bool {
        self.lock().remove(doc).is_some()
    }

    /// Every quarantined document, in id order.
    pub(crate) fn list(&self) -> Vec<Quarantined> {
        self.lock().values().cloned().collect()
    }

    /// How many documents are quarantined.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl crate::Engine {
    /// The quarantined documents, in id order.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        self.inner.quarantine.list()
    }

    /// Whether `id` is quarantined.
    pub fn is_quarantined(&self, id: &crate::DocId) -> bool {
        self.inner.quarantine.get(id.as_str()).is_some()
    }

    /// Repairs a quarantined document by discarding every local record of
    /// it, in one durable batch, and releasing it from quarantine: the
    /// document then does not exist here, and anti-entropy fetches it again
    /// from the peers that hold it (within one round). Whatever only this
    /// node held of it (unreadable anyway) is gone. A document not yet
    /// quarantined is loaded first, so a corrupt one is found; one whose
    /// data reads is refused with [`Error::NotQuarantined`] and kept.
    pub fn repair(&self, id: &crate::DocId) -> crate::Result<()> {
        let inner = &self.inner;
        if inner.quarantine.get(id.as_str()).is_none() {
            match self.with_doc(id, |_| Ok(())) {
                Err(Error::Quarantined { .. }) => {}
                Err(e) => return Err(e),
                Ok(()) => return Err(Error::NotQuarantined(id.clone())),
            }
        }
        let slot = inner.cache.slot(id);
        let mut guard = crate::cache::lock_slot(&slot);
        inner.store.discard(id)?;
        crate::cache::DocCache::invalidate(&mut guard);
        drop(guard);
        inner.cache.resize(id, 0);
        inner
            .held
            .settle(id, crate::held::Reservation::default(), 0, 0);
        inner.quarantine.release(id.as_str());
        tracing::warn!(doc = %id, "quarantined document discarded; anti-entropy fetches it again from peers");
        Ok(())
    }
}
