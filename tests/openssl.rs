//! Against real OpenSSL servers that require a client certificate. `openssl s_server` finishes
//! the TLS 1.3 handshake and sends its alert (`certificate_required`, `unknown_ca`) after it:
//! the client learns it on its first read. Python's asyncio TLS server (OpenSSL underneath)
//! drops the connection without delivering any alert. The proxy, the checks, `login` and
//! `doctor` must name the certificate problem and the fix either way.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pki::{ClientCa, ServerCert, Validity};
use common::start_site;
use credproxy::credentials::{ClientIdentity, Injection, Scheme, Secret};
use credproxy::diagnose::check::{CheckError, Checker};
use credproxy::proxy::{Proxy, ProxySettings};
use credproxy::serve::{ServeOptions, Site};
use http::StatusCode;

/// Which OpenSSL server.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `openssl s_server -Verify 1 -verify_return_error -WWW`: sends the alert.
    SServer,
    /// `tests/data/asyncio-mtls-server.py`: drops the connection, no alert.
    Asyncio,
}

impl Kind {
    /// Words the refusal must carry when no certificate was sent, and when a certificate of a
    /// CA the server does not trust was.
    fn expected(self) -> (&'static str, &'static str) {
        match self {
            Kind::SServer => (
                "asks for a client certificate and none was sent (TLS alert certificate_required)",
                "does not trust the issuer of the client certificate (TLS alert unknown_ca)",
            ),
            Kind::Asyncio => (
                "asks for a client certificate and none was sent (it closed the connection without a TLS alert)",
                "closed the connection without a TLS alert once it had the certificate: it does not accept it",
            ),
        }
    }
}

/// A running OpenSSL server on loopback that requires certificates of one client CA and
/// answers Immich's ping; killed when dropped.
struct Server {
    addr: SocketAddr,
    cert: ServerCert,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(kind: Kind, client_ca: &str) -> Server {
        let cert = ServerCert::new("localhost");
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (server_pem, server_key, ca) = (
            file("server.pem", &cert.cert_pem),
            file("server.key", &cert.key_pem),
            file("client-ca.pem", client_ca),
        );
        let (child, addr) = match kind {
            Kind::SServer => {
                // -WWW serves files under its working directory: the ping is one.
                let www = dir.path().join("www");
                std::fs::create_dir_all(www.join("api/server")).unwrap();
                std::fs::write(www.join("api/server/ping"), r#"{"res":"pong"}"#).unwrap();
                let mut child = Command::new("openssl")
                    .args(["s_server", "-accept", "127.0.0.1:0", "-cert"])
                    .arg(&server_pem)
                    .arg("-key")
                    .arg(&server_key)
                    .arg("-CAfile")
                    .arg(&ca)
                    .args(["-Verify", "1", "-verify_return_error", "-WWW"])
                    .current_dir(&www)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("these tests need the openssl command (Debian package openssl)");
                // It names the port it bound once it listens: no waiting on the clock.
                let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
                let addr = lines
                    .by_ref()
                    .map_while(Result::ok)
                    .find_map(|line| line.strip_prefix("ACCEPT ")?.parse().ok())
                    .expect("s_server printed its address");
                // Whatever it prints later is read, so it never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                (child, addr)
            }
            Kind::Asyncio => {
                // The server inherits the listener as its standard input: connections queue
                // from the first moment.
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let script = concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/data/asyncio-mtls-server.py"
                );
                let child = Command::new("python3")
                    .arg(script)
                    .arg(&server_pem)
                    .arg(&server_key)
                    .arg(&ca)
                    .stdin(Stdio::from(OwnedFd::from(listener)))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("these tests need python3");
                (child, addr)
            }
        };
        Server {
            addr,
            cert,
            child,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    fn settings(&self, identity: Option<&str>) -> ProxySettings {
        let profile = common::profile_at(&self.url(), "svc", &self.cert.ca_pem);
        let mut settings =
            ProxySettings::for_profile(&profile, profile.login_command(None)).unwrap();
        settings.identity =
            identity.map(|pem| ClientIdentity::from_pem(pem.as_bytes(), None).unwrap());
        settings
    }

    fn checker(&self, identity: Option<&str>) -> Checker {
        let settings = self.settings(identity);
        let tls = settings
            .trust
            .client_config(&[b"http/1.1"], settings.identity.as_ref())
            .unwrap();
        Checker::new(settings.server.clone(), tls, Duration::from_secs(10))
            .certificate_fix("log in with --client-cert FILE".to_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy and the checks against `kind`: none and a foreign certificate refused with
/// their own words, the right one let through.
async fn refusals_are_named(kind: Kind) {
    let ca = ClientCa::new("credproxy test client CA");
    let good = ca.issue("laptop", Validity::Current).pem();
    let foreign = ClientCa::new("someone else's CA")
        .issue("stranger", Validity::Current)
        .pem();
    let server = Server::start(kind, &ca.ca_pem);
    let (none_words, foreign_words) = kind.expected();
    let credentials = Injection::basic("svc", &Secret::new("unused".to_owned()));
    for (identity, words) in [(None, none_words), (Some(&foreign), foreign_words)] {
        let proxy = Proxy::with_secret(
            server.settings(identity.map(String::as_str)),
            &Scheme::Basic,
            &Secret::new("unused".to_owned()),
        )
        .unwrap();
        let running = start_site(Site::new(proxy), ServeOptions::default()).await;
        let (response, body) = common::get(running.addr, "/api/server/ping").await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_GATEWAY,
            "{kind:?}: {body:?}"
        );
        let answer = common::json(&body);
        assert_eq!(answer["error"], "client_certificate_rejected", "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains(words),
            "{kind:?}: {words:?} not in {message}"
        );
        assert!(
            answer["fix"]
                .as_str()
                .unwrap()
                .ends_with("--client-cert FILE"),
            "{answer}"
        );

        let err = server
            .checker(identity.map(String::as_str))
            .verify_credentials("svc", &credentials)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckError::ClientCertificate { .. }),
            "{kind:?}: {err}"
        );
        assert!(err.to_string().contains(words), "{kind:?}: {err}");
        assert!(err.to_string().ends_with("log in with --client-cert FILE"));
    }

    let proxy = Proxy::with_secret(
        server.settings(Some(&good)),
        &Scheme::Basic,
        &Secret::new("unused".to_owned()),
    )
    .unwrap();
    let running = start_site(Site::new(proxy), ServeOptions::default()).await;
    let (response, body) = common::get(running.addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::OK, "{kind:?}: {body:?}");
    assert_eq!(common::json(&body)["res"], "pong");
    server
        .checker(Some(&good))
        .verify_credentials("svc", &credentials)
        .await
        .unwrap();
}

#[tokio::test]
async fn openssl_s_server_alerts_after_the_handshake_are_named() {
    refusals_are_named(Kind::SServer).await;
}

#[tokio::test]
async fn a_server_that_drops_the_connection_without_an_alert_is_named() {
    refusals_are_named(Kind::Asyncio).await;
}

/// `login` and `doctor` of the real binary say what the server wants, whichever way it
/// refuses.
#[tokio::test]
async fn login_and_doctor_name_the_missing_certificate() {
    common::binary::require_secret_service();
    let ca = ClientCa::new("credproxy test client CA");
    for kind in [Kind::SServer, Kind::Asyncio] {
        let server = Server::start(kind, &ca.ca_pem);
        let (words, _) = kind.expected();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let ca_file = dir.path().join("server-ca.pem");
        std::fs::write(&ca_file, &server.cert.ca_pem).unwrap();
        let profile = common::binary::unique_profile("openssl");
        let url = server.url();
        let login = |extra: &'static [&'static str]| {
            let args = [
                &[
                    "login",
                    "--server",
                    url.as_str(),
                    "--profile",
                    profile.as_str(),
                    "--username",
                    "svc",
                    "--ca-cert",
                    ca_file.to_str().unwrap(),
                    "--password-stdin",
                ][..],
                extra,
            ]
            .concat();
            let config = config.clone();
            async move { common::binary::run(&config, &args, Some("app-password\n")).await }
        };
        let refused = login(&[]).await;
        assert_eq!(refused.code, Some(1), "{kind:?}: {}", refused.stderr);
        assert!(
            refused.stderr.contains(words),
            "{kind:?}: {}",
            refused.stderr
        );
        assert!(
            refused.stderr.contains("--client-cert"),
            "{kind:?}: {}",
            refused.stderr
        );

        let stored = login(&["--no-verify"]).await;
        assert_eq!(stored.code, Some(0), "{kind:?}: {}", stored.stderr);
        let doctor =
            common::binary::run(&config, &["doctor", "--profile", profile.as_str()], None).await;
        let gate = doctor
            .stdout
            .lines()
            .find(|line| line.contains(" gate "))
            .unwrap_or_else(|| panic!("{kind:?}: no gate line in {}", doctor.stdout));
        assert!(gate.contains(words), "{kind:?}: {gate}");
        let logout =
            common::binary::run(&config, &["logout", "--profile", profile.as_str()], None).await;
        assert_eq!(logout.code, Some(0), "{kind:?}: {}", logout.stderr);
    }
}
