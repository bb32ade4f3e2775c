//! Developer tasks: `cargo xtask setup | build | test | demo | bench | install`.
//!
//! Everything a fresh machine needs is installed by `setup`, which `build`,
//! `test` and `demo` run first (each step is skipped when already done).

mod control;
mod debian;
mod demo;
mod docker29;
mod durability;
mod e2e;
mod engine;
mod equivalence;
mod fleet;
mod install;
mod lab;
mod labels;
mod matrix;
mod model;
mod operations;
mod readback;
mod setup;
mod swarm;
mod util;
mod vm;
mod writer;
mod xdp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src, bpf-linker, bpffs)
    Setup,
    /// Setup, then build target/release/dockwall
    Build,
    /// Setup, build, then every test: lint, unit, kernel (BPF_PROG_TEST_RUN), end to end on a real dockerd
    Test {
        /// Only these end-to-end phases (comma-separated), after the common setup (development shortcut)
        #[arg(long, value_name = "PHASE")]
        only: Option<String>,
        /// Steps of the model-based randomized test
        #[arg(long, default_value_t = model::DEFAULT_STEPS)]
        steps: usize,
        /// Seed of the model-based randomized test (printed on failure, to replay it)
        #[arg(long, default_value_t = model::DEFAULT_SEED)]
        seed: u64,
        /// The lab's Docker Engine: 20.10 (the system's), 26.1 or 28.5 (Debian trixie's and sid's, fetched)
        #[arg(long, value_name = "VERSION")]
        docker: Option<String>,
        /// Every kernel (VMs) with every Docker Engine, and the equivalence matrix per engine (long)
        #[arg(long, conflicts_with = "only")]
        matrix: bool,
        /// Skip the platform matrix that a full run ends with (kernels in VMs, Docker 28.5)
        #[arg(long, conflicts_with = "matrix")]
        no_matrix: bool,
    },
    /// Boot one of Debian's kernels under QEMU and run COMMAND inside as root (the host's root filesystem, read-only, under a tmpfs overlay)
    #[command(
        after_help = "Examples:\n  cargo xtask vm --kernel 6.1 -- uname -r\n  cargo xtask vm --kernel 5.10 -- target/release/dockwall load --dry-run --iface lo\n\nKernels: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), 7.2 (sid); fetched once into /var/cache/dockwall-lab."
    )]
    Vm {
        /// Debian kernel version: 5.10, 6.1, 6.12 or 7.2
        #[arg(long)]
        kernel: String,
        /// Seconds before the VM counts as hung and is killed
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// The command (and its arguments) to run inside
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// End-to-end phases only, with the binaries already built (what runs inside a VM)
    #[command(hide = true)]
    E2e {
        #[arg(long)]
        only: String,
    },
    /// Setup, build, then a self-contained demo: local dockerd, a container, an outside client
    Demo,
    /// Setup, then both benchmarks (classifier under BPF_PROG_TEST_RUN; whole forwarding path): results in bench/
    Bench {
        /// Small counts and few repeats (what CI runs), results in target/bench-quick
        #[arg(long)]
        quick: bool,
        /// Only the control-plane part (full mode; `DOCKWALL_BIN` picks the build)
        #[arg(long, conflicts_with = "quick")]
        control_only: bool,
        /// Where --control-only writes control.json and control.md (default bench/)
        #[arg(long, requires = "control_only")]
        out: Option<std::path::PathBuf>,
    },
    /// Setup, build, then install the binary, systemd unit, man pages and completions
    Install {
        /// Install below this directory instead of / (staging, packaging)
        #[arg(long, default_value = "/")]
        root: std::path::PathBuf,
    },
}

/// `--docker VERSION`: the lab's dockerd from that engine's binaries.
fn use_engine(version: Option<&str>) -> anyhow::Result<()> {
    if let Some(dir) = version.map(engine::bin_dir).transpose()?.flatten() {
        // SAFETY: set before any thread is started.
        unsafe { std::env::set_var(engine::ENV, dir) };
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build => setup::run().and_then(|()| util::build_release()),
        Task::Test {
            only,
            steps,
            seed,
            docker,
            matrix,
            no_matrix,
        } => setup::run()
            .and_then(|()| util::build_release())
            .and_then(|()| use_engine(docker.as_deref()))
            .and_then(|()| {
                let cells = if matrix {
                    Some(matrix::full())
                } else if only.is_none() && !no_matrix {
                    Some(matrix::CI.to_vec())
                } else {
                    None
                };
                e2e::run_all(
                    only.as_deref(),
                    model::Options { steps, seed },
                    cells.as_deref(),
                )
            }),
        Task::Vm {
            kernel,
            timeout,
            command,
        } => setup::run().and_then(|()| {
            let kernel = vm::Kernel::fetch(&kernel)?;
            let cwd = std::env::current_dir()?;
            let rc = vm::run(
                &kernel,
                &command,
                &cwd,
                std::time::Duration::from_secs(timeout),
            )?;
            std::process::exit(rc)
        }),
        Task::E2e { only } => e2e::run_all(
            Some(&only),
            model::Options {
                steps: model::DEFAULT_STEPS,
                seed: model::DEFAULT_SEED,
            },
            None,
        ),
        Task::Demo => setup::run()
            .and_then(|()| util::build_release())
            .and_then(|()| demo::run()),
        Task::Bench {
            control_only: true,
            out,
            ..
        } => setup::run()
            .and_then(|()| util::build_release())
            .and_then(|()| control::run(&out.unwrap_or_else(|| util::root().join("bench")))),
        Task::Bench { quick, .. } => setup::run()
            .and_then(|()| util::build_release())
            .and_then(|()| util::bench(quick))
            .and_then(|out| {
                // The control plane needs a dockerd and the real daemon; the
                // test suite checks it on a small scale, so quick skips it.
                if quick { Ok(()) } else { control::run(&out) }
            }),
        Task::Install { root } => setup::run()
            .and_then(|()| util::build_release())
            .and_then(|()| install::run(&root)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
