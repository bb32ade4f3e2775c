//! `DW_MIRROR_V4`: the IPv4 entries of `DW_ALLOW_NETS` again, in
//! buckets the kernel reads without a helper call (see
//! [`dockwall_common::MirrorBucket`]). Userspace writes them through a
//! shared mapping of the map, word by word, under each bucket's sequence
//! lock; the kernel falls back to the hash map for a bucket it sees being
//! written, or that has overflowed.
//!
//! The hash map stays the whole truth, and the mirror follows it: an entry
//! is put in the hash map, then mirrored; it leaves the mirror, then the
//! hash map. A crash between the two leaves an entry the kernel does not
//! find (fail closed) until the next full sync, which rewrites every
//! bucket that differs from the hash map ([`Mirror::rebuild`]).
//!
//! Every entry takes a way. A permanent allowance counting its hits in a
//! slot is decided by the mirror; one that expires or counts shared is
//! mirrored as [`MIRROR_ASK`], which sends the kernel to the hash map for
//! that key only (the way has no room for an expiry).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use aya::maps::MapData;
use dockwall_common::{
    MAP_ALLOW_MIRROR, MIRROR_ASK, MIRROR_BUCKETS, MIRROR_OVERFLOW, MIRROR_SEQ_STEP, MIRROR_WAYS,
    MIRROR_WRITING, MirrorBucket, mirror_key, mirror_place, mirror_way, mirror_way_field,
    mirror_way_holds, mirror_way_key,
};
use ipnet::IpNet;

use super::ebpf_mmap::MappedWords;
use crate::policy::AllowEntry;

/// What the mirror says of a key: what the kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mirrored {
    /// There: the hit slot of a permanent entry, which the mirror decides,
    /// or `None` ([`MIRROR_ASK`]): the hash map decides.
    Found(Option<u32>),
    /// Not there; nothing hashing there is only in the hash map.
    Absent,
    /// Being written, or overflowed: the kernel asks the hash map.
    Unsure,
}

/// The mirror key of an allowance, if it is one the mirror can hold (IPv4).
pub fn key_of(entry: &AllowEntry) -> Option<u64> {
    match entry.net.trunc() {
        IpNet::V4(net) => Some(mirror_key(
            u32::from_ne_bytes(net.addr().octets()),
            entry.port,
            entry.proto.number(),
            net.prefix_len(),
        )),
        IpNet::V6(_) => None,
    }
}

/// The map, mapped into this process (`BPF_F_MMAPABLE`).
pub struct Mirror {
    words: MappedWords,
}

const BUCKET_WORDS: usize = size_of::<MirrorBucket>() / 8;

impl Mirror {
    /// Maps `map` (which must be `DW_MIRROR_V4`) read-write.
    pub fn new(map: MapData) -> anyhow::Result<Self> {
        let len = MIRROR_BUCKETS as usize * BUCKET_WORDS;
        Ok(Mirror {
            words: MappedWords::new(map, len, MAP_ALLOW_MIRROR)?,
        })
    }

    /// Word `w` of bucket `b` (0: seq; then one per way).
    fn word(&self, b: u32, w: usize) -> &AtomicU64 {
        assert!(b < MIRROR_BUCKETS && w < BUCKET_WORDS);
        self.words.word(b as usize * BUCKET_WORDS + w)
    }

    fn seq(&self, b: u32) -> &AtomicU64 {
        self.word(b, 0)
    }

    fn way(&self, b: u32, way: usize) -> &AtomicU64 {
        self.word(b, 1 + way)
    }

    /// The ways of bucket `b` in use: the first ones, as the bucket is
    /// kept packed (the kernel stops at the first free way).
    fn used(&self, b: u32) -> usize {
        (0..MIRROR_WAYS)
            .find(|w| mirror_way_field(self.way(b, *w).load(Ordering::Relaxed)) == 0)
            .unwrap_or(MIRROR_WAYS)
    }

    /// The way of bucket `b` holding the entry of `tag`.
    fn way_of(&self, b: u32, tag: u64) -> Option<usize> {
        (0..self.used(b)).find(|w| mirror_way_holds(self.way(b, *w).load(Ordering::Relaxed), tag))
    }

    /// Starts a write of bucket `b`: readers from now on ask the hash map.
    fn begin(&self, b: u32) -> u64 {
        let seq = self.seq(b).load(Ordering::Relaxed);
        self.seq(b).store(seq | MIRROR_WRITING, Ordering::Relaxed);
        fence(Ordering::Release);
        seq
    }

    /// Ends it: a new version, overflowed or not. A bucket that was marked
    /// writing before `begin` (a writer killed mid-write) stays marked: its
    /// other ways may be torn, and only [`Mirror::rebuild`], which writes
    /// the whole bucket, clears that (`whole`).
    fn end(&self, b: u32, was: u64, overflow: bool, whole: bool) {
        let version = (was & !(MIRROR_WRITING | MIRROR_OVERFLOW)).wrapping_add(MIRROR_SEQ_STEP)
            & !(MIRROR_WRITING | MIRROR_OVERFLOW);
        let overflow = if overflow { MIRROR_OVERFLOW } else { 0 };
        let writing = if whole { 0 } else { was & MIRROR_WRITING };
        self.seq(b)
            .store(version | overflow | writing, Ordering::Release);
    }

    /// Mirrors `key`, counting in `slot`, or (`None`: it expires or counts
    /// shared) as one the kernel asks the hash map for. A full bucket is
    /// marked overflowed instead.
    pub fn put(&mut self, key: u64, slot: Option<u32>) {
        let (b, tag) = mirror_place(key);
        let word = mirror_way(key, slot);
        let overflow = self.seq(b).load(Ordering::Relaxed) & MIRROR_OVERFLOW != 0;
        let used = self.used(b);
        let free = (used < MIRROR_WAYS).then_some(used);
        let Some(w) = self.way_of(b, tag).or(free) else {
            // Full: the entry is only in the hash map.
            if !overflow {
                let was = self.begin(b);
                self.end(b, was, true, false);
            }
            return;
        };
        if self.way(b, w).load(Ordering::Relaxed) != word {
            let was = self.begin(b);
            self.way(b, w).store(word, Ordering::Relaxed);
            self.end(b, was, overflow, false);
        }
    }

    /// Takes `key` out of the mirror (before it leaves the hash map). The
    /// last used way moves into its place, so the bucket stays packed.
    pub fn remove(&mut self, key: u64) {
        let (b, tag) = mirror_place(key);
        let Some(w) = self.way_of(b, tag) else {
            return;
        };
        let last = self.used(b) - 1;
        let was = self.begin(b);
        if last != w {
            let moved = self.way(b, last).load(Ordering::Relaxed);
            self.way(b, w).store(moved, Ordering::Relaxed);
        }
        self.way(b, last).store(0, Ordering::Relaxed);
        self.end(b, was, was & MIRROR_OVERFLOW != 0, false);
    }

    /// What the kernel would read for `key`, read the way it reads it.
    pub fn probe(&self, key: u64) -> Mirrored {
        let (b, tag) = mirror_place(key);
        let seq = self.seq(b).load(Ordering::Acquire);
        if seq & MIRROR_WRITING != 0 {
            return Mirrored::Unsure;
        }
        let found = (0..MIRROR_WAYS)
            .map(|w| self.way(b, w).load(Ordering::Acquire))
            .take_while(|way| mirror_way_field(*way) != 0)
            .find(|way| mirror_way_holds(*way, tag));
        if self.seq(b).load(Ordering::Acquire) != seq {
            return Mirrored::Unsure;
        }
        match found.map(mirror_way_field) {
            Some(MIRROR_ASK) => Mirrored::Found(None),
            Some(field) => Mirrored::Found(Some((field - 1) as u32)),
            None if seq & MIRROR_OVERFLOW != 0 => Mirrored::Unsure,
            None => Mirrored::Absent,
        }
    }

    /// Makes the mirror hold exactly `want` (key -> slot, as [`Mirror::put`]
    /// takes it), rewriting only the buckets that differ. Each bucket holds
    /// the first keys hashing to it, in key order; any more mark it
    /// overflowed. A bucket a killed writer left marked writing is
    /// rewritten too. Returns the buckets rewritten.
    pub fn rebuild(&mut self, want: &BTreeMap<u64, Option<u32>>) -> usize {
        let mut by_bucket: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (key, slot) in want {
            by_bucket
                .entry(mirror_place(*key).0)
                .or_default()
                .push(mirror_way(*key, *slot));
        }
        let mut rewritten = 0;
        for b in 0..MIRROR_BUCKETS {
            let wanted = by_bucket.remove(&b).unwrap_or_default();
            let overflow = wanted.len() > MIRROR_WAYS;
            let mut ways = [0u64; MIRROR_WAYS];
            let fit = wanted.len().min(MIRROR_WAYS);
            ways[..fit].copy_from_slice(&wanted[..fit]);
            let seq = self.seq(b).load(Ordering::Relaxed);
            let now: [u64; MIRROR_WAYS] =
                std::array::from_fn(|w| self.way(b, w).load(Ordering::Relaxed));
            if now == ways && (seq & MIRROR_OVERFLOW != 0) == overflow && seq & MIRROR_WRITING == 0
            {
                continue;
            }
            let was = self.begin(b);
            for (w, word) in ways.iter().enumerate() {
                self.way(b, w).store(*word, Ordering::Relaxed);
            }
            self.end(b, was, overflow, true);
            rewritten += 1;
        }
        rewritten
    }

    /// Every mirrored entry (key -> bucket and way field), and the buckets
    /// overflowed and marked writing: for tests and `status`.
    pub fn contents(&self) -> MirrorContents {
        let mut out = MirrorContents::default();
        for b in 0..MIRROR_BUCKETS {
            let seq = self.seq(b).load(Ordering::Acquire);
            out.overflowed += usize::from(seq & MIRROR_OVERFLOW != 0);
            out.writing += usize::from(seq & MIRROR_WRITING != 0);
            let mut free_seen = false;
            for w in 0..MIRROR_WAYS {
                let way = self.way(b, w).load(Ordering::Acquire);
                let field = mirror_way_field(way);
                if field != 0 {
                    out.entries.insert(mirror_way_key(b, way), (b, field));
                    out.holes += usize::from(free_seen);
                }
                free_seen |= field == 0;
            }
        }
        out
    }

    /// Test hook: marks `key`'s bucket as a writer killed mid-write leaves it.
    #[doc(hidden)]
    pub fn abandon_write(&mut self, key: u64) {
        self.begin(mirror_place(key).0);
    }
}

/// What [`Mirror::contents`] reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MirrorContents {
    /// key -> (bucket, way field: `MIRROR_ASK` or the hit slot + 1).
    pub entries: BTreeMap<u64, (u32, u64)>,
    pub overflowed: usize,
    pub writing: usize,
    /// Used ways after a free one, which the kernel never reads (a bucket
    /// is kept packed): 0 unless a hand edit or a bug left one.
    pub holes: usize,
}
