//! Engine configuration: plain, validated data with durable defaults.
//!
//! Every bound the engine enforces is a field here (or a named constant in the
//! module that enforces it), documented with what happens when it is reached.

use automerge::ActorId;

use crate::error::Error;
use crate::shape::{ShapeLimits, MAX_DEPTH_CEILING};

/// When a commit is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge only after the commit's WriteBatch is in a synced (fsynced)
    /// RocksDB WAL. Concurrent committers share one fsync (group commit). The
    /// default, and the only mode in which "acknowledged" means "survives power
    /// loss".
    #[default]
    Sync,
    /// Acknowledge once the WriteBatch is in the WAL's OS buffers, without
    /// fsync. Survives a crash of the process, not of the machine. Must be
    /// asked for by name.
    Buffered,
}

/// When a document's change log is folded into a snapshot.
///
/// Folding costs one `Automerge::save()` of the whole document; replaying the
/// log costs applying each logged change on load. The defaults (10,000 changes
/// or 4 MiB) keep saves rare for documents edited keystroke by keystroke (see
/// `docs/benchmarks.md`) while bounding what a load must replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Fold once the log holds this many changes.
    pub max_log_changes: u64,
    /// Fold once the log holds this many bytes of change data.
    pub max_log_bytes: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            max_log_changes: 10_000,
            max_log_bytes: 4 << 20,
        }
    }
}

/// How much memory and disk the store reserves up front.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Footprint {
    /// RocksDB's defaults for a server: a 64 MiB write buffer per column
    /// family, and write-ahead log files preallocated to about 70 MiB.
    #[default]
    Server,
    /// For devices, tests and the simulator, where many stores share one
    /// machine (or live on tmpfs, where preallocated space is memory): a
    /// 1 MiB write buffer per column family, write-ahead log files
    /// preallocated to about 1 MiB, manifest files to 64 KiB. Flushes and
    /// compactions come sooner; durability is the same.
    Small,
}

/// Configuration of an [`Engine`](crate::Engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// When commits are acknowledged. Default: [`Durability::Sync`].
    pub durability: Durability,
    /// When a document's change log is folded into a snapshot.
    pub compaction: CompactionPolicy,
    /// Memory budget for documents held in memory, in bytes (estimated, see
    /// `ARCHITECTURE.md`). Idle documents beyond it are evicted, least recently
    /// used first, and reloaded from disk on next use. Default 256 MiB.
    pub cache_budget_bytes: usize,
    /// Largest single Automerge change accepted from elsewhere, in bytes.
    /// Larger changes are rejected with [`Error::ChangeTooLarge`]. Default 8 MiB.
    pub max_change_bytes: usize,
    /// Changes with missing dependencies held (durably) per document,
    /// waiting for those dependencies. Held changes are never dropped: a
    /// client's changes that would exceed this are refused with
    /// [`Error::HeldLimit`] (nothing stored), a peer's are refused and left
    /// to anti-entropy (counted in
    /// [`EngineStats::held_refused`](crate::EngineStats)). Default 10,000.
    pub max_held_changes_per_doc: usize,
    /// Bytes of held changes per document; same rule. Default 16 MiB.
    pub max_held_bytes_per_doc: usize,
    /// Held changes in all documents together; same rule. Default 100,000.
    pub max_held_changes: usize,
    /// Bytes of held changes in all documents together; same rule. Held
    /// changes of a cached document are in memory too (counted in its cache
    /// estimate). Default 256 MiB.
    pub max_held_bytes: usize,
    /// The shape every change and document must keep: nesting depth,
    /// operations and objects per change, document size. Changes that break
    /// it are refused with [`Error::ShapeLimit`] before they are applied,
    /// held or forwarded.
    pub shape: ShapeLimits,
    /// Events buffered per subscriber. When a subscriber falls this far behind,
    /// further events for it are dropped and counted
    /// ([`Subscription::dropped`](crate::Subscription::dropped)). Default 4096.
    pub subscriber_capacity: usize,
    /// Create the store if the directory is missing or empty. Default `true`.
    pub create_if_missing: bool,
    /// What the store reserves up front. Default [`Footprint::Server`].
    pub footprint: Footprint,
    /// Actor id for this open's local changes. `None` (the default) draws a
    /// fresh random actor on every open, so a change lost in a crash can never
    /// have its (actor, sequence) reused. Set it only when the caller derives a
    /// value that is unique per open, as the deterministic simulator does from
    /// its seed, the node and the node's incarnation.
    pub actor: Option<ActorId>,
    /// Id given to the store if this open creates it (a UUID in its
    /// hyphenated form). `None` (the default) draws a random one. An
    /// existing store keeps its id. Set it only to make runs reproducible,
    /// as the deterministic simulator does.
    pub store_id: Option<String>,
    /// Entries the audit feed keeps (see [`audit`](crate::audit)): each
    /// accepted write adds one, and the oldest beyond this is deleted.
    /// 0: no feed. Default 1,000,000 (about 150 MB).
    pub audit_max_entries: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            durability: Durability::Sync,
            compaction: CompactionPolicy::default(),
            cache_budget_bytes: 256 << 20,
            max_change_bytes: 8 << 20,
            max_held_changes_per_doc: 10_000,
            max_held_bytes_per_doc: 16 << 20,
            max_held_changes: 100_000,
            max_held_bytes: 256 << 20,
            shape: ShapeLimits::default(),
            subscriber_capacity: 4096,
            create_if_missing: true,
            footprint: Footprint::Server,
            actor: None,
            store_id: None,
            audit_max_entries: 1_000_000,
        }
    }
}

impl EngineConfig {
    /// Checks that every bound is usable. [`Engine::open`](crate::Engine::open)
    /// calls this first.
    pub fn validate(&self) -> Result<(), Error> {
        let shape = &self.shape;
        let checks: [(bool, &str); 13] = [
            (
                self.compaction.max_log_changes > 0,
                "compaction.max_log_changes must be at least 1",
            ),
            (
                self.compaction.max_log_bytes > 0,
                "compaction.max_log_bytes must be at least 1",
            ),
            (
                self.max_change_bytes >= 64,
                "max_change_bytes must be at least 64",
            ),
            (
                self.max_held_changes_per_doc > 0,
                "max_held_changes_per_doc must be at least 1",
            ),
            (
                self.max_held_bytes_per_doc > 0,
                "max_held_bytes_per_doc must be at least 1",
            ),
            (
                self.max_held_changes >= self.max_held_changes_per_doc,
                "max_held_changes must be at least max_held_changes_per_doc",
            ),
            (
                self.max_held_bytes >= self.max_held_bytes_per_doc,
                "max_held_bytes must be at least max_held_bytes_per_doc",
            ),
            (
                (1..=MAX_DEPTH_CEILING).contains(&shape.max_depth),
                "shape.max_depth must be between 1 and MAX_DEPTH_CEILING (256)",
            ),
            (
                shape.max_ops_per_change > 0,
                "shape.max_ops_per_change must be at least 1",
            ),
            (
                shape.max_objects_per_change > 0,
                "shape.max_objects_per_change must be at least 1",
            ),
            (
                shape.max_document_bytes >= self.max_change_bytes as u64,
                "shape.max_document_bytes must be at least max_change_bytes",
            ),
            (
                self.subscriber_capacity > 0,
                "subscriber_capacity must be at least 1",
            ),
            (
                self.store_id
                    .as_deref()
                    .is_none_or(crate::layout::is_store_id),
                "store_id must be a UUID in its hyphenated form",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err(Error::Config((*msg).to_string())),
            None => Ok(()),
        }
    }
}
