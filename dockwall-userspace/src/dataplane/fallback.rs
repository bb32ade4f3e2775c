//! The fallback dataplane beside the eBPF filter: iptables rules hooked
//! from Docker's DOCKER-USER, or a table of dockwall's own in nftables.
//! Both are compiled from the same scope and allowance entries.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{
    dataplane::iptables::{self, Backend},
    dataplane::nftables,
    policy::{AllowEntry, Scope},
};

/// What `--fallback` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// iptables where Docker has a DOCKER-USER chain, else nftables
    Auto,
    /// Rules in chains jumped to from DOCKER-USER and INPUT
    Iptables,
    /// A table of dockwall's own (`table inet dockwall`)
    Nftables,
}

/// The installed fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    Iptables(Backend),
    Nftables,
}

impl Choice {
    pub fn resolve(self) -> Fallback {
        match self {
            Choice::Iptables => Fallback::Iptables(Backend::detect()),
            Choice::Nftables => Fallback::Nftables,
            // Docker 29's nftables backend has no DOCKER-USER to hook.
            Choice::Auto => match Backend::with_docker_user() {
                Some(backend) => Fallback::Iptables(backend),
                None => Fallback::Nftables,
            },
        }
    }
}

impl Fallback {
    pub fn name(self) -> String {
        match self {
            Fallback::Iptables(b) => format!("iptables ({})", format!("{b:?}").to_lowercase()),
            Fallback::Nftables => "nftables".to_string(),
        }
    }

    /// Installs or atomically replaces the rules; in audit mode they count
    /// would-be drops and let them through.
    pub fn apply(
        self,
        entries: &BTreeSet<AllowEntry>,
        scope: &Scope,
        ifaces: &[String],
        audit: bool,
    ) -> anyhow::Result<()> {
        match self {
            Fallback::Iptables(b) => iptables::apply(b, entries, scope, audit),
            Fallback::Nftables => nftables::apply(entries, scope, ifaces, audit),
        }
    }

    /// Hooks the rules in for exactly `ifaces`; returns what was (re)added.
    /// nftables names the interfaces inside its table, so `apply` did it.
    pub fn hook(self, ifaces: &[String]) -> anyhow::Result<Vec<String>> {
        match self {
            Fallback::Iptables(b) => {
                let added = iptables::ensure_jumps(b, ifaces)?;
                iptables::remove_jumps(b, ifaces)?;
                Ok(added)
            }
            Fallback::Nftables => Ok(Vec::new()),
        }
    }

    /// Whether the rules are present (drift check before skipping a rewrite).
    pub fn present(self) -> bool {
        match self {
            Fallback::Iptables(b) => iptables::chains_present(b),
            Fallback::Nftables => nftables::installed(),
        }
    }

    /// Whether the fallback fully guards `ifaces` now.
    pub fn in_force(self, ifaces: &[String]) -> bool {
        match self {
            Fallback::Iptables(b) => iptables::in_force(&iptables::installed(b, ifaces), ifaces),
            Fallback::Nftables => nftables::installed(),
        }
    }

    pub fn remove(self) -> anyhow::Result<()> {
        match self {
            Fallback::Iptables(b) => iptables::remove(b),
            Fallback::Nftables => nftables::remove(),
        }
    }
}

/// Removes every fallback dockwall may have installed (unload, switching).
pub fn remove_all(known: Option<Fallback>) -> anyhow::Result<()> {
    let mut all = vec![Fallback::Iptables(Backend::detect()), Fallback::Nftables];
    all.extend(known);
    all.dedup();
    for f in all {
        f.remove()?;
    }
    Ok(())
}
