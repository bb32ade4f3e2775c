//! `dockwall allow` and `dockwall revoke`.

use std::{path::Path, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    config,
    dataplane::sync,
    docker,
    policy::{self, Allowance, ContainerSpec, PortProto, Source, Target},
};

#[derive(Debug, Args)]
#[command(
    after_help = "PORT is the published port (8081 in `-p 8081:8080`); tcp unless /udp is given.\n\
CONTAINER is NAME or NAME:CONTAINER_PORT[/proto] (8080 in `-p 8081:8080`).\n\
With --for the allowance lapses on time: the kernel stops matching it even if the daemon is not \
running, and the daemon removes it from the saved file and the fallback rules. Allowing it \
again without --for makes it permanent."
)]
pub struct AllowArgs {
    /// Source address, CIDR (203.0.113.0/24, 2001:db8::/48) or `any`
    #[arg(value_parser = clap::value_parser!(SourceArg))]
    pub source: SourceArg,
    /// Published port, PORT[/tcp|/udp]; repeatable
    #[arg(long = "port", value_name = "PORT[/PROTO]")]
    pub ports: Vec<PortArg>,
    /// Every port a container publishes, or the one publishing CONTAINER_PORT; repeatable
    #[arg(long = "container", value_name = "NAME[:CPORT[/PROTO]]")]
    pub containers: Vec<ContainerArg>,
    /// A note saved with the allowance (who, why), shown by `list`
    #[arg(long)]
    pub comment: Option<String>,
    /// Lapse after DURATION (90s, 30m, 2h, 7d), checked by the kernel even with no daemon running
    #[arg(long = "for", value_name = "DURATION", value_parser = crate::clock::parse_duration)]
    pub lifetime: Option<std::time::Duration>,
}

macro_rules! arg_newtype {
    ($name:ident, $inner:ty) => {
        #[derive(Debug, Clone)]
        pub struct $name(pub $inner);
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                s.parse().map($name)
            }
        }
    };
}
arg_newtype!(SourceArg, Source);
arg_newtype!(PortArg, PortProto);
arg_newtype!(ContainerArg, ContainerSpec);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Revoke,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Revoke => "revoke",
        }
    }
}

pub fn run(config_path: &Path, args: AllowArgs, action: Action) -> anyhow::Result<ExitCode> {
    let verb = action.verb();
    let source = args.source.0;
    let mut wanted: Vec<Allowance> = args
        .ports
        .iter()
        .map(|p| Allowance {
            source,
            target: Target::Port(p.0),
        })
        .collect();
    wanted.extend(args.containers.iter().map(|c| Allowance {
        source,
        target: Target::Container(c.0.clone()),
    }));
    if wanted.is_empty() {
        bail!(
            "`dockwall {verb} {source}` needs at least one --port PORT[/proto] or --container NAME"
        );
    }
    if action == Action::Revoke && args.lifetime.is_some() {
        bail!(
            "--for only goes with `dockwall allow`; `dockwall revoke` removes an allowance at once"
        );
    }
    super::require_root(verb)?;
    config::check_readable(config_path)?;
    let rt = super::runtime()?;

    let lock = config::lock(config_path)?;
    let mut policy = config::load(config_path)?;
    // While loaded, the daemon keeps Docker's published ports in the
    // runtime snapshot (at most 2 s old): a --port allowance needs no
    // Docker round trip. --container needs Docker's word on the name.
    let loaded = !crate::runtime::state()?.interfaces.is_empty();
    let (bindings, source_kind, snapshot) = if loaded && args.containers.is_empty() {
        (
            crate::runtime::published()?,
            sync::BindingsSource::Snapshot,
            None,
        )
    } else {
        rt.block_on(sync::bindings())
    };

    // Validate everything before changing anything.
    if action == Action::Allow && !args.containers.is_empty() {
        let snap = match snapshot {
            Some(snap) => snap,
            None => rt
                .block_on(sync::live())
                .context("--container needs Docker to know the container")?,
        };
        for c in &args.containers {
            if !policy::container_known(&c.0, &snap.containers) {
                bail!(
                    "unknown container '{}': Docker ({}) has no container by that name (see `docker ps -a`)",
                    c.0.name,
                    docker::docker_host()
                );
            }
        }
    }
    if action == Action::Revoke
        && let Some(missing) = wanted.iter().find(|a| !policy.allowances.contains(a))
    {
        bail!("no saved allowance '{missing}' to revoke (see `dockwall list`)");
    }

    let now = crate::clock::now_unix();
    let mut changed = Vec::new();
    let mut renewed = Vec::new();
    for allowance in &wanted {
        let did = match action {
            Action::Allow => policy.add(allowance.clone()),
            Action::Revoke => policy.remove(allowance),
        };
        if did {
            changed.push(allowance);
        }
        if action == Action::Allow
            && let Some(comment) = &args.comment
        {
            policy.comments.insert(allowance.clone(), comment.clone());
        }
        if action == Action::Allow {
            let before = policy.expires.get(allowance).copied();
            let after = args.lifetime.map(|d| now + d.as_secs());
            match after {
                Some(at) => policy.expires.insert(allowance.clone(), at),
                None => policy.expires.remove(allowance),
            };
            if before != after && !changed.contains(&allowance) {
                renewed.push(allowance);
            }
        }
    }
    config::save(config_path, &policy, &lock)?;

    let in_force = match sync::Dataplanes::installed()? {
        Some(mut dataplanes) => {
            sync::apply(&mut dataplanes, &policy, &bindings, source_kind)
                .context("saved, but applying to the loaded filter failed")?;
            true
        }
        None => false,
    };
    drop(lock);

    let past = match action {
        Action::Allow => "allowed",
        Action::Revoke => "revoked",
    };
    for allowance in &wanted {
        let note = if changed.contains(&allowance) {
            ""
        } else if renewed.contains(&allowance) {
            " (already saved; new expiry)"
        } else {
            " (already saved)"
        };
        let until = match policy.expires.get(allowance) {
            Some(&at) if action == Action::Allow => format!(
                " until {} ({})",
                crate::clock::rfc3339(at),
                crate::clock::remaining(at, now)
            ),
            _ => String::new(),
        };
        let resolved: Vec<String> = policy::resolve_target(&allowance.target, &bindings)
            .iter()
            .map(|p| p.to_string())
            .collect();
        let ports = if matches!(allowance.target, Target::Container(_)) {
            if resolved.is_empty() {
                " [publishes nothing now]".to_string()
            } else {
                format!(" [published {}]", resolved.join(", "))
            }
        } else {
            String::new()
        };
        println!("{past} {allowance}{ports}{until}{note}");
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
