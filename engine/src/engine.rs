//! The embedded API: [`Engine`] and the values its operations return.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{ActorId, Automerge, AutomergeError, Change, ChangeHash, ReadDoc};
use serde_json::Value as Json;

use crate::cache::{lock_slot, DocCache, Slot};
use crate::config::EngineConfig;
use crate::doc_id::{self, DocId};
use crate::document::{DocState, Integration};
use crate::error::{Error, Result};
use crate::events::{DocEvent, EventHub, Origin, Subscription};
use crate::held::{
    prefix_fit, Bound, HeldLedger, HeldLimitKind, HeldLimits, Overflow, Plan, Reservation, Source,
    MAX_REPORTED_MISSING,
};
use crate::json;
use crate::layout;
use crate::lineage;
use crate::session::SessionToken;
use crate::store::{Store, Wait};

/// Largest page [`Engine::list`] returns.
pub const MAX_LIST_LIMIT: usize = 1000;

/// The result of a committed local write.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed<O> {
    /// What the transaction function returned.
    pub value: O,
    /// The document's heads after the write.
    pub heads: Vec<ChangeHash>,
    /// Number of new Automerge changes made durable (0 if the write changed
    /// nothing; then nothing was written).
    pub new_changes: usize,
    /// The document at `heads`, as a session token for reads elsewhere
    /// (see [`session`](crate::session)).
    pub session: SessionToken,
}

/// What [`Engine::apply_changes`] did with the changes it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Changes applied and made durable, including earlier held changes that
    /// the input unblocked.
    pub applied: usize,
    /// Changes the document already had (harmless; sync is idempotent).
    pub duplicates: usize,
    /// Changes of the document held (durably) after the call because their
    /// dependencies are missing: this call's and earlier ones still
    /// waiting.
    pub held: usize,
    /// Changes of this call refused, not stored, because holding them would
    /// exceed a held-change limit. Only from a peer's changes (see
    /// [`held`](crate::held)); a client's are refused as a whole with
    /// [`Error::HeldLimit`] instead.
    pub refused: usize,
    /// Dependencies of the document's held changes that nobody has supplied
    /// yet, sorted, at most [`MAX_REPORTED_MISSING`]: ask for them.
    pub missing_deps: Vec<ChangeHash>,
    /// The document's heads afterwards.
    pub heads: Vec<ChangeHash>,
}

/// One page of [`Engine::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Live documents, in id order.
    pub ids: Vec<DocId>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<DocId>,
}

/// Stored facts about a document (also for deleted documents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocInfo {
    /// Current heads.
    pub heads: Vec<ChangeHash>,
    /// Number of changes in its history.
    pub change_count: u64,
    /// SHA-256 over the sorted heads.
    pub digest: [u8; 32],
    /// Whether it is deleted.
    pub deleted: bool,
    /// Changes held for missing dependencies.
    pub held_changes: usize,
}

/// What a document holds back for missing dependencies
/// ([`Engine::held`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldInfo {
    /// Changes held.
    pub changes: usize,
    /// Their bytes.
    pub bytes: usize,
    /// Dependencies they wait for that are neither in the document nor
    /// held, sorted, at most [`MAX_REPORTED_MISSING`].
    pub missing: Vec<ChangeHash>,
    /// How many such dependencies there are in all.
    pub missing_total: usize,
}

/// Engine-wide figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStats {
    /// Documents with a cache entry.
    pub cached_documents: usize,
    /// Estimated bytes of cached documents.
    pub cache_bytes: usize,
    /// The configured cache budget.
    pub cache_budget_bytes: usize,
    /// Documents evicted from the cache so far.
    pub cache_evictions: u64,
    /// WAL fsyncs performed by group commit so far.
    pub wal_syncs: u64,
    /// Changes held (durably) for missing dependencies, in all documents.
    pub held_changes: usize,
    /// Their bytes.
    pub held_bytes: usize,
    /// Documents with held changes.
    pub held_documents: usize,
    /// Changes refused since open because holding them would have exceeded
    /// a held-change limit (a client's refused call counts all its changes).
    /// Refused changes were never stored nor acknowledged; none was dropped.
    pub held_refused: u64,
}

/// Which documents a local write may touch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    /// Only a document that does not exist or is deleted.
    Create,
    /// Only a live document.
    Update,
    /// Any: creates, recreates or updates.
    Upsert,
}

/// An embedded Causeway engine: durable Automerge documents in one RocksDB
/// directory. Cheap to clone; all clones share the same store. `Send + Sync`.
///
/// ```
/// use causeway_engine::{DocId, Engine, EngineConfig};
/// use serde_json::json;
///
/// let dir = tempfile::tempdir()?;
/// let engine = Engine::open(dir.path(), EngineConfig::default())?;
/// let id = DocId::new("carts/42")?;
/// engine.put_json(&id, &json!({"items": ["apple"], "total": 3}))?;
/// engine.merge_json(&id, &json!({"total": 5}))?;
/// assert_eq!(engine.get_json(&id)?, json!({"items": ["apple"], "total": 5}));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
    /// How this handle's writes of received changes wait for durability
    /// (local commits always wait). See [`Engine::deferring`].
    wait: Wait,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    cache: DocCache,
    events: EventHub,
    pub(crate) config: EngineConfig,
    /// Actor for this engine's local changes: fresh on every open (unless
    /// `EngineConfig::actor` names one), so a change lost in a crash can never
    /// have its (actor, seq) reused by another.
    actor: ActorId,
    /// Engine-wide count of held changes and the documents that have some.
    pub(crate) held: HeldLedger,
    held_refused: AtomicU64,
    /// Events of writes made through a deferring handle, published once
    /// [`Engine::sync_deferred`] made them durable (subscribers only ever
    /// see durable changes). At most one replicator call's worth.
    deferred_events: Mutex<Vec<DocEvent>>,
}

impl Engine {
    /// Opens the store in `path`, creating it if the directory is missing or
    /// empty (and `config.create_if_missing`).
    pub fn open(path: impl AsRef<Path>, config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        let store = Store::open(path.as_ref(), &config)?;
        let cache = DocCache::new(config.cache_budget_bytes);
        let held = load_held_ledger(&store)?;
        let totals = held.totals();
        tracing::info!(
            path = %path.as_ref().display(),
            durability = ?config.durability,
            held_changes = totals.changes,
            held_documents = totals.documents,
            "engine opened"
        );
        let actor = config.actor.clone().unwrap_or_else(ActorId::random);
        Ok(Engine {
            inner: Arc::new(Inner {
                store,
                cache,
                events: EventHub::default(),
                config,
                actor,
                held,
                held_refused: AtomicU64::new(0),
                deferred_events: Mutex::new(Vec::new()),
            }),
            wait: Wait::Durable,
        })
    }

    /// A handle on the same engine whose applies of received changes
    /// ([`Engine::apply_changes`], [`Engine::receive_sync_message`]) and
    /// saves of sync state return before their WAL fsync; local commits
    /// through it still wait. [`Engine::sync_deferred`] then makes all of
    /// them durable with one fsync. This lets a replicator apply a burst of
    /// received messages for the price of one fsync, provided nothing derived
    /// from them (an acknowledgement, a relay) leaves the node before the
    /// sync returns. Readers of this engine may see such changes before they
    /// are durable (a crash in between loses them here, never at their
    /// sender); subscribers hear of them only once they are.
    pub(crate) fn deferring(&self) -> Engine {
        Engine {
            inner: Arc::clone(&self.inner),
            wait: Wait::Deferred,
        }
    }

    /// Returns once every write made through a [`Engine::deferring`] handle
    /// so far is as durable as [`EngineConfig::durability`] requires.
    pub(crate) fn sync_deferred(&self) -> Result<()> {
        self.inner.store.sync_deferred()?;
        let events = std::mem::take(&mut *lock_events(&self.inner.deferred_events));
        for event in events {
            let doc = event.doc.clone();
            self.inner.events.publish(&doc, || event);
        }
        Ok(())
    }

    /// How this handle's writes of received changes wait for durability.
    pub(crate) fn wait(&self) -> Wait {
        self.wait
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        self.inner.store.path()
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The actor id of this engine's local changes (new on every open unless
    /// [`EngineConfig::actor`] names one).
    pub fn actor(&self) -> &ActorId {
        &self.inner.actor
    }

    /// Creates `id` with a transaction. Fails with [`Error::AlreadyExists`] if
    /// the document exists and is not deleted.
    pub fn create<O>(
        &self,
        id: &DocId,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<O, AutomergeError>,
    ) -> Result<Committed<O>> {
        self.commit_local(id, WriteMode::Create, None, f)
    }

    /// Runs a transaction on an existing document with the full Automerge
    /// transaction API. Fails with [`Error::NotFound`] or [`Error::Deleted`].
    /// If `f` returns an error the transaction is rolled back.
    pub fn update<O>(
        &self,
        id: &DocId,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<O, AutomergeError>,
    ) -> Result<Committed<O>> {
        self.commit_local(id, WriteMode::Update, None, f)
    }

    /// Runs a transaction, creating the document if needed.
    pub fn upsert<O>(
        &self,
        id: &DocId,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<O, AutomergeError>,
    ) -> Result<Committed<O>> {
        self.commit_local(id, WriteMode::Upsert, None, f)
    }

    /// Makes the document equal to `value` (a JSON object), creating it if
    /// needed. Only the differences are written; see [`json`](crate::json).
    pub fn put_json(&self, id: &DocId, value: &Json) -> Result<Committed<()>> {
        let object = as_object(id, value)?;
        self.commit_local(id, WriteMode::Upsert, None, |tx| json::replace(tx, object))
    }

    /// Applies `patch` as an RFC 7386 JSON Merge Patch, creating the document
    /// if needed.
    pub fn merge_json(&self, id: &DocId, patch: &Json) -> Result<Committed<()>> {
        let object = as_object(id, patch)?;
        self.commit_local(id, WriteMode::Upsert, None, |tx| {
            json::merge_patch(tx, object)
        })
    }

    /// Deletes the document: commits a tombstone change that replicates like
    /// any other change (see [`lineage`](crate::lineage)).
    pub fn delete(&self, id: &DocId) -> Result<Committed<()>> {
        self.commit_local(
            id,
            WriteMode::Update,
            Some(lineage::TOMBSTONE_MESSAGE),
            |tx| {
                let keys: Vec<String> = tx.keys(automerge::ROOT).collect();
                keys.into_iter()
                    .try_for_each(|k| tx.delete(automerge::ROOT, k))
            },
        )
    }

    /// The document as JSON. Fails with [`Error::Deleted`] for deleted documents.
    pub fn get_json(&self, id: &DocId) -> Result<Json> {
        self.read(id, |doc| json::to_json(&doc.hydrate(None)))
    }

    /// The document as JSON as it was at `heads` (also for deleted documents).
    pub fn get_json_at(&self, id: &DocId, heads: &[ChangeHash]) -> Result<Json> {
        self.with_existing(id, |state| {
            require_heads(state, id, heads)?;
            Ok(json::to_json(&state.doc.hydrate(Some(heads))))
        })
    }

    /// Runs `f` on the live document with Automerge's full read API.
    pub fn read<R>(&self, id: &DocId, f: impl FnOnce(&Automerge) -> R) -> Result<R> {
        self.with_existing(id, |state| {
            if state.meta.tombstone {
                return Err(Error::Deleted(id.clone()));
            }
            Ok(f(&state.doc))
        })
    }

    /// The document's current heads (also for deleted documents).
    pub fn heads(&self, id: &DocId) -> Result<Vec<ChangeHash>> {
        self.with_existing(id, |state| Ok(state.doc.get_heads()))
    }

    /// Stored facts about the document (also for deleted documents).
    pub fn info(&self, id: &DocId) -> Result<DocInfo> {
        self.with_existing(id, |state| {
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&state.meta.digest);
            Ok(DocInfo {
                heads: state.meta.heads(),
                change_count: state.meta.change_count,
                digest,
                deleted: state.meta.tombstone,
                held_changes: state.held_len(),
            })
        })
    }

    /// The raw bytes of every change not covered by `heads`, in causal order.
    /// With empty `heads`, the whole history. Fails with
    /// [`Error::UnknownHeads`] if this node does not hold all of `heads`.
    pub fn changes_since(&self, id: &DocId, heads: &[ChangeHash]) -> Result<Vec<Vec<u8>>> {
        self.with_existing(id, |state| {
            require_heads(state, id, heads)?;
            Ok(state
                .doc
                .get_changes(heads)
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect())
        })
    }

    /// Applies changes a client hands over (received from elsewhere, or
    /// made by the caller's own Automerge document): validated (size,
    /// decoding, checksum, lineage) all before any is applied, idempotent,
    /// and durable on return. Changes whose dependencies are missing are
    /// held, durably, and applied as soon as a later call (this one's
    /// caller, a peer, a sync) supplies the dependencies; subscribers then
    /// hear of them as [`Origin::Client`], with their bytes, so a node
    /// publishes them.
    ///
    /// If holding them would exceed a held-change limit
    /// ([`EngineConfig::max_held_changes_per_doc`] and the others), the call
    /// is refused with [`Error::HeldLimit`] and stores nothing: retry later,
    /// or send the missing dependencies too.
    pub fn apply_changes<B: AsRef<[u8]>>(&self, id: &DocId, changes: &[B]) -> Result<ApplyOutcome> {
        let decoded = self.decode_changes(id, changes)?;
        self.with_doc(id, |state| {
            let (outcome, _) =
                self.integrate_decoded(id, state, decoded, Source::Client, Overflow::Refuse)?;
            Ok(outcome)
        })
    }

    /// Applies changes a peer sent, as [`Engine::apply_changes`] but
    /// refusing, one by one, changes that would exceed a held-change limit
    /// (counted in [`ApplyOutcome::refused`]; anti-entropy delivers them
    /// again). Also says for each input change, in order, whether it was new
    /// (applied or held) rather than a duplicate or refused.
    pub(crate) fn apply_peer_changes<B: AsRef<[u8]>>(
        &self,
        id: &DocId,
        changes: &[B],
    ) -> Result<(ApplyOutcome, Vec<bool>)> {
        let decoded = self.decode_changes(id, changes)?;
        self.with_doc(id, |state| {
            self.integrate_decoded(id, state, decoded, Source::Peer, Overflow::Shed)
        })
    }

    /// Integrates a peer's validated, decoded changes into a loaded document
    /// (see [`Engine::apply_peer_changes`]).
    pub(crate) fn apply_decoded(
        &self,
        id: &DocId,
        state: &mut DocState,
        decoded: Vec<Change>,
    ) -> Result<ApplyOutcome> {
        let (outcome, _) =
            self.integrate_decoded(id, state, decoded, Source::Peer, Overflow::Shed)?;
        Ok(outcome)
    }

    /// Integrates validated, decoded changes into a loaded document: applies
    /// what is ready (with the held changes it releases), holds what fits
    /// the limits, persists both in one batch, and tells subscribers. Also
    /// says for each input change whether it was new and kept.
    fn integrate_decoded(
        &self,
        id: &DocId,
        state: &mut DocState,
        decoded: Vec<Change>,
        source: Source,
        overflow: Overflow,
    ) -> Result<(ApplyOutcome, Vec<bool>)> {
        let Integration {
            mut plan,
            duplicates,
            mut new,
        } = state.integrate(id, decoded, source)?;
        let reservation = self.limit_held(id, state, &mut plan, overflow)?;
        if !plan.refused.is_empty() {
            self.inner
                .held_refused
                .fetch_add(plan.refused.len() as u64, Ordering::Relaxed);
            let refused: HashSet<ChangeHash> = plan.refused.iter().map(Change::hash).collect();
            for (hash, fresh) in &mut new {
                *fresh &= !refused.contains(hash);
            }
        }
        let result = self.write_integration(id, state, &plan);
        match &result {
            Ok(()) => self
                .inner
                .held
                .settle(id, reservation, state.held.len(), state.held.bytes()),
            Err(_) => self.inner.held.cancel(reservation),
        }
        result?;
        let mut missing = state.held_missing_deps();
        missing.truncate(MAX_REPORTED_MISSING);
        let outcome = ApplyOutcome {
            applied: plan.ready.len(),
            duplicates,
            held: state.held.len(),
            refused: plan.refused.len(),
            missing_deps: missing,
            heads: state.doc.get_heads(),
        };
        Ok((outcome, new.into_iter().map(|(_, fresh)| fresh).collect()))
    }

    /// Applies a plan's ready changes to the document and writes them, with
    /// its held-change records, in one batch; then tells subscribers. On
    /// error the caller's `with_doc` discards the state, and the next use
    /// reloads the document from the store, which is unchanged.
    fn write_integration(&self, id: &DocId, state: &mut DocState, plan: &Plan) -> Result<()> {
        if plan.ready.is_empty() && plan.hold.is_empty() && plan.released.is_empty() {
            return Ok(());
        }
        let ready: Vec<Change> = plan.ready.iter().map(|r| r.change.clone()).collect();
        if !ready.is_empty() {
            crate::codec::apply(&mut state.doc, ready.iter().cloned()).map_err(|reason| {
                Error::ChangeRejected {
                    doc: id.clone(),
                    reason,
                }
            })?;
            if let Some(c) = ready.iter().find(|c| !state.has_change(&c.hash())) {
                let reason = format!("change {} was not applied", c.hash());
                return Err(Error::ChangeRejected {
                    doc: id.clone(),
                    reason,
                });
            }
        }
        state.persist(
            &self.inner.store,
            id,
            &ready,
            Some(plan),
            &self.inner.config.compaction,
            self.wait,
        )?;
        if ready.is_empty() {
            return Ok(());
        }
        // Changes a client handed over are published by the node once they
        // apply (now, or later when their dependencies arrived). The genesis
        // is not: every replica makes it.
        let from_client: Vec<Vec<u8>> = plan
            .ready
            .iter()
            .filter(|r| r.source == Source::Client && !r.change.deps().is_empty())
            .map(|r| r.change.raw_bytes().to_vec())
            .collect();
        let (origin, changes): (Origin, Arc<[Vec<u8>]>) = if from_client.is_empty() {
            (Origin::Remote, Arc::from([]))
        } else {
            (Origin::Client, Arc::from(from_client))
        };
        match self.wait {
            Wait::Durable => self.publish(id, state, origin, || changes),
            Wait::Deferred => {
                let event = doc_event(id, state, origin, changes);
                lock_events(&self.inner.deferred_events).push(event);
            }
        }
        Ok(())
    }

    /// Applies the held-change limits to `plan`: with [`Overflow::Refuse`]
    /// fails with [`Error::HeldLimit`] if any new change to hold does not
    /// fit; with [`Overflow::Shed`] moves the changes that do not fit (the
    /// last ones) to `plan.refused`. Returns the engine-wide reservation
    /// for what is held.
    fn limit_held(
        &self,
        id: &DocId,
        state: &DocState,
        plan: &mut Plan,
        overflow: Overflow,
    ) -> Result<Reservation> {
        if plan.hold.is_empty() {
            return Ok(Reservation::default());
        }
        let limits = HeldLimits::of(&self.inner.config);
        let freed = (plan.released.len(), plan.released_bytes);
        let kept = (state.held.len() - freed.0, state.held.bytes() - freed.1);
        let sizes: Vec<usize> = plan
            .hold
            .iter()
            .map(|(c, _, _)| c.raw_bytes().len())
            .collect();
        // The longest prefix that fits the document's limits...
        let max = (limits.per_doc_changes, limits.per_doc_bytes);
        let (fit, stop) = prefix_fit(kept, &sizes, max);
        let stop = stop.map(|s| match s {
            Bound::Changes => HeldLimitKind::DocumentChanges,
            Bound::Bytes => HeldLimitKind::DocumentBytes,
        });
        // ...and the engine's.
        let (fit, engine_stop, reservation) =
            self.inner.held.reserve(&sizes[..fit], freed, &limits);
        let stop = engine_stop.or(stop);
        let Some(limit) = stop.filter(|_| fit < plan.hold.len()) else {
            return Ok(reservation);
        };
        if overflow == Overflow::Refuse {
            self.inner.held.cancel(reservation);
            let count = plan.ready.len() + plan.hold.len();
            self.inner
                .held_refused
                .fetch_add(count as u64, Ordering::Relaxed);
            let holding: HashSet<ChangeHash> = plan.hold.iter().map(|(c, _, _)| c.hash()).collect();
            let mut missing: Vec<ChangeHash> = plan
                .hold
                .iter()
                .flat_map(|(_, _, waits)| waits.iter().copied())
                .filter(|d| !holding.contains(d) && !state.held.contains(d))
                .collect();
            missing.sort_unstable();
            missing.dedup();
            let missing_total = missing.len();
            missing.truncate(MAX_REPORTED_MISSING);
            tracing::info!(doc = %id, %limit, changes = count, "refused changes: the held-change limit is reached");
            return Err(Error::HeldLimit {
                doc: id.clone(),
                limit,
                missing,
                missing_total,
                heads: state.doc.get_heads(),
            });
        }
        let refused = plan.hold.split_off(fit);
        plan.refused = refused.into_iter().map(|(c, _, _)| c).collect();
        tracing::debug!(doc = %id, %limit, refused = plan.refused.len(), "refused a peer's changes: the held-change limit is reached");
        Ok(reservation)
    }

    /// What `id` holds back for missing dependencies (nothing if the
    /// document has no held changes, or does not exist at all).
    pub fn held(&self, id: &DocId) -> Result<HeldInfo> {
        if !self.inner.held.has(id) {
            return Ok(HeldInfo::default());
        }
        self.with_doc(id, |state| {
            let mut missing = state.held_missing_deps();
            let missing_total = missing.len();
            missing.truncate(MAX_REPORTED_MISSING);
            Ok(HeldInfo {
                changes: state.held.len(),
                bytes: state.held.bytes(),
                missing,
                missing_total,
            })
        })
    }

    /// Documents with held changes after `after` (exclusive), in id order,
    /// at most `limit`: what the replication core asks its peers to repair.
    pub fn held_documents(&self, after: Option<&DocId>, limit: usize) -> Vec<DocId> {
        self.inner.held.documents(after, limit)
    }

    /// Lists live documents whose id starts with `prefix`, after the id
    /// `after` (exclusive), at most `limit` (capped at [`MAX_LIST_LIMIT`]).
    pub fn list(&self, prefix: &str, after: Option<&DocId>, limit: usize) -> Result<ListPage> {
        doc_id::validate_prefix(prefix)?;
        let limit = limit.clamp(1, MAX_LIST_LIMIT);
        let (ids, more) = self.inner.store.list(prefix, after, limit)?;
        let next = if more { ids.last().cloned() } else { None };
        Ok(ListPage { ids, next })
    }

    /// Subscribes to events for documents whose id starts with `prefix`
    /// (`""` for all).
    pub fn subscribe(&self, prefix: &str) -> Result<Subscription> {
        doc_id::validate_prefix(prefix)?;
        Ok(self
            .inner
            .events
            .subscribe(prefix, self.inner.config.subscriber_capacity))
    }

    /// Engine-wide figures.
    pub fn stats(&self) -> EngineStats {
        let cache = self.inner.cache.stats();
        let held = self.inner.held.totals();
        EngineStats {
            cached_documents: cache.documents,
            cache_bytes: cache.bytes,
            cache_budget_bytes: self.inner.config.cache_budget_bytes,
            cache_evictions: cache.evictions,
            wal_syncs: self.inner.store.wal_syncs(),
            held_changes: held.changes,
            held_bytes: held.bytes,
            held_documents: held.documents,
            held_refused: self.inner.held_refused.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn decode_changes<B: AsRef<[u8]>>(
        &self,
        id: &DocId,
        changes: &[B],
    ) -> Result<Vec<Change>> {
        let limit = self.inner.config.max_change_bytes;
        changes
            .iter()
            .enumerate()
            .map(|(index, bytes)| {
                let bytes = bytes.as_ref();
                if bytes.len() > limit {
                    return Err(Error::ChangeTooLarge {
                        doc: id.clone(),
                        index,
                        size: bytes.len(),
                        limit,
                    });
                }
                let invalid = |reason: String| Error::InvalidChange {
                    doc: id.clone(),
                    index,
                    reason,
                };
                let change = crate::codec::change(bytes.to_vec()).map_err(invalid)?;
                // `Change::from_bytes` does not compare the header checksum
                // (bytes 4..8, after the magic) with the hash of the content,
                // so a change altered in transit would otherwise decode under
                // a new hash.
                if bytes.get(4..8) != Some(&change.hash().0[..4]) {
                    return Err(invalid(
                        "checksum does not match the change's contents".into(),
                    ));
                }
                Ok(change)
            })
            .collect()
    }

    fn commit_local<O>(
        &self,
        id: &DocId,
        mode: WriteMode,
        message: Option<&'static str>,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<O, AutomergeError>,
    ) -> Result<Committed<O>> {
        self.with_doc(id, |state| {
            check_mode(state, id, mode)?;
            // Writing to a deleted document recreates it, even when the write
            // itself changes nothing: an empty change then supersedes the
            // tombstone heads.
            let recreate = mode != WriteMode::Update && state.meta.tombstone;
            let mut new_changes = root_in_genesis(state, id)?;
            let commit_opts = || match message {
                Some(m) => CommitOptions::default().with_message(m),
                None => CommitOptions::default(),
            };
            let success = state
                .doc
                .transact_with(|_| commit_opts(), f)
                .map_err(|failure| Error::Transaction {
                    doc: id.clone(),
                    source: Box::new(failure.error),
                })?;
            let hash = match (success.hash, message) {
                (Some(hash), _) => Some(hash),
                (None, Some(_)) => Some(state.doc.empty_commit(commit_opts())),
                (None, None) if recreate => Some(state.doc.empty_commit(commit_opts())),
                (None, None) => None,
            };
            if let Some(hash) = hash {
                // The change was committed to this document just above.
                #[allow(clippy::expect_used)]
                new_changes.push(
                    state
                        .doc
                        .get_change_by_hash(&hash)
                        .expect("committed change is in the document"),
                );
            }
            if !new_changes.is_empty() {
                state.persist(
                    &self.inner.store,
                    id,
                    &new_changes,
                    None,
                    &self.inner.config.compaction,
                    Wait::Durable,
                )?;
                let bytes = || new_changes.iter().map(|c| c.raw_bytes().to_vec()).collect();
                self.publish(id, state, Origin::Local, bytes);
            }
            let heads = state.doc.get_heads();
            Ok(Committed {
                value: success.result,
                session: SessionToken::for_doc(id, &heads),
                heads,
                new_changes: new_changes.len(),
            })
        })
    }

    /// Tells subscribers of `id` that it changed; `changes` is called only
    /// if someone listens.
    fn publish(
        &self,
        id: &DocId,
        state: &DocState,
        origin: Origin,
        changes: impl FnOnce() -> Arc<[Vec<u8>]>,
    ) {
        self.inner
            .events
            .publish(id, || doc_event(id, state, origin, changes()));
    }

    /// Runs `f` on a document that exists (possibly deleted).
    fn with_existing<R>(
        &self,
        id: &DocId,
        f: impl FnOnce(&mut DocState) -> Result<R>,
    ) -> Result<R> {
        self.with_doc(id, |state| {
            if !state.stored {
                return Err(Error::NotFound(id.clone()));
            }
            f(state)
        })
    }

    /// Runs `f` on the document's in-memory state, loading it if needed. If `f`
    /// fails after the in-memory state diverged from what is stored, the state
    /// is discarded so the next use reloads it from disk.
    pub(crate) fn with_doc<R>(
        &self,
        id: &DocId,
        f: impl FnOnce(&mut DocState) -> Result<R>,
    ) -> Result<R> {
        let inner = &self.inner;
        inner.store.check_alive()?;
        let slot = inner.cache.slot(id);
        let mut guard = lock_slot(&slot);
        if matches!(*guard, Slot::Unloaded) {
            *guard = Slot::Loaded(Box::new(DocState::load(
                &inner.store,
                id,
                inner.actor.clone(),
                inner.held.has(id),
            )?));
        }
        let Slot::Loaded(state) = &mut *guard else {
            unreachable!("slot was loaded above");
        };
        let result = f(state);
        if let Err(e) = &result {
            let diverged = state.doc.get_heads() != state.meta.heads();
            if diverged || matches!(e, Error::ChangeRejected { .. } | Error::Storage(_)) {
                DocCache::invalidate(&mut guard);
            }
        }
        let bytes = match &*guard {
            Slot::Loaded(state) => state.estimated_bytes(),
            Slot::Unloaded => 0,
        };
        drop(guard);
        inner.cache.resize(id, bytes);
        result
    }
}

/// Builds the engine-wide held-change ledger from the store. A key that
/// is not a held-change key is reported and left alone (it holds nothing
/// this engine can apply).
fn load_held_ledger(store: &Store) -> Result<HeldLedger> {
    let ledger = HeldLedger::default();
    let mut docs: std::collections::BTreeMap<DocId, (usize, usize)> = Default::default();
    store.for_each_held(|key, len| {
        let parsed = layout::parse_held_key(key)
            .and_then(|(doc, _)| DocId::new(String::from_utf8_lossy(doc).into_owned()).ok());
        match parsed {
            Some(doc) => {
                let e = docs.entry(doc).or_default();
                e.0 += 1;
                e.1 += len.saturating_sub(1);
            }
            None => tracing::error!(
                key = %layout::describe_key(layout::CF_HELD, key),
                "corrupt held-change key; ignored"
            ),
        }
    })?;
    for (doc, (changes, bytes)) in docs {
        ledger.load(doc, changes, bytes);
    }
    Ok(ledger)
}

/// The event telling subscribers that `id` is now as `state` holds it.
fn doc_event(id: &DocId, state: &DocState, origin: Origin, changes: Arc<[Vec<u8>]>) -> DocEvent {
    DocEvent {
        doc: id.clone(),
        heads: state.doc.get_heads(),
        origin,
        deleted: state.meta.tombstone,
        changes,
    }
}

/// The deferred events, even if a panicking thread poisoned the lock (the
/// list stays valid: pushes and takes are single operations).
fn lock_events(events: &Mutex<Vec<DocEvent>>) -> std::sync::MutexGuard<'_, Vec<DocEvent>> {
    events
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Refuses a write that `mode` does not allow on this document.
fn check_mode(state: &DocState, id: &DocId, mode: WriteMode) -> Result<()> {
    match mode {
        WriteMode::Create if state.is_live() => Err(Error::AlreadyExists(id.clone())),
        WriteMode::Update if !state.stored => Err(Error::NotFound(id.clone())),
        WriteMode::Update if state.meta.tombstone => Err(Error::Deleted(id.clone())),
        _ => Ok(()),
    }
}

/// Applies the genesis change to a document with no history yet; returns it
/// (to be persisted with the write), or nothing if the document has history.
fn root_in_genesis(state: &mut DocState, id: &DocId) -> Result<Vec<Change>> {
    let mut changes = Vec::with_capacity(2);
    if state.doc.get_heads().is_empty() {
        let genesis = lineage::genesis_change(id);
        state
            .doc
            .apply_changes([genesis.clone()])
            .map_err(|e| Error::ChangeRejected {
                doc: id.clone(),
                reason: e.to_string(),
            })?;
        changes.push(genesis);
    }
    Ok(changes)
}

fn as_object<'a>(id: &DocId, value: &'a Json) -> Result<&'a serde_json::Map<String, Json>> {
    value.as_object().ok_or_else(|| Error::NotAnObject {
        doc: id.clone(),
        found: json::type_name(value),
    })
}

fn require_heads(state: &DocState, id: &DocId, heads: &[ChangeHash]) -> Result<()> {
    let missing = state.missing_heads(heads);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::UnknownHeads {
            doc: id.clone(),
            missing,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn deferred_writes_are_heard_of_and_synced_only_by_sync_deferred() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Engine::open(a_dir.path(), EngineConfig::default()).unwrap();
        let b = Engine::open(b_dir.path(), EngineConfig::default()).unwrap();
        let id = DocId::new("deferred/doc").unwrap();
        a.put_json(&id, &json!({"x": 1})).unwrap();
        let changes = a.changes_since(&id, &[]).unwrap();
        let events = b.subscribe("deferred/").unwrap();
        let syncs = b.stats().wal_syncs;

        let (outcome, _) = b.deferring().apply_peer_changes(&id, &changes).unwrap();
        assert_eq!(outcome.applied, changes.len());
        assert_eq!(
            b.stats().wal_syncs,
            syncs,
            "a deferred write waited for an fsync"
        );
        assert!(
            events.try_recv().is_none(),
            "heard of before it was durable"
        );

        b.sync_deferred().unwrap();
        assert_eq!(b.stats().wal_syncs, syncs + 1);
        let event = events.try_recv().unwrap();
        assert_eq!(event.heads, a.heads(&id).unwrap());
        assert_eq!(event.origin, Origin::Remote);
        // Nothing more to sync: no second fsync.
        b.sync_deferred().unwrap();
        assert_eq!(b.stats().wal_syncs, syncs + 1);
    }
}
