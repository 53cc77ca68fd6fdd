//! Changes held for missing dependencies: accepted, durable, and applied as
//! soon as what they depend on arrives.
//!
//! A change whose dependencies are not (yet) in the document cannot be
//! applied, but it was accepted: a client was answered 200, or a peer's
//! message was taken. So it is written to the `held` column family in the
//! same WriteBatch as everything else the call did, before the call returns,
//! and stays there until a later call (or the same one) supplies its
//! dependencies; then the batch that applies it deletes it. Held changes
//! survive restarts and cache evictions: a document loads its held changes
//! with its history.
//!
//! Limits are refusals, never drops. [`HeldLimits`] bound the held changes
//! per document and per engine, by count and by bytes. A client's changes
//! that would exceed a limit are refused as a whole
//! ([`Error::HeldLimit`](crate::Error::HeldLimit)), so the client can retry
//! or send the dependencies; a peer's are refused one by one (what fits is
//! kept) and left to anti-entropy. What was accepted is never dropped.
//!
//! [`Held`] is one document's set, in memory while the document is cached,
//! with a dependency index so that an arriving change releases exactly the
//! held changes waiting for it, at a cost proportional to what it releases.
//! [`HeldLedger`] is the engine-wide count behind the per-engine limits and
//! the list of documents with held changes (which the replication core asks
//! its peers to repair).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use automerge::{Change, ChangeHash};

use crate::config::EngineConfig;
use crate::doc_id::DocId;
use crate::error::{HeldLimitKind, Result};
use crate::layout;
use crate::store::Store;

/// Missing dependencies named in one refusal or one report, at most. The
/// count of all of them is given beside the list.
pub const MAX_REPORTED_MISSING: usize = 256;

/// Who handed a held change over; decides who publishes it once it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A client of this engine ([`Engine::apply_changes`](crate::Engine)):
    /// no peer has it from us yet, so it is published once it applies.
    Client,
    /// A peer, which holds it and replicates it itself.
    Peer,
}

impl Source {
    /// The tag byte in front of a stored held change.
    pub(crate) fn tag(self) -> u8 {
        match self {
            Source::Client => 1,
            Source::Peer => 2,
        }
    }

    /// The source a tag byte names.
    pub(crate) fn from_tag(tag: u8) -> Option<Source> {
        match tag {
            1 => Some(Source::Client),
            2 => Some(Source::Peer),
            _ => None,
        }
    }
}

/// What to do with changes that would take held changes over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// Refuse the whole call, storing nothing from it (clients).
    Refuse,
    /// Keep, in input order, the changes that fit; refuse the rest one by
    /// one (peers, whose refused changes anti-entropy delivers again).
    Shed,
}

/// How many more changes, and bytes of them, one call may newly hold for
/// the peer that sent them: what is left of that peer's share (see
/// [`ReplicatorConfig::max_held_changes_per_peer`](crate::replication::ReplicatorConfig)).
/// Changes beyond it are refused like those beyond a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldBudget {
    pub(crate) changes: usize,
    pub(crate) bytes: usize,
}

/// One held change.
struct Entry {
    change: Change,
    source: Source,
    /// Dependencies not in the document yet (held or missing).
    blockers: usize,
}

/// One document's held changes, with the index of what each waits for.
#[derive(Default)]
pub(crate) struct Held {
    entries: HashMap<ChangeHash, Entry>,
    /// For each dependency not in the document, the held changes waiting
    /// for it, in the order they were held.
    waiting: HashMap<ChangeHash, Vec<ChangeHash>>,
    /// Held changes whose dependencies were all present when they were
    /// loaded. This engine never stores such a record (the batch that
    /// applies a dependency deletes the held records it releases), but a
    /// store edited by other means could hold one: the next integration
    /// applies it rather than let it wait for ever.
    unblocked: Vec<ChangeHash>,
    bytes: usize,
}

/// A change ready to apply, with where it came from.
pub(crate) struct Ready {
    pub(crate) change: Change,
    pub(crate) source: Source,
}

/// What integrating new changes into a document will do; computed without
/// changing anything, then written in one batch and committed to [`Held`]
/// with [`Held::commit`].
#[derive(Default)]
pub(crate) struct Plan {
    /// Changes to apply now, in causal order: new ones and the held ones
    /// they release.
    pub(crate) ready: Vec<Ready>,
    /// Held changes among `ready` (their records are deleted).
    pub(crate) released: Vec<ChangeHash>,
    /// Bytes of the `released` changes.
    pub(crate) released_bytes: usize,
    /// New changes to hold, each with the dependencies it still waits for.
    pub(crate) hold: Vec<(Change, Source, Vec<ChangeHash>)>,
    /// New changes refused because a limit was reached.
    pub(crate) refused: Vec<Change>,
}

/// Where a change of the pending set comes from during planning.
#[derive(Clone, Copy)]
enum Node {
    Fresh(usize),
    Held(ChangeHash),
}

impl Held {
    /// Rebuilds a document's set from its stored records, with `has` telling
    /// which hashes the document holds.
    pub(crate) fn from_stored(
        stored: Vec<(Change, Source)>,
        has: impl Fn(&ChangeHash) -> bool,
    ) -> Held {
        let mut held = Held::default();
        let hashes: HashSet<ChangeHash> = stored.iter().map(|(c, _)| c.hash()).collect();
        for (change, source) in stored {
            let hash = change.hash();
            let mut blockers = 0;
            for dep in change.deps() {
                if hashes.contains(dep) || !has(dep) {
                    blockers += 1;
                    held.waiting.entry(*dep).or_default().push(hash);
                }
            }
            if blockers == 0 {
                held.unblocked.push(hash);
            }
            held.bytes += change.raw_bytes().len();
            held.entries.insert(
                hash,
                Entry {
                    change,
                    source,
                    blockers,
                },
            );
        }
        held
    }

    /// Number of held changes.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of held changes.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `hash` is held.
    pub(crate) fn contains(&self, hash: &ChangeHash) -> bool {
        self.entries.contains_key(hash)
    }

    /// Dependencies of held changes that are neither in the document nor
    /// held themselves, sorted: what must arrive before they can apply.
    pub(crate) fn missing(&self) -> Vec<ChangeHash> {
        let mut missing: Vec<ChangeHash> = self
            .waiting
            .keys()
            .filter(|d| !self.entries.contains_key(d))
            .copied()
            .collect();
        missing.sort_unstable();
        missing
    }

    /// Plans the integration of `fresh` (new to the document and to this
    /// set, decoded, deduplicated) from `source`: which changes apply now,
    /// in causal order, including the held changes they release, and which
    /// are to be held. `has` tells which hashes the document holds. Limits
    /// are applied by the caller.
    pub(crate) fn plan(
        &self,
        fresh: Vec<Change>,
        source: Source,
        has: impl Fn(&ChangeHash) -> bool,
    ) -> Plan {
        let index: HashMap<ChangeHash, usize> = fresh
            .iter()
            .enumerate()
            .map(|(i, c)| (c.hash(), i))
            .collect();
        let mut blockers = vec![0usize; fresh.len()];
        // Fresh changes waiting for a fresh or held change (by hash).
        let mut dependents: HashMap<ChangeHash, Vec<usize>> = HashMap::new();
        let mut queue: VecDeque<Node> = self.unblocked.iter().map(|h| Node::Held(*h)).collect();
        for (i, change) in fresh.iter().enumerate() {
            for dep in change.deps() {
                if index.contains_key(dep) || self.entries.contains_key(dep) || !has(dep) {
                    blockers[i] += 1;
                    dependents.entry(*dep).or_default().push(i);
                }
            }
            if blockers[i] == 0 {
                queue.push_back(Node::Fresh(i));
            }
        }
        // Held changes' blockers as they fall during this plan.
        let mut held_blockers: HashMap<ChangeHash, usize> = HashMap::new();
        let mut slots: Vec<Option<Change>> = fresh.into_iter().map(Some).collect();
        let mut released = HashSet::new();
        let mut plan = Plan::default();
        while let Some(node) = queue.pop_front() {
            let (change, from) = match node {
                Node::Fresh(i) => match slots[i].take() {
                    Some(c) => (c, source),
                    None => continue,
                },
                Node::Held(h) => match self.entries.get(&h) {
                    Some(e) if released.insert(h) => {
                        plan.released.push(h);
                        plan.released_bytes += e.change.raw_bytes().len();
                        (e.change.clone(), e.source)
                    }
                    _ => continue,
                },
            };
            let hash = change.hash();
            for &k in dependents.get(&hash).into_iter().flatten() {
                blockers[k] -= 1;
                if blockers[k] == 0 {
                    queue.push_back(Node::Fresh(k));
                }
            }
            for h in self.waiting.get(&hash).into_iter().flatten() {
                let left = held_blockers
                    .entry(*h)
                    .or_insert_with(|| self.entries.get(h).map_or(0, |e| e.blockers));
                *left = left.saturating_sub(1);
                if *left == 0 {
                    queue.push_back(Node::Held(*h));
                }
            }
            plan.ready.push(Ready {
                change,
                source: from,
            });
        }
        let applied: HashSet<ChangeHash> = plan.ready.iter().map(|r| r.change.hash()).collect();
        for change in slots.into_iter().flatten() {
            let waits: Vec<ChangeHash> = change
                .deps()
                .iter()
                .filter(|d| !applied.contains(d))
                .filter(|d| index.contains_key(d) || self.entries.contains_key(d) || !has(d))
                .copied()
                .collect();
            plan.hold.push((change, source, waits));
        }
        plan
    }

    /// Records a plan whose batch was written: released changes leave the
    /// set, the dependencies that were applied stop being waited for, and
    /// the new held changes join.
    pub(crate) fn commit(&mut self, plan: &Plan) {
        let applied: HashSet<ChangeHash> = plan.ready.iter().map(|r| r.change.hash()).collect();
        for hash in &plan.released {
            if let Some(e) = self.entries.remove(hash) {
                self.bytes -= e.change.raw_bytes().len();
            }
        }
        self.unblocked.retain(|h| self.entries.contains_key(h));
        for hash in &applied {
            for h in self.waiting.remove(hash).into_iter().flatten() {
                if let Some(e) = self.entries.get_mut(&h) {
                    e.blockers = e.blockers.saturating_sub(1);
                }
            }
        }
        for (change, source, waits) in &plan.hold {
            let hash = change.hash();
            for dep in waits {
                self.waiting.entry(*dep).or_default().push(hash);
            }
            self.bytes += change.raw_bytes().len();
            self.entries.insert(
                hash,
                Entry {
                    change: change.clone(),
                    source: *source,
                    blockers: waits.len(),
                },
            );
        }
    }
}

/// Which of a pair of limits stopped a [`prefix_fit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    /// The count.
    Changes,
    /// The bytes.
    Bytes,
}

/// How many of `sizes` (bytes of new held changes, in order) fit, as a
/// prefix, on top of `used` (changes, bytes) under `max` (changes, bytes),
/// and which limit stopped the rest.
pub(crate) fn prefix_fit(
    used: (usize, usize),
    sizes: &[usize],
    max: (usize, usize),
) -> (usize, Option<Bound>) {
    let mut bytes = used.1;
    for (i, &size) in sizes.iter().enumerate() {
        if used.0 + i + 1 > max.0 {
            return (i, Some(Bound::Changes));
        }
        if bytes + size > max.1 {
            return (i, Some(Bound::Bytes));
        }
        bytes += size;
    }
    (sizes.len(), None)
}

/// The engine-wide limits on held changes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeldLimits {
    pub(crate) per_doc_changes: usize,
    pub(crate) per_doc_bytes: usize,
    pub(crate) changes: usize,
    pub(crate) bytes: usize,
}

impl HeldLimits {
    pub(crate) fn of(config: &EngineConfig) -> Self {
        HeldLimits {
            per_doc_changes: config.max_held_changes_per_doc,
            per_doc_bytes: config.max_held_bytes_per_doc,
            changes: config.max_held_changes,
            bytes: config.max_held_bytes,
        }
    }
}

/// Engine-wide held figures (see [`EngineStats`](crate::EngineStats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HeldTotals {
    pub(crate) changes: usize,
    pub(crate) bytes: usize,
    pub(crate) documents: usize,
}

#[derive(Default)]
struct LedgerInner {
    /// Held changes and bytes per document, for documents with any.
    docs: BTreeMap<DocId, (usize, usize)>,
    changes: usize,
    bytes: usize,
    /// Changes and bytes reserved by integrations whose batch is being
    /// written.
    reserved: (usize, usize),
}

/// The engine-wide count of held changes: the per-engine limits, and which
/// documents hold changes.
#[derive(Default)]
pub(crate) struct HeldLedger {
    inner: Mutex<LedgerInner>,
}

/// What a reservation holds; give it back with [`HeldLedger::settle`] or
/// [`HeldLedger::cancel`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reservation {
    changes: usize,
    bytes: usize,
}

impl HeldLedger {
    /// Records a document's stored held changes (at open).
    pub(crate) fn load(&self, doc: DocId, changes: usize, bytes: usize) {
        let mut inner = self.lock();
        let e = inner.docs.entry(doc).or_default();
        e.0 += changes;
        e.1 += bytes;
        inner.changes += changes;
        inner.bytes += bytes;
    }

    /// Reserves engine-wide room for the longest prefix of `sizes` (bytes
    /// of each new held change, in order) that fits under the limits, once
    /// `freed` changes of `freed_bytes` bytes leave. Returns how many fit,
    /// the limit that stopped the rest (if any) and the reservation.
    pub(crate) fn reserve(
        &self,
        sizes: &[usize],
        freed: (usize, usize),
        limits: &HeldLimits,
    ) -> (usize, Option<HeldLimitKind>, Reservation) {
        let mut inner = self.lock();
        let used = (
            (inner.changes + inner.reserved.0).saturating_sub(freed.0),
            (inner.bytes + inner.reserved.1).saturating_sub(freed.1),
        );
        let (fit, stop) = prefix_fit(used, sizes, (limits.changes, limits.bytes));
        let stop = stop.map(|s| match s {
            Bound::Changes => HeldLimitKind::EngineChanges,
            Bound::Bytes => HeldLimitKind::EngineBytes,
        });
        let r = Reservation {
            changes: fit,
            bytes: sizes[..fit].iter().sum(),
        };
        inner.reserved.0 += r.changes;
        inner.reserved.1 += r.bytes;
        (r.changes, stop, r)
    }

    /// Gives back a reservation whose batch was not written.
    pub(crate) fn cancel(&self, r: Reservation) {
        let mut inner = self.lock();
        inner.reserved.0 -= r.changes;
        inner.reserved.1 -= r.bytes;
    }

    /// A batch was written: `doc` now holds `changes` changes of `bytes`
    /// bytes; the reservation becomes part of the totals.
    pub(crate) fn settle(&self, doc: &DocId, r: Reservation, changes: usize, bytes: usize) {
        let mut inner = self.lock();
        inner.reserved.0 -= r.changes;
        inner.reserved.1 -= r.bytes;
        let (old_changes, old_bytes) = inner.docs.get(doc).copied().unwrap_or_default();
        inner.changes = inner.changes - old_changes + changes;
        inner.bytes = inner.bytes - old_bytes + bytes;
        if changes == 0 {
            inner.docs.remove(doc);
        } else {
            inner.docs.insert(doc.clone(), (changes, bytes));
        }
    }

    /// Whether `doc` has held changes on disk.
    pub(crate) fn has(&self, doc: &DocId) -> bool {
        self.lock().docs.contains_key(doc)
    }

    /// Documents with held changes after `after` (exclusive), in id order,
    /// at most `limit`.
    pub(crate) fn documents(&self, after: Option<&DocId>, limit: usize) -> Vec<DocId> {
        let inner = self.lock();
        let range = match after {
            Some(a) => inner
                .docs
                .range::<DocId, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => inner.docs.range::<DocId, _>(..),
        };
        range.take(limit).map(|(d, _)| d.clone()).collect()
    }

    /// The totals.
    pub(crate) fn totals(&self) -> HeldTotals {
        let inner = self.lock();
        HeldTotals {
            changes: inner.changes,
            bytes: inner.bytes,
            documents: inner.docs.len(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LedgerInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Builds the engine-wide held-change ledger from the store. A key that
/// is not a held-change key is reported and left alone (it holds nothing
/// this engine can apply).
pub(crate) fn load_held_ledger(store: &Store) -> Result<HeldLedger> {
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
