//! Changes received from clients and peers, through the engine: decoded and
//! validated (size, checksum, lineage) before anything is applied, then
//! applied at once or held for their dependencies (see [`held`](crate::held)),
//! in one durable WriteBatch per call, and refused at a held-change limit:
//! a client's call as a whole, a peer's changes one by one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use automerge::{Change, ChangeHash};

use crate::doc_id::DocId;
use crate::document::{DocState, Integration};
use crate::engine::{doc_event, lock_events, ApplyOutcome, Engine, HeldInfo};
use crate::error::{Error, HeldLimitKind, Result};
use crate::events::Origin;
use crate::held::{
    prefix_fit, Bound, HeldLimits, Overflow, Plan, Reservation, Source, MAX_REPORTED_MISSING,
};
use crate::shape::{self, ShapeViolation};
use crate::store::Wait;

/// What applying a peer's changes did, overall and to each input change.
pub(crate) struct PeerApplied {
    /// The call's outcome.
    pub(crate) outcome: ApplyOutcome,
    /// For each input change, in order: new here (applied or held) rather
    /// than a duplicate or refused.
    pub(crate) new: Vec<bool>,
    /// For each input change, in order: held now for missing dependencies.
    pub(crate) held: Vec<bool>,
}

impl Engine {
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
    /// ([`EngineConfig::max_held_changes_per_doc`](crate::EngineConfig::max_held_changes_per_doc) and the others), the call
    /// is refused with [`Error::HeldLimit`] and stores nothing: retry later,
    /// or send the missing dependencies too.
    pub fn apply_changes<B: AsRef<[u8]>>(&self, id: &DocId, changes: &[B]) -> Result<ApplyOutcome> {
        self.check_writable()?;
        let decoded = self.decode_changes(id, changes)?;
        self.with_doc(id, |state| {
            let applied =
                self.integrate_decoded(id, state, decoded, Source::Client, Overflow::Refuse)?;
            Ok(applied.outcome)
        })
    }

    /// Applies changes a peer sent, as [`Engine::apply_changes`] but
    /// refusing, one by one, changes that would exceed a held-change limit
    /// (counted in [`ApplyOutcome::refused`]; anti-entropy delivers them
    /// again). Also says for each input change, in order, whether it was new
    /// (applied or held) rather than a duplicate or refused, and whether it
    /// is held now.
    pub(crate) fn apply_peer_changes<B: AsRef<[u8]>>(
        &self,
        id: &DocId,
        changes: &[B],
    ) -> Result<PeerApplied> {
        let decoded = self.decode_changes(id, changes)?;
        self.with_doc(id, |state| {
            self.integrate_decoded(id, state, decoded, Source::Peer, Overflow::Shed)
        })
    }

    /// Integrates validated, decoded changes from `source` into a loaded
    /// document: a client's as [`Engine::apply_changes`] (refused whole at a
    /// held-change limit), a peer's as [`Engine::apply_peer_changes`].
    pub(crate) fn apply_decoded(
        &self,
        id: &DocId,
        state: &mut DocState,
        decoded: Vec<Change>,
        source: Source,
    ) -> Result<ApplyOutcome> {
        let overflow = match source {
            Source::Client => Overflow::Refuse,
            Source::Peer => Overflow::Shed,
        };
        let applied = self.integrate_decoded(id, state, decoded, source, overflow)?;
        Ok(applied.outcome)
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
    ) -> Result<PeerApplied> {
        let Integration {
            mut plan,
            duplicates,
            mut new,
        } = state.integrate(id, decoded, source)?;
        self.check_shape(id, state, &mut plan)?;
        let (reservation, over_budget) = self.limit_held(id, state, &mut plan, overflow)?;
        let newly_held = (
            plan.hold.len(),
            plan.hold.iter().map(|(c, _, _)| c.raw_bytes().len()).sum(),
        );
        let holding: HashSet<ChangeHash> = plan.hold.iter().map(|(c, _, _)| c.hash()).collect();
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
            over_budget,
            newly_held,
            missing_deps: missing,
            heads: state.doc.get_heads(),
        };
        let held = new
            .iter()
            .map(|(hash, fresh)| *fresh && holding.contains(hash))
            .collect();
        Ok(PeerApplied {
            outcome,
            new: new.into_iter().map(|(_, fresh)| fresh).collect(),
            held,
        })
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
            crate::guarded::apply(&mut state.doc, ready.iter().cloned()).map_err(|reason| {
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
        state.persist(&self.persist_to(self.wait()), id, &ready, Some(plan))?;
        if ready.is_empty() {
            return Ok(());
        }
        // Changes a client handed over are published by the node once they
        // apply (now, or later when their dependencies arrived), their root
        // changes too. The genesis is not: every replica makes it.
        let mut genesis = None;
        let from_client: Vec<Vec<u8>> = plan
            .ready
            .iter()
            .filter(|r| {
                r.source == Source::Client
                    && (!r.change.deps().is_empty()
                        || r.change.hash()
                            != *genesis
                                .get_or_insert_with(|| crate::lineage::genesis_change(id).hash()))
            })
            .map(|r| r.change.raw_bytes().to_vec())
            .collect();
        let (origin, changes): (Origin, Arc<[Vec<u8>]>) = if from_client.is_empty() {
            (Origin::Remote, Arc::from([]))
        } else {
            (Origin::Client, Arc::from(from_client))
        };
        match self.wait() {
            Wait::Durable => self.publish(id, state, origin, || changes),
            Wait::Deferred => {
                let event = doc_event(id, state, origin, changes);
                lock_events(&self.inner.deferred_events).push(event);
            }
        }
        Ok(())
    }

    /// Checks the shape limits on what `plan` applies and holds. Fails with
    /// [`Error::ShapeLimit`] if a change of this call breaks one, or depends
    /// on a change that does; held changes released by this call that break
    /// one (their dependencies' objects were unknown when they were held)
    /// are discarded instead, with their descendants: they leave `ready`
    /// and stay in `released`, so the batch deletes their records.
    fn check_shape(&self, id: &DocId, state: &DocState, plan: &mut Plan) -> Result<()> {
        let stored = state.meta.snapshot_bytes + state.meta.log_bytes;
        let order: Vec<&Change> = plan
            .ready
            .iter()
            .map(|r| &r.change)
            .chain(plan.hold.iter().map(|(c, _, _)| c))
            .collect();
        let found = shape::violations(
            &state.doc,
            stored,
            order.iter().copied(),
            &self.inner.config.shape,
        );
        if found.is_empty() {
            return Ok(());
        }
        // Each tainted change, with the change at the root of its taint.
        let mut tainted: HashMap<ChangeHash, (ChangeHash, ShapeViolation)> =
            found.iter().map(|(h, v)| (*h, (*h, *v))).collect();
        for change in &order {
            let inherited = change.deps().iter().find_map(|d| tainted.get(d).copied());
            if let Some(root) = inherited {
                tainted.entry(change.hash()).or_insert(root);
            }
        }
        let released: HashSet<&ChangeHash> = plan.released.iter().collect();
        let from_call = order
            .iter()
            .map(|c| c.hash())
            .find(|h| tainted.contains_key(h) && !released.contains(h));
        if let Some(hash) = from_call {
            let (root, violation) = tainted[&hash];
            let count = order
                .iter()
                .map(|c| c.hash())
                .filter(|h| tainted.contains_key(h) && !released.contains(h))
                .count();
            self.inner
                .shape_refused
                .fetch_add(count as u64, Ordering::Relaxed);
            tracing::info!(doc = %id, change = %root, %violation, "refused changes that break a shape limit");
            return Err(Error::ShapeLimit {
                doc: id.clone(),
                change: Some(root),
                violation,
            });
        }
        let before = plan.ready.len();
        plan.ready
            .retain(|r| !tainted.contains_key(&r.change.hash()));
        let discarded = before - plan.ready.len();
        self.inner
            .shape_refused
            .fetch_add(discarded as u64, Ordering::Relaxed);
        tracing::warn!(doc = %id, discarded, "discarded held changes that break a shape limit");
        Ok(())
    }

    /// Applies the held-change limits to `plan`: with [`Overflow::Refuse`]
    /// fails with [`Error::HeldLimit`] if any new change to hold does not
    /// fit; with [`Overflow::Shed`] moves the changes that do not fit (the
    /// last ones) to `plan.refused`, after those beyond this handle's
    /// [`HeldBudget`] (a peer's share). Returns the
    /// engine-wide reservation for what is held, and how many changes the
    /// budget refused.
    fn limit_held(
        &self,
        id: &DocId,
        state: &DocState,
        plan: &mut Plan,
        overflow: Overflow,
    ) -> Result<(Reservation, usize)> {
        let over_budget = self.shed_over_budget(plan, overflow);
        if plan.hold.is_empty() {
            return Ok((Reservation::default(), over_budget));
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
            return Ok((reservation, over_budget));
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
        plan.refused.extend(refused.into_iter().map(|(c, _, _)| c));
        tracing::debug!(doc = %id, %limit, refused = plan.refused.len(), "refused a peer's changes: the held-change limit is reached");
        Ok((reservation, over_budget))
    }

    /// Moves a peer's changes to hold beyond this handle's [`HeldBudget`]
    /// (the last ones) to `plan.refused`; returns how many.
    fn shed_over_budget(&self, plan: &mut Plan, overflow: Overflow) -> usize {
        let Some(budget) = self.held_budget.filter(|_| overflow == Overflow::Shed) else {
            return 0;
        };
        let sizes: Vec<usize> = plan
            .hold
            .iter()
            .map(|(c, _, _)| c.raw_bytes().len())
            .collect();
        let (fit, _) = prefix_fit((0, 0), &sizes, (budget.changes, budget.bytes));
        let over = plan.hold.split_off(fit);
        let n = over.len();
        plan.refused.extend(over.into_iter().map(|(c, _, _)| c));
        n
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
                let change = crate::guarded::change(bytes.to_vec()).map_err(invalid)?;
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
}
