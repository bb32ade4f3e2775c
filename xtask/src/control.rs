//! The benchmark's control-plane and memory part, on a real dockerd with
//! the real daemon (`cargo xtask bench`, full mode only; the test suite
//! checks the same things on a small scale):
//!
//! - `dockwall load` with 10k and 100k allowances into each dataplane: time
//!   to "filter in force" (the daemon's own "applied in" figure and the
//!   whole command);
//! - the daemon's RSS once in force;
//! - one `dockwall allow` on top: the time until a client that tries a new
//!   connection every millisecond first gets in, and the command's time;
//! - 100 `allow`/`revoke` of single addresses on top, one after the other:
//!   p50 and p99 of the command's time (it returns once every dataplane
//!   holds the edit);
//! - at 100k, both with /30 networks and with single addresses, since the
//!   nftables fallback keeps them in different kinds of set.
//!
//! `DOCKWALL_BIN` runs another build (an older one, for a before/after).
//!
//! Writes `control.json` and `control.md` beside the other results.

use std::{
    fmt::Write as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    lab::{Client, Dockerd, Dockwall},
    operations::first_connect,
};

struct Row {
    allowances: usize,
    sources: &'static str,
    dataplanes: &'static str,
    applied_ms: u64,
    load_ms: f64,
    rss_mib: f64,
    /// The daemon's CPU over 10 s with nothing changing (resyncs only).
    idle_cpu_pct: f64,
    allow_in_force_ms: f64,
    allow_command_ms: f64,
    edit_p50_ms: f64,
    edit_p99_ms: f64,
}

/// Edits timed per row.
const EDITS: usize = 100;

const PLANES: [(&str, &[&str]); 4] = [
    ("ebpf + iptables (default)", &[]),
    ("ebpf only", &["--no-iptables"]),
    ("iptables only", &["--no-ebpf", "--fallback", "iptables"]),
    ("nftables only", &["--no-ebpf", "--fallback", "nftables"]),
];

pub fn run(out: &Path) -> anyhow::Result<()> {
    let dockerd = Dockerd::start()?;
    dockerd.build_image()?;
    let dw = Dockwall::new(dockerd.host())?;
    let a = Client::new("dw-client-a", "dwa0", 1)?;
    let b = Client::new("dw-client-b", "dwb0", 2)?;
    dockerd.run_web("web1", &["-p", "8081:8080"])?;
    let ifaces = [a.host_if.as_str(), b.host_if.as_str()];
    let target: std::net::SocketAddr = format!("{}:8081", b.host4).parse()?;
    let mut rows = Vec::new();
    for (n, sources) in [
        (10_000usize, "/30 networks"),
        (100_000, "/30 networks"),
        (100_000, "single addresses"),
    ] {
        // a's address plus n-1 /30s or addresses clear of the lab's 10.99/16.
        let mut toml = format!("[[allow]]\nsource = \"{}\"\nport = \"8081\"\n", a.addr4);
        for i in 1..n as u32 {
            if sources == "single addresses" {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i);
                let _ = write!(toml, "[[allow]]\nsource = \"{ip}\"\nport = \"8081\"\n");
            } else {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i * 4);
                let _ = write!(toml, "[[allow]]\nsource = \"{ip}/30\"\nport = \"8081\"\n");
            }
        }
        for (name, flags) in PLANES {
            std::fs::write(&dw.config, &toml).context("writing the config")?;
            let started = Instant::now();
            let loaded = dw.load_with(&ifaces, flags, None)?;
            let load_ms = started.elapsed().as_secs_f64() * 1e3;
            let applied_ms = loaded
                .output()
                .iter()
                .find_map(|l| l.split("applied in ").nth(1).map(str::to_string))
                .and_then(|t| t.split_whitespace().next()?.parse().ok())
                .unwrap_or(u64::MAX);
            let idle_cpu_pct = cpu_percent(loaded.pid(), Duration::from_secs(10));
            // Steady state: after the first resyncs, not right after "in force".
            let rss_kib: f64 = std::fs::read_to_string(format!("/proc/{}/status", loaded.pid()))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(f64::NAN);

            let mut in_force = Vec::new();
            let mut command = Vec::new();
            for _ in 0..3 {
                let started = Instant::now();
                let (result, first) = thread::scope(|s| {
                    let probe = s.spawn(|| {
                        b.exec(|| first_connect(target, started, Duration::from_secs(5)))
                    });
                    let result = dw.run(&["allow", &b.addr4, "--port", "8081"]);
                    command.push(started.elapsed().as_secs_f64() * 1e3);
                    (result, probe.join())
                });
                let (code, _, err) = result?;
                anyhow::ensure!(code == 0, "allow with {n} allowances ({name}): {err}");
                match first {
                    Ok(Ok(Some(t))) => in_force.push(t.as_secs_f64() * 1e3),
                    other => anyhow::bail!("{name}, {n}: the probe never got in: {other:?}"),
                }
                dw.ok(&["revoke", &b.addr4, "--port", "8081"])?;
            }
            let (edit_p50, edit_p99) = crate::e2e::edit_latency(&dw, EDITS)?;
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let row = Row {
                allowances: n,
                sources,
                dataplanes: name,
                applied_ms,
                load_ms,
                rss_mib: rss_kib / 1024.0,
                idle_cpu_pct,
                allow_in_force_ms: median(&mut in_force),
                allow_command_ms: median(&mut command),
                edit_p50_ms: edit_p50.as_secs_f64() * 1e3,
                edit_p99_ms: edit_p99.as_secs_f64() * 1e3,
            };
            eprintln!(
                "{n:>7} {sources:<16} {name:<26} applied {:>5} ms, load {:>7.0} ms, RSS {:>6.1} MiB, idle CPU {:>4.1} %, one allow in force {:>7.1} ms (command {:>7.1} ms), {EDITS} edits p50 {:.1} ms p99 {:.1} ms",
                row.applied_ms,
                row.load_ms,
                row.rss_mib,
                row.idle_cpu_pct,
                row.allow_in_force_ms,
                row.allow_command_ms,
                row.edit_p50_ms,
                row.edit_p99_ms
            );
            rows.push(row);
            drop(loaded);
        }
    }
    write_results(out, &rows)
}

/// CPU time of `pid` over `window`, as a percentage of one core.
fn cpu_percent(pid: u32, window: Duration) -> f64 {
    let ticks = || -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): utime,
        // stime, cutime, cstime are the 12th to 15th of them. The children's
        // part is the iptables, ipset and nft commands the daemon ran and
        // waited for: its resyncs' cost too.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        (11..15).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (Some(before), started) = (ticks(), Instant::now()) else {
        return f64::NAN;
    };
    thread::sleep(window);
    match ticks() {
        Some(after) => (after - before) as f64 / hz / started.elapsed().as_secs_f64() * 100.0,
        None => f64::NAN,
    }
}

fn write_results(out: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"allowances\": {}, \"sources\": \"{}\", \"dataplanes\": \"{}\", \"applied_ms\": {}, \"load_to_in_force_ms\": {:.0}, \"daemon_rss_mib\": {:.1}, \"daemon_idle_cpu_pct\": {:.1}, \"one_allow_in_force_ms\": {:.1}, \"one_allow_command_ms\": {:.1}, \"edit_p50_ms\": {:.1}, \"edit_p99_ms\": {:.1}}}",
                r.allowances,
                r.sources,
                r.dataplanes,
                r.applied_ms,
                r.load_ms,
                r.rss_mib,
                r.idle_cpu_pct,
                r.allow_in_force_ms,
                r.allow_command_ms,
                r.edit_p50_ms,
                r.edit_p99_ms
            )
        })
        .collect();
    let json = format!(
        "{{\n  \"benchmark\": \"control plane and memory: real daemon, real dockerd\",\n  \"rows\": [\n{}\n  ]\n}}\n",
        items.join(",\n")
    );
    let mut md = String::from(
        "Control plane and memory (real daemon following the suite's own dockerd; medians of 3 for `allow`).\n\
         \"applied\": the daemon's time to fill the dataplanes; \"load\": `dockwall load` started to \"filter in force\" printed; \
         \"one allow in force\": from starting `dockwall allow` to the first connection through, a client trying every millisecond.\n\n\
         \"idle CPU\": the CPU of the daemon and of the commands it ran (iptables, ipset, nft) over 10 s with nothing changing (its 2 s resyncs only), % of one core; runs before this change counted the daemon alone.\n\n\
         \"edit p50/p99\": 100 `allow`/`revoke` of single addresses on top, one after the other, the command's time \
         (it returns once every dataplane holds the edit).\n\n\
         | allowances | sources | dataplanes | applied ms | load ms | daemon RSS MiB | idle CPU % | one allow in force ms | allow command ms | edit p50 ms | edit p99 ms |\n\
         | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.allowances,
            r.sources,
            r.dataplanes,
            r.applied_ms,
            r.load_ms,
            r.rss_mib,
            r.idle_cpu_pct,
            r.allow_in_force_ms,
            r.allow_command_ms,
            r.edit_p50_ms,
            r.edit_p99_ms
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("control.json"), json).context("writing control.json")?;
    std::fs::write(out.join("control.md"), md).context("writing control.md")?;
    println!("wrote {}/control.json, control.md", out.display());
    Ok(())
}
