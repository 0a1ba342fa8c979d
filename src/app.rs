//! The commands behind the CLI: validate once, then run against the config file and keyring.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::check::Checker;
use crate::cli::{Cli, Command, LoginArgs, ServeArgs};
use crate::config::{self, ConfigStore, Profile, ServerUrl};
use crate::credentials::{CredentialStore, KeyringStore, Secret};
use crate::error::{Error, Result};
use crate::proxy::{self, Proxy, ProxySettings};
use crate::server::{self, ServerOptions};
use crate::upstream::{ClientOptions, TlsTrust};

/// How long each verification step may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs a parsed command line to completion.
pub async fn run(cli: Cli) -> Result<()> {
    let config = ConfigStore::locate(cli.config)?;
    let keyring: Arc<dyn CredentialStore> = Arc::new(KeyringStore::new());
    match cli.command {
        Command::Login(args) => login(&config, keyring, args).await,
        Command::Serve(args) => serve(&config, keyring, args).await,
        Command::Logout(args) => logout(&config, keyring, &args.profile).await,
        Command::Profiles => profiles(&config),
        Command::Doctor(args) => doctor(&config, keyring, &args.profile).await,
        Command::Demo(args) => crate::demo::run(&args.listen, args.keep_running).await,
    }
}

/// Runs a blocking credential-store call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::credentials::StoreError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Password(format!("keyring task failed: {e}")))?
        .map_err(Error::from)
}

/// `login`: validate, read the password, verify it through the gate, store it.
pub async fn login(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    args: LoginArgs,
) -> Result<()> {
    let ca_cert = match args.ca_cert {
        Some(path) => Some(std::path::absolute(&path).map_err(|e| Error::CaCert {
            path: path.clone(),
            reason: e.to_string(),
        })?),
        None => None,
    };
    let mut profile = Profile {
        name: config::validate_profile_name(&args.profile)?,
        server: ServerUrl::parse(&args.server)?,
        username: config::validate_username(&args.username)?,
        listen: match &args.listen {
            Some(listen) => config::parse_listen(listen)?,
            None => config::DEFAULT_LISTEN,
        },
        ca_cert,
        pins: args
            .pins
            .iter()
            .map(|pin| config::validate_pin(pin))
            .collect::<Result<_>>()?,
        local_auth: false,
        allow_hosts: Vec::new(),
    };
    let trust = trust_for(&profile)?;
    let mut file = config.load()?;
    // A re-login keeps the serve-side settings made earlier.
    if let Some(previous) = file.profiles.get(&profile.name) {
        profile.local_auth = previous.local_auth;
        profile.allow_hosts = previous.allow_hosts.clone();
    }
    let password = read_password(
        args.password_stdin,
        &format!(
            "App password for {} at {}: ",
            profile.username, profile.server
        ),
    )?;
    if args.no_verify {
        eprintln!("credproxy: not verifying the credentials (--no-verify)");
    } else {
        let checker = Checker::new(
            profile.server.clone(),
            trust.client_config(&[b"http/1.1"])?,
            CHECK_TIMEOUT,
        );
        checker
            .verify_credentials(
                &profile.username,
                &proxy::basic_auth(&profile.username, &password),
            )
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
    Ok(())
}

fn profile_flag(name: &str) -> String {
    if name == config::DEFAULT_PROFILE {
        String::new()
    } else {
        format!(" --profile {name}")
    }
}

/// Reads the app password from stdin (`--password-stdin`) or a hidden terminal prompt.
pub fn read_password(from_stdin: bool, prompt: &str) -> Result<Secret> {
    let mut raw = zeroize::Zeroizing::new(String::new());
    if from_stdin {
        std::io::stdin()
            .read_to_string(&mut raw)
            .map_err(|e| Error::Password(e.to_string()))?;
    } else {
        if !std::io::stdin().is_terminal() {
            return Err(Error::Password(
                "standard input is not a terminal; pipe the password in with --password-stdin"
                    .to_owned(),
            ));
        }
        *raw = rpassword::prompt_password(prompt).map_err(|e| Error::Password(e.to_string()))?;
    }
    let password = raw.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(Error::Password("the password is empty".to_owned()));
    }
    if password.contains(['\r', '\n']) {
        return Err(Error::Password(
            "the password spans several lines; give exactly one line".to_owned(),
        ));
    }
    Ok(Secret::new(password.to_owned()))
}

fn trust_for(profile: &Profile) -> Result<TlsTrust> {
    let mut trust = match &profile.ca_cert {
        Some(path) => TlsTrust::public().with_ca_file(path)?,
        None => TlsTrust::public(),
    };
    for pin in &profile.pins {
        trust = trust.with_pin(pin).map_err(|reason| Error::Invalid {
            what: "pin",
            reason,
        })?;
    }
    Ok(trust)
}

/// The keyring account of a profile's local credential (profile names cannot hold ':').
fn local_token_account(profile: &str) -> String {
    format!("local-auth:{profile}")
}

/// `serve`: load the profile and secret, bind, serve until a signal.
pub async fn serve(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    args: ServeArgs,
) -> Result<()> {
    let profile = config.profile(&config::validate_profile_name(&args.profile)?)?;
    let listen = match &args.listen {
        Some(listen) => config::parse_listen(listen)?,
        None => profile.listen,
    };
    config::check_loopback(listen, args.allow_remote)?;
    let name = profile.name.clone();
    let store = keyring.clone();
    let password =
        blocking(move || store.get(&name))
            .await?
            .ok_or_else(|| Error::MissingSecret {
                profile: profile.name.clone(),
                server: profile.server.to_string(),
                username: profile.username.clone(),
            })?;
    let settings = ProxySettings {
        profile: profile.name.clone(),
        server: profile.server.clone(),
        username: profile.username.clone(),
        trust: trust_for(&profile)?,
        client: ClientOptions::default(),
        idle_timeout: Duration::from_secs(300),
    };
    let proxy = Proxy::new(settings, &password)?;
    drop(password);
    let local_token = if args.local_auth || profile.local_auth {
        let account = local_token_account(&profile.name);
        Some(
            blocking(move || match keyring.get(&account)? {
                Some(token) => Ok(token),
                None => {
                    let token = Secret::new(crate::demo::random_token());
                    keyring.set(&account, &token)?;
                    Ok(token)
                }
            })
            .await?,
        )
    } else {
        None
    };
    let listener = bind(listen).await?;
    if !listen.ip().is_loopback() {
        tracing::warn!(
            "listening on non-loopback {listen} (--allow-remote): anyone who can reach it uses your credentials"
        );
    }
    announce(&listener, &profile, local_token.as_ref())?;
    let mut allow_hosts = profile.allow_hosts.clone();
    allow_hosts.extend(args.allow_hosts.iter().cloned());
    let options = ServerOptions {
        max_connections: args.max_connections.max(1),
        allow_hosts,
        local_token,
        ..ServerOptions::default()
    };
    server::run(listener, proxy, options, shutdown_signal()).await;
    eprintln!("credproxy: stopped");
    Ok(())
}

/// Binds the listen socket, with a clear error when the address is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })
}

/// Prints the line scripts wait for (the bound address, port 0 resolved) and, with local
/// auth, once, the local URL that carries the local credential.
fn announce(listener: &TcpListener, profile: &Profile, local_token: Option<&Secret>) -> Result<()> {
    let local = listener.local_addr().map_err(|source| Error::Listen {
        addr: profile.listen,
        source,
    })?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "credproxy listening on http://{local} -> {} (profile '{}')",
        profile.server, profile.name
    );
    if let Some(token) = local_token {
        let _ = writeln!(
            out,
            "local URL (keep it private): http://{}:{}@{local}",
            crate::guard::LOCAL_USER,
            token.expose()
        );
    }
    let _ = out.flush();
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: no new connections, draining requests in flight");
}

/// `logout`: remove the keyring entry and the profile.
pub async fn logout(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    profile: &str,
) -> Result<()> {
    let name = config::validate_profile_name(profile)?;
    let mut file = config.load()?;
    let had_profile = file.profiles.remove(&name).is_some();
    let key = name.clone();
    let had_secret = blocking(move || {
        keyring.delete(&local_token_account(&key))?;
        keyring.delete(&key)
    })
    .await?;
    if !had_profile && !had_secret {
        return Err(Error::UnknownProfile {
            profile: name,
            path: config.path().to_owned(),
        });
    }
    if had_profile {
        config.save(&file)?;
    }
    eprintln!("credproxy: removed profile '{name}' and its keyring entry");
    Ok(())
}

/// `doctor`: check each step and print it; fails when any step failed.
pub async fn doctor(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    profile: &str,
) -> Result<()> {
    use crate::doctor::{self, Status, Step};
    let report = |step: &Step| println!("{step}");
    let profile = match config.profile(&config::validate_profile_name(profile)?) {
        Ok(profile) => profile,
        Err(e) => {
            report(&Step {
                name: "config",
                status: Status::Fail,
                detail: e.to_string(),
                fix: None,
            });
            return Err(Error::Doctor(1));
        }
    };
    println!(
        "credproxy doctor: profile '{}' -> {} as '{}'",
        profile.name, profile.server, profile.username
    );
    let login = format!(
        "credproxy login --profile {} --server {} --username {}",
        profile.name, profile.server, profile.username
    );
    let trust = match trust_for(&profile) {
        Ok(trust) => trust,
        Err(e) => {
            report(&Step {
                name: "config",
                status: Status::Fail,
                detail: e.to_string(),
                fix: Some(login),
            });
            return Err(Error::Doctor(1));
        }
    };
    let mut steps = vec![Step {
        name: "config",
        status: Status::Pass,
        detail: format!("{} (listen {})", config.path().display(), profile.listen),
        fix: None,
    }];
    let name = profile.name.clone();
    let secret = match blocking(move || keyring.get(&name)).await {
        Ok(Some(secret)) => {
            steps.push(Step {
                name: "keyring",
                status: Status::Pass,
                detail: format!("secret stored for profile '{}'", profile.name),
                fix: None,
            });
            Some(secret)
        }
        Ok(None) => {
            steps.push(Step {
                name: "keyring",
                status: Status::Fail,
                detail: format!("no secret stored for profile '{}'", profile.name),
                fix: Some(login.clone()),
            });
            None
        }
        Err(e) => {
            steps.push(Step {
                name: "keyring",
                status: Status::Fail,
                detail: e.to_string(),
                fix: None,
            });
            None
        }
    };
    steps.iter().for_each(report);
    let checker = Checker::new(
        profile.server.clone(),
        trust.client_config(&[b"http/1.1"])?,
        CHECK_TIMEOUT,
    );
    let network = doctor::network_steps(&doctor::Target {
        checker: &checker,
        username: &profile.username,
        secret: secret.as_ref(),
        login_command: login,
    })
    .await;
    network.iter().for_each(report);
    let failed = steps
        .iter()
        .chain(&network)
        .filter(|s| s.status == Status::Fail)
        .count();
    if failed > 0 {
        Err(Error::Doctor(failed))
    } else {
        println!("all checks passed");
        Ok(())
    }
}

/// `profiles`: list profiles without secrets.
pub fn profiles(config: &ConfigStore) -> Result<()> {
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
        "{:<16} {:<40} {:<24} LISTEN",
        "PROFILE", "SERVER", "USERNAME"
    );
    for (name, entry) in &file.profiles {
        let listen = entry
            .listen
            .clone()
            .unwrap_or_else(|| config::DEFAULT_LISTEN.to_string());
        let _ = writeln!(
            out,
            "{name:<16} {:<40} {:<24} {listen}",
            entry.server, entry.username
        );
    }
    Ok(())
}
