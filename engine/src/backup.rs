//! Backups of a store, in three steps that each stand alone.
//!
//! 1. [`Engine::checkpoint`] takes a consistent copy of an open store into
//!    a new directory while the engine keeps serving: RocksDB flushes its
//!    memtables, hard-links the table files (copying them if the target is
//!    on another file system) and writes a new manifest. The copy holds
//!    every write acknowledged before the call.
//! 2. [`verify`] opens such a copy read-only, writing nothing into it, and
//!    loads every document from it, checking each against the heads its
//!    metadata records, exactly as the engine does when it reads one. A copy
//!    that verifies opens as a store and serves every document it holds.
//! 3. [`renew`] makes a copy a store of its own before it is opened: it gets
//!    a new store id ([`Engine::store_id`]).
//!
//! Why a new id. A restored store is older than what its peers last heard
//! from it: they recorded heads it reported after the backup was taken, and
//! automerge-repo clients keyed their sync state by its id. The store id is
//! the store's incarnation: a node announces it to every peer in its hello,
//! and a peer that sees it change forgets what the node reported before
//! (see `replication::progress`), so nothing is believed held that the
//! restored store does not hold. Writes the cluster holds come back to it
//! through reconciliation. Writes acknowledged only by this node after the
//! backup, and lost with its disk before any peer received them, are gone:
//! no backup can return what it never saw.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use automerge::ActorId;

use crate::config::EngineConfig;
use crate::document::DocState;
use crate::engine::{random_uuid, Engine};
use crate::error::{Error, Result};
use crate::store::Store;

/// One file of a checkpoint, named relative to its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFile {
    /// The file's name inside the checkpoint directory (no separators).
    pub name: String,
    /// Its size.
    pub bytes: u64,
}

/// A checkpoint just taken.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Every file in it, by name.
    pub files: Vec<StoreFile>,
    /// The id of the store it copies.
    pub store_id: String,
}

impl Checkpoint {
    /// Total size of its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// What [`verify`] found in a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Documents that load (deleted ones included).
    pub documents: u64,
    /// Of those, documents whose latest state is deleted.
    pub deleted: u64,
    /// Changes in their histories.
    pub changes: u64,
    /// The store id recorded in the copy.
    pub store_id: String,
}

impl Engine {
    /// Takes a consistent copy of this store into `dir`, which must not
    /// exist yet (its parent must). Writes keep going meanwhile; the copy
    /// holds every write acknowledged before the call. Put `dir` on the
    /// store's file system to make the copy cost hard links, not bytes.
    pub fn checkpoint(&self, dir: &Path) -> Result<Checkpoint> {
        if dir.exists() {
            return Err(backup_error(
                dir,
                "the directory exists; a checkpoint goes into a new one",
            ));
        }
        self.inner.store.checkpoint(dir)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files: list_files(dir)?,
            store_id: self.store_id().to_string(),
        })
    }
}

/// Every file in a checkpoint directory, sorted by name. A checkpoint holds
/// plain files only; anything else is refused.
pub fn list_files(dir: &Path) -> Result<Vec<StoreFile>> {
    let io = |e: std::io::Error| backup_error(dir, &format!("cannot list the directory: {e}"));
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let meta = entry.metadata().map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !meta.is_file() {
            return Err(backup_error(
                dir,
                &format!("{name} is not a plain file; a checkpoint holds only files"),
            ));
        }
        files.push(StoreFile {
            name,
            bytes: meta.len(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Most threads [`verify`] loads documents on.
pub const MAX_VERIFY_THREADS: usize = 8;

/// How often [`verify`] reports progress while its threads work.
const VERIFY_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// Opens the copy in `dir` read-only (nothing in it is written; RocksDB's
/// info log goes to a temporary directory) and loads every document,
/// checking it against its recorded heads, on one thread per core (at most
/// [`MAX_VERIFY_THREADS`]). `progress` hears `(done, total)` documents as
/// it goes. Fails on a document that does not load, naming it.
pub fn verify(dir: &Path, mut progress: impl FnMut(u64, u64)) -> Result<Verified> {
    let logs = tempfile::tempdir()
        .map_err(|e| backup_error(dir, &format!("cannot make a temporary directory: {e}")))?;
    let store = Store::open_read_only(dir, logs.path())?;
    let store_id = store
        .recorded_store_id()?
        .ok_or_else(|| backup_error(dir, "the copy records no store id"))?;
    let mut total = 0u64;
    let mut first_error = None;
    store.for_each_meta(
        |_, _| total += 1,
        |e| {
            first_error.get_or_insert(e);
        },
    )?;
    if let Some(e) = first_error {
        return Err(backup_error(dir, &e.to_string()));
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_VERIFY_THREADS);
    let tally = Tally::default();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                let (store, tally) = (&store, &tally);
                scope.spawn(move || verify_share(store, k, threads, tally))
            })
            .collect();
        while !workers.iter().all(|w| w.is_finished()) {
            progress(tally.documents.load(Ordering::Relaxed), total);
            std::thread::sleep(VERIFY_PROGRESS_EVERY);
        }
        for worker in workers {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tally.fail(e),
                Err(_) => tally.fail(backup_error(dir, "a verifying thread panicked")),
            }
        }
    });
    progress(tally.documents.load(Ordering::Relaxed), total);
    let failed = tally.failed.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = failed {
        return Err(backup_error(dir, &e.to_string()));
    }
    Ok(Verified {
        documents: tally.documents.into_inner(),
        deleted: tally.deleted.into_inner(),
        changes: tally.changes.into_inner(),
        store_id,
    })
}

/// What the verifying threads found, shared.
#[derive(Default)]
struct Tally {
    documents: AtomicU64,
    deleted: AtomicU64,
    changes: AtomicU64,
    failed: Mutex<Option<Error>>,
}

impl Tally {
    fn fail(&self, e: Error) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert(e);
    }

    fn has_failed(&self) -> bool {
        self.failed.lock().map_or(true, |f| f.is_some())
    }
}

/// Loads every `threads`-th document of the store, starting at the
/// `k`-th, until a document anywhere fails.
fn verify_share(store: &Store, k: usize, threads: usize, tally: &Tally) -> Result<()> {
    let actor = ActorId::from([0u8; 16]);
    let mut i = 0usize;
    store.for_each_meta(
        |id, meta| {
            let mine = i % threads == k;
            i += 1;
            if !mine || tally.has_failed() {
                return;
            }
            match DocState::load(store, &id, actor.clone(), false) {
                Ok(_) => {
                    tally
                        .deleted
                        .fetch_add(u64::from(meta.tombstone), Ordering::Relaxed);
                    tally
                        .changes
                        .fetch_add(meta.change_count, Ordering::Relaxed);
                    tally.documents.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tally.fail(e),
            }
        },
        |e| tally.fail(e),
    )
}

/// Makes the copy in `dir` a store of its own: gives it a new store id
/// (durably) and returns it. Call it once, on the restored copy, before a
/// node opens it.
pub fn renew(dir: &Path) -> Result<String> {
    let config = EngineConfig {
        create_if_missing: false,
        ..EngineConfig::default()
    };
    let store = Store::open(dir, &config)?;
    let id = random_uuid();
    store.set_store_id(&id)?;
    Ok(id)
}

fn backup_error(dir: &Path, reason: &str) -> Error {
    Error::Backup {
        path: dir.to_path_buf(),
        reason: reason.to_string(),
    }
}
