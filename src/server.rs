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

/// Serves `proxy` on `listener` until `shutdown` resolves, then drains in-flight requests
/// for at most `drain_timeout`. Every request first passes the listener's [`Guards`]: its
/// exact `Host` names, no foreign `Origin`, and the local credential when one is set.
pub async fn run(
    listener: TcpListener,
    proxy: Proxy,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; when all are gone the receiver sees it.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192));
    let builder = Arc::new(builder);
    let guards = Arc::new(match listener.local_addr() {
        Ok(addr) => Guards::for_listener(addr, &options.allow_hosts, options.local_token.as_ref()),
        // Without a known address, no Host can be matched: refuse everything rather than guess.
        Err(_) => Guards::refuse_all(),
    });

    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let guards = guards.clone();
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        let done = done_tx.clone();
        let slots = slots.clone();
        let max_connections = options.max_connections;
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = proxy.clone();
                let guards = guards.clone();
                async move {
                    let response = match guards.check(req.headers()) {
                        Ok(()) => proxy.handle(req).await,
                        Err(refusal) => proxy.refuse(&req, &refusal),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                tracing::debug!("client connection ended: {err}");
            }
            drop(permit);
            if slots.available_permits() == max_connections {
                // The last client left: hand the memory a burst of connections used back to
                // the system, so an idle proxy returns to its idle footprint.
                release_free_memory();
            }
            drop(done);
        });
    }

    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_tx);
    let in_flight = options.max_connections - slots.available_permits();
    if in_flight > 0 {
        tracing::info!(
            "draining {in_flight} connection(s) for up to {:?}",
            options.drain_timeout
        );
    }
    if tokio::time::timeout(options.drain_timeout, done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    }
}

/// Returns freed heap pages to the system (glibc keeps them in its arenas otherwise).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim only releases free memory held by the allocator; it takes no
    // pointers and is safe to call from any thread at any time.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

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
