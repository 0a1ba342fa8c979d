//! credproxy for phone apps: UniFFI bindings (Kotlin, Swift, Python) over the credproxy library.
//!
//! A thin face of the core: every function here converts its arguments, calls the library and
//! converts the answer; the proxy, the checks and the runtime live in
//! [`credproxy::embed`].
//!
//! # Layout
//!
//! - [`error`]: [`MobileError`], the one error type that crosses the FFI boundary.
//! - [`config`]: [`ProxyConfig`] and [`Credentials`]: what the app passes in, validated into
//!   the core's settings.
//! - [`credentials`]: the [`CredentialProvider`] the app implements (Keystore, Keychain) and
//!   the platform keyring store by profile.
//! - [`handle`]: [`start_proxy`] and the [`ProxyHandle`] it returns.
//! - [`check`]: [`check`](check::check), the doctor's network checks as records.
//! - [`logging`]: [`set_logger`] and the [`Logger`] the app implements.

uniffi::setup_scaffolding!();

pub mod check;
pub mod config;
pub mod credentials;
pub mod error;
pub mod handle;
pub mod logging;

pub use check::{CheckResult, CheckStatus};
pub use config::{AuthScheme, Credentials, ProxyConfig};
pub use credentials::{ClientCertificate, CredentialProvider};
pub use error::MobileError;
pub use handle::{ProxyHandle, ProxyStats, start_proxy};
pub use logging::{LogLevel, Logger, set_logger};
