//! `dockwall reload`: apply the saved file as it is now (after a hand
//! edit). A file that fails to parse or validate is refused whole, naming
//! file, line and reason, and the policy in force stays exactly as it was.

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;

use crate::{config, dataplane::sync};

pub fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    super::require_root("reload")?;
    config::check_readable(config_path)?;
    let rt = super::runtime()?;
    // A missing file would read as "no allowances" and lock everyone out:
    // that must be said with an empty file, not by accident.
    if !config_path.exists() {
        anyhow::bail!(
            "{} does not exist; refused, the policy in force is unchanged (to remove every allowance, write an empty file)",
            config_path.display()
        );
    }
    let lock = config::lock(config_path)?;
    let policy = config::load(config_path).context("refused; the policy in force is unchanged")?;
    match sync::Dataplanes::installed()? {
        Some(mut dataplanes) => {
            let (bindings, source, _) = rt.block_on(sync::bindings());
            sync::apply(&mut dataplanes, &policy, &bindings, source)?;
            drop(lock);
            println!(
                "reloaded {}: {} allowance(s) in force",
                config_path.display(),
                policy.allowances.len()
            );
        }
        None => println!(
            "{} is valid ({} allowance(s)); dockwall is not loaded, it applies at the next `dockwall load`",
            config_path.display(),
            policy.allowances.len()
        ),
    }
    Ok(ExitCode::SUCCESS)
}
