//! `credproxy serve`: load each profile and its secret, bind, serve until a signal; on SIGHUP
//! or a request on the control socket, read the config file and the credentials again.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::args::ServeArgs;
use super::{Result, bind, blocking, shutdown_signal};
use crate::config::{self, ConfigFile, ConfigStore, Profile};
use crate::credentials::{self, ClientIdentity, CredentialStore, Secret, SecretSource, StoreEntry};
use crate::error::Error;
use crate::ops::control::{self, Command, ProfileReply, Reply, Request};
use crate::proxy::live::{LiveCredentials, Reload, Unusable};
use crate::proxy::{Proxy, ProxySettings};
use crate::serve::{self, ServeOptions, Site, ThreadHooks};

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
    let server = Server {
        config: config.clone(),
        keyring,
        args,
    };
    let mut prepared = Vec::new();
    for name in &names {
        let profile = config.profile(&config::validate_profile_name(name)?)?;
        let listen = match &server.args.listen {
            Some(listen) => config::parse_listen(listen)?,
            None => profile.listen,
        };
        config::check_loopback(listen, server.args.allow_remote)?;
        let site = server.site_for(&profile, None).await?;
        if profile.auth.has_secret()
            && site.proxy.credentials().health().unusable == Some(Unusable::Missing)
        {
            return Err(Error::MissingSecret {
                profile: profile.name.clone(),
                fix: format!("run `{}`", site.proxy.settings().fix),
            }
            .into());
        }
        prepared.push((profile, listen, site));
    }
    let mut seen = Vec::new();
    for (profile, listen, _) in &prepared {
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
    let mut served = Vec::new();
    let options = ServeOptions {
        max_connections: server.args.max_connections.max(1),
        threads: server
            .args
            .threads
            .map_or_else(default_threads, usize::from),
        // Serving threads collect their log lines and write them when they go idle.
        hooks: ThreadHooks {
            on_start: Some(Arc::new(crate::ops::logging::batch_thread)),
            on_park: Some(Arc::new(crate::ops::logging::flush_thread)),
            on_stop: Some(Arc::new(crate::ops::logging::flush_thread)),
        },
        ..ServeOptions::default()
    };
    for (profile, listen, site) in prepared {
        let listener = bind(listen).await?;
        if !listen.ip().is_loopback() {
            tracing::warn!(
                "listening on non-loopback {listen} (--allow-remote): anyone who can reach it uses your credentials"
            );
        }
        let url = announce(&listener, &profile, site.local_token.as_ref(), config)?;
        let (sites, receiver) = watch::channel(site);
        tasks.spawn(serve::run_sites(
            listener,
            receiver,
            options.clone(),
            stop.clone().cancelled_owned(),
        ));
        served.push(Served {
            profile,
            url,
            sites,
        });
    }
    if let Some(addr) = admin {
        let listener = bind(addr).await?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Listen { addr, source })?;
        println!("credproxy admin on http://{local} (/healthz, /metrics)");
        let sites = served.iter().map(|s| s.sites.subscribe()).collect();
        tasks.spawn(crate::ops::admin::run(
            listener,
            sites,
            crate::ops::admin::AdminOptions::default(),
            stop.clone().cancelled_owned(),
        ));
    }
    let (commands_tx, mut commands) = mpsc::channel::<Command>(8);
    #[cfg(unix)]
    if let Some((listener, path)) = control::listen() {
        tracing::debug!("control socket at {}", path.display());
        tasks.spawn(control::serve(
            listener,
            path,
            commands_tx.clone(),
            stop.clone().cancelled_owned(),
        ));
    }
    drop(commands_tx);
    let _ = std::io::stdout().flush();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut hangups = hangups();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = hangups.recv() => {
                tracing::info!("SIGHUP: reading the config file and the credentials again");
                server.reload(&mut served, None).await;
            }
            Some(command) = commands.recv() => {
                let reply = match command.request {
                    Request::Status => server.reply(&served, Vec::new()),
                    Request::Reload { profile } => {
                        let outcomes = server.reload(&mut served, profile.as_deref()).await;
                        server.reply(&served, outcomes)
                    }
                };
                let _ = command.reply.send(reply);
            }
        }
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    eprintln!("credproxy: stopped");
    Ok(())
}

/// One serving thread per CPU, up to four: on 2 cores shared with the client and the
/// upstream, two carry about 15 % more small requests at 64 connections than one
/// (bench/README.md), and a loopback proxy for one person's tools needs no more.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// What `serve` was started with: where profiles and secrets come from, and its flags.
struct Server {
    config: ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    args: ServeArgs,
}

/// A profile being served.
struct Served {
    /// The settings in use.
    profile: Profile,
    /// `http://ADDR` as bound.
    url: String,
    /// The listener's site: replaced when the settings change.
    sites: watch::Sender<Site>,
}

impl Server {
    /// What the listener of `profile` serves: its proxy over its live credentials, the Host
    /// names and local credential clients need. `previous` hands its statistics on.
    async fn site_for(&self, profile: &Profile, previous: Option<&Proxy>) -> Result<Site> {
        let fix = self.config.login_command(profile);
        let source: Arc<dyn SecretSource> =
            Arc::new(StoreEntry::new(self.keyring.clone(), &profile.name));
        let (scheme, username) = (profile.auth.clone(), profile.username.clone());
        let credentials = blocking(move || LiveCredentials::load(scheme, username, source)).await?;
        let mut settings = ProxySettings::for_profile(profile, fix)?;
        if let Some(chain) = &profile.client_cert {
            settings.identity = Some(client_identity(&self.keyring, &profile.name, chain).await?);
        }
        let proxy = match previous {
            Some(previous) => Proxy::replacing(previous, settings, credentials)?,
            None => Proxy::new(settings, credentials)?,
        };
        let local_token = if self.args.local_auth || profile.local_auth {
            let (keyring, account) = (self.keyring.clone(), profile.name.clone());
            Some(blocking(move || credentials::local_token(keyring.as_ref(), &account)).await?)
        } else {
            None
        };
        let mut allow_hosts = profile.allow_hosts.clone();
        allow_hosts.extend(self.args.allow_hosts.iter().cloned());
        Ok(Site {
            proxy,
            allow_hosts,
            local_token,
        })
    }

    /// Reads the config file and the credentials again for `only` (every profile when
    /// `None`); returns what happened to each, as logged.
    async fn reload(&self, served: &mut [Served], only: Option<&str>) -> Vec<(String, String)> {
        let file = self.config.load();
        let mut outcomes = Vec::new();
        for one in served
            .iter_mut()
            .filter(|s| only.is_none_or(|name| s.profile.name == name))
        {
            let outcome = self.reload_one(one, &file).await;
            tracing::info!("profile '{}': {outcome}", one.profile.name);
            outcomes.push((one.profile.name.clone(), outcome));
        }
        outcomes
    }

    async fn reload_one(&self, served: &mut Served, file: &Result<ConfigFile, Error>) -> String {
        let name = served.profile.name.clone();
        let fresh = match file {
            Err(err) => Err(format!("cannot read the config file ({err})")),
            Ok(file) => match file.profiles.get(&name) {
                None => Err(format!(
                    "the profile is no longer in {}",
                    self.config.path().display()
                )),
                Some(entry) => Profile::from_entry(&name, entry).map_err(|err| err.to_string()),
            },
        };
        let mut notes = Vec::new();
        match fresh {
            Ok(mut fresh) => {
                if fresh.listen != served.profile.listen && self.args.listen.is_none() {
                    notes.push(format!(
                        "the new listen address {} takes a restart; still listening on {}",
                        fresh.listen, served.url
                    ));
                }
                fresh.listen = served.profile.listen;
                if fresh != served.profile {
                    let previous = served.sites.borrow().proxy.clone();
                    match self.site_for(&fresh, Some(&previous)).await {
                        Ok(site) => {
                            served.sites.send_replace(site);
                            served.profile = fresh;
                            notes.push(
                                "new settings and credentials in use (connections open before finish their request and close)"
                                    .to_owned(),
                            );
                            return notes.join("; ");
                        }
                        Err(err) => notes.push(format!("keeps its old settings: {err}")),
                    }
                }
            }
            Err(why) => {
                tracing::warn!("profile '{name}' keeps its old settings: {why}");
                notes.push(format!("keeps its old settings: {why}"));
            }
        }
        let proxy = served.sites.borrow().proxy.clone();
        notes.push(match proxy.credentials().reload().await {
            Ok(Reload::Changed) => "new credentials in use from the next request".to_owned(),
            Ok(Reload::Unchanged) => "credentials unchanged".to_owned(),
            Ok(Reload::Removed) => {
                "credentials removed: nothing is sent, clients are told to log in".to_owned()
            }
            Err(err) => format!("cannot read the credentials ({err}); keeps the old ones"),
        });
        notes.join("; ")
    }

    /// The answer to a control request: every served profile, with what a reload did.
    fn reply(&self, served: &[Served], outcomes: Vec<(String, String)>) -> Reply {
        let config = std::path::absolute(self.config.path())
            .unwrap_or_else(|_| PathBuf::from(self.config.path()));
        Reply {
            pid: std::process::id(),
            config,
            profiles: served
                .iter()
                .map(|one| {
                    let proxy = one.sites.borrow().proxy.clone();
                    let health = crate::ops::health::profile_health(&proxy);
                    ProfileReply {
                        profile: one.profile.name.clone(),
                        url: one.url.clone(),
                        server: one.profile.server.to_string(),
                        credentials: health["credentials"].clone(),
                        route: health["route"].clone(),
                        reload: outcomes
                            .iter()
                            .find(|(name, _)| *name == one.profile.name)
                            .map(|(_, outcome)| outcome.clone()),
                    }
                })
                .collect(),
        }
    }
}

/// The client certificate of `profile`: its chain from the config file, its private key from
/// the keyring.
pub async fn client_identity(
    keyring: &Arc<dyn CredentialStore>,
    profile: &str,
    chain: &str,
) -> Result<ClientIdentity> {
    let (store, account) = (keyring.clone(), credentials::client_key_account(profile));
    let key = blocking(move || store.get(&account)).await?;
    let Some(key) = key else {
        return Err(Error::MissingSecret {
            profile: profile.to_owned(),
            fix: "its client certificate's private key is not in the keyring; log in again with --client-cert FILE".to_owned(),
        }
        .into());
    };
    Ok(
        ClientIdentity::from_pem(chain.as_bytes(), Some(key.expose().as_bytes())).map_err(|e| {
            Error::Invalid {
                what: "stored client certificate",
                reason: format!("{e}; log in again with --client-cert FILE"),
            }
        })?,
    )
}

/// SIGHUP, as a stream of `()`; never on platforms without it.
fn hangups() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut signal) => {
            tokio::spawn(async move {
                while signal.recv().await.is_some() {
                    // A reload already waiting covers this one too.
                    let _ = tx.try_send(());
                    if tx.is_closed() {
                        break;
                    }
                }
            });
        }
        Err(err) => tracing::warn!("no reload on SIGHUP: {err}"),
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Prints the line scripts wait for (the bound address, port 0 resolved) and, with local
/// auth, where the local URL is; returns `http://ADDR`.
fn announce(
    listener: &TcpListener,
    profile: &Profile,
    local_token: Option<&Secret>,
    config: &ConfigStore,
) -> std::result::Result<String, Error> {
    let local: SocketAddr = listener.local_addr().map_err(|source| Error::Listen {
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
        let show = config.command(&format!("profiles --show-token --profile {}", profile.name));
        let terminal = std::io::stdout().is_terminal();
        let _ = writeln!(out, "{}", local_url_line(token, local, &show, terminal));
    }
    let _ = out.flush();
    Ok(format!("http://{local}"))
}

/// The line that tells a user the local URL of a listener at `addr` that requires `token`:
/// the URL itself only on a `terminal`. Elsewhere standard output is a log (the journal,
/// `~/Library/Logs`) that keeps it on every start, so the line names the command (`show`)
/// that prints it instead.
fn local_url_line(token: &Secret, addr: SocketAddr, show: &str, terminal: bool) -> String {
    if terminal {
        format!(
            "local URL (keep it private): {}",
            crate::serve::guard::local_url(token, addr)
        )
    } else {
        format!("local auth is on: clients need the local URL; `{show}` prints it")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_url_is_printed_only_to_a_terminal() {
        let token = Secret::new("tok-5ecret-0123".into());
        let addr: SocketAddr = "127.0.0.1:2283".parse().unwrap();
        let show = "credproxy profiles --show-token --profile home";
        let terminal = local_url_line(&token, addr, show, true);
        assert_eq!(
            terminal,
            "local URL (keep it private): http://credproxy:tok-5ecret-0123@127.0.0.1:2283"
        );
        let logged = local_url_line(&token, addr, show, false);
        assert!(!logged.contains("tok-5ecret-0123"), "{logged}");
        assert!(logged.contains(&format!("`{show}` prints it")), "{logged}");
    }
}
