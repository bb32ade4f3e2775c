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
//! live in interval sets, one per (family, protocol, published port). The
//! whole table is replaced in one `nft -f` transaction.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use crate::{
    dataplane::iptables::{COMMENT_ALLOW, COMMENT_DENY},
    policy::{AllowEntry, Proto, Scope, group_allowed},
};

/// `table inet dockwall`.
pub const TABLE: &str = "dockwall";
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

fn set_name(ipv6: bool, proto: Proto, port: u16) -> String {
    format!(
        "allow{}_{}_{port}",
        if ipv6 { 6 } else { 4 },
        proto_name(proto)
    )
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
        // `ip saddr @set` for one published port, "" for everyone, None for no one.
        let allowed = |port: u16, proto: Proto| -> Option<String> {
            let g = groups.iter().find(|g| g.port == port && g.proto == proto)?;
            Some(if g.everyone {
                String::new()
            } else {
                format!(" {addr} saddr @{}", set_name(ipv6, proto, port))
            })
        };
        for g in groups.iter().filter(|g| !g.everyone) {
            let elements: Vec<String> = g.nets.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(
                sets,
                "\tset {} {{\n\t\ttype {set_type}; flags interval; auto-merge;\n\t\telements = {{ {} }}\n\t}}",
                set_name(ipv6, g.proto, g.port),
                elements.join(", ")
            );
        }
        for (ep, policy_port) in scope
            .endpoints
            .iter()
            .filter(|(ep, _)| ep.ip.is_ipv6() == ipv6)
        {
            let p = proto_name(ep.proto);
            if let Some(src) = allowed(*policy_port, ep.proto) {
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
            if let Some(src) = allowed(port, proto) {
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
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{sets}\tchain prerouting {{\n\t\ttype filter hook prerouting priority {PRIORITY}; policy accept;\n{rules}\t}}\n}}\n"
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

fn nft_script(script: &str) -> anyhow::Result<()> {
    crate::command::pipe("nft", &["-f", "-"], script, "nftables")
}

/// Whether dockwall's table is in place.
pub fn installed() -> bool {
    Command::new("nft")
        .args(["list", "chain", "inet", TABLE, "prerouting"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
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
            entry(8081, Proto::Tcp, "2001:db8::/32"),
            entry(5353, Proto::Udp, "0.0.0.0/0"),
        ]);
        let text = compile(&entries, &scope, &["eth0".to_string()], false);
        assert!(text.starts_with("table inet dockwall\ndelete table inet dockwall\n"));
        assert!(text.contains("iifname != { \"eth0\" } return\n"));
        assert!(text.contains("set allow4_tcp_8081 {"));
        assert!(text.contains("elements = { 192.0.2.0/24 }"));
        assert!(
            text.contains("ip daddr 172.17.0.2 tcp dport 8080 ip saddr @allow4_tcp_8081 return comment \"dockwall-allow\"")
        );
        assert!(
            text.contains("ip daddr 172.17.0.2 tcp dport 8080 tcp flags & (syn | ack) == syn drop comment \"dockwall-deny\"")
        );
        assert!(text.contains("meta nfproto ipv4 tcp dport 8081 ip saddr @allow4_tcp_8081 return comment \"dockwall-allow\""));
        assert!(
            text.contains("meta nfproto ipv4 tcp dport 8081 tcp flags & (syn | ack) == syn drop comment \"dockwall-deny\"")
        );
        assert!(
            text.contains("meta nfproto ipv6 tcp dport 8081 ip6 saddr @allow6_tcp_8081 return comment \"dockwall-allow\"")
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
