//! The membership list: the operator's record of which nodes belong to the
//! cluster and in which region each one runs.
//!
//! The cluster key proves that a peer is allowed to connect, but every
//! holder of the key is alike, and a node's region used to be whatever the
//! node said it was. With a membership list, both come from the operator
//! instead of from peers:
//!
//! * only listed peer ids can connect (the list is the allowlist), and
//!   messages made or relayed by a node not on it are ignored;
//! * a node's region is the list's, whatever its hello, deltas or
//!   announcements say, so `min_regions`, `/v1/where` and lag by region are
//!   computed from what the operator wrote down (see
//!   [`Replicator::set_members`](causeway_engine::replication::Replicator::set_members)).
//!
//! The list is a TOML file, the same on every node, like Cassandra's
//! `cassandra-topology.properties`:
//!
//! ```toml
//! [[member]]
//! peer_id = "12D3KooW..."   # `causeway node id --data-dir DIR`
//! region = "eu-west"
//! ```
//!
//! Anyone who can change the file decides who may join, so a file that group
//! or others may write is refused. A running node reads the file again when
//! it changes (see [`MembershipFile`]): members are added and removed
//! without restarts, and a removed member is disconnected at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use causeway_engine::replication::ids::Region;
use causeway_engine::replication::Members;
use libp2p::PeerId;
use serde::Deserialize;

use crate::guarded_file::{self, stamp, Refused, Stamp};
use crate::identity::node_id;

/// Members one list may name, at most.
pub const MAX_MEMBERS: usize = 10_000;

/// Why a membership file could not be used. A node does not start with
/// it; a running node keeps the list it has.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Reading the file failed.
    #[error("membership file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Group or others may write the file; fix with `chmod 644`.
    #[error("membership file {path} has mode {mode:o}; only its owner may write it (chmod 644)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a valid list.
    #[error("membership file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the entry.
        reason: String,
    },
}

/// The cluster's members, each with its region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    regions: BTreeMap<PeerId, Region>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    #[serde(default)]
    member: Vec<EntryForm>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryForm {
    peer_id: String,
    region: String,
}

impl Membership {
    /// A list of `(peer, region)` pairs; a peer listed twice keeps its last
    /// region.
    pub fn new(members: impl IntoIterator<Item = (PeerId, Region)>) -> Membership {
        Membership {
            regions: members.into_iter().collect(),
        }
    }

    /// Parses the TOML form (see the [module docs](self)); `path` names
    /// the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Membership, MembershipError> {
        let invalid = |reason: String| MembershipError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let form: FileForm = toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        if form.member.len() > MAX_MEMBERS {
            return Err(invalid(format!(
                "{} members; at most {MAX_MEMBERS} (MAX_MEMBERS)",
                form.member.len()
            )));
        }
        let mut regions = BTreeMap::new();
        for (i, entry) in form.member.into_iter().enumerate() {
            let n = i + 1;
            let peer: PeerId = entry.peer_id.parse().map_err(|e| {
                invalid(format!(
                    "member {n}: {:?} is not a peer id: {e}",
                    entry.peer_id
                ))
            })?;
            let region = Region::new(&entry.region)
                .map_err(|e| invalid(format!("member {n}: region {:?}: {e}", entry.region)))?;
            if regions.insert(peer, region).is_some() {
                return Err(invalid(format!("member {n}: {peer} is listed twice")));
            }
        }
        Ok(Membership { regions })
    }

    /// Reads the list from `path`, which only its owner may write.
    pub fn load(path: &Path) -> Result<Membership, MembershipError> {
        let path_buf = path.to_path_buf();
        let text = guarded_file::read(path, guarded_file::OTHERS_WRITE).map_err(|e| match e {
            Refused::Io(source) => MembershipError::Io {
                path: path_buf,
                source,
            },
            Refused::Mode(mode) => MembershipError::Permissions {
                path: path_buf,
                mode,
            },
        })?;
        Membership::parse(&text, path)
    }

    /// The region of `peer`, if it is a member.
    pub fn region(&self, peer: &PeerId) -> Option<&Region> {
        self.regions.get(peer)
    }

    /// Whether `peer` is a member.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.regions.contains_key(peer)
    }

    /// The members, in peer id order.
    pub fn peers(&self) -> impl Iterator<Item = &PeerId> {
        self.regions.keys()
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether the list is empty (then nobody may connect).
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The list as the replication core takes it.
    pub fn to_core(&self) -> Members {
        self.regions
            .iter()
            .map(|(peer, region)| (node_id(peer), region.clone()))
            .collect()
    }

    /// Checks that `peer`, this node, is listed in `region`.
    pub fn admits_self(&self, peer: &PeerId, region: &Region) -> Result<(), String> {
        match self.regions.get(peer) {
            Some(listed) if listed == region => Ok(()),
            Some(listed) => Err(format!(
                "this node ({peer}) is listed in region {listed}, but runs in region {region}"
            )),
            None => Err(format!("this node ({peer}) is not on the membership list")),
        }
    }
}

/// A membership file watched for changes: [`MembershipFile::reload`] reads
/// it again when its inode, modification time or size changed. Replace the
/// file atomically (write another file, then rename it over the list), so
/// that a half-written list is never read.
#[derive(Debug)]
pub struct MembershipFile {
    path: PathBuf,
    stamp: Option<Stamp>,
}

impl MembershipFile {
    /// Reads the list at `path` and watches the file from then on.
    pub fn open(path: PathBuf) -> Result<(MembershipFile, Membership), MembershipError> {
        let seen = stamp(&path);
        let list = Membership::load(&path)?;
        Ok((MembershipFile { path, stamp: seen }, list))
    }

    /// Watches `path` for a list read before: the first
    /// [`MembershipFile::reload`] reads it again, in case it changed since.
    pub fn watching(path: PathBuf) -> MembershipFile {
        MembershipFile { path, stamp: None }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The list, if the file changed since it was last read (`None`: it did
    /// not). A file that cannot be read or parsed is reported once per
    /// change (a missing file once).
    pub fn reload(&mut self) -> Option<Result<Membership, MembershipError>> {
        let now = stamp(&self.path);
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        Some(Membership::load(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    fn write(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
        let _ = fs::remove_file(path);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(text.as_bytes())?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    }

    #[test]
    fn a_list_parses_and_maps_peers_to_regions() -> Result<(), Box<dyn std::error::Error>> {
        let (a, b) = (PeerId::random(), PeerId::random());
        let text = format!(
            "[[member]]\npeer_id = \"{a}\"\nregion = \"eu\"\n\n[[member]]\npeer_id = \"{b}\"\nregion = \"us-east\"\n"
        );
        let list = Membership::parse(&text, Path::new("m.toml"))?;
        assert_eq!(list.len(), 2);
        assert_eq!(list.region(&a), Some(&Region::new("eu")?));
        assert_eq!(list.region(&b), Some(&Region::new("us-east")?));
        assert!(!list.contains(&PeerId::random()));
        assert_eq!(list.admits_self(&a, &Region::new("eu")?), Ok(()));
        assert!(list.admits_self(&a, &Region::new("us-east")?).is_err());
        assert!(list
            .admits_self(&PeerId::random(), &Region::new("eu")?)
            .is_err());
        assert_eq!(list.to_core().len(), 2);
        Ok(())
    }

    #[test]
    fn bad_entries_are_named() {
        let a = PeerId::random();
        let cases = [
            ("[[member]]\npeer_id = \"nope\"\nregion = \"eu\"\n", "not a peer id"),
            (&format!("[[member]]\npeer_id = \"{a}\"\nregion = \"EU\"\n"), "region"),
            (
                &format!("[[member]]\npeer_id = \"{a}\"\nregion = \"eu\"\n[[member]]\npeer_id = \"{a}\"\nregion = \"us\"\n"),
                "listed twice",
            ),
            (&format!("[[member]]\npeer_id = \"{a}\"\nzone = \"eu\"\n"), "zone"),
        ];
        for (text, expected) in cases {
            match Membership::parse(text, Path::new("m.toml")) {
                Err(MembershipError::Invalid { reason, .. }) => {
                    assert!(reason.contains(expected), "{reason:?} lacks {expected:?}")
                }
                other => panic!("{text:?}: expected an invalid list, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_file_others_may_write_is_refused_and_changes_are_seen(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("members.toml");
        let (a, b) = (PeerId::random(), PeerId::random());
        let one = format!("[[member]]\npeer_id = \"{a}\"\nregion = \"eu\"\n");
        write(&path, &one, 0o666)?;
        assert!(matches!(
            Membership::load(&path),
            Err(MembershipError::Permissions { .. })
        ));
        write(&path, &one, 0o644)?;
        let (mut file, list) = MembershipFile::open(path.clone())?;
        assert_eq!(list.len(), 1);
        assert!(file.reload().is_none(), "unchanged");
        let two = format!("{one}[[member]]\npeer_id = \"{b}\"\nregion = \"us\"\n");
        write(&path, &two, 0o644)?;
        let list = file.reload().transpose()?;
        assert_eq!(list.map(|m| m.contains(&b)), Some(true));
        fs::remove_file(&path)?;
        assert!(matches!(
            file.reload(),
            Some(Err(MembershipError::Io { .. }))
        ));
        assert!(file.reload().is_none(), "a missing file is reported once");
        Ok(())
    }
}
