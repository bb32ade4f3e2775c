//! `cargo xtask install [--root DIR]`: the binary, the systemd unit, its
//! defaults file, man pages and shell completions, where Debian looks for
//! them. `--root` installs into a staging tree (packaging, tests).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::util::{self, capture};

/// Where each piece goes, below the root.
pub struct Layout {
    pub sbin: PathBuf,
    pub unit: PathBuf,
    pub defaults: PathBuf,
    pub man8: PathBuf,
    pub bash: PathBuf,
    pub zsh: PathBuf,
    pub fish: PathBuf,
}

impl Layout {
    pub fn under(root: &Path) -> Layout {
        Layout {
            sbin: root.join("usr/local/sbin"),
            unit: root.join("etc/systemd/system/dockwall.service"),
            defaults: root.join("etc/default/dockwall"),
            man8: root.join("usr/local/share/man/man8"),
            bash: root.join("usr/share/bash-completion/completions/dockwall"),
            zsh: root.join("usr/local/share/zsh/site-functions/_dockwall"),
            fish: root.join("usr/share/fish/vendor_completions.d/dockwall.fish"),
        }
    }
}

fn write(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    println!("installed {}", path.display());
    Ok(())
}

/// Installs target/release/dockwall (built already) and what goes with it.
pub fn run(root: &Path) -> anyhow::Result<()> {
    let bin = util::dockwall_bin();
    let dist = util::root().join("dockwall-userspace/dist");
    let l = Layout::under(root);
    let binary = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    // Replace, not overwrite in place: a running daemon keeps its old inode.
    let target = l.sbin.join("dockwall");
    let staged = l.sbin.join(".dockwall.new");
    write(&staged, &binary, 0o755)?;
    fs::rename(&staged, &target).with_context(|| format!("renaming to {}", target.display()))?;

    let unit = fs::read_to_string(dist.join("dockwall.service")).context("reading the unit")?;
    // The unit names the installed path as the system will see it.
    write(
        &l.unit,
        unit.replace("@SBINDIR@", "/usr/local/sbin").as_bytes(),
        0o644,
    )?;
    if l.defaults.exists() {
        println!("kept {} (yours)", l.defaults.display());
    } else {
        let defaults =
            fs::read(dist.join("dockwall.default")).context("reading dockwall.default")?;
        write(&l.defaults, &defaults, 0o644)?;
    }

    // Man pages and completions come from the binary's own clap definitions.
    fs::create_dir_all(&l.man8).with_context(|| format!("creating {}", l.man8.display()))?;
    capture(Command::new(&bin).arg("man").arg(&l.man8))?;
    println!("installed man pages in {}", l.man8.display());
    for (shell, path) in [("bash", &l.bash), ("zsh", &l.zsh), ("fish", &l.fish)] {
        let script = capture(Command::new(&bin).args(["completions", shell]))?;
        write(path, script.as_bytes(), 0o644)?;
    }
    if root == Path::new("/") {
        println!(
            "\nnext: set DOCKWALL_IFACE in /etc/default/dockwall, then\n  \
             systemctl daemon-reload && systemctl enable --now dockwall\n  \
             man 8 dockwall"
        );
    }
    Ok(())
}
