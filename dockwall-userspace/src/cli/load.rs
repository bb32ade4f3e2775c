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
    fallback, iptables,
    runtime::{self, ManagedIface, State},
    sync::{self, BindingsSource, Dataplanes},
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
the filter stays in force after it exits. Run it from systemd or a terminal multiplexer.\n\n\
Both dataplanes are installed by default: the eBPF filter, and the equivalent rules as a \
fallback: iptables (chain DOCKWALL-FWD from DOCKER-USER, DOCKWALL-IN from INPUT) where Docker \
has DOCKER-USER, else nftables (table inet dockwall); --fallback chooses."
)]
pub struct LoadArgs {
    /// External interface to filter (ingress); repeatable
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,
    /// How to attach the eBPF classifiers
    #[arg(long, value_enum, default_value = "auto")]
    pub attach: AttachMode,
    /// Do not install the eBPF filter (iptables fallback only)
    #[arg(long)]
    pub no_ebpf: bool,
    /// Which fallback dataplane to install beside the eBPF filter
    #[arg(long, value_enum, default_value = "auto")]
    pub fallback: fallback::Choice,
    /// Do not install a fallback (eBPF only)
    #[arg(long, alias = "no-fallback")]
    pub no_iptables: bool,
    /// Print what would be applied (map contents, iptables-restore input) and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(config_path: &Path, args: LoadArgs) -> anyhow::Result<ExitCode> {
    if args.no_ebpf && args.no_iptables {
        bail!("--no-ebpf and --no-iptables together would enforce nothing; drop one of them");
    }
    let mode = args.attach.resolve();
    for iface in &args.ifaces {
        check_iface(iface)?;
    }
    config::check_readable(config_path)?;
    let policy = config::load(config_path)?;
    if !config_path.exists() {
        eprintln!(
            "dockwall: no saved allowances at {} (no such file): every new connection to a published port will be dropped until you `dockwall allow`",
            config_path.display()
        );
    }
    if args.dry_run {
        return dry_run(&args, &policy);
    }
    super::require_root("load")?;
    if !args.no_ebpf {
        ebpf::check_bpffs()?;
    }
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
                let previous = runtime::state().unwrap_or_default();
        let fallback = (!args.no_iptables).then(|| args.fallback.resolve());
        let mut ebpf_obj = None;
        let mut dataplanes = Dataplanes {
            maps: None,
            fallback,
            ifaces: args.ifaces.clone(),
                        fallback_applied: None,
            policy_applied: None,
        };
        if !args.no_ebpf {
            let mut obj = ebpf::load_pinned()?;
            dataplanes.maps = Some(Maps::from_ebpf(&mut obj)?);
            ebpf_obj = Some(obj);
        }
        // Fill every dataplane before it is hooked in: the first packet it
        // sees already meets the whole policy.
                let started = std::time::Instant::now();
        {
            let _lock = config::lock(config_path)?;
            sync::apply(&mut dataplanes, &policy, &bindings, source)?;
        }
        let apply_time = started.elapsed();
        if let Some(obj) = ebpf_obj.as_mut() {
            for iface in &args.ifaces {
                ebpf::attach(obj, iface, mode)?;
            }
        }
                if let Some(fallback) = fallback {
            fallback.hook(&args.ifaces)?;
        }
        // Take away what an earlier load installed and this one does not.
        for old in previous.interfaces.iter().filter(|o| args.no_ebpf || !args.ifaces.contains(&o.name)) {
            ebpf::detach(&old.name)?;
        }
        if args.no_ebpf && previous.ebpf {
            ebpf::remove_pins()?;
        }
                if let Some(old) = previous.fallback.filter(|old| Some(*old) != fallback) {
            old.remove()?;
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
                        ebpf: !args.no_ebpf,
            fallback,
            repairs: Vec::new(),
        })?;
        let mut planes = Vec::new();
        if !args.no_ebpf {
            planes.push(format!("ebpf {mode:?}").to_lowercase());
        }
                if let Some(f) = fallback {
            planes.push(f.name());
        }
                println!(
            "dockwall: filter in force on {} ({}): {} published port(s), {} allowance(s), applied in {} ms",
            args.ifaces.join(", "),
            planes.join(" + "),
            bindings.len(),
            policy.allowances.len(),
            apply_time.as_millis()
        );
        let mut kernel = match ebpf_obj.as_mut() {
            Some(obj) => Some(Kernel {
                obj,
                pins: ebpf::PinKeeper::open()?,
                mode,
            }),
            None => None,
        };
        follow(config_path, &mut dataplanes, &args.ifaces, kernel.as_mut()).await
    })
}

/// `--dry-run`: everything `load` would install, from the same compile step.
fn dry_run(args: &LoadArgs, policy: &config::Policy) -> anyhow::Result<ExitCode> {
    let (bindings, source, _) = super::runtime()?.block_on(sync::bindings());
    println!("# dockwall load --dry-run: nothing is changed");
    println!(
        "# published ports from {source:?}, {} allowance(s)",
        policy.allowances.len()
    );
    let entries = sync::entries(policy, &bindings);
    if !args.no_ebpf {
        println!(
            "\n# eBPF map {}: (address, proto, port) -> policy port",
            dockwall_common::MAP_PUBLISHED
        );
        for (key, value) in crate::policy::compile_published(&bindings) {
            let addr = crate::policy::addr_from_bytes(key.family, &key.addr)
                .map_or("?".to_string(), |a| a.to_string());
            let proto = crate::policy::Proto::from_number(key.proto)
                .map_or("?".to_string(), |p| p.to_string());
            println!("{addr} {proto} {} -> {}", key.port, value.policy_port);
        }
        println!(
            "\n# eBPF map {}: (published port/proto, source)",
            dockwall_common::MAP_ALLOW
        );
        for e in &entries {
            println!("{}/{} {}", e.port, e.proto, e.net);
        }
    }
    let scope = crate::policy::compile_scope(&bindings);
    if !args.no_iptables && args.fallback.resolve() == fallback::Fallback::Nftables {
        println!("\n# nft -f -");
        print!(
            "{}",
            crate::nftables::compile(&entries, &scope, &args.ifaces)
        );
    } else if !args.no_iptables {
        let backend = iptables::Backend::detect();
        for family in iptables::Family::ALL {
            println!("\n# {} --noflush", backend.tool(family, "-restore"));
            print!("{}", iptables::compile(family, &entries, &scope));
        }
        for iface in &args.ifaces {
            println!(
                "# then: -I {} 1 -i {iface} -j {} and -I {} 1 -i {iface} -j {}",
                iptables::DOCKER_USER,
                iptables::CHAIN_FWD,
                iptables::INPUT,
                iptables::CHAIN_IN
            );
        }
    }
    Ok(ExitCode::SUCCESS)
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
async fn follow(
    config_path: &Path,
    dataplanes: &mut Dataplanes,
    ifaces: &[String],
    mut kernel: Option<&mut Kernel<'_>>,
) -> anyhow::Result<ExitCode> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut tick = tokio::time::interval(RESYNC_INTERVAL);
    let mut events = None;
    loop {
        if events.is_none()
            && let Ok(docker) = crate::docker::connect().await
        {
            events = Some(Box::pin(crate::docker::events(&docker)));
            resync(config_path, dataplanes, ifaces, kernel.as_deref_mut()).await;
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
            _ = sighup.recv() => reload(config_path, dataplanes).await,
            _ = tick.tick() => resync(config_path, dataplanes, ifaces, kernel.as_deref_mut()).await,
            item = event => match item {
                Some(Ok(_)) => {
                    tokio::time::sleep(EVENT_DEBOUNCE).await;
                    resync(config_path, dataplanes, ifaces, kernel.as_deref_mut()).await;
                }
                // Docker went away: keep the rules as they are, reconnect.
                Some(Err(_)) | None => events = None,
            },
        }
    }
    println!("dockwall: exiting; the filter stays in force (`dockwall unload` removes it)");
    Ok(ExitCode::SUCCESS)
}

async fn resync(
    config_path: &Path,
    dataplanes: &mut Dataplanes,
    ifaces: &[String],
    kernel: Option<&mut Kernel<'_>>,
) {
    if let Err(e) = try_resync(config_path, dataplanes, ifaces, kernel).await {
        eprintln!("dockwall: resync failed, keeping the rules in force: {e:#}");
    }
}

/// SIGHUP: apply the saved file as it is now; a file that fails is refused
/// whole and the policy in force stays.
async fn reload(config_path: &Path, dataplanes: &mut Dataplanes) {
    let result = async {
        let (bindings, source, _) = sync::bindings().await;
        let _lock = config::lock(config_path)?;
        let policy = config::load(config_path)?;
        sync::apply(dataplanes, &policy, &bindings, source)?;
        anyhow::Ok(policy.allowances.len())
    }
    .await;
    match result {
        Ok(n) => println!(
            "dockwall: reloaded {}: {n} allowance(s) in force",
            config_path.display()
        ),
        Err(e) => eprintln!("dockwall: reload refused, the policy in force is unchanged: {e:#}"),
    }
}

async fn try_resync(
    config_path: &Path,
    dataplanes: &mut Dataplanes,
    ifaces: &[String],
    kernel: Option<&mut Kernel<'_>>,
) -> anyhow::Result<()> {
    let (bindings, source, _) = sync::bindings().await;
    let _lock = config::lock(config_path)?;
    // The policy in force, not the file: a hand edit waits for `reload`.
    let policy = match runtime::applied_policy()? {
        Some(policy) => policy,
        None => config::load(config_path)?,
    };
    let fallback_missing = dataplanes.fallback.is_some_and(|f| !f.present());
    let applied = sync::apply(dataplanes, &policy, &bindings, source)?;
    let mut repaired = Vec::new();
    if let Some(f) = dataplanes.fallback.filter(|_| fallback_missing) {
        repaired.push(format!("{} rules were missing: restored", f.name()));
    }
    if let Some(kernel) = kernel {
        for name in kernel.pins.repin()? {
            repaired.push(format!("pin of map {name} was removed: pinned again"));
        }
        for iface in ifaces {
            // An interface that is gone cannot be repaired until it returns.
            let exists = Path::new("/sys/class/net").join(iface).exists();
            if exists && !ebpf::attached(iface, kernel.mode) {
                ebpf::attach(kernel.obj, iface, kernel.mode)?;
                repaired.push(format!(
                    "eBPF filter was not attached to {iface}: attached again"
                ));
            }
        }
    }
    let (p, a) = (applied.published, applied.allow);
    if p.added + p.removed + a.added + a.removed > 0 {
        println!(
            "dockwall: synced: published ports +{} -{}, allowance entries +{} -{}",
            p.added, p.removed, a.added, a.removed
        );
    }
    // Docker re-creates DOCKER-USER when it restarts, and appears after us
    // when it starts later: put our jumps (back) in place.
    if let Some(fallback) = dataplanes.fallback {
        for jump in fallback.hook(ifaces)? {
            repaired.push(format!("iptables jump was missing: {jump}"));
        }
    }
    for what in &repaired {
        println!("dockwall: repaired drift: {what}");
    }
    runtime::record_repairs(&repaired)
}

/// What the daemon needs to repair the eBPF side.
struct Kernel<'a> {
    obj: &'a mut aya::Ebpf,
    pins: ebpf::PinKeeper,
    mode: AttachMode,
}
