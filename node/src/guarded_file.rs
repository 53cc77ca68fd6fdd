//! Files a node reads its access settings from (the cluster key, the
//! membership list, the tokens file): read only if others may not change
//! them, and watched for changes by a [`Stamp`].

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// How often a node looks at the files it reloads on change (the tokens
/// file, the TLS certificate and key).
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// Calls `look` every [`RELOAD_POLL`] until `closing` turns true.
pub async fn poll_until_closing(
    mut closing: tokio::sync::watch::Receiver<bool>,
    mut look: impl FnMut(),
) {
    let mut tick = tokio::time::interval(RELOAD_POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => look(),
            _ = closing.wait_for(|c| *c) => return,
        }
    }
}

/// What tells one version of a watched file from the next: its inode,
/// modification time and size. Files are replaced by renaming a new one
/// over them, which changes the inode even within one clock tick.
pub type Stamp = (u64, SystemTime, u64);

/// The stamp of the file at `path`, or `None` if it cannot be read.
pub fn stamp(path: &Path) -> Option<Stamp> {
    let m = fs::metadata(path).ok()?;
    Some((m.ino(), m.modified().ok()?, m.len()))
}

/// Why [`read`] refused a file.
#[derive(Debug)]
pub enum Refused {
    /// It could not be read.
    Io(std::io::Error),
    /// Its permission bits include some of the forbidden ones.
    Mode(u32),
}

/// Permission bits that let others than the owner write.
pub const OTHERS_WRITE: u32 = 0o022;
/// Permission bits that let others than the owner read or write.
pub const OTHERS_ANY: u32 = 0o077;

/// The text of the file at `path`, unless its mode has any of `forbidden`.
pub fn read(path: &Path, forbidden: u32) -> Result<String, Refused> {
    let mode = fs::metadata(path)
        .map_err(Refused::Io)?
        .permissions()
        .mode()
        & 0o777;
    if mode & forbidden != 0 {
        return Err(Refused::Mode(mode));
    }
    fs::read_to_string(path).map_err(Refused::Io)
}
