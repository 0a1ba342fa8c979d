//! The accept loop: takes a bound listener and a shutdown future, serves until it resolves.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::credentials::Secret;
use crate::guard::Guards;
use crate::pool::Lane;
use crate::proxy::Proxy;

/// Limits and timeouts for client connections.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How long a client may take to send a request's headers (also bounds idle keep-alive).
    pub header_read_timeout: Duration,
    /// The largest request head accepted, in bytes.
    pub max_header_bytes: usize,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// How long in-flight requests may run on after shutdown begins.
    pub drain_timeout: Duration,
    /// Host names served besides the listener's loopback names (`name` or `name:port`).
    pub allow_hosts: Vec<String>,
    /// The local credential clients must present, when local auth is on.
    pub local_token: Option<Secret>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_connections: 1024,
            drain_timeout: Duration::from_secs(30),
            allow_hosts: Vec::new(),
            local_token: None,
        }
    }
}

/// What every accept loop of one listener shares: the connection limit, the guards and the
/// HTTP/1 settings.
struct Common {
    options: ServerOptions,
    slots: Arc<Semaphore>,
    builder: http1::Builder,
    guards: Guards,
}

impl Common {
    fn new(listener: &TcpListener, options: ServerOptions) -> Arc<Self> {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(options.max_header_bytes.max(8192));
        let guards = match listener.local_addr() {
            Ok(addr) => {
                Guards::for_listener(addr, &options.allow_hosts, options.local_token.as_ref())
            }
            // Without a known address, no Host can be matched: refuse everything rather than guess.
            Err(_) => Guards::refuse_all(),
        };
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(options.max_connections)),
            options,
            builder,
            guards,
        })
    }

    fn in_flight(&self) -> usize {
        self.options.max_connections - self.slots.available_permits()
    }

    fn log_drain(&self) {
        let in_flight = self.in_flight();
        if in_flight > 0 {
            tracing::info!(
                "draining {in_flight} connection(s) for up to {:?}",
                self.options.drain_timeout
            );
        }
    }
}

/// Serves `proxy` on `listener` until `shutdown` resolves, then drains in-flight requests
/// for at most `drain_timeout`. Every request first passes the listener's [`Guards`]: its
/// exact `Host` names, no foreign `Origin`, and the local credential when one is set.
///
/// Everything runs on the calling runtime; [`start_threads`] spreads the work over threads.
pub async fn run(
    listener: TcpListener,
    proxy: Proxy,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let common = Common::new(&listener, options);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopper = async {
        shutdown.await;
        let _ = stop_tx.send(true);
        common.log_drain();
    };
    tokio::join!(
        stopper,
        accept_loop(listener, proxy, common.clone(), stop_rx, false)
    );
}

/// Starts `threads` accept loops for `listener`, each on its own thread with a
/// single-threaded runtime and its own upstream connection pool ([`Proxy::shard`]); they
/// serve until [`Threads::run_until`]'s shutdown future resolves (or the handle is dropped).
///
/// A request is then read, forwarded, answered and logged on one thread: no hand-off between
/// threads and no work stealing on the per-request path, the way nginx's workers run. The
/// connection limit, guards, credentials, session and statistics are shared.
pub fn start_threads(
    listener: TcpListener,
    proxy: Proxy,
    options: ServerOptions,
    threads: usize,
) -> std::io::Result<Threads> {
    let common = Common::new(&listener, options);
    let listener = listener.into_std()?;
    let (stop, stop_rx) = watch::channel(false);
    let mut finished = Vec::new();
    let threads = threads.max(1);
    for index in 0..threads {
        let listener = listener.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Log lines collected while busy are written when the thread goes idle.
            .on_thread_park(crate::logging::flush_thread)
            .build()?;
        let (proxy, common, stop) = (proxy.shard(threads), common.clone(), stop_rx.clone());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("credproxy-{index}"))
            .spawn(move || {
                crate::logging::batch_thread();
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => accept_loop(listener, proxy, common, stop, true).await,
                        Err(err) => tracing::error!("server thread {index} cannot listen: {err}"),
                    }
                });
                // Connections still open after the drain are closed with the runtime.
                drop(runtime);
                drop(done_tx);
            })?;
        finished.push(done_rx);
    }
    Ok(Threads {
        stop,
        finished,
        common,
    })
}

/// Accept loops started by [`start_threads`].
pub struct Threads {
    stop: watch::Sender<bool>,
    finished: Vec<tokio::sync::oneshot::Receiver<()>>,
    common: Arc<Common>,
}

impl Threads {
    /// Serves until `shutdown` resolves, then drains (at most `drain_timeout`) and returns
    /// when every thread has finished.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        let _ = self.stop.send(true);
        self.common.log_drain();
        for done in self.finished {
            let _ = done.await;
        }
    }
}

/// What the requests of one client connection share: one reference-counted clone each.
struct Client {
    proxy: Proxy,
    common: Arc<Common>,
    lane: Lane,
}

/// Accepts and serves connections until `stop` turns true (or its sender goes), then waits
/// at most `drain_timeout` for this loop's connections to finish.
async fn accept_loop(
    listener: TcpListener,
    proxy: Proxy,
    common: Arc<Common>,
    mut stop: watch::Receiver<bool>,
    shared_listener: bool,
) {
    // Every connection task holds a clone; when all are gone the receiver sees it.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = common.slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = Arc::new(Client {
            // This connection's upstream connection, driven on this task beside it.
            lane: proxy.lane(),
            proxy: proxy.clone(),
            common: common.clone(),
        });
        let mut stop = stop.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let service = {
                let client = client.clone();
                service_fn(move |req| {
                    let client = client.clone();
                    async move {
                        let response = match client.common.guards.check(req.headers()) {
                            Ok(()) => client.proxy.handle(req, &client.lane).await,
                            Err(refusal) => client.proxy.refuse(&req, &refusal),
                        };
                        Ok::<_, Infallible>(response)
                    }
                })
            };
            let conn = client
                .common
                .builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let served = async {
                tokio::pin!(conn);
                tokio::select! {
                    result = conn.as_mut() => result,
                    _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            };
            if let Err(err) = client.lane.drive(served).await {
                tracing::debug!("client connection ended: {err}");
            }
            client.lane.release();
            drop(permit);
            if client.common.in_flight() == 0 {
                // The last client left: hand the memory a burst of connections used back to
                // the system, so an idle proxy returns to its idle footprint.
                crate::memory::release_free_memory();
            }
            drop(done);
        });
        if shared_listener {
            // Every thread is woken for a new connection; one that takes a whole burst of
            // them at once leaves the others idle. Stepping back after each one lets the
            // other threads take their share.
            tokio::task::yield_now().await;
        }
    }
    drop(listener);
    drop(done_tx);
    if tokio::time::timeout(common.options.drain_timeout, done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    }
}

/// Answers a connection beyond the limit with a short 503 and closes it.
async fn refuse_busy(mut stream: TcpStream) {
    tracing::warn!("connection limit reached; refusing a client connection");
    let _ = stream
        .write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 46\r\n\r\ncredproxy: too many connections, retry later\n",
        )
        .await;
    let _ = stream.shutdown().await;
}
