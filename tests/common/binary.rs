//! Driving the real `credproxy` binary: one-shot commands and a running `serve`, each with a
//! config file and a control-socket directory of the test's own, against the real Secret
//! Service of `tests/keyring-session`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// Fails the test unless it runs inside `tests/keyring-session`.
pub fn require_secret_service() {
    assert!(
        std::env::var_os("CREDPROXY_KEYRING_SESSION").is_some(),
        "this test needs a real Secret Service: run the suite with `tests/run` \
         (or `tests/keyring-session cargo nextest run`)"
    );
}

/// A profile name no other test (or earlier run) uses.
pub fn unique_profile(tag: &str) -> String {
    format!("e2e-{tag}-{}", std::process::id())
}

/// The binary under test.
pub fn binary() -> &'static Path {
    // Not set when this harness is compiled into another crate's tests (mobile/).
    match option_env!("CARGO_BIN_EXE_credproxy") {
        Some(path) => Path::new(path),
        None => panic!("only the credproxy package's tests run the binary"),
    }
}

/// `credproxy ARGS` with `config` as its config file and the config file's directory as its
/// home and the runtime directory of its control sockets (so tests never meet each other's
/// proxies).
pub fn command(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env("CREDPROXY_CONFIG", config)
        .env("XDG_RUNTIME_DIR", runtime_dir(config))
        // Whatever it might write under a home directory lands where the test can see it.
        .env("HOME", runtime_dir(config))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The control-socket directory the commands of this config file share.
pub fn runtime_dir(config: &Path) -> PathBuf {
    config
        .parent()
        .expect("the config file is in the test's directory")
        .to_owned()
}

/// What a finished command printed and returned.
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `credproxy ARGS` to completion (bounded), feeding `stdin` if given.
pub async fn run(config: &Path, args: &[&str], stdin: Option<&str>) -> Outcome {
    finish(command(config, args), stdin).await
}

/// `credproxy login` for `profile` at `mock` (its URL, trusting its CA, the secrets one per
/// line from `stdin`) with `extra` arguments.
pub async fn login_at(
    config: &Path,
    mock: &super::mock::Mock,
    profile: &str,
    extra: &[&str],
    stdin: &str,
) -> Outcome {
    let url = mock.url();
    let ca = mock.ca_file.to_str().unwrap();
    let base = [
        "login",
        "--server",
        &url,
        "--profile",
        profile,
        "--ca-cert",
        ca,
        "--password-stdin",
    ];
    run(config, &[&base[..], extra].concat(), Some(stdin)).await
}

/// Runs a command line as a shell would (`sh -c`), with the binary first on `PATH`: what a
/// user does with a command credproxy printed.
pub async fn run_shell(config: &Path, line: &str, stdin: Option<&str>) -> Outcome {
    let path = format!(
        "{}:{}",
        binary().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", line])
        .env("PATH", path)
        .env_remove("CREDPROXY_CONFIG")
        .env("XDG_RUNTIME_DIR", runtime_dir(config))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    finish(cmd, stdin).await
}

async fn finish(mut cmd: Command, stdin: Option<&str>) -> Outcome {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        match pipe.write_all(input.as_bytes()).await {
            // A command that refuses its input before reading it (a bad certificate file is
            // refused before any password is read) closes the pipe: its outcome says why.
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {}
            written => written.unwrap(),
        }
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command finished")
        .unwrap();
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A running `credproxy serve`.
pub struct Serving {
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The rest of its standard output.
    pub stdout: Lines<BufReader<ChildStdout>>,
    stderr: BufReader<ChildStderr>,
    /// Its standard error so far.
    pub logs: String,
}

impl Serving {
    /// Starts `credproxy serve ARGS` and waits (bounded) for the line that says where it
    /// listens.
    pub async fn start(config: &Path, args: &[&str]) -> Serving {
        Self::spawn(command(config, &[&["serve"], args].concat())).await
    }

    /// Starts `cmd` (a `serve` made by [`command`] that the test adjusted) and waits
    /// (bounded) for the line that says where it listens.
    pub async fn spawn(mut cmd: Command) -> Serving {
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .expect("serve announced its address")
            .unwrap()
            .expect("serve printed a line");
        Serving {
            addr: super::address_in(&line),
            child,
            stdout,
            stderr,
            logs: String::new(),
        }
    }

    /// Starts `credproxy serve --profile PROFILE` on a free port with an admin listener on
    /// another; returns it and the admin listener's address.
    pub async fn start_with_admin(config: &Path, profile: &str) -> (Serving, SocketAddr) {
        let args = [
            "--profile",
            profile,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ];
        let mut serving = Serving::start(config, &args).await;
        let line = tokio::time::timeout(Duration::from_secs(30), serving.stdout.next_line())
            .await
            .expect("serve announced its admin listener")
            .unwrap()
            .expect("serve printed the admin line");
        (serving, super::address_in(&line))
    }

    /// Reads its log (bounded) until a line contains `text`; returns that line.
    pub async fn wait_for_log(&mut self, text: &str) -> String {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let mut line = String::new();
                assert!(
                    self.stderr.read_line(&mut line).await.unwrap() > 0,
                    "serve ended before logging {text:?}:\n{}",
                    self.logs
                );
                self.logs.push_str(&line);
                if line.contains(text) {
                    return line;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("serve never logged {text:?}:\n{}", self.logs))
    }

    /// Sends it a signal (`-HUP`, `-TERM`).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// Stops it with SIGTERM and returns the rest of its log.
    pub async fn stop(self) -> String {
        self.stop_with_output().await.1
    }

    /// Stops it with SIGTERM and returns the rest of its standard output and its log.
    pub async fn stop_with_output(mut self) -> (String, String) {
        self.signal("-TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("serve exited after SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0));
        self.stderr.read_to_string(&mut self.logs).await.unwrap();
        let mut stdout = String::new();
        while let Some(line) = self.stdout.next_line().await.unwrap() {
            stdout.push_str(&line);
            stdout.push('\n');
        }
        (stdout, self.logs)
    }
}
