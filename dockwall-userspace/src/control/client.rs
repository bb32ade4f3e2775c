//! The command's end: ask the running daemon, or, when none runs, take
//! the writer's lock and let the caller apply directly.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Reply, Request};
use crate::config;

/// How long a command waits for a daemon that holds the writer's lock but
/// does not answer yet (it is starting: reading and applying the policy).
const START_WAIT: Duration = Duration::from_secs(120);
/// How long the daemon may take to answer one request.
const REPLY_WAIT: Duration = Duration::from_secs(120);

/// Who carries the request out.
pub enum Route {
    /// The daemon did; its answer.
    Daemon(Reply),
    /// No daemon runs: the caller holds the writer's lock and applies.
    Direct(config::Lock),
}

/// Sends `request` to the daemon, or returns the writer's lock when no
/// daemon runs.
pub fn route(config: &Path, request: &Request) -> anyhow::Result<Route> {
    let socket = super::socket_path();
    let deadline = Instant::now() + START_WAIT;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Ok(stream) = UnixStream::connect(&socket) {
            return ask(stream, request, &socket).map(Route::Daemon);
        }
        if let Some(lock) = config::try_lock(config)? {
            // Nobody writes: no daemon runs (a starting one would hold it).
            // One may have bound the socket just before we took the lock,
            // then died; either way the lock makes us the one writer now.
            return Ok(Route::Direct(lock));
        }
        if Instant::now() > deadline {
            bail!(
                "the writer's lock beside {} is held but no daemon answers on {} after {} s; is a `dockwall load` stuck? (nothing was changed)",
                config.display(),
                socket.display(),
                START_WAIT.as_secs()
            );
        }
        // Another command applying directly, or a daemon starting.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn ask(mut stream: UnixStream, request: &Request, socket: &Path) -> anyhow::Result<Reply> {
    let mut line = serde_json::to_vec(request).context("serializing the request")?;
    line.push(b'\n');
    stream
        .set_read_timeout(Some(REPLY_WAIT))
        .context("setting the socket's read timeout")?;
    stream
        .write_all(&line)
        .with_context(|| format!("sending the request to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| {
            format!(
                "waiting for the daemon's answer on {} (it may or may not have applied the change; see `dockwall list`)",
                socket.display()
            )
        })?;
    if answer.is_empty() {
        bail!(
            "the daemon closed {} without answering (it may have been stopped in the middle; see `dockwall list` and `dockwall status`)",
            socket.display()
        );
    }
    serde_json::from_str(&answer).context("parsing the daemon's answer")
}
