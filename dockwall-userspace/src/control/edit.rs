//! `allow` and `revoke` on a policy: validated whole first, then applied,
//! with the lines the command prints, the journal changes to save, what the
//! incremental compile must take out and put in, and how to undo it. The
//! daemon and the no-daemon path of the CLI both call [`apply`], so their
//! answers cannot differ.

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::{
    clock,
    config::{Policy, Record, journal::Change},
    docker,
    policy::{self, Allowance, Binding, Target},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Revoke,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Revoke => "revoke",
        }
    }
}

/// One `dockwall allow` or `dockwall revoke`, as sent to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Edit {
    pub action: Action,
    /// One source times each --port and --container.
    pub allowances: Vec<Allowance>,
    pub comment: Option<String>,
    /// `allow --for`, in seconds.
    pub lifetime_secs: Option<u64>,
    /// Sent again after the daemon died before answering: the first try
    /// may have been saved, so a revoke finding nothing is done, not wrong.
    #[serde(default)]
    pub retried: bool,
    /// The Docker Engine the command means when it names containers
    /// (its `DOCKER_HOST`): a daemon following another engine refuses
    /// rather than resolve the name to a different container.
    #[serde(default)]
    pub docker_host: Option<String>,
}

impl Edit {
    /// Whether validating it needs Docker's word on container (or
    /// service) names.
    pub fn names_containers(&self) -> bool {
        self.action == Action::Allow
            && self
                .allowances
                .iter()
                .any(|a| matches!(a.target, Target::Container(_) | Target::Service(_)))
    }
}

/// What [`apply`] did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// What the command prints (before its last line, "in force now").
    pub lines: Vec<String>,
    /// The changes to save, in order; empty when nothing changed.
    pub changes: Vec<Change>,
    /// For [`policy::Compiled::update`]: (allowance, expiry) taken out ...
    pub removed: Vec<(Allowance, Option<u64>)>,
    /// ... and put in.
    pub added: Vec<(Allowance, Option<u64>)>,
    /// Each touched allowance's record before the edit (None: absent).
    undo: Vec<(Allowance, Option<Record>)>,
}

impl Outcome {
    /// Puts the policy back as it was before the edit (saving it failed).
    pub fn undo(&self, policy: &mut Policy) {
        for (allowance, before) in self.undo.iter().rev() {
            match before {
                Some(record) => {
                    // A record read from the policy always converts back.
                    let _ = policy.upsert(record.clone());
                }
                None => {
                    policy.remove(allowance);
                }
            }
        }
    }
}

/// The checks that need no policy (the arguments alone).
pub fn check_arguments(edit: &Edit) -> anyhow::Result<()> {
    if edit.allowances.is_empty() {
        bail!(
            "`dockwall {}` needs at least one --port PORT[/proto] or --container NAME",
            edit.action.verb()
        );
    }
    if edit.action == Action::Revoke && edit.lifetime_secs.is_some() {
        bail!(
            "--for only goes with `dockwall allow`; `dockwall revoke` removes an allowance at once"
        );
    }
    Ok(())
}

/// Validates the whole edit, then applies it to `policy` (not its
/// revision). `known`: Docker's view, with the names and ids of its
/// containers and services, needed when [`Edit::names_containers`].
/// Nothing changes when it fails.
pub fn apply(
    policy: &mut Policy,
    edit: &Edit,
    bindings: &[Binding],
    known: Option<&docker::Snapshot>,
    now: u64,
) -> anyhow::Result<Outcome> {
    check_arguments(edit)?;
    if edit.names_containers() {
        let Some(known) = known else {
            bail!("--container and --service need Docker to know the name");
        };
        for a in &edit.allowances {
            match &a.target {
                Target::Container(spec) if !policy::container_known(spec, &known.containers) => {
                    bail!(
                        "unknown container '{}': Docker ({}) has no container by that name (see `docker ps -a`)",
                        spec.name,
                        docker::docker_host()
                    );
                }
                Target::Service(spec) if !policy::container_known(spec, &known.services) => {
                    bail!(
                        "unknown service '{}': Docker ({}) has no swarm service by that name (see `docker service ls`; only a swarm manager lists services)",
                        spec.name,
                        docker::docker_host()
                    );
                }
                _ => {}
            }
        }
    }
    if edit.action == Action::Allow
        && let Some(name) = edit
            .allowances
            .iter()
            .filter_map(|a| a.source.set())
            .find(|name| !policy.sets.contains_key(name))
    {
        bail!(
            "no set named @{name}: create it first with `dockwall set add {name} SRC...` or `dockwall set load {name} FILE` (see `dockwall set list`)"
        );
    }
    if edit.action == Action::Revoke
        && !edit.retried
        && let Some(missing) = edit
            .allowances
            .iter()
            .find(|a| !policy.allowances.contains(a))
    {
        bail!("no saved allowance '{missing}' to revoke (see `dockwall list`)");
    }

    let mut out = Outcome::default();
    let mut notes = Vec::new();
    for allowance in &edit.allowances {
        let before = policy.record(allowance);
        let old_expiry = policy.expires.get(allowance).copied();
        if out.undo.iter().all(|(a, _)| a != allowance) {
            out.undo.push((allowance.clone(), before.clone()));
        }
        match edit.action {
            Action::Revoke => {
                match before {
                    Some(record) => {
                        policy.remove(allowance);
                        out.removed.push((allowance.clone(), old_expiry));
                        out.changes.push(Change::Revoke(record));
                        notes.push("");
                    }
                    // Only a retry gets here: its first try removed it.
                    None => notes.push(" (already removed)"),
                }
            }
            Action::Allow => {
                let comment = edit
                    .comment
                    .clone()
                    .or_else(|| policy.comments.get(allowance).cloned());
                let expires = edit.lifetime_secs.map(|d| now + d);
                let record = Record::from_allowance(allowance, comment.as_ref(), expires);
                if before.as_ref() != Some(&record) {
                    // A record built from a valid allowance always converts.
                    policy
                        .upsert(record.clone())
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    out.changes.push(Change::Allow(record));
                }
                match &before {
                    None => out.added.push((allowance.clone(), expires)),
                    Some(_) if old_expiry != expires => {
                        out.removed.push((allowance.clone(), old_expiry));
                        out.added.push((allowance.clone(), expires));
                    }
                    Some(_) => {}
                }
                notes.push(match &before {
                    None => "",
                    Some(_) if old_expiry != expires => " (already saved; new expiry)",
                    Some(_) => " (already saved)",
                });
            }
        }
    }

    let past = match edit.action {
        Action::Allow => "allowed",
        Action::Revoke => "revoked",
    };
    for (allowance, note) in edit.allowances.iter().zip(notes) {
        let until = match policy.expires.get(allowance) {
            Some(&at) if edit.action == Action::Allow => format!(
                " until {} ({})",
                clock::rfc3339(at),
                clock::remaining(at, now)
            ),
            _ => String::new(),
        };
        let ports = if matches!(allowance.target, Target::Container(_) | Target::Service(_)) {
            let resolved: Vec<String> = policy::resolve_target(&allowance.target, bindings)
                .iter()
                .map(|p| p.to_string())
                .collect();
            if resolved.is_empty() {
                " [publishes nothing now]".to_string()
            } else {
                format!(" [published {}]", resolved.join(", "))
            }
        } else {
            String::new()
        };
        out.lines
            .push(format!("{past} {allowance}{ports}{until}{note}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(source: &str, port: &str) -> Allowance {
        Allowance {
            source: source.parse().unwrap(),
            target: Target::Port(port.parse().unwrap()),
        }
    }

    #[test]
    fn allow_revoke_and_undo() {
        let mut p = Policy::default();
        let a = port("192.0.2.1", "80");
        let edit = |action, lifetime_secs| Edit {
            action,
            allowances: vec![a.clone()],
            comment: None,
            lifetime_secs,
            retried: false,
            docker_host: None,
        };
        let out = apply(&mut p, &edit(Action::Allow, None), &[], None, 1000).unwrap();
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.added, vec![(a.clone(), None)]);
        assert_eq!(out.lines, vec!["allowed 192.0.2.1 -> port 80/tcp"]);
        // Again: nothing to save.
        let again = apply(&mut p, &edit(Action::Allow, None), &[], None, 1000).unwrap();
        assert!(again.changes.is_empty() && again.added.is_empty());
        assert!(again.lines[0].ends_with("(already saved)"));
        // A new expiry: out with none, in with one.
        let timed = apply(&mut p, &edit(Action::Allow, Some(60)), &[], None, 1000).unwrap();
        assert_eq!(timed.removed, vec![(a.clone(), None)]);
        assert_eq!(timed.added, vec![(a.clone(), Some(1060))]);
        timed.undo(&mut p);
        assert_eq!(p.expires.get(&a), None);
        // Revoke, and revoke of something not saved changes nothing.
        let gone = apply(&mut p, &edit(Action::Revoke, None), &[], None, 1000).unwrap();
        assert!(p.allowances.is_empty());
        assert_eq!(gone.removed, vec![(a.clone(), None)]);
        let err = apply(&mut p, &edit(Action::Revoke, None), &[], None, 1000).unwrap_err();
        assert!(err.to_string().contains("no saved allowance"), "{err}");
        gone.undo(&mut p);
        assert_eq!(p.allowances, vec![a.clone()]);
        // An unknown container is refused before anything changes.
        let c = Edit {
            action: Action::Allow,
            allowances: vec![
                port("192.0.2.9", "81"),
                Allowance {
                    source: "192.0.2.9".parse().unwrap(),
                    target: Target::Container("nope".parse().unwrap()),
                },
            ],
            comment: None,
            lifetime_secs: None,
            retried: false,
            docker_host: None,
        };
        let before = p.clone();
        assert!(apply(&mut p, &c, &[], Some(&docker::Snapshot::default()), 1000).is_err());
        assert_eq!(p, before);
    }
}
