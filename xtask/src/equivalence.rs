//! Proof that the dataplanes agree: one matrix of real connection attempts
//! (sources inside, outside and at the edges of allowed CIDRs, IPv4 and
//! IPv6, TCP and UDP, published ports, a port two containers share on the
//! container side, the userland-proxy path, container endpoints reached
//! directly, an unpublished host service), run against no dockwall
//! (baseline), eBPF only, iptables only and nftables only. Every outcome is also checked
//! against what the policy says, computed here independently.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::lab::{Client, Dockerd, Dockwall};

/// Connection attempts in flight at once per client namespace.
const PARALLEL: usize = 160;
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    Refused,
    TimedOut,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L4 {
    Tcp,
    Udp,
}

/// One connection attempt: from `src` to `dst`, judged by `policy` (the
/// published port and protocol whose allowances decide), if in scope.
#[derive(Clone, Debug)]
struct Case {
    client: usize,
    src: IpAddr,
    dst: SocketAddr,
    l4: L4,
    policy: Option<(u16, L4)>,
    what: &'static str,
}

/// The allowances of the matrix: (source CIDR, port, proto) as given to
/// `dockwall allow`, and as the oracle reads them.
const ALLOW: &[(&str, &str)] = &[
    ("10.99.1.8/29", "8081"),
    ("10.99.1.32/28", "8082"),
    ("10.99.1.64/27", "5353/udp"),
    ("fd99:1::10/124", "8081"),
    ("fd99:1::30", "5353/udp"),
    ("10.99.2.0/28", "8082"),
];

fn allowed(src: IpAddr, port: u16, l4: L4) -> bool {
    ALLOW.iter().any(|(net, p)| {
        let (p, proto) = match p.split_once('/') {
            Some((p, "udp")) => (p, L4::Udp),
            Some((p, _)) => (p, L4::Tcp),
            None => (*p, L4::Tcp),
        };
        p.parse::<u16>().ok() == Some(port) && proto == l4 && contains(net, src)
    })
}

fn contains(net: &str, ip: IpAddr) -> bool {
    let (addr, len) = net
        .split_once('/')
        .unwrap_or((net, if net.contains(':') { "128" } else { "32" }));
    let (Ok(addr), Ok(len)) = (addr.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    match (addr, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

pub struct Matrix {
    /// Replies to container egress per dataplane that did not come back.
    pub egress_failures: Vec<String>,
    /// Routed (transit) traffic to another host on a published port number:
    /// (dataplane, got through) for each run.
    pub transit: Vec<(&'static str, bool)>,
    pub cases: usize,
    pub blocked_expected: usize,
    /// Of those, how many got through with no dockwall (must be all of them,
    /// or a "blocked" verdict could be the lab's doing, not the dataplane's).
    pub blocked_open_in_baseline: usize,
    /// Blocked-by-policy cases that did not get in even without dockwall.
    pub closed_in_baseline: Vec<String>,
    pub mismatches_between: usize,
    pub mismatches_vs_policy: Vec<String>,
}

/// Runs the matrix. Clients: `a` (many sources on 10.99.1.0/24 and
/// fd99:1::/64) and `b` (sources on 10.99.2.0/24).
pub fn run(dockerd: &Dockerd, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<Matrix> {
    add_sources(a, 2..=100, Some(2..=0x3f))?;
    add_sources(b, 2..=21, None)?;
    let web1 = dockerd.container_ip("web1")?;
    let web2 = dockerd.container_ip("web2")?;
    let dns = dockerd.container_ip("dns")?;
    let mut cases = Vec::new();
    for (index, client) in [a, b].iter().enumerate() {
        let host: IpAddr = client.host4.parse()?;
        let last = if index == 0 { 100 } else { 21 };
        let mut targets = host_targets(
            host,
            [
                "published 8081 -> web1:8080",
                "published 8082 -> web2:8080",
                "published 5353/udp -> dns:53",
                "host service, unpublished",
            ],
        );
        targets.extend([
            (
                SocketAddr::new(web1.parse()?, 8080),
                L4::Tcp,
                Some((8081, L4::Tcp)),
                "web1 endpoint, direct",
            ),
            (
                SocketAddr::new(web2.parse()?, 8080),
                L4::Tcp,
                Some((8082, L4::Tcp)),
                "web2 endpoint, direct",
            ),
            (
                SocketAddr::new(dns.parse()?, 53),
                L4::Udp,
                Some((5353, L4::Udp)),
                "dns endpoint, direct",
            ),
        ]);
        let prefix = client
            .addr4
            .rsplit_once('.')
            .map(|(p, _)| p.to_string())
            .unwrap_or_default();
        for n in 2..=last {
            let src: IpAddr = format!("{prefix}.{n}").parse()?;
            for &(dst, l4, policy, what) in &targets {
                cases.push(Case {
                    client: index,
                    src,
                    dst,
                    l4,
                    policy,
                    what,
                });
            }
        }
    }
    let host6: IpAddr = a.host6.parse()?;
    let targets6 = host_targets(
        host6,
        [
            "v6 8081 via userland proxy",
            "v6 8082 via userland proxy",
            "v6 5353/udp via userland proxy",
            "v6 host service, unpublished",
        ],
    );
    for n in 2..=0x3fu16 {
        let src: IpAddr = format!("fd99:1::{n:x}").parse()?;
        for &(dst, l4, policy, what) in &targets6 {
            cases.push(Case {
                client: 0,
                src,
                dst,
                l4,
                policy,
                what,
            });
        }
    }

    let _ = std::fs::remove_file(&dw.config);
    for (net, port) in ALLOW {
        let (code, _, err) = dw.run(&["allow", net, "--port", port])?;
        anyhow::ensure!(code == 0, "dockwall allow {net} --port {port}: {err}");
    }
    let mut egress_failures = Vec::new();
    let mut transit = Vec::new();
    let mut run_plane = |plane: &'static str, flags: &[&str]| -> anyhow::Result<Vec<Outcome>> {
        let _loaded = if flags.is_empty() {
            None
        } else {
            Some(dw.load_with(&[&a.host_if, &b.host_if], flags, None)?)
        };
        let outcomes = probe_all(&[a, b], &cases)?;
        let (tcp, udp) = container_egress(dockerd, a, b);
        egress_failures.extend(
            [tcp, udp]
                .into_iter()
                .filter_map(Result::err)
                .map(|e| format!("{plane}: {e:#}")),
        );
        transit.push((plane, transit_gets_through(a, b)?));
        Ok(outcomes)
    };
    let mut baseline = run_plane("baseline", &[])?;
    // The baseline only proves the setup lets everything in. A probe that
    // timed out there (a lost SYN or datagram under load) is tried once
    // more on its own before it counts: a path really closed fails twice.
    let retry: Vec<usize> = (0..cases.len())
        .filter(|&i| {
            let blocked = cases[i]
                .policy
                .is_some_and(|(port, l4)| !allowed(cases[i].src, port, l4));
            blocked && baseline[i] != Outcome::Connected
        })
        .collect();
    if !retry.is_empty() {
        let again: Vec<Case> = retry.iter().map(|&i| cases[i].clone()).collect();
        for (&i, outcome) in retry.iter().zip(probe_all(&[a, b], &again)?) {
            baseline[i] = outcome;
        }
    }
    let ebpf = run_plane("ebpf", &["--no-iptables", "--hook", "tc"])?;
    // The same decision at native XDP on the veths (Linux >= 5.18); an
    // older kernel compares tc with itself there.
    let xdp = if crate::util::kernel_has_xdp_hook() {
        run_plane("ebpf-xdp", &["--no-iptables", "--hook", "xdp"])?
    } else {
        println!("equivalence: no XDP plane on this kernel (--hook xdp needs Linux 5.18)");
        ebpf.clone()
    };
    let iptables = run_plane("iptables", &["--no-ebpf", "--fallback", "iptables"])?;
    let nftables = run_plane("nftables", &["--no-ebpf", "--fallback", "nftables"])?;

    let mut matrix = Matrix {
        egress_failures,
        transit,
        cases: cases.len(),
        blocked_expected: 0,
        blocked_open_in_baseline: 0,
        closed_in_baseline: Vec::new(),
        mismatches_between: 0,
        mismatches_vs_policy: Vec::new(),
    };
    for (i, case) in cases.iter().enumerate() {
        let blocked = case
            .policy
            .is_some_and(|(port, l4)| !allowed(case.src, port, l4));
        let want = if blocked {
            Outcome::TimedOut
        } else {
            baseline[i]
        };
        if blocked {
            matrix.blocked_expected += 1;
            if baseline[i] == Outcome::Connected {
                matrix.blocked_open_in_baseline += 1;
            } else {
                matrix.closed_in_baseline.push(format!(
                    "{} -> {} ({}): {:?} with no dockwall",
                    case.src, case.dst, case.what, baseline[i]
                ));
            }
        }
        if ebpf[i] != iptables[i] || ebpf[i] != nftables[i] || ebpf[i] != xdp[i] {
            matrix.mismatches_between += 1;
        }
        for (plane, got) in [
            ("ebpf", ebpf[i]),
            ("ebpf-xdp", xdp[i]),
            ("iptables", iptables[i]),
            ("nftables", nftables[i]),
        ] {
            if got != want {
                matrix.mismatches_vs_policy.push(format!(
                    "{plane}: {} -> {} ({}): got {got:?}, policy says {want:?} (baseline {:?})",
                    case.src, case.dst, case.what, baseline[i]
                ));
            }
        }
    }
    Ok(matrix)
}

/// `container` fetches a page from a server on `port` in `a`'s namespace:
/// out through Docker's masquerade, the answer back through the filter.
pub(crate) fn tcp_egress(
    dockerd: &Dockerd,
    container: &str,
    a: &Client,
    port: u16,
) -> anyhow::Result<()> {
    let server = a.http_server_once(port, "egress-ok")?;
    let request = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 3 {} {port}",
        a.addr4
    );
    let got = dockerd.cli(&["exec", container, "/bin/busybox", "sh", "-c", &request]);
    let _ = server.join();
    match got {
        Ok(body) if body.contains("egress-ok") => Ok(()),
        other => anyhow::bail!("container TCP egress: {other:?}"),
    }
}

/// Replies to container egress must come back whatever the dataplane: a
/// container's TCP connection out, and a container's UDP datagram that
/// masquerading sends from source port 5353, itself a published UDP port.
pub(crate) fn container_egress(
    dockerd: &Dockerd,
    a: &Client,
    b: &Client,
) -> (anyhow::Result<()>, anyhow::Result<()>) {
    let tcp = tcp_egress(dockerd, "web2", a, 8090);
    let udp = (|| {
        let server = b.udp_server(5300)?;
        let got = dockerd.cli(&[
            "exec",
            "dns",
            "/bin/udpecho",
            "send",
            &b.addr4,
            "5300",
            "5353",
            "egress",
        ]);
        let seen = server.join().unwrap_or_default();
        match (got, seen.first()) {
            (Ok(reply), Some(from)) if reply.contains("egress") && from.port() == 5353 => Ok(()),
            (Ok(_), Some(from)) => anyhow::bail!(
                "masquerade picked source port {} (the check needs 5353)",
                from.port()
            ),
            other => anyhow::bail!("container UDP egress from 5353: {other:?}"),
        }
    })();
    (tcp, udp)
}

/// Whether a connection routed *through* this host, from client a to a
/// server in client b on port 8081 (a published port number here), gets
/// through. Client a's main address has no allowance for 8081.
fn transit_gets_through(a: &Client, b: &Client) -> anyhow::Result<bool> {
    // Docker's FORWARD policy is DROP: let a <-> b be routed (after Docker's
    // DOCKER-USER jump, so dockwall's chain still sees it first).
    let _forward = ForwardRules::add(&a.host_if, &b.host_if)?;
    let server = b.http_server_once(8081, "transit")?;
    let target = format!("{}:8081", b.addr4);
    let got = a.http_get(&target);
    if got.is_err() {
        // Wake the server so it stops waiting.
        let _ = b.exec(|| std::net::TcpStream::connect(("127.0.0.1", 8081)));
    }
    let _ = server.join();
    Ok(got.is_ok_and(|body| body == "transit"))
}

/// FORWARD accepts between two interfaces, removed on drop.
struct ForwardRules(Vec<Vec<String>>);

impl ForwardRules {
    fn add(x: &str, y: &str) -> anyhow::Result<Self> {
        let rules: Vec<Vec<String>> = [(x, y), (y, x)]
            .iter()
            .map(|(i, o)| {
                ["FORWARD", "-i", i, "-o", o, "-j", "ACCEPT"]
                    .map(String::from)
                    .to_vec()
            })
            .collect();
        for rule in &rules {
            crate::util::run(std::process::Command::new("iptables").arg("-A").args(rule))?;
        }
        Ok(ForwardRules(rules))
    }
}

impl Drop for ForwardRules {
    fn drop(&mut self) {
        for rule in &self.0 {
            let _ = std::process::Command::new("iptables")
                .arg("-D")
                .args(rule)
                .output();
        }
    }
}

/// The host-side targets, labelled: both published TCP ports (two
/// containers that share container port 8080), the UDP port, and an
/// unpublished service.
type Target = (SocketAddr, L4, Option<(u16, L4)>, &'static str);

fn host_targets(host: IpAddr, labels: [&'static str; 4]) -> Vec<Target> {
    vec![
        (
            SocketAddr::new(host, 8081),
            L4::Tcp,
            Some((8081, L4::Tcp)),
            labels[0],
        ),
        (
            SocketAddr::new(host, 8082),
            L4::Tcp,
            Some((8082, L4::Tcp)),
            labels[1],
        ),
        (
            SocketAddr::new(host, 5353),
            L4::Udp,
            Some((5353, L4::Udp)),
            labels[2],
        ),
        (SocketAddr::new(host, 2222), L4::Tcp, None, labels[3]),
    ]
}

/// Adds source addresses 10.99.X.{v4} and fd99:X::{v6} to a client.
fn add_sources(
    c: &Client,
    v4: std::ops::RangeInclusive<u16>,
    v6: Option<std::ops::RangeInclusive<u16>>,
) -> anyhow::Result<()> {
    let prefix4 = c
        .addr4
        .rsplit_once('.')
        .map(|(p, _)| p.to_string())
        .unwrap_or_default();
    let prefix6 = c.addr6.trim_end_matches("::2").to_string();
    let mut batch = String::new();
    for n in v4.filter(|n| *n != 2) {
        batch.push_str(&format!("addr add {prefix4}.{n}/24 dev eth0\n"));
    }
    for n in v6.into_iter().flatten().filter(|n| *n != 2) {
        batch.push_str(&format!("addr add {prefix6}::{n:x}/64 dev eth0 nodad\n"));
    }
    let mut child = std::process::Command::new("ip")
        .args(["-n", &c.ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("ip -batch")?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(batch.as_bytes())?;
    anyhow::ensure!(
        child.wait()?.success(),
        "adding source addresses to {}",
        c.ns
    );
    Ok(())
}

fn probe_all(clients: &[&Client], cases: &[Case]) -> anyhow::Result<Vec<Outcome>> {
    let mut out = vec![Outcome::Error; cases.len()];
    for (index, client) in clients.iter().enumerate() {
        let mine: Vec<(usize, Case)> = cases
            .iter()
            .enumerate()
            .filter(|(_, c)| c.client == index)
            .map(|(i, c)| (i, c.clone()))
            .collect();
        // Threads started inside the namespace inherit it.
        let results = client.exec(move || {
            let mut results = Vec::new();
            for chunk in mine.chunks(PARALLEL) {
                let handles: Vec<_> = chunk
                    .iter()
                    .cloned()
                    .map(|(i, case)| thread::spawn(move || (i, probe(&case))))
                    .collect();
                results.extend(handles.into_iter().filter_map(|h| h.join().ok()));
            }
            results
        })?;
        for (i, outcome) in results {
            out[i] = outcome;
        }
    }
    Ok(out)
}

fn probe(case: &Case) -> Outcome {
    match case.l4 {
        L4::Tcp => probe_tcp(case.src, case.dst),
        L4::Udp => probe_udp(case.src, case.dst),
    }
}

pub(crate) fn probe_tcp(src: IpAddr, dst: SocketAddr) -> Outcome {
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let Ok(sock) = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)) else {
        return Outcome::Error;
    };
    if sock.bind(&SockAddr::from(SocketAddr::new(src, 0))).is_err() {
        return Outcome::Error;
    }
    outcome(sock.connect_timeout(&SockAddr::from(dst), PROBE_TIMEOUT))
}

fn probe_udp(src: IpAddr, dst: SocketAddr) -> Outcome {
    let Ok(sock) = UdpSocket::bind(SocketAddr::new(src, 0)) else {
        return Outcome::Error;
    };
    if sock.connect(dst).is_err() || sock.set_read_timeout(Some(PROBE_TIMEOUT)).is_err() {
        return Outcome::Error;
    }
    if sock.send(b"probe").is_err() {
        return Outcome::Error;
    }
    let mut buf = [0u8; 64];
    outcome(sock.recv(&mut buf).map(|_| ()))
}

/// What a connection attempt's result says: connected, refused (RST or ICMP
/// unreachable), timed out (dropped somewhere), or some other error.
fn outcome(result: std::io::Result<()>) -> Outcome {
    use std::io::ErrorKind;
    match result {
        Ok(()) => Outcome::Connected,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            Outcome::TimedOut
        }
        Err(_) => Outcome::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_cidr_edges() {
        assert!(contains("10.99.1.8/29", "10.99.1.8".parse().unwrap()));
        assert!(contains("10.99.1.8/29", "10.99.1.15".parse().unwrap()));
        assert!(!contains("10.99.1.8/29", "10.99.1.16".parse().unwrap()));
        assert!(!contains("10.99.1.8/29", "10.99.1.7".parse().unwrap()));
        assert!(contains("fd99:1::10/124", "fd99:1::1f".parse().unwrap()));
        assert!(!contains("fd99:1::10/124", "fd99:1::20".parse().unwrap()));
        assert!(contains("fd99:1::30", "fd99:1::30".parse().unwrap()));
        assert!(!contains("10.99.1.8/29", "fd99:1::8".parse().unwrap()));
        assert!(allowed("10.99.1.70".parse().unwrap(), 5353, L4::Udp));
        assert!(!allowed("10.99.1.70".parse().unwrap(), 5353, L4::Tcp));
    }
}
