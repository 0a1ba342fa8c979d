//! `credproxy login`: validate the settings, read the secret, verify it through the gate,
//! then store it in the keyring and the profile in the config file.

use std::io::{IsTerminal as _, Read as _};
use std::sync::Arc;
use std::time::Duration;

use super::args::LoginArgs;
use super::{CliError, Result, blocking};
use crate::config::{self, CaCert, ConfigStore, Profile, ServerUrl};
use crate::credentials::{CredentialStore, Scheme, Secret};
use crate::diagnose::check::Checker;
use crate::error::Error;
use crate::upstream::TlsTrust;

/// How long each verification step may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `login`.
pub async fn run(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    args: LoginArgs,
) -> Result<()> {
    let ca_cert = match args.ca_cert {
        Some(path) => Some(CaCert::File(std::path::absolute(&path).map_err(|e| {
            Error::CaCert {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?)),
        None => None,
    };
    let scheme = Scheme::new(&args.auth, &args.headers)?;
    let username = match (&scheme, &args.username) {
        (Scheme::Basic, Some(name)) => config::validate_username(name)?,
        (Scheme::Basic, None) => {
            return Err(Error::Invalid {
                what: "username",
                reason: "--auth basic needs --username NAME (the Authentik service account)"
                    .to_owned(),
            }
            .into());
        }
        (_, name) => name.clone().unwrap_or_default(),
    };
    let mut profile = Profile {
        name: config::validate_profile_name(&args.profile)?,
        server: ServerUrl::parse(&args.server)?,
        username,
        auth: scheme,
        listen: match &args.listen {
            Some(listen) => config::parse_listen(listen)?,
            None => config::DEFAULT_LISTEN,
        },
        ca_cert,
        pins: args
            .pins
            .iter()
            .map(|pin| config::validate_pin(pin))
            .collect::<std::result::Result<_, _>>()?,
        local_auth: false,
        allow_hosts: Vec::new(),
    };
    let trust = TlsTrust::for_profile(&profile)?;
    let mut file = config.load()?;
    // A re-login keeps the serve-side settings made earlier.
    if let Some(previous) = file.profiles.get(&profile.name) {
        profile.local_auth = previous.local_auth;
        profile.allow_hosts = previous.allow_hosts.clone();
    }
    let prompts: Vec<String> = profile
        .auth
        .prompts(&profile.username)
        .into_iter()
        .map(|p| format!("{p} at {}: ", profile.server))
        .collect();
    let password = read_secret(args.password_stdin, &prompts)?;
    let credentials = profile.auth.injection(&profile.username, &password)?;
    if args.no_verify {
        eprintln!("credproxy: not verifying the credentials (--no-verify)");
    } else {
        let checker = Checker::new(
            profile.server.clone(),
            trust.client_config(&[b"http/1.1"])?,
            CHECK_TIMEOUT,
        );
        checker
            .verify_credentials(&profile.username, &credentials)
            .await?;
        eprintln!(
            "credproxy: {} accepted the credentials and Immich answered",
            profile.server
        );
    }
    let name = profile.name.clone();
    blocking(move || keyring.set(&name, &password)).await?;
    file.profiles
        .insert(profile.name.clone(), profile.to_entry());
    config.save(&file)?;
    eprintln!(
        "credproxy: saved profile '{}' ({}); start the proxy with `credproxy serve{}`",
        profile.name,
        config.path().display(),
        profile_flag(&profile.name)
    );
    super::running::tell(config, &profile.name, true).await;
    Ok(())
}

fn profile_flag(name: &str) -> String {
    if name == config::DEFAULT_PROFILE {
        String::new()
    } else {
        format!(" --profile {name}")
    }
}

/// Reads a scheme's secret values from stdin (`--password-stdin`, one line per value) or
/// hidden terminal prompts; returns them joined by newlines, as the keyring keeps them.
pub fn read_secret(from_stdin: bool, prompts: &[String]) -> Result<Secret> {
    let mut values: Vec<zeroize::Zeroizing<String>> = Vec::new();
    if from_stdin {
        let mut raw = zeroize::Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut raw)
            .map_err(|e| CliError::Password(e.to_string()))?;
        values.extend(
            raw.trim_end_matches(['\r', '\n'])
                .split('\n')
                .map(|line| zeroize::Zeroizing::new(line.trim_end_matches('\r').to_owned())),
        );
    } else {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::Password(
                "standard input is not a terminal; pipe the password in with --password-stdin"
                    .to_owned(),
            ));
        }
        for prompt in prompts {
            values.push(zeroize::Zeroizing::new(
                rpassword::prompt_password(prompt)
                    .map_err(|e| CliError::Password(e.to_string()))?,
            ));
        }
    }
    if values.len() != prompts.len() {
        return Err(CliError::Password(format!(
            "expected {} line(s) on standard input, one per value, got {}",
            prompts.len(),
            values.len()
        )));
    }
    if values.iter().any(|v| v.is_empty()) {
        return Err(CliError::Password("the password is empty".to_owned()));
    }
    let joined: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
    Ok(Secret::new(joined.join("\n")))
}
