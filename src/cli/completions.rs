//! `credproxy completions SHELL` and `credproxy man`: generated from the clap definitions.

use std::io::Write as _;

use super::args::Cli;

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
