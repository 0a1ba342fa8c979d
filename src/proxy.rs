//! Request and response rewriting (pure, unit-tested) and the per-request proxy service.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::auth::{self, Injection};
use crate::body::{Direction, Exchange, Full, ResponseBody, Stats, StatsShards, Tracked};
use crate::config::ServerUrl;
use crate::credentials::Secret;
use crate::error::Result;
use crate::gate::{self, Verdict};
use crate::guard::Refusal;
use crate::jar::{self, SessionJar};
use crate::pool::{Lane, Pool, SendError};
use crate::upstream::{self, ClientOptions, FailureKind, TlsTrust};

/// Immich's header for a user session token: where a client's own Bearer token goes.
pub const IMMICH_USER_TOKEN: HeaderName = HeaderName::from_static("x-immich-user-token");

/// Headers that describe one connection, not the message (RFC 9110 7.6.1, plus de-facto ones).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where requests go: the pinned upstream origin.
#[derive(Debug, Clone)]
pub struct Target {
    authority: Authority,
    host: HeaderValue,
    /// The spellings of the upstream origin a `Location` may use (with and without `:443`).
    origins: Vec<String>,
}

impl Target {
    /// The target for a validated server URL.
    pub fn new(server: &ServerUrl) -> Self {
        let authority = server.authority().clone();
        let host = HeaderValue::from_str(authority.as_str())
            .expect("a parsed authority is a valid header value");
        let mut origins = vec![format!("https://{authority}")];
        if server.port() == 443 {
            origins.push(format!("https://{authority}:443"));
        }
        Self {
            authority,
            host,
            origins,
        }
    }

    /// A copy with buffers of its own: a server thread that clones the `Host` value and
    /// authority for every request then never touches another thread's reference counts.
    fn local_copy(&self) -> Self {
        Self {
            authority: self
                .authority
                .as_str()
                .parse()
                .expect("a parsed authority parses again"),
            host: auth::copy_value(&self.host),
            origins: self.origins.clone(),
        }
    }
}

/// Builds `Authorization: Basic base64(username:password)`, marked sensitive.
pub fn basic_auth(username: &str, password: &Secret) -> HeaderValue {
    crate::auth::basic_value(username, password)
}

/// Where `name` is in [`HOP_BY_HOP`], if it is a hop-by-hop header.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// The names a `Connection` value lists, as written (`keep-alive`, `Upgrade`, `X-Foo`).
fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .filter_map(|token| std::str::from_utf8(token.trim_ascii()).ok())
        .filter(|token| !token.is_empty())
}

/// True for a `Connection` token that names a header outside the fixed hop-by-hop set.
fn names_other_header(token: &str) -> bool {
    !HOP_BY_HOP
        .iter()
        .any(|hop| hop.as_str().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers: the fixed set and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are here; most messages carry none of them or
    // only `Connection: keep-alive`, and nothing else is looked up.
    let mut present = [false; 9];
    for name in headers.keys() {
        if let Some(at) = hop_by_hop_index(name.as_str()) {
            present[at] = true;
        }
    }
    if present[0]
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(connection_tokens)
            .any(names_other_header)
    {
        let listed: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for token in listed.iter().flat_map(connection_tokens) {
            // Matched case-insensitively by the map; a token that is no header name
            // matches nothing.
            headers.remove(token);
        }
    }
    for (hop, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(hop);
        }
    }
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` + `Upgrade: X`), if any.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    let connection_says_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_says_upgrade.then(|| protocol.clone())
}

/// Why a request cannot be forwarded at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    /// CONNECT asks for a tunnel to anywhere: never offered.
    #[error("CONNECT is not supported: this proxy forwards to one fixed server")]
    Connect,
    /// The request target cannot be expressed against the upstream.
    #[error("the request target cannot be forwarded")]
    BadTarget,
}

/// Rewrites a client request's head into the upstream request's head.
///
/// Path and query stay unchanged; scheme, authority and `Host` become the upstream's;
/// hop-by-hop headers go; a client's `Authorization: Bearer T` moves to
/// `x-immich-user-token` (Immich reads it there), any other client credential is dropped,
/// and the profile's `credentials` are set. The gate's session cookies (`session`) join the client's cookies.
/// Upgrade requests keep `Connection: upgrade` and `Upgrade`.
pub fn rewrite_request(
    parts: &mut http::request::Parts,
    target: &Target,
    credentials: &Injection,
    session: Option<HeaderValue>,
) -> Result<(), RewriteError> {
    if parts.method == Method::CONNECT {
        return Err(RewriteError::Connect);
    }
    let path_and_query = match parts.uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        None => http::uri::PathAndQuery::from_static("/"),
        Some(_) => return Err(RewriteError::BadTarget),
    };
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTPS)
        .authority(target.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| RewriteError::BadTarget)?;
    parts.version = Version::HTTP_11;

    let headers = &mut parts.headers;
    let upgrade = upgrade_protocol(headers);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
        .and_then(|t| HeaderValue::from_bytes(t).ok());
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    if let Some(mut token) = bearer
        && !headers.contains_key(&IMMICH_USER_TOKEN)
    {
        token.set_sensitive(true);
        headers.insert(IMMICH_USER_TOKEN, token);
    }
    credentials.apply(headers);
    headers.insert(header::HOST, target.host.clone());
    jar::merge_cookies(headers, session);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    Ok(())
}

/// The token of an `Authorization: Bearer TOKEN` value (scheme matched case-insensitively).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Rewrites an upstream response's head for a client that reached us as `client_host`:
/// hop-by-hop headers go (except the `Connection`/`Upgrade` pair of a protocol switch), a
/// `Location` on the upstream origin points to the local origin instead, and Immich's cookies
/// lose `Domain` and `Secure` so a browser on plain-http loopback keeps them.
pub fn rewrite_response(
    parts: &mut http::response::Parts,
    target: &Target,
    client_host: Option<&HeaderValue>,
) {
    let upgrade = (parts.status == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
    }
    if let (Some(host), Some(location)) = (client_host, parts.headers.get(header::LOCATION))
        && let Ok(host) = host.to_str()
        && let Some(localized) =
            localize_location(location, &target.origins, &format!("http://{host}"))
    {
        parts.headers.insert(header::LOCATION, localized);
    }
    if parts.headers.contains_key(header::SET_COOKIE) {
        let cookies: Vec<HeaderValue> = parts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(localize_set_cookie)
            .collect();
        parts.headers.remove(header::SET_COOKIE);
        for cookie in cookies {
            parts.headers.append(header::SET_COOKIE, cookie);
        }
    }
}

/// Points a `Location` on one of the upstream `origins` at `local_origin`; others stay.
pub fn localize_location(
    location: &HeaderValue,
    origins: &[String],
    local_origin: &str,
) -> Option<HeaderValue> {
    let text = location.to_str().ok()?;
    origins.iter().find_map(|origin| {
        let head = text.get(..origin.len())?;
        let rest = &text[origin.len()..];
        let boundary = rest.is_empty() || rest.starts_with(['/', '?', '#']);
        (head.eq_ignore_ascii_case(origin) && boundary)
            .then(|| HeaderValue::from_str(&format!("{local_origin}{rest}")).ok())
            .flatten()
    })
}

/// Drops `Domain` and `Secure` from a `Set-Cookie` (and makes `SameSite=None`, which needs
/// `Secure`, into `Lax`), so a browser on `http://127.0.0.1` stores it for this origin.
pub fn localize_set_cookie(value: &HeaderValue) -> HeaderValue {
    let Ok(text) = value.to_str() else {
        return value.clone();
    };
    let mut parts = text.split(';');
    let mut out = parts.next().unwrap_or("").trim().to_owned();
    for attr in parts.map(str::trim).filter(|a| !a.is_empty()) {
        let key = attr.split('=').next().unwrap_or("").trim();
        if key.eq_ignore_ascii_case("domain") || key.eq_ignore_ascii_case("secure") {
            continue;
        }
        out.push_str("; ");
        if key.eq_ignore_ascii_case("samesite")
            && attr
                .split_once('=')
                .is_some_and(|(_, v)| v.trim().eq_ignore_ascii_case("none"))
        {
            out.push_str("SameSite=Lax");
        } else {
            out.push_str(attr);
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| value.clone())
}

/// Everything a proxy for one profile needs, apart from the secret.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The profile name, for messages and suggested commands.
    pub profile: String,
    /// The upstream.
    pub server: ServerUrl,
    /// The Authentik username.
    pub username: String,
    /// Which upstream certificates to trust.
    pub trust: TlsTrust,
    /// Upstream client timeouts and pool.
    pub client: ClientOptions,
    /// How long a body may stall, either way, before the transfer is abandoned.
    pub idle_timeout: Duration,
}

/// The first back-off after the gate rejects the credentials; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// The longest back-off between attempts with rejected credentials.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The per-request service: rewrites, forwards, streams back.
///
/// Clones share everything. [`Proxy::shard`] makes a proxy that shares the credentials,
/// session, back-off and statistics but has its own upstream connection pool, for a server
/// thread whose connections should never be driven from another thread.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    pool: Pool,
    /// This shard's own copies of what every request reads or counts into.
    local: Local,
}

/// What a shard's requests use without touching memory other threads write: copies of the
/// target and credentials (their header values are reference counted) and its statistics.
struct Local {
    target: Target,
    credentials: Injection,
    stats: Arc<Stats>,
}

/// What every shard of one profile's proxy has in common.
struct Shared {
    settings: ProxySettings,
    target: Target,
    tls: Arc<rustls::ClientConfig>,
    credentials: Injection,
    backoff: Backoff,
    jar: SessionJar,
    stats: StatsShards,
}

impl Proxy {
    /// Builds the proxy with Basic credentials: TLS client, pinned target and credentials.
    pub fn new(settings: ProxySettings, password: &Secret) -> Result<Self> {
        Self::with_scheme(settings, &auth::Scheme::Basic, password)
    }

    /// Builds the proxy for any auth scheme; `secret` holds the scheme's stored value(s).
    pub fn with_scheme(
        settings: ProxySettings,
        scheme: &auth::Scheme,
        secret: &Secret,
    ) -> Result<Self> {
        let tls = upstream::tls_config(&settings.trust)?;
        let shared = Arc::new(Shared {
            target: Target::new(&settings.server),
            credentials: scheme.injection(&settings.username, secret)?,
            tls,
            settings,
            backoff: Backoff::default(),
            jar: SessionJar::new(),
            stats: StatsShards::default(),
        });
        Ok(Self::over(shared, 1))
    }

    fn over(shared: Arc<Shared>, shards: usize) -> Self {
        let options = &shared.settings.client;
        let pool = Pool::new(
            upstream::connector(shared.tls.clone(), options),
            crate::pool::origin(&shared.target.authority),
            options.pool_idle_timeout,
            options.pool_max_idle.div_ceil(shards.max(1)),
        );
        let local = Local {
            target: shared.target.local_copy(),
            credentials: shared.credentials.local_copy(),
            stats: shared.stats.shard(),
        };
        Self {
            inner: Arc::new(Inner {
                shared,
                pool,
                local,
            }),
        }
    }

    /// One of `shards` proxies sharing this one's credentials, session, back-off and
    /// statistics, each with its own upstream connection pool (whose connections run on the
    /// runtime that uses them) keeping its share of the idle connections.
    pub fn shard(&self, shards: usize) -> Self {
        Self::over(self.inner.shared.clone(), shards)
    }

    /// An upstream lane for one client connection: pass it to [`Proxy::handle`] for each of
    /// the connection's requests, drive it with [`Lane::drive`] and [`Lane::release`] it when
    /// the client leaves.
    pub fn lane(&self) -> Lane {
        self.inner.pool.lane()
    }

    /// Idle upstream connections kept for reuse.
    pub fn idle_upstream_connections(&self) -> usize {
        self.inner.pool.idle_count()
    }

    /// Totals across every exchange so far (every shard's).
    pub fn stats(&self) -> Stats {
        self.inner.shared.stats.total()
    }

    /// Whether the gate's last answer rejected the credentials and a back-off is running.
    pub fn credentials_rejected(&self) -> bool {
        self.inner.shared.backoff.active().is_some()
    }

    /// The settings this proxy runs with.
    pub fn settings(&self) -> &ProxySettings {
        &self.inner.shared.settings
    }

    /// Answers a request the listener's guards refused; nothing is forwarded.
    pub fn refuse<B>(&self, req: &Request<B>, refusal: &Refusal) -> Response<ResponseBody> {
        let exchange = Exchange::new(
            req.method().clone(),
            req.uri(),
            self.inner.local.stats.clone(),
        );
        let message = refusal.message();
        tracing::warn!("refused {} {}: {message}", req.method(), req.uri().path());
        let mut response = self.inner.shared.error_response(
            &exchange,
            refusal.status(),
            refusal.code(),
            message,
            None,
        );
        if *refusal == Refusal::LocalAuth {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"credproxy\", charset=\"UTF-8\""),
            );
        }
        response
    }

    /// Handles one client request over the client connection's `lane`; never fails:
    /// problems become error responses.
    pub async fn handle(&self, mut req: Request<Incoming>, lane: &Lane) -> Response<ResponseBody> {
        let inner = &*self.inner.shared;
        let exchange = Arc::new(Exchange::new(
            req.method().clone(),
            req.uri(),
            self.inner.local.stats.clone(),
        ));
        if let Some(remaining) = inner.backoff.active() {
            return inner.rejection_response(&exchange, inner.backoff.verdict(), remaining);
        }
        let client_upgrade = upgrade_protocol(req.headers()).map(|_| hyper::upgrade::on(&mut req));
        // Kept (a reference-counted clone) to point upstream redirects back at this origin.
        let client_host = req.headers().get(header::HOST).cloned();
        let (mut parts, body) = req.into_parts();
        let session = inner.jar.cookie_header();
        let local = &self.inner.local;
        if let Err(err) = rewrite_request(&mut parts, &local.target, &local.credentials, session) {
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
                let remaining = inner.backoff.reject(verdict, &inner.settings);
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

impl Shared {
    fn fix_command(&self) -> String {
        format!(
            "credproxy login --profile {} --server {} --username {}",
            self.settings.profile, self.settings.server, self.settings.username
        )
    }

    fn rejection_response(
        &self,
        exchange: &Exchange,
        verdict: Verdict,
        retry_after: Duration,
    ) -> Response<ResponseBody> {
        self.stats
            .base()
            .auth_rejections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
            Some(self.fix_command()),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        response
    }

    fn upstream_failure(&self, exchange: &Exchange, err: &SendError) -> Response<ResponseBody> {
        self.stats
            .base()
            .upstream_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                    self.fix_command()
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

/// Stops sending rejected credentials for a growing pause, so Authentik is not hammered
/// (every failed Basic check costs it a token-endpoint call and may feed reputation policies).
#[derive(Default)]
struct Backoff {
    state: Mutex<Option<Rejection>>,
    active: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Copy)]
struct Rejection {
    until: Instant,
    delay: Duration,
    verdict: Verdict,
}

impl Backoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Rejection>> {
        // The state is two plain values: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The time left in the current pause, if one is running.
    fn active(&self) -> Option<Duration> {
        if !self.active.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        self.lock().filter(|r| r.until > now).map(|r| r.until - now)
    }

    fn verdict(&self) -> Verdict {
        self.lock().map_or(Verdict::Rejected, |r| r.verdict)
    }

    /// Records a rejection and returns the pause now in force.
    fn reject(&self, verdict: Verdict, settings: &ProxySettings) -> Duration {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(r) = *state
            && r.until > now
        {
            // Requests already in flight when the pause began: same burst.
            return r.until - now;
        }
        let delay = state.map_or(FIRST_BACKOFF, |r| (r.delay * 2).min(MAX_BACKOFF));
        *state = Some(Rejection {
            until: now + delay,
            delay,
            verdict,
        });
        self.active
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            "{} for profile '{}' at {}; not sending them again for {} s. Fix: credproxy login --profile {} --server {} --username {}",
            verdict.explain(),
            settings.profile,
            settings.server,
            delay.as_secs(),
            settings.profile,
            settings.server,
            settings.username,
        );
        delay
    }

    /// Forgets any rejection: the gate accepted the credentials.
    fn clear(&self) {
        // Read first: a write on every passed request would move this line between cores.
        if self.active.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .active
                .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            *self.lock() = None;
            tracing::info!("the gate accepts the credentials again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target::new(&ServerUrl::parse("https://immich.example.com").unwrap())
    }

    #[test]
    fn a_local_target_copy_is_equal_with_its_own_buffers() {
        let target = target();
        let copy = target.local_copy();
        assert_eq!(copy.authority, target.authority);
        assert_eq!(copy.host, target.host);
        assert_eq!(copy.origins, target.origins);
        assert_ne!(
            copy.host.as_bytes().as_ptr(),
            target.host.as_bytes().as_ptr()
        );
        assert_ne!(
            copy.authority.as_str().as_ptr(),
            target.authority.as_str().as_ptr()
        );
    }

    fn auth() -> HeaderValue {
        basic_auth("svc", &Secret::new("app-pass".into()))
    }

    fn request(builder: http::request::Builder) -> http::request::Parts {
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn basic_auth_encodes_username_and_password() {
        let value = auth();
        assert_eq!(value.to_str().unwrap(), "Basic c3ZjOmFwcC1wYXNz");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("c3Zj"));
    }

    #[test]
    fn rewrite_pins_upstream_and_keeps_path_and_query() {
        let mut parts = request(
            Request::get("http://127.0.0.1:2283/api/assets/x/original?size=preview&a=%2F")
                .header("host", "127.0.0.1:2283"),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert_eq!(
            parts.uri.to_string(),
            "https://immich.example.com/api/assets/x/original?size=preview&a=%2F"
        );
        assert_eq!(parts.headers["host"], "immich.example.com");
        assert_eq!(parts.headers.get_all("authorization").iter().count(), 1);
        assert_eq!(parts.headers["authorization"], auth());
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn rewrite_removes_hop_by_hop_and_connection_named_headers() {
        let mut parts = request(
            Request::post("/api/assets")
                .header("connection", "keep-alive, x-private-hop")
                .header("x-private-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-authorization", "Basic bG9jYWw6eA==")
                .header("te", "trailers")
                .header("trailer", "x-checksum")
                .header("transfer-encoding", "chunked")
                .header("upgrade", "h2c")
                .header("proxy-connection", "keep-alive")
                .header("x-immich-checksum", "abc"),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        for gone in [
            "connection",
            "x-private-hop",
            "keep-alive",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
        ] {
            assert!(!parts.headers.contains_key(gone), "{gone} survived");
        }
        assert_eq!(parts.headers["x-immich-checksum"], "abc");
    }

    #[test]
    fn connection_named_headers_go_even_beside_non_ascii_bytes() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\xffAA, x-secret-hop").unwrap(),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
    }

    #[test]
    fn connection_names_match_any_case_across_several_values() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static(" X-Hop-One ,x-HOP-two"),
        );
        headers.insert("x-hop-one", HeaderValue::from_static("1"));
        headers.insert("x-hop-two", HeaderValue::from_static("2"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-kept"], "3");
    }

    #[test]
    fn the_fixed_hop_by_hop_set_is_found_by_name() {
        for (at, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(at), "{name}");
        }
        for name in ["host", "content-length", "x-connection", "connections", ""] {
            assert_eq!(hop_by_hop_index(name), None, "{name}");
        }
    }

    #[test]
    fn client_bearer_moves_to_immich_user_token_and_other_auth_is_dropped() {
        let mut parts =
            request(Request::get("/api/users/me").header("authorization", "bearer tok123"));
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert_eq!(parts.headers[IMMICH_USER_TOKEN], "tok123");
        assert_eq!(parts.headers["authorization"], auth());

        let mut parts = request(
            Request::get("/api/users/me")
                .header("authorization", "Bearer new")
                .header("x-immich-user-token", "existing"),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert_eq!(parts.headers[IMMICH_USER_TOKEN], "existing");

        let mut parts = request(
            Request::get("/")
                .header("authorization", "Basic Zm9vOmJhcg==")
                .header("x-api-key", "k")
                .header("cookie", "immich_access_token=t"),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert!(!parts.headers.contains_key(IMMICH_USER_TOKEN));
        assert_eq!(parts.headers["authorization"], auth());
        assert_eq!(parts.headers["x-api-key"], "k");
        assert_eq!(parts.headers["cookie"], "immich_access_token=t");
    }

    #[test]
    fn websocket_upgrade_keeps_its_connection_pair() {
        let mut parts = request(
            Request::get("/api/socket.io/?EIO=4&transport=websocket")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert_eq!(parts.headers["connection"], "upgrade");
        assert_eq!(parts.headers["upgrade"], "websocket");
        assert_eq!(
            parts.headers["sec-websocket-key"],
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
    }

    #[test]
    fn connect_and_odd_targets_are_refused() {
        let mut parts = request(Request::connect("evil.example:443"));
        assert_eq!(
            rewrite_request(&mut parts, &target(), &auth().into(), None),
            Err(RewriteError::Connect)
        );
        let mut parts = request(Request::options("*"));
        assert_eq!(
            rewrite_request(&mut parts, &target(), &auth().into(), None),
            Err(RewriteError::BadTarget)
        );
    }

    #[test]
    fn response_loses_hop_by_hop_but_switch_keeps_upgrade() {
        let (mut parts, ()) = Response::builder()
            .status(200)
            .header("connection", "close, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("etag", "\"abc\"")
            .body(())
            .unwrap()
            .into_parts();
        rewrite_response(
            &mut parts,
            &target(),
            Some(&HeaderValue::from_static("127.0.0.1:2283")),
        );
        assert!(!parts.headers.contains_key("connection"));
        assert!(!parts.headers.contains_key("x-hop"));
        assert!(!parts.headers.contains_key("keep-alive"));
        assert_eq!(parts.headers["etag"], "\"abc\"");

        let (mut parts, ()) = Response::builder()
            .status(101)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap()
            .into_parts();
        rewrite_response(
            &mut parts,
            &target(),
            Some(&HeaderValue::from_static("127.0.0.1:2283")),
        );
        assert_eq!(parts.headers["upgrade"], "websocket");
        assert_eq!(parts.headers["connection"], "upgrade");
    }

    #[test]
    fn upstream_locations_point_back_to_the_local_origin() {
        let t = target();
        let local = "http://127.0.0.1:2283";
        let loc =
            |v: &'static str| localize_location(&HeaderValue::from_static(v), &t.origins, local);
        assert_eq!(
            loc("https://immich.example.com/auth/login?x=1").unwrap(),
            "http://127.0.0.1:2283/auth/login?x=1"
        );
        assert_eq!(
            loc("https://IMMICH.example.com:443").unwrap(),
            "http://127.0.0.1:2283"
        );
        assert_eq!(loc("https://immich.example.com.evil.net/x"), None);
        assert_eq!(loc("https://auth.example.com/outpost"), None);
        assert_eq!(loc("/relative/path"), None);
    }

    #[test]
    fn immich_cookies_are_made_keepable_on_plain_http_loopback() {
        let c = |v: &'static str| localize_set_cookie(&HeaderValue::from_static(v));
        assert_eq!(
            c(
                "immich_access_token=abc; Domain=immich.example.com; Path=/; Secure; HttpOnly; SameSite=Lax"
            ),
            "immich_access_token=abc; Path=/; HttpOnly; SameSite=Lax"
        );
        assert_eq!(c("a=b; secure; SameSite=None"), "a=b; SameSite=Lax");
        assert_eq!(c("a=b"), "a=b");
    }

    #[test]
    fn session_cookies_merge_into_the_upstream_request() {
        let mut parts = request(Request::get("/").header("cookie", "immich_access_token=t"));
        let session = Some(HeaderValue::from_static("authentik_proxy_1a=s1"));
        rewrite_request(&mut parts, &target(), &auth().into(), session).unwrap();
        assert_eq!(
            parts.headers["cookie"],
            "immich_access_token=t; authentik_proxy_1a=s1"
        );
    }

    fn settings() -> ProxySettings {
        ProxySettings {
            profile: "p".into(),
            server: ServerUrl::parse("https://immich.example.com").unwrap(),
            username: "svc".into(),
            trust: TlsTrust::public(),
            client: ClientOptions::default(),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_a_cap_and_clears_on_success() {
        let backoff = Backoff::default();
        let s = settings();
        assert_eq!(backoff.active(), None);
        assert_eq!(backoff.reject(Verdict::Rejected, &s), FIRST_BACKOFF);
        assert_eq!(backoff.active(), Some(FIRST_BACKOFF));
        // A second rejection inside the pause is the same burst: no doubling.
        assert_eq!(backoff.reject(Verdict::Rejected, &s), FIRST_BACKOFF);
        let mut expected = FIRST_BACKOFF;
        for _ in 0..10 {
            tokio::time::advance(expected).await;
            assert_eq!(backoff.active(), None);
            expected = (expected * 2).min(MAX_BACKOFF);
            assert_eq!(backoff.reject(Verdict::LoginRedirect, &s), expected);
        }
        assert_eq!(expected, MAX_BACKOFF);
        assert_eq!(backoff.verdict(), Verdict::LoginRedirect);
        backoff.clear();
        assert_eq!(backoff.active(), None);
        assert_eq!(backoff.reject(Verdict::Rejected, &s), FIRST_BACKOFF);
    }
}
