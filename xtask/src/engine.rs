//! Docker Engine versions the suite runs against. 20.10 is the system's
//! docker.io (Debian bookworm); 26.1 (trixie) and 28.5 (sid) are Debian's
//! docker.io of those suites, whose `dockerd`, `docker-proxy` and
//! `docker-init` run on this host with bookworm's containerd and runc: they
//! are extracted from the .deb and put first on the lab dockerd's PATH.
//! The system's docker client talks to all of them (API negotiation).

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::debian::{self, Suite};

/// The environment variable that points the lab's dockerd at another
/// engine's binaries (set by `--docker`, read by `lab::Dockerd`, passed
/// into VMs unchanged).
pub const ENV: &str = "DOCKWALL_LAB_DOCKER_BIN";

/// (version, Debian suite shipping it; `None`: the system's).
pub const ENGINES: [(&str, Option<&str>); 3] = [
    ("20.10", None),
    ("26.1", Some("trixie")),
    ("28.5", Some("sid")),
];

/// The folder holding that engine's dockerd, docker-proxy and docker-init
/// (`None`: the system's, already on PATH).
pub fn bin_dir(version: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(&(_, suite)) = ENGINES.iter().find(|(v, _)| *v == version) else {
        let known: Vec<&str> = ENGINES.iter().map(|(v, _)| *v).collect();
        bail!(
            "no Docker Engine {version} here (known: {}); pick one of those",
            known.join(", ")
        );
    };
    let Some(suite) = suite else {
        return Ok(None);
    };
    let suite: &'static str = suite;
    let apt = Suite::open(suite)?;
    let packaged = apt.field("docker.io", "Version")?;
    if !packaged.starts_with(&format!("{version}.")) {
        bail!(
            "Debian {suite} now ships docker.io {packaged}, not {version}.x; update engine::ENGINES"
        );
    }
    let deb = apt.download("docker.io")?;
    let dir = Path::new(debian::CACHE).join("docker").join(version);
    debian::extract(&deb, &dir)?;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    // One folder for PATH: dockerd and docker-proxy are in usr/sbin,
    // docker-init in usr/bin.
    for (from, name) in [
        ("usr/sbin/dockerd", "dockerd"),
        ("usr/sbin/docker-proxy", "docker-proxy"),
        ("usr/bin/docker-init", "docker-init"),
    ] {
        let link = bin.join(name);
        // trixie's docker.io has no docker-init (only `--init` needs it).
        if !link.exists() && dir.join(from).exists() {
            std::os::unix::fs::symlink(dir.join(from), &link)?;
        }
    }
    Ok(Some(bin))
}
