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
//!
//! [[allow]]
//! source = "198.51.100.7"
//! port = "22022"
//! expires = "2026-11-29T18:00:00Z"
//! ```
//!
//! One writer at a time holds an exclusive `flock` on a lock file beside it:
//! the running daemon for its whole life, else the one `dockwall allow`
//! applying directly. The file is replaced atomically (temp file, fsync,
//! rename), so a crash never leaves half a file.
//!
//! Every saved change bumps `revision`. The daemon does not rewrite the
//! whole file for each edit (0.2 s at 100k allowances): it appends the
//! change to a journal beside it ([`journal`]) and folds the journal back
//! into the file when idle, on start and on reload. [`load`] reads both, so
//! every reader sees every acknowledged edit.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::policy::{Allowance, ContainerSpec, PortProto, SetName, Sets, Source, Target};

pub mod journal;

/// Default location of the saved allowances; `--config` or `DOCKWALL_CONFIG` override it.
pub const DEFAULT_CONFIG: &str = "/etc/dockwall/dockwall.toml";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    /// Bumped by every saved change; absent in a file written by hand = 0.
    #[serde(default)]
    revision: u64,
    /// Named source sets: `office = ["203.0.113.0/24", "198.51.100.7"]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    sets: BTreeMap<SetName, Vec<Source>>,
    #[serde(default)]
    allow: Vec<Record>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpanned {
    #[serde(default)]
    revision: u64,
    #[serde(default)]
    sets: BTreeMap<toml::Spanned<String>, toml::Spanned<Vec<toml::Spanned<String>>>>,
    #[serde(default)]
    allow: Vec<toml::Spanned<Record>>,
}

/// A named set as saved in the journal: its whole membership after a change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetRecord {
    pub name: SetName,
    pub members: Vec<Source>,
}

impl SetRecord {
    pub fn new(name: SetName, members: &BTreeSet<ipnet::IpNet>) -> Self {
        SetRecord {
            name,
            members: members.iter().map(|n| Source::Net(*n)).collect(),
        }
    }

    /// The members as networks (a record only ever holds networks).
    pub fn nets(&self) -> Result<BTreeSet<ipnet::IpNet>, String> {
        self.members
            .iter()
            .map(|m| match m {
                Source::Net(n) => Ok(*n),
                other => Err(format!(
                    "set @{}: '{other}' is not an address or CIDR",
                    self.name
                )),
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<PortProto>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<ContainerSpec>,
    /// A swarm service: `NAME[:TARGET_PORT[/proto]]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<ContainerSpec>,
    /// Free text for the admin: who, why, until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    /// RFC 3339 UTC time from which the allowance no longer lets anyone in
    /// (`allow --for`); absent = never.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<Expiry>,
}

/// An expiry as RFC 3339 text in the file, unix seconds in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry(u64);

impl Serialize for Expiry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::clock::rfc3339(self.0))
    }
}

impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::clock::parse_rfc3339(&text)
            .map(Expiry)
            .map_err(serde::de::Error::custom)
    }
}

impl Record {
    pub fn into_allowance(self) -> Result<(Allowance, Option<String>, Option<u64>), String> {
        let target = match (self.port, self.container, self.service) {
            (Some(port), None, None) => Target::Port(port),
            (None, Some(container), None) => Target::Container(container),
            (None, None, Some(service)) => Target::Service(service),
            _ => {
                return Err(
                    "each [[allow]] needs exactly one of 'port', 'container' or 'service'".into(),
                );
            }
        };
        Ok((
            Allowance {
                source: self.source,
                target,
            },
            self.comment,
            self.expires.map(|e| e.0),
        ))
    }

    pub fn from_allowance(a: &Allowance, comment: Option<&String>, expires: Option<u64>) -> Self {
        let (port, container, service) = match &a.target {
            Target::Port(p) => (Some(*p), None, None),
            Target::Container(c) => (None, Some(c.clone()), None),
            Target::Service(s) => (None, None, Some(s.clone())),
        };
        Record {
            source: a.source,
            port,
            container,
            service,
            comment: comment.cloned(),
            expires: expires.map(Expiry),
        }
    }
}

/// The saved allowances, in the order they were added, with the admin's
/// comments (kept across edits, never interpreted).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Bumped by every saved change (see the module doc).
    pub revision: u64,
    pub allowances: Vec<Allowance>,
    pub comments: BTreeMap<Allowance, String>,
    /// Unix seconds from which an allowance lets no one in; absent = never.
    pub expires: BTreeMap<Allowance, u64>,
    /// Named source sets (`@office`), which allowances and labels may name.
    pub sets: Sets,
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
        self.comments.remove(allowance);
        self.expires.remove(allowance);
        self.allowances.len() != before
    }

    /// Whether an allowance has lapsed at `now` (unix seconds).
    pub fn expired(&self, allowance: &Allowance, now: u64) -> bool {
        self.expires.get(allowance).is_some_and(|&at| at <= now)
    }

    /// The policy without the allowances that lapsed by `now`: what every
    /// dataplane enforces.
    pub fn in_force(&self, now: u64) -> Policy {
        let mut out = self.clone();
        out.allowances.retain(|a| !self.expired(a, now));
        out.comments.retain(|a, _| !self.expired(a, now));
        out.expires.retain(|_, at| *at > now);
        out
    }

    /// The saved form of one allowance (with its comment and expiry), or
    /// None when the policy does not hold it.
    pub fn record(&self, allowance: &Allowance) -> Option<Record> {
        self.allowances.contains(allowance).then(|| {
            Record::from_allowance(
                allowance,
                self.comments.get(allowance),
                self.expires.get(allowance).copied(),
            )
        })
    }

    /// Puts an allowance in with exactly this comment and expiry (a journal
    /// record carries the whole resulting state).
    pub fn upsert(&mut self, record: Record) -> Result<(), String> {
        let (allowance, comment, expires) = record.into_allowance()?;
        match comment {
            Some(c) => self.comments.insert(allowance.clone(), c),
            None => self.comments.remove(&allowance),
        };
        match expires {
            Some(at) => self.expires.insert(allowance.clone(), at),
            None => self.expires.remove(&allowance),
        };
        self.add(allowance);
        Ok(())
    }

    /// The saved allowances that name set `name`.
    pub fn users_of(&self, name: SetName) -> impl Iterator<Item = &Allowance> {
        self.allowances
            .iter()
            .filter(move |a| a.source.set() == Some(name))
    }

    /// Puts a set in with exactly these members, or takes it out (`None`).
    pub fn put_set(&mut self, name: SetName, members: Option<BTreeSet<ipnet::IpNet>>) {
        match members {
            Some(m) => self.sets.insert(name, m),
            None => self.sets.remove(&name),
        };
    }

    /// Removes the allowances that lapsed by `now`; returns them.
    pub fn prune_expired(&mut self, now: u64) -> Vec<Allowance> {
        let gone: Vec<Allowance> = self
            .allowances
            .iter()
            .filter(|a| self.expired(a, now))
            .cloned()
            .collect();
        for a in &gone {
            self.remove(a);
        }
        gone
    }
}

pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("DOCKWALL_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// Reads and validates the policy; a missing file is an empty policy. A
/// file that fails is refused whole, naming `FILE:LINE:COLUMN: reason`.
/// The journal's changes newer than the file are replayed on top, so the
/// result is every acknowledged edit.
pub fn load(path: &Path) -> anyhow::Result<Policy> {
    check_ownership(path)?;
    consistent(path, |text| {
        let mut policy = parse_file(path, text)?;
        journal::replay(&journal::path(path), &mut policy)?;
        Ok(policy)
    })
}

/// The file alone, without the journal.
pub fn load_file(path: &Path) -> anyhow::Result<Policy> {
    check_ownership(path)?;
    let (text, _) = read_stamped(path)?;
    parse_file(path, text.as_deref())
}

fn parse_file(path: &Path, text: Option<&str>) -> anyhow::Result<Policy> {
    match text {
        None => Ok(Policy::default()),
        Some(text) => parse(text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display())),
    }
}

/// Which file is at a path: (device, inode), `None` when there is none.
type Stamp = Option<(u64, u64)>;

/// The file's text (`None`: no file) and the identity of the file it came
/// from, taken from the open descriptor so the two belong together.
fn read_stamped(path: &Path) -> anyhow::Result<(Option<String>, Stamp)> {
    read_held(path).map(|(text, stamp, _)| (text, stamp))
}

/// [`read_stamped`], and the file still open: while it is held its inode
/// cannot be freed and reused by a newer file, so "the path still names
/// this inode" means "it is still this file" (a file closed at once could
/// be replaced twice meanwhile, its inode number reused by the second).
fn read_held(path: &Path) -> anyhow::Result<(Option<String>, Stamp, Option<File>)> {
    use std::{io::Read as _, os::unix::fs::MetadataExt as _};
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, None, None)),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("fstat({})", path.display()))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((Some(text), Some((meta.dev(), meta.ino())), Some(file)))
}

fn stamp(path: &Path) -> anyhow::Result<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    match fs::metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("stat({})", path.display())),
    }
}

/// Runs `read` on the file's text (then the journal) until the file was
/// not replaced meanwhile. Readers take no lock, and the daemon folds the
/// journal into the file (rename, then a new journal with another base)
/// whenever it is idle: the old file read with the new journal would drop
/// every change the journal held.
fn consistent<T>(
    path: &Path,
    read: impl Fn(Option<&str>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut tries = 0;
    loop {
        let (text, before, held) = read_held(path)?;
        let result = read(text.as_deref());
        let same = stamp(path)? == before;
        drop(held);
        if same {
            return result;
        }
        tries += 1;
        if tries == 100 {
            bail!(
                "{} was replaced 100 times while it was read; is something rewriting it in a loop?",
                path.display()
            );
        }
    }
}

/// The saved revision without parsing 100k allowances: the file's
/// `revision = N` line, or the journal's last change when newer.
pub fn saved_revision(path: &Path) -> anyhow::Result<u64> {
    consistent(path, |text| {
        let file = text.map_or(0, text_revision);
        Ok(file.max(journal::last_revision(&journal::path(path), file)?))
    })
}

/// The file's `revision = N` line (0 when it has none or does not exist).
pub fn file_revision(path: &Path) -> anyhow::Result<u64> {
    Ok(read_stamped(path)?.0.as_deref().map_or(0, text_revision))
}

fn text_revision(text: &str) -> u64 {
    text.lines()
        .take_while(|l| !l.starts_with('[')) // top-level keys come first
        .find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "revision").then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// `LINE:COLUMN` (1-based) of a byte offset.
fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    format!("{line}:{col}")
}

/// Parses the file format; errors are `LINE:COLUMN: reason`.
pub fn parse(text: &str) -> Result<Policy, String> {
    let file: FileSpanned = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map_or("1:1".to_string(), |s| line_col(text, s.start));
        format!("{at}: {}", e.message().replace('\n', " "))
    })?;
    let mut policy = Policy {
        revision: file.revision,
        ..Policy::default()
    };
    for (name, members) in file.sets {
        let at = line_col(text, name.span().start);
        let name: SetName = name
            .into_inner()
            .parse()
            .map_err(|e| format!("{at}: [sets]: {e}"))?;
        let mut nets = BTreeSet::new();
        for member in members.into_inner() {
            let at = line_col(text, member.span().start);
            let net = crate::policy::parse_member(member.get_ref())
                .map_err(|e| format!("{at}: set {name}: {e}"))?;
            nets.insert(net);
        }
        policy.sets.insert(name, nets);
    }
    // A set, not `Policy::add`: linear for 100k allowances, not quadratic.
    let mut seen = std::collections::HashSet::new();
    for spanned in file.allow {
        // The position only on error: computing it scans the text.
        let start = spanned.span().start;
        let (allowance, comment, expires) = spanned
            .into_inner()
            .into_allowance()
            .map_err(|e| format!("{}: {e}", line_col(text, start)))?;
        if let Some(comment) = comment {
            policy.comments.insert(allowance.clone(), comment);
        }
        if let Some(at) = expires {
            policy.expires.insert(allowance.clone(), at);
        }
        if let Some(name) = allowance.source.set()
            && !policy.sets.contains_key(&name)
        {
            return Err(format!(
                "{}: no set named @{name}: define it under [sets] (or `dockwall set add {name} SRC...`)",
                line_col(text, start)
            ));
        }
        if seen.insert(allowance.clone()) {
            policy.allowances.push(allowance);
        }
    }
    Ok(policy)
}

/// Refuses a policy file (or its directory) that someone other than root
/// could change: whoever can write it decides who reaches the containers.
fn check_ownership(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(()); // reading as a user (list): nothing to protect here
    }
    for p in [
        Some(path),
        path.parent().filter(|p| !p.as_os_str().is_empty()),
    ]
    .into_iter()
    .flatten()
    {
        let Ok(meta) = fs::metadata(p) else { continue };
        if meta.uid() != 0 {
            bail!(
                "{} is owned by uid {}, not root; anyone who can change it decides who gets in (run `chown root:root {}`)",
                p.display(),
                meta.uid(),
                p.display()
            );
        }
        // A sticky directory (like /tmp) lets others add files but not
        // replace or remove root's; the file itself is checked too.
        let sticky_dir = meta.is_dir() && meta.mode() & 0o1000 != 0;
        if meta.mode() & 0o002 != 0 && !sticky_dir {
            bail!(
                "{} is writable by others (mode {:o}); anyone could change who gets in (run `chmod o-w {}`)",
                p.display(),
                meta.mode() & 0o7777,
                p.display()
            );
        }
    }
    Ok(())
}

pub fn render(policy: &Policy) -> anyhow::Result<String> {
    let file = FileFormat {
        revision: policy.revision,
        sets: policy
            .sets
            .iter()
            .map(|(name, nets)| (*name, nets.iter().map(|n| Source::Net(*n)).collect()))
            .collect(),
        allow: policy
            .allowances
            .iter()
            .map(|a| {
                Record::from_allowance(a, policy.comments.get(a), policy.expires.get(a).copied())
            })
            .collect(),
    };
    let body = toml::to_string(&file).context("serializing the policy")?;
    Ok(format!(
        "# dockwall allowances: who may open new connections to Docker's published ports.\n\
         # Managed by `dockwall allow` / `dockwall revoke`; `port` is the published\n\
         # (host) port clients connect to.\n\n{body}"
    ))
}

/// `text` (a saved file) with its top-level `revision = N` line set to
/// `revision`, everything else as it was: inserted before the first table
/// when there is none.
pub fn with_revision(text: &str, revision: u64) -> String {
    let line = format!("revision = {revision}");
    let mut out = Vec::new();
    let mut done = false;
    for l in text.lines() {
        let top = !done && !l.trim_start().starts_with('[');
        let is_revision = l
            .split_once('=')
            .is_some_and(|(k, _)| k.trim() == "revision");
        if top && is_revision {
            out.push(line.clone());
            done = true;
            continue;
        }
        if !done && l.trim_start().starts_with('[') {
            out.push(line.clone());
            out.push(String::new());
            done = true;
        }
        out.push(l.to_string());
    }
    if !done {
        out.push(line);
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

/// An exclusive lock on the policy, held until dropped.
pub struct Lock {
    _file: File,
}

fn lock_file(path: &Path) -> anyhow::Result<(File, PathBuf)> {
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
    Ok((file, lock_path))
}

/// Waits for the writer's lock.
pub fn lock(path: &Path) -> anyhow::Result<Lock> {
    let (file, lock_path) = lock_file(path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("flock({})", lock_path.display()));
    }
    Ok(Lock { _file: file })
}

/// The writer's lock if nobody holds it, else None (the daemon holds it
/// for its whole life; another command may hold it for one edit).
pub fn try_lock(path: &Path) -> anyhow::Result<Option<Lock>> {
    let (file, lock_path) = lock_file(path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(Lock { _file: file }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(e).with_context(|| format!("flock({})", lock_path.display()))
}

/// Replaces the file atomically with `policy` (at its revision) and empties
/// the journal, whose changes the file now holds. Call with the [`Lock`] held.
pub fn save(path: &Path, policy: &Policy, lock: &Lock) -> anyhow::Result<()> {
    write_text(path, &render(policy)?, lock)?;
    journal::truncate(&journal::path(path))
}

/// Replaces the file with `text` atomically (temp file, fsync, rename,
/// fsync of the directory).
pub fn write_text(path: &Path, text: &str, _lock: &Lock) -> anyhow::Result<()> {
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
        policy
            .expires
            .insert(policy.allowances[1].clone(), 1_795_000_000);
        let text = render(&policy).unwrap();
        assert!(text.contains("expires = \"2026-11-18T11:06:40Z"), "{text}");
        assert_eq!(parse(&text).unwrap(), policy);
    }

    #[test]
    fn sets_roundtrip_and_are_checked() {
        let text = "revision = 4\n\n[sets]\noffice = [\"203.0.113.0/24\", \"198.51.100.7\"]\n\n[[allow]]\nsource = \"@office\"\nport = \"8081\"\n";
        let policy = parse(text).unwrap();
        let office: SetName = "office".parse().unwrap();
        assert_eq!(policy.sets[&office].len(), 2);
        assert_eq!(policy.allowances[0].source, Source::Set(office));
        assert_eq!(parse(&render(&policy).unwrap()).unwrap(), policy);
        assert_eq!(text_revision(&render(&policy).unwrap()), 4);
        // An allowance naming a set that is not there, a bad member, a bad name.
        let err = parse("[[allow]]\nsource = \"@cdn\"\nport = \"80\"\n").unwrap_err();
        assert!(err.starts_with("1:1: no set named @cdn"), "{err}");
        let err = parse("[sets]\noffice = [\"10.0.0.1/8\"]\n").unwrap_err();
        assert!(err.starts_with("2:11: set office: invalid source"), "{err}");
        let err = parse("[sets]\n\"no way\" = []\n").unwrap_err();
        assert!(err.contains("invalid set name"), "{err}");
        // The journal carries a set's whole membership.
        let mut p = Policy::default();
        let change = journal::Change::Set(SetRecord::new(office, &policy.sets[&office]));
        let line = serde_json::to_string(&change).unwrap();
        let back: journal::Change = serde_json::from_str(&line).unwrap();
        back.apply_to(&mut p).unwrap();
        assert_eq!(p.sets, policy.sets);
        journal::Change::Unset(office).apply_to(&mut p).unwrap();
        assert!(p.sets.is_empty());
    }

    #[test]
    fn revision_line_is_set_in_place() {
        let hand = "# mine\n[[allow]]\nsource = \"any\"\nport = \"80\"\n";
        let set = with_revision(hand, 7);
        assert!(
            set.starts_with("# mine\nrevision = 7\n\n[[allow]]"),
            "{set}"
        );
        assert_eq!(parse(&set).unwrap().revision, 7);
        let again = with_revision(&set, 8);
        assert_eq!(again.matches("revision").count(), 1);
        assert_eq!(parse(&again).unwrap().revision, 8);
        assert_eq!(parse(&with_revision("", 3)).unwrap().revision, 3);
    }

    #[test]
    fn expired_allowances_leave_the_policy_in_force() {
        let mut policy = Policy::default();
        let keep = Allowance {
            source: Source::Any,
            target: Target::Port("80".parse().unwrap()),
        };
        let lapse = Allowance {
            source: "192.0.2.1".parse().unwrap(),
            target: Target::Port("22".parse().unwrap()),
        };
        policy.add(keep.clone());
        policy.add(lapse.clone());
        policy.expires.insert(lapse.clone(), 1000);
        assert_eq!(policy.in_force(999).allowances.len(), 2);
        assert_eq!(policy.in_force(1000).allowances, vec![keep.clone()]);
        assert!(policy.in_force(1000).expires.is_empty());
        assert_eq!(policy.prune_expired(1000), vec![lapse]);
        assert_eq!(policy.allowances, vec![keep]);
        let err = parse("[[allow]]\nsource = \"any\"\nport = \"80\"\nexpires = \"tomorrow\"\n")
            .unwrap_err();
        assert!(
            err.starts_with("4:11: ") && err.contains("tomorrow"),
            "{err}"
        );
    }

    #[test]
    fn bad_entries_are_refused_with_position() {
        let err = parse("[[allow]]\nsource = \"10.0.0.1/8\"\nport = \"80\"\n").unwrap_err();
        assert!(err.contains("10.0.0.0/8"), "{err}");
        let err = parse("[[allow]]\nsource = \"any\"\n").unwrap_err();
        assert!(
            err.starts_with("1:1: each [[allow]] needs exactly one"),
            "{err}"
        );
        let err = parse("[[allow]]\nsource = \"any\"\nport = \"80\"\n\n[[allow]]\nsource = \"any\"\nport = \"80/sctp\"\n").unwrap_err();
        assert!(err.starts_with("7:8: ") && err.contains("sctp"), "{err}");
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
