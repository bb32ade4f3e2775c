//! A fleet on one machine: a real etcd cluster (Debian's etcd-server, three
//! members on addresses the lab makes) and three dockwall hosts, each a
//! network namespace of its own with its own dockerd (publishing a web
//! container on 8081), tc, netfilter and bpffs (a holder process keeps a
//! mount namespace with the namespace's sysfs, a private bpffs and the
//! cgroup2 hierarchy), and an outside client namespace.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    debian::{self, Suite},
    e2e::Report,
    equivalence::{Outcome, probe_tcp},
    lab::{Dockwall, IMAGE, LAB_DIR, enter_netns},
    util::{self, output, sh},
};

const MEMBERS: usize = 3;
const HOSTS: usize = 3;
const CLIENT_PORT: u16 = 23790;
const PEER_PORT: u16 = 23800;
const PREFIX: &str = "fleet";
const PORT: u16 = 8081;

/// The etcd binary from Debian's etcd-server (extracted, never installed:
/// the package would start a system etcd).
fn etcd_bin() -> anyhow::Result<PathBuf> {
    let apt = Suite::open("bookworm")?;
    let deb = apt.download("etcd-server")?;
    let dir = Path::new(debian::CACHE).join("etcd");
    debian::extract(&deb, &dir)?;
    let bin = dir.join("usr/bin/etcd");
    if !bin.exists() {
        bail!("{} has no usr/bin/etcd", deb.display());
    }
    Ok(bin)
}

/// Address of the root side of host `n`'s link to the store.
fn store_addr(n: usize) -> String {
    format!("10.97.{n}.1")
}

struct Member {
    name: String,
    child: Option<Child>,
}

/// Three etcd members; every one is killed (by PID) and its data removed
/// when dropped.
struct Etcd {
    bin: PathBuf,
    dir: PathBuf,
    members: Vec<Member>,
}

impl Etcd {
    fn start(bin: PathBuf) -> anyhow::Result<Self> {
        let dir = PathBuf::from(LAB_DIR).join("etcd");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut etcd = Etcd {
            bin,
            dir,
            members: (1..=MEMBERS)
                .map(|i| Member {
                    name: format!("m{i}"),
                    child: None,
                })
                .collect(),
        };
        for i in 0..MEMBERS {
            etcd.start_member(i)?;
        }
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    fn client_urls(i: usize) -> String {
        let port = CLIENT_PORT + i as u16 + 1;
        let mut urls = vec![format!("http://127.0.0.1:{port}")];
        urls.extend((1..=HOSTS).map(|n| format!("http://{}:{port}", store_addr(n))));
        urls.join(",")
    }

    fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let peer = |j: usize| format!("http://127.0.0.1:{}", PEER_PORT + j as u16 + 1);
        let cluster: Vec<String> = (0..MEMBERS)
            .map(|j| format!("m{}={}", j + 1, peer(j)))
            .collect();
        let name = self.members[i].name.clone();
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = Command::new(&self.bin)
            .args(["--name", &name])
            .arg("--data-dir")
            .arg(self.dir.join(&name))
            .args(["--listen-client-urls", &Self::client_urls(i)])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", CLIENT_PORT + i as u16 + 1),
            ])
            .args(["--listen-peer-urls", &peer(i)])
            .args(["--initial-advertise-peer-urls", &peer(i)])
            .args(["--initial-cluster", &cluster.join(",")])
            .args([
                "--initial-cluster-token",
                "dockwall-lab",
                "--initial-cluster-state",
                "new",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting etcd member {name}"))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The cluster answers a write (through the gRPC gateway).
    fn wait_healthy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.revision().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become healthy in 30 s (logs in {})",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// POST to the first live member's JSON gateway.
    fn gateway(&self, path: &str, body: &str) -> anyhow::Result<serde_json::Value> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let url = format!("http://127.0.0.1:{}{path}", CLIENT_PORT + i as u16 + 1);
            let out = output(
                Command::new("curl").args(["-sf", "-m", "3", "-X", "POST", &url, "-d", body]),
            )?;
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).context("etcd gateway reply");
            }
        }
        bail!("no etcd member answered {path}")
    }

    /// The store's current revision.
    fn revision(&self) -> anyhow::Result<i64> {
        // A range over nothing still carries the header.
        let v = self.gateway("/v3/kv/range", r#"{"key": "AA=="}"#)?;
        v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .context("no revision in the reply")
    }

    fn compact(&self) -> anyhow::Result<i64> {
        let at = self.revision()?;
        self.gateway(
            "/v3/kv/compaction",
            &format!(r#"{{"revision": "{at}", "physical": true}}"#),
        )?;
        Ok(at)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..MEMBERS {
            self.kill(i);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One dockwall host: namespace, link to the store, client, its daemon.
struct Host {
    n: usize,
    name: String,
    ns: String,
    client_ns: String,
    iface: String,
    store_link: String,
    holder: Child,
    dir: PathBuf,
    /// This host's own dockerd.
    docker_host: String,
    dockerd: Option<Child>,
    data_root: PathBuf,
    daemon: Option<Child>,
}

impl Host {
    fn new(n: usize, lab_docker: &str) -> anyhow::Result<Self> {
        let name = format!("h{n}");
        let (ns, client_ns) = (format!("dwf-{name}"), format!("dwf-c{n}"));
        let (iface, store_link) = (format!("dwf{n}"), format!("dwf{n}s"));
        let _ = sh(&format!(
            "ip netns del {ns}; ip netns del {client_ns}; ip link del {store_link}"
        ))
        .output();
        let script = format!(
            "set -e
             ip netns add {ns}
             ip netns add {client_ns}
             ip link add {iface} netns {ns} type veth peer name eth0 netns {client_ns}
             ip -n {ns} addr add 10.98.{n}.1/24 dev {iface}
             ip -n {ns} link set {iface} up
             ip -n {ns} link set lo up
             ip -n {client_ns} addr add 10.98.{n}.2/24 dev eth0
             ip -n {client_ns} addr add 10.98.{n}.3/24 dev eth0
             ip -n {client_ns} link set eth0 up
             ip -n {client_ns} link set lo up
             ip link add {store_link} type veth peer name store netns {ns}
             ip addr add {sa}/30 dev {store_link}
             ip link set {store_link} up
             ip -n {ns} addr add 10.97.{n}.2/30 dev store
             ip -n {ns} link set store up",
            sa = store_addr(n),
        );
        util::run(&mut sh(&script)).with_context(|| format!("creating host {name}"))?;
        // `ip netns exec` gives the holder a mount namespace with the
        // namespace's sysfs; a bpffs of its own keeps this host's pins apart.
        let holder = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "sh",
                "-c",
                "mount -t bpf bpf /sys/fs/bpf && mount -t cgroup2 none /sys/fs/cgroup && exec sleep 100000",
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("starting the mount namespace holder")?;
        let dir = PathBuf::from(LAB_DIR).join("fleet").join(&name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let data_root = PathBuf::from("/var/lib/dockwall-fleet").join(&name);
        let _ = fs::remove_dir_all(&data_root);
        let mut host = Host {
            n,
            name,
            ns,
            client_ns,
            iface,
            store_link,
            docker_host: format!("unix://{}", dir.join("docker.sock").display()),
            holder,
            dir,
            dockerd: None,
            data_root,
            daemon: None,
        };
        // Wait for the holder's bpffs.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !host
            .cmd(&["sh", "-c", "grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts"])
            .status()?
            .success()
        {
            if Instant::now() > deadline {
                bail!("the holder of {} did not mount its bpffs", host.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        host.start_dockerd(lab_docker)?;
        Ok(host)
    }

    /// This host's own dockerd (its managed containerd beside it, in the
    /// same namespaces), the lab's image, and a web container on 8081.
    fn start_dockerd(&mut self, lab_docker: &str) -> anyhow::Result<()> {
        let log = fs::File::create(self.dir.join("dockerd.log"))?;
        let sock = self.docker_host.clone();
        let data_root = self.data_root.display().to_string();
        let exec_root = self.dir.join("exec").display().to_string();
        let pidfile = self.dir.join("dockerd.pid").display().to_string();
        let child = self
            .cmd(&[
                "dockerd",
                "--host",
                &sock,
                "--data-root",
                &data_root,
                "--exec-root",
                &exec_root,
                "--pidfile",
                &pidfile,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the host's dockerd")?;
        self.dockerd = Some(child);
        let docker = |args: &[&str]| {
            let mut c = Command::new("docker");
            c.env("DOCKER_HOST", &sock).args(args);
            c
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !output(&mut docker(&["info"]))?.status.success() {
            if Instant::now() > deadline {
                bail!(
                    "{}: dockerd did not answer in 60 s (log in {})",
                    self.name,
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        util::run(&mut sh(&format!(
            "DOCKER_HOST={lab_docker} docker save {IMAGE} | DOCKER_HOST={sock} docker load -q"
        )))
        .context("copying the lab's image")?;
        let page = format!(
            "/bin/busybox mkdir -p /w && echo {} > /w/index.html && exec /bin/busybox httpd -f -p 8080 -h /w",
            self.name
        );
        let out = output(&mut docker(&[
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            "8081:8080",
            IMAGE,
            "/bin/busybox",
            "sh",
            "-c",
            &page,
        ]))?;
        if !out.status.success() {
            bail!(
                "{}: docker run: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn url(&self) -> String {
        let members: Vec<String> = (1..=MEMBERS)
            .map(|i| format!("{}:{}", store_addr(self.n), CLIENT_PORT + i as u16))
            .collect();
        format!("etcd://{}/{PREFIX}", members.join(","))
    }

    /// A command inside this host (its network and mount namespaces).
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "-n", "--"])
            .args(args);
        c
    }

    /// `dockwall ARGS` on this host, with its store.
    fn dockwall(&self, args: &[&str]) -> Command {
        let bin = util::dockwall_bin().display().to_string();
        let mut c = self.cmd(&[&bin]);
        c.env("DOCKER_HOST", &self.docker_host)
            .env("DOCKWALL_CONFIG", self.dir.join("dockwall.toml"))
            .env("DOCKWALL_RUN_DIR", self.dir.join("run"))
            .env("DOCKWALL_HOST", &self.name)
            .env("DOCKWALL_STORE", self.url())
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let out = output(&mut self.dockwall(args))?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn load(&mut self) -> anyhow::Result<()> {
        let before = self.log().len();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("load.log"))?;
        let iface = self.iface.clone();
        let child = self
            .dockwall(&["load", "--iface", &iface])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockwall load")?;
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .log()
            .get(before..)
            .is_some_and(|l| l.contains("dockwall: filter in force"))
        {
            if Instant::now() > deadline {
                bail!(
                    "{}: load did not report the filter in force: {}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("load.log")).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The store revision this host's daemon applied (every dataplane).
    fn applied(&self) -> u64 {
        let Ok(text) = fs::read_to_string(self.dir.join("run/daemon.json")) else {
            return 0;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return 0;
        };
        let planes = v["applied"]
            .as_object()
            .map(|m| m.values().filter_map(|r| r.as_u64()).min());
        match (planes.flatten(), v["store"]["revision"].as_u64()) {
            (Some(a), Some(s)) => a.min(s),
            _ => 0,
        }
    }

    /// A new connection from the client's address `.last` to the host.
    fn probe(&self, last: u8) -> anyhow::Result<Outcome> {
        let src: IpAddr = format!("10.98.{}.{last}", self.n).parse()?;
        let dst: SocketAddr = format!("10.98.{}.1:{PORT}", self.n).parse()?;
        let ns = self.client_ns.clone();
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<Outcome> {
                enter_netns(&ns)?;
                Ok(probe_tcp(src, dst))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
        })
    }

    /// Allowed (the host's container answers) or blocked (times out).
    fn expect(&self, last: u8, allowed: bool) -> anyhow::Result<()> {
        let want = if allowed {
            Outcome::Connected
        } else {
            Outcome::TimedOut
        };
        let got = self.probe(last)?;
        if got != want {
            bail!(
                "{}: 10.98.{}.{last} -> :{PORT}: {got:?}, want {want:?} ({})",
                self.name,
                self.n,
                if allowed { "allowed" } else { "blocked" }
            );
        }
        Ok(())
    }

    /// `expect`, retried for up to `within` (the change is on its way).
    fn expect_within(&self, last: u8, allowed: bool, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.expect(last, allowed) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn set_partitioned(&self, cut: bool) -> anyhow::Result<()> {
        let state = if cut { "down" } else { "up" };
        util::run(Command::new("ip").args(["link", "set", &self.store_link, state]))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let _ = self.dockwall(&["unload"]).output();
        if let Some(mut d) = self.dockerd.take() {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = sh(&format!(
            "ip netns del {}; ip netns del {}; ip link del {}",
            self.ns, self.client_ns, self.store_link
        ))
        .output();
        // The holder's mounts (overlays, the container's) went with its
        // mount namespace.
        let _ = fs::remove_dir_all(&self.data_root);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Waits until every host applied store revision `at`; the time it took.
fn all_applied(hosts: &[Host], at: u64, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if hosts.iter().all(|h| h.applied() >= at) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            let seen: Vec<String> = hosts
                .iter()
                .map(|h| format!("{} at {}", h.name, h.applied()))
                .collect();
            bail!(
                "not every host applied revision {at} within {within:?}: {}",
                seen.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// (allowances, sets) in a saved file's text.
fn dockwall_exported(text: &str) -> (usize, usize) {
    (
        text.matches("[[allow]]").count(),
        text.matches("[sets]").count(),
    )
}

/// The store revision a command's answer names (`... at revision N`).
fn revision_of(out: &str) -> Option<u64> {
    out.split("at revision ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(r: &mut Report, dw: &Dockwall) -> anyhow::Result<()> {
    let bin = etcd_bin()?;
    let mut hosts = Vec::new();
    for n in 1..=HOSTS {
        hosts.push(Host::new(n, &dw.docker_host)?);
    }
    let mut etcd = Etcd::start(bin)?;
    for h in &mut hosts {
        h.load()?;
    }
    r.check(
        "fleet: three hosts load with --store and no allowance: every host blocks its client",
        hosts.iter().try_for_each(|h| h.expect(2, false)),
    );

    // One list for all hosts, one allowance using it.
    let (code, out, err) = hosts[0].run(&[
        "set",
        "add",
        "clients",
        "10.98.1.2",
        "10.98.2.2",
        "10.98.3.2",
    ])?;
    anyhow::ensure!(code == 0, "set add: {out}{err}");
    let (code, out, err) = hosts[0].run(&[
        "allow",
        "@clients",
        "--port",
        "8081",
        "--comment",
        "fleet clients",
    ])?;
    r.expect(
        "fleet: an allow written on h1 says it is in force there",
        code == 0 && out.contains("in force here now"),
        || format!("exit {code}: {out}{err}"),
    );
    let at = revision_of(&out).unwrap_or(0);
    r.check(
        "fleet: the allowance is in force on every host (allowed source in, the other blocked)",
        all_applied(&hosts, at, Duration::from_secs(5)).and_then(|_| {
            hosts.iter().try_for_each(|h| {
                h.expect_within(2, true, Duration::from_secs(2))
                    .and_then(|()| h.expect(3, false))
            })
        }),
    );
    // A set that is not in the store is refused inside the write's own
    // transaction (no read-then-write race), and nothing is written.
    let before = hosts[0].run(&["list"])?.1;
    let (code, out, err) = hosts[0].run(&["allow", "@nosuch", "--port", "8081"])?;
    let after = hosts[0].run(&["list"])?.1;
    r.expect(
        "fleet: allow @nosuch (no such set in the store) is refused, naming it, and changes nothing",
        code != 0 && err.contains("nosuch") && err.contains("nothing") && before == after,
        || format!("exit {code}: {out}{err}\nlist before:\n{before}\nafter:\n{after}"),
    );
    let (code, out, err) =
        hosts[0].run(&["allow", "10.98.2.3", "--port", "8081", "--host", "h2"])?;
    anyhow::ensure!(code == 0, "allow --host h2: {out}{err}");
    let at = revision_of(&out).unwrap_or(0);
    r.check(
        "fleet: a host-scoped allowance applies on its host only",
        all_applied(&hosts, at, Duration::from_secs(5)).and_then(|_| {
            hosts[1].expect_within(3, true, Duration::from_secs(2))?;
            hosts[0].expect(3, false)?;
            hosts[2].expect(3, false)
        }),
    );

    // Latency: 100 edits from h1, each until every host holds it.
    let mut took = Vec::new();
    for i in 0..100u32 {
        let source = format!("100.64.{}.{}", i / 250, i % 250 + 1);
        let verb = if i % 2 == 0 { "allow" } else { "revoke" };
        let source = if i % 2 == 0 {
            source
        } else {
            format!("100.64.{}.{}", (i - 1) / 250, (i - 1) % 250 + 1)
        };
        let started = Instant::now();
        let (code, out, err) = hosts[0].run(&[verb, &source, "--port", "8081"])?;
        anyhow::ensure!(code == 0, "{verb} {source}: {out}{err}");
        let at = revision_of(&out).context("no revision in the answer")?;
        all_applied(&hosts, at, Duration::from_secs(10))?;
        took.push(started.elapsed());
    }
    took.sort();
    let (p50, p99) = (percentile(&took, 0.5), percentile(&took, 0.99));
    println!(
        "e2e: note fleet: 100 edits on h1, command start until all {HOSTS} hosts hold it: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        took[took.len() - 1].as_secs_f64() * 1e3
    );
    r.expect(
        "fleet: an edit is in force on every host within 1 s (p99 of 100)",
        p99 <= Duration::from_secs(1),
        || format!("p99 {p99:?}"),
    );

    // 10k allowances imported.
    let file = PathBuf::from(LAB_DIR).join("fleet/import.toml");
    let mut text = String::new();
    for i in 0..10_000u32 {
        let _ = writeln!(
            text,
            "[[allow]]\nsource = \"100.{}.{}.{}\"\nport = \"8082\"\n",
            80 + i / 65536,
            (i / 256) % 256,
            i % 256
        );
    }
    fs::write(&file, text)?;
    let started = Instant::now();
    let (code, out, err) = hosts[0].run(&["store", "import", &file.display().to_string()])?;
    anyhow::ensure!(code == 0, "store import: {out}{err}");
    let at = revision_of(&out).unwrap_or(0);
    let spread = all_applied(&hosts, at, Duration::from_secs(20));
    let total = started.elapsed();
    println!(
        "e2e: note fleet: 10k allowances imported and in force on all {HOSTS} hosts in {:.2} s (import command {out:?})",
        total.as_secs_f64()
    );
    r.expect(
        "fleet: 10k allowances imported are in force on every host within 5 s",
        spread.is_ok() && total <= Duration::from_secs(5),
        || format!("{spread:?}, {total:?}"),
    );
    // And back out: export gives a saved file holding what was imported.
    let (code, out, err) = hosts[0].run(&["store", "export"])?;
    let exported = dockwall_exported(&out);
    r.expect(
        "fleet: `store export` writes the store back as a saved file (the 10k imported, the set, the allowance using it)",
        code == 0
            && exported.0 >= 10_000
            && out.contains("[sets]")
            && out.contains("clients = [")
            && out.contains("source = \"@clients\""),
        || format!("exit {code}: {} allowances; {err}", exported.0),
    );
    let (code, out, err) = hosts[0].run(&["reload"])?;
    r.expect(
        "fleet: `reload` with a store says there is nothing to reload",
        code == 0 && out.contains("nothing to reload"),
        || format!("exit {code}: {out}{err}"),
    );

    // One member down: edits go on.
    etcd.kill(0);
    let (code, out, err) =
        hosts[0].run(&["revoke", "10.98.2.3", "--port", "8081", "--host", "h2"])?;
    r.expect(
        "fleet: with one etcd member killed an edit still succeeds",
        code == 0,
        || format!("{out}{err}"),
    );
    r.check(
        "fleet: ... and is in force on its host",
        revision_of(&out)
            .context("no revision")
            .and_then(|at| all_applied(&hosts, at, Duration::from_secs(10)))
            .and_then(|_| hosts[1].expect(3, false)),
    );

    // Every member down: fail-static.
    etcd.kill(1);
    etcd.kill(2);
    std::thread::sleep(Duration::from_secs(4));
    r.check(
        "fleet: with every etcd member down every host keeps enforcing",
        hosts
            .iter()
            .try_for_each(|h| h.expect(2, true).and_then(|()| h.expect(3, false))),
    );
    let (code, status, _) = hosts[2].run(&["status"])?;
    r.expect(
        "fleet: status says the store is unreachable and exits non-zero",
        code != 0 && status.contains("STORE UNREACHABLE since"),
        || format!("exit {code}: {status}"),
    );
    let (code, out, err) = hosts[0].run(&["allow", "10.98.1.3", "--port", "8081"])?;
    r.expect(
        "fleet: an edit while the store is down is refused, not queued",
        code != 0 && err.contains("nothing was changed"),
        || format!("exit {code}: {out}{err}"),
    );
    // A restart without the store enforces the cached policy.
    hosts[1].kill9();
    hosts[1].load()?;
    r.check(
        "fleet: a host restarted while the store is down enforces its cache",
        hosts[1]
            .expect(2, true)
            .and_then(|()| hosts[1].expect(3, false)),
    );

    // Members back: a revoke made then is in force everywhere.
    for i in 0..MEMBERS {
        etcd.start_member(i)?;
    }
    etcd.wait_healthy()?;
    let (code, out, err) = hosts[0].run(&["revoke", "@clients", "--port", "8081"])?;
    r.expect("fleet: members back, a revoke succeeds", code == 0, || {
        format!("{out}{err}")
    });
    r.check(
        "fleet: ... and is in force on every host",
        revision_of(&out)
            .context("no revision")
            .and_then(|at| all_applied(&hosts, at, Duration::from_secs(10)))
            .and_then(|_| hosts.iter().try_for_each(|h| h.expect(2, false))),
    );

    // A partitioned host catches up after a compaction.
    hosts[2].set_partitioned(true)?;
    let (code, out, err) = hosts[0].run(&["allow", "@clients", "--port", "8081"])?;
    anyhow::ensure!(code == 0, "allow: {out}{err}");
    // One more write, so that the revision after h3's is compacted away too.
    let (code, out, err) = hosts[0].run(&["allow", "10.98.9.9", "--port", "8081"])?;
    anyhow::ensure!(code == 0, "allow: {out}{err}");
    let compacted = etcd.compact()?;
    // Long enough for the keepalive (6 s + 3 s) to end h3's watch: it must
    // come back through a new watch from a revision compacted away.
    std::thread::sleep(Duration::from_secs(12));
    r.check(
        "fleet: the partitioned host still blocks (it has not seen the allow)",
        hosts[2].expect(2, false),
    );
    hosts[2].set_partitioned(false)?;
    r.check(
        &format!("fleet: the partitioned host catches up after a compaction (at {compacted})"),
        all_applied(&hosts, compacted as u64, Duration::from_secs(15))
            .and_then(|_| hosts[2].expect(2, true))
            .and_then(|()| {
                let log = hosts[2].log();
                anyhow::ensure!(
                    log.contains("unreachable") && log.contains("was compacted away"),
                    "h3 did not lose the store and read it whole after the compaction: {log}"
                );
                Ok(())
            }),
    );

    // kill -9 during a watch, with edits flowing.
    hosts[0].kill9();
    r.check(
        "fleet: a host whose daemon was killed -9 stays closed to others",
        hosts[0].expect(3, false),
    );
    let (code, out, err) =
        hosts[1].run(&["allow", "10.98.1.3", "--port", "8081", "--host", "h1"])?;
    anyhow::ensure!(code == 0, "allow --host h1: {out}{err}");
    let at = revision_of(&out).unwrap_or(0);
    hosts[0].load()?;
    r.check(
        "fleet: restarted after kill -9, the host applies what was written meanwhile",
        all_applied(&hosts, at, Duration::from_secs(10))
            .and_then(|_| hosts[0].expect_within(3, true, Duration::from_secs(2))),
    );
    drop(hosts);
    drop(etcd);
    let _ = fs::remove_dir_all(PathBuf::from(LAB_DIR).join("fleet"));
    let _ = fs::remove_dir("/var/lib/dockwall-fleet");
    tls_and_auth(r, dw, &etcd_bin()?)
}

/// A TLS etcd member of its own (server certificate, client certificates
/// required), then the same with etcd's auth enabled: dockwall's
/// `--store-ca/--store-cert/--store-key` and `--store-user` with a password.
fn tls_and_auth(r: &mut Report, dw: &Dockwall, bin: &Path) -> anyhow::Result<()> {
    let dir = PathBuf::from(LAB_DIR).join("etcd-tls");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let d = dir.display();
    let cert = |name: &str, cn: &str, ext: &str| {
        format!(
            "openssl req -newkey rsa:2048 -nodes -keyout {d}/{name}.key -out {d}/{name}.csr -subj /CN={cn} 2>/dev/null
             printf '{ext}' > {d}/{name}.ext
             openssl x509 -req -in {d}/{name}.csr -CA {d}/ca.pem -CAkey {d}/ca.key -CAcreateserial -out {d}/{name}.pem -days 1 -extfile {d}/{name}.ext 2>/dev/null"
        )
    };
    let script = format!(
        "set -e
         openssl req -x509 -newkey rsa:2048 -nodes -keyout {d}/ca.key -out {d}/ca.pem -days 1 -subj /CN=dockwall-lab-ca 2>/dev/null
         {}
         {}
         {}",
        // clientAuth too: etcd's JSON gateway dials the member with it.
        cert("server", "etcd", "subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n"),
        cert("client", "client", "extendedKeyUsage=clientAuth\\n"),
        cert("admin", "root", "extendedKeyUsage=clientAuth\\n"),
    );
    util::run(&mut sh(&script)).context("making the lab's certificates")?;
    let port = CLIENT_PORT + 9;
    let url = format!("https://127.0.0.1:{port}");
    let log = fs::File::create(dir.join("etcd.log"))?;
    let mut member = Command::new(bin)
        .args(["--name", "tls", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", PEER_PORT + 9),
        ])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{}", PEER_PORT + 9),
        ])
        .args([
            "--initial-cluster",
            &format!("tls=http://127.0.0.1:{}", PEER_PORT + 9),
        ])
        .arg("--cert-file")
        .arg(dir.join("server.pem"))
        .arg("--key-file")
        .arg(dir.join("server.key"))
        .arg("--trusted-ca-file")
        .arg(dir.join("ca.pem"))
        .arg("--client-cert-auth")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the TLS etcd member")?;
    let result = (|| -> anyhow::Result<()> {
        let gateway = |path: &str, body: &str| -> anyhow::Result<String> {
            let out = output(
                Command::new("curl")
                    .args(["-sf", "-m", "3", "--cacert"])
                    .arg(dir.join("ca.pem"))
                    .arg("--cert")
                    .arg(dir.join("admin.pem"))
                    .arg("--key")
                    .arg(dir.join("admin.key"))
                    .args(["-X", "POST", &format!("{url}{path}"), "-d", body]),
            )?;
            if !out.status.success() {
                bail!("etcd {path}: {}", String::from_utf8_lossy(&out.stdout));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while gateway("/v3/kv/range", r#"{"key": "AA=="}"#).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the TLS etcd member did not answer (log in {})",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let store = format!("etcd://127.0.0.1:{port}/tls");
        let ca = dir.join("ca.pem").display().to_string();
        let (ccert, ckey) = (
            dir.join("client.pem").display().to_string(),
            dir.join("client.key").display().to_string(),
        );
        let with_tls = |extra: &[&str], args: &[&str]| -> anyhow::Result<(i32, String, String)> {
            let mut all = vec!["--store", store.as_str(), "--store-ca", &ca];
            all.extend_from_slice(extra);
            all.extend_from_slice(args);
            dw.run(&all)
        };
        let certs = ["--store-cert", ccert.as_str(), "--store-key", ckey.as_str()];
        let (code, out, err) = with_tls(&certs, &["allow", "192.0.2.1", "--port", "8081"])?;
        r.expect(
            "fleet TLS: an edit over TLS with a client certificate is saved",
            code == 0 && out.contains("saved to"),
            || format!("exit {code}: {out}{err}"),
        );
        let (code, out, err) = with_tls(&[], &["list"])?;
        r.expect(
            "fleet TLS: without the client certificate the member refuses (one line, nothing read)",
            code != 0 && err.contains("is unreachable") && err.lines().count() == 1,
            || format!("exit {code}: {out}{err}"),
        );
        // etcd's auth: root (for the admin certificate) and dockwall.
        for (path, body) in [
            ("/v3/auth/role/add", r#"{"name": "root"}"#),
            (
                "/v3/auth/user/add",
                r#"{"name": "root", "password": "root-pw"}"#,
            ),
            ("/v3/auth/user/grant", r#"{"user": "root", "role": "root"}"#),
            (
                "/v3/auth/user/add",
                r#"{"name": "dockwall", "password": "s3cret"}"#,
            ),
            (
                "/v3/auth/user/grant",
                r#"{"user": "dockwall", "role": "root"}"#,
            ),
            ("/v3/auth/enable", "{}"),
        ] {
            gateway(path, body)?;
        }
        let (code, out, err) = with_tls(&certs, &["list"])?;
        r.expect(
            "fleet auth: with auth on, a certificate naming no user is refused",
            code != 0,
            || format!("exit {code}: {out}{err}"),
        );
        let pw = dir.join("password");
        fs::write(&pw, "s3cret\n")?;
        let pw = pw.display().to_string();
        let mut user: Vec<&str> = certs.to_vec();
        user.extend_from_slice(&["--store-user", "dockwall", "--store-password-file", &pw]);
        let (code, out, err) = with_tls(&user, &["list"])?;
        r.expect(
            "fleet auth: --store-user with the right password reads the store",
            code == 0 && out.contains("192.0.2.1"),
            || format!("exit {code}: {out}{err}"),
        );
        fs::write(&pw, "wrong\n")?;
        let (code, out, err) = with_tls(&user, &["allow", "192.0.2.2", "--port", "8081"])?;
        r.expect(
            "fleet auth: a wrong password is refused and nothing is changed",
            code != 0 && err.contains("nothing was changed"),
            || format!("exit {code}: {out}{err}"),
        );
        Ok(())
    })();
    let _ = member.kill();
    let _ = member.wait();
    let _ = fs::remove_dir_all(&dir);
    result
}
