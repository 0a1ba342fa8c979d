//! The command line: the binary's face of the library. Each command validates its arguments
//! once, then runs against the config file and the OS keyring.
//!
//! Owns: [`args`] (the clap types), one file per command (`login`, `serve`, `logout`,
//! `profiles`, `doctor`, `demo`, `service`, `completions`), [`CliError`] and exit codes, the
//! runtime and log set-up of the binary. Built only with the `cli` feature (the default): the
//! phone library compiles none of it.

pub mod args;
mod completions;
pub mod demo;
mod doctor;
mod error;
mod login;
mod logout;
mod profiles;
mod running;
mod serve;
pub mod service;

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use self::args::{Cli, Command};
pub use self::error::{CliError, Result};
use crate::config::ConfigStore;
use crate::credentials::{CredentialStore, KeyringStore, StoreError};
use crate::error::Error;

/// Runs a parsed command line to completion.
pub async fn run(cli: Cli) -> Result<()> {
    let config = ConfigStore::locate(cli.config)?;
    let keyring: Arc<dyn CredentialStore> = Arc::new(KeyringStore::new());
    match cli.command {
        Command::Login(args) => login::run(&config, keyring, *args).await,
        Command::Serve(args) => serve::run(&config, keyring, args).await,
        Command::Logout(args) => logout::run(&config, keyring, &args.profile).await,
        Command::Profiles(args) => profiles::run(&config, keyring, args).await,
        Command::Doctor(args) => doctor::run(&config, keyring, &args.profile).await,
        Command::Demo(args) => demo::run(&args.listen, args.keep_running).await,
        Command::Service(args) => service::run(&config, args.action),
        Command::Completions(args) => {
            completions::completions(args.shell);
            Ok(())
        }
        Command::Man(args) => match args.dir {
            Some(dir) => completions::man_pages(&dir),
            None => {
                completions::man();
                Ok(())
            }
        },
    }
}

/// The runtime a command runs on: one thread. (`serve` starts its serving threads, each an
/// event loop of its own, in [`crate::serve::run_sites`]; this one accepts, reloads and
/// answers the admin listener.)
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Sends log events to standard error: `CREDPROXY_LOG` (`info`, `warn,credproxy=debug`)
/// chooses what, `info` by default (`warn` for the demo, which prints its own story).
pub fn init_logging(cli: &Cli) {
    let default_filter = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    // `Targets` rather than `EnvFilter`: the syntax we document, without a regex engine.
    let filter = std::env::var("CREDPROXY_LOG")
        .ok()
        .and_then(|spec| spec.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            default_filter
                .parse::<Targets>()
                .expect("the default filter is a valid level")
        });
    // The builder stops at `info` unless told otherwise, under the filter: the most verbose
    // level the filter lets through is the limit (no more, or every disabled `debug!` and
    // `log` record of a dependency would be built and then refused).
    let most = filter
        .iter()
        .map(|(_, level)| level)
        .chain(filter.default_level())
        .max()
        .unwrap_or(tracing::level_filters::LevelFilter::OFF);
    tracing_subscriber::fmt()
        .with_max_level(most)
        .with_writer(crate::ops::logging::Stderr)
        // Colour escapes only for a terminal, never in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(crate::ops::logging::Format::new())
        .finish()
        .with(filter)
        .init();
}

/// Runs a blocking credential-store call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, StoreError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CliError::Password(format!("keyring task failed: {e}")))?
        .map_err(CliError::from)
}

/// Binds a listen socket, with a clear error when the address is taken.
pub async fn bind(addr: SocketAddr) -> std::result::Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })
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
