//! `dockwall allow` and `dockwall revoke`.

use std::{path::Path, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    config,
    control::{
        Request,
        client::{self, Route},
        edit::{self, Edit},
    },
    dataplane::sync,
    policy::{Allowance, ContainerSpec, PortProto, Source, Target},
};

#[derive(Debug, Args)]
#[command(
    after_help = "PORT is the published port (8081 in `-p 8081:8080`); tcp unless /udp is given.\n\
CONTAINER is NAME or NAME:CONTAINER_PORT[/proto] (8080 in `-p 8081:8080`).\n\
SERVICE is a swarm service, NAME or NAME:TARGET_PORT[/proto] (8080 in `--publish 8081:8080`); \
its ports are filtered before the routing mesh, like a container's.\n\
With --for the allowance lapses on time: the kernel stops matching it even if the daemon is not \
running, and the daemon removes it from the saved file and the fallback rules. Allowing it \
again without --for makes it permanent."
)]
pub struct AllowArgs {
    /// Source address, CIDR (203.0.113.0/24, 2001:db8::/48), a named set (@office, see `dockwall set`) or `any`
    #[arg(value_parser = clap::value_parser!(SourceArg))]
    pub source: SourceArg,
    /// Published port, PORT[/tcp|/udp]; repeatable
    #[arg(long = "port", value_name = "PORT[/PROTO]")]
    pub ports: Vec<PortArg>,
    /// Every port a container publishes, or the one publishing CONTAINER_PORT; repeatable
    #[arg(long = "container", value_name = "NAME[:CPORT[/PROTO]]")]
    pub containers: Vec<ContainerArg>,
    /// Every port a swarm service publishes (routing mesh or host mode), or the one publishing TPORT; repeatable
    #[arg(long = "service", value_name = "NAME[:TPORT[/PROTO]]", value_parser = ContainerSpec::parse_service)]
    pub services: Vec<ContainerSpec>,
    /// A note saved with the allowance (who, why), shown by `list`
    #[arg(long)]
    pub comment: Option<String>,
    /// Lapse after DURATION (90s, 30m, 2h, 7d), checked by the kernel even with no daemon running
    #[arg(long = "for", value_name = "DURATION", value_parser = crate::clock::parse_duration)]
    pub lifetime: Option<std::time::Duration>,
    /// With --store: only host NAME applies it (NAME left out: this host); default every host
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    pub host: Option<String>,
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

pub use crate::control::edit::Action;

pub fn run(
    config_path: &Path,
    args: AllowArgs,
    action: Action,
    store: Option<&crate::store::StoreSpec>,
) -> anyhow::Result<ExitCode> {
    let source = args.source.0;
    let scope = match (args.host.as_deref(), store) {
        (Some(_), None) => {
            bail!("--host only goes with --store: without a store every allowance is this host's")
        }
        (None, _) => crate::store::Scope::All,
        (Some(""), _) => crate::store::Scope::Host(crate::store::this_host()),
        (Some(name), _) => {
            crate::store::check_host(name)?;
            crate::store::Scope::Host(name.to_string())
        }
    };
    let mut allowances: Vec<Allowance> = args
        .ports
        .iter()
        .map(|p| Allowance {
            source,
            target: Target::Port(p.0),
        })
        .collect();
    allowances.extend(args.containers.iter().map(|c| Allowance {
        source,
        target: Target::Container(c.0.clone()),
    }));
    allowances.extend(args.services.iter().map(|s| Allowance {
        source,
        target: Target::Service(s.clone()),
    }));
    let mut edit = Edit {
        action,
        allowances,
        comment: args.comment,
        lifetime_secs: args.lifetime.map(|d| d.as_secs()),
        retried: false,
        docker_host: None,
    };
    // What needs no policy is refused before anything else.
    if edit.allowances.is_empty() {
        bail!(
            "`dockwall {} {source}` needs at least one --port PORT[/proto], --container NAME or --service NAME",
            action.verb()
        );
    }
    edit::check_arguments(&edit)?;
    if let Some(spec) = store {
        return super::store::edit(spec, &edit, &scope);
    }
    super::require_root(action.verb())?;
    if edit.names_containers() {
        // Names mean containers of this command's engine: an unreachable
        // DOCKER_HOST is refused here, another engine by the daemon.
        let host = crate::docker::docker_host();
        crate::docker::check_socket(&host)?;
        edit.docker_host = Some(host);
    }
    config::check_readable(config_path)?;
    match client::route(config_path, &Request::Edit(edit.clone()))? {
        Route::Daemon(reply) => super::print_reply(reply),
        Route::Direct(lock, request) => {
            let edit = match request {
                Request::Edit(retried) => retried,
                Request::Reload | Request::Set(_) => edit,
            };
            direct(config_path, &edit, &lock)
        }
    }
}

/// No daemon runs: apply under the writer's lock, as the daemon would.
fn direct(config_path: &Path, edit: &Edit, lock: &config::Lock) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut policy = config::load(config_path)?;
    // While loaded, the last daemon kept Docker's published ports in the
    // runtime snapshot: a --port allowance needs no Docker round trip.
    // --container needs Docker's word on the name.
    let loaded = !crate::runtime::state()?.interfaces.is_empty();
    let (bindings, source_kind, snapshot) = if loaded && !edit.names_containers() {
        (
            crate::runtime::published()?,
            sync::BindingsSource::Snapshot,
            None,
        )
    } else {
        rt.block_on(sync::bindings())
    };
    let snapshot = match snapshot {
        Some(snap) => Some(snap),
        None if edit.names_containers() => Some(
            rt.block_on(sync::live())
                .context("--container and --service need Docker to know the name")?,
        ),
        None => None,
    };
    let now = crate::clock::now_unix();
    let outcome = edit::apply(&mut policy, edit, &bindings, snapshot.as_ref(), now)?;
    super::direct::commit(
        config_path,
        lock,
        policy,
        !outcome.changes.is_empty(),
        &outcome.lines,
        || Ok((bindings, source_kind)),
    )
}
