//! The platform matrix: Debian's kernels in VMs and Docker Engine versions
//! on this host. Each cell runs as a child process (the xtask binary's own
//! `e2e` task, or the kernel-test binary), so a cell's failure, or a VM's
//! hang, is reported as that cell and the next one still runs.
//!
//! The suite (`cargo xtask test`) runs [`CI`]; `--matrix` runs every
//! kernel with every engine, plus the equivalence matrix per engine.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{e2e::Report, engine, util, vm};

/// Phases of the core flow a VM cell runs (`e2e::PHASES`): the fallback
/// alone without the edits under load, which emulation makes take minutes.
const CORE_VM: &str = "core,fallback-alone";
/// The same on this host's kernel, with the edits under load.
const CORE: &str = "core,fallback";

/// What a VM may take before it counts as hung (TCG is slow: the core
/// flow takes 2.5–4.5 min here).
const VM_TIMEOUT: Duration = Duration::from_secs(720);

/// One cell: where it runs and what.
#[derive(Clone, Copy)]
pub enum Cell {
    /// The kernel tests (BPF_PROG_TEST_RUN) inside a VM of that kernel.
    KernelTests { kernel: &'static str },
    /// End-to-end phases inside a VM, with the given Docker Engine.
    InVm {
        kernel: &'static str,
        engine: &'static str,
        phases: &'static str,
    },
    /// End-to-end phases on this host's kernel with that Docker Engine.
    OnHost {
        engine: &'static str,
        phases: &'static str,
    },
}

/// What every CI run covers: the two oldest kernels Debian still ships
/// (kernel tests and core flow) and the newest Docker Engine (core flow).
pub const CI: [Cell; 7] = [
    Cell::KernelTests { kernel: "6.1" },
    Cell::InVm {
        kernel: "6.1",
        engine: "20.10",
        phases: CORE_VM,
    },
    Cell::KernelTests { kernel: "5.10" },
    Cell::InVm {
        kernel: "5.10",
        engine: "20.10",
        phases: CORE_VM,
    },
    // Swarm's routing mesh needs IPVS, which this host's kernel lacks.
    Cell::InVm {
        kernel: "6.1",
        engine: "20.10",
        phases: "swarm",
    },
    Cell::OnHost {
        engine: "28.5",
        phases: CORE,
    },
    // Docker 29's nftables backend, reproduced (docker29.rs).
    Cell::OnHost {
        engine: "20.10",
        phases: "docker29-nft",
    },
];

/// Every combination.
pub fn full() -> Vec<Cell> {
    let mut cells = Vec::new();
    for (kernel, _) in vm::KERNELS {
        cells.push(Cell::KernelTests { kernel });
        for (engine, _) in engine::ENGINES {
            cells.push(Cell::InVm {
                kernel,
                engine,
                phases: CORE_VM,
            });
        }
    }
    for (engine, _) in engine::ENGINES {
        cells.push(Cell::InVm {
            kernel: "6.1",
            engine,
            phases: "swarm",
        });
    }
    for (engine, _) in engine::ENGINES {
        cells.push(Cell::OnHost {
            engine,
            phases: "core,fallback,equivalence",
        });
    }
    cells.push(Cell::OnHost {
        engine: "20.10",
        phases: "docker29-nft",
    });
    cells
}

impl Cell {
    fn name(&self) -> String {
        match self {
            Cell::KernelTests { kernel } => format!("kernel {kernel} (VM): kernel tests"),
            Cell::InVm {
                kernel,
                engine,
                phases,
            } => format!("kernel {kernel} (VM), Docker {engine}: {phases}"),
            Cell::OnHost { engine, phases } => {
                format!("host kernel, Docker {engine}: {phases}")
            }
        }
    }
}

/// Runs the cells, one check each; prints a summary table.
pub fn run(r: &mut Report, cells: &[Cell]) {
    let mut rows = Vec::new();
    for cell in cells {
        let started = Instant::now();
        let mut result = run_cell(cell);
        if let Err(e) = &result
            && e.to_string().starts_with(vm::LOCKED_UP)
        {
            // A TCG guest that locked up says nothing about dockwall: once
            // more, and the note says so.
            println!(
                "e2e: note matrix: {} locked up ({e:#}); trying once more",
                cell.name()
            );
            result = run_cell(cell);
        }
        let took = started.elapsed();
        println!(
            "e2e: note matrix: {} {} in {:.0} s",
            cell.name(),
            if result.is_ok() { "passed" } else { "FAILED" },
            took.as_secs_f64()
        );
        rows.push((cell.name(), result.is_ok(), took));
        r.check(&format!("matrix: {}", cell.name()), result);
    }
    println!("e2e: note matrix summary:");
    for (name, ok, took) in rows {
        println!(
            "e2e: note   {:<70} {:>6} {:>5.0} s",
            name,
            if ok { "pass" } else { "FAIL" },
            took.as_secs_f64()
        );
    }
}

fn run_cell(cell: &Cell) -> anyhow::Result<()> {
    match *cell {
        Cell::KernelTests { kernel } => {
            let kernel = vm::Kernel::fetch(kernel)?;
            let tests = kernel_test_binary()?;
            let rc = vm::run(
                &kernel,
                &[tests.display().to_string(), "--test-threads=1".to_string()],
                &util::root().join("dockwall-userspace"),
                VM_TIMEOUT,
            )?;
            exit_ok(rc, "the kernel tests")
        }
        Cell::InVm {
            kernel,
            engine,
            phases,
        } => {
            let kernel = vm::Kernel::fetch(kernel)?;
            let xtask = std::env::current_exe().context("finding the xtask binary")?;
            let mut command = Vec::new();
            if let Some(dir) = engine::bin_dir(engine)? {
                command.extend([
                    "env".to_string(),
                    format!("{}={}", engine::ENV, dir.display()),
                ]);
            }
            command.extend([
                xtask.display().to_string(),
                "e2e".into(),
                "--only".into(),
                phases.into(),
            ]);
            let rc = vm::run(&kernel, &command, &util::root(), VM_TIMEOUT)?;
            exit_ok(rc, phases)
        }
        Cell::OnHost { engine, phases } => {
            let xtask = std::env::current_exe().context("finding the xtask binary")?;
            let mut cmd = Command::new(xtask);
            cmd.args(["e2e", "--only", phases]).stdin(Stdio::null());
            if let Some(dir) = engine::bin_dir(engine)? {
                cmd.env(engine::ENV, dir);
            }
            let status = cmd.status().context("running xtask e2e")?;
            exit_ok(status.code().unwrap_or(-1), phases)
        }
    }
}

fn exit_ok(rc: i32, what: &str) -> anyhow::Result<()> {
    if rc != 0 {
        bail!("{what} exited {rc} (its output is above)");
    }
    Ok(())
}

/// The kernel-test binary of the release build (built by `cargo test
/// --release`, which the suite runs first).
fn kernel_test_binary() -> anyhow::Result<PathBuf> {
    let out = Command::new("cargo")
        .current_dir(util::root())
        .args([
            "test",
            "--release",
            "-p",
            "dockwall-userspace",
            "--test",
            "kernel",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "kernel")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo test --no-run named no kernel test binary")
}
