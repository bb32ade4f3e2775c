//! Builds the eBPF program (dockwall-ebpf) with the nightly toolchain and
//! bpf-linker, so the `dockwall` binary can embed the object.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_EMBED_EBPF").is_none() {
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("{manifest_dir} has no parent"))?
        .join("dockwall-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", ebpf_dir.display()))?;
    // BPF ISA v2 for the kernels' verifiers; see the script for why.
    let linker = ebpf_dir.join("tools/bpf-linker-v2");
    println!("cargo:rerun-if-changed={}", linker.display());
    // SAFETY: the build script is single-threaded; aya-build's cargo
    // inherits the variable.
    unsafe { std::env::set_var("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker) };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "dockwall-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
