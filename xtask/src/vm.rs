//! `cargo xtask vm --kernel VERSION -- COMMAND...`: boots one of Debian's
//! kernels under QEMU and runs COMMAND inside as root; its output and exit
//! code are the VM's.
//!
//! The guest sees this host's whole root filesystem read-only over 9p
//! (virtio), under an overlay whose upper layer is a tmpfs, so every path is
//! writable in the guest and nothing it writes reaches the host. A command
//! given by path on the host (a test binary, target/release/dockwall) runs
//! unchanged inside, and the guest starts its own dockerd, namespaces and
//! bpffs. The kernel's modules (extracted from the same .deb) are bound at
//! /lib/modules/RELEASE, so modprobe and Docker's iptables work as on a
//! real host. A second 9p share, the job folder, carries the script and the
//! exit code back.
//!
//! The initramfs is tiny: busybox-static, the modules that mount the root
//! (virtio_pci, 9p, overlay, from modules.dep), and an init that mounts,
//! overlays and switches root. Learnt from virtme-ng and aya's VM tests.
//!
//! Acceleration: TCG by default. Nested KVM on this machine kind (a
//! Firecracker guest) stalls a Linux guest in its first instructions in
//! long mode (seen with every machine type and CPU model tried), while
//! TCG boots a Debian kernel in about 5 s. `DOCKWALL_VM_ACCEL=kvm` tries KVM.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    debian::{self, Suite},
    util::capture,
};

/// The kernels a VM can boot: (version, Debian suite whose linux-image-amd64
/// it is).
pub const KERNELS: [(&str, &str); 4] = [
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
    ("7.2", "sid"),
];

/// Modules the init loads (with their dependencies) to mount the root.
const BOOT_MODULES: [&str; 4] = ["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// Lines the guest prints around the command's output.
const BEGIN: &str = "@@dockwall-vm: begin";
const END: &str = "@@dockwall-vm: end";

/// How an error from [`run`] starts when the guest locked up (the matrix
/// tries such a cell once more).
pub const LOCKED_UP: &str = "VM locked up";

/// One folder per running VM: its script and exit code (shared with it).
const JOBS_DIR: &str = "/run/dockwall-vm";

/// What the guest gets.
const MEMORY_MIB: u32 = 4096;
const CPUS: u32 = 2;

/// Environment passed from the host into the guest's command.
const PASS_ENV: [&str; 6] = [
    "DOCKWALL_BIN",
    crate::engine::ENV,
    "RUST_BACKTRACE",
    "RUST_LOG",
    "HOME",
    "TERM",
];

/// A Debian kernel, extracted.
pub struct Kernel {
    pub version: &'static str,
    /// `uname -r` of it, e.g. 6.1.0-50-amd64.
    pub release: String,
    /// The extracted package (boot/, lib/modules/).
    dir: PathBuf,
}

impl Kernel {
    /// Fetches (once) the kernel Debian ships as `version`.
    pub fn fetch(version: &str) -> anyhow::Result<Self> {
        let Some(&(version, suite)) = KERNELS.iter().find(|(v, _)| *v == version) else {
            let known: Vec<&str> = KERNELS.iter().map(|(v, _)| *v).collect();
            bail!(
                "no Debian kernel {version} here (known: {}); pick one of those",
                known.join(", ")
            );
        };
        let apt = Suite::open(suite)?;
        // linux-image-amd64 depends on the image of the suite's current ABI.
        let depends = apt.field("linux-image-amd64", "Depends")?;
        let image = depends
            .split(',')
            .map(|d| d.split_whitespace().next().unwrap_or(""))
            .find(|d| d.starts_with("linux-image-") && d.ends_with("-amd64"))
            .with_context(|| {
                format!("linux-image-amd64 in {suite} depends on no image: {depends}")
            })?
            .to_string();
        let release = image.trim_start_matches("linux-image-").to_string();
        if !release.starts_with(&format!("{version}."))
            && !release.starts_with(&format!("{version}-"))
        {
            bail!("Debian {suite}'s kernel is now {release}, not {version}; update vm::KERNELS");
        }
        let deb = apt.download(&image)?;
        let dir = Path::new(debian::CACHE).join("kernels").join(&release);
        debian::extract(&deb, &dir)?;
        // From Debian 14 (sid's 7.x) linux-image is a meta package: the
        // kernel and its modules come in linux-binary and linux-modules.
        let boot = dir.join("boot").join(format!("vmlinuz-{release}"));
        if !boot.exists() && !dir.join(".split-extracted").exists() {
            for part in ["linux-binary", "linux-modules"] {
                let package = format!("{part}-{release}");
                let deb = apt.download(&package)?;
                debian::extract_into(&deb, &dir)?;
            }
            fs::write(dir.join(".split-extracted"), "")
                .with_context(|| format!("writing {}/.split-extracted", dir.display()))?;
        }
        // Debian 13 and later ship modules in /usr/lib/modules (merged /usr);
        // depmod -b and the guest's bind mount want lib/modules.
        if !dir.join("lib").exists() && dir.join("usr/lib/modules").exists() {
            std::os::unix::fs::symlink("usr/lib", dir.join("lib"))
                .with_context(|| format!("linking {}/lib to usr/lib", dir.display()))?;
        }
        let kernel = Kernel {
            version,
            release,
            dir,
        };
        kernel.depmod()?;
        Ok(kernel)
    }

    fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.release)
    }

    fn vmlinuz(&self) -> PathBuf {
        let boot = self
            .dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.release));
        if boot.exists() {
            boot
        } else {
            // linux-binary (Debian 14) puts it beside the modules.
            self.modules().join("vmlinuz")
        }
    }

    /// modules.dep is made at install time, not shipped.
    fn depmod(&self) -> anyhow::Result<()> {
        if self.modules().join("modules.dep").exists() {
            return Ok(());
        }
        capture(
            Command::new("depmod")
                .arg("-b")
                .arg(&self.dir)
                .arg(&self.release),
        )
        .map(|_| ())
        .context("depmod (apt-get install kmod)")
    }

    /// The modules to insmod, dependencies first, as paths below modules().
    fn boot_modules(&self) -> anyhow::Result<Vec<String>> {
        let dep_file = self.modules().join("modules.dep");
        let deps = fs::read_to_string(&dep_file)
            .with_context(|| format!("reading {}", dep_file.display()))?;
        // Built into the kernel (virtio_pci from 6.12): nothing to load.
        let builtin =
            fs::read_to_string(self.modules().join("modules.builtin")).unwrap_or_default();
        let is_builtin = |wanted: &str| {
            builtin.lines().any(|l| {
                let name = l.rsplit('/').next().unwrap_or(l);
                name.split(".ko").next() == Some(wanted)
            })
        };
        let mut order: Vec<String> = Vec::new();
        for wanted in BOOT_MODULES {
            if is_builtin(wanted) {
                continue;
            }
            let line = deps.lines().find(|l| {
                l.split(':').next().is_some_and(|m| {
                    let name = m.rsplit('/').next().unwrap_or(m);
                    name.split(".ko").next() == Some(wanted)
                })
            });
            // Not a module: built in (sid ships no plain modules.builtin).
            // A kernel without it at all fails to mount the root, and the
            // console says so.
            let Some(line) = line else {
                continue;
            };
            let (module, needs) = line.split_once(':').unwrap_or((line, ""));
            // modules.dep lists what a module needs, the last to load first.
            for m in needs.split_whitespace().rev().chain([module]) {
                if !order.iter().any(|o| o == m) {
                    order.push(m.to_string());
                }
            }
        }
        Ok(order)
    }

    /// The initramfs (built once per kernel): busybox, boot modules
    /// (decompressed: busybox insmod takes plain .ko), init.
    fn initramfs(&self) -> anyhow::Result<PathBuf> {
        let out = self.dir.join("initramfs.cpio.gz");
        let init = init_script();
        let stamp = self.dir.join("initramfs.init");
        if out.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == init) {
            return Ok(out);
        }
        let root = self.dir.join("initramfs");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("bin")).context("creating the initramfs tree")?;
        fs::create_dir_all(root.join("modules")).context("creating the initramfs tree")?;
        fs::copy("/bin/busybox", root.join("bin/busybox"))
            .context("copying /bin/busybox (apt-get install busybox-static)")?;
        let mut order = String::new();
        for (i, m) in self.boot_modules()?.iter().enumerate() {
            let src = self.modules().join(m);
            let name = format!("{i:02}.ko");
            let dst = root.join("modules").join(&name);
            let text = if m.ends_with(".ko.xz") {
                Some("xz")
            } else if m.ends_with(".ko.zst") {
                Some("zstd")
            } else if m.ends_with(".ko.gz") {
                Some("gzip")
            } else {
                None
            };
            match text {
                None => {
                    fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
                }
                Some(tool) => {
                    let plain = Command::new(tool)
                        .args(["-dc"])
                        .arg(&src)
                        .output()
                        .with_context(|| {
                            format!("{tool} -dc {} (apt-get install {tool})", src.display())
                        })?;
                    if !plain.status.success() {
                        bail!("{tool} -dc {} failed", src.display());
                    }
                    fs::write(&dst, plain.stdout)
                        .with_context(|| format!("writing {}", dst.display()))?;
                }
            }
            let _ = writeln!(order, "{name} {m}");
        }
        fs::write(root.join("modules/order"), order).context("writing modules/order")?;
        fs::write(root.join("init"), &init).context("writing init")?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))
            .context("chmod init")?;
        let script = format!(
            "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
            root.display(),
            out.display()
        );
        capture(crate::util::sh(&script).stdin(Stdio::null()))
            .context("packing the initramfs (apt-get install cpio)")?;
        fs::write(&stamp, init).context("writing the initramfs stamp")?;
        Ok(out)
    }
}

/// The initramfs's /init: mount the host's root read-only, overlay a tmpfs
/// on it, mount the job share, switch root to the job's script.
fn init_script() -> String {
    r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /lower /upper /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r ko name; do
  insmod /modules/$ko || echo "dockwall-vm: insmod $name failed"
done < /modules/order
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 hostroot /lower || echo "dockwall-vm: mounting the host's root failed"
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work root /newroot || echo "dockwall-vm: overlay failed"
mkdir -p /newroot/dockwall-vm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 job /newroot/dockwall-vm || echo "dockwall-vm: mounting the job share failed"
exec switch_root /newroot /bin/sh /dockwall-vm/stage2
"#
    .to_string()
}

/// A shell word, single-quoted.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The guest's second stage (run from the host's root): the mounts a host
/// has, the kernel's modules, then the command, its exit code into the
/// job folder, power off.
fn stage2(kernel: &Kernel, command: &[String], cwd: &Path) -> String {
    let mut env = String::new();
    for name in PASS_ENV {
        if let Ok(v) = std::env::var(name) {
            let _ = writeln!(env, "export {name}={}", quote(&v));
        }
    }
    let cmd: Vec<String> = command.iter().map(|a| quote(a)).collect();
    format!(
        r#"export PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
# What udev or systemd make on a real host. runc's re-exec of its cloned
# binary needs /dev/fd on 5.10 ("could not ensure we are a cloned binary").
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# Docker's data roots cannot be on the overlay itself.
for d in /var/lib/docker /var/lib/dockwall-lab-docker /var/lib/containerd; do
  mkdir -p $d && mount -t tmpfs -o mode=0711 docker $d
done
mkdir -p /lib/modules/{release}
mount --bind {modules} /lib/modules/{release}
ip link set lo up
hostname dockwall-vm-{version}
{env}cd {cwd} || exit 1
echo "{BEGIN} $(uname -r)"
{cmd}
rc=$?
echo "{END} rc=$rc"
echo $rc > /dockwall-vm/rc
sync
echo o > /proc/sysrq-trigger
sleep 10
"#,
        release = kernel.release,
        modules = kernel.modules().display(),
        version = kernel.version,
        cwd = quote(&cwd.display().to_string()),
        cmd = cmd.join(" "),
    )
}

/// Boots `kernel` and runs `command` in `cwd`; its output goes to stdout
/// as it comes; returns its exit code.
pub fn run(
    kernel: &Kernel,
    command: &[String],
    cwd: &Path,
    timeout: Duration,
) -> anyhow::Result<i32> {
    if command.is_empty() {
        bail!(
            "no command to run in the VM (cargo xtask vm --kernel {} -- COMMAND...)",
            kernel.version
        );
    }
    let initramfs = kernel.initramfs()?;
    let job = PathBuf::from(JOBS_DIR).join(format!("{}-{}", kernel.version, std::process::id()));
    let _ = fs::remove_dir_all(&job);
    fs::create_dir_all(&job).with_context(|| format!("creating {}", job.display()))?;
    let _cleanup = RemoveOnDrop(job.clone());
    fs::write(job.join("stage2"), stage2(kernel, command, cwd)).context("writing stage2")?;
    let accel = match std::env::var("DOCKWALL_VM_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        _ => "tcg,thread=multi",
    };
    // `DOCKWALL_VM_CPU` picks another CPU model (qemu -cpu help).
    let cpu = std::env::var("DOCKWALL_VM_CPU").unwrap_or_else(|_| "max".to_string());
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel, "-cpu", &cpu, "-smp"])
        .arg(CPUS.to_string())
        .arg("-m")
        .arg(MEMORY_MIB.to_string())
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init",
        ])
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=job,security_model=none",
            job.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let (tx, rx) = mpsc::channel();
    // Set when the guest's kernel reports a CPU stuck: under TCG a guest
    // has been seen to lock up in runc (soft lockups, not a dockwall path);
    // the VM is stopped at once instead of at the timeout.
    let locked_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lockup_seen = locked_up.clone();
    let reader = thread::spawn(move || {
        // Before BEGIN: the firmware's and kernel's text, shown only when
        // the guest never gets to the command.
        let mut boot = Vec::new();
        let mut inside = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            if line.contains(BEGIN) {
                inside = true;
                eprintln!(
                    "xtask: vm {}",
                    line.trim_start_matches("@@dockwall-vm: begin").trim()
                );
                continue;
            }
            if line.contains(END) {
                inside = false;
                continue;
            }
            if line.contains("soft lockup") || line.contains("self-detected stall") {
                lockup_seen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if inside {
                println!("{line}");
            } else {
                boot.push(line);
            }
        }
        let _ = tx.send(boot);
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            break Some(status);
        }
        if Instant::now() > deadline || locked_up.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: signalling the qemu we started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let _ = reader.join();
    let boot = rx.try_recv().unwrap_or_default();
    let rc = fs::read_to_string(job.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match (rc, status) {
        (Some(rc), _) => Ok(rc),
        (None, _) if locked_up.load(std::sync::atomic::Ordering::Relaxed) => bail!(
            "{LOCKED_UP}: the {} guest's kernel reported a CPU stuck (soft lockup under emulation); stopped",
            kernel.release
        ),
        (None, None) => bail!(
            "the {} VM did not finish in {} s; its console before the command:\n{}",
            kernel.release,
            timeout.as_secs(),
            tail(&boot)
        ),
        (None, Some(status)) => bail!(
            "the {} VM stopped ({status}) before the command finished; its console:\n{}",
            kernel.release,
            tail(&boot)
        ),
    }
}

fn tail(lines: &[String]) -> String {
    let start = lines.len().saturating_sub(40);
    lines[start..].join("\n")
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}
