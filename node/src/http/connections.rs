//! Accepting HTTP connections: how many are open, how long one may sit
//! without a request, and how they end at shutdown.
//!
//! Every connection is tracked with the number of requests in progress on
//! it (a request counts from its complete headers until its response body
//! ends, so an open watch stream is busy). A connection that has had no
//! request in progress for [`HttpConfig::idle_timeout`] (one that never sent
//! complete headers, sends them a byte at a time, or idles between
//! keep-alive requests) is closed. At [`HttpConfig::max_connections`] the
//! connection idle longest is closed to make room; when every connection is
//! busy, new ones wait in the kernel's listen backlog.
//!
//! At shutdown the listener closes, idle connections close at once, busy
//! ones finish their request (watch streams end by themselves, see
//! [`super::watch`]) for up to [`SHUTDOWN_GRACE`], and the rest are dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::{debug, warn};

use super::HttpConfig;

/// How long shutdown waits for requests in progress before dropping their
/// connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after a failed accept (such as running
/// out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long the accept loop waits for an evicted connection to free its slot
/// before evicting another.
const EVICTION_WAIT: Duration = Duration::from_millis(50);

/// Figures of the connection tracker, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections closed because they idled past the idle timeout.
    pub idle_closed: AtomicU64,
    /// Connections closed to make room at the connection limit.
    pub evicted: AtomicU64,
    /// Connections whose TLS handshake failed or stalled.
    pub tls_failed: AtomicU64,
}

/// One open connection.
struct Conn {
    /// Requests in progress.
    active: AtomicUsize,
    /// When the last request ended (or the connection opened).
    idle_since: Mutex<Instant>,
    /// Set once the connection was asked to close.
    closing: AtomicBool,
    close: Notify,
}

impl Conn {
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(now.saturating_duration_since(since))
    }

    fn ask_to_close(&self) -> bool {
        if self.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.close.notify_one();
        true
    }
}

/// Marks a request in progress on its connection until dropped.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: &Arc<Conn>) -> Busy {
        conn.active.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(conn))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self
            .0
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    stats: Arc<ConnectionStats>,
}

impl Registry {
    fn insert(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        });
        self.lock().insert(id, Arc::clone(&conn));
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        (id, conn)
    }

    fn remove(&self, id: u64) {
        if self.lock().remove(&id).is_some() {
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks every connection idle for longer than `timeout` to close.
    fn close_idle(&self, timeout: Duration) {
        let now = Instant::now();
        for conn in self.lock().values() {
            if conn.idle_for(now).is_some_and(|idle| idle >= timeout) && conn.ask_to_close() {
                self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Asks the connection idle longest to close; false if none is idle.
    fn evict_one(&self) -> bool {
        let now = Instant::now();
        let conns = self.lock();
        let oldest = conns
            .values()
            .filter(|c| !c.closing.load(Ordering::Acquire))
            .filter_map(|c| c.idle_for(now).map(|idle| (idle, c)))
            .max_by_key(|(idle, _)| *idle);
        match oldest {
            Some((_, conn)) => {
                conn.ask_to_close();
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` with the connection limits of `config`
/// until `closing` turns true, then shuts down as the module says. `stats`
/// receives the connection figures.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    tls: Option<TlsAcceptor>,
    stats: Arc<ConnectionStats>,
    mut closing: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let registry = Arc::new(Registry {
        stats,
        ..Registry::default()
    });
    let idle_timeout = config.idle_timeout;
    let sweeper = tokio::spawn({
        let registry = Arc::clone(&registry);
        async move {
            let mut tick = tokio::time::interval((idle_timeout / 4).min(Duration::from_secs(1)));
            loop {
                tick.tick().await;
                registry.close_idle(idle_timeout);
            }
        }
    });
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener, &slots, &registry) => accepted,
            () = until_closing(&mut closing) => break,
        };
        let (stream, addr, permit) = accepted;
        let (id, conn) = registry.insert();
        let registry = Arc::clone(&registry);
        let router = router.clone();
        let closing = closing.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match tls {
                None => serve_connection(stream, addr, router, &conn, idle_timeout, closing).await,
                // The handshake counts as idle time: a client that stalls in
                // it is closed like one that stalls before its headers.
                Some(tls) => {
                    let handshake = tokio::time::timeout(idle_timeout, tls.accept(stream)).await;
                    match handshake.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
                        Ok(stream) => {
                            serve_connection(stream, addr, router, &conn, idle_timeout, closing)
                                .await
                        }
                        Err(e) => {
                            registry.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                            debug!(%addr, error = %e, "TLS handshake failed");
                        }
                    }
                }
            }
            registry.remove(id);
            drop(permit);
        });
    }
    // Each connection task sees `closing` too: idle ones close at once,
    // busy ones after their request.
    drop(listener);
    let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(all))
        .await
        .is_err()
    {
        warn!(
            open = registry.stats.open.load(Ordering::Relaxed),
            "HTTP connections still busy after the shutdown grace; dropping them"
        );
    }
    sweeper.abort();
    Ok(())
}

/// The next connection, once a slot is free (evicting the connection idle
/// longest when none is).
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    registry: &Registry,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    let permit = loop {
        if let Ok(permit) = Arc::clone(slots).try_acquire_owned() {
            break permit;
        }
        registry.evict_one();
        if let Ok(Ok(permit)) =
            tokio::time::timeout(EVICTION_WAIT, Arc::clone(slots).acquire_owned()).await
        {
            break permit;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => return (stream, addr, permit),
            Err(e) => {
                warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Resolves once `closing` is true (or its sender is gone).
pub(crate) async fn until_closing(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

async fn serve_connection<S>(
    stream: S,
    addr: SocketAddr,
    router: Router,
    conn: &Arc<Conn>,
    header_timeout: Duration,
    mut closing: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tracked = Arc::clone(conn);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let busy = Busy::new(&tracked);
        req.extensions_mut().insert(ConnectInfo(addr));
        let router = router.clone();
        async move {
            let Ok(response) = router.oneshot(req.map(Body::new)).await;
            // The request stays in progress until its body is sent.
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &busy;
                    frame
                }))
            }))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        // The automerge-repo endpoint upgrades to a WebSocket; the upgraded
        // connection then leaves this registry and is served (and limited)
        // by the endpoint.
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = conn.close.notified() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = until_closing(&mut closing) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        debug!(%addr, error = %e, "HTTP connection ended with an error");
    }
}
