//! The network edge towards clients: the accept loop over an already-bound listener that
//! hands each connection to the serving thread with the fewest, the connection limit, the
//! listener's guards, and a graceful drain when shutdown begins.
//!
//! Owns: [`run_sites`], the one way credproxy serves (the binary and the embedded library
//! alike), [`Site`] (what a listener serves, replaced on reload), [`ServeOptions`] and
//! [`ThreadHooks`], [`accept_or_pause`] and [`refuse_busy`] (shared with the admin
//! listener), and [`guard`] (exact Host names, no foreign Origin, local credential). The
//! serving threads, the hand-out of connections to them and the serving of one client
//! connection are in `threads`.
//!
//! Each serving thread runs an event loop of its own (a single-threaded tokio runtime) with
//! its own upstream connections: a request is read, forwarded, answered and logged on one
//! thread, with no hand-off between threads, as nginx's workers run. On 2 cores shared with
//! the client and the upstream this carries about 25 % more small requests than one
//! work-stealing runtime with as many threads (bench/README.md).

pub mod guard;
mod threads;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use self::guard::Guards;
use self::threads::{hand_out, start_threads};
use crate::credentials::Secret;
use crate::proxy::Proxy;

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

/// The client connections of one listener, whatever site each serves: how they are served,
/// how many may be open, and how long they may drain.
struct Connections {
    builder: http1::Builder,
    max_connections: usize,
    slots: Arc<Semaphore>,
    /// Told when the last client connection closes.
    idle: Notify,
    drain_timeout: Duration,
}

impl Connections {
    fn connected(&self) -> usize {
        self.max_connections - self.slots.available_permits()
    }
}

/// The site a connection serves, as set up for one listener: its proxy and guards, and the
/// signal that retires it.
struct LiveSite {
    proxy: Proxy,
    guards: Guards,
    /// Fired when shutdown begins or a reload replaces this site: its connections finish
    /// the request in flight and close, and clients reconnect to the new one.
    retired: CancellationToken,
}

impl LiveSite {
    fn new(site: &Site, addr: Option<std::net::SocketAddr>, stop: &CancellationToken) -> Self {
        let guards = match addr {
            Some(addr) => Guards::for_listener(addr, &site.allow_hosts, site.local_token.as_ref()),
            // Without a known address, no Host can be matched: refuse everything rather than guess.
            None => Guards::refuse_all(),
        };
        // A profile with a LAN route finds out at once whether it is at home.
        if let Some(routes) = site.proxy.routes() {
            routes.try_in_background();
        }
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
    let shared = Arc::new(Connections {
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
        let mut active = Arc::new(LiveSite::new(&sites.borrow_and_update(), addr, &stop));
        let mut reloads = true;
        loop {
            let stream = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                changed = sites.changed(), if reloads => {
                    match changed {
                        Ok(()) => {
                            let next = LiveSite::new(&sites.borrow_and_update(), addr, &stop);
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
                tracing::warn!("connection limit reached; refusing a client connection");
                refuse_busy(&stream);
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
        never = crate::memory::trim_when_idle(&shared.idle, || shared.connected()) => match never {},
    }
    // Without a queue to wait on, each thread drains its connections and ends.
    let finished: Vec<_> = threads.into_iter().map(threads::Thread::finished).collect();
    for done in finished {
        let _ = done.await;
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

/// Answers a connection beyond a listener's limit with a short 503, if its socket takes it at
/// once, and closes it (the stream drops): nothing waits on a client that floods the port.
pub fn refuse_busy(stream: &TcpStream) {
    let _ = stream.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 45\r\n\r\ncredproxy: too many connections, retry later\n",
    );
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::credentials::Scheme;
    use crate::proxy::ProxySettings;

    pub(super) fn proxy_for(server: &str) -> Proxy {
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
            lan: None,
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
