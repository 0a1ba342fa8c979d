//! The bindings end to end: build the cdylib, generate bindings with the crate's own
//! uniffi-bindgen, drive the proxy from Python against the mock gated host, and prove the
//! Kotlin and Swift bindings generate with the API the README shows.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::mock::Mock;

/// The workspace root (the mobile crate's parent).
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the mobile crate lives inside the workspace")
}

/// The crate's own bindgen, built by cargo for this test.
fn bindgen() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Finds the cdylib the test build made, with the target directory and profile this test was
/// built with, and returns its path as cargo reports it. The build asks for every workspace test
/// and example, as `cargo nextest run --workspace` does, so features resolve as they did for
/// this test and the build is a no-op; `-p credproxy-mobile --lib` alone resolves features of
/// its own and compiles every dependency again (minutes on a fresh CI machine).
fn build_cdylib() -> PathBuf {
    // <target-dir>/<profile-dir>/uniffi-bindgen
    let profile_dir = bindgen()
        .parent()
        .expect("the binary is in a profile directory");
    let target_dir = profile_dir
        .parent()
        .expect("the profile is in a target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(name) => name,
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    // Cargo sets these for this test; build scripts that track them (ring's tracks
    // CARGO_MANIFEST_DIR) would otherwise rebuild for the nested build and again after it.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || name == "CARGO_TARGET_TMPDIR"
        {
            command.env_remove(&*name);
        }
    }
    let output = run(command
        .current_dir(workspace())
        .args([
            "build",
            "--workspace",
            "--tests",
            "--examples",
            "--profile",
            profile,
        ])
        .args([
            "--message-format",
            "json-render-diagnostics",
            "--target-dir",
        ])
        .arg(target_dir));
    let suffix = std::env::consts::DLL_SUFFIX;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == "credproxy_mobile"
                && m["profile"]["test"] == false
        })
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.to_string_lossy().ends_with(suffix))
        .expect("cargo reported the cdylib it built")
}

/// Generates `language` bindings from `library` into `out` with the crate's own bindgen.
fn generate(library: &Path, language: &str, out: &Path) {
    run(Command::new(bindgen())
        .current_dir(workspace())
        .args(["generate", "--library"])
        .arg(library)
        .args([
            "--language",
            language,
            "--no-format",
            "--metadata-no-deps",
            "--out-dir",
        ])
        .arg(out));
}

fn find_file(dir: &Path, name: &str) -> PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == name) {
                return path;
            }
        }
    }
    panic!("{name} was not generated under {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drives_the_proxy_against_the_gated_host() {
    let library = tokio::task::spawn_blocking(build_cdylib).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    generate(&library, "python", out.path());
    // The generated module loads the library from its own directory.
    std::fs::copy(&library, out.path().join(library.file_name().unwrap())).unwrap();
    let mock = Mock::start().await;
    let cf = Mock::start().await;
    cf.gate_wants(&[
        ("cf-access-client-id", "team.access"),
        ("cf-access-client-secret", "cf-secret-9"),
    ]);
    let pangolin = Mock::start().await;
    pangolin.gate_wants(&[("p-access-token-id", "tid-1"), ("p-access-token", "tok-2")]);
    let client_ca = common::pki::ClientCa::new("credproxy test client CA");
    let client = client_ca.issue("phone", common::pki::Validity::Current);
    let rotated = client_ca.issue("phone 2", common::pki::Validity::Current);
    let mtls = Mock::start_requiring_client_certs(&client_ca.ca_pem).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bindings_test.py");
    let mut python = Command::new("python3");
    python
        .arg(script)
        .env("CREDPROXY_BINDINGS_DIR", out.path())
        .env("MOCK_URL", mock.url())
        .env("MOCK_CA_PEM", &mock.ca_pem)
        .env("MOCK_USERNAME", &mock.username)
        .env("MOCK_PASSWORD", &mock.password)
        .env("MOCK_CF_URL", cf.url())
        .env("MOCK_CF_CA_PEM", &cf.ca_pem)
        .env("MOCK_HEADER_URL", pangolin.url())
        .env("MOCK_HEADER_CA_PEM", &pangolin.ca_pem)
        .env("MOCK_MTLS_URL", mtls.url())
        .env("MOCK_MTLS_CA_PEM", &mtls.ca_pem)
        .env("MOCK_CLIENT_PEM", client.pem())
        .env("MOCK_CLIENT_ROTATED_PEM", rotated.pem())
        .env(
            "MOCK_CLIENT_P12_HEX",
            hex::encode(client.pkcs12("p12-secret")),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let output = tokio::task::spawn_blocking(move || run(&mut python))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(stdout.contains("11 passed, 0 failed"), "{stdout}");
    // The proxy's requests reached the mock with the credentials (one exchange per session).
    assert!(
        mock.state
            .seen()
            .iter()
            .any(|s| s.path_and_query == "/echo/mobile?x=1"),
        "the request made from Python never reached the mock"
    );
}

/// Generated code without comments, with whitespace collapsed, so signatures read as one line.
fn normalized(code: &str) -> String {
    let mut text = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(start) = rest.find("/*") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    text.push_str(rest);
    let text = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("( ", "(")
        .replace(" )", ")")
        .replace(" ,", ",")
}

/// Signatures the README's Kotlin snippets rely on.
const KOTLIN_API: &[&str] = &[
    "fun `startProxy`(`config`: ProxyConfig): ProxyHandle",
    "data class ProxyConfig (var `serverUrl`: kotlin.String, var `username`: kotlin.String, var `credentials`: Credentials, var `auth`: AuthScheme? = null, var `listenPort`: kotlin.UShort = 0u, var `caPem`: kotlin.String? = null, var `pin`: kotlin.String? = null, var `localAuth`: kotlin.Boolean = false, var `localToken`: kotlin.String? = null, var `lanAddress`: kotlin.String? = null, var `lanPin`: kotlin.String? = null, var `lanCaPem`: kotlin.String? = null)",
    "data class Provider(val `provider`: uniffi.credproxy_mobile.CredentialProvider)",
    "data class Keyring(val `profile`: kotlin.String)",
    "fun `appPassword`(`serverUrl`: kotlin.String, `username`: kotlin.String): kotlin.String?",
    "fun `log`(`level`: LogLevel, `target`: kotlin.String, `message`: kotlin.String)",
    "fun `setLogger`(`logger`: Logger?, `level`: LogLevel)",
    "fun `localUrl`(): kotlin.String",
    "fun `stop`()",
    "fun `stats`(): ProxyStats",
    "fun `reloadCredentials`(): kotlin.Boolean",
    "fun `clientCertificate`(`serverUrl`: kotlin.String): ClientCertificate?",
    "fun `saveClientCertificate`(`profile`: kotlin.String, `certificate`: ClientCertificate)",
    "data class Header(val `names`: List<kotlin.String>)",
    "fun `check`(`config`: ProxyConfig): List<CheckResult>",
    "fun `saveAppPassword`(`profile`: kotlin.String, `password`: kotlin.String)",
    "sealed class MobileException",
    "open class ProxyHandle: Disposable, AutoCloseable",
    "enum class LogLevel { ERROR, WARN, INFO, DEBUG, TRACE",
];

/// Signatures the README's Swift snippets rely on.
const SWIFT_API: &[&str] = &[
    "public func startProxy(config: ProxyConfig)throws -> ProxyHandle",
    "public init(serverUrl: String, username: String, credentials: Credentials, auth: AuthScheme? = nil, listenPort: UInt16 = UInt16(0), caPem: String? = nil, pin: String? = nil, localAuth: Bool = false, localToken: String? = nil, lanAddress: String? = nil, lanPin: String? = nil, lanCaPem: String? = nil)",
    "case provider(provider: CredentialProvider)",
    "case keyring(profile: String)",
    "public protocol CredentialProvider: AnyObject, Sendable { func appPassword(serverUrl: String, username: String) throws -> String?",
    "public protocol Logger: AnyObject, Sendable { func log(level: LogLevel, target: String, message: String) throws",
    "func localUrl() -> String",
    "func stop()",
    "func reloadCredentials()throws -> Bool",
    "case cloudflareAccess",
    "func clientCertificate(serverUrl: String) throws -> ClientCertificate?",
    "case pkcs12(data: Data, password: String)",
    "public func check(config: ProxyConfig)throws -> [CheckResult]",
    "public func saveAppPassword(profile: String, password: String)throws",
    "enum MobileError: Swift.Error",
];

#[test]
fn kotlin_and_swift_bindings_generate() {
    let library = build_cdylib();
    let out = tempfile::tempdir().unwrap();
    generate(&library, "kotlin", &out.path().join("kotlin"));
    generate(&library, "swift", &out.path().join("swift"));
    let read = |name| normalized(&std::fs::read_to_string(find_file(out.path(), name)).unwrap());
    let kotlin = read("credproxy_mobile.kt");
    let swift = read("credproxy_mobile.swift");
    find_file(out.path(), "credproxy_mobileFFI.h");
    find_file(out.path(), "credproxy_mobileFFI.modulemap");
    for signature in KOTLIN_API {
        assert!(
            kotlin.contains(signature),
            "Kotlin bindings lack {signature}"
        );
    }
    for signature in SWIFT_API {
        assert!(swift.contains(signature), "Swift bindings lack {signature}");
    }
    // The README's snippets call the API by these names.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for name in [
        "startProxy(ProxyConfig(",
        "Credentials.Provider(",
        ": CredentialProvider {",
        "override fun appPassword(serverUrl: String, username: String): String?",
        "setLogger(object : Logger {",
        "override fun log(level: LogLevel, target: String, message: String)",
        "try startProxy(config: ProxyConfig(",
        ".provider(provider:",
        "func appPassword(serverUrl: String, username: String) throws -> String?",
        "override fun clientCertificate(serverUrl: String): ClientCertificate?",
        "func clientCertificate(serverUrl: String) throws -> ClientCertificate?",
        "catch let error as MobileError",
    ] {
        assert!(readme.contains(name), "README.md no longer shows {name}");
    }
}
