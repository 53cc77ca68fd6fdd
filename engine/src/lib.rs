//! # causeway-engine
//!
//! The embeddable core of Causeway: Automerge documents kept durably in
//! RocksDB, usable on its own by an edge application with no network at all.
//! No tokio, no sockets; every call is synchronous and safe from any thread.
//!
//! ## How a write flows
//!
//! 1. The caller names a document with a validated [`DocId`] and runs a
//!    transaction ([`Engine::update`]), or writes JSON ([`Engine::put_json`],
//!    [`Engine::merge_json`]), or hands over changes received from elsewhere
//!    ([`Engine::apply_changes`]).
//! 2. The engine locks that one document (other documents proceed in
//!    parallel), loading it from disk on first use into a cache bounded by
//!    [`EngineConfig::cache_budget_bytes`].
//! 3. The transaction runs against the in-memory Automerge document. New
//!    documents are first rooted in their deterministic genesis change (see
//!    [`lineage`]); received changes are validated in full before any is applied.
//! 4. The resulting changes and the document's new metadata (heads, digest of
//!    heads, change count, tombstone flag) go into **one** RocksDB WriteBatch:
//!    appended to the document's change log, or, once the log is long enough,
//!    folded with it into a fresh snapshot that replaces the log in the same
//!    batch ([`CompactionPolicy`]).
//! 5. With the default [`Durability::Sync`] the call returns only after the
//!    batch is in a fsynced WAL; concurrent writers share fsyncs (group commit).
//! 6. Subscribers ([`Engine::subscribe`]) get a [`DocEvent`] with the new heads,
//!    after the write is durable.
//!
//! Received changes whose dependencies are missing are [`held`]: stored in
//! the same batch, applied when the dependencies arrive, and never dropped;
//! at a held-change limit a client's changes are refused instead
//! ([`Error::HeldLimit`]).
//!
//! A storage error at any step is fatal: the engine stops and every later call
//! returns [`Error::Storage`]. Bad input (ids, JSON, change bytes, foreign or
//! newer-format directories) gets a specific [`Error`] and changes nothing.
//!
//! ## Two replicas converging
//!
//! ```
//! use causeway_engine::{DocId, Engine, EngineConfig};
//! use serde_json::json;
//!
//! let (a_dir, b_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
//! let a = Engine::open(a_dir.path(), EngineConfig::default())?;
//! let b = Engine::open(b_dir.path(), EngineConfig::default())?;
//! let id = DocId::new("notes/1")?;
//!
//! // Both write while disconnected.
//! a.put_json(&id, &json!({"title": "draft"}))?;
//! b.merge_json(&id, &json!({"tags": ["x"]}))?;
//!
//! // Exchange everything each side lacks; order and repetition do not matter.
//! b.apply_changes(&id, &a.changes_since(&id, &[])?)?;
//! a.apply_changes(&id, &b.changes_since(&id, &[])?)?;
//!
//! assert_eq!(a.heads(&id)?, b.heads(&id)?);
//! assert_eq!(a.get_json(&id)?, json!({"title": "draft", "tags": ["x"]}));
//! assert_eq!(a.get_json(&id)?, b.get_json(&id)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod audit;
mod audit_log;
pub mod backup;
mod cache;
pub mod collection;
mod config;
mod doc_id;
mod doc_sync;
mod document;
mod engine;
mod error;
mod events;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod group_commit;
mod guarded;
pub mod held;
pub mod json;
pub mod layout;
pub mod lineage;
pub mod quarantine;
mod received;
pub mod replication;
pub mod session;
pub mod shape;
#[cfg(feature = "sim")]
pub mod sim;
mod store;
pub mod token;

pub use automerge;
pub use config::{CompactionPolicy, Durability, EngineConfig, Footprint};
pub use doc_id::{validate_prefix, DocId, DocIdError, DOC_ID_PUNCTUATION, MAX_DOC_ID_LEN};
pub use doc_sync::{SyncMessage, SyncState, MAX_PEER_ID_LEN};
pub use engine::{
    ApplyOutcome, Committed, DocInfo, Engine, EngineStats, HeldInfo, ListPage, MAX_LIST_LIMIT,
};
pub use error::HeldLimitKind;
pub use error::{Error, Result};
pub use events::{DocEvent, Origin, Origins, Subscription};
pub use held::MAX_REPORTED_MISSING;
pub use quarantine::Quarantined;
pub use shape::{ShapeLimits, ShapeViolation};
pub use token::{SessionToken, TokenError, TokenKey};
