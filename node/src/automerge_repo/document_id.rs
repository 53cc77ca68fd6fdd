//! automerge-repo document ids: bs58check (Bitcoin's base58 alphabet over
//! the payload and the first four bytes of its double SHA-256) of 16 random
//! bytes, about 22 characters, such as `4NMNnkMhL8jXrdJ9jamS58PAVdXu`.
//!
//! The encoding is a bijection, so the string is canonical: Causeway stores
//! an automerge-repo document under its id string unchanged, as an ordinary
//! [`DocId`] (the base58 alphabet is within Causeway's id characters). A
//! Causeway id that is not such a string (`orders/1`) is not reachable from
//! automerge-repo clients.

use causeway_engine::DocId;

/// Bytes an automerge-repo document id encodes (a UUID).
pub const DOCUMENT_ID_BYTES: usize = 16;

/// Longest id string looked at before decoding; 16 bytes with the checksum
/// encode to at most 28 characters.
const MAX_ENCODED_LEN: usize = 40;

/// Why a string is not an automerge-repo document id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentIdError {
    /// Not base58, or the checksum does not match.
    #[error("not a bs58check string: {0}")]
    Encoding(String),
    /// It decodes, but not to 16 bytes.
    #[error("decodes to {0} bytes; automerge-repo document ids are {DOCUMENT_ID_BYTES}")]
    Length(usize),
}

/// Checks that `id` is an automerge-repo document id (bs58check of 16 bytes)
/// and gives the Causeway document it names.
pub fn parse(id: &str) -> Result<DocId, DocumentIdError> {
    if id.len() > MAX_ENCODED_LEN {
        return Err(DocumentIdError::Encoding(format!(
            "{} characters; at most {MAX_ENCODED_LEN} are looked at",
            id.len()
        )));
    }
    let bytes = bs58::decode(id)
        .with_check(None)
        .into_vec()
        .map_err(|e| DocumentIdError::Encoding(e.to_string()))?;
    if bytes.len() != DOCUMENT_ID_BYTES {
        return Err(DocumentIdError::Length(bytes.len()));
    }
    DocId::new(id).map_err(|e| DocumentIdError::Encoding(e.to_string()))
}

/// The automerge-repo document id of `bytes`.
pub fn encode(bytes: &[u8; DOCUMENT_ID_BYTES]) -> String {
    bs58::encode(bytes).with_check().into_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_checks() {
        let bytes = [7u8; 16];
        let id = encode(&bytes);
        assert_eq!(parse(&id).unwrap().as_str(), id);
        // One character changed breaks the checksum.
        let mut bad = id.clone().into_bytes();
        bad[3] = if bad[3] == b'2' { b'3' } else { b'2' };
        assert!(matches!(
            parse(std::str::from_utf8(&bad).unwrap()),
            Err(DocumentIdError::Encoding(_))
        ));
        // Valid bs58check, wrong length.
        let short = bs58::encode([1u8; 8]).with_check().into_string();
        assert_eq!(parse(&short), Err(DocumentIdError::Length(8)));
        assert!(parse("0OIl").is_err(), "not in the alphabet");
        assert!(parse(&"1".repeat(100)).is_err());
    }

    /// An id made by automerge-repo 2.5.6 (`repo.create().documentId`).
    #[test]
    fn accepts_an_id_from_automerge_repo() {
        let id = "4NMNnkMhL8jXrdJ9jamS58PAVdXu";
        assert_eq!(parse(id).unwrap().as_str(), id);
    }
}
