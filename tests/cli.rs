//! The `credproxy` binary's contract: exit codes, refusals and messages that need no keyring.

use std::path::Path;
use std::process::{Command, Output};

fn credproxy(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_credproxy"))
        .args(args)
        .env("CREDPROXY_CONFIG", config)
        // No keyring is reachable here: commands that do not need one must not touch it.
        .env(
            "DBUS_SESSION_BUS_ADDRESS",
            "unix:path=/nonexistent/credproxy-test-bus",
        )
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write_profile(config: &Path, name: &str) {
    std::fs::write(
        config,
        format!(
            "[profiles.{name}]\nserver = \"https://immich.example.com\"\nusername = \"svc-laptop\"\n"
        ),
    )
    .unwrap();
}

#[test]
fn help_succeeds_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let help = credproxy(&config, &["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for command in ["login", "serve", "logout", "profiles", "demo"] {
        assert!(text.contains(command), "help lists {command}");
    }
    assert_eq!(credproxy(&config, &["frobnicate"]).status.code(), Some(2));
    // There is no way to pass a password as an argument.
    let with_password = credproxy(
        &config,
        &[
            "login",
            "--server",
            "https://x.example",
            "--username",
            "u",
            "--password",
            "hunter2",
        ],
    );
    assert_eq!(with_password.status.code(), Some(2));
    assert!(!stderr(&with_password).contains("panicked"));
}

#[test]
fn invalid_server_url_is_a_usage_error_that_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let out = credproxy(
        &config,
        &[
            "login",
            "--server",
            "http://immich.example.com",
            "--username",
            "u",
            "--password-stdin",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("https"), "{err}");
    assert_eq!(err.lines().count(), 1, "one readable line: {err}");
    assert!(!config.exists(), "nothing saved on a refused login");
}

#[test]
fn serve_refuses_a_non_loopback_address_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    write_profile(&config, "default");
    let out = credproxy(&config, &["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
    assert!(err.contains("--allow-remote"), "{err}");
}

#[test]
fn serve_names_an_unknown_profile_and_the_command_that_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    write_profile(&config, "default");
    let out = credproxy(&config, &["serve", "--profile", "work"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("no profile named 'work'"), "{err}");
    assert!(err.contains("credproxy login --profile work"), "{err}");
}

#[test]
fn serve_without_a_reachable_keyring_says_so_and_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    write_profile(&config, "default");
    let out = credproxy(&config, &["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("OS keyring is not reachable"), "{err}");
    assert!(err.contains("gnome-keyring"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn profiles_lists_settings_and_config_errors_are_readable() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let empty = credproxy(&config, &["profiles"]);
    assert_eq!(empty.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&empty.stdout).contains("no profiles"));

    write_profile(&config, "laptop");
    let listed = credproxy(&config, &["profiles"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("laptop") && text.contains("https://immich.example.com"));
    assert!(
        text.contains("svc-laptop") && text.contains("127.0.0.1:2283"),
        "{text}"
    );

    std::fs::write(&config, "[profiles.x]\nserver = 1\n").unwrap();
    let broken = credproxy(&config, &["profiles"]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        stderr(&broken).contains("is not valid"),
        "{}",
        stderr(&broken)
    );
}

#[test]
fn login_without_a_terminal_asks_for_password_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let out = credproxy(
        &config,
        &[
            "login",
            "--server",
            "https://immich.example.com",
            "--username",
            "u",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--password-stdin"),
        "{}",
        stderr(&out)
    );
}
