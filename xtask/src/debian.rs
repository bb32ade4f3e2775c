//! Packages of other Debian suites (kernels, Docker engines) fetched with
//! `apt-get download` through a private sources list and lists folder per
//! suite, so the system's apt sources are never changed. Everything lands
//! in [`CACHE`] and is fetched once.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::util::{capture, output};

/// Downloads, extracted packages and built initramfs images.
pub const CACHE: &str = "/var/cache/dockwall-lab";

/// Debian's mirror (the registry this machine kind reaches).
const MIRROR: &str = "http://deb.debian.org/debian";

/// Lists older than this are fetched again (new kernels land in security
/// and point releases).
const LISTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// One Debian suite's private apt state.
pub struct Suite {
    name: &'static str,
    dir: PathBuf,
}

impl Suite {
    /// The suite's package lists, fetched when missing or old.
    pub fn open(name: &'static str) -> anyhow::Result<Self> {
        let dir = Path::new(CACHE).join("apt").join(name);
        fs::create_dir_all(dir.join("lists/partial"))
            .with_context(|| format!("creating {}", dir.display()))?;
        fs::create_dir_all(dir.join("debs"))
            .with_context(|| format!("creating {}/debs", dir.display()))?;
        let suite = Suite { name, dir };
        fs::write(suite.sources(), format!("deb {MIRROR} {name} main\n"))
            .with_context(|| format!("writing {}", suite.sources().display()))?;
        let stamp = suite.dir.join("lists/updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age < LISTS_MAX_AGE)
            });
        if !fresh {
            eprintln!("xtask: apt-get update for Debian {name} (private lists in {CACHE}/apt)");
            let out = output(suite.apt("apt-get").args(["update", "-q"]))?;
            if !out.status.success() {
                bail!(
                    "apt-get update for Debian {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))?;
        }
        Ok(suite)
    }

    fn sources(&self) -> PathBuf {
        self.dir.join("sources.list")
    }

    /// `tool` (apt-get, apt-cache) reading only this suite's lists.
    fn apt(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        cmd.arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", self.sources().display()))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(format!(
                "Dir::State::Lists={}",
                self.dir.join("lists").display()
            ))
            // The lists folder is ours alone; no cleaning of the system's.
            .args(["-o", "APT::Get::List-Cleanup=0"]);
        cmd
    }

    /// A field of the candidate version's record (`Version`, `Depends`).
    pub fn field(&self, package: &str, field: &str) -> anyhow::Result<String> {
        let text = capture(
            self.apt("apt-cache")
                .args(["show", "--no-all-versions", package]),
        )
        .with_context(|| format!("apt-cache show {package} in Debian {}", self.name))?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}: ")))
            .map(str::to_string)
            .with_context(|| format!("{package} in Debian {} has no {field} field", self.name))
    }

    /// The package's .deb (downloaded once).
    pub fn download(&self, package: &str) -> anyhow::Result<PathBuf> {
        let version = self.field(package, "Version")?;
        // apt names the file NAME_VERSION_ARCH.deb with ':' escaped.
        let prefix = format!("{package}_{}_", version.replace(':', "%3a"));
        let debs = self.dir.join("debs");
        let find = || -> anyhow::Result<Option<PathBuf>> {
            for entry in
                fs::read_dir(&debs).with_context(|| format!("reading {}", debs.display()))?
            {
                let path = entry.context("reading a directory entry")?.path();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                if name.is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")) {
                    return Ok(Some(path));
                }
            }
            Ok(None)
        };
        if let Some(deb) = find()? {
            return Ok(deb);
        }
        eprintln!(
            "xtask: apt-get download {package} {version} (Debian {})",
            self.name
        );
        let out = output(
            self.apt("apt-get")
                .current_dir(&debs)
                .args(["download", "-q"])
                .arg(format!("{package}={version}")),
        )?;
        if !out.status.success() {
            bail!(
                "apt-get download {package}={version} (Debian {}) failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        find()?.with_context(|| {
            format!(
                "apt-get download left no {prefix}*.deb in {}",
                debs.display()
            )
        })
    }
}

/// Extracts a .deb into `dir` (once: a marker file records it).
pub fn extract(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    let done = dir.join(".extracted");
    if done.exists() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    capture(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))
        .with_context(|| format!("dpkg-deb -x {}", deb.display()))?;
    fs::write(&done, deb.display().to_string())
        .with_context(|| format!("writing {}", done.display()))
}

/// Extracts another .deb into a folder [`extract`] made (a package split
/// in parts); dpkg-deb -x only adds files.
pub fn extract_into(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    capture(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))
        .map(|_| ())
        .with_context(|| format!("dpkg-deb -x {}", deb.display()))
}
