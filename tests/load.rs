//! A bounded load test of the real binary: 10,240 requests over 256 concurrent connections on
//! loopback, zero errors, and the proxy's memory back near its idle level afterwards.
//! Needs the real Secret Service, like keyring_e2e (run through `tests/run`).

mod common;

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::mock::Mock;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const CONNECTIONS: usize = 256;
const REQUESTS_PER_CONNECTION: usize = 40;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Runs `per_connection` sequential requests on each of 256 concurrent connections, then
/// closes them; returns how many requests failed.
async fn burst(addr: std::net::SocketAddr, per_connection: usize) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let mut sender = common::connect::<Empty<Bytes>>(addr).await;
            let mut failures = 0;
            for _ in 0..per_connection {
                let request = Request::get("/api/server/ping")
                    .header("host", addr.to_string())
                    .body(Empty::new())
                    .unwrap();
                match sender.send_request(request).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        if response.into_body().collect().await.is_err() {
                            failures += 1;
                        }
                    }
                    _ => failures += 1,
                }
            }
            failures
        }));
    }
    let mut failures = 0;
    for task in tasks {
        failures += tokio::time::timeout(Duration::from_secs(300), task)
            .await
            .expect("the load finished in time")
            .unwrap();
    }
    failures
}

/// Waits (bounded: 10 s) until two readings 200 ms apart agree; returns the reading.
async fn steady(pid: u32) -> u64 {
    let mut last = rss_kib(pid);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss_kib(pid);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// Waits (bounded: 10 s) for the proxy's RSS to fall to `target` KiB; returns the last reading.
async fn settle(pid: u32, target: u64) -> u64 {
    let mut rss = rss_kib(pid);
    for _ in 0..100 {
        if rss <= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = rss_kib(pid);
    }
    rss
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_over_256_connections_without_errors() {
    assert!(
        std::env::var_os("CREDPROXY_KEYRING_SESSION").is_some(),
        "this test needs a real Secret Service: run the suite with `tests/run`"
    );
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = format!("load-{}", std::process::id());
    let bin = env!("CARGO_BIN_EXE_credproxy");
    let mut login = Command::new(bin)
        .args([
            "login",
            "--server",
            &mock.url(),
            "--username",
            &mock.username,
            "--profile",
            &profile,
            "--ca-cert",
            mock.ca_file.to_str().unwrap(),
            "--password-stdin",
        ])
        .env("CREDPROXY_CONFIG", &config)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    login
        .stdin
        .take()
        .unwrap()
        .write_all(mock.password.as_bytes())
        .await
        .unwrap();
    assert!(login.wait().await.unwrap().success());

    let mut serve = Command::new(bin)
        // Two server threads whatever the machine: the load crosses both.
        .args([
            "serve",
            "--profile",
            &profile,
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "2",
        ])
        .env("CREDPROXY_CONFIG", &config)
        .env("CREDPROXY_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = common::address_in(&line);
    let pid = serve.id().unwrap();

    let (warm, _) = common::get(addr, "/api/server/ping").await;
    assert_eq!(warm.status(), StatusCode::OK);
    let cold = rss_kib(pid);
    // A first burst fills the upstream keep-alive pool (up to 64 idle TLS connections); the
    // idle level is that of a warmed proxy, so the comparison is about what load leaves behind.
    assert_eq!(
        burst(addr, 2).await,
        0,
        "requests failed in the warm-up burst"
    );
    let idle = steady(pid).await;

    let failures = burst(addr, REQUESTS_PER_CONNECTION).await;
    let under_load = rss_kib(pid);
    assert_eq!(failures, 0, "requests failed under load");

    // The clients are gone. When the proxy has closed their connections it releases the
    // memory they used; watch for that, within a bound. 6 MiB of slack absorbs allocator
    // fragmentation and pool churn; a leak of 600 bytes per request would exceed it.
    let settled = settle(pid, idle + 6 * 1024).await;
    eprintln!(
        "proxy RSS: cold {cold} KiB, warm idle {idle} KiB, under load {under_load} KiB, settled {settled} KiB"
    );
    assert!(
        settled <= idle + 6 * 1024,
        "memory did not return to its idle level: idle {idle} KiB, settled {settled} KiB"
    );
    let (after, _) = common::get(addr, "/api/server/ping").await;
    assert_eq!(
        after.status(),
        StatusCode::OK,
        "still serving after the load"
    );
    serve.start_kill().unwrap();
}
