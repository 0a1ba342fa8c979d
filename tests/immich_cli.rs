//! End to end: the real `@immich/cli` logs in and uploads a folder through credproxy to the
//! mock's Immich API, and every file arrives byte for byte.
//!
//! The CLI comes from `tests/install-immich-cli` (run by `tests/run`); without it this test
//! fails and says so.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use base64::Engine as _;

use common::immich_api::{self, API_KEY, ImmichApiState, USER_EMAIL};
use common::pki::{ClientCa, Validity};
use common::{Mock, start_proxy};
use credproxy::credentials::{ClientIdentity, Scheme, Secret};
use credproxy::proxy::Proxy;
use credproxy::serve::{ServeOptions, Site};

/// An upper bound for one CLI run; a healthy one takes a few seconds.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// The installed CLI: a Node ≥ 22 and the CLI's bundled entry point.
struct Cli {
    node: PathBuf,
    entry: PathBuf,
}

/// What one CLI run did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

impl Cli {
    /// Finds the CLI `tests/install-immich-cli` installed, or fails saying how to install it.
    fn installed() -> Cli {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/immich-cli");
        let cli = Cli {
            node: dir.join("bin/node"),
            entry: dir.join("node_modules/@immich/cli/dist/index.js"),
        };
        assert!(
            cli.node.exists() && cli.entry.exists(),
            "the Immich CLI is not installed in {}: run tests/install-immich-cli \
             (tests/run does this before the suite)",
            dir.display()
        );
        cli
    }

    /// Runs `immich ARGS` with only `env` (plus HOME and PATH) in its environment.
    async fn run(&self, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
        let label = args.first().copied().unwrap_or("cli");
        let n = std::fs::read_dir(home).unwrap().count();
        let stdout_path = home.join(format!("{n}-{label}.stdout"));
        let stderr_path = home.join(format!("{n}-{label}.stderr"));
        let mut command = tokio::process::Command::new(&self.node);
        command
            .arg(&self.entry)
            .args(args)
            .env_clear()
            .env("HOME", home)
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.node.display()));
        let waited = tokio::time::timeout(CLI_TIMEOUT, child.wait()).await;
        if waited.is_err() {
            let _ = child.kill().await;
        }
        let read =
            |path: &Path| String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
        let (stdout, stderr) = (read(&stdout_path), read(&stderr_path));
        match waited {
            Ok(status) => Run {
                status: status.unwrap(),
                stdout,
                stderr,
            },
            Err(_) => panic!(
                "immich {args:?} did not finish within {CLI_TIMEOUT:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            ),
        }
    }
}

/// A small deterministic generator (SplitMix64), enough for incompressible test bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A JPEG-framed file: SOI, a JFIF APP0 segment, a comment segment of `noise`, EOI.
/// Only the extension matters to the CLI; the framing keeps the bytes plausible.
fn jpeg(seed: u64, comment_len: u16) -> Vec<u8> {
    let mut out = vec![0xff, 0xd8];
    out.extend_from_slice(&[0xff, 0xe0, 0x00, 0x10]);
    out.extend_from_slice(b"JFIF\0\x01\x01\x00\x00\x01\x00\x01\x00\x00");
    out.extend_from_slice(&[0xff, 0xfe]);
    out.extend_from_slice(&(comment_len + 2).to_be_bytes());
    out.extend_from_slice(&noise(seed, comment_len.into()));
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

fn sha1_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        data,
    ))
}

#[test]
fn the_mock_parses_multipart_bodies_with_delimiter_lookalikes() {
    // Near misses of the delimiter `\r\n--XyZ`, which a sender never puts inside a part.
    let file = b"\r\n--XyQ\r\n\r\n-\r\n--Xy\x00\xff --XyZ\r\n-";
    let mut body = Vec::new();
    body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"fileSize\"\r\n\r\n");
    body.extend_from_slice(b"14\r\n--XyZ\r\n");
    body.extend_from_slice(
        b"Content-Disposition: form-data; name=\"assetData\"; filename=\"a b.jpg\"\r\n",
    );
    body.extend_from_slice(b"Content-Type: image/jpeg\r\n\r\n");
    body.extend_from_slice(file);
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    let parts = immich_api::parse_multipart(&body, "XyZ").unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(
        (parts[0].name.as_str(), parts[0].data),
        ("fileSize", &b"14"[..])
    );
    assert_eq!(parts[1].name, "assetData");
    assert_eq!(parts[1].filename.as_deref(), Some("a b.jpg"));
    assert_eq!(parts[1].data, file);
    assert_eq!(
        immich_api::multipart_boundary("multipart/form-data; boundary=\"XyZ\"").as_deref(),
        Some("XyZ")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn immich_cli_logs_in_and_uploads_a_folder_through_the_proxy() {
    let mock = Mock::start().await;
    let proxy = start_proxy(&mock).await;
    login_and_upload(&mock, &proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn immich_cli_uploads_through_the_proxy_to_a_server_that_requires_a_client_certificate() {
    let ca = ClientCa::new("credproxy test client CA");
    let client = ca.issue("laptop", Validity::Current);
    let mock = Mock::start_requiring_client_certs(&ca.ca_pem).await;
    let mut settings = common::settings_for(&mock);
    settings.identity = Some(ClientIdentity::from_pem(client.pem().as_bytes(), None).unwrap());
    let secret = Secret::new(mock.password.clone());
    let proxy = Proxy::with_secret(settings, &Scheme::Basic, &secret).unwrap();
    let proxy = common::start_site(Site::new(proxy), ServeOptions::default()).await;
    login_and_upload(&mock, &proxy).await;
    let presented = mock.state.seen().iter().all(|s| s.client_cert.is_some());
    assert!(
        presented,
        "a request reached the host without the client certificate"
    );
}

/// The CLI logs in through `proxy` and uploads a folder twice; everything arrives intact,
/// with the injected credentials and the CLI's own API key.
async fn login_and_upload(mock: &Mock, proxy: &common::RunningProxy) {
    let cli = Cli::installed();
    let local = format!("http://127.0.0.1:{}", proxy.addr.port());

    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config");
    let config_dir = config.to_str().unwrap();
    let photos = tempfile::tempdir().unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("beach.jpg", jpeg(1, 12_000)),
        // Upper-case extension and a space: the CLI matches extensions case-insensitively.
        ("family dinner.JPG", jpeg(2, 40_000)),
        // A few MiB, not a multiple of any buffer size.
        ("holiday.mp4", noise(3, 5 * 1024 * 1024 + 321)),
    ];
    let mut expected = BTreeMap::new();
    for (name, data) in &files {
        std::fs::write(photos.path().join(name), data).unwrap();
        expected.insert(name.to_string(), (data.len() as u64, sha1_hex(data)));
    }
    // Not a media type the server lists: the CLI must leave it alone.
    std::fs::write(photos.path().join("notes.txt"), b"not a photo").unwrap();
    let folder = photos.path().to_str().unwrap();

    // `immich login` stores the URL and key in auth.yml under the config directory.
    let env = [("IMMICH_CONFIG_DIR", config_dir)];
    let login = cli
        .run(home.path(), &env, &["login", &local, API_KEY])
        .await;
    assert!(login.status.success(), "login failed: {}", login.describe());
    assert!(
        login.stdout.contains(&format!("Logged in as {USER_EMAIL}")),
        "{}",
        login.describe()
    );
    assert!(config.join("auth.yml").exists(), "{}", login.describe());

    // `immich upload` with the stored login.
    let args = ["upload", "--no-progress", "--concurrency", "2", folder];
    let upload = cli.run(home.path(), &env, &args).await;
    assert!(
        upload.status.success(),
        "upload failed: {}",
        upload.describe()
    );
    // The CLI exits 0 even when files fail, so its summary and the mock's records decide.
    assert!(
        upload.stdout.contains("Successfully uploaded 3 new assets")
            && !upload.stdout.contains("Failed"),
        "{}",
        upload.describe()
    );

    let immich = ImmichApiState::of(&mock.state);
    let uploads = immich.uploads();
    let mut arrived = BTreeMap::new();
    for record in &uploads {
        assert_eq!(record.status, "created", "{record:?}");
        let sent = expected
            .get(&record.filename)
            .unwrap_or_else(|| panic!("unexpected upload {record:?}"));
        assert_eq!(
            (record.size, &record.sha1),
            (sent.0, &sent.1),
            "{} arrived altered",
            record.filename
        );
        assert_eq!(
            record.fields.get("fileSize").map(String::as_str),
            Some(sent.0.to_string().as_str()),
            "{record:?}"
        );
        if let Some(header) = &record.checksum_header {
            let base64 = base64::engine::general_purpose::STANDARD
                .encode(hex::decode(&record.sha1).unwrap());
            assert!(
                header.eq_ignore_ascii_case(&record.sha1) || *header == base64,
                "x-immich-checksum {header} does not match the body's SHA-1 {}",
                record.sha1
            );
        }
        assert!(
            arrived.insert(record.filename.clone(), ()).is_none(),
            "{} was uploaded twice",
            record.filename
        );
    }
    assert_eq!(
        arrived.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "not every file arrived: {}",
        upload.describe()
    );

    // Again with the URL and key from the environment: the server's checksums mark every file
    // as a duplicate, so nothing is sent twice.
    let env = [
        ("IMMICH_CONFIG_DIR", config_dir),
        ("IMMICH_INSTANCE_URL", local.as_str()),
        ("IMMICH_API_KEY", API_KEY),
    ];
    let again = cli.run(home.path(), &env, &args).await;
    assert!(
        again.status.success(),
        "second upload failed: {}",
        again.describe()
    );
    assert!(
        again.stdout.contains("Found 0 new files and 3 duplicates"),
        "{}",
        again.describe()
    );
    assert_eq!(
        immich.uploads().len(),
        uploads.len(),
        "{}",
        again.describe()
    );

    // Every request reached the host with the injected credentials, and every API call with
    // the client's own API key.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", mock.username, mock.password))
    );
    let seen = mock.state.seen();
    let mut calls = BTreeMap::<String, usize>::new();
    for request in &seen {
        let call = format!("{} {}", request.method, request.path_and_query);
        assert_eq!(
            request.headers.get("authorization").map(|v| v.as_bytes()),
            Some(basic.as_bytes()),
            "{call} reached the host without the injected credentials"
        );
        if request.path_and_query.starts_with("/api/") {
            assert_eq!(
                request.headers.get("x-api-key").map(|v| v.as_bytes()),
                Some(API_KEY.as_bytes()),
                "{call} lost the client's x-api-key"
            );
        }
        *calls.entry(call).or_default() += 1;
    }
    println!("requests the mock saw (method path: count): {calls:#?}");
    for call in [
        "GET /.well-known/immich",
        "GET /api/users/me",
        "GET /api/api-keys/me",
        "GET /api/server/media-types",
        "POST /api/assets/bulk-upload-check",
        "POST /api/assets",
    ] {
        assert!(
            calls.contains_key(call),
            "the CLI never called {call}: {calls:#?}"
        );
    }
    assert_eq!(calls["POST /api/assets"], files.len(), "{calls:#?}");
}
