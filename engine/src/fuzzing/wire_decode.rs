//! Every decoder a peer or a client can reach, on arbitrary bytes: the wire
//! envelope on both channels (and, inside it, change bytes, heads and
//! Automerge sync messages), persisted sync states, session tokens (also with
//! a valid signature over arbitrary contents, so the fuzzer gets past the
//! signature check) and document ids.
//!
//! Must hold: no panic; a decoded envelope is within every wire limit, fits
//! the channel it was decoded for, and re-encodes to an envelope that decodes
//! to itself; a decoded token is within its limits and round-trips.
//!
//! That no decoder allocates past its limits is checked by the fuzz target,
//! which caps single allocations; [`run_with`] tells it whose decoder runs.
//! Causeway's own decoders are held to a few times the input size.
//! Automerge's decoders (changes, sync messages and states) preallocate a
//! declared string or byte length before reading it, up to their own ceiling
//! of 10^9 bytes (zero-filled, so the memory is reserved but not touched):
//! the fuzzer found a 190-byte change that does so (see `fuzz/README.md`). The
//! target holds them to that ceiling rather than to the input size.

use crate::doc_id::DocId;
use crate::doc_sync::{normalise, SyncMessage};
use crate::guarded;
use crate::replication::wire::{
    Envelope, Message, RangeBody, MAX_ACK_ENTRIES, MAX_BUNDLE_DOCS, MAX_CHANGES_PER_DELTA,
    MAX_FRAME_BYTES, MAX_GOSSIP_BYTES, MAX_HEADS, MAX_ITEMS, MAX_RANGES,
};
use crate::session::{SessionToken, TokenKey, TOKEN_VERSION};

/// The largest single allocation Automerge 0.12's column decoder makes for a
/// declared length before reading it (its `MAX_ALLOCATION`).
pub const AUTOMERGE_MAX_ALLOCATION: usize = 1_000_000_000;

/// Whose decoder is about to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// Causeway's own: the envelope, tokens, ids.
    Causeway,
    /// Automerge's: changes, sync messages, sync states.
    Automerge,
}

/// Runs every decoder on `data`; panics if a property fails.
pub fn run(data: &[u8]) {
    run_with(data, &mut |_| {});
}

/// [`run`], calling `entering` before each decoder's turn.
pub fn run_with(data: &[u8], entering: &mut dyn FnMut(Decoder)) {
    entering(Decoder::Causeway);
    for limit in [MAX_GOSSIP_BYTES, MAX_FRAME_BYTES] {
        if let Ok(envelope) = Envelope::decode(data, limit) {
            assert!(data.len() <= limit, "decoded past the channel limit");
            check_limits(&envelope.message);
            entering(Decoder::Automerge);
            decode_inner(&envelope.message);
            entering(Decoder::Causeway);
            let again = Envelope::decode(&envelope.encode(), MAX_FRAME_BYTES);
            assert_eq!(again.as_ref(), Ok(&envelope), "re-encoded envelope differs");
        }
    }
    entering(Decoder::Automerge);
    if let Ok(mut message) = guarded::sync_message(data) {
        // What the engine does to every received message before Automerge
        // sees it; after that, encoding (as a persisted state will be) holds.
        normalise(&mut message);
        let again = SyncMessage::decode(&message.clone().encode());
        assert!(again.is_ok(), "re-encoded sync message does not decode");
    }
    let _ = guarded::sync_state(data);
    let _ = guarded::change(data.to_vec());
    entering(Decoder::Causeway);
    if let Ok(text) = std::str::from_utf8(data) {
        token(text);
        if let Ok(id) = DocId::new(text) {
            assert_eq!(id.as_str(), text);
        }
    }
    signed_token(data);
}

/// The counts a decoded message may hold.
fn check_limits(message: &Message) {
    match message {
        Message::Delta(d) => {
            assert!(d.changes.len() <= MAX_CHANGES_PER_DELTA);
            assert!(d.heads.len() <= MAX_HEADS);
        }
        Message::Announce(a) => assert!(a.heads.len() <= MAX_HEADS),
        Message::Push(p) => assert!(p.changes.len() <= MAX_CHANGES_PER_DELTA),
        Message::Bundle(b) => {
            assert!(b.docs.len() <= MAX_BUNDLE_DOCS);
            assert!(b
                .docs
                .iter()
                .all(|d| d.changes.len() <= MAX_CHANGES_PER_DELTA));
        }
        Message::Reconcile(r) => {
            assert!(r.ranges.len() <= MAX_RANGES);
            let items: usize = r
                .ranges
                .iter()
                .map(|p| match &p.body {
                    RangeBody::Items { items, .. } => items.len(),
                    _ => 0,
                })
                .sum();
            assert!(items <= MAX_ITEMS);
        }
        Message::Ack(a) => {
            assert!(a.entries.len() <= MAX_ACK_ENTRIES);
            assert!(a.entries.iter().all(|e| e.heads.len() <= MAX_HEADS));
        }
        Message::Hello(_) | Message::Sync(_) => {}
    }
}

/// The decoders a receiver runs on what a message carries.
fn decode_inner(message: &Message) {
    match message {
        Message::Delta(d) => {
            assert_eq!(d.heads.to_vec().len(), d.heads.len());
            for change in &d.changes {
                let _ = guarded::change(change.0.clone());
            }
        }
        Message::Push(p) => {
            for change in &p.changes {
                let _ = guarded::change(change.0.clone());
            }
        }
        Message::Bundle(b) => {
            for change in b.docs.iter().flat_map(|d| &d.changes) {
                let _ = guarded::change(change.0.clone());
            }
        }
        Message::Sync(frame) => {
            let _ = guarded::sync_message(&frame.msg.0);
        }
        Message::Ack(a) => a.entries.iter().for_each(|e| {
            assert_eq!(e.heads.to_vec().len(), e.heads.len());
        }),
        _ => {}
    }
}

/// The key tokens are checked with here.
fn key() -> TokenKey {
    TokenKey::from_secret(b"causeway fuzz")
}

/// A token as a client would send it.
fn token(text: &str) {
    if let Ok(token) = SessionToken::decode(text, &key()) {
        assert!(
            token.check_size().is_ok(),
            "decoded token beyond its limits"
        );
        let again = SessionToken::decode(&token.encode(&key()), &key());
        assert_eq!(again.as_ref(), Ok(&token), "token does not round-trip");
    }
}

/// `data` as the body of a correctly signed token, to reach the body decoder.
fn signed_token(data: &[u8]) {
    let mut bytes = vec![TOKEN_VERSION];
    bytes.extend_from_slice(data);
    let tag = key().tag(&bytes);
    bytes.extend_from_slice(&tag);
    token(&data_encoding::BASE64URL_NOPAD.encode(&bytes));
}
