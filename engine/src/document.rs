//! One document in memory: its Automerge state, its stored metadata, and the
//! changes held back until their dependencies arrive.
//!
//! `DocState` knows how to load itself from the [`Store`] and how to turn new
//! changes into exactly one WriteBatch (log entries or a fresh snapshot, plus
//! metadata). It never writes anything else.

use std::collections::{HashMap, HashSet, VecDeque};

use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc};
use rocksdb::WriteBatch;

use crate::config::{CompactionPolicy, EngineConfig};
use crate::doc_id::DocId;
use crate::error::{Error, Result};
use crate::layout::{self, DocMeta};
use crate::lineage;
use crate::store::{Store, Wait};

/// Estimated heap bytes per Automerge operation held in memory. Calibrated by
/// `engine/tests/memory_estimate.rs` with a counting allocator (see
/// `docs/ARCHITECTURE.md`, "Memory budget"); Automerge's columnar op set is
/// run-length encoded, so long runs of similar ops cost little each.
const BYTES_PER_OP: usize = 12;
/// Estimated heap bytes per change in the change graph (same calibration).
const BYTES_PER_CHANGE: usize = 256;
/// Estimated fixed heap cost of a loaded Automerge document, whatever its size
/// (same calibration: about 17 KiB for a document with a handful of keys).
const BYTES_PER_DOC: usize = 16 * 1024;

/// In-memory state of one document.
pub(crate) struct DocState {
    pub(crate) doc: Automerge,
    pub(crate) meta: DocMeta,
    /// Whether the document has metadata on disk.
    pub(crate) stored: bool,
    held: Held,
}

/// Changes waiting for missing dependencies, oldest first, bounded.
#[derive(Default)]
struct Held {
    changes: VecDeque<Change>,
    bytes: usize,
}

/// What happened to changes handed to [`DocState::integrate`].
#[derive(Debug, Default)]
pub(crate) struct Integration {
    /// Changes that became part of the document, in application order.
    pub(crate) ready: Vec<Change>,
    /// Changes that were already present (or repeated in the input).
    pub(crate) duplicates: usize,
    /// Changes now held for missing dependencies.
    pub(crate) held: usize,
    /// Held changes dropped because the held buffer was full.
    pub(crate) dropped: usize,
    /// Dependencies that neither the document nor the input provide.
    pub(crate) missing: Vec<ChangeHash>,
    /// Per input change, in input order: whether it was new (applied or
    /// held now) rather than a duplicate.
    pub(crate) new: Vec<bool>,
}

impl DocState {
    /// A document with no history, not yet stored.
    pub(crate) fn new_empty(actor: ActorId) -> Self {
        DocState {
            doc: Automerge::new().with_actor(actor),
            meta: DocMeta::empty(),
            stored: false,
            held: Held::default(),
        }
    }

    /// Loads `id` from the store: snapshot, then log entries, then checks the
    /// result against the stored heads.
    pub(crate) fn load(store: &Store, id: &DocId, actor: ActorId) -> Result<Self> {
        let Some(meta) = store.meta(id)? else {
            return Ok(DocState::new_empty(actor));
        };
        let corrupt = |key: String, reason: String| Error::Corrupt {
            doc: id.to_string(),
            key,
            reason,
        };
        let snapshot_key = || layout::describe_key(layout::CF_SNAPSHOT, id.as_bytes());
        let mut doc = match store.snapshot(id)? {
            Some(bytes) => crate::codec::document(&bytes)
                .map_err(|e| corrupt(snapshot_key(), format!("undecodable snapshot: {e}")))?,
            None if meta.snapshot_bytes > 0 => {
                return Err(corrupt(snapshot_key(), "snapshot missing".into()))
            }
            None => Automerge::new(),
        };
        let entries = store.log_entries(id, meta.log_start, meta.next_seq)?;
        if entries.len() as u64 != meta.log_len() {
            let key =
                layout::describe_key(layout::CF_CHANGE_LOG, &layout::log_key(id, meta.log_start));
            let reason = format!(
                "expected {} log entries, found {}",
                meta.log_len(),
                entries.len()
            );
            return Err(corrupt(key, reason));
        }
        let mut changes = Vec::with_capacity(entries.len());
        for (key, bytes) in entries {
            let change = crate::codec::change(bytes).map_err(|e| {
                corrupt(
                    layout::describe_key(layout::CF_CHANGE_LOG, &key),
                    format!("undecodable change: {e}"),
                )
            })?;
            changes.push(change);
        }
        doc.apply_changes(changes)
            .map_err(|e| corrupt(snapshot_key(), format!("log does not apply: {e}")))?;
        if doc.get_heads() != sorted(meta.heads()) {
            let key = layout::describe_key(layout::CF_DOC_META, id.as_bytes());
            return Err(corrupt(
                key,
                "stored heads do not match the stored history".into(),
            ));
        }
        doc.set_actor(actor);
        Ok(DocState {
            doc,
            meta,
            stored: true,
            held: Held::default(),
        })
    }

    /// Whether the document exists and is not deleted.
    pub(crate) fn is_live(&self) -> bool {
        self.stored && !self.meta.tombstone
    }

    /// Whether `hash` is part of the document's history.
    pub(crate) fn has_change(&self, hash: &ChangeHash) -> bool {
        self.doc
            .get_missing_deps(std::slice::from_ref(hash))
            .is_empty()
    }

    /// Heads among `heads` that this document does not hold.
    pub(crate) fn missing_heads(&self, heads: &[ChangeHash]) -> Vec<ChangeHash> {
        heads
            .iter()
            .filter(|h| !self.has_change(h))
            .copied()
            .collect()
    }

    /// Estimated memory held by this document, in bytes.
    pub(crate) fn estimated_bytes(&self) -> usize {
        let stats = self.doc.stats();
        if stats.num_changes == 0 {
            // A document that does not exist (yet): only its held changes.
            return self.held.bytes;
        }
        BYTES_PER_DOC
            + stats.num_ops as usize * BYTES_PER_OP
            + stats.num_changes as usize * BYTES_PER_CHANGE
            + self.held.bytes
    }

    /// Sorts `incoming` (already validated and decoded) into changes that can
    /// be applied now (with any held changes they unblock), duplicates, and
    /// changes to hold. Refuses, changing nothing, a root change that is not
    /// this document's genesis.
    pub(crate) fn integrate(
        &mut self,
        id: &DocId,
        incoming: Vec<Change>,
        config: &EngineConfig,
    ) -> Result<Integration> {
        let mut out = Integration {
            new: Vec::with_capacity(incoming.len()),
            ..Integration::default()
        };
        let mut seen = HashSet::new();
        let mut fresh = Vec::with_capacity(incoming.len());
        let mut genesis = None;
        for change in incoming {
            let hash = change.hash();
            if self.has_change(&hash) || !seen.insert(hash) || self.held.contains(&hash) {
                out.duplicates += 1;
                out.new.push(false);
                continue;
            }
            out.new.push(true);
            if change.deps().is_empty()
                && *genesis.get_or_insert_with(|| lineage::genesis_change(id).hash()) != hash
            {
                return Err(Error::WrongDocument {
                    doc: id.clone(),
                    hash,
                });
            }
            fresh.push(change);
        }
        let mut pending: Vec<Option<Change>> = self.held.take().into_iter().map(Some).collect();
        pending.extend(fresh.into_iter().map(Some));
        // Kahn's algorithm over the held and new changes: a dependency on
        // another of them is an edge; only dependencies outside them are
        // looked up in the document (each lookup walks Automerge's queue and
        // allocates, so a long chain of held changes must not cost one per
        // change on every call).
        let index: HashMap<ChangeHash, usize> = pending
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (c.hash(), i)))
            .collect();
        let mut blockers = vec![0usize; pending.len()];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); pending.len()];
        let mut missing = Vec::new();
        let mut queue = VecDeque::new();
        for (i, change) in pending.iter().enumerate() {
            let Some(change) = change else { continue };
            for dep in change.deps() {
                match index.get(dep) {
                    Some(&j) => {
                        blockers[i] += 1;
                        dependents[j].push(i);
                    }
                    None if self.has_change(dep) => {}
                    None => {
                        blockers[i] += 1;
                        missing.push(*dep);
                    }
                }
            }
            if blockers[i] == 0 {
                queue.push_back(i);
            }
        }
        while let Some(i) = queue.pop_front() {
            if let Some(change) = pending[i].take() {
                out.ready.push(change);
            }
            for &k in &dependents[i] {
                blockers[k] -= 1;
                if blockers[k] == 0 {
                    queue.push_back(k);
                }
            }
        }
        let pending: Vec<Change> = pending.into_iter().flatten().collect();
        missing.sort_unstable();
        missing.dedup();
        out.missing = missing;
        out.held = pending.len();
        out.dropped = self.held.extend(pending, config);
        Ok(out)
    }

    /// Dependencies of held changes that are neither in the document nor
    /// held themselves: what must arrive before the held changes can apply.
    pub(crate) fn held_missing_deps(&self) -> Vec<ChangeHash> {
        let held: HashSet<ChangeHash> = self.held.changes.iter().map(Change::hash).collect();
        let mut missing: Vec<ChangeHash> = self
            .held
            .changes
            .iter()
            .flat_map(|c| c.deps().iter().copied())
            .filter(|d| !held.contains(d) && !self.has_change(d))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    }

    /// Number of changes currently held for missing dependencies.
    pub(crate) fn held_len(&self) -> usize {
        self.held.changes.len()
    }

    /// Persists `new_changes`, which are already applied to `self.doc`, in one
    /// WriteBatch: as log entries, or folded with the existing log into a new
    /// snapshot when the compaction policy says so. Updates `self.meta` only
    /// once the batch is written (durable unless `wait` defers the fsync).
    pub(crate) fn persist(
        &mut self,
        store: &Store,
        id: &DocId,
        new_changes: &[Change],
        policy: &CompactionPolicy,
        wait: Wait,
    ) -> Result<()> {
        let heads = self.doc.get_heads();
        let mut meta = self.meta.clone();
        meta.set_heads(&heads);
        meta.change_count += new_changes.len() as u64;
        // At least one new change is a head, so unless a new change is a
        // tombstone the document is not deleted; skip the head lookups then.
        let any_tombstone = new_changes
            .iter()
            .any(|c| c.message().is_some_and(|m| m == lineage::TOMBSTONE_MESSAGE));
        meta.tombstone = any_tombstone && lineage::is_tombstoned(&self.doc, &heads);
        let new_bytes: u64 = new_changes.iter().map(|c| c.raw_bytes().len() as u64).sum();
        let mut batch = WriteBatch::default();
        let compact = meta.log_len() + new_changes.len() as u64 >= policy.max_log_changes
            || meta.log_bytes + new_bytes >= policy.max_log_bytes;
        if compact {
            let snapshot = self.doc.save();
            batch.put_cf(store.cf(layout::CF_SNAPSHOT), id.as_bytes(), &snapshot);
            let log_cf = store.cf(layout::CF_CHANGE_LOG);
            for seq in meta.log_start..meta.next_seq {
                batch.delete_cf(log_cf, layout::log_key(id, seq));
            }
            meta.log_start = meta.next_seq;
            meta.log_bytes = 0;
            meta.snapshot_bytes = snapshot.len() as u64;
        } else {
            let log_cf = store.cf(layout::CF_CHANGE_LOG);
            for change in new_changes {
                batch.put_cf(
                    log_cf,
                    layout::log_key(id, meta.next_seq),
                    change.raw_bytes(),
                );
                meta.next_seq += 1;
            }
            meta.log_bytes += new_bytes;
        }
        batch.put_cf(store.cf(layout::CF_DOC_META), id.as_bytes(), meta.encode());
        store.write(batch, wait)?;
        self.meta = meta;
        self.stored = true;
        Ok(())
    }
}

impl Held {
    fn contains(&self, hash: &ChangeHash) -> bool {
        self.changes.iter().any(|c| c.hash() == *hash)
    }

    fn take(&mut self) -> Vec<Change> {
        self.bytes = 0;
        self.changes.drain(..).collect()
    }

    /// Adds changes, dropping the oldest while over either bound. Returns how
    /// many were dropped.
    fn extend(&mut self, changes: Vec<Change>, config: &EngineConfig) -> usize {
        for change in changes {
            self.bytes += change.raw_bytes().len();
            self.changes.push_back(change);
        }
        let mut dropped = 0;
        while self.changes.len() > config.max_held_changes_per_doc
            || self.bytes > config.max_held_bytes_per_doc
        {
            match self.changes.pop_front() {
                Some(c) => {
                    self.bytes -= c.raw_bytes().len();
                    dropped += 1;
                }
                None => break,
            }
        }
        dropped
    }
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort_unstable();
    heads
}
