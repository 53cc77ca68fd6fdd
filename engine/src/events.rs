//! "Document changed" events for subscribers.
//!
//! Events are published after the change is durable (never before), while the
//! document is still locked, so one document's events arrive in commit order.
//! Each subscriber has a bounded queue
//! ([`EngineConfig::subscriber_capacity`](crate::EngineConfig)); a subscriber
//! that falls behind loses events, which it can detect with
//! [`Subscription::dropped`] and repair by reading the documents it cares about.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use automerge::ChangeHash;

use crate::doc_id::DocId;

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Committed through this engine's write API.
    Local,
    /// Applied from changes received from a peer.
    Remote,
    /// Applied from changes a client handed over through
    /// [`Engine::apply_changes`](crate::Engine::apply_changes), at once or,
    /// if they were held, when their dependencies arrived. No peer has them
    /// from this node yet: the networking layer publishes them like local
    /// commits.
    Client,
}

/// A document changed and the change is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocEvent {
    /// The document.
    pub doc: DocId,
    /// Its heads after the change.
    pub heads: Vec<ChangeHash>,
    /// Whether the change was local or remote.
    pub origin: Origin,
    /// Whether the document is now deleted.
    pub deleted: bool,
    /// For [`Origin::Local`] and [`Origin::Client`], the encoded Automerge
    /// changes this write made durable, in causal order (shared between
    /// subscribers); for [`Origin::Client`] only the client's changes, not
    /// the peers' changes applied with them. Empty for [`Origin::Remote`].
    /// The networking layer publishes these as a delta.
    pub changes: Arc<[Vec<u8>]>,
}

/// A stream of [`DocEvent`]s for documents whose id starts with a prefix.
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: Receiver<DocEvent>,
    dropped: Arc<AtomicU64>,
}

impl Subscription {
    /// Waits for the next event; `None` once the engine is gone.
    pub fn recv(&self) -> Option<DocEvent> {
        self.rx.recv().ok()
    }

    /// Waits up to `timeout` for the next event; `None` on timeout or when
    /// the engine is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<DocEvent> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Option<DocEvent> {
        self.rx.try_recv().ok()
    }

    /// Events this subscription lost because its queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

struct Subscriber {
    prefix: String,
    tx: SyncSender<DocEvent>,
    dropped: Arc<AtomicU64>,
}

/// The set of subscribers.
#[derive(Default)]
pub(crate) struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl EventHub {
    /// Adds a subscriber for ids starting with `prefix`.
    pub(crate) fn subscribe(&self, prefix: &str, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let sub = Subscriber {
            prefix: prefix.to_string(),
            tx,
            dropped: Arc::clone(&dropped),
        };
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sub);
        Subscription { rx, dropped }
    }

    /// Delivers the event for `doc` to every matching subscriber without
    /// blocking; forgets subscribers that went away. The event is built only
    /// if some subscriber wants it, so commits nobody watches pay nothing.
    pub(crate) fn publish(&self, doc: &DocId, build: impl FnOnce() -> DocEvent) {
        let mut subs = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !subs.iter().any(|sub| doc.as_str().starts_with(&sub.prefix)) {
            return;
        }
        let event = build();
        subs.retain(|sub| {
            if !event.doc.as_str().starts_with(&sub.prefix) {
                return true;
            }
            match sub.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    sub.dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }
}
