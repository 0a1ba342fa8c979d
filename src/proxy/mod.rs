//! The proxy core: the per-request service that rewrites a client's request, forwards it to
//! the one upstream with the profile's credentials, recognises the gate's answer and streams
//! the response back.
//!
//! Owns: [`Proxy`] (one profile's service: settings, live credentials, upstream pool,
//! statistics) and its parts: [`rewrite`] (pure request/response rewriting), [`gate`] (the
//! Authentik outpost's answers), [`live`] (credentials as live state: re-read, back-off,
//! standing with the gate), [`jar`] (the gate's session cookies), [`body`] (streaming bodies,
//! the per-exchange record), [`redact`] (request targets as logs may show them) and [`stats`].

pub mod body;
pub mod gate;
pub mod jar;
pub mod live;
pub mod redact;
pub mod rewrite;
pub mod route;
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
use self::gate::Verdict;
use self::live::{Blocked, Generation, LiveCredentials, Unusable};
use self::rewrite::{Target, rewrite_request, rewrite_response, upgrade_protocol};
use self::route::{Route, Routes};
pub use self::stats::Stats;
use crate::config::{Profile, ServerUrl};
use crate::credentials::{ClientIdentity, Scheme, Secret, SecretSource};
use crate::error::Result;
use crate::upstream::{
    self, ClientOptions, Failure, Pool, SendError, TlsTrust, Unanswered, WeakPool,
};

/// The upstream connections of one client connection (see [`upstream::Lane`]): one to the
/// server's public address and, for a profile with a LAN route, one to its LAN address.
pub struct Lane {
    public: upstream::Lane<Tracked<Incoming>>,
    lan: Option<upstream::Lane<Tracked<Incoming>>>,
}

impl Lane {
    /// Runs `served` (the client side of the connection) while driving the upstream
    /// connections, all on the calling task; returns `served`'s output.
    pub async fn drive<F: std::future::Future>(&self, served: F) -> F::Output {
        match &self.lan {
            Some(lan) => self.public.drive(lan.drive(served)).await,
            None => self.public.drive(served).await,
        }
    }

    /// Returns healthy, idle upstream connections to their pools (the client has left).
    pub fn release(&self) {
        self.public.release();
        if let Some(lan) = &self.lan {
            lan.release();
        }
    }
}

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
    /// The client certificate presented to a server that asks for one.
    pub identity: Option<ClientIdentity>,
    /// What the user does when the server refuses the client certificate (or wants one).
    pub certificate_fix: String,
    /// The server's LAN address and how its certificate is checked there, when it has one.
    pub lan: Option<LanSettings>,
}

/// The LAN route of a profile: the same server at a LAN address.
#[derive(Debug, Clone)]
pub struct LanSettings {
    /// The LAN address (`https://192.168.1.10`).
    pub url: ServerUrl,
    /// Which certificates the LAN address must show, for the public name.
    pub trust: TlsTrust,
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
            certificate_fix: format!("{fix} --client-cert FILE"),
            fix,
            identity: None,
            lan: match &profile.lan {
                Some(lan) => Some(LanSettings {
                    url: lan.url.clone(),
                    trust: TlsTrust::for_lan(profile, lan)?,
                }),
                None => None,
            },
        })
    }
}

/// One profile's proxy: rewrites, forwards, streams back.
///
/// Clones share everything. [`Proxy::shard`] makes one that shares the settings,
/// credentials and statistics but keeps upstream connections of its own: for a serving
/// thread, whose connections must be driven by its own event loop.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
    pool: Pool<Tracked<Incoming>>,
    lan_pool: Option<Pool<Tracked<Incoming>>>,
}

struct Inner {
    settings: ProxySettings,
    target: Target,
    credentials: LiveCredentials,
    tls: Arc<rustls::ClientConfig>,
    stats: Arc<Stats>,
    /// The LAN route and its connector, for a profile with one.
    lan: Option<(Arc<Routes>, upstream::Connector)>,
    /// Every shard's pool, for counting idle connections.
    pools: std::sync::Mutex<Vec<WeakPool<Tracked<Incoming>>>>,
}

impl Proxy {
    /// Builds the proxy: its TLS client and upstream pool, over live credentials.
    pub fn new(settings: ProxySettings, credentials: LiveCredentials) -> Result<Self> {
        Self::build(settings, credentials, Arc::default())
    }

    /// Builds the proxy that takes over from `previous` (new settings after a reload): it
    /// counts on in the same statistics.
    pub fn replacing(
        previous: &Proxy,
        settings: ProxySettings,
        credentials: LiveCredentials,
    ) -> Result<Self> {
        Self::build(settings, credentials, previous.inner.stats.clone())
    }

    /// Builds a proxy whose credentials are `secret`, never read again (the demo, tests).
    pub fn with_secret(settings: ProxySettings, scheme: &Scheme, secret: &Secret) -> Result<Self> {
        let source: Arc<dyn SecretSource> = Arc::new(secret.clone());
        let credentials = LiveCredentials::load(scheme.clone(), settings.username.clone(), source)?;
        Self::new(settings, credentials)
    }

    fn build(
        settings: ProxySettings,
        credentials: LiveCredentials,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        let tls = settings
            .trust
            .client_config(&[], settings.identity.as_ref())?;
        let lan = match &settings.lan {
            Some(lan) => {
                let tls = lan.trust.client_config(&[], settings.identity.as_ref())?;
                let name = rustls::pki_types::ServerName::try_from(settings.server.host())
                    .map_err(|e| crate::error::Error::Tls(e.to_string()))?
                    .to_owned();
                let connector = upstream::Connector::new(tls, &settings.client)
                    .under_name(name, settings.client.lan_connect_timeout);
                let routes = Routes::new(
                    settings.profile.clone(),
                    settings.server.clone(),
                    lan.url.clone(),
                    connector.clone(),
                    settings.client.lan_probe_every,
                    stats.clone(),
                );
                Some((Arc::new(routes), connector))
            }
            None => None,
        };
        let inner = Arc::new(Inner {
            target: Target::new(&settings.server),
            credentials,
            tls,
            settings,
            stats,
            lan,
            pools: std::sync::Mutex::default(),
        });
        Ok(Self {
            pool: pool_of(&inner, 1),
            lan_pool: lan_pool_of(&inner, 1),
            inner,
        })
    }

    /// One of `shards` proxies that share this one's settings, credentials and statistics,
    /// each with upstream connections of its own (and its share of the idle ones).
    pub fn shard(&self, shards: usize) -> Self {
        Self {
            pool: pool_of(&self.inner, shards),
            lan_pool: lan_pool_of(&self.inner, shards),
            inner: self.inner.clone(),
        }
    }

    /// The profile's LAN route, when it has one: where it stands, and a try of it.
    pub fn routes(&self) -> Option<&Arc<Routes>> {
        self.inner.lan.as_ref().map(|(routes, _)| routes)
    }

    /// An upstream lane for one client connection: pass it to [`Proxy::handle`] for each of
    /// the connection's requests, drive it with [`upstream::Lane::drive`] and
    /// [`upstream::Lane::release`] it when the client leaves.
    pub fn lane(&self) -> Lane {
        Lane {
            public: self.pool.lane(),
            lan: self.lan_pool.as_ref().map(Pool::lane),
        }
    }

    /// Idle upstream connections kept for reuse, by every shard.
    pub fn idle_upstream_connections(&self) -> usize {
        crate::sync::lock(&self.inner.pools)
            .iter()
            .map(WeakPool::idle_count)
            .sum()
    }

    /// Totals across every exchange so far.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The profile's credentials: their standing with the gate, and a reload.
    pub fn credentials(&self) -> &LiveCredentials {
        &self.inner.credentials
    }

    /// The settings this proxy runs with (its client certificate among them).
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
        tracing::warn!(
            "refused {} {}: {message}",
            req.method(),
            redact::request_target(req.uri())
        );
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
        let loaded = match inner.credentials.admit().await {
            Ok(loaded) => loaded,
            Err(blocked) => return inner.blocked_response(&exchange, &blocked),
        };
        let client_upgrade = upgrade_protocol(req.headers()).map(|_| hyper::upgrade::on(&mut req));
        // Kept (a reference-counted clone) to point upstream redirects back at this origin.
        let client_host = req.headers().get(header::HOST).cloned();
        let (mut parts, body) = req.into_parts();
        let session = inner.credentials.jar().cookie_header();
        let rewritten = rewrite_request(&mut parts, &inner.target, loaded.injection(), session);
        // Only the generation is kept while the request is out: a reload frees the old
        // credentials without waiting for the answer.
        let generation = loaded.generation();
        drop(loaded);
        if let Err(err) = rewritten {
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
        let request = Request::from_parts(parts, body);
        let mut response = match inner.send(request, lane, &exchange).await {
            Ok(response) => response,
            Err(err) => return inner.upstream_failure(&exchange, &err),
        };
        if gate::may_refuse_certificate(response.status(), response.headers()) {
            return inner
                .small_page(response, generation, client_host, exchange)
                .await;
        }
        match gate::classify(response.status(), response.headers()) {
            Verdict::Passed => inner.credentials.passed(generation),
            verdict => {
                let (blocked, began) = inner.credentials.rejected(generation, verdict);
                if let Some(pause) = began {
                    tracing::warn!(
                        "{}; not sending them again for {} s. Fix: {}",
                        inner.blocked_message(&blocked),
                        pause.as_secs(),
                        inner.settings.fix
                    );
                }
                return inner.blocked_response(&exchange, &blocked);
            }
        }
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(bridge(client_upgrade, upstream_upgrade, exchange.clone()));
        }
        let (mut parts, body) = response.into_parts();
        inner.pass_on(&mut parts, client_host.as_ref(), &exchange);
        let body = Tracked::new(body, exchange, Direction::Down, idle);
        Response::from_parts(parts, Either::Left(body))
    }
}

/// The upstream connection pool of one shard of `inner`.
fn pool_of(inner: &Inner, shards: usize) -> Pool<Tracked<Incoming>> {
    let connector = upstream::Connector::new(inner.tls.clone(), &inner.settings.client);
    let origin = upstream::origin(inner.target.authority());
    new_pool(inner, connector, origin, shards)
}

/// The LAN route's connection pool of one shard of `inner`, when the profile has one.
fn lan_pool_of(inner: &Inner, shards: usize) -> Option<Pool<Tracked<Incoming>>> {
    let (_, connector) = inner.lan.as_ref()?;
    let lan = inner.settings.lan.as_ref()?;
    let origin = upstream::origin(lan.url.authority());
    Some(new_pool(inner, connector.clone(), origin, shards))
}

fn new_pool(
    inner: &Inner,
    connector: upstream::Connector,
    origin: http::Uri,
    shards: usize,
) -> Pool<Tracked<Incoming>> {
    let options = &inner.settings.client;
    let pool = Pool::new(
        connector,
        origin,
        options.pool_idle_timeout,
        options.pool_max_idle.div_ceil(shards.max(1)),
    );
    let mut pools = crate::sync::lock(&inner.pools);
    pools.retain(|p| p.is_alive());
    pools.push(pool.downgrade());
    pool
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
    /// Sends `req` the route it should take: the public one, or for a profile with a LAN
    /// route while at home, the LAN one, falling back to the public one for a request of
    /// which nothing was sent.
    async fn send(
        &self,
        req: Request<Tracked<Incoming>>,
        lane: &Lane,
        exchange: &Exchange,
    ) -> std::result::Result<Response<Incoming>, SendError> {
        let (Some((routes, _)), Some(lan)) = (&self.lan, &lane.lan) else {
            return lane.public.send(req).await.map_err(|u| u.error);
        };
        let req = match routes.choose() {
            Route::Public => req,
            Route::Lan => {
                exchange.set_route(Route::Lan);
                match lan.send(req).await {
                    Ok(response) => return Ok(response),
                    Err(Unanswered {
                        error,
                        unsent: Some(req),
                    }) => {
                        routes.lan_unreachable(&error.failure());
                        req
                    }
                    Err(Unanswered {
                        error,
                        unsent: None,
                    }) => {
                        // Partly sent: never sent again. The LAN route is tried afresh.
                        routes.try_in_background();
                        return Err(error);
                    }
                }
            }
        };
        exchange.set_route(Route::Public);
        lane.public.send(req).await.map_err(|u| u.error)
    }

    /// Readies an upstream answer's head for the client: the gate's cookies kept, redirects
    /// pointed back at this origin, the status recorded.
    fn pass_on(
        &self,
        parts: &mut http::response::Parts,
        client_host: Option<&HeaderValue>,
        exchange: &Exchange,
    ) {
        self.credentials.jar().absorb(&mut parts.headers);
        rewrite_response(parts, &self.target, client_host);
        exchange.set_status(parts.status);
    }

    /// Reads a small 400 page whole (see [`gate::may_refuse_certificate`]): a front end's
    /// refusal of the client certificate becomes the JSON 502 that names it and the fix,
    /// anything else goes to the client as it came (and counts as the gate's pass, as every
    /// answer that is not the gate's refusal does).
    async fn small_page(
        &self,
        response: Response<Incoming>,
        generation: Generation,
        client_host: Option<HeaderValue>,
        exchange: Arc<Exchange>,
    ) -> Response<ResponseBody> {
        use http_body_util::BodyExt;
        let (mut parts, body) = response.into_parts();
        let read = body.collect();
        let page = match tokio::time::timeout(self.settings.idle_timeout, read).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(err)) => return self.upstream_failure(&exchange, &SendError::new(err, None)),
            Err(_) => {
                self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                let message = format!(
                    "{} answered 400 and then sent no more of its page for {} s",
                    self.settings.server,
                    self.settings.idle_timeout.as_secs()
                );
                tracing::warn!("{message}");
                let fix = "retry; if it persists, run `credproxy doctor`".to_owned();
                return self.error_response(
                    &exchange,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    message,
                    Some(fix),
                );
            }
        };
        if let Some(refusal) = gate::certificate_refusal(parts.status, &page) {
            self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            return self.certificate_refused(&exchange, refusal);
        }
        self.credentials.passed(generation);
        exchange.add(Direction::Down, page.len() as u64);
        self.pass_on(&mut parts, client_host.as_ref(), &exchange);
        Response::from_parts(parts, Either::Right(Full::new(page)))
    }

    /// The answer to a request the server refused because of the client certificate.
    fn certificate_refused(&self, exchange: &Exchange, refusal: &str) -> Response<ResponseBody> {
        let message = format!("{} {refusal}", self.settings.server);
        tracing::warn!("{message}");
        self.error_response(
            exchange,
            StatusCode::BAD_GATEWAY,
            "client_certificate_rejected",
            message,
            Some(self.settings.certificate_fix.clone()),
        )
    }

    /// The answer to a request that was not sent because of the credentials: a 502 whose
    /// JSON names the profile, what is wrong and the fix (`credproxy login …`).
    fn blocked_response(&self, exchange: &Exchange, blocked: &Blocked) -> Response<ResponseBody> {
        self.stats.auth_rejections.fetch_add(1, Ordering::Relaxed);
        let code = match blocked {
            Blocked::Rejected { .. } => "credentials_rejected",
            Blocked::Unusable(Unusable::Missing) => "credentials_missing",
            Blocked::Unusable(Unusable::Invalid(_)) => "credentials_unusable",
        };
        let mut response = self.error_response(
            exchange,
            StatusCode::BAD_GATEWAY,
            code,
            self.blocked_message(blocked),
            Some(self.settings.fix.clone()),
        );
        if let Blocked::Rejected { retry_after, .. } = blocked {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
        }
        response
    }

    /// What is wrong with the credentials, in words for the client and the log.
    fn blocked_message(&self, blocked: &Blocked) -> String {
        let profile = &self.settings.profile;
        let server = &self.settings.server;
        match blocked {
            Blocked::Unusable(Unusable::Missing) => format!(
                "no credentials are stored for profile '{profile}' (logged out, or never logged in): credproxy sends nothing to {server} until they are"
            ),
            Blocked::Unusable(Unusable::Invalid(reason)) => {
                format!("the credentials stored for profile '{profile}' cannot be used: {reason}")
            }
            Blocked::Rejected {
                verdict,
                since,
                accepted_until,
                retry_after,
            } => {
                let pause = retry_after.as_secs().max(1);
                match accepted_until {
                    Some(until) => format!(
                        "the gate at {server} accepted the credentials of profile '{profile}' until {} and rejects them since {}: {}; credproxy pauses sending them for {pause} s so the gate is not flooded",
                        crate::utc::seconds(*until),
                        crate::utc::seconds(*since),
                        expiry_note(self.credentials.scheme()),
                    ),
                    None => format!(
                        "{} for profile '{profile}' at {server}; credproxy pauses sending them for {pause} s so the gate is not flooded",
                        verdict.explain()
                    ),
                }
            }
        }
    }

    fn upstream_failure(&self, exchange: &Exchange, err: &SendError) -> Response<ResponseBody> {
        self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
        // A request that failed on the LAN route names it: the public address may be fine.
        let server = match (&self.lan, exchange.route()) {
            (Some((routes, _)), Some(Route::Lan)) => format!(
                "{} (by the LAN route {})",
                self.settings.server,
                routes.lan_authority()
            ),
            _ => self.settings.server.to_string(),
        };
        let (status, code, message, fix) = match err.failure() {
            Failure::Dns(detail) => (
                StatusCode::BAD_GATEWAY,
                "upstream_dns",
                format!("cannot resolve {}: {detail}", self.settings.server.host()),
                "check the server name and this machine's DNS".to_owned(),
            ),
            Failure::Connect(detail) => (
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("cannot connect to {server}: {detail}"),
                "check that the server is up and reachable from this machine".to_owned(),
            ),
            Failure::Tls(detail) => (
                StatusCode::BAD_GATEWAY,
                "upstream_tls",
                format!("TLS with {server} failed: {detail}"),
                format!(
                    "if the server uses a private CA, log in again with --ca-cert: {}",
                    self.settings.fix
                ),
            ),
            Failure::ClientCertificate(refusal) => {
                return self.certificate_refused(exchange, refusal);
            }
            Failure::Timeout(detail) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!("{server} did not answer in time: {detail}"),
                "check that the server is up and reachable from this machine".to_owned(),
            ),
            Failure::Other(detail) => (
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

/// Why credentials the gate accepted before are rejected now, almost always, per scheme.
fn expiry_note(scheme: &Scheme) -> &'static str {
    match scheme {
        Scheme::Basic => {
            "the app password has probably expired or been revoked; Authentik service-account tokens expire after 360 days unless created as non-expiring"
        }
        Scheme::CloudflareAccess => {
            "the service token has probably expired or been revoked; Cloudflare Access service tokens expire at the end of the duration chosen when they were made (a year by default)"
        }
        Scheme::Header(_) => "the values have probably expired or been revoked",
        Scheme::None => "the client certificate has probably expired or been revoked",
    }
}
