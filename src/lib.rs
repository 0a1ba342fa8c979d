//! credproxy: a loopback proxy that adds Authentik credentials from the OS keyring to every
//! request for an Authentik-fronted Immich server, streaming everything.
//!
//! # Layout
//!
//! - [`cli`]: clap types only; the binary parses them and hands them to [`app`].
//! - [`admin`]: the optional admin listener: `/healthz` and Prometheus `/metrics`.
//! - [`app`]: the commands (`login`, `serve`, `logout`, `profiles`, `doctor`), validate-then-run.
//! - [`auth`]: auth schemes (basic, cloudflare-access, header) and the headers they inject.
//! - [`config`]: validated settings and the TOML profile file (never secrets).
//! - [`credentials`]: the [`Secret`](credentials::Secret) type, the store trait, the OS
//!   keyring store and an in-memory store.
//! - [`upstream`]: TLS trust as a value, the HTTPS connector (rustls, ring), failure kinds.
//! - [`pool`]: upstream HTTP/1.1 connections driven on the client connection's own task.
//! - [`proxy`]: pure request/response rewriting and the per-request service.
//! - [`gate`]: recognising the Authentik outpost's redirects and rejections.
//! - [`guard`]: the listener's guards: exact Host names, no foreign Origin, local credential.
//! - [`jar`]: the gate's session cookies, kept per profile and sent back upstream.
//! - [`memory`]: handing memory back: free heap pages, and start-up code once serving.
//! - [`logging`]: log output: one write per line, batched on busy server threads.
//! - [`body`]: streaming body wrapper (byte counts, idle timeout) and the per-request log.
//! - [`server`]: the accept loops over an already-bound listener with a shutdown future, on
//!   the calling runtime or one single-threaded runtime per server thread.
//! - [`service`]: `serve` as a systemd user unit or launchd agent; the unit and plist texts.
//! - [`check`]: step-by-step checks (DNS, TCP, TLS, gate, Immich) with precise errors.
//! - [`embed`]: the proxy inside another program (the mobile crate): its own runtime, a
//!   stop handle, totals with the last error, logs to a sink, the doctor's checks.
//! - [`doctor`]: the step-by-step diagnosis behind `credproxy doctor`.
//! - [`demo`]: a local stand-in for a gated Immich host and the `demo` command.
//! - [`error`]: the core error type.

pub mod admin;
pub mod app;
pub mod auth;
pub mod body;
pub mod check;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod doctor;
pub mod embed;
pub mod error;
pub mod gate;
pub mod guard;
pub mod jar;
pub mod logging;
pub mod memory;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod service;
pub mod upstream;

pub use error::{Error, Result};
