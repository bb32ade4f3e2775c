//! dockwall's kernel side: the ingress decision, as a tc classifier
//! (`dw_ingress`) or as native XDP (`dw_xdp`, `load --hook xdp`), and a tc
//! egress classifier on each managed interface.
//!
//! `dw_ingress` (and `dw_xdp`, the same code on an XDP frame) decides, before conntrack and Docker's DNAT, whether a packet
//! opens a new connection to a port Docker published, and if so whether an
//! allowance lets it in. Read it top to bottom:
//!
//! 1. Parse Ethernet (up to two VLAN tags), IPv4 or IPv6 (extension headers),
//!    TCP or UDP. Not TCP/UDP: pass. Malformed: drop. Non-first fragment: pass.
//! 2. Destination (address, protocol, port) neither published on the host
//!    nor a published container endpoint: pass. A per-port array answers
//!    first; the hash map only for ports with specific binds or endpoints.
//! 3. Not a new connection: pass. TCP: anything but a bare SYN. UDP: a reply
//!    to a flow `dw_egress` saw leave this host (host or masqueraded container).
//! 4. Longest-prefix match of (published port, protocol, source) in the
//!    allowances: an unexpired hit passes, anything else is denied. For a
//!    container endpoint the published port is the one that publishes it.
//!    The match is one exact hash probe per prefix length that port's
//!    allowances use, longest first (ipset's idea, per port); a port using
//!    more than `ALLOW_MAX_LENS` lengths is looked up in an LPM trie. Each
//!    probe first reads `DW_MIRROR_V4` (IPv4) or `DW_MIRROR_V6`, a copy
//!    userspace keeps in array buckets: a hash computed here and one cache
//!    line, no helper call. The hash map answers where the mirror cannot
//!    be sure.
//! 5. Denied: count it per published port, log it (rate-limited, to a ring
//!    buffer the daemon prints), then drop; in audit mode, pass instead.
//!
//! A flood of denied packets writes only this CPU's memory: the verdict
//! counters, the per-port drop counters and the log limiter are per CPU,
//! so CPUs dropping in parallel do not bounce a cache line between them
//! (bench/droppath.md). So are the allowances' hit counters (`count_hit`):
//! each allowance's value names its slot in a per-CPU array. Only an
//! allowance userspace had no slot for, or one an older dockwall wrote,
//! counts in the entry, one atomic add shared by the CPUs that match it.
//!
//! "Pass" is `TC_ACT_UNSPEC`: under tcx that is NEXT, so programs attached
//! after dockwall still run; under the legacy clsact path it lets the next
//! filter run. Nothing is ever rewritten.
//!
//! `dw_egress` only records outbound UDP flows for step 3; it always passes.
//! It stays a tc program in XDP mode: XDP sees only received frames.
//!
//! What XDP sees that tc does not, and the reverse: a VLAN tag the driver
//! strips is in the skb's metadata at tc and nowhere at XDP, and in the
//! packet data for both when not stripped. dockwall does not filter on VLAN
//! IDs, so both decide the same either way. An XDP frame is the driver's
//! first buffer only (the program does not declare multi-buffer support, so
//! the kernel refuses it on a device whose MTU needs several).
#![no_std]
#![no_main]
// The bpf target has no AtomicU64::fetch_add; the intrinsic lowers to BPF's
// atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{
        bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_xdp_load_bytes,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use dockwall_common::{
    ALLOW_GROUPS, ALLOW_KEY_FIXED_BITS, ALLOW_MAX_ENTRIES, ALLOW_MAX_LENS, AllowKey, AllowLens,
    AllowNetKey, AllowValue, CONFIG_AUDIT, Config, DropEvent, EVENT_AUDIT, EVENTS_BYTE_SIZE,
    FAMILY_V4, FAMILY_V6, FlowKey, HIT_SLOT_ELEMENTS, HIT_SLOTS, HitSlotWords, LOG_WINDOW_NS,
    LogLimit, MIRROR_ASK, MIRROR_BUCKETS, MIRROR_OVERFLOW, MIRROR_WRITING, MIRROR6_ASK,
    Mirror6Bucket, MirrorBucket, PORT_DROPS_MAX_ENTRIES, PROTO_TCP, PROTO_UDP,
    PUBLISHED_MAX_ENTRIES, PublishedKey, PublishedValue, UDP_FLOW_REFRESH_NS, UDP_FLOW_TIMEOUT_NS,
    UDP_FLOWS_MAX_ENTRIES, allow_group_index, mirror_key, mirror_place, mirror_way_field,
    mirror_way_holds, mirror6_bucket, mirror6_field, mirror6_meta_key, mirror6_words,
    port_drop_index, scope_bit, stat,
};

// Map names must equal dockwall_common::MAP_* (the loader looks them up by name).
#[map(name = "DW_PUBLISHED")]
static PUBLISHED: HashMap<PublishedKey, PublishedValue> =
    HashMap::with_max_entries(PUBLISHED_MAX_ENTRIES, 0);

#[map(name = "DW_PORTS")]
static PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

// Allowances, by group (published port, protocol, family): a group whose
// DW_GROUP_LENS slot lists lengths has its allowances in DW_ALLOW_NETS, one
// exact entry each; any other group's are in the trie. The slots are an
// array (an inlined load, no helper call); DW_ALLOW_NETS is not
// preallocated, so it holds memory only for allowances that exist. Its
// values are not per CPU: that costs userspace a percpu allocation per
// insert, measured at 22 us (2.3 s to load 100k allowances, against 1.6 us
// for the trie); the per-CPU hit counters are DW_HIT_COUNTS instead.
#[map(name = "DW_ALLOW")]
static ALLOW: LpmTrie<AllowKey, AllowValue> = LpmTrie::with_max_entries(ALLOW_MAX_ENTRIES, 0);

#[map(name = "DW_GROUP_LENS")]
static ALLOW_LENS: Array<u64> = Array::with_max_entries(ALLOW_GROUPS, BPF_F_MMAPABLE);

#[map(name = "DW_ALLOW_NETS")]
static ALLOW_NETS: HashMap<AllowNetKey, AllowValue> =
    HashMap::with_max_entries(ALLOW_MAX_ENTRIES, BPF_F_NO_PREALLOC);

// The IPv4 entries of DW_ALLOW_NETS again, in buckets userspace writes
// through a shared mapping: a probe is a hash computed here and an array
// load, no helper call. On this guest (AMD, "Safe RET" against SRSO) each
// kernel call and return costs several ns; the hash map's probe was ~25 ns.
#[map(name = "DW_MIRROR_V4")]
static ALLOW_MIRROR: Array<MirrorBucket> = Array::with_max_entries(MIRROR_BUCKETS, BPF_F_MMAPABLE);

#[map(name = "DW_MIRROR_V6")]
static ALLOW_MIRROR6: Array<Mirror6Bucket> =
    Array::with_max_entries(MIRROR_BUCKETS, BPF_F_MMAPABLE);

// The allowances' hit counters, per CPU, at the slot userspace wrote in
// each allowance's value: a hit is an array load (inlined by the verifier
// on Linux 6.x). The per-CPU hash keyed by allowance it replaces cost ~25
// ns of the allowed path in its lookup (BPF_PROG_TEST_RUN) and ~0.25 us,
// or ~10 us unpreallocated, on an allowance's first hit.
#[map(name = "DW_HIT_COUNTS")]
static HIT_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HIT_SLOTS, 0);

// Which slots are taken: userspace's, never read here. Declared so the
// loader creates and pins it with the other maps, and it goes with them.
#[map(name = "DW_HIT_SLOTS")]
static HIT_SLOTS_TAKEN: Array<HitSlotWords> = Array::with_max_entries(HIT_SLOT_ELEMENTS, 0);

#[map(name = "DW_UDP_FLOWS")]
static UDP_FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(UDP_FLOWS_MAX_ENTRIES, 0);

#[map(name = "DW_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[map(name = "DW_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

// Indexed by port (port_drop_index), so a drop costs an array load where a
// per-CPU hash keyed by port cost a hash lookup, ~23 ns of the drop path
// (BPF_PROG_TEST_RUN); the price is 1 MiB a CPU up front.
#[map(name = "DW_DROP_COUNTS")]
static PORT_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PORT_DROPS_MAX_ENTRIES, 0);

#[map(name = "DW_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTE_SIZE, 0);

#[map(name = "DW_LOG_LIMIT")]
static LOG_LIMIT: PerCpuArray<LogLimit> = PerCpuArray::with_max_entries(1, 0);

/// Online CPUs when the object was loaded, set by the loader (a read-only
/// global the verifier treats as a constant): the drop-log rate is shared
/// out between them.
#[unsafe(no_mangle)]
static LOG_CPUS: u32 = 1;

/// 1 where the kernel has bpf_ktime_get_coarse_ns (Linux 5.11), set by the
/// loader. A read-only global, so the verifier knows it: on an older kernel
/// the coarse call is dead code it never checks (and would refuse).
#[unsafe(no_mangle)]
static COARSE_CLOCK: u32 = 0;

/// 1 where the kernel reads `DW_MIRROR_V4` and `DW_MIRROR_V6`, set by the
/// loader: on x86-64, whose loads are not reordered with each other, which
/// the mirrors' sequence lock needs (BPF has no load-acquire before 6.15).
/// Elsewhere 0, and every probe goes to the hash map.
#[unsafe(no_mangle)]
static MIRROR_ON: u32 = 0;

const TC_PASS: i32 = TC_ACT_UNSPEC;
const TC_DROP: i32 = TC_ACT_SHOT;
const XDP_PASS: u32 = xdp_action::XDP_PASS;
const XDP_DROP: u32 = xdp_action::XDP_DROP;

/// What the ingress decision says; each hook maps it to its return codes.
#[derive(Clone, Copy)]
enum Verdict {
    Pass,
    Drop,
}
use Verdict::{Drop as DROP, Pass as PASS};

impl Verdict {
    #[inline(always)]
    fn tc(self) -> i32 {
        match self {
            Verdict::Pass => TC_PASS,
            Verdict::Drop => TC_DROP,
        }
    }

    #[inline(always)]
    fn xdp(self) -> u32 {
        match self {
            Verdict::Pass => XDP_PASS,
            Verdict::Drop => XDP_DROP,
        }
    }
}

/// What the parser and the drop log need from a packet, whichever hook it
/// came in on: the bytes in place, a copying read for offsets the verifier
/// cannot bound, and the interface it arrived on.
trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Copies a `T` at `offset` through the hook's load-bytes helper.
    fn copy<T: Copy>(&self, offset: usize) -> Option<T>;
    fn ifindex(&self) -> u32;
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn copy<T: Copy>(&self, offset: usize) -> Option<T> {
        // bpf_skb_load_bytes: also reaches paged (non-linear) data.
        self.load::<T>(offset).ok()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context is a valid __sk_buff for this program.
        unsafe { (*self.skb.skb).ifindex }
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn copy<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes into
        // `value` or fails; the context is a valid xdp_md. Linux 5.18+,
        // which `load --hook xdp` checks for before loading this program.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                offset as u32,
                value.as_mut_ptr().cast(),
                size_of::<T>() as u32,
            )
        };
        // SAFETY: a zero return means every byte was written.
        (ret == 0).then(|| unsafe { value.assume_init() })
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context is a valid xdp_md for this program.
        unsafe { (*self.ctx).ingress_ifindex }
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// Tags in the packet data. The driver usually strips the outer tag into
/// skb metadata before tc runs, so two covers QinQ with or without offload.
const MAX_VLAN_TAGS: usize = 2;

const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// A longer chain of IPv6 extension headers is dropped as unparseable
/// rather than let through unclassified (fail closed).
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Direct packet reads only below this offset (verifier bound); headers
/// further in (long IPv6 extension chains) go through bpf_skb_load_bytes.
const MAX_DIRECT_OFFSET: usize = 1024;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Bytes of the TCP header we read: ports (4) .. flags (offset 13).
const TCP_NEEDED: usize = 14;
/// Bytes of the UDP header we read: the ports.
const UDP_NEEDED: usize = 4;

/// An address as four 32-bit words in packet byte order (IPv4: word 0,
/// the rest zero): kept in words, not bytes, so masking it and building
/// map keys from it are word loads and stores. As bytes ([u8; 16], map keys
/// and events) it is the same memory ([`bytes`]).
type Addr = [u32; 4];

#[inline(always)]
fn bytes(addr: Addr) -> [u8; 16] {
    // SAFETY: same size, every bit pattern valid; the bytes are the words'
    // memory, so in packet order.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(addr) }
}

/// The fields of a TCP/UDP packet that dockwall decides on.
struct Packet {
    family: u8,
    proto: u8,
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

enum Parsed {
    Packet(Packet),
    /// Not TCP or UDP over IP (ARP, ICMP, ESP, ...).
    NotInScope,
    /// A fragment other than the first: no transport header to look at.
    Fragment,
    /// Truncated or invalid headers.
    Malformed,
}

#[classifier]
pub fn dw_ingress(ctx: TcContext) -> i32 {
    let (counter, verdict) = ingress_verdict(&ctx);
    count(counter);
    verdict.tc()
}

/// The same decision as `dw_ingress`, as native XDP: a denied SYN is dropped
/// before the kernel allocates an skb for it.
#[xdp]
pub fn dw_xdp(ctx: XdpContext) -> u32 {
    let (counter, verdict) = ingress_verdict(&ctx);
    count(counter);
    verdict.xdp()
}

#[classifier]
pub fn dw_egress(ctx: TcContext) -> i32 {
    if let Parsed::Packet(pkt) = parse(&ctx)
        && pkt.proto == PROTO_UDP
    {
        note_udp_flow(&pkt);
    }
    TC_PASS
}

/// Returns at once: what a tc program costs before it does anything. Only
/// the benchmark loads it, as the floor dockwall's cost is measured against.
#[classifier]
pub fn dw_noop(_ctx: TcContext) -> i32 {
    TC_PASS
}

/// Drops everything: the whole-path benchmark's floor for the cost of a
/// drop at tc ingress. Only the benchmark loads it.
#[classifier]
pub fn dw_drop(_ctx: TcContext) -> i32 {
    TC_DROP
}

/// The XDP floors: pass everything, drop everything. Only the benchmark
/// loads them.
#[xdp]
pub fn dw_xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[xdp]
pub fn dw_xdp_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

#[inline(always)]
fn ingress_verdict<F: Frame>(ctx: &F) -> (u32, Verdict) {
    let pkt = match parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::NotInScope => return (stat::NOT_IN_SCOPE, PASS),
        // The first fragment carries the ports and is classified; conntrack
        // reassembles before DNAT, so dropping it drops the whole datagram.
        Parsed::Fragment => return (stat::FRAGMENT, PASS),
        // The kernel would discard it too; we cannot tell what it targets.
        Parsed::Malformed => return (stat::MALFORMED, DROP),
    };
    let Some(policy_port) = published_port(&pkt) else {
        return (stat::NOT_IN_SCOPE, PASS);
    };
    if pkt.proto == PROTO_TCP {
        // Only a bare SYN opens a connection. Replies to connections the host
        // or a container opened always carry ACK. A stray ACK that conntrack
        // picks up mid-stream reaches no socket and is answered with a RST.
        if pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
            return (stat::ESTABLISHED, PASS);
        }
    } else if is_udp_reply(&pkt) {
        return (stat::REPLY, PASS);
    }
    match allowance(&pkt, policy_port) {
        Match::Hit => (stat::ALLOWED, PASS),
        Match::Expired => {
            count(stat::EXPIRED);
            deny(ctx, &pkt, policy_port)
        }
        Match::Miss => deny(ctx, &pkt, policy_port),
    }
}

/// A new connection no allowance lets in: counted per published port and
/// logged, then dropped, or passed in audit mode.
#[inline(always)]
fn deny<F: Frame>(ctx: &F, pkt: &Packet, policy_port: u16) -> (u32, Verdict) {
    // An empty config (never set) is enforcing with no log.
    let config = CONFIG.get(0).copied().unwrap_or_default();
    let audit = config.flags & CONFIG_AUDIT != 0;
    count_port_drop(pkt.proto, policy_port);
    if config.log_rate > 0 {
        log_drop(ctx, pkt, policy_port, audit, config.log_rate);
    }
    if audit {
        (stat::AUDITED, PASS)
    } else {
        (stat::DROPPED, DROP)
    }
}

#[inline(always)]
fn count_port_drop(proto: u8, port: u16) {
    if let Some(count) = PORT_DROPS.get_ptr_mut(port_drop_index(proto, port)) {
        // SAFETY: this CPU's counter, valid for the program's run.
        unsafe { *count += 1 };
    }
}

/// The drop log's clock. The coarse clock reads the time of the last tick
/// (1-10 ms old, well inside the 1 s window) where the full one reads the
/// clock source: ~21 ns less per drop under a flood in a KVM guest
/// (droppath bench), every drop reading it while the budget is spent.
#[inline(always)]
fn log_clock_ns() -> u64 {
    // SAFETY: a read-only global, set once by the loader.
    if unsafe { core::ptr::read_volatile(&COARSE_CLOCK) } != 0 {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        unsafe { bpf_ktime_get_ns() }
    }
}

/// Sends the drop to the daemon unless this CPU's budget for the window is
/// spent; a flood costs a few writes to this CPU's memory per packet, not a
/// ring buffer write.
#[inline(always)]
fn log_drop<F: Frame>(ctx: &F, pkt: &Packet, policy_port: u16, audit: bool, rate: u32) {
    let Some(limit) = LOG_LIMIT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a read-only global, set once by the loader.
    let cpus = unsafe { core::ptr::read_volatile(&LOG_CPUS) }.max(1);
    // Each CPU sends its share of the host's rate, rounded up, so the host
    // sends at most rate + CPUs - 1 a window, and a flood one CPU receives
    // is logged at that CPU's share.
    let share = rate.div_ceil(cpus);
    let now = log_clock_ns();
    // SAFETY: this CPU's slot, valid for the program's run; no other CPU
    // writes it, and the program is not preempted on its CPU.
    let sent = unsafe {
        if now.wrapping_sub((*limit).window_start_ns) >= LOG_WINDOW_NS {
            (*limit).window_start_ns = now;
            (*limit).sent = 0;
        }
        let sent = (*limit).sent;
        (*limit).sent = sent + 1;
        sent
    };
    if sent >= u64::from(share) {
        count(stat::LOG_SUPPRESSED);
        return;
    }
    let event = DropEvent {
        src: bytes(pkt.src),
        dst: bytes(pkt.dst),
        ifindex: ctx.ifindex(),
        sport: pkt.sport,
        dport: pkt.dport,
        policy_port,
        proto: pkt.proto,
        family: pkt.family,
        flags: if audit { EVENT_AUDIT } else { 0 },
        _pad: [0; 3],
    };
    if EVENTS.output::<DropEvent>(&event, 0).is_err() {
        count(stat::LOG_LOST);
    }
}

#[inline(always)]
fn count(counter: u32) {
    if let Some(value) = STATS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { *value += 1 };
    }
}

/// The published port whose allowances decide, if the destination is in scope.
#[inline(always)]
fn published_port(pkt: &Packet) -> Option<u16> {
    // An array slot (inlined by the verifier, no helper call) says which
    // keys exist for this port: none is the common case on a busy host.
    let bits = PORTS.get(u32::from(pkt.dport)).copied().unwrap_or(0);
    let wildcard = bits & scope_bit(pkt.proto, pkt.family, false) != 0;
    let specific = bits & scope_bit(pkt.proto, pkt.family, true) != 0;
    if specific {
        let key = PublishedKey {
            addr: bytes(pkt.dst),
            port: pkt.dport,
            proto: pkt.proto,
            family: pkt.family,
        };
        // SAFETY: the value is copied out at once.
        if let Some(value) = unsafe { PUBLISHED.get(&key) } {
            return Some(value.policy_port);
        }
    }
    if !wildcard {
        return None;
    }
    if !specific {
        // Only Docker's default bind (0.0.0.0 or ::) uses this port: every
        // address of the host, and a host bind is judged by its own port.
        return Some(pkt.dport);
    }
    let key = PublishedKey {
        addr: [0; 16],
        port: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    // SAFETY: the value is copied out at once.
    unsafe { PUBLISHED.get(&key) }.map(|value| value.policy_port)
}

enum Match {
    Hit,
    /// The longest matching entry has lapsed. Its `expires_ns` is the latest
    /// expiry of every allowance covering it (userspace computes that), so
    /// no shorter prefix could still let the source in.
    Expired,
    Miss,
}

#[inline(always)]
fn allowance(pkt: &Packet, policy_port: u16) -> Match {
    let group = allow_group_index(policy_port, pkt.proto, pkt.family);
    // One load of the whole slot: userspace stores it in one atomic write,
    // so this reads the old slot or the new one, never a mix (see
    // AllowLens).
    // SAFETY: the element lives as long as the map; volatile, so the load
    // is one 8-byte load and not split into the bytes used.
    let lens = match ALLOW_LENS.get_ptr(group) {
        Some(word) => AllowLens::from_word(unsafe { core::ptr::read_volatile(word) }),
        None => AllowLens::default(),
    };
    if lens.n != 0 {
        allowance_by_length(pkt, policy_port, &lens)
    } else {
        allowance_in_trie(pkt, policy_port)
    }
}

/// One exact lookup per prefix length the group uses, longest first: the
/// first entry found is the longest matching prefix.
#[inline(always)]
fn allowance_by_length(pkt: &Packet, policy_port: u16, lens: &AllowLens) -> Match {
    let n = usize::from(lens.n);
    // SAFETY: a read-only global, set once by the loader.
    let mirror = unsafe { core::ptr::read_volatile(&MIRROR_ON) } != 0;
    for i in 0..ALLOW_MAX_LENS {
        if i >= n {
            break;
        }
        let len = lens.lens[i];
        let src = masked(pkt.src, len);
        if mirror {
            let probed = if pkt.family == FAMILY_V4 {
                mirror_probe(mirror_key(src[0], policy_port, pkt.proto, len))
            } else {
                mirror6_probe(src, mirror6_meta_key(policy_port, pkt.proto, len))
            };
            match probed {
                Mirrored::Slot(slot) => {
                    count_in_slot(slot);
                    return Match::Hit;
                }
                Mirrored::Absent => continue,
                Mirrored::Unsure => {}
            }
        }
        let key = net_key(pkt, policy_port, len, src);
        // SAFETY: the entry lives for the program's run (RCU).
        if let Some(value) = unsafe { ALLOW_NETS.get(&key) } {
            if lapsed(value) {
                return Match::Expired;
            }
            count_hit(value);
            return Match::Hit;
        }
    }
    Match::Miss
}

/// What the mirror says of a key.
enum Mirrored {
    /// A permanent entry counting in this hit slot, read whole while no
    /// writer touched the bucket: the mirror decides.
    Slot(u32),
    /// Not there, and nothing hashing here is only in the hash map.
    Absent,
    /// Ask the hash map: the bucket is being written, was written while we
    /// read it, or has overflowed; or the entry expires or counts shared.
    Unsure,
}

/// Reads a bucket under its sequence lock `seq` (see `MirrorBucket`):
/// `find` reads the ways between the two reads of `seq` and returns the
/// matching way's field (0: none; `ask`, or a hit slot + 1).
///
/// Volatile: each word read once, in this order (x86-64 keeps loads in
/// program order, see MIRROR_ON). The bucket lives as long as the map;
/// userspace writes it word by word, and the sequence lock tells a torn
/// read.
#[inline(always)]
fn read_bucket(seq: &u64, ask: u64, find: impl FnOnce() -> u64) -> Mirrored {
    // SAFETY: as above.
    let before = unsafe { core::ptr::read_volatile(seq) };
    if before & MIRROR_WRITING != 0 {
        return Mirrored::Unsure;
    }
    let field = find();
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(seq) } != before {
        return Mirrored::Unsure;
    }
    if field == ask {
        Mirrored::Unsure
    } else if field != 0 {
        Mirrored::Slot((field - 1) as u32)
    } else if before & MIRROR_OVERFLOW != 0 {
        Mirrored::Unsure
    } else {
        Mirrored::Absent
    }
}

/// The IPv4 key's bucket in `DW_MIRROR_V4`: a way matches on its tag.
#[inline(always)]
fn mirror_probe(key: u64) -> Mirrored {
    let (index, tag) = mirror_place(key);
    let Some(bucket) = ALLOW_MIRROR.get(index) else {
        return Mirrored::Unsure;
    };
    read_bucket(&bucket.seq, MIRROR_ASK, || {
        // A field, 0 for none, not an Option: LLVM leaves a None's payload
        // register unset, and the verifier refuses reading it on any path.
        // Userspace keeps the used ways first: the first free way ends them.
        for way in &bucket.ways {
            // SAFETY: see read_bucket.
            let way = unsafe { core::ptr::read_volatile(way) };
            let field = mirror_way_field(way);
            if field == 0 || mirror_way_holds(way, tag) {
                return field;
            }
        }
        0
    })
}

/// An IPv6 source masked to a length (`addr`) with its meta key, in
/// `DW_MIRROR_V6`: a way matches on both address words and the meta key.
#[inline(always)]
fn mirror6_probe(addr: Addr, meta_key: u64) -> Mirrored {
    let (hi, lo) = mirror6_words(addr);
    let Some(bucket) = ALLOW_MIRROR6.get(mirror6_bucket(hi, lo, meta_key)) else {
        return Mirrored::Unsure;
    };
    read_bucket(&bucket.seq, MIRROR6_ASK, || {
        for way in &bucket.ways {
            // SAFETY: see read_bucket.
            let meta = unsafe { core::ptr::read_volatile(&way.meta) };
            let field = mirror6_field(meta);
            if field == 0 {
                return 0;
            }
            // SAFETY: see read_bucket.
            if meta & u64::from(u32::MAX) == meta_key
                && unsafe { core::ptr::read_volatile(&way.hi) } == hi
                && unsafe { core::ptr::read_volatile(&way.lo) } == lo
            {
                return field;
            }
        }
        0
    })
}

/// The DW_ALLOW_NETS key of the allowance of
/// `policy_port` for the packet's source masked to `len` bits.
#[inline(always)]
fn net_key(pkt: &Packet, policy_port: u16, len: u8, src: Addr) -> AllowNetKey {
    AllowNetKey {
        prefix_len: ALLOW_KEY_FIXED_BITS + u32::from(len),
        data: AllowKey {
            port: policy_port,
            proto: pkt.proto,
            family: pkt.family,
            addr: bytes(src),
        },
    }
}

/// The first `len` bits of `addr`, the rest zero.
#[inline(always)]
fn masked(addr: Addr, len: u8) -> Addr {
    let mut out = [0u32; 4];
    for (word, out) in out.iter_mut().enumerate() {
        let bits = u32::from(len).saturating_sub(word as u32 * 32).min(32);
        // The mask in host order, then as the word sits in memory.
        let mask = if bits == 0 {
            0
        } else {
            (u32::MAX << (32 - bits)).to_be()
        };
        *out = addr[word] & mask;
    }
    out
}

/// The fallback for a group with more prefix lengths than `AllowLens` holds
/// (and where a group is looked up until userspace lists its lengths, as
/// right after an upgrade from a dockwall that kept every allowance here).
#[inline(always)]
fn allowance_in_trie(pkt: &Packet, policy_port: u16) -> Match {
    let addr_bits: u32 = if pkt.family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        ALLOW_KEY_FIXED_BITS + addr_bits,
        AllowKey {
            port: policy_port,
            proto: pkt.proto,
            family: pkt.family,
            addr: bytes(pkt.src),
        },
    );
    match ALLOW.get(&key) {
        Some(value) if lapsed(value) => Match::Expired,
        Some(value) => {
            count_hit(value);
            Match::Hit
        }
        None => Match::Miss,
    }
}

/// Whether the deciding entry's expiry has passed.
#[inline(always)]
fn lapsed(value: &AllowValue) -> bool {
    value.expires_ns != 0 && unsafe { bpf_ktime_get_boot_ns() } >= value.expires_ns
}

/// Counts a hit of an allowance on this CPU's counter in its slot; one
/// without a slot in the entry, shared.
#[inline(always)]
fn count_hit(value: &AllowValue) {
    if let Some(slot) = value.hit_slot()
        && count_in_slot(slot)
    {
        return;
    }
    count_shared_hit(value);
}

/// Counts a hit on this CPU's counter in `slot`; false for a slot past
/// the map.
#[inline(always)]
fn count_in_slot(slot: u32) -> bool {
    let Some(count) = HIT_COUNTS.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: this CPU's counter, valid for the program's run.
    unsafe { *count += 1 };
    true
}

/// One atomic add to the entry's own counter, which every CPU matching it
/// writes.
#[inline(always)]
fn count_shared_hit(value: &AllowValue) {
    let hits = (&value.hits as *const u64).cast_mut();
    // SAFETY: points into the map value, which lives as long as the entry.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(hits, 1) };
}

#[inline(always)]
fn is_udp_reply(pkt: &Packet) -> bool {
    let key = FlowKey {
        local_addr: bytes(pkt.dst),
        remote_addr: bytes(pkt.src),
        local_port: pkt.dport,
        remote_port: pkt.sport,
        family: pkt.family,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once.
    match unsafe { UDP_FLOWS.get(&key) } {
        Some(last_seen) => {
            let now = unsafe { bpf_ktime_get_ns() };
            now.wrapping_sub(*last_seen) < UDP_FLOW_TIMEOUT_NS
        }
        None => false,
    }
}

#[inline(always)]
fn note_udp_flow(pkt: &Packet) {
    let key = FlowKey {
        local_addr: bytes(pkt.src),
        remote_addr: bytes(pkt.dst),
        local_port: pkt.sport,
        remote_port: pkt.dport,
        family: pkt.family,
        _pad: [0; 3],
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the value is copied out at once.
    if let Some(last_seen) = unsafe { UDP_FLOWS.get(&key) }
        && now.wrapping_sub(*last_seen) < UDP_FLOW_REFRESH_NS
    {
        return;
    }
    // A full LRU evicts the oldest flow; failure here cannot be handled.
    let _ = UDP_FLOWS.insert(&key, &now, 0);
}

#[inline(always)]
fn load<T: Copy, F: Frame>(ctx: &F, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    // Headers almost always sit in the skb's linear area: read them in
    // place, no helper call. The bound on `offset` is for the verifier.
    if offset <= MAX_DIRECT_OFFSET && start + offset + size_of::<T>() <= end {
        // SAFETY: the bytes lie between data and data_end, checked above.
        // A plain read, not `read_unaligned`: the BPF backend splits an
        // unaligned read into byte loads (a u32 address took four loads
        // and shifts, and every key built from it as many stores). The
        // kernel allows unaligned packet loads where the CPU does them
        // (x86-64, arm64: CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS), which
        // is where dockwall's eBPF filter runs; a kernel that enforces
        // alignment would refuse the program as a misaligned packet access.
        return Some(unsafe { core::ptr::read((start + offset) as *const T) });
    }
    // Paged or short: the helper copies across fragments, or fails.
    ctx.copy::<T>(offset)
}

/// A read through the load-bytes helper only, for offsets summed from packet
/// bytes (IPv6 extension headers). With a direct read there, the verifiers
/// of Linux 6.12 and older follow an impossible "offset is small" branch
/// with contradictory bounds and refuse the program ("math between pkt
/// pointer and register with unbounded min value").
#[inline(always)]
fn load_copied<T: Copy, F: Frame>(ctx: &F, offset: usize) -> Option<T> {
    ctx.copy::<T>(offset)
}

#[inline(always)]
fn load_be16<F: Frame>(ctx: &F, offset: usize) -> Option<u16> {
    load::<u16, F>(ctx, offset).map(u16::from_be)
}

#[inline(always)]
fn parse<F: Frame>(ctx: &F) -> Parsed {
    let Some(mut ethertype) = load_be16(ctx, 12) else {
        return Parsed::Malformed;
    };
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = load_be16(ctx, offset + 2) else {
            return Parsed::Malformed;
        };
        ethertype = inner;
        offset += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        // More tags than we parse: fail closed.
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Malformed,
        _ => Parsed::NotInScope,
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame>(ctx: &F, l3: usize) -> Parsed {
    // Read as words, so the addresses are word loads (see `load`); the
    // other fields are bytes of the first three words.
    let Some(hdr) = load::<[u32; 5], F>(ctx, l3) else {
        return Parsed::Malformed;
    };
    let [version_ihl, _, len_hi, len_lo] = hdr[0].to_ne_bytes();
    let [_, _, frag_hi, frag_lo] = hdr[1].to_ne_bytes();
    let [_, proto, _, _] = hdr[2].to_ne_bytes();
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    let total_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let frag = u16::from_be_bytes([frag_hi, frag_lo]);
    if frag & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::NotInScope;
    }
    let src = [hdr[3], 0, 0, 0];
    let dst = [hdr[4], 0, 0, 0];
    // total_len 0 is GSO's "see the skb length" (BIG TCP); else the transport
    // fields must lie inside the datagram, not in trailing padding. A first
    // fragment too short to hold them (tiny-fragment attack) fails here.
    let end = if total_len == 0 {
        usize::MAX
    } else {
        l3 + total_len
    };
    if total_len != 0 && total_len < ihl {
        return Parsed::Malformed;
    }
    parse_l4(ctx, l3 + ihl, end, FAMILY_V4, proto, src, dst, true)
}

#[inline(always)]
fn parse_ipv6<F: Frame>(ctx: &F, l3: usize) -> Parsed {
    // Words, as for IPv4.
    let Some(hdr) = load::<[u32; IPV6_HLEN / 4], F>(ctx, l3) else {
        return Parsed::Malformed;
    };
    let [version, ..] = hdr[0].to_ne_bytes();
    let [len_hi, len_lo, next_header, _] = hdr[1].to_ne_bytes();
    if version >> 4 != 6 {
        return Parsed::Malformed;
    }
    let payload_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let mut next = next_header;
    let src = [hdr[2], hdr[3], hdr[4], hdr[5]];
    let dst = [hdr[6], hdr[7], hdr[8], hdr[9]];
    let mut l4 = l3 + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            PROTO_TCP | PROTO_UDP => {
                // payload_len 0: jumbogram / BIG TCP, bounded by the skb.
                let end = if payload_len == 0 {
                    usize::MAX
                } else {
                    l3 + IPV6_HLEN + payload_len
                };
                // Right after the fixed header the offset is small and
                // direct reads verify; after extension headers it is the
                // sum of packet bytes, so copy (see `load_copied`).
                let direct = l4 == l3 + IPV6_HLEN;
                return parse_l4(ctx, l4, end, FAMILY_V6, next, src, dst, direct);
            }
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let Some(ext) = load_copied::<[u8; 2], F>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                l4 += (usize::from(ext[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let Some(ext) = load_copied::<[u8; 2], F>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                l4 += (usize::from(ext[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let Some(ext) = load_copied::<[u8; 4], F>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Parsed::Fragment;
                }
                next = ext[0];
                l4 += 8;
            }
            // ICMPv6, ESP, no next header, ...: no ports to filter on.
            _ => return Parsed::NotInScope,
        }
    }
    Parsed::Malformed
}

#[inline(always)]
fn parse_l4<F: Frame>(
    ctx: &F,
    l4: usize,
    end: usize,
    family: u8,
    proto: u8,
    src: Addr,
    dst: Addr,
    direct: bool,
) -> Parsed {
    let read = |offset| {
        if direct {
            load::<[u8; TCP_NEEDED], F>(ctx, offset)
        } else {
            load_copied::<[u8; TCP_NEEDED], F>(ctx, offset)
        }
    };
    let read_udp = |offset| {
        if direct {
            load::<[u8; UDP_NEEDED], F>(ctx, offset)
        } else {
            load_copied::<[u8; UDP_NEEDED], F>(ctx, offset)
        }
    };
    let needed = if proto == PROTO_TCP {
        TCP_NEEDED
    } else {
        UDP_NEEDED
    };
    if l4 + needed > end {
        return Parsed::Malformed;
    }
    let (ports, tcp_flags) = if proto == PROTO_TCP {
        let Some(hdr) = read(l4) else {
            return Parsed::Malformed;
        };
        ([hdr[0], hdr[1], hdr[2], hdr[3]], hdr[13])
    } else {
        let Some(hdr) = read_udp(l4) else {
            return Parsed::Malformed;
        };
        (hdr, 0)
    };
    Parsed::Packet(Packet {
        family,
        proto,
        src,
        dst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        tcp_flags,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
