//! The optional admin listener: `/healthz` and Prometheus `/metrics` for every served profile,
//! on its own loopback port (never the proxied one).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::proxy::Proxy;
use crate::proxy::route::Route;
use crate::proxy::stats::{LATENCY_BOUNDS, Stats};
use crate::serve::guard::Guards;
use crate::serve::{Site, accept_or_pause, refuse_busy};

use super::health::profile_health;

/// Limits of the admin listener's client connections: it is on loopback, where any local
/// process can open connections, and shares the proxy's descriptors.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// How long a client may take to send a request's headers (also bounds idle keep-alive).
    pub header_read_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed at once.
    pub max_connections: usize,
}

impl Default for AdminOptions {
    /// A monitor scrapes over one connection and sends its headers at once: 16 connections
    /// and 10 s are plenty, and 2,000 idle connections then cost 16 descriptors, not 2,000
    /// (which would leave the proxy port unable to accept under a 1,024 limit).
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 16,
        }
    }
}

/// Serves `/healthz` and `/metrics` for the profiles of `sites` (whatever each listener
/// serves now) on `listener` until `shutdown` resolves, within the limits of `options`.
/// Requests must name the listener as their Host, as on the proxy port.
pub async fn run(
    listener: TcpListener,
    sites: Vec<watch::Receiver<Site>>,
    options: AdminOptions,
    shutdown: impl Future<Output = ()>,
) {
    let guards = Arc::new(match listener.local_addr() {
        Ok(addr) => Guards::for_listener(addr, &[], None),
        Err(_) => Guards::refuse_all(),
    });
    let sites = Arc::new(sites);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            (stream, _) = accept_or_pause(|| listener.accept()) => stream,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin listener: connection limit reached; refusing a connection");
            refuse_busy(&stream);
            continue;
        };
        let sites = sites.clone();
        let guards = guards.clone();
        let connection = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let proxies: Vec<Proxy> = sites.iter().map(|s| s.borrow().proxy.clone()).collect();
                let answer = match guards.check(req.headers()) {
                    Ok(()) => answer(&req, &proxies),
                    Err(refusal) => text(refusal.status(), refusal.message()),
                };
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = connection
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn answer<B>(req: &Request<B>, proxies: &[Proxy]) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET".to_owned());
    }
    match req.uri().path() {
        "/healthz" => {
            let profiles: Vec<_> = proxies.iter().map(profile_health).collect();
            let body = serde_json::json!({"status": "ok", "profiles": profiles});
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("static response parts are valid")
        }
        "/metrics" => {
            let entries: Vec<(&str, &Stats)> = proxies
                .iter()
                .map(|p| (p.settings().profile.as_str(), p.stats()))
                .collect();
            let mut text = render_metrics(&entries);
            text.push_str(&render_certificate_expiry(proxies));
            text.push_str(&render_routes(proxies));
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(text)))
                .expect("static response parts are valid")
        }
        _ => text(StatusCode::NOT_FOUND, "try /healthz or /metrics".to_owned()),
    }
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(message)))
        .expect("static response parts are valid")
}

/// The expiry of each profile's client certificate, as a Prometheus gauge (Unix seconds);
/// nothing when no profile has one.
fn render_certificate_expiry(proxies: &[Proxy]) -> String {
    let name = "credproxy_client_certificate_expiry_timestamp_seconds";
    let mut out = String::new();
    for proxy in proxies {
        let Some(identity) = &proxy.settings().identity else {
            continue;
        };
        if out.is_empty() {
            let _ = writeln!(
                out,
                "# HELP {name} When the client certificate expires.\n# TYPE {name} gauge"
            );
        }
        let expires = identity
            .info()
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = writeln!(
            out,
            "{name}{{profile=\"{}\"}} {expires}",
            proxy.settings().profile
        );
    }
    out
}

/// The route of each profile with a LAN route (a gauge per route, 1 for the one in use), its
/// switches, and the requests and body bytes per route; nothing when no profile has one.
fn render_routes(proxies: &[Proxy]) -> String {
    let with_lan: Vec<_> = proxies
        .iter()
        .filter_map(|p| Some((p.settings().profile.as_str(), p.routes()?, p.stats())))
        .collect();
    if with_lan.is_empty() {
        return String::new();
    }
    let routes = [Route::Lan, Route::Public];
    let mut out = String::from(
        "# HELP credproxy_route The route requests take now (1), for profiles with a LAN route.\n# TYPE credproxy_route gauge\n",
    );
    for (profile, state, _) in &with_lan {
        for route in routes {
            let on = u8::from(state.current() == route);
            let _ = writeln!(
                out,
                "credproxy_route{{profile=\"{profile}\",route=\"{}\"}} {on}",
                route.name()
            );
        }
    }
    out.push_str("# HELP credproxy_route_switches_total Changes between the LAN and the public route.\n# TYPE credproxy_route_switches_total counter\n");
    for (profile, _, stats) in &with_lan {
        let _ = writeln!(
            out,
            "credproxy_route_switches_total{{profile=\"{profile}\"}} {}",
            stats.route_switches.load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP credproxy_route_requests_total Requests sent each route.\n# TYPE credproxy_route_requests_total counter\n");
    for (profile, _, stats) in &with_lan {
        for route in routes {
            let _ = writeln!(
                out,
                "credproxy_route_requests_total{{profile=\"{profile}\",route=\"{}\"}} {}",
                route.name(),
                stats.routes[route.index()].requests.load(Ordering::Relaxed)
            );
        }
    }
    out.push_str("# HELP credproxy_route_body_bytes_total Body bytes moved each route.\n# TYPE credproxy_route_body_bytes_total counter\n");
    for (profile, _, stats) in &with_lan {
        for route in routes {
            let totals = &stats.routes[route.index()];
            for (direction, bytes) in [("up", &totals.bytes_up), ("down", &totals.bytes_down)] {
                let _ = writeln!(
                    out,
                    "credproxy_route_body_bytes_total{{profile=\"{profile}\",route=\"{}\",direction=\"{direction}\"}} {}",
                    route.name(),
                    bytes.load(Ordering::Relaxed)
                );
            }
        }
    }
    out
}

/// Renders every profile's totals in the Prometheus text format.
pub fn render_metrics(entries: &[(&str, &Stats)]) -> String {
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, value: &dyn Fn(&Stats) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (profile, stats) in entries {
            let _ = writeln!(out, "{name}{{profile=\"{profile}\"}} {}", value(stats));
        }
    };
    counter(
        &mut out,
        "credproxy_requests_total",
        "Requests answered.",
        &|s| s.requests.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "credproxy_upstream_errors_total",
        "Requests that could not reach the upstream.",
        &|s| s.upstream_errors.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "credproxy_auth_rejections_total",
        "Requests answered with the rejected-credentials error.",
        &|s| s.auth_rejections.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP credproxy_body_bytes_total Body bytes moved.\n# TYPE credproxy_body_bytes_total counter"
    );
    for (profile, stats) in entries {
        let _ = writeln!(
            out,
            "credproxy_body_bytes_total{{profile=\"{profile}\",direction=\"up\"}} {}\ncredproxy_body_bytes_total{{profile=\"{profile}\",direction=\"down\"}} {}",
            stats.bytes_up.load(Ordering::Relaxed),
            stats.bytes_down.load(Ordering::Relaxed)
        );
    }
    let name = "credproxy_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Whole exchanges, request head to last byte.\n# TYPE {name} histogram"
    );
    for (profile, stats) in entries {
        let (cumulative, total) = stats.latency.cumulative();
        for (bound, count) in LATENCY_BOUNDS.iter().zip(cumulative) {
            let _ = writeln!(
                out,
                "{name}_bucket{{profile=\"{profile}\",le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{profile=\"{profile}\",le=\"+Inf\"}} {total}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{profile=\"{profile}\"}} {}",
            stats.latency.sum_seconds()
        );
        let _ = writeln!(out, "{name}_count{{profile=\"{profile}\"}} {total}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    /// Serves an admin listener with no profiles on 127.0.0.1:0; stops when the sender drops.
    async fn start(
        options: AdminOptions,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(run(listener, Vec::new(), options, async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// Sends a `/healthz` request on `client`, reads the whole answer (the connection stays
    /// open) and returns its status line.
    async fn healthz(client: &mut TcpStream, addr: std::net::SocketAddr) -> String {
        client
            .write_all(format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        loop {
            let mut chunk = [0u8; 1024];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|l| l.parse().ok())
                    .unwrap();
                if body.len() >= length {
                    return head.lines().next().unwrap().to_owned();
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_headers_is_closed_after_the_timeout() {
        let timeout = Duration::from_secs(5);
        let (addr, _stop) = start(AdminOptions {
            header_read_timeout: timeout,
            max_connections: 4,
        })
        .await;
        // A client that asks at once is answered.
        let mut prompt = TcpStream::connect(addr).await.unwrap();
        assert_eq!(healthz(&mut prompt, addr).await, "HTTP/1.1 200 OK");
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut rest = Vec::new();
        idle.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            start.elapsed(),
            timeout,
            "closed after {:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_refused_and_those_within_served() {
        let (addr, _stop) = start(AdminOptions {
            header_read_timeout: Duration::from_secs(600),
            max_connections: 2,
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            // Answered: the listener has taken it under the cap.
            assert_eq!(healthz(&mut client, addr).await, "HTTP/1.1 200 OK");
            held.push(client);
        }
        let mut beyond = TcpStream::connect(addr).await.unwrap();
        let mut answer = String::new();
        beyond.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.ends_with("\r\n\r\ncredproxy: too many connections, retry later\n"),
            "{answer}"
        );
        let length: usize = answer
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, answer.split_once("\r\n\r\n").unwrap().1.len());
        // Those within the cap are still served.
        for client in &mut held {
            assert_eq!(healthz(client, addr).await, "HTTP/1.1 200 OK");
        }
    }

    #[test]
    fn metrics_render_counters_and_a_cumulative_histogram() {
        let stats = Stats::default();
        stats.requests.store(3, Ordering::Relaxed);
        stats.auth_rejections.store(1, Ordering::Relaxed);
        stats.latency.record(Duration::from_micros(500));
        stats.latency.record(Duration::from_millis(30));
        stats.latency.record(Duration::from_secs(7200));
        let text = render_metrics(&[("home", &stats)]);
        assert!(
            text.contains("credproxy_requests_total{profile=\"home\"} 3"),
            "{text}"
        );
        assert!(text.contains("credproxy_auth_rejections_total{profile=\"home\"} 1"));
        assert!(text.contains("le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("le=\"3600\"} 2\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("credproxy_request_duration_seconds_count{profile=\"home\"} 3"));
    }
}
