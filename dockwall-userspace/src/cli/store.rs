//! The commands with `--store`: `allow`/`revoke`/`set` write to etcd (the
//! daemons watching it apply the change), `list` reads it, and
//! `store import FILE` / `store export` move a host's saved file into the
//! store and back. Edits are refused, never queued, while no member answers.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::{
    config::{self, Policy},
    control::{
        edit::{Action, Edit},
        sets::{self, SetEdit},
    },
    policy::{SetName, Source},
    store::{
        self, AllowValue, Author, Entry, Scope, SetValue, StoreSpec,
        etcd::{self, Op},
    },
};

/// How long an edit waits for this host's daemon to apply it.
const LOCAL_APPLY_WAIT: Duration = Duration::from_secs(3);
/// An expiring allowance's key outlives its expiry by this much: the
/// kernel decides the moment it lapses; etcd tidies up after.
const LEASE_GRACE_SECS: u64 = 60;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
sudo dockwall --store etcd://10.0.0.5:2379/dw store import /etc/dockwall/dockwall.toml\n  \
sudo dockwall --store etcd://10.0.0.5:2379/dw store import web1.toml --host web1\n  \
dockwall --store etcd://10.0.0.5:2379/dw store export > fleet.toml")]
pub struct StoreCmdArgs {
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Write every allowance and set of a saved file into the store (for every host, or --host)
    Import {
        file: PathBuf,
        /// Only host NAME applies them (NAME left out: this host)
        #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
        host: Option<String>,
    },
    /// Print the store's allowances (every host's, or --host NAME's) and sets as a saved file
    Export {
        /// Only host NAME's own allowances (NAME left out: this host)
        #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
        host: Option<String>,
    },
}

fn scope_of(host: Option<&str>) -> anyhow::Result<Scope> {
    Ok(match host {
        None => Scope::All,
        Some("") => Scope::Host(store::this_host()),
        Some(name) => {
            store::check_host(name)?;
            Scope::Host(name.to_string())
        }
    })
}

pub fn run(
    _config: &Path,
    args: StoreCmdArgs,
    spec: Option<&StoreSpec>,
) -> anyhow::Result<ExitCode> {
    let Some(spec) = spec else {
        bail!("`dockwall store` needs --store etcd://HOST:PORT/PREFIX (or DOCKWALL_STORE)");
    };
    let rt = super::runtime()?;
    match args.command {
        StoreCommand::Import { file, host } => {
            let scope = scope_of(host.as_deref())?;
            let policy = config::load_file(&file).with_context(|| {
                format!(
                    "{} refused; nothing was written to the store",
                    file.display()
                )
            })?;
            let mut ops = Vec::new();
            for (name, members) in &policy.sets {
                let value = SetValue {
                    members: members.iter().map(|n| Source::Net(*n)).collect(),
                    author: Author::me(),
                };
                ops.push(Op::Put(
                    store::set_key(spec, *name),
                    serde_json::to_vec(&value)?,
                    None,
                ));
            }
            let now = crate::clock::now_unix();
            for a in &policy.allowances {
                let expires = policy.expires.get(a).copied();
                if expires.is_some_and(|at| at <= now) {
                    continue;
                }
                let value = AllowValue::new(a, policy.comments.get(a).cloned(), expires);
                let ttl = expires.map(|at| at - now + LEASE_GRACE_SECS);
                ops.push(Op::Put(
                    store::allow_key(spec, &scope, a),
                    serde_json::to_vec(&value)?,
                    ttl,
                ));
            }
            let (sets_n, allow_n) = (policy.sets.len(), ops.len() - policy.sets.len());
            let revision = rt.block_on(async {
                let mut client = etcd::connect(spec).await?;
                etcd::write(&mut client, spec, ops).await
            })
            .context("nothing more was written (what was written before the failure stays; run the import again)")?;
            println!(
                "imported {allow_n} allowance(s) ({scope}) and {sets_n} set(s) from {} into {} at revision {revision}",
                file.display(),
                spec.url
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Export { host } => {
            let scope = scope_of(host.as_deref())?;
            let (kvs, revision) = rt.block_on(async {
                let mut client = etcd::connect(spec).await?;
                etcd::read_all(&mut client, spec).await
            })?;
            let mut policy = Policy {
                revision: revision.max(0) as u64,
                ..Policy::default()
            };
            for (key, value) in &kvs {
                match store::parse_entry(spec, key, value) {
                    Ok(Some(Entry::Set(name, v))) => {
                        policy.sets.insert(name, v.nets());
                    }
                    Ok(Some(Entry::Allow(s, v))) if s == scope => {
                        let (a, comment, expires) =
                            v.allowance().map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
                        if let Some(c) = comment {
                            policy.comments.insert(a.clone(), c);
                        }
                        if let Some(at) = expires {
                            policy.expires.insert(a.clone(), at);
                        }
                        policy.add(a);
                    }
                    Ok(_) => {}
                    Err(e) => bail!("{key}: {e}"),
                }
            }
            print!("{}", config::render(&policy)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Whether this host's daemon follows `spec`, and so can say "in force".
fn local_daemon_follows(spec: &StoreSpec) -> bool {
    crate::runtime::daemon().is_ok_and(|d| {
        d.live_phase() == crate::runtime::Phase::Running
            && d.store.as_ref().is_some_and(|s| s.url == spec.url)
    })
}

/// Waits (a little) for this host's daemon to apply store revision `at`.
fn wait_local(spec: &StoreSpec, at: i64) -> Option<Duration> {
    if !local_daemon_follows(spec) {
        return None;
    }
    let started = Instant::now();
    while started.elapsed() < LOCAL_APPLY_WAIT {
        let d = crate::runtime::daemon().ok()?;
        let applied = d.applied.values().copied().min().unwrap_or(0);
        if d.store
            .as_ref()
            .is_some_and(|s| s.revision >= at.max(0) as u64)
            && applied >= at.max(0) as u64
        {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn finish(spec: &StoreSpec, revision: i64, lines: &[String]) -> anyhow::Result<ExitCode> {
    for line in lines {
        println!("{line}");
    }
    match wait_local(spec, revision) {
        Some(_) => println!(
            "saved to {} at revision {revision}; in force here now",
            spec.url
        ),
        None => println!(
            "saved to {} at revision {revision}; every host following it applies it as it sees the change",
            spec.url
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// `allow` / `revoke` with a store.
pub fn edit(spec: &StoreSpec, edit: &Edit, scope: &Scope) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let now = crate::clock::now_unix();
    let lines: Vec<String> = edit
        .allowances
        .iter()
        .map(|a| {
            format!(
                "{} {a} ({scope})",
                match edit.action {
                    Action::Allow => "allowed",
                    Action::Revoke => "revoked",
                }
            )
        })
        .collect();
    let revision = rt
        .block_on(async {
            let mut client = etcd::connect(spec).await?;
            let ops = edit
                .allowances
                .iter()
                .map(|a| {
                    let key = store::allow_key(spec, scope, a);
                    Ok(match edit.action {
                        Action::Revoke => Op::Delete(key),
                        Action::Allow => {
                            let expires = edit.lifetime_secs.map(|d| now + d);
                            let value = AllowValue::new(a, edit.comment.clone(), expires);
                            Op::Put(
                                key,
                                serde_json::to_vec(&value)?,
                                edit.lifetime_secs.map(|d| d + LEASE_GRACE_SECS),
                            )
                        }
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            // The sets it names must exist when it is written, checked in
            // the same transaction.
            let mut ops = ops;
            if edit.action == Action::Allow {
                ops.extend(
                    edit.allowances
                        .iter()
                        .filter_map(|a| a.source.set())
                        .map(|name| Op::Require(store::set_key(spec, name))),
                );
            }
            etcd::write(&mut client, spec, ops).await
        })
        .context("nothing was changed (edits are not queued while the store is unreachable)")?;
    finish(spec, revision, &lines)
}

/// `set add|remove|load` with a store: the set's key rewritten whole, only
/// if nobody changed it meanwhile.
pub fn set_edit(spec: &StoreSpec, edit: &SetEdit) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let (lines, revision) = rt
        .block_on(async {
            let mut client = etcd::connect(spec).await?;
            let (kvs, _) = etcd::read_all(&mut client, spec).await?;
            // The whole store as one policy (every host's allowances), so
            // a set in use anywhere cannot be removed.
            let mut policy = Policy::default();
            for (key, value) in &kvs {
                match store::parse_entry(spec, key, value) {
                    Ok(Some(Entry::Set(name, v))) => {
                        policy.sets.insert(name, v.nets());
                    }
                    Ok(Some(Entry::Allow(_, v))) => {
                        if let Ok((a, _, _)) = v.allowance() {
                            policy.add(a);
                        }
                    }
                    _ => {}
                }
            }
            let outcome = sets::apply(&mut policy, edit)?;
            let key = store::set_key(spec, edit.name);
            let op = match policy.sets.get(&edit.name) {
                Some(members) => Op::Put(
                    key,
                    serde_json::to_vec(&SetValue {
                        members: members.iter().map(|n| Source::Net(*n)).collect(),
                        author: Author::me(),
                    })?,
                    None,
                ),
                None => Op::Delete(key),
            };
            let revision = if outcome.change.is_some() {
                etcd::write(&mut client, spec, vec![op]).await?
            } else {
                0
            };
            Ok::<_, anyhow::Error>((outcome.lines, revision))
        })
        .context("nothing was changed (edits are not queued while the store is unreachable)")?;
    finish(spec, revision, &lines)
}

pub fn set_list(spec: &StoreSpec, name: Option<SetName>, json: bool) -> anyhow::Result<ExitCode> {
    let (kvs, _) = super::runtime()?.block_on(async {
        let mut client = etcd::connect(spec).await?;
        etcd::read_all(&mut client, spec).await
    })?;
    let mut rows = Vec::new();
    for (key, value) in &kvs {
        if let Ok(Some(Entry::Set(n, v))) = store::parse_entry(spec, key, value)
            && name.is_none_or(|want| want == n)
        {
            rows.push((n, v));
        }
    }
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, v)| serde_json::json!({"name": n.to_string(), "members": v.members.len(), "author": v.author}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (n, v) in rows {
        println!(
            "@{n:<31} {:>8} member(s)  by uid {} on {}",
            v.members.len(),
            v.author.uid,
            v.author.host
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Row {
    scope: String,
    source: String,
    target: String,
    comment: Option<String>,
    author: Author,
    expires_at: Option<String>,
}

/// `list` with a store: every allowance in it, for every host.
pub fn list(spec: &StoreSpec, json: bool) -> anyhow::Result<ExitCode> {
    let (kvs, revision) = super::runtime()?
        .block_on(async {
            let mut client = etcd::connect(spec).await?;
            etcd::read_all(&mut client, spec).await
        })
        .context("`list` reads the store itself; the policy a host enforces meanwhile is in `dockwall status` and `explain`")?;
    let mut rows = Vec::new();
    for (key, value) in &kvs {
        match store::parse_entry(spec, key, value) {
            Ok(Some(Entry::Allow(scope, v))) => match v.allowance() {
                Ok((a, comment, _)) => rows.push(Row {
                    scope: scope.to_string(),
                    source: a.source.to_string(),
                    target: a.target.to_string(),
                    comment,
                    author: v.author.clone(),
                    expires_at: v.expires.clone(),
                }),
                Err(e) => eprintln!("dockwall: {key}: {e} (no host applies it)"),
            },
            Ok(_) => {}
            Err(e) => eprintln!("dockwall: {key}: {e} (no host applies it)"),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} at revision {revision}: {} allowance(s)",
        spec.url,
        rows.len()
    );
    println!(
        "{:<16} {:<22} {:<28} {:<20} {:<22} COMMENT",
        "SCOPE", "SOURCE", "TARGET", "EXPIRES", "AUTHOR"
    );
    for r in rows {
        println!(
            "{:<16} {:<22} {:<28} {:<20} {:<22} {}",
            r.scope,
            r.source,
            r.target,
            r.expires_at.as_deref().unwrap_or("never"),
            format!("uid {} on {}", r.author.uid, r.author.host),
            r.comment.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
