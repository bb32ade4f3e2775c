//! `dockwall set add|remove|load` on a policy: named source sets
//! (`@office`), validated whole first, then applied, with the lines the
//! command prints, the journal change to save and how to undo it. Like
//! [`super::edit`], the daemon and the no-daemon path both call [`apply`].
//!
//! A set's change changes every allowance and label naming it, in one
//! apply of the whole policy.

use std::{collections::BTreeSet, path::Path};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    config::{Policy, SetRecord, journal::Change},
    policy::{self, SetName, Source},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetAction {
    /// Add members (creates the set).
    Add,
    /// Remove members; with none given, the set itself.
    Remove,
    /// Make the members exactly these (`set load`; creates the set).
    Replace,
}

/// One `dockwall set add|remove|load`, as sent to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetEdit {
    pub action: SetAction,
    pub name: SetName,
    /// Addresses and networks only (checked when parsed).
    pub members: Vec<Source>,
    /// `set load`: the file the members came from, for the answer.
    #[serde(default)]
    pub from: Option<String>,
    /// Sent again after the daemon died before answering (see `Edit`).
    #[serde(default)]
    pub retried: bool,
}

/// What [`apply`] did.
#[derive(Debug)]
pub struct SetOutcome {
    pub lines: Vec<String>,
    /// The change to save; None when nothing changed.
    pub change: Option<Change>,
    name: SetName,
    before: Option<BTreeSet<IpNet>>,
}

impl SetOutcome {
    /// Puts the set back as it was (saving failed).
    pub fn undo(&self, policy: &mut Policy) {
        policy.put_set(self.name, self.before.clone());
    }
}

/// Validates the whole edit, then applies it to `policy` (not its
/// revision). Nothing changes when it fails.
pub fn apply(policy: &mut Policy, edit: &SetEdit) -> anyhow::Result<SetOutcome> {
    let name = edit.name;
    let given: BTreeSet<IpNet> = edit
        .members
        .iter()
        .map(|m| match m {
            Source::Net(n) => Ok(*n),
            other => Err(anyhow::anyhow!(
                "invalid set member '{other}': a set holds addresses and CIDRs"
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    let before = policy.sets.get(&name).cloned();
    let after: Option<BTreeSet<IpNet>> = match edit.action {
        SetAction::Add => {
            if given.is_empty() {
                bail!("`dockwall set add {name}` needs at least one address or CIDR");
            }
            let mut m = before.clone().unwrap_or_default();
            m.extend(given.iter().copied());
            Some(m)
        }
        SetAction::Replace => {
            if given.is_empty() {
                bail!(
                    "{} holds no address or CIDR; refused, @{name} is unchanged (to remove the set, `dockwall set remove {name}`)",
                    edit.from.as_deref().unwrap_or("the list")
                );
            }
            Some(given.clone())
        }
        SetAction::Remove => match &before {
            None if edit.retried => None,
            None => bail!("no set named @{name} (see `dockwall set list`)"),
            Some(_) if given.is_empty() => {
                let users: Vec<String> = policy.users_of(name).map(|a| a.to_string()).collect();
                if let Some(first) = users.first() {
                    bail!(
                        "@{name} is used by {} saved allowance(s) (first: {first}); revoke them first, nothing was changed",
                        users.len()
                    );
                }
                None
            }
            Some(m) => {
                if let Some(missing) = given
                    .iter()
                    .find(|n| !m.contains(n))
                    .filter(|_| !edit.retried)
                {
                    bail!(
                        "{} is not in @{name}; nothing was changed (see `dockwall set list {name}`)",
                        Source::Net(*missing)
                    );
                }
                Some(m.difference(&given).copied().collect())
            }
        },
    };
    let count = |m: &Option<BTreeSet<IpNet>>| m.as_ref().map_or(0, |m| m.len());
    let (added, removed) = match (&before, &after) {
        (Some(b), Some(a)) => (a.difference(b).count(), b.difference(a).count()),
        (None, Some(a)) => (a.len(), 0),
        (Some(b), None) => (0, b.len()),
        (None, None) => (0, 0),
    };
    let line = match &after {
        None if before.is_none() => format!("set @{name} removed (already)"),
        None => format!("set @{name} removed ({removed} member(s))"),
        Some(_) if before == after => {
            format!("set @{name}: {} member(s), unchanged", count(&after))
        }
        Some(_) => {
            let from = edit
                .from
                .as_ref()
                .map(|f| format!(" from {f}"))
                .unwrap_or_default();
            let users = policy.users_of(name).count();
            format!(
                "set @{name}: {} member(s){from} (+{added} -{removed}); {users} saved allowance(s) use it",
                count(&after)
            )
        }
    };
    let change = (before != after).then(|| match &after {
        Some(m) => Change::Set(SetRecord::new(name, m)),
        None => Change::Unset(name),
    });
    policy.put_set(name, after);
    Ok(SetOutcome {
        lines: vec![line],
        change,
        name,
        before,
    })
}

/// Reads a list of sources, the usual format of providers' published
/// ranges: one address or CIDR per line, `#` starts a comment, blank lines
/// are skipped. Errors name `FILE:LINE`.
pub fn read_list(path: &Path) -> anyhow::Result<Vec<Source>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_list(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
}

/// See [`read_list`]; errors are `LINE: reason`.
pub fn parse_list(text: &str) -> Result<Vec<Source>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let net = policy::parse_member(entry).map_err(|e| format!("{}: {e}", i + 1))?;
        out.push(Source::Net(net));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(action: SetAction, members: &[&str]) -> SetEdit {
        SetEdit {
            action,
            name: "office".parse().unwrap(),
            members: members.iter().map(|m| m.parse().unwrap()).collect(),
            from: None,
            retried: false,
        }
    }

    #[test]
    fn add_remove_replace_and_undo() {
        let mut p = Policy::default();
        let name: SetName = "office".parse().unwrap();
        let out = apply(
            &mut p,
            &edit(SetAction::Add, &["203.0.113.0/24", "198.51.100.7"]),
        )
        .unwrap();
        assert!(matches!(out.change, Some(Change::Set(_))));
        assert_eq!(p.sets[&name].len(), 2);
        out.undo(&mut p);
        assert!(p.sets.is_empty());
        apply(
            &mut p,
            &edit(SetAction::Add, &["203.0.113.0/24", "198.51.100.7"]),
        )
        .unwrap();
        // Removing a member that is not there changes nothing.
        let before = p.clone();
        let err = apply(&mut p, &edit(SetAction::Remove, &["192.0.2.1"])).unwrap_err();
        assert!(
            err.to_string().contains("192.0.2.1 is not in @office"),
            "{err}"
        );
        assert_eq!(p, before);
        let replaced = apply(&mut p, &edit(SetAction::Replace, &["192.0.2.0/28"])).unwrap();
        assert!(
            replaced.lines[0].contains("(+1 -2)"),
            "{:?}",
            replaced.lines
        );
        // A set in use cannot go; unused, it can.
        p.add(crate::policy::Allowance {
            source: Source::Set(name),
            target: crate::policy::Target::Port("80".parse().unwrap()),
        });
        let err = apply(&mut p, &edit(SetAction::Remove, &[])).unwrap_err();
        assert!(
            err.to_string().contains("used by 1 saved allowance"),
            "{err}"
        );
        p.allowances.clear();
        let gone = apply(&mut p, &edit(SetAction::Remove, &[])).unwrap();
        assert_eq!(gone.change, Some(Change::Unset(name)));
        assert!(p.sets.is_empty());
        // An empty list is refused, not a silent wipe.
        assert!(apply(&mut p, &edit(SetAction::Replace, &[])).is_err());
    }

    #[test]
    fn list_format() {
        let list = parse_list(
            "# provider ranges\n203.0.113.0/24\n\n  198.51.100.7  # one host\n2001:db8::/32\n",
        )
        .unwrap();
        assert_eq!(list.len(), 3);
        let err = parse_list("203.0.113.0/24\n203.0.113.1/24\n").unwrap_err();
        assert!(err.starts_with("2: "), "{err}");
        assert!(parse_list("any\n").is_err());
    }
}
