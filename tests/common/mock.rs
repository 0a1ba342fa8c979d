//! An in-process mock of an Authentik-gated Immich host over TLS (test CA from rcgen).
//!
//! The gate behaves as the Authentik proxy outpost does (see DESIGN.md): a valid session
//! cookie passes; correct Basic credentials pass, cost one exchange and set a session cookie;
//! wrong credentials cost one exchange and get the 401 HTML page; no credentials get a 302 to
//! the outpost's start URL. Behind it sit a few Immich endpoints and test endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

pub type MockBody = BoxBody<Bytes, std::io::Error>;

/// A request as the mock saw it, before the gate touched it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub sni: Option<String>,
    /// The client certificate of its connection (DER), if one was presented.
    pub client_cert: Option<Vec<u8>>,
}

/// Shared state the tests read and steer.
#[derive(Default)]
pub struct MockState {
    /// Credential checks that reached "Authentik" (successful or not).
    pub exchanges: AtomicUsize,
    /// Every request seen, in order.
    pub seen: Mutex<Vec<Seen>>,
    /// Upload bytes read so far by `/upload`.
    pub upload_read: AtomicU64,
    /// When set, `/upload` stops reading after this many bytes until `resume` is notified.
    pub pause_upload_after: Mutex<Option<u64>>,
    /// Wakes a paused upload.
    pub resume: Notify,
    /// Tells a test that the upload reader has paused.
    pub paused: Notify,
    /// Download bytes produced so far by `/download`.
    pub download_produced: AtomicU64,
    /// Lifetime of the session cookies the gate issues, in seconds.
    pub cookie_max_age: AtomicU64,
    /// Releases the rest of `/api/sync/stream` after its first line.
    pub stream_gate: Notify,
    /// When set, wrong credentials get the login redirect ("Intercept header authentication" off).
    pub redirect_wrong_credentials: std::sync::atomic::AtomicBool,
    /// How the last `/upload` ended: `Some(true)` when its body was cut off mid-way.
    pub upload_aborted: Mutex<Option<bool>>,
    /// Signalled whenever an `/upload` ends, complete or not.
    pub upload_done: Notify,
    /// When set, the gate wants these headers (Cloudflare Access / Pangolin style) instead of
    /// Basic: all present and right passes, a wrong one gets 403, none a login redirect.
    pub gate_headers: Mutex<Option<Vec<(String, String)>>>,
    /// With `gate_headers`: the gate is Cloudflare Access, which redirects every request
    /// without the right service token to its login page.
    pub access_login: std::sync::atomic::AtomicBool,
    /// When set, there is no gate at all: Immich answers everyone.
    pub no_gate: std::sync::atomic::AtomicBool,
    /// When set, the host behind the gate is some other web server, not Immich.
    pub not_immich: std::sync::atomic::AtomicBool,
    /// TLS connections accepted so far.
    pub connections: AtomicUsize,
    /// Closes every open connection (as a server's keep-alive timeout does) when notified
    /// with `notify_waiters`.
    pub close_all: Notify,
    /// Connections closed so far, by `close_all` or by their client.
    pub closed: AtomicUsize,
    /// Signalled whenever a connection closes.
    pub closed_one: Notify,
    /// Credential checks with wrong credentials (each one a rejection at the gate).
    pub rejected: AtomicUsize,
    /// Valid session cookie values.
    sessions: Mutex<Vec<String>>,
    /// The `Authorization: Basic …` value the gate accepts.
    accepted: Mutex<String>,
}

impl MockState {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the mock saw a request")
    }

    /// From now on the gate accepts only `username`/`password` (the old app password was
    /// revoked or expired) and forgets every session won with the old one.
    pub fn accept_only(&self, username: &str, password: &str) {
        *self.accepted.lock().unwrap() = basic(username, password);
        self.sessions.lock().unwrap().clear();
    }
}

/// `Basic base64(username:password)`.
pub fn basic(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

/// A running mock.
pub struct Mock {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub ca_file: PathBuf,
    pub username: String,
    pub password: String,
    pub state: Arc<MockState>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The name the mock's certificate is for.
pub const MOCK_HOST: &str = "localhost";

impl Mock {
    /// Starts a mock accepting `svc-test` / a fixed app password.
    pub async fn start() -> Mock {
        Self::start_with("svc-test", "app-password-123").await
    }

    pub async fn start_with(username: &str, password: &str) -> Mock {
        Self::start_full(username, password, None).await
    }

    /// Starts a mock that completes a TLS handshake only with a client certificate issued by
    /// `client_ca` (PEM), as nginx `ssl_verify_client on` or Traefik's `clientAuth` do.
    pub async fn start_requiring_client_certs(client_ca: &str) -> Mock {
        Self::start_full("svc-test", "app-password-123", Some(client_ca)).await
    }

    async fn start_full(username: &str, password: &str, client_ca: Option<&str>) -> Mock {
        let (ca_pem, tls) = test_pki_with(client_ca);
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).unwrap();
        // Small kernel buffers on the mock's side keep the streaming tests' bounds tight.
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.set_send_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener: TcpListener = socket.listen(128).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState::default());
        state.cookie_max_age.store(3600, Ordering::SeqCst);
        state.accept_only(username, password);
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let task = {
            let state = state.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let state = state.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        state.connections.fetch_add(1, Ordering::SeqCst);
                        let sni = tls.get_ref().1.server_name().map(str::to_owned);
                        let client_cert = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|cert| cert.to_vec());
                        let conn_state = state.clone();
                        let service = service_fn(move |req: Request<Incoming>| {
                            let state = state.clone();
                            let sni = sni.clone();
                            let client_cert = client_cert.clone();
                            async move {
                                if req.uri().path() == "/die" {
                                    // Read a little of the upload, then drop the connection.
                                    let mut body = req.into_body();
                                    let mut read = 0usize;
                                    while read < 1024 * 1024 {
                                        match body.frame().await {
                                            Some(Ok(frame)) => {
                                                read += frame.data_ref().map_or(0, |d| d.len())
                                            }
                                            _ => break,
                                        }
                                    }
                                    return Err(std::io::Error::other("mock upstream died"));
                                }
                                Ok(handle(req, &state, sni, client_cert).await)
                            }
                        });
                        let served = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .with_upgrades();
                        tokio::select! {
                            _ = served => {}
                            () = conn_state.close_all.notified() => {}
                        }
                        conn_state.closed.fetch_add(1, Ordering::SeqCst);
                        conn_state.closed_one.notify_waiters();
                    });
                }
            })
        };
        Mock {
            addr,
            ca_pem,
            ca_file,
            username: username.to_owned(),
            password: password.to_owned(),
            state,
            _dir: dir,
            task,
        }
    }

    /// Makes the gate want these headers (Cloudflare Access or Pangolin style) instead of
    /// Basic: all present and right passes, a wrong one gets 403, none a login redirect.
    /// Makes the gate Cloudflare Access wanting this service token: the right
    /// `CF-Access-Client-Id` and `-Secret` pass, anything else is redirected to its login page.
    pub fn gate_is_cloudflare_access(&self, client_id: &str, client_secret: &str) {
        self.gate_wants(&[
            ("cf-access-client-id", client_id),
            ("cf-access-client-secret", client_secret),
        ]);
        self.state.access_login.store(true, Ordering::SeqCst);
    }

    pub fn gate_wants(&self, pairs: &[(&str, &str)]) {
        *self.state.gate_headers.lock().unwrap() = Some(
            pairs
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        );
    }

    /// The mock's URL by name (TLS verifies `localhost`).
    pub fn url(&self) -> String {
        format!("https://{MOCK_HOST}:{}", self.addr.port())
    }
}

/// A fresh CA and a leaf certificate for `localhost` signed by it.
pub fn test_pki() -> (String, rustls::ServerConfig) {
    test_pki_with(None)
}

/// [`test_pki`], requiring client certificates from `client_ca` (PEM) when given.
pub fn test_pki_with(client_ca: Option<&str>) -> (String, rustls::ServerConfig) {
    let server = super::pki::ServerCert::new(MOCK_HOST);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    (server.ca_pem, config)
}

pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

pub fn json(value: serde_json::Value) -> Response<MockBody> {
    full(StatusCode::OK, "application/json", value.to_string())
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| name.starts_with("authentik_proxy_"))
        .map(|(_, value)| value.to_owned())
}

const COOKIE_NAME: &str = "authentik_proxy_5f3a9c1e";

async fn handle(
    req: Request<Incoming>,
    state: &Arc<MockState>,
    sni: Option<String>,
    client_cert: Option<Vec<u8>>,
) -> Response<MockBody> {
    state.seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|pq| pq.to_string())
            .unwrap_or_default(),
        headers: req.headers().clone(),
        sni,
        client_cert,
    });

    // The gate: session cookie, then Basic, else a login redirect.
    let has_session = state.no_gate.load(Ordering::SeqCst)
        || session_cookie(req.headers())
            .is_some_and(|value| state.sessions.lock().unwrap().contains(&value));
    let mut set_cookie = None;
    let header_gate = state.gate_headers.lock().unwrap().clone();
    if let Some(wanted) = header_gate {
        let present: Vec<bool> = wanted
            .iter()
            .map(|(name, value)| {
                req.headers()
                    .get(name.as_str())
                    .is_some_and(|v| v == value.as_str())
            })
            .collect();
        if present.iter().all(|ok| *ok) {
            state.exchanges.fetch_add(1, Ordering::SeqCst);
            return immich(req, state).await;
        }
        if state.access_login.load(Ordering::SeqCst) {
            state.exchanges.fetch_add(1, Ordering::SeqCst);
            state.rejected.fetch_add(1, Ordering::SeqCst);
            return access_login_redirect(&req);
        }
        if wanted
            .iter()
            .any(|(name, _)| req.headers().contains_key(name.as_str()))
        {
            state.exchanges.fetch_add(1, Ordering::SeqCst);
            return full(StatusCode::FORBIDDEN, "text/html", "<html>Forbidden</html>");
        }
        return login_redirect(&req);
    }
    if !has_session {
        match req.headers().get(header::AUTHORIZATION) {
            Some(value) if value.as_bytes().starts_with(b"Basic ") => {
                state.exchanges.fetch_add(1, Ordering::SeqCst);
                let right = *value == *state.accepted.lock().unwrap();
                if !right {
                    state.rejected.fetch_add(1, Ordering::SeqCst);
                }
                if !right && state.redirect_wrong_credentials.load(Ordering::SeqCst) {
                    return login_redirect(&req);
                }
                if !right {
                    return full(
                        StatusCode::UNAUTHORIZED,
                        "text/html; charset=utf-8",
                        "<!DOCTYPE html><html><body><p>Due to &#39;Receive header authentication&#39; being set, no redirect is performed.</p></body></html>",
                    );
                }
                let session = format!("s{}", state.exchanges.load(Ordering::SeqCst));
                state.sessions.lock().unwrap().push(session.clone());
                set_cookie = Some(format!(
                    "{COOKIE_NAME}={session}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
                    state.cookie_max_age.load(Ordering::SeqCst)
                ));
            }
            _ => return login_redirect(&req),
        }
    }

    let mut response = immich(req, state).await;
    if let Some(cookie) = set_cookie {
        response
            .headers_mut()
            .append(header::SET_COOKIE, cookie.parse().unwrap());
    }
    response
}

/// A 302 to `location(host, path)`, for the request's `Host` and path.
fn redirect(
    req: &Request<Incoming>,
    location: impl Fn(&str, &str) -> String,
) -> Response<MockBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let mut response = full(StatusCode::FOUND, "text/html", "");
    let location = location(host, req.uri().path());
    response
        .headers_mut()
        .insert(header::LOCATION, location.parse().unwrap());
    response
}

/// Cloudflare Access's answer to a request without an accepted service token.
fn access_login_redirect(req: &Request<Incoming>) -> Response<MockBody> {
    redirect(req, |host, path| {
        let path = path.trim_start_matches('/');
        format!(
            "https://team.cloudflareaccess.com/cdn-cgi/access/login/{host}?kid=0a1b&redirect_url=%2F{path}"
        )
    })
}

/// The outpost's answer to a request without (accepted) credentials.
fn login_redirect(req: &Request<Incoming>) -> Response<MockBody> {
    let mut response = redirect(req, |host, path| {
        format!("https://{host}/outpost.goauthentik.io/start?rd=https%3A%2F%2F{host}{path}")
    });
    response.headers_mut().insert(
        header::SET_COOKIE,
        format!("{COOKIE_NAME}=unauthenticated; Path=/; HttpOnly; Secure")
            .parse()
            .unwrap(),
    );
    response
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn immich(req: Request<Incoming>, state: &Arc<MockState>) -> Response<MockBody> {
    let path = req.uri().path().to_owned();
    if state.not_immich.load(Ordering::SeqCst) {
        return full(
            StatusCode::OK,
            "text/html",
            "<html><body>Welcome to nginx!</body></html>",
        );
    }
    match path.as_str() {
        "/api/server/ping" => json(serde_json::json!({"res": "pong"})),
        "/api/server/version" => json(serde_json::json!({"major": 2, "minor": 3, "patch": 1})),
        "/.well-known/immich" => json(serde_json::json!({"api": {"endpoint": "/api"}})),
        "/upload" => upload(req, state).await,
        "/api/socket.io/" => websocket_echo(req),
        "/api/sync/stream" => json_lines(state),
        "/media" => media(&req),
        "/api/assets"
            if req
                .headers()
                .get("x-immich-checksum")
                .is_some_and(|v| v == "early-duplicate") =>
        {
            // Immich knows this checksum: it answers before reading the body, and Node's
            // HTTP server then reads and discards the rest of it in the background.
            let mut body = req.into_body();
            tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
            json(serde_json::json!({"id": "existing-asset", "status": "duplicate"}))
        }
        "/redirect-me" => {
            let host = req.headers().get(header::HOST).unwrap().to_str().unwrap();
            let mut response = full(StatusCode::FOUND, "text/plain", "");
            let headers = response.headers_mut();
            headers.insert(
                header::LOCATION,
                format!("https://{host}/photos?from=login").parse().unwrap(),
            );
            headers.append(
                header::SET_COOKIE,
                "immich_access_token=tok123; Domain=localhost; Path=/; Secure; HttpOnly; SameSite=Lax"
                    .parse()
                    .unwrap(),
            );
            headers.append(
                header::SET_COOKIE,
                "immich_is_authenticated=true; Domain=localhost; Path=/; Secure; SameSite=None"
                    .parse()
                    .unwrap(),
            );
            response
        }
        "/redirect-away" => {
            let mut response = full(StatusCode::FOUND, "text/plain", "");
            response.headers_mut().insert(
                header::LOCATION,
                "https://accounts.example.org/oauth?x=1".parse().unwrap(),
            );
            response
        }
        "/download" => {
            let bytes: u64 = query(&req)
                .get("bytes")
                .and_then(|b| b.parse().ok())
                .unwrap_or(0);
            download(bytes, state)
        }
        p if p.starts_with("/echo") => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .keys()
                .map(|name| {
                    let values: Vec<_> = req
                        .headers()
                        .get_all(name)
                        .iter()
                        .map(|v| serde_json::Value::from(v.to_str().unwrap_or("<binary>")))
                        .collect();
                    (name.to_string(), serde_json::Value::from(values))
                })
                .collect();
            json(serde_json::json!({
                "method": req.method().as_str(),
                "path": path,
                "headers": headers,
            }))
        }
        _ => super::immich_api::handle(req, state).await,
    }
}

/// Immich's 404 answer.
pub fn not_found() -> Response<MockBody> {
    full(
        StatusCode::NOT_FOUND,
        "application/json",
        r#"{"message":"Not Found","statusCode":404}"#,
    )
}

/// Reads the body (pausing where a test asked), answering its size and SHA-256.
async fn upload(req: Request<Incoming>, state: &MockState) -> Response<MockBody> {
    let mut body = req.into_body();
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            *state.upload_aborted.lock().unwrap() = Some(true);
            state.upload_done.notify_one();
            return full(StatusCode::BAD_REQUEST, "text/plain", "aborted");
        };
        if let Some(data) = frame.data_ref() {
            hasher.update(data);
            total += data.len() as u64;
            state.upload_read.store(total, Ordering::SeqCst);
            let pause_at = *state.pause_upload_after.lock().unwrap();
            if pause_at.is_some_and(|at| total >= at) {
                *state.pause_upload_after.lock().unwrap() = None;
                state.paused.notify_one();
                state.resume.notified().await;
            }
        }
    }
    *state.upload_aborted.lock().unwrap() = Some(false);
    state.upload_done.notify_one();
    json(serde_json::json!({
        "bytes": total,
        "sha256": hex::encode(hasher.finalize()),
    }))
}

/// Streams `bytes` of a repeating pattern in 64 KiB chunks, counting what it produced.
fn download(bytes: u64, state: &Arc<MockState>) -> Response<MockBody> {
    let chunk = Bytes::from(pattern(64 * 1024));
    let state = state.clone();
    state.download_produced.store(0, Ordering::SeqCst);
    let mut left = bytes;
    let stream = futures_util::stream::poll_fn(move |_| {
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = left.min(chunk.len() as u64);
        left -= n;
        state.download_produced.fetch_add(n, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(Frame::data(
            chunk.slice(..n as usize),
        ))))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, bytes)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// Answers a websocket upgrade with 101, then echoes every byte back until the peer closes.
fn websocket_echo(mut req: Request<Incoming>) -> Response<MockBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "websocket transport only",
        );
    };
    let mut hasher = sha1::Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(hasher.finalize());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", accept)
        .body(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

/// A JSON-lines stream: one line at once, the rest only after the test opens `stream_gate`.
fn json_lines(state: &Arc<MockState>) -> Response<MockBody> {
    let state = state.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let line = |n: u32| {
            Ok(Frame::data(Bytes::from(format!(
                "{{\"type\":\"AssetV1\",\"n\":{n}}}\n"
            ))))
        };
        let _ = tx.send(line(1)).await;
        state.stream_gate.notified().await;
        for n in 2..=5 {
            let _ = tx.send(line(n)).await;
        }
    });
    let mut rx = rx;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/jsonlines+json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// The media content `/media` serves.
pub const MEDIA_LEN: usize = 1024 * 1024;
/// Its entity tag.
pub const MEDIA_ETAG: &str = "\"media-v1\"";

/// A media file with ETag, conditional requests and single byte ranges, as Immich serves them.
fn media(req: &Request<Incoming>) -> Response<MockBody> {
    let content = Bytes::from(pattern(MEDIA_LEN));
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v == MEDIA_ETAG)
    {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, MEDIA_ETAG)
            .body(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap();
    }
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    let builder = Response::builder()
        .header(header::ETAG, MEDIA_ETAG)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "video/mp4");
    let (builder, body) = match range {
        Some((start, end)) if start <= end && end < MEDIA_LEN => (
            builder.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{MEDIA_LEN}"),
            ),
            content.slice(start..=end),
        ),
        _ => (builder, content),
    };
    builder
        .body(Full::new(body).map_err(|never| match never {}).boxed())
        .unwrap()
}

/// A deterministic byte pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// How long tests wait for a stalled transfer before calling it stalled.
pub const STALL: Duration = Duration::from_millis(1500);
