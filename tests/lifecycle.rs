//! Credentials that change while the proxy runs, with the real binary and the real Secret
//! Service (run inside `tests/keyring-session`): `login`, `SIGHUP` and `logout` reach a
//! running `serve` without a restart, and the fix it prints works for every scheme.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;

use common::binary::{Serving, login_at, require_secret_service, run, run_shell, unique_profile};
use common::mock::Mock;
use http::StatusCode;

/// `login --no-verify` of `secret` (values one per line) for `profile` at `mock`.
async fn store(config: &Path, mock: &Mock, profile: &str, extra: &[&str], secret: &str) {
    let args = [&["--no-verify"][..], extra].concat();
    let stored = login_at(config, mock, profile, &args, secret).await;
    assert_eq!(stored.code, Some(0), "{}", stored.stderr);
}

/// The headers a header-gated mock wants (none: Basic).
type Headers = &'static [(&'static str, &'static str)];

async fn ping(serving: &Serving) -> (StatusCode, serde_json::Value) {
    let (response, body) = common::get(serving.addr, "/api/server/ping").await;
    (response.status(), common::json(&body))
}

#[tokio::test(flavor = "multi_thread")]
async fn login_heals_a_running_proxy_whose_password_is_rejected() {
    require_secret_service();
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("heal");
    store(
        &config,
        &mock,
        &profile,
        &["--username", &mock.username],
        "stale-password\n",
    )
    .await;
    let mut serving =
        Serving::start(&config, &["--profile", &profile, "--listen", "127.0.0.1:0"]).await;

    let (status, answer) = ping(&serving).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer["error"], "credentials_rejected", "{answer}");
    let fix = answer["fix"].as_str().unwrap().to_owned();
    assert!(fix.starts_with("credproxy login --config"), "{fix}");
    serving.wait_for_log("Fix: credproxy login").await;

    // The user runs the printed command, exactly.
    let rejected = mock.state.rejected.load(Ordering::SeqCst);
    let login = run_shell(
        &config,
        &format!("{fix} --password-stdin"),
        Some(&format!("{}\n", mock.password)),
    )
    .await;
    assert_eq!(login.code, Some(0), "{}", login.stderr);
    assert!(
        login
            .stderr
            .contains(&format!("the running proxy for '{profile}' (pid"))
            && login
                .stderr
                .contains("new credentials in use from the next request"),
        "{}",
        login.stderr
    );
    // The next request through the same process goes through.
    let (status, answer) = ping(&serving).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["res"], "pong");
    assert!(mock.state.rejected.load(Ordering::SeqCst) - rejected <= 1);

    // Later the app password is revoked: the proxy says it worked until then.
    mock.state
        .accept_only(&mock.username, "a-newer-app-password");
    let (status, answer) = ping(&serving).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let message = answer["message"].as_str().unwrap();
    for words in [
        &format!("accepted the credentials of profile '{profile}' until 20"),
        "and rejects them since 20",
        "the app password has probably expired or been revoked",
        "360 days unless created as non-expiring",
    ] {
        assert!(message.contains(words), "{words:?} not in {message}");
    }
    // The doctor asks the running proxy where its credentials stand.
    let doctor = run(&config, &["doctor", "--profile", &profile], None).await;
    let line = doctor
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("proxy"))
        .unwrap_or_else(|| panic!("{}", doctor.stdout));
    assert!(line.starts_with("✗"), "{line}");
    assert!(
        line.contains("the gate rejects its credentials since"),
        "{line}"
    );
    assert!(line.contains("accepted: last at 20"), "{line}");
    assert!(!doctor.stdout.contains(&mock.password) && !doctor.stdout.contains("stale-password"));
    let logs = serving.stop().await;
    assert!(!logs.contains(&mock.password) && !logs.contains("stale-password"));
    run(&config, &["logout", "--profile", &profile], None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_an_edited_config_file() {
    require_secret_service();
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("hup");
    store(
        &config,
        &mock,
        &profile,
        &["--username", "not-the-account"],
        &mock.password,
    )
    .await;
    let (mut serving, admin) = Serving::start_with_admin(&config, &profile).await;
    assert_eq!(ping(&serving).await.0, StatusCode::BAD_GATEWAY);
    let (_, health) = common::get(admin, "/healthz").await;
    let credentials = &common::json(&health)["profiles"][0]["credentials"];
    assert_eq!(credentials["state"], "rejected", "{credentials}");
    assert!(credentials["backoff_seconds"].as_u64().unwrap() >= 1);

    let text = std::fs::read_to_string(&config).unwrap();
    let fixed = text.replace("not-the-account", &mock.username);
    assert_ne!(text, fixed);
    std::fs::write(&config, fixed).unwrap();
    let rejected = mock.state.rejected.load(Ordering::SeqCst);
    serving.signal("-HUP");
    serving
        .wait_for_log(&format!(
            "profile '{profile}': new settings and credentials in use"
        ))
        .await;
    let (status, answer) = ping(&serving).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(mock.state.rejected.load(Ordering::SeqCst) - rejected <= 1);
    let (_, health) = common::get(admin, "/healthz").await;
    let credentials = &common::json(&health)["profiles"][0]["credentials"];
    assert_eq!(credentials["state"], "accepted", "{credentials}");
    assert!(
        credentials["last_accepted"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    // An invalid edit keeps the working settings, and says why.
    std::fs::write(&config, "profiles = 3").unwrap();
    serving.signal("-HUP");
    serving.wait_for_log("keeps its old settings").await;
    assert_eq!(ping(&serving).await.0, StatusCode::OK);
    serving.stop().await;
    run(&config, &["logout", "--profile", &profile], None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_stops_a_running_proxy_from_sending_the_secret() {
    require_secret_service();
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("out");
    store(
        &config,
        &mock,
        &profile,
        &["--username", &mock.username],
        &mock.password,
    )
    .await;
    let serving =
        Serving::start(&config, &["--profile", &profile, "--listen", "127.0.0.1:0"]).await;
    assert_eq!(ping(&serving).await.0, StatusCode::OK);

    let logout = run(&config, &["logout", "--profile", &profile], None).await;
    assert_eq!(logout.code, Some(0), "{}", logout.stderr);
    assert!(
        logout
            .stderr
            .contains("credentials removed: nothing is sent"),
        "{}",
        logout.stderr
    );
    let seen = mock.state.seen().len();
    let (status, answer) = ping(&serving).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer["error"], "credentials_missing", "{answer}");
    assert!(
        answer["fix"]
            .as_str()
            .unwrap()
            .starts_with("credproxy login"),
        "{answer}"
    );
    assert_eq!(mock.state.seen().len(), seen, "nothing reached the server");
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_printed_login_command_works_for_every_scheme() {
    require_secret_service();
    let schemes: [(&str, Headers, String); 3] = [
        ("basic", &[], String::new()),
        (
            "cloudflare-access",
            &[
                ("cf-access-client-id", "team.access"),
                ("cf-access-client-secret", "cf-secret-9"),
            ],
            "auth = \"cloudflare-access\"\n".to_owned(),
        ),
        (
            "header",
            &[("p-access-token-id", "tid-1"), ("p-access-token", "tok-2")],
            "auth = \"header\"\nheaders = [\"P-Access-Token-Id\", \"P-Access-Token\"]\n".to_owned(),
        ),
    ];
    for (scheme, headers, entry) in schemes {
        let mock = Mock::start().await;
        if !headers.is_empty() {
            mock.gate_wants(headers);
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let profile = unique_profile(&format!("fix-{scheme}"));
        let username = if scheme == "basic" {
            format!("username = \"{}\"\n", mock.username)
        } else {
            String::new()
        };
        // A profile whose credentials were never stored (in a directory with a space).
        let ca = dir.path().join("my ca.pem");
        std::fs::copy(&mock.ca_file, &ca).unwrap();
        std::fs::write(
            &config,
            format!(
                "[profiles.{profile}]\nserver = \"{}\"\n{username}{entry}ca_cert = \"{}\"\n",
                mock.url(),
                ca.display()
            ),
        )
        .unwrap();
        let serve = run(&config, &["serve", "--profile", &profile], None).await;
        assert_eq!(serve.code, Some(1), "{scheme}: {}", serve.stderr);
        let fix = serve
            .stderr
            .split('`')
            .nth(1)
            .unwrap_or_else(|| panic!("{scheme}: no command in {}", serve.stderr));
        assert!(fix.starts_with("credproxy login"), "{scheme}: {fix}");
        let values: String = if headers.is_empty() {
            format!("{}\n", mock.password)
        } else {
            headers.iter().map(|(_, v)| format!("{v}\n")).collect()
        };
        // Verified against the gate: the command carries every option the scheme needs.
        let login = run_shell(&config, &format!("{fix} --password-stdin"), Some(&values)).await;
        assert_eq!(login.code, Some(0), "{scheme}: {fix}\n{}", login.stderr);
        let serving =
            Serving::start(&config, &["--profile", &profile, "--listen", "127.0.0.1:0"]).await;
        assert_eq!(ping(&serving).await.0, StatusCode::OK, "{scheme}");
        serving.stop().await;
        run(&config, &["logout", "--profile", &profile], None).await;
    }
}
