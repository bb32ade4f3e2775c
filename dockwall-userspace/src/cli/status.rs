//! `dockwall status`: is the filter in force? Exit 0 only when it is and
//! enforcing; 3 when it is loaded in audit mode (counting, not dropping).

use std::process::ExitCode;

use clap::Args;
use dockwall_common::{CONFIG_AUDIT, stat};
use serde::Serialize;

use crate::{dataplane::ebpf, policy::Binding, runtime};

/// `status` exit code: loaded and hooked in, but in audit mode.
pub const EXIT_AUDIT: u8 = 3;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 in force and enforcing; 3 loaded in audit mode (nothing dropped); 1 not loaded, incomplete, \
or the saved policy revision not in force on every dataplane for longer than one resync (a daemon starting, a failed apply, \
a hand edit `dockwall reload` has not applied)."
)]
pub struct StatusArgs {
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Iface {
    name: String,
    mode: ebpf::AttachMode,
    /// Where the ingress decision runs: `tc` or `xdp`.
    hook: ebpf::Hook,
    attached: bool,
}

#[derive(Serialize)]
struct Published {
    container: String,
    host_ip: String,
    host_port: u16,
    container_port: u16,
    proto: String,
}

#[derive(Serialize, Default)]
struct Counters {
    allowed: u64,
    dropped: u64,
    not_in_scope: u64,
    established: u64,
    reply: u64,
    fragment: u64,
    malformed: u64,
    /// Audit mode: new connections that would have been dropped, let through.
    audited: u64,
    /// Of dropped + audited: those whose best matching allowance had expired.
    expired: u64,
    /// Drop-log events the kernel's rate limit held back.
    log_suppressed: u64,
}

#[derive(Serialize)]
struct Fallback {
    /// "iptables (nft)", "iptables (legacy)" or "nftables".
    kind: String,
    in_force: bool,
}

/// The saved policy revision against what each dataplane holds.
#[derive(Serialize, Clone, PartialEq)]
struct Revision {
    /// The saved file's revision (with the journal's changes).
    saved: u64,
    /// Dataplane name -> the revision it holds.
    applied: std::collections::BTreeMap<String, u64>,
    /// `running`, `starting` (reading and applying; edits wait) or `stopped`.
    daemon: runtime::Phase,
    pid: Option<u32>,
    /// The saved file changed since the daemon read or wrote it: a hand
    /// edit waiting for `dockwall reload`.
    hand_edit_pending: bool,
}

impl Revision {
    fn read(config: &std::path::Path) -> anyhow::Result<Self> {
        let d = runtime::daemon()?;
        let phase = d.live_phase();
        // With a store, the revision saved is the store's the daemon saw.
        let saved = match &d.store {
            Some(store) => store.revision,
            None => crate::config::saved_revision(config)?,
        };
        Ok(Revision {
            saved,
            applied: d.applied.clone(),
            daemon: phase,
            pid: d.pid.filter(|_| phase != runtime::Phase::Stopped),
            // A file that appeared or vanished is a hand edit too.
            hand_edit_pending: phase == runtime::Phase::Running
                && d.store.is_none()
                && d.file_stamp != runtime::stamp(config),
        })
    }

    /// Every dataplane holds the saved revision, and no hand edit waits.
    fn in_sync(&self) -> bool {
        self.daemon != runtime::Phase::Starting
            && !self.hand_edit_pending
            && self.applied.values().all(|&r| r == self.saved)
    }
}

#[derive(Serialize)]
struct Status {
    /// Loaded and hooked in on every interface (also true in audit mode).
    in_force: bool,
    /// `load --audit`: nothing is dropped. `in_force && !audit` = enforcing.
    audit: bool,
    /// Where the daemon serves Prometheus metrics; null when off.
    metrics: Option<String>,
    /// Whether the eBPF filter is installed at all (`load --no-ebpf`).
    ebpf: bool,
    interfaces: Vec<Iface>,
    /// The fallback dataplane; null when off (`load --no-iptables`).
    fallback: Option<Fallback>,
    published: Vec<Published>,
    counters: Option<Counters>,
    /// Drift the daemon found and repaired ("<unix time> what"), newest last.
    repairs: Vec<String>,
    /// Saved policy revision vs what each dataplane holds; null when not loaded.
    revision: Option<Revision>,
    /// Containers whose `dockwall.*` labels fail: their published ports
    /// are closed to everyone until the labels are fixed.
    label_errors: Vec<LabelError>,
    /// With `--store`: how the daemon last found the store; null without.
    store: Option<crate::store::etcd::Health>,
}

#[derive(Serialize)]
struct LabelError {
    container: String,
    reason: String,
}

pub fn run(config: &std::path::Path, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let state = runtime::state()?;
    let pins = state.ebpf && ebpf::pins_present();
    let interfaces: Vec<Iface> = state
        .interfaces
        .iter()
        .map(|i| Iface {
            name: i.name.clone(),
            mode: i.mode,
            hook: i.hook,
            attached: pins && ebpf::attached(&i.name, i.mode, i.hook),
        })
        .collect();
    let names: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
    let fallback = state.fallback.map(|f| Fallback {
        kind: f.name(),
        in_force: f.in_force(&names),
    });
    let ebpf_ok = !state.ebpf || (pins && interfaces.iter().all(|i| i.attached));
    let fallback_ok = fallback.as_ref().is_none_or(|f| f.in_force);
    let in_force =
        !interfaces.is_empty() && (state.ebpf || fallback.is_some()) && ebpf_ok && fallback_ok;
    let published = if !interfaces.is_empty() {
        runtime::published()?
    } else {
        Vec::new()
    };
    let maps = if pins {
        Some(ebpf::Maps::open_pinned()?)
    } else {
        None
    };
    // The kernel's own setting where there is one: it is what runs.
    let audit = match &maps {
        Some(m) => m.config()?.flags & CONFIG_AUDIT != 0,
        None => state.audit,
    };
    let counters = if let Some(maps) = &maps {
        let s = maps.stats()?;
        Some(Counters {
            allowed: s[stat::ALLOWED as usize],
            dropped: s[stat::DROPPED as usize],
            not_in_scope: s[stat::NOT_IN_SCOPE as usize],
            established: s[stat::ESTABLISHED as usize],
            reply: s[stat::REPLY as usize],
            fragment: s[stat::FRAGMENT as usize],
            malformed: s[stat::MALFORMED as usize],
            audited: s[stat::AUDITED as usize],
            expired: s[stat::EXPIRED as usize],
            log_suppressed: s[stat::LOG_SUPPRESSED as usize],
        })
    } else {
        None
    };
    let revision = if state.interfaces.is_empty() {
        None
    } else {
        // A difference that lasts less than one resync is an edit or a
        // start in flight, not a problem: look again until it has passed.
        let deadline = std::time::Instant::now()
            + crate::daemon::RESYNC_INTERVAL
            + std::time::Duration::from_millis(500);
        let mut r = Revision::read(config)?;
        while !r.in_sync() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
            r = Revision::read(config)?;
        }
        Some(r)
    };
    let in_sync = revision.as_ref().is_none_or(Revision::in_sync);
    // Sets only matter (and the file is only read) when a label names one.
    let label_errors = if published.iter().any(|b| !b.labels.is_empty()) {
        let sets = crate::config::load(config)
            .map(|p| p.sets)
            .unwrap_or_default();
        crate::labels::labelled(&published, &sets)
            .invalid
            .into_iter()
            .map(|(container, reason)| LabelError { container, reason })
            .collect()
    } else {
        Vec::new()
    };
    let store = if state.interfaces.is_empty() {
        None
    } else {
        runtime::daemon()?.store
    };
    let store_ok = store.as_ref().is_none_or(|s| s.reachable);
    let status = Status {
        store,
        label_errors,
        revision,
        in_force,
        audit,
        metrics: state.metrics.map(|a| format!("http://{a}/metrics")),
        ebpf: state.ebpf,
        interfaces,
        fallback,
        repairs: state.repairs.clone(),
        published: published.iter().map(published_row).collect(),
        counters,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_text(&status);
    }
    Ok(match (in_force && in_sync && store_ok, audit) {
        (true, false) => ExitCode::SUCCESS,
        (true, true) => ExitCode::from(EXIT_AUDIT),
        (false, _) => ExitCode::FAILURE,
    })
}

fn published_row(b: &Binding) -> Published {
    Published {
        container: b.container.clone(),
        host_ip: b.host_ip_display(),
        host_port: b.host_port,
        container_port: b.container_port,
        proto: b.proto.to_string(),
    }
}

fn print_text(s: &Status) {
    if s.in_force && s.audit {
        let seen = s.counters.as_ref().map_or(0, |c| c.audited);
        let banner = format!(
            "dockwall: AUDIT MODE: NOTHING IS ENFORCED. {seen} new connection(s) would have been dropped and were let through. \
             `dockwall load` without --audit enforces the policy."
        );
        let rule = "!".repeat(72);
        println!("{rule}\n{banner}\n{rule}");
        // Also on stderr, so it shows when stdout goes to a pipe or file.
        eprintln!("{banner}");
    } else if s.in_force {
        println!("dockwall: in force");
    } else if s.interfaces.is_empty() {
        println!("dockwall: NOT loaded (run `dockwall load --iface IF`)");
    } else {
        println!(
            "dockwall: NOT in force: the filter is missing on some interface (run `dockwall load` again)"
        );
    }
    for i in &s.interfaces {
        let state = match (s.ebpf, i.attached) {
            (false, _) => "eBPF off (--no-ebpf)",
            (true, true) => "eBPF attached",
            (true, false) => "eBPF NOT attached",
        };
        let hook = match i.hook {
            ebpf::Hook::Tc => format!("{:?}", i.mode),
            ebpf::Hook::Xdp => format!("XDP native, egress {:?}", i.mode),
        };
        println!("  interface {} ({hook}): {state}", i.name);
    }
    match &s.fallback {
        None if !s.interfaces.is_empty() => println!("  fallback: off (--no-iptables)"),
        None => {}
        Some(f) => {
            let state = if f.in_force {
                "in force"
            } else {
                "INCOMPLETE (a chain, jump or table is missing)"
            };
            println!("  fallback {}: {state}", f.kind);
        }
    }
    if let Some(r) = &s.revision {
        let held: Vec<String> = r.applied.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "  policy: revision {} saved; in force: {}",
            r.saved,
            if held.is_empty() {
                "unknown".to_string()
            } else {
                held.join(", ")
            }
        );
        match (r.daemon, r.pid) {
            (runtime::Phase::Starting, Some(pid)) => println!(
                "  daemon: STARTING (pid {pid}): reading and applying the policy; edits wait for it"
            ),
            (runtime::Phase::Running, Some(pid)) => println!("  daemon: running (pid {pid})"),
            _ => println!(
                "  daemon: not running: the filter stays in force, edits apply directly, Docker changes are not followed (run `dockwall load` again)"
            ),
        }
        if r.hand_edit_pending {
            println!(
                "  NOT IN FORCE: the saved file was edited by hand since the daemon read it; `dockwall reload` applies it"
            );
        }
        for (plane, &rev) in r.applied.iter().filter(|(_, rev)| **rev != r.saved) {
            println!(
                "  NOT IN FORCE: {plane} holds revision {rev}, not the saved {} (see the daemon's log; `dockwall reload` applies the saved file)",
                r.saved
            );
        }
    }
    if let Some(store) = &s.store {
        let since = crate::clock::rfc3339(store.since);
        if store.reachable {
            println!(
                "  store: {} reachable since {since}; revision {} applied",
                store.url, store.revision
            );
        } else {
            println!(
                "  STORE UNREACHABLE since {since}: {} ({}); enforcing the last revision applied, {}; edits are refused until it is back",
                store.url,
                store.error.as_deref().unwrap_or("no member answers"),
                store.revision
            );
        }
    }
    for e in &s.label_errors {
        println!(
            "  LABELS FAIL on container {}: {}; its published ports are closed to everyone (fix the labels and recreate the container)",
            e.container, e.reason
        );
    }
    if !s.published.is_empty() {
        println!("published ports:");
        for p in &s.published {
            println!(
                "  {:<20} {}:{} -> {}/{}",
                p.container, p.host_ip, p.host_port, p.container_port, p.proto
            );
        }
    }
    if !s.repairs.is_empty() {
        println!("drift repaired by the daemon (unix time, what):");
        for r in &s.repairs {
            println!("  {r}");
        }
    }
    if let Some(c) = &s.counters {
        println!(
            "new connections: allowed {} dropped {} audited (would drop) {} (expired allowance: {}); passed: not in scope {} established {} reply {} fragment {}; malformed dropped {}; drop log suppressed {}",
            c.allowed,
            c.dropped,
            c.audited,
            c.expired,
            c.not_in_scope,
            c.established,
            c.reply,
            c.fragment,
            c.malformed,
            c.log_suppressed
        );
    }
    if let Some(m) = &s.metrics {
        println!("metrics: {m}");
    }
}
