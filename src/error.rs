//! The core library's one error type: every message is lowercase, actionable and secret-free.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::check::CheckError;
use crate::credentials::StoreError;

/// Everything that can go wrong in the core, outside a single proxied request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value given on the command line or in the config file is not acceptable.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which setting was wrong.
        what: &'static str,
        /// Why, and what a good value looks like.
        reason: String,
    },
    /// No config directory exists on this platform and none was named.
    #[error(
        "no config directory is known for this platform; pass --config FILE or set CREDPROXY_CONFIG"
    )]
    NoConfigDir,
    /// The config file exists but could not be read.
    #[error("cannot read config file {path}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("config file {path} is not valid: {message}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// What the parser said (line and column included).
        message: String,
    },
    /// The config file could not be written.
    #[error("cannot write config file {path}")]
    ConfigWrite {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The named profile is not in the config file.
    #[error(
        "no profile named '{profile}' in {path}; create it with `credproxy login --profile {profile} --server https://immich.example.com --username NAME`"
    )]
    UnknownProfile {
        /// The profile asked for.
        profile: String,
        /// The config file searched.
        path: PathBuf,
    },
    /// The profile exists but its secret is not in the keyring.
    #[error(
        "no credentials stored for profile '{profile}' in the OS keyring; run `credproxy login --profile {profile} --server {server} --username {username}`"
    )]
    MissingSecret {
        /// The profile.
        profile: String,
        /// Its server, for the suggested command.
        server: String,
        /// Its username, for the suggested command.
        username: String,
    },
    /// The keyring could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The extra CA certificate could not be used.
    #[error("cannot use CA certificate {path}: {reason}")]
    CaCert {
        /// The PEM file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// A non-loopback listen address was asked for without the explicit opt-in.
    #[error(
        "refusing to listen on {addr}: it is not a loopback address, and anyone who can reach it would act with your credentials; use a 127.0.0.1 or [::1] address, or pass --allow-remote if you really mean it"
    )]
    NonLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The listen socket could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause (often: already in use).
        #[source]
        source: std::io::Error,
    },
    /// The password could not be read.
    #[error("cannot read the password: {0}")]
    Password(String),
    /// `doctor` found problems (it printed them).
    #[error("doctor found {0} problem(s); see the ✗ lines above")]
    Doctor(usize),
    /// The built-in demonstration could not run or did not behave as expected.
    #[error("the demo failed: {0}")]
    Demo(String),
    /// `credproxy service` has no service manager to drive on this platform.
    #[error(
        "`credproxy service` drives systemd user units on linux and launchd agents on macos, not {os}; see the README section \"Run it as a service\" to start `credproxy serve` at logon"
    )]
    ServiceUnsupported {
        /// The platform.
        os: &'static str,
    },
    /// A service file could not be read, written or removed.
    #[error("cannot {action} service file {path}")]
    ServiceFile {
        /// What was being done.
        action: &'static str,
        /// The unit or plist file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The service manager could not be reached or refused a step.
    #[error("{done}, but `{command}` failed: {detail}; {fix}")]
    ServiceManager {
        /// What was done before the failure.
        done: String,
        /// The command that failed.
        command: String,
        /// What it said.
        detail: String,
        /// What to run by hand.
        fix: String,
    },
    /// No service is installed for the profile.
    #[error(
        "no service is installed for profile '{profile}' (no {path}); install it with `credproxy service install --profile {profile}`"
    )]
    ServiceNotInstalled {
        /// The profile.
        profile: String,
        /// Where its service file would be.
        path: PathBuf,
    },
    /// The profile's service is installed but the proxy is not running.
    #[error("the service {name} is {state}; {fix}")]
    ServiceNotRunning {
        /// The unit name or launchd label.
        name: String,
        /// The manager's view, or why it could not be asked.
        state: String,
        /// Where to look next.
        fix: String,
    },
    /// Checking the server and credentials failed.
    #[error(transparent)]
    Check(#[from] CheckError),
}

impl Error {
    /// True for errors the user fixes by changing the command line (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Invalid { .. } | Error::NonLoopback { .. })
    }
}

/// The core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
