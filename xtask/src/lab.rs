//! A throwaway Docker host for the end-to-end tests and the demo: a dockerd
//! of our own, a locally built image, outside clients in network namespaces
//! behind veth pairs, and a `dockwall load` running in the background.
//!
//! Every piece is a guard that removes what it made when dropped, so a
//! failing test cleans up too. Traffic only goes to addresses these guards
//! create and to the containers of our dockerd.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::util::{self, capture, output, run, sh};

pub const IMAGE: &str = "dockwall-test:latest";
/// Everything the lab writes lives here; removed on drop.
pub const LAB_DIR: &str = "/run/dockwall-lab";

/// How long a client waits before it calls a connection blocked.
pub const BLOCKED_TIMEOUT: Duration = Duration::from_millis(1200);

// ---- dockerd ---------------------------------------------------------------

pub struct Dockerd {
    child: Child,
    socket: PathBuf,
    /// Docker leaves its iptables chains and docker0 behind when it stops;
    /// we remove them only if they were not there before we started.
    created_docker_state: bool,
    /// The `iptables` and `ip6tables` alternatives before we switched them
    /// (restored on drop).
    original_alternatives: Option<(String, String)>,
}

impl Dockerd {
    pub fn start() -> anyhow::Result<Self> {
        if output(Command::new("pgrep").args(["-x", "dockerd"]))?
            .status
            .success()
        {
            bail!(
                "a dockerd is already running on this host; stop it first (the tests start their own)"
            );
        }
        let had_state = output(Command::new("iptables").args(["-t", "nat", "-S", "DOCKER"]))?
            .status
            .success()
            || PathBuf::from("/sys/class/net/docker0").exists();
        let dir = PathBuf::from(LAB_DIR).join("docker");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("docker.sock");
        let child = spawn_dockerd(&dir)?;
        let dockerd = Dockerd {
            child,
            socket,
            created_docker_state: !had_state,
            original_alternatives: None,
        };
        dockerd.wait_ready()?;
        let version = dockerd.cli(&["version", "--format", "{{.Server.Version}}"])?;
        println!("e2e: note the lab's dockerd is Docker Engine {version}");
        // The data root is ours alone: clear what a crashed run left behind.
        dockerd.remove_all();
        Ok(dockerd)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .docker(&["info", "--format", "{{.ServerVersion}}"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            if Instant::now() > deadline {
                bail!("dockerd did not come up in 30 s; see {LAB_DIR}/docker/dockerd.log");
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.wait();
    }

    /// Stops and starts our dockerd (same data root): Docker re-creates its
    /// chains, and containers without a restart policy stay stopped.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.restart_with(&[])
    }

    /// Restarts dockerd with extra options (e.g. `--iptables=false`); its
    /// old chains are cleared first, so only what it makes now is there.
    pub fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.stop();
        if !extra.is_empty() {
            flush_docker_chains();
        }
        self.child = spawn_dockerd_with(&PathBuf::from(LAB_DIR).join("docker"), extra)?;
        self.wait_ready()
    }

    /// Restarts dockerd with the system's iptables switched to legacy (true)
    /// or back to what it was (false). Docker's chains are removed from the
    /// backend it leaves, so no stale DNAT lingers there.
    pub fn use_iptables_legacy(&mut self, legacy: bool) -> anyhow::Result<()> {
        self.stop();
        flush_docker_chains();
        if legacy {
            if self.original_alternatives.is_none() {
                self.original_alternatives =
                    Some((alternative("iptables")?, alternative("ip6tables")?));
            }
            set_alternative("iptables", "/usr/sbin/iptables-legacy")?;
            set_alternative("ip6tables", "/usr/sbin/ip6tables-legacy")?;
        } else {
            self.restore_alternatives();
        }
        self.child = spawn_dockerd(&PathBuf::from(LAB_DIR).join("docker"))?;
        self.wait_ready()
    }

    fn restore_alternatives(&mut self) {
        if let Some((v4, v6)) = self.original_alternatives.take() {
            let _ = set_alternative("iptables", &v4);
            let _ = set_alternative("ip6tables", &v6);
        }
    }

    fn remove_all(&self) {
        let ids = self.cli(&["ps", "-aq"]).unwrap_or_default();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.lines());
            let _ = self.docker(&args).output();
        }
        let _ = self.docker(&["network", "prune", "-f"]).output();
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn docker(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_HOST", self.host())
            .env("DOCKER_BUILDKIT", "0")
            .args(args);
        cmd
    }

    /// Runs `docker ARGS`, returns trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        capture(&mut self.docker(args)).map(|s| s.trim().to_string())
    }

    /// Builds the test image: busybox (httpd, sh, wget) and udpecho.
    pub fn build_image(&self) -> anyhow::Result<()> {
        let ctx = PathBuf::from(LAB_DIR).join("image");
        fs::create_dir_all(ctx.join("bin")).context("creating the image context")?;
        fs::copy("/bin/busybox", ctx.join("bin/busybox"))
            .context("copying /bin/busybox (apt-get install busybox-static)")?;
        run(Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(ctx.join("bin/udpecho"))
            .arg(util::root().join("xtask/assets/udpecho.c")))?;
        fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY bin/ /bin/\n")
            .context("writing Dockerfile")?;
        let mut cmd = self.docker(&["build", "-q", "-t", IMAGE]);
        cmd.arg(&ctx);
        let built = capture(&mut cmd).map(|_| ());
        let _ = fs::remove_dir_all(&ctx);
        built
    }

    /// `docker run -d` of the test image serving HTTP on 8080 (body: `name`).
    pub fn run_web(&self, name: &str, extra: &[&str]) -> anyhow::Result<()> {
        let script = format!(
            "/bin/busybox mkdir -p /w && echo {name} > /w/index.html && exec /bin/busybox httpd -f -p 8080 -h /w"
        );
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "/bin/busybox", "sh", "-c", &script]);
        self.cli(&args).map(|_| ())
    }

    pub fn container_ip(&self, name: &str) -> anyhow::Result<String> {
        self.cli(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ])
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.remove_all();
        self.stop();
        if self.original_alternatives.is_some() {
            // Docker ran on legacy last: clear that, then switch back.
            flush_docker_chains();
            self.restore_alternatives();
        }
        if self.created_docker_state {
            flush_docker_chains();
        }
        let _ = fs::remove_dir_all(PathBuf::from(LAB_DIR).join("docker"));
        // Last guard out (the others are dropped first) removes the lab dir.
        let _ = fs::remove_dir(LAB_DIR);
    }
}

/// Removes Docker's chains and rules from the system's iptables, and docker0,
/// and undoes Docker's `FORWARD` policy DROP there: both backends hook
/// netfilter, so a DROP policy left in the one Docker no longer uses would
/// drop everything routed.
fn flush_docker_chains() {
    let _ = sh("iptables -P FORWARD ACCEPT; for t in filter nat raw; do
          iptables -t $t -S | grep -E '^-A .*(DOCKER|docker0|br-[0-9a-f]{12})' | sed 's/^-A/-D/' | while read -r r; do eval iptables -t $t $r; done
          for c in DOCKER DOCKER-ISOLATION-STAGE-1 DOCKER-ISOLATION-STAGE-2 DOCKER-USER DOCKER-FORWARD DOCKER-CT DOCKER-BRIDGE DOCKER-INTERNAL; do iptables -t $t -F $c 2>/dev/null; iptables -t $t -X $c 2>/dev/null; done
        done; ip link del docker0 2>/dev/null; true")
    .output();
}

/// The current value of an alternative (`update-alternatives --query`).
fn alternative(name: &str) -> anyhow::Result<String> {
    let out = capture(Command::new("update-alternatives").args(["--query", name]))?;
    out.lines()
        .find_map(|l| l.strip_prefix("Value: "))
        .map(str::to_string)
        .with_context(|| format!("no value for the {name} alternative"))
}

fn set_alternative(name: &str, path: &str) -> anyhow::Result<()> {
    capture(Command::new("update-alternatives").args(["--set", name, path])).map(|_| ())
}

fn spawn_dockerd(dir: &std::path::Path) -> anyhow::Result<Child> {
    spawn_dockerd_with(dir, &[])
}

fn spawn_dockerd_with(dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dockerd.log"))
        .context("opening dockerd.log")?;
    // `--docker VERSION` (engine::ENV): that engine's dockerd, docker-proxy
    // and docker-init first on PATH.
    let mut path = std::env::var_os(crate::engine::ENV).unwrap_or_default();
    if !path.is_empty() {
        path.push(":");
    }
    path.push(std::env::var_os("PATH").unwrap_or_default());
    // Engine 28 drops packets from outside addressed straight to a
    // container (raw PREROUTING) unless told otherwise. The lab keeps that
    // path open, as routed setups do, so the suite still proves dockwall
    // guards it (the equivalence matrix's "endpoint, direct" cases).
    let help = output(Command::new("dockerd").env("PATH", &path).arg("--help"))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let direct_routing: &[&str] = if help.contains("--allow-direct-routing") {
        &["--allow-direct-routing"]
    } else {
        &[]
    };
    Command::new("dockerd")
        .env("PATH", path)
        .args(direct_routing)
        .arg("--host")
        .arg(format!("unix://{}", dir.join("docker.sock").display()))
        .arg("--data-root")
        .arg("/var/lib/dockwall-lab-docker")
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("dockerd.pid"))
        .args(extra)
        .stdout(log.try_clone().context("dup log")?)
        .stderr(log)
        .spawn()
        .context("starting dockerd (apt-get install docker.io)")
}

// ---- clients in network namespaces -----------------------------------------

/// An outside host: a network namespace joined to this host by a veth pair.
pub struct Client {
    pub ns: String,
    pub host_if: String,
    pub host4: String,
    pub addr4: String,
    pub host6: String,
    pub addr6: String,
}

impl Client {
    /// Subnet `n`: host side 10.99.n.1 / fd99:n::1, client 10.99.n.2 / fd99:n::2.
    pub fn new(ns: &str, host_if: &str, n: u8) -> anyhow::Result<Self> {
        let client = Client {
            ns: ns.to_string(),
            host_if: host_if.to_string(),
            host4: format!("10.99.{n}.1"),
            addr4: format!("10.99.{n}.2"),
            host6: format!("fd99:{n}::1"),
            addr6: format!("fd99:{n}::2"),
        };
        client.remove();
        let c = &client;
        let script = format!(
            "set -e
             ip netns add {ns}
             ip link add {hif} type veth peer name eth0 netns {ns}
             ip addr add {h4}/24 dev {hif}
             ip -6 addr add {h6}/64 dev {hif} nodad
             ip link set {hif} up
             ip -n {ns} link set lo up
             ip -n {ns} addr add {a4}/24 dev eth0
             ip -n {ns} -6 addr add {a6}/64 dev eth0 nodad
             ip -n {ns} link set eth0 up
             ip -n {ns} route add default via {h4}
             ip -n {ns} -6 route add default via {h6}",
            ns = c.ns,
            hif = c.host_if,
            h4 = c.host4,
            h6 = c.host6,
            a4 = c.addr4,
            a6 = c.addr6,
        );
        run(&mut sh(&script)).with_context(|| format!("creating client namespace {ns}"))?;
        Ok(client)
    }

    fn remove(&self) {
        let _ = output(Command::new("ip").args(["netns", "del", &self.ns]));
        let _ = output(Command::new("ip").args(["link", "del", &self.host_if]));
    }

    /// Runs `f` on a thread inside this client's network namespace.
    pub fn exec<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&self.ns)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("client thread panicked"))?
        })
    }

    /// HTTP GET / from this client; the body, or why it failed.
    pub fn http_get(&self, addr: &str) -> anyhow::Result<String> {
        let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
        self.exec(move || http_get(addr))?
    }

    /// Whether a TCP connection from this client completes in time.
    pub fn tcp_connects(&self, addr: &str) -> anyhow::Result<bool> {
        self.tcp_connects_within(addr, BLOCKED_TIMEOUT)
    }

    pub fn tcp_connects_within(&self, addr: &str, timeout: Duration) -> anyhow::Result<bool> {
        let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
        self.exec(move || TcpStream::connect_timeout(&addr, timeout).is_ok())
    }

    /// Sends a datagram, returns the reply.
    pub fn udp_echo(&self, addr: &str, msg: &str) -> anyhow::Result<String> {
        let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
        let msg = msg.to_string();
        self.exec(move || -> anyhow::Result<String> {
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(bind).context("bind")?;
            sock.set_read_timeout(Some(BLOCKED_TIMEOUT))
                .context("timeout")?;
            sock.send_to(msg.as_bytes(), addr).context("send_to")?;
            let mut buf = [0u8; 1500];
            let (n, _) = sock.recv_from(&mut buf).context("no UDP reply")?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })?
    }

    /// A UDP echo server in the client namespace that answers one datagram
    /// (within 5 s); returns the source address it saw.
    pub fn udp_server(&self, port: u16) -> anyhow::Result<thread::JoinHandle<Vec<SocketAddr>>> {
        let ns = self.ns.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = thread::spawn(move || {
            let setup = || -> anyhow::Result<UdpSocket> {
                enter_netns(&ns)?;
                let sock = UdpSocket::bind(("0.0.0.0", port))?;
                sock.set_read_timeout(Some(Duration::from_secs(5)))?;
                Ok(sock)
            };
            let sock = match setup() {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Vec::new();
                }
            };
            let mut seen = Vec::new();
            let mut buf = [0u8; 1500];
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
                seen.push(from);
            }
            seen
        });
        rx.recv().context("UDP server thread")??;
        Ok(handle)
    }

    /// A TCP server in the client namespace answering one HTTP request.
    pub fn http_server_once(
        &self,
        port: u16,
        body: &str,
    ) -> anyhow::Result<thread::JoinHandle<()>> {
        let ns = self.ns.clone();
        let body = body.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = thread::spawn(move || {
            let setup = || -> anyhow::Result<TcpListener> {
                enter_netns(&ns)?;
                let l = TcpListener::bind(("0.0.0.0", port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            };
            let listener = match setup() {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok((mut s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut req = [0u8; 1024];
                    let _ = s.read(&mut req);
                    let _ = write!(
                        s,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        rx.recv().context("HTTP server thread")??;
        Ok(handle)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Moves the calling thread into network namespace `ns` (sockets it opens
/// afterwards live there).
pub(crate) fn enter_netns(ns: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on the calling thread only, with an fd we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns({path}, CLONE_NEWNET)"));
    }
    Ok(())
}

fn http_get(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, BLOCKED_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .context("timeout")?;
    write!(s, "GET / HTTP/1.0\r\nHost: test\r\n\r\n").context("send")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).context("read")?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.trim().to_string())
}

// ---- dockwall --------------------------------------------------------------

/// Environment for every dockwall command of a lab: its Docker, and a
/// config and run dir of its own (never the host's /etc/dockwall).
pub struct Dockwall {
    pub docker_host: String,
    pub config: PathBuf,
    pub run_dir: PathBuf,
    /// `--hook` for every `load` of the eBPF filter that names no hook
    /// itself; None: the default, tc.
    hook: std::cell::Cell<Option<&'static str>>,
}

impl Dockwall {
    pub fn new(docker_host: String) -> anyhow::Result<Self> {
        if PathBuf::from("/sys/fs/bpf/dockwall").exists() {
            bail!(
                "dockwall is loaded on this host (/sys/fs/bpf/dockwall); `dockwall unload` it before the tests"
            );
        }
        let dir = PathBuf::from(LAB_DIR).join("dockwall");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).context("creating the dockwall lab dir")?;
        Ok(Dockwall {
            docker_host,
            config: dir.join("dockwall.toml"),
            run_dir: dir.join("run"),
            hook: std::cell::Cell::new(None),
        })
    }

    /// Runs every later `load` with `--hook HOOK` (None: the default).
    pub fn set_hook(&self, hook: Option<&'static str>) {
        self.hook.set(hook);
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(util::dockwall_bin());
        cmd.env("DOCKER_HOST", &self.docker_host)
            .env("DOCKWALL_CONFIG", &self.config)
            .env("DOCKWALL_RUN_DIR", &self.run_dir)
            .args(args);
        if let Some(hook) = self.hook.get()
            && args.first() == Some(&"load")
            && !args.iter().any(|a| *a == "--hook" || *a == "--no-ebpf")
        {
            cmd.args(["--hook", hook]);
        }
        cmd
    }

    /// Runs a dockwall command that must succeed.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<()> {
        let (code, out, err) = self.run(args)?;
        if code != 0 {
            bail!("dockwall {}: exit {code}: {out}{err}", args.join(" "));
        }
        Ok(())
    }

    /// Runs a dockwall command: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let out = output(&mut self.cmd(args))?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Starts `dockwall load` in the background; returns once it reports the
    /// filter in force.
    pub fn load(&self, ifaces: &[&str]) -> anyhow::Result<Loaded> {
        self.load_with(ifaces, &[], None)
    }

    /// `load` with extra arguments and, optionally, another DOCKER_HOST.
    pub fn load_with(
        &self,
        ifaces: &[&str],
        extra: &[&str],
        docker_host: Option<&str>,
    ) -> anyhow::Result<Loaded> {
        let loaded = self.spawn_load(ifaces, extra, docker_host)?;
        loaded.wait_in_force()?;
        Ok(loaded)
    }

    /// Starts `dockwall load` in the background and returns at once: the
    /// daemon may still be starting.
    pub fn spawn_load(
        &self,
        ifaces: &[&str],
        extra: &[&str],
        docker_host: Option<&str>,
    ) -> anyhow::Result<Loaded> {
        let mut args = vec!["load"];
        for iface in ifaces {
            args.extend_from_slice(&["--iface", iface]);
        }
        args.extend_from_slice(extra);
        let mut cmd = self.cmd(&args);
        if let Some(host) = docker_host {
            cmd.env("DOCKER_HOST", host);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning dockwall load")?;
        let stdout = child.stdout.take().context("dockwall load stdout")?;
        let stderr = child.stderr.take().context("dockwall load stderr")?;
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        // Both streams into one log the tests can read.
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let sink = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut l) = sink.lock() {
                        l.push(line);
                    }
                }
            });
        }
        Ok(Loaded {
            child,
            lines,
            unload: self.cmd(&["unload"]),
            keep_filter: false,
        })
    }
}

impl Drop for Dockwall {
    fn drop(&mut self) {
        if let Some(dir) = self.config.parent() {
            let _ = fs::remove_dir_all(dir);
        }
        let _ = fs::remove_dir(LAB_DIR);
    }
}

/// A running `dockwall load`. Dropping it stops the daemon and unloads.
pub struct Loaded {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    unload: Command,
    /// Leave the filter in place on drop: a later load takes it over.
    keep_filter: bool,
}

impl Loaded {
    /// Waits until the daemon reports the filter in force.
    pub fn wait_in_force(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        // "filter in force on ..." or "filter in AUDIT MODE on ...".
        while !self.saw("dockwall: filter in ") {
            if Instant::now() > deadline {
                bail!(
                    "dockwall load did not report the filter in force in 30 s: {:?}",
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn saw(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .map(|l| l.iter().any(|x| x.contains(needle)))
            .unwrap_or(false)
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// SIGKILL, like a crash: nothing of the daemon's own cleanup runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the daemon (if it still runs) and leaves its filter in force for
    /// the next load to take over: no unload on drop.
    pub fn hand_over(mut self) -> anyhow::Result<()> {
        if self.running() {
            self.stop()?;
        }
        self.keep_filter = true;
        Ok(())
    }

    /// SIGTERM and wait: the daemon exits, the filter stays.
    pub fn stop(&mut self) -> anyhow::Result<i32> {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().context("waiting for dockwall load")?;
        Ok(status.code().unwrap_or(-1))
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
        if !self.keep_filter {
            let _ = self.unload.output();
        }
    }
}
