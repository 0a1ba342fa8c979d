//! credproxy: a loopback proxy that adds the credentials of an Authentik-fronted (or Cloudflare
//! Access-, or header-gated) Immich server from the OS keyring to every request, streaming
//! everything.
//!
//! # Layout
//!
//! Follow a request from the top: a client connects to [`serve`], which hands each request
//! to [`proxy`], which sends it through [`upstream`] and streams the answer back. Each
//! module uses only those listed after it:
//!
//! - [`cli`]: the binary's face: clap arguments, one file per command, the service
//!   installer (`cli/service/`: systemd, launchd, the program runner), the demo (feature
//!   `cli`, on by default).
//! - [`embed`]: the library's face for other programs (the phone library in `mobile/`): the
//!   proxy on its own runtime with a stop handle, totals, logs to a sink, and the checks.
//! - [`ops`]: logging for the binary, the admin listener (`/healthz`, `/metrics`).
//! - [`diagnose`]: step-by-step checks (DNS, TCP, TLS, gate, Immich) and the doctor.
//! - [`serve`]: the accept loop over an already-bound listener, connection limit, drain,
//!   and the listener's guards.
//! - [`proxy`]: the per-request service: request/response rewriting, the gate's answers and
//!   back-off, the session jar, streaming bodies and statistics.
//! - [`upstream`]: the connection to the one server: TLS trust, connector, connection pool.
//! - [`config`]: validated settings, profiles and the TOML file (never secrets).
//! - [`credentials`]: the [`Secret`](credentials::Secret) type, the store trait, the OS
//!   keyring and in-memory stores, and the auth schemes.
//! - [`error`]: the core error types; they know nothing of the command line.
//!
//! Four small private helpers sit under everything: `sync` (a poison-tolerant lock),
//! `memory` (handing freed heap pages back to the system), `utc` (timestamps as text) and
//! `asleep` (noticing that the machine slept, so connections from before are not trusted).

mod asleep;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod credentials;
pub mod diagnose;
pub mod embed;
pub mod error;
mod memory;
pub mod ops;
pub mod proxy;
pub mod serve;
mod sync;
pub mod upstream;
mod utc;

pub use error::{Error, Result};
