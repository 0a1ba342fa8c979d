//! Diagnosis: step-by-step checks of a server and credentials, each failing with its own
//! precise error, and the doctor that runs them in order.
//!
//! Owns: [`check`] (DNS, TCP, TLS, the gate, Immich's ping; used by `login` to verify) and
//! [`doctor`] (every step with a verdict and a fix hint; `credproxy doctor` and apps' `check`).

pub mod check;
pub mod doctor;
