//! The messages of automerge-repo's network protocol, version 1: one CBOR
//! map per WebSocket binary frame, with text keys (`type`, `senderId`,
//! `targetId`, `documentId`, `data`, ...), as `@automerge/automerge-repo`
//! 2.5.6 and samod 0.16 write them.
//!
//! Decoding is lenient where those implementations differ or are loose:
//! unknown keys are skipped, a missing optional field and CBOR `undefined`
//! both mean absent, integers may arrive as floats (JavaScript numbers),
//! and the peer metadata is read from `peerMetadata` or `metadata`. It is
//! strict about what Causeway acts on: a field it needs with the wrong type
//! is an error, and every string and list is bounded.

use ciborium::Value;

/// The only protocol version there is.
pub const PROTOCOL_V1: &str = "1";

/// Longest peer id, storage id, session id or document id string accepted.
pub const MAX_ID_LEN: usize = 256;

/// Most protocol versions a `join` may list.
const MAX_VERSIONS: usize = 16;

/// Most CBOR items (each header: a map, a key, a number, a string) one
/// frame may hold; byte and text strings count once whatever their length.
/// Protocol messages hold a few dozen. Decoding builds a value per item, so
/// without this bound a 16 MiB frame of one-byte items would cost hundreds
/// of MiB of memory.
pub const MAX_FRAME_ITEMS: usize = 4096;

/// What a peer says about itself in `join` and `peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// Its storage id, if it has storage.
    pub storage_id: Option<String>,
    /// Whether it keeps nothing (no storage).
    pub is_ephemeral: bool,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoMessage {
    /// The client's opening message.
    Join {
        /// Its peer id.
        sender: String,
        /// What it says about itself.
        metadata: Option<PeerMetadata>,
        /// The protocol versions it speaks; absent means `["1"]`.
        versions: Option<Vec<String>>,
    },
    /// The server's answer to `join`.
    Peer {
        /// Our peer id.
        sender: String,
        /// The client's.
        target: String,
        /// Our storage id and `isEphemeral: false`.
        metadata: PeerMetadata,
        /// Always [`PROTOCOL_V1`].
        version: String,
    },
    /// A fatal problem; the connection closes after it.
    Error {
        /// What went wrong.
        message: String,
    },
    /// The peer is leaving (advisory).
    Leave,
    /// An Automerge sync message for a document. `request` adds "I do not
    /// have it; tell me if you do not either".
    Sync {
        /// `request` rather than `sync`.
        request: bool,
        /// The sender's peer id.
        sender: String,
        /// The receiver's.
        target: String,
        /// The automerge-repo document id.
        document: String,
        /// The encoded Automerge sync message.
        data: Vec<u8>,
    },
    /// "I do not have this document, and neither does anyone I asked."
    DocUnavailable {
        /// The sender's peer id.
        sender: String,
        /// The receiver's.
        target: String,
        /// The document.
        document: String,
    },
    /// An application message about a document, not stored (presence,
    /// cursors). Relays change only `target`.
    Ephemeral {
        /// The peer that made it.
        sender: String,
        /// The receiver.
        target: String,
        /// The document.
        document: String,
        /// The sender's session.
        session: String,
        /// Increases with every message of the session.
        count: u64,
        /// The application's payload (CBOR).
        data: Vec<u8>,
    },
    /// A message Causeway accepts and ignores (`remote-heads-changed`,
    /// `remote-subscription-change`, or a type from a later version).
    Ignored {
        /// Its `type`.
        kind: String,
    },
}

/// Why a frame is not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(String);

impl RepoMessage {
    /// The value of `type` on the wire.
    pub fn kind(&self) -> &str {
        match self {
            RepoMessage::Join { .. } => "join",
            RepoMessage::Peer { .. } => "peer",
            RepoMessage::Error { .. } => "error",
            RepoMessage::Leave => "leave",
            RepoMessage::Sync { request: true, .. } => "request",
            RepoMessage::Sync { request: false, .. } => "sync",
            RepoMessage::DocUnavailable { .. } => "doc-unavailable",
            RepoMessage::Ephemeral { .. } => "ephemeral",
            RepoMessage::Ignored { kind } => kind,
        }
    }

    /// The sender's peer id, for messages that carry one Causeway checks.
    pub fn sender(&self) -> Option<&str> {
        match self {
            RepoMessage::Join { sender, .. }
            | RepoMessage::Peer { sender, .. }
            | RepoMessage::Sync { sender, .. }
            | RepoMessage::DocUnavailable { sender, .. } => Some(sender),
            _ => None,
        }
    }

    /// Decodes one frame.
    pub fn decode(frame: &[u8]) -> Result<RepoMessage, WireError> {
        let items = count_items(frame, MAX_FRAME_ITEMS)?;
        if items > MAX_FRAME_ITEMS {
            return Err(WireError(format!(
                "more than {MAX_FRAME_ITEMS} CBOR items in one message"
            )));
        }
        let value: Value =
            ciborium::from_reader(frame).map_err(|e| WireError(format!("not CBOR: {e}")))?;
        let Value::Map(entries) = value else {
            return Err(WireError("not a CBOR map".into()));
        };
        let fields = Fields(&entries);
        let kind = fields.text("type")?;
        Ok(match kind.as_str() {
            "join" => RepoMessage::Join {
                sender: fields.text("senderId")?,
                metadata: fields.metadata()?,
                versions: fields.versions()?,
            },
            "peer" => RepoMessage::Peer {
                sender: fields.text("senderId")?,
                target: fields.text("targetId")?,
                metadata: fields.metadata()?.unwrap_or_default(),
                version: fields
                    .opt_text("selectedProtocolVersion")?
                    .unwrap_or_else(|| PROTOCOL_V1.into()),
            },
            "error" => RepoMessage::Error {
                message: fields.opt_text("message")?.unwrap_or_default(),
            },
            "leave" => RepoMessage::Leave,
            "sync" | "request" => RepoMessage::Sync {
                request: kind == "request",
                sender: fields.text("senderId")?,
                target: fields.text("targetId")?,
                document: fields.text("documentId")?,
                data: fields.bytes("data")?,
            },
            "doc-unavailable" => RepoMessage::DocUnavailable {
                sender: fields.text("senderId")?,
                target: fields.text("targetId")?,
                document: fields.text("documentId")?,
            },
            "ephemeral" => RepoMessage::Ephemeral {
                sender: fields.text("senderId")?,
                target: fields.text("targetId")?,
                document: fields.text("documentId")?,
                session: fields.text("sessionId")?,
                count: fields.uint("count")?,
                data: fields.bytes("data")?,
            },
            _ => RepoMessage::Ignored { kind },
        })
    }

    /// Encodes as one frame: a CBOR map with text keys and byte strings,
    /// as automerge-repo's encoder writes it.
    pub fn encode(&self) -> Vec<u8> {
        let text = |s: &str| Value::Text(s.to_string());
        let mut map: Vec<(Value, Value)> = vec![(text("type"), text(self.kind()))];
        let mut put = |k: &str, v: Value| map.push((text(k), v));
        match self {
            RepoMessage::Join {
                sender,
                metadata,
                versions,
            } => {
                put("senderId", text(sender));
                if let Some(m) = metadata {
                    put("peerMetadata", metadata_value(m));
                }
                if let Some(v) = versions {
                    put(
                        "supportedProtocolVersions",
                        Value::Array(v.iter().map(|s| text(s)).collect()),
                    );
                }
            }
            RepoMessage::Peer {
                sender,
                target,
                metadata,
                version,
            } => {
                put("senderId", text(sender));
                put("targetId", text(target));
                put("peerMetadata", metadata_value(metadata));
                put("selectedProtocolVersion", text(version));
            }
            RepoMessage::Error { message } => put("message", text(message)),
            RepoMessage::Leave | RepoMessage::Ignored { .. } => {}
            RepoMessage::Sync {
                sender,
                target,
                document,
                data,
                ..
            } => {
                put("senderId", text(sender));
                put("targetId", text(target));
                put("documentId", text(document));
                put("data", Value::Bytes(data.clone()));
            }
            RepoMessage::DocUnavailable {
                sender,
                target,
                document,
            } => {
                put("senderId", text(sender));
                put("targetId", text(target));
                put("documentId", text(document));
            }
            RepoMessage::Ephemeral {
                sender,
                target,
                document,
                session,
                count,
                data,
            } => {
                put("senderId", text(sender));
                put("targetId", text(target));
                put("documentId", text(document));
                put("sessionId", text(session));
                put("count", Value::Integer((*count).into()));
                put("data", Value::Bytes(data.clone()));
            }
        }
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = ciborium::into_writer(&Value::Map(map), &mut out);
        out
    }
}

/// Counts the CBOR items of `bytes` by their headers, stopping once more
/// than `max` were seen (the count is then `max + 1`). The payloads of byte
/// and text strings are skipped, not looked at; a truncated item is an
/// error. Nesting is not checked here (the decoder does that).
fn count_items(mut bytes: &[u8], max: usize) -> Result<usize, WireError> {
    let truncated = || WireError("not CBOR: truncated".into());
    let mut count = 0;
    while let Some((&initial, rest)) = bytes.split_first() {
        count += 1;
        if count > max {
            return Ok(count);
        }
        let (major, info) = (initial >> 5, initial & 0x1f);
        let extra = match info {
            0..=23 | 31 => 0,
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return Err(WireError("not CBOR: reserved header".into())),
        };
        let (argument, rest) = rest.split_at_checked(extra).ok_or_else(truncated)?;
        let value = if extra == 0 {
            u64::from(info)
        } else {
            argument.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b))
        };
        bytes = rest;
        // Byte and text strings of definite length: skip the payload.
        if matches!(major, 2 | 3) && info != 31 {
            let len = usize::try_from(value).map_err(|_| truncated())?;
            bytes = bytes.get(len..).ok_or_else(truncated)?;
        }
    }
    Ok(count)
}

fn metadata_value(m: &PeerMetadata) -> Value {
    let mut map = Vec::new();
    if let Some(id) = &m.storage_id {
        map.push((Value::Text("storageId".into()), Value::Text(id.clone())));
    }
    map.push((
        Value::Text("isEphemeral".into()),
        Value::Bool(m.is_ephemeral),
    ));
    Value::Map(map)
}

/// The entries of a message map, looked up by text key.
struct Fields<'a>(&'a [(Value, Value)]);

impl Fields<'_> {
    /// The value under `key`; CBOR `null` and `undefined` count as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    fn opt_text(&self, key: &str) -> Result<Option<String>, WireError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Text(t)) if t.len() <= MAX_ID_LEN => Ok(Some(t.clone())),
            Some(Value::Text(t)) => Err(WireError(format!(
                "{key} is {} bytes long; at most {MAX_ID_LEN} are accepted",
                t.len()
            ))),
            Some(_) => Err(WireError(format!("{key} is not a string"))),
        }
    }

    fn text(&self, key: &str) -> Result<String, WireError> {
        self.opt_text(key)?
            .ok_or_else(|| WireError(format!("{key} is missing")))
    }

    fn bytes(&self, key: &str) -> Result<Vec<u8>, WireError> {
        match self.get(key) {
            Some(Value::Bytes(b)) => Ok(b.clone()),
            Some(_) => Err(WireError(format!("{key} is not a byte string"))),
            None => Err(WireError(format!("{key} is missing"))),
        }
    }

    fn uint(&self, key: &str) -> Result<u64, WireError> {
        match self.get(key) {
            Some(Value::Integer(i)) => {
                u64::try_from(*i).map_err(|_| WireError(format!("{key} is negative")))
            }
            // JavaScript numbers may be encoded as floats.
            Some(Value::Float(f)) if f.fract() == 0.0 && *f >= 0.0 && *f < 2f64.powi(53) => {
                Ok(*f as u64)
            }
            Some(_) => Err(WireError(format!("{key} is not an unsigned integer"))),
            None => Err(WireError(format!("{key} is missing"))),
        }
    }

    fn metadata(&self) -> Result<Option<PeerMetadata>, WireError> {
        let Some(value) = self.get("peerMetadata").or_else(|| self.get("metadata")) else {
            return Ok(None);
        };
        let Value::Map(entries) = value else {
            return Err(WireError("peerMetadata is not a map".into()));
        };
        let fields = Fields(entries);
        Ok(Some(PeerMetadata {
            storage_id: fields.opt_text("storageId")?,
            is_ephemeral: matches!(fields.get("isEphemeral"), Some(Value::Bool(true))),
        }))
    }

    fn versions(&self) -> Result<Option<Vec<String>>, WireError> {
        let Some(value) = self.get("supportedProtocolVersions") else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(WireError("supportedProtocolVersions is not a list".into()));
        };
        if items.len() > MAX_VERSIONS {
            return Err(WireError(format!(
                "supportedProtocolVersions lists {}; at most {MAX_VERSIONS} are accepted",
                items.len()
            )));
        }
        items
            .iter()
            .map(|v| match v {
                Value::Text(t) if t.len() <= MAX_ID_LEN => Ok(t.clone()),
                _ => Err(WireError(
                    "supportedProtocolVersions holds a non-string".into(),
                )),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(entries: Vec<(&str, Value)>) -> Vec<u8> {
        let map = entries
            .into_iter()
            .map(|(k, v)| (Value::Text(k.into()), v))
            .collect();
        let mut out = Vec::new();
        ciborium::into_writer(&Value::Map(map), &mut out).unwrap();
        out
    }

    #[test]
    fn every_message_round_trips() {
        let messages = [
            RepoMessage::Join {
                sender: "peer-1".into(),
                metadata: Some(PeerMetadata {
                    storage_id: Some("s".into()),
                    is_ephemeral: false,
                }),
                versions: Some(vec!["1".into()]),
            },
            RepoMessage::Peer {
                sender: "causeway".into(),
                target: "peer-1".into(),
                metadata: PeerMetadata {
                    storage_id: Some("s".into()),
                    is_ephemeral: false,
                },
                version: "1".into(),
            },
            RepoMessage::Error {
                message: "no".into(),
            },
            RepoMessage::Leave,
            RepoMessage::Sync {
                request: true,
                sender: "a".into(),
                target: "b".into(),
                document: "d".into(),
                data: vec![1, 2],
            },
            RepoMessage::DocUnavailable {
                sender: "a".into(),
                target: "b".into(),
                document: "d".into(),
            },
            RepoMessage::Ephemeral {
                sender: "a".into(),
                target: "b".into(),
                document: "d".into(),
                session: "s".into(),
                count: 3,
                data: vec![0xa0],
            },
        ];
        for m in messages {
            assert_eq!(RepoMessage::decode(&m.encode()).unwrap(), m);
        }
    }

    /// What JavaScript and samod send that a strict decoder would refuse.
    #[test]
    fn decodes_leniently() {
        // `undefined` storage id, `metadata` instead of `peerMetadata`, no
        // version list, an unknown key.
        let join = frame(vec![
            ("type", Value::Text("join".into())),
            ("senderId", Value::Text("p".into())),
            (
                "metadata",
                Value::Map(vec![
                    (Value::Text("storageId".into()), Value::Null),
                    (Value::Text("isEphemeral".into()), Value::Bool(true)),
                ]),
            ),
            ("later", Value::Integer(1.into())),
        ]);
        let mut undefined = join.clone();
        // CBOR `null` (0xf6) to `undefined` (0xf7).
        let at = undefined.iter().position(|b| *b == 0xf6).unwrap();
        undefined[at] = 0xf7;
        for bytes in [join, undefined] {
            assert_eq!(
                RepoMessage::decode(&bytes).unwrap(),
                RepoMessage::Join {
                    sender: "p".into(),
                    metadata: Some(PeerMetadata {
                        storage_id: None,
                        is_ephemeral: true
                    }),
                    versions: None,
                }
            );
        }
        // A count written as a float.
        let eph = frame(vec![
            ("type", Value::Text("ephemeral".into())),
            ("senderId", Value::Text("a".into())),
            ("targetId", Value::Text("b".into())),
            ("documentId", Value::Text("d".into())),
            ("sessionId", Value::Text("s".into())),
            ("count", Value::Float(7.0)),
            ("data", Value::Bytes(vec![1])),
        ]);
        assert!(matches!(
            RepoMessage::decode(&eph).unwrap(),
            RepoMessage::Ephemeral { count: 7, .. }
        ));
        let heads = frame(vec![
            ("type", Value::Text("remote-heads-changed".into())),
            ("newHeads", Value::Map(vec![])),
        ]);
        assert_eq!(
            RepoMessage::decode(&heads).unwrap(),
            RepoMessage::Ignored {
                kind: "remote-heads-changed".into()
            }
        );
    }

    #[test]
    fn a_frame_of_too_many_items_is_refused_before_it_is_decoded() {
        // A map of 5,000 one-byte keys and values: small, but 10,001 items.
        let mut frame = vec![0xb9, 0x13, 0x88];
        frame.extend(std::iter::repeat_n([0x00, 0x00], 5000).flatten());
        let err = RepoMessage::decode(&frame).unwrap_err();
        assert!(err.to_string().contains("CBOR items"), "{err}");
        // Long strings count once: a sync message with 1 MiB of data is fine.
        let sync = RepoMessage::Sync {
            request: false,
            sender: "a".into(),
            target: "b".into(),
            document: "d".into(),
            data: vec![7; 1 << 20],
        };
        assert_eq!(RepoMessage::decode(&sync.encode()).unwrap(), sync);
        assert_eq!(count_items(&sync.encode(), 100).unwrap(), 11);
        // Truncated headers and strings are errors.
        assert!(count_items(&[0x19, 0x01], 10).is_err());
        assert!(count_items(&[0x45, 0x01, 0x02], 10).is_err());
    }

    #[test]
    fn refuses_what_it_cannot_act_on() {
        assert!(RepoMessage::decode(b"\xff").is_err());
        assert!(RepoMessage::decode(&frame(vec![])).is_err(), "no type");
        let no_data = frame(vec![
            ("type", Value::Text("sync".into())),
            ("senderId", Value::Text("a".into())),
            ("targetId", Value::Text("b".into())),
            ("documentId", Value::Text("d".into())),
        ]);
        assert!(RepoMessage::decode(&no_data).is_err());
        let long = frame(vec![
            ("type", Value::Text("join".into())),
            ("senderId", Value::Text("x".repeat(MAX_ID_LEN + 1))),
        ]);
        assert!(RepoMessage::decode(&long).is_err());
        let negative = frame(vec![
            ("type", Value::Text("ephemeral".into())),
            ("senderId", Value::Text("a".into())),
            ("targetId", Value::Text("b".into())),
            ("documentId", Value::Text("d".into())),
            ("sessionId", Value::Text("s".into())),
            ("count", Value::Integer((-1).into())),
            ("data", Value::Bytes(vec![1])),
        ]);
        assert!(RepoMessage::decode(&negative).is_err());
    }
}
