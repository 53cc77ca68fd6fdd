//! The audit feed: who made each accepted write, what it changed and when.
//!
//! Every write that applies changes to a document (a local commit, a
//! client's changes, a peer's) adds one [`AuditEntry`] in the same RocksDB
//! WriteBatch as the changes, so an entry exists exactly when its write
//! does. The entry names the [`Actor`] of the engine handle that wrote
//! ([`Engine::acting_as`]): the node's HTTP API acts as the client's token,
//! the replicator as the peer the changes came from, an embedded app as
//! [`Actor::Local`] unless it says otherwise.
//!
//! Entries are numbered in the order their writes began (`seq`, from 0).
//! The feed is read after a cursor ([`Engine::audit`]) and shows an entry
//! only once every entry numbered before it is durable or failed, so a
//! reader that resumes from its cursor never skips an entry that committed
//! late. The feed keeps the
//! latest [`EngineConfig::audit_max_entries`] entries: each new entry
//! deletes, in its own batch, the one that many before it. A reader that
//! falls further behind learns how many it missed. A number is not given
//! twice as long as the entries a reader saw stay durable: with
//! [`Durability::Buffered`](crate::Durability::Buffered) a machine crash can
//! lose entries a reader saw, and the numbers after the last surviving
//! entry are given again.
//!
//! Changes a peer or client handed over that had to wait for their
//! dependencies are audited when they apply, under the actor of the write
//! that let them apply.
//!
//! [`EngineConfig::audit_max_entries`]: crate::EngineConfig::audit_max_entries

use crate::audit_log::{decode, key, seq_of};
use crate::doc_id::DocId;
use crate::engine::Engine;
use crate::error::Result;
use crate::layout;

pub use crate::audit_log::{Actor, AuditEntry, AuditPage};

/// Most entries one read of the feed returns.
pub const MAX_AUDIT_PAGE: usize = 1000;
/// Most entries one read looks at when it filters by document: a read that
/// finds fewer matches returns its cursor, and the next read goes on.
pub const MAX_AUDIT_SCAN: usize = 100_000;

impl Engine {
    /// Reads the audit feed after entry `after` (`None`: from the oldest
    /// kept), at most `limit` entries (1 to [`MAX_AUDIT_PAGE`]), only those
    /// of `doc` if given (looking at most at [`MAX_AUDIT_SCAN`] entries).
    /// See the [module docs](crate::audit).
    pub fn audit(
        &self,
        after: Option<u64>,
        limit: usize,
        doc: Option<&DocId>,
    ) -> Result<AuditPage> {
        let limit = limit.clamp(1, MAX_AUDIT_PAGE);
        let log = &self.inner.audit;
        let below = log.readable_below();
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut page = AuditPage {
            cursor: after,
            ..AuditPage::default()
        };
        let (mut scanned, mut first) = (0, true);
        self.inner
            .store
            .scan_from(layout::CF_AUDIT, &key(start), |k, v| {
                let Some(seq) = seq_of(k) else {
                    return Ok(true);
                };
                if seq >= below {
                    return Ok(false);
                }
                if std::mem::take(&mut first) {
                    page.missed = seq - start;
                }
                if page.entries.len() == limit || scanned == MAX_AUDIT_SCAN {
                    page.more = true;
                    return Ok(false);
                }
                scanned += 1;
                page.cursor = Some(seq);
                let entry = decode(seq, v)?;
                if doc.is_none_or(|d| *d == entry.doc) {
                    page.entries.push(entry);
                }
                Ok(true)
            })?;
        Ok(page)
    }

    /// A handle on the same engine whose writes the audit feed attributes
    /// to `actor` (a handle from [`Engine::open`] writes as
    /// [`Actor::Local`]).
    pub fn acting_as(&self, actor: Actor) -> Engine {
        let mut handle = self.clone();
        handle.actor = std::sync::Arc::new(actor);
        handle
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::EngineConfig;
    use serde_json::json;

    fn open(dir: &std::path::Path, max: u64) -> Engine {
        let config = EngineConfig {
            audit_max_entries: max,
            ..EngineConfig::default()
        };
        Engine::open(dir, config).unwrap()
    }

    fn doc(id: &str) -> DocId {
        DocId::new(id).unwrap()
    }

    fn actors(page: &AuditPage) -> Vec<String> {
        page.entries.iter().map(|e| e.actor.to_string()).collect()
    }

    #[test]
    fn each_write_names_its_actor_and_the_feed_resumes_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path(), 100);
        let alice = engine.acting_as(Actor::Client("token:alice".into()));
        let bob = engine.acting_as(Actor::Client("token:bob".into()));
        alice.put_json(&doc("n/1"), &json!({"v": 1})).unwrap();
        engine.put_json(&doc("n/2"), &json!({"v": 1})).unwrap();
        let deleted = bob.delete(&doc("n/1")).unwrap();

        let page = engine.audit(None, 10, None).unwrap();
        assert_eq!(
            actors(&page),
            ["client:token:alice", "local", "client:token:bob"]
        );
        let last = &page.entries[2];
        assert_eq!((last.seq, last.deleted, last.changes), (2, true, 1));
        assert_eq!(last.heads, deleted.heads);
        assert_eq!((page.cursor, page.more, page.missed), (Some(2), false, 0));
        // Who deleted n/1?
        let n1 = engine.audit(None, 10, Some(&doc("n/1"))).unwrap();
        let deletes: Vec<_> = n1.entries.iter().filter(|e| e.deleted).collect();
        assert_eq!(deletes.len(), 1);
        assert_eq!(deletes[0].actor, Actor::Client("token:bob".into()));

        drop((engine, alice, bob));
        let engine = open(dir.path(), 100);
        engine.put_json(&doc("n/3"), &json!({"v": 1})).unwrap();
        let next = engine.audit(page.cursor, 10, None).unwrap();
        assert_eq!(next.entries.len(), 1);
        assert_eq!(
            (next.entries[0].seq, next.entries[0].doc.as_str()),
            (3, "n/3")
        );
    }

    #[test]
    fn the_feed_keeps_its_latest_entries_and_says_how_many_a_reader_missed() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path(), 10);
        for i in 0..25 {
            engine.put_json(&doc("w"), &json!({"i": i})).unwrap();
        }
        let all = engine.audit(None, 100, None).unwrap();
        let seqs: Vec<u64> = all.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (15..25).collect::<Vec<_>>());
        assert_eq!(all.missed, 15);
        let behind = engine.audit(Some(9), 3, None).unwrap();
        assert_eq!(
            (behind.missed, behind.entries.len(), behind.more),
            (5, 3, true)
        );
        assert_eq!(behind.cursor, Some(17));
        // A smaller bound at the next open drops the entries beyond it.
        drop(engine);
        let engine = open(dir.path(), 4);
        let kept = engine.audit(None, 100, None).unwrap();
        let seqs: Vec<u64> = kept.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [21, 22, 23, 24]);
        let none = open(tempfile::tempdir().unwrap().path(), 0);
        none.put_json(&doc("w"), &json!({})).unwrap();
        assert!(none.audit(None, 10, None).unwrap().entries.is_empty());
    }

    #[test]
    fn an_entry_shows_only_once_every_earlier_one_is_durable() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (open(a_dir.path(), 100), open(b_dir.path(), 100));
        let id = doc("d");
        a.put_json(&id, &json!({"x": 1})).unwrap();
        let changes = a.changes_since(&id, &[]).unwrap();
        // A peer's changes, written without waiting for the fsync...
        let peer = b.deferring().acting_as(Actor::Peer("12D3Koo-a".into()));
        peer.apply_peer_changes(&id, &changes).unwrap();
        // ... and a local write after them, durable at once.
        b.put_json(&doc("e"), &json!({"y": 1})).unwrap();
        assert!(b.audit(None, 10, None).unwrap().entries.is_empty());
        b.sync_deferred().unwrap();
        let page = b.audit(None, 10, None).unwrap();
        assert_eq!(actors(&page), ["peer:12D3Koo-a", "local"]);
    }
}
