//! The tail every editing command shares when no daemon runs: the command
//! does the daemon's part itself, under the writer's lock the router handed
//! it.

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;

use crate::{
    config::{self, Policy},
    dataplane::sync,
    policy::Binding,
};

/// Saves `policy` (already edited) when `changed`, applies it to the loaded
/// dataplanes if any, and prints the edit's `lines` and where it stands.
///
/// `bindings` is asked only when something is loaded: a command that is
/// not in force anywhere needs no Docker round trip.
pub(crate) fn commit(
    config_path: &Path,
    lock: &config::Lock,
    mut policy: Policy,
    changed: bool,
    lines: &[String],
    bindings: impl FnOnce() -> anyhow::Result<(Vec<Binding>, sync::BindingsSource)>,
) -> anyhow::Result<ExitCode> {
    // Read before the save empties the journal that completes it.
    let installed = sync::Dataplanes::installed(config_path)?;
    if changed {
        // Above every revision a daemon applied, so the next daemon sees
        // this file as news.
        let applied = crate::runtime::daemon()?.applied.values().copied().max();
        policy.revision = policy.revision.max(applied.unwrap_or(0)) + 1;
        config::save(config_path, &policy, lock)?;
        crate::runtime::note_saved_file(config_path)?;
    }
    let in_force = match installed {
        Some(mut dataplanes) => {
            let (bindings, source) = bindings()?;
            sync::apply(&mut dataplanes, &policy, &bindings, source)
                .context("saved, but applying to the loaded filter failed")?;
            crate::runtime::record_applied(&dataplanes.names(), policy.revision)?;
            true
        }
        None => false,
    };
    for line in lines {
        println!("{line}");
    }
    if in_force {
        println!("in force now");
    } else {
        println!(
            "saved to {}; dockwall is not loaded, it applies at the next `dockwall load`",
            config_path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
