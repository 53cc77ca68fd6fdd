//! Waiting for a session: an engine answers a read that carries a
//! [`SessionToken`] only once it holds everything the token covers (see
//! [`token`](crate::token) for what a token is and how it travels).

use std::time::{Duration, Instant};

use automerge::ChangeHash;

use crate::doc_id::DocId;
use crate::engine::Engine;
use crate::error::Result;
pub use crate::token::{
    SessionToken, TokenError, TokenKey, MAX_SESSION_DOCS, MAX_SESSION_HEADS, MAX_TOKEN_CHARS,
    TOKEN_VERSION,
};

impl Engine {
    /// What of `token` this engine does not hold yet: per document, the
    /// heads missing from its history (every head, for a document it has
    /// never seen). Empty when the engine holds everything the token covers.
    pub fn session_missing(&self, token: &SessionToken) -> Result<SessionToken> {
        let mut missing = SessionToken::new();
        for (doc, heads) in token.iter() {
            let lacking = self.with_doc(doc, |state| Ok(state.missing_heads(heads)))?;
            if !lacking.is_empty() {
                missing.insert(doc, &lacking);
            }
        }
        Ok(missing)
    }

    /// Waits until this engine holds everything `token` covers, or until
    /// `timeout` passed. Returns what is still missing (empty: the engine
    /// holds it all, and a read now sees every write the token stands for).
    pub fn wait_for_session(
        &self,
        token: &SessionToken,
        timeout: Duration,
    ) -> Result<SessionToken> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.session_missing(token)?;
            let Some(doc) = missing.iter().next().map(|(d, _)| d.clone()) else {
                return Ok(missing);
            };
            // Subscribe before looking again, so no change slips between.
            let events = self.subscribe(doc.as_str())?;
            let mut wanted = SessionToken::new();
            if let Some(heads) = token.heads(&doc) {
                wanted.insert(&doc, heads);
            }
            while !self.session_missing(&wanted)?.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return self.session_missing(token);
                }
                // Any event may be the one; the check above decides. A full
                // subscription queue loses events, so wake up now and then.
                let _ = events.recv_timeout(left.min(Duration::from_millis(100)));
            }
        }
    }

    /// Whether a replica at `have` holds every change in `want`, judged by
    /// this engine's history of `doc`: each hash of `want` is in `have` or
    /// an ancestor of it. Hashes this engine does not hold count as not
    /// held, so the answer errs towards `false` and turns `true` once the
    /// engine catches up.
    pub fn heads_cover(
        &self,
        doc: &DocId,
        have: &[ChangeHash],
        want: &[ChangeHash],
    ) -> Result<bool> {
        if want.iter().all(|h| have.contains(h)) {
            return Ok(true);
        }
        if have.is_empty() {
            return Ok(false);
        }
        self.with_doc(doc, |state| {
            if !state.missing_heads(want).is_empty() {
                return Ok(false);
            }
            // Changes outside the history of `have`, then none of `want` among them.
            let outside = state.doc.get_changes_meta(have);
            Ok(!outside.iter().any(|c| want.contains(&c.hash)))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hash(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    #[test]
    fn engine_waits_for_what_a_token_covers() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Engine::open(a_dir.path(), crate::EngineConfig::default()).unwrap();
        let b = Engine::open(b_dir.path(), crate::EngineConfig::default()).unwrap();
        let id = DocId::new("notes/1").unwrap();
        let first = a.put_json(&id, &json!({"n": 1})).unwrap();
        let second = a.put_json(&id, &json!({"n": 2})).unwrap();
        let token = second.session.clone();
        assert_eq!(b.session_missing(&token).unwrap(), token);
        let short = Duration::from_millis(50);
        assert_eq!(b.wait_for_session(&token, short).unwrap(), token);

        let changes = a.changes_since(&id, &[]).unwrap();
        let waiter = {
            let b = b.clone();
            let token = token.clone();
            std::thread::spawn(move || b.wait_for_session(&token, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(20));
        b.apply_changes(&id, &changes).unwrap();
        assert!(waiter.join().unwrap().unwrap().is_empty());
        assert_eq!(b.get_json(&id).unwrap(), json!({"n": 2}));

        // The second write's heads cover the first's, not the other way round.
        assert!(b.heads_cover(&id, &second.heads, &first.heads).unwrap());
        assert!(!b.heads_cover(&id, &first.heads, &second.heads).unwrap());
        assert!(!b.heads_cover(&id, &[], &first.heads).unwrap());
        assert!(!b.heads_cover(&id, &[hash(9)], &first.heads).unwrap());
    }
}
