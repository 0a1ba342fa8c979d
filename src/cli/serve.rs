//! `credproxy serve`: load each profile and its secret, bind, serve until a signal.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::args::ServeArgs;
use super::{Result, bind, blocking, shutdown_signal};
use crate::config::{self, ConfigStore, Profile};
use crate::credentials::{self, CredentialStore, Secret};
use crate::error::Error;
use crate::proxy::{Proxy, ProxySettings};
use crate::serve::{self, ServeOptions};

/// Runs `serve`.
pub async fn run(
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
        }
        .into());
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
            }
            .into());
        }
        seen.push(*listen);
    }
    let stop = CancellationToken::new();
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
        let options = ServeOptions {
            max_connections: args.max_connections.max(1),
            allow_hosts,
            local_token: token,
            ..ServeOptions::default()
        };
        proxies.push(proxy.clone());
        tasks.spawn(serve::run(
            listener,
            proxy,
            options,
            stop.clone().cancelled_owned(),
        ));
    }
    if let Some(addr) = admin {
        let listener = bind(addr).await?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Listen { addr, source })?;
        println!("credproxy admin on http://{local} (/healthz, /metrics)");
        tasks.spawn(crate::ops::admin::run(
            listener,
            proxies,
            stop.clone().cancelled_owned(),
        ));
    }
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    eprintln!("credproxy: stopped");
    Ok(())
}

/// One event loop: on a loopback proxy for one person's tools, a single thread moves about a
/// gigabyte a second, and the client and the server usually share the machine's cores.
pub fn default_threads() -> usize {
    1
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
    let fix = config.login_command(&profile);
    let account = profile.name.clone();
    let store = keyring.clone();
    let secret = blocking(move || store.get(&account))
        .await?
        .ok_or_else(|| Error::MissingSecret {
            profile: profile.name.clone(),
            fix: format!("run `{fix}`"),
        })?;
    let settings = ProxySettings::for_profile(&profile, fix)?;
    let proxy = Proxy::new(settings, &profile.auth, &secret)?;
    drop(secret);
    let token = if args.local_auth || profile.local_auth {
        let account = profile.name.clone();
        Some(blocking(move || credentials::local_token(keyring.as_ref(), &account)).await?)
    } else {
        None
    };
    Ok((profile, listen, proxy, token))
}

/// Prints the line scripts wait for (the bound address, port 0 resolved) and, with local
/// auth, once, the local URL that carries the local credential.
fn announce(
    listener: &TcpListener,
    profile: &Profile,
    local_token: Option<&Secret>,
) -> std::result::Result<(), Error> {
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
            crate::serve::guard::LOCAL_USER,
            token.expose()
        );
    }
    let _ = out.flush();
    Ok(())
}
