//! The model-based randomized test of issue 10: a seeded generator mixes
//! allow, revoke, `--for`, hand edits and reload, bursts of concurrent
//! commands, kill -9 and SIGTERM of the daemon (also in the middle of an
//! apply), container recreation and dockerd restarts. After every step the
//! saved policy, the policy in force (`explain`), the eBPF map and the
//! ipsets are read back and compared with the model, and a real connection
//! from a client namespace must meet the model's verdict.
//!
//! `cargo xtask test --only model --steps N --seed S` runs longer or
//! replays a failure; the seed is printed at the start and on failure.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    e2e::Report,
    lab::{Client, Dockerd, Dockwall, Loaded},
    readback::{self, Entry},
    writer::{reset, stop},
};

/// `--steps` and `--seed` of `cargo xtask test`.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub steps: usize,
    pub seed: u64,
}

/// What CI runs: a few minutes on 2 cores.
pub const DEFAULT_STEPS: usize = 500;
/// CI's seed: the same sequence on every run, so a failure is a change's
/// doing; explore with `--seed`.
pub const DEFAULT_SEED: u64 = 10;

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// (source, target) as `dockwall list` shows them, and the arguments.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Allowance {
    source: String,
    target: Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Web1,
    Web2,
    Dns,
    ContainerWeb2,
}

impl Target {
    const ALL: [Target; 4] = [
        Target::Web1,
        Target::Web2,
        Target::Dns,
        Target::ContainerWeb2,
    ];

    fn args(self) -> [&'static str; 2] {
        match self {
            Target::Web1 => ["--port", "8081"],
            Target::Web2 => ["--port", "8082"],
            Target::Dns => ["--port", "5353/udp"],
            Target::ContainerWeb2 => ["--container", "web2"],
        }
    }

    fn shown(self) -> &'static str {
        match self {
            Target::Web1 => "port 8081/tcp",
            Target::Web2 => "port 8082/tcp",
            Target::Dns => "port 5353/udp",
            Target::ContainerWeb2 => "container web2",
        }
    }

    /// The published port it stands for.
    fn port(self) -> (u16, &'static str) {
        match self {
            Target::Web1 => (8081, "tcp"),
            Target::Web2 | Target::ContainerWeb2 => (8082, "tcp"),
            Target::Dns => (5353, "udp"),
        }
    }

    fn toml(self) -> &'static str {
        match self {
            Target::Web1 => "port = \"8081\"",
            Target::Web2 => "port = \"8082\"",
            Target::Dns => "port = \"5353/udp\"",
            Target::ContainerWeb2 => "container = \"web2\"",
        }
    }
}

impl Allowance {
    fn args(&self, verb: &str) -> Vec<String> {
        let [flag, value] = self.target.args();
        vec![verb.into(), self.source.clone(), flag.into(), value.into()]
    }
}

/// Whether `source` (an address, CIDR or `any`) covers `addr`.
fn covers(source: &str, addr: &str) -> bool {
    if source == "any" {
        return true;
    }
    let (net, len) = match source.split_once('/') {
        Some((n, l)) => (n, l.parse::<u32>().unwrap_or(0)),
        None => (source, if source.contains(':') { 128 } else { 32 }),
    };
    match (net.parse::<IpAddr>(), addr.parse::<IpAddr>()) {
        (Ok(IpAddr::V4(n)), Ok(IpAddr::V4(a))) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (Ok(IpAddr::V6(n)), Ok(IpAddr::V6(a))) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The networks a source compiles to.
fn nets(source: &str) -> Vec<String> {
    if source == "any" {
        vec!["0.0.0.0/0".into(), "::/0".into()]
    } else {
        vec![readback::net(source)]
    }
}

struct World<'a> {
    dw: &'a Dockwall,
    dockerd: &'a mut Dockerd,
    a: &'a Client,
    b: &'a Client,
    loaded: Loaded,
    model: BTreeSet<Allowance>,
    sources: Vec<String>,
    rng: Rng,
    /// What each step kind ran, for the closing note.
    counts: BTreeMap<&'static str, usize>,
    probes: usize,
    log: Vec<String>,
}

pub fn run(
    r: &mut Report,
    dockerd: &mut Dockerd,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
    opts: Options,
) -> anyhow::Result<()> {
    println!(
        "e2e: model: seed {} and {} steps (replay: cargo xtask test --only model --seed {} --steps {})",
        opts.seed, opts.steps, opts.seed, opts.steps
    );
    reset(dw);
    let ifaces = [a.host_if.as_str(), b.host_if.as_str()];
    let loaded = dw.load(&ifaces)?;
    let sources = vec![
        a.addr4.clone(),
        b.addr4.clone(),
        a.addr6.clone(),
        b.addr6.clone(),
        "10.99.1.0/24".into(),
        "10.99.0.0/16".into(),
        "fd99:1::/64".into(),
        "198.51.100.7".into(),
        "2001:db8::/48".into(),
        "any".into(),
    ];
    let mut w = World {
        dw,
        dockerd,
        a,
        b,
        loaded,
        model: BTreeSet::new(),
        sources,
        rng: Rng(opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        counts: BTreeMap::new(),
        probes: 0,
        log: Vec::new(),
    };
    let started = Instant::now();
    let mut result = Ok(());
    for step in 0..opts.steps {
        // Docker restarts are slow: at most two, at fixed points.
        let dockerd_now =
            opts.steps >= 200 && (step == opts.steps / 3 || step == 2 * opts.steps / 3);
        result = w
            .step(step, dockerd_now)
            .and_then(|()| w.compare(step))
            .with_context(|| {
                format!(
                    "model step {step} (seed {}; replay: cargo xtask test --only model --seed {} --steps {}); last steps: {}",
                    opts.seed,
                    opts.seed,
                    step + 1,
                    w.log.iter().rev().take(8).rev().cloned().collect::<Vec<_>>().join(" | ")
                )
            });
        if result.is_err() {
            break;
        }
    }
    println!(
        "e2e: note model: {} steps in {:.0?}: {:?}; {} probes matched",
        opts.steps,
        started.elapsed(),
        w.counts,
        w.probes
    );
    r.check(
        &format!(
            "model-based run (seed {}, {} steps): after every step saved == in force == eBPF map == ipsets == the model, and real connections meet its verdict",
            opts.seed, opts.steps
        ),
        result,
    );
    drop(w.loaded);
    reset(dw);
    Ok(())
}

impl World<'_> {
    fn note(&mut self, what: &'static str, detail: String) {
        *self.counts.entry(what).or_default() += 1;
        self.log.push(format!("{what} {detail}"));
    }

    fn random_allowance(&mut self) -> Allowance {
        let source = self.rng.pick(&self.sources).clone();
        let target = *self.rng.pick(&Target::ALL);
        Allowance { source, target }
    }

    fn saved_one(&mut self) -> Option<Allowance> {
        let all: Vec<Allowance> = self.model.iter().cloned().collect();
        (!all.is_empty()).then(|| self.rng.pick(&all).clone())
    }

    /// Runs a dockwall command that must succeed.
    fn ok(&self, args: &[String]) -> anyhow::Result<()> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.dw.ok(&args)
    }

    fn spawn(&self, args: &[String]) -> anyhow::Result<Child> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.dw
            .cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning dockwall")
    }

    fn restart_daemon(&mut self, kill: bool) -> anyhow::Result<()> {
        stop(&mut self.loaded, kill)?;
        let ifaces = [self.a.host_if.as_str(), self.b.host_if.as_str()];
        let next = self.dw.spawn_load(&ifaces, &[], None)?;
        // The old daemon is gone; the new one owns the state (no unload).
        std::mem::forget(std::mem::replace(&mut self.loaded, next));
        Ok(())
    }

    /// One edit the model can take whatever else runs beside it: an allow
    /// of what is not saved, or a revoke of what is.
    fn edit(&mut self, taken: &BTreeSet<Allowance>) -> Option<(Vec<String>, Allowance, bool)> {
        for _ in 0..10 {
            let revoke = self.rng.below(3) == 0;
            let a = if revoke {
                self.saved_one()?
            } else {
                self.random_allowance()
            };
            if taken.contains(&a) || (!revoke && self.model.contains(&a)) {
                continue;
            }
            let mut args = a.args(if revoke { "revoke" } else { "allow" });
            if !revoke && self.rng.below(5) == 0 {
                args.extend(["--for".into(), "1h".into()]);
            }
            if !revoke && self.rng.below(8) == 0 {
                args.extend(["--comment".into(), "model test".into()]);
            }
            return Some((args, a, !revoke));
        }
        None
    }

    fn apply(&mut self, a: Allowance, present: bool) {
        if present {
            self.model.insert(a);
        } else {
            self.model.remove(&a);
        }
    }

    /// The model's policy as a file an admin would write (no revision
    /// line, so the daemon gives it the next one).
    fn file_text(model: &BTreeSet<Allowance>) -> String {
        model
            .iter()
            .map(|a| {
                format!(
                    "[[allow]]\nsource = \"{}\"\n{}\n\n",
                    a.source,
                    a.target.toml()
                )
            })
            .collect()
    }

    fn step(&mut self, step: usize, dockerd_now: bool) -> anyhow::Result<()> {
        if dockerd_now {
            self.note("dockerd-restart", String::new());
            self.dockerd.restart()?;
            for c in ["web1", "web2", "dns"] {
                self.dockerd.cli(&["start", c])?;
            }
            return Ok(());
        }
        let roll = self.rng.below(100);
        match roll {
            0..=39 => {
                if let Some((args, a, present)) = self.edit(&BTreeSet::new()) {
                    self.note(if present { "allow" } else { "revoke" }, args.join(" "));
                    self.ok(&args)?;
                    self.apply(a, present);
                }
            }
            40..=42 => {
                // Revoking what is not saved: refused, nothing changes.
                let a = self.random_allowance();
                if !self.model.contains(&a) {
                    self.note("bad-revoke", a.source.clone());
                    let args = a.args("revoke");
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let (code, _, err) = self.dw.run(&args)?;
                    if code != 1 || !err.contains("no saved allowance") {
                        bail!("revoke of an allowance not saved: exit {code}: {err}");
                    }
                }
            }
            43..=54 => {
                // A burst of concurrent commands on distinct allowances.
                let n = 3 + self.rng.below(6);
                let mut taken = BTreeSet::new();
                let mut edits = Vec::new();
                for _ in 0..n {
                    if let Some(e) = self.edit(&taken) {
                        taken.insert(e.1.clone());
                        edits.push(e);
                    }
                }
                self.note("burst", edits.len().to_string());
                let children: Vec<Child> = edits
                    .iter()
                    .map(|(args, _, _)| self.spawn(args))
                    .collect::<anyhow::Result<_>>()?;
                for (child, (args, a, present)) in children.into_iter().zip(edits) {
                    let out = child.wait_with_output()?;
                    if !out.status.success() {
                        bail!(
                            "burst: dockwall {}: {}",
                            args.join(" "),
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    self.apply(a, present);
                }
            }
            55..=61 => {
                // A hand edit, seen as pending, then `reload`.
                let mut next = self.model.clone();
                let a = self.random_allowance();
                if !next.remove(&a) {
                    next.insert(a.clone());
                }
                self.note("hand-edit+reload", format!("{a:?}"));
                std::fs::write(&self.dw.config, Self::file_text(&next))?;
                if self.rng.below(2) == 0 {
                    let (code, out, _) = self.dw.run(&["status"])?;
                    if code == 0 || !out.contains("edited by hand") {
                        bail!("status after a hand edit: exit {code}: {out}");
                    }
                }
                let (code, out, err) = self.dw.run(&["reload"])?;
                if code != 0 || !out.contains("in force") {
                    bail!("reload: exit {code}: {out}{err}");
                }
                self.model = next;
            }
            62..=63 => {
                // A bad hand edit: refused whole, then put back.
                self.note("bad-hand-edit", String::new());
                let before = std::fs::read_to_string(&self.dw.config).unwrap_or_default();
                std::fs::write(
                    &self.dw.config,
                    format!("{before}\n[[allow]]\nsource = \"10.0.0.1/8\"\nport = \"8081\"\n"),
                )?;
                let (code, _, err) = self.dw.run(&["reload"])?;
                std::fs::write(&self.dw.config, &before)?;
                if code == 0 || !err.contains("10.0.0.0/8") {
                    bail!("a bad hand edit was not refused: exit {code}: {err}");
                }
                // Putting the text back is a hand edit of its own.
                self.ok(&["reload".into()])?;
            }
            64..=70 => {
                let kill = roll <= 67;
                self.note(if kill { "kill-9" } else { "sigterm" }, String::new());
                self.restart_daemon(kill)?;
                self.loaded.wait_in_force()?;
            }
            71..=80 => {
                // kill -9 while a command is being applied.
                let Some((args, a, present)) = self.edit(&BTreeSet::new()) else {
                    return Ok(());
                };
                let delay = Duration::from_micros(self.rng.below(8000) as u64);
                self.note(
                    "kill-9-mid-edit",
                    format!("{} after {delay:?}", args.join(" ")),
                );
                let child = self.spawn(&args)?;
                thread::sleep(delay);
                self.restart_daemon(true)?;
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    bail!(
                        "dockwall {} with the daemon killed under it: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                self.apply(a, present);
                self.loaded.wait_in_force()?;
            }
            81..=83 => {
                // Lapses on time: gone everywhere once the daemon prunes it.
                let a = self.random_allowance();
                if self.model.contains(&a) {
                    return Ok(());
                }
                self.note("expire", format!("{a:?}"));
                let mut args = a.args("allow");
                args.extend(["--for".into(), "2s".into()]);
                self.ok(&args)?;
                thread::sleep(Duration::from_millis(4500));
            }
            84..=86 => {
                self.note("recreate-web2", String::new());
                self.dockerd.cli(&["rm", "-f", "web2"])?;
                self.dockerd
                    .run_web("web2", &["--network", "dwnet", "-p", "8082:8080"])?;
            }
            87..=89 => {
                // Reload with nothing changed by hand: a no-op.
                self.note("reload", String::new());
                self.ok(&["reload".into()])?;
            }
            _ => {
                if let Some(a) = self.saved_one() {
                    self.note("revoke", format!("{a:?}"));
                    self.ok(&a.args("revoke"))?;
                    self.model.remove(&a);
                }
            }
        }
        let _ = step;
        Ok(())
    }

    /// What the kernel map must hold for the model.
    fn want_ebpf(&self) -> BTreeSet<Entry> {
        self.model
            .iter()
            .flat_map(|a| {
                let (port, proto) = a.target.port();
                nets(&a.source).into_iter().map(move |n| (port, proto, n))
            })
            .collect()
    }

    /// What the ipsets must hold: a port whose sources include a /0 has a
    /// rule without a set.
    fn want_ipsets(&self) -> BTreeSet<Entry> {
        let all = self.want_ebpf();
        let everyone: BTreeSet<(u16, &str, bool)> = all
            .iter()
            .filter(|(_, _, n)| n.ends_with("/0"))
            .map(|(p, pr, n)| (*p, *pr, n.contains(':')))
            .collect();
        all.into_iter()
            .filter(|(p, pr, n)| !everyone.contains(&(*p, *pr, n.contains(':'))))
            .collect()
    }

    fn allowed(&self, addr: &str, port: (u16, &str)) -> bool {
        self.model
            .iter()
            .any(|a| a.target.port() == port && covers(&a.source, addr))
    }

    /// Everything read back must equal the model. Docker-driven changes
    /// settle within a resync or two, so each read is retried briefly.
    fn compare(&mut self, _step: usize) -> anyhow::Result<()> {
        let want_saved: readback::Saved = self
            .model
            .iter()
            .map(|a| (a.source.clone(), a.target.shown().to_string()))
            .collect();
        let want_ebpf = self.want_ebpf();
        let want_sets = self.want_ipsets();
        let ports = [(8081, "tcp"), (8082, "tcp"), (5353, "udp")];
        let deadline = Instant::now() + Duration::from_secs(6);
        loop {
            let saved = readback::saved(self.dw)?;
            let ebpf = readback::ebpf_entries()?;
            let sets = readback::ipset_entries(&ports);
            let (code, status, _) = self.dw.run(&["status"])?;
            let problem = if saved != want_saved {
                Some(format!("saved {saved:?} != model {want_saved:?}"))
            } else if ebpf != want_ebpf {
                Some(format!(
                    "eBPF map: missing {:?}, extra {:?}",
                    want_ebpf.difference(&ebpf).collect::<Vec<_>>(),
                    ebpf.difference(&want_ebpf).collect::<Vec<_>>()
                ))
            } else if sets != want_sets {
                Some(format!(
                    "ipsets: missing {:?}, extra {:?}",
                    want_sets.difference(&sets).collect::<Vec<_>>(),
                    sets.difference(&want_sets).collect::<Vec<_>>()
                ))
            } else if code != 0 {
                Some(format!("status exit {code}: {status}"))
            } else {
                None
            };
            match problem {
                None => break,
                Some(p) if Instant::now() > deadline => bail!("{p}"),
                Some(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
        // The policy in force, as `explain` answers from it, and each
        // dataplane's own answer read back from the kernel.
        let clients = [
            self.a.addr4.clone(),
            self.b.addr4.clone(),
            self.a.addr6.clone(),
            "198.51.100.7".to_string(),
            "10.99.3.3".to_string(),
        ];
        let source = self.rng.pick(&clients).clone();
        let port = *self.rng.pick(&ports);
        let want = if self.allowed(&source, port) {
            "allow"
        } else {
            "drop"
        };
        let arg = format!("{}/{}", port.0, port.1);
        let (code, out, err) = self.dw.run(&["explain", &source, &arg, "--json"])?;
        let e: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("explain: {out}{err}"))?;
        if code != 0 || e["verdict"] != want || e["agree"] != true || e["policy"] != "in_force" {
            bail!("explain {source} {arg}: want {want}: exit {code}: {out}");
        }
        // A real connection for one client (TCP; the UDP port is left to
        // explain: its blocked probe costs a long timeout).
        let (c, addr, host) = match self.rng.below(4) {
            0 => (
                self.a,
                self.a.addr4.clone(),
                format!("{}:8081", self.a.host4),
            ),
            1 => (
                self.b,
                self.b.addr4.clone(),
                format!("{}:8081", self.b.host4),
            ),
            2 => (
                self.a,
                self.a.addr4.clone(),
                format!("{}:8082", self.a.host4),
            ),
            _ => (
                self.b,
                self.b.addr4.clone(),
                format!("{}:8082", self.b.host4),
            ),
        };
        let port: u16 = host
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let want = self.allowed(&addr, (port, "tcp"));
        let got =
            c.tcp_connects_within(&host, Duration::from_millis(if want { 2000 } else { 300 }))?;
        if got != want {
            bail!("{} -> {host}: connected {got}, the model says {want}", c.ns);
        }
        self.probes += 1;
        Ok(())
    }
}
