//! The accept loop: takes a bound listener and a shutdown future, serves until it resolves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

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
    let stop = Stop::default();
    let stopper = async {
        shutdown.await;
        stop.fire();
        common.log_drain();
    };
    tokio::join!(
        stopper,
        accept_loop(listener, proxy, common.clone(), stop.clone(), false)
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
    let stop = Stop::default();
    let mut finished = Vec::new();
    let threads = threads.max(1);
    for index in 0..threads {
        let listener = listener.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Log lines collected while busy are written when the thread goes idle.
            .on_thread_park(crate::logging::flush_thread)
            .build()?;
        let (proxy, common, stop) = (proxy.shard(threads), common.clone(), stop.clone());
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

/// Accept loops started by [`start_threads`]; dropping it stops them too.
pub struct Threads {
    stop: Stop,
    finished: Vec<tokio::sync::oneshot::Receiver<()>>,
    common: Arc<Common>,
}

impl Threads {
    /// Serves until `shutdown` resolves, then drains (at most `drain_timeout`) and returns
    /// when every thread has finished.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.stop.fire();
        self.common.log_drain();
        for done in std::mem::take(&mut self.finished) {
            let _ = done.await;
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.fire();
    }
}

/// What the requests of one client connection share: one reference-counted clone each.
struct Client {
    proxy: Proxy,
    common: Arc<Common>,
    lane: Lane,
}

/// Accepts and serves connections until `stop` fires, then waits at most `drain_timeout`
/// for this loop's connections to finish.
async fn accept_loop(
    listener: TcpListener,
    proxy: Proxy,
    common: Arc<Common>,
    stop: Stop,
    shared_listener: bool,
) {
    let mut stopped = std::pin::pin!(stop.wait());
    // Every connection task holds a clone; when all are gone the receiver sees it.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (stream, _peer) = tokio::select! {
            () = stopped.as_mut() => break,
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
        let stopped = stop.wait();
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
                    biased;
                    result = conn.as_mut() => result,
                    () = stopped => {
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

/// The signal that stops accept loops and tells connections to finish their request and close.
///
/// Every connection waits on it, and the per-connection wait is polled each time the
/// connection's task wakes (a few times per request): a wait that has registered its task
/// costs one atomic load per poll; registering and leaving take a lock, once per connection.
#[derive(Clone, Default)]
struct Stop(Arc<StopInner>);

#[derive(Default)]
struct StopInner {
    fired: AtomicBool,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    next: u64,
    wakers: HashMap<u64, Waker>,
}

impl Stop {
    /// Fires the signal: every wait, present and future, resolves.
    fn fire(&self) {
        self.0.fired.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut lock(&self.0.waiting).wakers);
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    /// A future that resolves once the signal has fired.
    fn wait(&self) -> Stopped {
        Stopped {
            stop: self.0.clone(),
            registered: None,
        }
    }
}

/// A wait for [`Stop`]; see [`Stop::wait`].
struct Stopped {
    stop: Arc<StopInner>,
    /// The key and waker this wait registered, if any.
    registered: Option<(u64, Waker)>,
}

impl Future for Stopped {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.stop.fired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if !matches!(&this.registered, Some((_, waker)) if waker.will_wake(cx.waker())) {
            let mut waiting = lock(&this.stop.waiting);
            let key = match &this.registered {
                Some((key, _)) => *key,
                None => {
                    waiting.next += 1;
                    waiting.next
                }
            };
            waiting.wakers.insert(key, cx.waker().clone());
            this.registered = Some((key, cx.waker().clone()));
            drop(waiting);
            // `fire` sets the flag before it takes the wakers: a fire that took them before
            // this one was added has set the flag by now.
            if this.stop.fired.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some((key, _)) = self.registered.take() {
            lock(&self.stop.waiting).wakers.remove(&key);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The critical sections only insert and remove wakers: a panic cannot leave them torn.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(wait: &mut Stopped, waker: &Waker) -> Poll<()> {
        Pin::new(wait).poll(&mut Context::from_waker(waker))
    }

    fn registered(stop: &Stop) -> usize {
        lock(&stop.0.waiting).wakers.len()
    }

    #[test]
    fn stop_wakes_every_waiting_task_once_and_resolves_later_waits() {
        let stop = Stop::default();
        let (first, second) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
        let mut a = stop.wait();
        let mut b = stop.wait();
        assert!(poll(&mut a, &first_waker).is_pending());
        // Polled again by the same task: nothing new is registered.
        assert!(poll(&mut a, &first_waker).is_pending());
        assert!(poll(&mut b, &first_waker).is_pending());
        // Polled by another task: that one is woken instead.
        assert!(poll(&mut b, &second_waker).is_pending());
        assert_eq!(registered(&stop), 2);

        stop.fire();
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(poll(&mut a, &first_waker).is_ready());
        assert!(poll(&mut b, &second_waker).is_ready());
        assert!(poll(&mut stop.wait(), &first_waker).is_ready());
        assert_eq!(registered(&stop), 0);
    }

    #[test]
    fn a_dropped_wait_leaves_nothing_behind() {
        let stop = Stop::default();
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        for _ in 0..3 {
            let mut wait = stop.wait();
            assert!(poll(&mut wait, &waker).is_pending());
        }
        assert_eq!(registered(&stop), 0);
        stop.fire();
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
    }
}
