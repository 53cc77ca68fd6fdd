//! The document cache: which documents are in memory, bounded by a memory budget.
//!
//! Each document has a *slot* behind its own mutex. The cache maps ids to slots
//! and evicts idle slots, least recently used first, once the estimated memory
//! of loaded documents exceeds the budget. A slot that anyone else holds (an
//! operation in progress) is never evicted, so there is never more than one
//! in-memory copy of a document: a copy is created only under the cache lock,
//! and only when no other exists.
//!
//! Loading happens outside the cache lock, under the slot's own lock, so a large
//! document loading does not stall operations on other documents.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::doc_id::DocId;
use crate::document::DocState;

/// How many least-recently-used entries one eviction pass examines before
/// giving up (entries in use are skipped). Bounds the time spent under the
/// cache lock when most cached documents are busy.
const MAX_EVICTION_SCAN: usize = 64;

/// Bytes charged for every cache entry on top of its document's estimate, so
/// that entries for missing or tiny documents are bounded by the budget too.
pub(crate) const ENTRY_OVERHEAD: usize = 512;

/// A document's in-memory state, or the fact that it is not loaded.
pub(crate) enum Slot {
    /// Not in memory; the next user loads it from the store.
    Unloaded,
    /// Loaded (possibly as a new, empty document).
    Loaded(Box<DocState>),
}

/// Shared handle to a slot.
pub(crate) type SlotRef = Arc<Mutex<Slot>>;

/// Locks a slot, ignoring poisoning: a panic while a slot was held leaves it
/// `Unloaded` or with state that was fully committed (see `engine`).
pub(crate) fn lock_slot(slot: &SlotRef) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Entry {
    slot: SlotRef,
    tick: u64,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<DocId, Entry>,
    lru: BTreeMap<u64, DocId>,
    tick: u64,
    total_bytes: usize,
    evictions: u64,
}

/// Bounded map from document ids to slots.
pub(crate) struct DocCache {
    budget: usize,
    inner: Mutex<Inner>,
}

/// Cache figures for [`EngineStats`](crate::EngineStats).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheStats {
    pub(crate) documents: usize,
    pub(crate) bytes: usize,
    pub(crate) evictions: u64,
}

impl DocCache {
    /// A cache holding about `budget` bytes of documents.
    pub(crate) fn new(budget: usize) -> Self {
        DocCache {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether `id` has a slot (loaded or being loaded).
    pub(crate) fn contains(&self, id: &DocId) -> bool {
        self.lock().entries.contains_key(id)
    }

    /// The slot for `id`, created `Unloaded` if absent, marked most recently used.
    pub(crate) fn slot(&self, id: &DocId) -> SlotRef {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let (slot, old_tick) = match inner.entries.get_mut(id) {
            Some(entry) => {
                let old = entry.tick;
                entry.tick = tick;
                (Arc::clone(&entry.slot), Some(old))
            }
            None => {
                let slot = Arc::new(Mutex::new(Slot::Unloaded));
                inner.entries.insert(
                    id.clone(),
                    Entry {
                        slot: Arc::clone(&slot),
                        tick,
                        bytes: ENTRY_OVERHEAD,
                    },
                );
                inner.total_bytes += ENTRY_OVERHEAD;
                (slot, None)
            }
        };
        if let Some(old) = old_tick {
            inner.lru.remove(&old);
        }
        inner.lru.insert(tick, id.clone());
        self.evict(&mut inner);
        slot
    }

    /// Records the estimated size of `id`'s state after an operation and evicts
    /// idle documents while over budget.
    pub(crate) fn resize(&self, id: &DocId, bytes: usize) {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(id) else {
            return;
        };
        let old = std::mem::replace(&mut entry.bytes, bytes + ENTRY_OVERHEAD);
        inner.total_bytes = inner.total_bytes - old + bytes + ENTRY_OVERHEAD;
        self.evict(&mut inner);
    }

    fn evict(&self, inner: &mut Inner) {
        let mut scanned = 0;
        let mut cursor = 0u64;
        while inner.total_bytes > self.budget && scanned < MAX_EVICTION_SCAN {
            let Some((&tick, id)) = inner.lru.range(cursor..).next() else {
                break;
            };
            let id = id.clone();
            cursor = tick + 1;
            scanned += 1;
            let idle = inner
                .entries
                .get(&id)
                .is_some_and(|e| Arc::strong_count(&e.slot) == 1);
            if !idle {
                continue;
            }
            if let Some(entry) = inner.entries.remove(&id) {
                inner.lru.remove(&tick);
                inner.total_bytes -= entry.bytes;
                inner.evictions += 1;
            }
        }
    }

    /// Forgets `id`'s state so the next user reloads it from disk. Used after a
    /// failed apply left the in-memory document in an unknown state.
    pub(crate) fn invalidate(slot: &mut Slot) {
        *slot = Slot::Unloaded;
    }

    /// Current figures.
    pub(crate) fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            documents: inner.entries.len(),
            bytes: inner.total_bytes,
            evictions: inner.evictions,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
