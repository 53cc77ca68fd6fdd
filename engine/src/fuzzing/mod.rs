//! Fuzz harnesses (feature `fuzzing`): the properties the cargo-fuzz targets
//! in `fuzz/` check, as plain functions over bytes, so that the committed
//! corpora replay in an ordinary `cargo test` (`tests/fuzz_corpus.rs`)
//! without a fuzzer or a nightly toolchain.
//!
//! Each `run` takes one input and **panics** when a property fails: that is
//! how a fuzzer learns it found something. Inputs are read with
//! [`arbitrary`] where structure helps, so every byte string is a valid
//! input and mutations stay meaningful.
//!
//! | target | what it feeds | what must hold |
//! |---|---|---|
//! | [`wire_decode`] | any bytes to every decoder a peer or client reaches | no panic; decoded messages within their limits and stable under re-encoding |
//! | [`apply_changes`] | real changes, mutated, and raw bytes to [`Engine::apply_changes`](crate::Engine::apply_changes) | a typed error that changes nothing, or the same result as Automerge's own apply; the store reloads to the same state |
//! | [`reconcile`] | two sets of `(document id, digest)` items | the exchange ends and finds exactly their symmetric difference; hostile messages never panic |
//! | [`sync_messages`] | structurally valid, hostile Automerge sync messages (hashes real and made up, lists at and past the bounds, Bloom filters real and hand-encoded, changes real, reordered, corrupted), local writes and session restarts in between | no panic; typed refusals, a message refused by the bounds leaves the sync state alone; every generated message is within the bounds peers accept; the document holds only changes either side wrote; an honest peer then syncs to the same heads and JSON |
//! | [`documents`] | a client's document of any shape (deep mixes of maps, lists and texts, wide maps, long lists and texts), JSON writes of any depth, small shape limits, a reopen with a smaller depth limit | no panic or stack overflow (reads run on 256 KiB); changes accepted or refused with a shape or held limit, refusals change nothing; every read path agrees with a rendering of the stored history; JSON writes read back as written or merged |
//! | [`convergence`] | 3 to 5 replicas (engines and replication cores), edits, message drops, duplicates and reorders, partitions, restarts, compaction, save and load | after a heal and reliable delivery: identical heads and JSON everywhere, and the merge laws |

pub mod apply_changes;
pub mod convergence;
pub mod documents;
pub mod edit;
pub mod reconcile;
pub mod sync_messages;
pub mod wire_decode;

/// A directory for a harness's stores (the harnesses open stores for every
/// input; the simulator's scratch directory is on tmpfs where it can be).
fn store_dir(prefix: &str) -> tempfile::TempDir {
    // A harness that cannot create a directory cannot run at all.
    crate::sim::scratch_dir(None, prefix)
        .unwrap_or_else(|e| panic!("temporary directory for a fuzz store: {e}"))
}
