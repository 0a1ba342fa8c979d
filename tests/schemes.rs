//! Auth schemes beyond Basic (Cloudflare Access service tokens, named headers), and the rule
//! that Immich never receives a Bearer it did not ask for.

mod common;

use common::mock::Mock;
use common::*;
use credproxy::credentials::Scheme;
use credproxy::credentials::Secret;
use credproxy::proxy::Proxy;
use credproxy::serve::{self, ServeOptions, Site};
use http::{Request, StatusCode};

async fn start_with_scheme(mock: &Mock, scheme: &Scheme, secret: &str) -> std::net::SocketAddr {
    let proxy =
        Proxy::with_secret(settings_for(mock), scheme, &Secret::new(secret.to_owned())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve::run(
        listener,
        Site::new(proxy),
        ServeOptions::default(),
        std::future::pending(),
    ));
    addr
}

#[tokio::test]
async fn cloudflare_access_service_tokens_pass_the_gate_and_no_authorization_reaches_immich() {
    let mock = Mock::start().await;
    mock.gate_wants(&[
        ("cf-access-client-id", "abc.access"),
        ("cf-access-client-secret", "s3cret"),
    ]);
    let addr = start_with_scheme(&mock, &Scheme::CloudflareAccess, "abc.access\ns3cret").await;
    let (response, _) = send(
        addr,
        Request::get("/echo")
            .header("host", addr.to_string())
            .header("authorization", "Bearer immich-session")
            .header("x-api-key", "k1"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = mock.state.last();
    assert_eq!(seen.headers["cf-access-client-id"], "abc.access");
    assert_eq!(seen.headers["cf-access-client-secret"], "s3cret");
    assert!(
        !seen.headers.contains_key("authorization"),
        "Immich must not get a Bearer it did not ask for"
    );
    assert_eq!(seen.headers["x-immich-user-token"], "immich-session");
    assert_eq!(seen.headers["x-api-key"], "k1");
}

#[tokio::test]
async fn named_header_schemes_inject_every_header_and_replace_forged_ones() {
    let mock = Mock::start().await;
    mock.gate_wants(&[("p-access-token-id", "tid"), ("p-access-token", "tok")]);
    let scheme = Scheme::new(
        "header",
        &["P-Access-Token-Id".into(), "P-Access-Token".into()],
    )
    .unwrap();
    let addr = start_with_scheme(&mock, &scheme, "tid\ntok").await;
    let (response, _) = send(
        addr,
        Request::get("/api/server/ping")
            .header("host", addr.to_string())
            .header("p-access-token", "forged-by-client")
            .header("authorization", "Basic Zm9vOmJhcg=="),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = mock.state.last();
    let tokens: Vec<_> = seen.headers.get_all("p-access-token").iter().collect();
    assert_eq!(tokens, ["tok"]);
    assert!(!seen.headers.contains_key("authorization"));
}

#[tokio::test]
async fn a_wrong_header_value_is_refused_by_the_gate_not_bypassed() {
    let mock = Mock::start().await;
    mock.gate_wants(&[
        ("cf-access-client-id", "abc.access"),
        ("cf-access-client-secret", "right"),
    ]);
    let addr = start_with_scheme(&mock, &Scheme::CloudflareAccess, "abc.access\nwrong").await;
    let (response, _) = get(addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn cloudflare_access_refusing_the_token_is_named_and_a_new_token_heals_the_proxy() {
    use credproxy::credentials::{CredentialStore, MemoryStore, StoreEntry};
    use credproxy::proxy::live::LiveCredentials;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let mock = Mock::start().await;
    mock.gate_is_cloudflare_access("abc.access", "new-secret");
    let store = Arc::new(MemoryStore::new());
    let answer = |token: &str| store.set("cf", &Secret::new(token.to_owned())).unwrap();
    answer("abc.access\nrevoked-secret");
    let source = Arc::new(StoreEntry::new(store.clone(), "cf"));
    // Read again at every rejected request (a second by default): no waiting on the clock.
    let credentials = LiveCredentials::load(Scheme::CloudflareAccess, String::new(), source)
        .unwrap()
        .reread_every(std::time::Duration::ZERO);
    let proxy = Proxy::new(settings_for(&mock), credentials).unwrap();
    let running = start_site(Site::new(proxy), ServeOptions::default()).await;

    // The client gets the clear error, not a redirect to a login page it cannot use.
    let (response, body) = get(running.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(!response.headers().contains_key("location"));
    let error = json(&body);
    assert_eq!(error["error"], "credentials_rejected", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("Cloudflare Access redirected to its login page"),
        "{message}"
    );

    // A new token in the store: the rejected proxy reads it again by itself.
    answer("abc.access\nnew-secret");
    let (response, body) = get(running.addr, "/api/server/ping").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the proxy did not read the new token: {body:?}"
    );
    assert_eq!(mock.state.rejected.load(Ordering::SeqCst), 1);
}
