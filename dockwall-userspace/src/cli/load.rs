//! `dockwall load`: attach the filter, fill its maps, then follow Docker in
//! the foreground. Stopping it leaves the filter in force (fail-closed).

use std::{
    path::Path,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::bail;
use clap::Args;

use dockwall_common::{CONFIG_AUDIT, Config, DEFAULT_LOG_RATE, MAP_EVENTS};

use crate::{
    clock, config, control,
    daemon::{Daemon, Kernel, StoreLink, release_heap},
    dataplane::ebpf::{self, AttachMode, Hook, Maps},
    dataplane::fallback,
    dataplane::iptables,
    dataplane::sync::{self, BindingsSource, Dataplanes},
    droplog::DropLog,
    metrics, notify,
    policy::Compiled,
    runtime::{self, ManagedIface, State},
    store::{self, StoreSpec},
};

/// Above this the log is a flood of its own.
const MAX_LOG_RATE: u32 = 10_000;
/// ARPHRD_ETHER: the classifier parses Ethernet frames.
const ARPHRD_ETHER: &str = "1";

#[derive(Debug, Args)]
#[command(
    after_help = "Stays in the foreground following Docker events until SIGINT/SIGTERM; \
the filter stays in force after it exits. Run it from systemd or a terminal multiplexer.\n\n\
Both dataplanes are installed by default: the eBPF filter, and the equivalent rules as a \
fallback: iptables (chain DOCKWALL-FWD from DOCKER-USER, DOCKWALL-IN from INPUT) where Docker \
has DOCKER-USER, else nftables (table inet dockwall); --fallback chooses.\n\n\
Each dropped new connection is printed as `drop SRC:PORT -> CONTAINER (published PORT/PROTO -> \
CPORT) on IF`, at most --log-rate lines a second (limited in the kernel), with a summary of \
what the limit held back. --audit drops nothing and prints `audit: would drop ...` instead. \
Under systemd (Type=notify) READY=1 is sent once the filter is in force.\n\n\
--hook xdp runs the same decision as native XDP in the driver, so a flood of denied SYNs is \
dropped before the kernel allocates an skb (Linux 5.18+ and a driver with native XDP; the \
egress program stays on tc). It is refused, changing nothing, where another XDP program is \
attached, and where the driver has no native XDP. XDP sees the frame as the wire carries it: \
VLAN tags are still in the packet (two are parsed, as with tc).\n\n\
Examples:\n  \
sudo dockwall load --iface eth0\n  \
sudo dockwall load --iface eth0 --audit --log-rate 100\n  \
sudo dockwall load --iface eth0 --hook xdp\n  \
sudo dockwall load --iface eth0 --iface eth1 --metrics 127.0.0.1:9464\n  \
sudo dockwall load --iface eth0 --dry-run"
)]
pub struct LoadArgs {
    /// External interface to filter (ingress); repeatable
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,
    /// How to attach the eBPF classifiers
    #[arg(long, value_enum, default_value = "auto")]
    pub attach: AttachMode,
    /// Where the ingress decision runs: tc (every driver) or native XDP (drops before an skb exists)
    #[arg(long, value_enum, default_value = "tc")]
    pub hook: Hook,
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
    /// Enforce nothing: count and log every would-be drop (try a policy on a live host first)
    #[arg(long)]
    pub audit: bool,
    /// Drop-log lines a second for the whole host, rate-limited in the kernel; 0: none
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LOG_RATE)]
    pub log_rate: u32,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by default)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Allow --metrics on an address other than loopback
    #[arg(long)]
    pub metrics_public: bool,
}

/// With a store: the policy to start from, and the store's keys when it
/// answered. A store that does not answer leaves the cache of what this
/// host last applied from it (fail-static), or nothing at all.
fn store_start(
    spec: &StoreSpec,
    config_path: &Path,
) -> anyhow::Result<(config::Policy, Option<(store::etcd::Kvs, i64)>)> {
    let host = store::this_host();
    let read = super::runtime()?.block_on(async {
        let mut client = store::etcd::connect(spec).await?;
        store::etcd::read_all(&mut client, spec).await
    });
    let cache = store::cache_path(config_path);
    match read {
        Ok((kvs, revision)) => {
            let (policy, warnings) =
                store::policy_for(spec, &host, kvs.iter(), revision.max(0) as u64);
            for w in warnings {
                eprintln!("dockwall: store: {w}");
            }
            println!(
                "dockwall: store {} (host {host}): revision {revision}, {} allowance(s) for this host",
                spec.url,
                policy.allowances.len()
            );
            Ok((policy, Some((kvs, revision))))
        }
        Err(e) if cache.exists() => {
            let policy = config::load_file(&cache)?;
            eprintln!(
                "dockwall: {e:#}; enforcing the last revision this host applied, {}, from {} until it answers",
                policy.revision,
                cache.display()
            );
            Ok((policy, None))
        }
        Err(e) => {
            eprintln!(
                "dockwall: {e:#}, and this host has no cache of it ({}): every new connection to a published port is dropped until the store answers",
                cache.display()
            );
            Ok((config::Policy::default(), None))
        }
    }
}

pub fn run(
    config_path: &Path,
    args: LoadArgs,
    store: Option<&StoreSpec>,
) -> anyhow::Result<ExitCode> {
    if args.no_ebpf && args.no_iptables {
        bail!("--no-ebpf and --no-iptables together would enforce nothing; drop one of them");
    }
    if args.metrics_public && args.metrics.is_none() {
        bail!("--metrics-public only goes with --metrics ADDR:PORT");
    }
    if let Some(addr) = args.metrics {
        metrics::check_addr(addr, args.metrics_public)?;
    }
    if args.log_rate > MAX_LOG_RATE {
        bail!(
            "--log-rate {} is over {MAX_LOG_RATE} lines a second; the counters and --metrics see every drop, the log is for reading",
            args.log_rate
        );
    }
    let mode = args.attach.resolve();
    for iface in &args.ifaces {
        check_iface(iface)?;
    }
    if args.hook == Hook::Xdp && args.no_ebpf {
        bail!("--hook xdp places the eBPF filter, and --no-ebpf leaves it out; drop one of them");
    }
    config::check_readable(config_path)?;
    if args.dry_run {
        let policy = match store {
            Some(spec) => store_start(spec, config_path)?.0,
            None => config::load(config_path)?,
        };
        return dry_run(&args, &policy);
    }
    // Refuse a file that does not parse before waiting for any lock.
    if store.is_none() {
        config::load(config_path)?;
    }
    super::require_root("load")?;
    if !args.no_ebpf {
        ebpf::check_bpffs()?;
        // Refusals an XDP attach would meet, before anything is changed.
        ebpf::check_kernel(args.hook)?;
        if args.hook == Hook::Xdp {
            for iface in &args.ifaces {
                ebpf::check_xdp_free(iface)?;
            }
        }
    }
    let _daemon = runtime::daemon_lock()?;
    let previous_daemon = runtime::daemon().unwrap_or_default();
    runtime::update_daemon(|d| {
        d.pid = Some(std::process::id());
        d.phase = runtime::Phase::Starting;
    })?;
    // The writer's lock, for the daemon's whole life, taken before the file
    // is read: an edit applied directly by a command finishes first, and no
    // edit can fall between this read and the apply below.
    let lock = config::lock(config_path)?;
    let (policy, journal, store_state) = match store {
        Some(spec) => {
            let (policy, state) = store_start(spec, config_path)?;
            // Edits come from the store, never from this journal; it sits
            // beside the cache so the file's own journal stays untouched.
            let journal = config::journal::Journal::create(
                &store::cache_path(config_path),
                policy.revision,
                &lock,
            )?;
            (policy, journal, Some(state))
        }
        None => {
            let (policy, journal) = file_start(config_path, &previous_daemon, &lock)?;
            (policy, journal, None)
        }
    };
    // Bound before anything is installed: a taken port changes nothing.
    let metrics_listener = args.metrics.map(metrics::bind).transpose()?;
    let store_link = store.map(|spec| StoreLink {
        spec: spec.clone(),
        cache: store::cache_path(config_path),
        rx: None,
        warned: Default::default(),
        reachable: store_state.as_ref().is_some_and(Option::is_some),
        cached: None,
    });

    let rt = super::runtime()?;
    rt.block_on(async move {
        let mut store_link = store_link;
        if let (Some(link), Some(state)) = (store_link.as_mut(), store_state) {
            let (tx, rx) = tokio::sync::watch::channel(store::etcd::View::default());
            tokio::spawn(store::etcd::follow(
                link.spec.clone(),
                store::this_host(),
                state,
                tx,
            ));
            link.rx = Some(rx);
        }
        run_loaded(
            config_path,
            args,
            mode,
            lock,
            policy,
            journal,
            metrics_listener,
            store_link,
        )
        .await
    })
}

/// The file's policy, with the journal folded in when it continues it.
fn file_start(
    config_path: &Path,
    previous_daemon: &runtime::Daemon,
    lock: &config::Lock,
) -> anyhow::Result<(config::Policy, config::journal::Journal)> {
    let mut policy = config::load(config_path)?;
    if !config_path.exists() {
        eprintln!(
            "dockwall: no saved allowances at {} (no such file): every new connection to a published port will be dropped until you `dockwall allow`",
            config_path.display()
        );
    }
    // Revisions only go forward, even past a hand edit that set a lower one.
    let floor = previous_daemon.applied.values().copied().max().unwrap_or(0);
    let journal_path = config::journal::path(config_path);
    if config::journal::continues(&journal_path, config::file_revision(config_path)?)?
        || policy.revision < floor
    {
        // Start from one file that holds everything the journal had.
        policy.revision = policy.revision.max(floor);
        config::save(config_path, &policy, lock)?;
    }
    let journal = config::journal::Journal::create(config_path, policy.revision, lock)?;
    Ok((policy, journal))
}

/// Installs everything, then runs the daemon until it is stopped.
#[allow(clippy::too_many_arguments)]
async fn run_loaded(
    config_path: &Path,
    args: LoadArgs,
    mode: AttachMode,
    lock: config::Lock,
    policy: config::Policy,
    journal: config::journal::Journal,
    metrics_listener: Option<std::net::TcpListener>,
    store: Option<StoreLink>,
) -> anyhow::Result<ExitCode> {
    {
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
            allow_applied: None,
            policy_applied: None,
            audit: args.audit,
        };
        let mut drop_log = None;
        if !args.no_ebpf {
            let mut obj = ebpf::load_pinned(args.hook)?;
            let mut maps = Maps::from_ebpf(&mut obj)?;
            maps.set_config(Config {
                flags: if args.audit { CONFIG_AUDIT } else { 0 },
                log_rate: args.log_rate,
            })?;
            dataplanes.maps = Some(maps);
            let events = obj
                .take_map(MAP_EVENTS)
                .ok_or_else(|| anyhow::anyhow!("map {MAP_EVENTS} missing from the eBPF object"))?;
            drop_log = Some(DropLog::new(events)?);
            ebpf_obj = Some(obj);
        }
        // Fill every dataplane before it is hooked in: the first packet it
        // sees already meets the whole policy.
        let started = std::time::Instant::now();
        sync::apply(&mut dataplanes, &policy, &bindings, source)?;
        let apply_time = started.elapsed();
        release_heap();
        if let Some(obj) = ebpf_obj.as_mut() {
            for (n, iface) in args.ifaces.iter().enumerate() {
                if let Err(e) = ebpf::attach(obj, iface, mode, args.hook) {
                    undo_attach(obj, &previous, &args.ifaces[..n], &fallback);
                    return Err(e);
                }
            }
        }
        // An older dockwall's hit counts, into the slots the sync above
        // gave its allowances; its program counted until the attach.
        if let Some(maps) = dataplanes.maps.as_mut() {
            maps.drain_legacy_hits()?;
        }
        if let Some(fallback) = fallback {
            fallback.hook(&args.ifaces)?;
        }
        // Take away what an earlier load installed and this one does not.
        for old in previous
            .interfaces
            .iter()
            .filter(|o| args.no_ebpf || !args.ifaces.contains(&o.name))
        {
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
                    hook: args.hook,
                })
                .collect(),
            ebpf: !args.no_ebpf,
            fallback,
            repairs: Vec::new(),
            audit: args.audit,
            metrics: args.metrics,
        })?;
        let mut planes = Vec::new();
        if !args.no_ebpf {
            planes.push(match args.hook {
                Hook::Tc => format!("ebpf {mode:?}").to_lowercase(),
                Hook::Xdp => format!("ebpf xdp, egress {mode:?}").to_lowercase(),
            });
        }
        if let Some(f) = fallback {
            planes.push(f.name());
        }
        let summary = format!(
            "filter {} on {} ({}): {} published port(s), {} allowance(s)",
            if args.audit {
                "in AUDIT MODE"
            } else {
                "in force"
            },
            args.ifaces.join(", "),
            planes.join(" + "),
            bindings.len(),
            policy.in_force(clock::now_unix()).allowances.len(),
        );
        println!(
            "dockwall: {summary}, applied in {} ms",
            apply_time.as_millis()
        );
        if args.audit {
            println!(
                "dockwall: AUDIT MODE: nothing is dropped; every would-be drop is counted and logged as `audit: would drop ...`"
            );
        }
        let docker_up = Arc::new(AtomicBool::new(source == BindingsSource::Docker));
        if let (Some(listener), Some(addr)) = (metrics_listener, args.metrics) {
            tokio::spawn(metrics::serve(
                listener,
                metrics::Shared {
                    config_path: config_path.to_path_buf(),
                    docker_up: docker_up.clone(),
                },
            ));
            println!("dockwall: Prometheus metrics on http://{addr}/metrics");
        }
        // systemd's Type=notify: ready only now, with the filter in force.
        if let Err(e) = notify::notify(&format!("READY=1\nSTATUS={summary}")) {
            eprintln!("dockwall: telling systemd we are ready failed: {e:#}");
        }
        let mut kernel = match ebpf_obj.as_mut() {
            Some(obj) => Some(Kernel {
                obj,
                pins: ebpf::PinKeeper::open()?,
                mode,
                hook: args.hook,
            }),
            None => None,
        };
        let expires = &policy.expires;
        let compiled = Compiled::new(
            &policy.allowances,
            |a| expires.get(a).copied(),
            &policy.sets,
            &bindings,
        );
        // Edits are taken from here on; until now they waited on the lock.
        let requests = control::server::serve(control::server::bind(&control::socket_path())?);
        runtime::record_applied(&dataplanes.names(), policy.revision)?;
        runtime::update_daemon(|d| {
            d.pid = Some(std::process::id());
            d.phase = runtime::Phase::Running;
            d.file_stamp = runtime::stamp(config_path);
        })?;
        let mut daemon = Daemon {
            config_path,
            ifaces: &args.ifaces,
            dataplanes: &mut dataplanes,
            kernel: kernel.as_mut(),
            docker_up,
            log_rate: args.log_rate,
            lock,
            journal,
            policy,
            compiled,
            bindings,
            needs_full: false,
            log_seen: [0; 2],
            next_expiry: None,
            resyncs: 0,
            last_edit: None,
            hand_edit_noted: false,
            label_errors: Default::default(),
            swarm_worker_noted: false,
            store,
        };
        let bindings = daemon.bindings.clone();
        daemon.report_label_errors(&bindings);
        let result = daemon.follow(drop_log, requests).await;
        let _ = notify::notify("STOPPING=1");
        result
    }
}

/// `--dry-run`: everything `load` would install, from the same compile step.
fn dry_run(args: &LoadArgs, policy: &config::Policy) -> anyhow::Result<ExitCode> {
    let (bindings, source, _) = super::runtime()?.block_on(sync::bindings());
    println!("# dockwall load --dry-run: nothing is changed");
    println!(
        "# published ports from {source:?}, {} allowance(s)",
        policy.allowances.len()
    );
    let entries = sync::entries(&policy.in_force(clock::now_unix()), &bindings);
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
            crate::dataplane::nftables::compile(&entries, &scope, &args.ifaces, args.audit)
        );
    } else if !args.no_iptables {
        let backend = iptables::Backend::detect();
        for family in iptables::Family::ALL {
            println!("\n# {} --noflush", backend.tool(family, "-restore"));
            print!(
                "{}",
                iptables::compile(family, &entries, &scope, args.audit)
            );
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
/// A load whose attach failed (a driver without native XDP, say) takes back
/// what it installed, so the host is as it was: the interfaces attached
/// before the failure go back to their previous hook (or lose the filter if
/// it is new to them), and a first load leaves no maps and no fallback rules.
/// Best effort: the attach error is what the admin needs to see.
fn undo_attach(
    obj: &mut aya::Ebpf,
    previous: &State,
    attached: &[String],
    fallback: &Option<fallback::Fallback>,
) {
    for iface in attached {
        let undone = match previous.interfaces.iter().find(|o| &o.name == iface) {
            None => ebpf::detach(iface),
            // Back to tc, whose programs every load has at hand; an earlier
            // XDP attach was only swapped, the same decision, if this load
            // also asked for XDP.
            Some(old) if old.hook == Hook::Tc => ebpf::attach(obj, iface, old.mode, old.hook),
            Some(_) => Ok(()),
        };
        if let Err(e) = undone {
            eprintln!("dockwall: undoing the attach to {iface}: {e:#}");
        }
    }
    if !previous.ebpf
        && let Err(e) = ebpf::remove_pins()
    {
        eprintln!("dockwall: undoing the load, removing the pins: {e:#}");
    }
    if previous.fallback.is_none()
        && let Some(f) = fallback
        && let Err(e) = f.remove()
    {
        eprintln!(
            "dockwall: undoing the load, removing the {} rules: {e:#}",
            f.name()
        );
    }
}

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
