//! `dockwall reload`: apply the saved file as it is now (after a hand
//! edit). A file that fails to parse or validate is refused whole, naming
//! file, line and reason, and the policy in force stays exactly as it was.
//! The running daemon does it; with none, the command does it directly.

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;

use crate::{
    config,
    control::{
        Request,
        client::{self, Route},
    },
    dataplane::sync,
};

pub fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    super::require_root("reload")?;
    config::check_readable(config_path)?;
    // A missing file would read as "no allowances" and lock everyone out:
    // that must be said with an empty file, not by accident.
    if !config_path.exists() {
        anyhow::bail!(
            "{} does not exist; refused, the policy in force is unchanged (to remove every allowance, write an empty file)",
            config_path.display()
        );
    }
    let lock = match client::route(config_path, &Request::Reload)? {
        Route::Daemon(reply) => return super::print_reply(reply),
        Route::Direct(lock, _) => lock,
    };
    let rt = super::runtime()?;
    let mut policy =
        config::load(config_path).context("refused; the policy in force is unchanged")?;
    match sync::Dataplanes::installed(config_path)? {
        Some(mut dataplanes) => {
            let (bindings, source, _) = rt.block_on(sync::bindings());
            let applied = crate::runtime::daemon()?.applied.values().copied().max();
            let next = policy.revision.max(applied.unwrap_or(0) + 1);
            if next != policy.revision {
                // The file says which revision it holds, the admin's text kept.
                policy.revision = next;
                let text = std::fs::read_to_string(config_path)
                    .with_context(|| format!("reading {}", config_path.display()))?;
                let file_revision = config::file_revision(config_path)?;
                let journal = config::journal::path(config_path);
                if config::journal::continues(&journal, file_revision)? {
                    config::save(config_path, &policy, &lock)?;
                } else {
                    config::write_text(config_path, &config::with_revision(&text, next), &lock)?;
                    // A journal that continues no file is left from another
                    // one; the next daemon starts its own.
                    config::journal::truncate(&journal)?;
                }
            }
            crate::runtime::note_saved_file(config_path)?;
            sync::apply(&mut dataplanes, &policy, &bindings, source)?;
            crate::runtime::record_applied(&dataplanes.names(), policy.revision)?;
            drop(lock);
            println!(
                "reloaded {}: {} allowance(s) in force (revision {})",
                config_path.display(),
                policy.allowances.len(),
                policy.revision
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
