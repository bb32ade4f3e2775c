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
    /// No daemon runs: the caller holds the writer's lock and applies the
    /// request given back (marked as a retry if a daemon died on it).
    Direct(config::Lock, Request),
}

/// How often a request is sent again after the daemon died before
/// answering (each time to the next daemon, or applied directly).
const RETRIES: usize = 3;

/// Sends `request` to the daemon, or returns the writer's lock when no
/// daemon runs. A daemon that dies before answering (kill -9, a restart)
/// is no failure: the request goes to the next writer, marked as a retry.
pub fn route(config: &Path, request: &Request) -> anyhow::Result<Route> {
    let socket = super::socket_path();
    let deadline = Instant::now() + START_WAIT;
    let mut pause = Duration::from_millis(2);
    let mut request = request.clone();
    let mut retries = 0;
    loop {
        if let Ok(stream) = UnixStream::connect(&socket) {
            match ask(stream, &request, &socket) {
                Ok(reply) => return Ok(Route::Daemon(reply)),
                Err(Lost::Unanswered(_)) if retries < RETRIES => {
                    retries += 1;
                    match &mut request {
                        Request::Edit(edit) => edit.retried = true,
                        Request::Set(edit) => edit.retried = true,
                        Request::Reload => {}
                    }
                    continue;
                }
                Err(Lost::Unanswered(e) | Lost::Failed(e)) => return Err(e),
            }
        }
        if let Some(lock) = config::try_lock(config)? {
            // Nobody writes: no daemon runs (a starting one would hold it).
            // One may have bound the socket just before we took the lock,
            // then died; either way the lock makes us the one writer now.
            return Ok(Route::Direct(lock, request));
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

/// Why no answer came.
enum Lost {
    /// The daemon closed the connection without answering (it died).
    Unanswered(anyhow::Error),
    Failed(anyhow::Error),
}

fn ask(stream: UnixStream, request: &Request, socket: &Path) -> Result<Reply, Lost> {
    let mut answer = String::new();
    exchange(stream, request, socket, &mut answer).map_err(Lost::Failed)?;
    if answer.is_empty() {
        return Err(Lost::Unanswered(anyhow::anyhow!(
            "the daemon closed {} without answering, {RETRIES} times (see `dockwall list` and `dockwall status`)",
            socket.display()
        )));
    }
    serde_json::from_str(&answer)
        .context("parsing the daemon's answer")
        .map_err(Lost::Failed)
}

fn exchange(
    mut stream: UnixStream,
    request: &Request,
    socket: &Path,
    answer: &mut String,
) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(request).context("serializing the request")?;
    line.push(b'\n');
    stream
        .set_read_timeout(Some(REPLY_WAIT))
        .context("setting the socket's read timeout")?;
    match stream.write_all(&line) {
        Ok(()) => {}
        // The daemon died between accepting and reading: nothing was
        // applied, the same as no answer (sent again).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("sending the request to {}", socket.display()));
        }
    }
    match BufReader::new(&stream).read_line(answer) {
        Ok(_) => Ok(()),
        // Reset by a dying daemon: the same as no answer.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "waiting for the daemon's answer on {} (it may or may not have applied the change; see `dockwall list`)",
                socket.display()
            )
        }),
    }
}
