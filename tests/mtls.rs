//! Client certificates (mutual TLS) against an in-process upstream that requires them from a
//! test CA: the right certificate passes for every scheme and for `none`; none, an expired and
//! a foreign one each get their own clear error, at request time and when checking.

mod common;

use std::time::Duration;

use common::mock::Mock;
use common::pki::{ClientCa, Validity};
use common::start_site;
use credproxy::credentials::{ClientIdentity, Scheme, Secret};
use credproxy::diagnose::check::{CheckError, Checker};
use credproxy::proxy::{Proxy, ProxySettings};
use credproxy::serve::{ServeOptions, Site};
use http::StatusCode;

/// The headers a header-gated mock wants (none: no header gate).
type Headers = &'static [(&'static str, &'static str)];

fn identity(pem: &str) -> ClientIdentity {
    ClientIdentity::from_pem(pem.as_bytes(), None).unwrap()
}

fn settings(mock: &Mock, identity: Option<ClientIdentity>) -> ProxySettings {
    let mut settings = common::settings_for(mock);
    settings.identity = identity;
    settings
}

/// A proxy for `mock` with `scheme`'s `secret` and the client certificate `identity`.
async fn serve(
    mock: &Mock,
    scheme: &Scheme,
    secret: &str,
    identity: Option<ClientIdentity>,
) -> common::RunningProxy {
    let proxy = Proxy::with_secret(
        settings(mock, identity),
        scheme,
        &Secret::new(secret.to_owned()),
    )
    .unwrap();
    start_site(Site::new(proxy), ServeOptions::default()).await
}

#[tokio::test]
async fn the_right_certificate_passes_for_every_scheme_and_for_none() {
    let ca = ClientCa::new("credproxy test client CA");
    let client = ca.issue("laptop", Validity::Current);
    let schemes: [(Scheme, &str, Headers); 4] = [
        (Scheme::Basic, "app-password-123", &[]),
        (
            Scheme::CloudflareAccess,
            "team.access\ncf-secret-9",
            &[
                ("cf-access-client-id", "team.access"),
                ("cf-access-client-secret", "cf-secret-9"),
            ],
        ),
        (
            Scheme::new("header", &["P-Access-Token".into()]).unwrap(),
            "tok-2",
            &[("p-access-token", "tok-2")],
        ),
        (Scheme::None, "", &[]),
    ];
    for (scheme, secret, headers) in schemes {
        let mock = Mock::start_requiring_client_certs(&ca.ca_pem).await;
        if !headers.is_empty() {
            mock.gate_wants(headers);
        }
        if scheme == Scheme::None {
            mock.state
                .no_gate
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let proxy = serve(&mock, &scheme, secret, Some(identity(&client.pem()))).await;
        let (response, body) = common::get(proxy.addr, "/api/server/ping").await;
        assert_eq!(response.status(), StatusCode::OK, "{scheme}: {body:?}");
        let seen = mock.state.last();
        let presented = seen
            .client_cert
            .expect("the connection presented a certificate");
        assert!(client.cert_pem.contains(&pem_body(&presented)), "{scheme}");
        if scheme == Scheme::None {
            assert!(!seen.headers.contains_key("authorization"));
        }
    }
}

/// The base64 text of a DER certificate, as it appears in its PEM (first line).
fn pem_body(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der)[..64].to_owned()
}

#[tokio::test]
async fn missing_expired_and_foreign_certificates_each_get_their_own_error_for_clients() {
    let ca = ClientCa::new("credproxy test client CA");
    let expired = ca.issue("old laptop", Validity::Expired);
    let foreign = ClientCa::new("someone else's CA").issue("stranger", Validity::Current);
    let mock = Mock::start_requiring_client_certs(&ca.ca_pem).await;
    let cases = [
        (None, "asks for a client certificate and none was sent"),
        (
            Some(identity(&expired.pem())),
            "says the client certificate has expired",
        ),
        (
            Some(identity(&foreign.pem())),
            "does not trust the issuer of the client certificate",
        ),
    ];
    for (identity, words) in cases {
        let proxy = serve(&mock, &Scheme::Basic, &mock.password, identity).await;
        let (response, body) = common::get(proxy.addr, "/api/server/ping").await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{words}");
        let answer = common::json(&body);
        assert_eq!(answer["error"], "client_certificate_rejected", "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(words), "{words:?} not in {message}");
        assert!(
            answer["fix"]
                .as_str()
                .unwrap()
                .ends_with("--client-cert FILE"),
            "{answer}"
        );
    }
    assert!(
        mock.state.seen().is_empty(),
        "no request got past the handshake"
    );
}

fn checker(
    mock: &Mock,
    identity: Option<&ClientIdentity>,
) -> (Checker, std::sync::Arc<credproxy::upstream::ClientAuth>) {
    let settings = common::settings_for(mock);
    let (tls, auth) = settings
        .trust
        .client_config_seen(&[b"http/1.1"], identity)
        .unwrap();
    let checker = Checker::new(settings.server.clone(), tls, Duration::from_secs(10))
        .certificate_fix("log in with --client-cert FILE".to_owned());
    (checker, auth)
}

#[tokio::test]
async fn checks_name_each_certificate_problem_and_see_whether_the_server_asks() {
    let ca = ClientCa::new("credproxy test client CA");
    let good = identity(&ca.issue("laptop", Validity::Current).pem());
    let foreign = identity(&ClientCa::new("other").issue("x", Validity::Current).pem());
    let mock = Mock::start_requiring_client_certs(&ca.ca_pem).await;
    let credentials = credproxy::credentials::Injection::basic(
        &mock.username,
        &Secret::new(mock.password.clone()),
    );
    let (check, auth) = checker(&mock, Some(&good));
    check
        .verify_credentials(&mock.username, &credentials)
        .await
        .unwrap();
    assert!(auth.asked(), "the server asked for the certificate");
    for (identity, words) in [
        (None, "asks for a client certificate and none was sent"),
        (Some(&foreign), "does not trust the issuer"),
    ] {
        let (check, auth) = checker(&mock, identity);
        let err = check
            .verify_credentials(&mock.username, &credentials)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckError::ClientCertificate { .. }), "{err}");
        assert!(err.to_string().contains(words), "{err}");
        assert!(
            err.to_string().ends_with("log in with --client-cert FILE"),
            "{err}"
        );
        assert!(auth.asked());
    }
    // A server that never asks: the certificate is pointless there.
    let plain = Mock::start().await;
    let (check, auth) = checker(&plain, Some(&good));
    check
        .verify_credentials(&plain.username, &credentials)
        .await
        .unwrap();
    assert!(!auth.asked());
}

mod binary {
    //! The real binary and the real Secret Service (inside `tests/keyring-session`).

    use std::path::Path;

    use super::common;
    use common::binary::{Serving, login_at, require_secret_service, run, unique_profile};
    use common::mock::Mock;
    use common::pki::{ClientCa, ClientCert, Validity};
    use http::StatusCode;

    /// `login` for `profile` at `mock` with the client certificate file `cert` and `extra`
    /// arguments; `stdin` holds the secrets.
    async fn login(
        config: &Path,
        mock: &Mock,
        profile: &str,
        cert: &Path,
        extra: &[&str],
        stdin: &str,
    ) -> common::binary::Outcome {
        let cert = ["--client-cert", cert.to_str().unwrap()];
        login_at(config, mock, profile, &[&cert[..], extra].concat(), stdin).await
    }

    /// Every file under `dir` that contains `needle`.
    fn files_containing(dir: &Path, needle: &str) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_containing(&path, needle));
            } else if std::fs::read(&path)
                .is_ok_and(|data| String::from_utf8_lossy(&data).contains(needle))
            {
                found.push(path);
            }
        }
        found
    }

    /// A line of the key's base64: what would show if the key were written anywhere.
    fn key_line(cert: &ClientCert) -> String {
        cert.key_pem.lines().nth(1).unwrap().to_owned()
    }

    async fn ping(serving: &Serving) -> StatusCode {
        common::get(serving.addr, "/api/server/ping")
            .await
            .0
            .status()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_key_lives_in_the_keyring_only_and_a_new_login_rotates_it_without_a_restart() {
        require_secret_service();
        let ca = ClientCa::new("credproxy test client CA");
        let first = ca.issue("laptop 1", Validity::Current);
        let mock = Mock::start_requiring_client_certs(&ca.ca_pem).await;
        mock.state
            .no_gate
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let profile = unique_profile("mtls-key");
        let file = dir.path().join("laptop.pem");
        std::fs::write(&file, first.pem()).unwrap();
        let done = login(&config, &mock, &profile, &file, &["--auth", "none"], "").await;
        assert_eq!(done.code, Some(0), "{}", done.stderr);
        assert!(done.stderr.contains("may be deleted"), "{}", done.stderr);
        std::fs::remove_file(&file).unwrap();
        let saved = std::fs::read_to_string(&config).unwrap();
        assert!(
            saved.contains("BEGIN CERTIFICATE") && !saved.contains("PRIVATE KEY"),
            "{saved}"
        );
        assert!(files_containing(dir.path(), &key_line(&first)).is_empty());
        let store = credproxy::credentials::KeyringStore::new();
        let account = credproxy::credentials::client_key_account(&profile);
        let stored = tokio::task::spawn_blocking(move || {
            use credproxy::credentials::CredentialStore as _;
            store.get(&account)
        })
        .await
        .unwrap()
        .unwrap()
        .expect("the key is in the Secret Service");
        assert!(stored.expose().contains(&key_line(&first)));

        let (serving, admin) = Serving::start_with_admin(&config, &profile).await;
        assert_eq!(ping(&serving).await, StatusCode::OK);
        let (_, health) = common::get(admin, "/healthz").await;
        let certificate = &common::json(&health)["profiles"][0]["client_certificate"];
        assert_eq!(
            certificate["expires"], "4096-01-01T00:00:00Z",
            "{certificate}"
        );
        assert!(
            certificate["subject"]
                .as_str()
                .unwrap()
                .contains("laptop 1")
        );
        let (_, metrics) = common::get(admin, "/metrics").await;
        assert!(
            String::from_utf8_lossy(&metrics).contains(&format!(
                "credproxy_client_certificate_expiry_timestamp_seconds{{profile=\"{profile}\"}} 67090118400"
            )),
            "{}",
            String::from_utf8_lossy(&metrics)
        );

        // A new certificate reaches the running proxy.
        let second = ca.issue("laptop 2", Validity::Current);
        std::fs::write(&file, second.pem()).unwrap();
        let done = login(&config, &mock, &profile, &file, &["--auth", "none"], "").await;
        assert_eq!(done.code, Some(0), "{}", done.stderr);
        assert!(
            done.stderr.contains("the running proxy for"),
            "{}",
            done.stderr
        );
        assert_eq!(ping(&serving).await, StatusCode::OK);
        let presented = mock.state.last().client_cert.unwrap();
        assert!(second.cert_pem.contains(&super::pem_body(&presented)));

        let doctor = run(&config, &["doctor", "--profile", &profile], None).await;
        let line = doctor
            .stdout
            .lines()
            .find(|l| {
                l.split_once(' ')
                    .is_some_and(|(_, rest)| rest.starts_with("client cert"))
            })
            .unwrap_or_else(|| panic!("{}", doctor.stdout));
        assert!(line.starts_with('✓') && line.contains("laptop 2"), "{line}");
        assert!(line.contains("expires 4096-01-01T00:00:00Z"), "{line}");
        let logs = serving.stop().await;
        assert!(!logs.contains(&key_line(&second)));
        run(&config, &["logout", "--profile", &profile], None).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pkcs12_file_logs_in_with_its_password_on_one_more_line_and_serves() {
        require_secret_service();
        let ca = ClientCa::new("credproxy test client CA");
        let client = ca.issue("phone", Validity::Current);
        let mock = Mock::start_requiring_client_certs(&ca.ca_pem).await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let profile = unique_profile("mtls-p12");
        let file = dir.path().join("phone.p12");
        std::fs::write(&file, client.pkcs12("p12-secret")).unwrap();
        let args = ["--username", &mock.username];
        let wrong = login(
            &config,
            &mock,
            &profile,
            &file,
            &args,
            &format!("{}\nnope\n", mock.password),
        )
        .await;
        assert_eq!(wrong.code, Some(1));
        assert!(
            wrong.stderr.contains("the PKCS#12 password is wrong"),
            "{}",
            wrong.stderr
        );
        assert!(!config.exists(), "nothing is stored");
        let right = format!("{}\np12-secret\n", mock.password);
        let done = login(&config, &mock, &profile, &file, &args, &right).await;
        assert_eq!(done.code, Some(0), "{}", done.stderr);
        let serving =
            Serving::start(&config, &["--profile", &profile, "--listen", "127.0.0.1:0"]).await;
        assert_eq!(ping(&serving).await, StatusCode::OK);
        serving.stop().await;
        run(&config, &["logout", "--profile", &profile], None).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bad_certificates_are_refused_at_login_with_their_cause_and_nothing_is_stored() {
        require_secret_service();
        let ca = ClientCa::new("credproxy test client CA");
        let mock = Mock::start_requiring_client_certs(&ca.ca_pem).await;
        let plain = Mock::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let profile = unique_profile("mtls-bad");
        let good = ca.issue("laptop", Validity::Current);
        let other = ca.issue("desktop", Validity::Current);
        let cases: [(&str, Vec<u8>, &str); 5] = [
            (
                "expired",
                ca.issue("old", Validity::Expired).pem().into_bytes(),
                "the certificate expired on 2021-01-01T00:00:00Z (valid from 2020-01-01T00:00:00Z)",
            ),
            (
                "not yet valid",
                ca.issue("new", Validity::NotYet).pem().into_bytes(),
                "not valid before 4000-01-01T00:00:00Z",
            ),
            (
                "foreign",
                ClientCa::new("other")
                    .issue("x", Validity::Current)
                    .pem()
                    .into_bytes(),
                "does not trust the issuer of the client certificate",
            ),
            (
                "mismatched key",
                format!("{}{}", good.cert_pem, other.key_pem).into_bytes(),
                "the private key does not belong to the certificate",
            ),
            (
                "neither PEM nor PKCS#12",
                b"just some text".to_vec(),
                "neither PEM",
            ),
        ];
        let stdin = format!("{}\n", mock.password);
        for (case, data, words) in cases {
            let file = dir.path().join("client.crt");
            std::fs::write(&file, data).unwrap();
            let done = login(
                &config,
                &mock,
                &profile,
                &file,
                &["--username", &mock.username],
                &stdin,
            )
            .await;
            assert_eq!(done.code, Some(1), "{case}: {}", done.stderr);
            assert!(
                done.stderr.contains(words),
                "{case}: {words:?} not in {}",
                done.stderr
            );
            assert!(!config.exists(), "{case}: nothing is stored");
        }
        // No certificate for a server that wants one.
        let bare = login_at(
            &config,
            &mock,
            &profile,
            &["--username", &mock.username],
            &stdin,
        )
        .await;
        assert_eq!(bare.code, Some(1));
        assert!(
            bare.stderr
                .contains("asks for a client certificate and none was sent"),
            "{}",
            bare.stderr
        );
        assert!(
            bare.stderr.contains("--client-cert FILE"),
            "{}",
            bare.stderr
        );
        assert!(!config.exists());
        // A certificate for a server that never asks: stored, with a warning.
        let file = dir.path().join("client.pem");
        std::fs::write(&file, good.pem()).unwrap();
        let done = login(
            &config,
            &plain,
            &profile,
            &file,
            &["--username", &plain.username],
            &stdin,
        )
        .await;
        assert_eq!(done.code, Some(0), "{}", done.stderr);
        assert!(
            done.stderr.contains("did not ask for a client certificate"),
            "{}",
            done.stderr
        );
        run(&config, &["logout", "--profile", &profile], None).await;
    }
}
