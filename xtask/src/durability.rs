//! Durable and safe: hand edits wait for `reload`, bad files and bad input
//! change nothing, crashes and "reboots" open no window, concurrent edits
//! lose nothing, and the daemon repairs drift. Real dockerd, real traffic.

use std::{
    collections::BTreeSet,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    e2e::{Report, blocked, http_is, retry, under_traffic},
    lab::{Client, Dockerd, Dockwall, Loaded},
    util::{capture, output},
};

pub fn run(
    r: &mut Report,
    dockerd: &Dockerd,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&dw.config);
    dw.ok(&["allow", &a.addr4, "--port", "8081", "--comment", "office"])?;
    let (_, out, _) = dw.run(&["list"])?;
    r.expect(
        "allow --comment is saved and listed",
        out.contains("office"),
        || out.clone(),
    );
    let ifaces = [a.host_if.as_str(), b.host_if.as_str()];
    let loaded = dw.load(&ifaces)?;
    hand_edits(r, dw, a, b, &loaded)?;
    bad_inputs_while_loaded(r, dw, a)?;
    concurrent_edits(r, dw)?;
    drift(r, dw, b)?;
    let loaded = crash_and_reload(r, dw, a, b, loaded)?;
    recreated_container(r, dockerd, dw, b)?;
    drop(loaded);
    reboot(r, dw, a, b)?;
    vanishing_interface(r, dw, a)?;
    Ok(())
}

fn a8081(a: &Client) -> String {
    format!("{}:8081", a.host4)
}

fn b8081(b: &Client) -> String {
    format!("{}:8081", b.host4)
}

/// Everything the dataplanes hold that a bad input must not change:
/// allowance map keys, the saved file, the policy in force, iptables rules,
/// ipset members and the nftables table.
fn snapshot(dw: &Dockwall) -> String {
    let mut out = String::new();
    out.push_str(&std::fs::read_to_string(&dw.config).unwrap_or_default());
    out.push_str(&std::fs::read_to_string(dw.run_dir.join("applied.toml")).unwrap_or_default());
    for map in ["DW_ALLOW", "DW_ALLOW_NETS", "DW_PUBLISHED"] {
        let dump = capture(Command::new("bpftool").args([
            "map",
            "dump",
            "pinned",
            &format!("/sys/fs/bpf/dockwall/{map}"),
            "-j",
        ]))
        .unwrap_or_default();
        // Keys only: hit counters move with traffic.
        let keys: BTreeSet<String> = serde_json::from_str::<serde_json::Value>(&dump)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|e| e["key"].to_string())
            .collect();
        out.push_str(&format!("{map}: {keys:?}\n"));
    }
    for tool in ["iptables-save", "ip6tables-save"] {
        let rules = capture(&mut Command::new(tool)).unwrap_or_default();
        out.extend(
            rules
                .lines()
                .filter(|l| l.contains("DOCKWALL"))
                .map(|l| format!("{l}\n")),
        );
    }
    out.push_str(&capture(Command::new("ipset").args(["save"])).unwrap_or_default());
    out.push_str(
        &capture(Command::new("nft").args(["list", "table", "inet", "dockwall"]))
            .unwrap_or_default(),
    );
    out
}

fn hand_edits(
    r: &mut Report,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
    loaded: &Loaded,
) -> anyhow::Result<()> {
    let saved = std::fs::read_to_string(&dw.config)?;
    let with_b = format!(
        "{saved}\n[[allow]]\nsource = \"{}\"\nport = \"8081\"\n",
        b.addr4
    );
    std::fs::write(&dw.config, &with_b)?;
    thread::sleep(Duration::from_millis(2500)); // more than one periodic resync
    r.check(
        "a hand edit is not applied before `reload`",
        blocked(b, &b8081(b)),
    );
    let (code, out, err) = dw.run(&["reload"])?;
    r.expect(
        "dockwall reload applies a hand edit",
        code == 0 && out.contains("in force"),
        || format!("{code} {out} {err}"),
    );
    r.check(
        "after reload the hand-added source gets in",
        http_is(b, &b8081(b), "web1"),
    );
    // The reload gave the hand edit the next revision, written into the
    // file's `revision` line in place: the rest of the admin's text stays.
    let reloaded = std::fs::read_to_string(&dw.config)?;
    r.expect(
        "reload writes the new revision into the hand-edited file, the rest kept",
        reloaded.contains("revision = ") && reloaded.contains(&with_b[with_b.len() - 40..]),
        || reloaded.clone(),
    );
    let with_b = reloaded;

    // A bad edit is refused whole, naming file and line; nothing changes.
    let before = snapshot(dw);
    let bad = format!("{with_b}\n[[allow]]\nsource = \"10.0.0.1/8\"\nport = \"8081\"\n");
    std::fs::write(&dw.config, &bad)?;
    let line = bad
        .lines()
        .position(|l| l.contains("10.0.0.1/8"))
        .map_or(0, |i| i + 1);
    let (code, out, err) = dw.run(&["reload"])?;
    let want = format!("{}:{line}:", dw.config.display());
    r.expect(
        "a file that does not validate is refused with file, line and reason",
        code != 0
            && out.is_empty()
            && err.contains(&want)
            && err.contains("10.0.0.0/8")
            && err.trim().lines().count() == 1,
        || format!("{code} {err}"),
    );
    std::fs::write(&dw.config, &with_b)?; // the snapshot includes the file
    r.expect(
        "a refused reload changes nothing in force",
        snapshot(dw) == before,
        String::new,
    );
    r.check(
        "a refused reload keeps the sources in force",
        http_is(b, &b8081(b), "web1"),
    );
    std::fs::write(&dw.config, &bad)?;
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(loaded.pid() as i32, libc::SIGHUP) };
    thread::sleep(Duration::from_millis(500));
    r.expect(
        "SIGHUP with a bad file is refused and logged",
        loaded.saw("reload refused"),
        || format!("{:?}", loaded.output()),
    );
    r.check(
        "SIGHUP with a bad file keeps the policy in force",
        http_is(b, &b8081(b), "web1"),
    );

    // SIGHUP with a good file applies it: drop b again.
    std::fs::write(&dw.config, &saved)?;
    unsafe { libc::kill(loaded.pid() as i32, libc::SIGHUP) };
    r.check(
        "SIGHUP applies the saved file",
        retry(|| blocked(b, &b8081(b))),
    );
    r.check("SIGHUP keeps the rest", http_is(a, &a8081(a), "web1"));

    // A config others can write is refused.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dw.config, std::fs::Permissions::from_mode(0o666))?;
    let (code, _, err) = dw.run(&["reload"])?;
    std::fs::set_permissions(&dw.config, std::fs::Permissions::from_mode(0o644))?;
    r.expect(
        "a config writable by others is refused",
        code != 0 && err.contains("writable by others"),
        || err.clone(),
    );
    std::os::unix::fs::chown(&dw.config, Some(65534), None)?;
    let (code, _, err) = dw.run(&["reload"])?;
    std::os::unix::fs::chown(&dw.config, Some(0), None)?;
    r.expect(
        "a config not owned by root is refused",
        code != 0 && err.contains("owned by uid 65534"),
        || err.clone(),
    );
    Ok(())
}

/// At least 40 bad inputs while loaded: each refused with one line naming
/// the value, a non-zero exit, and every dataplane and file unchanged.
fn bad_inputs_while_loaded(r: &mut Report, dw: &Dockwall, a: &Client) -> anyhow::Result<()> {
    let before = snapshot(dw);
    let long_if = "averyveryverylongname0";
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "address with a 300",
            vec!["allow", "10.0.0.300", "--port", "8081"],
            "10.0.0.300",
        ),
        (
            "three-part address",
            vec!["allow", "1.2.3", "--port", "8081"],
            "1.2.3",
        ),
        (
            "five-part address",
            vec!["allow", "1.2.3.4.5", "--port", "8081"],
            "1.2.3.4.5",
        ),
        (
            "CIDR with host bits",
            vec!["allow", "10.0.0.1/8", "--port", "8081"],
            "10.0.0.0/8",
        ),
        (
            "IPv6 CIDR with host bits",
            vec!["allow", "2001:db8::1/32", "--port", "8081"],
            "2001:db8::/32",
        ),
        (
            "prefix 33",
            vec!["allow", "10.0.0.0/33", "--port", "8081"],
            "10.0.0.0/33",
        ),
        (
            "prefix 129",
            vec!["allow", "2001:db8::/129", "--port", "8081"],
            "2001:db8::/129",
        ),
        (
            "negative prefix",
            vec!["allow", "10.0.0.0/-1", "--port", "8081"],
            "10.0.0.0/-1",
        ),
        (
            "double prefix",
            vec!["allow", "1.2.3.4/8/8", "--port", "8081"],
            "1.2.3.4/8/8",
        ),
        (
            "empty prefix",
            vec!["allow", "1.2.3.4/", "--port", "8081"],
            "1.2.3.4/",
        ),
        (
            "zone index",
            vec!["allow", "fe80::1%eth0", "--port", "8081"],
            "fe80::1%eth0",
        ),
        (
            "host name",
            vec!["allow", "office.example", "--port", "8081"],
            "office.example",
        ),
        ("empty source", vec!["allow", "", "--port", "8081"], "''"),
        ("port 0", vec!["allow", "any", "--port", "0"], "'0'"),
        (
            "port 65536",
            vec!["allow", "any", "--port", "65536"],
            "65536",
        ),
        (
            "port 99999999999",
            vec!["allow", "any", "--port", "99999999999"],
            "99999999999",
        ),
        ("negative port", vec!["allow", "any", "--port", "-5"], "-5"),
        (
            "non-numeric port",
            vec!["allow", "any", "--port", "http"],
            "http",
        ),
        (
            "port list",
            vec!["allow", "any", "--port", "8081,8082"],
            "8081,8082",
        ),
        (
            "port with spaces",
            vec!["allow", "any", "--port", " 80"],
            " 80",
        ),
        (
            "unknown protocol",
            vec!["allow", "any", "--port", "80/sctp"],
            "sctp",
        ),
        (
            "two protocols",
            vec!["allow", "any", "--port", "80/tcp/udp"],
            "tcp/udp",
        ),
        (
            "empty protocol",
            vec!["allow", "any", "--port", "80/"],
            "''",
        ),
        (
            "second port bad",
            vec!["allow", "any", "--port", "8081", "--port", "0"],
            "'0'",
        ),
        (
            "unknown container",
            vec!["allow", "any", "--container", "no-such-container"],
            "no-such-container",
        ),
        (
            "container port 0",
            vec!["allow", "any", "--container", "web1:0"],
            "'0'",
        ),
        (
            "container port too big",
            vec!["allow", "any", "--container", "web1:99999"],
            "99999",
        ),
        (
            "container bad name",
            vec!["allow", "any", "--container", "bad name!"],
            "bad name!",
        ),
        (
            "container bad protocol",
            vec!["allow", "any", "--container", "web1:8080/icmp"],
            "icmp",
        ),
        ("no target", vec!["allow", "any"], "--port"),
        ("no source", vec!["allow", "--port", "8081"], "SOURCE"),
        (
            "revoke never allowed",
            vec!["revoke", "192.0.2.1", "--port", "9999"],
            "192.0.2.1",
        ),
        (
            "revoke unknown container",
            vec!["revoke", "any", "--container", "nope"],
            "nope",
        ),
        ("load without --iface", vec!["load"], "--iface"),
        (
            "load missing interface",
            vec!["load", "--iface", "nosuch0"],
            "nosuch0",
        ),
        ("load empty interface", vec!["load", "--iface", ""], "''"),
        (
            "load interface with a slash",
            vec!["load", "--iface", "a/b"],
            "a/b",
        ),
        (
            "load interface name too long",
            vec!["load", "--iface", long_if],
            long_if,
        ),
        (
            "load loopback (not Ethernet)",
            vec!["load", "--iface", "lo"],
            "'lo'",
        ),
        (
            "load unknown attach mode",
            vec!["load", "--iface", "lo", "--attach", "xdp"],
            "xdp",
        ),
        (
            "load unknown fallback",
            vec!["load", "--iface", "lo", "--fallback", "pf"],
            "pf",
        ),
        (
            "load conflicting flags",
            vec!["load", "--iface", &a.host_if, "--no-ebpf", "--no-iptables"],
            "--no-ebpf",
        ),
        (
            "second concurrent load",
            vec!["load", "--iface", &a.host_if],
            "already running",
        ),
        ("unknown flag", vec!["status", "--bogus"], "--bogus"),
        ("unknown command", vec!["frobnicate"], "frobnicate"),
        (
            "config is a directory",
            vec!["--config", "/run", "list"],
            "/run",
        ),
        (
            "reload of a missing config",
            vec!["--config", "/run/dockwall-lab/none.toml", "reload"],
            "none.toml",
        ),
    ];
    let docker_cases: Vec<(&str, &str, &str)> = vec![
        (
            "Docker socket missing",
            "unix:///run/dockwall-lab/no.sock",
            "no.sock",
        ),
        (
            "Docker socket not a socket",
            "unix:///etc/hostname",
            "not a socket",
        ),
    ];
    let mut count = 0;
    for (name, args, needle) in &cases {
        let (code, out, err) = dw.run(args)?;
        count += 1;
        r.expect(
            &format!("bad input refused while loaded: {name}"),
            code != 0 && out.is_empty() && err.trim().lines().count() == 1 && err.contains(needle),
            || format!("exit {code}, stdout {out:?}, stderr {err:?}"),
        );
    }
    for (name, host, needle) in &docker_cases {
        let out = output(
            dw.cmd(&["allow", "any", "--container", "web1"])
                .env("DOCKER_HOST", host),
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        count += 1;
        r.expect(
            &format!("bad input refused while loaded: {name}"),
            !out.status.success()
                && out.stdout.is_empty()
                && err.trim().lines().count() == 1
                && err.contains(needle),
            || err.to_string(),
        );
    }
    for verb in [
        &["allow", "any", "--port", "8081"][..],
        &["revoke", "any", "--port", "8081"],
        &["reload"],
        &["unload"],
        &["load", "--iface", &a.host_if],
    ] {
        let cmd = dw.cmd(verb);
        let mut nobody = Command::new("setpriv");
        nobody
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))));
        let out = output(&mut nobody)?;
        let err = String::from_utf8_lossy(&out.stderr);
        count += 1;
        r.expect(
            &format!("bad input refused while loaded: not root ({})", verb[0]),
            !out.status.success()
                && err.contains("must run as root")
                && err.trim().lines().count() == 1,
            || err.to_string(),
        );
    }
    println!("e2e: note {count} bad inputs tried while loaded");
    r.expect("at least 40 bad inputs tried", count >= 40, || {
        count.to_string()
    });
    r.expect(
        "bad inputs changed nothing: file, policy in force, maps, iptables, ipsets, nftables",
        snapshot(dw) == before,
        String::new,
    );
    Ok(())
}

/// 100 concurrent `allow`/`revoke` processes all land: the file and every
/// dataplane agree, nothing lost or duplicated.
fn concurrent_edits(r: &mut Report, dw: &Dockwall) -> anyhow::Result<()> {
    for i in 0..50 {
        dw.ok(&["allow", &format!("203.0.113.{i}"), "--port", "8081"])?;
    }
    let mut children = Vec::new();
    for i in 0..50 {
        children.push(
            dw.cmd(&["allow", &format!("198.51.100.{i}"), "--port", "8081"])
                .stdout(std::process::Stdio::null())
                .spawn()?,
        );
        children.push(
            dw.cmd(&["revoke", &format!("203.0.113.{i}"), "--port", "8081"])
                .stdout(std::process::Stdio::null())
                .spawn()?,
        );
    }
    let failed = children
        .into_iter()
        .map(|mut c| c.wait())
        .filter(|s| !s.as_ref().is_ok_and(|s| s.success()))
        .count();
    r.expect(
        "100 concurrent allow/revoke processes all succeed",
        failed == 0,
        || failed.to_string(),
    );
    // The saved policy is the file plus the journal of the daemon's edits.
    let (code, saved, err) = dw.run(&["list", "--json"])?;
    let count = |needle: &str| saved.matches(needle).count();
    let added: usize = (0..50).map(|i| count(&format!("\"198.51.100.{i}\""))).sum();
    let revoked: usize = (0..50).map(|i| count(&format!("\"203.0.113.{i}\""))).sum();
    r.expect(
        "the file holds every allowance once and no revoked one",
        code == 0 && added == 50 && revoked == 0,
        || {
            format!(
                "added {added}, revoked left {revoked}; list --json exit {code}: {err} {saved:.300}"
            )
        },
    );
    let set = capture(Command::new("ipset").args(["list", "dockwall-4-tcp-8081"]))?;
    let in_set = (0..50)
        .filter(|i| set.contains(&format!("198.51.100.{i}\n")))
        .count();
    let revoked_in_set = (0..50)
        .filter(|i| set.contains(&format!("203.0.113.{i}\n")))
        .count();
    let mut map = String::new();
    for pinned in crate::readback::EBPF_ALLOW_MAPS {
        map.push_str(&capture(
            Command::new("bpftool").args(["map", "dump", "pinned", pinned]),
        )?);
    }
    // Keys are hex bytes: 198.51.100.x is c6 33 64 xx, 203.0.113.x is cb 00 71 xx.
    let in_map = map.matches("c6 33 64").count();
    let revoked_in_map = map.matches("cb 00 71").count();
    r.expect(
        "the eBPF map and the ipset agree with the file",
        in_set == 50 && revoked_in_set == 0 && in_map == 50 && revoked_in_map == 0,
        || format!("set {in_set}/{revoked_in_set}, map {in_map}/{revoked_in_map}"),
    );
    for i in 0..50 {
        dw.ok(&["revoke", &format!("198.51.100.{i}"), "--port", "8081"])?;
    }
    Ok(())
}

/// The daemon notices and repairs drift, and `status` reports it.
fn drift(r: &mut Report, dw: &Dockwall, b: &Client) -> anyhow::Result<()> {
    let pin = format!("/sys/fs/bpf/dockwall/link_ingress_{}", b.host_if);
    std::fs::remove_file(&pin).with_context(|| format!("removing {pin}"))?;
    std::fs::remove_file("/sys/fs/bpf/dockwall/DW_STATS").context("removing a map pin")?;
    let jump = [
        "DOCKER-USER",
        "-i",
        b.host_if.as_str(),
        "-j",
        "DOCKWALL-FWD",
    ];
    crate::util::run(Command::new("iptables").arg("-D").args(jump))?;
    let repaired = retry_for(Duration::from_secs(5), || {
        let (code, out, _) = dw.run(&["status", "--json"])?;
        let s: serde_json::Value = serde_json::from_str(&out)?;
        let repairs = s["repairs"].as_array().map_or(0, |r| r.len());
        if code == 0
            && repairs >= 3
            && std::path::Path::new(&pin).exists()
            && std::path::Path::new("/sys/fs/bpf/dockwall/DW_STATS").exists()
        {
            Ok(())
        } else {
            bail!("status {code}, {repairs} repairs: {out}")
        }
    });
    r.check(
        "removed link pin, map pin and DOCKER-USER jump are repaired and reported by status",
        repaired,
    );
    r.check(
        "after the repair the other source is still blocked",
        blocked(b, &b8081(b)),
    );
    let ok = output(Command::new("iptables").arg("-C").args(jump))?
        .status
        .success();
    r.expect("the DOCKER-USER jump is back", ok, String::new);
    Ok(())
}

/// `kill -9` of the daemon leaves everything in force; `load` again adopts
/// it in place: no blocked source gets through, no allowed one is cut.
fn crash_and_reload(
    r: &mut Report,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
    mut loaded: Loaded,
) -> anyhow::Result<Loaded> {
    let ifaces = [a.host_if.as_str(), b.host_if.as_str()];
    let (t, reloaded) = under_traffic(a, &a8081(a), b, &b8081(b), || {
        thread::sleep(Duration::from_millis(500));
        loaded.kill9();
        // The restart is also an upgrade: the per-port drop counters older
        // dockwalls pinned (shared, then a per-CPU hash) are in the pin
        // dir, and so are their allowance hit counters (per-CPU hashes)
        // and the IPv4 mirror in its first layout, and the prefix-length
        // slots before they were mapped.
        let legacy = plant_legacy_pin().and_then(|()| plant_legacy_hits());
        thread::sleep(Duration::from_secs(1));
        let reloaded = legacy.and_then(|()| dw.load(&ifaces));
        thread::sleep(Duration::from_secs(1));
        reloaded
    });
    let (ok, failed, tries, leaked) = (t.ok, t.failed, t.tries, t.leaked);
    println!(
        "e2e: note kill -9 then load again: {ok} allowed ok, {failed} failed; {tries} blocked attempts, {leaked} got through"
    );
    r.expect(
        "kill -9 and load again: no allowed connection is cut",
        failed == 0 && ok > 10,
        || format!("{failed} of {}", ok + failed),
    );
    r.expect(
        "kill -9 and load again: no blocked source gets through",
        leaked == 0 && tries >= 8,
        || format!("{leaked} of {tries}"),
    );
    std::mem::forget(loaded); // its daemon is dead; the new load owns the state
    let reloaded = reloaded?;
    let said = LEGACY_PINS.iter().all(|pin| {
        reloaded
            .output()
            .iter()
            .any(|l| l.contains(&format!("removed {}", pin.path)))
    });
    let gone = LEGACY_PINS
        .iter()
        .all(|pin| !std::path::Path::new(pin.path).exists());
    r.expect(
        "load after older dockwalls: their drop-counter pins (shared, per-CPU hash), their IPv4 mirror (another layout) and their prefix-length slots (not mmapable) are removed, and load says so",
        said && gone,
        || format!("{:?}", reloaded.output()),
    );
    let moved = LEGACY_HITS_PINS.iter().all(|pin| {
        reloaded
            .output()
            .iter()
            .any(|l| l.contains("moved the hit counts") && l.contains(pin))
    });
    let gone = LEGACY_HITS_PINS
        .iter()
        .all(|pin| !std::path::Path::new(pin).exists());
    let hits = a_hits(dw, a);
    let cpus = online_cpus();
    r.expect(
        "load after older dockwalls: their per-CPU hash hit counters (unpreallocated, and one a crashed load set aside) are added into the allowances' slots and removed, and load says so",
        moved && gone && hits.is_some_and(|h| h >= 2 * PLANTED_HITS * cpus),
        || {
            format!(
                "said so: {moved}; pins gone: {gone}; {a} hits {hits:?} (planted {PLANTED_HITS} on each of {cpus} CPUs in two maps); output {:?}",
                reloaded.output(),
                a = a.addr4
            )
        },
    );
    Ok(reloaded)
}

/// Where older dockwalls pinned their allowance hit counters: the per-CPU
/// hash, and where one of them set an unpreallocated one aside.
const LEGACY_HITS_PINS: [&str; 2] = [
    "/sys/fs/bpf/dockwall/DW_ALLOW_HITS",
    "/sys/fs/bpf/dockwall/DW_ALLOW_HITS_UNPREALLOCATED",
];
/// The allowances, keyed as the older hit counters were.
const NETS_PIN: &str = "/sys/fs/bpf/dockwall/DW_ALLOW_NETS";
/// Each CPU's count of every counter the planted maps hold: far above
/// what the test's own traffic adds, so the check sees it was carried.
const PLANTED_HITS: u64 = 1_000_000;

/// Pins two maps shaped like older dockwalls' hit counters (a per-CPU hash
/// keyed by allowance; one preallocated, one not) where they pinned them,
/// each holding every allowance's counter at [`PLANTED_HITS`] on each CPU:
/// the load must add both into the allowances' slots.
fn plant_legacy_hits() -> anyhow::Result<()> {
    let dump = capture(Command::new("bpftool").args(["map", "dump", "pinned", NETS_PIN, "-j"]))?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&dump).context("bpftool's dump of DW_ALLOW_NETS")?;
    if entries.is_empty() {
        bail!("no allowance in {NETS_PIN} to plant hit counters for");
    }
    let value: Vec<String> = PLANTED_HITS
        .to_le_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for (pin, flags) in LEGACY_HITS_PINS.iter().zip(["0", "1"]) {
        crate::util::run(Command::new("bpftool").args([
            "map",
            "create",
            pin,
            "type",
            "percpu_hash",
            "key",
            "24",
            "value",
            "8",
            "entries",
            "131072",
            "name",
            "DW_ALLOW_HITS",
            "flags",
            flags,
        ]))?;
        for entry in &entries {
            let key: Vec<String> = entry["key"]
                .as_array()
                .context("a key in bpftool's dump")?
                .iter()
                .filter_map(|b| b.as_str())
                .map(|b| b.trim_start_matches("0x").to_string())
                .collect();
            let mut cmd = Command::new("bpftool");
            cmd.args(["map", "update", "pinned", pin, "key", "hex"])
                .args(&key)
                .args(["value", "hex"])
                .args(&value);
            crate::util::run(&mut cmd)?;
        }
    }
    Ok(())
}

/// `a`'s allowance's hits as `list --json` gives them.
fn a_hits(dw: &Dockwall, a: &Client) -> Option<u64> {
    let (_, out, _) = dw.run(&["list", "--json"]).ok()?;
    let rows: serde_json::Value = serde_json::from_str(&out).ok()?;
    rows.as_array()?
        .iter()
        .find(|row| {
            row["source"]
                .as_str()
                .is_some_and(|s| s.starts_with(&a.addr4))
        })
        .and_then(|row| row["hits"].as_u64())
}

fn online_cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// A pin of an older dockwall's map that `load` removes, and its shape.
struct LegacyPin {
    path: &'static str,
    kind: &'static str,
    value_size: &'static str,
    entries: &'static str,
    flags: &'static str,
}

const fn legacy(
    path: &'static str,
    kind: &'static str,
    value_size: &'static str,
    entries: &'static str,
    flags: &'static str,
) -> LegacyPin {
    LegacyPin {
        path,
        kind,
        value_size,
        entries,
        flags,
    }
}

/// The per-port drop counters, shared (a plain hash of port key -> u64),
/// then a per-CPU hash (not preallocated); the IPv4 mirror of three
/// two-word ways a bucket (an mmapable array, BPF_F_MMAPABLE = 1024), as
/// large as the new one; and the per-group prefix lengths, a plain array.
const LEGACY_PINS: [LegacyPin; 4] = [
    legacy(
        "/sys/fs/bpf/dockwall/DW_PORT_DROPS",
        "hash",
        "8",
        "131072",
        "0",
    ),
    legacy(
        "/sys/fs/bpf/dockwall/DW_PCPU_DROPS",
        "percpu_hash",
        "8",
        "131072",
        "1",
    ),
    legacy(
        "/sys/fs/bpf/dockwall/DW_ALLOW_MIRROR",
        "array",
        "64",
        "262144",
        "1024",
    ),
    legacy(
        "/sys/fs/bpf/dockwall/DW_ALLOW_LENS",
        "array",
        "8",
        "262144",
        "0",
    ),
];

/// Pins maps shaped like older dockwalls' where they pinned them.
fn plant_legacy_pin() -> anyhow::Result<()> {
    for pin in &LEGACY_PINS {
        let name = pin.path.rsplit('/').next().unwrap_or(pin.path);
        crate::util::run(Command::new("bpftool").args([
            "map",
            "create",
            pin.path,
            "type",
            pin.kind,
            "key",
            "4",
            "value",
            pin.value_size,
            "entries",
            pin.entries,
            "name",
            name,
            "flags",
            pin.flags,
        ]))?;
    }
    Ok(())
}

/// A container removed and created again: enforcement is back within 1 s.
/// "Back" is the daemon listing the new container's port, and then the
/// source being blocked: a probe alone passes before Docker has published
/// the port at all (nothing answers yet), and the status check that used
/// to follow at once could run before the daemon's resync for the event.
fn recreated_container(
    r: &mut Report,
    dockerd: &Dockerd,
    dw: &Dockwall,
    b: &Client,
) -> anyhow::Result<()> {
    let b8082 = format!("{}:8082", b.host4);
    dockerd.cli(&["rm", "-f", "web2"])?;
    dockerd.run_web("web2", &["--network", "dwnet", "-p", "8082:8080"])?;
    let created = Instant::now();
    let mut last = String::new();
    let listed = retry_for(Duration::from_secs(1), || {
        let (code, out, _) = dw.run(&["status"])?;
        last = out;
        if code == 0 && last.contains("web2") && last.contains("8082") {
            Ok(())
        } else {
            bail!("status does not list web2's port 8082 yet")
        }
    });
    let took = created.elapsed();
    println!(
        "e2e: note a recreated container's port was in dockwall's status {took:.2?} after `docker run` returned"
    );
    r.expect(
        "status shows the recreated container's port within 1 s",
        listed.is_ok(),
        || last.clone(),
    );
    r.check(
        "a removed and recreated container is filtered again (its port blocks the source)",
        blocked_within(b, &b8082),
    );
    Ok(())
}

fn blocked_within(c: &Client, addr: &str) -> anyhow::Result<()> {
    if c.tcp_connects_within(addr, Duration::from_millis(150))? {
        bail!("{} connected to {addr}", c.ns);
    }
    Ok(())
}

/// After a "reboot" (no pins, no rules, no /run state), `load` restores the
/// whole policy before it reports the filter in force.
fn reboot(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    let loaded = dw.load(&[&a.host_if, &b.host_if])?;
    let mut loaded = loaded;
    loaded.kill9();
    std::mem::forget(loaded);
    // What a reboot takes away: bpffs pins (so the links), rules, /run.
    let _ = std::fs::remove_dir_all("/sys/fs/bpf/dockwall");
    let flush = "for t in iptables ip6tables; do $t -D DOCKER-USER -i dwa0 -j DOCKWALL-FWD; $t -D DOCKER-USER -i dwb0 -j DOCKWALL-FWD; \
                 $t -D INPUT -i dwa0 -j DOCKWALL-IN; $t -D INPUT -i dwb0 -j DOCKWALL-IN; \
                 $t -F DOCKWALL-FWD; $t -X DOCKWALL-FWD; $t -F DOCKWALL-IN; $t -X DOCKWALL-IN; done 2>/dev/null; \
                 for s in $(ipset list -n | grep ^dockwall-); do ipset destroy $s; done; true";
    crate::util::run(&mut crate::util::sh(flush))?;
    let _ = std::fs::remove_dir_all(&dw.run_dir);
    r.check(
        "after the simulated reboot nothing filters",
        retry(|| crate::e2e::connects(b, &b8081(b))),
    );
    let loaded = dw.load(&[&a.host_if, &b.host_if])?;
    // Checked right after "in force" was printed.
    r.check(
        "after a reboot the policy is whole when load reports in force (blocked)",
        blocked(b, &b8081(b)),
    );
    r.check(
        "after a reboot the policy is whole when load reports in force (allowed)",
        http_is(a, &a8081(a), "web1"),
    );
    drop(loaded);
    Ok(())
}

/// An interface that disappears while loaded: status says so, the daemon
/// carries on, and re-attaches when the interface comes back.
fn vanishing_interface(r: &mut Report, dw: &Dockwall, a: &Client) -> anyhow::Result<()> {
    let _ = output(Command::new("ip").args(["link", "del", "dwz0"]));
    crate::util::run(Command::new("ip").args([
        "link", "add", "dwz0", "type", "veth", "peer", "name", "dwz1",
    ]))?;
    let mut loaded = dw.load(&[&a.host_if, "dwz0"])?;
    crate::util::run(Command::new("ip").args(["link", "del", "dwz0"]))?;
    let (code, out, _) = dw.run(&["status"])?;
    r.expect(
        "an interface that disappears: status exits non-zero and names it",
        code != 0 && out.contains("dwz0") && out.contains("NOT attached"),
        || out.clone(),
    );
    crate::util::run(Command::new("ip").args([
        "link", "add", "dwz0", "type", "veth", "peer", "name", "dwz1",
    ]))?;
    let back = retry_for(Duration::from_secs(5), || {
        let (code, out, _) = dw.run(&["status"])?;
        if code == 0 { Ok(()) } else { bail!("{out}") }
    });
    r.check(
        "when the interface returns the daemon attaches again and status is 0",
        back,
    );
    r.expect("the daemon kept running", loaded.running(), String::new);
    drop(loaded);
    let _ = output(Command::new("ip").args(["link", "del", "dwz0"]));
    Ok(())
}

fn retry_for(limit: Duration, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}
