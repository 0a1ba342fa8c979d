//! The library's face for other programs (a phone app, a GUI): the proxy on its own small
//! runtime, served by the same [`serve::run`] as the binary, a handle that stops it, totals
//! with the last error, logs to a sink, and the doctor's checks.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

use crate::config;
use crate::credentials::{Scheme, Secret};
use crate::diagnose::check::Checker;
use crate::diagnose::doctor::{self, Step};
use crate::error::{Error, Result};
use crate::ops::health::Standing;
use crate::proxy::live::Reload;
use crate::proxy::route::RouteStatus;
use crate::proxy::{Proxy, ProxySettings};
use crate::serve::guard::LOCAL_USER;
use crate::serve::{self, ServeOptions, Site};
use crate::sync::lock;

/// Receives the log events of an embedded proxy (the host app's logger).
pub trait LogSink: Send + Sync {
    /// Whether events at `level` are wanted; asked before an event is formatted.
    fn enabled(&self, level: Level) -> bool;
    /// Receives one event: its level, target (module) and formatted fields.
    fn log(&self, level: Level, target: &str, message: &str);
}

/// How an embedded proxy runs.
#[derive(Clone)]
pub struct EmbedOptions {
    /// Threads of the runtime that accepts connections and reads credentials (one is plenty).
    pub worker_threads: usize,
    /// Client connection limits, the serving threads (one carries a phone's traffic) and the
    /// drain time `stop` waits for.
    pub server: ServeOptions,
    /// Where log events go, if anywhere.
    pub log: Option<Arc<dyn LogSink>>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            worker_threads: 1,
            server: ServeOptions {
                max_connections: 256,
                // `stop` blocks its caller (an app's UI or service thread) while requests drain.
                drain_timeout: Duration::from_secs(5),
                ..ServeOptions::default()
            },
            log: None,
        }
    }
}

/// Totals of an embedded proxy at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Requests answered, including the proxy's own error answers.
    pub requests: u64,
    /// Body bytes sent from clients to the server.
    pub bytes_up: u64,
    /// Body bytes sent from the server to clients.
    pub bytes_down: u64,
    /// The most recent warning or error the proxy logged, if any.
    pub last_error: Option<String>,
    /// Where the credentials stand with the gate.
    pub credentials: Standing,
    /// For a profile with a LAN route: which route requests take and why, with the totals
    /// of each.
    pub route: Option<RouteStatus>,
}

/// A proxy serving on a loopback port from its own runtime until stopped or dropped.
pub struct Embedded {
    addr: SocketAddr,
    local_token: Option<Secret>,
    sites: tokio::sync::watch::Sender<Site>,
    last_error: Arc<Mutex<Option<String>>>,
    running: Mutex<Option<Running>>,
}

struct Running {
    runtime: Runtime,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Embedded {
    /// Binds `listen` (loopback only; port 0 picks a free one) and starts serving `site`.
    ///
    /// The port accepts connections when this returns: there is nothing to wait for.
    pub fn start(site: Site, listen: SocketAddr, options: EmbedOptions) -> Result<Self> {
        config::check_loopback(listen, false)?;
        let listen_err = |source| Error::Listen {
            addr: listen,
            source,
        };
        let listener = std::net::TcpListener::bind(listen).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let addr = listener.local_addr().map_err(listen_err)?;
        let last_error = Arc::new(Mutex::new(None));
        let dispatch = log_dispatch(Some(last_error.clone()), options.log);
        let mut server = options.server;
        // The serving threads log to the same sink.
        let thread_dispatch = dispatch.clone();
        server.hooks.on_start = Some(Arc::new(move || install_dispatch(&thread_dispatch)));
        server.hooks.on_stop = Some(Arc::new(remove_dispatch));
        // The runtime is part of what listens: failing to start its threads is failing to listen.
        let runtime = build_runtime(options.worker_threads, dispatch).map_err(listen_err)?;
        let registered = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
        };
        let listener = match registered {
            Ok(listener) => listener,
            Err(source) => {
                // Dropping a runtime may block, which is not allowed if the caller is async.
                runtime.shutdown_background();
                return Err(listen_err(source));
            }
        };
        let local_token = site.local_token.clone();
        let (sites, receiver) = tokio::sync::watch::channel(site);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = runtime.spawn(serve::run_sites(listener, receiver, server, shutdown));
        Ok(Self {
            addr,
            local_token,
            sites,
            last_error,
            running: Mutex::new(Some(Running {
                runtime,
                stop,
                task,
            })),
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients use: `http://127.0.0.1:PORT`, with `credproxy:TOKEN@` when the local
    /// credential is required (keep that URL private).
    pub fn local_url(&self) -> String {
        match &self.local_token {
            Some(token) => format!("http://{LOCAL_USER}:{}@{}", token.expose(), self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// True until `stop` (or drop) has shut the listener.
    pub fn is_running(&self) -> bool {
        self.lock_running()
            .as_ref()
            .is_some_and(|r| !r.task.is_finished())
    }

    /// Stops accepting, lets in-flight requests drain (up to the drain timeout), then ends the
    /// runtime; calling it again does nothing.
    ///
    /// Called from inside an async runtime it cannot wait: the port then closes moments later.
    pub fn stop(&self) {
        let Some(running) = self.lock_running().take() else {
            return;
        };
        let _ = running.stop.send(());
        if tokio::runtime::Handle::try_current().is_err() {
            let _ = running.runtime.block_on(running.task);
        }
        // Cancels what is left (upgraded connections, pooled upstream connections).
        running.runtime.shutdown_background();
    }

    /// The totals so far and the last warning or error logged.
    pub fn snapshot(&self) -> Snapshot {
        let proxy = self.proxy();
        let stats = proxy.stats();
        Snapshot {
            requests: stats.requests.load(Ordering::Relaxed),
            bytes_up: stats.bytes_up.load(Ordering::Relaxed),
            bytes_down: stats.bytes_down.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
            credentials: Standing::of(&proxy.credentials().health()),
            route: proxy.routes().map(|routes| routes.status()),
        }
    }

    /// Reads the credentials from their source again now (the app stored new ones); the
    /// next request uses what it found. Blocks the caller briefly (a keystore read): call it
    /// from a worker thread, not from async code.
    pub fn reload_credentials(&self) -> Result<Reload> {
        let running = self.lock_running();
        let Some(running) = running.as_ref() else {
            return Ok(Reload::Unchanged);
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::Invalid {
                what: "call",
                reason:
                    "reload_credentials blocks; call it from a worker thread, not from async code"
                        .to_owned(),
            });
        }
        Ok(running
            .runtime
            .block_on(self.proxy().credentials().reload())?)
    }

    /// The local credential clients must present, when local auth is on.
    pub fn local_token(&self) -> Option<&Secret> {
        self.local_token.as_ref()
    }

    /// The proxy serving now.
    pub fn proxy(&self) -> Proxy {
        self.sites.borrow().proxy.clone()
    }

    /// Serves `site` from now on (new settings, say a new client certificate): connections
    /// open before finish their request and close.
    pub fn replace(&self, site: Site) {
        self.sites.send_replace(site);
    }

    fn lock_running(&self) -> MutexGuard<'_, Option<Running>> {
        lock(&self.running)
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}

thread_local! {
    /// Keeps a runtime thread's log dispatcher installed for the thread's life.
    static THREAD_DISPATCH: RefCell<Option<tracing::dispatcher::DefaultGuard>> =
        const { RefCell::new(None) };
}

/// A small multi-threaded runtime (accepting, credential reads) whose threads log to
/// `dispatch`.
///
/// The dispatcher is per thread rather than global, so each embedded proxy records its own
/// last error and a host program's own subscriber is left alone. Idle, the threads sleep in
/// the kernel: nothing polls.
fn build_runtime(worker_threads: usize, dispatch: Dispatch) -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .max_blocking_threads(4)
        .thread_name("credproxy")
        .enable_all()
        .on_thread_start(move || install_dispatch(&dispatch))
        .on_thread_stop(remove_dispatch)
        .build()
}

/// Makes `dispatch` the calling thread's log dispatcher until [`remove_dispatch`].
fn install_dispatch(dispatch: &Dispatch) {
    let guard = tracing::dispatcher::set_default(dispatch);
    THREAD_DISPATCH.with(|slot| *slot.borrow_mut() = Some(guard));
}

fn remove_dispatch() {
    THREAD_DISPATCH.with(|slot| slot.borrow_mut().take());
}

/// A dispatcher that keeps the last warning or error in `last_error` and passes events to `sink`.
fn log_dispatch(
    last_error: Option<Arc<Mutex<Option<String>>>>,
    sink: Option<Arc<dyn LogSink>>,
) -> Dispatch {
    Dispatch::new(tracing_subscriber::registry().with(Recorder { last_error, sink }))
}

struct Recorder {
    last_error: Option<Arc<Mutex<Option<String>>>>,
    sink: Option<Arc<dyn LogSink>>,
}

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        // Less verbose levels compare smaller: WARN and ERROR are `<= WARN`.
        let keep = self.last_error.as_ref().filter(|_| level <= Level::WARN);
        let sink = self.sink.as_ref().filter(|sink| sink.enabled(level));
        if keep.is_none() && sink.is_none() {
            return;
        }
        let mut message = Message::default();
        event.record(&mut message);
        if let Some(sink) = sink {
            sink.log(level, event.metadata().target(), &message.0);
        }
        if let Some(slot) = keep {
            *lock(slot) = Some(message.0);
        }
    }
}

/// An event's fields as one line: the message first, then `name=value` pairs.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.push(field, format_args!("{value:?}"));
    }
}

impl Message {
    fn push(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        if field.name() == "message" {
            let rest = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value}");
            if !rest.is_empty() {
                self.0.push(' ');
                self.0.push_str(&rest);
            }
        } else {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            let _ = write!(self.0, "{}={value}", field.name());
        }
    }
}

/// Runs the doctor's steps for `settings` with the `scheme`'s stored `secret`: the client
/// certificate's dates (when there is one), then the network (DNS, TCP, TLS, gate,
/// credentials, Immich, websocket) and, for a profile with a LAN route, the LAN address
/// (`lan`), each bounded by `timeout`; a rejection's fix hint is `settings.fix`. Logs go to `sink`.
///
/// It blocks the calling thread on a runtime of its own, so it is for synchronous callers (an
/// app's worker thread), not for code already inside an async runtime.
pub fn check(
    settings: &ProxySettings,
    scheme: &Scheme,
    secret: &Secret,
    timeout: Duration,
    sink: Option<Arc<dyn LogSink>>,
) -> Result<Vec<Step>> {
    let tls = settings
        .trust
        .client_config(&[b"http/1.1"], settings.identity.as_ref())?;
    let checker = Checker::new(settings.server.clone(), tls, timeout)
        .certificate_fix(settings.certificate_fix.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let target = doctor::Target {
        checker: &checker,
        username: &settings.username,
        scheme,
        secret: Some(secret),
        login_command: settings.fix.clone(),
    };
    let dispatch = log_dispatch(None, sink);
    let lan = match &settings.lan {
        Some(lan) => Some(
            Checker::new(
                settings.server.clone(),
                lan.trust
                    .client_config(&[b"http/1.1"], settings.identity.as_ref())?,
                timeout,
            )
            .certificate_fix(settings.certificate_fix.clone())
            .at(lan.url.clone()),
        ),
        None => None,
    };
    let network = tracing::dispatcher::with_default(&dispatch, || {
        runtime.block_on(async {
            let mut steps = doctor::network_steps(&target).await;
            if let Some(lan) = &lan {
                let target = doctor::Target {
                    checker: lan,
                    ..target
                };
                steps.push(doctor::lan_step(lan, &target).await);
            }
            steps
        })
    });
    let certificate = settings.identity.as_ref().map(|identity| {
        doctor::client_certificate_step(
            identity,
            std::time::SystemTime::now(),
            &settings.certificate_fix,
        )
    });
    Ok(certificate.into_iter().chain(network).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_puts_the_text_first_then_fields() {
        struct Sink(Mutex<Vec<String>>);
        impl LogSink for Sink {
            fn enabled(&self, level: Level) -> bool {
                level <= Level::INFO
            }
            fn log(&self, level: Level, target: &str, message: &str) {
                lock(&self.0).push(format!("{level} {target} {message}"));
            }
        }
        let sink = Arc::new(Sink(Mutex::new(Vec::new())));
        let last = Arc::new(Mutex::new(None));
        let dispatch = log_dispatch(Some(last.clone()), Some(sink.clone()));
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::debug!("not wanted");
            tracing::info!(target: "t", status = 200, "served {}", "/x");
            tracing::warn!("upstream down");
            tracing::info!("fine again");
        });
        assert_eq!(
            *lock(&sink.0),
            [
                "INFO t served /x status=200",
                "WARN credproxy::embed::tests upstream down",
                "INFO credproxy::embed::tests fine again",
            ]
        );
        assert_eq!(lock(&last).as_deref(), Some("upstream down"));
    }
}
