//! End-to-end proxy behaviour against the mock gated host over TLS.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::mock::{self, MOCK_HOST, Mock};
use common::*;
use credproxy::serve::ServeOptions;
use credproxy::upstream::TlsTrust;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sha2::Digest;

fn expected_basic(mock: &Mock) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", mock.username, mock.password))
    )
}

#[tokio::test]
async fn injects_basic_credentials_and_passes_the_gate() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let (response, body) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json(&body)["res"], "pong");
    let seen = mock.state.last();
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth.len(), 1, "exactly one Authorization header");
    assert_eq!(auth[0], expected_basic(&mock).as_str());
}

#[tokio::test]
async fn upstream_host_and_sni_are_the_servers() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let client_host = format!("localhost:{}", proxy.addr.port());
    let (response, _) = send(
        proxy.addr,
        Request::get("/echo").header("host", client_host.as_str()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = mock.state.last();
    assert_eq!(
        seen.headers["host"],
        format!("{MOCK_HOST}:{}", mock.addr.port()).as_str()
    );
    assert_eq!(seen.sni.as_deref(), Some(MOCK_HOST));
}

#[tokio::test]
async fn path_and_query_arrive_unchanged() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let target = "/echo/a%20b/../c;x?size=preview&x=%2F%3F&flag&emoji=%F0%9F%93%B7";
    let (response, body) = get(proxy.addr, target).await;
    assert_eq!(response.status(), StatusCode::OK, "{body:?}");
    assert_eq!(mock.state.last().path_and_query, target);
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let request = format!(
        "GET /echo HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive, X-Private-Hop\r\nX-Private-Hop: secret-ish\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic bG9jYWw6cHc=\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-Checksum\r\nUpgrade: h2c\r\nX-Immich-Checksum: abc\r\nAuthorization: Basic Zm9vOmJhcg==\r\nConnection: close\r\n\r\n",
        proxy.addr
    );
    let response = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = mock.state.last();
    for gone in [
        "x-private-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(seen.headers["x-immich-checksum"], "abc");
    // The client's own Basic credentials never reach the upstream: only the injected ones.
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth, [expected_basic(&mock).as_str()]);
}

#[tokio::test]
async fn responses_stream_without_the_proxy_buffering_them() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let total: u64 = 256 * 1024 * 1024;
    let mut sender = connect::<http_body_util::Empty<Bytes>>(proxy.addr).await;
    let response = sender
        .send_request(
            Request::get(format!("/download?bytes={total}"))
                .header("host", proxy.addr.to_string())
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // Read 1 MiB, then stop reading: the mock must stall long before the end.
    let mut read = 0u64;
    while read < 1024 * 1024 {
        let frame = body.frame().await.unwrap().unwrap();
        read += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    let mut produced = mock.state.download_produced.load(Ordering::SeqCst);
    loop {
        tokio::time::sleep(mock::STALL).await;
        let now = mock.state.download_produced.load(Ordering::SeqCst);
        if now == produced {
            break;
        }
        produced = now;
    }
    let ahead = produced - read;
    eprintln!(
        "download: upstream stalled {} KiB ahead of the client",
        ahead / 1024
    );
    assert!(
        ahead < 24 * 1024 * 1024,
        "the upstream ran {} MiB ahead of a client that stopped reading",
        ahead / (1024 * 1024)
    );
    // Then the rest arrives, all of it.
    while let Some(frame) = body.frame().await {
        read += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(read, total);
}

#[tokio::test]
async fn uploads_stream_with_backpressure_and_arrive_intact() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let total: u64 = 256 * 1024 * 1024;
    let chunk = Bytes::from(mock::pattern(256 * 1024));
    *mock.state.pause_upload_after.lock().unwrap() = Some(1024 * 1024);

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok::<_, std::io::Error>(Frame::data(c))))
    }));
    let mut sender = connect(proxy.addr).await;
    let request = Request::post("/upload")
        .header("host", proxy.addr.to_string())
        .header("content-length", total)
        .body(body)
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(request).await });

    let paused = mock.state.paused.notified();
    let mut sent = 0u64;
    let mut hasher = sha2::Sha256::new();
    let mut stalled_at = None;
    while sent < total {
        let piece = chunk.slice(..chunk.len().min((total - sent) as usize));
        match tokio::time::timeout(mock::STALL, tx.send(piece.clone())).await {
            Ok(sent_ok) => sent_ok.unwrap(),
            Err(_) => {
                stalled_at = Some(sent);
                break;
            }
        }
        hasher.update(&piece);
        sent += piece.len() as u64;
    }
    paused.await;
    let read = mock.state.upload_read.load(Ordering::SeqCst);
    let stalled_at = stalled_at.expect("the client was held back while the upstream paused");
    let ahead = stalled_at - read;
    eprintln!(
        "upload: client stalled {} KiB ahead of the upstream",
        ahead / 1024
    );
    assert!(
        ahead < 24 * 1024 * 1024,
        "the client ran {} MiB ahead of an upstream that stopped reading",
        ahead / (1024 * 1024)
    );

    // Resume: everything arrives, byte for byte.
    mock.state.resume.notify_one();
    let piece = chunk.slice(..chunk.len().min((total - sent) as usize));
    tx.send(piece.clone()).await.unwrap();
    hasher.update(&piece);
    sent += piece.len() as u64;
    while sent < total {
        let piece = chunk.slice(..chunk.len().min((total - sent) as usize));
        tx.send(piece.clone()).await.unwrap();
        hasher.update(&piece);
        sent += piece.len() as u64;
    }
    drop(tx);
    let (response, body) = collect(response.await.unwrap().unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = json(&body);
    assert_eq!(answer["bytes"], total);
    assert_eq!(answer["sha256"], hex::encode(hasher.finalize()));
}

#[tokio::test]
async fn unknown_ca_is_a_clear_tls_error_not_a_bypass() {
    let mock = Mock::start().await;
    let mut settings = settings_for(&mock);
    settings.trust = TlsTrust::public();
    let proxy = start_proxy_with(settings, &mock.password, ServeOptions::default()).await;
    let (response, body) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let answer = json(&body);
    assert_eq!(answer["error"], "upstream_tls", "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains("UnknownIssuer") || message.contains("unknown issuer"),
        "{message}"
    );
    assert!(answer["fix"].as_str().unwrap().contains("--ca-cert"));
    assert!(
        mock.state.seen().is_empty(),
        "no request may pass an untrusted TLS session"
    );
}

#[tokio::test]
async fn unreachable_upstream_is_a_prompt_clear_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mock = Mock::start().await;
    let mut settings = settings_for(&mock);
    settings.server =
        credproxy::config::ServerUrl::parse(&format!("https://localhost:{port}")).unwrap();
    let proxy = start_proxy_with(settings, "pw", ServeOptions::default()).await;
    let (response, body) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let answer = json(&body);
    assert_eq!(answer["error"], "upstream_unreachable", "{answer}");
    eprintln!("{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains(&port.to_string())
    );
    // And the proxy still serves the next request.
    let (response, _) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn rejected_credentials_become_a_clear_error_and_back_off() {
    let mock = Mock::start().await;
    let proxy = start_proxy_with(
        settings_for(&mock),
        "wrong-password",
        ServeOptions::default(),
    )
    .await;
    let (response, body) = get(proxy.addr, "/api/users/me").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(response.headers().contains_key("retry-after"));
    let answer = json(&body);
    assert_eq!(answer["error"], "credentials_rejected");
    assert_eq!(answer["profile"], "test");
    assert!(
        answer["fix"]
            .as_str()
            .unwrap()
            .starts_with("credproxy login --profile test")
    );
    assert!(!String::from_utf8_lossy(&body).contains("wrong-password"));
    assert_eq!(mock.state.exchanges.load(Ordering::SeqCst), 1);
    // During the back-off the rejected credentials are not sent again.
    for _ in 0..5 {
        let (response, body) = get(proxy.addr, "/api/users/me").await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(json(&body)["error"], "credentials_rejected");
    }
    assert_eq!(mock.state.exchanges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight_and_stops_accepting() {
    let mock = Mock::start().await;
    let mut proxy = start_proxy(&mock).await;
    let total: u64 = 8 * 1024 * 1024;
    let mut sender = connect::<http_body_util::Empty<Bytes>>(proxy.addr).await;
    let response = sender
        .send_request(
            Request::get(format!("/download?bytes={total}"))
                .header("host", proxy.addr.to_string())
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    proxy.shutdown();
    // New connections are refused once the accept loop has stopped.
    let addr = proxy.addr;
    let mut refused = false;
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "the listener was closed on shutdown");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len() as u64, total, "the in-flight download completed");
    tokio::time::timeout(Duration::from_secs(10), &mut proxy.task)
        .await
        .expect("the server finished after draining")
        .unwrap();
}

#[tokio::test]
async fn upstream_connections_outlive_client_connections() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    // Twenty clients one after another, each on its own connection (as curl in a loop).
    for _ in 0..20 {
        let (response, _) = get(proxy.addr, "/api/server/ping").await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    // A client that left hands its upstream connection to the next one instead of each
    // paying for a TLS handshake; a client arriving just before the last one's hand-back
    // may open a second connection.
    let made = mock.state.connections.load(Ordering::SeqCst);
    assert!(
        made <= 3,
        "{made} upstream connections for 20 client connections"
    );

    // One client connection keeps one upstream connection for all its requests.
    let before = mock.state.connections.load(Ordering::SeqCst);
    let mut sender = connect::<http_body_util::Empty<Bytes>>(proxy.addr).await;
    for _ in 0..20 {
        let request = Request::get("/api/server/ping")
            .header("host", proxy.addr.to_string())
            .body(http_body_util::Empty::new())
            .unwrap();
        let (response, _) = collect(sender.send_request(request).await.unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let more = mock.state.connections.load(Ordering::SeqCst) - before;
    assert!(
        more <= 1,
        "{more} new upstream connections for one client connection"
    );
}

#[tokio::test]
async fn upstream_closing_idle_connections_costs_no_request() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    // One client stays connected (its upstream connection is driven), others come and go
    // (theirs wait in the pool).
    let mut sender = connect::<http_body_util::Empty<Bytes>>(proxy.addr).await;
    let ping = || {
        Request::get("/api/server/ping")
            .header("host", proxy.addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    for round in 0..3 {
        let (response, _) = collect(sender.send_request(ping()).await.unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        for _ in 0..3 {
            let (response, _) = get(proxy.addr, "/api/server/ping").await;
            assert_eq!(response.status(), StatusCode::OK);
        }
        // The last client's upstream connection is back in the pool (bounded wait: the
        // proxy's task notices the client left on its next turn).
        for _ in 0..10_000 {
            if proxy.proxy.idle_upstream_connections() > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(proxy.proxy.idle_upstream_connections(), 1, "round {round}");
        // The upstream drops every connection it holds, idle or not, as a keep-alive
        // timeout or a restart does; wait until it has.
        let open = mock.state.connections.load(Ordering::SeqCst)
            - mock.state.closed.load(Ordering::SeqCst);
        assert!(
            open > 0,
            "round {round}: the proxy keeps upstream connections"
        );
        let all_closed = async {
            loop {
                let closed = mock.state.closed_one.notified();
                if mock.state.connections.load(Ordering::SeqCst)
                    == mock.state.closed.load(Ordering::SeqCst)
                {
                    break;
                }
                mock.state.close_all.notify_waiters();
                // A connection accepted at this very moment may miss the call: ask again.
                let _ = tokio::time::timeout(Duration::from_millis(200), closed).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), all_closed)
            .await
            .expect("the mock closed its connections");
        // Nothing the clients send next fails for it: neither the connected client nor
        // new ones.
        let (response, _) = collect(sender.send_request(ping()).await.unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        for _ in 0..3 {
            let (response, body) = get(proxy.addr, "/api/server/ping").await;
            assert_eq!(response.status(), StatusCode::OK, "round {round}: {body:?}");
        }
    }
}
