//! `POST /v1/backup`: a consistent copy of this node's store, streamed.
//!
//! The node takes a checkpoint for the request next to its store (hard
//! links on the same file system, so it costs little disk while it lasts)
//! and answers with a [`backup stream`](crate::backup::stream): a header
//! line listing the files, then their bytes. The checkpoint is removed
//! when the response ends, completed or not. `causeway backup --url`
//! writes the stream into a backup directory and verifies it.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use tokio::io::AsyncReadExt;

use super::error::ApiError;
use super::{blocking, AppState};
use crate::access::grant::Level;
use crate::access::Caller;
use crate::backup::stream::{FileEntry, Header, STREAM_FORMAT};

/// Prefix of the directory a backup's checkpoint is taken into, next to
/// the store.
pub const CHECKPOINT_PREFIX: &str = ".backup-";

/// Removes checkpoints a node left in `data_dir` when it stopped in the
/// middle of streaming a backup (they hold hard links to table files the
/// store may have compacted away, so they can hold disk space).
pub fn remove_leftovers(data_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(CHECKPOINT_PREFIX) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(dir = %entry.path().display(), "removed a backup checkpoint left by an earlier run")
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a backup checkpoint left by an earlier run")
                }
            }
        }
    }
}

/// Bytes read from a file per chunk of the response.
const CHUNK_BYTES: usize = 256 << 10;

/// Media type of the response.
pub const CONTENT_TYPE: &str = "application/x-causeway-backup";

/// Takes a checkpoint and streams it.
pub async fn backup(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_everything(Level::Admin)?;
    let engine = state.engine.clone();
    let (holder, checkpoint) = blocking(move || {
        let parent = engine
            .path()
            .parent()
            .map_or_else(|| PathBuf::from("."), PathBuf::from);
        let holder = tempfile::Builder::new()
            .prefix(CHECKPOINT_PREFIX)
            .tempdir_in(&parent)
            .map_err(|e| {
                tracing::error!(error = %e, dir = %parent.display(), "cannot make a directory for a backup");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "backup_failed",
                    "the backup failed; the node's log says why",
                )
            })?;
        let checkpoint = engine.checkpoint(&holder.path().join("store"))?;
        Ok((holder, checkpoint))
    })
    .await?;
    let header = Header {
        format: STREAM_FORMAT.into(),
        store_id: checkpoint.store_id.clone(),
        peer_id: state.node.as_ref().map(|n| n.peer_id().to_string()),
        region: state.node.as_ref().map(|n| n.region().to_string()),
        files: checkpoint
            .files
            .iter()
            .map(|f| FileEntry {
                name: f.name.clone(),
                bytes: f.bytes,
            })
            .collect(),
    };
    tracing::info!(
        files = header.files.len(),
        bytes = header.bytes(),
        "streaming a backup"
    );
    // Every chunk holds the directory, so it goes when the body is dropped.
    let holder = Arc::new(holder);
    let files = checkpoint.files.into_iter().map(move |f| {
        let path = checkpoint.dir.join(&f.name);
        file_chunks(path, f.bytes, Arc::clone(&holder))
    });
    let body =
        stream::once(async move { Ok(header.encode()) }).chain(stream::iter(files).flatten());
    Ok((
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        Body::from_stream(body),
    )
        .into_response())
}

/// The bytes of the file at `path`, exactly `bytes` of them (a checkpoint's
/// files do not change), in chunks.
fn file_chunks(
    path: PathBuf,
    bytes: u64,
    holder: Arc<tempfile::TempDir>,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
    stream::unfold(
        (None::<tokio::fs::File>, bytes, holder),
        move |(file, left, holder)| {
            let path = path.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let mut file = match file {
                    Some(f) => f,
                    None => match tokio::fs::File::open(&path).await {
                        Ok(f) => f,
                        Err(e) => return Some((Err(e), (None, 0, holder))),
                    },
                };
                let mut buf = vec![0u8; CHUNK_BYTES.min(left as usize)];
                match file.read(&mut buf).await {
                    Ok(0) => {
                        let e = std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("{} is shorter than listed", path.display()),
                        );
                        Some((Err(e), (None, 0, holder)))
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(buf), (Some(file), left - n as u64, holder)))
                    }
                    Err(e) => Some((Err(e), (None, 0, holder))),
                }
            }
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_left_by_an_earlier_run_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let left = dir.path().join(format!("{CHECKPOINT_PREFIX}x1"));
        std::fs::create_dir_all(left.join("store")).unwrap();
        std::fs::write(left.join("store").join("000009.sst"), b"sst").unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        std::fs::write(dir.path().join("node.key"), b"key").unwrap();
        remove_leftovers(dir.path());
        assert!(!left.exists());
        assert!(dir.path().join("store").exists());
        assert!(dir.path().join("node.key").exists());
    }
}
