//! What a token may do: a [`Level`] on the documents whose ids start with a
//! prefix (a namespace).
//!
//! A grant is written `LEVEL:PREFIX`, such as `read:tenant-a/` or
//! `write:orders/eu/`; `read:*` (or `read:`) covers every document. Levels
//! are ordered: a write grant also reads, an admin grant also writes, on the
//! same prefix. Routes that concern the whole node (backup, drain, peer
//! blocking, the audit feed, tokens) need `admin:*`.

use std::fmt;
use std::str::FromStr;

use causeway_engine::{validate_prefix, DocId};

/// Most grants one token may carry.
pub const MAX_GRANTS: usize = 64;

/// How much a grant allows, each level including the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Read documents, list their ids, watch them, ask where they are held.
    Read,
    /// Also write them: replace, patch, delete, apply changes.
    Write,
    /// Also repair them; on every document (`admin:*`), the node's own
    /// routes.
    Admin,
}

impl Level {
    /// The level's name in grants and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One grant: a level on every document under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    /// What it allows.
    pub level: Level,
    /// Document ids it covers start with this (empty: every document).
    pub prefix: String,
}

/// Why a grant string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// No `:` between level and prefix.
    #[error("grant {0:?} is not LEVEL:PREFIX (such as read:tenant-a/ or admin:*)")]
    Shape(String),
    /// The level is not read, write or admin.
    #[error("grant {0:?}: the level must be read, write or admin")]
    Level(String),
    /// The prefix holds characters a document id cannot.
    #[error("grant {grant:?}: {reason}")]
    Prefix {
        /// The grant.
        grant: String,
        /// What is wrong with its prefix.
        reason: String,
    },
}

impl Grant {
    /// A grant of `level` on every document.
    pub fn everything(level: Level) -> Grant {
        Grant {
            level,
            prefix: String::new(),
        }
    }

    /// Whether this grant allows `level` on `doc`.
    pub fn allows(&self, level: Level, doc: &str) -> bool {
        self.level >= level && doc.starts_with(&self.prefix)
    }

    /// Whether this grant allows `level` on every document.
    pub fn allows_everything(&self, level: Level) -> bool {
        self.level >= level && self.prefix.is_empty()
    }
}

impl FromStr for Grant {
    type Err = GrantError;

    fn from_str(s: &str) -> Result<Grant, GrantError> {
        let (level, prefix) = s
            .split_once(':')
            .ok_or_else(|| GrantError::Shape(s.to_string()))?;
        let level = match level {
            "read" => Level::Read,
            "write" => Level::Write,
            "admin" => Level::Admin,
            _ => return Err(GrantError::Level(s.to_string())),
        };
        let prefix = if prefix == "*" { "" } else { prefix };
        validate_prefix(prefix).map_err(|e| GrantError::Prefix {
            grant: s.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Grant {
            level,
            prefix: prefix.to_string(),
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = if self.prefix.is_empty() {
            "*"
        } else {
            &self.prefix
        };
        write!(f, "{}:{prefix}", self.level)
    }
}

/// Whether any of `grants` allows `level` on `doc`.
pub fn allows(grants: &[Grant], level: Level, doc: &DocId) -> bool {
    grants.iter().any(|g| g.allows(level, doc.as_str()))
}

/// The parts of the namespace under `prefix` that `grants` let a caller
/// read, as disjoint prefixes in order: listing or watching `prefix` shows
/// exactly the documents under them. Empty: nothing under `prefix` is
/// readable.
pub fn readable_under(grants: &[Grant], prefix: &str) -> Vec<String> {
    if grants
        .iter()
        .any(|g| g.level >= Level::Read && prefix.starts_with(&g.prefix))
    {
        return vec![prefix.to_string()];
    }
    let mut inside: Vec<String> = grants
        .iter()
        .filter(|g| g.level >= Level::Read && g.prefix.starts_with(prefix))
        .map(|g| g.prefix.clone())
        .collect();
    inside.sort();
    // After sorting, a prefix covered by another comes right after it (or
    // after another prefix it covers); keep only the outermost.
    let mut disjoint: Vec<String> = Vec::with_capacity(inside.len());
    for p in inside {
        if !disjoint.last().is_some_and(|outer| p.starts_with(outer)) {
            disjoint.push(p);
        }
    }
    disjoint
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Grant {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn grants_parse_and_print_back() {
        for s in ["read:a/", "write:orders/eu/", "admin:*"] {
            assert_eq!(g(s).to_string(), s);
        }
        assert_eq!(g("read:"), Grant::everything(Level::Read));
        assert!(matches!("a/".parse::<Grant>(), Err(GrantError::Shape(_))));
        assert!(matches!(
            "owner:a/".parse::<Grant>(),
            Err(GrantError::Level(_))
        ));
        assert!(matches!(
            "read:a b".parse::<Grant>(),
            Err(GrantError::Prefix { .. })
        ));
    }

    #[test]
    fn a_level_includes_the_ones_below_on_its_prefix_only() {
        let write = g("write:a/");
        assert!(write.allows(Level::Read, "a/1"));
        assert!(write.allows(Level::Write, "a/1"));
        assert!(!write.allows(Level::Admin, "a/1"));
        assert!(!write.allows(Level::Read, "b/1"));
        // A prefix is a string prefix: `a/` does not cover `a-b/1` or `a`.
        assert!(!write.allows(Level::Read, "a-b/1"));
        assert!(!write.allows(Level::Read, "a"));
        assert!(g("admin:*").allows_everything(Level::Admin));
        assert!(!g("admin:a/").allows_everything(Level::Read));
    }

    #[test]
    fn readable_ranges_under_a_prefix_are_disjoint_and_ordered() {
        let grants = [g("read:b/x/"), g("write:a/"), g("read:a/1/"), g("write:c/")];
        assert_eq!(readable_under(&grants, "a/1/"), ["a/1/"]);
        assert_eq!(readable_under(&grants, ""), ["a/", "b/x/", "c/"]);
        assert_eq!(readable_under(&grants, "b/"), ["b/x/"]);
        assert!(readable_under(&grants, "d/").is_empty());
        assert_eq!(readable_under(&[g("read:*")], "q/"), ["q/"]);
    }
}
