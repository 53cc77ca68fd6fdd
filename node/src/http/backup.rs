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
use crate::backup::stream::{FileEntry, Header, STREAM_FORMAT};

/// Bytes read from a file per chunk of the response.
const CHUNK_BYTES: usize = 256 << 10;

/// Media type of the response.
pub const CONTENT_TYPE: &str = "application/x-causeway-backup";

/// Takes a checkpoint and streams it.
pub async fn backup(State(state): State<AppState>) -> Result<Response, ApiError> {
    let engine = state.engine.clone();
    let (holder, checkpoint) = blocking(move || {
        let parent = engine
            .path()
            .parent()
            .map_or_else(|| PathBuf::from("."), PathBuf::from);
        let holder = tempfile::Builder::new()
            .prefix(".backup-")
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
