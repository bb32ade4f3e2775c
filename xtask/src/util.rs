//! Running commands with errors that name them.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The binary under test; `DOCKWALL_BIN` points the suite at another build
/// (an older one, to show a test fails without a fix).
pub fn dockwall_bin() -> PathBuf {
    std::env::var_os("DOCKWALL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/dockwall"))
}

/// Runs a command with inherited output; fails unless it succeeds.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and captures its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))
}

/// Runs a command, returns stdout; fails (with stderr) unless it succeeds.
pub fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sh -c`, for the few pipelines that read better in shell.
pub fn sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    cmd
}

/// Whether this kernel runs dockwall's XDP program (`load --hook xdp`
/// needs Linux 5.18 for bpf_xdp_load_bytes): the VM cells of older kernels
/// skip the XDP checks.
pub fn kernel_has_xdp_hook() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (5, 18)
}

/// Runs both benchmarks (classifier under BPF_PROG_TEST_RUN, then the
/// whole forwarding path); returns the folder with their results.
pub fn bench(quick: bool) -> anyhow::Result<PathBuf> {
    let out = if quick {
        root().join("target/bench-quick")
    } else {
        root().join("bench")
    };
    for name in ["classifier", "droppath", "path"] {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root())
            .args([
                "bench",
                "--package",
                "dockwall-userspace",
                "--bench",
                name,
                "--",
            ])
            .arg("--out")
            .arg(&out);
        if quick {
            cmd.arg("--quick");
        }
        run(&mut cmd)?;
    }
    Ok(out)
}

pub fn build_release() -> anyhow::Result<()> {
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "--package",
        "dockwall-userspace",
    ]))
}
