//! Operations: how a running proxy is watched.
//!
//! Owns: [`logging`] (the binary's log format and batched writes to standard error) and
//! [`admin`] (the optional `/healthz` and Prometheus `/metrics` listener).

pub mod admin;
pub mod logging;
