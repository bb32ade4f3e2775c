//! `dockwall completions SHELL` and `dockwall man DIR`: generated from the
//! clap definitions, so they can never disagree with the binary.
//! `cargo xtask install` puts them where shells and man look.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};

use super::Cli;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
dockwall completions bash > /usr/share/bash-completion/completions/dockwall\n  \
dockwall completions zsh > /usr/local/share/zsh/site-functions/_dockwall")]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  dockwall man /usr/local/share/man/man8 && man 8 dockwall")]
pub struct ManArgs {
    /// Directory to write dockwall.8 and dockwall-SUBCOMMAND.8 into (created if missing)
    pub dir: PathBuf,
}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    clap_complete::generate(
        args.shell,
        &mut Cli::command(),
        "dockwall",
        &mut std::io::stdout(),
    );
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Fills in display names (dockwall-load) for the subcommand pages.
    cmd.build();
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    for page in pages {
        // Section 8: system administration commands, run by root.
        let man = clap_mangen::Man::new(page)
            .section("8")
            .manual("System Administration");
        let path = man
            .generate_to(&args.dir)
            .with_context(|| format!("writing a man page into {}", args.dir.display()))?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
