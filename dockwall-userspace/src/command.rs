//! Running the fallbacks' tools (iptables-restore, ipset, nft).

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Feeds `input` to `program args` on stdin; fails with the tool's own
/// error message. `package` names what to install when it is missing.
pub fn pipe(program: &str, args: &[&str], input: &str, package: &str) -> anyhow::Result<()> {
    let what = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what} (apt-get install {package})"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to {what}"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
