//! The iptables fallback dataplane: the same policy as the eBPF filter, as
//! rules in chains of dockwall's own.
//!
//! - `DOCKWALL-FWD`, jumped to from Docker's `DOCKER-USER` for each managed
//!   interface: connections Docker DNATed from a published port (matched on
//!   the *original* destination with conntrack, so rules name the published
//!   port like the eBPF side) and connections routed straight to a published
//!   container endpoint.
//! - `DOCKWALL-IN`, jumped to from `INPUT`: published ports that Docker's
//!   userland proxy accepts on the host itself (IPv6 clients of an
//!   IPv4-only container), a path `DOCKER-USER` never sees.
//!
//! Both chains return for related/established traffic first, so container
//! egress keeps working. Allowed sources live in ipset `hash:net` sets, one
//! per (family, protocol, published port), so 100k allowances cost one rule
//! and one hash lookup, not 100k rules. Every change rewrites both chains in one
//! `iptables-restore --noflush` transaction: no moment with half a policy.
//! Rules are compiled by [`compile`] (pure) from the same [`Scope`] and
//! allowance entries as the eBPF maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::policy::{AllowEntry, Proto, Scope};

pub const CHAIN_FWD: &str = "DOCKWALL-FWD";
pub const CHAIN_IN: &str = "DOCKWALL-IN";
pub const DOCKER_USER: &str = "DOCKER-USER";
pub const INPUT: &str = "INPUT";
/// Comments on dockwall's rules: what kind of rule each is.
pub const COMMENT_ALLOW: &str = "dockwall-allow";
pub const COMMENT_DENY: &str = "dockwall-deny";

/// Which iptables Docker uses; dockwall uses the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn matches(self, ip: IpAddr) -> bool {
        ip.is_ipv6() == (self == Family::V6)
    }

    fn host_len(self) -> u8 {
        if self == Family::V6 { 128 } else { 32 }
    }
}

impl Backend {
    /// `iptables-nft`, `ip6tables-legacy-restore`, ...
    pub fn tool(self, family: Family, suffix: &str) -> String {
        let base = if family == Family::V6 {
            "ip6tables"
        } else {
            "iptables"
        };
        let kind = match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        };
        format!("{base}-{kind}{suffix}")
    }

    /// The backend the system's `iptables` command is (what Docker runs).
    pub fn system() -> Backend {
        let legacy = Command::new("iptables")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("legacy"))
            .unwrap_or(false);
        if legacy {
            Backend::Legacy
        } else {
            Backend::Nft
        }
    }

    /// The backend holding Docker's DOCKER-USER chain, if any has it; the
    /// system's own first, since stale chains may linger in the other.
    pub fn with_docker_user() -> Option<Backend> {
        let has_docker_user = |b: Backend| {
            Command::new(b.tool(Family::V4, ""))
                .args(["-S", DOCKER_USER])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let system = Backend::system();
        let other = if system == Backend::Nft {
            Backend::Legacy
        } else {
            Backend::Nft
        };
        [system, other].into_iter().find(|b| has_docker_user(*b))
    }

    /// The backend holding Docker's chains; else the system's.
    pub fn detect() -> Backend {
        Backend::with_docker_user().unwrap_or_else(Backend::system)
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// Matches a packet that opens a connection, like the eBPF side: a bare SYN
/// for TCP; for UDP everything not related/established (returned earlier).
fn new_conn(p: Proto, dport: Option<u16>) -> String {
    let dport = dport.map(|d| format!(" --dport {d}")).unwrap_or_default();
    match p {
        Proto::Tcp => format!("-p tcp -m tcp{dport} --tcp-flags SYN,ACK SYN"),
        Proto::Udp => format!("-p udp -m udp{dport}"),
    }
}

/// The `iptables-restore --noflush` input for one family: both chains,
/// declared (so flushed) and refilled in one transaction. In audit mode the
/// drop rules return instead: their packet counters count would-be drops.
pub fn compile(
    family: Family,
    entries: &BTreeSet<AllowEntry>,
    scope: &Scope,
    audit: bool,
) -> String {
    // Marked so `dockwall explain` (and an admin reading `iptables -S`)
    // can tell an allowance's RETURN from an audit-mode deny's RETURN.
    let allow = format!("-m comment --comment {COMMENT_ALLOW} -j RETURN");
    let deny = format!(
        "-m comment --comment {COMMENT_DENY} -j {}",
        if audit { "RETURN" } else { "DROP" }
    );
    let mut fwd = String::new();
    let mut inp = String::new();
    let returning = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN";
    let _ = writeln!(fwd, "-A {CHAIN_FWD} {returning}");
    let _ = writeln!(inp, "-A {CHAIN_IN} {returning}");
    let endpoints: Vec<_> = scope
        .endpoints
        .iter()
        .filter(|(ep, _)| family.matches(ep.ip))
        .collect();
    for (port, proto, sources) in sets(family, entries) {
        let p = proto_name(proto);
        let src = match &sources {
            Sources::Everyone => String::new(),
            Sources::Set(name, _) => format!(" -m set --match-set {name} src"),
        };
        let _ = writeln!(
            fwd,
            "-A {CHAIN_FWD} -p {p} -m conntrack --ctstate DNAT --ctorigdstport {port}{src} {allow}"
        );
        for (ep, _) in endpoints
            .iter()
            .filter(|(ep, policy_port)| **policy_port == port && ep.proto == proto)
        {
            let _ = writeln!(
                fwd,
                "-A {CHAIN_FWD} -d {}/{} -p {p} -m {p} --dport {} -m conntrack ! --ctstate DNAT{src} {allow}",
                ep.ip,
                family.host_len(),
                ep.port
            );
        }
        let _ = writeln!(
            inp,
            "-A {CHAIN_IN} -p {p} -m {p} --dport {port}{src} {allow}"
        );
    }
    for hp in scope
        .host_ports
        .iter()
        .filter(|hp| hp.ipv6() == (family == Family::V6))
    {
        let orig_dst = hp
            .ip
            .map(|ip| format!(" --ctorigdst {ip}"))
            .unwrap_or_default();
        let dst = hp
            .ip
            .map(|ip| format!("-d {ip}/{} ", family.host_len()))
            .unwrap_or_default();
        let _ = writeln!(
            fwd,
            "-A {CHAIN_FWD} {} -m conntrack --ctstate DNAT --ctorigdstport {}{orig_dst} {deny}",
            new_conn(hp.proto, None),
            hp.port
        );
        let _ = writeln!(
            inp,
            "-A {CHAIN_IN} {dst}{} {deny}",
            new_conn(hp.proto, Some(hp.port))
        );
    }
    for (ep, _) in &endpoints {
        let _ = writeln!(
            fwd,
            "-A {CHAIN_FWD} -d {}/{} {} -m conntrack ! --ctstate DNAT {deny}",
            ep.ip,
            family.host_len(),
            new_conn(ep.proto, Some(ep.port))
        );
    }
    format!("*filter\n:{CHAIN_FWD} - [0:0]\n:{CHAIN_IN} - [0:0]\n{fwd}{inp}COMMIT\n")
}

/// Who an allowance rule lets in: everyone (a /0, which hash:net cannot
/// hold), or the members of an ipset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sources {
    Everyone,
    Set(String, Vec<ipnet::IpNet>),
}

/// Prefix of every ipset dockwall owns.
pub const SET_PREFIX: &str = "dockwall-";

/// `dockwall-4-tcp-8081`: the allowed sources of one published port.
fn set_name(family: Family, proto: Proto, port: u16) -> String {
    let f = if family == Family::V6 { 6 } else { 4 };
    format!("{SET_PREFIX}{f}-{}-{port}", proto_name(proto))
}

/// The allowance entries of one family grouped by (port, proto), each with
/// the set that holds its sources.
pub fn sets(family: Family, entries: &BTreeSet<AllowEntry>) -> Vec<(u16, Proto, Sources)> {
    crate::policy::group_allowed(entries, family == Family::V6)
        .into_iter()
        .map(|g| {
            let sources = if g.everyone {
                Sources::Everyone
            } else {
                Sources::Set(set_name(family, g.proto, g.port), g.nets)
            };
            (g.port, g.proto, sources)
        })
        .collect()
}

/// The `ipset restore` input that makes each set hold exactly its members:
/// filled under a temporary name, then swapped in (atomic per set).
pub fn compile_sets(family: Family, entries: &BTreeSet<AllowEntry>) -> String {
    let inet = if family == Family::V6 {
        "inet6"
    } else {
        "inet"
    };
    let mut out = String::new();
    for (_, _, sources) in sets(family, entries) {
        let Sources::Set(name, nets) = sources else {
            continue;
        };
        let tmp = format!("{name}~");
        let size = nets.len().next_power_of_two().max(1024);
        for set in [&name, &tmp] {
            let _ = writeln!(
                out,
                "create {set} hash:net family {inet} hashsize {size} maxelem 1048576 -exist"
            );
        }
        let _ = writeln!(out, "flush {tmp}");
        for net in nets {
            let _ = writeln!(out, "add {tmp} {net} -exist");
        }
        let _ = writeln!(out, "swap {tmp} {name}");
        let _ = writeln!(out, "destroy {tmp}");
    }
    out
}

fn ipset_restore(input: &str) -> anyhow::Result<()> {
    if input.is_empty() {
        return Ok(());
    }
    crate::command::pipe("ipset", &["restore"], input, "ipset")
}

/// dockwall's sets that exist now.
fn existing_sets() -> Vec<String> {
    Command::new("ipset")
        .args(["list", "-n"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with(SET_PREFIX))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Destroys dockwall's sets not in `keep` (after no rule refers to them).
fn destroy_sets_except(keep: &BTreeSet<String>) -> anyhow::Result<()> {
    let doomed: String = existing_sets()
        .into_iter()
        .filter(|s| !keep.contains(s))
        .map(|s| format!("destroy {s}\n"))
        .collect();
    ipset_restore(&doomed)
}

/// Installs (or atomically replaces) both chains for both families.
pub fn apply(
    backend: Backend,
    entries: &BTreeSet<AllowEntry>,
    scope: &Scope,
    audit: bool,
) -> anyhow::Result<()> {
    // Sets first (rules may name new ones), then both chains in one
    // transaction per family, then sets no rule names any more.
    let mut keep = BTreeSet::new();
    for family in Family::ALL {
        ipset_restore(&compile_sets(family, entries))?;
        keep.extend(
            sets(family, entries)
                .into_iter()
                .filter_map(|(_, _, s)| match s {
                    Sources::Set(name, _) => Some(name),
                    Sources::Everyone => None,
                }),
        );
    }
    for family in Family::ALL {
        let tool = backend.tool(family, "-restore");
        restore(&tool, &compile(family, entries, scope, audit))?;
    }
    destroy_sets_except(&keep)
}

/// When only the members of existing sets change (the same published ports,
/// each still "everyone" or still a set, in both families), the rules stay
/// as they are and one `ipset restore` adds and deletes members in place:
/// what makes a single `dockwall allow` cheap. Returns false, changing
/// nothing, when the rules would change; the caller rewrites everything.
pub fn update_members(
    old: &BTreeSet<AllowEntry>,
    new: &BTreeSet<AllowEntry>,
) -> anyhow::Result<bool> {
    match member_changes(old, new) {
        Some(input) => ipset_restore(&input).map(|()| true),
        None => Ok(false),
    }
}

/// The `ipset restore` input for [`update_members`], or None when the rules
/// themselves would change.
pub fn member_changes(old: &BTreeSet<AllowEntry>, new: &BTreeSet<AllowEntry>) -> Option<String> {
    let mut input = String::new();
    for family in Family::ALL {
        let (before, after) = (sets(family, old), sets(family, new));
        if before.len() != after.len() {
            return None;
        }
        for ((port_a, proto_a, a), (port_b, proto_b, b)) in before.iter().zip(&after) {
            if port_a != port_b || proto_a != proto_b {
                return None;
            }
            match (a, b) {
                (Sources::Everyone, Sources::Everyone) => {}
                (Sources::Set(name, was), Sources::Set(_, now)) => {
                    let was: BTreeSet<_> = was.iter().collect();
                    let now: BTreeSet<_> = now.iter().collect();
                    for net in now.difference(&was) {
                        let _ = writeln!(input, "add {name} {net} -exist");
                    }
                    for net in was.difference(&now) {
                        let _ = writeln!(input, "del {name} {net} -exist");
                    }
                }
                _ => return None,
            }
        }
    }
    Some(input)
}

/// One edit's changes applied in place: `changes` says, per entry, whether
/// the fallback holds it afterwards. Like [`update_members`], but O(change)
/// instead of a diff of two whole policies, for the daemon's edits. Returns
/// false, changing nothing, when the rules themselves would change.
pub fn update_in_place(
    applied: &mut BTreeSet<AllowEntry>,
    changes: &[(AllowEntry, bool)],
) -> anyhow::Result<bool> {
    let Some(input) = member_delta(applied, changes) else {
        return Ok(false);
    };
    ipset_restore(&input)?;
    for (entry, present) in changes {
        if *present {
            applied.insert(*entry);
        } else {
            applied.remove(entry);
        }
    }
    Ok(true)
}

/// The `ipset restore` input for [`update_in_place`], or None when a
/// published port gains its first or loses its last source, or a /0 comes
/// or goes (the rules change: the caller rewrites everything).
pub fn member_delta(
    applied: &BTreeSet<AllowEntry>,
    changes: &[(AllowEntry, bool)],
) -> Option<String> {
    if !crate::policy::rules_unchanged(applied, changes) {
        return None;
    }
    let changed: BTreeMap<AllowEntry, bool> = changes.iter().copied().collect();
    let groups: BTreeSet<_> = changes.iter().map(|(e, _)| e.group()).collect();
    let mut input = String::new();
    for g in groups {
        let (port, proto, ipv6) = g;
        if crate::policy::group_has_everyone(applied, g) {
            continue; // a rule without a set: members do not matter
        }
        let family = if ipv6 { Family::V6 } else { Family::V4 };
        let name = set_name(family, proto, port);
        // Adds first: no moment holds fewer members than both states.
        let mine = || changed.iter().filter(|(e, _)| e.group() == g);
        for (e, _) in mine().filter(|(e, p)| **p && !applied.contains(e)) {
            let _ = writeln!(input, "add {name} {} -exist", e.net);
        }
        for (e, _) in mine().filter(|(e, p)| !**p && applied.contains(e)) {
            let _ = writeln!(input, "del {name} {} -exist", e.net);
        }
    }
    Some(input)
}

fn restore(tool: &str, input: &str) -> anyhow::Result<()> {
    crate::command::pipe(tool, &["--noflush"], input, "iptables")
}

fn run(tool: &str, args: &[&str]) -> anyhow::Result<bool> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {tool}"))?;
    Ok(out.status.success())
}

fn chain_exists(tool: &str, chain: &str) -> bool {
    run(tool, &["-S", chain]).unwrap_or(false)
}

/// One family's filter table as `iptables -S` prints it: what the checks
/// the daemon makes every 2 s read, from one command. They were one
/// command per chain and per jump: 28 with two interfaces, each reading
/// the whole table anyway (iptables-nft fetches it from the kernel).
struct Listing {
    chains: BTreeSet<String>,
    /// The words of each `-A` line.
    rules: Vec<Vec<String>>,
}

impl Listing {
    /// An iptables that fails (no ip6tables, IPv6 off) lists nothing.
    fn of(tool: &str) -> Listing {
        let out = Command::new(tool)
            .arg("-S")
            .stdin(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success());
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        Listing::parse(&text)
    }

    fn parse(text: &str) -> Listing {
        let mut listing = Listing {
            chains: BTreeSet::new(),
            rules: Vec::new(),
        };
        for line in text.lines() {
            let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            match words.first().map(String::as_str) {
                Some("-P" | "-N") if words.len() >= 2 => {
                    listing.chains.insert(words[1].clone());
                }
                Some("-A") => listing.rules.push(words),
                _ => {}
            }
        }
        listing
    }

    fn has_chain(&self, chain: &str) -> bool {
        self.chains.contains(chain)
    }

    /// `-A parent -i iface -j ours`, as dockwall inserts it.
    fn has_jump(&self, parent: &str, iface: &str, ours: &str) -> bool {
        self.rules.iter().any(|w| {
            w.len() == 6
                && w[1] == parent
                && w[2] == "-i"
                && w[3] == iface
                && w[4] == "-j"
                && w[5] == ours
        })
    }

    /// The rules of `parent` that jump to `ours`, with the interface each names.
    fn jumps_to<'a>(
        &'a self,
        parent: &'a str,
        ours: &'a str,
    ) -> impl Iterator<Item = (&'a [String], Option<&'a str>)> {
        self.rules
            .iter()
            .filter(move |w| {
                let n = w.len();
                n >= 4 && w[1] == parent && w[n - 2] == "-j" && w[n - 1] == ours
            })
            .map(|w| {
                let iface = w.windows(2).find(|p| p[0] == "-i").map(|p| p[1].as_str());
                (w.as_slice(), iface)
            })
    }
}

/// Whether both dockwall chains exist for both families.
pub fn chains_present(backend: Backend) -> bool {
    Family::ALL.iter().all(|f| {
        let listing = Listing::of(&backend.tool(*f, ""));
        listing.has_chain(CHAIN_FWD) && listing.has_chain(CHAIN_IN)
    })
}

/// The jumps each managed interface needs: (parent chain, our chain).
const JUMPS: [(&str, &str); 2] = [(DOCKER_USER, CHAIN_FWD), (INPUT, CHAIN_IN)];

/// Puts missing jumps in place (first in the parent chain). A parent that
/// does not exist yet (no DOCKER-USER before Docker runs, or no IPv6
/// DOCKER-USER without Docker's ip6tables) is skipped; returns what was added.
pub fn ensure_jumps(backend: Backend, ifaces: &[String]) -> anyhow::Result<Vec<String>> {
    let mut added = Vec::new();
    for family in Family::ALL {
        let tool = backend.tool(family, "");
        let listing = Listing::of(&tool);
        for (parent, ours) in JUMPS {
            if !listing.has_chain(parent) || !listing.has_chain(ours) {
                continue;
            }
            for iface in ifaces {
                let rule = ["-i", iface.as_str(), "-j", ours];
                if listing.has_jump(parent, iface, ours) {
                    continue;
                }
                if !run(&tool, &[&["-I", parent, "1"][..], &rule].concat())? {
                    bail!("{tool} -I {parent} 1 -i {iface} -j {ours} failed");
                }
                added.push(format!("{tool} {parent} -i {iface} -j {ours}"));
            }
        }
    }
    Ok(added)
}

/// What is installed now, per family.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Installed {
    pub family: &'static str,
    pub chains: bool,
    /// Interfaces whose INPUT jump is in place.
    pub input_jumps: Vec<String>,
    /// Interfaces whose DOCKER-USER jump is in place (None: no DOCKER-USER).
    pub docker_user_jumps: Option<Vec<String>>,
}

pub fn installed(backend: Backend, ifaces: &[String]) -> Vec<Installed> {
    Family::ALL
        .iter()
        .map(|family| {
            let listing = Listing::of(&backend.tool(*family, ""));
            let jumped = |parent: &str, ours: &str| -> Vec<String> {
                ifaces
                    .iter()
                    .filter(|i| listing.has_jump(parent, i, ours))
                    .cloned()
                    .collect()
            };
            Installed {
                family: if *family == Family::V6 {
                    "ipv6"
                } else {
                    "ipv4"
                },
                chains: listing.has_chain(CHAIN_FWD) && listing.has_chain(CHAIN_IN),
                input_jumps: jumped(INPUT, CHAIN_IN),
                docker_user_jumps: listing
                    .has_chain(DOCKER_USER)
                    .then(|| jumped(DOCKER_USER, CHAIN_FWD)),
            }
        })
        .collect()
}

/// Whether the fallback fully guards `ifaces`: chains present and every
/// jump in place wherever its parent chain exists.
pub fn in_force(installed: &[Installed], ifaces: &[String]) -> bool {
    installed.iter().all(|i| {
        i.chains
            && i.input_jumps.len() == ifaces.len()
            && i.docker_user_jumps
                .as_ref()
                .is_none_or(|j| j.len() == ifaces.len())
    })
}

/// Removes jumps to our chains, except those for interfaces in `keep`;
/// never touches a rule that does not jump to a dockwall chain.
pub fn remove_jumps(backend: Backend, keep: &[String]) -> anyhow::Result<()> {
    for family in Family::ALL {
        let tool = backend.tool(family, "");
        let listing = Listing::of(&tool);
        for (parent, ours) in JUMPS {
            for (words, iface) in listing.jumps_to(parent, ours) {
                if iface.is_some_and(|i| keep.iter().any(|k| k == i)) {
                    continue;
                }
                let mut args = vec!["-D"];
                args.extend(words[1..].iter().map(String::as_str));
                if !run(&tool, &args)? {
                    bail!("{tool} {} failed", args.join(" "));
                }
            }
        }
    }
    Ok(())
}

/// Removes every jump to our chains, the chains, and dockwall's ipsets.
pub fn remove(backend: Backend) -> anyhow::Result<()> {
    remove_jumps(backend, &[])?;
    for family in Family::ALL {
        let tool = backend.tool(family, "");
        for (_, ours) in JUMPS {
            if chain_exists(&tool, ours)
                && (!run(&tool, &["-F", ours])? || !run(&tool, &["-X", ours])?)
            {
                bail!("{tool}: removing chain {ours} failed");
            }
        }
    }
    destroy_sets_except(&BTreeSet::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Binding, compile_scope, test_entry as entry};

    #[test]
    fn one_listing_answers_the_chain_and_jump_checks() {
        let listing = Listing::parse(
            "-P INPUT ACCEPT\n\
             -P FORWARD DROP\n\
             -N DOCKER-USER\n\
             -N DOCKWALL-FWD\n\
             -N DOCKWALL-IN\n\
             -A INPUT -i dwa0 -j DOCKWALL-IN\n\
             -A DOCKER-USER -i dwa0 -j DOCKWALL-FWD\n\
             -A DOCKER-USER -i old0 -j DOCKWALL-FWD\n\
             -A DOCKER-USER -s 10.0.0.0/8 -j RETURN\n\
             -A DOCKWALL-FWD -m set --match-set dockwall-4-tcp-8081 src -j RETURN\n",
        );
        for chain in [INPUT, DOCKER_USER, CHAIN_FWD, CHAIN_IN] {
            assert!(listing.has_chain(chain), "{chain}");
        }
        assert!(!listing.has_chain("DOCKER"));
        assert!(listing.has_jump(INPUT, "dwa0", CHAIN_IN));
        assert!(listing.has_jump(DOCKER_USER, "dwa0", CHAIN_FWD));
        assert!(!listing.has_jump(DOCKER_USER, "dwb0", CHAIN_FWD));
        // A jump of INPUT is not one of DOCKER-USER's.
        assert!(!listing.has_jump(DOCKER_USER, "dwa0", CHAIN_IN));
        let jumps: Vec<Option<&str>> = listing
            .jumps_to(DOCKER_USER, CHAIN_FWD)
            .map(|(_, i)| i)
            .collect();
        assert_eq!(jumps, [Some("dwa0"), Some("old0")]);
        let (words, _) = listing
            .jumps_to(DOCKER_USER, CHAIN_FWD)
            .nth(1)
            .expect("second");
        assert_eq!(words[1..].join(" "), "DOCKER-USER -i old0 -j DOCKWALL-FWD");
        // Nothing listed (the command failed): no chains, no jumps.
        let none = Listing::parse("");
        assert!(!none.has_chain(INPUT) && none.jumps_to(INPUT, CHAIN_IN).next().is_none());
    }

    #[test]
    fn member_delta_in_place_only_while_the_rules_stay() {
        let e = |net: &str| entry(8081, Proto::Tcp, net);
        let applied: BTreeSet<AllowEntry> = [e("10.0.0.1/32"), e("10.0.0.0/24")].into();
        // One more source and one fewer: members only.
        let input = member_delta(
            &applied,
            &[(e("192.0.2.7/32"), true), (e("10.0.0.1/32"), false)],
        )
        .unwrap();
        assert_eq!(
            input,
            "add dockwall-4-tcp-8081 192.0.2.7/32 -exist\ndel dockwall-4-tcp-8081 10.0.0.1/32 -exist\n"
        );
        // Re-adding a member already there writes nothing.
        assert_eq!(
            member_delta(&applied, &[(e("10.0.0.1/32"), true)]).unwrap(),
            ""
        );
        // The last source goes, a port gets its first, a /0 comes: rewrite.
        assert!(
            member_delta(
                &applied,
                &[(e("10.0.0.1/32"), false), (e("10.0.0.0/24"), false)]
            )
            .is_none()
        );
        assert!(member_delta(&applied, &[(entry(443, Proto::Tcp, "10.0.0.1/32"), true)]).is_none());
        assert!(member_delta(&applied, &[(e("0.0.0.0/0"), true)]).is_none());
        // An IPv6 source on the same port is another set: its first member.
        assert!(member_delta(&applied, &[(e("2001:db8::1/128"), true)]).is_none());
    }

    fn scope() -> Scope {
        let web = |ip: &str| {
            Binding::new("web", "id", ip.parse().unwrap(), 8081, 8080, Proto::Tcp)
                .with_container_ips(vec!["172.17.0.2".parse().unwrap()])
        };
        compile_scope(&[
            web("0.0.0.0"),
            web("::"),
            Binding::new(
                "dns",
                "id",
                "10.0.0.5".parse().unwrap(),
                5353,
                53,
                Proto::Udp,
            ),
        ])
    }

    #[test]
    fn v4_rules_name_the_published_port_and_return_established_first() {
        let entries = BTreeSet::from([
            entry(8081, Proto::Tcp, "192.0.2.0/24"),
            entry(8081, Proto::Tcp, "203.0.113.7/32"),
            entry(5353, Proto::Udp, "198.51.100.7/32"),
            entry(8081, Proto::Tcp, "2001:db8::/32"),
        ]);
        let text = compile(Family::V4, &entries, &scope(), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert_eq!(
            lines[3],
            "-A DOCKWALL-FWD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
        );
        // One rule per published port, its sources in a set.
        assert!(text.contains(
            "-A DOCKWALL-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 8081 -m set --match-set dockwall-4-tcp-8081 src -m comment --comment dockwall-allow -j RETURN"
        ));
        // Direct access to the container endpoint, judged by 8081's allowances.
        assert!(text.contains(
            "-A DOCKWALL-FWD -d 172.17.0.2/32 -p tcp -m tcp --dport 8080 -m conntrack ! --ctstate DNAT -m set --match-set dockwall-4-tcp-8081 src -m comment --comment dockwall-allow -j RETURN"
        ));
        assert!(text.contains(
            "-A DOCKWALL-FWD -p tcp -m tcp --tcp-flags SYN,ACK SYN -m conntrack --ctstate DNAT --ctorigdstport 8081 -m comment --comment dockwall-deny -j DROP"
        ));
        assert!(text.contains(
            "-A DOCKWALL-FWD -p udp -m udp -m conntrack --ctstate DNAT --ctorigdstport 5353 --ctorigdst 10.0.0.5 -m comment --comment dockwall-deny -j DROP"
        ));
        assert!(text.contains("-A DOCKWALL-IN -d 10.0.0.5/32 -p udp -m udp --dport 5353 -m comment --comment dockwall-deny -j DROP"));
        assert!(
            !text.contains("dockwall-6-"),
            "IPv6 sets stay out of the IPv4 rules"
        );
        // In each chain, every RETURN for an allowance comes before every DROP.
        for chain in [CHAIN_FWD, CHAIN_IN] {
            let rules: Vec<&&str> = lines.iter().filter(|l| l.contains(chain)).collect();
            let last_return = rules
                .iter()
                .rposition(|l| l.contains("--match-set"))
                .unwrap();
            let first_drop = rules.iter().position(|l| l.ends_with("-j DROP")).unwrap();
            assert!(last_return < first_drop, "{chain}");
        }
        assert_eq!(lines.last(), Some(&"COMMIT"));

        let sets = compile_sets(Family::V4, &entries);
        assert!(sets.contains("add dockwall-4-tcp-8081~ 192.0.2.0/24 -exist"));
        assert!(sets.contains("add dockwall-4-tcp-8081~ 203.0.113.7/32 -exist"));
        assert!(sets.contains("swap dockwall-4-tcp-8081~ dockwall-4-tcp-8081"));
        assert!(!sets.contains("2001:db8"));
    }

    #[test]
    fn any_needs_no_set() {
        let entries = BTreeSet::from([
            entry(8081, Proto::Tcp, "0.0.0.0/0"),
            entry(8081, Proto::Tcp, "192.0.2.0/24"),
        ]);
        let text = compile(Family::V4, &entries, &scope(), false);
        assert!(text.contains(
            "-A DOCKWALL-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 8081 -m comment --comment dockwall-allow -j RETURN"
        ));
        assert!(!text.contains("--match-set"));
        assert_eq!(compile_sets(Family::V4, &entries), "");
    }

    #[test]
    fn v6_rules_cover_the_userland_proxy_path() {
        let entries = BTreeSet::from([entry(8081, Proto::Tcp, "2001:db8::/32")]);
        let text = compile(Family::V6, &entries, &scope(), false);
        assert!(text.contains(
            "-A DOCKWALL-IN -p tcp -m tcp --dport 8081 -m set --match-set dockwall-6-tcp-8081 src -m comment --comment dockwall-allow -j RETURN"
        ));
        assert!(
            text.contains(
                "-A DOCKWALL-IN -p tcp -m tcp --dport 8081 --tcp-flags SYN,ACK SYN -m comment --comment dockwall-deny -j DROP"
            )
        );
        assert!(!text.contains("172.17"));
        assert!(compile_sets(Family::V6, &entries).contains("family inet6"));
    }

    #[test]
    fn a_change_of_members_alone_is_applied_in_place() {
        let old = BTreeSet::from([
            entry(8081, Proto::Tcp, "192.0.2.0/24"),
            entry(8081, Proto::Tcp, "2001:db8::/32"),
        ]);
        let mut new = old.clone();
        new.insert(entry(8081, Proto::Tcp, "198.51.100.7/32"));
        new.remove(&entry(8081, Proto::Tcp, "192.0.2.0/24"));
        assert_eq!(
            member_changes(&old, &new).as_deref(),
            Some(
                "add dockwall-4-tcp-8081 198.51.100.7/32 -exist\ndel dockwall-4-tcp-8081 192.0.2.0/24 -exist\n"
            )
        );
        // A new published port needs a new set and rule: no in-place update.
        let mut other = old.clone();
        other.insert(entry(8082, Proto::Tcp, "192.0.2.0/24"));
        assert_eq!(member_changes(&old, &other), None);
        // Becoming "everyone" changes the rule too.
        let mut any = old.clone();
        any.insert(entry(8081, Proto::Tcp, "0.0.0.0/0"));
        assert_eq!(member_changes(&old, &any), None);
        // The last member of a port leaving drops its rule.
        let gone = BTreeSet::from([entry(8081, Proto::Tcp, "2001:db8::/32")]);
        assert_eq!(member_changes(&old, &gone), None);
    }

    #[test]
    fn empty_policy_is_still_a_valid_transaction() {
        let text = compile(Family::V4, &BTreeSet::new(), &Scope::default(), false);
        assert_eq!(text.lines().count(), 6);
    }
}
