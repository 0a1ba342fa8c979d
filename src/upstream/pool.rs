//! Upstream HTTP/1.1 connections, driven on the task of the client connection that uses them.
//!
//! A client connection borrows one upstream connection (its [`Lane`]) while it stays open and
//! polls it from its own task, beside the client side ([`Lane::drive`]): a request is read,
//! forwarded, answered and streamed back without handing anything to another task or thread.
//! When the client leaves, a healthy upstream connection goes back to the [`Pool`] for the
//! next client; idle ones there are closed after the idle timeout by a reaper task that runs
//! only while some are idle.
//!
//! A request that an upstream connection did not take (it had closed while idle, as servers
//! do with keep-alive connections) is sent again on another one; a request that was written
//! is never sent twice.
//!
//! A connection last used before the machine slept is not used again, pooled or in a lane:
//! the laptop may have woken on another network, where it leads nowhere and a request
//! written to it would wait for the silence timeout before failing.
//!
//! Kept over hyper-util's pooled client for its A/B figure (bench/README.md): the same
//! requests/s, about 2 MiB less peak memory and 5–8 % fewer instructions per request.

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
use crate::asleep::Moment;
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

/// A request the upstream did not answer: why, and the request itself when none of it was
/// written (it may then be sent elsewhere; a request that was partly sent never is).
pub struct Unanswered<B> {
    /// What went wrong.
    pub error: SendError,
    /// The request, when not a byte of it went out.
    pub unsent: Option<Request<B>>,
}

impl<B> std::fmt::Debug for Unanswered<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unanswered")
            .field("error", &self.error)
            .field("unsent", &self.unsent.is_some())
            .finish()
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
    /// When it was parked, for noticing a sleep since (`since` stops while asleep).
    parked: Moment,
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
            if idle.since.elapsed() >= self.idle_timeout
                || idle.parked.slept_since()
                || idle.sender.is_closed()
            {
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
            parked: Moment::now(),
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
    /// When the connection last gave an answer, for noticing a sleep since.
    used: Moment,
}

impl<B> Default for Slot<B> {
    fn default() -> Self {
        Self {
            sender: None,
            conn: None,
            waker: None,
            used: Moment::now(),
        }
    }
}

impl<B: UpstreamBody> Lane<B> {
    /// Sends `req` upstream (its URI absolute or origin-form; sent in origin-form) and waits
    /// for the response head. The connection must be driven by [`Lane::drive`] meanwhile.
    pub async fn send(&self, req: Request<B>) -> Result<Response<Incoming>, Unanswered<B>> {
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
                        match Box::pin(self.pool.connect()).await {
                            Ok((sender, conn, certificate)) => {
                                (self.install(sender, conn), Some(certificate))
                            }
                            Err(error) => {
                                return Err(Unanswered {
                                    error,
                                    unsent: Some(req),
                                });
                            }
                        }
                    }
                },
            };
            if let Err(err) = sender.ready().await {
                self.close();
                if fresh.is_none() {
                    continue;
                }
                return Err(Unanswered {
                    error: SendError::new(err, fresh),
                    unsent: Some(req),
                });
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let mut slot = lock(&self.slot);
                    if slot.conn.is_some() {
                        slot.sender = Some(sender);
                        slot.used = Moment::now();
                    }
                    return Ok(response);
                }
                Err(mut err) => {
                    self.close();
                    match err.take_message() {
                        // Not written: the connection had closed. Another one gets it.
                        Some(back) if fresh.is_none() => req = back,
                        unsent => {
                            return Err(Unanswered {
                                error: SendError::new(err.into_error(), fresh),
                                unsent,
                            });
                        }
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
        if slot.conn.is_none() || (slot.sender.is_some() && slot.used.slept_since()) {
            slot.conn = None;
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

// Linux: the scripted upstream reads the TCP state to know its close has arrived.
#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;
    use crate::upstream::{ClientOptions, TlsTrust};

    /// A request body with nothing in it.
    struct NoBody;

    impl hyper::body::Body for NoBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            Poll::Ready(None)
        }

        fn is_end_stream(&self) -> bool {
            true
        }
    }

    /// A TLS server on loopback that a test script runs by hand on a thread of its own:
    /// accepting, reading and answering one step at a time, so the script decides exactly
    /// when a connection closes.
    struct Upstream {
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        /// Requests read, on every connection.
        requests: Arc<AtomicUsize>,
    }

    /// One connection the upstream accepted.
    struct Accepted {
        stream: BufReader<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>,
        requests: Arc<AtomicUsize>,
    }

    /// An upstream and a pool of connections to it, keeping `max_idle` idle connections
    /// for `idle_timeout`.
    fn upstream(idle_timeout: Duration, max_idle: usize) -> (Upstream, Pool<NoBody>) {
        let ca_key = KeyPair::generate().expect("a key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("a CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("a key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("server params")
            .signed_by(&key, &issuer)
            .expect("a server certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("a server configuration");
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let tls = TlsTrust::public()
            .with_ca_pem(ca.pem().as_bytes())
            .expect("the test CA")
            .client_config(&[], None)
            .expect("a client configuration");
        let pool = Pool::new(
            Connector::new(tls, &ClientOptions::default()),
            format!("https://127.0.0.1:{port}/").parse().expect("a URI"),
            idle_timeout,
            max_idle,
        );
        let upstream = Upstream {
            listener,
            config: Arc::new(config),
            requests: Arc::default(),
        };
        (upstream, pool)
    }

    impl Upstream {
        /// Runs `script` on a thread of its own.
        fn serve(self, script: impl FnOnce(Upstream) + Send + 'static) {
            std::thread::spawn(move || script(self));
        }

        /// The next connection.
        fn accept(&self) -> Accepted {
            let (tcp, _) = self.listener.accept().expect("a connection");
            let tls = rustls::ServerConnection::new(self.config.clone()).expect("a TLS server");
            Accepted {
                stream: BufReader::new(rustls::StreamOwned::new(tls, tcp)),
                requests: self.requests.clone(),
            }
        }
    }

    impl Accepted {
        /// The next request's head; `None` when the client closed the connection.
        fn request(&mut self) -> Option<String> {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                match self.stream.read_line(&mut line) {
                    Ok(0) | Err(_) => return None,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => head.push_str(&line),
                }
            }
            self.requests.fetch_add(1, Ordering::SeqCst);
            Some(head)
        }

        /// Answers 200 with `body`, keeping the connection open.
        fn respond(&mut self, body: &str) {
            let stream = self.stream.get_mut();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .expect("the answer is written");
            stream.flush().expect("the answer is sent");
        }

        /// Closes the connection as a server whose keep-alive timeout passed does, and
        /// returns once the client's end has the close (its kernel acknowledged the FIN), so
        /// the client's event loop sees it on its next turn.
        fn close(mut self) {
            let stream = self.stream.get_mut();
            stream.conn.send_close_notify();
            let _ = stream.flush();
            let _ = stream.sock.shutdown(Shutdown::Write);
            for _ in 0..1_000_000 {
                if tcp_state(&stream.sock) != FIN_WAIT1 {
                    return;
                }
                std::thread::yield_now();
            }
            panic!("the client's end never acknowledged the close");
        }
    }

    /// Linux's TCP state after sending a FIN that is not yet acknowledged
    /// (`include/net/tcp_states.h`).
    const FIN_WAIT1: u8 = 4;

    /// The TCP state of `socket` (`TCP_INFO`).
    fn tcp_state(socket: &TcpStream) -> u8 {
        use std::os::fd::AsRawFd;
        // SAFETY: TCP_INFO fills at most `len` bytes of the zeroed struct it is given.
        unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let got = libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            );
            assert_eq!(got, 0, "TCP_INFO");
            info.tcpi_state
        }
    }

    /// A GET of `/` over `lane` (driven by the caller): the answer's body.
    async fn get(lane: &Lane<NoBody>) -> Result<String, SendError> {
        let request = Request::get("https://127.0.0.1/")
            .body(NoBody)
            .expect("a request");
        let response = lane.send(request).await.map_err(|u| u.error)?;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the answer's body")
            .to_bytes();
        Ok(String::from_utf8(body.to_vec()).expect("a text body"))
    }

    /// One GET on a lane of its own, which then goes back to the pool.
    async fn get_once(pool: &Pool<NoBody>) -> String {
        let lane = pool.lane();
        let body = lane.drive(get(&lane)).await.expect("an answer");
        lane.release();
        body
    }

    #[tokio::test]
    async fn a_request_the_lanes_closed_connection_did_not_take_goes_on_a_new_one() {
        let (upstream, pool) = upstream(Duration::from_secs(60), 4);
        let requests = upstream.requests.clone();
        let (close, close_rx) = std::sync::mpsc::channel();
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        upstream.serve(move |upstream| {
            let mut first = upstream.accept();
            first.request().expect("the first request");
            first.respond("first");
            close_rx.recv().expect("the test says when");
            first.close();
            closed_tx.send(()).expect("the test waits");
            let mut second = upstream.accept();
            second.request().expect("the second request");
            second.respond("second");
            // Holds the connection open until the client leaves.
            let _ = second.request();
        });
        let lane = pool.lane();
        let first = lane.drive(get(&lane)).await;
        assert_eq!(first.expect("the first answer"), "first");
        close.send(()).expect("the server waits");
        closed
            .recv()
            .await
            .expect("the server closed the connection");
        // The next request is handed to the lane's connection before the connection is
        // polled again and finds the close: it comes back unwritten.
        let mut second = std::pin::pin!(get(&lane));
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        let second = lane.drive(second).await;
        assert_eq!(second.expect("the second answer"), "second");
        assert_eq!(requests.load(Ordering::SeqCst), 2, "each request sent once");
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_not_handed_out() {
        let (upstream, pool) = upstream(Duration::from_secs(60), 4);
        let (close, close_rx) = std::sync::mpsc::channel();
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        upstream.serve(move |upstream| {
            let mut first = upstream.accept();
            first.request().expect("the first request");
            first.respond("first");
            close_rx.recv().expect("the test says when");
            first.close();
            closed_tx.send(()).expect("the test waits");
            let mut second = upstream.accept();
            second.request().expect("the second request");
            second.respond("second");
            let _ = second.request();
        });
        assert_eq!(get_once(&pool).await, "first");
        assert_eq!(pool.idle_count(), 1);
        close.send(()).expect("the server waits");
        closed
            .recv()
            .await
            .expect("the server closed the connection");
        assert!(
            pool.inner.take_idle().is_none(),
            "a closed connection was handed out"
        );
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(get_once(&pool).await, "second");
    }

    /// Serves "first" on one connection and "second" on a second one, then says whether the
    /// first one was closed by the client.
    fn serve_two_connections(upstream: Upstream) -> tokio::sync::mpsc::UnboundedReceiver<bool> {
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        upstream.serve(move |upstream| {
            let mut first = upstream.accept();
            first.request().expect("the first request");
            first.respond("first");
            let mut second = upstream.accept();
            second.request().expect("the second request");
            second.respond("second");
            let _ = closed_tx.send(first.request().is_none());
            let _ = second.request();
        });
        closed
    }

    #[tokio::test]
    async fn a_connection_parked_before_the_machine_slept_is_not_handed_out() {
        let (upstream, pool) = upstream(Duration::from_secs(60), 4);
        let requests = upstream.requests.clone();
        let mut closed = serve_two_connections(upstream);
        assert_eq!(get_once(&pool).await, "first");
        assert_eq!(pool.idle_count(), 1);
        // The machine sleeps for ten minutes: the monotonic clock (and `since`) stood still.
        for idle in &mut lock(&pool.inner.idle).conns {
            idle.parked = idle.parked.before_sleeping(Duration::from_secs(600));
        }
        // The server answers no second request on the first connection: bounded.
        let second = tokio::time::timeout(Duration::from_secs(10), get_once(&pool)).await;
        assert_eq!(
            second.as_deref(),
            Ok("second"),
            "not sent on a new connection"
        );
        assert_eq!(closed.recv().await, Some(true), "the old one was closed");
        assert_eq!(requests.load(Ordering::SeqCst), 2, "each request sent once");
        assert_eq!(pool.idle_count(), 1, "only the new one is kept");
    }

    #[tokio::test]
    async fn a_lanes_connection_from_before_a_sleep_is_not_used_again() {
        let (upstream, pool) = upstream(Duration::from_secs(60), 4);
        let requests = upstream.requests.clone();
        let mut closed = serve_two_connections(upstream);
        let lane = pool.lane();
        lane.drive(async {
            assert_eq!(get(&lane).await.expect("the first answer"), "first");
            {
                let mut slot = lock(&lane.slot);
                slot.used = slot.used.before_sleeping(Duration::from_secs(600));
            }
            let second = tokio::time::timeout(Duration::from_secs(10), get(&lane)).await;
            let second = second.expect("not sent on a new connection");
            assert_eq!(second.expect("the second answer"), "second");
        })
        .await;
        assert_eq!(closed.recv().await, Some(true), "the old one was closed");
        assert_eq!(requests.load(Ordering::SeqCst), 2, "each request sent once");
    }

    #[tokio::test]
    async fn a_request_that_was_written_is_never_sent_twice() {
        let (upstream, pool) = upstream(Duration::from_secs(60), 4);
        let requests = upstream.requests.clone();
        upstream.serve(move |upstream| {
            let mut first = upstream.accept();
            first.request().expect("the first request");
            first.respond("first");
            // The second request arrives whole; the server goes away without answering.
            first.request().expect("the second request");
            first.close();
            // A second sending would be answered here.
            let mut again = upstream.accept();
            again.request().expect("a request sent again");
            again.respond("sent twice");
            let _ = again.request();
        });
        let lane = pool.lane();
        lane.drive(async {
            assert_eq!(get(&lane).await.expect("the first answer"), "first");
            let second = get(&lane).await;
            assert!(second.is_err(), "{second:?}");
        })
        .await;
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout_and_then_nothing_runs() {
        let timeout = Duration::from_secs(60);
        let (upstream, pool) = upstream(timeout, 4);
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        upstream.serve(move |upstream| {
            for n in 0..2 {
                let mut connection = upstream.accept();
                connection.request().expect("a request");
                connection.respond(&n.to_string());
                // Nothing more comes: the connection ends when the pool closes it.
                if connection.request().is_none() {
                    let _ = closed_tx.send(n);
                }
            }
        });
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let reaped = async |pool: &Pool<NoBody>| {
            // Bounded: the reaper runs on the task's next turns.
            for _ in 0..100 {
                if pool.idle_count() == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            pool.idle_count() == 0
        };
        for n in 0..2 {
            assert_eq!(get_once(&pool).await, n.to_string());
            assert_eq!((pool.idle_count(), tasks()), (1, 1), "one idle, one reaper");
            // Connections are made in real time (their timeouts must not fire); the wait for
            // the reaper is made in paused time.
            tokio::time::pause();
            tokio::time::advance(timeout - Duration::from_secs(1)).await;
            assert!(!reaped(&pool).await, "closed before its idle timeout");
            // Past the timeout by a second: timers fire on whole milliseconds.
            tokio::time::advance(Duration::from_secs(2)).await;
            assert!(reaped(&pool).await, "still open after its idle timeout");
            assert_eq!(closed.recv().await, Some(n), "the server saw the close");
            // While nothing is idle, nothing runs or waits for a timer.
            assert_eq!(tasks(), 0, "the reaper ended");
            tokio::time::resume();
        }
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept_the_newest() {
        let (upstream, pool) = upstream(Duration::from_secs(60), 2);
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        upstream.serve(move |upstream| {
            let mut connections: Vec<Accepted> = (0..3).map(|_| upstream.accept()).collect();
            for (n, connection) in connections.iter_mut().enumerate() {
                connection.request().expect("a request");
                connection.respond(&n.to_string());
            }
            // Whichever the pool closes says so.
            for (n, mut connection) in connections.into_iter().enumerate() {
                let closed_tx = closed_tx.clone();
                std::thread::spawn(move || {
                    if connection.request().is_none() {
                        let _ = closed_tx.send(n);
                    }
                });
            }
        });
        // Three clients at once: three connections.
        let lanes = [pool.lane(), pool.lane(), pool.lane()];
        let answers =
            futures_util::future::join_all(lanes.iter().map(|lane| lane.drive(get(lane)))).await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        for lane in &lanes {
            lane.release();
        }
        assert_eq!(pool.idle_count(), 2);
        // The first one released, the oldest idle connection, is the one closed.
        let first = answers[0].as_ref().expect("an answer").parse::<usize>();
        let dropped = tokio::time::timeout(Duration::from_secs(10), closed.recv()).await;
        assert_eq!(
            dropped,
            Ok(first.ok()),
            "the oldest idle connection is closed"
        );
    }
}
