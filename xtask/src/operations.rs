//! Operating dockwall with confidence, end to end on the real dockerd:
//! audit mode, `explain` against real verdicts, the drop log under a SYN
//! flood, Prometheus metrics over HTTP, expiring allowances with the daemon
//! stopped, systemd readiness, and the installed unit, man pages and
//! completions.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    e2e::{Report, blocked, http_is},
    lab::{Client, Dockerd, Dockwall, LAB_DIR},
    util::{capture, output},
};

/// A host service nobody published (think SSH), on IPv4 and IPv6: out of
/// dockwall's scope, so it must stay reachable.
const HOST_SERVICE_PORT: &str = "2223";

/// Loopback port for the metrics tests (not 9464: a real exporter may run).
const METRICS_ADDR: &str = "127.0.0.1:19464";

pub fn run(
    r: &mut Report,
    dockerd: &Dockerd,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    let _ = dockerd;
    start_host_service()?;
    audit(r, dw, a, b)?;
    explain_matrix(r, dw, a, b, &[])?;
    explain_matrix(r, dw, a, b, &["--fallback", "nftables"])?;
    drop_log(r, dw, a, b)?;
    allow_latency(r, dw, a, b)?;
    metrics(r, dw, a, b)?;
    expiry(r, dw, a, b)?;
    readiness(r, dw, a, b)?;
    install(r);
    Ok(())
}

/// The operator's tools again with every load at the XDP hook (the caller
/// sets it): audit mode, explain against real verdicts, the drop log and
/// counters under a SYN flood, expiring allowances.
pub(crate) fn at_xdp(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    start_host_service()?;
    audit(r, dw, a, b)?;
    explain_matrix(r, dw, a, b, &[])?;
    drop_log(r, dw, a, b)?;
    expiry(r, dw, a, b)
}

/// The host service on [`HOST_SERVICE_PORT`], dual-stack ([::] also takes
/// IPv4), started once and kept until the suite exits.
fn start_host_service() -> anyhow::Result<()> {
    static STARTED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    STARTED
        .get_or_init(|| {
            let listener = std::net::TcpListener::bind(format!("[::]:{HOST_SERVICE_PORT}"))
                .map_err(|e| format!("binding the host service on {HOST_SERVICE_PORT}: {e}"))?;
            thread::spawn(move || for _ in listener.incoming() {});
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn ifaces<'a>(a: &'a Client, b: &'a Client) -> [&'a str; 2] {
    [a.host_if.as_str(), b.host_if.as_str()]
}

/// A dockwall command's exit code and its stdout as JSON.
fn json(dw: &Dockwall, args: &[&str]) -> anyhow::Result<(i32, Value)> {
    let (code, out, err) = dw.run(args)?;
    let value = serde_json::from_str(&out)
        .with_context(|| format!("dockwall {}: not JSON: {out}{err}", args.join(" ")))?;
    Ok((code, value))
}

/// Starts from an empty saved policy.
fn fresh_policy(dw: &Dockwall) {
    let _ = std::fs::remove_file(&dw.config);
}

fn iptables_fwd(verbose: bool) -> String {
    let mut cmd = Command::new("iptables");
    if verbose {
        cmd.args(["-w", "-L", "DOCKWALL-FWD", "-v", "-x", "-n"]);
    } else {
        cmd.args(["-w", "-S", "DOCKWALL-FWD"]);
    }
    output(&mut cmd)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

// ---- audit mode ---------------------------------------------------------------

fn audit(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    fresh_policy(dw);
    dw.ok(&["allow", &a.addr4, "--port", "8081"])?;
    let b8081 = format!("{}:8081", b.host4);
    let loaded = dw.load_with(&ifaces(a, b), &["--audit"], None)?;
    r.check(
        "audit: a source no allowance matches still gets in",
        http_is(b, &b8081, "web1"),
    );
    let (code, out, err) = dw.run(&["status"])?;
    r.expect(
        "audit: status says AUDIT MODE loudly (stdout and stderr) and exits 3",
        code == 3 && out.contains("AUDIT MODE: NOTHING IS ENFORCED") && err.contains("AUDIT MODE"),
        || format!("exit {code}\n{out}{err}"),
    );
    let (_, s) = json(dw, &["status", "--json"])?;
    r.expect(
        "audit: status --json has audit true, the would-be drop counted, nothing dropped",
        s["audit"] == true
            && s["in_force"] == true
            && s["counters"]["audited"].as_u64().unwrap_or(0) >= 1
            && s["counters"]["dropped"] == 0,
        || s.to_string(),
    );
    let line = format!("audit: would drop {}:", b.addr4);
    let detail = format!("-> web1 (published 8081/tcp -> 8080) on {}", b.host_if);
    r.check(
        "audit: the daemon logs `audit: would drop SRC:PORT -> web1 (published 8081/tcp -> 8080) on IF`",
        crate::e2e::retry(|| {
            let hit = loaded
                .output()
                .iter()
                .any(|l| l.starts_with(&line) && l.contains(&detail));
            if !hit {
                bail!("{:?}", loaded.output());
            }
            Ok(())
        }),
    );
    let rules = iptables_fwd(false);
    r.expect(
        "audit: the iptables fallback's deny rules return instead of dropping",
        rules.contains("dockwall-deny -j RETURN") && !rules.contains("-j DROP"),
        || rules.clone(),
    );
    drop(loaded);

    // The fallback alone in audit mode: it lets the connection through too,
    // and its deny rule's packet counter counts it.
    let loaded = dw.load_with(&ifaces(a, b), &["--audit", "--no-ebpf"], None)?;
    r.check(
        "audit, iptables only: a source no allowance matches still gets in",
        http_is(b, &b8081, "web1"),
    );
    let counted = iptables_fwd(true)
        .lines()
        .filter(|l| l.contains("dockwall-deny") && l.contains("8081"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>();
    r.expect(
        "audit, iptables only: the deny rule counted the would-be drop",
        counted >= 1,
        || iptables_fwd(true),
    );
    drop(loaded);

    let _loaded = dw.load(&ifaces(a, b))?;
    r.check(
        "after audit, a plain load enforces again",
        blocked(b, &b8081),
    );
    let (code, _, _) = dw.run(&["status"])?;
    r.expect("enforcing again: status exits 0", code == 0, || {
        code.to_string()
    });
    Ok(())
}

// ---- explain vs real traffic ------------------------------------------------------

/// What a client really gets on `port`: whether it connects (TCP) or gets
/// an echo (UDP) to `host`.
fn real_gets_in(c: &Client, host: &str, port: &str) -> anyhow::Result<bool> {
    let (num, udp) = match port.strip_suffix("/udp") {
        Some(n) => (n, true),
        None => (port, false),
    };
    let addr = if host.contains(':') {
        format!("[{host}]:{num}")
    } else {
        format!("{host}:{num}")
    };
    if udp {
        Ok(c.udp_echo(&addr, "x").is_ok_and(|reply| reply == "echo:x"))
    } else {
        c.tcp_connects(&addr)
    }
}

fn explain_matrix(
    r: &mut Report,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
    extra: &[&str],
) -> anyhow::Result<()> {
    fresh_policy(dw);
    dw.ok(&["allow", &a.addr4, "--port", "8081"])?;
    dw.ok(&["allow", &a.addr6, "--port", "8081"])?;
    dw.ok(&["allow", "10.99.2.0/24", "--port", "5353/udp"])?;
    dw.ok(&["allow", &b.addr4, "--container", "web2"])?;
    dw.ok(&["allow", "10.99.0.0/16", "--port", "8082", "--for", "1s"])?;
    thread::sleep(Duration::from_millis(1100));
    if extra.is_empty() {
        // Not loaded: explain answers from the saved file, lapsed entries named.
        let (_, e) = json(dw, &["explain", &b.addr4, "8082", "--json"])?;
        r.expect(
            "explain (not loaded): answers from the saved file; a lapsed allowance is named, not used",
            e["policy"] == "saved"
                && e["verdict"] == "allow"
                && e["expired"][0] == "10.99.0.0/16 -> port 8082/tcp"
                && e["decided_by"]["allowances"][0] == format!("{} -> container web2", b.addr4)
                && e["dataplanes"].as_array().is_some_and(|d| d.is_empty()),
            || e.to_string(),
        );
    }
    let mut loaded = dw.load_with(&ifaces(a, b), extra, None)?;
    let label = if extra.is_empty() {
        "eBPF + iptables".to_string()
    } else {
        format!("eBPF + {}", extra.join(" "))
    };
    let mut mismatches = Vec::new();
    let mut disagreements = Vec::new();
    let mut cases = 0;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for c in [a, b] {
        for (src, host) in [(&c.addr4, &c.host4), (&c.addr6, &c.host6)] {
            for port in ["8081", "8082", "5353/udp", HOST_SERVICE_PORT] {
                cases += 1;
                let (code, e) = json(dw, &["explain", src, port, "--json"])?;
                let verdict = e["verdict"].as_str().unwrap_or("?").to_string();
                *seen.entry(verdict.clone()).or_default() += 1;
                let expect_in = verdict == "allow" || verdict == "not_in_scope";
                let got_in = real_gets_in(c, host, port)?;
                if expect_in != got_in {
                    mismatches.push(format!(
                        "{src} -> {port}: explain {verdict}, real in={got_in}"
                    ));
                }
                if code != 0 || e["agree"] != true {
                    disagreements.push(format!("{src} -> {port}: {e}"));
                }
            }
        }
    }
    r.expect(
        &format!("explain ({label}): {cases} cases, each verdict matches real traffic"),
        mismatches.is_empty() && seen.len() == 3,
        || format!("{mismatches:?}; verdicts seen {seen:?}"),
    );
    r.expect(
        &format!("explain ({label}): every dataplane agrees with the policy in each case"),
        disagreements.is_empty(),
        || format!("{disagreements:?}"),
    );
    let (_, e) = json(dw, &["explain", &a.addr4, "8081", "--json"])?;
    r.expect(
        &format!("explain ({label}): names the deciding allowance, container and container port"),
        e["decided_by"]["allowances"][0] == format!("{} -> port 8081/tcp", a.addr4)
            && e["decided_by"]["entry"] == format!("{}/32", a.addr4)
            && e["reaches"][0]["container"] == "web1"
            && e["reaches"][0]["container_port"] == 8080
            && e["dataplanes"].as_array().is_some_and(|d| d.len() == 2),
        || e.to_string(),
    );
    let (code, text, _) = dw.run(&["explain", &b.addr4, "8081"])?;
    r.expect(
        &format!("explain ({label}): text says DROP, who decides and that the dataplanes agree"),
        code == 0
            && text.contains("DROP")
            && text.contains("no allowance matches")
            && text.contains("agree with the policy in force"),
        || text.clone(),
    );
    if extra.is_empty() {
        // A dataplane that drifted is caught: with the daemon stopped (it
        // would repair it), take a's entry out of the kernel's map by hand.
        loaded.stop()?;
        let ip: Ipv4Addr = a.addr4.parse()?;
        let mut key = vec!["key".to_string()];
        // Its key (one group, one prefix length: in the per-length hash):
        // prefix length 64 (u32), port 8081, tcp, IPv4, address.
        let mut bytes = vec![64u8, 0, 0, 0, 0x91, 0x1f, 6, 4];
        bytes.extend_from_slice(&ip.octets());
        bytes.extend_from_slice(&[0; 12]);
        key.extend(bytes.iter().map(|b| b.to_string()));
        let mut del = Command::new("bpftool");
        del.args([
            "map",
            "delete",
            "pinned",
            "/sys/fs/bpf/dockwall/DW_ALLOW_NETS",
        ])
        .args(&key);
        let deleted = capture(&mut del);
        // The hash map alone is not what the kernel reads for IPv4: its
        // mirror still holds the entry, and explain, reading the way the
        // kernel does, still says allow.
        let (_, e) = json(dw, &["explain", &a.addr4, "8081", "--json"])?;
        r.expect(
            "explain: an IPv4 entry gone from DW_ALLOW_NETS alone still decides from the mirror, as the kernel reads it",
            e["dataplanes"][0]["name"] == "ebpf" && e["dataplanes"][0]["verdict"] == "allow",
            || e.to_string(),
        );
        // Empty its mirror bucket too (an array element: the bucket's
        // index, little-endian, and 64 zero bytes).
        let mirror_key = dockwall_common::mirror_key(
            u32::from_ne_bytes(ip.octets()),
            8081,
            dockwall_common::PROTO_TCP,
            32,
        );
        let bucket = dockwall_common::mirror_bucket(mirror_key);
        let mut zero = Command::new("bpftool");
        zero.args(["map", "update", "pinned"])
            .arg(format!(
                "/sys/fs/bpf/dockwall/{}",
                dockwall_common::MAP_ALLOW_MIRROR
            ))
            .arg("key")
            .args(bucket.to_le_bytes().iter().map(|b| b.to_string()))
            .arg("value")
            .args(std::iter::repeat_n(
                "0",
                size_of::<dockwall_common::MirrorBucket>(),
            ));
        let deleted = deleted.and_then(|_| capture(&mut zero));
        let (code, e) = json(dw, &["explain", &a.addr4, "8081", "--json"])?;
        r.expect(
            "explain: a dataplane that no longer holds the policy is named (exit 1, agree false)",
            deleted.is_ok()
                && code == 1
                && e["agree"] == false
                && e["dataplanes"][0]["name"] == "ebpf"
                && e["dataplanes"][0]["verdict"] == "drop"
                && e["dataplanes"][1]["verdict"] == "allow",
            || format!("{deleted:?} {e}"),
        );
        let (code, _, err) = dw.run(&["explain", "not-an-ip", "8081"])?;
        r.expect(
            "explain: a bad SOURCE is refused, naming it",
            code == 2 && err.contains("not-an-ip"),
            || err.clone(),
        );
        let (code, _, err) = dw.run(&["explain", &a.addr4, "8081/sctp"])?;
        r.expect(
            "explain: a bad protocol is refused, naming it",
            code == 2 && err.contains("sctp"),
            || err.clone(),
        );
    }
    Ok(())
}

// ---- drop log under a flood ---------------------------------------------------------

/// The Internet checksum (RFC 1071).
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

/// Sends `count` bare SYNs from `src` (source ports spread) to `dst`:`port`
/// through a raw socket: a flood of new connections, no sockets kept.
fn syn_flood(src: Ipv4Addr, dst: Ipv4Addr, port: u16, count: u32) -> anyhow::Result<()> {
    // SAFETY: plain socket calls on an fd we own and close.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_INET, SOCK_RAW, TCP)");
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut result = Ok(());
    for i in 0..count {
        let sport = 20_000 + (i % 40_000) as u16;
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&port.to_be_bytes());
        tcp[4..8].copy_from_slice(&i.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
        let mut pseudo = Vec::with_capacity(32);
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&tcp);
        let sum = checksum(&pseudo);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        // SAFETY: tcp and addr outlive the call.
        let sent = unsafe {
            libc::sendto(
                fd,
                tcp.as_ptr().cast(),
                tcp.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            result = Err(std::io::Error::last_os_error()).context("sendto (raw SYN)");
            break;
        }
    }
    unsafe { libc::close(fd) };
    result
}

fn drop_log(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    fresh_policy(dw);
    dw.ok(&["allow", &a.addr4, "--port", "8081"])?;
    let rate: u64 = 5;
    let loaded = dw.load_with(&ifaces(a, b), &["--log-rate", &rate.to_string()], None)?;
    let (_, before) = json(dw, &["status", "--json"])?;
    let flood: u32 = 20_000;
    let started = Instant::now();
    let src: Ipv4Addr = b.addr4.parse()?;
    let dst: Ipv4Addr = b.host4.parse()?;
    b.exec(move || syn_flood(src, dst, 8081, flood))??;
    let flood_time = started.elapsed();
    // Let the daemon print the last window's summary.
    thread::sleep(Duration::from_millis(2500));
    let elapsed = started.elapsed().as_secs() + 1;
    let (_, after) = json(dw, &["status", "--json"])?;
    let dropped = after["counters"]["dropped"].as_u64().unwrap_or(0)
        - before["counters"]["dropped"].as_u64().unwrap_or(0);
    let prefix = format!("drop {}:", b.addr4);
    let detail = format!("-> web1 (published 8081/tcp -> 8080) on {}", b.host_if);
    let lines = loaded.output();
    let logged = lines.iter().filter(|l| l.starts_with(&prefix)).count() as u64;
    let well_formed = lines
        .iter()
        .filter(|l| l.starts_with(&prefix))
        .all(|l| l.ends_with(&detail));
    println!(
        "e2e: note SYN flood: {flood} SYNs in {flood_time:?}, {dropped} dropped, {logged} drop-log lines at --log-rate {rate}"
    );
    r.expect(
        "drop log: the flood is dropped in full and counted",
        dropped >= u64::from(flood),
        || format!("{dropped} of {flood}"),
    );
    r.expect(
        "drop log: lines appear, name source, container and ports, and stay within the kernel's rate limit",
        logged >= 1 && logged <= rate * elapsed && well_formed,
        || format!("{logged} lines in {elapsed} s: {lines:?}"),
    );
    r.expect(
        "drop log: a summary line reports what the limit suppressed",
        lines
            .iter()
            .any(|l| l.contains("more drop(s) not logged, over the limit of 5 a second")),
        || format!("{lines:?}"),
    );
    let suppressed = after["counters"]["log_suppressed"].as_u64().unwrap_or(0);
    r.expect(
        "drop log: status counts the suppressed events",
        suppressed + logged >= u64::from(flood),
        || after.to_string(),
    );
    Ok(())
}

// ---- control plane: one allow -----------------------------------------------------------

/// From `start`, a new TCP connection attempt from this thread's namespace
/// every millisecond; the time at which the first one completes. A SYN
/// dropped while the allowance is not in force yet just stays pending.
pub(crate) fn first_connect(
    addr: std::net::SocketAddr,
    start: Instant,
    limit: Duration,
) -> Option<Duration> {
    use socket2::{Domain, Socket, Type};
    let mut pending: Vec<Socket> = Vec::new();
    while start.elapsed() < limit {
        if let Ok(s) = Socket::new(Domain::IPV4, Type::STREAM, None)
            && s.set_nonblocking(true).is_ok()
        {
            let _ = s.connect(&addr.into());
            pending.push(s);
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|s| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(s),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
        for (fd, s) in fds.iter().zip(&pending) {
            if fd.revents & libc::POLLOUT != 0 && matches!(s.take_error(), Ok(None)) {
                return Some(start.elapsed());
            }
        }
    }
    None
}

/// `dockwall allow` end to end on a small policy (process start, lock, save
/// with fsync, eBPF map, fallback set members), the time until a client
/// probing every millisecond first gets in, and a connection right after
/// the command returns: the allowance is in force by then.
fn allow_latency(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    fresh_policy(dw);
    // 8081 already has a set (a's address), so allowing b changes only set
    // members: the common case, which `allow` applies in place.
    dw.ok(&["allow", &a.addr4, "--port", "8081"])?;
    let _loaded = dw.load(&ifaces(a, b))?;
    let b8081 = format!("{}:8081", b.host4);
    let target: std::net::SocketAddr = b8081.parse()?;
    let mut took = Vec::new();
    let mut in_force = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (result, first) = thread::scope(|s| {
            let probe =
                s.spawn(|| b.exec(|| first_connect(target, started, Duration::from_secs(2))));
            let result = dw.run(&["allow", &b.addr4, "--port", "8081"]);
            took.push(started.elapsed());
            (result, probe.join())
        });
        let (code, _, err) = result?;
        match first {
            Ok(Ok(Some(t))) => in_force.push(t),
            other => failures.push(format!("the probe never got in: {other:?}")),
        }
        if code != 0 {
            failures.push(err);
        } else if let Err(e) = http_is(b, &b8081, "web1") {
            failures.push(format!("not in force when allow returned: {e:#}"));
        }
        dw.ok(&["revoke", &b.addr4, "--port", "8081"])?;
        if let Err(e) = blocked(b, &b8081) {
            failures.push(format!("not revoked when revoke returned: {e:#}"));
        }
    }
    took.sort();
    in_force.sort();
    println!(
        "e2e: note one `dockwall allow` (eBPF + iptables fallback, small policy): command median {:.1?} (min {:.1?}, max {:.1?}); first connection through {:?} after the command started",
        took[2], took[0], took[4], in_force
    );
    let median_in_force = in_force.get(in_force.len() / 2).copied();
    r.expect(
        "control plane: one allow is in force within 10 ms of the command starting (median of 5)",
        median_in_force.is_some_and(|t| t < Duration::from_millis(10)),
        || format!("{in_force:?}"),
    );
    r.expect(
        "control plane: 5 x allow then revoke, each in force the moment the command returns",
        failures.is_empty(),
        || format!("{failures:?}"),
    );
    Ok(())
}

// ---- Prometheus metrics ------------------------------------------------------------

/// GET over plain HTTP/1.1; (status line, body).
fn http(addr: &str, path: &str) -> anyhow::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

/// `name{labels} value` lines of a text exposition, keyed by `name{labels}`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn metrics(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    let (code, _, err) = dw.run(&["load", "--iface", &a.host_if, "--metrics", "0.0.0.0:19464"])?;
    r.expect(
        "metrics: a non-loopback address is refused without --metrics-public, nothing installed",
        code != 0
            && err.contains("--metrics-public")
            && !Path::new("/sys/fs/bpf/dockwall").exists(),
        || err.clone(),
    );
    fresh_policy(dw);
    dw.ok(&["allow", &a.addr4, "--port", "8081"])?;
    let _loaded = dw.load_with(&ifaces(a, b), &["--metrics", METRICS_ADDR], None)?;
    http_is(a, &format!("{}:8081", a.host4), "web1")?;
    blocked(b, &format!("{}:8081", b.host4))?;
    let (status, body) = http(METRICS_ADDR, "/metrics")?;
    let (_, s) = json(dw, &["status", "--json"])?;
    let m = parse_metrics(&body);
    let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
    let web1_drops = "dockwall_port_drops_total{port=\"8081\",proto=\"tcp\",container=\"web1\"}";
    let hits = format!(
        "dockwall_allowance_hits_total{{source=\"{}\",target=\"port 8081/tcp\",origin=\"file\"}}",
        a.addr4
    );
    let up = format!(
        "dockwall_dataplane_up{{dataplane=\"ebpf\",iface=\"{}\"}}",
        a.host_if
    );
    let dropped = get("dockwall_packets_total{verdict=\"dropped\"}");
    r.expect(
        "metrics: scraped over HTTP and parsed (OpenMetrics text, # EOF)",
        status.contains("200") && body.trim_end().ends_with("# EOF") && m.len() > 10,
        || format!("{status}\n{body}"),
    );
    r.expect(
        "metrics: per-verdict counters match `status --json`",
        dropped >= 1.0
            && dropped == s["counters"]["dropped"].as_f64().unwrap_or(-2.0)
            && get("dockwall_packets_total{verdict=\"allowed\"}")
                == s["counters"]["allowed"].as_f64().unwrap_or(-2.0),
        || format!("{body}\n{s}"),
    );
    r.expect(
        "metrics: drops per published port and container, hits per allowance, dataplane health",
        get(web1_drops) >= 1.0
            && get(&hits) >= 1.0
            && get(&up) == 1.0
            && get(&format!(
                "dockwall_dataplane_up{{dataplane=\"iptables\",iface=\"{},{}\"}}",
                a.host_if, b.host_if
            )) == 1.0
            && get("dockwall_audit_mode") == 0.0
            && get("dockwall_docker_reachable") == 1.0,
        || body.clone(),
    );
    let (status, _) = http(METRICS_ADDR, "/")?;
    r.expect(
        "metrics: other paths are 404",
        status.contains("404"),
        || status.clone(),
    );
    let (_, s) = json(dw, &["status", "--json"])?;
    r.expect(
        "metrics: status shows where they are served",
        s["metrics"] == format!("http://{METRICS_ADDR}/metrics"),
        || s.to_string(),
    );
    Ok(())
}

// ---- expiring allowances ------------------------------------------------------------

fn expiry(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    fresh_policy(dw);
    let b8081 = format!("{}:8081", b.host4);
    let lifetime = Duration::from_secs(3);
    let mut loaded = dw.load(&ifaces(a, b))?;
    let (code, out, err) = dw.run(&["allow", &b.addr4, "--port", "8081", "--for", "3s"])?;
    let allowed_at = Instant::now();
    r.expect(
        "expiry: allow --for 3s says until when",
        code == 0 && out.contains(" until ") && out.contains("(3s)"),
        || format!("{out}{err}"),
    );
    dw.ok(&["allow", &b.addr4, "--port", "8082", "--for", "1h"])?;
    r.check(
        "expiry: the source gets in before it lapses",
        http_is(b, &b8081, "web1"),
    );
    let (_, rows) = json(dw, &["list", "--json"])?;
    let left = |target: &str| {
        rows.as_array()
            .and_then(|rows| rows.iter().find(|r| r["target"] == target))
            .and_then(|r| r["expires_in_secs"].as_u64())
    };
    r.expect(
        "expiry: list --json shows the time left",
        left("port 8082/tcp").is_some_and(|s| (3590..=3600).contains(&s))
            && left("port 8081/tcp").is_some_and(|s| s <= 3),
        || rows.to_string(),
    );
    let (_, text, _) = dw.run(&["list"])?;
    r.expect(
        "expiry: list shows the time left",
        text.contains("in 59m") || text.contains("in 1h"),
        || text.clone(),
    );
    // The daemon is stopped; the kernel alone must end it on time.
    loaded.stop()?;
    let wait = (lifetime + Duration::from_millis(300)).saturating_sub(allowed_at.elapsed());
    thread::sleep(wait);
    r.check(
        "expiry: with the daemon stopped, the kernel stops matching it after 3 s",
        blocked(b, &b8081),
    );
    let (_, s) = json(dw, &["status", "--json"])?;
    r.expect(
        "expiry: status counts the drop as an expired allowance",
        s["counters"]["expired"].as_u64().unwrap_or(0) >= 1,
        || s.to_string(),
    );
    let (_, text, _) = dw.run(&["list"])?;
    r.expect(
        "expiry: list says EXPIRED",
        text.contains("EXPIRED"),
        || text.clone(),
    );
    r.check(
        "expiry: the other allowance (1h) still lets the source in",
        http_is(b, &format!("{}:8082", b.host4), "web2"),
    );
    // The daemon's next run cleans the fallback and the saved file.
    let loaded = dw.load(&ifaces(a, b))?;
    let set_member = output(Command::new("ipset").args(["test", "dockwall-4-tcp-8081", &b.addr4]))
        .map(|o| o.status.success())
        .unwrap_or(true);
    r.expect(
        "expiry: the next daemon run leaves it out of the fallback rules",
        !set_member,
        String::new,
    );
    r.check(
        "expiry: ... and removes it from the saved file",
        crate::e2e::retry(|| {
            let saved = std::fs::read_to_string(&dw.config)?;
            if saved.contains("8081") || !saved.contains("8082") {
                bail!("{saved}");
            }
            Ok(())
        }),
    );
    let saved = std::fs::read_to_string(&dw.config).unwrap_or_default();
    r.expect(
        "expiry: the daemon says so",
        loaded.saw("allowance expired, removed"),
        || format!("{:?}", loaded.output()),
    );
    let (code, _, err) = dw.run(&["allow", &b.addr4, "--port", "8081", "--for", "soon"])?;
    r.expect(
        "expiry: a bad --for is refused, naming it, nothing saved",
        code == 2
            && err.contains("soon")
            && std::fs::read_to_string(&dw.config).unwrap_or_default() == saved,
        || err.clone(),
    );
    let (code, _, err) = dw.run(&["revoke", &b.addr4, "--port", "8082", "--for", "1h"])?;
    r.expect(
        "expiry: revoke --for is refused",
        code != 0 && err.contains("--for"),
        || err.clone(),
    );
    Ok(())
}

// ---- systemd readiness ----------------------------------------------------------------

fn readiness(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    fresh_policy(dw);
    let sock_path = PathBuf::from(LAB_DIR).join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).context("binding the notify socket")?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let ifs = ifaces(a, b);
    let mut child = dw
        .cmd(&["load", "--iface", ifs[0], "--iface", ifs[1]])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning dockwall load")?;
    let mut buf = [0u8; 512];
    let ready = sock
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    // At READY=1 the filter must already be in force: probe at once.
    let blocked_now = blocked(b, &format!("{}:8081", b.host4));
    let status = dw.run(&["status"]).map(|(code, _, _)| code);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = sock
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    let _ = child.wait();
    let _ = dw.run(&["unload"]);
    let _ = std::fs::remove_file(&sock_path);
    let ready = ready.unwrap_or_else(|e| format!("no message: {e}"));
    r.expect(
        "systemd: READY=1 with a STATUS line reaches $NOTIFY_SOCKET",
        ready.starts_with("READY=1\nSTATUS=filter in force on"),
        || ready.clone(),
    );
    r.check(
        "systemd: at READY=1 the filter is already in force (blocked at once, status 0)",
        blocked_now.and_then(|()| match status {
            Ok(0) => Ok(()),
            other => bail!("status {other:?}"),
        }),
    );
    let stopping = stopping.unwrap_or_else(|e| format!("no message: {e}"));
    r.expect(
        "systemd: STOPPING=1 on SIGTERM",
        stopping == "STOPPING=1",
        || stopping.clone(),
    );
    Ok(())
}

// ---- unit file, man pages, completions -------------------------------------------------

fn install(r: &mut Report) {
    let root = PathBuf::from(LAB_DIR).join("install-root");
    let _ = std::fs::remove_dir_all(&root);
    let result = crate::install::run(&root);
    let layout = crate::install::Layout::under(&root);
    r.check("install --root puts everything in a staging tree", result);
    let man = layout.man8.join("dockwall-load.8");
    let rendered = capture(
        Command::new("man")
            .env("MANWIDTH", "200")
            .arg("-l")
            .arg(&man),
    )
    .unwrap_or_default();
    r.expect(
        "man page dockwall-load(8) renders and documents --audit, --metrics and --log-rate",
        rendered.contains("--audit")
            && rendered.contains("--metrics")
            && rendered.contains("--log-rate"),
        || rendered.clone(),
    );
    let pages = std::fs::read_dir(&layout.man8)
        .map(|d| d.count())
        .unwrap_or(0);
    r.expect(
        "a man page per subcommand (explain included)",
        pages >= 10 && layout.man8.join("dockwall-explain.8").exists(),
        || pages.to_string(),
    );
    let bash = output(Command::new("bash").arg("-c").arg(format!(
        "set -e; source {}; complete -p dockwall",
        layout.bash.display()
    )));
    r.expect(
        "bash completion loads and registers `dockwall`",
        bash.as_ref().is_ok_and(|o| o.status.success()),
        || format!("{bash:?}"),
    );
    let zsh_fish = std::fs::read_to_string(&layout.zsh)
        .unwrap_or_default()
        .contains("#compdef dockwall")
        && std::fs::read_to_string(&layout.fish)
            .unwrap_or_default()
            .contains("complete -c dockwall");
    r.expect(
        "zsh and fish completions are installed",
        zsh_fish,
        String::new,
    );
    // systemd-analyze checks the unit as systemd would load it; point its
    // ExecStart at the staged binary and its man pages at the staged tree.
    let verify = (|| -> anyhow::Result<String> {
        let unit = std::fs::read_to_string(&layout.unit)?;
        if !unit.contains("Type=notify")
            || !unit.contains("After=docker.service")
            || !unit.contains("Restart=on-failure")
            || !unit.contains("ExecStart=/usr/local/sbin/dockwall load")
        {
            bail!("unit lacks notify/ordering/restart/ExecStart:\n{unit}");
        }
        let dir = root.join("verify");
        std::fs::create_dir_all(&dir)?;
        let staged = unit.replace(
            "/usr/local/sbin/dockwall",
            &layout.sbin.join("dockwall").display().to_string(),
        );
        std::fs::write(dir.join("dockwall.service"), staged)?;
        let out = output(
            Command::new("systemd-analyze")
                .env("MANPATH", root.join("usr/local/share/man"))
                .arg("verify")
                .arg(dir.join("dockwall.service")),
        )?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || said.contains("dockwall.service") {
            bail!("systemd-analyze verify: {said}");
        }
        Ok(said)
    })();
    r.check(
        "systemd unit: notify, after docker.service, restart on failure; `systemd-analyze verify` clean",
        verify.map(|_| ()),
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_header() {
        // RFC 1071's example words.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn metrics_lines_parse() {
        let m = parse_metrics("# HELP x y\nx_total{a=\"b c\"} 3\ny 1.5\n# EOF\n");
        assert_eq!(m["x_total{a=\"b c\"}"], 3.0);
        assert_eq!(m["y"], 1.5);
    }
}
