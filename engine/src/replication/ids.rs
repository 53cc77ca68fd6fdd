//! Names of nodes, regions and clusters: validated newtypes.
//!
//! All three are short ASCII strings. A [`NodeId`] is what the networking
//! layer calls the peer (a libp2p peer id in base58 in `causeway node`, `n0`
//! in the simulator); it is also part of storage keys, so it never contains
//! `0x00`. Regions and cluster ids are operator-chosen labels.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest [`NodeId`], in bytes.
pub const MAX_NODE_ID_LEN: usize = crate::MAX_PEER_ID_LEN;
/// Longest [`Region`] or [`ClusterId`], in bytes.
pub const MAX_LABEL_LEN: usize = 64;

/// Why a string is not a valid node id, region or cluster id. A caller error
/// when it comes from configuration; a misbehaving peer when it comes off the
/// wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    /// What was being named: "node id", "region" or "cluster id".
    pub kind: &'static str,
    /// The rejected value, truncated to its limit.
    pub value: String,
    /// Which rule it broke.
    pub reason: &'static str,
}

fn check(kind: &'static str, value: &str, max: usize, label: bool) -> Result<(), NameError> {
    let fail = |reason| NameError {
        kind,
        value: value.chars().take(max).collect(),
        reason,
    };
    if value.is_empty() {
        return Err(fail("must not be empty"));
    }
    if value.len() > max {
        return Err(fail("too long"));
    }
    let ok = |b: u8| {
        if label {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
        } else {
            b.is_ascii_graphic()
        }
    };
    if !value.bytes().all(ok) {
        return Err(fail(if label {
            "allowed are a-z, 0-9 and \"-_.\""
        } else {
            "allowed are printable ASCII characters without spaces"
        }));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $label:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check($kind, &value, $max, $label)?;
                Ok($name(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let value = String::deserialize(d)?;
                $name::new(value).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A node of the cluster: printable ASCII without spaces, 1 to
    /// [`MAX_NODE_ID_LEN`] bytes.
    NodeId,
    "node id",
    MAX_NODE_ID_LEN,
    false
);
name_type!(
    /// A region (a datacenter or availability zone): `a-z 0-9 - _ .`, 1 to
    /// [`MAX_LABEL_LEN`] bytes.
    Region,
    "region",
    MAX_LABEL_LEN,
    true
);
name_type!(
    /// A cluster: nodes with different cluster ids refuse each other's
    /// messages. Same rules as [`Region`].
    ClusterId,
    "cluster id",
    MAX_LABEL_LEN,
    true
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(NodeId::new("12D3KooWAbc").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("a b").is_err());
        assert!(NodeId::new("a\0b").is_err());
        assert!(NodeId::new("x".repeat(MAX_NODE_ID_LEN + 1)).is_err());
        assert!(Region::new("eu-west-1").is_ok());
        assert!(Region::new("EU").is_err());
        assert!(ClusterId::new("prod").is_ok());
        assert!(ClusterId::new("x".repeat(MAX_LABEL_LEN + 1)).is_err());
    }
}
