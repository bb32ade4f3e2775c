//! Docker-native policy on the lab's dockerd: container labels
//! (`dockwall.allow`, `dockwall.allow.CPORT`), a label that fails closed,
//! named sets (a 10k-CIDR list loaded from a file, used by two allowances
//! and a label), each checked with real connections under every dataplane
//! alone (eBPF, iptables, nftables) against what the policy says.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    e2e::{Report, blocked, connects, retry},
    lab::{Client, Dockerd, Dockwall, IMAGE},
};

/// The planes the matrix runs under, as `load` flags.
const PLANES: [(&str, &[&str]); 3] = [
    ("ebpf", &["--no-iptables"]),
    ("iptables", &["--no-ebpf", "--fallback", "iptables"]),
    ("nftables", &["--no-ebpf", "--fallback", "nftables"]),
];

/// Members of the large set besides the client that it lets in.
const LARGE_SET: usize = 10_000;

/// A container serving HTTP on 8080 and 9090 (body: its name).
fn run_two_ports(dockerd: &Dockerd, name: &str, extra: &[&str]) -> anyhow::Result<()> {
    let script = format!(
        "/bin/busybox mkdir -p /w && echo {name} > /w/index.html && /bin/busybox httpd -p 9090 -h /w && exec /bin/busybox httpd -f -p 8080 -h /w"
    );
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "/bin/busybox", "sh", "-c", &script]);
    dockerd.cli(&args).map(|_| ())
}

/// A list file of `LARGE_SET` networks, and `member`: /24s in
/// 100.64.0.0/10, or (`other`) single addresses in 198.18.0.0/15.
fn write_list(path: &std::path::Path, member: &str, other: bool) -> anyhow::Result<()> {
    let mut text = String::from("# provider ranges, as published\n");
    for i in 0..LARGE_SET {
        let _ = if other {
            writeln!(
                text,
                "198.{}.{}.{}",
                18 + i / 65536,
                (i / 256) % 256,
                i % 256
            )
        } else {
            writeln!(text, "100.{}.{}.0/24", 64 + i / 256, i % 256)
        };
    }
    let _ = writeln!(text, "{member}   # the lab's client");
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// (who, where, open by the policy).
type Probe<'a> = (&'a Client, String, bool);

/// Every probe, in parallel per client; the ones that disagree.
fn mismatches(probes: &[Probe]) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(c, addr, open)| {
                s.spawn(move || {
                    // An open path gets a few tries (a daemon's resync may
                    // be in flight); a closed one must stay closed.
                    let got = if *open {
                        retry(|| connects(c, addr)).is_ok()
                    } else {
                        blocked(c, addr).is_err()
                    };
                    (got != *open).then(|| {
                        format!(
                            "{} -> {addr}: {} (policy: {})",
                            c.addr4,
                            if got { "connected" } else { "blocked" },
                            if *open { "open" } else { "closed" }
                        )
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    })
}

pub fn run(
    r: &mut Report,
    dockerd: &Dockerd,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&dw.config);
    let allow_a = format!("dockwall.allow={}", a.addr4);
    run_two_ports(
        dockerd,
        "lab-all",
        &["-p", "8091:8080", "-p", "8092:9090", "--label", &allow_a],
    )?;
    let one_b = format!("dockwall.allow.9090={}", b.addr4);
    run_two_ports(
        dockerd,
        "lab-one",
        &["-p", "8093:8080", "-p", "8094:9090", "--label", &one_b],
    )?;
    run_two_ports(
        dockerd,
        "lab-bad",
        &["-p", "8095:8080", "--label", "dockwall.allow=10.0.0.1/33"],
    )?;
    run_two_ports(
        dockerd,
        "lab-set",
        &["-p", "8096:8080", "--label", "dockwall.allow=@office"],
    )?;

    let dir = dw.config.parent().context("the lab config dir")?;
    let (list_b, list_a) = (dir.join("cdn-b.txt"), dir.join("cdn-a.txt"));
    let list_other = dir.join("cdn-other.txt");
    write_list(&list_b, &b.addr4, false)?;
    write_list(&list_a, &a.addr4, false)?;
    write_list(&list_other, &b.addr4, true)?;
    let list_b = list_b.display().to_string();
    let list_a = list_a.display().to_string();
    let list_other = list_other.display().to_string();

    // Bad input first: each refused in one line, nothing saved.
    let bad = [
        (
            vec!["allow", "@nosuch", "--port", "8081"],
            "no set named @nosuch",
        ),
        (
            vec!["set", "add", "office", "10.0.0.1/33"],
            "invalid source '10.0.0.1/33'",
        ),
        (vec!["set", "add", "no way", "10.0.0.1"], "invalid set name"),
        (vec!["set", "remove", "office"], "no set named @office"),
    ];
    for (args, want) in &bad {
        let (code, out, err) = dw.run(args)?;
        r.expect(
            &format!(
                "labels/sets: `dockwall {}` is refused naming why",
                args.join(" ")
            ),
            code != 0 && err.contains(want) && err.lines().count() == 1 && !dw.config.exists(),
            || format!("exit {code}: {out}{err}"),
        );
    }
    let bad_list = dir.join("bad.txt");
    std::fs::write(&bad_list, "203.0.113.0/24\n203.0.113.1/24\n")?;
    let (code, _, err) = dw.run(&["set", "load", "cdn", &bad_list.display().to_string()])?;
    r.expect(
        "labels/sets: `set load` of a bad list names FILE:LINE and saves nothing",
        code != 0 && err.contains("bad.txt:2:") && !dw.config.exists(),
        || format!("exit {code}: {err}"),
    );

    dw.ok(&["set", "add", "office", &a.addr4])?;
    dw.ok(&["set", "load", "cdn", &list_b])?;
    dw.ok(&["allow", "@cdn", "--port", "8081"])?;
    dw.ok(&["allow", "@cdn", "--port", "8082"])?;
    // A file allowance on the port of the container whose label fails.
    dw.ok(&["allow", "any", "--port", "8095"])?;

    let at = |c: &Client, port: u16| format!("{}:{port}", c.host4);
    // What the policy says, with the cdn set holding `cdn` (a or b).
    let table = |cdn_holds_a: bool| -> Vec<Probe> {
        vec![
            (a, at(a, 8091), true),
            (b, at(b, 8091), false),
            (a, at(a, 8092), true),
            (b, at(b, 8092), false),
            (a, at(a, 8093), false),
            (b, at(b, 8093), false),
            (a, at(a, 8094), false),
            (b, at(b, 8094), true),
            (a, at(a, 8095), false),
            (b, at(b, 8095), false),
            (a, at(a, 8096), true),
            (b, at(b, 8096), false),
            (a, at(a, 8081), cdn_holds_a),
            (b, at(b, 8081), !cdn_holds_a),
            (a, at(a, 8082), cdn_holds_a),
            (b, at(b, 8082), !cdn_holds_a),
        ]
    };

    let mut timings = Vec::new();
    for (plane, flags) in PLANES {
        let loaded = dw.load_with(&[&a.host_if, &b.host_if], flags, None)?;
        let wrong = mismatches(&table(false));
        r.expect(
            &format!("labels/sets, {plane} alone: all-ports label, one-port label, bad label (closed to all, file allowance too), @set label, two @cdn allowances: every probe as the policy says"),
            wrong.is_empty(),
            || wrong.join("; "),
        );
        // One apply moves both allowances to the new list.
        let started = Instant::now();
        let (code, out, err) = dw.run(&["set", "load", "cdn", &list_a])?;
        let took = started.elapsed();
        let wrong = mismatches(&table(true));
        r.expect(
            &format!("labels/sets, {plane} alone: `set load` of {} CIDRs swaps who the two @cdn allowances let in", LARGE_SET + 1),
            code == 0 && wrong.is_empty(),
            || format!("exit {code}: {out}{err} {}", wrong.join("; ")),
        );
        let applied = |out: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix("applied in "))
                .and_then(|l| l.strip_suffix(" ms"))
                .and_then(|ms| ms.parse::<u64>().ok())
        };
        timings.push((plane, "one member swapped", took, applied(&out)));
        // Every member replaced: 2 x 10k entries out, 2 x 10k in.
        let started = Instant::now();
        let (code, out, err) = dw.run(&["set", "load", "cdn", &list_other])?;
        let took = started.elapsed();
        let wrong = mismatches(&table(false));
        r.expect(
            &format!("labels/sets, {plane} alone: `set load` replacing every one of {LARGE_SET} members is in force at once"),
            code == 0 && wrong.is_empty(),
            || format!("exit {code}: {out}{err} {}", wrong.join("; ")),
        );
        timings.push((plane, "every member replaced", took, applied(&out)));
        dw.ok(&["set", "load", "cdn", &list_b])?;

        if plane == "ebpf" {
            daemon_facing(r, dw, &loaded, a, b)?;
        }
        drop(loaded);
    }
    let mut line = String::from(
        "labels/sets: `set load` of a 10k-CIDR list used by two allowances, whole command (daemon apply):",
    );
    for (plane, what, took, applied) in &timings {
        let _ = write!(
            line,
            " {plane}, {what}: {} ms ({} ms);",
            took.as_millis(),
            applied.map_or("?".to_string(), |ms| ms.to_string())
        );
    }
    println!("e2e: note {line}");

    // The label goes with the container: recreated without it, closed.
    let loaded = dw.load(&[&a.host_if, &b.host_if])?;
    r.check(
        "labels: before recreation the label lets a in",
        retry(|| connects(a, &at(a, 8091))),
    );
    dockerd.cli(&["rm", "-f", "lab-all"])?;
    run_two_ports(dockerd, "lab-all", &["-p", "8091:8080", "-p", "8092:9090"])?;
    r.check(
        "labels: the container recreated without its label is closed to the source it named",
        retry(|| blocked(a, &at(a, 8091))),
    );
    r.check(
        "labels: container egress works with label allowances in force",
        crate::equivalence::tcp_egress(dockerd, "lab-one", a, 8097),
    );
    drop(loaded);
    for name in ["lab-all", "lab-one", "lab-bad", "lab-set"] {
        let _ = dockerd.cli(&["rm", "-f", name]);
    }
    let _ = std::fs::remove_file(&dw.config);
    Ok(())
}

/// What an admin reads: status, list, explain, the daemon's log, and a
/// set's member removed.
fn daemon_facing(
    r: &mut Report,
    dw: &Dockwall,
    loaded: &crate::lab::Loaded,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    let (_, status, _) = dw.run(&["status"])?;
    r.expect(
        "labels: `status` names the container whose label fails and why",
        status.contains("LABELS FAIL on container lab-bad") && status.contains("10.0.0.1/33"),
        || status.clone(),
    );
    let (_, json, _) = dw.run(&["list", "--json"])?;
    let rows: serde_json::Value = serde_json::from_str(&json).context("list --json")?;
    let origins: Vec<String> = rows
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|x| x["origin"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    r.expect(
        "labels: `list --json` gives label allowances their origin (label on NAME)",
        origins.iter().any(|o| o == "label on lab-all")
            && origins.iter().any(|o| o == "label on lab-one")
            && origins.iter().filter(|o| *o == "file").count() == 3,
        || json.clone(),
    );
    let (_, why, _) = dw.run(&["explain", &a.addr4, "8091"])?;
    r.expect(
        "labels: `explain` names the label that decides",
        why.contains("ALLOW") && why.contains("(label on lab-all)"),
        || why.clone(),
    );
    let (_, why, _) = dw.run(&["explain", &b.addr4, "8095"])?;
    r.expect(
        "labels: `explain` says a port is closed because its container's label fails",
        why.contains("DROP") && why.contains("closed to everyone"),
        || why.clone(),
    );
    // Two resyncs later the failure was still logged once.
    std::thread::sleep(Duration::from_millis(4500));
    let said = loaded
        .output()
        .iter()
        .filter(|l| l.contains("labels of container lab-bad fail"))
        .count();
    r.expect(
        "labels: the daemon logs a failing label once",
        said == 1,
        || format!("{said} times: {:?}", loaded.output()),
    );
    dw.ok(&["set", "remove", "office", &a.addr4])?;
    r.check(
        "sets: a member removed from @office is closed at once (label using the set)",
        blocked(a, &format!("{}:8096", a.host4)),
    );
    let (code, _, err) = dw.run(&["set", "remove", "cdn"])?;
    r.expect(
        "sets: a set used by allowances cannot be removed",
        code != 0 && err.contains("used by 2 saved allowance(s)"),
        || err.clone(),
    );
    dw.ok(&["set", "add", "office", &a.addr4])?;
    if retry(|| connects(a, &format!("{}:8096", a.host4))).is_err() {
        bail!("@office with a added back does not let a in again");
    }
    Ok(())
}
