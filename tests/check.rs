//! `login`'s verification: each failing step is named precisely.

mod common;

use std::time::Duration;

use common::mock::Mock;
use credproxy::config::ServerUrl;
use credproxy::credentials::Secret;
use credproxy::credentials::basic_value;
use credproxy::diagnose::check::{CheckError, Checker};
use credproxy::upstream::TlsTrust;

fn checker(url: &str, trust: &TlsTrust) -> Checker {
    Checker::new(
        ServerUrl::parse(url).unwrap(),
        trust.client_config(&[b"http/1.1"], None).unwrap(),
        Duration::from_secs(10),
    )
}

fn mock_trust(mock: &Mock) -> TlsTrust {
    TlsTrust::public().with_ca_file(&mock.ca_file).unwrap()
}

#[tokio::test]
async fn good_credentials_verify() {
    let mock = Mock::start().await;
    let auth = basic_value(&mock.username, &Secret::new(mock.password.clone())).into();
    checker(&mock.url(), &mock_trust(&mock))
        .verify_credentials(&mock.username, &auth)
        .await
        .unwrap();
}

#[tokio::test]
async fn wrong_password_is_named_as_an_authentik_rejection() {
    let mock = Mock::start().await;
    let auth = basic_value(&mock.username, &Secret::new("nope".into())).into();
    let err = checker(&mock.url(), &mock_trust(&mock))
        .verify_credentials(&mock.username, &auth)
        .await
        .unwrap_err();
    assert!(matches!(err, CheckError::Rejected { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("rejected") && text.contains(&mock.username),
        "{text}"
    );
    assert!(!text.contains("nope"));
}

#[tokio::test]
async fn unknown_ca_is_named_as_tls() {
    let mock = Mock::start().await;
    let auth = basic_value(&mock.username, &Secret::new(mock.password.clone())).into();
    let err = checker(&mock.url(), &TlsTrust::public())
        .verify_credentials(&mock.username, &auth)
        .await
        .unwrap_err();
    assert!(matches!(err, CheckError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("--ca-cert"), "{err}");
}

#[tokio::test]
async fn closed_port_is_named_as_connect() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = checker(&format!("https://127.0.0.1:{port}"), &TlsTrust::public())
        .verify_credentials("u", &basic_value("u", &Secret::new("p".into())).into())
        .await
        .unwrap_err();
    assert!(matches!(err, CheckError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn unresolvable_name_is_named_as_dns() {
    let err = checker("https://no-such-host.invalid", &TlsTrust::public())
        .verify_credentials("u", &basic_value("u", &Secret::new("p".into())).into())
        .await
        .unwrap_err();
    assert!(matches!(err, CheckError::Dns { .. }), "{err}");
}

#[tokio::test]
async fn a_server_that_is_not_immich_is_named_so() {
    let mock = Mock::start().await;
    mock.state
        .not_immich
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let auth = basic_value(&mock.username, &Secret::new(mock.password.clone())).into();
    let err = checker(&mock.url(), &mock_trust(&mock))
        .verify_credentials(&mock.username, &auth)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CheckError::NotImmich { status: 200, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("text/html"), "{err}");
}
