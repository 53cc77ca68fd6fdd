//! Backups of a node, and restoring them.
//!
//! A backup is a directory:
//!
//! | path | what |
//! |---|---|
//! | `store/` | a checkpoint of the node's store (see [`causeway_engine::backup`]) |
//! | `node.key` | the node's identity (mode 0600), only in a backup taken from a data directory |
//! | `backup.json` | the [`Manifest`], written last: a directory without it is an unfinished backup |
//!
//! Taking one ([`take_from_node`], [`take_from_data_dir`]): from a running
//! node, `POST /v1/backup` streams a checkpoint it takes for the request
//! ([`stream`]), and the receiver writes the files, hashing them as they
//! arrive; from a stopped node, the store is opened and checkpointed in
//! place. Either way the copy is then verified (every document loads and
//! matches its recorded heads) before the manifest is written.
//!
//! Restoring ([`restore`]) checks every file against the manifest,
//! verifies the store, copies it into a data directory that has none, and
//! renews its store id: the restored store is a new incarnation, and peers
//! that see the new id in its hello stop believing it holds what it
//! reported before the restore. Reconciliation then brings back every
//! write the cluster holds.

pub mod stream;

use std::fs;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use causeway_engine::backup as store_backup;
use causeway_engine::{Engine, EngineConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use self::stream::{FileEntry, Header};
use crate::identity::KEY_FILE;

/// Name of the manifest in a backup directory.
pub const MANIFEST_FILE: &str = "backup.json";
/// Name of the store checkpoint in a backup directory (and of the store in
/// a data directory).
pub const STORE_DIR: &str = "store";
/// The `format` of every manifest.
pub const MANIFEST_FORMAT: &str = "causeway-backup/1";
/// Longest manifest read.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// What a backup holds, in `backup.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// The Causeway version that wrote it.
    pub causeway_version: String,
    /// When it was finished, milliseconds since the Unix epoch (for
    /// operators; nothing decides by it).
    pub created_unix_ms: u64,
    /// The id of the store copied.
    pub store_id: String,
    /// The node's peer id, when known.
    pub peer_id: Option<String>,
    /// The node's region, when known.
    pub region: Option<String>,
    /// What verification found.
    pub documents: u64,
    /// Of those, deleted documents.
    pub deleted: u64,
    /// Changes in their histories.
    pub changes: u64,
    /// Every file, by path in the backup directory (`store/NAME` or
    /// `node.key`).
    pub files: Vec<ManifestFile>,
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path inside the backup directory.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
}

impl Manifest {
    /// Total bytes of the files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// What taking or restoring a backup did, for the command's report.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The backup directory.
    pub backup: PathBuf,
    /// Bytes written (taking) or copied (restoring).
    pub bytes: u64,
    /// Documents verified.
    pub documents: u64,
    /// Seconds it took, verification included.
    pub seconds: f64,
    /// The store id of the store written: the one copied when taking a
    /// backup, the renewed one when restoring.
    pub store_id: String,
    /// Whether the node's identity (`node.key`) is in the backup (taking)
    /// or was put in place (restoring).
    pub identity: bool,
}

/// Takes a backup of the node at `url` (its HTTP API; `token` if it needs
/// one) into `to`, which must be missing or empty.
pub async fn take_from_node(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    to: &Path,
) -> Result<Summary> {
    let started = Instant::now();
    check_target(to)?;
    let mut request = client.post(format!("{}/v1/backup", url.trim_end_matches('/')));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = crate::client::checked(request.send().await).await?;
    let mut body = BodyReader::new(response);
    let header = Header::decode(&body.line(stream::MAX_HEADER_BYTES).await?)?;
    prepare_target(to)?;
    let store = to.join(STORE_DIR);
    fs::create_dir(&store).with_context(|| format!("cannot create {}", store.display()))?;
    let mut meter = Meter::new("receiving", "bytes", header.bytes());
    let mut files = Vec::with_capacity(header.files.len());
    for entry in &header.files {
        files.push(receive_file(&mut body, &store, entry, &mut meter).await?);
    }
    meter.finish();
    if !body.at_end().await? {
        bail!("the node sent more than its header announced; the backup is not usable");
    }
    sync_dir(&store)?;
    let found = verify_store(&store)?;
    let manifest = Manifest {
        peer_id: header.peer_id,
        region: header.region,
        ..manifest(header.store_id, found, files)
    };
    write_manifest(to, &manifest)?;
    Ok(summary(to, &manifest, started, false))
}

/// Takes a backup of a stopped node's data directory `data_dir` into `to`
/// (missing or empty), its identity included.
pub fn take_from_data_dir(data_dir: &Path, to: &Path) -> Result<Summary> {
    let config = EngineConfig {
        create_if_missing: false,
        ..EngineConfig::default()
    };
    let engine = match Engine::open(data_dir.join(STORE_DIR), config) {
        Err(causeway_engine::Error::Locked { .. }) => bail!(
            "the node using {} is running; take the backup through it with --url",
            data_dir.display()
        ),
        other => other?,
    };
    let key = data_dir.join(KEY_FILE);
    take_from_engine(&engine, to, key.exists().then_some(key.as_path()), None)
}

/// Takes a backup of the open `engine` into `to` (missing or empty), with
/// the identity file `key` if given, recording `node` (peer id and region)
/// if known: for an app that embeds a node, and for
/// [`take_from_data_dir`].
pub fn take_from_engine(
    engine: &Engine,
    to: &Path,
    key: Option<&Path>,
    node: Option<(String, String)>,
) -> Result<Summary> {
    let started = Instant::now();
    prepare_target(to)?;
    let checkpoint = engine.checkpoint(&to.join(STORE_DIR))?;
    let mut meter = Meter::new("hashing", "bytes", checkpoint.bytes());
    let mut files = Vec::with_capacity(checkpoint.files.len() + 1);
    for file in &checkpoint.files {
        let path = format!("{STORE_DIR}/{}", file.name);
        files.push(hash_file(to, &path, &mut meter)?);
    }
    meter.finish();
    if let Some(key) = key {
        copy_private(key, &to.join(KEY_FILE))?;
        files.push(hash_file(to, KEY_FILE, &mut Meter::silent())?);
    }
    let found = verify_store(&to.join(STORE_DIR))?;
    let (peer_id, region) = node.unzip();
    let manifest = Manifest {
        peer_id,
        region,
        ..manifest(checkpoint.store_id, found, files)
    };
    write_manifest(to, &manifest)?;
    Ok(summary(to, &manifest, started, key.is_some()))
}

/// Checks the backup in `dir`: every file against the manifest, then every
/// document in the store. Returns the manifest.
pub fn check(dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    let mut meter = Meter::new("checking", "bytes", manifest.bytes());
    for file in &manifest.files {
        let found = hash_file(dir, &file.path, &mut meter)?;
        if found != *file {
            bail!(
                "{} in {} does not match the manifest (size {} and SHA-256 {}, expected {} and {}); \
                 the backup is damaged",
                file.path,
                dir.display(),
                found.bytes,
                found.sha256,
                file.bytes,
                file.sha256
            );
        }
    }
    meter.finish();
    let found = verify_store(&dir.join(STORE_DIR))?;
    if found.documents != manifest.documents {
        bail!(
            "the store in {} holds {} documents, the manifest says {}",
            dir.display(),
            found.documents,
            manifest.documents
        );
    }
    Ok(manifest)
}

/// Restores the backup in `from` into the data directory `data_dir`, which
/// must hold no store: checks the backup, copies the store, renews its
/// store id, and puts the identity in place if the backup has one and the
/// data directory none.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Summary> {
    let started = Instant::now();
    let store = data_dir.join(STORE_DIR);
    if store.exists() && fs::read_dir(&store)?.next().is_some() {
        bail!(
            "{} already holds a store; a restore goes into a data directory without one \
             (stop the node and move its store away first)",
            store.display()
        );
    }
    let manifest = check(from)?;
    fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let partial = data_dir.join(format!("{STORE_DIR}.restoring"));
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    fs::create_dir(&partial)?;
    let mut meter = Meter::new("restoring", "bytes", manifest.bytes());
    for file in &manifest.files {
        if let Some(name) = file.path.strip_prefix(&format!("{STORE_DIR}/")) {
            copy_synced(&from.join(&file.path), &partial.join(name), &mut meter)?;
        }
    }
    meter.finish();
    sync_dir(&partial)?;
    let store_id = store_backup::renew(&partial)?;
    if store.exists() {
        fs::remove_dir(&store)?;
    }
    fs::rename(&partial, &store)?;
    sync_dir(data_dir)?;
    let key = data_dir.join(KEY_FILE);
    let identity = manifest.files.iter().any(|f| f.path == KEY_FILE) && !key.exists();
    if identity {
        copy_private(&from.join(KEY_FILE), &key)?;
        sync_dir(data_dir)?;
    }
    Ok(Summary {
        backup: from.to_path_buf(),
        bytes: manifest.bytes(),
        documents: manifest.documents,
        seconds: started.elapsed().as_secs_f64(),
        store_id,
        identity,
    })
}

/// Reads the manifest of the backup in `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let size = fs::metadata(&path)
        .with_context(|| {
            format!(
                "{} has no {MANIFEST_FILE}: not a finished backup",
                dir.display()
            )
        })?
        .len();
    if size > MAX_MANIFEST_BYTES {
        bail!(
            "{} is larger than {MAX_MANIFEST_BYTES} bytes",
            path.display()
        );
    }
    let manifest: Manifest = serde_json::from_slice(&fs::read(&path)?)
        .with_context(|| format!("{} does not decode", path.display()))?;
    if manifest.format != MANIFEST_FORMAT {
        bail!(
            "{} has format {:?}; this build reads {MANIFEST_FORMAT:?}",
            path.display(),
            manifest.format
        );
    }
    for file in &manifest.files {
        let plain = match file.path.strip_prefix(&format!("{STORE_DIR}/")) {
            Some(name) => stream::is_plain_name(name),
            None => file.path == KEY_FILE,
        };
        if !plain {
            bail!(
                "{} names a file {:?} outside the backup",
                path.display(),
                file.path
            );
        }
    }
    Ok(manifest)
}

/// Refuses a target for a new backup unless it is missing or empty.
fn check_target(to: &Path) -> Result<()> {
    if to.exists() && fs::read_dir(to)?.next().is_some() {
        bail!(
            "{} is not empty; a backup goes into a new or empty directory",
            to.display()
        );
    }
    Ok(())
}

/// The target of a new backup, checked ([`check_target`]) and created.
fn prepare_target(to: &Path) -> Result<()> {
    check_target(to)?;
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))
}

fn verify_store(store: &Path) -> Result<store_backup::Verified> {
    let mut meter = Meter::new("verifying", "documents", 0);
    let found = store_backup::verify(store, |done, total| {
        meter.total = total;
        meter.set(done);
    })?;
    meter.finish();
    Ok(found)
}

fn manifest(store_id: String, found: store_backup::Verified, files: Vec<ManifestFile>) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT.into(),
        causeway_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        store_id,
        peer_id: None,
        region: None,
        documents: found.documents,
        deleted: found.deleted,
        changes: found.changes,
        files,
    }
}

fn summary(to: &Path, manifest: &Manifest, started: Instant, identity: bool) -> Summary {
    Summary {
        backup: to.to_path_buf(),
        bytes: manifest.bytes(),
        documents: manifest.documents,
        seconds: started.elapsed().as_secs_f64(),
        store_id: manifest.store_id.clone(),
        identity,
    }
}

/// Writes the manifest durably: temporary file, fsync, rename, fsync.
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(manifest)?)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(MANIFEST_FILE))?;
    sync_dir(dir)
}

/// Size and SHA-256 of `dir/path`.
fn hash_file(dir: &Path, path: &str, meter: &mut Meter) -> Result<ManifestFile> {
    use std::io::Read;
    let full = dir.join(path);
    let mut file =
        fs::File::open(&full).with_context(|| format!("cannot open {}", full.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
        meter.add(n as u64);
    }
    Ok(ManifestFile {
        path: path.to_string(),
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// Receives one file of a backup stream into `store`, exactly its
/// announced size, hashing it.
async fn receive_file(
    body: &mut BodyReader,
    store: &Path,
    entry: &FileEntry,
    meter: &mut Meter,
) -> Result<ManifestFile> {
    let path = store.join(&entry.name);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut left = entry.bytes;
    while left > 0 {
        let chunk = body.take(left).await?;
        if chunk.is_empty() {
            bail!(
                "the stream ended inside {} ({left} bytes short); the backup is not usable",
                entry.name
            );
        }
        hasher.update(&chunk);
        file.write_all(&chunk)?;
        left -= chunk.len() as u64;
        meter.add(chunk.len() as u64);
    }
    file.sync_all()?;
    Ok(ManifestFile {
        path: format!("{STORE_DIR}/{}", entry.name),
        bytes: entry.bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// Copies `from` to `to` (new), fsyncing it.
fn copy_synced(from: &Path, to: &Path, meter: &mut Meter) -> Result<()> {
    let bytes = fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::File::open(to)?.sync_all()?;
    meter.add(bytes);
    Ok(())
}

/// Copies a private file (the identity), mode 0600, fsynced.
fn copy_private(from: &Path, to: &Path) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("cannot create {}", to.display()))?;
    file.write_all(&bytes)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a response body in pieces of a requested size.
struct BodyReader {
    response: reqwest::Response,
    /// Received bytes; those before `at` are consumed.
    pending: Vec<u8>,
    at: usize,
}

impl BodyReader {
    fn new(response: reqwest::Response) -> Self {
        BodyReader {
            response,
            pending: Vec::new(),
            at: 0,
        }
    }

    fn rest(&self) -> &[u8] {
        &self.pending[self.at..]
    }

    /// Appends the next chunk of the body; `false` at its end.
    async fn fill(&mut self) -> Result<bool> {
        let chunk = self
            .response
            .chunk()
            .await
            .context("the backup stream broke off")?;
        let Some(chunk) = chunk else {
            return Ok(false);
        };
        self.pending.drain(..self.at);
        self.at = 0;
        self.pending.extend_from_slice(&chunk);
        Ok(true)
    }

    /// Up to `max` bytes; empty at the end of the body.
    async fn take(&mut self, max: u64) -> Result<Vec<u8>> {
        if self.rest().is_empty() && !self.fill().await? {
            return Ok(Vec::new());
        }
        let n = self
            .rest()
            .len()
            .min(usize::try_from(max).unwrap_or(usize::MAX));
        let out = self.rest()[..n].to_vec();
        self.at += n;
        Ok(out)
    }

    /// Whether the body has ended with nothing left.
    async fn at_end(&mut self) -> Result<bool> {
        Ok(self.rest().is_empty() && !self.fill().await?)
    }

    /// One line, without its newline, at most `max` bytes.
    async fn line(&mut self, max: usize) -> Result<Vec<u8>> {
        loop {
            if let Some(end) = self.rest().iter().position(|b| *b == b'\n') {
                let line = self.rest()[..end].to_vec();
                self.at += end + 1;
                return Ok(line);
            }
            if self.rest().len() > max {
                bail!("the backup stream's header is longer than {max} bytes");
            }
            if !self.fill().await? {
                bail!("the backup stream ended before its header did");
            }
        }
    }
}

/// A progress line on stderr, redrawn at most ten times a second when
/// stderr is a terminal, and printed once at the end otherwise.
struct Meter {
    label: &'static str,
    unit: &'static str,
    total: u64,
    done: u64,
    drawn: Option<Instant>,
    terminal: bool,
    quiet: bool,
    started: Instant,
}

/// How often a terminal's progress line is redrawn.
const METER_REDRAW: Duration = Duration::from_millis(100);

impl Meter {
    fn new(label: &'static str, unit: &'static str, total: u64) -> Meter {
        Meter {
            label,
            unit,
            total,
            done: 0,
            drawn: None,
            terminal: std::io::stderr().is_terminal(),
            quiet: false,
            started: Instant::now(),
        }
    }

    fn silent() -> Meter {
        Meter {
            quiet: true,
            ..Meter::new("", "", 0)
        }
    }

    fn add(&mut self, n: u64) {
        self.set(self.done + n);
    }

    fn set(&mut self, done: u64) {
        self.done = done;
        if self.terminal && !self.quiet && self.drawn.is_none_or(|at| at.elapsed() >= METER_REDRAW)
        {
            self.drawn = Some(Instant::now());
            eprint!("\r{}", self.line());
        }
    }

    fn line(&self) -> String {
        let percent = if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        };
        format!(
            "{}: {} of {} {} ({percent:.0}%)",
            self.label, self.done, self.total, self.unit
        )
    }

    fn finish(&mut self) {
        if self.quiet {
            return;
        }
        let end = if self.terminal { "\r" } else { "" };
        eprintln!(
            "{end}{} in {:.1} s",
            self.line(),
            self.started.elapsed().as_secs_f64()
        );
    }
}
