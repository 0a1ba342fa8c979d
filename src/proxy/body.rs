//! Streaming bodies: a pass-through wrapper that counts bytes, enforces an idle timeout, and
//! the per-exchange record (access log line, totals) it counts into.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

pub use crate::upstream::BoxError;

use super::route::Route;
use super::stats::Stats;

/// The `tracing` target of the per-request access line.
pub const ACCESS_TARGET: &str = "credproxy::access";

/// A body stream stalled for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no data moved for {0:?}; giving up on this transfer")]
pub struct IdleTimeout(pub Duration);

/// One request/response exchange: counts its body bytes and writes its log line when done.
///
/// Both bodies hold it, so it drops (and logs) when the last byte has moved either way.
#[derive(Debug)]
pub struct Exchange {
    method: http::Method,
    /// The request target, logged only through [`super::redact`] (it can carry share keys).
    uri: http::Uri,
    start: Instant,
    status: AtomicU16,
    up: AtomicU64,
    down: AtomicU64,
    /// The route the request was sent (0: none yet; else 1 + [`Route::index`]).
    route: AtomicU8,
    stats: Arc<Stats>,
}

impl Exchange {
    /// Starts the record for a request to `uri` (a reference-counted copy is kept).
    pub fn new(method: http::Method, uri: &http::Uri, stats: Arc<Stats>) -> Self {
        Self {
            method,
            uri: uri.clone(),
            start: Instant::now(),
            status: AtomicU16::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            route: AtomicU8::new(0),
            stats,
        }
    }

    /// Records the status sent to the client.
    pub fn set_status(&self, status: http::StatusCode) {
        self.status.store(status.as_u16(), Ordering::Relaxed);
    }

    /// Records the route the request is sent (the last one when it went on another).
    pub fn set_route(&self, route: Route) {
        self.route.store(route.index() as u8 + 1, Ordering::Relaxed);
    }

    /// The route the request was sent, if it was sent.
    pub fn route(&self) -> Option<Route> {
        match self.route.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(Route::Public),
            _ => Some(Route::Lan),
        }
    }

    /// Counts bytes moved outside a body (an upgraded connection).
    pub fn add(&self, direction: Direction, bytes: u64) {
        match direction {
            Direction::Up => self.up.fetch_add(bytes, Ordering::Relaxed),
            Direction::Down => self.down.fetch_add(bytes, Ordering::Relaxed),
        };
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let up = *self.up.get_mut();
        let down = *self.down.get_mut();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.stats.bytes_down.fetch_add(down, Ordering::Relaxed);
        if let Some(totals) = usize::from(*self.route.get_mut())
            .checked_sub(1)
            .and_then(|index| self.stats.routes.get(index))
        {
            totals.requests.fetch_add(1, Ordering::Relaxed);
            totals.bytes_up.fetch_add(up, Ordering::Relaxed);
            totals.bytes_down.fetch_add(down, Ordering::Relaxed);
        }
        let elapsed = self.start.elapsed();
        self.stats.latency.record(elapsed);
        tracing::info!(
            target: ACCESS_TARGET,
            "method={} path={} status={} up={up} down={down} ms={}",
            self.method,
            super::redact::request_target(&self.uri),
            self.status.get_mut(),
            elapsed.as_millis(),
        );
    }
}

/// Which way a tracked body flows.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

pin_project_lite::pin_project! {
    /// Wraps a body: passes every frame through unchanged, counts data bytes, and fails the
    /// stream when no frame arrives for the idle timeout while the reader is waiting.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        idle: Option<IdleTimer>,
        exchange: Arc<Exchange>,
        direction: Direction,
    }
}

impl<B> Tracked<B> {
    /// Wraps `inner`, counting into `exchange`, failing after `idle` without progress.
    pub fn new(
        inner: B,
        exchange: Arc<Exchange>,
        direction: Direction,
        idle: Option<Duration>,
    ) -> Self {
        Self {
            inner,
            idle: idle.map(IdleTimer::new),
            exchange,
            direction,
        }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.exchange.add(*this.direction, data.len() as u64);
                }
                if let Some(idle) = this.idle {
                    idle.progress();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.idle {
                Some(idle) => {
                    ready!(idle.poll_expired(cx));
                    Poll::Ready(Some(Err(Box::new(IdleTimeout(idle.timeout)))))
                }
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Measures time since the last frame; armed only while the reader waits for data.
struct IdleTimer {
    timeout: Duration,
    last_progress: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            last_progress: Instant::now(),
            sleep: None,
        }
    }

    fn progress(&mut self) {
        self.last_progress = Instant::now();
    }

    /// Ready once the stream has been idle for the whole timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.last_progress + self.timeout;
        // The timer is allocated once per body and moved, not rebuilt, on progress.
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx)
    }
}

/// A complete in-memory body for the proxy's own answers (errors, refusals).
pub type Full = http_body_util::Full<Bytes>;

/// The body of every response the proxy gives: streamed from upstream, or its own.
pub type ResponseBody = http_body_util::Either<Tracked<hyper::body::Incoming>, Full>;

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn idle_body_fails_after_timeout_but_slow_progress_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = tokio_stream_from(rx);
        let stats = Arc::new(Stats::default());
        let exchange = Arc::new(Exchange::new(
            http::Method::PUT,
            &http::Uri::from_static("/x?secret=1"),
            stats.clone(),
        ));
        let mut body = Tracked::new(
            StreamBody::new(stream),
            exchange,
            Direction::Up,
            Some(Duration::from_secs(10)),
        );
        // Slow but steady: a frame every 9 s for a minute never trips a 10 s idle timeout.
        let sender = tokio::spawn(async move {
            for _ in 0..7 {
                tokio::time::sleep(Duration::from_secs(9)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
                    .await
                    .unwrap();
            }
            // Then silence, with the sender still open.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        for _ in 0..7 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "abc");
        }
        let before = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<IdleTimeout>(), "{err}");
        assert_eq!(before.elapsed(), Duration::from_secs(10));
        drop(body);
        assert_eq!(stats.bytes_up.load(Ordering::Relaxed), 21);
        assert_eq!(stats.requests.load(Ordering::Relaxed), 1);
        sender.abort();
    }

    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_core::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
