//! `dockwall unload`: remove everything dockwall installed in the kernel.
//! The saved allowances stay for the next `load`.

use std::{path::Path, process::ExitCode};

use crate::{dataplane::ebpf, dataplane::fallback, runtime};

pub fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    super::require_root("unload")?;
    let state = runtime::state()?;
    let mut ifaces: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
    // Links pinned by a load whose state file is gone (e.g. /run was wiped).
    if let Ok(entries) = std::fs::read_dir(ebpf::PIN_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = ebpf::LINK_PIN_PREFIXES
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))
                && !ifaces.iter().any(|i| i == iface)
            {
                ifaces.push(iface.to_string());
            }
        }
    }
    let was_loaded = !ifaces.is_empty() || ebpf::pins_present();
    for iface in &ifaces {
        ebpf::detach(iface)?;
    }
    ebpf::remove_pins()?;
    // The recorded fallback, and every other in case the state is gone.
    fallback::remove_all(state.fallback)?;
    runtime::clear()?;
    if was_loaded {
        println!(
            "dockwall: unloaded from {}; allowances stay saved in {}",
            if ifaces.is_empty() {
                "-".to_string()
            } else {
                ifaces.join(", ")
            },
            config_path.display()
        );
    } else {
        println!("dockwall: was not loaded; nothing to remove");
    }
    Ok(ExitCode::SUCCESS)
}
