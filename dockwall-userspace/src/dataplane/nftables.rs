//! The nftables fallback dataplane: the same policy as the eBPF filter, as a
//! table of dockwall's own (`table inet dockwall`). It needs no Docker
//! chain, so it works whatever Docker's firewall backend is, including
//! Docker 29's nftables backend, which has no DOCKER-USER.
//!
//! One chain hooks prerouting at priority -150: after conntrack (-200), so it
//! sees connection state, and before DNAT (-100), so it sees the destination
//! the client used, like the eBPF filter at tc ingress. It covers all three
//! parts of the scope in one place:
//!
//! 1. packets not from a managed interface, and related/established ones,
//!    return;
//! 2. published container endpoints (exact address and port) first, judged
//!    by the allowances of the port that publishes them;
//! 3. then published host ports (a specific address, or any address of the
//!    family for Docker's default bind), whether DNAT or the userland proxy
//!    takes them afterwards.
//!
//! New connections in scope with no allowance are dropped. Allowed sources
//! live in two sets per (family, protocol, published port): single
//! addresses in a hash set, wider networks in an interval set. A new table
//! is written whole in one `nft -f` transaction; an edit that leaves the
//! rules as they are adds and deletes set elements in one netlink batch
//! (`nftables_netlink`).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use crate::{
    dataplane::{
        iptables::{COMMENT_ALLOW, COMMENT_DENY},
        nftables_netlink::{self, ElementOp},
    },
    policy::{AllowEntry, Proto, Scope, group_allowed},
};

/// `table inet dockwall`.
pub const TABLE: &str = "dockwall";
/// The table's one chain.
pub const CHAIN: &str = "prerouting";
/// Priority of the prerouting chain: after conntrack, before DNAT.
pub const PRIORITY: i32 = -150;

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// `(nfproto, address keyword, set type)` of a family.
fn family_words(ipv6: bool) -> (&'static str, &'static str, &'static str) {
    if ipv6 {
        ("ipv6", "ip6", "ipv6_addr")
    } else {
        ("ipv4", "ip", "ipv4_addr")
    }
}

/// The set of single addresses of one (family, protocol, published port):
/// a hash set, so adding or deleting one is O(1) however many it holds.
pub fn set_name(ipv6: bool, proto: Proto, port: u16) -> String {
    format!(
        "allow{}_{}_{port}",
        if ipv6 { 6 } else { 4 },
        proto_name(proto)
    )
}

/// The set of wider networks of the same group: an interval set, whose
/// every change costs O(size) in the kernel (Linux 6.18, one element sent
/// over netlink: an add 0.1 ms into an empty set, 8-24 ms into 100k
/// networks), so hosts never go in it.
pub fn nets_set_name(ipv6: bool, proto: Proto, port: u16) -> String {
    format!("{}_nets", set_name(ipv6, proto, port))
}

/// A new connection, like the eBPF side: a bare SYN for TCP, any UDP
/// datagram that conntrack does not know (established ones returned earlier).
fn new_conn(p: Proto, dport: u16) -> String {
    match p {
        Proto::Tcp => format!("tcp dport {dport} tcp flags & (syn | ack) == syn"),
        Proto::Udp => format!("udp dport {dport}"),
    }
}

/// The `nft -f` script that replaces the whole table atomically. In audit
/// mode the drop rules count and return instead.
pub fn compile(
    entries: &BTreeSet<AllowEntry>,
    scope: &Scope,
    ifaces: &[String],
    audit: bool,
) -> String {
    // Marked so `dockwall explain` (and an admin reading `nft list`) can
    // tell an allowance's return from an audit-mode deny's return.
    let deny = if audit {
        format!("counter return comment \"{COMMENT_DENY}\"")
    } else {
        format!("drop comment \"{COMMENT_DENY}\"")
    };
    let allow = format!("return comment \"{COMMENT_ALLOW}\"");
    let mut sets = String::new();
    let mut rules = String::new();
    let quoted: Vec<String> = ifaces.iter().map(|i| format!("\"{i}\"")).collect();
    let _ = writeln!(rules, "\t\tiifname != {{ {} }} return", quoted.join(", "));
    let _ = writeln!(rules, "\t\tct state established,related return");
    for ipv6 in [false, true] {
        let (nfproto, addr, set_type) = family_words(ipv6);
        let groups = group_allowed(entries, ipv6);
        // The source matches of one published port, one allow rule each:
        // `ip saddr @set` per set it has, [""] for everyone, [] for no one.
        let allowed = |port: u16, proto: Proto| -> Vec<String> {
            let Some(g) = groups.iter().find(|g| g.port == port && g.proto == proto) else {
                return Vec::new();
            };
            if g.everyone {
                return vec![String::new()];
            }
            // Both sets, even empty, so that an edit never changes the rules
            // (a host added to a port that only had networks stays in place).
            vec![
                format!(" {addr} saddr @{}", set_name(ipv6, proto, port)),
                format!(" {addr} saddr @{}", nets_set_name(ipv6, proto, port)),
            ]
        };
        for g in groups.iter().filter(|g| !g.everyone) {
            let hosts: Vec<String> = g
                .nets
                .iter()
                .filter(|n| is_host(n))
                .map(|n| n.addr().to_string())
                .collect();
            // Only networks no other one covers, and no auto-merge: then
            // each element is one entry, and an edit adds or deletes exact
            // elements in place (auto-merge joins neighbours into ranges
            // that a later delete of one of them cannot name).
            let nets: Vec<String> = crate::policy::maximal(g.nets.iter().filter(|n| !is_host(n)))
                .iter()
                .map(|n| n.to_string())
                .collect();
            for (name, flags, elements) in [
                (set_name(ipv6, g.proto, g.port), "", hosts),
                (
                    nets_set_name(ipv6, g.proto, g.port),
                    " flags interval;",
                    nets,
                ),
            ] {
                let elements = if elements.is_empty() {
                    String::new()
                } else {
                    format!("\n\t\telements = {{ {} }}", elements.join(", "))
                };
                let _ = writeln!(
                    sets,
                    "\tset {name} {{\n\t\ttype {set_type};{flags}{elements}\n\t}}"
                );
            }
        }
        for (ep, policy_port) in scope
            .endpoints
            .iter()
            .filter(|(ep, _)| ep.ip.is_ipv6() == ipv6)
        {
            let p = proto_name(ep.proto);
            for src in allowed(*policy_port, ep.proto) {
                let _ = writeln!(
                    rules,
                    "\t\t{addr} daddr {} {p} dport {}{src} {allow}",
                    ep.ip, ep.port
                );
            }
            let _ = writeln!(
                rules,
                "\t\t{addr} daddr {} {} {deny}",
                ep.ip,
                new_conn(ep.proto, ep.port)
            );
        }
        let host_ports: Vec<_> = scope
            .host_ports
            .iter()
            .filter(|hp| hp.ipv6() == ipv6)
            .collect();
        let mut ports: Vec<(u16, Proto)> =
            host_ports.iter().map(|hp| (hp.port, hp.proto)).collect();
        ports.dedup();
        for (port, proto) in ports {
            for src in allowed(port, proto) {
                let p = proto_name(proto);
                let _ = writeln!(
                    rules,
                    "\t\tmeta nfproto {nfproto} {p} dport {port}{src} {allow}"
                );
            }
        }
        for hp in host_ports {
            let dst = hp
                .ip
                .map(|ip: IpAddr| format!(" {addr} daddr {ip}"))
                .unwrap_or_default();
            let _ = writeln!(
                rules,
                "\t\tmeta nfproto {nfproto}{dst} {} {deny}",
                new_conn(hp.proto, hp.port)
            );
        }
    }
    format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{sets}\tchain {CHAIN} {{\n\t\ttype filter hook prerouting priority {PRIORITY}; policy accept;\n{rules}\t}}\n}}\n"
    )
}

/// Installs or atomically replaces the table.
pub fn apply(
    entries: &BTreeSet<AllowEntry>,
    scope: &Scope,
    ifaces: &[String],
    audit: bool,
) -> anyhow::Result<()> {
    nft_script(&compile(entries, scope, ifaces, audit))
}

/// One edit's changes applied in place: `applied` is what the table holds
/// (updated here), `changes` says per entry whether it is held afterwards.
/// Returns false, changing nothing in the kernel, when the rules change
/// (a port's first or last source, a /0): the caller replaces the table.
/// The elements go over netlink (see [`nftables_netlink`] for why not nft).
pub fn update_in_place(
    applied: &mut BTreeSet<AllowEntry>,
    changes: &[(AllowEntry, bool)],
) -> anyhow::Result<bool> {
    let before = applied.clone();
    let Some(ops) = element_delta(applied, changes) else {
        return Ok(false);
    };
    if let Err(e) = nftables_netlink::apply_elements(TABLE, &ops) {
        // The transaction changed nothing: the table holds `before`.
        *applied = before;
        return Err(e.into());
    }
    Ok(true)
}

/// The element changes for [`update_in_place`], in order, with `applied`
/// brought up to date; None (and `applied` untouched) when the rules
/// change. A single address is one element of its group's hash set. The
/// interval set holds the maximal wider networks only (no auto-merge, so
/// no overlaps): adding a network replaces the elements it covers,
/// removing one brings back the maximal ones it covered.
pub fn element_delta(
    applied: &mut BTreeSet<AllowEntry>,
    changes: &[(AllowEntry, bool)],
) -> Option<Vec<ElementOp>> {
    use crate::policy::{covered, group_has_everyone, inside, maximal, rules_unchanged};
    if !rules_unchanged(applied, changes) {
        return None;
    }
    let mut ops = Vec::new();
    let mut op = |add: bool, e: &AllowEntry, net: &ipnet::IpNet| {
        let (port, proto, ipv6) = e.group();
        let interval = !is_host(net);
        ops.push(ElementOp {
            add,
            set: if interval {
                nets_set_name(ipv6, proto, port)
            } else {
                set_name(ipv6, proto, port)
            },
            net: *net,
            interval,
        });
    };
    // One change after the other: each sees the sets as the last left them.
    for &(e, present) in changes {
        if present == applied.contains(&e) {
            continue;
        }
        let no_set = group_has_everyone(applied, e.group()) || e.net.prefix_len() == 0;
        if is_host(&e.net) {
            if present {
                applied.insert(e);
            } else {
                applied.remove(&e);
            }
            if !no_set {
                op(present, &e, &e.net);
            }
            continue;
        }
        let under = covered(applied, &e);
        let wider_inside = |applied: &BTreeSet<AllowEntry>| -> Vec<ipnet::IpNet> {
            maximal(inside(applied, &e).map(|x| &x.net).filter(|n| !is_host(n)))
        };
        if present {
            let gone = wider_inside(applied);
            applied.insert(e);
            if no_set || under {
                continue;
            }
            for net in &gone {
                op(false, &e, net);
            }
            op(true, &e, &e.net);
        } else {
            applied.remove(&e);
            if no_set || under {
                continue;
            }
            op(false, &e, &e.net);
            for net in &wider_inside(applied) {
                op(true, &e, net);
            }
        }
    }
    Some(ops)
}

fn is_host(net: &ipnet::IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

fn nft_script(script: &str) -> anyhow::Result<()> {
    if script.is_empty() {
        return Ok(());
    }
    crate::command::pipe("nft", &["-f", "-"], script, "nftables")
}

/// Whether dockwall's table is in place (its chain exists). Asked of the
/// kernel over netlink: `nft list chain` reads every set element first
/// (0.5 s with 100k networks), and the daemon asks every 2 s.
pub fn installed() -> bool {
    match nftables_netlink::chain_exists(TABLE, CHAIN) {
        Ok(exists) => exists,
        Err(e) => {
            eprintln!("dockwall: {e}; asking nft instead");
            Command::new("nft")
                .args(["list", "chain", "inet", TABLE, CHAIN])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        }
    }
}

/// Removes dockwall's table (and with it every rule and set of dockwall's).
pub fn remove() -> anyhow::Result<()> {
    if Command::new("nft").arg("--version").output().is_err() {
        return Ok(()); // no nft, so no table of ours either
    }
    nft_script(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_delta_keeps_the_sets_equal_to_the_maximal_networks() {
        use crate::policy::{maximal, test_entry};
        let nets = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3/32",
            "10.1.2.4/30",
            "10.1.3.0/24",
            "192.0.2.0/24",
            "192.0.2.9/32",
            "2001:db8::/32",
            "2001:db8::1/128",
        ];
        let mut rng = crate::testing::Rng::new(0x2545_f491_4f6c_dd1d);
        let mut next = |n: usize| rng.index(n);
        // Every group keeps one member that is never touched, so the rules
        // never change and every step goes in place.
        let keep = [
            test_entry(80, Proto::Tcp, "203.0.113.1/32"),
            test_entry(80, Proto::Tcp, "2001:db9::1/128"),
        ];
        let mut applied: BTreeSet<AllowEntry> = keep.into_iter().collect();
        // (set name, element) as the table holds them.
        let expected = |applied: &BTreeSet<AllowEntry>| -> BTreeSet<(String, String)> {
            let mut out: BTreeSet<(String, String)> = applied
                .iter()
                .filter(|e| is_host(&e.net))
                .map(|e| {
                    let (port, proto, ipv6) = e.group();
                    (set_name(ipv6, proto, port), e.net.addr().to_string())
                })
                .collect();
            for n in maximal(applied.iter().map(|e| &e.net).filter(|n| !is_host(n))) {
                out.insert((
                    nets_set_name(n.addr().is_ipv6(), Proto::Tcp, 80),
                    n.to_string(),
                ));
            }
            out
        };
        let mut elements = expected(&applied);
        for step in 0..2000 {
            let batch: Vec<(AllowEntry, bool)> = (0..1 + next(3))
                .map(|_| {
                    (
                        test_entry(80, Proto::Tcp, nets[next(nets.len())]),
                        next(2) == 0,
                    )
                })
                .collect();
            let ops = element_delta(&mut applied, &batch).expect("in place");
            for op in ops {
                let element = if op.interval {
                    op.net.to_string()
                } else {
                    op.net.addr().to_string()
                };
                let item = (op.set.clone(), element);
                if op.add {
                    assert!(elements.insert(item), "step {step}: overlap {op}");
                } else {
                    assert!(elements.remove(&item), "step {step}: no element {op}");
                }
            }
            assert_eq!(elements, expected(&applied), "step {step}: {batch:?}");
        }
    }
    use crate::policy::{Binding, compile_scope, test_entry as entry};

    #[test]
    fn one_table_endpoints_before_host_ports() {
        let scope = compile_scope(&[
            Binding::new(
                "web",
                "id",
                "0.0.0.0".parse().unwrap(),
                8081,
                8080,
                Proto::Tcp,
            )
            .with_container_ips(vec!["172.17.0.2".parse().unwrap()]),
            Binding::new("web", "id", "::".parse().unwrap(), 8081, 8080, Proto::Tcp),
            Binding::new(
                "dns",
                "id",
                "10.0.0.5".parse().unwrap(),
                5353,
                53,
                Proto::Udp,
            ),
        ]);
        let entries = BTreeSet::from([
            entry(8081, Proto::Tcp, "192.0.2.0/24"),
            entry(8081, Proto::Tcp, "198.51.100.7/32"),
            entry(8081, Proto::Tcp, "2001:db8::/32"),
            entry(5353, Proto::Udp, "0.0.0.0/0"),
        ]);
        let text = compile(&entries, &scope, &["eth0".to_string()], false);
        assert!(text.starts_with("table inet dockwall\ndelete table inet dockwall\n"));
        assert!(text.contains("iifname != { \"eth0\" } return\n"));
        // Single addresses in a hash set, wider networks in an interval set.
        assert!(text.contains(
            "set allow4_tcp_8081 {\n\t\ttype ipv4_addr;\n\t\telements = { 198.51.100.7 }"
        ));
        assert!(text.contains("set allow4_tcp_8081_nets {\n\t\ttype ipv4_addr; flags interval;\n\t\telements = { 192.0.2.0/24 }"));
        assert!(
            text.contains("set allow6_tcp_8081 {\n\t\ttype ipv6_addr;\n\t}"),
            "a port's sets exist even empty, so an edit keeps the rules"
        );
        assert!(
            text.contains("ip daddr 172.17.0.2 tcp dport 8080 ip saddr @allow4_tcp_8081 return comment \"dockwall-allow\"")
        );
        assert!(
            text.contains("ip daddr 172.17.0.2 tcp dport 8080 ip saddr @allow4_tcp_8081_nets return comment \"dockwall-allow\"")
        );
        assert!(
            text.contains("ip daddr 172.17.0.2 tcp dport 8080 tcp flags & (syn | ack) == syn drop comment \"dockwall-deny\"")
        );
        assert!(text.contains("meta nfproto ipv4 tcp dport 8081 ip saddr @allow4_tcp_8081 return comment \"dockwall-allow\""));
        assert!(
            text.contains("meta nfproto ipv4 tcp dport 8081 tcp flags & (syn | ack) == syn drop comment \"dockwall-deny\"")
        );
        assert!(
            text.contains("meta nfproto ipv6 tcp dport 8081 ip6 saddr @allow6_tcp_8081_nets return comment \"dockwall-allow\"")
        );
        // `any` needs no set; a specific bind names its address.
        assert!(
            text.contains("meta nfproto ipv4 udp dport 5353 return comment \"dockwall-allow\"")
        );
        assert!(text.contains(
            "meta nfproto ipv4 ip daddr 10.0.0.5 udp dport 5353 drop comment \"dockwall-deny\""
        ));
        let endpoint = text.find("ip daddr 172.17.0.2").unwrap();
        let host = text.find("meta nfproto ipv4 tcp dport 8081").unwrap();
        assert!(endpoint < host, "endpoints are judged before host ports");
    }
}
