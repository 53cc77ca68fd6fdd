//! One automerge-repo client connection: the handshake, one Automerge sync
//! session per document the client asked for, run through the engine's
//! validated apply path, pushes of every later change, `doc-unavailable`
//! after asking the cluster, ephemeral relay and keep-alive pings.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use causeway_engine::audit::Actor;
use causeway_engine::{DocId, Engine, Error as EngineError, SyncMessage, SyncState};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::document_id;
use super::hub::{lock, Hub, Link};
use super::wire::{PeerMetadata, RepoMessage, PROTOCOL_V1};
use crate::access::grant::Level;
use crate::access::Caller;
use crate::network::ephemeral::{EphemeralRelay, MAX_EPHEMERAL_DATA_BYTES};

/// How long a client has after connecting to send `join`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The least time a request for a document this node lacks waits before
/// `doc-unavailable`, even when every peer asked said at once that it lacks
/// it too: a client that just created the document elsewhere may still be
/// sending it to its node (at most `missing_document_wait`).
pub const MISSING_DOCUMENT_GRACE: Duration = Duration::from_millis(250);

/// Ephemeral messages one connection may send per second; more are dropped
/// (counted in `ephemeral_dropped`), so one client cannot flood every node
/// of the cluster. automerge-repo's presence sends one per 15 s per
/// document, plus one per local state change.
pub const MAX_EPHEMERAL_PER_SEC: u32 = 100;

/// One document's sync with this client.
struct DocSession {
    sync: SyncState,
    /// While the cluster is asked for a document this node lacks: when to
    /// give up and answer `doc-unavailable`, and the fetch slot held.
    waiting: Option<(Instant, OwnedSemaphorePermit)>,
    /// When the cluster was last asked for it.
    asked_at: Option<Instant>,
}

/// What to do after handling something.
enum Flow {
    Continue,
    Close,
}

/// A client connection after its `join`.
struct Connection {
    hub: Arc<Hub>,
    socket: WebSocket,
    /// Who connected: a document it may not read is unavailable to it, and
    /// its messages carrying changes to a document it may not write are
    /// dropped. Checked live: once its token stops working, the connection
    /// closes.
    caller: Caller,
    id: u64,
    link: Arc<Link>,
    /// The client's peer id.
    peer: String,
    docs: HashMap<DocId, DocSession>,
    last_pong: Instant,
    /// Ephemeral messages the client sent in the current second.
    ephemeral_rate: WindowRate,
}

/// At most `max` events per one-second window.
struct WindowRate {
    start: Instant,
    count: u32,
    max: u32,
}

impl WindowRate {
    fn new(max: u32, now: Instant) -> WindowRate {
        WindowRate {
            start: now,
            count: 0,
            max,
        }
    }

    /// Counts an event at `now`; whether it is within the rate.
    fn admit(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.start) >= Duration::from_secs(1) {
            self.start = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count <= self.max
    }
}

/// Serves one upgraded connection until it closes, the client is replaced
/// by a newer connection with the same peer id, or `closing` turns true.
/// `slot` is the connection's place under `max_connections`.
pub async fn serve(
    hub: Arc<Hub>,
    mut socket: WebSocket,
    caller: Caller,
    slot: OwnedSemaphorePermit,
    mut closing: watch::Receiver<bool>,
) {
    hub.stats.open.fetch_add(1, Ordering::Relaxed);
    hub.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let joined = tokio::select! {
        joined = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&hub, &mut socket)) => joined,
        () = until_closing(&mut closing) => Ok(None),
    };
    if let Ok(Some(peer)) = joined {
        let (id, link) = hub.register(&peer);
        let mut conn = Connection {
            hub: Arc::clone(&hub),
            socket,
            caller,
            id,
            link,
            peer,
            docs: HashMap::new(),
            last_pong: Instant::now(),
            ephemeral_rate: WindowRate::new(MAX_EPHEMERAL_PER_SEC, Instant::now()),
        };
        conn.run(&mut closing).await;
        let docs: Vec<DocId> = conn.docs.keys().cloned().collect();
        hub.unregister(conn.id, &conn.peer, docs.into_iter());
    }
    hub.stats.open.fetch_sub(1, Ordering::Relaxed);
    drop(slot);
}

/// Reads the client's `join` and answers `peer`; returns the client's peer
/// id, or `None` if the connection is to close (after an `error` message
/// where the client deserves one).
async fn handshake(hub: &Hub, socket: &mut WebSocket) -> Option<String> {
    let frame = loop {
        match socket.recv().await? {
            Ok(Message::Binary(bytes)) => break bytes,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(_) | Err(_) => return None,
        }
    };
    let (sender, versions) = match RepoMessage::decode(&frame) {
        Ok(RepoMessage::Join {
            sender, versions, ..
        }) => (sender, versions),
        Ok(other) => {
            let kind = other.kind().to_string();
            refuse(hub, socket, &format!("expected a join message, got {kind}")).await;
            return None;
        }
        Err(e) => {
            refuse(hub, socket, &format!("malformed message: {e}")).await;
            return None;
        }
    };
    // A client that lists no versions speaks version 1, as automerge-repo's
    // own server assumes.
    if versions.is_some_and(|v| !v.iter().any(|v| v == PROTOCOL_V1)) {
        refuse(hub, socket, "unsupported protocol version").await;
        return None;
    }
    let peer = RepoMessage::Peer {
        sender: hub.peer_id.clone(),
        target: sender.clone(),
        metadata: PeerMetadata {
            storage_id: Some(hub.storage_id.clone()),
            is_ephemeral: false,
        },
        version: PROTOCOL_V1.into(),
    };
    socket
        .send(Message::Binary(peer.encode().into()))
        .await
        .ok()?;
    Some(sender)
}

/// Sends `error` and closes: the client broke the protocol.
async fn refuse(hub: &Hub, socket: &mut WebSocket, message: &str) {
    hub.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    debug!(reason = message, "automerge-repo connection refused");
    let error = RepoMessage::Error {
        message: message.to_string(),
    };
    let _ = socket.send(Message::Binary(error.encode().into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: close_code::PROTOCOL,
            reason: "protocol error".into(),
        })))
        .await;
}

impl Connection {
    async fn run(&mut self, closing: &mut watch::Receiver<bool>) {
        let interval = self.hub.config.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        let link = Arc::clone(&self.link);
        loop {
            let wake_at = self.next_wait();
            let flow = tokio::select! {
                frame = self.socket.recv() => match frame {
                    Some(Ok(Message::Binary(bytes))) => self.on_frame(&bytes).await,
                    Some(Ok(Message::Pong(_))) => {
                        self.last_pong = Instant::now();
                        Flow::Continue
                    }
                    Some(Ok(Message::Ping(_))) => Flow::Continue,
                    Some(Ok(Message::Text(_))) => {
                        self.fail("text frames are not part of the protocol; send binary CBOR").await
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => Flow::Close,
                },
                () = link.notify.notified() => self.on_notice().await,
                _ = ping.tick() => self.on_ping().await,
                () = sleep_until(wake_at) => self.on_waits_due().await,
                () = link.replaced.notified() => {
                    debug!(peer = %self.peer, "automerge-repo connection replaced by a newer one");
                    Flow::Close
                }
                () = until_closing(closing) => Flow::Close,
            };
            if matches!(flow, Flow::Close) {
                let _ = self.socket.send(Message::Close(None)).await;
                return;
            }
        }
    }

    /// The earliest time a missing document's wait ends, if any.
    fn next_wait(&self) -> Option<Instant> {
        self.docs
            .values()
            .filter_map(|d| d.waiting.as_ref().map(|(at, _)| *at))
            .min()
    }

    async fn on_ping(&mut self) -> Flow {
        let interval = self.hub.config.ping_interval;
        if self.last_pong.elapsed() > 2 * interval {
            self.hub.stats.ping_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!(peer = %self.peer, "automerge-repo client stopped answering pings");
            return Flow::Close;
        }
        self.send_raw(Message::Ping(Default::default())).await
    }

    async fn on_frame(&mut self, frame: &[u8]) -> Flow {
        if let Err(e) = self.caller.require_valid() {
            return self.fail(&e.to_string()).await;
        }
        let message = match RepoMessage::decode(frame) {
            Ok(m) => m,
            Err(e) => return self.fail(&format!("malformed message: {e}")).await,
        };
        if let Some(sender) = message.sender() {
            if sender != self.peer {
                let reason = format!(
                    "senderId {sender:?} is not the peer that joined ({:?})",
                    self.peer
                );
                return self.fail(&reason).await;
            }
        }
        match message {
            RepoMessage::Sync {
                request,
                document,
                data,
                ..
            } => self.on_sync(request, &document, &data).await,
            RepoMessage::Ephemeral {
                sender,
                document,
                session,
                count,
                data,
                ..
            } => {
                self.on_ephemeral(sender, &document, session, count, data)
                    .await
            }
            // The client lacks a document: nothing to do, it asks again
            // once it has it.
            RepoMessage::DocUnavailable { .. } | RepoMessage::Ignored { .. } => Flow::Continue,
            RepoMessage::Leave => Flow::Close,
            RepoMessage::Error { message } => {
                debug!(peer = %self.peer, %message, "automerge-repo client reported an error");
                Flow::Close
            }
            RepoMessage::Join { .. } | RepoMessage::Peer { .. } => {
                self.fail("a second handshake on one connection").await
            }
        }
    }

    async fn on_sync(&mut self, request: bool, document: &str, data: &[u8]) -> Flow {
        self.hub.stats.sync_received.fetch_add(1, Ordering::Relaxed);
        let Ok(doc) = document_id::parse(document) else {
            self.hub
                .stats
                .documents_refused
                .fetch_add(1, Ordering::Relaxed);
            return self.unavailable(document).await;
        };
        if !self.caller.allows(Level::Read, &doc) {
            // As if it did not exist: the caller learns nothing of it.
            self.hub
                .stats
                .documents_refused
                .fetch_add(1, Ordering::Relaxed);
            return self.unavailable(document).await;
        }
        let message = match SyncMessage::decode(data) {
            Ok(m) => m,
            Err(e) => {
                let reason = format!("data for {document} is not an Automerge sync message: {e}");
                return self.fail(&reason).await;
            }
        };
        if !self.docs.contains_key(&doc) {
            if self.docs.len() >= self.hub.config.max_documents_per_connection {
                self.hub
                    .stats
                    .documents_refused
                    .fetch_add(1, Ordering::Relaxed);
                return self.unavailable(document).await;
            }
            self.hub.subscribe(self.id, &doc);
            self.docs.insert(
                doc.clone(),
                DocSession {
                    sync: SyncState::new(),
                    waiting: None,
                    asked_at: None,
                },
            );
        }
        if !message.changes.is_empty() && !self.caller.allows(Level::Write, &doc) {
            self.hub
                .stats
                .read_only_refused
                .fetch_add(1, Ordering::Relaxed);
            return Flow::Continue;
        }
        // The client has nothing of it either: a request in all but name.
        let client_lacks = request || message.heads.is_empty();
        self.exchange(&doc, Some(message), client_lacks).await
    }

    /// Runs one step of `doc`'s sync through the engine: takes the client's
    /// message, if any, and sends what the node has to say. A document this
    /// node lacks, asked for by a client that lacks it too, is asked of the
    /// cluster first (see [`Connection::await_cluster`]).
    async fn exchange(
        &mut self,
        doc: &DocId,
        message: Option<SyncMessage>,
        client_lacks: bool,
    ) -> Flow {
        let Some(session) = self.docs.get_mut(doc) else {
            return Flow::Continue;
        };
        let sync = std::mem::take(&mut session.sync);
        let engine = self
            .hub
            .engine
            .acting_as(Actor::Client(self.caller.label()));
        let budget = self.hub.config.max_sync_change_bytes;
        let doc_owned = doc.clone();
        let step =
            tokio::task::spawn_blocking(move || step(&engine, &doc_owned, sync, message, budget))
                .await;
        let Ok(step) = step else {
            warn!(%doc, "an automerge-repo sync step failed");
            return Flow::Close;
        };
        let Some(session) = self.docs.get_mut(doc) else {
            return Flow::Continue;
        };
        session.sync = step.sync;
        match step.outcome {
            Err(e) if concerns_document_only(&e) => {
                // The client's changes were refused, or the document is
                // quarantined: start this document's sync over, so the next
                // exchange does not build on what failed.
                self.hub.stats.sync_refused.fetch_add(1, Ordering::Relaxed);
                warn!(peer = %self.peer, %doc, error = %e, "automerge-repo sync step refused; the document's sync starts over");
                session.sync = SyncState::new();
                return Flow::Continue;
            }
            Err(e) => {
                warn!(%doc, error = %e, "automerge-repo sync failed on this node");
                return Flow::Close;
            }
            Ok(()) => {}
        }
        if !step.exists {
            if client_lacks || session.waiting.is_some() {
                return self.await_cluster(doc).await;
            }
            // The client has the document and this node does not: the reply
            // asks for all of it (an import).
        } else {
            // Arrived while the cluster was asked: the wait is over.
            session.waiting = None;
        }
        match step.reply {
            Some(reply) => {
                self.hub.stats.sync_sent.fetch_add(1, Ordering::Relaxed);
                self.send(RepoMessage::Sync {
                    request: false,
                    sender: self.hub.peer_id.clone(),
                    target: self.peer.clone(),
                    document: doc.to_string(),
                    data: reply.encode(),
                })
                .await
            }
            None => Flow::Continue,
        }
    }

    /// A client wants `doc`, which this node lacks: asks the cluster, once,
    /// and answers `doc-unavailable` when the wait ends without it (or at
    /// once, with no peer to ask). The request is remembered: if the
    /// document arrives later, it is pushed.
    async fn await_cluster(&mut self, doc: &DocId) -> Flow {
        let already = self.docs.get(doc).is_some_and(|s| s.waiting.is_some());
        if already {
            return Flow::Continue;
        }
        let permit = Arc::clone(&self.hub.fetch_slots).try_acquire_owned().ok();
        let asked = match (&self.hub.node, &permit) {
            (Some(node), Some(_)) => node.fetch(doc.clone()).await.unwrap_or(0),
            _ => 0,
        };
        match (asked, permit) {
            (1.., Some(permit)) => {
                self.hub.stats.fetches.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                let until = now + self.hub.config.missing_document_wait;
                if let Some(session) = self.docs.get_mut(doc) {
                    session.waiting = Some((until, permit));
                    session.asked_at = Some(now);
                }
                Flow::Continue
            }
            _ => self.unavailable(doc.as_str()).await,
        }
    }

    /// Waits for missing documents that ran out: each is looked at again,
    /// and answered with what the node has now or `doc-unavailable`.
    async fn on_waits_due(&mut self) -> Flow {
        let now = Instant::now();
        let due: Vec<DocId> = self
            .docs
            .iter()
            .filter(|(_, s)| s.waiting.as_ref().is_some_and(|(at, _)| *at <= now))
            .map(|(d, _)| d.clone())
            .collect();
        for doc in due {
            let engine = self.hub.engine.clone();
            let id = doc.clone();
            let exists = tokio::task::spawn_blocking(move || has_history(&engine, &id))
                .await
                .unwrap_or(false);
            if let Some(session) = self.docs.get_mut(&doc) {
                session.waiting = None;
            }
            let flow = if exists {
                self.exchange(&doc, None, false).await
            } else {
                self.unavailable(doc.as_str()).await
            };
            if matches!(flow, Flow::Close) {
                return flow;
            }
        }
        Flow::Continue
    }

    /// Documents changed, ephemeral messages arrived, or no peer has a
    /// document being waited for: send what is due.
    async fn on_notice(&mut self) -> Flow {
        let missed = std::mem::take(&mut *lock(&self.link.missed));
        if !missed.is_empty() {
            // Every peer asked lacks it: answer once the grace is over
            // (never later than the deadline already set).
            let now = Instant::now();
            let grace = MISSING_DOCUMENT_GRACE.min(self.hub.config.missing_document_wait);
            for doc in &missed {
                let Some(session) = self.docs.get_mut(doc) else {
                    continue;
                };
                let earliest = session.asked_at.map_or(now, |asked| asked + grace);
                if let Some((at, _)) = session.waiting.as_mut() {
                    *at = (*at).min(earliest.max(now));
                }
            }
            if let Flow::Close = self.on_waits_due().await {
                return Flow::Close;
            }
        }
        let dirty = std::mem::take(&mut *lock(&self.link.dirty));
        for doc in dirty {
            if let Flow::Close = self.exchange(&doc, None, false).await {
                return Flow::Close;
            }
        }
        let relays: Vec<Arc<EphemeralRelay>> = lock(&self.link.ephemeral).drain(..).collect();
        for relay in relays {
            self.hub
                .stats
                .ephemeral_delivered
                .fetch_add(1, Ordering::Relaxed);
            let message = RepoMessage::Ephemeral {
                sender: relay.sender.clone(),
                target: self.peer.clone(),
                document: relay.doc.to_string(),
                session: relay.session.clone(),
                count: relay.count,
                data: relay.data.clone(),
            };
            if let Flow::Close = self.send(message).await {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    async fn on_ephemeral(
        &mut self,
        sender: String,
        document: &str,
        session: String,
        count: u64,
        data: Vec<u8>,
    ) -> Flow {
        let within_rate = self.ephemeral_rate.admit(Instant::now());
        let doc = match document_id::parse(document) {
            Ok(doc)
                if data.len() <= MAX_EPHEMERAL_DATA_BYTES
                    && within_rate
                    && self.caller.allows(Level::Read, &doc) =>
            {
                doc
            }
            _ => {
                self.hub
                    .stats
                    .ephemeral_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return Flow::Continue;
            }
        };
        let relay = Arc::new(EphemeralRelay {
            doc,
            sender,
            session,
            count,
            data,
        });
        if self.hub.relay_ephemeral(Some(self.id), Arc::clone(&relay)) {
            if let Some(node) = &self.hub.node {
                // Fails only when the node stops, and then this connection
                // closes too.
                let _ = node.publish_ephemeral((*relay).clone()).await;
            }
        }
        Flow::Continue
    }

    async fn unavailable(&mut self, document: &str) -> Flow {
        self.hub
            .stats
            .unavailable_sent
            .fetch_add(1, Ordering::Relaxed);
        self.send(RepoMessage::DocUnavailable {
            sender: self.hub.peer_id.clone(),
            target: self.peer.clone(),
            document: document.to_string(),
        })
        .await
    }

    async fn send(&mut self, message: RepoMessage) -> Flow {
        self.send_raw(Message::Binary(message.encode().into()))
            .await
    }

    async fn send_raw(&mut self, message: Message) -> Flow {
        match self.socket.send(message).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }

    /// Sends `error` and closes: the client broke the protocol.
    async fn fail(&mut self, message: &str) -> Flow {
        warn!(peer = %self.peer, reason = message, "automerge-repo client broke the protocol");
        refuse(&self.hub, &mut self.socket, message).await;
        Flow::Close
    }
}

/// What one sync step did.
struct Step {
    sync: SyncState,
    outcome: Result<(), EngineError>,
    reply: Option<SyncMessage>,
    /// Whether this node holds the document (it has history).
    exists: bool,
}

/// Takes the client's message (if any) for `doc` and generates the answer,
/// on a blocking thread: the engine's calls may read from disk and fsync.
fn step(
    engine: &Engine,
    doc: &DocId,
    mut sync: SyncState,
    message: Option<SyncMessage>,
    budget: usize,
) -> Step {
    let received = match message {
        Some(m) => engine
            .receive_client_sync_message(doc, &mut sync, m)
            .map(|_| ()),
        None => Ok(()),
    };
    if let Err(e) = received {
        return Step {
            sync,
            outcome: Err(e),
            reply: None,
            exists: false,
        };
    }
    let exists = has_history(engine, doc);
    match engine.generate_sync_message(doc, &mut sync, budget) {
        Ok(reply) => Step {
            sync,
            outcome: Ok(()),
            reply,
            exists,
        },
        Err(e) => Step {
            sync,
            outcome: Err(e),
            reply: None,
            exists,
        },
    }
}

/// Whether this node holds `doc` (with history; deleted documents too).
fn has_history(engine: &Engine, doc: &DocId) -> bool {
    engine.heads(doc).is_ok_and(|h| !h.is_empty())
}

/// Engine errors about what the client sent or about this one document
/// (quarantined), or writes the node refuses for now (draining, low disk
/// space; the client keeps its changes and offers them again): not about
/// the node failing, so the connection goes on.
fn concerns_document_only(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::InvalidChange { .. }
            | EngineError::ChangeTooLarge { .. }
            | EngineError::WrongDocument { .. }
            | EngineError::ChangeRejected { .. }
            | EngineError::ShapeLimit { .. }
            | EngineError::InvalidSyncMessage { .. }
            | EngineError::HeldLimit { .. }
            | EngineError::Quarantined { .. }
            | EngineError::Draining
            | EngineError::LowDisk
    )
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves once `closing` is true (or its sender is gone).
async fn until_closing(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ephemeral_rate_allows_its_maximum_per_second() {
        let start = Instant::now();
        let mut rate = WindowRate::new(3, start);
        let admitted = (0..5).filter(|_| rate.admit(start)).count();
        assert_eq!(admitted, 3);
        let later = start + Duration::from_millis(999);
        assert!(!rate.admit(later), "still the same second");
        let next = start + Duration::from_secs(1);
        assert!((0..3).all(|_| rate.admit(next)));
        assert!(!rate.admit(next));
    }
}
