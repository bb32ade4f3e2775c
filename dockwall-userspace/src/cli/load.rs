//! `dockwall load`: attach the filter, fill its maps, then follow Docker in
//! the foreground. Stopping it leaves the filter in force (fail-closed).

use std::{path::Path, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::Args;
use futures_util::StreamExt as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config,
    ebpf::{self, AttachMode, Maps},
    runtime::{self, ManagedIface, State},
    sync::{self, BindingsSource},
};

/// Resync even without Docker events: catches Docker coming up, missed
/// events, and hand edits of the saved allowances.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Docker emits bursts (create, connect, start); one resync per burst.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(20);
/// ARPHRD_ETHER: the classifier parses Ethernet frames.
const ARPHRD_ETHER: &str = "1";

#[derive(Debug, Args)]
#[command(
    after_help = "Stays in the foreground following Docker events until SIGINT/SIGTERM; \
the filter stays in force after it exits. Run it from systemd or a terminal multiplexer."
)]
pub struct LoadArgs {
    /// External interface to filter (ingress); repeatable
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,
    /// How to attach the classifiers
    #[arg(long, value_enum, default_value = "auto")]
    pub attach: AttachMode,
}

pub fn run(config_path: &Path, args: LoadArgs) -> anyhow::Result<ExitCode> {
    let mode = args.attach.resolve();
    for iface in &args.ifaces {
        check_iface(iface)?;
    }
    super::require_root("load")?;
    ebpf::check_bpffs()?;
    config::check_readable(config_path)?;
    let policy = config::load(config_path)?;
    let _daemon = runtime::daemon_lock()?;

    let rt = super::runtime()?;
    rt.block_on(async move {
        let (bindings, source, _) = sync::bindings().await;
        if source != BindingsSource::Docker {
            eprintln!(
                "dockwall: Docker is not reachable at {}; no published ports yet, following it until it comes",
                crate::docker::docker_host()
            );
        }
        let mut ebpf_obj = ebpf::load_pinned()?;
        let mut maps = Maps::from_ebpf(&mut ebpf_obj)?;
        {
            let _lock = config::lock(config_path)?;
            sync::apply(&mut maps, &policy, &bindings, source)?;
        }
        let previous = runtime::state().unwrap_or_default();
        for iface in &args.ifaces {
            ebpf::attach(&mut ebpf_obj, iface, mode)?;
        }
        for old in previous.interfaces.iter().filter(|o| !args.ifaces.contains(&o.name)) {
            ebpf::detach(&old.name)?;
        }
        runtime::save_state(&State {
            interfaces: args
                .ifaces
                .iter()
                .map(|name| ManagedIface {
                    name: name.clone(),
                    mode,
                })
                .collect(),
        })?;
        println!(
            "dockwall: filter in force on {} ({:?}): {} published port(s), {} allowance(s)",
            args.ifaces.join(", "),
            mode,
            bindings.len(),
            policy.allowances.len()
        );
        follow(config_path, &mut maps).await
    })
}

/// Refuses interfaces that do not exist or are not Ethernet, before anything changes.
fn check_iface(iface: &str) -> anyhow::Result<()> {
    let valid_name = !iface.is_empty()
        && iface.len() < 16
        && !iface.contains('/')
        && iface != "."
        && iface != "..";
    if !valid_name {
        bail!("invalid interface name '{iface}'");
    }
    let dir = Path::new("/sys/class/net").join(iface);
    let kind = std::fs::read_to_string(dir.join("type"))
        .map_err(|_| anyhow::anyhow!("no interface '{iface}' on this host (see `ip link`)"))?;
    if kind.trim() != ARPHRD_ETHER {
        bail!(
            "interface '{iface}' is not an Ethernet interface (link type {}); dockwall filters Ethernet interfaces",
            kind.trim()
        );
    }
    Ok(())
}

/// Follows Docker and the saved allowances until SIGINT/SIGTERM.
async fn follow(config_path: &Path, maps: &mut Maps) -> anyhow::Result<ExitCode> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(RESYNC_INTERVAL);
    let mut events = None;
    loop {
        if events.is_none()
            && let Ok(docker) = crate::docker::connect().await
        {
            events = Some(Box::pin(crate::docker::events(&docker)));
            resync(config_path, maps).await;
        }
        let event = async {
            match events.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => resync(config_path, maps).await,
            item = event => match item {
                Some(Ok(_)) => {
                    tokio::time::sleep(EVENT_DEBOUNCE).await;
                    resync(config_path, maps).await;
                }
                // Docker went away: keep the maps as they are, reconnect.
                Some(Err(_)) | None => events = None,
            },
        }
    }
    println!("dockwall: exiting; the filter stays in force (`dockwall unload` removes it)");
    Ok(ExitCode::SUCCESS)
}

async fn resync(config_path: &Path, maps: &mut Maps) {
    if let Err(e) = try_resync(config_path, maps).await {
        eprintln!("dockwall: resync failed, keeping the rules in force: {e:#}");
    }
}

async fn try_resync(config_path: &Path, maps: &mut Maps) -> anyhow::Result<()> {
    let (bindings, source, _) = sync::bindings().await;
    let _lock = config::lock(config_path)?;
    let policy = config::load(config_path)?;
    let (published, allow) = sync::apply(maps, &policy, &bindings, source)?;
    if published.added + published.removed + allow.added + allow.removed > 0 {
        println!(
            "dockwall: synced: published ports +{} -{}, allowance entries +{} -{}",
            published.added, published.removed, allow.added, allow.removed
        );
    }
    Ok(())
}
