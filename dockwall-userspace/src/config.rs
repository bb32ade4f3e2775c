//! The saved allowances: one TOML file, edited by `allow` / `revoke`.
//!
//! ```toml
//! [[allow]]
//! source = "203.0.113.0/24"
//! port = "8081/tcp"
//!
//! [[allow]]
//! source = "any"
//! container = "web:8080/tcp"
//! ```
//!
//! Writers hold an exclusive `flock` on a lock file beside it for the whole
//! read-modify-write-apply, and replace the file atomically (temp file,
//! fsync, rename), so concurrent `dockwall allow` runs never lose an update
//! and a crash never leaves half a file.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::policy::{Allowance, ContainerSpec, PortProto, Source, Target};

/// Default location of the saved allowances; `--config` or `DOCKWALL_CONFIG` override it.
pub const DEFAULT_CONFIG: &str = "/etc/dockwall/dockwall.toml";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    allow: Vec<Record>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<String>,
}

impl Record {
    fn into_allowance(self) -> Result<Allowance, String> {
        let target = match (self.port, self.container) {
            (Some(port), None) => Target::Port(port.parse::<PortProto>()?),
            (None, Some(container)) => Target::Container(container.parse::<ContainerSpec>()?),
            _ => return Err("each [[allow]] needs exactly one of 'port' or 'container'".into()),
        };
        Ok(Allowance {
            source: self.source,
            target,
        })
    }

    fn from_allowance(a: &Allowance) -> Self {
        let (port, container) = match &a.target {
            Target::Port(p) => (Some(p.to_string()), None),
            Target::Container(c) => (None, Some(c.to_string())),
        };
        Record {
            source: a.source,
            port,
            container,
        }
    }
}

/// The saved allowances, in the order they were added.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policy {
    pub allowances: Vec<Allowance>,
}

impl Policy {
    /// Adds an allowance unless it is there already; returns whether it was new.
    pub fn add(&mut self, allowance: Allowance) -> bool {
        if self.allowances.contains(&allowance) {
            return false;
        }
        self.allowances.push(allowance);
        true
    }

    /// Removes an allowance; returns whether it was there.
    pub fn remove(&mut self, allowance: &Allowance) -> bool {
        let before = self.allowances.len();
        self.allowances.retain(|a| a != allowance);
        self.allowances.len() != before
    }
}

pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("DOCKWALL_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// Reads the policy; a missing file is an empty policy.
pub fn load(path: &Path) -> anyhow::Result<Policy> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Policy::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn parse(text: &str) -> Result<Policy, String> {
    let file: FileFormat = toml::from_str(text).map_err(|e| e.to_string().replace('\n', " "))?;
    let allowances = file
        .allow
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.into_allowance()
                .map_err(|e| format!("allowance #{}: {e}", i + 1))
        })
        .collect::<Result<_, _>>()?;
    Ok(Policy { allowances })
}

fn render(policy: &Policy) -> anyhow::Result<String> {
    let file = FileFormat {
        allow: policy
            .allowances
            .iter()
            .map(Record::from_allowance)
            .collect(),
    };
    let body = toml::to_string(&file).context("serializing the policy")?;
    Ok(format!(
        "# dockwall allowances: who may open new connections to Docker's published ports.\n\
         # Managed by `dockwall allow` / `dockwall revoke`; `port` is the published\n\
         # (host) port clients connect to.\n\n{body}"
    ))
}

/// An exclusive lock on the policy, held until dropped.
pub struct Lock {
    _file: File,
}

pub fn lock(path: &Path) -> anyhow::Result<Lock> {
    let dir = parent(path);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock_path = path.with_extension("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("flock({})", lock_path.display()));
    }
    Ok(Lock { _file: file })
}

/// Replaces the file atomically. Call with the [`Lock`] held.
pub fn save(path: &Path, policy: &Policy, _lock: &Lock) -> anyhow::Result<()> {
    let text = render(policy)?;
    let dir = parent(path);
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Refuses a policy file that is not a regular file, so a typo'd path to a
/// directory fails loudly instead of reading as "no allowances".
pub fn check_readable(path: &Path) -> anyhow::Result<()> {
    match fs::metadata(path) {
        Ok(m) if !m.is_file() => bail!("{} is not a regular file", path.display()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut policy = Policy::default();
        assert!(policy.add(Allowance {
            source: "10.0.0.0/8".parse().unwrap(),
            target: Target::Port("8081".parse().unwrap()),
        }));
        assert!(policy.add(Allowance {
            source: Source::Any,
            target: Target::Container("web:53/udp".parse().unwrap()),
        }));
        assert!(!policy.add(policy.allowances[0].clone()));
        let text = render(&policy).unwrap();
        assert_eq!(parse(&text).unwrap(), policy);
    }

    #[test]
    fn bad_entries_are_refused_with_position() {
        let err = parse("[[allow]]\nsource = \"10.0.0.1/8\"\nport = \"80\"\n").unwrap_err();
        assert!(err.contains("10.0.0.0/8"), "{err}");
        let err = parse("[[allow]]\nsource = \"any\"\n").unwrap_err();
        assert!(err.contains("allowance #1"), "{err}");
        let err = parse("[[allow]]\nsource = \"any\"\nport = \"99999\"\n").unwrap_err();
        assert!(err.contains("99999"), "{err}");
        assert!(parse("[[allow]]\nsource = \"any\"\nport = \"80\"\nextra = 1\n").is_err());
    }

    #[test]
    fn save_and_load_with_lock() {
        let dir = std::env::temp_dir().join(format!("dockwall-config-test-{}", std::process::id()));
        let path = dir.join("dockwall.toml");
        let lock = lock(&path).unwrap();
        let mut policy = Policy::default();
        policy.add(Allowance {
            source: "2001:db8::/48".parse().unwrap(),
            target: Target::Port("443".parse().unwrap()),
        });
        save(&path, &policy, &lock).unwrap();
        assert_eq!(load(&path).unwrap(), policy);
        drop(lock);
        fs::remove_dir_all(&dir).unwrap();
    }
}
