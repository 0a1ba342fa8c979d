//! Home and away: a profile whose server is also at a LAN address. The "public" route reaches
//! the mock gated host through a delaying, bandwidth-limited relay; the "LAN" route reaches the
//! same host (same certificate name) through a plain relay that a test can take down and bring
//! back. A LAN address whose host has another certificate is never sent a request. A LAN
//! address that vanishes without a word (the laptop left home) is found out within the
//! silence timeout, in a network namespace of the test's own.

mod common;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use common::mock::Mock;
use common::relay::{Relay, Shape};
use common::{RunningProxy, collect, connect, json, profile_at, start_site};
use credproxy::config::LanRoute;
use credproxy::credentials::{Scheme, Secret};
use credproxy::proxy::route::RouteStatus;
use credproxy::proxy::{Proxy, ProxySettings};
use credproxy::serve::{ServeOptions, Site};

/// The public route: a round trip's worth of delay and an uplink's bandwidth.
const UPLINK: Shape = Shape {
    delay: Duration::from_millis(5),
    bytes_per_second: Some(20 * 1024 * 1024),
};

/// A proxy for `mock` whose public route is `public` and whose LAN address is `lan`, trying
/// the LAN route again at most every `probe_every` while away.
async fn proxy_with_lan(
    mock: &Mock,
    public: &Relay,
    lan: std::net::SocketAddr,
    probe_every: Duration,
) -> RunningProxy {
    proxy_with_lan_and(mock, public, lan, |settings| {
        settings.client.lan_probe_every = probe_every;
    })
    .await
}

/// As [`proxy_with_lan`], with settings as `adjust` leaves them.
async fn proxy_with_lan_and(
    mock: &Mock,
    public: &Relay,
    lan: std::net::SocketAddr,
    adjust: impl FnOnce(&mut ProxySettings),
) -> RunningProxy {
    let mut profile = profile_at(
        &format!("https://localhost:{}", public.addr.port()),
        &mock.username,
        &mock.ca_pem,
    );
    profile.lan = Some(LanRoute::parse(&lan.to_string(), &[], None).unwrap());
    let mut settings = ProxySettings::for_profile(&profile, profile.login_command(None)).unwrap();
    adjust(&mut settings);
    let secret = Secret::new(mock.password.clone());
    let proxy = Proxy::with_secret(settings, &Scheme::Basic, &secret).unwrap();
    start_site(Site::new(proxy), ServeOptions::default()).await
}

fn route(proxy: &RunningProxy) -> RouteStatus {
    proxy.proxy.routes().expect("a LAN route").status()
}

/// Uploads `len` bytes through the proxy on a connection of its own; the status and the
/// mock's JSON answer.
async fn upload(proxy: &RunningProxy, len: usize) -> (StatusCode, serde_json::Value) {
    let mut sender = connect::<Full<Bytes>>(proxy.addr).await;
    let request = Request::post("/upload")
        .header("host", proxy.addr.to_string())
        .body(Full::new(Bytes::from(common::mock::pattern(len))))
        .unwrap();
    let (response, body) = collect(sender.send_request(request).await.unwrap()).await;
    let answer = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (response.status(), answer)
}

/// A small upload of `body` to the proxy, for a client connection that sends several.
fn small_upload(proxy: &RunningProxy, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post("/upload")
        .header("host", proxy.addr.to_string())
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

/// A ping on a connection of its own: the status.
async fn ping(proxy: &RunningProxy) -> StatusCode {
    common::get(proxy.addr, "/api/server/ping").await.0.status()
}

#[tokio::test]
async fn at_home_uploads_go_the_lan_route_and_nothing_goes_public() {
    let mock = Mock::start().await;
    let public = Relay::start(mock.addr, UPLINK).await;
    let lan = Relay::start(mock.addr, Shape::default()).await;
    let proxy = proxy_with_lan(&mock, &public, lan.addr, Duration::from_secs(30)).await;

    let (status, answer) = upload(&proxy, 4 * 1024 * 1024).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["bytes"], 4 * 1024 * 1024);
    assert_eq!(
        public.carried.bytes_up.load(Ordering::SeqCst),
        0,
        "nothing went the public way"
    );
    assert!(lan.carried.bytes_up.load(Ordering::SeqCst) > 4 * 1024 * 1024);
    // The credentials went the LAN route too (the LAN front may gate).
    assert!(mock.state.last().headers.contains_key("authorization"));
    let status = route(&proxy);
    assert_eq!(status.route, "lan", "{status:?}");
    assert_eq!(status.lan_bytes_up, 4 * 1024 * 1024, "{status:?}");
    assert_eq!(status.public_requests, 0, "{status:?}");
    assert_eq!(status.switches, 0, "{status:?}");
}

#[tokio::test]
async fn the_lan_going_away_moves_requests_public_without_an_error_and_they_come_home() {
    let mock = Mock::start().await;
    let public = Relay::start(mock.addr, UPLINK).await;
    let mut lan = Relay::start(mock.addr, Shape::default()).await;
    let probe_every = Duration::from_millis(200);
    let proxy = proxy_with_lan(&mock, &public, lan.addr, probe_every).await;
    // One client connection for the whole session: its LAN connection is pooled.
    let mut client = connect::<Full<Bytes>>(proxy.addr).await;
    let request = |body| small_upload(&proxy, body);
    let (response, _) = collect(client.send_request(request(b"home")).await.unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(route(&proxy).route, "lan");

    // The LAN server goes away: the next requests, not yet sent, go public, no error.
    lan.stop().await;
    for _ in 0..3 {
        let (response, body) = collect(client.send_request(request(b"away")).await.unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK, "{body:?}");
        assert_eq!(json(&body)["bytes"], 4);
    }
    let status = route(&proxy);
    assert_eq!(status.route, "public", "{status:?}");
    assert_eq!(status.switches, 1, "{status:?}");
    assert!(status.why.contains("cannot be reached"), "{status:?}");
    assert_eq!(status.public_requests, 3, "{status:?}");

    // Idle while away: the LAN address is not tried.
    let tried = lan.carried.connections.load(Ordering::SeqCst);
    tokio::time::sleep(probe_every * 3).await;
    assert_eq!(lan.carried.connections.load(Ordering::SeqCst), tried);

    // It comes back: with requests flowing, they go home again within the probe interval.
    lan.restart().await;
    let back = Instant::now();
    let mut sent = 0;
    while route(&proxy).route != "lan" {
        assert!(
            back.elapsed() < probe_every * 20,
            "still away {:?} after the LAN came back",
            back.elapsed()
        );
        let (response, _) = collect(client.send_request(request(b"flow")).await.unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        sent += 1;
    }
    let status = route(&proxy);
    assert_eq!(status.switches, 2, "{status:?}");
    // At most one try per probe interval while requests flowed.
    let tries = lan.carried.connections.load(Ordering::SeqCst) - tried;
    let allowed = back.elapsed().as_millis() / probe_every.as_millis() + 2;
    assert!(
        tries as u128 <= allowed,
        "{tries} tries in {:?} ({sent} requests)",
        back.elapsed()
    );
    let (response, _) = collect(client.send_request(request(b"home")).await.unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(route(&proxy).lan_requests, 2);
}

#[tokio::test]
async fn an_upload_cut_on_the_lan_is_not_sent_again_the_public_way() {
    let mock = Mock::start().await;
    let public = Relay::start(mock.addr, UPLINK).await;
    let lan = Relay::start(mock.addr, Shape::default()).await;
    let proxy = proxy_with_lan(&mock, &public, lan.addr, Duration::from_secs(30)).await;
    assert_eq!(ping(&proxy).await, StatusCode::OK);
    // `/die` reads a part of the upload and drops the connection.
    let mut sender = connect::<Full<Bytes>>(proxy.addr).await;
    let request = Request::post("/die")
        .header("host", proxy.addr.to_string())
        .body(Full::new(Bytes::from(common::mock::pattern(
            4 * 1024 * 1024,
        ))))
        .unwrap();
    let (response, body) = collect(sender.send_request(request).await.unwrap()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(json(&body)["source"], "credproxy");
    // The message names the route that failed: the public address may be fine.
    let message = json(&body)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains(&format!("by the LAN route {}", lan.addr)),
        "{message}"
    );
    assert_eq!(
        public.carried.bytes_up.load(Ordering::SeqCst),
        0,
        "the part-sent upload was not sent the public way"
    );
}

#[tokio::test]
async fn a_lan_host_with_another_certificate_is_sent_nothing() {
    let mock = Mock::start().await;
    // Same name (localhost), another CA: not the profile's server.
    let foreign = Mock::start().await;
    let public = Relay::start(mock.addr, UPLINK).await;
    let proxy = proxy_with_lan(&mock, &public, foreign.addr, Duration::from_millis(50)).await;
    for _ in 0..3 {
        let (status, answer) = upload(&proxy, 64 * 1024).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    assert!(
        foreign.state.seen().is_empty(),
        "the foreign host saw {:?}",
        foreign.state.seen()
    );
    assert_eq!(foreign.state.upload_read.load(Ordering::SeqCst), 0);
    let status = route(&proxy);
    assert_eq!(status.route, "public", "{status:?}");
    assert!(
        status.why.contains("did not prove to be localhost"),
        "{status:?}"
    );
    assert!(status.why.contains("--lan-pin"), "{status:?}");
    assert_eq!(status.public_requests, 3, "{status:?}");
}

#[tokio::test]
async fn client_certificates_and_header_schemes_work_on_the_lan_route() {
    let ca = common::pki::ClientCa::new("credproxy test client CA");
    let client = ca.issue("laptop", common::pki::Validity::Current);
    let mock = Mock::start_requiring_client_certs(&ca.ca_pem).await;
    mock.gate_is_cloudflare_access("id.access", "cf-secret");
    let public = Relay::start(mock.addr, UPLINK).await;
    let lan = Relay::start(mock.addr, Shape::default()).await;
    let mut profile = profile_at(
        &format!("https://localhost:{}", public.addr.port()),
        "",
        &mock.ca_pem,
    );
    profile.auth = Scheme::CloudflareAccess;
    profile.lan = Some(LanRoute::parse(&lan.addr.to_string(), &[], None).unwrap());
    let mut settings = ProxySettings::for_profile(&profile, profile.login_command(None)).unwrap();
    settings.identity = Some(
        credproxy::credentials::ClientIdentity::from_pem(client.pem().as_bytes(), None).unwrap(),
    );
    let secret = Secret::new("id.access\ncf-secret".to_owned());
    let proxy = Proxy::with_secret(settings, &Scheme::CloudflareAccess, &secret).unwrap();
    let proxy = start_site(Site::new(proxy), ServeOptions::default()).await;
    assert_eq!(ping(&proxy).await, StatusCode::OK);
    let seen = mock.state.last();
    assert!(seen.client_cert.is_some());
    assert_eq!(seen.headers["cf-access-client-secret"], "cf-secret");
    assert_eq!(public.carried.bytes_up.load(Ordering::SeqCst), 0);
    assert_eq!(route(&proxy).lan_requests, 1);
}

/// The LAN address in the test's own network namespace: on its loopback until the test takes
/// it away.
const LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

/// Runs `test` in a network namespace of its own (this thread's, and so of everything it
/// starts: the mock, the relays, the proxy, `ip`), with loopback up and [`LAN_IP`] on it.
fn in_a_network_of_its_own(test: impl Future<Output = ()>) {
    // SAFETY: unshare(2) with CLONE_NEWNET moves only the calling thread to a new namespace.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        unshared,
        0,
        "a network namespace of the test's own needs root (CAP_SYS_ADMIN), as tests/run has: {}",
        std::io::Error::last_os_error()
    );
    ip(&["link", "set", "lo", "up"]);
    ip(&["addr", "add", &format!("{LAN_IP}/32"), "dev", "lo"]);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(test);
}

/// Runs iproute2's `ip` with `args` (in the test's namespace).
fn ip(args: &[&str]) {
    let program = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .unwrap_or("ip");
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|err| panic!("cannot run {program} (iproute2): {err}"));
    assert!(status.success(), "ip {args:?}: {status}");
}

#[test]
fn a_lan_that_goes_silent_fails_one_request_within_the_silence_timeout_then_requests_go_public() {
    in_a_network_of_its_own(async {
        let mock = Mock::start().await;
        let public = Relay::start(mock.addr, UPLINK).await;
        let lan = Relay::start_on(IpAddr::V4(LAN_IP), mock.addr, Shape::default()).await;
        let silence = Duration::from_secs(1);
        let proxy = proxy_with_lan_and(&mock, &public, lan.addr, |settings| {
            settings.client.silence_timeout = silence;
        })
        .await;
        let mut client = connect::<Full<Bytes>>(proxy.addr).await;
        let request = |body| small_upload(&proxy, body);
        let (response, _) = collect(client.send_request(request(b"home")).await.unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(route(&proxy).route, "lan");

        // The laptop leaves home: the LAN address is gone. Nothing closes or resets the open
        // LAN connection; what is sent on it is just never acknowledged.
        ip(&["addr", "del", &format!("{LAN_IP}/32"), "dev", "lo"]);
        let left = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            client.send_request(request(b"left")),
        )
        .await
        .expect("no answer 20 s after the LAN went silent (TCP alone waits ~15 min)");
        let (response, body) = collect(answer.unwrap()).await;
        // Written on the LAN connection: not sent again the public way, and said so.
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{body:?}");
        let message = json(&body)["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("went silent"), "{message}");
        assert!(
            message.contains(&format!("by the LAN route {}", lan.addr)),
            "{message}"
        );
        assert!(
            left.elapsed() >= silence,
            "failed before the silence timeout"
        );

        // The next requests go the public way without an error.
        for _ in 0..2 {
            let (response, body) =
                collect(client.send_request(request(b"away")).await.unwrap()).await;
            assert_eq!(response.status(), StatusCode::OK, "{body:?}");
        }
        let status = route(&proxy);
        assert_eq!(status.route, "public", "{status:?}");
        assert!(status.why.contains("cannot be reached"), "{status:?}");
        assert_eq!(status.public_requests, 2, "{status:?}");
        assert!(public.carried.bytes_up.load(Ordering::SeqCst) > 0);
    });
}
