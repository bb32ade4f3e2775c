//! The daemon's end of the control socket: accepts, checks the peer is
//! root (SO_PEERCRED), reads one request and hands it to the daemon's loop,
//! which answers requests one at a time.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedReadHalf},
    sync::{mpsc, oneshot},
};

use super::{Reply, Request};

/// A request on its way to the daemon's loop, with where the answer goes.
pub type Pending = (Request, oneshot::Sender<Reply>);

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// What is read of a refused peer's request before it is answered.
const REFUSED_READ_MAX: u64 = 64 * 1024;
/// Requests waiting for the daemon's loop.
const QUEUE: usize = 1024;

/// Binds the socket (replacing one a dead daemon left), mode 0600.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    // Created 0600 from the start: no moment where others could connect.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("bind({})", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// Accepts connections until the daemon exits; each request goes to the
/// returned queue.
pub fn serve(listener: UnixListener) -> mpsc::Receiver<Pending> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, tx.clone()));
                }
                Err(e) => {
                    eprintln!("dockwall: control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    rx
}

async fn connection(stream: UnixStream, queue: mpsc::Sender<Pending>) {
    let checked = check_peer(&stream);
    let (read, mut write) = stream.into_split();
    let received = match checked {
        Ok(()) => request(read).await,
        Err(e) => {
            // Its request is read (a bounded amount) before the refusal is
            // sent: closing the socket while it still writes would reach
            // it as EPIPE on its write, not as this message.
            discard_request(read).await;
            Err(e)
        }
    };
    let reply = match received {
        Ok(request) => {
            let (tx, rx) = oneshot::channel();
            if queue.send((request, tx)).await.is_err() {
                return; // the daemon is exiting
            }
            match rx.await {
                Ok(reply) => reply,
                Err(_) => return,
            }
        }
        Err(e) => Reply::Failed {
            error: format!("{e:#}"),
        },
    };
    if let Ok(mut line) = serde_json::to_vec(&reply) {
        line.push(b'\n');
        // The client may have gone; the edit stands either way.
        let _ = write.write_all(&line).await;
        let _ = write.shutdown().await;
    }
}

/// Root only: whoever can send requests decides who gets in.
fn check_peer(stream: &UnixStream) -> anyhow::Result<()> {
    let cred = stream
        .peer_cred()
        .context("reading the peer's credentials (SO_PEERCRED)")?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid() != 0 && cred.uid() != me {
        anyhow::bail!(
            "dockwall's control socket takes requests from root only (uid {} asked); try `sudo dockwall ...`",
            cred.uid()
        );
    }
    Ok(())
}

/// Reads a refused peer's request line, at most [`REFUSED_READ_MAX`]
/// bytes and [`READ_TIMEOUT`], and drops it.
async fn discard_request(read: OwnedReadHalf) {
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(REFUSED_READ_MAX));
    let _ = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
}

async fn request(read: OwnedReadHalf) -> anyhow::Result<Request> {
    let mut line = String::new();
    let mut reader = BufReader::new(read);
    tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("the request did not arrive within 5 s")?
        .context("reading the request")?;
    serde_json::from_str(&line).context("parsing the request")
}
