//! The one error type of the FFI boundary: each variant becomes an exception on the app side.

use credproxy::Error;
use credproxy::credentials::StoreError;

/// Why a call failed; `detail` is lowercase, actionable and never carries a secret.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum MobileError {
    /// A configuration value is not acceptable (server URL, username, CA, pin, local token).
    #[error("invalid configuration: {detail}")]
    InvalidConfig {
        /// What was wrong and what a good value looks like.
        detail: String,
    },
    /// No app password could be had from the credential provider or the keyring.
    #[error("no credentials: {detail}")]
    Credentials {
        /// Where the password was looked for and what went wrong.
        detail: String,
    },
    /// The local port could not be opened.
    #[error("cannot listen: {detail}")]
    Listen {
        /// The address and the cause (often: port already in use).
        detail: String,
    },
    /// Anything else the core reported (for example: TLS could not be set up).
    #[error("{detail}")]
    Failed {
        /// The core's message.
        detail: String,
    },
}

impl MobileError {
    /// A credentials error with this text.
    pub(crate) fn credentials(detail: impl Into<String>) -> Self {
        Self::Credentials {
            detail: detail.into(),
        }
    }
}

impl From<Error> for MobileError {
    fn from(err: Error) -> Self {
        let detail = err.to_string();
        match err {
            Error::Invalid { .. } | Error::CaCert { .. } | Error::ClientCertificate { .. } => {
                Self::InvalidConfig { detail }
            }
            Error::Listen { .. } | Error::NonLoopback { .. } => Self::Listen {
                detail: with_source(&err),
            },
            Error::Store(_) | Error::MissingSecret { .. } => Self::Credentials { detail },
            _ => Self::Failed { detail },
        }
    }
}

impl From<StoreError> for MobileError {
    fn from(err: StoreError) -> Self {
        Self::credentials(err.to_string())
    }
}

/// A foreign callback threw something other than a `MobileError` (a bug in the app's code).
impl From<uniffi::UnexpectedUniFFICallbackError> for MobileError {
    fn from(err: uniffi::UnexpectedUniFFICallbackError) -> Self {
        Self::Failed {
            detail: format!("the app's callback failed: {}", err.reason),
        }
    }
}

/// The message with its cause appended (`cannot listen on X: address in use`).
fn with_source(err: &Error) -> String {
    match std::error::Error::source(err) {
        Some(source) => format!("{err}: {source}"),
        None => err.to_string(),
    }
}
