//! Sanctions: a peer that keeps sending messages the replication core
//! refuses is blocked for a while, and the block outlives a restart.
//!
//! Every refusal is counted per peer in a window of [`REFUSAL_WINDOW`]
//! (those an honest peer can cause, [`HONEST_REASONS`], never lead to a
//! block).
//! The first refusal of a window is logged; the rest are only counted, and
//! one summary line per peer and window says how many there were and why,
//! so a hostile peer cannot flood the log. A peer refused more than
//! [`REFUSALS_BEFORE_BLOCK`] times in one window is blocked (its connections
//! close, new ones are refused, in both directions) for [`FIRST_BLOCK`],
//! twice as long for each later block, up to [`LONGEST_BLOCK`].
//!
//! Honest peers are not refused for anything else: the core refuses only
//! messages that break the protocol (undecodable, beyond a limit, forged,
//! bad changes).
//!
//! Blocks are kept in a JSON file in the node's data directory, written
//! (to a temporary file, synced, then renamed) whenever a block starts or
//! ends; their end is wall-clock time, used only as a timer. An operator's
//! unblock also ends a sanction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// How long refusals are counted together.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(60);
/// Refusals a peer may cause in one window before it is blocked.
pub const REFUSALS_BEFORE_BLOCK: u32 = 50;
/// The first block of a peer.
pub const FIRST_BLOCK: Duration = Duration::from_secs(10 * 60);
/// The longest block (each block of the same peer doubles, up to this).
pub const LONGEST_BLOCK: Duration = Duration::from_secs(7 * 24 * 3600);
/// Refusal reasons an honest peer can cause, which never lead to a block
/// (they are still counted and logged): a change beyond this node's shape
/// limits (nodes may be configured differently), and a message of a newer
/// protocol version or of a kind this build does not know, or a hello
/// naming no version this build speaks (a rolling upgrade).
pub const HONEST_REASONS: &[&str] = &[
    "shape_limit",
    "unsupported_version",
    "unknown_kind",
    "no_common_version",
];
/// Peers whose refusals are tracked at once; a refusal from a further peer
/// takes the place of the peer with the oldest window that is not blocked.
pub const MAX_TRACKED_PEERS: usize = 4096;

/// Why sanctions could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum SanctionsError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a list of blocks.
    #[error("{path} is not a list of blocked peers: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One persisted block.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct StoredBlock {
    peer: String,
    /// When the block ends, in seconds since the Unix epoch.
    until_unix_s: u64,
    /// Blocks of this peer so far (the next one lasts twice as long).
    blocks: u32,
    /// The refusals that caused the latest block, by reason.
    reasons: BTreeMap<String, u32>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredSanctions {
    blocked: Vec<StoredBlock>,
}

/// What is known of one peer's refusals.
#[derive(Debug, Clone)]
struct Record {
    window_start: Instant,
    refusals: u32,
    /// Refusals in the window that count towards a block.
    strikes: u32,
    reasons: BTreeMap<&'static str, u32>,
    /// Blocks so far.
    blocks: u32,
    /// When the current block ends, if blocked.
    until: Option<SystemTime>,
    /// The reasons of the current block (as persisted).
    block_reasons: BTreeMap<String, u32>,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            window_start: now,
            refusals: 0,
            strikes: 0,
            reasons: BTreeMap::new(),
            blocks: 0,
            until: None,
            block_reasons: BTreeMap::new(),
        }
    }
}

/// What a refusal led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sanction {
    /// The first refusal of the peer's window: worth one log line.
    First,
    /// Counted; summarised at the end of the window.
    Counted,
    /// The peer crossed the threshold and is blocked for this long.
    Block {
        /// How long.
        duration: Duration,
        /// Refusals in the window, by reason.
        reasons: BTreeMap<&'static str, u32>,
        /// Why the block could not be written to the file, if it could
        /// not (it then holds until a restart).
        unsaved: Option<String>,
    },
}

/// A window that ended with refusals beyond its first: one summary line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The peer.
    pub peer: PeerId,
    /// Refusals in the window.
    pub refusals: u32,
    /// By reason.
    pub reasons: BTreeMap<&'static str, u32>,
}

/// The sanctions of one node.
#[derive(Debug)]
pub struct Sanctions {
    path: Option<PathBuf>,
    peers: BTreeMap<PeerId, Record>,
}

impl Sanctions {
    /// Sanctions kept in memory only.
    pub fn in_memory() -> Sanctions {
        Sanctions {
            path: None,
            peers: BTreeMap::new(),
        }
    }

    /// Sanctions kept in `path`, with the blocks it holds (a missing file
    /// holds none).
    pub fn load(path: &Path, now: Instant) -> Result<Sanctions, SanctionsError> {
        let io = |source| SanctionsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| SanctionsError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let stored: StoredSanctions = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoredSanctions::default(),
            Err(e) => return Err(io(e)),
        };
        let mut peers = BTreeMap::new();
        for b in stored.blocked {
            let peer =
                PeerId::from_str(&b.peer).map_err(|e| corrupt(format!("{}: {e}", b.peer)))?;
            let mut r = Record::new(now);
            r.blocks = b.blocks;
            r.until = Some(UNIX_EPOCH + Duration::from_secs(b.until_unix_s));
            r.block_reasons = b.reasons;
            peers.insert(peer, r);
        }
        Ok(Sanctions {
            path: Some(path.to_path_buf()),
            peers,
        })
    }

    /// Peers blocked at `wall`.
    pub fn blocked(&self, wall: SystemTime) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, r)| r.until.is_some_and(|u| u > wall))
            .map(|(p, _)| *p)
            .collect()
    }

    /// `peer` sent a message refused for `reason` at `now` (`wall`: the
    /// same moment by the wall clock, for the end of a block).
    pub fn refused(
        &mut self,
        now: Instant,
        wall: SystemTime,
        peer: PeerId,
        reason: &'static str,
    ) -> Sanction {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_TRACKED_PEERS {
            let oldest = self
                .peers
                .iter()
                .filter(|(_, r)| r.until.is_none())
                .min_by_key(|(_, r)| r.window_start)
                .map(|(p, _)| *p);
            match oldest {
                Some(p) => {
                    self.peers.remove(&p);
                }
                // Every tracked peer is blocked: nothing more to count.
                None => return Sanction::Counted,
            }
        }
        let r = self.peers.entry(peer).or_insert_with(|| Record::new(now));
        if now.duration_since(r.window_start) >= REFUSAL_WINDOW {
            r.window_start = now;
            r.refusals = 0;
            r.strikes = 0;
            r.reasons.clear();
        }
        r.refusals += 1;
        r.strikes += u32::from(!HONEST_REASONS.contains(&reason));
        *r.reasons.entry(reason).or_default() += 1;
        if r.until.is_some_and(|u| u > wall) {
            // Messages already in flight when the block started.
            return Sanction::Counted;
        }
        if r.strikes <= REFUSALS_BEFORE_BLOCK {
            return if r.refusals == 1 {
                Sanction::First
            } else {
                Sanction::Counted
            };
        }
        let doubling = 2u32.saturating_pow(r.blocks.min(30));
        let duration = FIRST_BLOCK.saturating_mul(doubling).min(LONGEST_BLOCK);
        r.blocks += 1;
        r.until = Some(wall + duration);
        r.block_reasons = r
            .reasons
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect();
        let reasons = std::mem::take(&mut r.reasons);
        r.refusals = 0;
        r.strikes = 0;
        // The block holds in memory even if it could not be written down.
        let unsaved = self.save().err().map(|e| e.to_string());
        Sanction::Block {
            duration,
            reasons,
            unsaved,
        }
    }

    /// Ends the blocks that are over at `wall`; returns their peers.
    pub fn expire(&mut self, wall: SystemTime) -> Result<Vec<PeerId>, SanctionsError> {
        let mut ended = Vec::new();
        for (peer, r) in &mut self.peers {
            if r.until.is_some_and(|u| u <= wall) {
                r.until = None;
                ended.push(*peer);
            }
        }
        if !ended.is_empty() {
            self.save()?;
        }
        Ok(ended)
    }

    /// An operator unblocked `peer`: its sanction ends (its count of blocks
    /// stays, so a repeat offence is blocked for longer).
    pub fn pardon(&mut self, peer: &PeerId) -> Result<(), SanctionsError> {
        if let Some(r) = self.peers.get_mut(peer) {
            if r.until.take().is_some() {
                self.save()?;
            }
        }
        Ok(())
    }

    /// The windows that ended by `now` after more than one refusal, for
    /// one summary line each; their counts start again.
    pub fn summaries(&mut self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        for (peer, r) in &mut self.peers {
            if now.duration_since(r.window_start) < REFUSAL_WINDOW {
                continue;
            }
            if r.refusals > 1 {
                out.push(Summary {
                    peer: *peer,
                    refusals: r.refusals,
                    reasons: std::mem::take(&mut r.reasons),
                });
            }
            r.window_start = now;
            r.refusals = 0;
            r.strikes = 0;
            r.reasons.clear();
        }
        // Peers with nothing left to remember.
        self.peers
            .retain(|_, r| r.until.is_some() || r.blocks > 0 || r.refusals > 0);
        out
    }

    fn save(&self) -> Result<(), SanctionsError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let io = |source| SanctionsError::Io {
            path: path.clone(),
            source,
        };
        let blocked = self
            .peers
            .iter()
            .filter_map(|(peer, r)| {
                let until = r.until?;
                let until_unix_s = until.duration_since(UNIX_EPOCH).ok()?.as_secs() + 1;
                Some(StoredBlock {
                    peer: peer.to_base58(),
                    until_unix_s,
                    blocks: r.blocks,
                    reasons: r.block_reasons.clone(),
                })
            })
            .collect();
        let bytes = serde_json::to_vec_pretty(&StoredSanctions { blocked }).map_err(|e| {
            SanctionsError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_past_the_threshold_is_blocked_and_stays_blocked_after_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocked-peers.json");
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut s = Sanctions::load(&path, now).unwrap();
        let (bad, other) = (PeerId::random(), PeerId::random());
        assert_eq!(s.refused(now, wall, bad, "malformed"), Sanction::First);
        for _ in 1..REFUSALS_BEFORE_BLOCK {
            assert_eq!(
                s.refused(now, wall, bad, "forged_identity"),
                Sanction::Counted
            );
        }
        assert_eq!(s.refused(now, wall, other, "bad_change"), Sanction::First);
        let Sanction::Block {
            duration,
            reasons,
            unsaved: None,
        } = s.refused(now, wall, bad, "malformed")
        else {
            panic!("not blocked past the threshold");
        };
        assert_eq!(duration, FIRST_BLOCK);
        assert_eq!(reasons.values().sum::<u32>(), REFUSALS_BEFORE_BLOCK + 1);
        assert_eq!(s.blocked(wall), vec![bad]);
        // A restart keeps the block until it ends.
        let mut s = Sanctions::load(&path, now).unwrap();
        assert_eq!(s.blocked(wall), vec![bad]);
        assert!(s.expire(wall).unwrap().is_empty());
        let later = wall + FIRST_BLOCK + Duration::from_secs(2);
        assert_eq!(s.expire(later).unwrap(), vec![bad]);
        assert!(Sanctions::load(&path, now)
            .unwrap()
            .blocked(wall)
            .is_empty());
        // A second offence blocks twice as long.
        for _ in 0..=REFUSALS_BEFORE_BLOCK {
            let _ = s.refused(now, later, bad, "malformed");
        }
        assert_eq!(s.blocked(later), vec![bad]);
        let reloaded = Sanctions::load(&path, now).unwrap();
        assert!(reloaded.blocked(later + FIRST_BLOCK).contains(&bad));
        assert!(reloaded
            .blocked(later + FIRST_BLOCK * 2 + Duration::from_secs(2))
            .is_empty());
    }

    #[test]
    fn refusals_an_honest_peer_can_cause_never_block() {
        let mut s = Sanctions::in_memory();
        let (now, wall) = (Instant::now(), SystemTime::now());
        let peer = PeerId::random();
        for i in 0..10 * REFUSALS_BEFORE_BLOCK {
            let reason = HONEST_REASONS[i as usize % HONEST_REASONS.len()];
            assert!(!matches!(
                s.refused(now, wall, peer, reason),
                Sanction::Block { .. }
            ));
        }
        assert!(s.blocked(wall).is_empty());
        // Other reasons still do, counted apart from those.
        for _ in 0..REFUSALS_BEFORE_BLOCK {
            let _ = s.refused(now, wall, peer, "malformed");
        }
        assert!(s.blocked(wall).is_empty());
        let _ = s.refused(now, wall, peer, "malformed");
        assert_eq!(s.blocked(wall), vec![peer]);
    }

    #[test]
    fn refusals_below_the_threshold_are_summarised_once_per_window() {
        let mut s = Sanctions::in_memory();
        let (now, wall) = (Instant::now(), SystemTime::now());
        let peer = PeerId::random();
        for _ in 0..REFUSALS_BEFORE_BLOCK {
            let _ = s.refused(now, wall, peer, "shape_limit");
        }
        assert!(s.blocked(wall).is_empty());
        assert!(s.summaries(now).is_empty(), "the window is not over");
        let summaries = s.summaries(now + REFUSAL_WINDOW);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].refusals, REFUSALS_BEFORE_BLOCK);
        assert!(s.summaries(now + REFUSAL_WINDOW * 2).is_empty());
        // A new window starts over: the peer is not blocked for refusals
        // spread over time.
        let next = now + REFUSAL_WINDOW * 3;
        assert_eq!(s.refused(next, wall, peer, "shape_limit"), Sanction::First);
    }
}
