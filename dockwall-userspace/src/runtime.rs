//! What a running or past `dockwall load` left for the other commands:
//! the managed interfaces and Docker's last known published ports.
//!
//! Lives in /run (tmpfs), so it vanishes on reboot together with the bpffs
//! pins it describes. `DOCKWALL_RUN_DIR` moves it (tests).

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    dataplane::ebpf::{AttachMode, Hook},
    policy::Binding,
};

pub const DEFAULT_RUN_DIR: &str = "/run/dockwall";
const STATE_FILE: &str = "state.json";
const PUBLISHED_FILE: &str = "published.json";
/// The policy in force: what was last applied to the dataplanes. The saved
/// file may hold hand edits not applied yet (`dockwall reload` applies them).
const APPLIED_FILE: &str = "applied.toml";
const DAEMON_LOCK: &str = "load.lock";
/// The daemon's phase and the policy revision each dataplane holds.
const DAEMON_FILE: &str = "daemon.json";
/// Held while one process reads, changes and writes back `DAEMON_FILE`.
/// `load`, its daemon and a command applying an edit directly each change
/// some of its fields; unlocked, one of them could write back a copy read
/// before another's change. That happened: a command's copy, read while
/// the old daemon was gone, put the dead daemon's pid back under the new
/// daemon's "running", and `status` said the daemon was stopped. Never
/// removed (unlinking a lock file others may hold would split the lock).
const DAEMON_FILE_LOCK: &str = "daemon.json.lock";

pub fn run_dir() -> PathBuf {
    std::env::var_os("DOCKWALL_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManagedIface {
    pub name: String,
    pub mode: AttachMode,
    /// Where the ingress decision runs; absent in state from before XDP.
    #[serde(default)]
    pub hook: Hook,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub interfaces: Vec<ManagedIface>,
    /// The eBPF filter is installed (maps pinned, classifiers attached).
    #[serde(default)]
    pub ebpf: bool,
    /// The fallback dataplane that is installed, if any.
    #[serde(default)]
    pub fallback: Option<crate::dataplane::fallback::Fallback>,
    /// Drift the daemon found and repaired, newest last ("<unix time> what").
    #[serde(default)]
    pub repairs: Vec<String>,
    /// `load --audit`: nothing is dropped, would-be drops are counted.
    #[serde(default)]
    pub audit: bool,
    /// Where `load --metrics` serves Prometheus metrics, if it does.
    #[serde(default)]
    pub metrics: Option<std::net::SocketAddr>,
}

/// How many repairs `status` keeps showing.
const REPAIRS_KEPT: usize = 20;

/// Records repaired drift for `status`.
pub fn record_repairs(what: &[String]) -> anyhow::Result<()> {
    if what.is_empty() {
        return Ok(());
    }
    let mut state = state()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    state
        .repairs
        .extend(what.iter().map(|w| format!("{now} {w}")));
    let excess = state.repairs.len().saturating_sub(REPAIRS_KEPT);
    state.repairs.drain(..excess);
    save_state(&state)
}

fn read<T: DeserializeOwned + Default>(name: &str) -> anyhow::Result<T> {
    read_in(&run_dir(), name)
}

fn read_in<T: DeserializeOwned + Default>(dir: &Path, name: &str) -> anyhow::Result<T> {
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write<T: Serialize>(name: &str, value: &T) -> anyhow::Result<()> {
    write_in(&run_dir(), name, value)
}

fn write_in<T: Serialize>(dir: &Path, name: &str, value: &T) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(value).context("serializing runtime state")?;
    fs::write(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

pub fn state() -> anyhow::Result<State> {
    read(STATE_FILE)
}

pub fn save_state(state: &State) -> anyhow::Result<()> {
    write(STATE_FILE, state)
}

/// Docker's published ports as last seen by dockwall; used when Docker
/// cannot be asked (it is down, or the command runs without it).
pub fn published() -> anyhow::Result<Vec<Binding>> {
    read(PUBLISHED_FILE)
}

pub fn save_published(bindings: &[Binding]) -> anyhow::Result<()> {
    write(PUBLISHED_FILE, &bindings)
}

/// The policy in force, if dockwall applied one since boot: the last whole
/// policy written (`applied.toml`), with the journal's changes replayed up
/// to the revision every dataplane holds (the daemon applies single edits
/// without rewriting the whole file).
pub fn applied_policy(config: &std::path::Path) -> anyhow::Result<Option<crate::config::Policy>> {
    let path = run_dir().join(APPLIED_FILE);
    let mut policy = match fs::read_to_string(&path) {
        Ok(text) => {
            crate::config::parse(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Some(upto) = daemon()?.applied_revision() {
        let journal = crate::config::journal::path(config);
        crate::config::journal::replay_upto(&journal, &mut policy, upto)?;
    }
    Ok(Some(policy))
}

/// (inode, mtime seconds, mtime nanoseconds, size) of a file.
pub type Stamp = (u64, i64, i64, u64);

/// A file's identity as it is now: every writer of dockwall's replaces the
/// file by rename (a new inode), an editor changes at least mtime.
pub fn stamp(path: &std::path::Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).ok()?;
    Some((meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.size()))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No daemon since boot, or it exited (SIGTERM).
    #[default]
    Stopped,
    /// `load` is reading and applying the policy; edits wait for it.
    Starting,
    /// The daemon answers edits.
    Running,
}

/// What the daemon says of itself, and which revision each dataplane holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Daemon {
    pub pid: Option<u32>,
    pub phase: Phase,
    /// Dataplane name ("ebpf", "iptables (nft)", ...) -> policy revision.
    #[serde(default)]
    pub applied: BTreeMap<String, u64>,
    /// The saved file as the daemon last wrote or read it; another stamp
    /// means a hand edit that `reload` has not applied yet.
    #[serde(default)]
    pub file_stamp: Option<Stamp>,
    /// With `--store`: the store as the daemon last found it.
    #[serde(default)]
    pub store: Option<crate::store::etcd::Health>,
}

impl Daemon {
    /// The revision every dataplane holds (the oldest), if any.
    pub fn applied_revision(&self) -> Option<u64> {
        self.applied.values().copied().min()
    }

    /// The phase, with a daemon that died without saying so (kill -9) as
    /// stopped.
    pub fn live_phase(&self) -> Phase {
        match self.pid {
            // SAFETY: signal 0 only checks the process exists.
            Some(pid)
                if self.phase != Phase::Stopped && unsafe { libc::kill(pid as i32, 0) } == 0 =>
            {
                self.phase
            }
            _ => Phase::Stopped,
        }
    }
}

pub fn daemon() -> anyhow::Result<Daemon> {
    read(DAEMON_FILE)
}

/// Changes what the daemon file says with `change`, under the file's lock:
/// every writer of it goes through here, so none undoes another's change.
pub fn update_daemon(change: impl FnOnce(&mut Daemon)) -> anyhow::Result<()> {
    update_daemon_in(&run_dir(), change)
}

fn update_daemon_in(dir: &Path, change: impl FnOnce(&mut Daemon)) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(DAEMON_FILE_LOCK);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own; it is released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("flock({}, LOCK_EX)", path.display()));
    }
    let mut daemon: Daemon = read_in(dir, DAEMON_FILE)?;
    change(&mut daemon);
    write_in(dir, DAEMON_FILE, &daemon)
}

/// Records the saved file as dockwall itself just wrote it (not a hand edit).
pub fn note_saved_file(config: &Path) -> anyhow::Result<()> {
    update_daemon(|d| d.file_stamp = stamp(config))
}

/// Records that every dataplane in `names` holds `revision` now.
pub fn record_applied(names: &[String], revision: u64) -> anyhow::Result<()> {
    update_daemon(|d| d.applied = names.iter().map(|n| (n.clone(), revision)).collect())
}

pub fn save_applied(policy: &crate::config::Policy) -> anyhow::Result<()> {
    let dir = run_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(APPLIED_FILE);
    let tmp = dir.join(format!(".{APPLIED_FILE}.{}", std::process::id()));
    fs::write(&tmp, crate::config::render(policy)?)
        .and_then(|()| fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Removes the runtime files (unload).
pub fn clear() -> anyhow::Result<()> {
    for name in [STATE_FILE, PUBLISHED_FILE, APPLIED_FILE, DAEMON_FILE] {
        let path = run_dir().join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

/// Held by the one running `dockwall load`; a second one is refused.
pub struct DaemonLock {
    _file: File,
}

pub fn daemon_lock() -> anyhow::Result<DaemonLock> {
    let dir = run_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(DAEMON_LOCK);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another `dockwall load` is already running (pid {}); stop it first or use `dockwall status`",
            holder.trim()
        );
    }
    file.set_len(0).context("truncating the load lock")?;
    write!(file, "{}", std::process::id()).context("writing the load lock")?;
    Ok(DaemonLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads stand in for processes: flock locks an open file, so two
    /// opens in one process exclude each other as two processes would.
    #[test]
    fn concurrent_updates_of_the_daemon_file_lose_nothing() {
        let dir = std::env::temp_dir().join(format!("dockwall-runtime-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        const WRITERS: usize = 6;
        const EACH: u64 = 40;
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let dir = &dir;
                s.spawn(move || {
                    for _ in 0..EACH {
                        update_daemon_in(dir, |d| {
                            *d.applied.entry(format!("writer {w}")).or_default() += 1;
                        })
                        .expect("update");
                    }
                });
            }
        });
        let d: Daemon = read_in(&dir, DAEMON_FILE).expect("read");
        fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(d.applied.len(), WRITERS, "{d:?}");
        assert!(d.applied.values().all(|n| *n == EACH), "{d:?}");
    }
}
