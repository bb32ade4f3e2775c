//! The one path from policy to kernel: saved allowances + Docker's published
//! ports -> compiled scope and entries -> every installed dataplane.
//! `load`, its event loop, `allow` and `revoke` all go through [`apply`].

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    clock,
    config::Policy,
    dataplane::ebpf::{Changes, Maps},
    dataplane::fallback::Fallback,
    docker,
    policy::{self, AllowEntry, Binding},
    runtime,
};

/// Where the published ports used for a sync came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingsSource {
    Docker,
    /// Docker could not be asked; the last snapshot dockwall saw.
    Snapshot,
}

/// Docker's published ports: live when Docker answers, else the snapshot.
pub async fn bindings() -> (Vec<Binding>, BindingsSource, Option<docker::Snapshot>) {
    match live().await {
        Ok(snap) => (snap.bindings.clone(), BindingsSource::Docker, Some(snap)),
        Err(_) => (
            runtime::published().unwrap_or_default(),
            BindingsSource::Snapshot,
            None,
        ),
    }
}

pub async fn live() -> anyhow::Result<docker::Snapshot> {
    let docker = docker::connect().await?;
    docker::snapshot(&docker).await
}

/// The dataplanes that enforce the policy; either may be off.
pub struct Dataplanes {
    pub maps: Option<Maps>,
    pub fallback: Option<Fallback>,
    /// The managed interfaces (the nftables table names them).
    pub ifaces: Vec<String>,
    /// What the fallback was last set to, so an unchanged policy is not
    /// rewritten on every resync (100k set members every 2 s otherwise).
    pub fallback_applied: Option<(BTreeSet<AllowEntry>, policy::Scope, bool)>,
    /// The allowance entries (with unix expiries) the kernel maps were last
    /// given, when known: the next apply writes only the difference instead
    /// of reading the whole map back. `None` forces that full read and diff,
    /// which also repairs entries changed behind dockwall's back; the
    /// daemon does it at start and every `DEEP_CHECK_EVERY` resyncs.
    pub allow_applied: Option<BTreeMap<AllowEntry, Option<u64>>>,
    /// The policy last recorded as in force (same reason).
    pub policy_applied: Option<Policy>,
    /// `load --audit`: the fallback counts would-be drops instead of dropping.
    pub audit: bool,
}

impl Dataplanes {
    /// The names `status` shows for the installed dataplanes.
    pub fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.maps.is_some() {
            names.push("ebpf".to_string());
        }
        if let Some(f) = self.fallback {
            names.push(f.name());
        }
        names
    }

    /// What a running or past `load` installed; `None` when not loaded.
    /// `config`: the saved file, whose journal completes the applied copy.
    pub fn installed(config: &std::path::Path) -> anyhow::Result<Option<Self>> {
        let state = runtime::state()?;
        if state.interfaces.is_empty() {
            return Ok(None);
        }
        let maps = if state.ebpf {
            Some(Maps::open_pinned()?)
        } else {
            None
        };
        // What the fallback holds now, as the last apply left it, so that a
        // change of members alone is applied in place. Should it have
        // drifted, the daemon's next resync rewrites it whole.
        let applied = runtime::applied_policy(config)?;
        let bindings = runtime::published().unwrap_or_default();
        let live = applied.map(|p| p.in_force(clock::now_unix()));
        let fallback_applied = match (state.fallback, &live) {
            (Some(_), Some(live)) => Some((
                entries(live, &bindings),
                policy::compile_scope(&bindings),
                state.audit,
            )),
            _ => None,
        };
        let allow_applied = match (&maps, &live) {
            (Some(_), Some(live)) => Some(entries_with_expiry(live, &bindings)),
            _ => None,
        };
        Ok(Some(Dataplanes {
            maps,
            fallback: state.fallback,
            ifaces: state.interfaces.iter().map(|i| i.name.clone()).collect(),
            fallback_applied,
            allow_applied,
            policy_applied: None,
            audit: state.audit,
        }))
    }
}

/// What a sync changed in the eBPF maps.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub published: Changes,
    pub allow: Changes,
}

/// The allowance entries the policy compiles to for these bindings (the
/// policy as it is in force: expired allowances already left out).
pub fn entries(policy: &Policy, bindings: &[Binding]) -> BTreeSet<AllowEntry> {
    policy::compile_allowances(&policy.allowances, &policy.sets, bindings)
        .into_keys()
        .collect()
}

/// The entries with the unix time each stops matching (`None`: never).
pub fn entries_with_expiry(
    policy: &Policy,
    bindings: &[Binding],
) -> BTreeMap<AllowEntry, Option<u64>> {
    let compiled = policy::compile_allowances(&policy.allowances, &policy.sets, bindings);
    // Past the file's allowances come the labels', which never lapse.
    policy::entry_expiries(&compiled, |i| {
        policy
            .allowances
            .get(i)
            .and_then(|a| policy.expires.get(a).copied())
    })
}

/// Applies one edit's entry changes (from [`policy::Compiled::update`]) to
/// every installed dataplane: O(change) for the eBPF map, the ipset
/// members and the nftables set elements. The fallback is rewritten whole
/// only when its rules change (a port's first or last source, a /0). `compiled` is the policy after the
/// edit; an entry whose expiry has passed is left out of the fallback.
pub fn apply_changes(
    dataplanes: &mut Dataplanes,
    changes: &policy::EntryChanges,
    compiled: &policy::Compiled,
    bindings: &[Binding],
) -> anyhow::Result<Applied> {
    let mut applied = Applied::default();
    if changes.is_empty() {
        return Ok(applied);
    }
    let now = clock::now_unix();
    if let Some(maps) = dataplanes.maps.as_mut() {
        let kernel = changes
            .iter()
            .map(|(e, c)| (*e, c.map(|at| at.map_or(0, clock::boot_ns_at))))
            .collect();
        // A group's whole content after the edit decides where the kernel
        // keeps it (by length, or the trie).
        let desired = crate::dataplane::ebpf_allow::DesiredMap {
            map: compiled.effective(),
            expires_ns: |at: &Option<u64>| at.map_or(0, clock::boot_ns_at),
        };
        applied.allow = maps.apply_allow_changes(&kernel, &desired)?;
        if let Some(mirror) = dataplanes.allow_applied.as_mut() {
            for (e, c) in changes {
                match c {
                    Some(at) => mirror.insert(*e, *at),
                    None => mirror.remove(e),
                };
            }
        }
    }
    if let Some(fallback) = dataplanes.fallback {
        let live = |at: &Option<u64>| at.is_none_or(|t| t > now);
        let present: Vec<(AllowEntry, bool)> = changes
            .iter()
            .map(|(e, c)| (*e, c.as_ref().is_some_and(live)))
            .collect();
        let in_place = match (&mut dataplanes.fallback_applied, fallback) {
            (Some(old), Fallback::Iptables(_)) if old.2 == dataplanes.audit => {
                crate::dataplane::iptables::update_in_place(&mut old.0, &present)?
            }
            // A failed transaction changed nothing in the kernel: the
            // table is replaced whole below.
            (Some(old), Fallback::Nftables) if old.2 == dataplanes.audit => {
                crate::dataplane::nftables::update_in_place(&mut old.0, &present).unwrap_or_else(
                    |e| {
                        eprintln!(
                            "dockwall: nftables element update failed, replacing the table: {e:#}"
                        );
                        false
                    },
                )
            }
            _ => false,
        };
        if !in_place {
            let entries: BTreeSet<AllowEntry> = compiled
                .effective()
                .iter()
                .filter(|(_, at)| live(at))
                .map(|(e, _)| *e)
                .collect();
            let scope = policy::compile_scope(bindings);
            fallback.apply(&entries, &scope, &dataplanes.ifaces, dataplanes.audit)?;
            dataplanes.fallback_applied = Some((entries, scope, dataplanes.audit));
        }
    }
    Ok(applied)
}

/// Brings every installed dataplane in line with the policy. The eBPF
/// published map is only rewritten from a live Docker view: a stale snapshot
/// never removes ports. The fallback's rules are rewritten whole, atomically.
/// Allowances that have expired are left out everywhere; the kernel also
/// gets each remaining expiry, so it lapses on time without us.
pub fn apply(
    dataplanes: &mut Dataplanes,
    policy: &Policy,
    bindings: &[Binding],
    source: BindingsSource,
) -> anyhow::Result<Applied> {
    let live = policy.in_force(clock::now_unix());
    let with_expiry = entries_with_expiry(&live, bindings);
    let entries: BTreeSet<AllowEntry> = with_expiry.keys().copied().collect();
    let mut applied = Applied::default();
    if let Some(maps) = dataplanes.maps.as_mut() {
        if source == BindingsSource::Docker {
            applied.published = maps.sync_published(&policy::compile_published(bindings))?;
        }
        let to_kernel = |m: &BTreeMap<AllowEntry, Option<u64>>| -> BTreeMap<AllowEntry, u64> {
            m.iter()
                .map(|(e, at)| (*e, at.map_or(0, clock::boot_ns_at)))
                .collect()
        };
        applied.allow = match &dataplanes.allow_applied {
            Some(old) => maps.sync_allow_delta(&to_kernel(old), &to_kernel(&with_expiry))?,
            None => maps.sync_allow(&to_kernel(&with_expiry))?,
        };
        dataplanes.allow_applied = Some(with_expiry.clone());
    }
    if let Some(fallback) = dataplanes.fallback {
        let wanted = (entries, policy::compile_scope(bindings), dataplanes.audit);
        // Only set members changed: add and delete them in place.
        let in_place = match (&dataplanes.fallback_applied, fallback) {
            (Some(old), Fallback::Iptables(_))
                if old.0 != wanted.0 && old.1 == wanted.1 && old.2 == wanted.2 =>
            {
                crate::dataplane::iptables::update_members(&old.0, &wanted.0)?
            }
            _ => false,
        };
        if in_place {
            dataplanes.fallback_applied = Some(wanted);
        } else if dataplanes.fallback_applied.as_ref() != Some(&wanted) || !fallback.present() {
            // Rewrite when the policy changed, or when our rules went missing.
            fallback.apply(&wanted.0, &wanted.1, &dataplanes.ifaces, wanted.2)?;
            dataplanes.fallback_applied = Some(wanted);
        }
    }
    if source == BindingsSource::Docker {
        runtime::save_published(bindings)?;
    }
    if dataplanes.policy_applied.as_ref() != Some(policy) {
        runtime::save_applied(policy)?;
        dataplanes.policy_applied = Some(policy.clone());
    }
    Ok(applied)
}
