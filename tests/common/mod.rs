//! Shared test harness: the mock gated host, a proxy in front of it, and small HTTP clients.
#![allow(dead_code)]

pub mod binary;
pub mod immich_api;
pub mod mock;
pub mod nginx;
pub mod pki;
pub mod relay;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use credproxy::config::{self, CaCert, Profile, ServerUrl};
use credproxy::credentials::{Scheme, Secret};
use credproxy::proxy::{Proxy, ProxySettings};
use credproxy::serve::{self, ServeOptions, Site};

pub use mock::Mock;

/// A proxy serving on 127.0.0.1:0 in this process.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    /// Begins shutdown; `task` finishes when draining is done.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A profile for `mock`: its URL and service account, trusting its CA.
pub fn profile_for(mock: &Mock) -> Profile {
    profile_at(&mock.url(), &mock.username, &mock.ca_pem)
}

/// A Basic profile for the server at `url` whose certificate is issued by `ca_pem`.
pub fn profile_at(url: &str, username: &str, ca_pem: &str) -> Profile {
    Profile {
        name: "test".to_owned(),
        server: ServerUrl::parse(url).unwrap(),
        username: username.to_owned(),
        auth: Scheme::Basic,
        listen: config::DEFAULT_LISTEN,
        ca_cert: Some(CaCert::Pem(ca_pem.to_owned())),
        pins: Vec::new(),
        local_auth: false,
        allow_hosts: Vec::new(),
        client_cert: None,
        lan: None,
    }
}

/// Settings for a proxy in front of `mock`, trusting the mock's CA; the fix for rejected
/// credentials is the profile's `credproxy login` command.
pub fn settings_for(mock: &Mock) -> ProxySettings {
    let profile = profile_for(mock);
    let mut settings = ProxySettings::for_profile(&profile, profile.login_command(None)).unwrap();
    settings.idle_timeout = Duration::from_secs(60);
    settings
}

/// Starts a proxy with the mock's right password.
pub async fn start_proxy(mock: &Mock) -> RunningProxy {
    start_proxy_with(settings_for(mock), &mock.password, ServeOptions::default()).await
}

pub async fn start_proxy_with(
    settings: ProxySettings,
    password: &str,
    options: ServeOptions,
) -> RunningProxy {
    let secret = Secret::new(password.to_owned());
    let proxy = Proxy::with_secret(settings, &Scheme::Basic, &secret).unwrap();
    start_site(Site::new(proxy), options).await
}

/// A proxy for `mock` with its right password.
pub fn mock_proxy(mock: &Mock) -> Proxy {
    let secret = Secret::new(mock.password.clone());
    Proxy::with_secret(settings_for(mock), &Scheme::Basic, &secret).unwrap()
}

/// Serves `site` on 127.0.0.1:0 in this process.
pub async fn start_site(site: Site, options: ServeOptions) -> RunningProxy {
    let proxy = site.proxy.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve::run(listener, site, options, async move {
        let _ = stopped.await;
    }));
    RunningProxy {
        addr,
        proxy,
        stop: Some(stop),
        task,
    }
}

/// Opens an HTTP/1.1 connection to `addr` and returns its request sender.
pub async fn connect<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends a bodiless request to the proxy and collects the answer.
pub async fn get(addr: SocketAddr, path: &str) -> (Response<()>, Bytes) {
    send(addr, Request::get(path).header("host", addr.to_string())).await
}

pub async fn send(addr: SocketAddr, builder: http::request::Builder) -> (Response<()>, Bytes) {
    let mut sender = connect::<Empty<Bytes>>(addr).await;
    let response = sender
        .send_request(builder.body(Empty::new()).unwrap())
        .await
        .unwrap();
    collect(response).await
}

pub async fn collect(response: Response<Incoming>) -> (Response<()>, Bytes) {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, ()), body)
}

/// Writes raw bytes to `addr` and reads until the server closes or a full response arrived.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// The address in a `credproxy … http://ADDR …` announcement line (`serve`, `--admin`).
pub fn address_in(line: &str) -> SocketAddr {
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}
