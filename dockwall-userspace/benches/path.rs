//! The whole forwarding path: what dropping (or letting in) a new
//! connection costs per packet with each way of filtering Docker's
//! published ports, all measured in one run on the same Docker-shaped path.
//!
//! Every point is measured for IPv4 and for IPv6 (`--family v4|v6` for one),
//! and the allowed path both cold (many sources spread over the policy)
//! and warm (one source, a new connection each packet).
//!
//! Two network namespaces joined by a veth pair: a generator and a router
//! shaped like a Docker host (nat PREROUTING -> DOCKER -> DNAT of published
//! 8081 to 10.77.2.2:8080; filter FORWARD -> DOCKER-USER -> DOCKER; policy
//! DROP; the "container" is a third namespace whose veth end drops every
//! packet at tc ingress, so a forwarded packet ends in the router's transmit
//! counter for that veth and nothing answers). The generator writes Ethernet frames
//! (TCP SYNs, a new source address and port each: many flows, not one hot
//! flow) into its end of the veth with AF_PACKET and PACKET_QDISC_BYPASS.
//! The router's receive path (tc ingress, conntrack, DNAT, FORWARD) runs in
//! the sender's softirq on the same CPU, so the time the sender spends per
//! packet is the path's cost per packet on one core (the generator's own
//! cost is the same in every column: see the baseline).
//!
//! Competitors, each in a fresh router namespace with the same policy:
//! nothing (baseline), a tc program that drops everything (the floor for
//! the drop path), dockwall's eBPF filter, dockwall's iptables fallback
//! (ipset), dockwall's nftables fallback, the seed recipe (one DOCKER-USER
//! rule per allowance) on iptables-nft and iptables-legacy, Docker's
//! documented conntrack-match rule per allowance, an nftables concatenated
//! set (saddr . dport), and one ipset hash:net,port with one rule.
//! Every measurement checks its outcome (allowed: every packet reached the
//! container side; disallowed: none did), so a misconfigured competitor
//! cannot pass as a fast one.
//!
//! The drop programs (both floors, dockwall at tc and at XDP) are also timed
//! on a single hot flow: one source and port, the same SYN again and again,
//! where a per-flow cost (or a counter every packet of the flow writes)
//! would show that many flows spread out.
//!
//!   cargo bench -p dockwall-userspace --bench path -- [--quick] [--xdp] [--counts N,N] [--family v4|v6] [--competitors KEY,KEY] --out DIR
//!
//! writes DIR/path.json, DIR/path.md and DIR/path.svg.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::{LinkOrder, TcAttachType, tc::TcAttachOptions};
use dockwall_common::{PROG_DROP, PROG_INGRESS, PROG_XDP, PROG_XDP_DROP};
use dockwall_userspace::{
    dataplane::ebpf::{self, Maps},
    dataplane::iptables::{self, Backend, Family},
    dataplane::nftables,
    policy::{self, AllowEntry, Binding, Proto},
};
use ipnet::IpNet;

#[path = "shared/mod.rs"]
mod shared;
use shared::machine;

const GEN_NS: &str = "dwb-gen";
const RT_NS: &str = "dwb-rt";
/// The "container": its end of the veth drops everything at tc ingress,
/// so a forwarded packet costs the same in every column and nothing answers.
const CT_NS: &str = "dwb-ct";
const GEN_IF: &str = "vgen";
const RT_IF: &str = "vrt";
/// The router's side of the container network (Docker's bridge port).
const CT_IF: &str = "vct";
const CT_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x03];
const GEN_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];
const RT_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const CONTAINER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1);
const CONTAINER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 2, 0, 0, 0, 0, 0, 2);
const PUBLISHED: u16 = 8081;
const CONTAINER_PORT: u16 = 8080;
/// Packets per timed run at most: each allowed SYN leaves a conntrack entry,
/// and the table is emptied before every run; this keeps it far from full.
const MAX_PACKETS: usize = 50_000;
/// Frames per sendmmsg call.
const BATCH: usize = 64;
/// Distinct sources per traffic kind (each frame also gets its own port).
const SOURCES: usize = 4096;
/// The seed recipe and Docker's conntrack rules are linear: 100k rules
/// would take minutes per point and say nothing new.
const LINEAR_MAX: usize = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Competitor {
    Baseline,
    DropAll,
    DockwallEbpf,
    DockwallIptables,
    DockwallNftables,
    SeedNft,
    SeedLegacy,
    DockerDocs,
    NftConcat,
    IpsetNetPort,
    /// An XDP program that drops everything: the floor at XDP.
    XdpDropAll,
    /// dockwall's decision at native XDP (`load --hook xdp`).
    DockwallXdp,
}

impl Competitor {
    const ALL: [Competitor; 10] = [
        Competitor::Baseline,
        Competitor::DropAll,
        Competitor::DockwallEbpf,
        Competitor::DockwallIptables,
        Competitor::DockwallNftables,
        Competitor::SeedNft,
        Competitor::SeedLegacy,
        Competitor::DockerDocs,
        Competitor::NftConcat,
        Competitor::IpsetNetPort,
    ];

    /// `--xdp`: the hooks side by side, each beside its drop-all floor.
    const XDP: [Competitor; 5] = [
        Competitor::Baseline,
        Competitor::DropAll,
        Competitor::DockwallEbpf,
        Competitor::XdpDropAll,
        Competitor::DockwallXdp,
    ];

    fn name(self) -> &'static str {
        match self {
            Competitor::Baseline => "nothing (baseline)",
            Competitor::DropAll => "tc drop-all (floor)",
            Competitor::DockwallEbpf => "dockwall eBPF",
            Competitor::DockwallIptables => "dockwall iptables fallback (ipset)",
            Competitor::DockwallNftables => "dockwall nftables fallback",
            Competitor::SeedNft => "seed recipe, iptables-nft",
            Competitor::SeedLegacy => "seed recipe, iptables-legacy",
            Competitor::DockerDocs => "Docker docs conntrack rules, iptables-nft",
            Competitor::NftConcat => "nftables concat set",
            Competitor::IpsetNetPort => "ipset hash:net,port",
            Competitor::XdpDropAll => "XDP drop-all (floor)",
            Competitor::DockwallXdp => "dockwall eBPF at XDP",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Competitor::Baseline => "baseline",
            Competitor::DropAll => "drop_all",
            Competitor::DockwallEbpf => "dockwall_ebpf",
            Competitor::DockwallIptables => "dockwall_iptables",
            Competitor::DockwallNftables => "dockwall_nftables",
            Competitor::SeedNft => "seed_iptables_nft",
            Competitor::SeedLegacy => "seed_iptables_legacy",
            Competitor::DockerDocs => "docker_docs_conntrack",
            Competitor::NftConcat => "nft_concat_set",
            Competitor::IpsetNetPort => "ipset_net_port",
            Competitor::XdpDropAll => "xdp_drop_all",
            Competitor::DockwallXdp => "dockwall_xdp",
        }
    }

    fn backend(self) -> Backend {
        if self == Competitor::SeedLegacy {
            Backend::Legacy
        } else {
            Backend::Nft
        }
    }

    fn linear(self) -> bool {
        matches!(
            self,
            Competitor::SeedNft | Competitor::SeedLegacy | Competitor::DockerDocs
        )
    }
}

struct Row {
    competitor: Competitor,
    family: Family,
    allowances: usize,
    /// Time to install the policy into a fresh router (ms).
    install_ms: f64,
    /// Allowed, many sources: each packet's lookup finds cold cache lines.
    allowed_ns: Option<f64>,
    /// Allowed, one source (a new port each packet, so still a new
    /// connection each): the lookup's lines stay in cache.
    warm_ns: Option<f64>,
    disallowed_ns: f64,
    /// Disallowed, one hot flow (the drop programs only).
    hot_ns: Option<f64>,
    packets: usize,
}

struct Config {
    out: PathBuf,
    /// Times the whole set of measurements is repeated.
    sweeps: usize,
    runs: usize,
    target_run: Duration,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench"));
    let config = Config {
        out,
        runs: if quick { 3 } else { 5 },
        sweeps: if quick { 1 } else { 3 },
        target_run: Duration::from_millis(if quick { 60 } else { 300 }),
    };
    // --xdp: only the tc and XDP hooks and their floors, into path-xdp.*.
    let xdp = args.iter().any(|a| a == "--xdp");
    let all: &[Competitor] = if xdp {
        &Competitor::XDP
    } else {
        &Competitor::ALL
    };
    // --competitors dockwall_ebpf,ipset_net_port: only these (by their JSON
    // key) beside the baseline and the drop-all floor, which every ratio
    // needs: a shorter run that sets two competitors side by side.
    let competitors: Vec<Competitor> = match args.iter().position(|a| a == "--competitors") {
        Some(i) => {
            let list = args
                .get(i + 1)
                .context("--competitors needs a comma-separated list of keys, e.g. dockwall_ebpf,ipset_net_port")?;
            let keys: Vec<&str> = list.split(',').collect();
            if let Some(bad) = keys.iter().find(|k| !all.iter().any(|c| c.key() == **k)) {
                let known: Vec<&str> = all.iter().map(|c| c.key()).collect();
                bail!(
                    "--competitors: no competitor {bad:?}; known: {}",
                    known.join(", ")
                );
            }
            all.iter()
                .copied()
                .filter(|c| {
                    matches!(c, Competitor::Baseline | Competitor::DropAll)
                        || keys.contains(&c.key())
                })
                .collect()
        }
        None => all.to_vec(),
    };
    // --counts 10,1000000: only these policy sizes (a developer's shortcut).
    let counts: Vec<usize> = match args.iter().position(|a| a == "--counts") {
        Some(i) => args
            .get(i + 1)
            .context("--counts needs a comma-separated list of sizes, e.g. --counts 10,1000000")?
            .split(',')
            .map(|n| {
                n.parse()
                    .with_context(|| format!("--counts: {n:?} is not a number of allowances"))
            })
            .collect::<anyhow::Result<_>>()?,
        None => match (quick, xdp) {
            (true, _) => vec![10, 1_000],
            (false, true) => vec![10, 1_000, 100_000],
            (false, false) => vec![10, 100, 1_000, 10_000, 100_000, 1_000_000],
        },
    };
    // --family v4 or v6: only that family (the --xdp run is IPv4 only).
    let families: Vec<Family> = match args.iter().position(|a| a == "--family") {
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some("v4") => vec![Family::V4],
            Some("v6") => vec![Family::V6],
            other => bail!("--family takes v4 or v6, not {other:?}"),
        },
        None if xdp => vec![Family::V4],
        None => Family::ALL.to_vec(),
    };
    let home = NetnsHome::open()?;
    // Whole sweeps, repeated: a slow drift of the machine (a noisy
    // neighbour for a minute) then lands on every competitor, not on the
    // few measured while it lasted. Each point is the median over sweeps.
    let mut samples: Vec<Vec<Row>> = Vec::new();
    for sweep in 0..config.sweeps {
        let mut i = 0;
        for &family in &families {
            for &n in &counts {
                for &competitor in &competitors {
                    if competitor.linear() && n > LINEAR_MAX {
                        continue;
                    }
                    let row =
                        measure(&config, &home, competitor, family, n).with_context(|| {
                            format!(
                                "{} with {n} {} allowances",
                                competitor.name(),
                                family_name(family)
                            )
                        })?;
                    let ns = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0} ns"));
                    eprintln!(
                        "sweep {sweep} {} {:>7} {:<44} install {:>8.1} ms  allowed {:>9}  warm {:>9}  disallowed {:>8.0} ns/pkt  ({} pkts)",
                        family_name(family),
                        n,
                        competitor.name(),
                        row.install_ms,
                        ns(row.allowed_ns),
                        ns(row.warm_ns),
                        row.disallowed_ns,
                        row.packets
                    );
                    if sweep == 0 {
                        samples.push(Vec::new());
                    }
                    samples[i].push(row);
                    i += 1;
                }
            }
        }
    }
    let rows: Vec<Row> = samples.into_iter().map(median_row).collect();
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("creating {}", config.out.display()))?;
    let mode = if quick { "quick" } else { "full" };
    if xdp {
        write(
            &config.out.join("path-xdp.json"),
            &json(&rows, &config, mode),
        )?;
        write(
            &config.out.join("path-xdp.md"),
            &xdp_markdown(&rows, &config, mode),
        )?;
        println!("wrote {}/path-xdp.json, path-xdp.md", config.out.display());
        return Ok(());
    }
    write(&config.out.join("path.json"), &json(&rows, &config, mode))?;
    write(&config.out.join("path.md"), &markdown(&rows, &config, mode))?;
    let v4: Vec<&Row> = rows.iter().filter(|r| r.family == Family::V4).collect();
    let plotted = if v4.is_empty() {
        rows.iter().collect()
    } else {
        v4
    };
    write(&config.out.join("path.svg"), &svg(&plotted))?;
    println!(
        "wrote {}/path.json, path.md, path.svg",
        config.out.display()
    );
    Ok(())
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

// ---- namespaces ----------------------------------------------------------------------

/// The namespace the bench started in, to return to.
struct NetnsHome(File);

impl NetnsHome {
    fn open() -> anyhow::Result<Self> {
        File::open("/proc/self/ns/net")
            .map(NetnsHome)
            .context("opening /proc/self/ns/net")
    }

    fn enter(&self) -> anyhow::Result<()> {
        setns_fd(&self.0, "the initial namespace")
    }
}

fn setns_fd(file: &File, what: &str) -> anyhow::Result<()> {
    // SAFETY: setns on the calling thread with an fd we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns({what}, CLONE_NEWNET)"));
    }
    Ok(())
}

fn enter_ns(ns: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    setns_fd(&file, &path)
}

fn sh(script: &str) -> anyhow::Result<()> {
    let out = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .output()
        .context("spawning sh")?;
    if !out.status.success() {
        bail!(
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The product's own helper: feeds `input` to a tool, errors name it.
fn pipe(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    dockwall_userspace::command::pipe(cmd, args, input, cmd)
}

/// A generator and a router namespace; removed on drop (the veth and the
/// container veth go with them, and so do their iptables, ipsets, nftables and
/// conntrack tables).
struct Lab {
    sink: Option<aya::Ebpf>,
}

impl Lab {
    fn new(home: &NetnsHome) -> anyhow::Result<Lab> {
        home.enter()?;
        Lab::remove();
        let mut lab = Lab { sink: None };
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        // The router has IPv6 on (it forwards the IPv6 runs); its own
        // ICMPv6 out of the container veth (MLD reports, neighbour
        // discovery) would count as forwarded packets, so OUTPUT drops it.
        sh(&format!(
            "set -e
             ip netns add {GEN_NS}
             ip netns add {RT_NS}
             ip netns add {CT_NS}
             for ns in {GEN_NS} {CT_NS}; do
               ip netns exec $ns sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
             done
             ip netns exec {RT_NS} sysctl -qw net.ipv6.conf.all.forwarding=1 net.ipv6.conf.default.accept_dad=0
             ip link add {GEN_IF} netns {GEN_NS} address {gm} type veth peer name {RT_IF} netns {RT_NS} address {rm}
             ip -n {GEN_NS} link set lo up
             ip -n {GEN_NS} addr add 10.77.1.2/24 dev {GEN_IF}
             ip -n {GEN_NS} link set {GEN_IF} up
             ip -n {RT_NS} link set lo up
             ip -n {RT_NS} addr add {HOST_V4}/24 dev {RT_IF}
             ip -n {RT_NS} addr add {HOST_V6}/64 dev {RT_IF} nodad
             ip -n {RT_NS} link set {RT_IF} up
             ip link add {CT_IF} netns {RT_NS} type veth peer name eth0 netns {CT_NS} address {cm}
             ip -n {RT_NS} addr add 10.77.2.1/24 dev {CT_IF}
             ip -n {RT_NS} addr add fd77:2::1/64 dev {CT_IF} nodad
             ip netns exec {RT_NS} ip6tables-nft -A OUTPUT -o {CT_IF} -p ipv6-icmp -j DROP
             ip -n {RT_NS} link set {CT_IF} up
             ip -n {RT_NS} neigh add {CONTAINER_V4} lladdr {cm} dev {CT_IF} nud permanent
             ip -n {RT_NS} -6 neigh add {CONTAINER_V6} lladdr {cm} dev {CT_IF} nud permanent
             ip -n {CT_NS} link set lo up
             ip -n {CT_NS} addr add {CONTAINER_V4}/24 dev eth0
             ip -n {CT_NS} link set eth0 up
             ip -n {RT_NS} route add default via 10.77.1.2 dev {RT_IF}
             ip netns exec {RT_NS} sysctl -qw net.ipv4.ip_forward=1
             ip netns exec {RT_NS} sysctl -qw net.ipv4.conf.all.rp_filter=0
             ip netns exec {RT_NS} sysctl -qw net.ipv4.conf.{RT_IF}.rp_filter=0",
            gm = mac(GEN_MAC),
            rm = mac(RT_MAC),
            cm = mac(CT_MAC),
        ))
        .context("creating the bench namespaces")?;
        // The container's end drops everything (attached from inside its
        // namespace; the link lives as long as the lab).
        enter_ns(CT_NS)?;
        let sink = (|| -> anyhow::Result<aya::Ebpf> {
            let mut obj = ebpf::load_unpinned(ebpf::Hook::Tc)?;
            let prog = ebpf::program(&mut obj, PROG_DROP)?;
            prog.load().context("loading dw_drop")?;
            prog.attach_with_options(
                "eth0",
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .context("attaching the container-side sink")?;
            Ok(obj)
        })();
        home.enter()?;
        lab.sink = Some(sink?);
        Ok(lab)
    }

    fn remove() {
        for ns in [GEN_NS, RT_NS, CT_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Empties the router's conntrack table, so every run starts from the
    /// same state (allowed SYNs leave an entry each; a full table would
    /// make later runs pay for early eviction).
    fn flush_conntrack(&self) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", RT_NS, "conntrack", "-F"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running conntrack -F (package conntrack)")?;
        if !out.success() {
            bail!("conntrack -F in {RT_NS} failed: {out}");
        }
        Ok(())
    }

    /// Packets the router forwarded to the container network.
    fn forwarded(&self) -> anyhow::Result<u64> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                RT_NS,
                "cat",
                &format!("/sys/class/net/{CT_IF}/statistics/tx_packets"),
            ])
            .output()
            .context("reading the container veth's tx_packets")?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("tx_packets")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.sink = None;
        Lab::remove();
    }
}

// ---- the Docker-shaped router and each competitor ---------------------------------------

/// What Docker 20.10 installs for `-p 8081:8080`, in the given backend
/// and family (ip6tables with `--ipv6` and `ip6tables: true`).
fn docker_rules(backend: Backend, family: Family) -> anyhow::Result<()> {
    let (to, container, quiet) = match family {
        Family::V4 => (
            format!("{CONTAINER_V4}:{CONTAINER_PORT}"),
            format!("{CONTAINER_V4}/32"),
            String::new(),
        ),
        // This restore replaces the rule Lab::new put there.
        Family::V6 => (
            format!("[{CONTAINER_V6}]:{CONTAINER_PORT}"),
            format!("{CONTAINER_V6}/128"),
            format!("-A OUTPUT -o {CT_IF} -p ipv6-icmp -j DROP\n"),
        ),
    };
    let rules = format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER -p tcp -m tcp --dport {PUBLISHED} -j DNAT --to-destination {to}
COMMIT
*filter
:FORWARD DROP [0:0]
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
{quiet}-A FORWARD -j DOCKER-USER
-A FORWARD -o {CT_IF} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o {CT_IF} -j DOCKER
-A DOCKER -d {container} ! -i {CT_IF} -o {CT_IF} -p tcp -m tcp --dport {CONTAINER_PORT} -j ACCEPT
-A DOCKER-USER -j RETURN
COMMIT
"
    );
    pipe(&backend.tool(family, "-restore"), &[], &rules)
}

/// `n` allowances: distinct host addresses (/32 or /128) in 100.64.0.0/10
/// or 2001:db8:6440::/48.
fn allowance_sources(family: Family, n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(0x6440_0000u32 + i as u32 * 3 + 1)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(
                0x2001_0db8_6440_0000_0000_0000_0000_0000u128 + i as u128 * 3 + 1,
            )),
        })
        .collect()
}

/// Sources no allowance covers: 198.18.0.0/15 or 2001:db8:c612::/48.
fn disallowed_sources(family: Family) -> Vec<IpAddr> {
    (0..SOURCES)
        .map(|i| match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(0xC612_0000u32 + i as u32 * 7 + 1)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(
                0x2001_0db8_c612_0000_0000_0000_0000_0000u128 + i as u128 * 7 + 1,
            )),
        })
        .collect()
}

/// The allowance each source is: the address alone.
fn entries(sources: &[IpAddr]) -> BTreeSet<AllowEntry> {
    sources
        .iter()
        .map(|s| AllowEntry {
            port: PUBLISHED,
            proto: Proto::Tcp,
            net: IpNet::from(*s),
        })
        .collect()
}

/// Docker's binding of the published port on every address of the family.
fn binding(family: Family) -> Binding {
    let (any, container) = match family {
        Family::V4 => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V4(CONTAINER_V4)),
        Family::V6 => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), IpAddr::V6(CONTAINER_V6)),
    };
    Binding::new("web", "id", any, PUBLISHED, CONTAINER_PORT, Proto::Tcp)
        .with_container_ips(vec![container])
}

/// The source of an allowance (for the rule-per-allowance recipes).
fn host_net(s: &IpAddr) -> String {
    IpNet::from(*s).to_string()
}

/// Installs the competitor; keeps whatever must stay alive (the eBPF
/// object holds its tc links).
fn install(
    competitor: Competitor,
    family: Family,
    sources: &[IpAddr],
) -> anyhow::Result<Option<aya::Ebpf>> {
    let backend = competitor.backend();
    docker_rules(backend, family)?;
    let ifaces = vec![RT_IF.to_string()];
    let scope = policy::compile_scope(&[binding(family)]);
    let mut kept = None;
    match competitor {
        Competitor::Baseline => {}
        Competitor::DropAll | Competitor::DockwallEbpf => {
            let mut obj = ebpf::load_unpinned(ebpf::Hook::Tc)?;
            let prog = if competitor == Competitor::DropAll {
                ebpf::program(&mut obj, PROG_DROP)?.load()?;
                PROG_DROP
            } else {
                let mut maps = Maps::from_ebpf(&mut obj)?;
                maps.sync_published(&policy::compile_published(&[binding(family)]))?;
                let permanent = entries(sources).into_iter().map(|e| (e, 0)).collect();
                maps.sync_allow(&permanent)?;
                PROG_INGRESS
            };
            ebpf::program(&mut obj, prog)?
                .attach_with_options(
                    RT_IF,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .with_context(|| format!("attaching {prog} (tcx)"))?;
            kept = Some(obj);
        }
        Competitor::XdpDropAll | Competitor::DockwallXdp => {
            let mut obj = ebpf::load_unpinned(ebpf::Hook::Xdp)?;
            let prog = if competitor == Competitor::XdpDropAll {
                ebpf::xdp_program(&mut obj, PROG_XDP_DROP)?.load()?;
                PROG_XDP_DROP
            } else {
                let mut maps = Maps::from_ebpf(&mut obj)?;
                maps.sync_published(&policy::compile_published(&[binding(family)]))?;
                let permanent = entries(sources).into_iter().map(|e| (e, 0)).collect();
                maps.sync_allow(&permanent)?;
                PROG_XDP
            };
            // Native mode on the router's veth: the generator's frames
            // cross the pair into it, so the device's XDP program runs.
            ebpf::xdp_program(&mut obj, prog)?
                .attach(RT_IF, aya::programs::XdpMode::Driver)
                .with_context(|| format!("attaching {prog} (native XDP)"))?;
            kept = Some(obj);
        }
        Competitor::DockwallIptables => {
            iptables::apply(backend, &entries(sources), &scope, false)?;
            iptables::ensure_jumps(backend, &ifaces)?;
        }
        Competitor::DockwallNftables => {
            nftables::apply(&entries(sources), &scope, &ifaces, false)?;
        }
        Competitor::SeedNft | Competitor::SeedLegacy | Competitor::DockerDocs => {
            let mut rules = String::from("*filter\n:DOCKER-USER - [0:0]\n");
            for s in sources {
                if competitor == Competitor::DockerDocs {
                    let _ = writeln!(
                        rules,
                        "-A DOCKER-USER -p tcp -m conntrack --ctorigsrc {s} --ctorigdstport {PUBLISHED} -j RETURN"
                    );
                } else {
                    let _ = writeln!(
                        rules,
                        "-A DOCKER-USER -s {} -p tcp -m conntrack --ctorigdstport {PUBLISHED} -j RETURN",
                        host_net(s)
                    );
                }
            }
            let _ = writeln!(
                rules,
                "-A DOCKER-USER -i {RT_IF} -p tcp -m conntrack --ctstate NEW --ctorigdstport {PUBLISHED} -j DROP\n-A DOCKER-USER -j RETURN\nCOMMIT"
            );
            pipe(&backend.tool(family, "-restore"), &["--noflush"], &rules)?;
        }
        Competitor::NftConcat => {
            let elements: Vec<String> = sources
                .iter()
                .map(|s| format!("{s} . {PUBLISHED}"))
                .collect();
            let (addr_type, saddr) = match family {
                Family::V4 => ("ipv4_addr", "ip saddr"),
                Family::V6 => ("ipv6_addr", "ip6 saddr"),
            };
            let script = format!(
                "table inet bench {{\n\tset allow {{\n\t\ttype {addr_type} . inet_service; flags interval;\n\t\telements = {{ {} }}\n\t}}\n\tchain prerouting {{\n\t\ttype filter hook prerouting priority -150; policy accept;\n\t\tiifname != \"{RT_IF}\" return\n\t\tct state established,related return\n\t\t{saddr} . tcp dport @allow return\n\t\ttcp dport {PUBLISHED} tcp flags & (syn | ack) == syn drop\n\t}}\n}}\n",
                elements.join(", ")
            );
            pipe("nft", &["-f", "-"], &script)?;
        }
        Competitor::IpsetNetPort => {
            // In FORWARD the packet is already DNATed: the set must hold
            // the *container* port (the DOCKER-USER pitfall), and the
            // published port is matched in conntrack's original tuple.
            let ipset_family = match family {
                Family::V4 => "inet",
                Family::V6 => "inet6",
            };
            let mut set = format!(
                "create bench hash:net,port family {ipset_family} hashsize {} maxelem 1048576\n",
                sources.len().next_power_of_two().max(1024)
            );
            for s in sources {
                let _ = writeln!(set, "add bench {},tcp:{CONTAINER_PORT}", host_net(s));
            }
            pipe("ipset", &["restore"], &set)?;
            let rules = format!(
                "*filter\n:DOCKER-USER - [0:0]\n\
                 -A DOCKER-USER -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n\
                 -A DOCKER-USER -p tcp -m conntrack --ctstate DNAT --ctorigdstport {PUBLISHED} -m set --match-set bench src,dst -j RETURN\n\
                 -A DOCKER-USER -i {RT_IF} -p tcp -m conntrack --ctstate DNAT --ctorigdstport {PUBLISHED} -j DROP\n\
                 -A DOCKER-USER -j RETURN\nCOMMIT\n"
            );
            pipe(&backend.tool(family, "-restore"), &["--noflush"], &rules)?;
        }
    }
    Ok(kept)
}

// ---- traffic -----------------------------------------------------------------------------

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4 or IPv6/TCP SYN to the host's published port, with
/// valid checksums (conntrack verifies the TCP checksum in PREROUTING; a
/// bad one would be INVALID, never DNATed).
fn syn(src: IpAddr, sport: u16) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&PUBLISHED.to_be_bytes());
    tcp[4..8].copy_from_slice(&u32::from(sport).wrapping_mul(2_654_435_761).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut f = Vec::with_capacity(74);
    f.extend_from_slice(&RT_MAC);
    f.extend_from_slice(&GEN_MAC);
    // The pseudo-header the TCP checksum covers: addresses, then the
    // protocol and length (RFC 793; RFC 8200 8.1 for IPv6).
    let mut pseudo = Vec::with_capacity(60);
    match src {
        IpAddr::V4(src) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40;
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&HOST_V4.octets());
            let sum = checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            f.extend_from_slice(&ip);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&HOST_V4.octets());
            pseudo.extend_from_slice(&[0, 6, 0, 20]);
        }
        IpAddr::V6(src) => {
            f.extend_from_slice(&0x86DDu16.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&HOST_V6.octets());
            f.extend_from_slice(&ip);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&HOST_V6.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
        }
    }
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

/// `count` SYNs cycling over `sources`, each with a source port of its own
/// (`first_port` on): every frame opens a new flow.
fn frames(sources: &[IpAddr], count: usize, first_port: u32) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let port = 1024 + ((first_port + i as u32) % 64_000) as u16;
            syn(sources[i % sources.len()], port)
        })
        .collect()
}

/// Sends every frame from the generator namespace; returns the time spent.
fn send(frames: &[Vec<u8>]) -> anyhow::Result<Duration> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<Duration> {
                enter_ns(GEN_NS)?;
                pin_to_last_cpu()?;
                // SAFETY: plain socket calls on an fd we own and close below.
                let fd = unsafe {
                    // Protocol 0: a socket that only sends. ETH_P_ALL would
                    // make it a tap that gets a copy of every frame sent.
                    libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
                };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
                }
                let result = send_on(fd, frames);
                unsafe { libc::close(fd) };
                result
            })
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))?
    })
}

/// The whole path runs in the sender's softirq on its CPU: keep it on one
/// CPU for the run (the last, away from CPU 0's housekeeping), so a
/// migration mid-run does not restart it with cold caches.
fn pin_to_last_cpu() -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism()
        .context("counting CPUs (sched_getaffinity)")?
        .get();
    // SAFETY: a zeroed cpu_set_t, filled by the libc macros, passed by
    // pointer with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus - 1, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sched_setaffinity(CPU {})", cpus - 1));
        }
    }
    Ok(())
}

fn send_on(fd: i32, frames: &[Vec<u8>]) -> anyhow::Result<Duration> {
    let name = std::ffi::CString::new(GEN_IF)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no {GEN_IF} in {GEN_NS}");
    }
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    // Sending only (protocol 0 receives nothing): the kernel takes each
    // frame's ethertype, IPv4 or IPv6, from its Ethernet header.
    addr.sll_protocol = 0;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr lives across the call.
    if unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
    }
    let one: i32 = 1;
    // SAFETY: an int option.
    if unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const i32).cast(),
            4,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
    }
    let started = Instant::now();
    for chunk in frames.chunks(BATCH) {
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut sent = 0;
        while sent < msgs.len() {
            // SAFETY: msgs and the iovecs they point to outlive the call.
            let n = unsafe {
                libc::sendmmsg(fd, msgs[sent..].as_mut_ptr(), (msgs.len() - sent) as u32, 0)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e).context("sendmmsg(AF_PACKET)");
            }
            sent += n as usize;
        }
    }
    Ok(started.elapsed())
}

// ---- one measurement ---------------------------------------------------------------------

/// Which frames a run sends.
#[derive(Clone, Copy)]
enum Flows {
    /// A new source (round robin over the list) and port each packet.
    Many,
    /// The first source and one port, every packet the same SYN.
    Hot,
}

/// Median ns/packet over `runs`, each checking what reached the container
/// side; `want_through`: all of them, or none.
fn timed(
    lab: &Lab,
    runs: usize,
    sources: &[IpAddr],
    flows: Flows,
    packets: usize,
    want_through: bool,
    port_base: &mut u32,
) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let batch = match flows {
            Flows::Many => frames(sources, packets, *port_base),
            Flows::Hot => vec![syn(sources[0], 40_000); packets],
        };
        *port_base += packets as u32;
        lab.flush_conntrack()?;
        // The flushed entries are freed after an RCU grace period; let
        // that work run before the clock starts, not during the run.
        std::thread::sleep(Duration::from_millis(20));
        let before = lab.forwarded()?;
        let took = send(&batch)?;
        let through = lab.forwarded()? - before;
        let expected = if want_through { packets as u64 } else { 0 };
        if through != expected {
            bail!("{through} of {packets} packets reached the container side, expected {expected}");
        }
        samples.push(took.as_nanos() as f64 / packets as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn measure(
    config: &Config,
    home: &NetnsHome,
    competitor: Competitor,
    family: Family,
    n: usize,
) -> anyhow::Result<Row> {
    let lab = Lab::new(home)?;
    enter_ns(RT_NS)?;
    let allowed = allowance_sources(family, n);
    let started = Instant::now();
    let kept = install(competitor, family, &allowed);
    let install_ms = started.elapsed().as_secs_f64() * 1e3;
    let result = (|| -> anyhow::Result<Row> {
        let _kept = kept?;
        // Spread over the whole list: a linear rule set pays its average.
        let step = (n / SOURCES).max(1);
        let allowed_sample: Vec<IpAddr> = allowed.iter().step_by(step).copied().collect();
        // Warm: the middle allowance, so a linear rule set pays its average.
        let warm_source = [allowed[n / 2]];
        let disallowed = disallowed_sources(family);
        let passes = matches!(competitor, Competitor::Baseline);
        // Size each run to about `target_run` from a short probe.
        let mut port_base = 0u32;
        let probe = timed(
            &lab,
            1,
            &disallowed,
            Flows::Many,
            512,
            passes,
            &mut port_base,
        )?;
        let packets =
            ((config.target_run.as_nanos() as f64 / probe) as usize).clamp(2_000, MAX_PACKETS);
        let disallowed_ns = timed(
            &lab,
            config.runs,
            &disallowed,
            Flows::Many,
            packets,
            passes,
            &mut port_base,
        )?;
        let drops = matches!(
            competitor,
            Competitor::DropAll
                | Competitor::DockwallEbpf
                | Competitor::XdpDropAll
                | Competitor::DockwallXdp
        );
        let hot_ns = if drops {
            Some(timed(
                &lab,
                config.runs,
                &disallowed,
                Flows::Hot,
                packets,
                false,
                &mut port_base,
            )?)
        } else {
            None
        };
        let lets_in = !matches!(competitor, Competitor::DropAll | Competitor::XdpDropAll);
        let mut allowed = |sources: &[IpAddr]| -> anyhow::Result<Option<f64>> {
            if !lets_in {
                return Ok(None);
            }
            let ns = timed(
                &lab,
                config.runs,
                sources,
                Flows::Many,
                packets,
                true,
                &mut port_base,
            )?;
            Ok(Some(ns))
        };
        let allowed_ns = allowed(&allowed_sample)?;
        let warm_ns = allowed(&warm_source)?;
        Ok(Row {
            competitor,
            family,
            allowances: n,
            install_ms,
            allowed_ns,
            warm_ns,
            disallowed_ns,
            hot_ns,
            packets,
        })
    })();
    home.enter()?;
    drop(lab);
    result
}

/// `--xdp`: per allowance count, each program's drop cost beside its floor,
/// dockwall at XDP against dockwall at tc, and drops per second per core.
fn xdp_markdown(rows: &[Row], config: &Config, mode: &str) -> String {
    let get = |c: Competitor, n: usize| find(rows, c, Family::V4, n);
    let mut counts: Vec<usize> = rows.iter().map(|r| r.allowances).collect();
    counts.dedup();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# XDP vs tc on the whole path ({mode} run, {} sweeps x {} runs, one core)\n\n\
         Generated by `cargo bench -p dockwall-userspace --bench path -- --xdp`. The generator's \
         frames (TCP SYNs, a new source and port each) cross the veth pair into the router's end, \
         where the program under test runs: tc ingress, or native XDP in the veth driver. ns per \
         packet of the sender's whole time (its own cost is the baseline's disallowed column).\n\n\
         | allowances | tc drop-all | dockwall tc drop | ratio | XDP drop-all | dockwall XDP drop | ratio | tc/XDP (dockwall) | dockwall XDP drops/s/core | dockwall tc allowed | dockwall XDP allowed |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        config.sweeps, config.runs
    );
    for &n in &counts {
        let (Some(tc_floor), Some(tc), Some(xdp_floor), Some(xdp)) = (
            get(Competitor::DropAll, n),
            get(Competitor::DockwallEbpf, n),
            get(Competitor::XdpDropAll, n),
            get(Competitor::DockwallXdp, n),
        ) else {
            continue;
        };
        let allowed = |r: &Row| {
            r.allowed_ns
                .map_or("n/a".to_string(), |v| format!("{v:.0}"))
        };
        let _ = writeln!(
            md,
            "| {n} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.2} M | {} | {} |",
            tc_floor.disallowed_ns,
            tc.disallowed_ns,
            tc.disallowed_ns / tc_floor.disallowed_ns,
            xdp_floor.disallowed_ns,
            xdp.disallowed_ns,
            xdp.disallowed_ns / xdp_floor.disallowed_ns,
            tc.disallowed_ns / xdp.disallowed_ns,
            1e3 / xdp.disallowed_ns,
            allowed(tc),
            allowed(xdp),
        );
    }
    let _ = writeln!(
        md,
        "\nOne hot flow (one source and port, the same SYN every packet), dropped:\n\n\
         | allowances | tc drop-all | dockwall tc drop | ratio | XDP drop-all | dockwall XDP drop | ratio | dockwall XDP drops/s/core |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in &counts {
        let hot = |c| get(c, *n).and_then(|r: &Row| r.hot_ns);
        let (Some(tc_floor), Some(tc), Some(xdp_floor), Some(xdp)) = (
            hot(Competitor::DropAll),
            hot(Competitor::DockwallEbpf),
            hot(Competitor::XdpDropAll),
            hot(Competitor::DockwallXdp),
        ) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {n} | {tc_floor:.0} | {tc:.0} | {:.2}x | {xdp_floor:.0} | {xdp:.0} | {:.2}x | {:.2} M |",
            tc / tc_floor,
            xdp / xdp_floor,
            1e3 / xdp
        );
    }
    if let Some(base) = rows.iter().find(|r| r.competitor == Competitor::Baseline) {
        let _ = writeln!(
            md,
            "\nBaseline (no filter; the generator's own cost is in every figure): disallowed {:.0} ns/pkt at {} allowances.",
            base.disallowed_ns, base.allowances
        );
    }
    md
}

/// The median of each figure over the sweeps of one point.
fn median_row(mut rows: Vec<Row>) -> Row {
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    let install_ms = median(rows.iter().map(|r| r.install_ms).collect());
    let disallowed_ns = median(rows.iter().map(|r| r.disallowed_ns).collect());
    let allowed: Vec<f64> = rows.iter().filter_map(|r| r.allowed_ns).collect();
    let allowed_ns = (!allowed.is_empty()).then(|| median(allowed));
    let hot: Vec<f64> = rows.iter().filter_map(|r| r.hot_ns).collect();
    let hot_ns = (!hot.is_empty()).then(|| median(hot));
    let warm: Vec<f64> = rows.iter().filter_map(|r| r.warm_ns).collect();
    let warm_ns = (!warm.is_empty()).then(|| median(warm));
    let mut row = rows.swap_remove(0);
    row.install_ms = install_ms;
    row.disallowed_ns = disallowed_ns;
    row.allowed_ns = allowed_ns;
    row.hot_ns = hot_ns;
    row.warm_ns = warm_ns;
    row
}

// ---- output --------------------------------------------------------------------------

fn find(rows: &[Row], c: Competitor, family: Family, n: usize) -> Option<&Row> {
    rows.iter()
        .find(|r| r.competitor == c && r.family == family && r.allowances == n)
}

fn json(rows: &[Row], config: &Config, mode: &str) -> String {
    let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.1}"));
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"competitor\": \"{}\", \"family\": \"{}\", \"allowances\": {}, \"install_ms\": {:.1}, \"allowed_ns\": {}, \"allowed_warm_ns\": {}, \"disallowed_ns\": {:.1}, \"hot_flow_disallowed_ns\": {}, \"allowed_pps\": {}, \"disallowed_pps\": {:.0}, \"packets_per_run\": {}}}",
                r.competitor.key(),
                match r.family {
                    Family::V4 => "v4",
                    Family::V6 => "v6",
                },
                r.allowances,
                r.install_ms,
                opt(r.allowed_ns),
                opt(r.warm_ns),
                r.disallowed_ns,
                opt(r.hot_ns),
                r.allowed_ns.map_or("null".to_string(), |v| format!("{:.0}", 1e9 / v)),
                1e9 / r.disallowed_ns,
                r.packets
            )
        })
        .collect();
    format!(
        "{{\n  \"benchmark\": \"whole path: veth -> tc ingress -> conntrack -> DNAT -> FORWARD (AF_PACKET generator, one core)\",\n  \"mode\": \"{mode}\",\n  \"runs_median_of\": {},\n  \"sweeps_median_of\": {},\n  \"machine\": \"{}\",\n  \"rows\": [\n{}\n  ]\n}}\n",
        config.runs,
        config.sweeps,
        machine(),
        items.join(",\n")
    )
}

fn markdown(rows: &[Row], config: &Config, mode: &str) -> String {
    let mut counts: Vec<usize> = rows.iter().map(|r| r.allowances).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut md = format!(
        "Whole path, ns per packet on one core (median over {} sweeps of the median of {} runs; {mode} run; {}). \
         Each packet is a TCP SYN written into a veth with AF_PACKET; \
         it crosses tc ingress, conntrack, DNAT and FORWARD of a Docker-shaped router namespace. \
         \"allowed\": sources an allowance lets in (forwarded to the container network), a new source address and port each packet \
         (cold: spread over the whole policy); \"warm\": one allowed source, a new port each packet (still a new connection each; \
         the lookup's cache lines stay hot); \"disallowed\": sources none does, a new one each packet (the flood case; dropped). \
         \"+\" is the cost over the same traffic with nothing attached. Policy install time into a fresh router in the last column. \
         IPv4 allowances are /32s, IPv6 ones /128s.\n\n",
        config.sweeps,
        config.runs,
        machine()
    );
    for family in Family::ALL {
        if !rows.iter().any(|r| r.family == family) {
            continue;
        }
        let _ = writeln!(md, "\n## {}\n", family_name(family));
        for &n in &counts {
            let base = find(rows, Competitor::Baseline, family, n);
            let _ = writeln!(
                md,
                "\n**{n} allowances**\n\n| competitor | allowed ns (+) | allowed warm ns (+) | allowed pps | disallowed ns (+) | disallowed pps | install ms |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for r in rows
                .iter()
                .filter(|r| r.family == family && r.allowances == n)
            {
                let plus = |v: Option<f64>, b: Option<f64>| match (v, b) {
                    (Some(v), Some(b)) => format!("{v:.0} ({:+.0})", v - b),
                    (Some(v), None) => format!("{v:.0}"),
                    (None, _) => "n/a".to_string(),
                };
                let allowed_pps = r
                    .allowed_ns
                    .map_or("n/a".to_string(), |v| format!("{:.0}", 1e9 / v));
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {allowed_pps} | {} | {:.0} | {:.1} |",
                    r.competitor.name(),
                    plus(r.allowed_ns, base.and_then(|b| b.allowed_ns)),
                    plus(r.warm_ns, base.and_then(|b| b.warm_ns)),
                    plus(Some(r.disallowed_ns), base.map(|b| b.disallowed_ns)),
                    1e9 / r.disallowed_ns,
                    r.install_ms
                );
            }
        }
        md.push_str(&targets(rows, family, &counts));
    }
    md
}

/// The targets, each as a measured ratio from this run, marked
/// met or missed.
fn targets(rows: &[Row], family: Family, counts: &[usize]) -> String {
    let mut out = format!("\n**Targets, {}, from this run**\n\n", family_name(family));
    let verdict = |met: bool| if met { "met" } else { "**missed**" };
    let mut missed = Vec::new();
    for &n in counts {
        let get = |c| find(rows, c, family, n);
        let (Some(base), Some(floor), Some(dw)) = (
            get(Competitor::Baseline),
            get(Competitor::DropAll),
            get(Competitor::DockwallEbpf),
        ) else {
            continue;
        };
        let added = |r: &Row| r.allowed_ns.zip(base.allowed_ns).map(|(v, b)| v - b);
        let added_warm = |r: &Row| r.warm_ns.zip(base.warm_ns).map(|(v, b)| v - b);
        let dw_added = added(dw).unwrap_or(f64::NAN);
        let dw_warm = added_warm(dw).unwrap_or(f64::NAN);
        let drop = dw.disallowed_ns / floor.disallowed_ns;
        let _ = writeln!(
            out,
            "- {n} allowances: drop costs {drop:.2}x the drop-all floor (target <= 1.2x: {})",
            verdict(drop <= 1.2)
        );
        if drop > 1.2 {
            missed.push(format!("{n}: drop {drop:.2}x"));
        }
        if let (Some(hot), Some(hot_floor)) = (dw.hot_ns, floor.hot_ns) {
            let _ = writeln!(
                out,
                "  - one hot flow: {:.2}x the drop-all floor on the same flow ({hot:.0} vs {hot_floor:.0} ns; target <= 1.2x: {})",
                hot / hot_floor,
                verdict(hot / hot_floor <= 1.2)
            );
            if hot / hot_floor > 1.2 {
                missed.push(format!("{n}: hot-flow drop {:.2}x", hot / hot_floor));
            }
        }
        if let Some(ipt) = get(Competitor::DockwallIptables) {
            let _ = writeln!(
                out,
                "  - {:.2}x less than dropping the same policy in DOCKER-USER (dockwall's ipset rules; target >= 2.5x)",
                ipt.disallowed_ns / dw.disallowed_ns
            );
        }
        // The bar: never above either of these, cold or warm.
        for c in [Competitor::IpsetNetPort, Competitor::NftConcat] {
            let Some(r) = get(c) else { continue };
            for (what, ours, theirs) in [
                ("cold", dw_added, added(r)),
                ("warm", dw_warm, added_warm(r)),
            ] {
                let Some(theirs) = theirs else { continue };
                let met = ours <= theirs;
                let _ = writeln!(
                    out,
                    "  - allowed, {what}: dockwall adds {ours:.0} ns, {} adds {theirs:.0} ns (never above: {})",
                    c.name(),
                    verdict(met)
                );
                if !met {
                    missed.push(format!(
                        "{n}: allowed {what} {ours:+.0} vs {} {theirs:+.0}",
                        c.name()
                    ));
                }
            }
        }
        for c in [
            Competitor::SeedNft,
            Competitor::SeedLegacy,
            Competitor::DockerDocs,
            Competitor::DockwallNftables,
        ] {
            if let Some(r) = get(c)
                && let Some(a) = added(r)
            {
                let _ = writeln!(
                    out,
                    "  - allowed path: dockwall adds {dw_added:.0} ns, {} adds {a:.0} ns ({:.1}x)",
                    c.name(),
                    a / dw_added
                );
            }
        }
    }
    if missed.is_empty() {
        out.push_str("\nEvery target above is met in this run.\n");
    } else {
        let _ = writeln!(
            out,
            "\nMissed in this run ({}): {}. Run-to-run noise on one point is about +-150 ns on the allowed path (3 sweeps x 5 runs).",
            missed.len(),
            missed.join("; ")
        );
    }
    out
}

/// Disallowed (flood) cost per packet vs allowance count, one line per
/// competitor (log x axis).
fn svg(rows: &[&Row]) -> String {
    let (w, h, left, bottom, top, right) = (820.0, 460.0, 80.0, 50.0, 30.0, 300.0);
    let max_n = rows.iter().map(|r| r.allowances).max().unwrap_or(10) as f64;
    let max_ns = rows.iter().map(|r| r.disallowed_ns).fold(10.0, f64::max) * 1.1;
    let min_ns = rows
        .iter()
        .map(|r| r.disallowed_ns)
        .fold(f64::MAX, f64::min)
        .max(1.0)
        * 0.8;
    let x = |n: usize| {
        left + ((n as f64).log10() - 1.0) / (max_n.log10() - 1.0).max(1.0) * (w - left - right)
    };
    // Log y: the linear recipes are orders of magnitude above the rest.
    let y = |ns: f64| {
        h - bottom
            - (ns.max(min_ns).ln() - min_ns.ln()) / (max_ns.ln() - min_ns.ln()) * (h - bottom - top)
    };
    let frame = shared::Frame {
        w,
        h,
        left,
        bottom,
        top,
        right,
    };
    let mut s = frame.open(
        "Whole path: ns per disallowed new connection (flood), log scales",
        max_n,
        x,
        "allowances",
    );
    let mut tick = 10f64.powf(min_ns.log10().floor());
    while tick <= max_ns {
        if tick >= min_ns {
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{:.0}\" text-anchor=\"end\">{tick:.0} ns</text>",
                left - 6.0,
                y(tick) + 4.0
            );
        }
        tick *= 10.0;
    }
    let colors = [
        "#7f7f7f", "#000000", "#d62728", "#1f77b4", "#17becf", "#ff7f0e", "#8c564b", "#e377c2",
        "#2ca02c", "#9467bd",
    ];
    for (i, c) in Competitor::ALL.iter().enumerate() {
        let points: Vec<String> = rows
            .iter()
            .filter(|r| r.competitor == *c)
            .map(|r| format!("{:.1},{:.1}", x(r.allowances), y(r.disallowed_ns)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let color = colors[i % colors.len()];
        let width = if *c == Competitor::DockwallEbpf { 3 } else { 2 };
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            w - right + 10.0,
            top + 20.0 + 18.0 * i as f64,
            c.name()
        );
    }
    s.push_str("</svg>\n");
    s
}
