//! `credproxy completions SHELL` and `credproxy man`: generated from the clap definitions.

use std::io::Write as _;
use std::path::Path;

use super::args::Cli;
use super::{CliError, Result};

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
    let _ = clap_mangen::Man::new(Cli::command())
        .manual("credproxy manual")
        .render(&mut std::io::stdout().lock());
}

/// `man --dir DIR`: one page per command and subcommand (`credproxy-service-install.1`), as
/// packages install them, so `man credproxy-login` finds the page of that command.
pub fn man_pages(dir: &Path) -> Result<()> {
    use clap::CommandFactory as _;
    let error = |source| CliError::ManPages {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(error)?;
    // Built first: that names each subcommand's page after its path (`credproxy-login`).
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let source = format!("credproxy {}", env!("CARGO_PKG_VERSION"));
    write_pages(&command, dir, &source).map_err(error)
}

fn write_pages(command: &clap::Command, dir: &Path, source: &str) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, source)?;
    }
    // Every page names the release it documents (clap gives subcommands no version).
    clap_mangen::Man::new(command.clone())
        .source(source)
        .manual("credproxy manual")
        .generate_to(dir)
        .map(drop)
}
