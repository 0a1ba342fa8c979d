//! Against a real nginx that requires client certificates (`ssl_verify_client on`): nginx
//! finishes the TLS handshake whatever the client sent and answers 400 with a page of its own,
//! where other servers end the handshake with an alert. The proxy and the checks must still
//! name the certificate problem and the fix, and pass nginx's other 400 pages on untouched.

mod common;

use std::time::Duration;

use common::nginx::Nginx;
use common::pki::{ClientCa, ServerCert, Validity};
use common::start_site;
use credproxy::credentials::{ClientIdentity, Injection, Scheme, Secret};
use credproxy::diagnose::check::{CheckError, Checker};
use credproxy::proxy::{Proxy, ProxySettings};
use credproxy::serve::{ServeOptions, Site};
use http::{StatusCode, header};

/// nginx with `ssl_verify_client on` for certificates of `client_ca`, answering Immich's ping.
fn nginx_requiring_client_certs(client_ca: &str) -> (Nginx, ServerCert) {
    let server = ServerCert::new("localhost");
    let nginx = Nginx::start(
        r#"
        ssl_certificate {dir}/server.pem;
        ssl_certificate_key {dir}/server.key;
        ssl_client_certificate {dir}/client-ca.pem;
        ssl_verify_client on;
        location = /api/server/ping {
            default_type application/json;
            return 200 '{"res":"pong"}';
        }
        location = /bad { return 400; }
        "#,
        &[
            ("server.pem", &server.cert_pem),
            ("server.key", &server.key_pem),
            ("client-ca.pem", client_ca),
        ],
    );
    (nginx, server)
}

fn settings(nginx: &Nginx, server: &ServerCert, identity: Option<&str>) -> ProxySettings {
    let url = format!("https://localhost:{}", nginx.addr.port());
    let profile = common::profile_at(&url, "svc", &server.ca_pem);
    let mut settings = ProxySettings::for_profile(&profile, profile.login_command(None)).unwrap();
    settings.identity = identity.map(|pem| ClientIdentity::from_pem(pem.as_bytes(), None).unwrap());
    settings
}

#[tokio::test]
async fn nginx_refusing_the_certificate_gets_the_clear_error_and_its_other_pages_pass() {
    let ca = ClientCa::new("credproxy test client CA");
    let good = ca.issue("laptop", Validity::Current).pem();
    let expired = ca.issue("old laptop", Validity::Expired).pem();
    let foreign = ClientCa::new("someone else's CA")
        .issue("stranger", Validity::Current)
        .pem();
    let (nginx, server) = nginx_requiring_client_certs(&ca.ca_pem);
    let refused = [
        (None, "asks for a client certificate and none was sent"),
        (Some(&expired), "refused the client certificate"),
        (Some(&foreign), "refused the client certificate"),
    ];
    for (identity, words) in refused {
        let settings = settings(&nginx, &server, identity.map(String::as_str));
        let secret = Secret::new("unused".to_owned());
        let proxy = Proxy::with_secret(settings, &Scheme::Basic, &secret).unwrap();
        let running = start_site(Site::new(proxy), ServeOptions::default()).await;
        let (response, body) = common::get(running.addr, "/api/server/ping").await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_GATEWAY,
            "{words}: {body:?}\nnginx: {}",
            nginx.error_log()
        );
        let answer = common::json(&body);
        assert_eq!(answer["error"], "client_certificate_rejected", "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(words), "{words:?} not in {message}");
        let fix = answer["fix"].as_str().unwrap();
        assert!(fix.ends_with("--client-cert FILE"), "{answer}");
        // The request never reached a gate: it says nothing of the credentials.
        let health = running.proxy.credentials().health();
        assert_eq!(health.last_accepted, None, "{words}");
        assert_eq!(health.rejected, None, "{words}");
    }

    let settings = settings(&nginx, &server, Some(&good));
    let secret = Secret::new("unused".to_owned());
    let proxy = Proxy::with_secret(settings, &Scheme::Basic, &secret).unwrap();
    let running = start_site(Site::new(proxy), ServeOptions::default()).await;
    // nginx's own 400 page, read whole to be looked at, goes to the client as it came (and,
    // like any answer that is not a gate's refusal, counts as the gate letting it through).
    let (response, body) = common::get(running.addr, "/bad").await;
    let health = running.proxy.credentials().health();
    assert!(health.last_accepted.is_some());
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let content_type = response.headers()[header::CONTENT_TYPE].to_str().unwrap();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let page = String::from_utf8_lossy(&body);
    assert!(page.contains("400 Bad Request"), "{page}");
    assert_eq!(
        response.headers()[header::CONTENT_LENGTH],
        body.len().to_string().as_str()
    );
    let (response, body) = common::get(running.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::OK, "{body:?}");
    assert_eq!(common::json(&body)["res"], "pong");
}

#[tokio::test]
async fn checks_name_nginx_refusing_the_certificate() {
    let ca = ClientCa::new("credproxy test client CA");
    let good = ca.issue("laptop", Validity::Current).pem();
    let expired = ca.issue("old laptop", Validity::Expired).pem();
    let (nginx, server) = nginx_requiring_client_certs(&ca.ca_pem);
    let credentials = Injection::basic("svc", &Secret::new("unused".to_owned()));
    let check = |identity: Option<&str>| {
        let settings = settings(&nginx, &server, identity);
        let (tls, auth) = settings
            .trust
            .client_config_seen(&[b"http/1.1"], settings.identity.as_ref())
            .unwrap();
        let checker = Checker::new(settings.server.clone(), tls, Duration::from_secs(10))
            .certificate_fix("log in with --client-cert FILE".to_owned());
        (checker, auth)
    };
    let (checker, auth) = check(Some(&good));
    checker
        .verify_credentials("svc", &credentials)
        .await
        .unwrap();
    assert!(auth.asked(), "nginx asked for the certificate");
    for (identity, words) in [
        (None, "asks for a client certificate and none was sent"),
        (Some(expired.as_str()), "refused the client certificate"),
    ] {
        let (checker, _) = check(identity);
        let err = checker
            .verify_credentials("svc", &credentials)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckError::ClientCertificate { .. }), "{err}");
        assert!(err.to_string().contains(words), "{err}");
        assert!(err.to_string().ends_with("log in with --client-cert FILE"));
    }
}
