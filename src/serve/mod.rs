//! The network edge towards clients: the accept loop over an already-bound listener that
//! hands each connection to the serving thread with the fewest, the connection limit, the
//! listener's guards, and a graceful drain when shutdown begins.
//!
//! Owns: [`run_sites`], the one way credproxy serves (the binary and the embedded library
//! alike), [`Site`] (what a listener serves, replaced on reload), [`ServeOptions`] and
//! [`ThreadHooks`], and [`guard`] (exact Host names, no foreign Origin, local credential).
//!
//! Each serving thread runs an event loop of its own (a single-threaded tokio runtime) with
//! its own upstream connections: a request is read, forwarded, answered and logged on one
//! thread, with no hand-off between threads, as nginx's workers run. On 2 cores shared with
//! the client and the upstream this carries about 25 % more small requests than one
//! work-stealing runtime with as many threads (bench/README.md).

pub mod guard;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;
use http::header;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::guard::{Guards, Refusal};
use crate::credentials::Secret;
use crate::proxy::{Lane, Proxy};

/// How long no client must be connected before the heap's free pages go back to the system:
/// long enough that a client opening one connection per request never pays for it, short
/// enough that an idle proxy is back at its idle size a moment after a burst.
const TRIM_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Limits and timeouts for client connections, and who may use the listener.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long a client may take to send a request's headers (also bounds idle keep-alive).
    pub header_read_timeout: Duration,
    /// The largest request head accepted, in bytes.
    pub max_header_bytes: usize,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// How long in-flight requests may run on after shutdown begins.
    pub drain_timeout: Duration,
    /// Serving threads, each an event loop with its own upstream connections.
    pub threads: usize,
    /// What runs on the serving threads as they start and go idle.
    pub hooks: ThreadHooks,
}

/// Code the embedding program runs on each serving thread: the binary writes the log lines a
/// thread collected when it goes idle; an app installs its log dispatcher at the start.
#[derive(Clone, Default)]
pub struct ThreadHooks {
    /// Run on each serving thread when it starts.
    pub on_start: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Run each time a serving thread runs out of work.
    pub on_park: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Run on each serving thread when it ends.
    pub on_stop: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for ThreadHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadHooks")
            .field("on_start", &self.on_start.is_some())
            .field("on_park", &self.on_park.is_some())
            .field("on_stop", &self.on_stop.is_some())
            .finish()
    }
}

/// What a listener serves: a profile's proxy and who may use it. A reload replaces it whole
/// (see [`run_sites`]).
#[derive(Clone)]
pub struct Site {
    /// The profile's proxy.
    pub proxy: Proxy,
    /// Host names served besides the listener's loopback names (`name` or `name:port`).
    pub allow_hosts: Vec<String>,
    /// The local credential clients must present, when local auth is on.
    pub local_token: Option<Secret>,
}

impl Site {
    /// `proxy` for clients that name the listener by its loopback names, no local credential.
    pub fn new(proxy: Proxy) -> Self {
        Self {
            proxy,
            allow_hosts: Vec::new(),
            local_token: None,
        }
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_connections: 1024,
            drain_timeout: Duration::from_secs(30),
            threads: 1,
            hooks: ThreadHooks::default(),
        }
    }
}

/// What every connection of one listener shares, whatever site it serves.
struct Listener {
    builder: http1::Builder,
    max_connections: usize,
    slots: Arc<Semaphore>,
    /// Told when the last client connection closes.
    idle: Notify,
    drain_timeout: Duration,
}

impl Listener {
    fn connected(&self) -> usize {
        self.max_connections - self.slots.available_permits()
    }
}

/// The site a connection serves: its proxy and guards, and the signal that retires it.
struct Active {
    proxy: Proxy,
    guards: Guards,
    /// Fired when shutdown begins or a reload replaces this site: its connections finish
    /// the request in flight and close, and clients reconnect to the new one.
    retired: CancellationToken,
}

impl Active {
    fn new(site: &Site, addr: Option<std::net::SocketAddr>, stop: &CancellationToken) -> Self {
        let guards = match addr {
            Some(addr) => Guards::for_listener(addr, &site.allow_hosts, site.local_token.as_ref()),
            // Without a known address, no Host can be matched: refuse everything rather than guess.
            None => Guards::refuse_all(),
        };
        Self {
            proxy: site.proxy.clone(),
            guards,
            retired: stop.child_token(),
        }
    }
}

/// A listener's site that never changes.
pub fn fixed(site: Site) -> watch::Receiver<Site> {
    watch::channel(site).1
}

/// Serves `site` on `listener` until `shutdown` resolves (see [`run_sites`]).
pub async fn run(
    listener: TcpListener,
    site: Site,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    run_sites(listener, fixed(site), options, shutdown).await;
}

/// Serves the latest site of `sites` on `listener` until `shutdown` resolves, then stops
/// accepting (the port closes), lets requests in flight finish for at most `drain_timeout`,
/// and returns. A new site (a reload) serves new connections at once; connections of the
/// old one finish their request in flight and close.
///
/// The accept loop runs on the calling runtime and hands each connection to the serving
/// thread (`options.threads` of them, started here) that serves the fewest. Every request
/// first passes the site's [`Guards`]: the listener's exact `Host` names, no foreign
/// `Origin`, and the local credential when one is set.
pub async fn run_sites(
    listener: TcpListener,
    mut sites: watch::Receiver<Site>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let addr = listener.local_addr().ok();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192));
    let max_connections = options.max_connections.max(1);
    let shared = Arc::new(Listener {
        builder,
        max_connections,
        slots: Arc::new(Semaphore::new(max_connections)),
        idle: Notify::new(),
        drain_timeout: options.drain_timeout,
    });
    let threads = match start_threads(&shared, &options) {
        Ok(threads) => threads,
        Err(err) => {
            tracing::error!("cannot start the serving threads: {err}");
            return;
        }
    };
    let stop = CancellationToken::new();
    let accepting = async {
        let mut active = Arc::new(Active::new(&sites.borrow_and_update(), addr, &stop));
        let mut reloads = true;
        loop {
            let stream = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                changed = sites.changed(), if reloads => {
                    match changed {
                        Ok(()) => {
                            let next = Active::new(&sites.borrow_and_update(), addr, &stop);
                            std::mem::replace(&mut active, Arc::new(next)).retired.cancel();
                        }
                        // Nobody can send a new site any more.
                        Err(_) => reloads = false,
                    }
                    continue;
                }
                (stream, _peer) = accept_or_pause(|| listener.accept()) => stream,
            };
            let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
                tokio::spawn(refuse_busy(stream));
                continue;
            };
            hand_out(&threads, stream, permit, &active);
        }
        // New clients are refused while the others drain, not left waiting.
        drop(listener);
    };
    let stopping = async {
        shutdown.await;
        stop.cancel();
        let open = shared.connected();
        if open > 0 {
            tracing::info!(
                "draining {open} connection(s) for up to {:?}",
                options.drain_timeout
            );
        }
    };
    tokio::select! {
        _ = async { tokio::join!(stopping, accepting) } => {}
        () = trim_when_idle(&shared) => {}
    }
    // Without a queue to wait on, each thread drains its connections and ends.
    let finished: Vec<_> = threads.into_iter().map(|t| t.finished).collect();
    for done in finished {
        let _ = done.await;
    }
}

/// Hands a connection to the serving thread that serves the fewest.
///
/// The threads do not take connections from the listener themselves: whichever woke first
/// would take a burst of them (64 clients connecting at once went 40/24 between two threads),
/// and the busier thread then holds the others back.
fn hand_out(
    threads: &[Thread],
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    site: &Arc<Active>,
) {
    let Some(thread) = threads
        .iter()
        .min_by_key(|t| t.load.load(Ordering::Relaxed))
    else {
        return;
    };
    match stream.into_std() {
        Ok(stream) => {
            thread.load.fetch_add(1, Ordering::Relaxed);
            // A thread that has ended drops the connection (and its permit).
            let _ = thread.queue.send(Accepted {
                stream,
                permit,
                stopped: site.retired.child_token(),
                site: site.clone(),
            });
        }
        Err(err) => tracing::warn!("cannot hand over a connection: {err}"),
    }
}

/// The way to one serving thread: its queue of new connections and how many it serves.
struct Thread {
    queue: mpsc::UnboundedSender<Accepted>,
    load: Arc<AtomicUsize>,
    /// Resolves (with an error) when the thread has ended.
    finished: oneshot::Receiver<()>,
}

/// A connection handed to a serving thread.
struct Accepted {
    stream: std::net::TcpStream,
    /// Its place under the connection limit.
    permit: OwnedSemaphorePermit,
    site: Arc<Active>,
    /// Fires at shutdown or when the site is replaced.
    stopped: CancellationToken,
}

/// Starts the serving threads of one listener.
fn start_threads(shared: &Arc<Listener>, options: &ServeOptions) -> std::io::Result<Vec<Thread>> {
    let count = options.threads.max(1);
    let mut threads = Vec::with_capacity(count);
    for index in 0..count {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        if let Some(on_park) = options.hooks.on_park.clone() {
            builder.on_thread_park(move || on_park());
        }
        let runtime = builder.build()?;
        let (queue, connections) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(0));
        let (done, finished) = oneshot::channel::<()>();
        let (shared, thread_load, hooks) = (shared.clone(), load.clone(), options.hooks.clone());
        std::thread::Builder::new()
            .name(format!("credproxy-{index}"))
            .spawn(move || {
                if let Some(on_start) = &hooks.on_start {
                    on_start();
                }
                runtime.block_on(serve_thread(connections, shared, thread_load, count));
                // Connections still open after the drain are closed with the runtime.
                drop(runtime);
                if let Some(on_stop) = &hooks.on_stop {
                    on_stop();
                }
                drop(done);
            })?;
        threads.push(Thread {
            queue,
            load,
            finished,
        });
    }
    Ok(threads)
}

/// One serving thread: serves the connections handed to it until the accept loop goes, then
/// waits at most `drain_timeout` for them to finish.
async fn serve_thread(
    mut connections: mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Listener>,
    load: Arc<AtomicUsize>,
    threads: usize,
) {
    let tracker = TaskTracker::new();
    // This thread's shard of the site it last served: upstream connections of its own.
    let mut shard: Option<(Arc<Active>, Proxy)> = None;
    while let Some(accepted) = connections.recv().await {
        let Accepted {
            stream,
            permit,
            site,
            stopped,
        } = accepted;
        // Counted off this thread when the connection ends, however it ends.
        let unload = Unload(load.clone());
        let proxy = match &shard {
            Some((served, proxy)) if Arc::ptr_eq(served, &site) => proxy.clone(),
            _ => {
                let proxy = site.proxy.shard(threads);
                shard = Some((site.clone(), proxy.clone()));
                proxy
            }
        };
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!("cannot serve a connection: {err}");
                continue;
            }
        };
        let connection = serve_connection(stream, permit, shared.clone(), site, proxy, stopped);
        tracker.spawn(async move {
            connection.await;
            drop(unload);
        });
    }
    tracker.close();
    if tokio::time::timeout(shared.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    }
}

/// Takes one connection off a thread's load when dropped.
struct Unload(Arc<AtomicUsize>);

impl Drop for Unload {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long an accept loop waits after a failed accept (out of file descriptors, say)
/// before it tries again: retrying at once would spin on the error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// The next accepted connection (whatever `accept` yields); a failed accept is logged and
/// retried after [`ACCEPT_PAUSE`]. Every accept loop (the proxy's, the admin listener's)
/// goes through here.
pub async fn accept_or_pause<T, F: Future<Output = std::io::Result<T>>>(
    mut accept: impl FnMut() -> F,
) -> T {
    loop {
        match accept().await {
            Ok(accepted) => return accepted,
            Err(err) => {
                tracing::warn!("accept failed: {err}; trying again shortly");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

/// Returns freed heap pages to the system each time no client has been connected for
/// [`TRIM_AFTER_IDLE`]; never returns.
async fn trim_when_idle(shared: &Listener) {
    loop {
        shared.idle.notified().await;
        tokio::time::sleep(TRIM_AFTER_IDLE).await;
        if shared.connected() == 0 {
            crate::memory::trim();
        }
    }
}

/// What the requests of one client connection share: one reference-counted clone each.
struct Client {
    site: Arc<Active>,
    /// The serving thread's shard of the site's proxy.
    proxy: Proxy,
    lane: Lane,
}

/// Serves one client connection until it closes, or until `stop` fires (shutdown, or its
/// site was replaced) and its request in flight has been answered.
async fn serve_connection(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    shared: Arc<Listener>,
    site: Arc<Active>,
    proxy: Proxy,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let client = Arc::new(Client {
        // This connection's upstream connection, driven on this task beside it.
        lane: proxy.lane(),
        proxy,
        site,
    });
    let service = {
        let client = client.clone();
        service_fn(move |req| {
            let client = client.clone();
            async move {
                let proxy = &client.proxy;
                let response = match client.site.guards.check(req.headers()) {
                    Ok(()) => proxy.handle(req, &client.lane).await,
                    Err(refusal) => refuse(proxy, &req, &refusal),
                };
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = shared
        .builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let served = async {
        tokio::pin!(conn);
        tokio::select! {
            biased;
            result = conn.as_mut() => result,
            () = stop.cancelled() => {
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
    if shared.connected() == 0 {
        shared.idle.notify_one();
    }
}

/// The answer to a request the guards refused; nothing is forwarded.
fn refuse<B>(
    proxy: &Proxy,
    req: &http::Request<B>,
    refusal: &Refusal,
) -> http::Response<crate::proxy::body::ResponseBody> {
    let mut response = proxy.refuse(req, refusal.status(), refusal.code(), refusal.message());
    if *refusal == Refusal::LocalAuth {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"credproxy\", charset=\"UTF-8\""),
        );
    }
    response
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Scheme;
    use crate::proxy::ProxySettings;

    fn proxy_for(server: &str) -> Proxy {
        let profile = crate::config::Profile {
            name: "serve-test".to_owned(),
            server: crate::config::ServerUrl::parse(server).unwrap(),
            username: "svc".to_owned(),
            auth: Scheme::Basic,
            listen: crate::config::DEFAULT_LISTEN,
            ca_cert: None,
            pins: Vec::new(),
            local_auth: false,
            allow_hosts: Vec::new(),
            client_cert: None,
        };
        let settings = ProxySettings::for_profile(&profile, "credproxy login".into()).unwrap();
        Proxy::with_secret(settings, &Scheme::Basic, &Secret::new("pw".into())).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_accept_is_retried_after_a_pause_not_in_a_spin() {
        let mut failures = 3;
        let mut attempts = 0;
        let start = tokio::time::Instant::now();
        let accepted = accept_or_pause(|| {
            attempts += 1;
            let result = if failures > 0 {
                failures -= 1;
                Err(std::io::Error::from_raw_os_error(24)) // EMFILE
            } else {
                Ok("connection")
            };
            std::future::ready(result)
        })
        .await;
        assert_eq!(accepted, "connection");
        assert_eq!(attempts, 4);
        assert_eq!(start.elapsed(), ACCEPT_PAUSE * 3);
    }

    #[tokio::test]
    async fn connections_go_to_the_thread_serving_fewest() {
        use tokio::io::AsyncReadExt;
        let options = ServeOptions {
            threads: 3,
            ..ServeOptions::default()
        };
        let shared = Arc::new(Listener {
            builder: http1::Builder::new(),
            max_connections: 16,
            slots: Arc::new(Semaphore::new(16)),
            idle: Notify::new(),
            drain_timeout: Duration::from_secs(5),
        });
        let threads = start_threads(&shared, &options).unwrap();
        let stop = CancellationToken::new();
        let site = Arc::new(Active::new(
            &Site::new(proxy_for("https://immich.invalid")),
            None,
            &stop,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for count in 1..=7 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let permit = shared.slots.clone().try_acquire_owned().unwrap();
            hand_out(&threads, stream, permit, &site);
            // An answer means a thread has taken the connection (and keeps it open).
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: elsewhere.example\r\n\r\n")
                .await
                .unwrap();
            let mut head = [0u8; 12];
            client.read_exact(&mut head).await.unwrap();
            assert!(head.starts_with(b"HTTP/1.1 4"), "{head:?}");
            clients.push(client);
            let mut loads: Vec<usize> = threads
                .iter()
                .map(|t| t.load.load(Ordering::Relaxed))
                .collect();
            loads.sort_unstable();
            assert_eq!(loads.iter().sum::<usize>(), count);
            assert!(
                loads[2] - loads[0] <= 1,
                "{loads:?} after {count} connections"
            );
        }
        drop(clients);
        stop.cancel();
        let finished: Vec<_> = threads.into_iter().map(|t| t.finished).collect();
        for done in finished {
            let _ = done.await;
        }
    }

    #[tokio::test]
    async fn new_clients_are_refused_while_requests_drain() {
        // An upstream that takes the connection and never answers keeps a request in flight.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = proxy_for(&format!(
            "https://127.0.0.1:{}",
            silent.local_addr().unwrap().port()
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = ServeOptions {
            drain_timeout: Duration::from_secs(20),
            ..ServeOptions::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(run(listener, Site::new(proxy), options, async {
            let _ = stopped.await;
        }));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(format!("GET /api/server/ping HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (upstream, _) = silent.accept().await.unwrap();
        stop.send(()).unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            while TcpStream::connect(addr).await.is_ok() {
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

    #[tokio::test]
    async fn a_refused_local_credential_asks_for_basic_auth() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let site = Site {
            local_token: Some(Secret::new("tok-123".into())),
            ..Site::new(proxy_for("https://immich.invalid"))
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(run(listener, site, ServeOptions::default(), async {
            let _ = stopped.await;
        }));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(
                format!("GET / HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(
            answer.contains("www-authenticate: Basic realm=\"credproxy\""),
            "{answer}"
        );
        stop.send(()).unwrap();
        running.await.unwrap();
    }
}
