//! The real binary across processes against a real Secret Service: `login --password-stdin`,
//! `serve`, a request through it, shutdown, `logout`. Run inside `tests/keyring-session`
//! (which `tests/run` and `.ci/run` use): a private D-Bus session with an unlocked gnome-keyring.

mod common;

use std::time::Duration;

use common::binary::{command, require_secret_service, run, unique_profile};
use common::mock::Mock;
use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

#[tokio::test(flavor = "multi_thread")]
async fn login_then_serve_then_request_through_the_real_keyring() {
    require_secret_service();
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("flow");
    let ca = mock.ca_file.to_str().unwrap().to_owned();
    let url = mock.url();
    let login_args = [
        "login",
        "--server",
        &url,
        "--username",
        &mock.username,
        "--profile",
        &profile,
        "--ca-cert",
        &ca,
        "--password-stdin",
    ];

    // A wrong password is refused by the gate and nothing is stored.
    let wrong = run(&config, &login_args, Some("not-the-password\n")).await;
    assert_eq!(wrong.code, Some(1), "{}", wrong.stderr);
    assert!(
        wrong.stderr.contains("did not accept the credentials"),
        "{}",
        wrong.stderr
    );
    assert!(!wrong.stderr.contains("not-the-password"));
    assert!(!config.exists(), "a refused login saves no profile");

    // The right one is verified through the gate and stored.
    let login = run(&config, &login_args, Some(&format!("{}\n", mock.password))).await;
    assert_eq!(login.code, Some(0), "{}", login.stderr);
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains(&profile) && saved.contains(&url), "{saved}");
    assert!(
        !saved.contains(&mock.password),
        "the config file never holds the secret"
    );

    let doctor = run(&config, &["doctor", "--profile", &profile], None).await;
    assert_eq!(doctor.code, Some(0), "{}{}", doctor.stdout, doctor.stderr);
    for step in [
        "config",
        "keyring",
        "dns",
        "tcp",
        "tls",
        "gate",
        "credentials",
        "immich",
        "websocket",
    ] {
        assert!(
            doctor
                .stdout
                .lines()
                .any(|l| l.starts_with("✓") && l.contains(step)),
            "{step} passes:\n{}",
            doctor.stdout
        );
    }
    assert!(doctor.stdout.contains("pin sha256/"));
    assert!(!doctor.stdout.contains(&mock.password));

    let listed = run(&config, &["profiles"], None).await;
    assert!(listed.stdout.contains(&profile) && listed.stdout.contains(&mock.username));
    assert!(!listed.stdout.contains(&mock.password));

    // serve on a free port; it prints the bound address once it listens.
    let mut serve = command(
        &config,
        &["serve", "--profile", &profile, "--listen", "127.0.0.1:0"],
    )
    .spawn()
    .unwrap();
    let mut stdout = BufReader::new(serve.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("serve announced its address")
        .unwrap()
        .expect("serve printed a line");
    let addr = common::address_in(&line);

    let (response, body) = common::get(addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(common::json(&body)["res"], "pong");
    let seen = mock.state.last();
    let expected = credproxy::credentials::basic_value(
        &mock.username,
        &credproxy::credentials::Secret::new(mock.password.clone()),
    );
    assert_eq!(seen.headers["authorization"], expected);

    // The request's log line is written while serve runs (server threads write what they
    // collected when they go idle), not only at exit.
    let mut stderr = BufReader::new(serve.stderr.take().unwrap());
    let mut logs = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !logs.contains("/api/server/ping") {
            assert!(stderr.read_line(&mut logs).await.unwrap() > 0, "{logs}");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line for the request while serving: {logs}"));

    // SIGTERM stops it cleanly, and its logs never carried the secret.
    let pid = serve.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), serve.wait())
        .await
        .expect("serve exited after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    stderr.read_to_string(&mut logs).await.unwrap();
    assert_eq!(
        logs.matches("/api/server/ping").count(),
        1,
        "one log line per request: {logs}"
    );
    assert!(!logs.contains(&mock.password) && !logs.contains(expected.to_str().unwrap()));

    // logout removes the entry and the profile; serve then says what to do.
    let logout = run(&config, &["logout", "--profile", &profile], None).await;
    assert_eq!(logout.code, Some(0), "{}", logout.stderr);
    let after = run(&config, &["serve", "--profile", &profile], None).await;
    assert_eq!(after.code, Some(1));
    let doctor = run(&config, &["doctor", "--profile", &profile], None).await;
    assert_eq!(doctor.code, Some(1), "doctor fails without a profile");
    assert!(doctor.stdout.starts_with("✗ config"), "{}", doctor.stdout);
    assert!(
        after
            .stderr
            .contains(&format!("no profile named '{profile}'")),
        "{}",
        after.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_with_a_profile_but_no_stored_secret_names_the_fix() {
    require_secret_service();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("missing");
    std::fs::write(
        &config,
        format!("[profiles.{profile}]\nserver = \"https://immich.example.com\"\nusername = \"svc-laptop\"\n"),
    )
    .unwrap();
    let out = run(
        &config,
        &["serve", "--profile", &profile, "--listen", "127.0.0.1:0"],
        None,
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("no credentials stored for profile '{profile}'")),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!(
            "run `credproxy login --config {} --profile {profile} --server https://immich.example.com --username svc-laptop`",
            config.display()
        )),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn login_no_verify_stores_and_logout_removes_from_the_keyring() {
    require_secret_service();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("noverify");
    let login = run(
        &config,
        &[
            "login",
            "--server",
            "https://immich.example.com",
            "--username",
            "svc",
            "--profile",
            &profile,
            "--password-stdin",
            "--no-verify",
        ],
        Some("secret-value-42"),
    )
    .await;
    assert_eq!(login.code, Some(0), "{}", login.stderr);
    // The entry really is in the Secret Service, under service `credproxy`, account = profile.
    let store = credproxy::credentials::KeyringStore::new();
    use credproxy::credentials::CredentialStore as _;
    let stored = tokio::task::spawn_blocking({
        let profile = profile.clone();
        move || store.get(&profile)
    })
    .await
    .unwrap()
    .unwrap()
    .expect("stored");
    assert_eq!(stored.expose(), "secret-value-42");

    let logout = run(&config, &["logout", "--profile", &profile], None).await;
    assert_eq!(logout.code, Some(0), "{}", logout.stderr);
    let store = credproxy::credentials::KeyringStore::new();
    let gone = tokio::task::spawn_blocking(move || store.get(&profile))
        .await
        .unwrap()
        .unwrap();
    assert!(gone.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn cloudflare_access_login_verifies_two_values_and_serve_injects_them() {
    require_secret_service();
    let mock = Mock::start().await;
    mock.gate_wants(&[
        ("cf-access-client-id", "team.access"),
        ("cf-access-client-secret", "cf-secret-9"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("cf");
    let url = mock.url();
    let ca = mock.ca_file.to_str().unwrap().to_owned();
    let args = [
        "login",
        "--server",
        &url,
        "--auth",
        "cloudflare-access",
        "--profile",
        &profile,
        "--ca-cert",
        &ca,
        "--password-stdin",
    ];
    let one_line = run(&config, &args, Some("team.access\n")).await;
    assert_eq!(one_line.code, Some(1), "{}", one_line.stderr);
    assert!(
        one_line.stderr.contains("expected 2 line(s)"),
        "{}",
        one_line.stderr
    );
    let login = run(&config, &args, Some("team.access\ncf-secret-9\n")).await;
    assert_eq!(login.code, Some(0), "{}", login.stderr);
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains("auth = \"cloudflare-access\""), "{saved}");
    assert!(!saved.contains("cf-secret-9"));

    let mut serve = command(
        &config,
        &["serve", "--profile", &profile, "--listen", "127.0.0.1:0"],
    )
    .spawn()
    .unwrap();
    let mut stdout = BufReader::new(serve.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = common::address_in(&line);
    let (response, _) = common::get(addr, "/api/server/ping").await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = mock.state.last();
    assert_eq!(seen.headers["cf-access-client-secret"], "cf-secret-9");
    assert!(!seen.headers.contains_key("authorization"));
    serve.start_kill().unwrap();
    let logout = run(&config, &["logout", "--profile", &profile], None).await;
    assert_eq!(logout.code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_process_serves_several_profiles_with_an_admin_listener() {
    require_secret_service();
    let home = Mock::start().await;
    let work = Mock::start_with("svc-work", "work-password").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let (a, b) = (unique_profile("multi-a"), unique_profile("multi-b"));
    for (mock, profile) in [(&home, &a), (&work, &b)] {
        let url = mock.url();
        let ca = mock.ca_file.to_str().unwrap().to_owned();
        let login = run(
            &config,
            &[
                "login",
                "--server",
                &url,
                "--username",
                &mock.username,
                "--profile",
                profile,
                "--ca-cert",
                &ca,
                "--listen",
                "127.0.0.1:0",
                "--password-stdin",
            ],
            Some(&mock.password),
        )
        .await;
        assert_eq!(login.code, Some(0), "{}", login.stderr);
    }
    let mut serve = command(
        &config,
        &[
            "serve",
            "--profile",
            &a,
            "--profile",
            &b,
            "--admin",
            "127.0.0.1:0",
        ],
    )
    .spawn()
    .unwrap();
    let mut stdout = BufReader::new(serve.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let (line_a, line_b, line_admin) = (next().await, next().await, next().await);
    assert!(
        line_a.contains(&a) && line_b.contains(&b),
        "{line_a}\n{line_b}"
    );
    assert!(line_admin.starts_with("credproxy admin on"), "{line_admin}");
    let (addr_a, addr_b, admin) = (
        common::address_in(&line_a),
        common::address_in(&line_b),
        common::address_in(&line_admin),
    );

    for (addr, mock, n) in [(addr_a, &home, 1), (addr_b, &work, 2)] {
        for _ in 0..n {
            let (response, _) = common::get(addr, "/api/server/ping").await;
            assert_eq!(response.status(), StatusCode::OK);
        }
        let expected = credproxy::credentials::basic_value(
            &mock.username,
            &credproxy::credentials::Secret::new(mock.password.clone()),
        );
        assert_eq!(mock.state.last().headers["authorization"], expected);
    }

    let (health, body) = common::get(admin, "/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(common::json(&body)["status"], "ok");
    let (metrics, body) = common::get(admin, "/metrics").await;
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(&format!("credproxy_requests_total{{profile=\"{a}\"}} 1")),
        "{text}"
    );
    assert!(
        text.contains(&format!("credproxy_requests_total{{profile=\"{b}\"}} 2")),
        "{text}"
    );
    assert!(text.contains("credproxy_request_duration_seconds_bucket"));
    // The admin port is guarded like the proxy port.
    let (refused, _) = common::send(
        admin,
        http::Request::get("/metrics").header("host", "evil.example"),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::MISDIRECTED_REQUEST);
    serve.start_kill().unwrap();
}
