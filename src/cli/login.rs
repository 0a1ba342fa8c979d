//! `credproxy login`: validate the settings, read the secret, verify it through the gate,
//! then store it in the keyring and the profile in the config file.

use std::io::{IsTerminal as _, Read as _};
use std::sync::Arc;
use std::time::Duration;

use super::args::LoginArgs;
use super::{CliError, Result, blocking};
use crate::config::{self, CaCert, ConfigStore, Profile, ServerUrl};
use crate::credentials::{self, ClientIdentity, CredentialStore, IdentityError, Scheme, Secret};
use crate::diagnose::check::Checker;
use crate::diagnose::doctor::{self, Status};
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
    let lan = match &args.lan {
        Some(address) => {
            let ca = match &args.lan_ca {
                Some(path) => Some(CaCert::File(std::path::absolute(path).map_err(|e| {
                    Error::CaCert {
                        path: path.clone(),
                        reason: e.to_string(),
                    }
                })?)),
                None => None,
            };
            Some(config::LanRoute::parse(address, &args.lan_pins, ca)?)
        }
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
        client_cert: None,
        lan,
    };
    let trust = TlsTrust::for_profile(&profile)?;
    let certificate = match &args.client_cert {
        Some(path) => Some(CertificateFile::read(path, args.client_key.as_deref())?),
        None => None,
    };
    // A re-login keeps the serve-side settings made earlier, and the client certificate
    // unless a new one is given.
    let mut kept_identity = None;
    if let Some(previous) = config.load()?.profiles.get(&profile.name) {
        profile.local_auth = previous.local_auth;
        profile.allow_hosts = previous.allow_hosts.clone();
        if certificate.is_none()
            && let Some(chain) = &previous.client_cert
        {
            kept_identity =
                Some(super::serve::client_identity(&keyring, &profile.name, chain).await?);
        }
    }
    if profile.auth == Scheme::None && certificate.is_none() && kept_identity.is_none() {
        return Err(Error::Invalid {
            what: "--auth none",
            reason: "it sends no credentials of its own: give the client certificate with --client-cert FILE".to_owned(),
        }
        .into());
    }
    let mut prompts: Vec<String> = profile
        .auth
        .prompts(&profile.username)
        .into_iter()
        .map(|p| format!("{p} at {}: ", profile.server))
        .collect();
    if let Some(certificate) = certificate.as_ref().filter(|c| c.needs_password()) {
        prompts.push(format!("Password of {}: ", certificate.path.display()));
    }
    let mut values = read_secret(args.password_stdin, &prompts)?;
    let identity = match certificate {
        Some(certificate) => {
            let password = certificate.needs_password().then(|| values.pop()).flatten();
            let identity = certificate.identity(password.as_ref())?;
            identity
                .check_dates(std::time::SystemTime::now())
                .map_err(|e| certificate.error(e))?;
            Some(identity)
        }
        None => kept_identity,
    };
    profile.client_cert = identity.as_ref().map(ClientIdentity::chain_pem);
    let password = Secret::new(
        values
            .iter()
            .map(Secret::expose)
            .collect::<Vec<_>>()
            .join("\n"),
    );
    drop(values);
    let credentials = profile.auth.injection(&profile.username, &password)?;
    if args.no_verify {
        eprintln!("credproxy: not verifying the credentials (--no-verify)");
    } else {
        let (tls, auth) = trust.client_config_seen(&[b"http/1.1"], identity.as_ref())?;
        let checker = Checker::new(profile.server.clone(), tls, CHECK_TIMEOUT)
            .certificate_fix(certificate_fix(&args.client_cert));
        checker
            .verify_credentials(&profile.username, &credentials)
            .await?;
        eprintln!(
            "credproxy: {} accepted the credentials and Immich answered",
            profile.server
        );
        if identity.is_some() && !auth.asked() {
            eprintln!(
                "credproxy: warning: {} did not ask for a client certificate: it is not needed there (stored anyway)",
                profile.server
            );
        }
        if let Some(lan) = &profile.lan {
            check_lan(config, &profile, lan, identity.as_ref(), &password).await?;
        }
    }
    let name = profile.name.clone();
    let has_secret = profile.auth.has_secret();
    let key = identity.as_ref().map(|i| i.key_pem().clone());
    blocking(move || {
        if has_secret {
            keyring.set(&name, &password)?;
        } else {
            keyring.delete(&name)?;
        }
        match key {
            Some(key) => keyring.set(&credentials::client_key_account(&name), &key),
            None => keyring
                .delete(&credentials::client_key_account(&name))
                .map(|_| ()),
        }
    })
    .await?;
    let entry = profile.to_entry();
    config.update(|file| {
        // The serve-side settings as they are now, should they have changed meanwhile.
        let mut entry = entry;
        if let Some(current) = file.profiles.get(&profile.name) {
            entry.local_auth = current.local_auth;
            entry.allow_hosts = current.allow_hosts.clone();
        }
        file.profiles.insert(profile.name.clone(), entry);
        Ok(())
    })?;
    if let Some(path) = &args.client_cert {
        eprintln!(
            "credproxy: the client certificate's private key is in the OS keyring and its chain in the config file; {} is no longer needed and may be deleted",
            path.display()
        );
    }
    eprintln!(
        "credproxy: saved profile '{}' ({}); start the proxy with `credproxy serve{}`",
        profile.name,
        config.path().display(),
        profile_flag(&profile.name)
    );
    super::running::tell(config, &profile.name, true).await;
    Ok(())
}

/// The fix named when the server refuses the client certificate or wants one.
fn certificate_fix(given: &Option<std::path::PathBuf>) -> String {
    match given {
        Some(_) => "check that it is the certificate this server expects, from the CA it trusts, and still valid; log in again with the right --client-cert FILE".to_owned(),
        None => "log in again with --client-cert FILE (PEM or PKCS#12): this server wants a client certificate".to_owned(),
    }
}

/// A `--client-cert` file (and `--client-key`), read before any prompt.
struct CertificateFile {
    path: std::path::PathBuf,
    data: Vec<u8>,
    key: Option<Vec<u8>>,
    /// A PKCS#12 file locked with a password.
    needs_password: bool,
}

impl CertificateFile {
    fn read(path: &std::path::Path, key: Option<&std::path::Path>) -> Result<Self> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Error::ClientCertificate {
                path: path.to_owned(),
                reason: format!("cannot read it: {e}"),
            })
        };
        let data = read(path)?;
        if key.is_some() && !credentials::is_pem(&data) {
            return Err(Error::ClientCertificate {
                path: path.to_owned(),
                reason: "it is PKCS#12, which holds its own key: leave out --client-key".to_owned(),
            }
            .into());
        }
        // Asked before any prompt: a file that is no certificate at all needs no password.
        let needs_password = if credentials::is_pem(&data) {
            false
        } else {
            credentials::pkcs12_needs_password(&data).map_err(|e| Error::ClientCertificate {
                path: path.to_owned(),
                reason: format!("{e}; nothing was stored"),
            })?
        };
        Ok(Self {
            path: path.to_owned(),
            key: key.map(read).transpose()?,
            data,
            needs_password,
        })
    }

    fn needs_password(&self) -> bool {
        self.needs_password
    }

    fn identity(&self, password: Option<&Secret>) -> Result<ClientIdentity> {
        ClientIdentity::from_file_contents(&self.data, self.key.as_deref(), password)
            .map_err(|e| self.error(e))
    }

    fn error(&self, err: IdentityError) -> CliError {
        Error::ClientCertificate {
            path: self.path.clone(),
            reason: format!("{err}; nothing was stored"),
        }
        .into()
    }
}

fn profile_flag(name: &str) -> String {
    if name == config::DEFAULT_PROFILE {
        String::new()
    } else {
        format!(" --profile {name}")
    }
}

/// Reads one value per prompt from stdin (`--password-stdin`, one line per value) or from
/// hidden terminal prompts.
pub fn read_secret(from_stdin: bool, prompts: &[String]) -> Result<Vec<Secret>> {
    let mut values: Vec<Secret> = Vec::new();
    if prompts.is_empty() {
        return Ok(values);
    }
    if from_stdin {
        let mut raw = zeroize::Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut raw)
            .map_err(|e| CliError::Password(e.to_string()))?;
        values.extend(
            raw.trim_end_matches(['\r', '\n'])
                .split('\n')
                .map(|line| Secret::new(line.trim_end_matches('\r').to_owned())),
        );
    } else {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::Password(
                "standard input is not a terminal; pipe the password in with --password-stdin"
                    .to_owned(),
            ));
        }
        for prompt in prompts {
            values.push(Secret::new(
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
    Ok(values)
}

/// Checks the LAN route as the proxy will use it: the server at its LAN address proves the
/// public name and lets the credentials through. Not reachable from here is a note (it is used
/// when it is); anything else answering there is an error with the fix, and nothing is saved.
async fn check_lan(
    config: &ConfigStore,
    profile: &Profile,
    lan: &config::LanRoute,
    identity: Option<&ClientIdentity>,
    secret: &Secret,
) -> Result<()> {
    let tls = TlsTrust::for_lan(profile, lan)?.client_config(&[b"http/1.1"], identity)?;
    // A LAN answers at once; away from home, login need not wait long to say so.
    let checker =
        Checker::new(profile.server.clone(), tls, Duration::from_secs(3)).at(lan.url.clone());
    let login_command = config.login_command(profile);
    let step = doctor::lan_step(
        &checker,
        &doctor::Target {
            checker: &checker,
            username: &profile.username,
            scheme: &profile.auth,
            secret: Some(secret),
            login_command,
        },
    )
    .await;
    match (step.status, step.fix) {
        (Status::Pass, _) => eprintln!("credproxy: the LAN address {} {}", lan.url, step.detail),
        (Status::Warn, None) => eprintln!(
            "credproxy: note: {}; it is used whenever it answers",
            step.detail
        ),
        (_, fix) => {
            return Err(CliError::Lan {
                address: lan.url.to_string(),
                detail: step.detail,
                fix: fix.unwrap_or_else(|| "check the address given with --lan".to_owned()),
            });
        }
    }
    Ok(())
}
