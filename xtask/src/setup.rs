//! Installs what a fresh machine of this kind lacks. Idempotent and quick
//! when everything is there already.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{self, capture, output, sh};

/// Debian packages: a Docker engine for the end-to-end tests and the demo,
/// iptables (Docker and the fallback need it), ipset (the fallback's sets),
/// nftables (the other fallback), busybox-static and gcc for the test image,
/// iproute2 for namespaces and veths; systemd (systemd-analyze verify for
/// the unit), man-db and groff-base (rendering the man pages), curl
/// (scraping the metrics endpoint) for the operations tests; conntrack (the
/// whole-path benchmark empties the router's table between runs).
const APT_PACKAGES: &[&str] = &[
    "docker.io",
    "iptables",
    "python3",
    "ipset",
    "nftables",
    "bpftool",
    "busybox-static",
    "iproute2",
    "gcc",
    "libc6-dev",
    "systemd",
    "man-db",
    "groff-base",
    "curl",
    "conntrack",
    // etcd-client generates its gRPC code with protoc at build time; its
    // protos import the well-known types (google/protobuf/*.proto), which
    // Debian ships in the -dev package, not with the compiler.
    "protobuf-compiler",
    "libprotobuf-dev",
    // Kernels in VMs (xtask vm, the platform matrix).
    "qemu-system-x86",
    "cpio",
    "kmod",
    "xz-utils",
    "zstd",
];
/// Where the nightly's libLLVM is exposed to bpf-linker's build. It keeps an
/// rpath to this folder, so it must stay put.
const LLVM_PREFIX: &str = "/opt/dockwall/llvm-nightly";

pub fn run() -> anyhow::Result<()> {
    apt()?;
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()
}

/// cargo-fuzz runs the fuzz targets of the userspace parsers.
fn cargo_fuzz() -> anyhow::Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("setup: cargo install cargo-fuzz");
    util::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

fn apt() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", p]))
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    util::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

fn rust_src() -> anyhow::Result<()> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context(
        "the nightly toolchain is needed for the eBPF crate (rustup toolchain install nightly)",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: rustup component add rust-src --toolchain nightly");
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    // bpf-linker must use the same LLVM as the nightly that emits the
    // bitcode; the nightly ships it as a shared library without headers or
    // llvm-config, so expose it in a prefix of its own.
    let sysroot = capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let llvm_dir = Path::new(sysroot.trim()).join("lib");
    let versioned = std::fs::read_dir(&llvm_dir)
        .with_context(|| format!("reading {}", llvm_dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", llvm_dir.display()))?;
    let major = versioned
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let lib = Path::new(LLVM_PREFIX).join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for link in [versioned.as_str(), "libLLVM.so"] {
        let path = lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(llvm_dir.join(&versioned), &path)
            .with_context(|| format!("symlinking {}", path.display()))?;
    }
    eprintln!(
        "setup: cargo install bpf-linker (LLVM {major} from the nightly; takes a few minutes)"
    );
    util::run(
        Command::new("cargo")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}")),
    )
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    eprintln!("setup: mount -t bpf bpf /sys/fs/bpf");
    let out = output(&mut sh("mount -t bpf bpf /sys/fs/bpf"))?;
    if !out.status.success() {
        bail!(
            "mounting bpffs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
