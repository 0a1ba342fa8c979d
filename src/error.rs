//! The core library's error types: every message is lowercase, actionable and secret-free.
//!
//! This module imports nothing from the crate: every other module may use it, and the core
//! error knows nothing of the command line, the doctor or the service installer (the CLI
//! wraps it in its own error).

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in the core, outside a single proxied request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value given on the command line, in the config file or by an app is not acceptable.
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
    /// The profile exists but its secret is not in the credential store.
    #[error("no credentials stored for profile '{profile}'; {fix}")]
    MissingSecret {
        /// The profile.
        profile: String,
        /// What stores them (for the CLI: the `credproxy login` command for this profile).
        fix: String,
    },
    /// The credential store could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The extra CA certificate could not be used.
    #[error("cannot use CA certificate {path}: {reason}")]
    CaCert {
        /// The PEM file (or a description of where the PEM text came from).
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A client certificate cannot be used (unreadable, wrong password, expired, key
    /// mismatch…); nothing was stored.
    #[error("cannot use the client certificate {path}: {reason}")]
    ClientCertificate {
        /// Where it came from (a file, or what holds it).
        path: PathBuf,
        /// What is wrong with it and what to do.
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
    /// The async runtime (its threads, its event loop) could not be started.
    #[error("cannot start the event loop")]
    Runtime(#[source] std::io::Error),
}

impl Error {
    /// True for errors the user fixes by changing the command line (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Invalid { .. } | Error::NonLoopback { .. })
    }
}

/// Why a credential store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No keyring service could be reached at all.
    #[error("the OS keyring is not reachable ({detail}); {hint}")]
    Unavailable {
        /// What the platform said, free of secrets.
        detail: String,
        /// What the user can do about it on this platform.
        hint: &'static str,
    },
    /// The keyring answered but refused or failed the operation.
    #[error("the OS keyring failed: {0}")]
    Failed(String),
    /// An app's own credential provider failed.
    #[error("the app's credential provider failed: {0}")]
    Provider(String),
}

/// The core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
