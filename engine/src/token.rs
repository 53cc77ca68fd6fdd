//! Session tokens: read-your-writes and monotonic reads for a client that
//! moves between replicas.
//!
//! Every write returns a [`SessionToken`]: the heads of the written document
//! after the write. A client keeps the latest token it got (merging tokens
//! of several documents if it likes) and hands it to whichever replica it
//! reads next. That replica answers only once it holds everything the token
//! covers ([`Engine::wait_for_session`]), so the client never reads a state
//! older than one it has seen or written, wherever it reads.
//!
//! A token is compared by causal history, not by time: a replica holds a
//! token once every head in it is in the replica's history (later changes do
//! not matter). No clock is involved.
//!
//! Over the network a token travels as an opaque URL-safe string
//! ([`SessionToken::encode`]): base64url (no padding) of a version byte, the
//! CBOR list of `(document id, heads)` and a 16-byte HMAC-SHA256 tag keyed by
//! a [`TokenKey`] that every node of a cluster shares. A token that was cut,
//! edited or made without the key fails [`SessionToken::decode`] with a
//! [`TokenError`] and covers nothing.
//!
//! ```
//! use std::time::Duration;
//! use causeway_engine::{DocId, Engine, EngineConfig};
//! use serde_json::json;
//!
//! let (a_dir, b_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
//! let (a, b) = (
//!     Engine::open(a_dir.path(), EngineConfig::default())?,
//!     Engine::open(b_dir.path(), EngineConfig::default())?,
//! );
//! let id = DocId::new("cart/1")?;
//! let written = a.put_json(&id, &json!({"apples": 1}))?;
//!
//! // b does not hold the write yet: the wait says what is missing.
//! let missing = b.wait_for_session(&written.session, Duration::from_millis(10))?;
//! assert!(!missing.is_empty());
//!
//! b.apply_changes(&id, &a.changes_since(&id, &[])?)?;
//! assert!(b.wait_for_session(&written.session, Duration::from_secs(1))?.is_empty());
//! assert_eq!(b.get_json(&id)?, json!({"apples": 1}));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::doc_id::DocId;
use crate::error::Result;

/// Most documents one token covers.
pub const MAX_SESSION_DOCS: usize = 64;
/// Most heads one token names for one document.
pub const MAX_SESSION_HEADS: usize = 64;
/// Longest encoded token accepted, in characters.
pub const MAX_TOKEN_CHARS: usize = 16 * 1024;
/// The encoding version this build writes and reads.
pub const TOKEN_VERSION: u8 = 1;

const TAG_BYTES: usize = 16;
const HMAC_BLOCK: usize = 64;

/// The heads a client has seen, per document. See the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionToken {
    docs: BTreeMap<DocId, Vec<ChangeHash>>,
}

/// The secret that signs and checks encoded tokens. Every node of a cluster
/// must use the same one, or tokens from one region are refused in another.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey([u8; 32]);

/// Why an encoded token was refused. The client sent something this cluster
/// did not issue (or a token cut in transit); it covers nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_CHARS`].
    #[error("the session token is {found} characters long, the limit is {MAX_TOKEN_CHARS}")]
    TooLong {
        /// Its length.
        found: usize,
    },
    /// Not base64url, or too short to hold a version and a tag.
    #[error("the session token is not a token this cluster issues: {0}")]
    Malformed(String),
    /// A version this build does not read.
    #[error(
        "session token version {0} is not supported (this node reads version {TOKEN_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// The tag does not match: edited, or not issued with this cluster's key.
    #[error("the session token's signature does not match (edited, or issued by another cluster)")]
    BadSignature,
    /// Covers more than [`MAX_SESSION_DOCS`] documents or names more than
    /// [`MAX_SESSION_HEADS`] heads for one.
    #[error("the session token covers too much: {0}")]
    TooLarge(String),
}

#[derive(Serialize, Deserialize)]
struct Entry(String, Vec<serde_bytes::ByteBuf>);

impl SessionToken {
    /// A token covering nothing.
    pub fn new() -> SessionToken {
        SessionToken::default()
    }

    /// A token covering `heads` of `doc`.
    pub fn for_doc(doc: &DocId, heads: &[ChangeHash]) -> SessionToken {
        let mut token = SessionToken::new();
        token.insert(doc, heads);
        token
    }

    /// Adds `heads` of `doc`: the token then also requires them (heads it
    /// already names for `doc` stay required).
    pub fn insert(&mut self, doc: &DocId, heads: &[ChangeHash]) {
        let entry = self.docs.entry(doc.clone()).or_default();
        entry.extend_from_slice(heads);
        entry.sort_unstable();
        entry.dedup();
    }

    /// Adds everything `other` covers.
    pub fn merge(&mut self, other: &SessionToken) {
        for (doc, heads) in &other.docs {
            self.insert(doc, heads);
        }
    }

    /// Replaces what the token requires of `doc` with `heads` (for heads
    /// known to descend from the old ones, such as a replica's heads after
    /// it held them).
    pub fn set(&mut self, doc: &DocId, heads: &[ChangeHash]) {
        self.docs.remove(doc);
        self.insert(doc, heads);
    }

    /// The heads required of `doc`, if the token covers it.
    pub fn heads(&self, doc: &DocId) -> Option<&[ChangeHash]> {
        self.docs.get(doc).map(Vec::as_slice)
    }

    /// Every covered document and its heads, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&DocId, &[ChangeHash])> {
        self.docs.iter().map(|(d, h)| (d, h.as_slice()))
    }

    /// Whether it covers nothing.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Number of documents covered.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether it is within [`MAX_SESSION_DOCS`] and [`MAX_SESSION_HEADS`],
    /// so that [`decode`](Self::decode) accepts its encoding.
    pub fn check_size(&self) -> Result<(), TokenError> {
        if self.docs.len() > MAX_SESSION_DOCS {
            return Err(TokenError::TooLarge(format!(
                "{} documents, the limit is {MAX_SESSION_DOCS}",
                self.docs.len()
            )));
        }
        if let Some((doc, heads)) = self.docs.iter().find(|(_, h)| h.len() > MAX_SESSION_HEADS) {
            return Err(TokenError::TooLarge(format!(
                "{} heads for {doc}, the limit is {MAX_SESSION_HEADS}",
                heads.len()
            )));
        }
        Ok(())
    }

    /// The token as an opaque URL-safe string signed with `key`.
    pub fn encode(&self, key: &TokenKey) -> String {
        let entries: Vec<Entry> = self
            .docs
            .iter()
            .map(|(d, h)| {
                let heads = h.iter().map(|h| h.0.to_vec().into()).collect();
                Entry(d.as_str().to_string(), heads)
            })
            .collect();
        let mut bytes = vec![TOKEN_VERSION];
        // Serialising plain strings and byte strings into a Vec cannot fail.
        #[allow(clippy::expect_used)]
        ciborium::into_writer(&entries, &mut bytes).expect("CBOR into a Vec");
        let tag = key.tag(&bytes);
        bytes.extend_from_slice(&tag);
        data_encoding::BASE64URL_NOPAD.encode(&bytes)
    }

    /// Reads a token made by [`encode`](Self::encode) with `key`, checking
    /// its signature and limits.
    pub fn decode(s: &str, key: &TokenKey) -> Result<SessionToken, TokenError> {
        SessionToken::decode_any(s, std::slice::from_ref(key))
    }

    /// Reads a token made with any of `keys`: while signing keys rotate,
    /// tokens signed with the previous key stay good.
    pub fn decode_any(s: &str, keys: &[TokenKey]) -> Result<SessionToken, TokenError> {
        if s.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::TooLong { found: s.len() });
        }
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(s.as_bytes())
            .map_err(|e| TokenError::Malformed(format!("not base64url: {e}")))?;
        if bytes.len() < 1 + TAG_BYTES {
            return Err(TokenError::Malformed(format!("{} bytes", bytes.len())));
        }
        if bytes[0] != TOKEN_VERSION {
            return Err(TokenError::UnsupportedVersion(bytes[0]));
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
        // Every key is tried, so the time taken does not tell which matched.
        let matched = keys.iter().fold(false, |any, key| {
            constant_time_eq(&key.tag(body), tag) | any
        });
        if !matched {
            return Err(TokenError::BadSignature);
        }
        let entries: Vec<Entry> = ciborium::from_reader(&body[1..])
            .map_err(|e| TokenError::Malformed(format!("body: {e}")))?;
        let mut token = SessionToken::new();
        for Entry(doc, heads) in entries {
            let doc = DocId::new(&doc).map_err(|e| TokenError::Malformed(e.to_string()))?;
            let heads = heads
                .iter()
                .map(|h| ChangeHash::try_from(h.as_slice()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| TokenError::Malformed("a head is not 32 bytes".into()))?;
            token.insert(&doc, &heads);
            token.check_size()?;
        }
        Ok(token)
    }
}

impl TokenKey {
    /// A key derived from `secret` (any length; SHA-256 of it).
    pub fn from_secret(secret: &[u8]) -> TokenKey {
        TokenKey(Sha256::digest(secret).into())
    }

    /// The first [`TAG_BYTES`] of HMAC-SHA256 (RFC 2104) over `message`.
    pub(crate) fn tag(&self, message: &[u8]) -> [u8; TAG_BYTES] {
        let mut ipad = [0x36u8; HMAC_BLOCK];
        let mut opad = [0x5cu8; HMAC_BLOCK];
        for (i, k) in self.0.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        let inner = Sha256::new()
            .chain_update(ipad)
            .chain_update(message)
            .finalize();
        let outer = Sha256::new()
            .chain_update(opad)
            .chain_update(inner)
            .finalize();
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&outer[..TAG_BYTES]);
        tag
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    #[test]
    fn round_trips_and_merges() {
        let key = TokenKey::from_secret(b"cluster");
        let a = DocId::new("notes/a").unwrap();
        let b = DocId::new("notes/b").unwrap();
        let mut token = SessionToken::for_doc(&a, &[hash(1), hash(2)]);
        token.merge(&SessionToken::for_doc(&b, &[hash(3)]));
        token.insert(&a, &[hash(2), hash(4)]);
        let s = token.encode(&key);
        assert!(s
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        let back = SessionToken::decode(&s, &key).unwrap();
        assert_eq!(back, token);
        assert_eq!(back.heads(&a).unwrap(), &[hash(1), hash(2), hash(4)]);
        assert_eq!(back.len(), 2);
    }

    #[test]
    fn a_token_signed_with_a_retired_key_still_reads_during_rotation() {
        let (old, new) = (TokenKey::from_secret(b"old"), TokenKey::from_secret(b"new"));
        let doc = DocId::new("d").unwrap();
        let issued = SessionToken::for_doc(&doc, &[hash(1)]).encode(&old);
        let ring = [new.clone(), old.clone()];
        assert_eq!(
            SessionToken::decode_any(&issued, &ring)
                .unwrap()
                .heads(&doc),
            Some(&[hash(1)][..])
        );
        // Once the old key is dropped, its tokens are refused.
        assert_eq!(
            SessionToken::decode_any(&issued, &ring[..1]),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            SessionToken::decode_any(&issued, &[]),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn refuses_edited_foreign_and_garbage_tokens() {
        let key = TokenKey::from_secret(b"cluster");
        let doc = DocId::new("d").unwrap();
        let s = SessionToken::for_doc(&doc, &[hash(7)]).encode(&key);
        let other = TokenKey::from_secret(b"other cluster");
        assert_eq!(
            SessionToken::decode(&s, &other),
            Err(TokenError::BadSignature)
        );
        // Flip one bit of the body: the tag no longer matches.
        let mut bytes = data_encoding::BASE64URL_NOPAD.decode(s.as_bytes()).unwrap();
        bytes[5] ^= 1;
        let edited = data_encoding::BASE64URL_NOPAD.encode(&bytes);
        assert_eq!(
            SessionToken::decode(&edited, &key),
            Err(TokenError::BadSignature)
        );
        bytes[0] = 9;
        let v9 = data_encoding::BASE64URL_NOPAD.encode(&bytes);
        assert_eq!(
            SessionToken::decode(&v9, &key),
            Err(TokenError::UnsupportedVersion(9))
        );
        assert!(matches!(
            SessionToken::decode("not a token!", &key),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            SessionToken::decode("AQ", &key),
            Err(TokenError::Malformed(_))
        ));
        let long = "A".repeat(MAX_TOKEN_CHARS + 1);
        assert!(matches!(
            SessionToken::decode(&long, &key),
            Err(TokenError::TooLong { .. })
        ));
    }

    #[test]
    fn refuses_tokens_over_the_limits() {
        let key = TokenKey::from_secret(b"k");
        let mut token = SessionToken::new();
        for i in 0..=MAX_SESSION_DOCS {
            token.insert(&DocId::new(format!("d{i}")).unwrap(), &[hash(1)]);
        }
        assert!(token.check_size().is_err());
        let s = token.encode(&key);
        assert!(matches!(
            SessionToken::decode(&s, &key),
            Err(TokenError::TooLarge(_))
        ));
    }
}
