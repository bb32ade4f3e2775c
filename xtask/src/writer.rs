//! One writer (issue 10): the running daemon owns the dataplanes, and no
//! edit is lost across restarts, kill -9 in the middle, or a thousand
//! commands at once. Real dockerd, real traffic, state read back from the
//! kernel.

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    e2e::{Report, blocked, http_is},
    lab::{Client, Dockwall, Loaded},
    readback,
    util::output,
};

pub fn run(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    restart_then_revoke(r, dw, a, b)?;
    socket_is_root_only(r, dw, a, b)?;
    thousand_edits_across_restarts(r, dw, a, b)?;
    Ok(())
}

/// Empties the saved policy (file and journal) between phases.
pub fn reset(dw: &Dockwall) {
    let _ = std::fs::remove_file(&dw.config);
    let _ = std::fs::remove_file(dw.config.with_extension("journal"));
}

fn ifaces<'a>(a: &'a Client, b: &'a Client) -> [&'a str; 2] {
    [a.host_if.as_str(), b.host_if.as_str()]
}

fn in_set(set: &str, addr: &str) -> bool {
    output(Command::new("ipset").args(["test", set, addr]))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The daemon is replaced by a `dockwall load` that has not applied yet;
/// the admin revokes an address and allows another in that window.
/// Before the fix the revoke printed "in force now" while the new daemon
/// then applied the policy it had read before it, and kept letting the
/// address in (5 of 5 tries).
fn restart_then_revoke(
    r: &mut Report,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    reset(dw);
    let b8081 = format!("{}:8081", b.host4);
    let b8082 = format!("{}:8082", b.host4);
    dw.ok(&["allow", &a.addr4, "--port", "8081"])?;
    dw.ok(&["allow", &b.addr4, "--port", "8081"])?;
    let mut loaded = dw.load(&ifaces(a, b))?;
    for round in 1..=3 {
        for kill in [true, false] {
            let how = if kill { "kill -9" } else { "SIGTERM" };
            let name = format!("restart {round} ({how})");
            r.check(
                &format!("{name}: the source reaches 8081 before"),
                http_is(b, &b8081, "web1"),
            );
            if kill {
                loaded.kill9();
            } else {
                loaded.stop()?;
            }
            let next = dw.spawn_load(&ifaces(a, b), &[], None)?;
            // Its daemon is gone; the new one owns the state (no unload).
            std::mem::forget(std::mem::replace(&mut loaded, next));
            // At once, while the new daemon starts.
            let revoked = dw.run(&["revoke", &b.addr4, "--port", "8081"])?;
            let allowed = dw.run(&["allow", &b.addr4, "--port", "8082"])?;
            r.expect(
                &format!("{name}: revoke and allow during the start succeed"),
                revoked.0 == 0
                    && revoked.1.contains("in force now")
                    && allowed.0 == 0
                    && allowed.1.contains("in force now"),
                || format!("{revoked:?} {allowed:?}"),
            );
            loaded.wait_in_force()?;
            thread::sleep(Duration::from_secs(4));
            r.check(
                &format!("{name}: the revoked source is blocked 4 s later"),
                blocked(b, &b8081),
            );
            r.check(
                &format!("{name}: the allow made in the same window is in force"),
                http_is(b, &b8082, "web2"),
            );
            let kernel = readback::ebpf_entries()?;
            let b32 = readback::net(&b.addr4);
            r.expect(
                &format!("{name}: eBPF map and ipset hold the revoke and the allow"),
                !kernel.contains(&(8081, "tcp", b32.clone()))
                    && kernel.contains(&(8082, "tcp", b32.clone()))
                    && !in_set("dockwall-4-tcp-8081", &b.addr4)
                    && in_set("dockwall-4-tcp-8082", &b.addr4),
                || format!("{kernel:?}"),
            );
            let (code, out, _) = dw.run(&["status", "--json"])?;
            let s: serde_json::Value = serde_json::from_str(&out)?;
            let rev = &s["revision"];
            let saved = rev["saved"].as_u64();
            let in_sync = rev["applied"]
                .as_object()
                .is_some_and(|m| !m.is_empty() && m.values().all(|v| v.as_u64() == saved));
            r.expect(
                &format!("{name}: status: in force, every dataplane holds the saved revision"),
                code == 0 && in_sync && rev["daemon"] == "running",
                || format!("{code} {rev}"),
            );
            dw.ok(&["allow", &b.addr4, "--port", "8081"])?;
            dw.ok(&["revoke", &b.addr4, "--port", "8082"])?;
        }
    }
    drop(loaded);
    Ok(())
}

/// The control socket: mode 0600, and a non-root peer that gets past the
/// mode (chmod by hand) is still refused by its SO_PEERCRED check.
fn socket_is_root_only(
    r: &mut Report,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let loaded = dw.load(&ifaces(a, b))?;
    let socket = dw.run_dir.join("control.sock");
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    r.expect("control socket is mode 0600", mode == 0o600, || {
        format!("{mode:o}")
    });
    // Send one request as uid 65534; print the answer or the error.
    let as_nobody = |socket: &std::path::Path| {
        output(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .args(["/usr/bin/python3", "-c"])
                .arg(
                    "import socket,sys\n\
                     s=socket.socket(socket.AF_UNIX)\n\
                     s.connect(sys.argv[1])\n\
                     s.sendall(b'\"reload\"\\n')\n\
                     print(s.makefile().readline())",
                )
                .arg(socket),
        )
    };
    let out = as_nobody(&socket)?;
    let err = String::from_utf8_lossy(&out.stderr);
    r.expect(
        "a non-root user cannot connect to the control socket",
        !out.status.success() && err.contains("Permission denied"),
        || err.to_string(),
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let out = as_nobody(&socket);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    let out = out?;
    let answer = String::from_utf8_lossy(&out.stdout);
    r.expect(
        "a non-root peer is refused by the daemon (SO_PEERCRED), naming its uid",
        answer.contains("root only") && answer.contains("uid 65534"),
        || format!("{answer} {}", String::from_utf8_lossy(&out.stderr)),
    );
    drop(loaded);
    Ok(())
}

/// 1000 `allow`/`revoke` commands at once (up to 100 running together),
/// with the daemon killed (-9) after 300 and stopped (SIGTERM) after 650,
/// a new one started each time: every command succeeds, and the saved
/// file, the eBPF map and the ipset hold exactly the result.
fn thousand_edits_across_restarts(
    r: &mut Report,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    reset(dw);
    let old: Vec<String> = (0..400)
        .map(|i| format!("198.18.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let new: Vec<String> = (0..600)
        .map(|i| format!("198.19.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let toml: String = old
        .iter()
        .map(|s| format!("[[allow]]\nsource = \"{s}\"\nport = \"8081\"\n\n"))
        .collect();
    std::fs::write(&dw.config, toml).context("writing the 400-allowance config")?;
    let mut loaded = dw.load(&ifaces(a, b))?;
    // Interleaved: revoke, allow, allow, revoke, ...
    let mut commands: Vec<Vec<String>> = Vec::new();
    let (mut o, mut n) = (old.iter(), new.iter());
    loop {
        let mut any = false;
        for (verb, src) in [
            ("allow", n.next()),
            ("revoke", o.next()),
            ("allow", n.next()),
        ] {
            if let Some(src) = src {
                commands.push(vec![
                    verb.into(),
                    src.clone(),
                    "--port".into(),
                    "8081".into(),
                ]);
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let started = Instant::now();
    let mut running: Vec<Child> = Vec::new();
    let mut failed = Vec::new();
    let finish = |c: Child, failed: &mut Vec<String>| match c.wait_with_output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => failed.push(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => failed.push(e.to_string()),
    };
    for (i, args) in commands.iter().enumerate() {
        if i == 300 || i == 650 {
            if i == 300 {
                loaded.kill9();
            } else {
                loaded.stop()?;
            }
            let next = dw.spawn_load(&ifaces(a, b), &[], None)?;
            std::mem::forget(std::mem::replace(&mut loaded, next));
        }
        if running.len() >= 100 {
            finish(running.remove(0), &mut failed);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        running.push(
            dw.cmd(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawning dockwall")?,
        );
    }
    for c in running {
        finish(c, &mut failed);
    }
    loaded.wait_in_force()?;
    let took = started.elapsed();
    println!("e2e: note 1000 concurrent edits with two daemon restarts took {took:.1?}");
    r.expect(
        "1000 concurrent allow/revoke with kill -9 and SIGTERM of the daemon: every command succeeds",
        failed.is_empty(),
        || format!("{} failed, first: {:?}", failed.len(), failed.first()),
    );
    let want: BTreeSet<String> = new.iter().map(|s| readback::net(s)).collect();
    let saved: BTreeSet<String> = readback::saved(dw)?
        .into_iter()
        .map(|(s, _)| readback::net(&s))
        .collect();
    let kernel: BTreeSet<String> = readback::ebpf_entries()?
        .into_iter()
        .map(|(_, _, n)| n)
        .collect();
    let set = readback::ipset_members("dockwall-4-tcp-8081");
    r.expect(
        "after 1000 edits and two restarts: saved file == eBPF map == ipset == every allow, no revoked one",
        saved == want && kernel == want && set == want,
        || {
            format!(
                "saved {} (missing {}, extra {}), kernel {} (missing {}, extra {}), ipset {} (missing {}, extra {})",
                saved.len(),
                want.difference(&saved).count(),
                saved.difference(&want).count(),
                kernel.len(),
                want.difference(&kernel).count(),
                kernel.difference(&want).count(),
                set.len(),
                want.difference(&set).count(),
                set.difference(&want).count()
            )
        },
    );
    drop(loaded);
    reset(dw);
    Ok(())
}

/// Stops a daemon like `systemctl restart` would, or like a crash.
pub fn stop(loaded: &mut Loaded, kill: bool) -> anyhow::Result<()> {
    if kill {
        loaded.kill9();
    } else if loaded.stop()? != 0 {
        bail!("dockwall load exited non-zero on SIGTERM");
    }
    Ok(())
}
