//! Developer tasks: `cargo xtask setup | build | test | demo | bench | install`.
//!
//! Everything a fresh machine needs is installed by `setup`, which `build`,
//! `test` and `demo` run first (each step is skipped when already done).

mod control;
mod demo;
mod durability;
mod e2e;
mod equivalence;
mod install;
mod lab;
mod model;
mod operations;
mod readback;
mod setup;
mod util;
mod writer;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build => setup::run().and_then(|()| util::build_release()),
        Task::Test { only, steps, seed } => setup::run()
            .and_then(|()| util::build_release())
            .and_then(|()| e2e::run_all(only.as_deref(), model::Options { steps, seed })),
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
