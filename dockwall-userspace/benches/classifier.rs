//! Per-packet cost of the dockwall classifier, measured in the kernel with
//! BPF_PROG_TEST_RUN against a no-op tc program loaded in the same run.
//!
//! Cases: an allowed new connection, a dropped one, and a packet not in
//! scope; IPv4 and IPv6; allowance maps of 10 .. 100k (1M in the full run)
//! entries, either all /32 (/128) or a mix of prefix lengths. Each figure is
//! the median of several runs of `repeat` executions (the kernel reports the
//! mean per execution). Every verdict is checked, so the benchmark cannot
//! silently measure the wrong path.
//!
//!   cargo bench -p dockwall-userspace --bench classifier -- [--quick] --out DIR
//!
//! writes DIR/results.json, DIR/results.md and DIR/classifier.svg.

use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions},
};
use dockwall_common::{PROG_INGRESS, PROG_NOOP};
use dockwall_userspace::{
    dataplane::ebpf::{self, Maps},
    policy::{self, AllowEntry, Binding, Proto},
};
use ipnet::IpNet;

#[path = "shared/mod.rs"]
mod shared;
use shared::machine;

const PASS: u32 = u32::MAX;
const DROP: u32 = 2;

struct Config {
    quick: bool,
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    Hosts,
    Cidrs,
}

impl Mix {
    fn name(self, v6: bool) -> &'static str {
        match (self, v6) {
            (Mix::Hosts, false) => "/32",
            (Mix::Hosts, true) => "/128",
            (Mix::Cidrs, _) => "CIDR mix",
        }
    }
}

/// An allowance's first hit against its later ones. The per-CPU hash of
/// hit counters older dockwalls used created an allowance's counter on its
/// first hit (~10 us unpreallocated, ~0.25 us preallocated; bench/README.md
/// has those runs); with a slot each in a per-CPU array, nothing is
/// created, and a first hit should cost what a later one does, but for
/// cold caches. Medians and means over `sources` single executions each,
/// beside the no-op's single execution (which is mostly the test-run
/// timer).
struct FirstHits {
    family: &'static str,
    allowances: usize,
    sources: usize,
    noop: Spread,
    first: Spread,
    second: Spread,
}

#[derive(Clone, Copy)]
struct Spread {
    median_ns: f64,
    mean_ns: f64,
}

impl Spread {
    fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Spread {
            median_ns: samples[samples.len() / 2],
            mean_ns: samples.iter().sum::<f64>() / samples.len() as f64,
        }
    }
}

struct Row {
    family: &'static str,
    mix: &'static str,
    allowances: usize,
    memlock_bytes: u64,
    noop_ns: f64,
    allowed_ns: f64,
    dropped_ns: f64,
    out_of_scope_ns: f64,
    /// The same object loaded with the mirror off (`MIRROR_ON` 0): the
    /// kernel probes only the hash map, as before the mirror. The same
    /// packets, in the same run.
    allowed_hash_ns: f64,
    dropped_hash_ns: f64,
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
    let config = Config { quick, out };
    let (repeat, runs, counts): (u32, usize, Vec<usize>) = if config.quick {
        (20_000, 3, vec![10, 1_000, 100_000])
    } else {
        (
            1_000_000,
            5,
            vec![10, 100, 1_000, 10_000, 100_000, 1_000_000],
        )
    };
    let mut rows = Vec::new();
    for v6 in [false, true] {
        for mix in [Mix::Hosts, Mix::Cidrs] {
            for &n in &counts {
                let row = measure(v6, mix, n, repeat, runs).with_context(|| {
                    format!("{} {} {n}", if v6 { "IPv6" } else { "IPv4" }, mix.name(v6))
                })?;
                eprintln!(
                    "{:<5} {:<9} {:>8} allowances: noop {:>5.1} ns, allowed {:>5.1} (hash only {:>5.1}), dropped {:>5.1} ({:>5.1}), out of scope {:>5.1} ns; map {} KiB",
                    row.family,
                    row.mix,
                    row.allowances,
                    row.noop_ns,
                    row.allowed_ns,
                    row.allowed_hash_ns,
                    row.dropped_ns,
                    row.dropped_hash_ns,
                    row.out_of_scope_ns,
                    row.memlock_bytes / 1024
                );
                rows.push(row);
            }
        }
    }
    let (first_allowances, first_sources) = if config.quick {
        (10_000, 1_024)
    } else {
        (100_000, 4_096)
    };
    let mut first = Vec::new();
    for v6 in [false, true] {
        let f = first_hits(v6, first_allowances, first_sources)
            .with_context(|| format!("first hits, {}", if v6 { "IPv6" } else { "IPv4" }))?;
        eprintln!(
            "{:<5} {:>8} allowances, {} sources once each: first hit {:.0} ns median ({:.0} mean), second {:.0} ({:.0}), no-op {:.0} ({:.0})",
            f.family,
            f.allowances,
            f.sources,
            f.first.median_ns,
            f.first.mean_ns,
            f.second.median_ns,
            f.second.mean_ns,
            f.noop.median_ns,
            f.noop.mean_ns
        );
        first.push(f);
    }
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("creating {}", config.out.display()))?;
    let mode = if config.quick { "quick" } else { "full" };
    write(
        &config.out.join("results.json"),
        &json(&rows, &first, repeat, runs, mode),
    )?;
    write(
        &config.out.join("results.md"),
        &markdown(&rows, &first, repeat, runs, mode),
    )?;
    write(&config.out.join("classifier.svg"), &svg(&rows))?;
    println!(
        "wrote {}/results.json, results.md, classifier.svg",
        config.out.display()
    );
    Ok(())
}

/// Loads dw_noop beside the object's programs, takes the maps, and fills
/// them: web's 8081/tcp published on every address of the family, and
/// `allow` as permanent allowances. The maps must outlive the runs.
fn with_policy(obj: &mut Ebpf, v6: bool, allow: &BTreeSet<AllowEntry>) -> anyhow::Result<Maps> {
    ebpf::program(obj, PROG_NOOP)?
        .load()
        .context("loading dw_noop")?;
    let mut maps = Maps::from_ebpf(obj)?;
    let host: IpAddr = if v6 {
        "::".parse()?
    } else {
        "0.0.0.0".parse()?
    };
    maps.sync_published(&policy::compile_published(&[Binding::new(
        "web",
        "id",
        host,
        8081,
        8080,
        Proto::Tcp,
    )]))?;
    maps.sync_allow(&allow.iter().map(|e| (*e, 0)).collect())?;
    Ok(maps)
}

fn write(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The allowance entries of one configuration: `n` entries that never cover
/// the dropped source, plus the one that lets the allowed source in.
fn entries(v6: bool, mix: Mix, n: usize) -> BTreeSet<AllowEntry> {
    let prefixes: &[u8] = match (mix, v6) {
        (Mix::Hosts, false) => &[32],
        (Mix::Hosts, true) => &[128],
        (Mix::Cidrs, false) => &[16, 20, 24, 28, 32],
        (Mix::Cidrs, true) => &[48, 56, 64, 96, 128],
    };
    let mut set = BTreeSet::new();
    let mut i: u64 = 0;
    while set.len() < n {
        let len = prefixes[(i % prefixes.len() as u64) as usize];
        // v4: 32.0.0.0/4 and up, spaced 256 apart; v6: 2001:db8:1000::/36.
        let addr: IpAddr = if v6 {
            // Networks i << 64 apart: distinct /32../128 prefixes, none
            // covering the dropped source 2001:db8:ffff::1.
            IpAddr::from(std::net::Ipv6Addr::from(
                (0x2001_0db8_1000_0000u128 << 64) + (u128::from(i) << 64),
            ))
        } else {
            IpAddr::from(std::net::Ipv4Addr::from(
                0x2000_0000u32.wrapping_add((i as u32) << 8),
            ))
        };
        let net = IpNet::new(addr, len)
            .map(|n| n.trunc())
            .expect("valid prefix");
        set.insert(AllowEntry {
            port: 8081,
            proto: Proto::Tcp,
            net,
        });
        i += 1;
    }
    let allowed = if v6 {
        "2001:db8:aaaa::1/128"
    } else {
        "192.0.2.1/32"
    };
    set.insert(AllowEntry {
        port: 8081,
        proto: Proto::Tcp,
        net: allowed.parse().expect("net"),
    });
    set
}

fn measure(v6: bool, mix: Mix, n: usize, repeat: u32, runs: usize) -> anyhow::Result<Row> {
    let policy = entries(v6, mix, n);
    let mut obj = ebpf::load_unpinned(ebpf::Hook::Tc)?;
    let ids = allow_map_ids(&obj)?;
    let _maps = with_policy(&mut obj, v6, &policy)?;
    let memlock_bytes = allow_map_memlock(&ids)?;
    let hash_only = ebpf::Globals::for_this_host()?.without_mirror();
    let mut obj_hash = ebpf::load_unpinned_with(ebpf::Hook::Tc, &hash_only)?;
    let _maps_hash = with_policy(&mut obj_hash, v6, &policy)?;
    let (allowed, dropped, host_addr) = if v6 {
        ("2001:db8:aaaa::1", "2001:db8:ffff::1", "2001:db8::80")
    } else {
        ("192.0.2.1", "198.51.100.1", "203.0.113.80")
    };
    let allowed_pkt = syn(allowed, host_addr, 8081);
    let dropped_pkt = syn(dropped, host_addr, 8081);
    let out_of_scope_pkt = syn(dropped, host_addr, 22);
    let median = |obj: &mut Ebpf, prog: &str, frame: &[u8], want: u32| -> anyhow::Result<f64> {
        let p = ebpf::program(obj, prog)?;
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let r = p.test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })?;
            if r.return_value != want {
                bail!(
                    "{prog}: verdict {} where {want} was expected",
                    r.return_value
                );
            }
            samples.push(r.duration.as_nanos() as f64);
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[samples.len() / 2])
    };
    Ok(Row {
        family: if v6 { "IPv6" } else { "IPv4" },
        mix: mix.name(v6),
        allowances: n,
        memlock_bytes,
        noop_ns: median(&mut obj, PROG_NOOP, &allowed_pkt, PASS)?,
        allowed_ns: median(&mut obj, PROG_INGRESS, &allowed_pkt, PASS)?,
        dropped_ns: median(&mut obj, PROG_INGRESS, &dropped_pkt, DROP)?,
        out_of_scope_ns: median(&mut obj, PROG_INGRESS, &out_of_scope_pkt, PASS)?,
        allowed_hash_ns: median(&mut obj_hash, PROG_INGRESS, &allowed_pkt, PASS)?,
        dropped_hash_ns: median(&mut obj_hash, PROG_INGRESS, &dropped_pkt, DROP)?,
    })
}

/// `allowances` /32s (/128s); `sources` of them each get one packet from
/// their own address, twice over: the first pass is each allowance's first
/// hit, the second its second.
fn first_hits(v6: bool, allowances: usize, sources: usize) -> anyhow::Result<FirstHits> {
    let mut obj = ebpf::load_unpinned(ebpf::Hook::Tc)?;
    let set = entries(v6, Mix::Hosts, allowances);
    let _maps = with_policy(&mut obj, v6, &set)?;
    let host_addr = if v6 { "2001:db8::80" } else { "203.0.113.80" };
    // Spread over the policy, not its first entries only, as a burst of new
    // clients would be.
    let step = (set.len() / sources).max(1);
    let frames: Vec<Vec<u8>> = set
        .iter()
        .step_by(step)
        .take(sources)
        .map(|e| syn(&e.net.addr().to_string(), host_addr, 8081))
        .collect();
    anyhow::ensure!(
        frames.len() == sources,
        "{} sources of {sources}",
        frames.len()
    );
    let mut pass = |prog: &str, want: u32| -> anyhow::Result<Vec<f64>> {
        let p = ebpf::program(&mut obj, prog)?;
        frames
            .iter()
            .map(|frame| {
                let r = p.test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat: 1,
                    ..Default::default()
                })?;
                if r.return_value != want {
                    bail!(
                        "{prog}: verdict {} where {want} was expected",
                        r.return_value
                    );
                }
                Ok(r.duration.as_nanos() as f64)
            })
            .collect()
    };
    let noop = Spread::of(pass(PROG_NOOP, PASS)?);
    let first = Spread::of(pass(PROG_INGRESS, PASS)?);
    let second = Spread::of(pass(PROG_INGRESS, PASS)?);
    Ok(FirstHits {
        family: if v6 { "IPv6" } else { "IPv4" },
        allowances,
        sources,
        noop,
        first,
        second,
    })
}

/// The allowance maps, whose kernel `memlock` is summed: the per-length
/// hash, its two mirrors, the trie fallback, the lengths array, and the
/// hit counters and their slot bitmap.
const ALLOW_MAPS: [&str; 7] = [
    dockwall_common::MAP_ALLOW_NETS,
    dockwall_common::MAP_ALLOW_MIRROR,
    dockwall_common::MAP_ALLOW_MIRROR6,
    dockwall_common::MAP_ALLOW,
    dockwall_common::MAP_ALLOW_LENS,
    dockwall_common::MAP_HIT_COUNTS,
    dockwall_common::MAP_HIT_SLOTS,
];

/// The kernel's ids of `obj`'s allowance maps, read before the maps are
/// taken out of it.
fn allow_map_ids(obj: &Ebpf) -> anyhow::Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    for name in ALLOW_MAPS {
        let map = obj
            .map(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))?;
        let data = match map {
            aya::maps::Map::Array(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::LpmTrie(d)
            | aya::maps::Map::PerCpuArray(d) => d,
            _ => bail!("map {name}: unexpected type"),
        };
        ids.insert(
            data.info()
                .with_context(|| format!("map {name} (BPF_OBJ_GET_INFO_BY_FD)"))?
                .id()
                .to_string(),
        );
    }
    Ok(ids)
}

/// The kernel's `memlock` for the allowance maps with these ids together,
/// from /proc/self/fdinfo (aya does not expose it).
fn allow_map_memlock(ids: &BTreeSet<String>) -> anyhow::Result<u64> {
    let (mut total, mut found) = (0, BTreeSet::new());
    for entry in std::fs::read_dir("/proc/self/fdinfo").context("reading /proc/self/fdinfo")? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let Some(id) = field("map_id:").filter(|id| ids.contains(id)) else {
            continue;
        };
        // An object's map may be open twice (the maps taken out of it):
        // each id counts once.
        if found.insert(id) {
            total += field("memlock:")
                .and_then(|v| v.parse::<u64>().ok())
                .context("memlock in fdinfo")?;
        }
    }
    anyhow::ensure!(
        found.len() == ALLOW_MAPS.len(),
        "found {} of the {} allowance maps in /proc/self/fdinfo",
        found.len(),
        ALLOW_MAPS.len()
    );
    Ok(total)
}

fn syn(src: &str, dst: &str, dport: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match (src.parse::<IpAddr>(), dst.parse::<IpAddr>()) {
        (Ok(IpAddr::V4(s)), Ok(IpAddr::V4(d))) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            frame.extend_from_slice(&ip);
        }
        (Ok(IpAddr::V6(s)), Ok(IpAddr::V6(d))) => {
            frame.extend_from_slice(&0x86DDu16.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            frame.extend_from_slice(&ip);
        }
        _ => panic!("mixed families"),
    }
    frame.extend_from_slice(&tcp);
    frame
}

fn json(rows: &[Row], first: &[FirstHits], repeat: u32, runs: usize, mode: &str) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"family\": \"{}\", \"mix\": \"{}\", \"allowances\": {}, \"map_memlock_bytes\": {}, \"noop_ns\": {:.1}, \"allowed_ns\": {:.1}, \"dropped_ns\": {:.1}, \"out_of_scope_ns\": {:.1}, \"allowed_hash_only_ns\": {:.1}, \"dropped_hash_only_ns\": {:.1}}}",
                r.family, r.mix, r.allowances, r.memlock_bytes, r.noop_ns, r.allowed_ns, r.dropped_ns, r.out_of_scope_ns, r.allowed_hash_ns, r.dropped_hash_ns
            )
        })
        .collect();
    let spread = |s: &Spread| {
        format!(
            "{{\"median_ns\": {:.0}, \"mean_ns\": {:.0}}}",
            s.median_ns, s.mean_ns
        )
    };
    let first: Vec<String> = first
        .iter()
        .map(|f| {
            format!(
                "    {{\"family\": \"{}\", \"counters\": \"slot\", \"allowances\": {}, \"sources\": {}, \"noop\": {}, \"first_hit\": {}, \"second_hit\": {}}}",
                f.family,
                f.allowances,
                f.sources,
                spread(&f.noop),
                spread(&f.first),
                spread(&f.second)
            )
        })
        .collect();
    format!(
        "{{\n  \"benchmark\": \"classifier (BPF_PROG_TEST_RUN)\",\n  \"mode\": \"{mode}\",\n  \"repeat\": {repeat},\n  \"runs_median_of\": {runs},\n  \"machine\": \"{}\",\n  \"rows\": [\n{}\n  ],\n  \"first_hits\": [\n{}\n  ]\n}}\n",
        machine(),
        items.join(",\n"),
        first.join(",\n")
    )
}

fn markdown(rows: &[Row], first: &[FirstHits], repeat: u32, runs: usize, mode: &str) -> String {
    let mut md = format!(
        "Classifier cost per packet (BPF_PROG_TEST_RUN, {mode} run: median of {runs} runs x {repeat} executions; {}).\n\
         \"+\" columns are dockwall minus the no-op tc program measured in the same run.\n\n\
         \"hash only\" is the same object loaded with the mirrors off (`MIRROR_ON` 0), the \
         kernel probing only the hash map as before the mirror: same packets, same run.\n\n\
         | family | allowances | entries | no-op ns | allowed ns (+) | hash only (+) | dropped ns (+) | hash only (+) | out of scope ns (+) | map memory (KiB) |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        machine()
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} (+{:.0}) | {:.0} (+{:.0}) | {:.0} (+{:.0}) | {:.0} (+{:.0}) | {:.0} (+{:.0}) | {} |",
            r.family,
            r.mix,
            r.allowances,
            r.noop_ns,
            r.allowed_ns,
            r.allowed_ns - r.noop_ns,
            r.allowed_hash_ns,
            r.allowed_hash_ns - r.noop_ns,
            r.dropped_ns,
            r.dropped_ns - r.noop_ns,
            r.dropped_hash_ns,
            r.dropped_hash_ns - r.noop_ns,
            r.out_of_scope_ns,
            r.out_of_scope_ns - r.noop_ns,
            r.memlock_bytes / 1024
        );
    }
    md.push_str(
        "\nAn allowance's first hit against its second: its hit counter is a slot in a per-CPU \
         array that exists before the hit, so the difference is cold caches (each source sent \
         once per pass, single executions; median (mean) ns; the no-op's single execution is \
         mostly the test-run timer).\n\n\
         | family | allowances | sources | no-op | first hit | second hit | first / second |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for f in first {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.1}x |",
            f.family,
            f.allowances,
            f.sources,
            f.noop.median_ns,
            f.noop.mean_ns,
            f.first.median_ns,
            f.first.mean_ns,
            f.second.median_ns,
            f.second.mean_ns,
            f.first.median_ns / f.second.median_ns
        );
    }
    md
}

/// Added cost of the allowed path over the no-op program vs allowance
/// count (log scale), one line per family and mix.
fn svg(rows: &[Row]) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 420.0, 70.0, 50.0, 30.0, 170.0);
    let max_n = rows.iter().map(|r| r.allowances).max().unwrap_or(10) as f64;
    let max_ns = rows
        .iter()
        .map(|r| (r.allowed_ns - r.noop_ns).max(r.dropped_ns - r.noop_ns))
        .fold(10.0, f64::max)
        * 1.15;
    let x = |n: usize| {
        left + ((n as f64).log10() - 1.0) / (max_n.log10() - 1.0).max(1.0) * (w - left - right)
    };
    let y = |ns: f64| h - bottom - ns.max(0.0) / max_ns * (h - bottom - top);
    let frame = shared::Frame {
        w,
        h,
        left,
        bottom,
        top,
        right,
    };
    let mut s = frame.open(
        "dockwall classifier: ns added over a no-op tc program (allowed new connection)",
        max_n,
        x,
        "allowances in the map",
    );
    for i in 0..=4 {
        let ns = max_ns * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.0}\" text-anchor=\"end\">{ns:.0} ns</text>",
            left - 6.0,
            y(ns) + 4.0
        );
    }
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    let mut series: Vec<(&str, &str)> = rows.iter().map(|r| (r.family, r.mix)).collect();
    series.dedup();
    for (i, (family, mix)) in series.iter().enumerate() {
        let points: Vec<String> = rows
            .iter()
            .filter(|r| r.family == *family && r.mix == *mix)
            .map(|r| format!("{:.1},{:.1}", x(r.allowances), y(r.allowed_ns - r.noop_ns)))
            .collect();
        let color = colors[i % colors.len()];
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{family} {mix}</text>",
            w - right + 10.0,
            top + 20.0 + 18.0 * i as f64
        );
    }
    s.push_str("</svg>\n");
    s
}
