//! `dockwall load`: attach the filter, fill its maps, then follow Docker in
//! the foreground. Stopping it leaves the filter in force (fail-closed).

use std::{
    io::Write as _,
    path::Path,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Args;
use futures_util::StreamExt as _;
use tokio::signal::unix::{SignalKind, signal};

use dockwall_common::{CONFIG_AUDIT, Config, DEFAULT_LOG_RATE, MAP_EVENTS, stat};

use crate::{
    clock, config,
    dataplane::ebpf::{self, AttachMode, Maps},
    dataplane::fallback,
    dataplane::iptables,
    dataplane::sync::{self, BindingsSource, Dataplanes},
    droplog::{self, DropLog},
    metrics, notify, policy,
    runtime::{self, ManagedIface, State},
};

/// Resync even without Docker events: catches Docker coming up, missed
/// events, and hand edits of the saved allowances.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Every this many resyncs (30 s) the daemon reads the kernel's allowance
/// map back whole and repairs any entry changed behind its back; between
/// them it writes only differences (a full read of 100k entries every 2 s
/// cost 15% of a core).
const DEEP_CHECK_EVERY: u64 = 15;
/// How often the daemon reports what the drop log's limit suppressed.
const LOG_SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// Above this the log is a flood of its own.
const MAX_LOG_RATE: u32 = 10_000;
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
has DOCKER-USER, else nftables (table inet dockwall); --fallback chooses.\n\n\
Each dropped new connection is printed as `drop SRC:PORT -> CONTAINER (published PORT/PROTO -> \
CPORT) on IF`, at most --log-rate lines a second (limited in the kernel), with a summary of \
what the limit held back. --audit drops nothing and prints `audit: would drop ...` instead. \
Under systemd (Type=notify) READY=1 is sent once the filter is in force.\n\n\
Examples:\n  \
sudo dockwall load --iface eth0\n  \
sudo dockwall load --iface eth0 --audit --log-rate 100\n  \
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

pub fn run(config_path: &Path, args: LoadArgs) -> anyhow::Result<ExitCode> {
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
    // Bound before anything is installed: a taken port changes nothing.
    let metrics_listener = args.metrics.map(metrics::bind).transpose()?;

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
            allow_applied: None,
            policy_applied: None,
            audit: args.audit,
        };
        let mut drop_log = None;
        if !args.no_ebpf {
            let mut obj = ebpf::load_pinned()?;
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
        {
            let _lock = config::lock(config_path)?;
            sync::apply(&mut dataplanes, &policy, &bindings, source)?;
        }
        let apply_time = started.elapsed();
        release_heap();
        if let Some(obj) = ebpf_obj.as_mut() {
            for iface in &args.ifaces {
                ebpf::attach(obj, iface, mode)?;
            }
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
            planes.push(format!("ebpf {mode:?}").to_lowercase());
        }
        if let Some(f) = fallback {
            planes.push(f.name());
        }
        let summary = format!(
            "filter {} on {} ({}): {} published port(s), {} allowance(s)",
            if args.audit { "in AUDIT MODE" } else { "in force" },
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
            println!("dockwall: AUDIT MODE: nothing is dropped; every would-be drop is counted and logged as `audit: would drop ...`");
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
            }),
            None => None,
        };
        let mut daemon = Daemon {
            config_path,
            ifaces: &args.ifaces,
            dataplanes: &mut dataplanes,
            kernel: kernel.as_mut(),
            docker_up,
            log_rate: args.log_rate,
            log_seen: [0; 2],
            applied_cache: None,
            last_input: None,
            next_expiry: None,
            resyncs: 0,
        };
        let result = daemon.follow(drop_log).await;
        let _ = notify::notify("STOPPING=1");
        result
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

/// The running daemon's view of what it keeps in force.
struct Daemon<'a, 'k> {
    config_path: &'a Path,
    ifaces: &'a [String],
    dataplanes: &'a mut Dataplanes,
    kernel: Option<&'a mut Kernel<'k>>,
    docker_up: Arc<AtomicBool>,
    log_rate: u32,
    /// LOG_SUPPRESSED and LOG_LOST as last reported.
    log_seen: [u64; 2],
    /// The applied policy as last parsed, with the file's identity then.
    applied_cache: Option<(runtime::AppliedStamp, config::Policy)>,
    /// What the last apply was computed from; an unchanged input (and no
    /// expiry due, no drift found) needs no apply at all.
    last_input: Option<(Option<runtime::AppliedStamp>, Vec<policy::Binding>)>,
    /// The earliest expiry (unix seconds) among the allowances then in force.
    next_expiry: Option<u64>,
    resyncs: u64,
}

impl Daemon<'_, '_> {
    /// Follows Docker, the saved allowances and the drop log until
    /// SIGINT/SIGTERM.
    async fn follow(&mut self, mut drop_log: Option<DropLog>) -> anyhow::Result<ExitCode> {
        let mut sigint =
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut sigterm =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut tick = tokio::time::interval(RESYNC_INTERVAL);
        let mut log_tick = tokio::time::interval(LOG_SUMMARY_INTERVAL);
        let mut events = None;
        let mut names = runtime::published().unwrap_or_default();
        self.log_seen = self.log_counters();
        loop {
            if events.is_none()
                && let Ok(docker) = crate::docker::connect().await
            {
                events = Some(Box::pin(crate::docker::events(&docker)));
                self.resync().await;
            }
            let event = async {
                match events.as_mut() {
                    Some(stream) => stream.next().await,
                    None => std::future::pending().await,
                }
            };
            let dropped = async {
                match drop_log.as_mut() {
                    Some(log) => log.next_batch().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sighup.recv() => self.reload().await,
                _ = tick.tick() => {
                    self.resync().await;
                    names = runtime::published().unwrap_or_default();
                }
                _ = log_tick.tick() => self.report_suppressed(),
                batch = dropped => match batch {
                    Ok(batch) => {
                        let mut out = std::io::stdout().lock();
                        for e in &batch {
                            let line = droplog::format_event(e, &names, &droplog::ifname(e.ifindex));
                            let _ = writeln!(out, "{line}");
                        }
                        let _ = out.flush();
                    }
                    Err(e) => {
                        eprintln!("dockwall: drop log stopped: {e:#}");
                        drop_log = None;
                    }
                },
                item = event => match item {
                    Some(Ok(_)) => {
                        tokio::time::sleep(EVENT_DEBOUNCE).await;
                        self.resync().await;
                    }
                    // Docker went away: keep the rules as they are, reconnect.
                    Some(Err(_)) | None => events = None,
                },
            }
        }
        println!("dockwall: exiting; the filter stays in force (`dockwall unload` removes it)");
        Ok(ExitCode::SUCCESS)
    }

    fn log_counters(&self) -> [u64; 2] {
        match self.dataplanes.maps.as_ref().map(|m| m.stats()) {
            Some(Ok(s)) => [s[stat::LOG_SUPPRESSED as usize], s[stat::LOG_LOST as usize]],
            _ => self.log_seen,
        }
    }

    /// One line a second at most for what the drop log did not print.
    fn report_suppressed(&mut self) {
        let now = self.log_counters();
        let [suppressed, lost] = [now[0] - self.log_seen[0], now[1] - self.log_seen[1]];
        if suppressed > 0 {
            println!(
                "dockwall: drop log: {suppressed} more drop(s) not logged, over the limit of {} a second (--log-rate); the counters have every one",
                self.log_rate
            );
        }
        if lost > 0 {
            println!("dockwall: drop log: {lost} event(s) lost (ring buffer full)");
        }
        self.log_seen = now;
    }

    async fn resync(&mut self) {
        if let Err(e) = self.try_resync().await {
            eprintln!("dockwall: resync failed, keeping the rules in force: {e:#}");
        }
    }

    /// SIGHUP: apply the saved file as it is now; a file that fails is
    /// refused whole and the policy in force stays.
    async fn reload(&mut self) {
        let config_path = self.config_path;
        let result = async {
            let (bindings, source, _) = sync::bindings().await;
            let _lock = config::lock(config_path)?;
            let policy = config::load(config_path)?;
            sync::apply(self.dataplanes, &policy, &bindings, source)?;
            anyhow::Ok(policy.in_force(clock::now_unix()).allowances.len())
        }
        .await;
        match result {
            Ok(n) => println!(
                "dockwall: reloaded {}: {n} allowance(s) in force",
                config_path.display()
            ),
            Err(e) => {
                eprintln!("dockwall: reload refused, the policy in force is unchanged: {e:#}")
            }
        }
    }

    async fn try_resync(&mut self) -> anyhow::Result<()> {
        let (bindings, source, _) = sync::bindings().await;
        self.docker_up
            .store(source == BindingsSource::Docker, Ordering::Relaxed);
        let _lock = config::lock(self.config_path)?;
        // The policy in force, not the file: a hand edit waits for `reload`.
        // Parsed again only when another command replaced it.
        let stamp = runtime::applied_stamp();
        let mut policy = match (&self.applied_cache, stamp) {
            (Some((was, policy)), Some(now)) if *was == now => policy.clone(),
            _ => match runtime::applied_policy()? {
                Some(policy) => {
                    if let Some(now) = stamp {
                        self.applied_cache = Some((now, policy.clone()));
                    }
                    policy
                }
                None => config::load(self.config_path)?,
            },
        };
        let expired = policy.prune_expired(clock::now_unix());
        if !expired.is_empty() {
            self.prune_saved(&expired, &_lock);
        }
        let fallback_missing = self.dataplanes.fallback.is_some_and(|f| !f.present());
        self.resyncs += 1;
        let deep = self.resyncs.is_multiple_of(DEEP_CHECK_EVERY);
        let now = clock::now_unix();
        let input = (stamp, bindings.clone());
        let needed = deep
            || fallback_missing
            || !expired.is_empty()
            || self.next_expiry.is_some_and(|at| at <= now)
            || self.last_input.as_ref() != Some(&input);
        // A failed apply must not stop the repairs below (re-attaching the
        // filter matters more): its error is returned after them.
        let (applied, apply_error) = if needed {
            if deep {
                self.dataplanes.allow_applied = None;
            }
            let result = sync::apply(self.dataplanes, &policy, &bindings, source);
            // Parsing and compiling a large policy leaves freed heap behind.
            release_heap();
            match result {
                Ok(applied) => {
                    self.last_input = Some((runtime::applied_stamp(), bindings));
                    self.next_expiry = policy
                        .expires
                        .values()
                        .copied()
                        .filter(|&at| at > now)
                        .min();
                    (applied, None)
                }
                Err(e) => {
                    // Next time: a full read-back and diff, not a delta.
                    self.dataplanes.allow_applied = None;
                    (sync::Applied::default(), Some(e))
                }
            }
        } else {
            (sync::Applied::default(), None)
        };
        let mut repaired = Vec::new();
        if let Some(f) = self.dataplanes.fallback.filter(|_| fallback_missing) {
            repaired.push(format!("{} rules were missing: restored", f.name()));
        }
        if let Some(kernel) = self.kernel.as_deref_mut() {
            for name in kernel.pins.repin()? {
                repaired.push(format!("pin of map {name} was removed: pinned again"));
            }
            for iface in self.ifaces {
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
        // Docker re-creates DOCKER-USER when it restarts, and appears after
        // us when it starts later: put our jumps (back) in place.
        if let Some(fallback) = self.dataplanes.fallback {
            for jump in fallback.hook(self.ifaces)? {
                repaired.push(format!("iptables jump was missing: {jump}"));
            }
        }
        for what in &repaired {
            println!("dockwall: repaired drift: {what}");
        }
        runtime::record_repairs(&repaired)?;
        match apply_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Removes lapsed allowances from the saved file too, so it does not
    /// collect them. A file that does not parse (a hand edit in progress)
    /// is left alone: the lapsed ones are out of force either way.
    fn prune_saved(&self, expired: &[policy::Allowance], lock: &config::Lock) {
        for a in expired {
            println!("dockwall: allowance expired, removed: {a}");
        }
        let result = config::load(self.config_path).and_then(|mut saved| {
            let before = saved.allowances.len();
            for a in expired {
                if saved.expired(a, clock::now_unix()) {
                    saved.remove(a);
                }
            }
            if saved.allowances.len() != before {
                config::save(self.config_path, &saved, lock)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            eprintln!(
                "dockwall: could not remove expired allowances from {} (they are out of force anyway): {e:#}",
                self.config_path.display()
            );
        }
    }
}

/// Gives freed heap back to the kernel. Parsing and compiling a large
/// policy (100k allowances) peaks at well over 100 MiB that glibc would
/// otherwise keep mapped for the daemon's whole life.
fn release_heap() {
    // SAFETY: malloc_trim only releases free memory at the top of the heaps.
    unsafe { libc::malloc_trim(0) };
}

/// What the daemon needs to repair the eBPF side.
struct Kernel<'a> {
    obj: &'a mut aya::Ebpf,
    pins: ebpf::PinKeeper,
    mode: AttachMode,
}
