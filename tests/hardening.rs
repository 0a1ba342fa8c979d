//! What a careful user or a security reviewer checks first, with the real binary and the real
//! Secret Service (run inside `tests/keyring-session`): no secret in any log line of a
//! service-like run, no config write lost to a concurrent one, and no local process able to
//! starve the proxy of descriptors through the admin listener.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::binary::{Serving, command, login_at, require_secret_service, run, unique_profile};
use common::mock::{Mock, basic};
use credproxy::config::ConfigStore;
use http::{Request, StatusCode};
use tokio::net::TcpStream;

/// `login` of `profile` at `mock` with its right password; asserts it succeeded.
async fn login(config: &Path, mock: &Mock, profile: &str) {
    let secret = format!("{}\n", mock.password);
    let done = login_at(
        config,
        mock,
        profile,
        &["--username", &mock.username],
        &secret,
    )
    .await;
    assert_eq!(done.code, Some(0), "login {profile}: {}", done.stderr);
}

/// Sends a bodiless GET for `target` with these `headers` to the proxy; returns the status.
async fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> StatusCode {
    let mut request = Request::get(target);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, _) = common::send(addr, request).await;
    response.status()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_any_line_of_a_service_like_run() {
    require_secret_service();
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("logs");
    login(&config, &mock, &profile).await;

    // Started as a service manager starts it: standard output is no terminal (a pipe, as
    // the journal's), local auth on; every log level a user can ask for.
    let mut serve = command(
        &config,
        &[
            "serve",
            "--profile",
            &profile,
            "--listen",
            "127.0.0.1:0",
            "--local-auth",
        ],
    );
    serve.env("CREDPROXY_LOG", "debug");
    let mut serving = Serving::spawn(serve).await;
    let addr = serving.addr;
    let hint = tokio::time::timeout(Duration::from_secs(30), serving.stdout.next_line())
        .await
        .expect("serve said where the local URL is")
        .unwrap()
        .unwrap();
    assert!(
        hint.contains(&format!(
            "profiles --show-token --profile {profile}` prints it"
        )),
        "{hint}"
    );

    // The user reads the local URL as the hint says; it names the running proxy's port.
    let shown = run(
        &config,
        &["profiles", "--show-token", "--profile", &profile],
        None,
    )
    .await;
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    let url = shown.stdout.trim();
    let (token, at) = url
        .strip_prefix("http://credproxy:")
        .and_then(|rest| rest.split_once('@'))
        .unwrap_or_else(|| panic!("not a local URL: {url}"));
    assert_eq!(at, addr.to_string());
    let local_auth = basic("credproxy", token);
    let host = addr.to_string();
    let client = [
        ("host", host.as_str()),
        ("authorization", local_auth.as_str()),
    ];

    // Share links by path and by query, and Immich's other credentials in the query.
    let (key, slug, password) = ("ShareKey0path1", "holiday-slug-2", "share-password-3");
    let (query_key, api_key, session_key) = ("ShareKey4query", "api-key-5", "session-key-6");
    let served = [
        format!("/share/{key}"),
        format!("/share/{key}/photos/asset-1"),
        format!("/%73hare/{key}"),
        format!("/s/{slug}"),
        format!("/api/shared-links/me?key={query_key}&password={password}"),
        format!("/api/assets/asset-1/thumbnail?key={query_key}"),
        format!("/api/shared-links/me?slug={slug}"),
        format!("/api/users/me?apiKey={api_key}"),
        format!("/api/users/me?sessionKey={session_key}"),
    ];
    for target in &served {
        get(addr, target, &client).await;
        let seen = mock.state.last().path_and_query;
        assert_eq!(&seen, target, "forwarded as it came");
    }
    // Refused by the guards: no local credential, a wrong one, a foreign Host.
    let (refused_key, wrong_token) = ("ShareKey7refused", "wrong-local-token-8");
    let wrong_auth = basic("credproxy", wrong_token);
    let refused_target = format!("/share/{refused_key}?key={refused_key}");
    let status = get(addr, &refused_target, &[("host", &host)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let wrong = [
        ("host", host.as_str()),
        ("authorization", wrong_auth.as_str()),
    ];
    let status = get(addr, &refused_target, &wrong).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let foreign = [
        ("host", "photos.evil.example"),
        ("authorization", local_auth.as_str()),
    ];
    let status = get(addr, &format!("/s/{slug}?password={password}"), &foreign).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    // An upstream error: the mock drops the connection without an answer.
    let died_key = "ShareKey9died";
    let status = get(addr, &format!("/die?key={died_key}"), &client).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // A rejected credential: the app password was revoked.
    mock.state
        .accept_only(&mock.username, "a-newer-app-password");
    let rejected_key = "ShareKey10rejected";
    let status = get(addr, &format!("/share/{rejected_key}"), &client).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    let (stdout, logs) = serving.stop_with_output().await;
    let everything = format!("{hint}\n{stdout}{logs}");
    let app_basic = basic(&mock.username, &mock.password);
    let encoded = |value: &str| base64::engine::general_purpose::STANDARD.encode(value);
    let secrets = [
        mock.password.clone(),
        app_basic.clone(),
        encoded(&format!("{}:{}", mock.username, mock.password)),
        token.to_owned(),
        encoded(&format!("credproxy:{token}")),
        wrong_token.to_owned(),
        key.to_owned(),
        slug.to_owned(),
        password.to_owned(),
        query_key.to_owned(),
        api_key.to_owned(),
        session_key.to_owned(),
        refused_key.to_owned(),
        died_key.to_owned(),
        rejected_key.to_owned(),
    ];
    for line in everything.lines() {
        for secret in &secrets {
            assert!(!line.contains(secret.as_str()), "{secret:?} logged: {line}");
        }
    }
    // The lines are there, with what may be shown: the test sees the whole run.
    for expected in [
        "path=/share/***/photos/asset-1 status=",
        "path=/%73hare/*** status=",
        "path=/s/*** status=",
        "path=/api/shared-links/me?key=***&password=*** status=",
        "path=/api/users/me?sessionKey=*** status=",
        "refused GET /share/***?key=***: this proxy needs its local credential",
        "refused GET /s/***?password=***: host 'photos.evil.example'",
        "path=/die?key=*** status=502",
        "path=/share/*** status=502",
        "Fix: credproxy login",
        " DEBUG ",
    ] {
        assert!(logs.contains(expected), "{expected:?} not in:\n{logs}");
    }
    let access_lines = logs.lines().filter(|l| l.contains(" path=")).count();
    assert_eq!(access_lines, served.len() + 5, "{logs}");
    run(&config, &["logout", "--profile", &profile], None).await;
}

/// The profiles in `config`, sorted.
fn profiles_in(config: &Path) -> Vec<String> {
    let store = ConfigStore::locate(Some(config.to_owned())).unwrap();
    store.load().unwrap().profiles.into_keys().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_logins_at_once_all_land_and_so_do_logouts_beside_logins() {
    require_secret_service();
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("config.toml");
    let config = config_file.as_path();
    let base = unique_profile("many");
    let names: Vec<String> = (0..20).map(|i| format!("{base}-{i:02}")).collect();
    let logins = names.iter().map(|name| login(config, &mock, name));
    futures_util::future::join_all(logins).await;
    assert_eq!(
        profiles_in(config),
        names,
        "a login at the same time was lost"
    );

    // Half log out while as many new ones log in, all at once.
    let newcomers: Vec<String> = (20..30).map(|i| format!("{base}-{i:02}")).collect();
    let logouts = names[..10].iter().map(|name| async move {
        let done = run(config, &["logout", "--profile", name], None).await;
        assert_eq!(done.code, Some(0), "logout {name}: {}", done.stderr);
    });
    let logins = newcomers.iter().map(|name| login(config, &mock, name));
    tokio::join!(
        futures_util::future::join_all(logouts),
        futures_util::future::join_all(logins)
    );
    let expected: Vec<String> = names[10..].iter().chain(&newcomers).cloned().collect();
    assert_eq!(profiles_in(config), expected);

    for name in &expected {
        run(config, &["logout", "--profile", name], None).await;
    }
    assert_eq!(profiles_in(config), Vec::<String>::new());
}

/// The soft limit on open descriptors of this process, raised to at least `wanted` (within
/// the hard limit).
fn raise_descriptor_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct passed, which lives across the call.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    assert!(
        limit.rlim_max >= wanted,
        "this test needs {wanted} open descriptors; the hard limit is {}",
        limit.rlim_max
    );
    limit.rlim_cur = limit.rlim_cur.max(wanted);
    // SAFETY: setrlimit reads the struct passed, which lives across the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn idle_admin_connections_do_not_starve_the_proxy_of_descriptors() {
    require_secret_service();
    const IDLE: usize = 2_000;
    // Room for this test's own end of every connection.
    raise_descriptor_limit(IDLE as u64 + 1_024);
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let profile = unique_profile("admin-flood");
    login(&config, &mock, &profile).await;
    let mut serve = command(
        &config,
        &[
            "serve",
            "--profile",
            &profile,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    // The proxy gets what a service manager gives (systemd's default soft limit).
    // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe, on a
    // struct on the child's stack.
    unsafe {
        serve.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = 1_024;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut serving = Serving::spawn(serve).await;
    let line = tokio::time::timeout(Duration::from_secs(30), serving.stdout.next_line())
        .await
        .expect("serve announced its admin listener")
        .unwrap()
        .unwrap();
    let admin = common::address_in(&line);
    let pid = serving.child.id().unwrap();

    // A local process opens connections to the admin port and sends nothing.
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let connected = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(admin))
            .await
            .expect("the admin port takes connections")
            .unwrap();
        idle.push(connected);
    }
    // Meanwhile the proxy port answers.
    let host = serving.addr.to_string();
    let answered = tokio::time::timeout(
        Duration::from_secs(20),
        get(serving.addr, "/api/server/ping", &[("host", &host)]),
    )
    .await
    .expect("the proxy answered while the admin connections were held");
    assert_eq!(answered, StatusCode::OK);
    let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        })
        .count();
    assert!(
        sockets < 100,
        "the proxy holds {sockets} sockets for {IDLE} idle admin connections"
    );
    drop(idle);
    serving.stop().await;
    run(&config, &["logout", "--profile", &profile], None).await;
}
