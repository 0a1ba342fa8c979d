//! The `credproxy` binary: parse, set up logging, run the command, map errors to exit codes.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use credproxy::cli::{Cli, Command};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            // Help and version are successes; everything else clap reports is a usage error.
            return if err.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The demo prints its own story; per-request lines would only interleave with it.
    let default_filter = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    // `Targets` ("info", "warn,credproxy=debug") rather than `EnvFilter`: the same syntax for
    // what we document, without a regex engine in the binary.
    let filter = std::env::var("CREDPROXY_LOG")
        .ok()
        .and_then(|spec| spec.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            default_filter
                .parse::<Targets>()
                .expect("the default filter is a valid level")
        });
    tracing_subscriber::fmt()
        .with_writer(credproxy::logging::Stderr)
        // Colour escapes only for a terminal, never in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(credproxy::logging::Format::new())
        .finish()
        .with(filter)
        .init();
    // That subscriber is logging's own Format and Stderr: server threads may write access
    // lines themselves.
    credproxy::logging::access_lines_direct();
    // One thread for the commands, signals and the admin listener; `serve` runs its own
    // single-threaded event loop per server thread (see `server::start_threads`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("credproxy: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(credproxy::app::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let usage = err.is_usage();
            eprintln!("credproxy: error: {:#}", anyhow::Error::from(err));
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
