//! The proxy core: the per-request service that rewrites a client's request, forwards it to
//! the one upstream with the profile's credentials, recognises the gate's answer and streams
//! the response back.
//!
//! Owns: [`Proxy`] (one profile's service: settings, credentials, gate back-off, session jar,
//! upstream pool, statistics) and its parts: [`rewrite`] (pure request/response rewriting),
//! [`gate`] (the Authentik outpost's answers, back-off), [`jar`] (the gate's session
//! cookies), [`body`] (streaming bodies, the per-exchange record) and [`stats`].

pub mod body;
pub mod gate;
pub mod jar;
pub mod rewrite;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use self::body::{Direction, Exchange, Full, ResponseBody, Tracked};
use self::gate::{Backoff, Verdict};
use self::jar::SessionJar;
use self::rewrite::{Target, rewrite_request, rewrite_response, upgrade_protocol};
pub use self::stats::Stats;
use crate::config::{Profile, ServerUrl};
use crate::credentials::{Injection, Scheme, Secret};
use crate::error::Result;
use crate::upstream::{self, ClientOptions, FailureKind, Pool, SendError, TlsTrust};

/// The upstream connection of one client connection (see [`upstream::Lane`]).
pub type Lane = upstream::Lane<Tracked<Incoming>>;

/// Everything a proxy for one profile needs, apart from the secret.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The profile name, for messages.
    pub profile: String,
    /// The upstream.
    pub server: ServerUrl,
    /// The Authentik username (empty for schemes without one).
    pub username: String,
    /// Which upstream certificates to trust.
    pub trust: TlsTrust,
    /// Upstream client timeouts and pool.
    pub client: ClientOptions,
    /// How long a body may stall, either way, before the transfer is abandoned.
    pub idle_timeout: Duration,
    /// What the user does when the stored credentials are rejected or missing: for the CLI
    /// the profile's `credproxy login` command, for an app its own words.
    pub fix: String,
}

impl ProxySettings {
    /// The settings for `profile`, with the default timeouts; `fix` as in [`ProxySettings::fix`].
    pub fn for_profile(profile: &Profile, fix: String) -> Result<Self> {
        Ok(Self {
            profile: profile.name.clone(),
            server: profile.server.clone(),
            username: profile.username.clone(),
            trust: TlsTrust::for_profile(profile)?,
            client: ClientOptions::default(),
            idle_timeout: Duration::from_secs(300),
            fix,
        })
    }
}

/// One profile's proxy: rewrites, forwards, streams back. Clones share everything.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ProxySettings,
    target: Target,
    credentials: Injection,
    pool: Pool<Tracked<Incoming>>,
    backoff: Backoff,
    jar: SessionJar,
    stats: Arc<Stats>,
}

impl Proxy {
    /// Builds the proxy for an auth scheme; `secret` holds the scheme's stored value(s).
    pub fn new(settings: ProxySettings, scheme: &Scheme, secret: &Secret) -> Result<Self> {
        let tls = settings.trust.client_config(&[])?;
        let target = Target::new(&settings.server);
        let options = &settings.client;
        let pool = Pool::new(
            upstream::connector(tls, options),
            upstream::origin(target.authority()),
            options.pool_idle_timeout,
            options.pool_max_idle,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                credentials: scheme.injection(&settings.username, secret)?,
                target,
                pool,
                settings,
                backoff: Backoff::default(),
                jar: SessionJar::new(),
                stats: Arc::default(),
            }),
        })
    }

    /// An upstream lane for one client connection: pass it to [`Proxy::handle`] for each of
    /// the connection's requests, drive it with [`upstream::Lane::drive`] and
    /// [`upstream::Lane::release`] it when the client leaves.
    pub fn lane(&self) -> Lane {
        self.inner.pool.lane()
    }

    /// Idle upstream connections kept for reuse.
    pub fn idle_upstream_connections(&self) -> usize {
        self.inner.pool.idle_count()
    }

    /// Totals across every exchange so far.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Whether the gate's last answer rejected the credentials and a back-off is running.
    pub fn credentials_rejected(&self) -> bool {
        self.inner.backoff.active().is_some()
    }

    /// The settings this proxy runs with.
    pub fn settings(&self) -> &ProxySettings {
        &self.inner.settings
    }

    /// Answers a request that was refused before anything was forwarded (by the listener's
    /// guards): a JSON error with `status`, `code` and `message`, logged as a warning.
    pub fn refuse<B>(
        &self,
        req: &Request<B>,
        status: StatusCode,
        code: &str,
        message: String,
    ) -> Response<ResponseBody> {
        let exchange = Exchange::new(req.method().clone(), req.uri(), self.inner.stats.clone());
        tracing::warn!("refused {} {}: {message}", req.method(), req.uri().path());
        self.inner
            .error_response(&exchange, status, code, message, None)
    }

    /// Handles one client request over the client connection's `lane`; never fails:
    /// problems become error responses.
    pub async fn handle(&self, mut req: Request<Incoming>, lane: &Lane) -> Response<ResponseBody> {
        let inner = &*self.inner;
        let exchange = Arc::new(Exchange::new(
            req.method().clone(),
            req.uri(),
            inner.stats.clone(),
        ));
        if let Some(remaining) = inner.backoff.active() {
            return inner.rejection_response(&exchange, inner.backoff.verdict(), remaining);
        }
        let client_upgrade = upgrade_protocol(req.headers()).map(|_| hyper::upgrade::on(&mut req));
        // Kept (a reference-counted clone) to point upstream redirects back at this origin.
        let client_host = req.headers().get(header::HOST).cloned();
        let (mut parts, body) = req.into_parts();
        let session = inner.jar.cookie_header();
        if let Err(err) = rewrite_request(&mut parts, &inner.target, &inner.credentials, session) {
            return inner.error_response(
                &exchange,
                StatusCode::BAD_REQUEST,
                "bad_request",
                err.to_string(),
                None,
            );
        }
        let idle = Some(inner.settings.idle_timeout);
        let body = Tracked::new(body, exchange.clone(), Direction::Up, idle);
        let mut response = match lane.send(Request::from_parts(parts, body)).await {
            Ok(response) => response,
            Err(err) => return inner.upstream_failure(&exchange, &err),
        };
        match gate::classify(response.status(), response.headers()) {
            Verdict::Passed => inner.backoff.clear(),
            verdict => {
                inner.jar.clear();
                let settings = &inner.settings;
                let remaining = inner.backoff.reject(
                    verdict,
                    &settings.profile,
                    &settings.server.to_string(),
                    &settings.fix,
                );
                return inner.rejection_response(&exchange, verdict, remaining);
            }
        }
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(bridge(client_upgrade, upstream_upgrade, exchange.clone()));
        }
        let (mut parts, body) = response.into_parts();
        inner.jar.absorb(&mut parts.headers);
        rewrite_response(&mut parts, &inner.target, client_host.as_ref());
        exchange.set_status(parts.status);
        let body = Tracked::new(body, exchange, Direction::Down, idle);
        Response::from_parts(parts, Either::Left(body))
    }
}

/// Copies bytes both ways between an upgraded client connection and the upstream.
async fn bridge(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    exchange: Arc<Exchange>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!("upgrade failed: {err}");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            exchange.add(Direction::Up, up);
            exchange.add(Direction::Down, down);
        }
        Err(err) => tracing::debug!("upgraded connection ended: {err}"),
    }
}

impl Inner {
    fn rejection_response(
        &self,
        exchange: &Exchange,
        verdict: Verdict,
        retry_after: Duration,
    ) -> Response<ResponseBody> {
        self.stats.auth_rejections.fetch_add(1, Ordering::Relaxed);
        let secs = retry_after.as_secs().max(1);
        let message = format!(
            "{} for profile '{}' at {}; credproxy pauses sending them for {secs} s so Authentik is not flooded",
            verdict.explain(),
            self.settings.profile,
            self.settings.server
        );
        let mut response = self.error_response(
            exchange,
            StatusCode::BAD_GATEWAY,
            "credentials_rejected",
            message,
            Some(self.settings.fix.clone()),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        response
    }

    fn upstream_failure(&self, exchange: &Exchange, err: &SendError) -> Response<ResponseBody> {
        self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
        let (kind, detail) = upstream::describe_failure(err.as_error());
        let server = &self.settings.server;
        let (status, code, message, fix) = match kind {
            FailureKind::Dns => (
                StatusCode::BAD_GATEWAY,
                "upstream_dns",
                format!("cannot resolve {}: {detail}", server.host()),
                "check the server name and this machine's DNS".to_owned(),
            ),
            FailureKind::Connect => (
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("cannot connect to {server}: {detail}"),
                "check that the server is up and reachable from this machine".to_owned(),
            ),
            FailureKind::Tls => (
                StatusCode::BAD_GATEWAY,
                "upstream_tls",
                format!("TLS with {server} failed: {detail}"),
                format!(
                    "if the server uses a private CA, log in again with --ca-cert: {}",
                    self.settings.fix
                ),
            ),
            FailureKind::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!("{server} did not answer in time: {detail}"),
                "check that the server is up and reachable from this machine".to_owned(),
            ),
            FailureKind::Other => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("the request to {server} failed: {detail}"),
                "retry; if it persists, run `credproxy doctor`".to_owned(),
            ),
        };
        tracing::warn!("{message}");
        self.error_response(exchange, status, code, message, Some(fix))
    }

    fn error_response(
        &self,
        exchange: &Exchange,
        status: StatusCode,
        code: &str,
        message: String,
        fix: Option<String>,
    ) -> Response<ResponseBody> {
        exchange.set_status(status);
        let body = serde_json::json!({
            "error": code,
            "message": message,
            "profile": self.settings.profile,
            "fix": fix,
            "source": "credproxy",
        });
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-store")
            .body(Either::Right(Full::new(Bytes::from(body.to_string()))))
            .expect("a static status and valid headers build a response")
    }
}
