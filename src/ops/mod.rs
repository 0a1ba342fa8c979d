//! Operations: how a running proxy is watched.
//!
//! Owns: [`logging`] (the binary's log format and batched writes to standard error),
//! [`admin`] (the optional `/healthz` and Prometheus `/metrics` listener) and [`control`]
//! (the socket through which `login`, `logout` and `doctor` reach a running proxy), and
//! [`health`] (where each profile's credentials stand, as those report it).

pub mod admin;
pub mod control;
pub mod health;
pub mod logging;
