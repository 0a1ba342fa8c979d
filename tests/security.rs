//! Guards against local attackers, key pinning, limits, and faults that must lose nothing.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::mock::Mock;
use common::*;
use credproxy::credentials::Secret;
use credproxy::serve::{ServeOptions, Site};
use credproxy::upstream::TlsTrust;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn nothing_forwarded(mock: &Mock) {
    assert!(
        mock.state.seen().is_empty(),
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn dns_rebinding_hosts_are_refused_and_nothing_is_forwarded() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let port = proxy.addr.port();
    for host in [
        format!("evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        "127.0.0.1:1".to_owned(),
        "localhost".to_owned(),
    ] {
        let (response, body) = send(
            proxy.addr,
            Request::get("/api/users/me").header("host", host.as_str()),
        )
        .await;
        assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST, "{host}");
        assert_eq!(json(&body)["error"], "host_not_allowed");
    }
    nothing_forwarded(&mock);
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let (response, _) = send(
            proxy.addr,
            Request::get("/api/server/ping").header("host", host.as_str()),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK, "{host}");
    }
}

#[tokio::test]
async fn allowed_extra_host_names_are_served() {
    let mock = Mock::start().await;
    let site = Site {
        allow_hosts: vec!["photos.lan".to_owned()],
        ..Site::new(mock_proxy(&mock))
    };
    let proxy = start_site(site, ServeOptions::default()).await;
    let host = format!("photos.lan:{}", proxy.addr.port());
    let (response, _) = send(
        proxy.addr,
        Request::get("/api/server/ping").header("host", host.as_str()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn cross_site_requests_are_refused_and_nothing_is_forwarded() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let host = proxy.addr.to_string();
    for (name, value) in [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let (response, body) = send(
            proxy.addr,
            Request::post("/api/assets")
                .header("host", host.as_str())
                .header(name, value),
        )
        .await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{name}: {value}");
        assert!(json(&body)["message"].as_str().unwrap().contains("refused"));
    }
    nothing_forwarded(&mock);
    let local_origin = format!("http://{host}");
    let (response, _) = send(
        proxy.addr,
        Request::get("/api/server/ping")
            .header("host", host.as_str())
            .header("origin", local_origin.as_str())
            .header("sec-fetch-site", "same-origin"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_local_credential_is_required_and_never_forwarded() {
    let mock = Mock::start().await;
    let token = Secret::new("local-token-xyz".to_owned());
    let site = Site {
        local_token: Some(token),
        ..Site::new(mock_proxy(&mock))
    };
    let proxy = start_site(site, ServeOptions::default()).await;
    let (response, _) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic realm=")
    );
    let wrong = send(
        proxy.addr,
        Request::get("/api/server/ping")
            .header("host", proxy.addr.to_string())
            .header("authorization", "Basic Y3JlZHByb3h5Ondyb25n"),
    )
    .await;
    assert_eq!(wrong.0.status(), StatusCode::UNAUTHORIZED);
    nothing_forwarded(&mock);

    // What a client does with http://credproxy:local-token-xyz@127.0.0.1:PORT
    let local = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "credproxy:local-token-xyz"
        )
    );
    let (response, _) = send(
        proxy.addr,
        Request::get("/api/server/ping")
            .header("host", proxy.addr.to_string())
            .header("authorization", local.as_str()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = mock.state.last();
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth.len(), 1);
    assert_ne!(
        auth[0],
        local.as_str(),
        "the local credential was removed before forwarding"
    );
}

async fn mock_pin(mock: &Mock) -> String {
    let checker = credproxy::diagnose::check::Checker::new(
        credproxy::config::ServerUrl::parse(&mock.url()).unwrap(),
        TlsTrust::public()
            .with_ca_pem(mock.ca_pem.as_bytes())
            .unwrap()
            .client_config(&[], None)
            .unwrap(),
        Duration::from_secs(10),
    );
    checker.certificates().await.unwrap()[0].spki_pin.clone()
}

#[tokio::test]
async fn a_pinned_key_is_trusted_without_a_ca_and_a_wrong_pin_is_refused() {
    let mock = Mock::start().await;
    let pin = mock_pin(&mock).await;

    // Pin alone: the self-signed-style certificate is accepted with no CA configured.
    let mut settings = settings_for(&mock);
    settings.trust = TlsTrust::public().with_pin(&pin).unwrap();
    let proxy = start_proxy_with(settings, &mock.password, ServeOptions::default()).await;
    let (response, _) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::OK);

    // A wrong pin is refused even though the CA would verify the chain.
    let mut settings = settings_for(&mock);
    settings.trust = TlsTrust::public()
        .with_ca_pem(mock.ca_pem.as_bytes())
        .unwrap()
        .with_pin("sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")
        .unwrap();
    let seen_before = mock.state.seen().len();
    let proxy = start_proxy_with(settings, &mock.password, ServeOptions::default()).await;
    let (response, body) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let answer = json(&body);
    assert_eq!(answer["error"], "upstream_tls", "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains("pinned key") && message.contains(&pin),
        "{message}"
    );
    assert_eq!(
        mock.state.seen().len(),
        seen_before,
        "nothing sent to an unpinned key"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let mock = Mock::start().await;
    // The serving thread keeps real time: a short timeout keeps the test short.
    let options = ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let proxy = start_proxy_with(settings_for(&mock), &mock.password, options).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /api/server/ping HTTP/1.1\r\nHost: ")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed only after the timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    nothing_forwarded(&mock);
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nX-Big: {}\r\n\r\n",
        proxy.addr,
        "a".repeat(128 * 1024)
    );
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    nothing_forwarded(&mock);
}

#[tokio::test]
async fn connections_beyond_the_limit_get_a_clean_503_and_service_recovers() {
    let mock = Mock::start().await;
    let options = ServeOptions {
        max_connections: 2,
        ..ServeOptions::default()
    };
    let proxy = start_proxy_with(settings_for(&mock), &mock.password, options).await;
    // Two held connections, each proven accepted by a completed request.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut sender = connect::<http_body_util::Empty<Bytes>>(proxy.addr).await;
        let response = sender
            .send_request(
                Request::get("/api/server/ping")
                    .header("host", proxy.addr.to_string())
                    .body(http_body_util::Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        held.push(sender);
    }
    let refused = raw_exchange(
        proxy.addr,
        format!(
            "GET /api/server/ping HTTP/1.1\r\nHost: {}\r\n\r\n",
            proxy.addr
        )
        .as_bytes(),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("too many connections"));
    held.clear();
    // Once the held connections close, new ones are served again.
    let mut served = false;
    for _ in 0..200 {
        let answer = raw_exchange(
            proxy.addr,
            format!(
                "GET /api/server/ping HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                proxy.addr
            )
            .as_bytes(),
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(served, "the proxy serves again once connections free up");
}

#[tokio::test]
async fn a_slow_but_progressing_upload_is_not_cut_by_any_timeout() {
    let mock = Mock::start().await;
    let mut settings = settings_for(&mock);
    settings.idle_timeout = Duration::from_millis(500);
    let options = ServeOptions {
        header_read_timeout: Duration::from_millis(500),
        ..ServeOptions::default()
    };
    let proxy = start_proxy_with(settings, &mock.password, options).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Length: 6000\r\nConnection: close\r\n\r\n",
        proxy.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // 6 pieces 200 ms apart: 1.2 s in all, longer than both timeouts, never idle for either.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream.write_all(&[b'x'; 1000]).await.unwrap();
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"bytes\":6000"), "{answer}");
}

#[tokio::test]
async fn upstream_dying_mid_upload_is_an_error_for_the_client_never_a_2xx() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let total = 16 * 1024 * 1024;
    let head = format!(
        "POST /die HTTP/1.1\r\nHost: {}\r\nContent-Length: {total}\r\n\r\n",
        proxy.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let writer = async {
        let chunk = vec![b'y'; 64 * 1024];
        for _ in 0..(total / chunk.len()) {
            if stream.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.starts_with("HTTP/1.1 2"),
        "a cut-off upload looked successful: {answer}"
    );
    // The proxy serves the next request normally.
    let (response, _) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::OK);
}

async fn client_aborts_mid_upload(chunked: bool) {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    let done = mock.state.upload_done.notified();
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", 8 * 1024 * 1024)
    };
    stream
        .write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: {}\r\n{framing}\r\n\r\n",
                proxy.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    for _ in 0..16 {
        let piece = vec![b'z'; 64 * 1024];
        if chunked {
            stream
                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .await
                .unwrap();
            stream.write_all(&piece).await.unwrap();
            stream.write_all(b"\r\n").await.unwrap();
        } else {
            stream.write_all(&piece).await.unwrap();
        }
    }
    // The client goes away after 1 MiB, mid-body.
    drop(stream);
    tokio::time::timeout(Duration::from_secs(30), done)
        .await
        .expect("the upstream noticed the end of the upload");
    assert_eq!(
        *mock.state.upload_aborted.lock().unwrap(),
        Some(true),
        "the upstream saw a complete-looking body from an aborted upload"
    );
    let (response, _) = get(proxy.addr, "/api/server/ping").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "served normally after the fault"
    );
}

#[tokio::test]
async fn a_client_aborting_a_sized_upload_aborts_the_upstream_request() {
    client_aborts_mid_upload(false).await;
}

#[tokio::test]
async fn a_client_aborting_a_chunked_upload_aborts_the_upstream_request() {
    client_aborts_mid_upload(true).await;
}
