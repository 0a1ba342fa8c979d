//! The `credproxy` binary: parse, set up logging and the runtime, run the command, map errors
//! to exit codes. Everything else lives in the library (`credproxy::cli`).

use std::process::ExitCode;

use clap::Parser;
use credproxy::cli::{self, args::Cli};

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
    cli::init_logging(&cli);
    let runtime = match cli::runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("credproxy: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = err.exit_code();
            eprintln!("credproxy: error: {:#}", anyhow::Error::from(err));
            ExitCode::from(code)
        }
    }
}
