//! `dockwall explain SOURCE PORT[/proto]`: what would happen to a new
//! connection, which allowance decides, where it lands, and whether every
//! installed dataplane holds the same answer.
//!
//! The policy's answer comes from [`crate::explain::decide`]; each dataplane
//! is then asked what it holds, not what it was meant to get: the eBPF
//! filter through a lookup in its pinned maps (the kernel's own
//! longest-prefix match and expiry), iptables by reading dockwall's chain
//! back and testing set membership with `ipset test`, nftables by reading
//! its table back and `nft get element`.

use std::{net::IpAddr, path::Path, process::Command, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Serialize;

use crate::{
    clock, config,
    dataplane::ebpf,
    dataplane::fallback::Fallback,
    dataplane::iptables::{self, COMMENT_ALLOW, COMMENT_DENY},
    dataplane::nftables,
    dataplane::sync,
    explain::{self, Explanation, Verdict},
    policy::{PortProto, Proto},
    runtime,
};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
dockwall explain 203.0.113.9 8081\n  \
dockwall explain 2001:db8::9 5353/udp --json\n\n\
PORT is the published port (8081 in `-p 8081:8080`). Exit status: 0 when every installed \
dataplane agrees with the policy, 1 when one does not (run `dockwall reload`, and report it).")]
pub struct ExplainArgs {
    /// Client address (one address, not a network)
    pub source: IpAddr,
    /// Published port, PORT[/tcp|/udp]
    #[arg(value_parser = clap::value_parser!(PortArg))]
    pub port: PortArg,
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone)]
pub struct PortArg(pub PortProto);

impl std::str::FromStr for PortArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(PortArg)
    }
}

#[derive(Serialize)]
struct Dataplane {
    /// `ebpf`, `iptables (nft)`, `iptables (legacy)` or `nftables`.
    name: String,
    verdict: Verdict,
}

#[derive(Serialize)]
struct Output<'a> {
    source: IpAddr,
    port: u16,
    proto: Proto,
    /// `in_force`: the policy a running `load` applied; `saved`: the saved
    /// file (dockwall is not loaded).
    policy: &'static str,
    /// The policy revision the answer comes from.
    revision: u64,
    /// Loaded in audit mode: a `drop` is counted and let through.
    audit: bool,
    #[serde(flatten)]
    explanation: &'a Explanation,
    dataplanes: Vec<Dataplane>,
    /// Every dataplane's verdict equals the policy's.
    agree: bool,
}

pub fn run(config_path: &Path, args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let pp = args.port.0;
    let state = runtime::state()?;
    let loaded = !state.interfaces.is_empty();
    let policy = match runtime::applied_policy(config_path)? {
        Some(p) if loaded => p,
        _ => {
            config::check_readable(config_path)?;
            config::load(config_path)?
        }
    };
    let (bindings, _, _) = super::runtime()?.block_on(sync::bindings());
    let explanation = explain::decide(&policy, &bindings, args.source, pp, clock::now_unix());

    let mut dataplanes = Vec::new();
    let mut audit = state.audit;
    if loaded && state.ebpf {
        let maps = ebpf::Maps::open_pinned()?;
        audit = maps.config()?.flags & dockwall_common::CONFIG_AUDIT != 0;
        dataplanes.push(Dataplane {
            name: "ebpf".to_string(),
            verdict: ebpf_verdict(&maps, args.source, pp)?,
        });
    }
    if let Some(f) = state.fallback.filter(|_| loaded) {
        let verdict = match f {
            Fallback::Iptables(backend) => iptables_verdict(backend, args.source, pp)?,
            Fallback::Nftables => {
                let container_ips: Vec<IpAddr> = bindings
                    .iter()
                    .flat_map(|b| b.container_ips.iter().copied())
                    .collect();
                nftables_verdict(args.source, pp, &container_ips)?
            }
        };
        dataplanes.push(Dataplane {
            name: f.name(),
            verdict,
        });
    }
    let agree = dataplanes.iter().all(|d| d.verdict == explanation.verdict);
    let out = Output {
        source: args.source,
        port: pp.port,
        proto: pp.proto,
        policy: if loaded { "in_force" } else { "saved" },
        revision: policy.revision,
        audit,
        explanation: &explanation,
        dataplanes,
        agree,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_text(&out);
    }
    Ok(if agree {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_text(o: &Output) {
    let e = o.explanation;
    let verdict = match (e.verdict, o.audit) {
        (Verdict::Allow, _) => "ALLOW".to_string(),
        (Verdict::Drop, false) => "DROP".to_string(),
        (Verdict::Drop, true) => {
            "DROP in policy; AUDIT MODE: counted, logged and let through".to_string()
        }
        (Verdict::NotInScope, _) => {
            "NOT IN SCOPE: dockwall lets it pass; the host's own firewall decides".to_string()
        }
    };
    let family = if o.source.is_ipv6() { "IPv6" } else { "IPv4" };
    println!(
        "new connection {} -> published {}/{}: {verdict}",
        o.source, o.port, o.proto
    );
    let answered = if o.policy == "in_force" {
        "in force"
    } else {
        "saved, not loaded"
    };
    println!("  policy:     revision {} ({answered})", o.revision);
    if e.reaches.is_empty() {
        println!(
            "  reaches:    nothing publishes {}/{} for {family}",
            o.port, o.proto
        );
    }
    for r in &e.reaches {
        println!(
            "  reaches:    container {}, port {}/{} (bound on {}:{})",
            r.container, r.container_port, o.proto, r.host_ip, o.port
        );
    }
    match &e.decided_by {
        Some(d) => {
            let until = d
                .expires_at
                .as_ref()
                .map(|t| format!("; lapses at {t}"))
                .unwrap_or_default();
            println!(
                "  decided by: {} (entry {}, the longest matching prefix{until})",
                d.allowances.join(" and "),
                d.entry
            );
        }
        None if e.closed_by_labels.is_some() => println!(
            "  decided by: closed to everyone, {} (fix the labels and recreate the container)",
            e.closed_by_labels.as_deref().unwrap_or_default()
        ),
        None if e.verdict == Verdict::Drop => println!(
            "  decided by: no allowance matches {} on {}/{}: new connections are dropped",
            o.source, o.port, o.proto
        ),
        None => {}
    }
    for x in &e.expired {
        println!("  expired:    {x} would match but has lapsed");
    }
    let policy = if o.policy == "in_force" {
        "the policy in force"
    } else {
        "the saved file (dockwall is not loaded)"
    };
    if o.dataplanes.is_empty() {
        println!("  dataplanes: none installed; this is {policy}");
        return;
    }
    let each: Vec<String> = o
        .dataplanes
        .iter()
        .map(|d| format!("{} {}", d.name, d.verdict.word()))
        .collect();
    println!(
        "  dataplanes: {} -> {}",
        each.join(", "),
        if o.agree {
            format!("agree with {policy}")
        } else {
            format!("DISAGREE with {policy}: run `dockwall reload` and report this")
        }
    );
}

/// The eBPF filter's answer, from its pinned maps.
fn ebpf_verdict(maps: &ebpf::Maps, source: IpAddr, pp: PortProto) -> anyhow::Result<Verdict> {
    let family = if source.is_ipv6() {
        dockwall_common::FAMILY_V6
    } else {
        dockwall_common::FAMILY_V4
    };
    let in_scope = maps.published()?.iter().any(|(k, v)| {
        k.port == pp.port
            && k.proto == pp.proto.number()
            && k.family == family
            && v.policy_port == pp.port
    });
    if !in_scope {
        return Ok(Verdict::NotInScope);
    }
    Ok(match maps.lookup_allow(pp.port, pp.proto, source)? {
        Some(v) if v.expires_ns == 0 || v.expires_ns > clock::boot_ns() => Verdict::Allow,
        _ => Verdict::Drop,
    })
}

/// What kind a dockwall rule is, from its comment.
fn rule_kind(line: &str) -> Option<Verdict> {
    if line.contains(COMMENT_ALLOW) {
        Some(Verdict::Allow)
    } else if line.contains(COMMENT_DENY) {
        Some(Verdict::Drop)
    } else {
        None
    }
}

/// The word after `flag` in a rule.
fn arg_of<'a>(line: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == flag)?;
    words.next()
}

/// The first rule of DOCKWALL-FWD a new DNATed connection from `source`
/// to published `pp` matches decides (endpoint rules, for connections
/// routed straight to a container, are skipped).
fn iptables_verdict(
    backend: iptables::Backend,
    source: IpAddr,
    pp: PortProto,
) -> anyhow::Result<Verdict> {
    let family = if source.is_ipv6() {
        iptables::Family::V6
    } else {
        iptables::Family::V4
    };
    let tool = backend.tool(family, "");
    let out = Command::new(&tool)
        .args(["-w", "-S", iptables::CHAIN_FWD])
        .output()
        .with_context(|| format!("running {tool} -S {}", iptables::CHAIN_FWD))?;
    if !out.status.success() {
        bail!(
            "{tool} -S {}: {}",
            iptables::CHAIN_FWD,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let port = pp.port.to_string();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(kind) = rule_kind(line) else {
            continue;
        };
        if line.contains("! --ctstate DNAT")
            || arg_of(line, "-p") != Some(proto_word(pp.proto))
            || arg_of(line, "--ctorigdstport") != Some(port.as_str())
        {
            continue;
        }
        if let Some(set) = arg_of(line, "--match-set") {
            let member = Command::new("ipset")
                .args(["test", set, &source.to_string()])
                .output()
                .with_context(|| format!("running ipset test {set}"))?;
            if !member.status.success() {
                continue;
            }
        }
        return Ok(kind);
    }
    Ok(Verdict::NotInScope)
}

/// The same walk over dockwall's nftables chain, skipping the rules for
/// container endpoints (their `daddr` is a container's address). nft
/// prints `meta nfproto` only where no address match implies the family.
fn nftables_verdict(
    source: IpAddr,
    pp: PortProto,
    container_ips: &[IpAddr],
) -> anyhow::Result<Verdict> {
    let out = Command::new("nft")
        .args(["list", "chain", "inet", nftables::TABLE, nftables::CHAIN])
        .output()
        .context("running nft list chain inet dockwall prerouting")?;
    if !out.status.success() {
        bail!(
            "nft list chain inet {} prerouting: {}",
            nftables::TABLE,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let (nfproto, addr_word) = if source.is_ipv6() {
        ("nfproto ipv6", "ip6")
    } else {
        ("nfproto ipv4", "ip")
    };
    let dport = format!("{} dport {} ", proto_word(pp.proto), pp.port);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        let Some(kind) = rule_kind(line) else {
            continue;
        };
        let family = line.contains(nfproto) || line.split_whitespace().any(|w| w == addr_word);
        let endpoint = arg_of(line, "daddr")
            .and_then(|a| a.parse::<IpAddr>().ok())
            .is_some_and(|a| container_ips.contains(&a));
        if !family || endpoint || !line.contains(&dport) {
            continue;
        }
        if let Some(set) = line.split_whitespace().find_map(|w| w.strip_prefix('@')) {
            let member = Command::new("nft")
                .args([
                    "get",
                    "element",
                    "inet",
                    nftables::TABLE,
                    set,
                    &format!("{{ {source} }}"),
                ])
                .output()
                .with_context(|| format!("running nft get element ... {set}"))?;
            if !member.status.success() {
                continue;
            }
        }
        return Ok(kind);
    }
    Ok(Verdict::NotInScope)
}

fn proto_word(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}
