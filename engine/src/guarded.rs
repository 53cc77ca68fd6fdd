//! Automerge's decoders behind a panic guard, for bytes from outside: change
//! bytes from peers and clients, sync messages and sync states, and stored
//! documents and changes.
//!
//! Automerge 0.12 panics on some malformed input instead of returning an
//! error: the `wire_decode` fuzzer found a 200-byte change whose operation
//! counter overflows an `unwrap` in `Change::from_bytes` (see
//! `fuzz/README.md`). Any peer or HTTP client could send such bytes. Each
//! decoder here runs Automerge's under `catch_unwind` and turns a panic into
//! the same error a refused input gets. Unwinding is sound here: the decoders
//! read owned or borrowed bytes and touch no shared state.
//!
//! Applying is guarded too: Automerge 0.12 asserts that an actor's changes
//! arrive with consecutive sequence numbers, and the `apply_changes` fuzzer
//! found that a change with intact dependencies but a rewritten `seq` (and
//! a valid checksum) trips that assertion. [`apply`] turns the panic into an
//! error; the document it was applied to is then in an unknown state, and
//! the engine discards it and reloads it from the store.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

use automerge::{Automerge, Change};

use automerge::sync::{Message as SyncMessage, State as SyncState};

/// Panics caught in Automerge since the process started.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// How many times Automerge panicked on input in this process (each became
/// an error).
pub(crate) fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Runs `f`, turning a panic into `Err(())` and counting it. Only for
/// Automerge calls whose state the caller discards after a panic (or that
/// touch no shared state at all).
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| {
        PANICS.fetch_add(1, Ordering::Relaxed);
    })
}

/// Runs `decode`, mapping its error, or a panic, to a message.
fn guarded<T, E: std::fmt::Display>(decode: impl FnOnce() -> Result<T, E>) -> Result<T, String> {
    match catch(decode) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(()) => Err("the decoder failed on malformed input".into()),
    }
}

/// A change from its bytes.
pub(crate) fn change(bytes: Vec<u8>) -> Result<Change, String> {
    guarded(|| Change::from_bytes(bytes))
}

/// A sync message from its bytes.
pub(crate) fn sync_message(bytes: &[u8]) -> Result<SyncMessage, String> {
    guarded(|| SyncMessage::decode(bytes))
}

/// A persisted sync state from its bytes.
pub(crate) fn sync_state(bytes: &[u8]) -> Result<SyncState, String> {
    guarded(|| SyncState::decode(bytes))
}

/// A saved document from its bytes.
pub(crate) fn document(bytes: &[u8]) -> Result<Automerge, String> {
    guarded(|| Automerge::load(bytes))
}

/// Applies `changes` to `doc`, mapping Automerge's error, or a panic, to a
/// message. After an error `doc` must be discarded: a panic can leave it
/// half-applied.
pub(crate) fn apply(
    doc: &mut Automerge,
    changes: impl IntoIterator<Item = Change> + Clone,
) -> Result<(), String> {
    match catch(|| doc.apply_changes(changes)) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(()) => {
            Err("Automerge failed applying the changes (inconsistent change metadata)".into())
        }
    }
}
