//! The command line's error: the core's, plus what only commands can fail at (reading a
//! password, the doctor's verdict, the demo, the service manager), and the exit code of each.

use std::path::PathBuf;

use crate::diagnose::check::CheckError;
use crate::error::Error;

/// Everything a command can fail with; printed as one line with its cause chain.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The core failed (config, keyring, TLS set-up, listening).
    #[error(transparent)]
    Core(#[from] Error),
    /// Checking the server and credentials failed.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The LAN address answered but is not the profile's server (or refused it).
    #[error("the LAN address {address}: {detail}; {fix}")]
    Lan {
        /// The LAN address.
        address: String,
        /// What it did.
        detail: String,
        /// What to do.
        fix: String,
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
    /// `man --dir` could not write its pages.
    #[error("cannot write the man pages into {dir}")]
    ManPages {
        /// The directory asked for.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
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
}

impl From<crate::error::StoreError> for CliError {
    fn from(err: crate::error::StoreError) -> Self {
        Self::Core(err.into())
    }
}

impl CliError {
    /// The process exit code: 2 for a usage error the user fixes on the command line, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Core(err) if err.is_usage() => 2,
            _ => 1,
        }
    }
}

/// The command line's result type.
pub type Result<T, E = CliError> = std::result::Result<T, E>;
