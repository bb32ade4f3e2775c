//! The append-only journal beside the saved file: a first line naming the
//! file revision it continues, `{"base":N}`, then one JSON line per saved
//! change, `{"rev":N,"allow":{...}}`, `{"rev":N,"revoke":{...}}`,
//! `{"rev":N,"set":{"name":...,"members":[...]}}` or `{"rev":N,"unset":NAME}`,
//! each carrying the allowance's or set's whole resulting state. A journal whose base is
//! not the file's revision belongs to another file (deleted, restored from
//! a backup) and is not replayed onto this one.
//!
//! The daemon appends and fsyncs a change before it answers, so an edit it
//! acknowledged survives a crash; [`super::save`] folds the journal into
//! the file and empties it. Replay skips changes the file already holds
//! (`rev` <= the file's revision): a crash between the file's rename and
//! the journal's truncation loses nothing and applies nothing twice.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{Lock, Policy, Record, SetRecord};
use crate::policy::SetName;

/// The journal of the saved file at `config`.
pub fn path(config: &Path) -> PathBuf {
    config.with_extension("journal")
}

/// One saved change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The allowance is saved with exactly this comment and expiry.
    Allow(Record),
    /// The allowance is removed.
    Revoke(Record),
    /// The named set now has exactly these members (created if new).
    Set(SetRecord),
    /// The named set is gone.
    Unset(SetName),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    base: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    rev: u64,
    #[serde(flatten)]
    change: Change,
}

impl Change {
    /// Applies the change to `policy` (not its revision).
    pub fn apply_to(&self, policy: &mut Policy) -> Result<(), String> {
        match self {
            Change::Allow(record) => policy.upsert(record.clone()),
            Change::Revoke(record) => {
                let (allowance, _, _) = record.clone().into_allowance()?;
                policy.remove(&allowance);
                Ok(())
            }
            Change::Set(record) => {
                policy.put_set(record.name, Some(record.nets()?));
                Ok(())
            }
            Change::Unset(name) => {
                policy.put_set(*name, None);
                Ok(())
            }
        }
    }
}

/// The base and the complete change lines of the journal; a last line
/// without its newline is a write the crash cut short, never acknowledged,
/// and is left out.
/// A journal's base revision (from its header) and its numbered lines.
type Parsed = (Option<u64>, Vec<(usize, Line)>);

fn lines(path: &Path) -> anyhow::Result<Parsed> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, Vec::new())),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut base = None;
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    let mut changes = Vec::new();
    for (i, l) in complete.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        if i == 0
            && let Ok(h) = serde_json::from_str::<Header>(l)
        {
            base = Some(h.base);
            continue;
        }
        let line = serde_json::from_str(l)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        changes.push((i + 1, line));
    }
    Ok((base, changes))
}

/// The changes that continue a file at `revision` (none when the journal
/// was written for another file).
fn changes_for(path: &Path, revision: u64) -> anyhow::Result<Vec<(usize, Line)>> {
    let (base, changes) = lines(path)?;
    Ok(if base == Some(revision) {
        changes
    } else {
        Vec::new()
    })
}

/// Replays the changes that continue `policy` (read from the file) onto it.
pub fn replay(path: &Path, policy: &mut Policy) -> anyhow::Result<()> {
    for (n, line) in changes_for(path, policy.revision)? {
        if line.rev <= policy.revision {
            continue;
        }
        line.change
            .apply_to(policy)
            .map_err(|e| anyhow::anyhow!("{}:{n}: {e}", path.display()))?;
        policy.revision = line.rev;
    }
    Ok(())
}

/// Replays only the changes in (`policy.revision`, `upto`]: the policy as
/// it was at revision `upto` (the applied copy may be newer than the base).
pub fn replay_upto(path: &Path, policy: &mut Policy, upto: u64) -> anyhow::Result<()> {
    for (n, line) in lines(path)?.1 {
        if line.rev <= policy.revision || line.rev > upto {
            continue;
        }
        line.change
            .apply_to(policy)
            .map_err(|e| anyhow::anyhow!("{}:{n}: {e}", path.display()))?;
        policy.revision = line.rev;
    }
    Ok(())
}

/// The revision of the last complete change that continues a file at
/// `file_revision` (0: none).
pub fn last_revision(path: &Path, file_revision: u64) -> anyhow::Result<u64> {
    Ok(changes_for(path, file_revision)?
        .last()
        .map_or(0, |(_, l)| l.rev))
}

/// Whether the journal holds changes that continue a file at `revision`.
pub fn continues(path: &Path, revision: u64) -> anyhow::Result<bool> {
    Ok(!changes_for(path, revision)?.is_empty())
}

/// Empties the journal (its changes are in the file now).
pub fn truncate(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// The journal opened for appending, held by its one writer.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Changes appended since it was last emptied.
    pub len: usize,
}

impl Journal {
    /// A new, empty journal continuing the saved file at revision `base`
    /// (whatever journal was there is replaced).
    pub fn create(config: &Path, base: u64, _lock: &Lock) -> anyhow::Result<Self> {
        let path = path(config);
        let file = Self::create_file(&path, base)?;
        Ok(Journal { path, file, len: 0 })
    }

    fn create_file(path: &Path, base: u64) -> anyhow::Result<File> {
        let tmp = path.with_extension("journal.new");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            // Readable like the file it belongs to (`list` and `status`).
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut header = serde_json::to_vec(&Header { base }).context("serializing the header")?;
        header.push(b'\n');
        file.write_all(&header)
            .and_then(|()| file.sync_data())
            .and_then(|()| fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path.display()))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(file)
    }

    /// Appends the changes of revision `rev` and waits until they are on
    /// disk (fdatasync): only then may the edit be acknowledged.
    pub fn append(&mut self, rev: u64, changes: &[Change]) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        for change in changes {
            serde_json::to_writer(
                &mut buf,
                &Line {
                    rev,
                    change: change.clone(),
                },
            )
            .context("serializing a journal line")?;
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("appending to {} (write, fdatasync)", self.path.display()))?;
        self.len += changes.len();
        Ok(())
    }

    /// After [`super::save`] wrote revision `base` and emptied it: start
    /// a new one that continues it.
    pub fn restart(&mut self, base: u64) -> anyhow::Result<()> {
        self.file = Self::create_file(&self.path, base)?;
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Allowance, Target};

    fn record(source: &str, port: &str) -> Record {
        Record::from_allowance(
            &Allowance {
                source: source.parse().unwrap(),
                target: Target::Port(port.parse().unwrap()),
            },
            None,
            None,
        )
    }

    #[test]
    fn replay_skips_what_the_file_holds_and_a_torn_last_line() {
        let dir = std::env::temp_dir().join(format!("dockwall-journal-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("dockwall.toml");
        let lock = super::super::lock(&config).unwrap();
        let mut j = Journal::create(&config, 0, &lock).unwrap();
        j.append(1, &[Change::Allow(record("192.0.2.1", "80"))])
            .unwrap();
        j.append(2, &[Change::Allow(record("192.0.2.2", "80"))])
            .unwrap();
        j.append(3, &[Change::Revoke(record("192.0.2.1", "80"))])
            .unwrap();
        // A crash in the middle of the next append.
        let mut f = OpenOptions::new().append(true).open(path(&config)).unwrap();
        f.write_all(br#"{"rev":4,"allow":{"sou"#).unwrap();
        let mut p = Policy::default();
        replay(&path(&config), &mut p).unwrap();
        assert_eq!(p.revision, 3);
        assert_eq!(p.allowances.len(), 1);
        assert_eq!(p.allowances[0].source.to_string(), "192.0.2.2");
        assert_eq!(last_revision(&path(&config), 0).unwrap(), 3);
        // Written for a file at revision 0: a file at revision 2 (deleted
        // and written again, a backup) does not get it.
        let mut other = Policy {
            revision: 2,
            ..Policy::default()
        };
        replay(&path(&config), &mut other).unwrap();
        assert!(other.allowances.is_empty() && other.revision == 2);
        assert_eq!(last_revision(&path(&config), 2).unwrap(), 0);
        // Up to revision 2 only.
        let mut upto = Policy::default();
        replay_upto(&path(&config), &mut upto, 2).unwrap();
        assert_eq!(upto.allowances.len(), 2);
        // A damaged line in the middle is an error naming file and line.
        fs::write(
            path(&config),
            "{\"base\":0}\n{\"rev\":1,\"allow\":{}}\n{}\n",
        )
        .unwrap();
        let err = replay(&path(&config), &mut Policy::default()).unwrap_err();
        assert!(err.to_string().contains("journal:2:"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A reader that takes no lock (`list`, `status`) while the writer
    /// appends and folds the journal into the file as the daemon does:
    /// every read holds every change acknowledged before it began. Without
    /// the re-read in `config::load`, the old file read with the new
    /// journal loses the journal's changes.
    #[test]
    fn a_reader_racing_compaction_sees_every_acknowledged_change() {
        use std::sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        };
        let dir = std::env::temp_dir().join(format!("dockwall-race-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("dockwall.toml");
        let acked = Arc::new(AtomicU64::new(0));
        let writer = {
            let (config, acked) = (config.clone(), acked.clone());
            std::thread::spawn(move || {
                let lock = super::super::lock(&config).unwrap();
                let mut policy = Policy::default();
                super::super::save(&config, &policy, &lock).unwrap();
                let mut j = Journal::create(&config, 0, &lock).unwrap();
                for rev in 1..=400u64 {
                    let change =
                        Change::Allow(record(&format!("10.0.{}.{}", rev / 256, rev % 256), "80"));
                    j.append(rev, std::slice::from_ref(&change)).unwrap();
                    change.apply_to(&mut policy).unwrap();
                    policy.revision = rev;
                    acked.store(rev, Ordering::SeqCst);
                    if rev % 3 == 0 {
                        super::super::save(&config, &policy, &lock).unwrap();
                        j.restart(rev).unwrap();
                    }
                }
            })
        };
        let mut reads = 0;
        while !writer.is_finished() {
            let before = acked.load(Ordering::SeqCst);
            let policy = super::super::load(&config).unwrap();
            assert!(
                policy.allowances.len() as u64 >= before,
                "read {} allowances after {before} were acknowledged (revision {})",
                policy.allowances.len(),
                policy.revision
            );
            reads += 1;
        }
        writer.join().unwrap();
        assert!(reads > 10, "only {reads} reads raced the writer");
        fs::remove_dir_all(&dir).unwrap();
    }
}
