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
use crate::held::Source;
use crate::layout;

pub use automerge::sync::{Message as SyncMessage, State as SyncState};

/// Longest peer id accepted as a key for persisted sync state, in bytes.
pub const MAX_PEER_ID_LEN: usize = 128;

/// Most hashes in one list of a received sync message (its heads, its
/// needs, each have's last-sync heads). Automerge looks each one up, so this
/// bounds that work; a message's own size bounds its memory.
pub const MAX_SYNC_HASHES: usize = 16_384;

/// Most `have` entries in one received sync message. Automerge sends one,
/// and probes every change since each entry's heads against its Bloom
/// filter, so each entry can cost a pass over the document's history.
pub const MAX_SYNC_HAVES: usize = 4;

/// Most probes per entry a received Bloom filter may ask for. Automerge
/// uses 7; each probe of each looked-up change costs a division.
pub const MAX_BLOOM_PROBES: u32 = 32;

/// Most bits per entry a received Bloom filter may use (Automerge uses 10).
pub const MAX_BLOOM_BITS_PER_ENTRY: u32 = 64;

/// Largest received Bloom filter, in bytes (4 MiB: about 3.3 million
/// changes at Automerge's 10 bits each). Keeps Automerge's bit arithmetic,
/// done in `u32`, from overflowing.
pub const MAX_BLOOM_BYTES: usize = 4 << 20;

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
            if state.collected.is_some() {
                // Its history is gone: nothing to offer, nothing to ask for
                // (see `receive_sync`).
                return Ok(None);
            }
            let generated = crate::guarded::catch(|| state.doc.generate_sync_message(sync));
            let Ok(generated) = generated else {
                // What the peer last said is suspect: forget it, keep only
                // the heads both sides are known to share.
                let shared = std::mem::take(&mut sync.shared_heads);
                *sync = SyncState::new();
                sync.shared_heads = shared;
                return Err(Error::InvalidSyncMessage {
                    doc: id.clone(),
                    reason: "Automerge failed answering the peer's last message".into(),
                });
            };
            let Some(mut message) = generated else {
                return Ok(None);
            };
            message.flags = None;
            // Held changes live in the engine, not in Automerge's queue, so
            // Automerge cannot ask for what they lack; ask for it here. (A
            // Bloom filter false positive is one way to end up there: the
            // peer then never sends a change it believes we have.)
            let mut missing = state.held_missing_deps();
            // Peers refuse longer lists; the rest is asked for next time.
            missing.truncate(MAX_SYNC_HASHES.saturating_sub(message.need.len()));
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
    /// A message that asks for more work than the bounds allow
    /// ([`MAX_SYNC_HASHES`], [`MAX_SYNC_HAVES`], the Bloom filter bounds) is
    /// refused with [`Error::InvalidSyncMessage`] before Automerge sees it.
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
        message: SyncMessage,
    ) -> Result<ApplyOutcome> {
        self.receive_sync(id, sync, message, Source::Peer)
    }

    /// Receives a sync message for `id` from a client (an Automerge
    /// application that is not a Causeway peer, such as an automerge-repo
    /// client), as [`Engine::receive_sync_message`] but with its changes
    /// taken as [`Engine::apply_changes`] takes them: checked for lineage
    /// (a new root for a document with history is
    /// [`Error::WrongDocument`]), refused whole at a held-change limit, and
    /// announced to subscribers as [`Origin::Client`](crate::Origin) so a
    /// node publishes them.
    pub fn receive_client_sync_message(
        &self,
        id: &DocId,
        sync: &mut SyncState,
        message: SyncMessage,
    ) -> Result<ApplyOutcome> {
        if !message.changes.is_empty() {
            self.check_writable()?;
        }
        self.receive_sync(id, sync, message, Source::Client)
    }

    fn receive_sync(
        &self,
        id: &DocId,
        sync: &mut SyncState,
        mut message: SyncMessage,
        source: Source,
    ) -> Result<ApplyOutcome> {
        message.flags = None;
        check_bounds(&message).map_err(|reason| Error::InvalidSyncMessage {
            doc: id.clone(),
            reason,
        })?;
        normalise(&mut message);
        let chunks: Vec<Vec<u8>> = message.changes.iter().map(<[u8]>::to_vec).collect();
        message.changes = ChunkList::empty();
        let had_changes = !chunks.is_empty();
        let decoded = self.decode_changes(id, &chunks)?;
        self.with_doc(id, |state| {
            if let Some(collected) = &state.collected {
                let mut theirs = message.heads.clone();
                theirs.sort_unstable();
                if theirs.is_empty() || theirs == *collected {
                    // The peer holds the tombstone this node collected, or
                    // nothing: neither needs anything from the other. The
                    // sync state stays as it was, so nothing is saved for a
                    // document without history.
                    return Ok(ApplyOutcome {
                        heads: collected.clone(),
                        ..ApplyOutcome::default()
                    });
                }
                // The peer holds something else: a write made after the
                // delete (or the history of a document recreated since).
                // Sync from nothing to fetch the whole history again; the
                // first change stored replaces the marker.
                state.collected = None;
            }
            let before = state.doc.get_heads();
            let outcome = if decoded.is_empty() {
                ApplyOutcome {
                    heads: before.clone(),
                    ..ApplyOutcome::default()
                }
            } else {
                self.apply_decoded(id, state, decoded, source)?
            };
            let mut next = sync.clone();
            if outcome.applied > 0 {
                next.shared_heads = advance_shared(&before, &outcome.heads, &next.shared_heads);
            }
            let last_sent = next.last_sent_heads.clone();
            let doc = &mut state.doc;
            match crate::guarded::catch(|| doc.receive_sync_message(&mut next, message)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(Error::ChangeRejected {
                        doc: id.clone(),
                        reason: format!("sync message: {e}"),
                    })
                }
                // `with_doc` discards the document on this error.
                Err(()) => {
                    return Err(Error::ChangeRejected {
                        doc: id.clone(),
                        reason: "Automerge failed on the sync message".into(),
                    })
                }
            }
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
    /// was saved or the saved one does not decode (it is only a shortcut;
    /// the error is logged).
    pub fn load_sync_state(&self, peer: &str, id: &DocId) -> Result<SyncState> {
        validate_peer(peer)?;
        match self.inner.store.peer_sync(peer, id)? {
            None => Ok(SyncState::new()),
            Some(bytes) => Ok(crate::guarded::sync_state(&bytes).unwrap_or_else(|e| {
                // Only a shortcut is lost: the session starts from nothing,
                // and its next save replaces the record.
                let key =
                    layout::describe_key(layout::CF_PEER_SYNC, &layout::peer_sync_key(peer, id));
                tracing::error!(%key, error = %e, "stored sync state does not decode; starting afresh");
                SyncState::new()
            })),
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

    /// The peers this store keeps sync states with, in id order (one seek
    /// per peer, not a read of every state).
    pub fn sync_state_peers(&self) -> Result<Vec<String>> {
        self.inner.store.peer_sync_peers()
    }

    /// Deletes every sync state saved with `peer` (one range delete), as
    /// the configured durability requires: for a peer whose store was
    /// renewed, whose shared heads may name changes it no longer holds, or
    /// for one that left the cluster.
    pub fn forget_sync_states(&self, peer: &str) -> Result<()> {
        validate_peer(peer)?;
        let store = &self.inner.store;
        let mut from = peer.as_bytes().to_vec();
        from.push(0);
        let mut to = peer.as_bytes().to_vec();
        to.push(1);
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range_cf(store.cf(layout::CF_PEER_SYNC), from, to);
        store.write(batch, self.wait())
    }

    /// Calls `f` with every stored document's id and digest of heads, in id
    /// order, deleted documents included (a delete is a change to replicate)
    /// and collected ones left out (see [`collection`](crate::collection)).
    /// Quarantined documents are left out, and a metadata entry that does
    /// not decode quarantines its document.
    pub fn for_each_digest(&self, mut f: impl FnMut(DocId, [u8; 32])) -> Result<()> {
        let quarantine = &self.inner.quarantine;
        self.inner.store.for_each_digest(
            |id, meta| {
                if !meta.collected && quarantine.get(id.as_str()).is_none() {
                    f(id, meta.digest);
                }
            },
            |e| {
                quarantine.admit(e);
            },
        )
    }
}

/// Refuses a received message that would make Automerge do more work than
/// the bounds allow, or that would make it fail: a Bloom filter with no bits
/// (Automerge divides by its bit count), too many probes, too many entries.
pub(crate) fn check_bounds(message: &SyncMessage) -> std::result::Result<(), String> {
    let lists = [("heads", message.heads.len()), ("need", message.need.len())];
    let haves = message
        .have
        .iter()
        .map(|h| ("have.last_sync", h.last_sync.len()));
    if let Some((name, len)) = lists
        .into_iter()
        .chain(haves)
        .find(|(_, len)| *len > MAX_SYNC_HASHES)
    {
        return Err(format!(
            "{name} lists {len} hashes; at most {MAX_SYNC_HASHES} are accepted"
        ));
    }
    if message.have.len() > MAX_SYNC_HAVES {
        return Err(format!(
            "{} have entries; at most {MAX_SYNC_HAVES} are accepted",
            message.have.len()
        ));
    }
    message
        .have
        .iter()
        .try_for_each(|have| check_bloom(&have.bloom.to_bytes()))
}

/// Checks an encoded Bloom filter's parameters: empty, or `num_entries`,
/// bits per entry and probes (LEB128) within bounds, then the bits.
fn check_bloom(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut rest = bytes;
    let mut next = || leb128_u32(&mut rest).ok_or("Bloom filter header does not decode");
    let (entries, bits_per_entry, probes) = (next()?, next()?, next()?);
    if entries == 0 {
        return Ok(());
    }
    if !(1..=MAX_BLOOM_BITS_PER_ENTRY).contains(&bits_per_entry) {
        return Err(format!(
            "Bloom filter has {bits_per_entry} bits per entry; 1 to {MAX_BLOOM_BITS_PER_ENTRY} are accepted"
        ));
    }
    if !(1..=MAX_BLOOM_PROBES).contains(&probes) {
        return Err(format!(
            "Bloom filter asks for {probes} probes; 1 to {MAX_BLOOM_PROBES} are accepted"
        ));
    }
    let size = (u64::from(entries) * u64::from(bits_per_entry)).div_ceil(8);
    if size > MAX_BLOOM_BYTES as u64 {
        return Err(format!(
            "Bloom filter of {size} bytes; at most {MAX_BLOOM_BYTES} are accepted"
        ));
    }
    Ok(())
}

/// Reads one unsigned LEB128 value that fits a `u32` from the front of
/// `bytes`, advancing it.
fn leb128_u32(bytes: &mut &[u8]) -> Option<u32> {
    let mut value: u64 = 0;
    for (index, byte) in bytes.iter().enumerate().take(5) {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            *bytes = &bytes[index + 1..];
            return u32::try_from(value).ok();
        }
    }
    None
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
        } else if let Ok(change) = crate::guarded::change(chunk.to_vec()) {
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
