//! Who may do what through a node's client APIs (HTTP, watch streams, the
//! automerge-repo endpoint).
//!
//! * [`bearer`]: tokens as clients hold them (`cw1_<id>_<secret>`) and the
//!   hash a node keeps.
//! * [`grant`]: read, write or admin on a document id prefix.
//! * [`token_file`]: the tokens file `causeway token` edits and a running
//!   node reloads.
//! * [`command`]: `causeway token create|list|revoke`.
//!
//! An [`Authenticator`] holds the tokens in force and turns a presented
//! bearer token into a [`Caller`]. A caller's grants are looked up again
//! at every check, so a token revoked or expired while its watch stream or
//! WebSocket is open stops working there too.
//!
//! With no tokens file and no tokens in the settings file, the API is open
//! (every caller may do everything): the default for a node that listens on
//! loopback only. Once a tokens file exists, every request needs a token,
//! even if every token in it is revoked.

pub mod bearer;
pub mod command;
pub mod grant;
pub mod token_file;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use causeway_engine::DocId;
use tracing::{info, warn};

use self::bearer::{BearerToken, TokenHash, TokenId};
use self::grant::{Grant, Level};
use self::token_file::{Checked, TokenFile, TokenFileError};
use crate::guarded_file::{poll_until_closing, stamp, Stamp};

pub use crate::guarded_file::RELOAD_POLL;

/// Why a request's token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token with the request.
    #[error("this node requires a bearer token")]
    Missing,
    /// Not a token this node knows (or a wrong secret).
    #[error("the bearer token is not valid")]
    Unknown,
    /// A known token past its expiry.
    #[error("token {0} expired")]
    Expired(String),
    /// A known token that was revoked.
    #[error("token {0} was revoked")]
    Revoked(String),
}

/// Figures of the authenticator, for `/metrics`.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// Times the tokens file was read again after a change.
    pub reloads: AtomicU64,
    /// Times reading it again failed (the tokens in force stayed).
    pub reload_failures: AtomicU64,
    /// Requests refused for their token (missing, unknown, expired,
    /// revoked).
    pub refused: AtomicU64,
    /// Requests refused because the token's grants do not cover them.
    pub forbidden: AtomicU64,
}

/// The tokens in force.
#[derive(Debug, Default)]
struct Table {
    /// The tokens file as last read.
    stamp: Option<Stamp>,
    /// Whether requests need a token.
    required: bool,
    tokens: HashMap<TokenId, Checked>,
    /// Tokens from the settings file (`http.read_tokens`,
    /// `http.write_tokens`): hashed, with no id.
    settings: Vec<(TokenHash, Grant)>,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    /// The API has no tokens: anyone.
    Open,
    /// A token from the tokens file.
    Token(TokenId),
    /// The n-th token of the settings file.
    Settings(usize),
}

/// Checks bearer tokens against the tokens in force. See the
/// [module docs](self).
#[derive(Debug)]
pub struct Authenticator {
    file: Option<PathBuf>,
    table: RwLock<Table>,
    /// Its figures.
    pub stats: AuthStats,
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Authenticator {
    /// The tokens of the tokens file at `file` (if it exists) and the
    /// settings file's read and write tokens. A tokens file that exists
    /// but cannot be read is an error.
    pub fn new(
        file: Option<PathBuf>,
        read_tokens: &[String],
        write_tokens: &[String],
    ) -> Result<Arc<Authenticator>, TokenFileError> {
        let settings = read_tokens
            .iter()
            .map(|t| (t, Level::Read))
            // A write token of the settings file could use every route.
            .chain(write_tokens.iter().map(|t| (t, Level::Admin)))
            .map(|(t, level)| (TokenHash::of("", t.as_bytes()), Grant::everything(level)))
            .collect::<Vec<_>>();
        let auth = Authenticator {
            table: RwLock::new(Table {
                required: !settings.is_empty(),
                settings,
                ..Table::default()
            }),
            file,
            stats: AuthStats::default(),
        };
        if let Some(result) = auth.reload() {
            result?;
        }
        Ok(Arc::new(auth))
    }

    /// An API without tokens.
    pub fn open() -> Arc<Authenticator> {
        Arc::new(Authenticator {
            file: None,
            table: RwLock::new(Table::default()),
            stats: AuthStats::default(),
        })
    }

    /// The tokens file, if one is configured.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Whether requests need a token.
    pub fn required(&self) -> bool {
        self.read().required
    }

    /// Tokens in force from the tokens file (not revoked, not expired).
    pub fn active_tokens(&self) -> usize {
        let now = unix_now();
        self.read()
            .tokens
            .values()
            .filter(|t| !t.revoked && t.expires_at.is_none_or(|e| e > now))
            .count()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the tokens file again if it changed since it was last read.
    /// `None`: it did not (or there is none). On an error the tokens in
    /// force stay: a half-edited or deleted file never opens the API nor
    /// locks everyone out.
    pub fn reload(&self) -> Option<Result<usize, TokenFileError>> {
        let path = self.file.as_ref()?;
        let now = stamp(path);
        let mut table = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Unchanged, or still missing.
        if now == table.stamp {
            return None;
        }
        table.stamp = now;
        drop(table);
        let loaded = TokenFile::load(path);
        let mut table = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match loaded {
            Ok((_, checked)) => {
                let n = checked.len();
                table.tokens = checked.into_iter().map(|c| (c.id.clone(), c)).collect();
                table.required = true;
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                Some(Ok(n))
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                Some(Err(e))
            }
        }
    }

    /// Reloads the tokens file every [`RELOAD_POLL`] until `closing` turns
    /// true, logging what changed.
    pub async fn watch(self: Arc<Self>, closing: tokio::sync::watch::Receiver<bool>) {
        if self.file.is_some() {
            poll_until_closing(closing, || self.reload_and_log()).await;
        }
    }

    /// [`reload`](Self::reload), logging the outcome.
    pub fn reload_and_log(&self) {
        match self.reload() {
            None => {}
            Some(Ok(n)) => info!(
                tokens = n,
                active = self.active_tokens(),
                "tokens file read"
            ),
            Some(Err(e)) => {
                warn!(error = %e, "the tokens file could not be read; the tokens in force stay")
            }
        }
    }

    /// The caller a request's bearer token (if any) stands for.
    pub fn authenticate(self: &Arc<Self>, bearer: Option<&str>) -> Result<Caller, AuthError> {
        let who = self.identify(bearer);
        if who.is_err() {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Caller {
            who: who?,
            auth: Arc::clone(self),
        })
    }

    fn identify(&self, bearer: Option<&str>) -> Result<Who, AuthError> {
        let table = self.read();
        if !table.required {
            return Ok(Who::Open);
        }
        let bearer = bearer.ok_or(AuthError::Missing)?;
        if let Some(token) = BearerToken::parse(bearer) {
            let record = table.tokens.get(token.id()).ok_or(AuthError::Unknown)?;
            if !record.hash.matches(&token.hash()) {
                return Err(AuthError::Unknown);
            }
            check_live(record, unix_now())?;
            return Ok(Who::Token(record.id.clone()));
        }
        let hash = TokenHash::of("", bearer.as_bytes());
        table
            .settings
            .iter()
            .position(|(h, _)| h.matches(&hash))
            .map(Who::Settings)
            .ok_or(AuthError::Unknown)
    }

    fn grants_of(&self, who: &Who) -> Result<Vec<Grant>, AuthError> {
        let table = self.read();
        match who {
            Who::Open => Ok(vec![Grant::everything(Level::Admin)]),
            Who::Settings(n) => table
                .settings
                .get(*n)
                .map(|(_, g)| vec![g.clone()])
                .ok_or(AuthError::Unknown),
            Who::Token(id) => {
                let record = table.tokens.get(id).ok_or(AuthError::Unknown)?;
                check_live(record, unix_now())?;
                Ok(record.grants.clone())
            }
        }
    }
}

fn check_live(record: &Checked, now: u64) -> Result<(), AuthError> {
    if record.revoked {
        return Err(AuthError::Revoked(record.id.to_string()));
    }
    if record.expires_at.is_some_and(|e| e <= now) {
        return Err(AuthError::Expired(record.id.to_string()));
    }
    Ok(())
}

/// Why a caller may not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Its token stopped working (revoked, expired, removed).
    #[error(transparent)]
    Token(#[from] AuthError),
    /// Its grants do not cover it.
    #[error("{caller} may not {level} {what} (its grants: {grants})")]
    Scope {
        /// Who asked.
        caller: String,
        /// What was needed.
        level: Level,
        /// On what.
        what: String,
        /// What the caller holds.
        grants: String,
    },
}

/// Who made a request, with a live view of what they may do.
#[derive(Debug, Clone)]
pub struct Caller {
    who: Who,
    auth: Arc<Authenticator>,
}

impl Caller {
    /// A caller that may do everything (embedded use, tests).
    pub fn unrestricted() -> Caller {
        Caller {
            who: Who::Open,
            auth: Authenticator::open(),
        }
    }

    /// Who this is, as the audit feed and logs name it: `token:<id>`,
    /// `settings-token:<n>`, or `anonymous` on an API without tokens.
    pub fn label(&self) -> String {
        match &self.who {
            Who::Open => "anonymous".to_string(),
            Who::Token(id) => format!("token:{id}"),
            Who::Settings(n) => format!("settings-token:{n}"),
        }
    }

    /// What the caller may do now.
    pub fn grants(&self) -> Result<Vec<Grant>, AuthError> {
        self.auth.grants_of(&self.who)
    }

    /// Whether the caller may do `level` on `doc` now.
    pub fn allows(&self, level: Level, doc: &DocId) -> bool {
        self.grants()
            .is_ok_and(|grants| grant::allows(&grants, level, doc))
    }

    /// Checks that the caller may do `level` on `doc`.
    pub fn require(&self, level: Level, doc: &DocId) -> Result<(), Denied> {
        let grants = self.grants()?;
        if grant::allows(&grants, level, doc) {
            return Ok(());
        }
        Err(self.denied(level, &grants, format!("document {doc}")))
    }

    /// Checks that the caller may do `level` on every document (the node's
    /// own routes need `admin:*`).
    pub fn require_everything(&self, level: Level) -> Result<(), Denied> {
        let grants = self.grants()?;
        if grants.iter().any(|g| g.allows_everything(level)) {
            return Ok(());
        }
        Err(self.denied(
            level,
            &grants,
            "every document (this route needs LEVEL:*)".into(),
        ))
    }

    /// The disjoint prefixes under `prefix` the caller may read (see
    /// [`grant::readable_under`]); refused if there are none.
    pub fn readable_under(&self, prefix: &str) -> Result<Vec<String>, Denied> {
        let grants = self.grants()?;
        let ranges = grant::readable_under(&grants, prefix);
        if ranges.is_empty() {
            return Err(self.denied(
                Level::Read,
                &grants,
                format!("anything under prefix {prefix:?}"),
            ));
        }
        Ok(ranges)
    }

    /// Checks that the caller's token still works.
    pub fn require_valid(&self) -> Result<(), Denied> {
        self.grants().map(|_| ()).map_err(Denied::from)
    }

    fn denied(&self, level: Level, grants: &[Grant], what: String) -> Denied {
        self.auth.stats.forbidden.fetch_add(1, Ordering::Relaxed);
        Denied::Scope {
            caller: self.label(),
            level,
            what,
            grants: grants
                .iter()
                .map(Grant::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::token_file::{create, revoke, NewToken};

    fn grants(list: &[&str]) -> Vec<Grant> {
        list.iter().filter_map(|g| g.parse().ok()).collect()
    }

    fn doc(id: &str) -> DocId {
        DocId::new(id).unwrap_or_else(|e| panic!("{id}: {e}"))
    }

    #[test]
    fn tokens_from_the_file_are_checked_live() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokens.toml");
        let auth = Authenticator::new(Some(path.clone()), &[], &[])?;
        // No file yet: open.
        assert!(!auth.required());
        assert_eq!(auth.authenticate(None)?.label(), "anonymous");
        let now = unix_now();
        let new = |g: &[&str], expires_at| NewToken {
            name: String::new(),
            grants: grants(g),
            expires_at,
        };
        let a = create(&path, new(&["write:a/"], None), now)?;
        let old = create(&path, new(&["read:*"], Some(now - 1)), now)?;
        assert!(matches!(auth.reload(), Some(Ok(2))));
        assert!(auth.required());
        assert_eq!(auth.authenticate(None).err(), Some(AuthError::Missing));
        assert_eq!(
            auth.authenticate(Some("not a token")).err(),
            Some(AuthError::Unknown)
        );
        assert!(matches!(
            auth.authenticate(Some(&old.reveal())),
            Err(AuthError::Expired(_))
        ));
        let caller = auth.authenticate(Some(&a.reveal()))?;
        assert_eq!(caller.label(), format!("token:{}", a.id()));
        assert!(caller.require(Level::Write, &doc("a/1")).is_ok());
        assert!(matches!(
            caller.require(Level::Read, &doc("b/1")),
            Err(Denied::Scope { .. })
        ));
        assert!(caller.require_everything(Level::Admin).is_err());
        // Revoked while the caller is around: its next check fails.
        revoke(&path, a.id().as_str(), now)?;
        assert!(matches!(auth.reload(), Some(Ok(2))));
        assert!(matches!(
            caller.require(Level::Read, &doc("a/1")),
            Err(Denied::Token(AuthError::Revoked(_)))
        ));
        // A broken or deleted file keeps the tokens in force: still closed.
        std::fs::write(&path, "version = ")?;
        assert!(matches!(auth.reload(), Some(Err(_))));
        std::fs::remove_file(&path)?;
        assert!(matches!(auth.reload(), Some(Err(_))));
        assert!(auth.required());
        assert_eq!(auth.authenticate(None).err(), Some(AuthError::Missing));
        Ok(())
    }

    #[test]
    fn settings_tokens_grant_everything_at_their_level() -> Result<(), Box<dyn std::error::Error>> {
        let read = "a-read-token-of-sixteen".to_string();
        let auth = Authenticator::new(None, std::slice::from_ref(&read), &[])?;
        let caller = auth.authenticate(Some(&read))?;
        assert_eq!(caller.label(), "settings-token:0");
        assert!(caller.allows(Level::Read, &doc("x")));
        assert!(!caller.allows(Level::Write, &doc("x")));
        assert_eq!(
            auth.authenticate(Some("a-read-token-of-seventeen")).err(),
            Some(AuthError::Unknown)
        );
        Ok(())
    }
}
