//! The embedded proxy (`credproxy::embed`, what the mobile crate runs): its own runtime, a port
//! that accepts when `start` returns, totals with the last error, logs to a sink, and a stop
//! (or drop) that closes the port.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use common::{Mock, get, settings_for};
use credproxy::Error;
use credproxy::config::ServerUrl;
use credproxy::credentials::{Scheme, Secret};
use credproxy::embed::{EmbedOptions, Embedded, LogSink};
use credproxy::proxy::Proxy;
use credproxy::serve::Site;
use http::StatusCode;
use tracing::Level;

/// Passes each access-log line on, so a test can wait for an exchange to be counted.
struct Lines(Mutex<Sender<String>>);

impl LogSink for Lines {
    fn enabled(&self, level: Level) -> bool {
        level <= Level::INFO
    }

    fn log(&self, _level: Level, target: &str, message: &str) {
        if target == "credproxy::access" {
            let _ = self.0.lock().unwrap().send(message.to_owned());
        }
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn start(mock: &Mock, server: Option<ServerUrl>) -> (Embedded, Receiver<String>) {
    let mut settings = settings_for(mock);
    if let Some(server) = server {
        settings.server = server;
    }
    let proxy = Proxy::with_secret(
        settings,
        &Scheme::Basic,
        &Secret::new(mock.password.clone()),
    )
    .unwrap();
    let (tx, rx) = channel();
    let options = EmbedOptions {
        log: Some(std::sync::Arc::new(Lines(Mutex::new(tx)))),
        ..EmbedOptions::default()
    };
    (
        Embedded::start(Site::new(proxy), loopback(), options).unwrap(),
        rx,
    )
}

fn exchange_done(lines: &Receiver<String>) -> String {
    lines.recv_timeout(Duration::from_secs(20)).unwrap()
}

#[test]
fn serves_counts_and_stops() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mock = runtime.block_on(Mock::start());
    let (embedded, lines) = start(&mock, None);
    let addr = embedded.local_addr();
    assert!(embedded.is_running());
    assert_eq!(embedded.local_url(), format!("http://{addr}"));

    let (response, body) = runtime.block_on(get(addr, "/api/server/ping?key=share-secret"));
    assert_eq!(response.status(), StatusCode::OK);
    let line = exchange_done(&lines);
    assert!(
        line.contains("method=GET path=/api/server/ping?key=*** status=200"),
        "{line}"
    );
    assert!(
        !line.contains("share-secret"),
        "query values are never logged: {line}"
    );
    let snapshot = embedded.snapshot();
    assert_eq!(snapshot.requests, 1);
    assert_eq!(snapshot.bytes_down, body.len() as u64);
    assert_eq!(snapshot.last_error, None);

    embedded.stop();
    assert!(!embedded.is_running());
    assert!(TcpStream::connect(addr).is_err(), "the port still accepts");
    embedded.stop();
}

#[test]
fn dropping_stops_and_an_async_host_can_start_and_stop_it() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mock = runtime.block_on(Mock::start());
    let (embedded, _lines) = start(&mock, None);
    let addr = embedded.local_addr();
    drop(embedded);
    assert!(TcpStream::connect(addr).is_err(), "the port still accepts");

    // An async host may start and stop it from inside its own runtime.
    let (embedded, _lines) = runtime.block_on(async { start(&mock, None) });
    runtime.block_on(async { embedded.stop() });
    assert!(!embedded.is_running());
}

#[test]
fn the_last_error_names_an_unreachable_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mock = runtime.block_on(Mock::start());
    let closed = std::net::TcpListener::bind(loopback()).unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let server = ServerUrl::parse(&format!("https://127.0.0.1:{port}")).unwrap();
    let (embedded, lines) = start(&mock, Some(server));
    let (response, _) = runtime.block_on(get(embedded.local_addr(), "/api/server/ping"));
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    exchange_done(&lines);
    let last = embedded.snapshot().last_error.unwrap_or_default();
    assert!(last.contains("cannot connect"), "{last}");
}

#[test]
fn local_url_carries_the_local_credential_and_only_loopback_is_served() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mock = runtime.block_on(Mock::start());
    let proxy = || {
        Proxy::with_secret(
            settings_for(&mock),
            &Scheme::Basic,
            &Secret::new(mock.password.clone()),
        )
        .unwrap()
    };
    let site = Site {
        local_token: Some(Secret::new("local-token-0123456789".into())),
        ..Site::new(proxy())
    };
    let embedded = Embedded::start(site, loopback(), EmbedOptions::default()).unwrap();
    assert_eq!(
        embedded.local_url(),
        format!(
            "http://credproxy:local-token-0123456789@{}",
            embedded.local_addr()
        )
    );
    let (response, _) = runtime.block_on(get(embedded.local_addr(), "/api/server/ping"));
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let remote = Embedded::start(
        Site::new(proxy()),
        "0.0.0.0:0".parse().unwrap(),
        EmbedOptions::default(),
    );
    assert!(matches!(remote, Err(Error::NonLoopback { .. })));
}

#[test]
fn a_source_that_changes_its_answer_heals_the_running_proxy() {
    use credproxy::credentials::{CredentialStore, MemoryStore, StoreEntry};
    use credproxy::proxy::live::{LiveCredentials, Reload};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mock = runtime.block_on(Mock::start());
    // What an app's provider answers (the mobile crate adapts its provider the same way).
    let store = Arc::new(MemoryStore::new());
    let answer = |secret: &str| store.set("app", &Secret::new(secret.to_owned())).unwrap();
    answer("expired-app-password");
    let source = Arc::new(StoreEntry::new(store.clone(), "app"));
    // Read again at every rejected request (a second by default): no waiting on the clock.
    let credentials = LiveCredentials::load(Scheme::Basic, mock.username.clone(), source)
        .unwrap()
        .reread_every(Duration::ZERO);
    let proxy = Proxy::new(settings_for(&mock), credentials).unwrap();
    let embedded = Embedded::start(Site::new(proxy), loopback(), EmbedOptions::default()).unwrap();
    let addr = embedded.local_addr();
    let ping = || runtime.block_on(get(addr, "/api/server/ping")).0.status();

    assert_eq!(ping(), StatusCode::BAD_GATEWAY);
    assert_eq!(embedded.snapshot().credentials.state, "rejected");
    answer(&mock.password);
    // Rejected: the proxy asks its source again by itself (at most once a second by default).
    assert_eq!(
        ping(),
        StatusCode::OK,
        "the proxy did not read the new answer"
    );
    assert_eq!(mock.state.rejected.load(Ordering::SeqCst), 1);
    assert_eq!(embedded.snapshot().credentials.state, "accepted");

    // Credentials that still work are only read again when the app says so.
    mock.state
        .accept_only(&mock.username, "rotated-app-password");
    answer("rotated-app-password");
    assert_eq!(embedded.reload_credentials().unwrap(), Reload::Changed);
    assert_eq!(ping(), StatusCode::OK);
    assert_eq!(embedded.reload_credentials().unwrap(), Reload::Unchanged);
    assert_eq!(mock.state.rejected.load(Ordering::SeqCst), 1);
}
