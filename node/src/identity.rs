//! The node's ed25519 identity: created on first start in the data
//! directory, reused after.
//!
//! The key is stored as libp2p's protobuf encoding in `node.key` with file
//! mode 0600. A key file that others may read is refused (like ssh does with
//! private keys), and so is a file that does not decode: the node never
//! silently replaces an identity its peers know.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use causeway_engine::replication::ids::NodeId;
use libp2p::identity::Keypair;
use libp2p::PeerId;

/// Name of the key file inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Why the identity could not be loaded or created. The node does not start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file is readable by group or others; fix with `chmod 600`.
    #[error(
        "identity file {path} has mode {mode:o}; it must not be readable by others (chmod 600)"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold an ed25519 key in libp2p's encoding.
    #[error("identity file {path} does not hold a valid key: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// Why it does not decode.
        reason: String,
    },
}

/// Loads the identity from `dir/node.key`, or creates it there (0600) if the
/// file does not exist. Returns the key and whether it was created.
pub fn load_or_create(dir: &Path) -> Result<(Keypair, bool), IdentityError> {
    let path = dir.join(KEY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Permissions { path, mode });
            }
            let bytes = fs::read(&path).map_err(io)?;
            let key =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io)?;
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

/// The replication core's name for `peer`: its base58 peer id.
pub fn node_id(peer: &PeerId) -> NodeId {
    // A base58 peer id is printable ASCII of at most 128 bytes.
    #[allow(clippy::expect_used)]
    NodeId::new(peer.to_base58()).expect("a peer id is a valid node id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_with_mode_0600_and_reused() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let (first, created) = load_or_create(dir.path())?;
        assert!(created);
        let mode = fs::metadata(dir.path().join(KEY_FILE))?
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (second, created) = load_or_create(dir.path())?;
        assert!(!created);
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        Ok(())
    }

    #[test]
    fn a_key_readable_by_others_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        load_or_create(dir.path())?;
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        let err = load_or_create(dir.path()).err();
        assert!(matches!(
            err,
            Some(IdentityError::Permissions { mode: 0o644, .. })
        ));
        Ok(())
    }

    #[test]
    fn a_corrupt_key_is_refused_not_replaced() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(KEY_FILE);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?
            .write_all(b"not a key")?;
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Invalid { .. })
        ));
        assert_eq!(fs::read(&path)?, b"not a key");
        Ok(())
    }
}
