//! `credproxy profiles`: list the profiles of the config file, never their secrets; or, asked
//! with `--show-token`, print one profile's local URL with its local credential.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use super::args::ProfilesArgs;
use super::{Result, blocking};
use crate::config::{self, ConfigStore};
use crate::credentials::{self, CredentialStore};
use crate::ops::control::{self, Request};

/// Runs `profiles`.
pub async fn run(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    args: ProfilesArgs,
) -> Result<()> {
    if args.show_token {
        show_token(config, keyring, &args.profile).await
    } else {
        list(config)
    }
}

fn list(config: &ConfigStore) -> Result<()> {
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

/// Prints the local URL of `name` with its local credential (made and stored now if it has
/// none yet, as `serve --local-auth` would): where a running proxy serves the profile, at the
/// address it listens on; else at the profile's listen address.
///
/// This is how a user reads the URL when `serve` runs as a service: `serve` prints it only to
/// a terminal, never into a log.
async fn show_token(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    name: &str,
) -> Result<()> {
    let profile = config.profile(&config::validate_profile_name(name)?)?;
    let account = profile.name.clone();
    let token = blocking(move || credentials::local_token(keyring.as_ref(), &account)).await?;
    let addr = running_address(config, &profile.name)
        .await
        .unwrap_or(profile.listen);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", crate::serve::guard::local_url(&token, addr));
    let _ = out.flush();
    if !profile.local_auth {
        eprintln!(
            "credproxy: clients need it while `credproxy serve` runs with --local-auth (or the profile sets local_auth = true)"
        );
    }
    Ok(())
}

/// Where a running proxy serves `profile` from this config file, if one does.
async fn running_address(config: &ConfigStore, profile: &str) -> Option<SocketAddr> {
    control::ask_all(&Request::Status)
        .await
        .iter()
        .filter_map(|reply| reply.serving(config.path(), profile))
        .find_map(|one| one.url.strip_prefix("http://")?.parse().ok())
}
