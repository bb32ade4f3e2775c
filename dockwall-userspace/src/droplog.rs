//! The drop log: events the kernel sends through the `DW_EVENTS` ring
//! buffer (already rate-limited there), printed as one line an admin reads
//! without a manual:
//!
//! ```text
//! drop 203.0.113.9:51234 -> web (published 8081/tcp -> 8080) on eth0
//! audit: would drop [2001:db8::9]:40000 -> web (published 8081/tcp -> 8080) on eth0
//! ```
//!
//! Once a second the daemon also reports what the limit suppressed.

use std::{net::SocketAddr, os::fd::AsRawFd as _};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};
use dockwall_common::{DropEvent, EVENT_AUDIT};
use tokio::io::unix::AsyncFd;

use crate::policy::{Binding, Proto, addr_from_bytes};

/// The daemon's end of the ring buffer.
pub struct DropLog {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl DropLog {
    pub fn new(map: Map) -> anyhow::Result<Self> {
        let ring = RingBuf::try_from(map).context("DW_EVENTS is not a ring buffer")?;
        let fd = ring.as_raw_fd();
        // SAFETY: the RingBuf owns its map fd, which stays open and the same
        // for as long as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .with_context(|| format!("watching DW_EVENTS (epoll_ctl fd {fd})"))?;
        Ok(DropLog { ring })
    }

    /// Waits for events, then returns every one queued.
    pub async fn next_batch(&mut self) -> anyhow::Result<Vec<DropEvent>> {
        let mut guard = self
            .ring
            .readable_mut()
            .await
            .context("waiting on DW_EVENTS (epoll)")?;
        let mut out = Vec::new();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<DropEvent>() {
                // SAFETY: the kernel wrote a DropEvent (repr(C), plain
                // integers); read_unaligned because the ring gives 8-byte
                // aligned records but we do not rely on it.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DropEvent>()) });
            }
        }
        guard.clear_ready();
        Ok(out)
    }
}

/// The interface name of an ifindex, or `if<N>` if it is gone.
pub fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// One log line for an event; `bindings` name the container.
pub fn format_event(event: &DropEvent, bindings: &[Binding], ifname: &str) -> String {
    let src = addr_from_bytes(event.family, &event.src)
        .map(|ip| SocketAddr::new(ip, event.sport).to_string())
        .unwrap_or_else(|| "?".to_string());
    let proto = Proto::from_number(event.proto);
    let proto_name = proto.map_or("?".to_string(), |p| p.to_string());
    let mut names: Vec<&str> = Vec::new();
    let mut container_port = None;
    for b in bindings
        .iter()
        .filter(|b| Some(b.proto) == proto && b.host_port == event.policy_port)
    {
        if !names.contains(&b.container.as_str()) {
            names.push(&b.container);
        }
        container_port.get_or_insert(b.container_port);
    }
    let who = if names.is_empty() {
        "?".to_string()
    } else {
        names.join(",")
    };
    let cport = container_port.map_or("?".to_string(), |p| p.to_string());
    // Sent straight to the container's address (routed, not DNATed).
    let direct = if event.dport != event.policy_port || container_port.is_none() {
        let dst = addr_from_bytes(event.family, &event.dst)
            .map(|ip| SocketAddr::new(ip, event.dport).to_string())
            .unwrap_or_default();
        format!(", to {dst}")
    } else {
        String::new()
    };
    let verb = if event.flags & EVENT_AUDIT != 0 {
        "audit: would drop"
    } else {
        "drop"
    };
    format!(
        "{verb} {src} -> {who} (published {}/{proto_name} -> {cport}{direct}) on {ifname}",
        event.policy_port
    )
}

#[cfg(test)]
mod tests {
    use dockwall_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP};

    use super::*;

    fn event(family: u8, src: [u8; 16], dst: [u8; 16], dport: u16, flags: u8) -> DropEvent {
        DropEvent {
            src,
            dst,
            ifindex: 1,
            sport: 51234,
            dport,
            policy_port: 8081,
            proto: PROTO_TCP,
            family,
            flags,
            _pad: [0; 3],
        }
    }

    #[test]
    fn lines_name_source_container_and_ports() {
        let any = "0.0.0.0".parse().unwrap();
        let bindings = vec![Binding::new("web", "abc", any, 8081, 8080, Proto::Tcp)];
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[203, 0, 113, 9]);
        let mut host = [0u8; 16];
        host[..4].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(
            format_event(&event(FAMILY_V4, v4, host, 8081, 0), &bindings, "eth0"),
            "drop 203.0.113.9:51234 -> web (published 8081/tcp -> 8080) on eth0"
        );
        let v6: [u8; 16] = "2001:db8::9"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        assert_eq!(
            format_event(
                &event(FAMILY_V6, v6, [0; 16], 8081, EVENT_AUDIT),
                &bindings,
                "eth0"
            ),
            "audit: would drop [2001:db8::9]:51234 -> web (published 8081/tcp -> 8080) on eth0"
        );
        let mut cip = [0u8; 16];
        cip[..4].copy_from_slice(&[172, 17, 0, 2]);
        assert_eq!(
            format_event(&event(FAMILY_V4, v4, cip, 8080, 0), &bindings, "eth0"),
            "drop 203.0.113.9:51234 -> web (published 8081/tcp -> 8080, to 172.17.0.2:8080) on eth0"
        );
        assert!(format_event(&event(FAMILY_V4, v4, host, 8081, 0), &[], "eth0").contains("-> ?"));
    }
}
