//! Types and names shared by the dockwall kernel program and its loader.
//!
//! Everything here is `#[repr(C)]` and laid out by hand without implicit
//! padding, because the same bytes are written by userspace and read by the
//! eBPF program. With the `user` feature the types implement `aya::Pod` so
//! they can be used as map keys and values.
#![no_std]

/// Program names, as the kernel and the ELF object know them (max 15 bytes).
pub const PROG_INGRESS: &str = "dw_ingress";
pub const PROG_EGRESS: &str = "dw_egress";
/// Does nothing; never attached. The benchmark's cost floor.
pub const PROG_NOOP: &str = "dw_noop";
/// Drops everything; never attached by dockwall. The whole-path benchmark's
/// floor for the drop path.
pub const PROG_DROP: &str = "dw_drop";
/// The ingress decision as native XDP (`load --hook xdp`).
pub const PROG_XDP: &str = "dw_xdp";
/// XDP floors for the benchmark: pass everything, drop everything.
pub const PROG_XDP_PASS: &str = "dw_xdp_pass";
pub const PROG_XDP_DROP: &str = "dw_xdp_drop";

/// Map names (max 15 bytes: the kernel truncates object names to 16 with NUL).
pub const MAP_PUBLISHED: &str = "DW_PUBLISHED";
/// The allowances of every (published port, protocol, family) whose
/// prefix lengths do not fit [`AllowLens`]: an LPM trie, the fallback
/// lookup. Also what an older dockwall kept every allowance in.
pub const MAP_ALLOW: &str = "DW_ALLOW";
/// Per (published port, protocol, family), at [`allow_group_index`]: the
/// prefix lengths its allowances use, longest first ([`AllowLens`]). A
/// zero slot (the default): that group's allowances, if any, are in the
/// trie (`MAP_ALLOW`).
pub const MAP_ALLOW_LENS: &str = "DW_GROUP_LENS";
/// `MAP_ALLOW_LENS` of the dockwall before it, written with
/// `bpf_map_update_elem`, whose copy of the 8-byte slot is not one store:
/// its pin is removed, never reused (the new one is `BPF_F_MMAPABLE`, and
/// userspace stores each slot in one atomic write).
pub const LEGACY_MAPS_LENS: [&str; 1] = ["DW_ALLOW_LENS"];
/// The allowances of the groups `MAP_ALLOW_LENS` lists, one exact-match
/// entry per allowance ([`AllowNetKey`] -> [`AllowValue`]).
pub const MAP_ALLOW_NETS: &str = "DW_ALLOW_NETS";
/// The allowances' hit counters: a per-CPU array of u64, indexed by the
/// slot userspace gives each allowance and writes into its value
/// ([`AllowValue::hit_slot`]), so a hit is an array load on this CPU, not a
/// hash lookup. Userspace sums the CPUs and adds [`AllowValue::count`].
pub const MAP_HIT_COUNTS: &str = "DW_HIT_COUNTS";
/// Which slots of `MAP_HIT_COUNTS` are taken: a bitmap in
/// [`HitSlotWords`] elements, kept beside the maps (and gone with them) so
/// an edit allocates a slot without reading every allowance. Only
/// userspace reads or writes it; a full sync rebuilds it from the
/// allowances.
pub const MAP_HIT_SLOTS: &str = "DW_HIT_SLOTS";
/// A copy of the IPv4 entries of `MAP_ALLOW_NETS` that the kernel reads
/// without a helper call: an array of [`MirrorBucket`]s, each holding up
/// to [`MIRROR_WAYS`] entries whose key hashes to it ([`mirror_bucket`]),
/// written by userspace through a shared mapping (`BPF_F_MMAPABLE`). The
/// kernel probes it first; the hash map stays the whole truth, read where
/// a bucket is being written or has overflowed, or an entry says so.
pub const MAP_ALLOW_MIRROR: &str = "DW_MIRROR_V4";
/// The IPv6 entries of `MAP_ALLOW_NETS` again, as [`MAP_ALLOW_MIRROR`]
/// holds the IPv4 ones: [`Mirror6Bucket`]s of two three-word ways, under
/// the same sequence lock.
pub const MAP_ALLOW_MIRROR6: &str = "DW_MIRROR_V6";
/// The mirror of the dockwall before it (three two-word ways a bucket),
/// the same size and value size as `MAP_ALLOW_MIRROR`: a pin of it is
/// removed, never reused, as a program reading one layout in a map
/// written in the other would misread it.
pub const LEGACY_MAPS_MIRROR: [&str; 1] = ["DW_ALLOW_MIRROR"];
/// The hit counters of older dockwalls: a per-CPU hash keyed by
/// [`AllowNetKey`], the kernel creating an entry on an allowance's first
/// hit, and where one of them set its unpreallocated map aside. `load`
/// adds their counts into the allowances' slots and removes them.
pub const LEGACY_MAPS_ALLOW_HITS: [&str; 2] = ["DW_ALLOW_HITS", "DW_ALLOW_HITS_UNPREALLOCATED"];
pub const MAP_UDP_FLOWS: &str = "DW_UDP_FLOWS";
pub const MAP_STATS: &str = "DW_STATS";
/// Per destination port (65,536 bytes): which kinds of `MAP_PUBLISHED` keys
/// exist for it ([`scope_bit`]), so most packets are judged without a hash
/// lookup.
pub const MAP_PORTS: &str = "DW_PORTS";
/// One [`Config`]: audit mode and the drop-log rate, set by `load`.
pub const MAP_CONFIG: &str = "DW_CONFIG";
/// Drops (or would-be drops in audit mode) per published port: a per-CPU
/// array of u64 at [`port_drop_index`] (summed by userspace), so CPUs
/// dropping a flood in parallel write no shared counter, and a drop costs
/// an array load, not a hash lookup.
pub const MAP_PORT_DROPS: &str = "DW_DROP_COUNTS";
/// The per-port drop counters of older dockwalls, each replaced by the
/// next: one shared u64 a port (a hash), then a per-CPU hash keyed by
/// [`PortKey`]. A pin by one of these names is an older load's, removed on
/// load; the counts start again from zero.
pub const LEGACY_MAPS_PORT_DROPS: [&str; 2] = ["DW_PORT_DROPS", "DW_PCPU_DROPS"];
/// Ring buffer of [`DropEvent`]s for the daemon's drop log. Not pinned: it
/// belongs to the program that writes it and the daemon that reads it.
pub const MAP_EVENTS: &str = "DW_EVENTS";
/// The drop log's rate limiter, one [`LogLimit`] per CPU. Not pinned.
pub const MAP_LOG_LIMIT: &str = "DW_LOG_LIMIT";

/// The object's read-only global holding the CPUs online at load, which
/// share the drop-log rate; set by the loader.
pub const GLOBAL_LOG_CPUS: &str = "LOG_CPUS";
/// The object's read-only global saying the kernel has
/// `bpf_ktime_get_coarse_ns` (Linux 5.11): 1 or 0, set by the loader.
pub const GLOBAL_COARSE_CLOCK: &str = "COARSE_CLOCK";
/// The object's read-only global saying the kernel reads
/// `MAP_ALLOW_MIRROR` and `MAP_ALLOW_MIRROR6` (1 on x86-64) or only the
/// hash map (0).
pub const GLOBAL_MIRROR_ON: &str = "MIRROR_ON";

/// Every pinned map, for pinning and unpinning in one place. The state that
/// must outlive a daemon restart: policy, flows, counters, configuration.
pub const ALL_MAPS: [&str; 13] = [
    MAP_PUBLISHED,
    MAP_PORTS,
    MAP_ALLOW,
    MAP_ALLOW_LENS,
    MAP_ALLOW_NETS,
    MAP_ALLOW_MIRROR,
    MAP_ALLOW_MIRROR6,
    MAP_HIT_COUNTS,
    MAP_HIT_SLOTS,
    MAP_UDP_FLOWS,
    MAP_STATS,
    MAP_CONFIG,
    MAP_PORT_DROPS,
];

pub const PUBLISHED_MAX_ENTRIES: u32 = 65_536;
pub const ALLOW_MAX_ENTRIES: u32 = 1 << 20;
/// `MAP_ALLOW_LENS` slots: one per (port, TCP|UDP, IPv4|IPv6).
pub const ALLOW_GROUPS: u32 = 4 * 65_536;
/// Distinct prefix lengths a group may use and still be looked up by
/// length (one hash probe each, longest first); a group with more is
/// looked up in the trie.
pub const ALLOW_MAX_LENS: usize = 7;
/// Allowances whose hits are counted per CPU: the slots of
/// `MAP_HIT_COUNTS`, 1 MiB a CPU. An allowance userspace finds no free
/// slot for counts in its shared `AllowValue::hits`.
pub const HIT_SLOTS: u32 = 1 << 17;
/// Slots one `MAP_HIT_SLOTS` element covers, a bit each.
pub const HIT_SLOTS_PER_WORDS: u32 = 64 * HIT_SLOT_WORDS as u32;
const HIT_SLOT_WORDS: usize = 512;
/// `MAP_HIT_SLOTS` elements.
pub const HIT_SLOT_ELEMENTS: u32 = HIT_SLOTS / HIT_SLOTS_PER_WORDS;
pub const UDP_FLOWS_MAX_ENTRIES: u32 = 65_536;
/// One counter per (port, TCP or UDP): [`port_drop_index`]. 1 MiB a CPU.
pub const PORT_DROPS_MAX_ENTRIES: u32 = 2 * 65_536;

/// Where `MAP_PORT_DROPS` counts drops of (`proto`, `port`): TCP's ports
/// first, then UDP's. Only TCP and UDP ports are published.
#[inline(always)]
pub fn port_drop_index(proto: u8, port: u16) -> u32 {
    let base = if proto == PROTO_UDP { 65_536 } else { 0 };
    base + u32::from(port)
}
/// Drop-log ring buffer size: 4096 events of 48 bytes (plus headers) queue
/// while the daemon is busy; more are lost and counted.
pub const EVENTS_BYTE_SIZE: u32 = 256 * 1024;
/// Default drop-log events per second for the whole host (`--log-rate`).
pub const DEFAULT_LOG_RATE: u32 = 20;
/// The rate limiter's window.
pub const LOG_WINDOW_NS: u64 = 1_000_000_000;

/// An outbound UDP flow counts as open this long after its last packet; the
/// same as conntrack's `nf_conntrack_udp_timeout_stream` default.
pub const UDP_FLOW_TIMEOUT_NS: u64 = 120 * 1_000_000_000;
/// The egress program rewrites a flow's timestamp at most this often, so a
/// busy outbound UDP stream costs a lookup, not a map update, per packet.
pub const UDP_FLOW_REFRESH_NS: u64 = 1_000_000_000;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Bits of `AllowKey` before the address: port (16), proto (8), family (8).
/// An allowance for `a.b.c.d/n` has LPM prefix length `ALLOW_KEY_FIXED_BITS + n`.
pub const ALLOW_KEY_FIXED_BITS: u32 = 32;

/// Where a published port can be reached: (host address, protocol, port).
/// `addr` is all zero for Docker's wildcard binds (0.0.0.0 and ::); an IPv4
/// address is stored in the first four bytes, the rest zero.
///
/// The same map also holds each published container endpoint (container
/// address, protocol, container port), so a connection routed straight to a
/// container is judged by the allowances of the port that publishes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishedKey {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// The bit of a `MAP_PORTS` entry saying that `MAP_PUBLISHED` holds a key
/// for this port, protocol and family: a wildcard host bind (`specific`
/// false) or a specific host address or container endpoint (`specific`).
///
/// A port with only the wildcard bit needs no lookup at all: a host bind's
/// policy port is the port itself. A port with no bit is out of scope.
/// Userspace sets bits before it adds keys and clears them after it removes
/// them, so a stale bit only ever costs a lookup or errs toward filtering.
pub const fn scope_bit(proto: u8, family: u8, specific: bool) -> u8 {
    let mut shift = 0;
    if proto == PROTO_UDP {
        shift += 4;
    }
    if family == FAMILY_V6 {
        shift += 2;
    }
    if specific {
        shift += 1;
    }
    1 << shift
}

/// What a published port or container endpoint leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishedValue {
    /// Host byte order. Kept for debugging with bpftool.
    pub container_port: u16,
    /// The published (host) port whose allowances decide, host byte order.
    pub policy_port: u16,
    pub _pad: [u8; 4],
}

/// The data part of an allowance's LPM trie key. The fixed fields come first
/// so that a prefix length of `ALLOW_KEY_FIXED_BITS + n` matches the port,
/// protocol and family exactly and the first `n` bits of the source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowKey {
    /// Published (host) port, host byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    /// Source address; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

/// The `MAP_ALLOW_LENS` slot of a published port's allowances for one
/// protocol and family.
#[inline(always)]
pub fn allow_group_index(port: u16, proto: u8, family: u8) -> u32 {
    (u32::from(port) << 2) | (u32::from(proto == PROTO_UDP) << 1) | u32::from(family == FAMILY_V6)
}

/// The prefix lengths (of the address, 0..=128) a group's allowances use,
/// longest first: `lens[..n]`. The kernel probes `MAP_ALLOW_NETS` once per
/// length and the first hit decides, which is the longest prefix match.
/// `n == 0`: the group is looked up in the trie.
///
/// Eight bytes, one word: userspace stores a slot with one atomic write
/// through a shared mapping of the map, and the kernel reads it with one
/// load ([`AllowLens::from_word`]). A mix of an old and a new slot's bytes
/// could list a length neither lists (a 0 from an empty slot), or an old
/// count over new lengths, and miss an allowance both grant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowLens {
    pub n: u8,
    pub lens: [u8; ALLOW_MAX_LENS],
}

impl AllowLens {
    /// The slot as the word it is stored as.
    #[inline(always)]
    pub const fn to_word(self) -> u64 {
        let l = self.lens;
        u64::from_ne_bytes([self.n, l[0], l[1], l[2], l[3], l[4], l[5], l[6]])
    }

    /// The slot a stored word holds.
    #[inline(always)]
    pub const fn from_word(word: u64) -> Self {
        let b = word.to_ne_bytes();
        AllowLens {
            n: b[0],
            lens: [b[1], b[2], b[3], b[4], b[5], b[6], b[7]],
        }
    }
}

/// Key of `MAP_ALLOW_NETS`: byte for byte the LPM trie's key of the same
/// allowance (prefix length `ALLOW_KEY_FIXED_BITS + n`, then the data), with
/// the address's bits past the prefix zero, so an exact lookup of a
/// source's masked address finds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowNetKey {
    pub prefix_len: u32,
    pub data: AllowKey,
}

/// Per-allowance state kept by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowValue {
    /// Where the allowance's hits are counted, and a tag:
    ///
    /// - bit 55 set ([`AllowValue::counted_in_slot`]): bits 32..55 are the
    ///   allowance's slot in `MAP_HIT_COUNTS`, where the kernel counts its
    ///   hits on the CPU that matched; the low 32 bits a shared count (only
    ///   for a slot past the map, which userspace never writes);
    /// - bit 55 clear: the low 55 bits are a count shared by every CPU (one
    ///   atomic add a hit): an allowance userspace had no slot for, or one
    ///   an older dockwall wrote, until a sync gives it a slot and carries
    ///   the count into it;
    /// - in the trie (`MAP_ALLOW`), the top byte is the entry's address
    ///   prefix length plus one ([`AllowValue::in_trie`]). An LPM lookup
    ///   does not say which entry answered; the tag lets userspace tell an
    ///   exact hit from a covering prefix. 0 in a hash entry.
    ///
    /// A shared count cannot reach the bits above it: 2^32 hits of an
    /// allowance with a slot past the map, 2^55 of one without a slot.
    pub hits: u64,
    /// `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`) from which the
    /// entry no longer matches; 0 = never. The kernel checks it on every
    /// match, so an allowance lapses on time with no daemon running. Boot
    /// time, not monotonic: it keeps counting while the host is suspended.
    pub expires_ns: u64,
}

/// Where the trie tag sits in `AllowValue::hits`.
pub const TRIE_TAG_SHIFT: u32 = 56;
const TAG_MASK: u64 = 0xff << TRIE_TAG_SHIFT;
/// `AllowValue::hits`: the allowance counts in its slot.
const SLOT_FLAG: u64 = 1 << 55;
const SLOT_SHIFT: u32 = 32;
const SLOT_MASK: u64 = (1 << 23) - 1;
const SHARED_MASK: u64 = SLOT_FLAG - 1;
const SLOTTED_SHARED_MASK: u64 = (1 << SLOT_SHIFT) - 1;

impl AllowValue {
    /// An allowance counted per CPU in `slot` of `MAP_HIT_COUNTS`.
    #[inline(always)]
    pub const fn counted_in_slot(slot: u32, expires_ns: u64) -> Self {
        AllowValue {
            hits: SLOT_FLAG | ((slot as u64 & SLOT_MASK) << SLOT_SHIFT),
            expires_ns,
        }
    }

    /// An allowance counted in this value, by every CPU, from `count`.
    #[inline(always)]
    pub const fn counted_shared(count: u64, expires_ns: u64) -> Self {
        AllowValue {
            hits: count & SHARED_MASK,
            expires_ns,
        }
    }

    /// The same value as a trie entry of address prefix length
    /// `prefix_len` (0..=128): tagged with it.
    #[inline(always)]
    pub const fn in_trie(self, prefix_len: u8) -> Self {
        AllowValue {
            hits: (self.hits & !TAG_MASK) | ((prefix_len as u64 + 1) << TRIE_TAG_SHIFT),
            expires_ns: self.expires_ns,
        }
    }

    /// The same value as a hash entry: no tag.
    #[inline(always)]
    pub const fn untagged(self) -> Self {
        AllowValue {
            hits: self.hits & !TAG_MASK,
            expires_ns: self.expires_ns,
        }
    }

    /// The allowance's slot in `MAP_HIT_COUNTS`, if it counts in one.
    #[inline(always)]
    pub const fn hit_slot(&self) -> Option<u32> {
        if self.hits & SLOT_FLAG == 0 {
            None
        } else {
            Some(((self.hits >> SLOT_SHIFT) & SLOT_MASK) as u32)
        }
    }

    /// The hits counted in this value, shared by the CPUs (without a slot's
    /// per-CPU counts, the slot or a trie entry's tag).
    #[inline(always)]
    pub const fn count(&self) -> u64 {
        if self.hits & SLOT_FLAG == 0 {
            self.hits & SHARED_MASK
        } else {
            self.hits & SLOTTED_SHARED_MASK
        }
    }

    /// A trie entry's address prefix length, from its tag; `None` for an
    /// untagged value.
    #[inline(always)]
    pub const fn trie_prefix_len(&self) -> Option<u8> {
        match (self.hits >> TRIE_TAG_SHIFT) as u8 {
            0 => None,
            tag => Some(tag - 1),
        }
    }
}

/// `MAP_ALLOW_MIRROR` buckets: 16 MiB, room for 1.8M entries. At 1M IPv4
/// allowances (a mean of 3.8 a bucket) about 4 % of buckets overflow and
/// 1.7 % of entries are in the hash map only; at 100k, none.
pub const MIRROR_BUCKETS: u32 = 1 << MIRROR_BUCKET_BITS;
const MIRROR_BUCKET_BITS: u32 = 18;
/// Entries a bucket holds: a word each, after its header, in one 64-byte
/// cache line.
pub const MIRROR_WAYS: usize = 7;
/// `MirrorBucket::seq`: a writer is changing the bucket.
pub const MIRROR_WRITING: u64 = 1;
/// `MirrorBucket::seq`: an entry hashing here did not fit: a key not found
/// in the bucket may still be in the hash map.
pub const MIRROR_OVERFLOW: u64 = 1 << 63;
/// `MirrorBucket::seq`: one write's step of the version.
pub const MIRROR_SEQ_STEP: u64 = 2;

/// One bucket of `MAP_ALLOW_MIRROR`, a cache line.
///
/// `seq` is a sequence lock with flags: the writer (userspace, one at a
/// time: it holds the writer's lock) sets [`MIRROR_WRITING`], changes the
/// ways, then clears it and adds [`MIRROR_SEQ_STEP`]. The kernel reads
/// `seq`, the ways, then `seq` again, and trusts what it read only if both
/// reads are equal and not writing; otherwise it asks the hash map. A
/// writer killed mid-write leaves the bucket marked writing: the kernel
/// asks the hash map for it until the next full sync.
///
/// Each way is one word ([`mirror_way`]), so a reader sees it whole. The
/// used ways come first (userspace keeps a bucket packed), so the kernel
/// stops at the first free way: a miss in a bucket of one entry reads two.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorBucket {
    pub seq: u64,
    pub ways: [u64; MIRROR_WAYS],
}

/// The mirror key of an IPv4 allowance: the source address masked to
/// `len` bits, as its four bytes sit in the packet read as a native u32
/// (`addr_word`), then the published port, the protocol, the length and a
/// bit that makes every key non-zero.
#[inline(always)]
pub const fn mirror_key(addr_word: u32, port: u16, proto: u8, len: u8) -> u64 {
    ((addr_word as u64) << 32)
        | ((port as u64) << 16)
        | ((proto as u64) << 8)
        | ((len as u64) << 1)
        | 1
}

const FMIX_C1: u64 = 0xff51_afd7_ed55_8ccd;
const FMIX_C2: u64 = 0xc4ce_b9fe_1a85_ec53;

/// A key mixed (MurmurHash3's 64-bit finalizer): every bit of the key
/// moves every bit of the hash, and no two keys share one (each step is
/// invertible), so a bucket and the hash's remaining bits name the key.
#[inline(always)]
pub const fn mirror_hash(key: u64) -> u64 {
    let mut h = key;
    h ^= h >> 33;
    h = h.wrapping_mul(FMIX_C1);
    h ^= h >> 33;
    h = h.wrapping_mul(FMIX_C2);
    h ^= h >> 33;
    h
}

/// The inverse of an odd number modulo 2^64 (Newton's iteration; each
/// step doubles the bits that are right).
const fn inverse_mod_2_64(c: u64) -> u64 {
    let mut x = c;
    let mut i = 0;
    while i < 6 {
        x = x.wrapping_mul(2u64.wrapping_sub(c.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// The key of a hash: [`mirror_hash`] undone (userspace, reading the
/// mirror back).
pub const fn mirror_unhash(h: u64) -> u64 {
    let mut k = h;
    k ^= k >> 33;
    k = k.wrapping_mul(inverse_mod_2_64(FMIX_C2));
    k ^= k >> 33;
    k = k.wrapping_mul(inverse_mod_2_64(FMIX_C1));
    k ^= k >> 33;
    k
}

/// A way's tag: the hash's bits below the bucket's.
const MIRROR_TAG_BITS: u32 = 64 - MIRROR_BUCKET_BITS;
const MIRROR_TAG_MASK: u64 = (1 << MIRROR_TAG_BITS) - 1;
/// A way's field above its tag (18 bits): 0 a free way, this an entry the
/// kernel must look up in the hash map (it expires, or counts its hits
/// shared), any other the hit slot + 1 of a permanent entry.
pub const MIRROR_ASK: u64 = (1 << (64 - MIRROR_TAG_BITS)) - 1;
const _: () = assert!((HIT_SLOTS as u64) < MIRROR_ASK);
const _: () = assert!((HIT_SLOTS as u64) < MIRROR6_ASK);

/// Where a mirror key lives, from one hash: its bucket (the hash's top
/// bits) and the tag its way holds there (the rest).
#[inline(always)]
pub const fn mirror_place(key: u64) -> (u32, u64) {
    let h = mirror_hash(key);
    ((h >> MIRROR_TAG_BITS) as u32, h & MIRROR_TAG_MASK)
}

/// The bucket a mirror key lives in.
#[inline(always)]
pub const fn mirror_bucket(key: u64) -> u32 {
    mirror_place(key).0
}

/// The tag a way holds for `key` in its bucket.
#[inline(always)]
pub const fn mirror_tag(key: u64) -> u64 {
    mirror_place(key).1
}

/// The way word of `key`: its tag, and above it the hit slot of a
/// permanent entry (`Some`), or [`MIRROR_ASK`] (`None`).
pub const fn mirror_way(key: u64, slot: Option<u32>) -> u64 {
    let field = match slot {
        Some(slot) => slot as u64 + 1,
        None => MIRROR_ASK,
    };
    (field << MIRROR_TAG_BITS) | mirror_tag(key)
}

/// A way word's field: 0 free, [`MIRROR_ASK`], or a hit slot + 1.
#[inline(always)]
pub const fn mirror_way_field(way: u64) -> u64 {
    way >> MIRROR_TAG_BITS
}

/// Whether way word `way` holds the entry of tag `tag`.
#[inline(always)]
pub const fn mirror_way_holds(way: u64, tag: u64) -> bool {
    way & MIRROR_TAG_MASK == tag && mirror_way_field(way) != 0
}

/// The key a used way of bucket `bucket` holds.
pub const fn mirror_way_key(bucket: u32, way: u64) -> u64 {
    mirror_unhash(((bucket as u64) << MIRROR_TAG_BITS) | (way & MIRROR_TAG_MASK))
}

/// IPv6 entries a [`Mirror6Bucket`] holds.
pub const MIRROR6_WAYS: usize = 2;

/// One bucket of `MAP_ALLOW_MIRROR6`, a cache line: `seq` as in
/// [`MirrorBucket`], then the used ways first (a free way's `meta` is 0).
/// A way is three words, so only the sequence lock makes a read whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mirror6Bucket {
    pub seq: u64,
    pub ways: [Mirror6Way; MIRROR6_WAYS],
    pub _pad: u64,
}

/// One mirrored IPv6 allowance: the masked address as two words (the
/// packet's four native-endian 32-bit words, high pairs first), and
/// [`mirror6_meta`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mirror6Way {
    pub hi: u64,
    pub lo: u64,
    pub meta: u64,
}

/// An IPv6 way's field above its 32-bit meta key that says "ask the hash
/// map" (its entry expires, or counts shared); 0 is a free way, any other
/// the hit slot + 1.
pub const MIRROR6_ASK: u64 = u32::MAX as u64;

/// The low half of an IPv6 way's `meta`: port, protocol and length.
#[inline(always)]
pub const fn mirror6_meta_key(port: u16, proto: u8, len: u8) -> u64 {
    ((port as u64) << 16) | ((proto as u64) << 8) | len as u64
}

/// A way's `meta`: the meta key, and above it the hit slot + 1 of a
/// permanent entry (`Some`), or [`MIRROR6_ASK`] (`None`).
pub const fn mirror6_meta(meta_key: u64, slot: Option<u32>) -> u64 {
    let field = match slot {
        Some(slot) => slot as u64 + 1,
        None => MIRROR6_ASK,
    };
    (field << 32) | meta_key
}

/// An IPv6 way's field: 0 free, [`MIRROR6_ASK`], or a hit slot + 1.
#[inline(always)]
pub const fn mirror6_field(meta: u64) -> u64 {
    meta >> 32
}

/// The two address words of an IPv6 way, from the packet's four.
#[inline(always)]
pub const fn mirror6_words(addr: [u32; 4]) -> (u64, u64) {
    (
        ((addr[0] as u64) << 32) | addr[1] as u64,
        ((addr[2] as u64) << 32) | addr[3] as u64,
    )
}

/// The bucket of an IPv6 entry: both address words and the meta key,
/// mixed, its top bits (as [`mirror_bucket`]).
#[inline(always)]
pub const fn mirror6_bucket(hi: u64, lo: u64, meta_key: u64) -> u32 {
    (mirror_hash(hi ^ mirror_hash(lo ^ meta_key)) >> MIRROR_TAG_BITS) as u32
}

/// One element of `MAP_HIT_SLOTS`: a bit per slot, slot `s` of the
/// element at `s / HIT_SLOTS_PER_WORDS` in word `s % HIT_SLOTS_PER_WORDS /
/// 64`, bit `s % 64`. 1: taken.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HitSlotWords {
    pub words: [u64; HIT_SLOT_WORDS],
}

impl Default for HitSlotWords {
    fn default() -> Self {
        HitSlotWords {
            words: [0; HIT_SLOT_WORDS],
        }
    }
}

/// `Config::flags`: count and log would-be drops, drop nothing (`load --audit`).
pub const CONFIG_AUDIT: u32 = 1;

/// Settings of the loaded filter, the only entry of `MAP_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    /// Drop-log events per second for the whole host; 0 logs none. Each of
    /// the CPUs online at load sends at most its share, rounded up.
    pub log_rate: u32,
}

/// A published port and its protocol, as userspace reports drops
/// ([`port_drop_index`] is where the kernel counts them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Published (host) port, host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `DropEvent::flags`: the connection was let through (audit mode).
pub const EVENT_AUDIT: u8 = 1;

/// One dropped (or, in audit mode, would-be dropped) new connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ifindex: u32,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// The published port whose allowances decided.
    pub policy_port: u16,
    pub proto: u8,
    pub family: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// The drop log's limiter, one per CPU: at most `Config::log_rate` divided
/// by the CPUs online at load (rounded up) events per window on each CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLimit {
    pub window_start_ns: u64,
    pub sent: u64,
}

/// An outbound UDP flow as seen at egress (after masquerading): the local
/// side is this host. A datagram arriving with the mirrored addresses and
/// ports is a reply and is never filtered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Indexes of the per-CPU verdict counters in `MAP_STATS`.
pub mod stat {
    /// New connection to a published port, let through by an allowance.
    pub const ALLOWED: u32 = 0;
    /// New connection to a published port that no allowance matched.
    pub const DROPPED: u32 = 1;
    /// Not a TCP/UDP packet to a published port: passed untouched.
    pub const NOT_IN_SCOPE: u32 = 2;
    /// TCP segment of an existing connection (no SYN, or SYN+ACK).
    pub const ESTABLISHED: u32 = 3;
    /// UDP reply to a flow this host or a container opened.
    pub const REPLY: u32 = 4;
    /// IPv4/IPv6 non-first fragment: carries no ports, passed (see README).
    pub const FRAGMENT: u32 = 5;
    /// Malformed or unparseable IP packet: dropped (see README).
    pub const MALFORMED: u32 = 6;
    /// Audit mode: a new connection `DROPPED` would count, let through.
    pub const AUDITED: u32 = 7;
    /// Not a verdict: of the dropped (or audited) ones, those whose best
    /// matching allowance had expired.
    pub const EXPIRED: u32 = 8;
    /// Not a verdict: drop-log events the rate limit suppressed.
    pub const LOG_SUPPRESSED: u32 = 9;
    /// Not a verdict: drop-log events lost because the ring buffer was full.
    pub const LOG_LOST: u32 = 10;
    /// Indexes below this are verdicts: every packet counts in exactly one.
    pub const VERDICTS: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 12;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and byte
    // arrays, and have no implicit padding (checked by the size tests below).
    unsafe impl aya::Pod for super::PublishedKey {}
    unsafe impl aya::Pod for super::PublishedValue {}
    unsafe impl aya::Pod for super::AllowKey {}
    unsafe impl aya::Pod for super::AllowValue {}
    unsafe impl aya::Pod for super::AllowLens {}
    unsafe impl aya::Pod for super::AllowNetKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::LogLimit {}
    unsafe impl aya::Pod for super::HitSlotWords {}
    unsafe impl aya::Pod for super::MirrorBucket {}
    unsafe impl aya::Pod for super::Mirror6Bucket {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn every_tcp_and_udp_port_has_its_own_drop_counter_in_the_array() {
        // no_std: a bitmap of the slots taken.
        let mut seen = [0u64; PORT_DROPS_MAX_ENTRIES as usize / 64];
        for proto in [PROTO_TCP, PROTO_UDP] {
            for port in 0..=u16::MAX {
                let index = port_drop_index(proto, port);
                assert!(index < PORT_DROPS_MAX_ENTRIES, "{proto}/{port}: {index}");
                let (word, bit) = (index as usize / 64, index % 64);
                assert_eq!(seen[word] >> bit & 1, 0, "{proto}/{port}: {index} taken");
                seen[word] |= 1 << bit;
            }
        }
    }

    #[test]
    fn a_value_says_where_its_hits_count_whatever_its_tag() {
        for slot in [0, 1, 4097, HIT_SLOTS - 1] {
            let v = AllowValue::counted_in_slot(slot, 7);
            assert_eq!((v.hit_slot(), v.count(), v.expires_ns), (Some(slot), 0, 7));
            for len in [0u8, 24, 32, 127, 128] {
                let t = v.in_trie(len);
                assert_eq!(
                    (t.hit_slot(), t.count(), t.trie_prefix_len()),
                    (Some(slot), 0, Some(len))
                );
                assert_eq!(t.untagged(), v);
            }
        }
        let shared = AllowValue::counted_shared(123_456_789_012, 0);
        assert_eq!((shared.hit_slot(), shared.count()), (None, 123_456_789_012));
        let t = shared.in_trie(128);
        assert_eq!((t.hit_slot(), t.count()), (None, 123_456_789_012));
        // What the previous dockwall wrote: a trie entry tagged with its
        // length (129 sets the top bit) and a count below the tag.
        let older = AllowValue {
            hits: (129u64 << TRIE_TAG_SHIFT) | ((1 << 55) - 1),
            expires_ns: 0,
        };
        assert_eq!(older.hit_slot(), None);
        assert_eq!(older.count(), (1 << 55) - 1);
        assert_eq!(older.trie_prefix_len(), Some(128));
        // The kernel's shared add on a slotted value stays in the low bits
        // until 2^32.
        let mut slotted = AllowValue::counted_in_slot(HIT_SLOTS - 1, 0);
        slotted.hits += (1 << 32) - 1;
        assert_eq!(
            (slotted.hit_slot(), slotted.count()),
            (Some(HIT_SLOTS - 1), (1 << 32) - 1)
        );
    }

    #[test]
    fn the_slot_bitmap_covers_every_slot() {
        assert_eq!(HIT_SLOT_ELEMENTS * HIT_SLOTS_PER_WORDS, HIT_SLOTS);
        assert!(u64::from(HIT_SLOTS) <= SLOT_MASK + 1);
        assert_eq!(size_of::<HitSlotWords>(), 4096);
    }

    #[test]
    fn no_implicit_padding() {
        assert_eq!(size_of::<PublishedKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<PublishedValue>(), 8);
        assert_eq!(size_of::<AllowKey>(), 2 + 1 + 1 + 16);
        assert_eq!(size_of::<AllowValue>(), 16);
        assert_eq!(size_of::<AllowLens>(), 8);
        assert_eq!(size_of::<AllowNetKey>(), 4 + size_of::<AllowKey>());
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(size_of::<PortKey>(), 4);
        assert_eq!(size_of::<DropEvent>(), 16 + 16 + 4 + 2 * 3 + 3 + 3);
        assert_eq!(size_of::<LogLimit>(), 16);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<MirrorBucket>(), 64);
        assert_eq!(size_of::<Mirror6Bucket>(), 64);
    }

    #[test]
    fn a_mirror_key_is_never_zero_and_names_every_field() {
        let key = mirror_key(u32::from_ne_bytes([10, 1, 2, 0]), 8081, PROTO_TCP, 24);
        assert_ne!(mirror_key(0, 0, 0, 0), 0);
        for other in [
            mirror_key(u32::from_ne_bytes([10, 1, 3, 0]), 8081, PROTO_TCP, 24),
            mirror_key(u32::from_ne_bytes([10, 1, 2, 0]), 8082, PROTO_TCP, 24),
            mirror_key(u32::from_ne_bytes([10, 1, 2, 0]), 8081, PROTO_UDP, 24),
            mirror_key(u32::from_ne_bytes([10, 1, 2, 0]), 8081, PROTO_TCP, 23),
        ] {
            assert_ne!(key, other);
        }
        assert!(mirror_bucket(key) < MIRROR_BUCKETS);
    }

    #[test]
    fn consecutive_sources_spread_over_the_mirror() {
        // 10.0.0.0/8 as /32s on one port: the buckets a real policy fills.
        let mut per_bucket = [0u8; MIRROR_BUCKETS as usize];
        let n = 100_000u32;
        for i in 0..n {
            let addr = u32::from_ne_bytes((0x0a00_0000 + i).to_be_bytes());
            let b = mirror_bucket(mirror_key(addr, 443, PROTO_TCP, 32));
            per_bucket[b as usize] = per_bucket[b as usize].saturating_add(1);
        }
        let over = per_bucket
            .iter()
            .filter(|c| usize::from(**c) > MIRROR_WAYS)
            .count();
        // Uniform hashing (Poisson, mean 0.38) overflows none (P(N > 7)
        // is 3e-9 a bucket).
        assert_eq!(over, 0, "{over} buckets overflow");
    }

    #[test]
    fn a_lengths_slot_is_one_word_and_back() {
        let slot = AllowLens {
            n: 3,
            lens: [128, 64, 48, 0, 0, 0, 0],
        };
        assert_eq!(AllowLens::from_word(slot.to_word()), slot);
        assert_eq!(AllowLens::default().to_word(), 0, "an empty slot is 0");
        assert_eq!(size_of::<AllowLens>(), size_of::<u64>());
    }

    #[test]
    fn a_mirror_way_names_its_key_and_its_slot_or_says_ask() {
        for (i, key) in [
            mirror_key(u32::from_ne_bytes([10, 1, 2, 0]), 8081, PROTO_TCP, 24),
            mirror_key(u32::MAX, u16::MAX, u8::MAX, 32),
            mirror_key(0, 0, 0, 0),
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(mirror_unhash(mirror_hash(key)), key);
            for slot in [Some(0), Some(HIT_SLOTS - 1), None] {
                let way = mirror_way(key, slot);
                assert_ne!(mirror_way_field(way), 0, "{i}: a used way is never free");
                assert!(mirror_way_holds(way, mirror_tag(key)));
                assert_eq!(mirror_way_key(mirror_bucket(key), way), key);
                let field = mirror_way_field(way);
                match slot {
                    Some(s) => assert_eq!(field, u64::from(s) + 1),
                    None => assert_eq!(field, MIRROR_ASK),
                }
            }
            assert!(
                !mirror_way_holds(0, mirror_tag(key)),
                "a free way holds nothing"
            );
        }
        // Every key of a sample comes back from its bucket and tag, so no
        // two keys in a bucket share a tag.
        for i in 0..50_000u64 {
            let key = mirror_key((i * 2_654_435_761) as u32, 443, PROTO_TCP, 32);
            let way = mirror_way(key, Some(1));
            assert_eq!(mirror_way_key(mirror_bucket(key), way), key);
        }
    }

    #[test]
    fn names_fit_the_kernel() {
        for name in ALL_MAPS
            .iter()
            .chain([MAP_EVENTS, MAP_LOG_LIMIT].iter())
            .chain(
                [
                    PROG_INGRESS,
                    PROG_EGRESS,
                    PROG_NOOP,
                    PROG_DROP,
                    PROG_XDP,
                    PROG_XDP_PASS,
                    PROG_XDP_DROP,
                ]
                .iter(),
            )
        {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
        }
    }
}
