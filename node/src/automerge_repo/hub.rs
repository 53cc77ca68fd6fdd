//! What a node's automerge-repo connections share: which connection asked
//! for which document, so that every change to it, from any source, is
//! pushed to each of them; the relay of ephemeral messages between
//! connections and nodes; limits and figures.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use causeway_engine::{DocId, Engine};
use tokio::sync::{Notify, Semaphore};

use super::config::RepoConfig;
use crate::network::ephemeral::EphemeralRelay;
use crate::NodeHandle;

/// Ephemeral messages waiting to be sent on one connection; beyond this the
/// oldest are dropped (counted): they are superseded by later ones anyway.
pub const MAX_QUEUED_EPHEMERAL: usize = 256;

/// `(sender, session)` pairs whose latest ephemeral count is remembered, to
/// drop repeats and stale messages; the oldest pair is forgotten beyond
/// this.
pub const MAX_EPHEMERAL_SESSIONS: usize = 4096;

/// Documents this node may be asking its peers for at once on behalf of
/// clients; a request beyond this is answered `doc-unavailable` at once.
pub const MAX_FETCHES_IN_FLIGHT: usize = 256;

/// Figures of the automerge-repo endpoint, for `/metrics`.
#[derive(Debug, Default)]
pub struct RepoStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections refused at `max_connections`.
    pub refused: AtomicU64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: AtomicU64,
    /// Connections closed because pings went unanswered.
    pub ping_timeouts: AtomicU64,
    /// Connections replaced by a new one with the same peer id.
    pub replaced: AtomicU64,
    /// Sync and request messages received.
    pub sync_received: AtomicU64,
    /// Sync messages sent.
    pub sync_sent: AtomicU64,
    /// Sync messages whose changes the engine refused (the document's sync
    /// with that connection starts over).
    pub sync_refused: AtomicU64,
    /// Change-carrying sync messages dropped because the connection's token
    /// may not write the document.
    pub read_only_refused: AtomicU64,
    /// `doc-unavailable` answers sent.
    pub unavailable_sent: AtomicU64,
    /// Documents refused at `max_documents_per_connection`, with an id that
    /// is not an automerge-repo document id, or that the token may not read.
    pub documents_refused: AtomicU64,
    /// Times peers were asked for a document a client wanted.
    pub fetches: AtomicU64,
    /// Ephemeral messages delivered to connections.
    pub ephemeral_delivered: AtomicU64,
    /// Ephemeral messages dropped: repeated or stale, too large, or
    /// beyond a connection's queue.
    pub ephemeral_dropped: AtomicU64,
}

impl RepoStats {
    /// Each figure as `(name, help, value)`.
    pub fn figures(&self) -> Vec<(&'static str, &'static str, u64)> {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "connections_open",
                "automerge-repo connections open",
                v(&self.open),
            ),
            (
                "connections_accepted",
                "automerge-repo connections accepted since start",
                v(&self.accepted),
            ),
            (
                "connections_refused",
                "automerge-repo connections refused at max_connections",
                v(&self.refused),
            ),
            (
                "protocol_errors",
                "automerge-repo connections closed for a protocol violation",
                v(&self.protocol_errors),
            ),
            (
                "ping_timeouts",
                "automerge-repo connections closed for unanswered pings",
                v(&self.ping_timeouts),
            ),
            (
                "connections_replaced",
                "automerge-repo connections replaced by one with the same peer id",
                v(&self.replaced),
            ),
            (
                "sync_received",
                "automerge-repo sync and request messages received",
                v(&self.sync_received),
            ),
            (
                "sync_sent",
                "automerge-repo sync messages sent",
                v(&self.sync_sent),
            ),
            (
                "sync_refused",
                "automerge-repo sync messages whose changes were refused",
                v(&self.sync_refused),
            ),
            (
                "read_only_refused",
                "automerge-repo change-carrying messages dropped: the token may not write the document",
                v(&self.read_only_refused),
            ),
            (
                "unavailable_sent",
                "automerge-repo doc-unavailable answers sent",
                v(&self.unavailable_sent),
            ),
            (
                "documents_refused",
                "automerge-repo documents refused (per-connection limit, invalid id, not readable by the token)",
                v(&self.documents_refused),
            ),
            (
                "fetches",
                "documents asked of peers for automerge-repo clients",
                v(&self.fetches),
            ),
            (
                "ephemeral_delivered",
                "automerge-repo ephemeral messages delivered to connections",
                v(&self.ephemeral_delivered),
            ),
            (
                "ephemeral_dropped",
                "automerge-repo ephemeral messages dropped (stale, too large, queue full)",
                v(&self.ephemeral_dropped),
            ),
        ]
    }
}

/// What the hub and one connection's task share.
pub(crate) struct Link {
    /// Documents changed since the task last looked.
    pub(crate) dirty: Mutex<BTreeSet<DocId>>,
    /// Ephemeral messages to send.
    pub(crate) ephemeral: Mutex<VecDeque<Arc<EphemeralRelay>>>,
    /// Documents asked of the cluster that no asked peer has.
    pub(crate) missed: Mutex<BTreeSet<DocId>>,
    /// Wakes the task.
    pub(crate) notify: Notify,
    /// Set when a newer connection of the same peer replaced this one.
    pub(crate) replaced: Notify,
}

impl Link {
    fn new() -> Link {
        Link {
            dirty: Mutex::new(BTreeSet::new()),
            ephemeral: Mutex::new(VecDeque::new()),
            missed: Mutex::new(BTreeSet::new()),
            notify: Notify::new(),
            replaced: Notify::new(),
        }
    }

    /// Adds `doc` to `set` (one of this link's) and wakes the task.
    fn note(&self, set: &Mutex<BTreeSet<DocId>>, doc: &DocId) {
        lock(set).insert(doc.clone());
        self.notify.notify_one();
    }
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    links: HashMap<u64, Arc<Link>>,
    /// The connection of each client peer id.
    by_peer: HashMap<String, u64>,
    /// The connections that asked for each document.
    interest: HashMap<DocId, BTreeSet<u64>>,
    /// Latest ephemeral count per `(sender, session)`, and their age order.
    ephemeral_seen: HashMap<(String, String), u64>,
    ephemeral_order: VecDeque<(String, String)>,
}

impl Registry {
    /// The connections that asked for `doc`, with their ids.
    fn links_of<'a>(&'a self, doc: &DocId) -> impl Iterator<Item = (u64, &'a Arc<Link>)> + 'a {
        let ids = self.interest.get(doc).into_iter().flatten();
        ids.filter_map(|id| Some((*id, self.links.get(id)?)))
    }
}

/// The automerge-repo endpoint's shared state. See the [module docs](self).
pub struct Hub {
    pub(crate) engine: Engine,
    pub(crate) node: Option<NodeHandle>,
    pub(crate) config: RepoConfig,
    /// This node's automerge-repo peer id.
    pub(crate) peer_id: String,
    /// The store's id, the `storageId` clients see.
    pub(crate) storage_id: String,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) fetch_slots: Arc<Semaphore>,
    /// Figures for `/metrics`.
    pub stats: RepoStats,
    registry: Mutex<Registry>,
}

impl Hub {
    /// A hub for `engine` (and `node`, to fetch documents from the cluster
    /// and relay ephemeral messages through it). Starts the thread that
    /// pushes the engine's changes to connections, and, inside a tokio
    /// runtime with a node, the task that relays other nodes' ephemeral
    /// messages; both end when the hub is dropped.
    pub fn start(engine: Engine, node: Option<NodeHandle>, config: RepoConfig) -> Arc<Hub> {
        let peer_id = match &node {
            Some(n) => format!("causeway-{}-{}", n.region(), n.peer_id()),
            None => format!("causeway-{}", engine.store_id()),
        };
        let hub = Arc::new(Hub {
            storage_id: engine.store_id().to_string(),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            fetch_slots: Arc::new(Semaphore::new(MAX_FETCHES_IN_FLIGHT)),
            engine,
            node,
            config,
            peer_id,
            stats: RepoStats::default(),
            registry: Mutex::new(Registry::default()),
        });
        spawn_change_feed(&hub);
        if let (Some(node), Ok(runtime)) = (&hub.node, tokio::runtime::Handle::try_current()) {
            // A connection that misses a fetch miss waits out its deadline
            // instead; a lost ephemeral message is counted.
            follow(
                &runtime,
                &hub,
                node.fetch_misses(),
                |hub, doc| hub.missed(&doc),
                |_, _| {},
            );
            follow(
                &runtime,
                &hub,
                node.ephemeral(),
                |hub, relay| {
                    hub.relay_ephemeral(None, relay);
                },
                |hub, lost| {
                    hub.stats
                        .ephemeral_dropped
                        .fetch_add(lost, Ordering::Relaxed);
                },
            );
        }
        hub
    }

    /// Registers a connection whose client is `peer`; a connection of the
    /// same peer id is told to close (the sync protocol assumes one ordered
    /// stream per peer). Returns its id and link.
    pub(crate) fn register(&self, peer: &str) -> (u64, Arc<Link>) {
        let mut r = lock(&self.registry);
        let id = r.next_id;
        r.next_id += 1;
        let link = Arc::new(Link::new());
        r.links.insert(id, Arc::clone(&link));
        if let Some(old) = r.by_peer.insert(peer.to_string(), id) {
            if let Some(old) = r.links.get(&old) {
                old.replaced.notify_one();
                self.stats.replaced.fetch_add(1, Ordering::Relaxed);
            }
        }
        (id, link)
    }

    /// Forgets a connection that ended.
    pub(crate) fn unregister(&self, id: u64, peer: &str, docs: impl Iterator<Item = DocId>) {
        let mut r = lock(&self.registry);
        r.links.remove(&id);
        if r.by_peer.get(peer) == Some(&id) {
            r.by_peer.remove(peer);
        }
        for doc in docs {
            if let Some(set) = r.interest.get_mut(&doc) {
                set.remove(&id);
                if set.is_empty() {
                    r.interest.remove(&doc);
                }
            }
        }
    }

    /// Connection `id` asked for `doc`: every change to it is pushed there
    /// from now on.
    pub(crate) fn subscribe(&self, id: u64, doc: &DocId) {
        lock(&self.registry)
            .interest
            .entry(doc.clone())
            .or_default()
            .insert(id);
    }

    /// `doc` changed: every connection that asked for it looks again.
    fn changed(&self, doc: &DocId) {
        let r = lock(&self.registry);
        for (_, link) in r.links_of(doc) {
            link.note(&link.dirty, doc);
        }
    }

    /// No peer asked has `doc`: connections waiting for it answer now.
    fn missed(&self, doc: &DocId) {
        let r = lock(&self.registry);
        for (_, link) in r.links_of(doc) {
            link.note(&link.missed, doc);
        }
    }

    /// Some changes may have been missed: every connection looks at every
    /// document it asked for again.
    fn changed_all(&self) {
        let r = lock(&self.registry);
        for (doc, ids) in &r.interest {
            for link in ids.iter().filter_map(|id| r.links.get(id)) {
                link.note(&link.dirty, doc);
            }
        }
    }

    /// Relays an ephemeral message, from connection `from` or (`None`)
    /// from another node, to every other connection that asked for its
    /// document, unless it repeats or predates one already relayed for its
    /// `(sender, session)`. Returns whether it was new.
    pub(crate) fn relay_ephemeral(&self, from: Option<u64>, relay: Arc<EphemeralRelay>) -> bool {
        let mut r = lock(&self.registry);
        let key = (relay.sender.clone(), relay.session.clone());
        match r.ephemeral_seen.get(&key) {
            Some(&last) if relay.count <= last => {
                drop(r);
                self.stats.ephemeral_dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            Some(_) => {}
            None => {
                r.ephemeral_order.push_back(key.clone());
                if r.ephemeral_order.len() > MAX_EPHEMERAL_SESSIONS {
                    if let Some(oldest) = r.ephemeral_order.pop_front() {
                        r.ephemeral_seen.remove(&oldest);
                    }
                }
            }
        }
        r.ephemeral_seen.insert(key, relay.count);
        let targets: Vec<Arc<Link>> = r
            .links_of(&relay.doc)
            .filter(|(id, _)| Some(*id) != from)
            .map(|(_, link)| Arc::clone(link))
            .collect();
        drop(r);
        for link in targets {
            let mut queue = lock(&link.ephemeral);
            if queue.len() >= MAX_QUEUED_EPHEMERAL {
                queue.pop_front();
                self.stats.ephemeral_dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(Arc::clone(&relay));
            drop(queue);
            link.notify.notify_one();
        }
        true
    }
}

/// Hands what `items` receives to `on_item` with the hub, and the count of
/// items lost by falling behind to `on_lag`, on `runtime`, until the sender
/// or the hub is gone.
fn follow<T: Clone + Send + 'static>(
    runtime: &tokio::runtime::Handle,
    hub: &Arc<Hub>,
    mut items: tokio::sync::broadcast::Receiver<T>,
    on_item: impl Fn(&Hub, T) + Send + 'static,
    on_lag: impl Fn(&Hub, u64) + Send + 'static,
) {
    use tokio::sync::broadcast::error::RecvError;
    let weak = Arc::downgrade(hub);
    runtime.spawn(async move {
        loop {
            let item = items.recv().await;
            let Some(hub) = weak.upgrade() else { return };
            match item {
                Ok(item) => on_item(&hub, item),
                Err(RecvError::Lagged(lost)) => on_lag(&hub, lost),
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// Pushes the engine's changes to the connections that asked for the
/// documents, from a thread of its own (the subscription is a blocking
/// queue). Ends once the hub is dropped.
fn spawn_change_feed(hub: &Arc<Hub>) {
    let subscription = match hub.engine.subscribe("") {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "automerge-repo endpoint cannot follow changes");
            return;
        }
    };
    let weak: Weak<Hub> = Arc::downgrade(hub);
    let spawned = std::thread::Builder::new()
        .name("causeway-repo-feed".into())
        .spawn(move || {
            let mut dropped = 0;
            loop {
                let event = subscription.recv_timeout(Duration::from_millis(200));
                let Some(hub) = weak.upgrade() else { return };
                let now_dropped = subscription.dropped();
                if now_dropped != dropped {
                    dropped = now_dropped;
                    hub.changed_all();
                }
                if let Some(event) = event {
                    hub.changed(&event.doc);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "automerge-repo endpoint cannot follow changes");
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
