//! Command-line interface: one module per subcommand.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod allow;
mod direct;
mod explain;
mod generate;
mod list;
mod load;
mod reload;
mod set;
mod status;
mod store;
mod unload;

pub use allow::AllowArgs;
pub use list::ListArgs;
pub use load::LoadArgs;
pub use status::StatusArgs;

const EXAMPLES: &str = "\
Examples:
  sudo dockwall load --iface eth0                      attach, then follow Docker
  sudo dockwall allow 203.0.113.7 --port 8081          one address to published port 8081/tcp
  sudo dockwall allow 198.51.100.0/24 --port 5353/udp  a network to a UDP port
  sudo dockwall allow any --container web              everyone to every port `web` publishes
  sudo dockwall allow 198.51.100.9 --port 22022 --for 2h  lapses on time, even with no daemon
  sudo dockwall revoke 203.0.113.7 --port 8081
  sudo dockwall set load office office.txt             a named list, one address or CIDR per line
  sudo dockwall allow @office --port 8081              everyone on it; follows edits of the list
  sudo dockwall reload                                 apply a hand edit of the saved file
  dockwall list
  dockwall status --json
  dockwall explain 203.0.113.9 8081                   who decides, where it lands, dataplanes agree?
  sudo dockwall load --iface eth0 --audit              try a policy: count and log, drop nothing
  sudo dockwall load --iface eth0 --metrics 127.0.0.1:9464
  sudo dockwall unload                                 detach; saved allowances stay
  sudo dockwall --store etcd://10.0.0.5:2379/dw load --iface eth0   one policy for a fleet, in etcd
  dockwall --store etcd://10.0.0.5:2379/dw allow 203.0.113.0/24 --port 8081          every host
  dockwall --store etcd://10.0.0.5:2379/dw allow 198.51.100.7 --port 22022 --host   this host only

PORT is the published port, the one clients connect to: 8081 in `docker run -p 8081:8080`.";

/// Decide who may reach the ports Docker publishes.
///
/// An eBPF filter on the external interface (tc ingress, or native XDP with
/// `load --hook xdp`) drops new connections to
/// Docker-published ports unless an allowance (source address or CIDR,
/// published port, protocol) matches. Everything else passes untouched:
/// host services such as SSH, unpublished ports, replies, other interfaces.
#[derive(Debug, Parser)]
#[command(name = "dockwall", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Saved allowances [default: /etc/dockwall/dockwall.toml]
    #[arg(long, global = true, env = "DOCKWALL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub store: crate::store::StoreArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the filter to interfaces and keep it in sync with Docker (foreground)
    Load(LoadArgs),
    /// Let a source open new connections to published ports (saved, in force at once)
    Allow(AllowArgs),
    /// Remove an allowance given with the same arguments as `allow`
    Revoke(AllowArgs),
    /// Named source lists (@NAME) that allowances and container labels use: add, remove, load, list
    Set(set::SetArgs),
    /// Move a host's saved file into the store (--store) and back: import FILE, export
    Store(store::StoreCmdArgs),
    /// Apply the saved file after a hand edit (refused whole if it fails; SIGHUP to `load` does the same)
    Reload,
    /// Show the saved allowances, what each resolves to now, and hit counters
    List(ListArgs),
    /// Show whether the filter is in force (exit 0 only then), interfaces, ports, counters
    Status(StatusArgs),
    /// Say what would happen to a new connection from SOURCE to a published PORT, and why
    Explain(explain::ExplainArgs),
    /// Detach the filter and remove everything dockwall installed (allowances stay saved)
    Unload,
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout
    Completions(generate::CompletionsArgs),
    /// Write the man pages (dockwall.8 and one per subcommand) into a directory
    Man(generate::ManArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = crate::config::config_path(cli.config);
    let store = cli.store.spec()?;
    let store = store.as_ref();
    match cli.command {
        Command::Load(args) => load::run(&config, args, store),
        Command::Allow(args) => allow::run(&config, args, allow::Action::Allow, store),
        Command::Revoke(args) => allow::run(&config, args, allow::Action::Revoke, store),
        Command::Set(args) => set::run(&config, args, store),
        Command::Store(args) => store::run(&config, args, store),
        Command::Reload => match store {
            // Nothing to re-read by hand: the daemon follows the store.
            Some(spec) => {
                println!(
                    "the policy comes from {}, which every daemon following it watches continuously: edits are in force as they are written; nothing to reload",
                    spec.url
                );
                Ok(ExitCode::SUCCESS)
            }
            None => reload::run(&config),
        },
        Command::List(args) => match store {
            Some(spec) => store::list(spec, args.json),
            None => list::run(&config, args),
        },
        Command::Status(args) => status::run(&config, args),
        Command::Unload => unload::run(&config),
        Command::Explain(args) => explain::run(&config, args),
        Command::Completions(args) => generate::completions(args),
        Command::Man(args) => generate::man(args),
    }
}

/// Refuses to go on without root, naming the command.
pub(crate) fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "`dockwall {what}` must run as root (it changes eBPF maps and {}); try `sudo dockwall {what} ...`",
            crate::dataplane::ebpf::PIN_DIR
        );
    }
    Ok(())
}

/// Prints the daemon's answer as the command's own: its lines on stdout,
/// or its one-line error (exit 1).
pub(crate) fn print_reply(reply: crate::control::Reply) -> anyhow::Result<ExitCode> {
    match reply {
        crate::control::Reply::Done { lines } => {
            for line in lines {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        crate::control::Reply::Failed { error } => Err(anyhow::anyhow!(error)),
    }
}

/// A small runtime for the async Docker client.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}
