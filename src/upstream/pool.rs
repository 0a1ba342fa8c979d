//! Upstream HTTP/1.1 connections, driven on the task of the client connection that uses them.
//!
//! A client connection borrows one upstream connection (its [`Lane`]) while it stays open and
//! polls it from its own task, beside the client side ([`Lane::drive`]): a request is read,
//! forwarded, answered and streamed back without handing anything to another task or thread.
//! When the client leaves, a healthy upstream connection goes back to the [`Pool`] for the
//! next client; idle ones there are closed after the idle timeout.
//!
//! A request that an upstream connection did not take (it had closed while idle, as servers
//! do with keep-alive connections) is sent again on another one; a request that was written
//! is never sent twice.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;

use super::{CertificateRequest, Connector, Failure};
use crate::sync::lock;

/// The error type of the bodies and connections of the upstream client.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a request body sent upstream must be (the proxy sends the client's body, wrapped).
pub trait UpstreamBody:
    hyper::body::Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static
{
}

impl<B> UpstreamBody for B where
    B: hyper::body::Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static
{
}

type Sender<B> = http1::SendRequest<B>;
/// A connection's driver: reads and writes until the connection closes or is upgraded.
type Conn = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// Why a request did not get an answer from the upstream.
#[derive(Debug)]
pub struct SendError {
    error: BoxError,
    /// What the handshake of the connection saw, when it was made for this request.
    certificate: Option<CertificateRequest>,
}

impl SendError {
    /// A failure of `error`, on a connection whose handshake saw `certificate` (when it was
    /// made for this request; `None` for a reused one).
    pub fn new(error: impl Into<BoxError>, certificate: Option<CertificateRequest>) -> Self {
        Self {
            error: error.into(),
            certificate,
        }
    }

    /// What went wrong, named (see [`super::describe_failure`]).
    pub fn failure(&self) -> Failure {
        super::describe_failure(&*self.error, self.certificate)
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

/// Idle upstream connections of one proxy, ready for reuse.
pub struct Pool<B> {
    inner: Arc<PoolInner<B>>,
}

struct PoolInner<B> {
    connector: Connector,
    origin: Uri,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<IdleSet<B>>,
}

/// The idle connections, oldest first, and whether a reaper is watching them.
struct IdleSet<B> {
    conns: VecDeque<Idle<B>>,
    /// A reaper task runs while (and only while) there are idle connections.
    reaping: bool,
}

struct Idle<B> {
    sender: Sender<B>,
    conn: Conn,
    since: Instant,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// A pool that may be gone (its serving thread ended): for counting, not for use.
pub struct WeakPool<B>(Weak<PoolInner<B>>);

impl<B> WeakPool<B> {
    /// How many idle connections the pool holds now (none once it is gone).
    pub fn idle_count(&self) -> usize {
        self.0
            .upgrade()
            .map_or(0, |pool| lock(&pool.idle).conns.len())
    }

    /// Whether the pool still exists.
    pub fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl<B: UpstreamBody> Pool<B> {
    /// A handle that does not keep the pool alive.
    pub fn downgrade(&self) -> WeakPool<B> {
        WeakPool(Arc::downgrade(&self.inner))
    }

    /// A pool of connections to `origin` (`https://host:port`) made with `connector`; at most
    /// `max_idle` idle connections are kept, each for at most `idle_timeout`.
    pub fn new(connector: Connector, origin: Uri, idle_timeout: Duration, max_idle: usize) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                connector,
                origin,
                idle_timeout,
                max_idle,
                idle: Mutex::new(IdleSet {
                    conns: VecDeque::new(),
                    reaping: false,
                }),
            }),
        }
    }

    /// A lane for one client connection; nothing is connected until the first request.
    pub fn lane(&self) -> Lane<B> {
        Lane {
            pool: self.inner.clone(),
            slot: Mutex::new(Slot::default()),
        }
    }

    /// How many idle connections the pool holds now.
    pub fn idle_count(&self) -> usize {
        lock(&self.inner.idle).conns.len()
    }
}

impl<B: UpstreamBody> PoolInner<B> {
    /// The most recently used idle connection that is still open, if any.
    fn take_idle(&self) -> Option<(Sender<B>, Conn)> {
        loop {
            let mut idle = lock(&self.idle).conns.pop_back()?;
            if idle.since.elapsed() >= self.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            // One poll lets the connection notice a close that arrived while it was parked
            // (the server's keep-alive timeout): then it finishes here instead of failing the
            // request. Its next poll, from the lane, registers the real waker.
            let mut cx = Context::from_waker(Waker::noop());
            if idle.conn.as_mut().poll(&mut cx).is_ready() {
                continue;
            }
            return Some((idle.sender, idle.conn));
        }
    }

    /// Opens a new connection (TCP, TLS) and starts HTTP/1.1 on it; says what its handshake
    /// saw of client authentication.
    async fn connect(&self) -> Result<(Sender<B>, Conn, CertificateRequest), SendError> {
        let (io, certificate) = self
            .connector
            .connect(self.origin.clone())
            .await
            .map_err(|(err, certificate)| SendError::new(err, Some(certificate)))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|err| SendError::new(err, Some(certificate)))?;
        Ok((sender, Box::pin(conn.with_upgrades()), certificate))
    }

    fn park(self: &Arc<Self>, sender: Sender<B>, conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        let mut idle = lock(&self.idle);
        idle.conns.push_back(Idle {
            sender,
            conn,
            since: Instant::now(),
        });
        while idle.conns.len() > self.max_idle {
            idle.conns.pop_front();
        }
        if !idle.reaping
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            idle.reaping = true;
            runtime.spawn(reap(Arc::downgrade(self)));
        }
    }
}

/// Closes idle connections once they have been idle for the timeout; ends when none is
/// left (the next one parked starts another), or at its next deadline once the pool is gone.
async fn reap<B: UpstreamBody>(pool: Weak<PoolInner<B>>) {
    loop {
        let deadline = {
            let Some(pool) = pool.upgrade() else { return };
            let now = Instant::now();
            let mut idle = lock(&pool.idle);
            while idle
                .conns
                .front()
                .is_some_and(|i| i.since + pool.idle_timeout <= now)
            {
                idle.conns.pop_front();
            }
            match idle.conns.front() {
                Some(oldest) => oldest.since + pool.idle_timeout,
                None => {
                    idle.reaping = false;
                    drop(idle);
                    // Nothing idle is left: give the connections' buffers back to the system.
                    crate::memory::trim();
                    return;
                }
            }
        };
        tokio::time::sleep_until(deadline).await;
    }
}

/// The upstream connection of one client connection.
pub struct Lane<B> {
    pool: Arc<PoolInner<B>>,
    slot: Mutex<Slot<B>>,
}

struct Slot<B> {
    /// The connection's sender while no request is in flight on it.
    sender: Option<Sender<B>>,
    /// The connection being driven; `None` before the first request and after it closed.
    conn: Option<Conn>,
    /// The client connection's task, woken when a new connection needs its first poll.
    waker: Option<Waker>,
}

impl<B> Default for Slot<B> {
    fn default() -> Self {
        Self {
            sender: None,
            conn: None,
            waker: None,
        }
    }
}

impl<B: UpstreamBody> Lane<B> {
    /// Sends `req` upstream (its URI absolute or origin-form; sent in origin-form) and waits
    /// for the response head. The connection must be driven by [`Lane::drive`] meanwhile.
    pub async fn send(&self, req: Request<B>) -> Result<Response<Incoming>, SendError> {
        let mut req = origin_form(req);
        loop {
            // A fresh connection's handshake record, for naming a failure of its first request.
            let (mut sender, fresh) = match self.take_sender() {
                Some(sender) => (sender, None),
                None => match self.pool.take_idle() {
                    Some((sender, conn)) => (self.install(sender, conn), None),
                    None => {
                        // Boxed: a rare path that would otherwise make every request's
                        // future (moved a few times per request) larger.
                        let (sender, conn, certificate) = Box::pin(self.pool.connect()).await?;
                        (self.install(sender, conn), Some(certificate))
                    }
                },
            };
            if let Err(err) = sender.ready().await {
                self.close();
                if fresh.is_none() {
                    continue;
                }
                return Err(SendError::new(err, fresh));
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let mut slot = lock(&self.slot);
                    if slot.conn.is_some() {
                        slot.sender = Some(sender);
                    }
                    return Ok(response);
                }
                Err(mut err) => {
                    self.close();
                    match err.take_message() {
                        // Not written: the connection had closed. Another one gets it.
                        Some(back) if fresh.is_none() => req = back,
                        _ => return Err(SendError::new(err.into_error(), fresh)),
                    }
                }
            }
        }
    }

    /// Runs `served` (the client side of the connection) while driving the upstream
    /// connection, both on the calling task; returns `served`'s output.
    pub async fn drive<F: Future>(&self, served: F) -> F::Output {
        let mut served = std::pin::pin!(served);
        std::future::poll_fn(|cx| {
            // Upstream first (an answer that arrived goes straight to the client side), then
            // the client side, then upstream again (a request it just handed over is written
            // in the same pass).
            self.poll_conn(cx);
            if let Poll::Ready(out) = served.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            self.poll_conn(cx);
            Poll::Pending
        })
        .await
    }

    /// Returns a healthy, idle upstream connection to the pool (the client has left).
    pub fn release(&self) {
        let slot = std::mem::take(&mut *lock(&self.slot));
        if let (Some(sender), Some(mut conn)) = (slot.sender, slot.conn) {
            // Lets it finish a last read (the end of a body) before it is judged.
            let mut cx = Context::from_waker(Waker::noop());
            if conn.as_mut().poll(&mut cx).is_pending() && sender.is_ready() {
                self.pool.park(sender, conn);
            }
        }
    }

    fn take_sender(&self) -> Option<Sender<B>> {
        let mut slot = lock(&self.slot);
        if slot.conn.is_none() {
            slot.sender = None;
        }
        slot.sender.take()
    }

    fn install(&self, sender: Sender<B>, conn: Conn) -> Sender<B> {
        let mut slot = lock(&self.slot);
        slot.conn = Some(conn);
        slot.sender = None;
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
        sender
    }

    fn close(&self) {
        let mut slot = lock(&self.slot);
        slot.conn = None;
        slot.sender = None;
    }

    fn poll_conn(&self, cx: &mut Context<'_>) {
        let mut slot = lock(&self.slot);
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
        if let Some(conn) = slot.conn.as_mut()
            && let Poll::Ready(result) = conn.as_mut().poll(cx)
        {
            // Closed by the server, failed, or handed over to an upgrade (a websocket).
            if let Err(err) = result {
                tracing::debug!("upstream connection ended: {err}");
            }
            slot.conn = None;
            slot.sender = None;
        }
    }
}

/// The request with its target in origin-form (`/path?query`), as HTTP/1.1 sends it to an
/// origin server.
fn origin_form<B>(mut req: Request<B>) -> Request<B> {
    let uri = req.uri_mut();
    if uri.scheme().is_some() || uri.authority().is_some() {
        let path_and_query = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *uri = Uri::from(path_and_query);
    }
    req
}

/// The origin URI (`https://authority/`) connections are made to.
pub fn origin(authority: &http::uri::Authority) -> Uri {
    Uri::builder()
        .scheme(Scheme::HTTPS)
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .expect("an authority and a static path make a URI")
}
