//! The body of `POST /v1/backup`: a node's checkpoint as one stream.
//!
//! One JSON line (the [`Header`]), then the bytes of every file it lists,
//! in its order, back to back. The header comes first, so the receiver
//! knows every name and size before a byte of data, and checks them:
//! names are plain file names, sizes add up to at most
//! [`MAX_BACKUP_BYTES`], and the stream must end exactly after the last
//! file.

use serde::{Deserialize, Serialize};

/// The `format` every header carries.
pub const STREAM_FORMAT: &str = "causeway-backup-stream/1";
/// Longest header line. A checkpoint of a large store lists a few thousand
/// table files of about 80 bytes each.
pub const MAX_HEADER_BYTES: usize = 4 << 20;
/// Most files in one stream.
pub const MAX_FILES: usize = 100_000;
/// Largest stream a receiver accepts: 16 TiB, beyond any store one node
/// holds, so a header cannot announce sizes that overflow a sum.
pub const MAX_BACKUP_BYTES: u64 = 16 << 40;
/// Longest file name.
pub const MAX_NAME_BYTES: usize = 255;

/// What the stream holds, on its first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`STREAM_FORMAT`].
    pub format: String,
    /// The id of the store copied.
    pub store_id: String,
    /// The node's peer id, when it runs networking.
    pub peer_id: Option<String>,
    /// The node's region, when it runs networking.
    pub region: Option<String>,
    /// The files that follow, in order.
    pub files: Vec<FileEntry>,
}

/// One file of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name in the store directory.
    pub name: String,
    /// Its size.
    pub bytes: u64,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The line is not a header of this format.
    #[error("not a Causeway backup stream: {0}")]
    Malformed(String),
    /// A limit above was broken.
    #[error("backup stream header: {0}")]
    Limit(String),
    /// A file name is not a plain name.
    #[error("backup stream names a file {0:?}, which is not a plain file name")]
    BadName(String),
}

impl Header {
    /// Total bytes of the files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// The header line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and numbers always serialises.
        #[allow(clippy::expect_used)]
        let mut line = serde_json::to_vec(self).expect("the header serialises");
        line.push(b'\n');
        line
    }

    /// Decodes and checks a header line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Header, HeaderError> {
        if line.len() > MAX_HEADER_BYTES {
            return Err(HeaderError::Limit(format!(
                "the header is longer than {MAX_HEADER_BYTES} bytes"
            )));
        }
        let header: Header =
            serde_json::from_slice(line).map_err(|e| HeaderError::Malformed(e.to_string()))?;
        if header.format != STREAM_FORMAT {
            return Err(HeaderError::Malformed(format!(
                "format {:?}, expected {STREAM_FORMAT:?}",
                header.format
            )));
        }
        if header.files.len() > MAX_FILES {
            return Err(HeaderError::Limit(format!(
                "{} files; the limit is {MAX_FILES}",
                header.files.len()
            )));
        }
        let mut total = 0u64;
        for file in &header.files {
            if !is_plain_name(&file.name) {
                return Err(HeaderError::BadName(file.name.clone()));
            }
            total = total.saturating_add(file.bytes);
        }
        if total > MAX_BACKUP_BYTES {
            return Err(HeaderError::Limit(format!(
                "{total} bytes announced; the limit is {MAX_BACKUP_BYTES}"
            )));
        }
        Ok(header)
    }
}

/// Whether `name` can only name a file inside one directory: not empty,
/// not `.` or `..`, and only letters, digits, `.`, `_` and `-`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header(files: Vec<FileEntry>) -> Header {
        Header {
            format: STREAM_FORMAT.into(),
            store_id: "s".into(),
            peer_id: None,
            region: None,
            files,
        }
    }

    fn file(name: &str, bytes: u64) -> FileEntry {
        FileEntry {
            name: name.into(),
            bytes,
        }
    }

    #[test]
    fn a_header_round_trips_and_bad_ones_are_refused() {
        let good = header(vec![file("000012.sst", 10), file("CURRENT", 16)]);
        let line = good.encode();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(Header::decode(&line[..line.len() - 1]), Ok(good));
        for name in ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\0b", "é"] {
            let line = header(vec![file(name, 1)]).encode();
            assert_eq!(
                Header::decode(&line[..line.len() - 1]),
                Err(HeaderError::BadName(name.into())),
                "{name:?}"
            );
        }
        let huge = header(vec![file("a", u64::MAX), file("b", u64::MAX)]).encode();
        assert!(matches!(
            Header::decode(&huge[..huge.len() - 1]),
            Err(HeaderError::Limit(_))
        ));
        let mut other = header(vec![]);
        other.format = "tar".into();
        let line = other.encode();
        assert!(matches!(
            Header::decode(&line[..line.len() - 1]),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            Header::decode(b"{\"format\":"),
            Err(HeaderError::Malformed(_))
        ));
    }
}
