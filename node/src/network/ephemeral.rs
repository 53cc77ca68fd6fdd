//! Ephemeral document messages between nodes: what automerge-repo clients
//! of one node broadcast about a document (presence, cursors), relayed to
//! the clients of every other node. They are not stored and not
//! replicated; gossip carries each once to every node (topic
//! `causeway/<cluster>/ephemeral`, signed by the node that publishes it),
//! and a node that misses one does not ask again.

use causeway_engine::DocId;
use serde::{Deserialize, Serialize};

/// Largest application payload of one ephemeral message, in bytes.
pub const MAX_EPHEMERAL_DATA_BYTES: usize = 64 * 1024;

/// Longest sender peer id or session id, in bytes.
pub const MAX_EPHEMERAL_ID_LEN: usize = 256;

/// Ephemeral messages waiting for the local relay; beyond this the slowest
/// receiver misses the oldest ones (counted).
pub const EPHEMERAL_QUEUE: usize = 1024;

/// One ephemeral message as nodes pass it on: the client's fields that a
/// relay must keep unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EphemeralRelay {
    /// The document it is about.
    pub doc: DocId,
    /// The client that made it (its automerge-repo peer id).
    pub sender: String,
    /// The client's session.
    pub session: String,
    /// Its count within the session.
    pub count: u64,
    /// The application's payload.
    #[serde(with = "serde_bytes_compat")]
    pub data: Vec<u8>,
}

impl EphemeralRelay {
    /// Checks the bounds of a message received or about to be sent.
    pub fn check(&self) -> Result<(), String> {
        if self.data.len() > MAX_EPHEMERAL_DATA_BYTES {
            return Err(format!(
                "{} bytes of data; at most {MAX_EPHEMERAL_DATA_BYTES} are relayed",
                self.data.len()
            ));
        }
        if self.sender.len() > MAX_EPHEMERAL_ID_LEN || self.session.len() > MAX_EPHEMERAL_ID_LEN {
            return Err(format!(
                "sender or session id longer than {MAX_EPHEMERAL_ID_LEN} bytes"
            ));
        }
        Ok(())
    }

    /// The gossip payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    /// Decodes and checks a gossip payload.
    pub fn decode(bytes: &[u8]) -> Result<EphemeralRelay, String> {
        if bytes.len() > MAX_EPHEMERAL_DATA_BYTES + 2 * MAX_EPHEMERAL_ID_LEN + 512 {
            return Err(format!("{} bytes is too large", bytes.len()));
        }
        let relay: EphemeralRelay =
            ciborium::from_reader(bytes).map_err(|e| format!("does not decode: {e}"))?;
        relay.check()?;
        Ok(relay)
    }
}

/// `data` as a CBOR byte string rather than an array of integers.
mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let bytes = ciborium::Value::deserialize(d)?;
        match bytes {
            ciborium::Value::Bytes(b) => Ok(b),
            _ => Err(serde::de::Error::custom("data is not a byte string")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_bounds() {
        let relay = EphemeralRelay {
            doc: DocId::new("4NMNnkMhL8jXrdJ9jamS58PAVdXu").unwrap(),
            sender: "peer-a".into(),
            session: "s1".into(),
            count: 9,
            data: vec![0xa1, 0x61, 0x78, 0x01],
        };
        assert_eq!(EphemeralRelay::decode(&relay.encode()).unwrap(), relay);
        let big = EphemeralRelay {
            data: vec![0; MAX_EPHEMERAL_DATA_BYTES + 1],
            ..relay.clone()
        };
        assert!(big.check().is_err());
        assert!(EphemeralRelay::decode(&big.encode()).is_err());
        assert!(EphemeralRelay::decode(b"\x01").is_err());
    }
}
