//! The nf_tables netlink messages dockwall sends itself, for what runs on
//! every edit and every resync: adding and deleting set elements, and
//! asking whether a chain exists.
//!
//! Why not `nft`: nft 1.0.6 (Debian 12) reads the whole ruleset into its
//! cache before any command, set elements included. With 100k networks in
//! an interval set that is 0.5 s for `nft add element` to another set, and
//! for `nft list chain`, so an edit took 1.9 s (p50) and the daemon's
//! 2-second presence check used a quarter of a core. The kernel answers
//! these messages without any dump. Whole tables are still written by
//! `nft -f` (install, rule changes), where that cost is paid once.
//!
//! Elements go in one batch (`NFNL_MSG_BATCH_BEGIN` .. `END`): the kernel
//! applies all or none. Every message asks for an ack; the kernel handles a
//! netlink message inside `sendmsg`, so every answer is queued by the time
//! it returns, and one answer per message is read back.

use std::{io, net::IpAddr};

use ipnet::IpNet;

// linux/netfilter/nfnetlink.h, nf_tables.h, netlink.h.
const NETLINK_NETFILTER: i32 = 12;
const NETLINK_CAP_ACK: i32 = 10;
const SOL_NETLINK: i32 = 270;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
/// nft's element user data saying "this interval runs to the end of the
/// address space" (NFTNL_UDATA_SET_ELEM_FLAGS = NFTNL_SET_ELEM_F_INTERVAL_OPEN),
/// so `nft list` shows such a network as nft itself would have added it.
const UDATA_INTERVAL_OPEN: [u8; 6] = [1, 4, 1, 0, 0, 0];
const NLMSG_HDRLEN: usize = 16;

/// A failed nf_tables netlink call, naming the call.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("socket(AF_NETLINK, NETLINK_NETFILTER): {0}")]
    Socket(io::Error),
    #[error("setsockopt({0}) on the nf_tables netlink socket: {1}")]
    Option(&'static str, io::Error),
    #[error("sendmsg to nf_tables ({0} bytes): {1}")]
    Send(usize, io::Error),
    #[error("recv from nf_tables: {0}")]
    Recv(io::Error),
    #[error("nf_tables refused `{0}`: {1}")]
    Refused(String, io::Error),
    #[error("nf_tables answered {got} of the {sent} messages sent")]
    Unanswered { got: usize, sent: usize },
}

/// One set element to add or delete: a single address (a hash set's
/// element) or a network in an interval set, where it is a start element
/// and, unless it runs to the last address, an end element one past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementOp {
    pub add: bool,
    pub set: String,
    pub net: IpNet,
    /// The set has `flags interval`.
    pub interval: bool,
}

impl std::fmt::Display for ElementOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.add { "add" } else { "delete" };
        let element = if self.interval {
            self.net.to_string()
        } else {
            self.net.addr().to_string()
        };
        write!(f, "{verb} element {} {{ {element} }}", self.set)
    }
}

/// Applies `ops` to sets of `table inet TABLE`, in order, in one
/// transaction: all of them, or (on an error) none.
pub fn apply_elements(table: &str, ops: &[ElementOp]) -> Result<(), NetlinkError> {
    if ops.is_empty() {
        return Ok(());
    }
    // Sequence numbers: the batch's begin 0, op i is i + 1, its end after.
    let (first, last) = (1u32, ops.len() as u32);
    let mut batch = Vec::new();
    let subsys = NFNL_SUBSYS_NFTABLES.to_be();
    message(
        &mut batch,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        0,
        0,
        subsys,
        |_| {},
    );
    for (seq, op) in (first..).zip(ops) {
        let (kind, create) = if op.add {
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, 0)
        };
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | kind;
        let flags = NLM_F_REQUEST | NLM_F_ACK | create;
        message(&mut batch, kind, flags, seq, NFPROTO_INET, 0, |m| {
            attr_str(m, NFTA_SET_ELEM_LIST_TABLE, table);
            attr_str(m, NFTA_SET_ELEM_LIST_SET, &op.set);
            nested(m, NFTA_SET_ELEM_LIST_ELEMENTS, |m| element_attrs(m, op));
        });
    }
    message(
        &mut batch,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        last + 1,
        0,
        subsys,
        |_| {},
    );
    let socket = Socket::open(batch.len())?;
    socket.send(&batch)?;
    let mut answered = 0;
    let mut refused = None;
    socket.answers(|seq, errno, _| {
        if (first..=last).contains(&seq) {
            answered += 1;
            if errno != 0 && refused.is_none() {
                let op = &ops[(seq - first) as usize];
                refused = Some(NetlinkError::Refused(
                    format!("{op} (table inet {table})"),
                    io::Error::from_raw_os_error(errno),
                ));
            }
        }
    })?;
    if let Some(e) = refused {
        return Err(e);
    }
    let sent = ops.len();
    if answered != sent {
        return Err(NetlinkError::Unanswered {
            got: answered,
            sent,
        });
    }
    Ok(())
}

/// Whether `chain` exists in `table inet TABLE`.
pub fn chain_exists(table: &str, chain: &str) -> Result<bool, NetlinkError> {
    let mut msg = Vec::new();
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN;
    message(
        &mut msg,
        kind,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        NFPROTO_INET,
        0,
        |m| {
            attr_str(m, NFTA_CHAIN_TABLE, table);
            attr_str(m, NFTA_CHAIN_NAME, chain);
        },
    );
    let socket = Socket::open(msg.len())?;
    socket.send(&msg)?;
    let mut found = false;
    let mut error = None;
    let mut acked = false;
    socket.answers(|seq, errno, kind| {
        if seq != 1 {
            return;
        }
        match kind {
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN => found = true,
            NLMSG_ERROR => {
                acked = true;
                // No such table or chain.
                if errno != 0 && errno != libc::ENOENT {
                    error = Some(io::Error::from_raw_os_error(errno));
                }
            }
            _ => {}
        }
    })?;
    if let Some(e) = error {
        return Err(NetlinkError::Refused(
            format!("list chain inet {table} {chain}"),
            e,
        ));
    }
    if !acked {
        return Err(NetlinkError::Unanswered { got: 0, sent: 1 });
    }
    Ok(found)
}

/// The attributes of one element: its key, and for an interval set the
/// end element after it (or the "open" mark when there is none).
fn element_attrs(m: &mut Vec<u8>, op: &ElementOp) {
    let start = op.net.network();
    let end = if op.interval {
        next_address(op.net.broadcast())
    } else {
        None
    };
    nested(m, NFTA_LIST_ELEM, |m| {
        nested(m, NFTA_SET_ELEM_KEY, |m| {
            attr(m, NFTA_DATA_VALUE, &octets(start))
        });
        if op.interval && end.is_none() {
            attr(m, NFTA_SET_ELEM_USERDATA, &UDATA_INTERVAL_OPEN);
        }
    });
    if let Some(end) = end {
        nested(m, NFTA_LIST_ELEM, |m| {
            nested(m, NFTA_SET_ELEM_KEY, |m| {
                attr(m, NFTA_DATA_VALUE, &octets(end))
            });
            attr(
                m,
                NFTA_SET_ELEM_FLAGS,
                &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
            );
        });
    }
}

/// The address after `addr`; None past the last one.
fn next_address(addr: IpAddr) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(a) => u32::from(a).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(a) => u128::from(a).checked_add(1).map(|n| IpAddr::V6(n.into())),
    }
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Appends one netlink message: header, nfgenmsg, then what `body` writes.
fn message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = buf.len();
    buf.extend_from_slice(&[0; NLMSG_HDRLEN]);
    buf.extend_from_slice(&[family, 0]);
    buf.extend_from_slice(&res_id.to_ne_bytes());
    body(buf);
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    buf[start + 4..start + 6].copy_from_slice(&kind.to_ne_bytes());
    buf[start + 6..start + 8].copy_from_slice(&flags.to_ne_bytes());
    buf[start + 8..start + 12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel.
    pad(buf);
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = (4 + value.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    pad(buf);
}

fn attr_str(buf: &mut Vec<u8>, kind: u16, value: &str) {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    attr(buf, kind, &bytes);
}

fn nested(buf: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    body(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// Netlink's 4-byte alignment.
fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// A NETLINK_NETFILTER socket, closed on drop.
struct Socket(i32);

impl Socket {
    /// Opens it with room for a `len`-byte request in one skb (a batch must
    /// arrive whole) and for an ack of each message in it.
    fn open(len: usize) -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2); the fd is owned by the returned value.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        let socket = Socket(fd);
        // Acks without a copy of the request: a batch's answers stay small.
        socket.set(SOL_NETLINK, NETLINK_CAP_ACK, 1, "NETLINK_CAP_ACK")?;
        let room = i32::try_from(len.saturating_mul(2).max(1 << 16)).unwrap_or(i32::MAX);
        // FORCE: root may exceed net.core.[rw]mem_max, which a big batch needs.
        socket.set(
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            room,
            "SO_SNDBUFFORCE",
        )?;
        socket.set(
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            room,
            "SO_RCVBUFFORCE",
        )?;
        Ok(socket)
    }

    fn set(
        &self,
        level: i32,
        name: i32,
        value: i32,
        what: &'static str,
    ) -> Result<(), NetlinkError> {
        // SAFETY: an int option on a socket we own.
        let ret = unsafe {
            libc::setsockopt(
                self.0,
                level,
                name,
                (&value as *const i32).cast(),
                size_of::<i32>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(NetlinkError::Option(what, io::Error::last_os_error()));
        }
        Ok(())
    }

    fn send(&self, buf: &[u8]) -> Result<(), NetlinkError> {
        // SAFETY: a zeroed sockaddr_nl is the kernel (pid 0, no groups).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: buf and to are valid for the call.
        let sent = unsafe {
            libc::sendto(
                self.0,
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(NetlinkError::Send(buf.len(), io::Error::last_os_error()));
        }
        if sent as usize != buf.len() {
            return Err(NetlinkError::Send(
                buf.len(),
                io::Error::other(format!("only {sent} bytes were sent")),
            ));
        }
        Ok(())
    }

    /// Calls `each(seq, errno, type)` for every message queued for us; an
    /// ack is an NLMSG_ERROR with errno 0. Stops when the queue is empty:
    /// the kernel answered inside our sendmsg.
    fn answers(&self, mut each: impl FnMut(u32, i32, u16)) -> Result<(), NetlinkError> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: buf is valid for its length.
            let got = unsafe {
                libc::recv(
                    self.0,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if got < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(());
                }
                return Err(NetlinkError::Recv(e));
            }
            let mut at = 0;
            let got = got as usize;
            while at + NLMSG_HDRLEN <= got {
                let word =
                    |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
                let len = word(at) as usize;
                if len < NLMSG_HDRLEN || at + len > got {
                    break;
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = word(at + 8);
                // nlmsgerr: a negative errno, then the request's header.
                let errno = if kind == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
                    -(word(at + NLMSG_HDRLEN) as i32)
                } else {
                    0
                };
                each(seq, errno, kind);
                at += (len + 3) & !3;
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our fd, closed once.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_is_a_start_and_an_end_one_past_it_unless_it_runs_to_the_end() {
        let op = |net: &str| ElementOp {
            add: true,
            set: "s".into(),
            net: net.parse().expect("net"),
            interval: true,
        };
        let keys = |op: &ElementOp| {
            let mut m = Vec::new();
            element_attrs(&mut m, op);
            m
        };
        // 10.0.0.0/24: LIST_ELEM{KEY{VALUE 10.0.0.0}}, LIST_ELEM{KEY{VALUE 10.0.1.0}, FLAGS END}.
        let m = keys(&op("10.0.0.0/24"));
        assert_eq!(m.len(), 16 + 24);
        assert_eq!(&m[12..16], &[10, 0, 0, 0]);
        assert_eq!(&m[28..32], &[10, 0, 1, 0]);
        assert_eq!(&m[36..40], &1u32.to_be_bytes());
        // Up to 255.255.255.255: no end element, the open mark instead.
        let m = keys(&op("255.255.255.0/24"));
        assert_eq!(m.len(), 16 + 12);
        assert_eq!(&m[12..16], &[255, 255, 255, 0]);
        assert_eq!(&m[20..26], &UDATA_INTERVAL_OPEN);
        // A single address in a hash set: its key only.
        let host = ElementOp {
            interval: false,
            ..op("192.0.2.1/32")
        };
        assert_eq!(keys(&host).len(), 16);
        assert_eq!(
            next_address("ffff::".parse().expect("v6"))
                .map(|a| a.to_string())
                .as_deref(),
            Some("ffff::1")
        );
        assert_eq!(
            next_address(
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                    .parse()
                    .expect("v6")
            ),
            None
        );
    }
}
