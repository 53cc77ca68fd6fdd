//! Typed errors of the engine.
//!
//! Each variant says what it means for the caller and for the store. Unless a
//! variant says otherwise, the operation that returned it changed nothing: no
//! document, no on-disk byte, no in-memory state.

use std::path::PathBuf;

use automerge::ChangeHash;

use crate::doc_id::{DocId, DocIdError};

/// Result alias for engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything an engine operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A document id or prefix broke the id rules. Caller error; fix the id.
    #[error("invalid document id: {0}")]
    InvalidDocId(#[from] DocIdError),

    /// A peer id that cannot key persisted sync state (empty, longer than
    /// [`MAX_PEER_ID_LEN`](crate::MAX_PEER_ID_LEN) bytes, or containing NUL).
    /// Caller error; nothing was read or written.
    #[error("invalid peer id {0:?}")]
    InvalidPeer(String),

    /// The document has never existed here. Harmless; create it first.
    #[error("document {0} does not exist")]
    NotFound(DocId),

    /// The document exists but its latest state is a tombstone. Reads refuse
    /// it; writes that create it (put, create) bring it back.
    #[error("document {0} has been deleted")]
    Deleted(DocId),

    /// `create` on a document that already exists (and is not deleted).
    #[error("document {0} already exists")]
    AlreadyExists(DocId),

    /// A JSON value that cannot become a document: the root must be an object.
    #[error("document {doc} must be a JSON object at the root, got {found}")]
    NotAnObject {
        /// The document being written.
        doc: DocId,
        /// The JSON type that was given instead.
        found: &'static str,
    },

    /// Bytes given as an Automerge change did not decode, or their checksum
    /// did not match. Caller error or misbehaving peer; nothing was applied.
    #[error("change {index} for document {doc} does not decode: {reason}")]
    InvalidChange {
        /// The document the changes were for.
        doc: DocId,
        /// Position of the bad change in the input.
        index: usize,
        /// What the decoder said.
        reason: String,
    },

    /// A change is larger than `EngineConfig::max_change_bytes`. Nothing was
    /// applied.
    #[error("change {index} for document {doc} is {size} bytes; the limit is {limit}")]
    ChangeTooLarge {
        /// The document the changes were for.
        doc: DocId,
        /// Position of the change in the input.
        index: usize,
        /// Its size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A change starts a history that is not this document's: its root is not
    /// the document's genesis change, so it was made for another document.
    /// A client gave a document that already has history a new root change
    /// (one without dependencies): it starts an unrelated history. Caller
    /// error; nothing was applied. See [`lineage`](crate::lineage).
    #[error("change {hash} is not part of document {doc}: it has no dependencies, so it starts another history, and {doc} already has one (a client may give root changes only to a document without history)")]
    WrongDocument {
        /// The document the changes were sent to.
        doc: DocId,
        /// The offending change.
        hash: ChangeHash,
    },

    /// Automerge refused well-formed changes (for example a reused actor
    /// sequence number). Misbehaving peer; nothing was applied and the
    /// document was reloaded from disk.
    #[error("document {doc} rejected the changes: {reason}")]
    ChangeRejected {
        /// The document.
        doc: DocId,
        /// What Automerge said.
        reason: String,
    },

    /// Holding the changes (their dependencies are missing) would exceed a
    /// held-change limit. Nothing from the call was stored, not even the
    /// changes that could have applied. Harmless: retry later (the
    /// dependencies may arrive by replication meanwhile), or send the
    /// missing dependencies with the changes: they are the changes of the
    /// caller's document not covered by `heads` (Automerge's
    /// `get_changes(heads)`, `saveSince(doc, heads)` in JavaScript).
    #[error(
        "document {doc}: holding these changes would exceed {limit}; they wait for {missing_total} changes this node does not have ({})",
        fmt_hashes(missing)
    )]
    HeldLimit {
        /// The document.
        doc: DocId,
        /// The limit that would have been exceeded.
        limit: HeldLimitKind,
        /// Dependencies the refused changes wait for that this node holds
        /// neither applied nor held, sorted, at most
        /// [`MAX_REPORTED_MISSING`](crate::MAX_REPORTED_MISSING).
        missing: Vec<ChangeHash>,
        /// How many such dependencies there are in all.
        missing_total: usize,
        /// The document's heads here: what the node has.
        heads: Vec<ChangeHash>,
    },

    /// A change, a JSON value or a stored document breaks a shape limit
    /// ([`EngineConfig::shape`](crate::EngineConfig::shape)): nesting depth,
    /// operations or objects per change, document size. For a write,
    /// nothing from the call was applied or stored (caller error or
    /// misbehaving peer; split the change or flatten the value). For a
    /// read, the stored document is already beyond the depth limit and is
    /// not walked.
    #[error("document {doc}: {}{violation}", change.map(|h| format!("change {h}: ")).unwrap_or_default())]
    ShapeLimit {
        /// The document.
        doc: DocId,
        /// The change that breaks the limit, if the limit is one a change
        /// breaks.
        change: Option<ChangeHash>,
        /// The limit, and by how much.
        violation: crate::shape::ShapeViolation,
    },

    /// A sync message asks for more work than the engine allows one
    /// message to cause (see [`doc_sync`](crate::SyncMessage) bounds:
    /// Bloom filter parameters, counts of heads, needs and haves), or
    /// Automerge failed on it. Misbehaving peer; nothing was applied and
    /// the sync state is unchanged.
    #[error("document {doc}: sync message refused: {reason}")]
    InvalidSyncMessage {
        /// The document.
        doc: DocId,
        /// What is wrong with it.
        reason: String,
    },

    /// Heads given for a read or a diff are not in this document (yet).
    /// Harmless; retry once replication has delivered them.
    #[error("document {doc} does not hold heads {}", fmt_hashes(missing))]
    UnknownHeads {
        /// The document.
        doc: DocId,
        /// The heads this node does not hold.
        missing: Vec<ChangeHash>,
    },

    /// The caller's transaction function returned an error; the transaction
    /// was rolled back and nothing was written.
    #[error("transaction on document {doc} failed and was rolled back: {source}")]
    Transaction {
        /// The document.
        doc: DocId,
        /// The error from the transaction function.
        source: Box<automerge::AutomergeError>,
    },

    /// The directory exists but does not hold a Causeway store. Nothing was
    /// written to it.
    #[error("{} is not a Causeway store: {reason}", path.display())]
    NotAStore {
        /// The directory.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// The store was written by a newer Causeway with a storage format this
    /// build cannot read. Nothing was written; upgrade Causeway.
    #[error(
        "store at {} has storage format {found}; this build reads formats up to {supported}; upgrade Causeway to open it",
        path.display()
    )]
    FormatTooNew {
        /// The directory.
        path: PathBuf,
        /// Format found on disk.
        found: u32,
        /// Newest format this build understands.
        supported: u32,
    },

    /// Another engine (in this or another process) has the store open.
    #[error("store at {} is already open by another engine or process", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
    },

    /// Data on disk for one document does not decode. Other documents are
    /// unaffected; this one needs repair from a replica or a backup.
    #[error("corrupt data for document {doc} at key {key}: {reason}")]
    Corrupt {
        /// The document the data belongs to.
        doc: String,
        /// The RocksDB column family and key, printable.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The document is quarantined: a record of it did not decode (see
    /// [`quarantine`](crate::quarantine)). Every use of it answers this until
    /// [`Engine::repair`](crate::Engine::repair) discards the local copy;
    /// other documents are unaffected.
    #[error("document {doc} is quarantined: corrupt data at key {key}: {reason}; repair it with `causeway doc repair`")]
    Quarantined {
        /// The document.
        doc: String,
        /// The corrupt record's column family and key, printable.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// [`Engine::repair`](crate::Engine::repair) on a document whose stored
    /// data reads: nothing to repair, nothing was changed.
    #[error("document {0} is not quarantined: its stored data reads; nothing was changed")]
    NotQuarantined(DocId),

    /// A RocksDB read, write or fsync failed. Fatal: the engine refuses all
    /// further work, because state on disk can no longer be trusted to match
    /// what was acknowledged. Stop the process, fix the disk, reopen.
    #[error("storage failure, the engine has stopped: {0}")]
    Storage(String),

    /// The engine is draining (see [`Engine::start_draining`](crate::Engine::start_draining)):
    /// it takes no new writes from clients; reads and changes from peers
    /// go on. Nothing was written; write at another node.
    #[error("this node is draining: it takes no new writes; write at another node")]
    Draining,

    /// The disk holding the store is nearly full (see
    /// [`Engine::set_low_disk`](crate::Engine::set_low_disk)): no new
    /// writes from clients until space is freed; reads and changes from
    /// peers go on. Nothing was written.
    #[error("the disk holding this node's store is nearly full: it takes no new writes until space is freed")]
    LowDisk,

    /// A backup could not be taken, checked or prepared for restoring: the
    /// target exists, a file is missing or damaged, the disk is full. The
    /// open store (if any) is unaffected and keeps working.
    #[error("backup at {}: {reason}", path.display())]
    Backup {
        /// The backup's store directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The configuration breaks a rule; see the message.
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

fn fmt_hashes(hashes: &[ChangeHash]) -> String {
    let parts: Vec<String> = hashes.iter().map(|h| h.to_string()).collect();
    parts.join(",")
}

/// Which limit a refusal hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldLimitKind {
    /// [`EngineConfig::max_held_changes_per_doc`].
    DocumentChanges,
    /// [`EngineConfig::max_held_bytes_per_doc`].
    DocumentBytes,
    /// [`EngineConfig::max_held_changes`].
    EngineChanges,
    /// [`EngineConfig::max_held_bytes`].
    EngineBytes,
}

impl HeldLimitKind {
    /// A stable name, for error bodies and metrics.
    pub fn name(self) -> &'static str {
        match self {
            HeldLimitKind::DocumentChanges => "max_held_changes_per_doc",
            HeldLimitKind::DocumentBytes => "max_held_bytes_per_doc",
            HeldLimitKind::EngineChanges => "max_held_changes",
            HeldLimitKind::EngineBytes => "max_held_bytes",
        }
    }
}

impl std::fmt::Display for HeldLimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
