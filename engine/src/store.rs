//! The RocksDB store: opening and validating a directory, reading the layout in
//! [`layout`](crate::layout), and committing WriteBatches with the configured
//! durability.
//!
//! Any RocksDB error other than detected corruption is fatal: the store records
//! it and every later call returns [`Error::Storage`] (invariant 7). Corruption
//! of one record is reported as [`Error::Corrupt`] with its key and leaves the
//! rest of the store usable.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, DBRecoveryMode,
    Direction, ErrorKind, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::config::{Durability, EngineConfig, Footprint};
use crate::doc_id::DocId;
use crate::error::{Error, Result};
use crate::group_commit::GroupCommit;
use crate::layout::{self, DocMeta};

/// An open store directory.
pub(crate) struct Store {
    db: DB,
    path: PathBuf,
    durability: Durability,
    group: GroupCommit<WriteBatch>,
    /// Group-commit ticket of the latest [`Wait::Deferred`] write (0: none).
    deferred: AtomicU64,
    failed: OnceLock<String>,
    /// Opened with [`Store::open_read_only`].
    read_only: bool,
}

/// Whether a write waits for the durability the store is configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Return once the write is as durable as [`Durability`] requires.
    Durable,
    /// Return once the write is in RocksDB (memtable and WAL buffer), not yet
    /// fsynced; [`Store::sync_deferred`] later makes it durable. Only for
    /// received changes, whose sender holds them durably: nothing derived
    /// from such a write may leave the node before that sync returns.
    Deferred,
}

/// What `open` found in the directory.
enum DirState {
    /// Missing or empty: a new store may be created.
    Fresh,
    /// Carries a Causeway marker with this format version.
    Marked(u32),
}

impl Store {
    /// Opens (or creates) the store at `path`. Refuses directories that are not
    /// Causeway stores and stores of a newer format without writing to them.
    pub(crate) fn open(path: &Path, config: &EngineConfig) -> Result<Store> {
        let path = path.to_path_buf();
        let fresh = match inspect(&path)? {
            DirState::Fresh if !config.create_if_missing => {
                return Err(Error::NotAStore {
                    path,
                    reason: "the directory is missing or empty and create_if_missing is off".into(),
                })
            }
            DirState::Fresh => {
                fs::create_dir_all(&path)
                    .map_err(|e| io_fatal(&path, "create the store directory", e))?;
                write_marker(&path)?;
                true
            }
            DirState::Marked(found) if found > layout::FORMAT_VERSION => {
                return Err(Error::FormatTooNew {
                    path,
                    found,
                    supported: layout::FORMAT_VERSION,
                })
            }
            DirState::Marked(found) if found < layout::OLDEST_FORMAT_VERSION => {
                return Err(Error::NotAStore {
                    path,
                    reason: format!("storage format {found} is older than any this build opens"),
                })
            }
            DirState::Marked(_) => false,
        };
        let create = !path.join("CURRENT").exists();
        if create && !fresh {
            check_only_marker(&path)?;
        }
        let db = open_db(&path, create, config.footprint)?;
        let store = Store {
            db,
            path,
            durability: config.durability,
            group: GroupCommit::default(),
            deferred: AtomicU64::new(0),
            failed: OnceLock::new(),
            read_only: false,
        };
        store.check_format()?;
        Ok(store)
    }

    /// Opens the store at `path` for reading only, writing nothing to the
    /// directory (RocksDB's info log goes to `log_dir`): for checking a
    /// backup in place. Only the current format is accepted.
    pub(crate) fn open_read_only(path: &Path, log_dir: &Path) -> Result<Store> {
        let path = path.to_path_buf();
        match inspect(&path)? {
            DirState::Marked(layout::FORMAT_VERSION) => {}
            DirState::Marked(found) => {
                return Err(Error::NotAStore {
                    path,
                    reason: format!(
                        "storage format {found}; only format {} is read in place",
                        layout::FORMAT_VERSION
                    ),
                })
            }
            DirState::Fresh => {
                return Err(Error::NotAStore {
                    path,
                    reason: "the directory is missing or empty".into(),
                })
            }
        }
        let mut opts = Options::default();
        opts.set_db_log_dir(log_dir);
        let cfs = std::iter::once(&rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .chain(layout::COLUMN_FAMILIES.iter())
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name, Footprint::Small)));
        let db = DB::open_cf_descriptors_read_only(&opts, &path, cfs, false)
            .map_err(|e| open_error(&path, e))?;
        Ok(Store {
            db,
            path,
            durability: Durability::Sync,
            group: GroupCommit::default(),
            deferred: AtomicU64::new(0),
            failed: OnceLock::new(),
            read_only: true,
        })
    }

    /// A consistent copy of the store in `dir` (which must not exist):
    /// RocksDB flushes its memtables, then hard-links the table files
    /// (copying them across file systems) and writes a new manifest; the
    /// marker file follows. Holds every write made before the call.
    pub(crate) fn checkpoint(&self, dir: &Path) -> Result<()> {
        self.check_alive()?;
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|c| c.create_checkpoint(dir))
            .map_err(|e| Error::Backup {
                path: dir.to_path_buf(),
                reason: format!("RocksDB could not create a checkpoint: {e}"),
            })?;
        write_marker(dir).map_err(|e| Error::Backup {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Replaces this store's id (see [`layout::KEY_STORE_ID`]) with `id`,
    /// durably.
    pub(crate) fn set_store_id(&self, id: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(layout::CF_NODE),
            layout::KEY_STORE_ID,
            id.as_bytes(),
        );
        self.write(batch, Wait::Durable)
    }

    /// Confirms the format version recorded inside the database, writing it
    /// on first open. The marker file and this record must agree. An older
    /// format this build opens is upgraded: the record first (synced), then
    /// the marker file, so a crash in between leaves a store that still
    /// opens and finishes the upgrade.
    fn check_format(&self) -> Result<()> {
        let cf = self.cf(layout::CF_NODE);
        let stored = self
            .db
            .get_cf(cf, layout::KEY_FORMAT_VERSION)
            .map_err(|e| self.fatal(e))?;
        let version = stored.as_deref().and_then(|b| <[u8; 4]>::try_from(b).ok());
        let version = version.map(u32::from_be_bytes);
        let marker = parse_marker(
            &fs::read_to_string(self.path.join(layout::MARKER_FILE)).unwrap_or_default(),
        );
        match (stored, version) {
            (None, _) | (Some(_), Some(layout::OLDEST_FORMAT_VERSION..layout::FORMAT_VERSION)) => {
                let mut batch = WriteBatch::default();
                batch.put_cf(
                    cf,
                    layout::KEY_FORMAT_VERSION,
                    layout::FORMAT_VERSION.to_be_bytes(),
                );
                let mut opts = WriteOptions::default();
                opts.set_sync(true);
                self.db.write_opt(batch, &opts).map_err(|e| self.fatal(e))?;
                if version.is_some() {
                    tracing::info!(path = %self.path.display(), from = ?version, to = layout::FORMAT_VERSION, "storage format upgraded");
                }
                self.upgrade_marker(marker.ok())
            }
            (Some(_), Some(layout::FORMAT_VERSION)) => self.upgrade_marker(marker.ok()),
            (Some(bytes), _) => Err(Error::Corrupt {
                doc: String::new(),
                key: layout::describe_key(layout::CF_NODE, layout::KEY_FORMAT_VERSION),
                reason: format!(
                    "format version record {bytes:?} is not format {} as the marker file says",
                    layout::FORMAT_VERSION
                ),
            }),
        }
    }

    /// This store's id (see [`layout::KEY_STORE_ID`]), made from `fresh`
    /// and written durably if the store has none yet. A record that is not
    /// a UUID string is reported as corrupt.
    pub(crate) fn store_id(&self, fresh: impl FnOnce() -> String) -> Result<String> {
        if let Some(id) = self.recorded_store_id()? {
            return Ok(id);
        }
        let id = fresh();
        self.set_store_id(&id)?;
        Ok(id)
    }

    /// The store id recorded in the store, if any; a record that is not a
    /// UUID string is reported as corrupt.
    pub(crate) fn recorded_store_id(&self) -> Result<Option<String>> {
        let stored = self
            .db
            .get_cf(self.cf(layout::CF_NODE), layout::KEY_STORE_ID)
            .map_err(|e| self.fatal(e))?;
        let Some(bytes) = stored else {
            return Ok(None);
        };
        String::from_utf8(bytes)
            .ok()
            .filter(|s| layout::is_store_id(s))
            .map(Some)
            .ok_or_else(|| Error::Corrupt {
                doc: String::new(),
                key: layout::describe_key(layout::CF_NODE, layout::KEY_STORE_ID),
                reason: "the store id is not a UUID".into(),
            })
    }

    /// Rewrites a marker file that names an older format than the record.
    fn upgrade_marker(&self, marker: Option<u32>) -> Result<()> {
        if marker == Some(layout::FORMAT_VERSION) {
            return Ok(());
        }
        write_marker(&self.path)
    }

    /// The directory of this store.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Number of WAL fsyncs performed by group commit.
    pub(crate) fn wal_syncs(&self) -> u64 {
        self.group.syncs()
    }

    /// Fails if an earlier storage error stopped the store.
    pub(crate) fn check_alive(&self) -> Result<()> {
        match self.failed.get() {
            Some(msg) => Err(Error::Storage(msg.clone())),
            None => Ok(()),
        }
    }

    /// Handle of one of Causeway's column families.
    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        // Every name in layout::COLUMN_FAMILIES is created or opened by open_db.
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(name)
            .expect("column family opened at startup")
    }

    /// Writes `batch` atomically; with [`Wait::Durable`] returns once it is
    /// as durable as the configured [`Durability`] requires, with
    /// [`Wait::Deferred`] as soon as RocksDB holds it.
    pub(crate) fn write(&self, batch: WriteBatch, wait: Wait) -> Result<()> {
        self.check_alive()?;
        if self.durability == Durability::Sync && wait == Wait::Durable {
            return self
                .group
                .commit(batch, |b| self.write_unsynced(b), || self.sync_wal())
                .map_err(|msg| self.fatal_msg(msg));
        }
        self.write_unsynced(batch)
            .map_err(|msg| self.fatal_msg(msg))?;
        if self.durability == Durability::Sync {
            let ticket = self.group.written();
            self.deferred.fetch_max(ticket, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Returns once every [`Wait::Deferred`] write made so far is as durable
    /// as the configured [`Durability`] requires: at most one WAL fsync,
    /// none if a later group commit already covered them.
    pub(crate) fn sync_deferred(&self) -> Result<()> {
        self.check_alive()?;
        match self.deferred.load(Ordering::SeqCst) {
            0 => Ok(()),
            ticket => self
                .group
                .wait_durable(ticket, |b| self.write_unsynced(b), || self.sync_wal())
                .map_err(|msg| self.fatal_msg(msg)),
        }
    }

    /// Writes `batch` into the memtables and the WAL's OS buffers.
    fn write_unsynced(&self, batch: WriteBatch) -> std::result::Result<(), String> {
        self.db
            .write_opt(batch, &WriteOptions::default())
            .map_err(|e| e.to_string())
    }

    /// Syncs every live WAL file.
    fn sync_wal(&self) -> std::result::Result<(), String> {
        self.db
            .flush_wal(true)
            .map_err(|e| format!("WAL fsync failed: {e}"))
    }

    /// Reads a document's metadata; `None` if the document never existed.
    pub(crate) fn meta(&self, doc: &DocId) -> Result<Option<DocMeta>> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_DOC_META);
        match self.db.get_pinned_cf(cf, doc.as_bytes()) {
            Ok(Some(bytes)) => DocMeta::decode(doc.as_str(), &bytes).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(self.read_error(e, doc, layout::CF_DOC_META, doc.as_bytes())),
        }
    }

    /// Reads a document's snapshot, if it has one.
    pub(crate) fn snapshot(&self, doc: &DocId) -> Result<Option<Vec<u8>>> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_SNAPSHOT);
        self.db
            .get_cf(cf, doc.as_bytes())
            .map_err(|e| self.read_error(e, doc, layout::CF_SNAPSHOT, doc.as_bytes()))
    }

    /// Reads the stored sync state with `peer` for `doc`, if any.
    pub(crate) fn peer_sync(&self, peer: &str, doc: &DocId) -> Result<Option<Vec<u8>>> {
        self.check_alive()?;
        let key = layout::peer_sync_key(peer, doc);
        self.db
            .get_cf(self.cf(layout::CF_PEER_SYNC), &key)
            .map_err(|e| self.read_error(e, doc, layout::CF_PEER_SYNC, &key))
    }

    /// Reads the held changes of `doc` as `(key, value)`, in key order.
    pub(crate) fn held(&self, doc: &DocId) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_HELD);
        let prefix = layout::log_prefix(doc);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.read_error(e, doc, layout::CF_HELD, &prefix))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Calls `f` with the key and value length of every held change, in
    /// key order.
    pub(crate) fn for_each_held(&self, mut f: impl FnMut(&[u8], usize)) -> Result<()> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_HELD);
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.fatal(e))?;
            f(&k, v.len());
        }
        Ok(())
    }

    /// Calls `f` with every document's id and metadata, in id order, deleted
    /// documents included.
    /// An entry that does not decode goes to `corrupt` (as
    /// [`Error::Corrupt`]) and the walk goes on.
    pub(crate) fn for_each_meta(
        &self,
        mut f: impl FnMut(DocId, DocMeta),
        mut corrupt: impl FnMut(Error),
    ) -> Result<()> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_DOC_META);
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.fatal(e))?;
            match decode_meta_entry(&k, &v) {
                Ok((id, meta)) => f(id, meta),
                Err(e) => corrupt(e),
            }
        }
        Ok(())
    }

    /// Calls `f` with every document's id and [`layout::MetaDigest`], in id
    /// order, deleted and collected documents included: the digest is read
    /// without decoding the rest of the record (see
    /// [`layout::read_digest`]), which makes the walk several times
    /// faster. An entry that does not decode goes to `corrupt` and the walk
    /// goes on.
    pub(crate) fn for_each_digest(
        &self,
        mut f: impl FnMut(DocId, layout::MetaDigest),
        mut corrupt: impl FnMut(Error),
    ) -> Result<()> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_DOC_META);
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.fatal(e))?;
            let fast = std::str::from_utf8(&k)
                .ok()
                .and_then(|id| DocId::new(id).ok())
                .zip(layout::read_digest(&v));
            match fast {
                Some((id, digest)) => f(id, digest),
                // The full decode says what is wrong, or reads a record
                // written some other way.
                None => match decode_meta_entry(&k, &v) {
                    Ok((id, meta)) => {
                        let mut digest = [0u8; 32];
                        digest.copy_from_slice(&meta.digest);
                        let collected = meta.collected_at.is_some();
                        f(id, layout::MetaDigest { digest, collected });
                    }
                    Err(e) => corrupt(e),
                },
            }
        }
        Ok(())
    }

    /// Deletes every record of `doc` in one durable batch: metadata,
    /// snapshot, change log, held changes, and the sync state saved with
    /// every peer (found by a scan of all peers' sync states).
    pub(crate) fn discard(&self, doc: &DocId) -> Result<()> {
        self.check_alive()?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(layout::CF_DOC_META), doc.as_bytes());
        self.stage_history_delete(&mut batch, doc);
        let cf = self.cf(layout::CF_PEER_SYNC);
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.fatal(e))?;
            // Keys are peer, 0x00, document; peer ids never contain 0x00.
            let ours = k
                .iter()
                .position(|b| *b == 0)
                .is_some_and(|at| &k[at + 1..] == doc.as_bytes());
            if ours {
                batch.delete_cf(cf, &k);
            }
        }
        self.write(batch, Wait::Durable)
    }

    /// Adds to `batch` the deletion of `doc`'s history: snapshot, change
    /// log and held changes.
    pub(crate) fn stage_history_delete(&self, batch: &mut WriteBatch, doc: &DocId) {
        batch.delete_cf(self.cf(layout::CF_SNAPSHOT), doc.as_bytes());
        let from = layout::log_prefix(doc);
        let mut to = doc.as_bytes().to_vec();
        to.push(1);
        for name in [layout::CF_CHANGE_LOG, layout::CF_HELD] {
            batch.delete_range_cf(self.cf(name), &from, &to);
        }
    }

    /// Calls `f` with the id and metadata of at most `limit` documents
    /// strictly after `after`, in id order, deleted and collected ones
    /// included; returns the last id read if more may follow (`None`: the
    /// walk reached the end). An entry that does not decode goes to
    /// `corrupt` and counts towards `limit`.
    pub(crate) fn scan_meta(
        &self,
        after: Option<&DocId>,
        limit: usize,
        mut f: impl FnMut(DocId, DocMeta),
        mut corrupt: impl FnMut(Error),
    ) -> Result<Option<DocId>> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_DOC_META);
        let start = after.map_or_else(Vec::new, |a| {
            let mut past = a.as_bytes().to_vec();
            past.push(0);
            past
        });
        let mut last = None;
        let iter = self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward));
        for (read, item) in iter.enumerate() {
            if read == limit {
                return Ok(last);
            }
            let (k, v) = item.map_err(|e| self.fatal(e))?;
            match decode_meta_entry(&k, &v) {
                Ok((id, meta)) => {
                    last = Some(id.clone());
                    f(id, meta);
                }
                Err(e) => {
                    // Past it, if its key is an id at all.
                    if let Ok(id) = DocId::new(String::from_utf8_lossy(&k).into_owned()) {
                        last = Some(id);
                    }
                    corrupt(e);
                }
            }
        }
        Ok(None)
    }

    /// Compacts every column family over its whole key range (flushing
    /// memtables first): deleted records' space is reclaimed.
    pub(crate) fn compact_all(&self) -> Result<()> {
        self.check_alive()?;
        for name in layout::COLUMN_FAMILIES {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Reads a record of [`layout::CF_NODE`].
    pub(crate) fn node_record(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_alive()?;
        self.db
            .get_cf(self.cf(layout::CF_NODE), key)
            .map_err(|e| self.fatal(e))
    }

    /// The distinct peers with sync states in [`layout::CF_PEER_SYNC`], in
    /// order: after each, the walk seeks past all of its keys.
    pub(crate) fn peer_sync_peers(&self) -> Result<Vec<String>> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_PEER_SYNC);
        let mut peers = Vec::new();
        let mut from = Vec::new();
        loop {
            let mut iter = self
                .db
                .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward));
            let Some(item) = iter.next() else {
                return Ok(peers);
            };
            let (key, _) = item.map_err(|e| self.fatal(e))?;
            // Keys are peer, 0x00, document; peer ids never contain 0x00.
            let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            let peer = &key[..end];
            peers.push(String::from_utf8_lossy(peer).into_owned());
            from = peer.to_vec();
            from.push(1);
        }
    }

    /// Reads a document's log entries with sequence numbers in `[start, end)`,
    /// in order, as `(key, bytes)`.
    pub(crate) fn log_entries(
        &self,
        doc: &DocId,
        start: u64,
        end: u64,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_CHANGE_LOG);
        let from = layout::log_key(doc, start);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(layout::log_key(doc, end));
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(cf, opts, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.read_error(e, doc, layout::CF_CHANGE_LOG, &from))?;
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Lists live (not deleted) documents whose id starts with `prefix`,
    /// strictly after `after`, at most `limit` of them. Also returns whether
    /// more remain. Entries that do not decode go to `corrupt` and are
    /// left out.
    pub(crate) fn list(
        &self,
        prefix: &str,
        after: Option<&DocId>,
        limit: usize,
        mut corrupt: impl FnMut(Error),
    ) -> Result<(Vec<DocId>, bool)> {
        self.check_alive()?;
        let cf = self.cf(layout::CF_DOC_META);
        let mut start = prefix.as_bytes().to_vec();
        if let Some(after) = after {
            let mut past = after.as_bytes().to_vec();
            past.push(0);
            start = start.max(past);
        }
        let mut ids = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.fatal(e))?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let (id, meta) = match decode_meta_entry(&k, &v) {
                Ok(entry) => entry,
                Err(e) => {
                    corrupt(e);
                    continue;
                }
            };
            if meta.tombstone {
                continue;
            }
            if ids.len() == limit {
                return Ok((ids, true));
            }
            ids.push(id);
        }
        Ok((ids, false))
    }

    fn read_error(&self, e: rocksdb::Error, doc: &DocId, cf: &str, key: &[u8]) -> Error {
        if e.kind() == ErrorKind::Corruption {
            return Error::Corrupt {
                doc: doc.to_string(),
                key: layout::describe_key(cf, key),
                reason: e.to_string(),
            };
        }
        self.fatal(e)
    }

    /// The last key of column family `cf`, if it holds any.
    pub(crate) fn last_key(&self, cf: &str) -> Result<Option<Box<[u8]>>> {
        self.check_alive()?;
        match self.db.iterator_cf(self.cf(cf), IteratorMode::End).next() {
            None => Ok(None),
            Some(Ok((k, _))) => Ok(Some(k)),
            Some(Err(e)) => Err(self.fatal(e)),
        }
    }

    /// Calls `f` with each key and value of column family `cf` from `start`
    /// on, in key order, until it returns `Ok(false)` or an error.
    pub(crate) fn scan_from(
        &self,
        cf: &str,
        start: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        self.check_alive()?;
        let iter = self
            .db
            .iterator_cf(self.cf(cf), IteratorMode::From(start, Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(|e| self.fatal(e))?;
            if !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Records a fatal storage error and returns it.
    fn fatal(&self, e: rocksdb::Error) -> Error {
        self.fatal_msg(e.to_string())
    }

    fn fatal_msg(&self, msg: String) -> Error {
        let msg = self.failed.get_or_init(|| msg).clone();
        tracing::error!(path = %self.path.display(), error = %msg, "storage failure; engine stopped");
        Error::Storage(msg)
    }
}

impl Drop for Store {
    /// Flushes the memtables into table files when the store closes
    /// cleanly, so the next open does not replay the write-ahead log and
    /// flush it first (seconds after a million writes); after a crash the
    /// replay still happens. A store that failed, or opened read-only,
    /// is left as it is.
    fn drop(&mut self) {
        if self.failed.get().is_some() || self.read_only {
            return;
        }
        let cfs: Vec<&ColumnFamily> = layout::COLUMN_FAMILIES
            .iter()
            .filter_map(|name| self.db.cf_handle(name))
            .collect();
        if let Err(e) = self
            .db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
        {
            tracing::warn!(path = %self.path.display(), error = %e, "flush at close failed; the next open replays the log");
        }
    }
}

/// Classifies the directory without writing to it.
fn inspect(path: &Path) -> Result<DirState> {
    let not_a_store = |reason: String| Error::NotAStore {
        path: path.to_path_buf(),
        reason,
    };
    if !path.exists() {
        return Ok(DirState::Fresh);
    }
    if !path.is_dir() {
        return Err(not_a_store("it is not a directory".into()));
    }
    let marker = path.join(layout::MARKER_FILE);
    if marker.exists() {
        let text = fs::read_to_string(&marker)
            .map_err(|e| not_a_store(format!("unreadable marker file: {e}")))?;
        return parse_marker(&text)
            .map(DirState::Marked)
            .map_err(not_a_store);
    }
    let mut entries =
        fs::read_dir(path).map_err(|e| not_a_store(format!("unreadable directory: {e}")))?;
    if entries.next().is_none() {
        return Ok(DirState::Fresh);
    }
    let reason = if path.join("CURRENT").exists() {
        "it holds a RocksDB database that Causeway did not create (no CAUSEWAY marker file)"
    } else {
        "the directory is not empty and has no CAUSEWAY marker file"
    };
    Err(not_a_store(reason.into()))
}

/// A marked directory without RocksDB's `CURRENT` file may only be a store
/// whose creation stopped right after the marker was written. Anything else
/// there means a damaged database, which must not be silently replaced by a
/// new empty one.
/// Decodes one `doc_meta` entry, reporting a bad key or value as corrupt.
fn decode_meta_entry(key: &[u8], value: &[u8]) -> Result<(DocId, DocMeta)> {
    let key_str = String::from_utf8_lossy(key).into_owned();
    let id = DocId::new(key_str.clone()).map_err(|e| Error::Corrupt {
        doc: key_str.clone(),
        key: layout::describe_key(layout::CF_DOC_META, key),
        reason: format!("stored key is not a valid document id: {e}"),
    })?;
    let meta = DocMeta::decode(&key_str, value)?;
    Ok((id, meta))
}

fn check_only_marker(path: &Path) -> Result<()> {
    let entries = fs::read_dir(path).map_err(|e| io_fatal(path, "list the store directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_fatal(path, "list the store directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(layout::MARKER_FILE) {
            return Err(Error::Corrupt {
                doc: String::new(),
                key: format!("{}/CURRENT", path.display()),
                reason: format!(
                    "RocksDB's CURRENT file is missing but {name} exists; refusing to create a new database over it \
                     (if this store never held data, remove the directory)"
                ),
            });
        }
    }
    Ok(())
}

fn parse_marker(text: &str) -> std::result::Result<u32, String> {
    let mut lines = text.lines();
    if lines.next() != Some(layout::MARKER_MAGIC) {
        return Err("the CAUSEWAY marker file does not start with the expected magic line".into());
    }
    lines
        .next()
        .and_then(|l| l.strip_prefix("format "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "the CAUSEWAY marker file has no valid format line".to_string())
}

/// Writes the marker file durably: temp file, fsync, rename, fsync directory.
fn write_marker(path: &Path) -> Result<()> {
    let tmp = path.join(format!("{}.tmp", layout::MARKER_FILE));
    let body = format!(
        "{}\nformat {}\n",
        layout::MARKER_MAGIC,
        layout::FORMAT_VERSION
    );
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path.join(layout::MARKER_FILE))?;
        fs::File::open(path)?.sync_all()
    };
    write().map_err(|e| io_fatal(path, "write the marker file", e))
}

fn io_fatal(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Storage(format!("cannot {what} in {}: {e}", path.display()))
}

/// Write buffer per column family with [`Footprint::Small`]; RocksDB
/// preallocates write-ahead log files to 1.1 times the largest.
const SMALL_WRITE_BUFFER_BYTES: usize = 1 << 20;

/// Manifest preallocation with [`Footprint::Small`].
const SMALL_MANIFEST_PREALLOCATION_BYTES: usize = 64 << 10;

fn open_db(path: &Path, create: bool, footprint: Footprint) -> Result<DB> {
    let mut opts = Options::default();
    if footprint == Footprint::Small {
        opts.set_manifest_preallocation_size(SMALL_MANIFEST_PREALLOCATION_BYTES);
    }
    opts.create_if_missing(create);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    // RocksDB's default, named because the replicator relies on it: after a
    // crash the store holds a prefix of the WAL, so a record written after
    // another (a sync state after the changes it covers) never survives
    // without it.
    opts.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
    // The default column family is named too: unnamed, RocksDB would open
    // it with default options, whose write buffer sizes the log's
    // preallocation.
    let cfs = std::iter::once(&rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
        .chain(layout::COLUMN_FAMILIES.iter())
        .map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name, footprint)));
    DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| open_error(path, e))
}

fn open_error(path: &Path, e: rocksdb::Error) -> Error {
    let msg = e.to_string();
    if msg.contains("lock") || msg.contains("LOCK") {
        Error::Locked {
            path: path.to_path_buf(),
        }
    } else if e.kind() == ErrorKind::Corruption {
        Error::Corrupt {
            doc: String::new(),
            key: "(database manifest)".into(),
            reason: msg,
        }
    } else {
        Error::Storage(format!("cannot open RocksDB in {}: {msg}", path.display()))
    }
}

fn cf_options(name: &str, footprint: Footprint) -> Options {
    let mut opts = Options::default();
    if footprint == Footprint::Small {
        opts.set_write_buffer_size(SMALL_WRITE_BUFFER_BYTES);
    }
    opts.set_compression_type(DBCompressionType::Lz4);
    if name == layout::CF_DOC_META || name == layout::CF_SNAPSHOT {
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_parsing() {
        assert_eq!(parse_marker("causeway-store\nformat 1\n"), Ok(1));
        assert_eq!(parse_marker("causeway-store\nformat 7"), Ok(7));
        assert!(parse_marker("something else\nformat 1\n").is_err());
        assert!(parse_marker("causeway-store\n").is_err());
    }
}
