//! The commands behind the CLI: validate once, then run against the config file and keyring.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::Scheme;
use crate::check::Checker;
use crate::cli::{Cli, Command, LoginArgs, ServeArgs};
use crate::config::{self, ConfigStore, Profile, ServerUrl};
use crate::credentials::{CredentialStore, KeyringStore, Secret, local_token_account};
use crate::error::{Error, Result};
use crate::proxy::{Proxy, ProxySettings};
use crate::server::{self, ServerOptions};
use crate::upstream::{ClientOptions, TlsTrust};

/// How long each verification step may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `serve` waits with no client connected before it unmaps its code pages: long
/// enough that steady traffic never pays for mapping them back, short enough that a proxy
/// between bursts sits at its idle footprint.
const IDLE_SHED_AFTER: Duration = Duration::from_millis(250);

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
        Command::Service(args) => service(&config, args.action),
        Command::Completions(args) => {
            completions(args.shell);
            Ok(())
        }
        Command::Man => {
            man();
            Ok(())
        }
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
    let scheme = Scheme::new(&args.auth, &args.headers)?;
    let username = match (&scheme, &args.username) {
        (Scheme::Basic, Some(name)) => config::validate_username(name)?,
        (Scheme::Basic, None) => {
            return Err(Error::Invalid {
                what: "username",
                reason: "--auth basic needs --username NAME (the Authentik service account)"
                    .to_owned(),
            });
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
            .map_err(|e| Error::Password(e.to_string()))?;
        values.extend(
            raw.trim_end_matches(['\r', '\n'])
                .split('\n')
                .map(|line| zeroize::Zeroizing::new(line.trim_end_matches('\r').to_owned())),
        );
    } else {
        if !std::io::stdin().is_terminal() {
            return Err(Error::Password(
                "standard input is not a terminal; pipe the password in with --password-stdin"
                    .to_owned(),
            ));
        }
        for prompt in prompts {
            values.push(zeroize::Zeroizing::new(
                rpassword::prompt_password(prompt).map_err(|e| Error::Password(e.to_string()))?,
            ));
        }
    }
    if values.len() != prompts.len() {
        return Err(Error::Password(format!(
            "expected {} line(s) on standard input, one per value, got {}",
            prompts.len(),
            values.len()
        )));
    }
    if values.iter().any(|v| v.is_empty()) {
        return Err(Error::Password("the password is empty".to_owned()));
    }
    let joined: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
    Ok(Secret::new(joined.join("\n")))
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

/// `serve`: load each profile and its secret, bind, serve until a signal.
pub async fn serve(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    args: ServeArgs,
) -> Result<()> {
    let names = if args.profiles.is_empty() {
        vec![config::DEFAULT_PROFILE.to_owned()]
    } else {
        args.profiles.clone()
    };
    if names.len() > 1 && args.listen.is_some() {
        return Err(Error::Invalid {
            what: "--listen",
            reason: "with several --profile, each listens on its profile's own address (set it with `credproxy login --listen`)".to_owned(),
        });
    }
    let admin = match &args.admin {
        Some(addr) => {
            let addr = config::parse_listen(addr)?;
            config::check_loopback(addr, false)?;
            Some(addr)
        }
        None => None,
    };
    let mut served = Vec::new();
    for name in &names {
        served.push(prepare(config, keyring.clone(), &args, name).await?);
    }
    let mut seen = Vec::new();
    for (profile, listen, ..) in &served {
        if listen.port() != 0 && (seen.contains(listen) || admin == Some(*listen)) {
            return Err(Error::Invalid {
                what: "listen address",
                reason: format!(
                    "{listen} (profile '{}') is used twice; give each profile and the admin listener its own port",
                    profile.name
                ),
            });
        }
        seen.push(*listen);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let threads = args.threads.map_or_else(default_threads, usize::from);
    let mut tasks = tokio::task::JoinSet::new();
    let mut proxies = Vec::new();
    for (profile, listen, proxy, token) in served {
        let listener = bind(listen).await?;
        if !listen.ip().is_loopback() {
            tracing::warn!(
                "listening on non-loopback {listen} (--allow-remote): anyone who can reach it uses your credentials"
            );
        }
        announce(&listener, &profile, token.as_ref())?;
        let mut allow_hosts = profile.allow_hosts.clone();
        allow_hosts.extend(args.allow_hosts.iter().cloned());
        let options = ServerOptions {
            max_connections: args.max_connections.max(1),
            allow_hosts,
            local_token: token,
            shed_code_when_idle: Some(IDLE_SHED_AFTER),
            ..ServerOptions::default()
        };
        proxies.push(proxy.clone());
        let running =
            server::start_threads(listener, proxy, options, threads).map_err(|source| {
                Error::Listen {
                    addr: listen,
                    source,
                }
            })?;
        tasks.spawn(running.run_until(stopped()));
    }
    if let Some(addr) = admin {
        let listener = bind(addr).await?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Listen { addr, source })?;
        println!("credproxy admin on http://{local} (/healthz, /metrics)");
        tasks.spawn(crate::admin::run(listener, proxies, stopped()));
    }
    let _ = std::io::stdout().flush();
    // Start-up is over: the CLI, config, keyring and TLS-root code need not stay resident.
    let shed = crate::memory::shed_code();
    tracing::debug!("unmapped {} KiB of start-up code", shed / 1024);
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    eprintln!("credproxy: stopped");
    Ok(())
}

/// One server thread per CPU, up to four: a loopback proxy for one person's tools rarely
/// needs more, and each thread keeps its own upstream connections.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Loads one profile for `serve`: its listen address, proxy and local credential.
async fn prepare(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    args: &ServeArgs,
    name: &str,
) -> Result<(Profile, SocketAddr, Proxy, Option<Secret>)> {
    let profile = config.profile(&config::validate_profile_name(name)?)?;
    let listen = match &args.listen {
        Some(listen) => config::parse_listen(listen)?,
        None => profile.listen,
    };
    config::check_loopback(listen, args.allow_remote)?;
    let account = profile.name.clone();
    let store = keyring.clone();
    let password = blocking(move || store.get(&account))
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
    let proxy = Proxy::with_scheme(settings, &profile.auth, &password)?;
    drop(password);
    let token = if args.local_auth || profile.local_auth {
        let account = local_token_account(&profile.name);
        Some(
            blocking(move || match keyring.get(&account)? {
                Some(token) => Ok(token),
                None => {
                    let token = Secret::random();
                    keyring.set(&account, &token)?;
                    Ok(token)
                }
            })
            .await?,
        )
    } else {
        None
    };
    Ok((profile, listen, proxy, token))
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
        scheme: &profile.auth,
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

/// The service definition for a profile: this executable, this config file, both absolute.
fn service_spec(config: &ConfigStore, profile: &str) -> Result<crate::service::ServiceSpec> {
    let exe = std::env::current_exe().map_err(|e| Error::Invalid {
        what: "executable path",
        reason: format!("cannot find this program's own path: {e}"),
    })?;
    let config_path = std::path::absolute(config.path()).map_err(|e| Error::Invalid {
        what: "config file path",
        reason: format!("{}: {e}", config.path().display()),
    })?;
    crate::service::ServiceSpec::new(profile, &exe, &config_path)
}

/// `service install|uninstall|status`: the profile's proxy as a service started at logon.
pub fn service(config: &ConfigStore, action: crate::cli::ServiceAction) -> Result<()> {
    use crate::cli::ServiceAction;
    use crate::service::{self, FileState};
    match action {
        ServiceAction::Install(args) => {
            let name = config::validate_profile_name(&args.profile)?;
            // A service for a profile that does not exist would only fail at every start.
            config.profile(&name)?;
            let installed = service::install(&service_spec(config, &name)?)?;
            eprintln!(
                "credproxy: installed and started {} ({}); it starts at every logon; logs: {}",
                installed.name,
                installed.path.display(),
                installed.logs
            );
            Ok(())
        }
        ServiceAction::Uninstall(args) => {
            let name = config::validate_profile_name(&args.profile)?;
            let removed = service::uninstall(&name)?;
            eprintln!(
                "credproxy: stopped {} and removed {}",
                removed.name,
                removed.path.display()
            );
            if let Some(warning) = removed.warning {
                eprintln!("credproxy: warning: {warning}");
            }
            Ok(())
        }
        ServiceAction::Status(args) => {
            let name = config::validate_profile_name(&args.profile)?;
            let status = service::status(&service_spec(config, &name)?)?;
            let file = match status.file {
                FileState::Missing => "not installed",
                FileState::Current => "installed",
                FileState::Stale => {
                    "installed, but for another binary or config file: run `credproxy service install` again"
                }
            };
            let state = match &status.state {
                Ok(state) => state.clone(),
                Err(reason) => format!("unknown ({reason})"),
            };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "service: {}", status.name);
            let _ = writeln!(out, "file:    {} ({file})", status.path.display());
            let _ = writeln!(out, "state:   {state}");
            let _ = writeln!(out, "logs:    {}", status.logs);
            drop(out);
            if status.file == FileState::Missing && !status.running {
                Err(Error::ServiceNotInstalled {
                    profile: name,
                    path: status.path,
                })
            } else if !status.running {
                Err(Error::ServiceNotRunning {
                    name: status.name,
                    state,
                    fix: format!(
                        "see why in `{}`; start it with `credproxy service install --profile {name}`",
                        status.logs
                    ),
                })
            } else {
                Ok(())
            }
        }
    }
}

/// `completions SHELL`: the completion script, generated from the clap definitions.
pub fn completions(shell: clap_complete::Shell) {
    use clap::CommandFactory as _;
    // Into a buffer first: `generate` panics on a write error such as a closed pipe.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "credproxy", &mut script);
    let _ = std::io::stdout().lock().write_all(&script);
}

/// `man`: the roff man page, generated from the clap definitions.
pub fn man() {
    use clap::CommandFactory as _;
    let _ = clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout().lock());
}
