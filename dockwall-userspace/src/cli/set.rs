//! `dockwall set`: named source lists (`@office`, a CDN's published ranges)
//! that allowances and container labels name. A change of members changes
//! every allowance using the set, in one apply.

use std::{path::Path, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::{
    config,
    control::{
        Request,
        client::{self, Route},
        sets::{self, SetAction, SetEdit},
    },
    dataplane::sync,
    policy::{SetName, Source},
};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
sudo dockwall set add office 203.0.113.0/24 198.51.100.7\n  \
sudo dockwall allow @office --port 8081\n  \
sudo dockwall set load cdn /etc/dockwall/cdn-ranges.txt   one address or CIDR per line, # comments\n  \
sudo dockwall set remove office 198.51.100.7\n  \
sudo dockwall set remove office                           the set itself, once no allowance uses it\n  \
dockwall set list [NAME] [--json]")]
pub struct SetArgs {
    #[command(subcommand)]
    pub command: SetCommand,
}

#[derive(Debug, Subcommand)]
pub enum SetCommand {
    /// Add addresses or CIDRs to a set (created if new)
    Add {
        name: SetName,
        #[arg(required = true, value_name = "SOURCE", value_parser = parse_member)]
        members: Vec<Source>,
    },
    /// Remove members; with none given, the set (refused while an allowance uses it)
    Remove {
        name: SetName,
        #[arg(value_name = "SOURCE", value_parser = parse_member)]
        members: Vec<Source>,
    },
    /// Make a set exactly the list in FILE (one address or CIDR per line, `#` comments)
    Load { name: SetName, file: PathBuf },
    /// Show the sets, their sizes and who uses them; with NAME, its members
    List {
        name: Option<SetName>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

fn parse_member(s: &str) -> Result<Source, String> {
    crate::policy::parse_member(s).map(Source::Net)
}

pub fn run(
    config_path: &Path,
    args: SetArgs,
    store: Option<&crate::store::StoreSpec>,
) -> anyhow::Result<ExitCode> {
    let edit = match args.command {
        SetCommand::List { name, json } if store.is_none() => {
            return list(config_path, name, json);
        }
        SetCommand::List { name, json } => {
            return super::store::set_list(store.context("a store")?, name, json);
        }
        SetCommand::Add { name, members } => SetEdit {
            action: SetAction::Add,
            name,
            members,
            from: None,
            retried: false,
        },
        SetCommand::Remove { name, members } => SetEdit {
            action: SetAction::Remove,
            name,
            members,
            from: None,
            retried: false,
        },
        SetCommand::Load { name, file } => SetEdit {
            action: SetAction::Replace,
            name,
            // Read here: a bad line is refused before anything is asked.
            members: sets::read_list(&file)?,
            from: Some(file.display().to_string()),
            retried: false,
        },
    };
    if let Some(spec) = store {
        return super::store::set_edit(spec, &edit);
    }
    super::require_root("set")?;
    config::check_readable(config_path)?;
    match client::route(config_path, &Request::Set(edit.clone()))? {
        Route::Daemon(reply) => super::print_reply(reply),
        Route::Direct(lock, request) => {
            let edit = match request {
                Request::Set(retried) => retried,
                Request::Edit(_) | Request::Reload => edit,
            };
            direct(config_path, &edit, &lock)
        }
    }
}

/// No daemon runs: apply under the writer's lock, as the daemon would.
fn direct(config_path: &Path, edit: &SetEdit, lock: &config::Lock) -> anyhow::Result<ExitCode> {
    let mut policy = config::load(config_path)?;
    let outcome = sets::apply(&mut policy, edit)?;
    super::direct::commit(
        config_path,
        lock,
        policy,
        outcome.change.is_some(),
        &outcome.lines,
        || {
            let (bindings, source, _) = super::runtime()?.block_on(sync::bindings());
            Ok((bindings, source))
        },
    )
}

#[derive(Serialize)]
struct Row {
    name: String,
    members: usize,
    /// Saved allowances naming the set.
    allowances: usize,
    /// With `set list NAME`: the members.
    #[serde(skip_serializing_if = "Option::is_none")]
    list: Option<Vec<String>>,
}

fn list(config_path: &Path, name: Option<SetName>, json: bool) -> anyhow::Result<ExitCode> {
    config::check_readable(config_path)?;
    let policy = config::load(config_path)?;
    if let Some(name) = name
        && !policy.sets.contains_key(&name)
    {
        anyhow::bail!("no set named @{name} (see `dockwall set list`)");
    }
    let rows: Vec<Row> = policy
        .sets
        .iter()
        .filter(|(n, _)| name.is_none_or(|want| want == **n))
        .map(|(n, members)| Row {
            name: n.to_string(),
            members: members.len(),
            allowances: policy.users_of(*n).count(),
            list: name.map(|_| {
                members
                    .iter()
                    .map(|m| Source::Net(*m).to_string())
                    .collect()
            }),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!(
            "no sets saved in {} (create one with `dockwall set add NAME SOURCE...`)",
            config_path.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for row in &rows {
        match &row.list {
            Some(members) => {
                for m in members {
                    println!("{m}");
                }
            }
            None => println!(
                "@{:<31} {:>8} member(s)  used by {} allowance(s)",
                row.name, row.members, row.allowances
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
