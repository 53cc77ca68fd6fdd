//! Local commits: the engine's events for writes committed on this node
//! (and for changes clients handed over, once they apply), taken by the
//! networking task straight from the engine's subscription.
//!
//! The committing thread queues the event and wakes the task through a
//! [`Notify`]; no thread sits between them. A full queue drops events
//! (counted by [`LocalCommits::dropped`]); anti-entropy replicates what
//! they would have published.

use std::num::NonZeroUsize;
use std::sync::Arc;

use causeway_engine::{DocEvent, Engine, Origin, Subscription};
use tokio::sync::Notify;

/// Local commits queued between the engine and the networking task.
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
    /// Subscribes to every document's events of `engine`.
    pub fn subscribe(engine: &Engine) -> causeway_engine::Result<LocalCommits> {
        let notify = Arc::new(Notify::new());
        let wake = Arc::clone(&notify);
        let subscription =
            engine.subscribe_waking("", LOCAL_EVENT_QUEUE, move || wake.notify_one())?;
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
    /// waiting; events of changes received from peers are skipped (up to
    /// as many again, so that one call stays bounded).
    pub fn take(&self) -> Vec<DocEvent> {
        let mut burst = Vec::new();
        let mut looked = 0;
        while burst.len() < MAX_LOCAL_BURST && looked < 2 * MAX_LOCAL_BURST {
            let Some(event) = self.subscription.try_recv() else {
                break;
            };
            looked += 1;
            if matches!(event.origin, Origin::Local | Origin::Client) {
                burst.push(event);
            }
        }
        burst
    }

    /// Events the queue dropped so far for lack of room.
    pub fn dropped(&self) -> u64 {
        self.subscription.dropped()
    }
}
