//! Automerge's sync protocol for one document with one peer, run through the
//! engine's validated, durable apply path.
//!
//! Automerge's own `receive_sync_message` would apply received changes straight
//! into the in-memory document, keep changes with missing dependencies in an
//! unbounded internal queue, and persist nothing. Here the received changes are
//! taken out of the message first, validated and applied exactly like
//! [`Engine::apply_changes`] (size, checksum, lineage, bounded held buffer, one
//! durable WriteBatch), and only then is the message, now without changes,
//! handed to Automerge to update the sync state.
//!
//! Causeway speaks version 1 sync messages only: each message is a list of
//! changes, so it can be cut to a byte budget. (Version 2 may send a whole
//! compressed document in one message, which no budget can split.) Received
//! capability flags are ignored, so Automerge never chooses version 2.
//!
//! The durable part of a [`SyncState`] is the set of heads both sides are known
//! to share; [`Engine::save_sync_states`] stores it per peer and document so a
//! restarted node resumes from those heads: its first message summarises only
//! the changes made since them, not the whole history.

use std::collections::BTreeSet;

use automerge::sync::{ChunkList, SyncDoc};
use automerge::ChangeHash;

use crate::doc_id::DocId;
use crate::engine::{ApplyOutcome, Engine};
use crate::error::{Error, Result};
use crate::layout;

pub use automerge::sync::{Message as SyncMessage, State as SyncState};

/// Longest peer id accepted as a key for persisted sync state, in bytes.
pub const MAX_PEER_ID_LEN: usize = 128;

impl Engine {
    /// The next sync message for `id` to the peer whose state is `sync`, or
    /// `None` if there is nothing to say until the peer answers. The changes
    /// it carries total at most `max_change_bytes` (but at least one change is
    /// sent if any is due); the rest follow in later messages. A document this
    /// node does not hold syncs as empty, which asks the peer for everything.
    /// The message's needs include the missing dependencies of changes the
    /// engine holds for this document.
    pub fn generate_sync_message(
        &self,
        id: &DocId,
        sync: &mut SyncState,
        max_change_bytes: usize,
    ) -> Result<Option<SyncMessage>> {
        self.with_doc(id, |state| {
            let Some(mut message) = state.doc.generate_sync_message(sync) else {
                return Ok(None);
            };
            message.flags = None;
            // Held changes live in the engine, not in Automerge's queue, so
            // Automerge cannot ask for what they lack; ask for it here. (A
            // Bloom filter false positive is one way to end up there: the
            // peer then never sends a change it believes we have.)
            let missing = state.held_missing_deps();
            if !missing.is_empty() {
                message.need.extend(missing);
                // The encoding requires sorted hashes.
                message.need.sort_unstable();
                message.need.dedup();
            }
            truncate_changes(&mut message, sync, max_change_bytes);
            Ok(Some(message))
        })
    }

    /// Receives a sync message for `id` from the peer whose state is `sync`.
    /// The changes it carries are validated and applied like
    /// [`Engine::apply_changes`] (and are durable on return); then the sync
    /// state learns the peer's heads, needs and Bloom filter. If the changes
    /// fail validation, nothing was applied and `sync` is unchanged. If
    /// Automerge then refuses the rest of the message, the changes stay
    /// applied (they are valid and durable) and `sync` is unchanged.
    pub fn receive_sync_message(
        &self,
        id: &DocId,
        sync: &mut SyncState,
        mut message: SyncMessage,
    ) -> Result<ApplyOutcome> {
        message.flags = None;
        normalise(&mut message);
        let chunks: Vec<Vec<u8>> = message.changes.iter().map(<[u8]>::to_vec).collect();
        message.changes = ChunkList::empty();
        let had_changes = !chunks.is_empty();
        let decoded = self.decode_changes(id, &chunks)?;
        self.with_doc(id, |state| {
            let before = state.doc.get_heads();
            let outcome = if decoded.is_empty() {
                ApplyOutcome {
                    heads: before.clone(),
                    ..ApplyOutcome::default()
                }
            } else {
                self.apply_decoded(id, state, decoded)?
            };
            let mut next = sync.clone();
            if outcome.applied > 0 {
                next.shared_heads = advance_shared(&before, &outcome.heads, &next.shared_heads);
            }
            let last_sent = next.last_sent_heads.clone();
            state
                .doc
                .receive_sync_message(&mut next, message)
                .map_err(|e| Error::ChangeRejected {
                    doc: id.clone(),
                    reason: format!("sync message: {e}"),
                })?;
            if had_changes {
                // Automerge takes a message without changes whose heads equal
                // ours as proof the peer already knows our heads. Its changes
                // were stripped above, so undo that inference: the peer has
                // not yet heard our heads after applying what it sent.
                next.last_sent_heads = last_sent;
            }
            *sync = next;
            Ok(outcome)
        })
    }

    /// The persisted sync state with `peer` for `id`, or a fresh state if none
    /// was saved. A stored state that does not decode is reported as
    /// [`Error::Corrupt`].
    pub fn load_sync_state(&self, peer: &str, id: &DocId) -> Result<SyncState> {
        validate_peer(peer)?;
        match self.inner.store.peer_sync(peer, id)? {
            None => Ok(SyncState::new()),
            Some(bytes) => crate::codec::sync_state(&bytes).map_err(|e| Error::Corrupt {
                doc: id.to_string(),
                key: layout::describe_key(layout::CF_PEER_SYNC, &layout::peer_sync_key(peer, id)),
                reason: format!("sync state does not decode: {e}"),
            }),
        }
    }

    /// Persists the durable part of the sync states with `peer` for the given
    /// documents, in one WriteBatch, with the configured durability (or,
    /// through a deferring handle, until the next deferred sync).
    pub fn save_sync_states(&self, peer: &str, states: &[(&DocId, &SyncState)]) -> Result<()> {
        validate_peer(peer)?;
        let store = &self.inner.store;
        let mut batch = rocksdb::WriteBatch::default();
        for (id, sync) in states {
            batch.put_cf(
                store.cf(layout::CF_PEER_SYNC),
                layout::peer_sync_key(peer, id),
                sync.encode(),
            );
        }
        store.write(batch, self.wait())
    }

    /// Calls `f` with every stored document's id and digest of heads, in id
    /// order, deleted documents included (a delete is a change to replicate).
    pub fn for_each_digest(&self, mut f: impl FnMut(DocId, [u8; 32])) -> Result<()> {
        self.inner.store.for_each_meta(|id, meta| {
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&meta.digest);
            f(id, digest);
        })
    }
}

/// Refuses a peer id that cannot be a storage key.
fn validate_peer(peer: &str) -> Result<()> {
    if peer.is_empty() || peer.len() > MAX_PEER_ID_LEN || peer.contains('\0') {
        return Err(Error::InvalidPeer(
            peer.chars().take(MAX_PEER_ID_LEN).collect(),
        ));
    }
    Ok(())
}

/// Keeps the longest prefix of the message's changes within `budget` bytes
/// (at least one change), and forgets having sent the rest so the next message
/// carries them.
fn truncate_changes(message: &mut SyncMessage, sync: &mut SyncState, budget: usize) {
    let mut total = 0usize;
    let mut keep = 0usize;
    for chunk in message.changes.iter() {
        if keep > 0 && total + chunk.len() > budget {
            break;
        }
        total += chunk.len();
        keep += 1;
    }
    if keep == message.changes.len() {
        return;
    }
    let mut kept = Vec::with_capacity(keep);
    for (index, chunk) in message.changes.iter().enumerate() {
        if index < keep {
            kept.push(chunk.to_vec());
        } else if let Ok(change) = crate::codec::change(chunk.to_vec()) {
            sync.sent_hashes.remove(&change.hash());
        }
    }
    message.changes = ChunkList::from(kept);
}

/// The shared heads after applying a peer's changes: heads that are new here
/// came from the peer, and old shared heads still current stay shared (what
/// Automerge does when it applies a sync message's changes itself).
fn advance_shared(
    before: &[ChangeHash],
    after: &[ChangeHash],
    shared: &[ChangeHash],
) -> Vec<ChangeHash> {
    let fresh = after.iter().filter(|h| !before.contains(h));
    let kept = shared.iter().filter(|h| after.contains(h));
    let set: BTreeSet<ChangeHash> = fresh.chain(kept).copied().collect();
    set.into_iter().collect()
}

/// Sorts and dedups the hash lists of a received message. Automerge's encoder
/// expects sorted hashes but its decoder does not check, and when every head
/// a peer names is known here Automerge adopts the list verbatim as the shared
/// heads, which are persisted: a peer sending unsorted or repeated heads would
/// otherwise leave malformed state behind (found by the `wire_decode` fuzzer).
pub(crate) fn normalise(message: &mut SyncMessage) {
    fn tidy(hashes: &mut Vec<ChangeHash>) {
        hashes.sort_unstable();
        hashes.dedup();
    }
    tidy(&mut message.heads);
    tidy(&mut message.need);
    message.have.iter_mut().for_each(|h| tidy(&mut h.last_sync));
}
