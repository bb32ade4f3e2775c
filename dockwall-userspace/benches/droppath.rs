//! The drop path under a flood on every CPU at once: what dockwall's drop
//! of a disallowed SYN costs per packet when one CPU floods, and when every
//! online CPU floods the same published port concurrently, beside tc's
//! drop-all program (dw_drop, which writes nothing shared) in the same run.
//!
//! Each CPU runs BPF_PROG_TEST_RUN from a thread pinned to it (the kernel
//! runs the program on the calling CPU), with the drop log on at `load`'s
//! default of 20 lines a second, so the per-port drop counter and the log
//! limiter are exercised as on a loaded host. Counters written by every CPU
//! per packet would show here as a cost that grows with the CPUs flooding;
//! per-CPU counters keep it flat. An allowed SYN is measured the same way,
//! every CPU matching one allowance, whose hits are counted per CPU
//! (its slot in DW_HIT_COUNTS). Every verdict is checked.
//!
//!   cargo bench -p dockwall-userspace --bench droppath -- [--quick] --out DIR
//!
//! writes DIR/droppath.json and DIR/droppath.md.

use std::{net::IpAddr, path::PathBuf, sync::Barrier};

use anyhow::{Context as _, bail};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use dockwall_common::{Config, PROG_DROP, PROG_INGRESS};
use dockwall_userspace::{
    dataplane::ebpf::{self, Maps},
    policy::{self, AllowEntry, Binding, Proto},
};

// Only `machine` is used here; the plot frame serves the other benches.
#[path = "shared/mod.rs"]
#[allow(dead_code)]
mod shared;
use shared::machine;

const DROP: u32 = 2;
const PASS: u32 = u32::MAX;
/// `dockwall load`'s default --log-rate.
const LOG_RATE: u32 = 20;

struct Row {
    /// `drop-all`, `dockwall drop` or `dockwall allowed`.
    case: &'static str,
    cpus: usize,
    /// Median over runs of the mean ns per packet, over the CPUs flooding.
    ns: f64,
}

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = args.next().map(PathBuf::from),
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => bail!("unknown argument {other:?}; usage: droppath [--quick] --out DIR"),
        }
    }
    let out = out.context("--out DIR is required")?;
    let (repeat, runs) = if quick { (200_000, 3) } else { (2_000_000, 7) };
    let cpus =
        aya::util::online_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;

    let mut obj = ebpf::load_unpinned(ebpf::Hook::Tc)?;
    ebpf::program(&mut obj, PROG_DROP)?
        .load()
        .context("loading dw_drop")?;
    let mut maps = Maps::from_ebpf(&mut obj)?;
    maps.sync_published(&policy::compile_published(&[Binding::new(
        "web",
        "id",
        "0.0.0.0".parse::<IpAddr>()?,
        8081,
        8080,
        Proto::Tcp,
    )]))?;
    let allowed = AllowEntry {
        port: 8081,
        proto: Proto::Tcp,
        net: "192.0.2.0/24".parse()?,
    };
    maps.sync_allow(&[(allowed, 0)].into_iter().collect())?;
    maps.set_config(Config {
        flags: 0,
        log_rate: LOG_RATE,
    })?;
    let denied = syn("198.51.100.1", "203.0.113.80", 8081);
    let allowed_frame = syn("192.0.2.1", "203.0.113.80", 8081);

    let mut rows = Vec::new();
    let cases = [
        (DROP_ALL, PROG_DROP, &denied, DROP),
        (DOCKWALL_DROP, PROG_INGRESS, &denied, DROP),
        (DOCKWALL_ALLOWED, PROG_INGRESS, &allowed_frame, PASS),
    ];
    for (case, program, frame, want) in cases {
        for flooding in [1, cpus.len()] {
            let prog = ebpf::program(&mut obj, program)?;
            let mut samples = Vec::with_capacity(runs);
            for _ in 0..runs {
                samples.push(flood(prog, frame, want, &cpus[..flooding], repeat)?);
            }
            samples.sort_by(f64::total_cmp);
            let ns = samples[samples.len() / 2];
            println!("{case:<16} {flooding} CPU(s): {ns:>6.1} ns/pkt");
            rows.push(Row {
                case,
                cpus: flooding,
                ns,
            });
        }
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mode = if quick { "quick" } else { "full" };
    write(&out.join("droppath.json"), &json(&rows, repeat, runs, mode))?;
    write(
        &out.join("droppath.md"),
        &markdown(&rows, cpus.len(), repeat, runs, mode),
    )?;
    println!("wrote {}/droppath.json, droppath.md", out.display());
    Ok(())
}

const DROP_ALL: &str = "drop-all";
const DOCKWALL_DROP: &str = "dockwall drop";
const DOCKWALL_ALLOWED: &str = "dockwall allowed";

/// One TEST_RUN of `repeat` executions on each of `cpus` at once, each from
/// a thread pinned to its CPU, each verdict `want`; the mean of their ns per
/// packet.
fn flood(
    prog: &SchedClassifier,
    frame: &[u8],
    want: u32,
    cpus: &[u32],
    repeat: u32,
) -> anyhow::Result<f64> {
    let start = Barrier::new(cpus.len());
    let per_cpu: Vec<anyhow::Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let start = &start;
                s.spawn(move || -> anyhow::Result<f64> {
                    pin_to(cpu)?;
                    start.wait();
                    let r = prog
                        .test_run(TestRunOptions {
                            data_in: Some(frame),
                            repeat,
                            ..Default::default()
                        })
                        .context("BPF_PROG_TEST_RUN")?;
                    if r.return_value != want {
                        bail!("verdict {} where {want} was expected", r.return_value);
                    }
                    Ok(r.duration.as_nanos() as f64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a flooding thread panicked"))
            })
            .collect()
    });
    let per_cpu = per_cpu.into_iter().collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(per_cpu.iter().sum::<f64>() / per_cpu.len() as f64)
}

fn pin_to(cpu: u32) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays in bounds
    // for any online CPU number below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sched_setaffinity to CPU {cpu}"));
        }
    }
    Ok(())
}

fn syn(src: &str, dst: &str, dport: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let (Ok(IpAddr::V4(s)), Ok(IpAddr::V4(d))) = (src.parse::<IpAddr>(), dst.parse::<IpAddr>())
    else {
        panic!("IPv4 addresses expected");
    };
    frame.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    frame.extend_from_slice(&s.octets());
    frame.extend_from_slice(&d.octets());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    frame.extend_from_slice(&tcp);
    frame
}

fn ns_of(rows: &[Row], case: &str, cpus: usize) -> f64 {
    rows.iter()
        .find(|r| r.case == case && r.cpus == cpus)
        .map_or(f64::NAN, |r| r.ns)
}

fn json(rows: &[Row], repeat: u32, runs: usize, mode: &str) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"case\": \"{}\", \"cpus_flooding\": {}, \"ns_per_packet\": {:.1}}}",
                r.case, r.cpus, r.ns
            )
        })
        .collect();
    format!(
        "{{\n  \"machine\": \"{}\",\n  \"mode\": \"{mode}\",\n  \"repeat\": {repeat},\n  \"runs\": {runs},\n  \"log_rate\": {LOG_RATE},\n  \"rows\": [\n{}\n  ]\n}}\n",
        machine(),
        items.join(",\n")
    )
}

fn markdown(rows: &[Row], all: usize, repeat: u32, runs: usize, mode: &str) -> String {
    let mut s = format!(
        "Drop path under a flood (BPF_PROG_TEST_RUN, {mode} run: median of {runs} runs x {repeat} executions per CPU; {}).\n\
         One disallowed IPv4 SYN to a published port, drop log on at {LOG_RATE} lines a second; \
         every flooding CPU runs its own TEST_RUN at the same time.\n\n\
         | CPUs flooding | drop-all ns | dockwall drop ns | dockwall drop / drop-all | dockwall allowed ns |\n| ---: | ---: | ---: | ---: | ---: |\n",
        machine()
    );
    for cpus in [1, all] {
        let floor = ns_of(rows, DROP_ALL, cpus);
        let ours = ns_of(rows, DOCKWALL_DROP, cpus);
        let allowed = ns_of(rows, DOCKWALL_ALLOWED, cpus);
        s.push_str(&format!(
            "| {cpus} | {floor:.1} | {ours:.1} | {:.2}x | {allowed:.1} |\n",
            ours / floor
        ));
    }
    let growth = |case| ns_of(rows, case, all) / ns_of(rows, case, 1);
    s.push_str(&format!(
        "\nFrom 1 to {all} CPUs at once, per packet: dockwall's drop {:.2}x, the drop-all floor {:.2}x, dockwall's allowed SYN (one allowance, counted per CPU) {:.2}x.\n",
        growth(DOCKWALL_DROP),
        growth(DROP_ALL),
        growth(DOCKWALL_ALLOWED)
    ));
    s
}

fn write(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
