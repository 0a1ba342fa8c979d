//! The serving threads of one listener: each an event loop of its own (a single-threaded
//! tokio runtime) with its own upstream connections, the hand-out of each accepted connection
//! to the thread that serves the fewest, and the serving of one client connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;
use http::header;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::guard::Refusal;
use super::{Connections, LiveSite, ServeOptions};
use crate::proxy::{Lane, Proxy};

/// Hands a connection to the serving thread that serves the fewest.
///
/// The threads do not take connections from the listener themselves: whichever woke first
/// would take a burst of them (64 clients connecting at once went 40/24 between two threads),
/// and the busier thread then holds the others back.
pub(super) fn hand_out(
    threads: &[Thread],
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    site: &Arc<LiveSite>,
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
pub(super) struct Thread {
    queue: mpsc::UnboundedSender<Accepted>,
    load: Arc<AtomicUsize>,
    /// Resolves (with an error) when the thread has ended.
    finished: oneshot::Receiver<()>,
}

impl Thread {
    /// What resolves when the thread has ended.
    pub(super) fn finished(self) -> oneshot::Receiver<()> {
        self.finished
    }
}

/// A connection handed to a serving thread.
struct Accepted {
    stream: std::net::TcpStream,
    /// Its place under the connection limit.
    permit: OwnedSemaphorePermit,
    site: Arc<LiveSite>,
    /// Fires at shutdown or when the site is replaced.
    stopped: CancellationToken,
}

/// Starts the serving threads of one listener.
pub(super) fn start_threads(
    shared: &Arc<Connections>,
    options: &ServeOptions,
) -> std::io::Result<Vec<Thread>> {
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
    shared: Arc<Connections>,
    load: Arc<AtomicUsize>,
    threads: usize,
) {
    let tracker = TaskTracker::new();
    // This thread's shard of the site it last served: upstream connections of its own.
    let mut shard: Option<(Arc<LiveSite>, Proxy)> = None;
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

/// What the requests of one client connection share: one reference-counted clone each.
struct Client {
    site: Arc<LiveSite>,
    /// The serving thread's shard of the site's proxy.
    proxy: Proxy,
    lane: Lane,
}

/// Serves one client connection until it closes, or until `stop` fires (shutdown, or its
/// site was replaced) and its request in flight has been answered.
async fn serve_connection(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    shared: Arc<Connections>,
    site: Arc<LiveSite>,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hyper::server::conn::http1;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::{Notify, Semaphore};

    use super::*;
    use crate::serve::Site;
    use crate::serve::tests::proxy_for;

    #[tokio::test]
    async fn connections_go_to_the_thread_serving_fewest() {
        use tokio::io::AsyncReadExt;
        let options = ServeOptions {
            threads: 3,
            ..ServeOptions::default()
        };
        let shared = Arc::new(Connections {
            builder: http1::Builder::new(),
            max_connections: 16,
            slots: Arc::new(Semaphore::new(16)),
            idle: Notify::new(),
            drain_timeout: Duration::from_secs(5),
        });
        let threads = start_threads(&shared, &options).unwrap();
        let stop = CancellationToken::new();
        let site = Arc::new(LiveSite::new(
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
}
