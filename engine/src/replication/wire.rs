//! Wire messages: a versioned CBOR envelope and the messages it carries.
//!
//! Every message travels as the CBOR array `[version, cluster, message]`
//! (see `docs/protocol.md` for the full schema). The version is read first,
//! from the raw bytes, so a message of a version this build does not speak
//! gets [`WireError::UnsupportedVersion`] before anything else is decoded.
//! Each build speaks a range of versions ([`SUPPORTED_VERSIONS`]); two
//! nodes use the highest version both speak ([`VersionRange::negotiate`]),
//! learned from each other's [`Hello`]. Every
//! size is bounded by a named constant; decoding refuses input over the
//! channel's byte limit before parsing, and the decoder allocates in
//! proportion to the bytes actually present (never to a declared length), so
//! no message can make a node allocate more than its byte limit allows.

use serde::{Deserialize, Serialize};

use crate::doc_id::DocId;

use super::ids::{ClusterId, NodeId, Region};

/// The newest protocol version this build speaks. Version 2 adds
/// [`Message::Bundle`]; everything else is encoded as in version 1.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version this build speaks. A node sends anything
/// it sends to a peer before the peer's hello arrives in this version.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The envelope version of every [`Hello`], whatever versions its sender
/// speaks. The hello's format changes only by new optional keys, and every
/// build reads a hello in this version, so any two builds learn each
/// other's range and can tell whether they share a version.
pub const HELLO_VERSION: u32 = 1;
/// The protocol versions this build speaks.
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange {
    min: MIN_PROTOCOL_VERSION,
    max: PROTOCOL_VERSION,
};

/// A range of protocol versions, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    /// The oldest version in the range.
    pub min: u32,
    /// The newest version in the range.
    pub max: u32,
}

impl VersionRange {
    /// The version two nodes speaking `self` and `other` use with each
    /// other: the highest both speak, or `None` if the ranges do not meet.
    pub fn negotiate(self, other: VersionRange) -> Option<u32> {
        let (low, high) = (self.min.max(other.min), self.max.min(other.max));
        (low <= high).then_some(high)
    }

    /// Whether `version` is in the range.
    pub fn contains(self, version: u64) -> bool {
        u64::from(self.min) <= version && version <= u64::from(self.max)
    }
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{} to {}", self.min, self.max)
        }
    }
}

/// Largest encoded message published by gossip (deltas and announcements).
/// A delta that would be larger is replaced by an [`Announce`] and pulled.
pub const MAX_GOSSIP_BYTES: usize = 256 << 10;
/// Largest encoded message sent to one peer (hello, sync, reconcile, ack).
pub const MAX_FRAME_BYTES: usize = 10 << 20;
/// Budget for the changes in one sync message. At least one change is always
/// sent, so a single change up to the engine's `max_change_bytes` (8 MiB by
/// default) still fits in [`MAX_FRAME_BYTES`].
pub const MAX_SYNC_CHANGE_BYTES: usize = 1 << 20;
/// Most heads listed for one document.
pub const MAX_HEADS: usize = 256;
/// Most changes in one delta or push.
pub const MAX_CHANGES_PER_DELTA: usize = 1024;
/// Most ranges in one reconciliation message.
pub const MAX_RANGES: usize = 4096;
/// Most items, over all ranges, in one reconciliation message.
pub const MAX_ITEMS: usize = 16_384;
/// Most documents acknowledged in one [`Ack`].
pub const MAX_ACK_ENTRIES: usize = 4096;
/// Most documents in one [`Bundle`] (below [`MAX_ACK_ENTRIES`], so that
/// one acknowledgement can answer a whole bundle).
pub const MAX_BUNDLE_DOCS: usize = 1024;
/// Budget for the changes in one [`Bundle`]: a sender adds documents while
/// their changes fit (a document whose history alone exceeds it is synced
/// instead), so a bundle stays far below [`MAX_FRAME_BYTES`].
pub const MAX_BUNDLE_CHANGE_BYTES: usize = 1 << 20;
/// The first protocol version with [`Message::Bundle`]: a bundle in an
/// older envelope is refused as a kind that version does not have.
pub const BUNDLE_VERSION: u32 = 2;
/// The newest protocol version that changed a message published by gossip
/// (delta, announce; version 2 changed only direct messages). Gossip reaches
/// nodes through relays, beyond the peers its author negotiated with: it
/// goes out in the lowest version negotiated with the connected peers and
/// never newer than this one, so that during a rolling upgrade an older
/// build that hears it through a relay still reads it.
pub const GOSSIP_FORMAT_VERSION: u32 = 1;
const _: () = assert!(
    MIN_PROTOCOL_VERSION <= GOSSIP_FORMAT_VERSION && GOSSIP_FORMAT_VERSION <= PROTOCOL_VERSION
);
/// Bytes of a range fingerprint in reconciliation.
pub const FINGERPRINT_LEN: usize = 16;
/// Bytes of one cell of a reconciliation sketch (key, checksum, count; see
/// `reconcile::sketch`).
pub const SKETCH_CELL_LEN: usize = 13;
/// Most sketch cells for one range, over all the messages of a session, and
/// most cells in one message: a difference that needs more (about 10,000
/// documents in one range) is reconciled by splitting the range instead.
pub const MAX_SKETCH_CELLS: usize = 16_384;
/// Bytes of an item key in a [`RangeBody::Decoded`].
pub const SKETCH_KEY_LEN: usize = 8;
/// The first protocol version with sketches in reconciliation
/// ([`RangeBody::Sketch`], [`RangeBody::SketchRequest`],
/// [`RangeBody::Decoded`]): a reconciliation holding one in an older
/// envelope is refused as malformed, as a version 1 build would.
pub const SKETCH_VERSION: u32 = 2;
/// Bytes of an item digest in reconciliation (a prefix of SHA-256 over the
/// document's sorted heads).
pub const ITEM_DIGEST_LEN: usize = 16;

/// Why bytes off the wire were refused. Every variant means the sender is
/// misbehaving (or runs an incompatible build); nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message is larger than its channel allows.
    #[error("message is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Size of the refused message.
        size: usize,
        /// The channel's limit.
        limit: usize,
    },
    /// The sender speaks a protocol version this build does not.
    #[error("protocol version {found} is not supported (this node speaks {supported})")]
    UnsupportedVersion {
        /// The version in the envelope.
        found: u64,
        /// The versions this build speaks.
        supported: VersionRange,
    },
    /// The message names an invalid document id.
    #[error("invalid document id: {0}")]
    InvalidDocId(String),
    /// The message names an invalid node id, region or cluster id.
    #[error("{0}")]
    InvalidName(String),
    /// A count inside the message exceeds its named limit.
    #[error("{what} has {count} entries; the limit is {limit}")]
    LimitExceeded {
        /// Which list.
        what: &'static str,
        /// Its length in the message.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The message is of a kind this build does not know: a newer peer's,
    /// during a rolling upgrade. Receivers skip it; it is not a sign of a
    /// misbehaving peer.
    #[error("message kind {0:?} is unknown to this build")]
    UnknownKind(String),
    /// The bytes are not a well-formed message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl WireError {
    /// Whether the message may be well formed for another protocol version
    /// or build (an envelope version or a message kind this build does
    /// not know): an honest peer of another version sends such messages
    /// during a rolling upgrade, so they are refused without a sanction.
    pub fn from_other_version(&self) -> bool {
        matches!(
            self,
            WireError::UnsupportedVersion { .. } | WireError::UnknownKind(_)
        )
    }
}

/// A message with its envelope fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The sender's cluster; receivers refuse other clusters.
    pub cluster: ClusterId,
    /// The message itself.
    pub message: Message,
}

/// Everything nodes say to each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on a new connection, both ways.
    #[serde(rename = "hello")]
    Hello(Hello),
    /// New changes to one document, published by gossip.
    #[serde(rename = "delta")]
    Delta(Delta),
    /// New changes too large to gossip: pull them with a sync.
    #[serde(rename = "announce")]
    Announce(Announce),
    /// One Automerge sync message for one document.
    #[serde(rename = "sync")]
    Sync(SyncFrame),
    /// One step of document-set reconciliation.
    #[serde(rename = "rec")]
    Reconcile(Reconcile),
    /// Which heads the sender now holds, for progress tracking.
    #[serde(rename = "ack")]
    Ack(Ack),
    /// New changes to one document, pushed to one peer along the region
    /// trees (see `topology`).
    #[serde(rename = "push")]
    Push(Push),
    /// The whole history of documents the receiver holds none of (protocol
    /// version 2, [`BUNDLE_VERSION`]).
    #[serde(rename = "bundle")]
    Bundle(Bundle),
}

/// Identifies a node to a peer it has just connected to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender.
    pub node: NodeId,
    /// The sender's region.
    pub region: Region,
    /// The highest protocol version the sender speaks.
    pub version: u32,
    /// The lowest protocol version the sender speaks. Absent from nodes
    /// that predate negotiation, which speak only `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<u32>,
    /// The id of the sender's store (a UUID): its incarnation, new when
    /// the store is created or restored from a backup, so a peer that sees
    /// it change stops believing the sender holds what it reported before.
    /// Absent from nodes that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// Changes to one document, as committed (durably) at their origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The node where the changes were committed.
    pub origin: NodeId,
    /// The origin's region.
    pub region: Region,
    /// The document.
    pub doc: DocId,
    /// Raw Automerge changes, in causal order.
    pub changes: Vec<Bytes>,
    /// The document's heads at the origin after these changes.
    pub heads: Heads,
}

/// New changes to one document pushed to one peer: by their origin to the
/// children of its region's tree and to one bridge per other region, then
/// by each receiver to its own children in the tree rooted at `root`. On
/// the wire: `[root, origin, doc, changes]`.
///
/// A push carries no heads: the receiver learns the changes' place from the
/// changes, and answers with an acknowledgement of its own heads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    from = "(NodeId, NodeId, DocId, Vec<Bytes>)",
    into = "(NodeId, NodeId, DocId, Vec<Bytes>)"
)]
pub struct Push {
    /// The root of the tree this copy travels in the receiver's region:
    /// the origin in its own region, the bridge in another.
    pub root: NodeId,
    /// The node where the changes were committed, as the sender says (a
    /// direct message authenticates only its sender: nothing is trusted
    /// to the origin on this claim).
    pub origin: NodeId,
    /// The document.
    pub doc: DocId,
    /// Raw Automerge changes, in causal order.
    pub changes: Vec<Bytes>,
}

impl From<(NodeId, NodeId, DocId, Vec<Bytes>)> for Push {
    fn from((root, origin, doc, changes): (NodeId, NodeId, DocId, Vec<Bytes>)) -> Self {
        Push {
            root,
            origin,
            doc,
            changes,
        }
    }
}

impl From<Push> for (NodeId, NodeId, DocId, Vec<Bytes>) {
    fn from(p: Push) -> Self {
        (p.root, p.origin, p.doc, p.changes)
    }
}

/// Whole documents sent to a peer that holds none of them: reconciliation
/// found them missing there, and the sender has no sync to run, only their
/// history to hand over. One bundle carries many small documents (a new
/// node joining a cluster receives thousands), where a per-document sync
/// costs each one an exchange of several messages. The receiver applies
/// each document's changes as it would a sync's and acknowledges the heads
/// it then holds, which is the bundle's answer. On the wire:
/// `[[doc, [change, ...]], ...]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bundle {
    /// The documents, each with every change of its history in causal
    /// order.
    pub docs: Vec<BundledDoc>,
}

/// One document of a [`Bundle`]. On the wire: `[doc, [change, ...]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(DocId, Vec<Bytes>)", into = "(DocId, Vec<Bytes>)")]
pub struct BundledDoc {
    /// The document.
    pub doc: DocId,
    /// Raw Automerge changes, in causal order.
    pub changes: Vec<Bytes>,
}

impl From<(DocId, Vec<Bytes>)> for BundledDoc {
    fn from((doc, changes): (DocId, Vec<Bytes>)) -> Self {
        BundledDoc { doc, changes }
    }
}

impl From<BundledDoc> for (DocId, Vec<Bytes>) {
    fn from(d: BundledDoc) -> Self {
        (d.doc, d.changes)
    }
}

/// Announces new heads of a document whose delta was too large to gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// The node where the changes were committed.
    pub origin: NodeId,
    /// The origin's region.
    pub region: Region,
    /// The document.
    pub doc: DocId,
    /// The document's heads at the origin after the changes.
    pub heads: Heads,
}

/// An Automerge sync message (`automerge::sync::Message::encode`) for one
/// document, or, with an empty `msg`, the answer "nothing to send, in sync":
/// Automerge stays silent when it has nothing to say, which a sender could
/// not tell from a lost message. Every non-empty sync message is answered by
/// one or the other; an empty one is never answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFrame {
    /// The document.
    pub doc: DocId,
    /// The encoded Automerge sync message; empty for "in sync".
    pub msg: Bytes,
}

/// One step of range-based set reconciliation over `(document id, digest)`
/// items. The ranges partition the whole id space in order: each covers ids
/// from the previous range's `upper` (the first: from the smallest id) up to,
/// not including, its own `upper` (the last: to the end).
///
/// On the wire each upper bound is written relative to the previous one in
/// the same message, as `[shared prefix length, rest]` (`null` for the end),
/// since neighbouring bounds share long prefixes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ReconcileRepr", into = "ReconcileRepr")]
pub struct Reconcile {
    /// Chosen by the node that started the reconciliation; echoed in replies.
    pub session: u64,
    /// The ranges, in id order.
    pub ranges: Vec<RangePart>,
}

/// The compact wire form of [`Reconcile`].
#[derive(Clone, Serialize, Deserialize)]
struct ReconcileRepr(u64, Vec<(Option<(usize, String)>, RangeBody)>);

impl From<Reconcile> for ReconcileRepr {
    fn from(r: Reconcile) -> Self {
        let mut previous = String::new();
        let ranges = r
            .ranges
            .into_iter()
            .map(|part| {
                let bound = part.upper.map(|upper| {
                    let shared = previous
                        .bytes()
                        .zip(upper.as_str().bytes())
                        .take_while(|(a, b)| a == b)
                        .count();
                    let rest = upper.as_str()[shared..].to_string();
                    previous = upper.as_str().to_string();
                    (shared, rest)
                });
                (bound, part.body)
            })
            .collect();
        ReconcileRepr(r.session, ranges)
    }
}

impl TryFrom<ReconcileRepr> for Reconcile {
    type Error = String;

    fn try_from(r: ReconcileRepr) -> Result<Self, String> {
        let mut previous = String::new();
        let mut ranges = Vec::with_capacity(r.1.len());
        for (bound, body) in r.1 {
            let upper = match bound {
                None => None,
                Some((shared, rest)) => {
                    let prefix = previous
                        .get(..shared)
                        .ok_or("range bound shares more than the previous bound holds")?;
                    let id = DocId::new(format!("{prefix}{rest}")).map_err(|e| e.to_string())?;
                    previous = id.as_str().to_string();
                    Some(id)
                }
            };
            ranges.push(RangePart { upper, body });
        }
        Ok(Reconcile {
            session: r.0,
            ranges,
        })
    }
}

/// One range of a [`Reconcile`] message. On the wire: `[upper, body]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    from = "(Option<DocId>, RangeBody)",
    into = "(Option<DocId>, RangeBody)"
)]
pub struct RangePart {
    /// Exclusive upper bound; `None` for the end of the id space.
    pub upper: Option<DocId>,
    /// What the sender says about the range.
    pub body: RangeBody,
}

impl From<(Option<DocId>, RangeBody)> for RangePart {
    fn from((upper, body): (Option<DocId>, RangeBody)) -> Self {
        RangePart { upper, body }
    }
}

impl From<RangePart> for (Option<DocId>, RangeBody) {
    fn from(p: RangePart) -> Self {
        (p.upper, p.body)
    }
}

/// What a [`RangePart`] says about its range. On the wire: `"s"`,
/// `{"f": [fingerprint, count]}`, `{"i": [items, reply, lacking]}`,
/// `{"k": [start, cells]}`, `{"q": [start, count]}` or
/// `{"d": [docs, keys]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BodyRepr", into = "BodyRepr")]
pub enum RangeBody {
    /// Nothing to do here (already equal, or settled).
    Skip,
    /// The fingerprint of the sender's items in the range.
    Fingerprint {
        /// Sum of the items' hashes, see `reconcile`.
        fingerprint: Bytes,
        /// Number of items.
        count: u64,
    },
    /// The sender's items in the range, listed.
    Items {
        /// The items.
        items: Vec<Item>,
        /// Whether the receiver should answer with its own items.
        reply: bool,
        /// In an answer: a bitmap over the items of the message answered
        /// (bit `k` of byte `k / 8`, least significant first), set for items
        /// the sender lacks or holds at a different digest; in an answer to
        /// a [`RangeBody::Decoded`], over its documents, set for those the
        /// sender lacks entirely.
        lacking: Option<Bytes>,
    },
    /// Cells `start..` of the sketch of the sender's items in the range
    /// (rateless IBLT, see `reconcile::sketch`), each
    /// [`SKETCH_CELL_LEN`] bytes. Only the side answering a session sends
    /// them; the side that started it decodes.
    Sketch {
        /// Index of the first cell.
        start: u64,
        /// The cells.
        cells: Bytes,
    },
    /// Asks for cells `start .. start + count` of the receiver's sketch of
    /// the range.
    SketchRequest {
        /// Index of the first cell wanted.
        start: u64,
        /// Number of cells wanted.
        count: u64,
    },
    /// A decoded sketch: the sender's documents in the range that differ
    /// from the receiver's, and the keys of the receiver's items that differ
    /// from the sender's ([`SKETCH_KEY_LEN`] bytes each). Asks for an
    /// answer: the receiver's differing items the sender lacks entirely,
    /// and which of the documents the receiver lacks entirely.
    Decoded {
        /// The sender's differing documents.
        docs: Vec<DocId>,
        /// Keys of the receiver's differing items.
        keys: Bytes,
    },
}

/// The compact wire form of [`RangeBody`].
#[derive(Clone, Serialize, Deserialize)]
enum BodyRepr {
    #[serde(rename = "s")]
    Skip,
    #[serde(rename = "f")]
    Fingerprint(Bytes, u64),
    #[serde(rename = "i")]
    Items(Vec<Item>, bool, Option<Bytes>),
    #[serde(rename = "k")]
    Sketch(u64, Bytes),
    #[serde(rename = "q")]
    SketchRequest(u64, u64),
    #[serde(rename = "d")]
    Decoded(Vec<DocId>, Bytes),
}

impl From<BodyRepr> for RangeBody {
    fn from(r: BodyRepr) -> Self {
        match r {
            BodyRepr::Skip => RangeBody::Skip,
            BodyRepr::Fingerprint(fingerprint, count) => {
                RangeBody::Fingerprint { fingerprint, count }
            }
            BodyRepr::Items(items, reply, lacking) => RangeBody::Items {
                items,
                reply,
                lacking,
            },
            BodyRepr::Sketch(start, cells) => RangeBody::Sketch { start, cells },
            BodyRepr::SketchRequest(start, count) => RangeBody::SketchRequest { start, count },
            BodyRepr::Decoded(docs, keys) => RangeBody::Decoded { docs, keys },
        }
    }
}

impl From<RangeBody> for BodyRepr {
    fn from(b: RangeBody) -> Self {
        match b {
            RangeBody::Skip => BodyRepr::Skip,
            RangeBody::Fingerprint { fingerprint, count } => {
                BodyRepr::Fingerprint(fingerprint, count)
            }
            RangeBody::Items {
                items,
                reply,
                lacking,
            } => BodyRepr::Items(items, reply, lacking),
            RangeBody::Sketch { start, cells } => BodyRepr::Sketch(start, cells),
            RangeBody::SketchRequest { start, count } => BodyRepr::SketchRequest(start, count),
            RangeBody::Decoded { docs, keys } => BodyRepr::Decoded(docs, keys),
        }
    }
}

/// One reconciliation item: a document and a digest of its heads. On the
/// wire: `[doc, digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(DocId, Bytes)", into = "(DocId, Bytes)")]
pub struct Item {
    /// The document.
    pub doc: DocId,
    /// The first [`ITEM_DIGEST_LEN`] bytes of the digest of its heads.
    pub digest: Bytes,
}

impl From<(DocId, Bytes)> for Item {
    fn from((doc, digest): (DocId, Bytes)) -> Self {
        Item { doc, digest }
    }
}

impl From<Item> for (DocId, Bytes) {
    fn from(i: Item) -> Self {
        (i.doc, i.digest)
    }
}

/// Heads the sender holds, per document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The documents and heads.
    pub entries: Vec<AckEntry>,
}

/// One document in an [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckEntry {
    /// The document.
    pub doc: DocId,
    /// Its heads at the sender.
    pub heads: Heads,
}

/// A byte string (CBOR major type 2).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

/// Change hashes, sorted, as one byte string of 32-byte hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Heads(Bytes);

impl Heads {
    /// Encodes `heads` (sorted on the way), at most [`MAX_HEADS`] of them: a
    /// longer list keeps its first `MAX_HEADS` in sort order, so a node never
    /// sends a list its peers refuse. Every heads list on the wire reports
    /// what the sender holds, and a subset of what it holds is still true
    /// (a receiver only concludes less from it); see `docs/protocol.md`.
    pub fn new(heads: &[automerge::ChangeHash]) -> Heads {
        let mut sorted = heads.to_vec();
        sorted.sort_unstable();
        sorted.truncate(MAX_HEADS);
        Heads(Bytes(sorted.iter().flat_map(|h| h.0).collect()))
    }

    /// The hashes.
    pub fn to_vec(&self) -> Vec<automerge::ChangeHash> {
        self.0
             .0
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                automerge::ChangeHash(h)
            })
            .collect()
    }

    /// Number of hashes.
    pub fn len(&self) -> usize {
        self.0 .0.len() / 32
    }

    /// Whether there are none (a document with no history).
    pub fn is_empty(&self) -> bool {
        self.0 .0.is_empty()
    }

    fn check(&self) -> Result<(), WireError> {
        if !self.0 .0.len().is_multiple_of(32) {
            return Err(WireError::Malformed(
                "heads are not a whole number of 32-byte hashes".into(),
            ));
        }
        limit("heads", self.len(), MAX_HEADS)
    }
}

impl Hello {
    /// The versions the sender speaks.
    pub fn versions(&self) -> VersionRange {
        VersionRange {
            min: self.min_version.unwrap_or(self.version),
            max: self.version,
        }
    }
}

impl Envelope {
    /// Encodes the envelope as CBOR in the newest version this build
    /// speaks.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_at(PROTOCOL_VERSION)
    }

    /// Encodes the envelope as CBOR in protocol `version` (one this build
    /// speaks, as negotiated with the receiver, or [`HELLO_VERSION`] for a
    /// hello).
    pub fn encode_at(&self, version: u32) -> Vec<u8> {
        debug_assert!(SUPPORTED_VERSIONS.contains(u64::from(version)) || version == HELLO_VERSION);
        let mut out = Vec::new();
        // Writing into a Vec cannot fail, and every type here serializes.
        #[allow(clippy::expect_used)]
        ciborium::into_writer(&(version, &self.cluster, &self.message), &mut out)
            .expect("wire messages serialize");
        out
    }

    /// Decodes and validates an envelope received on a channel whose limit is
    /// `max_bytes` ([`MAX_GOSSIP_BYTES`] or [`MAX_FRAME_BYTES`]).
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Envelope, WireError> {
        if bytes.len() > max_bytes {
            return Err(WireError::TooLarge {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        let version = probe_version(bytes)?;
        let unsupported = WireError::UnsupportedVersion {
            found: version,
            supported: SUPPORTED_VERSIONS,
        };
        // Outside this build's range, only a hello is read.
        let hello_only = !SUPPORTED_VERSIONS.contains(version);
        if hello_only && version != u64::from(HELLO_VERSION) {
            return Err(unsupported);
        }
        let decoded: Result<(u32, ClusterId, Message), WireError> =
            ciborium::from_reader(bytes).map_err(classify);
        let (_, cluster, message) = match decoded {
            Ok(d) if hello_only && !matches!(d.2, Message::Hello(_)) => return Err(unsupported),
            Err(_) if hello_only => return Err(unsupported),
            other => other?,
        };
        if matches!(message, Message::Bundle(_)) && version < u64::from(BUNDLE_VERSION) {
            // Version 1 has no bundle: refused as a version 1 build would.
            return Err(WireError::UnknownKind("bundle".into()));
        }
        if version < u64::from(SKETCH_VERSION) && message.has_sketch() {
            return Err(WireError::Malformed(
                "reconciliation sketch in protocol version 1".into(),
            ));
        }
        message.check()?;
        Ok(Envelope { cluster, message })
    }
}

impl Message {
    /// Whether this is a reconciliation holding a sketch body (none before
    /// [`SKETCH_VERSION`]).
    fn has_sketch(&self) -> bool {
        let Message::Reconcile(r) = self else {
            return false;
        };
        r.ranges.iter().any(|p| {
            matches!(
                p.body,
                RangeBody::Sketch { .. }
                    | RangeBody::SketchRequest { .. }
                    | RangeBody::Decoded { .. }
            )
        })
    }

    /// Checks every count against its limit.
    fn check(&self) -> Result<(), WireError> {
        match self {
            Message::Hello(h) => {
                let versions = h.versions();
                if versions.min > versions.max {
                    return Err(WireError::Malformed(
                        "hello min_version is above its version".into(),
                    ));
                }
                match &h.store {
                    Some(store) if !crate::layout::is_store_id(store) => {
                        Err(WireError::Malformed("hello store id is not a UUID".into()))
                    }
                    _ => Ok(()),
                }
            }
            Message::Sync(_) => Ok(()),
            Message::Delta(d) => {
                limit("delta changes", d.changes.len(), MAX_CHANGES_PER_DELTA)?;
                d.heads.check()
            }
            Message::Announce(a) => a.heads.check(),
            Message::Push(p) => limit("push changes", p.changes.len(), MAX_CHANGES_PER_DELTA),
            Message::Bundle(b) => {
                limit("bundle documents", b.docs.len(), MAX_BUNDLE_DOCS)?;
                b.docs.iter().try_for_each(|d| {
                    limit("bundle changes", d.changes.len(), MAX_CHANGES_PER_DELTA)
                })
            }
            Message::Reconcile(r) => {
                limit("reconcile ranges", r.ranges.len(), MAX_RANGES)?;
                let (mut items, mut cells) = (0, 0);
                for part in &r.ranges {
                    match &part.body {
                        RangeBody::Items { items: list, .. } => {
                            items += list.len();
                            if list.iter().any(|i| i.digest.0.len() != ITEM_DIGEST_LEN) {
                                return Err(WireError::Malformed("item digest length".into()));
                            }
                        }
                        RangeBody::Fingerprint { fingerprint, .. }
                            if fingerprint.0.len() != FINGERPRINT_LEN =>
                        {
                            return Err(WireError::Malformed("fingerprint length".into()));
                        }
                        RangeBody::Sketch { start, cells: c } => {
                            if !c.0.len().is_multiple_of(SKETCH_CELL_LEN) {
                                return Err(WireError::Malformed("sketch cell length".into()));
                            }
                            let n = c.0.len() / SKETCH_CELL_LEN;
                            cells += n;
                            sketch_window(*start, n as u64)?;
                        }
                        RangeBody::SketchRequest { start, count } => {
                            sketch_window(*start, *count)?;
                        }
                        RangeBody::Decoded { docs, keys } => {
                            if !keys.0.len().is_multiple_of(SKETCH_KEY_LEN) {
                                return Err(WireError::Malformed("sketch key length".into()));
                            }
                            items += docs.len() + keys.0.len() / SKETCH_KEY_LEN;
                        }
                        _ => {}
                    }
                }
                limit("reconcile sketch cells", cells, MAX_SKETCH_CELLS)?;
                limit("reconcile items", items, MAX_ITEMS)
            }
            Message::Ack(a) => {
                limit("ack entries", a.entries.len(), MAX_ACK_ENTRIES)?;
                a.entries.iter().try_for_each(|e| e.heads.check())
            }
        }
    }
}

/// A window of sketch cells must end within [`MAX_SKETCH_CELLS`].
fn sketch_window(start: u64, count: u64) -> Result<(), WireError> {
    let end = start.saturating_add(count);
    limit(
        "reconcile sketch window",
        usize::try_from(end).unwrap_or(usize::MAX),
        MAX_SKETCH_CELLS,
    )
}

fn limit(what: &'static str, count: usize, limit: usize) -> Result<(), WireError> {
    if count > limit {
        return Err(WireError::LimitExceeded { what, count, limit });
    }
    Ok(())
}

/// Reads the version from the start of `[version, cluster, message]` without
/// decoding the rest.
fn probe_version(bytes: &[u8]) -> Result<u64, WireError> {
    let malformed = || WireError::Malformed("not a Causeway envelope".into());
    let (&first, rest) = bytes.split_first().ok_or_else(malformed)?;
    if first != 0x83 {
        return Err(malformed());
    }
    let (&head, rest) = rest.split_first().ok_or_else(malformed)?;
    if head >> 5 != 0 {
        return Err(malformed());
    }
    let width = match head & 0x1f {
        small @ 0..=23 => return Ok(u64::from(small)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return Err(malformed()),
    };
    let digits = rest.get(..width).ok_or_else(malformed)?;
    Ok(digits.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
}

/// Sorts a CBOR decoding error into a [`WireError`]. Invalid ids surface as
/// serde custom errors carrying the validator's message.
fn classify(e: ciborium::de::Error<std::io::Error>) -> WireError {
    let text = e.to_string();
    if text.contains("document id") {
        WireError::InvalidDocId(text)
    } else if text.contains("invalid node id")
        || text.contains("invalid region")
        || text.contains("invalid cluster id")
    {
        WireError::InvalidName(text)
    } else if let Some(kind) = unknown_variant(&text) {
        WireError::UnknownKind(kind)
    } else {
        WireError::Malformed(text)
    }
}

/// The name serde gives for an unknown enum variant (`unknown variant
/// `name`, expected ...`), shortened to a bounded length.
fn unknown_variant(text: &str) -> Option<String> {
    let rest = text.split("unknown variant `").nth(1)?;
    let name = rest.split('`').next()?;
    Some(name.chars().take(64).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cluster() -> ClusterId {
        ClusterId::new("test").unwrap()
    }

    fn delta() -> Message {
        Message::Delta(Delta {
            origin: NodeId::new("n1").unwrap(),
            region: Region::new("eu").unwrap(),
            doc: DocId::new("a/b").unwrap(),
            changes: vec![Bytes(vec![1, 2, 3])],
            heads: Heads::new(&[automerge::ChangeHash([7; 32])]),
        })
    }

    #[test]
    fn a_message_of_a_kind_this_build_does_not_know_is_told_apart() {
        let mut bytes = Vec::new();
        let unknown = std::collections::BTreeMap::from([("batch", vec![1u8, 2])]);
        ciborium::into_writer(&(PROTOCOL_VERSION, "test", unknown), &mut bytes).unwrap();
        let err = Envelope::decode(&bytes, MAX_FRAME_BYTES).unwrap_err();
        assert_eq!(err, WireError::UnknownKind("batch".into()));
        assert!(err.from_other_version());
        let mut newer = delta_envelope_bytes();
        // A small version is its own CBOR header byte.
        newer[1] = u8::try_from(PROTOCOL_VERSION + 1).unwrap();
        let err = Envelope::decode(&newer, MAX_FRAME_BYTES).unwrap_err();
        assert!(err.from_other_version(), "{err}");
        let mut garbled = delta_envelope_bytes();
        garbled.truncate(garbled.len() - 3);
        assert!(!Envelope::decode(&garbled, MAX_FRAME_BYTES)
            .unwrap_err()
            .from_other_version());
    }

    fn bundle(docs: usize, changes: usize) -> Message {
        Message::Bundle(Bundle {
            docs: (0..docs)
                .map(|i| BundledDoc {
                    doc: DocId::new(format!("d/{i}")).unwrap(),
                    changes: vec![Bytes(vec![1, 2, 3]); changes],
                })
                .collect(),
        })
    }

    #[test]
    fn a_bundle_travels_from_version_2_and_within_its_limits() {
        let env = Envelope {
            cluster: cluster(),
            message: bundle(3, 2),
        };
        let bytes = env.encode_at(BUNDLE_VERSION);
        assert_eq!(Envelope::decode(&bytes, MAX_FRAME_BYTES).unwrap(), env);
        // Version 1 has no bundle: refused as a version 1 build refuses it,
        // without holding it against the sender.
        let old = env.encode_at(1);
        let err = Envelope::decode(&old, MAX_FRAME_BYTES).unwrap_err();
        assert_eq!(err, WireError::UnknownKind("bundle".into()));
        assert!(err.from_other_version());
        for (docs, changes, what) in [
            (MAX_BUNDLE_DOCS + 1, 1, "bundle documents"),
            (1, MAX_CHANGES_PER_DELTA + 1, "bundle changes"),
        ] {
            let bytes = Envelope {
                cluster: cluster(),
                message: bundle(docs, changes),
            }
            .encode();
            match Envelope::decode(&bytes, MAX_FRAME_BYTES) {
                Err(WireError::LimitExceeded { what: w, .. }) => assert_eq!(w, what),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    fn reconcile_with(body: RangeBody) -> Envelope {
        Envelope {
            cluster: cluster(),
            message: Message::Reconcile(Reconcile {
                session: 7,
                ranges: vec![RangePart { upper: None, body }],
            }),
        }
    }

    #[test]
    fn sketches_travel_from_version_2_and_within_their_limits() {
        let doc = DocId::new("a/1").unwrap();
        for body in [
            RangeBody::Sketch {
                start: 32,
                cells: Bytes(vec![7; 3 * SKETCH_CELL_LEN]),
            },
            RangeBody::SketchRequest {
                start: 64,
                count: 96,
            },
            RangeBody::Decoded {
                docs: vec![doc.clone()],
                keys: Bytes(vec![1; 2 * SKETCH_KEY_LEN]),
            },
        ] {
            let env = reconcile_with(body);
            let bytes = env.encode_at(SKETCH_VERSION);
            assert_eq!(Envelope::decode(&bytes, MAX_FRAME_BYTES).unwrap(), env);
            // No version 1 peer is sent one.
            match Envelope::decode(&env.encode_at(1), MAX_FRAME_BYTES) {
                Err(WireError::Malformed(m)) => assert!(m.contains("sketch"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        for (body, what) in [
            (
                RangeBody::Sketch {
                    start: 0,
                    cells: Bytes(vec![0; SKETCH_CELL_LEN + 1]),
                },
                None,
            ),
            (
                RangeBody::Sketch {
                    start: MAX_SKETCH_CELLS as u64,
                    cells: Bytes(vec![0; SKETCH_CELL_LEN]),
                },
                Some("reconcile sketch window"),
            ),
            (
                RangeBody::SketchRequest {
                    start: u64::MAX,
                    count: u64::MAX,
                },
                Some("reconcile sketch window"),
            ),
            (
                RangeBody::Decoded {
                    docs: vec![doc.clone(); MAX_ITEMS],
                    keys: Bytes(vec![0; SKETCH_KEY_LEN]),
                },
                Some("reconcile items"),
            ),
            (
                RangeBody::Decoded {
                    docs: Vec::new(),
                    keys: Bytes(vec![0; SKETCH_KEY_LEN - 1]),
                },
                None,
            ),
        ] {
            let bytes = reconcile_with(body).encode();
            match (Envelope::decode(&bytes, MAX_FRAME_BYTES), what) {
                (Err(WireError::LimitExceeded { what: w, .. }), Some(what)) => assert_eq!(w, what),
                (Err(WireError::Malformed(_)), None) => {}
                (other, what) => panic!("{what:?}: {other:?}"),
            }
        }
    }

    fn delta_envelope_bytes() -> Vec<u8> {
        Envelope {
            cluster: cluster(),
            message: delta(),
        }
        .encode()
    }

    #[test]
    fn messages_round_trip() {
        let env = Envelope {
            cluster: cluster(),
            message: delta(),
        };
        let bytes = env.encode();
        assert_eq!(Envelope::decode(&bytes, MAX_GOSSIP_BYTES).unwrap(), env);
    }

    #[test]
    fn a_push_round_trips_as_a_tuple_and_is_held_to_the_delta_limit() {
        let push = Push {
            root: NodeId::new("n2").unwrap(),
            origin: NodeId::new("n1").unwrap(),
            doc: DocId::new("a/b").unwrap(),
            changes: vec![Bytes(vec![1, 2, 3])],
        };
        let env = Envelope {
            cluster: cluster(),
            message: Message::Push(push.clone()),
        };
        let bytes = env.encode();
        assert_eq!(Envelope::decode(&bytes, MAX_FRAME_BYTES).unwrap(), env);
        // [1, "test", {"push": ["n2", "n1", "a/b", [h'010203']]}]
        assert!(bytes.windows(7).any(|w| w == b"\x64push\x84b"));
        let too_many = Envelope {
            cluster: cluster(),
            message: Message::Push(Push {
                changes: vec![Bytes(vec![0]); MAX_CHANGES_PER_DELTA + 1],
                ..push
            }),
        };
        assert!(matches!(
            Envelope::decode(&too_many.encode(), MAX_FRAME_BYTES),
            Err(WireError::LimitExceeded { .. })
        ));
    }

    #[test]
    fn a_future_version_is_refused_before_decoding() {
        let bytes = {
            let mut out = Vec::new();
            let next = PROTOCOL_VERSION + 1;
            ciborium::into_writer(&(next, "test", "whatever comes next"), &mut out).unwrap();
            out
        };
        assert_eq!(
            Envelope::decode(&bytes, MAX_FRAME_BYTES),
            Err(WireError::UnsupportedVersion {
                found: u64::from(PROTOCOL_VERSION + 1),
                supported: SUPPORTED_VERSIONS
            })
        );
        let big = [0x83, 0x1b, 0, 0, 1, 0, 0, 0, 0, 0];
        assert!(matches!(
            Envelope::decode(&big, MAX_FRAME_BYTES),
            Err(WireError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn two_ranges_negotiate_the_highest_version_both_speak() {
        let range = |min, max| VersionRange { min, max };
        assert_eq!(range(1, 3).negotiate(range(2, 5)), Some(3));
        assert_eq!(range(2, 5).negotiate(range(1, 3)), Some(3));
        assert_eq!(range(1, 1).negotiate(range(1, 4)), Some(1));
        assert_eq!(range(4, 4).negotiate(range(4, 4)), Some(4));
        assert_eq!(range(1, 1).negotiate(range(2, 3)), None);
        assert_eq!(range(3, 6).negotiate(range(1, 2)), None);
        assert_eq!(
            SUPPORTED_VERSIONS.negotiate(SUPPORTED_VERSIONS),
            Some(PROTOCOL_VERSION)
        );
        assert_eq!(range(2, 3).to_string(), "2 to 3");
        assert_eq!(range(1, 1).to_string(), "1");
    }

    #[test]
    fn a_hello_states_its_range_and_one_without_a_minimum_speaks_one_version() {
        let hello = |version, min_version| Hello {
            node: NodeId::new("n1").unwrap(),
            region: Region::new("eu").unwrap(),
            version,
            min_version,
            store: None,
        };
        let env = |h| Envelope {
            cluster: cluster(),
            message: Message::Hello(h),
        };
        // A build that predates negotiation sends no minimum.
        let old = env(hello(1, None)).encode_at(HELLO_VERSION);
        let Message::Hello(h) = Envelope::decode(&old, MAX_FRAME_BYTES).unwrap().message else {
            panic!("not a hello")
        };
        assert_eq!(h.versions(), VersionRange { min: 1, max: 1 });
        let wide = env(hello(7, Some(5))).encode_at(HELLO_VERSION);
        let Message::Hello(h) = Envelope::decode(&wide, MAX_FRAME_BYTES).unwrap().message else {
            panic!("not a hello")
        };
        assert_eq!(h.versions(), VersionRange { min: 5, max: 7 });
        assert!(matches!(
            Envelope::decode(&env(hello(2, Some(3))).encode(), MAX_FRAME_BYTES),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let env = Envelope {
            cluster: cluster(),
            message: delta(),
        };
        let bytes = env.encode();
        assert!(matches!(
            Envelope::decode(&bytes, bytes.len() - 1),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_declared_length_beyond_the_input_fails_without_allocating_it() {
        // [1, "test", {"sync": {"doc": "a", "msg": <bytes claiming 2^40>}}]
        let mut bytes = vec![0x83, 0x01, 0x64];
        bytes.extend_from_slice(b"test");
        bytes.extend_from_slice(&[0xa1, 0x64]);
        bytes.extend_from_slice(b"sync");
        bytes.extend_from_slice(&[0xa2, 0x63]);
        bytes.extend_from_slice(b"doc");
        bytes.extend_from_slice(&[0x61, b'a', 0x63]);
        bytes.extend_from_slice(b"msg");
        bytes.extend_from_slice(&[0x5b, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2]);
        assert!(matches!(
            Envelope::decode(&bytes, MAX_FRAME_BYTES),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn invalid_ids_and_counts_get_their_own_reasons() {
        let mut bad_doc = Vec::new();
        ciborium::into_writer(
            &(
                1u32,
                "test",
                Message::Sync(SyncFrame {
                    doc: DocId::new("x").unwrap(),
                    msg: Bytes(vec![]),
                }),
            ),
            &mut bad_doc,
        )
        .unwrap();
        // Replace the id "x" with the invalid "!" in place.
        let pos = bad_doc.iter().rposition(|b| *b == b'x').unwrap();
        bad_doc[pos] = b'!';
        assert!(matches!(
            Envelope::decode(&bad_doc, MAX_FRAME_BYTES),
            Err(WireError::InvalidDocId(_))
        ));

        let mut bad_cluster = Vec::new();
        ciborium::into_writer(&(1u32, "Bad Cluster", delta()), &mut bad_cluster).unwrap();
        assert!(matches!(
            Envelope::decode(&bad_cluster, MAX_FRAME_BYTES),
            Err(WireError::InvalidName(_))
        ));

        let Message::Delta(mut d) = delta() else {
            unreachable!()
        };
        d.changes = vec![Bytes(vec![0]); MAX_CHANGES_PER_DELTA + 1];
        let env = Envelope {
            cluster: cluster(),
            message: Message::Delta(d),
        };
        assert!(matches!(
            Envelope::decode(&env.encode(), MAX_FRAME_BYTES),
            Err(WireError::LimitExceeded { .. })
        ));

        let short_fingerprint = Envelope {
            cluster: cluster(),
            message: Message::Reconcile(Reconcile {
                session: 1,
                ranges: vec![RangePart {
                    upper: None,
                    body: RangeBody::Fingerprint {
                        fingerprint: Bytes(vec![0; 3]),
                        count: 1,
                    },
                }],
            }),
        };
        assert!(matches!(
            Envelope::decode(&short_fingerprint.encode(), MAX_FRAME_BYTES),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn a_heads_list_longer_than_peers_accept_is_cut_to_the_limit_in_sort_order() {
        let many: Vec<automerge::ChangeHash> = (0..=MAX_HEADS as u32 + 10)
            .rev()
            .map(|i| {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&i.to_be_bytes());
                automerge::ChangeHash(h)
            })
            .collect();
        let heads = Heads::new(&many);
        assert_eq!(heads.len(), MAX_HEADS);
        let mut sorted = many.clone();
        sorted.sort_unstable();
        assert_eq!(heads.to_vec(), sorted[..MAX_HEADS]);
        let Message::Delta(mut d) = delta() else {
            unreachable!()
        };
        d.heads = heads;
        let env = Envelope {
            cluster: cluster(),
            message: Message::Delta(d),
        };
        assert!(Envelope::decode(&env.encode(), MAX_GOSSIP_BYTES).is_ok());
    }

    #[test]
    fn garbage_never_panics() {
        let seed = delta();
        let bytes = Envelope {
            cluster: cluster(),
            message: seed,
        }
        .encode();
        for cut in 0..bytes.len() {
            let _ = Envelope::decode(&bytes[..cut], MAX_FRAME_BYTES);
            let mut flipped = bytes.clone();
            flipped[cut] ^= 0xff;
            let _ = Envelope::decode(&flipped, MAX_FRAME_BYTES);
        }
    }
}
