//! Local commits: the engine's events for writes committed on this node
//! (and for changes clients handed over, once they apply), taken by the
//! networking task straight from the engine's subscription.
//!
//! The committing thread queues the event and wakes the task through a
//! [`Notify`]; no thread sits between them. Changes applied from peers are
//! not queued at all ([`Origins::Publishable`]): they are not this node's
//! to publish, and the receiving path does not pay for an event and a
//! wake-up. A full queue drops events (counted by
//! [`LocalCommits::dropped`]); anti-entropy replicates what they would have
//! published.

use std::num::NonZeroUsize;
use std::sync::Arc;

use causeway_engine::{DocEvent, Engine, Origins, Subscription};
use tokio::sync::Notify;

/// Local commits queued between the engine and the networking task. When
/// full, the engine drops events (counted in
/// `causeway_local_events_dropped`); anti-entropy replicates what they
/// would have published.
pub const LOCAL_EVENT_QUEUE: NonZeroUsize = match NonZeroUsize::new(8192) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

/// Local commits taken from the queue in one turn and published together
/// (see [`Replicator::handle_local_commits`](causeway_engine::replication::Replicator::handle_local_commits)).
pub const MAX_LOCAL_BURST: usize = 1024;

/// The networking task's end of the engine's event subscription.
pub struct LocalCommits {
    subscription: Subscription,
    notify: Arc<Notify>,
}

impl LocalCommits {
    /// Subscribes to every document's local and client commits of `engine`.
    pub fn subscribe(engine: &Engine) -> causeway_engine::Result<LocalCommits> {
        let notify = Arc::new(Notify::new());
        let wake = Arc::clone(&notify);
        let subscription =
            engine.subscribe_waking("", Origins::Publishable, LOCAL_EVENT_QUEUE, move || {
                wake.notify_one()
            })?;
        Ok(LocalCommits {
            subscription,
            notify,
        })
    }

    /// Waits until local commits are queued, then takes them (see
    /// [`LocalCommits::take`]). Cancel-safe: nothing is taken before the
    /// future completes.
    pub async fn next_burst(&self) -> Vec<DocEvent> {
        loop {
            let burst = self.take();
            if !burst.is_empty() {
                return burst;
            }
            // A wake since the last look left a permit: this returns at once.
            self.notify.notified().await;
        }
    }

    /// The local commits queued now, up to [`MAX_LOCAL_BURST`], without
    /// waiting; empty only once the queue is.
    pub fn take(&self) -> Vec<DocEvent> {
        std::iter::from_fn(|| self.subscription.try_recv())
            .take(MAX_LOCAL_BURST)
            .collect()
    }

    /// Events the queue dropped so far for lack of room.
    pub fn dropped(&self) -> u64 {
        self.subscription.dropped()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use causeway_engine::{DocId, EngineConfig, Origin, SyncState};
    use serde_json::json;

    /// Syncs `doc` from `from` into `to` until neither has more to send.
    fn sync_into(from: &Engine, to: &Engine, doc: &DocId) {
        let (mut theirs, mut ours) = (SyncState::new(), SyncState::new());
        loop {
            let out = from
                .generate_sync_message(doc, &mut theirs, 1 << 20)
                .unwrap();
            let sent = out.is_some();
            if let Some(m) = out {
                to.receive_sync_message(doc, &mut ours, m).unwrap();
            }
            let back = to.generate_sync_message(doc, &mut ours, 1 << 20).unwrap();
            let answered = back.is_some();
            if let Some(m) = back {
                from.receive_sync_message(doc, &mut theirs, m).unwrap();
            }
            if !sent && !answered {
                return;
            }
        }
    }

    #[test]
    fn take_returns_local_commits_and_never_peers_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Engine::open(dir.path().join("a"), EngineConfig::default()).unwrap();
        let b = Engine::open(dir.path().join("b"), EngineConfig::default()).unwrap();
        let local = LocalCommits::subscribe(&a).unwrap();
        let peers = a.subscribe("peer/").unwrap();
        for i in 0..20 {
            let doc = DocId::new(format!("peer/{i}")).unwrap();
            b.put_json(&doc, &json!({ "i": i })).unwrap();
            sync_into(&b, &a, &doc);
        }
        let remote = std::iter::from_fn(|| peers.try_recv())
            .filter(|e| e.origin == Origin::Remote)
            .count();
        assert_eq!(remote, 20, "the peer's changes were queued as remote");
        let mine = DocId::new("mine/1").unwrap();
        a.put_json(&mine, &json!({ "x": 1 })).unwrap();
        let burst = local.take();
        assert_eq!(burst.len(), 1, "peers' changes are skipped, not published");
        assert_eq!(burst[0].doc, mine);
        assert!(local.take().is_empty());
        assert_eq!(local.dropped(), 0);
    }

    #[test]
    fn a_commit_on_another_thread_wakes_a_waiting_burst() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), EngineConfig::default()).unwrap();
        let local = LocalCommits::subscribe(&engine).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let writer = {
            let engine = engine.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                let doc = DocId::new("w/1").unwrap();
                engine.put_json(&doc, &json!({ "n": 1 })).unwrap();
            })
        };
        let burst = runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), local.next_burst()).await
        });
        writer.join().unwrap();
        let burst = burst.expect("the commit woke the task");
        assert_eq!(burst.len(), 1);
        assert_eq!(burst[0].doc.as_str(), "w/1");
    }
}
