//! The on-disk layout: column families, key encodings and per-document metadata.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `node` | `format_version` | storage format, `u32` big-endian |
//! | `node` | `store_id` | the store's id, a UUID string |
//! | `node` | `last_contact` | when the store last heard from a member of its cluster, Unix seconds, `u64` big-endian |
//! | `doc_meta` | doc id | [`DocMeta`] as CBOR (for a collected document, its marker) |
//! | `change_log` | doc id, `0x00`, sequence `u64` big-endian | one Automerge change, raw bytes |
//! | `snapshot` | doc id | `Automerge::save()` output |
//! | `peer_sync` | peer id, `0x00`, doc id | durable part of the Automerge sync state with that peer (`sync::State::encode`) |
//! | `held` | doc id, `0x00`, change hash (32 bytes) | a change held for missing dependencies: source tag (`1` client, `2` peer), then the raw change bytes |
//!
//! A document's state is its snapshot (if any) plus its log entries with
//! sequence numbers in `[log_start, next_seq)`. Doc ids never contain `0x00`,
//! so one document's log entries are contiguous and sort by sequence.

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::doc_id::DocId;
use crate::error::Error;

/// Storage format written by this build. Bump on any incompatible change.
///
/// Format 2 added the [`CF_HELD`] column family, format 3 [`CF_AUDIT`]. An
/// older store is upgraded in place when this build opens it (the column
/// families are created empty, then the format record and the marker file
/// say 3); builds that read only older formats then refuse it with a clear
/// error instead of failing on an unknown column family.
pub const FORMAT_VERSION: u32 = 3;

/// Oldest storage format this build opens (and upgrades).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// Name of the marker file that identifies a Causeway store directory.
pub const MARKER_FILE: &str = "CAUSEWAY";

/// First line of the marker file.
pub const MARKER_MAGIC: &str = "causeway-store";

/// Column family holding node metadata.
pub const CF_NODE: &str = "node";
/// Column family holding [`DocMeta`] per document.
pub const CF_DOC_META: &str = "doc_meta";
/// Column family holding the incremental change log.
pub const CF_CHANGE_LOG: &str = "change_log";
/// Column family holding compacted snapshots.
pub const CF_SNAPSHOT: &str = "snapshot";

/// Column family holding the persisted Automerge sync state per peer and
/// document, so a restarted node resumes sync from the heads it shares with
/// each peer.
pub const CF_PEER_SYNC: &str = "peer_sync";

/// Column family holding changes accepted but not yet applicable because
/// their dependencies are missing (see `held`). Written in the same
/// WriteBatch as the rest of the call that accepted them; deleted in the
/// batch that applies them.
pub const CF_HELD: &str = "held";

/// Column family holding the audit feed (see `audit`): one record per
/// accepted write, keyed by its number (8 bytes, big-endian), written in
/// the same WriteBatch as the write.
pub const CF_AUDIT: &str = "audit";

/// All column families Causeway creates, beside RocksDB's `default`.
pub const COLUMN_FAMILIES: [&str; 7] = [
    CF_NODE,
    CF_DOC_META,
    CF_CHANGE_LOG,
    CF_SNAPSHOT,
    CF_PEER_SYNC,
    CF_HELD,
    CF_AUDIT,
];

/// Key of the format version in [`CF_NODE`].
pub const KEY_FORMAT_VERSION: &[u8] = b"format_version";

/// Key of the store id in [`CF_NODE`]: a UUID v4 string, made the first time
/// it is asked for (see `Engine::store_id`).
pub const KEY_STORE_ID: &[u8] = b"store_id";

/// Key of the last contact in [`CF_NODE`]: when this store last heard from
/// a member of its cluster, as seconds since the Unix epoch, `u64`
/// big-endian (see `collection`).
pub const KEY_LAST_CONTACT: &[u8] = b"last_contact";

/// Whether `s` has the form of a store id: a UUID in its 36-character
/// hyphenated form.
pub fn is_store_id(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A store id made from 16 bytes: a UUID v4 (its version and variant bits
/// set) in its hyphenated form.
pub fn store_id_from(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Version tag of [`DocMeta`] records.
const DOC_META_VERSION: u8 = 1;

/// Per-document metadata, rewritten in the same WriteBatch as every change to
/// the document's log or snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    /// Record version, [`DOC_META_VERSION`].
    pub v: u8,
    /// Current heads, sorted, 32 bytes each, concatenated.
    #[serde(with = "serde_bytes")]
    pub heads: Vec<u8>,
    /// Number of changes in the document's history.
    pub change_count: u64,
    /// SHA-256 over the sorted heads; what anti-entropy compares.
    #[serde(with = "serde_bytes")]
    pub digest: Vec<u8>,
    /// Whether every head is a deletion (see `lineage`).
    pub tombstone: bool,
    /// First log sequence number not folded into the snapshot.
    pub log_start: u64,
    /// Sequence number the next log entry gets.
    pub next_seq: u64,
    /// Bytes of change data in the log since the last snapshot.
    pub log_bytes: u64,
    /// Size of the snapshot in bytes (0 if none).
    pub snapshot_bytes: u64,
    /// Set when the document was collected (see `collection`): its history
    /// is gone and this record is a marker that remembers its tombstone
    /// heads, from this time (seconds since the Unix epoch, on the
    /// collecting node's clock). Absent from records that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collected_at: Option<u64>,
    /// For a deleted document: the latest time among its tombstone heads
    /// (seconds since the Unix epoch, by their authors' clocks; 0 for a
    /// tombstone without a time), from which garbage collection counts
    /// its grace period. Absent from records written before it, and for
    /// live documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<u64>,
}

impl DocMeta {
    /// Metadata of a document with no history yet.
    pub fn empty() -> Self {
        DocMeta {
            v: DOC_META_VERSION,
            heads: Vec::new(),
            change_count: 0,
            digest: heads_digest(&[]).to_vec(),
            tombstone: false,
            log_start: 0,
            next_seq: 0,
            log_bytes: 0,
            snapshot_bytes: 0,
            collected_at: None,
            deleted_at: None,
        }
    }

    /// Number of entries in the log.
    pub fn log_len(&self) -> u64 {
        self.next_seq - self.log_start
    }

    /// Sets the heads and the digest derived from them.
    pub fn set_heads(&mut self, heads: &[ChangeHash]) {
        self.heads = heads.iter().flat_map(|h| h.0).collect();
        self.digest = heads_digest(heads).to_vec();
    }

    /// The stored heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.heads
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                ChangeHash(h)
            })
            .collect()
    }

    /// Encodes as CBOR.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.heads.len());
        // Serialising a struct of plain fields into a Vec cannot fail.
        #[allow(clippy::expect_used)]
        ciborium::into_writer(self, &mut out).expect("DocMeta encodes to CBOR");
        out
    }

    /// Decodes and checks a stored record.
    pub fn decode(doc: &str, bytes: &[u8]) -> Result<Self, Error> {
        let corrupt = |reason: String| Error::Corrupt {
            doc: doc.to_string(),
            key: format!("{CF_DOC_META}/{doc}"),
            reason,
        };
        let meta: DocMeta = ciborium::from_reader(bytes)
            .map_err(|e| corrupt(format!("undecodable metadata: {e}")))?;
        if meta.v != DOC_META_VERSION {
            return Err(corrupt(format!("unknown metadata version {}", meta.v)));
        }
        if !meta.heads.len().is_multiple_of(32)
            || meta.log_start > meta.next_seq
            || meta.digest.len() != 32
        {
            return Err(corrupt("inconsistent metadata fields".to_string()));
        }
        Ok(meta)
    }
}

/// What reconciliation needs of a [`DocMeta`] record: its digest, and
/// whether it is a collection marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaDigest {
    /// [`DocMeta::digest`].
    pub digest: [u8; 32],
    /// Whether [`DocMeta::collected_at`] is set.
    pub collected: bool,
}

/// Reads the digest of an encoded [`DocMeta`] without decoding the rest:
/// walking every document's record at open, a full decode costs several
/// times the read. Checks what [`DocMeta::decode`] checks; `None` for
/// anything it does not read (another encoding of the same record, or
/// garbage), for the caller to decode in full.
pub fn read_digest(bytes: &[u8]) -> Option<MetaDigest> {
    let mut r = CborReader { bytes, at: 0 };
    let entries = r.head(5)?;
    let (mut version, mut digest, mut collected) = (None, None, false);
    let (mut heads_ok, mut log_start, mut next_seq) = (false, 0, 0);
    for _ in 0..entries {
        let key_len = usize::try_from(r.head(3)?).ok()?;
        let key = r.take(key_len)?;
        match key {
            b"v" => version = Some(r.head(0)?),
            b"heads" => {
                let len = usize::try_from(r.head(2)?).ok()?;
                heads_ok = len.is_multiple_of(32);
                r.take(len)?;
            }
            b"digest" => {
                let len = usize::try_from(r.head(2)?).ok()?;
                digest = Some(<[u8; 32]>::try_from(r.take(len)?).ok()?);
            }
            b"tombstone" => r.boolean()?,
            b"log_start" => log_start = r.head(0)?,
            b"next_seq" => next_seq = r.head(0)?,
            b"collected_at" => {
                r.head(0)?;
                collected = true;
            }
            b"change_count" | b"log_bytes" | b"snapshot_bytes" | b"deleted_at" => {
                r.head(0)?;
            }
            _ => return None,
        }
    }
    let valid = version == Some(u64::from(DOC_META_VERSION))
        && heads_ok
        && log_start <= next_seq
        && r.at == bytes.len();
    valid.then_some(MetaDigest {
        digest: digest?,
        collected,
    })
}

/// The few CBOR items a [`DocMeta`] record holds: definite-length maps,
/// text and byte strings, unsigned integers and booleans.
struct CborReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> CborReader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    /// A head of major type `major`: its argument (a length, a count or
    /// the value of an unsigned integer).
    fn head(&mut self, major: u8) -> Option<u64> {
        let b = self.byte()?;
        if b >> 5 != major {
            return None;
        }
        match b & 0x1f {
            n @ 0..=23 => Some(u64::from(n)),
            24 => self.byte().map(u64::from),
            25 => self
                .take(2)
                .map(|s| u64::from(u16::from_be_bytes([s[0], s[1]]))),
            26 => self
                .take(4)
                .map(|s| u64::from(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))),
            27 => self
                .take(8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes),
            _ => None,
        }
    }

    fn boolean(&mut self) -> Option<()> {
        matches!(self.byte()?, 0xf4 | 0xf5).then_some(())
    }
}

/// SHA-256 over the sorted heads. Two replicas with the same heads have the same
/// digest; anti-entropy compares digests instead of head sets.
pub fn heads_digest(heads: &[ChangeHash]) -> [u8; 32] {
    let mut sorted = heads.to_vec();
    sorted.sort_unstable();
    let mut hasher = Sha256::new();
    for h in &sorted {
        hasher.update(h.0);
    }
    hasher.finalize().into()
}

/// Key of the sync state with `peer` for `doc` in [`CF_PEER_SYNC`]. Peer ids
/// must not contain `0x00` (the caller validates them).
pub fn peer_sync_key(peer: &str, doc: &DocId) -> Vec<u8> {
    let mut key = Vec::with_capacity(peer.len() + 1 + doc.as_str().len());
    key.extend_from_slice(peer.as_bytes());
    key.push(0);
    key.extend_from_slice(doc.as_bytes());
    key
}

/// Key of the held change `hash` of `doc` in [`CF_HELD`]: the document's
/// [`log_prefix`], then the hash.
pub fn held_key(doc: &DocId, hash: &ChangeHash) -> Vec<u8> {
    let mut key = log_prefix(doc);
    key.extend_from_slice(&hash.0);
    key
}

/// The document id and change hash of a [`CF_HELD`] key, if well formed.
pub fn parse_held_key(key: &[u8]) -> Option<(&[u8], ChangeHash)> {
    let split = key.len().checked_sub(33)?;
    if key[split] != 0 || key[..split].contains(&0) {
        return None;
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&key[split + 1..]);
    Some((&key[..split], ChangeHash(hash)))
}

/// Key of log entry `seq` of `doc` in [`CF_CHANGE_LOG`].
pub fn log_key(doc: &DocId, seq: u64) -> Vec<u8> {
    let mut key = log_prefix(doc);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Prefix shared by every log key of `doc`: the id and a `0x00` separator.
pub fn log_prefix(doc: &DocId) -> Vec<u8> {
    let mut key = Vec::with_capacity(doc.as_bytes().len() + 9);
    key.extend_from_slice(doc.as_bytes());
    key.push(0);
    key
}

/// Printable form of a storage key, for error messages.
pub fn describe_key(cf: &str, key: &[u8]) -> String {
    if let (CF_AUDIT, Ok(seq)) = (cf, <[u8; 8]>::try_from(key)) {
        return format!("{cf}/#{}", u64::from_be_bytes(seq));
    }
    match key.iter().position(|b| *b == 0) {
        Some(pos) if cf == CF_PEER_SYNC => format!(
            "{cf}/{} (peer {})",
            String::from_utf8_lossy(&key[pos + 1..]),
            String::from_utf8_lossy(&key[..pos])
        ),
        Some(_) if cf == CF_HELD && parse_held_key(key).is_some() => {
            let (doc, hash) = parse_held_key(key).unwrap_or((b"", ChangeHash([0; 32])));
            format!("{cf}/{} (change {hash})", String::from_utf8_lossy(doc))
        }
        Some(pos) if cf == CF_CHANGE_LOG && key.len() == pos + 9 => {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&key[pos + 1..]);
            format!(
                "{cf}/{}#{}",
                String::from_utf8_lossy(&key[..pos]),
                u64::from_be_bytes(seq)
            )
        }
        _ => format!("{cf}/{}", String::from_utf8_lossy(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rejects_garbage() {
        let mut meta = DocMeta::empty();
        meta.set_heads(&[ChangeHash([7; 32]), ChangeHash([1; 32])]);
        meta.next_seq = 5;
        let decoded = DocMeta::decode("d", &meta.encode()).expect("decodes");
        assert_eq!(decoded, meta);
        assert_eq!(
            decoded.heads(),
            vec![ChangeHash([7; 32]), ChangeHash([1; 32])]
        );
        let err = DocMeta::decode("d", b"\xff\x00garbage").expect_err("garbage");
        assert!(err.to_string().contains("doc_meta/d"), "{err}");
    }

    #[test]
    fn the_digest_is_read_as_a_full_decode_reads_it() {
        let mut metas = Vec::new();
        let mut meta = DocMeta::empty();
        metas.push(meta.clone());
        meta.set_heads(&[ChangeHash([7; 32]), ChangeHash([1; 32])]);
        meta.change_count = 300;
        meta.next_seq = 70_000;
        meta.log_start = 65_536;
        meta.log_bytes = u64::from(u32::MAX) + 1;
        meta.snapshot_bytes = 24;
        metas.push(meta.clone());
        meta.tombstone = true;
        meta.deleted_at = Some(1_765_000_000);
        metas.push(meta.clone());
        meta.collected_at = Some(1_765_900_000);
        metas.push(meta);
        for meta in metas {
            let bytes = meta.encode();
            let read = read_digest(&bytes).expect("reads its own encoding");
            assert_eq!(read.digest.to_vec(), meta.digest);
            assert_eq!(read.collected, meta.collected_at.is_some());
            // Every cut of the record is refused, never misread.
            for cut in 0..bytes.len() {
                assert_eq!(read_digest(&bytes[..cut]), None, "cut at {cut}");
            }
        }
        let mut bad = DocMeta::empty();
        bad.log_start = 2;
        assert_eq!(read_digest(&bad.encode()), None);
        bad = DocMeta::empty();
        bad.v = 9;
        assert_eq!(read_digest(&bad.encode()), None);
        assert_eq!(read_digest(b"\xff\x00garbage"), None);
    }

    #[test]
    fn digest_ignores_head_order() {
        let a = ChangeHash([1; 32]);
        let b = ChangeHash([2; 32]);
        assert_eq!(heads_digest(&[a, b]), heads_digest(&[b, a]));
        assert_ne!(heads_digest(&[a]), heads_digest(&[b]));
    }

    #[test]
    fn log_keys_sort_by_sequence_and_stay_within_their_document() {
        let a = DocId::new("a").expect("id");
        let ab = DocId::new("a/b").expect("id");
        assert!(log_key(&a, 1) < log_key(&a, 256));
        assert!(log_key(&a, u64::MAX) < log_key(&ab, 0));
        assert_eq!(
            describe_key(CF_CHANGE_LOG, &log_key(&a, 3)),
            "change_log/a#3"
        );
        let hash = ChangeHash([0xab; 32]);
        let held = held_key(&ab, &hash);
        assert_eq!(parse_held_key(&held), Some((&b"a/b"[..], hash)));
        assert!(parse_held_key(&held[..held.len() - 1]).is_none());
        assert!(describe_key(CF_HELD, &held).starts_with("held/a/b (change abab"));
        // A sync-state key whose document id happens to be 8 bytes long is
        // not mistaken for a log entry.
        let doc = DocId::new("abcdefgh").expect("id");
        assert_eq!(
            describe_key(CF_PEER_SYNC, &peer_sync_key("n1", &doc)),
            "peer_sync/abcdefgh (peer n1)"
        );
    }
}
