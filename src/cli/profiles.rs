//! `credproxy profiles`: list the profiles of the config file, never their secrets.

use std::io::Write as _;

use super::Result;
use crate::config::{self, ConfigStore};

/// Runs `profiles`.
pub fn run(config: &ConfigStore) -> Result<()> {
    let file = config.load()?;
    let mut out = std::io::stdout().lock();
    if file.profiles.is_empty() {
        let _ = writeln!(
            out,
            "no profiles in {}; create one with `credproxy login --server URL --username NAME`",
            config.path().display()
        );
        return Ok(());
    }
    let _ = writeln!(
        out,
        "{:<16} {:<40} {:<24} {:<18} LISTEN",
        "PROFILE", "SERVER", "USERNAME", "AUTH"
    );
    for (name, entry) in &file.profiles {
        let listen = entry
            .listen
            .clone()
            .unwrap_or_else(|| config::DEFAULT_LISTEN.to_string());
        let auth = entry.auth.as_deref().unwrap_or("basic");
        let username = if entry.username.is_empty() {
            "-"
        } else {
            &entry.username
        };
        let _ = writeln!(
            out,
            "{name:<16} {:<40} {username:<24} {auth:<18} {listen}",
            entry.server
        );
    }
    Ok(())
}
