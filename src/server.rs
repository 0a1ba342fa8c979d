//! The accept loop: takes a bound listener and a shutdown future, serves until it resolves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

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
    /// When set, the program's code pages are unmapped ([`crate::memory::shed_code`]) once
    /// no client has been connected for this long: for the `credproxy` binary, not for a
    /// library inside someone else's program.
    pub shed_code_when_idle: Option<Duration>,
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
            shed_code_when_idle: None,
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
    /// Told when the last client connection closes.
    idle: tokio::sync::Notify,
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
            idle: tokio::sync::Notify::new(),
        })
    }

    fn in_flight(&self) -> usize {
        self.options.max_connections - self.slots.available_permits()
    }

    /// Sheds code pages each time no client has been connected for the configured while;
    /// never returns (waits forever when shedding is off).
    async fn shed_when_idle(&self) {
        let Some(after) = self.options.shed_code_when_idle else {
            return std::future::pending().await;
        };
        loop {
            self.idle.notified().await;
            tokio::time::sleep(after).await;
            if self.in_flight() == 0 {
                let shed = crate::memory::shed_code();
                tracing::trace!("idle: unmapped {} KiB of code", shed / 1024);
            }
        }
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
    let (done_tx, done_rx) = mpsc::channel::<()>(1);
    let serve = async {
        accept(&listener, &common, &stop, |stream, permit| {
            tokio::spawn(serve_connection(
                stream,
                permit,
                &proxy,
                &common,
                &stop,
                done_tx.clone(),
            ));
        })
        .await;
        drop(listener);
        drop(done_tx);
        drain(&common, done_rx).await;
    };
    serve_until(&common, &stop, shutdown, serve).await;
}

/// Runs `serving` (which ends once `stop` has fired and its connections have drained); fires
/// `stop` when `shutdown` resolves, and sheds code while idle if the options ask for it.
async fn serve_until(
    common: &Common,
    stop: &Stop,
    shutdown: impl Future<Output = ()>,
    serving: impl Future<Output = ()>,
) {
    let stopper = async {
        shutdown.await;
        stop.fire();
        common.log_drain();
    };
    tokio::select! {
        () = async { tokio::join!(stopper, serving); } => {}
        () = common.shed_when_idle() => {}
    }
}

/// Starts `threads` server threads for `listener`, each with a single-threaded runtime and
/// its own upstream connection pool ([`Proxy::shard`]); [`Threads::run_until`] accepts
/// connections and hands each to the thread serving the fewest, until its shutdown future
/// resolves (or the handle is dropped).
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
    let stop = Stop::default();
    let mut workers = Vec::new();
    let mut finished = Vec::new();
    let threads = threads.max(1);
    for index in 0..threads {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Log lines collected while busy are written when the thread goes idle.
            .on_thread_park(crate::logging::flush_thread)
            .build()?;
        let (queue, connections) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(0));
        let worker = ServerThread {
            proxy: proxy.shard(threads),
            common: common.clone(),
            stop: stop.clone(),
            load: load.clone(),
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("credproxy-{index}"))
            .spawn(move || {
                crate::logging::batch_thread();
                runtime.block_on(worker.serve(connections));
                // Connections still open after the drain are closed with the runtime.
                drop(runtime);
                drop(done_tx);
            })?;
        workers.push(Queue { queue, load });
        finished.push(done_rx);
    }
    Ok(Threads {
        listener: Some(listener),
        workers,
        stop,
        finished,
        common,
    })
}

/// Server threads started by [`start_threads`]; dropping it stops them too.
pub struct Threads {
    /// Taken by [`Threads::run_until`], closed when accepting stops.
    listener: Option<TcpListener>,
    workers: Vec<Queue>,
    stop: Stop,
    finished: Vec<tokio::sync::oneshot::Receiver<()>>,
    common: Arc<Common>,
}

/// The way to one server thread: its queue of new connections and how many it serves.
struct Queue {
    queue: mpsc::UnboundedSender<Accepted>,
    load: Arc<AtomicUsize>,
}

/// A connection handed to a server thread, with its place under the connection limit.
struct Accepted {
    stream: std::net::TcpStream,
    permit: OwnedSemaphorePermit,
}

impl Threads {
    /// Accepts connections until `shutdown` resolves, handing each to the server thread
    /// serving the fewest; then drains (at most `drain_timeout`) and returns when every
    /// thread has finished.
    ///
    /// The threads do not take connections from the listener themselves: whichever woke
    /// first would take a burst of them (64 clients connecting at once went 40/24 between
    /// two threads), and the busier thread then holds the others back.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) {
        let (listener, workers) = (self.listener.take(), &self.workers);
        let hand_out = async {
            let Some(listener) = listener else { return };
            accept(&listener, &self.common, &self.stop, |stream, permit| {
                let Some(thread) = workers
                    .iter()
                    .min_by_key(|w| w.load.load(Ordering::Relaxed))
                else {
                    return;
                };
                match stream.into_std() {
                    Ok(stream) => {
                        thread.load.fetch_add(1, Ordering::Relaxed);
                        // A thread that has ended drops the connection (and its permit).
                        let _ = thread.queue.send(Accepted { stream, permit });
                    }
                    Err(err) => tracing::warn!("cannot hand over a connection: {err}"),
                }
            })
            .await;
            // New clients are refused while the threads drain, not left waiting.
            drop(listener);
        };
        serve_until(&self.common, &self.stop, shutdown, hand_out).await;
        self.workers.clear();
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

/// One server thread's share: its proxy shard and the connections it serves.
struct ServerThread {
    proxy: Proxy,
    common: Arc<Common>,
    stop: Stop,
    /// Connections this thread serves now (read by the acceptor).
    load: Arc<AtomicUsize>,
}

impl ServerThread {
    /// Serves the connections handed over until `stop` fires or the acceptor goes, then
    /// waits at most `drain_timeout` for them to finish.
    async fn serve(self, mut connections: mpsc::UnboundedReceiver<Accepted>) {
        let (done_tx, done_rx) = mpsc::channel::<()>(1);
        let mut stopped = std::pin::pin!(self.stop.wait());
        loop {
            let accepted = tokio::select! {
                biased;
                () = stopped.as_mut() => break,
                next = connections.recv() => match next {
                    Some(accepted) => accepted,
                    None => break,
                },
            };
            let Accepted { stream, permit } = accepted;
            // Counted off this thread when the connection ends, however it ends.
            let load = Unload(self.load.clone());
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!("cannot serve a connection: {err}");
                    continue;
                }
            };
            let connection = serve_connection(
                stream,
                permit,
                &self.proxy,
                &self.common,
                &self.stop,
                done_tx.clone(),
            );
            tokio::spawn(async move {
                connection.await;
                drop(load);
            });
        }
        drop(connections);
        drop(done_tx);
        drain(&self.common, done_rx).await;
    }
}

/// Takes one connection off a thread's load when dropped.
struct Unload(Arc<AtomicUsize>);

impl Drop for Unload {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the requests of one client connection share: one reference-counted clone each.
struct Client {
    proxy: Proxy,
    common: Arc<Common>,
    lane: Lane,
}

/// Accepts connections until `stop` fires; each one under the connection limit goes to
/// `serve`, the others get a 503.
async fn accept(
    listener: &TcpListener,
    common: &Common,
    stop: &Stop,
    mut serve: impl FnMut(TcpStream, OwnedSemaphorePermit),
) {
    let mut stopped = std::pin::pin!(stop.wait());
    loop {
        let stream = tokio::select! {
            () = stopped.as_mut() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match common.slots.clone().try_acquire_owned() {
            Ok(permit) => serve(stream, permit),
            Err(_) => {
                tokio::spawn(refuse_busy(stream));
            }
        }
    }
}

/// Waits until every connection task has dropped its `done` sender, for at most
/// `drain_timeout`.
async fn drain(common: &Common, mut done: mpsc::Receiver<()>) {
    if tokio::time::timeout(common.options.drain_timeout, done.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    }
}

/// Serves one client connection until it closes, or until `stop` fires and its request in
/// flight has been answered.
fn serve_connection(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    proxy: &Proxy,
    common: &Arc<Common>,
    stop: &Stop,
    done: mpsc::Sender<()>,
) -> impl Future<Output = ()> + Send + 'static {
    let _ = stream.set_nodelay(true);
    let client = Arc::new(Client {
        // This connection's upstream connection, driven on this task beside it.
        lane: proxy.lane(),
        proxy: proxy.clone(),
        common: common.clone(),
    });
    let stopped = stop.wait();
    async move {
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
            client.common.idle.notify_one();
        }
        drop(done);
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

    fn test_settings() -> crate::proxy::ProxySettings {
        crate::proxy::ProxySettings {
            profile: "server-test".to_owned(),
            // Never reached: every request in these tests is refused by the Host guard.
            server: crate::config::ServerUrl::parse("https://immich.invalid").unwrap(),
            username: "svc".to_owned(),
            trust: crate::upstream::TlsTrust::public(),
            client: crate::upstream::ClientOptions::default(),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn connections_go_to_the_thread_serving_fewest() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let proxy = Proxy::new(test_settings(), &Secret::new("pw".into())).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let threads = start_threads(listener, proxy, ServerOptions::default(), 3).unwrap();
        let loads: Vec<_> = threads.workers.iter().map(|w| w.load.clone()).collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(threads.run_until(async {
            let _ = stopped.await;
        }));
        let mut clients = Vec::new();
        for count in 1..=7 {
            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: elsewhere.example\r\n\r\n")
                .await
                .unwrap();
            // An answer means a thread has taken the connection (and keeps it open).
            let mut head = [0u8; 12];
            client.read_exact(&mut head).await.unwrap();
            assert!(head.starts_with(b"HTTP/1.1 4"), "{head:?}");
            clients.push(client);
            let mut now: Vec<usize> = loads.iter().map(|l| l.load(Ordering::Relaxed)).collect();
            now.sort_unstable();
            assert_eq!(now.iter().sum::<usize>(), count);
            assert!(now[2] - now[0] <= 1, "{now:?} after {count} connections");
        }
        drop(clients);
        stop.send(()).unwrap();
        running.await.unwrap();
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn code_is_shed_once_no_client_is_left_and_only_when_asked() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let settings = test_settings();
        for shed_after in [None, Some(Duration::from_millis(1))] {
            let proxy = Proxy::new(settings.clone(), &Secret::new("pw".into())).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let options = ServerOptions {
                shed_code_when_idle: shed_after,
                ..ServerOptions::default()
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let serving = tokio::spawn(run(listener, proxy, options, async {
                let _ = stopped.await;
            }));
            let before = crate::memory::code_sheds();
            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            client
                .write_all(
                    b"GET / HTTP/1.1\r\nhost: elsewhere.example\r\nconnection: close\r\n\r\n",
                )
                .await
                .unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 4"));
            drop(client);
            // The shed follows a timer: wait for it, bounded (a while longer than the 1 ms
            // timer when it is off).
            let limit = Duration::from_millis(if shed_after.is_some() { 5000 } else { 300 });
            let shed = tokio::time::timeout(limit, async {
                while crate::memory::code_sheds() == before {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            assert_eq!(
                shed.is_ok(),
                shed_after.is_some(),
                "shed after {shed_after:?}"
            );
            stop.send(()).unwrap();
            serving.await.unwrap();
        }
    }

    #[tokio::test]
    async fn new_clients_are_refused_while_threads_drain() {
        use tokio::io::AsyncWriteExt;
        // An upstream that takes the connection and never answers keeps a request in flight.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut settings = test_settings();
        settings.server = crate::config::ServerUrl::parse(&format!(
            "https://127.0.0.1:{}",
            silent.local_addr().unwrap().port()
        ))
        .unwrap();
        let proxy = Proxy::new(settings, &Secret::new("pw".into())).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = ServerOptions {
            drain_timeout: Duration::from_secs(20),
            ..ServerOptions::default()
        };
        let threads = start_threads(listener, proxy, options, 2).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(threads.run_until(async {
            let _ = stopped.await;
        }));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(format!("GET /api/server/ping HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (upstream, _) = silent.accept().await.unwrap();
        stop.send(()).unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            while tokio::net::TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(refused.is_ok(), "the listener stayed open during the drain");
        assert!(
            !running.is_finished(),
            "the in-flight request was not waited for"
        );
        // The upstream goes away: the request is answered and the drain ends.
        drop(upstream);
        tokio::time::timeout(Duration::from_secs(15), running)
            .await
            .expect("the drain ends once the request is answered")
            .unwrap();
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
