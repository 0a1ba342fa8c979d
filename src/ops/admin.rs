//! The optional admin listener: `/healthz` and Prometheus `/metrics` for every served profile,
//! on its own loopback port (never the proxied one).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::proxy::Proxy;
use crate::proxy::stats::{LATENCY_BOUNDS, Stats};
use crate::serve::guard::Guards;
use crate::serve::{Site, accept_or_pause};

/// Serves `/healthz` and `/metrics` for the profiles of `sites` (whatever each listener
/// serves now) on `listener` until `shutdown` resolves. Requests must name the listener as
/// their Host, as on the proxy port.
pub async fn run(
    listener: TcpListener,
    sites: Vec<watch::Receiver<Site>>,
    shutdown: impl Future<Output = ()>,
) {
    let guards = Arc::new(match listener.local_addr() {
        Ok(addr) => Guards::for_listener(addr, &[], None),
        Err(_) => Guards::refuse_all(),
    });
    let sites = Arc::new(sites);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            (stream, _) = accept_or_pause(|| listener.accept()) => stream,
        };
        let sites = sites.clone();
        let guards = guards.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let proxies: Vec<Proxy> = sites.iter().map(|s| s.borrow().proxy.clone()).collect();
                let answer = match guards.check(req.headers()) {
                    Ok(()) => answer(&req, &proxies),
                    Err(refusal) => text(refusal.status(), refusal.message()),
                };
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
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
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(text)))
                .expect("static response parts are valid")
        }
        _ => text(StatusCode::NOT_FOUND, "try /healthz or /metrics".to_owned()),
    }
}

/// One profile's health as JSON: its server and where its credentials stand with the gate
/// (`/healthz`, and what `credproxy doctor` asks a running proxy for).
pub fn profile_health(proxy: &Proxy) -> serde_json::Value {
    let standing = proxy.credentials().health().standing();
    let certificate = proxy.settings().identity.as_ref().map(|identity| {
        let info = identity.info();
        serde_json::json!({
            "subject": info.subject,
            "issuer": info.issuer,
            "expires": crate::utc::seconds(info.not_after),
            "days_left": info.days_left(std::time::SystemTime::now()),
        })
    });
    serde_json::json!({
        "profile": proxy.settings().profile,
        "server": proxy.settings().server.to_string(),
        "credentials_rejected": standing.backoff_seconds.is_some(),
        "credentials": standing,
        "client_certificate": certificate,
    })
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
    use std::time::Duration;

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
