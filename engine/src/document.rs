//! One document in memory: its Automerge state, its stored metadata, and the
//! changes held back until their dependencies arrive (see [`held`](crate::held)).
//!
//! `DocState` knows how to load itself from the [`Store`] and how to turn new
//! changes into exactly one WriteBatch (log entries or a fresh snapshot, plus
//! metadata). It never writes anything else.

use std::collections::HashSet;

use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc};
use rocksdb::WriteBatch;

use crate::audit_log::{Actor, AuditLog};
use crate::config::CompactionPolicy;
use crate::doc_id::DocId;
use crate::error::{Error, Result};
use crate::held::{Held, Plan, Source};
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
    /// Whether the document has metadata on disk (a collection marker
    /// does not count: see `collected`).
    pub(crate) stored: bool,
    pub(crate) held: Held,
    /// The tombstone heads of a collected document (see `collection`):
    /// its history is gone, and `doc` and `meta` are those of a document
    /// without history until a change arrives. Sorted.
    pub(crate) collected: Option<Vec<ChangeHash>>,
}

/// What integrating changes handed to [`DocState::integrate`] will do.
pub(crate) struct Integration {
    /// What applies now and what is held (limits not yet applied).
    pub(crate) plan: Plan,
    /// Changes that were already present (or repeated in the input).
    pub(crate) duplicates: usize,
    /// Per input change, in input order: its hash, and whether it was new
    /// (to apply or hold) rather than a duplicate.
    pub(crate) new: Vec<(ChangeHash, bool)>,
}

impl DocState {
    /// A document with no history, not yet stored.
    pub(crate) fn new_empty(actor: ActorId) -> Self {
        DocState {
            doc: Automerge::new().with_actor(actor),
            meta: DocMeta::empty(),
            stored: false,
            held: Held::default(),
            collected: None,
        }
    }

    /// A document with no history and the held changes stored for it.
    fn unstored(store: &Store, id: &DocId, actor: ActorId, with_held: bool) -> Result<Self> {
        let mut state = DocState::new_empty(actor);
        if with_held {
            state.held = load_held(store, id, &state.doc)?;
        }
        Ok(state)
    }

    /// Loads `id` from the store: snapshot, then log entries, then checks the
    /// result against the stored heads; then, if `with_held`, its held
    /// changes.
    pub(crate) fn load(store: &Store, id: &DocId, actor: ActorId, with_held: bool) -> Result<Self> {
        let Some(meta) = store.meta(id)? else {
            return DocState::unstored(store, id, actor, with_held);
        };
        if meta.collected_at.is_some() {
            let mut state = DocState::unstored(store, id, actor, with_held)?;
            state.collected = Some(sorted(meta.heads()));
            return Ok(state);
        }
        let corrupt = |key: String, reason: String| Error::Corrupt {
            doc: id.to_string(),
            key,
            reason,
        };
        let snapshot_key = || layout::describe_key(layout::CF_SNAPSHOT, id.as_bytes());
        let mut doc = match store.snapshot(id)? {
            Some(bytes) => crate::guarded::document(&bytes)
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
            let change = crate::guarded::change(bytes).map_err(|e| {
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
        let held = if with_held {
            load_held(store, id, &doc)?
        } else {
            Held::default()
        };
        Ok(DocState {
            doc,
            meta,
            stored: true,
            held,
            collected: None,
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

    /// Whether `hash` is one of the tombstone heads of a collected
    /// document: a change its history had, which it no longer holds.
    pub(crate) fn was_collected(&self, hash: &ChangeHash) -> bool {
        self.collected
            .as_ref()
            .is_some_and(|heads| heads.binary_search(hash).is_ok())
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
            return self.held.bytes();
        }
        BYTES_PER_DOC
            + stats.num_ops as usize * BYTES_PER_OP
            + stats.num_changes as usize * BYTES_PER_CHANGE
            + self.held.bytes()
    }

    /// Plans the integration of `incoming` (already validated and decoded)
    /// from `source`: duplicates are set aside, and the rest either applies
    /// now (with the held changes it releases) or is to be held. Changes
    /// nothing. A change that depends on this document's genesis brings the
    /// genesis along, since every replica can make it.
    ///
    /// Lineage (see [`lineage`]): a client may not add a root change to a
    /// document that already has history, unless it is the document's
    /// genesis; the call is refused with [`Error::WrongDocument`]. A document
    /// without history takes any roots (an import), and a peer's root is
    /// always taken, so replicas that accepted different roots for one id
    /// during a partition still converge.
    pub(crate) fn integrate(
        &self,
        id: &DocId,
        incoming: Vec<Change>,
        source: Source,
    ) -> Result<Integration> {
        let mut new = Vec::with_capacity(incoming.len());
        let mut duplicates = 0;
        let mut seen = HashSet::new();
        let mut fresh = Vec::with_capacity(incoming.len());
        let has_history = !self.doc.get_heads().is_empty();
        // The genesis is made only when needed: to allow a client's root
        // change, or to find a dependency that nothing else supplies.
        let mut genesis: Option<Change> = None;
        let mut unsupplied = Vec::new();
        for change in incoming {
            let hash = change.hash();
            if self.has_change(&hash)
                || self.was_collected(&hash)
                || !seen.insert(hash)
                || self.held.contains(&hash)
            {
                duplicates += 1;
                new.push((hash, false));
                continue;
            }
            new.push((hash, true));
            let deps = change.deps();
            if deps.is_empty()
                && source == Source::Client
                && has_history
                && hash != genesis_of(&mut genesis, id)
            {
                return Err(Error::WrongDocument {
                    doc: id.clone(),
                    hash,
                });
            }
            unsupplied.extend(
                deps.iter()
                    .filter(|d| !self.has_change(d) && !self.held.contains(d))
                    .copied(),
            );
            fresh.push(change);
        }
        unsupplied.retain(|d| !seen.contains(d));
        if !unsupplied.is_empty() {
            let g = genesis_of(&mut genesis, id);
            if let Some(genesis) = genesis.filter(|_| unsupplied.contains(&g)) {
                fresh.insert(0, genesis);
            }
        }
        let plan = self.held.plan(fresh, source, |h| self.has_change(h));
        Ok(Integration {
            plan,
            duplicates,
            new,
        })
    }

    /// Dependencies of held changes that are neither in the document nor
    /// held themselves: what must arrive before the held changes can apply.
    pub(crate) fn held_missing_deps(&self) -> Vec<ChangeHash> {
        self.held.missing()
    }

    /// Number of changes currently held for missing dependencies.
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Persists `new_changes`, which are already applied to `self.doc`, in one
    /// WriteBatch: as log entries, or folded with the existing log into a new
    /// snapshot when the compaction policy says so; with `held`, the same
    /// batch stores the changes it holds and deletes those it released.
    /// Updates `self.meta` (and, with `held`, the held set) only once the
    /// batch is written (durable unless `wait` defers the fsync).
    pub(crate) fn persist(
        &mut self,
        to: &PersistTo<'_>,
        id: &DocId,
        new_changes: &[Change],
        held: Option<&Plan>,
    ) -> Result<()> {
        let PersistTo {
            store,
            policy,
            wait,
            audit,
            actor,
        } = *to;
        let mut batch = WriteBatch::default();
        if let Some(plan) = held {
            stage_held(&mut batch, store, id, plan);
        }
        if new_changes.is_empty() {
            store.write(batch, wait)?;
            if let Some(plan) = held {
                self.held.commit(plan);
            }
            return Ok(());
        }
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
        meta.deleted_at = meta
            .tombstone
            .then(|| lineage::deleted_at(&self.doc, &heads));
        let new_bytes: u64 = new_changes.iter().map(|c| c.raw_bytes().len() as u64).sum();
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
        let counts = (new_changes.len() as u64, meta.tombstone);
        let staged = audit.stage(store, &mut batch, actor, id, &heads, counts);
        let written = store.write(batch, wait);
        audit.settle(staged, wait, written.is_ok());
        written?;
        self.meta = meta;
        self.stored = true;
        // The record just written replaced a collection marker, if any.
        self.collected = None;
        if let Some(plan) = held {
            self.held.commit(plan);
        }
        Ok(())
    }
}

/// Where and how [`DocState::persist`] writes: the store, the compaction
/// policy, the durability to wait for, and the audit feed with the actor
/// its entry names.
#[derive(Clone, Copy)]
pub(crate) struct PersistTo<'a> {
    pub(crate) store: &'a Store,
    pub(crate) policy: &'a CompactionPolicy,
    pub(crate) wait: Wait,
    pub(crate) audit: &'a AuditLog,
    pub(crate) actor: &'a Actor,
}

/// Adds a plan's held-change records to `batch`: puts for the changes it
/// holds, deletes for those it releases.
fn stage_held(batch: &mut WriteBatch, store: &Store, id: &DocId, plan: &Plan) {
    let cf = store.cf(layout::CF_HELD);
    for hash in &plan.released {
        batch.delete_cf(cf, layout::held_key(id, hash));
    }
    for (change, source, _) in &plan.hold {
        let raw = change.raw_bytes();
        let mut value = Vec::with_capacity(raw.len() + 1);
        value.push(source.tag());
        value.extend_from_slice(raw);
        batch.put_cf(cf, layout::held_key(id, &change.hash()), value);
    }
}

/// Reads and decodes `id`'s held changes. A record that does not decode, or
/// is stored under another hash than its own, is reported as corrupt.
fn load_held(store: &Store, id: &DocId, doc: &Automerge) -> Result<Held> {
    let mut changes = Vec::new();
    for (key, value) in store.held(id)? {
        let corrupt = |reason: String| Error::Corrupt {
            doc: id.to_string(),
            key: layout::describe_key(layout::CF_HELD, &key),
            reason,
        };
        let Some((&tag, raw)) = value.split_first() else {
            return Err(corrupt("empty held-change record".into()));
        };
        let source = Source::from_tag(tag)
            .ok_or_else(|| corrupt("unknown held-change source tag".into()))?;
        let change = crate::guarded::change(raw.to_vec())
            .map_err(|e| corrupt(format!("undecodable held change: {e}")))?;
        if layout::parse_held_key(&key).map(|(_, h)| h) != Some(change.hash()) {
            return Err(corrupt("held change stored under another hash".into()));
        }
        changes.push((change, source));
    }
    Ok(Held::from_stored(changes, |h| {
        doc.get_missing_deps(std::slice::from_ref(h)).is_empty()
    }))
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort_unstable();
    heads
}

/// `id`'s genesis change's hash, making the change into `slot` the first time.
fn genesis_of(slot: &mut Option<Change>, id: &DocId) -> ChangeHash {
    slot.get_or_insert_with(|| lineage::genesis_change(id))
        .hash()
}
