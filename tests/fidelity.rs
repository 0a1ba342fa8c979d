//! Fidelity to real Immich clients and the real Authentik outpost: websockets, session
//! reuse, the client's own auth, explained rejections, redirects, media, streams, early answers.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::mock::{self, Mock};
use common::*;
use credproxy::serve::{ServeOptions, ThreadHooks};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads an HTTP/1.1 response head (up to the blank line) from a raw stream.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "connection closed mid-head"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test]
async fn websocket_upgrade_is_authenticated_and_bridged_both_ways() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "GET /api/socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        proxy.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );

    let seen = mock.state.last();
    assert_eq!(
        seen.path_and_query,
        "/api/socket.io/?EIO=4&transport=websocket"
    );
    assert!(
        seen.headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Basic ")
    );

    for message in [
        &b"42[\"on_upload_success\"]"[..],
        &[0x81, 0x05, b'h', b'e', b'l', b'l', b'o'],
    ] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
    }
    // Closing our side ends the bridge: the echo closes back.
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the bridge closed after the client did")
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn a_thousand_requests_cost_at_most_two_credential_exchanges() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let mut sender = connect::<Empty<Bytes>>(proxy.addr).await;
    for i in 0..1000 {
        let response = sender
            .send_request(
                Request::get("/api/server/ping")
                    .header("host", proxy.addr.to_string())
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        for cookie in response.headers().get_all("set-cookie") {
            assert!(
                !cookie.to_str().unwrap().starts_with("authentik_proxy"),
                "request {i}: the gate's session cookie reached the client"
            );
        }
        response.into_body().collect().await.unwrap();
    }
    let exchanges = mock.state.exchanges.load(Ordering::SeqCst);
    assert!(
        exchanges <= 2,
        "{exchanges} credential exchanges for 1000 requests"
    );
    // Basic is still sent alongside the cookie, so an expired session re-authenticates inline.
    let last = mock.state.last();
    assert!(last.headers.contains_key("authorization"));
    assert!(
        last.headers["cookie"]
            .to_str()
            .unwrap()
            .starts_with("authentik_proxy_")
    );
}

#[tokio::test]
async fn expired_sessions_reauthenticate_inline_without_a_redirect() {
    let mock = Mock::start().await;
    mock.state.cookie_max_age.store(0, Ordering::SeqCst);
    let proxy = start_proxy(&mock).await;
    for _ in 0..5 {
        let (response, body) = get(proxy.addr, "/api/server/ping").await;
        assert_eq!(response.status(), StatusCode::OK, "{body:?}");
    }
    assert_eq!(mock.state.exchanges.load(Ordering::SeqCst), 5);
    assert!(
        mock.state
            .seen()
            .iter()
            .all(|s| !s.headers.contains_key("cookie")),
        "an expired session cookie is never sent"
    );
}

#[tokio::test]
async fn the_clients_own_auth_survives() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let (response, _) = send(
        proxy.addr,
        Request::get("/echo")
            .header("host", proxy.addr.to_string())
            .header("authorization", "Bearer session-token-1")
            .header("x-api-key", "api-key-1")
            .header("x-immich-share-key", "share-1")
            .header(
                "cookie",
                "immich_access_token=tok; immich_auth_type=password",
            ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = mock.state.last();
    assert_eq!(seen.headers["x-immich-user-token"], "session-token-1");
    assert_eq!(seen.headers["x-api-key"], "api-key-1");
    assert_eq!(seen.headers["x-immich-share-key"], "share-1");
    assert!(
        seen.headers["cookie"]
            .to_str()
            .unwrap()
            .starts_with("immich_access_token=tok; immich_auth_type=password")
    );
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth.len(), 1);
    assert!(auth[0].to_str().unwrap().starts_with("Basic "));

    // A token already in x-immich-user-token wins over a Bearer.
    send(
        proxy.addr,
        Request::get("/echo")
            .header("host", proxy.addr.to_string())
            .header("authorization", "Bearer other")
            .header("x-immich-user-token", "explicit"),
    )
    .await;
    let seen = mock.state.last();
    let tokens: Vec<_> = seen.headers.get_all("x-immich-user-token").iter().collect();
    assert_eq!(tokens, ["explicit"]);
}

/// Captures formatted WARN events.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_login_redirect_is_explained_to_the_client_and_logged_once_per_burst() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let dispatch = tracing::Dispatch::new(subscriber);
    let _guard = tracing::dispatcher::set_default(&dispatch);
    // The serving thread logs there too, for its whole life.
    let options = ServeOptions {
        hooks: ThreadHooks {
            on_start: Some(Arc::new(move || {
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })),
            ..ThreadHooks::default()
        },
        ..ServeOptions::default()
    };

    let mock = Mock::start().await;
    mock.state
        .redirect_wrong_credentials
        .store(true, Ordering::SeqCst);
    let proxy = start_proxy_with(settings_for(&mock), "stale-password", options).await;
    for _ in 0..10 {
        let (response, body) = get(proxy.addr, "/api/users/me").await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let answer = json(&body);
        assert_eq!(answer["error"], "credentials_rejected");
        assert!(
            answer["message"].as_str().unwrap().contains("login page"),
            "{answer}"
        );
        assert_eq!(
            answer["fix"],
            format!(
                "credproxy login --profile test --server {} --username {}",
                mock.url(),
                mock.username
            )
        );
    }
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("did not accept"))
        .count();
    assert_eq!(
        warnings, 1,
        "one warning per burst, not per request:\n{logs}"
    );
    assert!(!logs.contains("stale-password"));
    assert_eq!(mock.state.exchanges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstream_redirects_and_cookies_are_made_local_for_browsers() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let (response, _) = get(proxy.addr, "/redirect-me").await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(
        response.headers()["location"],
        format!("http://{}/photos?from=login", proxy.addr).as_str()
    );
    let cookies: Vec<_> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        cookies,
        [
            "immich_access_token=tok123; Path=/; HttpOnly; SameSite=Lax",
            "immich_is_authenticated=true; Path=/; SameSite=Lax",
        ]
    );
    let (response, _) = get(proxy.addr, "/redirect-away").await;
    assert_eq!(
        response.headers()["location"],
        "https://accounts.example.org/oauth?x=1",
        "foreign locations are left alone"
    );
}

#[tokio::test]
async fn ranges_etags_and_conditional_requests_pass_unchanged() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let (response, body) = send(
        proxy.addr,
        Request::get("/media")
            .header("host", proxy.addr.to_string())
            .header("range", "bytes=1000-1999"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes 1000-1999/{}", mock::MEDIA_LEN).as_str()
    );
    assert_eq!(response.headers()["etag"], mock::MEDIA_ETAG);
    assert_eq!(body, mock::pattern(2000)[1000..]);
    assert_eq!(mock.state.last().headers["range"], "bytes=1000-1999");

    let (response, body) = send(
        proxy.addr,
        Request::get("/media")
            .header("host", proxy.addr.to_string())
            .header("if-none-match", mock::MEDIA_ETAG),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(mock.state.last().headers["if-none-match"], mock::MEDIA_ETAG);
}

#[tokio::test]
async fn json_line_streams_are_forwarded_line_by_line() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let mut sender = connect::<Empty<Bytes>>(proxy.addr).await;
    let response = sender
        .send_request(
            Request::post("/api/sync/stream")
                .header("host", proxy.addr.to_string())
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    // The first line must arrive while the upstream is still holding the rest back.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first line arrived before the stream ended")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, "{\"type\":\"AssetV1\",\"n\":1}\n");
    mock.state.stream_gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&rest).lines().count(), 4);
}

#[tokio::test]
async fn an_early_answer_to_an_upload_reaches_the_client_and_nothing_hangs() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok::<_, std::io::Error>(Frame::data(c))))
    }));
    let total: u64 = 64 * 1024 * 1024;
    let mut sender = connect(proxy.addr).await;
    let request = Request::post("/api/assets")
        .header("host", proxy.addr.to_string())
        .header("x-immich-checksum", "early-duplicate")
        .header("content-length", total)
        .body(body)
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(request).await });
    // Only the first MiB goes out before the answer is awaited: a proxy that waited for the
    // whole body before relaying the answer would hang here.
    let chunk = Bytes::from(vec![7u8; 256 * 1024]);
    for _ in 0..4 {
        tx.send(chunk.clone()).await.unwrap();
    }
    let feeder = async move {
        let mut sent = 4 * chunk.len() as u64;
        while sent < total {
            if tx.send(chunk.clone()).await.is_err() {
                break; // the request was answered and its body dropped
            }
            sent += chunk.len() as u64;
        }
    };
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("the early answer arrived")
        .unwrap()
        .unwrap();
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(30), response.into_body().collect())
        .await
        .expect("the early answer's body completed")
        .unwrap()
        .to_bytes();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(json(&body)["status"], "duplicate");
    tokio::time::timeout(Duration::from_secs(30), feeder)
        .await
        .expect("the uploader was released");
    // The proxy serves the next request normally.
    let (response, _) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::OK);
}
