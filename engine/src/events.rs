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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
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

/// The origins of the events a subscription takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origins {
    /// Every event.
    All,
    /// Events of changes this node must hand to its peers:
    /// [`Origin::Local`] and [`Origin::Client`]. Changes received from peers
    /// are neither built into an event nor queued for it, nor do they wake it.
    Publishable,
}

impl Origins {
    fn admit(self, origin: Origin) -> bool {
        match self {
            Origins::All => true,
            Origins::Publishable => origin != Origin::Remote,
        }
    }
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
/// Dropping it unsubscribes at once, whether or not any event ever matched.
#[derive(Debug)]
pub struct Subscription {
    rx: Receiver<DocEvent>,
    dropped: Arc<AtomicU64>,
    id: u64,
    hub: Weak<EventHub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.lock().subscribers.retain(|sub| sub.id != self.id);
        }
    }
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

/// Called after an event is queued for (or dropped by) a subscription, so
/// that a consumer that does not block on [`Subscription::recv`] (an async
/// task waiting on a notification) knows to look.
pub(crate) type Wake = Arc<dyn Fn() + Send + Sync>;

struct Subscriber {
    id: u64,
    prefix: String,
    origins: Origins,
    tx: SyncSender<DocEvent>,
    dropped: Arc<AtomicU64>,
    wake: Option<Wake>,
}

#[derive(Default)]
struct Subscribers {
    subscribers: Vec<Subscriber>,
    next_id: u64,
}

/// The set of subscribers.
#[derive(Default)]
pub(crate) struct EventHub {
    state: Mutex<Subscribers>,
}

impl EventHub {
    fn lock(&self) -> MutexGuard<'_, Subscribers> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a subscriber for ids starting with `prefix` and events of
    /// `origins`; dropping the subscription removes it.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        prefix: &str,
        origins: Origins,
        capacity: usize,
        wake: Option<Wake>,
    ) -> Subscription {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.subscribers.push(Subscriber {
            id,
            prefix: prefix.to_string(),
            origins,
            tx,
            dropped: Arc::clone(&dropped),
            wake,
        });
        Subscription {
            rx,
            dropped,
            id,
            hub: Arc::downgrade(self),
        }
    }

    /// Subscriptions currently open.
    pub(crate) fn len(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// Delivers the event for `doc`, of `origin`, to every matching
    /// subscriber without blocking; forgets subscribers that went away. The
    /// event is built only if some subscriber wants it, so commits nobody
    /// watches pay nothing. Subscribers' wakes run after the hub's lock is
    /// released.
    pub(crate) fn publish(&self, doc: &DocId, origin: Origin, build: impl FnOnce() -> DocEvent) {
        let wants =
            |sub: &Subscriber| sub.origins.admit(origin) && doc.as_str().starts_with(&sub.prefix);
        let mut wakes: Vec<Wake> = Vec::new();
        {
            let mut state = self.lock();
            let subs = &mut state.subscribers;
            if !subs.iter().any(wants) {
                return;
            }
            let event = build();
            subs.retain(|sub| {
                if !wants(sub) {
                    return true;
                }
                let kept = match sub.tx.try_send(event.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        sub.dropped.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Err(TrySendError::Disconnected(_)) => false,
                };
                if let (true, Some(wake)) = (kept, &sub.wake) {
                    wakes.push(Arc::clone(wake));
                }
                kept
            });
        }
        for wake in wakes {
            wake();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Publishes an empty local event for `id`.
    fn publish(hub: &EventHub, id: &str) {
        publish_from(hub, id, Origin::Local);
    }

    /// Publishes an empty event of `origin` for `id`.
    fn publish_from(hub: &EventHub, id: &str, origin: Origin) {
        let doc = DocId::new(id).unwrap();
        hub.publish(&doc, origin, || DocEvent {
            doc: doc.clone(),
            heads: Vec::new(),
            origin,
            deleted: false,
            changes: Arc::from(Vec::new()),
        });
    }

    #[test]
    fn dropping_a_subscription_removes_it_even_if_nothing_matched() {
        let hub = Arc::new(EventHub::default());
        let subs: Vec<Subscription> = (0..1_000)
            .map(|i| hub.subscribe(&format!("nobody-{i}/"), Origins::All, 256, None))
            .collect();
        let kept = hub.subscribe("kept/", Origins::All, 4, None);
        assert_eq!(hub.len(), 1_001);
        drop(subs);
        assert_eq!(hub.len(), 1);
        publish(&hub, "kept/1");
        assert_eq!(
            kept.try_recv().map(|e| e.doc.to_string()),
            Some("kept/1".into())
        );
        drop(kept);
        assert_eq!(hub.len(), 0);
    }

    #[test]
    fn a_waking_subscription_is_woken_for_each_event_it_queues_or_drops() {
        let hub = Arc::new(EventHub::default());
        let woken = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&woken);
        let wake: Wake = Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let sub = hub.subscribe("a/", Origins::All, 2, Some(wake));
        publish(&hub, "b/1");
        assert_eq!(woken.load(Ordering::SeqCst), 0, "another prefix");
        for i in 0..3 {
            publish(&hub, &format!("a/{i}"));
        }
        assert_eq!(woken.load(Ordering::SeqCst), 3, "two queued, one dropped");
        assert_eq!(sub.dropped(), 1);
        assert_eq!(
            sub.try_recv().map(|e| e.doc.to_string()),
            Some("a/0".into())
        );
        assert_eq!(
            sub.try_recv().map(|e| e.doc.to_string()),
            Some("a/1".into())
        );
        assert!(sub.try_recv().is_none());
        drop(sub);
        publish(&hub, "a/3");
        assert_eq!(woken.load(Ordering::SeqCst), 3, "gone: not woken");
    }

    #[test]
    fn a_publishable_subscription_neither_builds_queues_nor_wakes_for_peers_changes() {
        let hub = Arc::new(EventHub::default());
        let woken = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&woken);
        let wake: Wake = Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let sub = hub.subscribe("", Origins::Publishable, 8, Some(wake));
        let doc = DocId::new("a/peer").unwrap();
        hub.publish(&doc, Origin::Remote, || {
            panic!("an event nobody takes was built")
        });
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        publish_from(&hub, "a/client", Origin::Client);
        publish(&hub, "a/local");
        assert_eq!(woken.load(Ordering::SeqCst), 2);
        let taken: Vec<Origin> = std::iter::from_fn(|| sub.try_recv())
            .map(|e| e.origin)
            .collect();
        assert_eq!(taken, vec![Origin::Client, Origin::Local]);
        // Another subscription still takes peers' changes.
        let all = hub.subscribe("", Origins::All, 8, None);
        publish_from(&hub, "a/peer", Origin::Remote);
        assert_eq!(all.try_recv().map(|e| e.origin), Some(Origin::Remote));
        assert!(sub.try_recv().is_none());
    }
}
