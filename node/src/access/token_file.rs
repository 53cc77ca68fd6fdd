//! The tokens file: every token a node accepts, by id, with its hash,
//! grants, expiry and revocation. `causeway token create|list|revoke`
//! edits it; a running node reads it again within [`super::RELOAD_POLL`]
//! of a change (or at once on SIGHUP), so tokens are issued and revoked
//! without a restart.
//!
//! ```toml
//! version = 1
//!
//! [[token]]
//! id = "3f9c0a1b2c3d4e5f"
//! name = "billing service"
//! hash = "sha256:…"
//! grants = ["write:billing/", "read:customers/"]
//! created_at = 1796000000
//! expires_at = 1798592000      # optional, unix seconds
//! revoked_at = 1797000000      # set by `causeway token revoke`
//! ```
//!
//! The file holds hashes only. Edits replace it atomically (a new file
//! renamed over it, mode 0600) under an exclusive lock on a sibling
//! `.lock` file, so two edits never lose one another and a node never
//! reads half a file. A revoked token stays listed, so its id keeps
//! meaning something in the audit feed.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::bearer::{BearerToken, TokenHash, TokenId};
use super::grant::{Grant, MAX_GRANTS};
use crate::guarded_file::{self, Refused};

/// The tokens file's name in a node's data directory, unless
/// `http.tokens_file` names another.
pub const TOKENS_FILE: &str = "tokens.toml";

/// The format version this build reads and writes.
pub const FILE_VERSION: u32 = 1;
/// Most tokens one file may hold (revoked ones included).
pub const MAX_TOKENS: usize = 100_000;
/// Longest token name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;

/// One token as the file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// The public id (16 hex characters).
    pub id: String,
    /// What the token is for, for people.
    #[serde(default)]
    pub name: String,
    /// `sha256:` and the hash of the token.
    pub hash: String,
    /// `LEVEL:PREFIX` grants.
    pub grants: Vec<String>,
    /// When it was created, unix seconds.
    pub created_at: u64,
    /// When it stops working, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// When it was revoked, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

/// A record checked: what a node keeps in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The id.
    pub id: TokenId,
    /// The stored hash.
    pub hash: TokenHash,
    /// The grants, parsed.
    pub grants: Vec<Grant>,
    /// Expiry, unix seconds.
    pub expires_at: Option<u64>,
    /// Whether it was revoked.
    pub revoked: bool,
}

impl TokenRecord {
    /// The state of the token at `now` (unix seconds), for lists.
    pub fn state(&self, now: u64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else {
            "active"
        }
    }

    fn check(&self) -> Result<Checked, String> {
        let id = TokenId::parse(&self.id)
            .ok_or_else(|| format!("id {:?} is not 16 lowercase hex characters", self.id))?;
        let hash = TokenHash::parse(&self.hash)
            .ok_or_else(|| format!("token {}: hash is not sha256:<64 hex>", self.id))?;
        if self.grants.len() > MAX_GRANTS {
            return Err(format!(
                "token {}: {} grants, the limit is {MAX_GRANTS}",
                self.id,
                self.grants.len()
            ));
        }
        let grants = self
            .grants
            .iter()
            .map(|g| g.parse::<Grant>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("token {}: {e}", self.id))?;
        if self.name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "token {}: name longer than {MAX_NAME_BYTES} bytes",
                self.id
            ));
        }
        Ok(Checked {
            id,
            hash,
            grants,
            expires_at: self.expires_at,
            revoked: self.revoked_at.is_some(),
        })
    }
}

/// Why the tokens file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// Reading or writing it failed.
    #[error("tokens file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Others than its owner may write it.
    #[error(
        "tokens file {path} may be written by others than its owner (mode {mode:o}); chmod 600 it"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// It does not hold what this build reads.
    #[error("tokens file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A command named a token the file does not hold.
    #[error("tokens file {path} holds no token with id {id}")]
    NoSuchToken {
        /// The file.
        path: PathBuf,
        /// The id asked for.
        id: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Form {
    version: u32,
    #[serde(default)]
    token: Vec<TokenRecord>,
}

/// The tokens file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFile {
    /// Every token, in the order created.
    pub tokens: Vec<TokenRecord>,
}

impl TokenFile {
    /// Parses the file's text (from `path`, for errors), checking every
    /// record.
    pub fn parse(text: &str, path: &Path) -> Result<(TokenFile, Vec<Checked>), TokenFileError> {
        let invalid = |reason: String| TokenFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let form: Form = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if form.version != FILE_VERSION {
            return Err(invalid(format!(
                "version {} (this build reads version {FILE_VERSION})",
                form.version
            )));
        }
        if form.token.len() > MAX_TOKENS {
            return Err(invalid(format!(
                "{} tokens, the limit is {MAX_TOKENS}",
                form.token.len()
            )));
        }
        let checked = form
            .token
            .iter()
            .map(TokenRecord::check)
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let mut ids = BTreeSet::new();
        if let Some(twice) = checked.iter().find(|c| !ids.insert(&c.id)) {
            return Err(invalid(format!("token {} is listed twice", twice.id)));
        }
        Ok((TokenFile { tokens: form.token }, checked))
    }

    /// Reads the file at `path`, which only its owner may write.
    pub fn load(path: &Path) -> Result<(TokenFile, Vec<Checked>), TokenFileError> {
        let path_buf = path.to_path_buf();
        let text = guarded_file::read(path, guarded_file::OTHERS_WRITE).map_err(|e| match e {
            Refused::Io(source) => TokenFileError::Io {
                path: path_buf,
                source,
            },
            Refused::Mode(mode) => TokenFileError::Permissions {
                path: path_buf,
                mode,
            },
        })?;
        TokenFile::parse(&text, path)
    }

    /// The file as text.
    pub fn render(&self) -> String {
        let form = Form {
            version: FILE_VERSION,
            token: self.tokens.clone(),
        };
        // Strings, integers and arrays of strings always serialise.
        let mut text = toml::to_string(&form).unwrap_or_default();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text
    }
}

/// Edits the tokens file at `path` (missing: empty) under its lock, and
/// writes it back atomically if `edit` succeeds. Returns what `edit` did.
pub fn edit<T>(
    path: &Path,
    edit: impl FnOnce(&mut TokenFile) -> Result<T, TokenFileError>,
) -> Result<T, TokenFileError> {
    let io = |source| TokenFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let lock_path = sibling(path, ".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io)?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(e.into()))?;
    let mut file = match fs::metadata(path) {
        Ok(_) => TokenFile::load(path)?.0,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenFile::default(),
        Err(e) => return Err(io(e)),
    };
    let result = edit(&mut file)?;
    let text = file.render();
    // Written in full and synced before it replaces the old file.
    TokenFile::parse(&text, path)?;
    let temp = sibling(path, ".new");
    let _ = fs::remove_file(&temp);
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io)?;
    out.write_all(text.as_bytes()).map_err(io)?;
    out.sync_all().map_err(io)?;
    fs::rename(&temp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    drop(lock);
    Ok(result)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// What [`create`] makes.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// What to call it.
    pub name: String,
    /// Its grants.
    pub grants: Vec<Grant>,
    /// When it expires, unix seconds.
    pub expires_at: Option<u64>,
}

/// Adds a new token to the file at `path` and returns it: the only time
/// its secret is seen.
pub fn create(path: &Path, new: NewToken, now: u64) -> Result<BearerToken, TokenFileError> {
    let invalid = |reason: String| TokenFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if new.grants.is_empty() || new.grants.len() > MAX_GRANTS {
        return Err(invalid(format!(
            "a token needs 1 to {MAX_GRANTS} grants, not {}",
            new.grants.len()
        )));
    }
    let token = BearerToken::generate().map_err(|source| TokenFileError::Io {
        path: PathBuf::from("/dev/urandom"),
        source,
    })?;
    let record = TokenRecord {
        id: token.id().to_string(),
        name: new.name,
        hash: token.hash().to_string(),
        grants: new.grants.iter().map(Grant::to_string).collect(),
        created_at: now,
        expires_at: new.expires_at,
        revoked_at: None,
    };
    edit(path, |file| {
        if file.tokens.len() >= MAX_TOKENS {
            return Err(invalid(format!(
                "it holds {MAX_TOKENS} tokens already; remove revoked ones"
            )));
        }
        file.tokens.push(record);
        Ok(())
    })?;
    Ok(token)
}

/// Marks token `id` revoked at `now` (a token revoked before keeps its
/// first time). Returns its record.
pub fn revoke(path: &Path, id: &str, now: u64) -> Result<TokenRecord, TokenFileError> {
    edit(path, |file| {
        let record = file.tokens.iter_mut().find(|t| t.id == id).ok_or_else(|| {
            TokenFileError::NoSuchToken {
                path: path.to_path_buf(),
                id: id.to_string(),
            }
        })?;
        record.revoked_at.get_or_insert(now);
        Ok(record.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::grant::Level;
    use std::os::unix::fs::PermissionsExt;

    fn new(grant: &str) -> NewToken {
        NewToken {
            name: "test".into(),
            grants: vec![grant
                .parse()
                .unwrap_or_else(|_| Grant::everything(Level::Read))],
            expires_at: None,
        }
    }

    #[test]
    fn create_list_and_revoke_through_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokens.toml");
        let a = create(&path, new("read:a/"), 100)?;
        let b = create(&path, new("admin:*"), 101)?;
        let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (file, checked) = TokenFile::load(&path)?;
        assert_eq!(file.tokens.len(), 2);
        assert!(checked[0].hash.matches(&a.hash()));
        assert!(checked[1].hash.matches(&b.hash()));
        // Only hashes are stored.
        let text = fs::read_to_string(&path)?;
        assert!(!text.contains(&a.reveal()[21..]));
        let revoked = revoke(&path, a.id().as_str(), 200)?;
        assert_eq!(revoked.revoked_at, Some(200));
        assert_eq!(revoke(&path, a.id().as_str(), 300)?.revoked_at, Some(200));
        let (file, checked) = TokenFile::load(&path)?;
        assert!(checked[0].revoked && !checked[1].revoked);
        assert_eq!(file.tokens[0].state(0), "revoked");
        assert!(matches!(
            revoke(&path, "0000000000000000", 1),
            Err(TokenFileError::NoSuchToken { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_file_others_may_write_or_with_bad_records_is_refused(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokens.toml");
        create(&path, new("read:a/"), 1)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
        assert!(matches!(
            TokenFile::load(&path),
            Err(TokenFileError::Permissions { .. })
        ));
        let p = Path::new("t.toml");
        let record = |grant: &str, hash: &str| {
            format!("version = 1\n[[token]]\nid = \"00000000000000aa\"\nhash = \"{hash}\"\ngrants = [\"{grant}\"]\ncreated_at = 1\n")
        };
        let hash = format!("sha256:{}", "0".repeat(64));
        assert!(TokenFile::parse(&record("read:a/", &hash), p).is_ok());
        for bad in [
            record("root:a/", &hash),
            record("read:a/", "sha256:00"),
            record("read:a/", &hash).replace("version = 1", "version = 2"),
            record("read:a/", &hash).replace("00000000000000aa", "xyz"),
            format!("{0}{0}", record("read:a/", &hash)).replacen("version = 1\n", "", 1),
        ] {
            assert!(
                matches!(
                    TokenFile::parse(&bad, p),
                    Err(TokenFileError::Invalid { .. })
                ),
                "{bad}"
            );
        }
        Ok(())
    }
}
