//! The cluster key: a 256-bit secret that every member of a cluster holds
//! and nobody else does. With it, every peer connection starts with
//! libp2p's private-network handshake (`libp2p-pnet`, the same format as
//! IPFS's `swarm.key`): both sides encrypt the connection with a stream
//! cipher keyed by the secret before anything else is sent, so a node
//! without the key cannot complete a handshake, let alone join
//! replication. The cluster id, by contrast, is a public label.
//!
//! `causeway cluster init --out FILE` creates the key file with mode 0600;
//! nodes read it from `cluster_key_file`. Like the node identity, a key file
//! that group or others may read is refused.
//!
//! The handshake protects TCP connections only: QUIC carries its own TLS
//! and libp2p cannot put the pre-shared key in front of it, so a node with a
//! cluster key listens on TCP alone (see [`NodeConfig`](crate::NodeConfig)).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use libp2p::pnet::PreSharedKey;

use crate::guarded_file::{self, Refused};

/// Bytes of a cluster key.
pub const KEY_BYTES: usize = 32;

/// Why a cluster key file could not be read or written. The node does not
/// start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterKeyError {
    /// Reading or writing the file failed (also: it exists already, when
    /// creating one).
    #[error("cluster key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is readable by group or others; fix with `chmod 600`.
    #[error(
        "cluster key file {path} has mode {mode:o}; it must not be readable by others (chmod 600)"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a key in the expected format.
    #[error("cluster key file {path} does not hold a cluster key: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// Why it does not parse.
        reason: String,
    },
}

/// A cluster's shared secret. Its `Debug` form shows only the fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClusterKey(PreSharedKey);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey({})", self.fingerprint())
    }
}

impl ClusterKey {
    /// A new random key, from the operating system's random source.
    pub fn generate() -> std::io::Result<ClusterKey> {
        let mut bytes = [0u8; KEY_BYTES];
        fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(ClusterKey(PreSharedKey::new(bytes)))
    }

    /// A short public name of the key (a hash of it), for logs and for
    /// comparing keys between nodes without showing them.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }

    /// The key as libp2p's private-network handshake takes it.
    pub fn psk(&self) -> PreSharedKey {
        self.0
    }

    /// The secret's bytes (for the handshake's stream cipher).
    pub(crate) fn bytes(&self) -> [u8; KEY_BYTES] {
        // PreSharedKey shows its bytes only in its key-file form, whose
        // last line is their hex.
        let text = self.0.to_string();
        let hex = text.lines().last().unwrap_or_default();
        let mut bytes = [0u8; KEY_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = hex
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .unwrap_or_default();
        }
        bytes
    }

    /// Reads the key from `path`, which must not be readable by group or
    /// others.
    pub fn load(path: &Path) -> Result<ClusterKey, ClusterKeyError> {
        let path_buf = path.to_path_buf();
        let text = guarded_file::read(path, guarded_file::OTHERS_ANY).map_err(|e| match e {
            Refused::Io(source) => ClusterKeyError::Io {
                path: path_buf,
                source,
            },
            Refused::Mode(mode) => ClusterKeyError::Permissions {
                path: path_buf,
                mode,
            },
        })?;
        PreSharedKey::from_str(&text)
            .map(ClusterKey)
            .map_err(|e| ClusterKeyError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
    }

    /// Writes the key to a new file at `path` with mode 0600; an existing
    /// file is never replaced (the cluster's nodes may hold that key).
    pub fn create(&self, path: &Path) -> Result<(), ClusterKeyError> {
        let io = |source| ClusterKeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(self.0.to_string().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_written_0600_read_back_and_never_overwritten(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cluster.key");
        let key = ClusterKey::generate()?;
        key.create(&path)?;
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        assert_eq!(ClusterKey::load(&path)?, key);
        let other = ClusterKey::generate()?;
        assert_ne!(other, key);
        assert!(matches!(
            other.create(&path),
            Err(ClusterKeyError::Io { .. })
        ));
        assert_eq!(ClusterKey::load(&path)?, key);
        assert!(!format!("{key:?}").contains(&key.0.to_string()));
        assert_eq!(PreSharedKey::new(key.bytes()), key.psk());
        Ok(())
    }

    #[test]
    fn a_key_readable_by_others_or_malformed_is_refused() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cluster.key");
        ClusterKey::generate()?.create(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640))?;
        assert!(matches!(
            ClusterKey::load(&path),
            Err(ClusterKeyError::Permissions { mode: 0o640, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nnot hex")?;
        assert!(matches!(
            ClusterKey::load(&path),
            Err(ClusterKeyError::Invalid { .. })
        ));
        Ok(())
    }
}
