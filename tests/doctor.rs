//! `credproxy doctor`'s steps against the mock gated host.

mod common;

use std::time::Duration;

use common::mock::Mock;
use credproxy::config::ServerUrl;
use credproxy::credentials::{Scheme, Secret};
use credproxy::diagnose::check::Checker;
use credproxy::diagnose::doctor::{self, Status, Step};
use credproxy::upstream::TlsTrust;

async fn steps(mock: &Mock, trust: TlsTrust, secret: Option<&str>) -> Vec<Step> {
    steps_with(mock, trust, &Scheme::Basic, secret).await
}

async fn steps_with(
    mock: &Mock,
    trust: TlsTrust,
    scheme: &Scheme,
    secret: Option<&str>,
) -> Vec<Step> {
    let checker = Checker::new(
        ServerUrl::parse(&mock.url()).unwrap(),
        trust.client_config(&[b"http/1.1"], None).unwrap(),
        Duration::from_secs(10),
    );
    let secret = secret.map(|s| Secret::new(s.to_owned()));
    doctor::network_steps(&doctor::Target {
        checker: &checker,
        username: &mock.username,
        scheme,
        secret: secret.as_ref(),
        login_command: "credproxy login --profile test".to_owned(),
    })
    .await
}

fn by_name<'a>(steps: &'a [Step], name: &str) -> &'a Step {
    steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} step"))
}

/// The pin a verified connection reports, to compare with the unverified one.
async fn steps_pin(mock: &Mock) -> String {
    let steps = steps(mock, trust(mock), None).await;
    let tls = &by_name(&steps, "tls").detail;
    tls.split("pin ").nth(1).unwrap().trim().to_owned()
}

fn trust(mock: &Mock) -> TlsTrust {
    TlsTrust::public()
        .with_ca_pem(mock.ca_pem.as_bytes())
        .unwrap()
}

#[tokio::test]
async fn a_healthy_setup_passes_every_step_and_shows_the_pin() {
    let mock = Mock::start().await;
    let steps = steps(&mock, trust(&mock), Some(&mock.password)).await;
    let names: Vec<_> = steps.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "dns",
            "tcp",
            "tls",
            "gate",
            "credentials",
            "immich",
            "websocket"
        ]
    );
    for step in &steps {
        assert_eq!(step.status, Status::Pass, "{step}");
    }
    let tls = &by_name(&steps, "tls").detail;
    assert!(tls.contains("pin sha256/"), "{tls}");
    assert!(tls.contains("credproxy test CA"), "issuer shown: {tls}");
    assert!(by_name(&steps, "gate").detail.contains("Authentik"));
    assert_eq!(by_name(&steps, "immich").detail, "Immich v2.3.1");
}

#[tokio::test]
async fn wrong_credentials_fail_with_the_login_fix_and_skip_the_rest() {
    let mock = Mock::start().await;
    let steps = steps(&mock, trust(&mock), Some("wrong")).await;
    let credentials = by_name(&steps, "credentials");
    assert_eq!(credentials.status, Status::Fail);
    assert_eq!(
        credentials.fix.as_deref(),
        Some("credproxy login --profile test")
    );
    assert!(by_name(&steps, "immich").detail.starts_with("not checked"));
    assert_eq!(by_name(&steps, "gate").status, Status::Pass);
}

#[tokio::test]
async fn an_untrusted_certificate_fails_at_tls() {
    let mock = Mock::start().await;
    let steps = steps(&mock, TlsTrust::public(), Some(&mock.password)).await;
    assert_eq!(by_name(&steps, "dns").status, Status::Pass);
    assert_eq!(by_name(&steps, "tcp").status, Status::Pass);
    let tls = by_name(&steps, "tls");
    assert_eq!(tls.status, Status::Fail);
    assert!(tls.detail.contains("--ca-cert"), "{tls}");
    // It still shows what to pin, taken from the certificate the server presents.
    let healthy = steps_pin(&mock).await;
    let fix = tls.fix.as_deref().unwrap();
    assert!(fix.contains(&format!("--pin {healthy}")), "{fix}");
    assert!(
        by_name(&steps, "credentials")
            .detail
            .starts_with("not checked")
    );
}

#[tokio::test]
async fn missing_credentials_skip_the_authenticated_steps() {
    let mock = Mock::start().await;
    let steps = steps(&mock, trust(&mock), None).await;
    assert_eq!(by_name(&steps, "gate").status, Status::Pass);
    for name in ["credentials", "immich", "websocket"] {
        let step = by_name(&steps, name);
        assert_eq!(step.status, Status::Fail, "{name}");
        assert!(step.detail.contains("no stored credentials"), "{step}");
    }
}

#[tokio::test]
async fn a_server_without_a_gate_is_flagged() {
    let mock = Mock::start().await;
    mock.state
        .no_gate
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let steps = steps(&mock, trust(&mock), Some(&mock.password)).await;
    let gate = by_name(&steps, "gate");
    assert_eq!(gate.status, Status::Warn, "{gate}");
    assert!(gate.detail.contains("without any gate"), "{gate}");
}

#[tokio::test]
async fn cloudflare_access_is_recognised_as_the_gate_and_names_a_refused_token() {
    let mock = Mock::start().await;
    mock.gate_is_cloudflare_access("abc.access", "right");
    let scheme = Scheme::CloudflareAccess;
    let steps = steps_with(&mock, trust(&mock), &scheme, Some("abc.access\nright")).await;
    let gate = by_name(&steps, "gate");
    assert_eq!(gate.status, Status::Pass, "{gate}");
    assert!(gate.detail.contains("Cloudflare Access"), "{gate}");
    for step in &steps {
        assert_eq!(step.status, Status::Pass, "{step}");
    }

    let steps = steps_with(&mock, trust(&mock), &scheme, Some("abc.access\nrevoked")).await;
    let credentials = by_name(&steps, "credentials");
    assert_eq!(credentials.status, Status::Fail);
    assert!(
        credentials
            .detail
            .contains("Cloudflare Access redirected to its login page"),
        "{credentials}"
    );
}
