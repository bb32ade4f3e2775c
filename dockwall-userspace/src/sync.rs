//! The one path from policy to kernel: saved allowances + Docker's published
//! ports -> compiled entries -> map diff. `load`, its event loop, `allow` and
//! `revoke` all go through [`apply`].

use std::collections::BTreeSet;

use crate::{
    config::Policy,
    docker,
    ebpf::{Changes, Maps},
    policy::{self, Binding},
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

/// Brings both maps in line with the policy. The published map is only
/// rewritten from a live Docker view: a stale snapshot never removes ports.
pub fn apply(
    maps: &mut Maps,
    policy: &Policy,
    bindings: &[Binding],
    source: BindingsSource,
) -> anyhow::Result<(Changes, Changes)> {
    let published = if source == BindingsSource::Docker {
        let changes = maps.sync_published(&policy::compile_published(bindings))?;
        runtime::save_published(bindings)?;
        changes
    } else {
        Changes::default()
    };
    let entries: BTreeSet<_> = policy::compile_allowances(&policy.allowances, bindings)
        .into_keys()
        .collect();
    let allow = maps.sync_allow(&entries)?;
    Ok((published, allow))
}
