//! Collection of deleted documents: the store side of garbage collection.
//!
//! A deleted document keeps its whole history (the tombstone is a change like
//! any other, see [`lineage`](crate::lineage)), so deletes alone never free
//! space. *Collecting* a deleted document removes its history (snapshot,
//! change log, held changes, the sync states saved with its peers) and
//! leaves a small *marker* in its metadata record: the tombstone heads and
//! the time of collection. The replicator decides when that is safe (every
//! member of the cluster holds the tombstone, for a grace period; see
//! `replication::replicator::collection`); this module only does what it is
//! told, under the document's lock, and only if the document is still
//! deleted at the heads the decision was made on.
//!
//! A marked document reads as deleted. It answers a peer that holds
//! exactly its tombstone heads as if it held them too, so the two do not
//! send the history back and forth, and takes any change that goes past
//! them (a write made after the delete) by fetching the history again: its
//! first change replaces the marker with an ordinary record. The marker
//! itself is dropped ([`Engine::forget_marker`]) once every peer has had
//! time to collect the document too.
//!
//! The store also keeps the time it last heard from a member of its cluster
//! ([`Engine::last_contact`]). A store that was away longer than the grace
//! period may hold documents that its peers have collected since, without
//! their tombstones; it must not bring them back, so a node refuses to start
//! on such a store (see `docs/operations.md`, "Garbage collection").

use automerge::ChangeHash;
use rocksdb::WriteBatch;

use crate::cache::{lock_slot, DocCache, Slot};
use crate::doc_id::DocId;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::layout::{self, DocMeta};
use crate::store::Wait;

/// A deleted document as [`Engine::tombstones`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// The document.
    pub doc: DocId,
    /// Its heads, every one a tombstone change.
    pub heads: Vec<ChangeHash>,
    /// When it was collected (seconds since the Unix epoch), if it was: then
    /// only its marker is left.
    pub collected_at: Option<u64>,
    /// When it was deleted (see [`Engine::deleted_at`]), if its record
    /// says (records written before this was kept do not).
    pub deleted_at: Option<u64>,
}

impl Engine {
    /// Deleted documents (collected ones included), in id order, strictly
    /// after `after`, at most `limit` of them; and where the next page
    /// starts (`None`: the walk reached the end). Reads metadata only. A
    /// record that does not decode quarantines its document.
    pub fn tombstones(
        &self,
        after: Option<&DocId>,
        limit: usize,
    ) -> Result<(Vec<Tombstone>, Option<DocId>)> {
        let quarantine = &self.inner.quarantine;
        let mut out = Vec::new();
        let next = self.inner.store.scan_meta(
            after,
            limit,
            |id, meta| {
                if meta.tombstone {
                    out.push(Tombstone {
                        heads: meta.heads(),
                        collected_at: meta.collected_at,
                        deleted_at: meta.deleted_at,
                        doc: id,
                    });
                }
            },
            |e| {
                quarantine.admit(e);
            },
        )?;
        Ok((out, next))
    }

    /// Collects `id` if it is still deleted with exactly `heads` (in any
    /// order), not collected yet, and holds no change back for missing
    /// dependencies (a held change may be a write made after the delete,
    /// waiting for history this would remove): deletes its history and the
    /// sync states saved with each of `peers`, and writes its marker
    /// (collected at `at`, seconds since the Unix epoch), in one
    /// WriteBatch, durable as this handle's received changes are (see
    /// `Engine::deferring`). Returns whether it did.
    pub fn collect(
        &self,
        id: &DocId,
        heads: &[ChangeHash],
        at: u64,
        peers: &[String],
    ) -> Result<bool> {
        let inner = &self.inner;
        inner.store.check_alive()?;
        if inner.quarantine.get(id.as_str()).is_some() {
            return Ok(false);
        }
        // Under the document's lock, but without loading its history: the
        // stored record decides (a cached state mirrors it).
        let slot = inner.cache.slot(id);
        let mut guard = lock_slot(&slot);
        let Some(meta) = inner.store.meta(id)? else {
            return Ok(false);
        };
        let mut want = heads.to_vec();
        want.sort_unstable();
        let mut ours = meta.heads();
        ours.sort_unstable();
        let held =
            inner.held.has(id) || matches!(&*guard, Slot::Loaded(state) if state.held_len() > 0);
        if meta.collected_at.is_some() || !meta.tombstone || ours != want || held {
            return Ok(false);
        }
        // Point deletes of the records the metadata names: a range delete
        // per document would leave RocksDB a range tombstone per collected
        // document, which every later read in the memtable walks until a
        // flush.
        let store = &inner.store;
        let mut batch = WriteBatch::default();
        batch.delete_cf(store.cf(layout::CF_SNAPSHOT), id.as_bytes());
        for seq in meta.log_start..meta.next_seq {
            batch.delete_cf(store.cf(layout::CF_CHANGE_LOG), layout::log_key(id, seq));
        }
        for peer in peers {
            batch.delete_cf(
                store.cf(layout::CF_PEER_SYNC),
                layout::peer_sync_key(peer, id),
            );
        }
        let mut marker = DocMeta::empty();
        marker.tombstone = true;
        marker.set_heads(&want);
        marker.change_count = meta.change_count;
        marker.collected_at = Some(at);
        batch.put_cf(
            store.cf(layout::CF_DOC_META),
            id.as_bytes(),
            marker.encode(),
        );
        // Nothing derived from a collection leaves the node, and one lost
        // in a crash is made again: a deferring handle's write is enough.
        store.write(batch, self.wait())?;
        // The next use loads the marker.
        DocCache::invalidate(&mut guard);
        drop(guard);
        inner.cache.resize(id, 0);
        Ok(true)
    }

    /// When `id` was deleted: the latest time (seconds since the Unix
    /// epoch) among its tombstone heads, as their authors' clocks had it
    /// (0 for a tombstone made without a time, or before 1970). `None` if
    /// it is not deleted or is collected already. Loads the document (for
    /// records written before [`Tombstone::deleted_at`] was kept).
    pub fn deleted_at(&self, id: &DocId) -> Result<Option<u64>> {
        match self.with_existing(id, |state| {
            Ok(state
                .meta
                .tombstone
                .then(|| crate::lineage::deleted_at(&state.doc, &state.doc.get_heads())))
        }) {
            Err(Error::Deleted(_) | Error::NotFound(_)) => Ok(None),
            other => other,
        }
    }

    /// The tombstone heads of `id` if it is collected (only its marker is
    /// left), sorted.
    pub fn collected(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>> {
        if matches!(self.inner.store.meta(id), Ok(None)) && !self.inner.cache.contains(id) {
            return Ok(None);
        }
        self.with_doc(id, |state| Ok(state.collected.clone()))
    }

    /// Deletes the marker of `id` if it is still the one written at
    /// `collected_at`: the document is then unknown here. Returns whether
    /// it did.
    pub fn forget_marker(&self, id: &DocId, collected_at: u64) -> Result<bool> {
        let store = &self.inner.store;
        self.with_doc(id, |state| {
            let current = store.meta(id)?;
            let ours = current.is_some_and(|m| m.collected_at == Some(collected_at));
            if state.collected.is_none() || !ours || state.held_len() > 0 {
                return Ok(false);
            }
            let mut batch = WriteBatch::default();
            batch.delete_cf(store.cf(layout::CF_DOC_META), id.as_bytes());
            store.write(batch, self.wait())?;
            state.collected = None;
            Ok(true)
        })
    }

    /// When this store last heard from a member of its cluster (seconds
    /// since the Unix epoch), as [`Engine::record_contact`] last wrote it;
    /// `None` if it never did.
    pub fn last_contact(&self) -> Result<Option<u64>> {
        let bytes = self.inner.store.node_record(layout::KEY_LAST_CONTACT)?;
        match bytes {
            None => Ok(None),
            Some(b) => <[u8; 8]>::try_from(b.as_slice())
                .map(|a| Some(u64::from_be_bytes(a)))
                .map_err(|_| Error::Corrupt {
                    doc: String::new(),
                    key: layout::describe_key(layout::CF_NODE, layout::KEY_LAST_CONTACT),
                    reason: "the last contact is not a 64-bit time".into(),
                }),
        }
    }

    /// Records that this store heard from a member of its cluster at `at`
    /// (seconds since the Unix epoch), with the configured durability.
    pub fn record_contact(&self, at: u64) -> Result<()> {
        let store = &self.inner.store;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            store.cf(layout::CF_NODE),
            layout::KEY_LAST_CONTACT,
            at.to_be_bytes(),
        );
        store.write(batch, Wait::Durable)
    }
}
