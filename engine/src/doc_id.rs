//! Document identifiers.
//!
//! A [`DocId`] names one Automerge document. It is a string of 1 to
//! [`MAX_DOC_ID_LEN`] bytes drawn from a fixed character set:
//!
//! * ASCII letters `A-Z a-z` and digits `0-9`;
//! * the punctuation `- _ . : / @ + ~ =`.
//!
//! The set is deliberately small: ids appear in URLs, file names, log lines and
//! RocksDB keys, and none of these characters needs escaping in any of them. The
//! byte `0x00`, which the on-disk layout uses as a separator, can never occur.
//! Ids sort bytewise, so `/` works as a hierarchy separator for prefix listing
//! (`tenant-a/orders/`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest document id accepted, in bytes.
pub const MAX_DOC_ID_LEN: usize = 255;

/// Punctuation allowed in a document id, beside ASCII letters and digits.
pub const DOC_ID_PUNCTUATION: &[u8] = b"-_.:/@+~=";

/// Why a string is not a valid [`DocId`]. Always a caller error: fix the id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocIdError {
    /// The id is the empty string.
    #[error("document id is empty")]
    Empty,
    /// The id is longer than [`MAX_DOC_ID_LEN`] bytes.
    #[error("document id is {len} bytes long; the limit is {MAX_DOC_ID_LEN}")]
    TooLong {
        /// Length of the rejected id in bytes.
        len: usize,
    },
    /// The id contains a character outside the documented set.
    #[error(
        "document id contains {found:?} at byte {index}; allowed are ASCII letters, digits and \"-_.:/@+~=\""
    )]
    InvalidChar {
        /// The first offending character.
        found: char,
        /// Its byte offset in the id.
        index: usize,
    },
}

/// A validated document identifier. See the [module docs](self) for the rules.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId(String);

impl DocId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, DocIdError> {
        let id = id.into();
        validate(&id, false)?;
        Ok(DocId(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as bytes, as used in storage keys.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Checks that `prefix` could begin a document id: the same rules as
/// [`DocId::new`], except that the empty prefix (matching every id) is allowed.
pub fn validate_prefix(prefix: &str) -> Result<(), DocIdError> {
    validate(prefix, true)
}

fn validate(id: &str, allow_empty: bool) -> Result<(), DocIdError> {
    if id.is_empty() && !allow_empty {
        return Err(DocIdError::Empty);
    }
    if id.len() > MAX_DOC_ID_LEN {
        return Err(DocIdError::TooLong { len: id.len() });
    }
    match id.char_indices().find(|(_, c)| {
        !(c.is_ascii_alphanumeric() || (c.is_ascii() && DOC_ID_PUNCTUATION.contains(&(*c as u8))))
    }) {
        Some((index, found)) => Err(DocIdError::InvalidChar { found, index }),
        None => Ok(()),
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({:?})", self.0)
    }
}

impl FromStr for DocId {
    type Err = DocIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DocId::new(s)
    }
}

impl TryFrom<String> for DocId {
    type Error = DocIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        DocId::new(s)
    }
}

impl TryFrom<&str> for DocId {
    type Error = DocIdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        DocId::new(s)
    }
}

impl AsRef<str> for DocId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for DocId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DocId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DocId::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_documented_characters() {
        let id = DocId::new("tenant-a/orders:2024_11.v2@eu+x~y=z").expect("valid id");
        assert_eq!(id.as_str(), "tenant-a/orders:2024_11.v2@eu+x~y=z");
        assert!(DocId::new("a".repeat(MAX_DOC_ID_LEN)).is_ok());
    }

    #[test]
    fn rejects_bad_ids_with_specific_errors() {
        assert_eq!(DocId::new(""), Err(DocIdError::Empty));
        assert_eq!(
            DocId::new("a".repeat(MAX_DOC_ID_LEN + 1)),
            Err(DocIdError::TooLong { len: 256 })
        );
        assert_eq!(
            DocId::new("has space"),
            Err(DocIdError::InvalidChar {
                found: ' ',
                index: 3
            })
        );
        assert_eq!(
            DocId::new("nul\0byte"),
            Err(DocIdError::InvalidChar {
                found: '\0',
                index: 3
            })
        );
        assert_eq!(
            DocId::new("café"),
            Err(DocIdError::InvalidChar {
                found: 'é',
                index: 3
            })
        );
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("x?").is_err());
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(s in "[A-Za-z0-9_.:/@+~=-]{1,255}") {
            let id = DocId::new(s.clone()).expect("valid by construction");
            prop_assert_eq!(id.to_string(), s.clone());
            let parsed: DocId = serde_json::from_str(&serde_json::to_string(&id).expect("serialize")).expect("deserialize");
            prop_assert_eq!(parsed, id);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            if let Ok(id) = DocId::new(s.clone()) {
                prop_assert!(!id.as_bytes().contains(&0));
                prop_assert!(id.as_bytes().len() <= MAX_DOC_ID_LEN);
            }
        }
    }
}
