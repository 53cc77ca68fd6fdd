//! The embedded API: [`Engine`] and the values its operations return.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{ActorId, Automerge, AutomergeError, Change, ChangeHash, ReadDoc};
use serde_json::Value as Json;

use crate::audit_log::{Actor, AuditLog};
use crate::cache::{lock_slot, DocCache, Slot};
use crate::config::EngineConfig;
use crate::doc_id::{self, DocId};
use crate::document::{DocState, PersistTo};
use crate::error::{Error, Result};
use crate::events::{DocEvent, EventHub, Origin, Origins, Subscription};
use crate::held::{load_held_ledger, HeldBudget, HeldLedger};
use crate::json;
use crate::lineage;
use crate::quarantine::Quarantine;
use crate::store::{Store, Wait};
use crate::token::SessionToken;

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
    /// Of `refused`, the changes refused because the sender's share of held
    /// changes was spent, not because of a limit.
    pub over_budget: usize,
    /// Changes of this call held now (not applied, not refused), and their
    /// bytes.
    pub newly_held: (usize, usize),
    /// Dependencies of the document's held changes that nobody has supplied
    /// yet, sorted, at most [`MAX_REPORTED_MISSING`](crate::MAX_REPORTED_MISSING): ask for them.
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
    /// held, sorted, at most [`MAX_REPORTED_MISSING`](crate::MAX_REPORTED_MISSING).
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
    /// Changes refused since open because they (or a change they depend on)
    /// break a shape limit ([`EngineConfig::shape`]), held changes found to
    /// break one when they were released included (those are discarded).
    pub shape_refused: u64,
    /// Times Automerge panicked on input since the process started (in
    /// every engine of the process): each became an error, and the document
    /// concerned was reloaded from the store.
    pub automerge_panics: u64,
    /// Documents quarantined because their stored data is corrupt (see
    /// [`Engine::quarantined`]).
    pub quarantined_documents: usize,
    /// Subscriptions ([`Engine::subscribe`]) currently open.
    pub subscriptions: usize,
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
    /// What a peer's changes written through this handle may newly hold
    /// (see [`Engine::within_held_budget`]); `None`: only the limits apply.
    pub(crate) held_budget: Option<HeldBudget>,
    /// Who the audit feed says this handle's writes are by (see
    /// [`Engine::acting_as`]).
    pub(crate) actor: Arc<Actor>,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) cache: DocCache,
    events: Arc<EventHub>,
    pub(crate) config: EngineConfig,
    /// Actor for this engine's local changes: fresh on every open (unless
    /// `EngineConfig::actor` names one), so a change lost in a crash can never
    /// have its (actor, seq) reused by another.
    actor: ActorId,
    /// This store's id (see [`Engine::store_id`]).
    store_id: String,
    /// Engine-wide count of held changes and the documents that have some.
    pub(crate) held: HeldLedger,
    pub(crate) held_refused: AtomicU64,
    pub(crate) shape_refused: AtomicU64,
    pub(crate) quarantine: Quarantine,
    /// Set by [`Engine::start_draining`]: local and client writes are
    /// refused.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Set by [`Engine::set_low_disk`]: local and client writes are
    /// refused until it is cleared.
    pub(crate) low_disk: std::sync::atomic::AtomicBool,
    /// Events of writes made through a deferring handle, published once
    /// [`Engine::sync_deferred`] made them durable (subscribers only ever
    /// see durable changes). At most one replicator call's worth.
    pub(crate) deferred_events: Mutex<Vec<DocEvent>>,
    /// The audit feed's numbering.
    pub(crate) audit: AuditLog,
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
        let store_id = store.store_id(|| config.store_id.clone().unwrap_or_else(random_uuid))?;
        let audit = AuditLog::open(&store, config.audit_max_entries)?;
        Ok(Engine {
            inner: Arc::new(Inner {
                store,
                cache,
                events: Arc::default(),
                config,
                actor,
                store_id,
                held,
                held_refused: AtomicU64::new(0),
                shape_refused: AtomicU64::new(0),
                quarantine: Quarantine::default(),
                draining: std::sync::atomic::AtomicBool::new(false),
                low_disk: std::sync::atomic::AtomicBool::new(false),
                deferred_events: Mutex::new(Vec::new()),
                audit,
            }),
            wait: Wait::Durable,
            held_budget: None,
            actor: Arc::new(Actor::Local),
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
            held_budget: self.held_budget,
            actor: Arc::clone(&self.actor),
        }
    }

    /// This handle, with a peer's changes written through it holding at
    /// most `budget` new changes per call (the rest are refused and counted
    /// in [`ApplyOutcome::over_budget`]).
    pub(crate) fn within_held_budget(&self, budget: HeldBudget) -> Engine {
        Engine {
            inner: Arc::clone(&self.inner),
            wait: self.wait,
            held_budget: Some(budget),
            actor: Arc::clone(&self.actor),
        }
    }

    /// Returns once every write made through a [`Engine::deferring`] handle
    /// so far is as durable as [`EngineConfig::durability`] requires.
    pub(crate) fn sync_deferred(&self) -> Result<()> {
        self.inner.store.sync_deferred()?;
        self.inner.audit.settle_deferred();
        let events = std::mem::take(&mut *lock_events(&self.inner.deferred_events));
        for event in events {
            let doc = event.doc.clone();
            self.inner.events.publish(&doc, event.origin, || event);
        }
        Ok(())
    }

    /// Where this handle's writes go, waiting as `wait` says.
    pub(crate) fn persist_to(&self, wait: Wait) -> PersistTo<'_> {
        PersistTo {
            store: &self.inner.store,
            policy: &self.inner.config.compaction,
            wait,
            audit: &self.inner.audit,
            actor: &self.actor,
        }
    }

    /// How this handle's writes of received changes wait for durability.
    pub(crate) fn wait(&self) -> Wait {
        self.wait
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        self.inner.store.path()
    }

    /// Compacts the whole store now, reclaiming the space of deleted
    /// records (RocksDB does so in the background too, later): for
    /// measurements, and after deleting or collecting many documents.
    pub fn compact(&self) -> Result<()> {
        self.inner.store.compact_all()
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

    /// This store's id: a UUID v4 made when the store was first opened by a
    /// version that has one, and kept in it. It names the store, not the
    /// node or its process: it survives restarts, and a copy of the
    /// directory has the same id until it is restored
    /// ([`backup::renew`](crate::backup::renew) gives it a new one). It is
    /// the store's incarnation: nodes announce it in their hello, and a
    /// peer that sees it change forgets what the node reported before.
    /// automerge-repo clients key what they know a server holds by it
    /// (their `storageId`).
    pub fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    /// From now on, refuses every write this engine's own users make
    /// (transactions, JSON writes, deletes, [`Engine::apply_changes`], and
    /// client sync messages that carry changes) with [`Error::Draining`],
    /// for the rest of this open; reads, and changes from peers, go on. A
    /// node calls it before it hands everything it holds to its peers and
    /// stops.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Engine::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Refuses (`true`) or accepts again (`false`) the writes
    /// [`Engine::start_draining`] refuses, with [`Error::LowDisk`]: for a
    /// caller that watches the free space of the store's disk and stops
    /// local writes before it runs out (a full disk stops the engine,
    /// invariant 7). Reads and changes from peers go on.
    pub fn set_low_disk(&self, low: bool) {
        self.inner.low_disk.store(low, Ordering::SeqCst);
    }

    /// Whether writes are refused for low disk space.
    pub fn is_low_disk(&self) -> bool {
        self.inner.low_disk.load(Ordering::SeqCst)
    }

    /// Fails with [`Error::Draining`] or [`Error::LowDisk`] if local and
    /// client writes are refused.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.is_draining() {
            return Err(Error::Draining);
        }
        if self.is_low_disk() {
            return Err(Error::LowDisk);
        }
        Ok(())
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
        let object = self.writable_json(id, value)?;
        self.commit_local(id, WriteMode::Upsert, None, |tx| json::replace(tx, object))
    }

    /// Applies `patch` as an RFC 7386 JSON Merge Patch, creating the document
    /// if needed.
    pub fn merge_json(&self, id: &DocId, patch: &Json) -> Result<Committed<()>> {
        let object = self.writable_json(id, patch)?;
        self.commit_local(id, WriteMode::Upsert, None, |tx| {
            json::merge_patch(tx, object)
        })
    }

    /// Deletes the document: commits a tombstone change that replicates like
    /// any other change (see [`lineage`](crate::lineage)). The change
    /// carries this machine's clock, from which garbage collection counts
    /// its grace period (see [`collection`](crate::collection)).
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

    /// The document as JSON. Fails with [`Error::Deleted`] for deleted
    /// documents, and with [`Error::ShapeLimit`] for a document stored
    /// nesting deeper than [`ShapeLimits::max_depth`](crate::ShapeLimits).
    pub fn get_json(&self, id: &DocId) -> Result<Json> {
        self.with_existing(id, |state| {
            if state.meta.tombstone {
                return Err(Error::Deleted(id.clone()));
            }
            self.render(id, &state.doc, None)
        })
    }

    /// The document as JSON as it was at `heads` (also for deleted
    /// documents); refused like [`Engine::get_json`] when too deep.
    pub fn get_json_at(&self, id: &DocId, heads: &[ChangeHash]) -> Result<Json> {
        self.with_existing(id, |state| {
            require_heads(state, id, heads)?;
            self.render(id, &state.doc, Some(heads))
        })
    }

    /// Renders a document as JSON within the depth limit, with Automerge's
    /// reads behind the panic guard.
    fn render(&self, id: &DocId, doc: &Automerge, heads: Option<&[ChangeHash]>) -> Result<Json> {
        let limit = self.inner.config.shape.max_depth;
        match crate::guarded::catch(|| json::render(doc, heads, limit)) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(violation)) => Err(Error::ShapeLimit {
                doc: id.clone(),
                change: None,
                violation,
            }),
            Err(()) => Err(Error::ChangeRejected {
                doc: id.clone(),
                reason: "Automerge failed reading the document".into(),
            }),
        }
    }

    /// `value` as the root object of a write, if it is one and nests no
    /// deeper than the depth limit (measured without recursion, so that
    /// writing it cannot exhaust the stack).
    fn writable_json<'a>(
        &self,
        id: &DocId,
        value: &'a Json,
    ) -> Result<&'a serde_json::Map<String, Json>> {
        let object = as_object(id, value)?;
        let limit = self.inner.config.shape.max_depth;
        let depth = crate::shape::json_depth(value);
        if depth > limit {
            return Err(Error::ShapeLimit {
                doc: id.clone(),
                change: None,
                violation: crate::shape::ShapeViolation::Depth { depth, limit },
            });
        }
        Ok(object)
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

    /// The document's current heads (also for deleted documents, and for
    /// collected ones: the heads of their tombstone, see
    /// [`collection`](crate::collection)).
    pub fn heads(&self, id: &DocId) -> Result<Vec<ChangeHash>> {
        match self.with_existing(id, |state| Ok(state.doc.get_heads())) {
            Err(Error::Deleted(_)) => self
                .collected(id)?
                .ok_or_else(|| Error::Deleted(id.clone())),
            other => other,
        }
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

    /// The raw bytes of every change of a live document, in causal order,
    /// to hand its whole history to a peer that holds none of it; `None`
    /// for a deleted one (the peer may hold its collected marker, which
    /// only a sync answers without taking the history back).
    pub(crate) fn whole_history(&self, id: &DocId) -> Result<Option<Vec<Vec<u8>>>> {
        self.with_existing(id, |state| {
            if state.meta.tombstone {
                return Ok(None);
            }
            let changes = state.doc.get_changes(&[]);
            Ok(Some(
                changes.iter().map(|c| c.raw_bytes().to_vec()).collect(),
            ))
        })
    }

    /// Lists live documents whose id starts with `prefix`, after the id
    /// `after` (exclusive), at most `limit` (capped at [`MAX_LIST_LIMIT`]).
    pub fn list(&self, prefix: &str, after: Option<&DocId>, limit: usize) -> Result<ListPage> {
        doc_id::validate_prefix(prefix)?;
        let limit = limit.clamp(1, MAX_LIST_LIMIT);
        let quarantine = &self.inner.quarantine;
        let (ids, more) = self.inner.store.list(prefix, after, limit, |e| {
            quarantine.admit(e);
        })?;
        let next = if more { ids.last().cloned() } else { None };
        Ok(ListPage { ids, next })
    }

    /// Subscribes to events for documents whose id starts with `prefix`
    /// (`""` for all).
    pub fn subscribe(&self, prefix: &str) -> Result<Subscription> {
        doc_id::validate_prefix(prefix)?;
        Ok(self.inner.events.subscribe(
            prefix,
            Origins::All,
            self.inner.config.subscriber_capacity,
            None,
        ))
    }

    /// Like [`Engine::subscribe`], for events of `origins` only, with a
    /// queue of `capacity` events, and `wake` called on the committing
    /// thread after each event is queued (or dropped for lack of room): for
    /// a consumer in an async task, which waits on a notification and then
    /// drains the subscription with [`Subscription::try_recv`] instead of
    /// blocking a thread on [`Subscription::recv`]. `wake` must not block.
    pub fn subscribe_waking(
        &self,
        prefix: &str,
        origins: Origins,
        capacity: NonZeroUsize,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Result<Subscription> {
        doc_id::validate_prefix(prefix)?;
        Ok(self
            .inner
            .events
            .subscribe(prefix, origins, capacity.get(), Some(Arc::new(wake))))
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
            shape_refused: self.inner.shape_refused.load(Ordering::Relaxed),
            automerge_panics: crate::guarded::panics(),
            quarantined_documents: self.inner.quarantine.len(),
            subscriptions: self.inner.events.len(),
        }
    }

    fn commit_local<O>(
        &self,
        id: &DocId,
        mode: WriteMode,
        message: Option<&'static str>,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<O, AutomergeError>,
    ) -> Result<Committed<O>> {
        self.check_writable()?;
        self.with_doc(id, |state| {
            check_mode(state, id, mode)?;
            // Writing to a deleted document recreates it, even when the write
            // itself changes nothing: an empty change then supersedes the
            // tombstone heads.
            let recreate = mode != WriteMode::Update && state.meta.tombstone;
            let mut new_changes = root_in_genesis(state, id)?;
            let commit_opts = || match message {
                Some(m) => CommitOptions::default()
                    .with_message(m)
                    .with_time(unix_secs()),
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
            // Peers refuse what breaks their shape limits, so this node must
            // not make it either. The document diverged from the store, so
            // `with_doc` discards it on this error.
            let stored = state.meta.snapshot_bytes + state.meta.log_bytes;
            let limits = &self.inner.config.shape;
            let found = crate::shape::violations(&state.doc, stored, &new_changes, limits);
            if let Some((hash, violation)) = found.first().copied() {
                self.inner.shape_refused.fetch_add(1, Ordering::Relaxed);
                return Err(Error::ShapeLimit {
                    doc: id.clone(),
                    change: Some(hash),
                    violation,
                });
            }
            if !new_changes.is_empty() {
                state.persist(&self.persist_to(Wait::Durable), id, &new_changes, None)?;
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
    pub(crate) fn publish(
        &self,
        id: &DocId,
        state: &DocState,
        origin: Origin,
        changes: impl FnOnce() -> Arc<[Vec<u8>]>,
    ) {
        self.inner
            .events
            .publish(id, origin, || doc_event(id, state, origin, changes()));
    }

    /// Runs `f` on a document that exists (possibly deleted). A collected
    /// document is [`Error::Deleted`] without `f` running.
    pub(crate) fn with_existing<R>(
        &self,
        id: &DocId,
        f: impl FnOnce(&mut DocState) -> Result<R>,
    ) -> Result<R> {
        // A document neither cached nor stored is answered without loading
        // anything: looking up made-up ids (a peer's acknowledgements, say)
        // must not fill the cache with empty documents. A record that does
        // not decode is left to the load below, which quarantines it.
        let inner = &self.inner;
        inner.store.check_alive()?;
        if inner.quarantine.get(id.as_str()).is_none()
            && !inner.cache.contains(id)
            && matches!(inner.store.meta(id), Ok(None))
        {
            return Err(Error::NotFound(id.clone()));
        }
        self.with_doc(id, |state| {
            if state.collected.is_some() {
                // Only its marker is left: deleted, without history.
                return Err(Error::Deleted(id.clone()));
            }
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
        if let Some(q) = inner.quarantine.get(id.as_str()) {
            return Err(q.error());
        }
        let slot = inner.cache.slot(id);
        let mut guard = lock_slot(&slot);
        if matches!(*guard, Slot::Unloaded) {
            let loaded = DocState::load(&inner.store, id, inner.actor.clone(), inner.held.has(id))
                .map_err(|e| inner.quarantine.admit(e))?;
            *guard = Slot::Loaded(Box::new(loaded));
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

/// The event telling subscribers that `id` is now as `state` holds it.
pub(crate) fn doc_event(
    id: &DocId,
    state: &DocState,
    origin: Origin,
    changes: Arc<[Vec<u8>]>,
) -> DocEvent {
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
pub(crate) fn lock_events(
    events: &Mutex<Vec<DocEvent>>,
) -> std::sync::MutexGuard<'_, Vec<DocEvent>> {
    events
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Refuses a write that `mode` does not allow on this document.
fn check_mode(state: &DocState, id: &DocId, mode: WriteMode) -> Result<()> {
    match mode {
        WriteMode::Create if state.is_live() => Err(Error::AlreadyExists(id.clone())),
        WriteMode::Update if state.collected.is_some() => Err(Error::Deleted(id.clone())),
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

/// This machine's clock, in seconds since the Unix epoch (0 if it is set
/// before it).
fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A random UUID v4 in its hyphenated form.
pub(crate) fn random_uuid() -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(ActorId::random().to_bytes());
    crate::layout::store_id_from(b)
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

        let outcome = b
            .deferring()
            .apply_peer_changes(&id, &changes)
            .unwrap()
            .outcome;
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
