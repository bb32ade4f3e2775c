//! Readiness for systemd (`Type=notify`): the sd_notify protocol, a
//! datagram to `$NOTIFY_SOCKET`. Small enough not to need a crate.

use std::os::unix::net::{SocketAddr, UnixDatagram};

use anyhow::Context as _;

/// Sends `state` (e.g. `READY=1\nSTATUS=...`) when run by systemd; does
/// nothing otherwise. `$NOTIFY_SOCKET` is a path, or `@name` for an
/// abstract socket.
pub fn notify(state: &str) -> anyhow::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(&path),
    }
    .with_context(|| format!("NOTIFY_SOCKET={path} is not a socket address"))?;
    let socket = UnixDatagram::unbound().context("socket(AF_UNIX, SOCK_DGRAM)")?;
    socket
        .send_to_addr(state.as_bytes(), &addr)
        .with_context(|| format!("sendto(NOTIFY_SOCKET={path})"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("dockwall-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one touching NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify("READY=1\nSTATUS=test").unwrap();
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=test");
        notify("READY=1").unwrap(); // unset: a no-op
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
