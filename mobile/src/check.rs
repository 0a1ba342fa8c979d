//! The doctor's network checks (DNS, TCP, TLS, gate, credentials, Immich, websocket) as records.

use std::time::Duration;

use credproxy::diagnose::doctor::{Status, Step};
use credproxy::embed;

use crate::config::ProxyConfig;
use crate::error::MobileError;
use crate::logging;

/// How long each step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the checks for `config` with its credentials; blocks, so call it off the UI thread.
///
/// A configuration or credentials problem is an error; a failing step is a record.
#[uniffi::export]
pub fn check(config: ProxyConfig) -> Result<Vec<CheckResult>, MobileError> {
    let settings = config.settings()?;
    let password = config.password(&settings)?;
    let steps = embed::check(
        &settings,
        &config.scheme()?,
        &password,
        STEP_TIMEOUT,
        logging::sink(),
    )?;
    Ok(steps.into_iter().map(CheckResult::from).collect())
}

/// How a step went.
#[derive(uniffi::Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// It works.
    Pass,
    /// It works, but something deserves attention.
    Warn,
    /// It does not work, or was not checked because an earlier step failed.
    Fail,
}

impl From<Status> for CheckStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Pass => Self::Pass,
            Status::Warn => Self::Warn,
            Status::Fail => Self::Fail,
        }
    }
}

/// One checked step.
#[derive(uniffi::Record)]
pub struct CheckResult {
    /// Short name: `dns`, `tcp`, `tls`, `gate`, `credentials`, `immich`, `websocket`.
    pub name: String,
    /// The verdict; a step not run because an earlier one failed is `Fail` ("not checked").
    pub status: CheckStatus,
    /// What was found (for `tls`: subject, issuer, expiry and the SPKI pin).
    pub detail: String,
    /// What to do about a failure or warning.
    pub fix: Option<String>,
}

impl From<Step> for CheckResult {
    fn from(step: Step) -> Self {
        Self {
            name: step.name.to_owned(),
            status: step.status.into(),
            detail: step.detail,
            fix: step.fix,
        }
    }
}
