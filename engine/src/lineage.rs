//! Document lineage: which root changes a document takes, the genesis change
//! that roots documents Causeway creates, and the tombstone changes that mark
//! deletion.
//!
//! **Roots.** Automerge changes carry no document id, so nothing in a change
//! says which document it belongs to. A document's history may start from any
//! root change (a change without dependencies), made by any Automerge
//! implementation: a document created by `@automerge/automerge` or samod is
//! imported with its change hashes unchanged. Roots are checked where a
//! mistake can still be refused, at the client boundary: a client may give a
//! document without history any roots (an import), but a root change for a
//! document that already has history, other than the document's genesis, is
//! refused as [`Error::WrongDocument`](crate::Error): it starts another
//! history, which would merge into this one as unrelated data. Replication
//! does not check roots. Two clients may import different histories under one
//! id on two sides of a partition, each accepted by its side; if peers refused
//! each other's roots, the replicas would never converge. Every replica
//! therefore takes a peer's roots, and the two histories merge as Automerge
//! merges any two documents.
//!
//! **Genesis.** A document that Causeway itself creates (a JSON write, a
//! delete, a write through the embedded API, to an id without history) is
//! rooted in a *genesis change* computed from the document id alone: an empty
//! change by an actor derived from the id, with timestamp 0 and a fixed
//! message. Every replica computes the byte-identical change, so documents
//! created independently on two partitioned nodes share their root, and a
//! change that depends on the genesis brings it along: a sender may leave it
//! out. The genesis of a document is never a foreign root to it.
//!
//! **Tombstones.** Deleting a document commits a change that removes every root
//! key, with the message [`TOMBSTONE_MESSAGE`]. The change replicates like any
//! other. A document is deleted when *every* head of its history is a tombstone:
//! a write concurrent with a delete survives it (add wins, like Automerge's own
//! map semantics), and a write made after seeing the delete recreates it.

use automerge::transaction::CommitOptions;
use automerge::{ActorId, Automerge, Change, ChangeHash};
use sha2::{Digest, Sha256};

use crate::doc_id::DocId;

/// Commit message of tombstone changes.
pub const TOMBSTONE_MESSAGE: &str = "causeway:tombstone";

/// Prefix of the genesis change's message; the document id follows.
const GENESIS_MESSAGE_PREFIX: &str = "causeway:genesis:";

/// The actor that authors `doc`'s genesis change: 16 bytes of
/// SHA-256("causeway/genesis/v1\0" ++ id).
pub fn genesis_actor(doc: &DocId) -> ActorId {
    let mut hasher = Sha256::new();
    hasher.update(b"causeway/genesis/v1\0");
    hasher.update(doc.as_bytes());
    let digest = hasher.finalize();
    ActorId::from(&digest[..16])
}

/// The genesis change of `doc`: the same bytes on every replica.
pub fn genesis_change(doc: &DocId) -> Change {
    let mut am = Automerge::new().with_actor(genesis_actor(doc));
    let opts = CommitOptions::default()
        .with_message(format!("{GENESIS_MESSAGE_PREFIX}{doc}"))
        .with_time(0);
    let hash = am.empty_commit(opts);
    // The change was committed to `am` on the line above.
    #[allow(clippy::expect_used)]
    automerge::ReadDoc::get_change_by_hash(&am, &hash).expect("genesis change is in its document")
}

/// Whether every head of `doc` is a tombstone change. A document with no heads
/// is not deleted; it does not exist.
pub fn is_tombstoned(doc: &Automerge, heads: &[ChangeHash]) -> bool {
    !heads.is_empty()
        && heads.iter().all(|h| {
            doc.get_change_meta_by_hash(h)
                .is_some_and(|m| m.message.as_deref() == Some(TOMBSTONE_MESSAGE))
        })
}

/// The latest time (seconds since the Unix epoch) among `heads`, as their
/// authors' clocks had it; 0 if none has a time (or heads are missing).
pub fn deleted_at(doc: &Automerge, heads: &[ChangeHash]) -> u64 {
    heads
        .iter()
        .filter_map(|h| doc.get_change_meta_by_hash(h))
        .map(|m| u64::try_from(m.timestamp).unwrap_or(0))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesis_is_deterministic_and_per_document() {
        let a = DocId::new("orders/1").expect("id");
        let b = DocId::new("orders/2").expect("id");
        let g1 = genesis_change(&a);
        let g2 = genesis_change(&a);
        assert_eq!(g1.hash(), g2.hash());
        assert_eq!(g1.raw_bytes(), g2.raw_bytes());
        assert!(g1.deps().is_empty());
        assert_ne!(g1.hash(), genesis_change(&b).hash());
    }

    /// Replicas running different Causeway or Automerge versions must compute
    /// the same genesis, or their copies of a document would never merge. A
    /// change here breaks convergence with every existing store.
    #[test]
    fn genesis_hash_is_stable_across_versions() {
        let doc = DocId::new("orders/1").expect("id");
        assert_eq!(
            genesis_change(&doc).hash().to_string(),
            "52d78e5e4ed5e90bf98de924c71df79a751209b3c8cb5e12fc0fc401a82bd2bf"
        );
    }
}
