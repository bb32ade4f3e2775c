//! Docker Engine 29's nftables firewall backend, reproduced: no Docker 29
//! binary is reachable here, so a real dockerd (the lab's) runs with its
//! own firewalling off (`--iptables=false`, no userland proxy) and this
//! phase writes, for its container, the ruleset moby's nftabler writes
//! (daemon/libnetwork/drivers/bridge/internal/nftabler; the shape of
//! integration/network/bridge/nftablesdoc/generated/usernet-portmap.md):
//! table `ip docker-bridges`, DNAT in a dstnat (-100) prerouting chain,
//! forward filtering at priority filter (0) with per-bridge verdict maps,
//! direct access to the container dropped at raw (-300), masquerade, and
//! no `DOCKER-USER` anywhere. Then the eBPF filter and the nftables
//! fallback, each alone, must let the allowed source in and keep the other
//! out, and the container's own egress must keep working.

use std::process::Command;

use anyhow::Context as _;

use crate::{
    e2e::{Report, blocked, http_is, retry},
    lab::{Client, Dockerd, Dockwall},
    util::{capture, output},
};

/// The host port the reproduction publishes (clear of the other phases').
const PORT: u16 = 8089;

/// Removes the reproduced tables when dropped.
struct Tables;

impl Drop for Tables {
    fn drop(&mut self) {
        for family in ["ip", "ip6"] {
            let _ = output(Command::new("nft").args(["delete", "table", family, "docker-bridges"]));
        }
    }
}

/// The ruleset of Docker 29's nftables backend for one container on
/// docker0 publishing `PORT -> 8080`. Priorities as numbers (dstnat -100,
/// filter 0, srcnat 100, raw -300): Debian 12's nft 1.0.6 refuses the
/// names in some hooks.
fn ruleset(container_ip: &str) -> String {
    format!(
        r#"table ip docker-bridges {{
	map filter-forward-in-jumps {{
		type ifname : verdict
		elements = {{ "docker0" : jump filter-forward-in__docker0 }}
	}}
	map filter-forward-out-jumps {{
		type ifname : verdict
		elements = {{ "docker0" : jump filter-forward-out__docker0 }}
	}}
	map nat-postrouting-in-jumps {{
		type ifname : verdict
		elements = {{ "docker0" : jump nat-postrouting-in__docker0 }}
	}}
	map nat-postrouting-out-jumps {{
		type ifname : verdict
		elements = {{ "docker0" : jump nat-postrouting-out__docker0 }}
	}}
	chain filter-forward-in__docker0 {{
		ct state established,related counter accept
		iifname "docker0" counter accept comment "ICC"
		ip daddr {container_ip} tcp dport 8080 counter accept
		counter drop comment "UNPUBLISHED PORT DROP"
	}}
	chain filter-forward-out__docker0 {{
		ct state established,related counter accept
		counter accept comment "OUTGOING"
	}}
	chain nat-postrouting-in__docker0 {{
	}}
	chain nat-postrouting-out__docker0 {{
		oifname != "docker0" ip saddr 172.17.0.0/16 counter masquerade comment "MASQUERADE"
	}}
	chain nat-prerouting-and-output {{
		iifname != "docker0" tcp dport {PORT} counter dnat to {container_ip}:8080 comment "DNAT"
	}}
	chain filter-FORWARD {{
		type filter hook forward priority 0; policy accept;
		oifname vmap @filter-forward-in-jumps
		iifname vmap @filter-forward-out-jumps
	}}
	chain nat-OUTPUT {{
		type nat hook output priority -100; policy accept;
		ip daddr != 127.0.0.0/8 fib daddr type local counter jump nat-prerouting-and-output
	}}
	chain nat-POSTROUTING {{
		type nat hook postrouting priority 100; policy accept;
		iifname vmap @nat-postrouting-out-jumps
		oifname vmap @nat-postrouting-in-jumps
	}}
	chain nat-PREROUTING {{
		type nat hook prerouting priority -100; policy accept;
		fib daddr type local counter jump nat-prerouting-and-output
	}}
	chain raw-PREROUTING {{
		type filter hook prerouting priority -300; policy accept;
		ip daddr {container_ip} iifname != "docker0" counter drop comment "DROP DIRECT ACCESS"
	}}
}}
"#
    )
}

pub fn run(
    r: &mut Report,
    dockerd: &mut Dockerd,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    // Docker 29 with nftables writes no iptables rule and, like this
    // reproduction, needs no userland proxy for outside clients.
    dockerd.restart_with(&[
        "--iptables=false",
        "--ip6tables=false",
        "--userland-proxy=false",
    ])?;
    let _ = dockerd.cli(&["rm", "-f", "web29"]);
    dockerd.run_web("web29", &["-p", &format!("{PORT}:8080")])?;
    let ip = dockerd.container_ip("web29")?;
    capture(Command::new("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
    let _tables = Tables;
    let rules = std::env::temp_dir().join(format!("dockwall-docker29-{}.nft", std::process::id()));
    std::fs::write(&rules, ruleset(&ip)).context("writing the reproduced ruleset")?;
    let loaded_rules = capture(Command::new("nft").arg("-f").arg(&rules));
    let _ = std::fs::remove_file(&rules);
    loaded_rules.context("nft -f (the Docker 29 ruleset)")?;
    let docker_iptables = capture(Command::new("iptables").args(["-S"]))?;
    r.expect(
        "docker 29 reproduction: Docker's rules are only in nftables (no DOCKER-USER, no DOCKER chain)",
        !docker_iptables.contains("DOCKER"),
        || docker_iptables.clone(),
    );
    let a_url = format!("{}:{PORT}", a.host4);
    let b_url = format!("{}:{PORT}", b.host4);
    r.check(
        "docker 29 reproduction: without dockwall both sources reach the container through its DNAT",
        http_is(a, &a_url, "web29").and_then(|()| http_is(b, &b_url, "web29")),
    );
    r.check(
        "docker 29 reproduction: direct access to the container address is dropped (raw -300)",
        blocked(b, &format!("{ip}:8080")),
    );
    dw.ok(&["allow", &a.addr4, "--port", &PORT.to_string()])?;
    for (plane, flags) in [
        ("ebpf", &["--no-iptables"][..]),
        ("nftables", &["--no-ebpf", "--fallback", "nftables"][..]),
    ] {
        let loaded = dw.load_with(&[&a.host_if, &b.host_if], flags, None)?;
        r.check(
            &format!("docker 29 reproduction, {plane}: the allowed source gets in"),
            retry(|| http_is(a, &a_url, "web29")),
        );
        r.check(
            &format!("docker 29 reproduction, {plane}: the other source is blocked"),
            blocked(b, &b_url),
        );
        r.check(
            &format!("docker 29 reproduction, {plane}: the container's egress works (masqueraded)"),
            crate::equivalence::tcp_egress(dockerd, "web29", a, 8091),
        );
        drop(loaded);
        dw.ok(&["unload"])?;
        r.check(
            &format!(
                "docker 29 reproduction, {plane}: after unload the other source gets in again"
            ),
            http_is(b, &b_url, "web29"),
        );
    }
    dw.ok(&["revoke", &a.addr4, "--port", &PORT.to_string()])?;
    let _ = dockerd.cli(&["rm", "-f", "web29"]);
    Ok(())
}
