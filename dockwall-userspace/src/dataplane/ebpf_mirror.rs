//! `DW_MIRROR_V4` and `DW_MIRROR_V6`: the entries of `DW_ALLOW_NETS`
//! again, by family, in buckets the kernel reads without a helper call
//! (see [`dockwall_common::MirrorBucket`] and
//! [`dockwall_common::Mirror6Bucket`]). Userspace writes them through a
//! shared mapping of each map, word by word, under each bucket's sequence
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
//! mirrored as "ask the hash map" for that key only (a way has no room
//! for an expiry). The used ways come first in a bucket (a removal moves
//! the last into the hole), so the kernel stops at the first free way.
//!
//! The two families differ only in a way's shape ([`Layout`]): IPv4 packs
//! an entry into one word (a tag and the slot), IPv6 takes three (the
//! address as two words, then port, protocol, length and the slot).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use aya::maps::MapData;
use dockwall_common::{
    MAP_ALLOW_MIRROR, MAP_ALLOW_MIRROR6, MIRROR_ASK, MIRROR_BUCKETS, MIRROR_OVERFLOW,
    MIRROR_SEQ_STEP, MIRROR_WAYS, MIRROR_WRITING, MIRROR6_ASK, MIRROR6_WAYS, Mirror6Bucket,
    MirrorBucket, mirror_key, mirror_place, mirror_way, mirror_way_field, mirror_way_holds,
    mirror_way_key, mirror6_bucket, mirror6_field, mirror6_meta, mirror6_meta_key, mirror6_words,
};
use ipnet::IpNet;

use super::ebpf_mmap::MappedWords;
use crate::policy::AllowEntry;

/// What the mirror says of a key: what the kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mirrored {
    /// There: the hit slot of a permanent entry, which the mirror decides,
    /// or `None` ("ask"): the hash map decides.
    Found(Option<u32>),
    /// Not there; nothing hashing there is only in the hash map.
    Absent,
    /// Being written, or overflowed: the kernel asks the hash map.
    Unsure,
}

/// An allowance's key in its family's mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MirrorKey {
    V4(u64),
    V6(Key6),
}

/// An IPv6 mirror key: the masked address's two words and the meta key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key6 {
    pub hi: u64,
    pub lo: u64,
    pub meta_key: u64,
}

/// An allowance's mirror key.
pub fn key_of(entry: &AllowEntry) -> MirrorKey {
    match entry.net.trunc() {
        IpNet::V4(net) => MirrorKey::V4(mirror_key(
            u32::from_ne_bytes(net.addr().octets()),
            entry.port,
            entry.proto.number(),
            net.prefix_len(),
        )),
        IpNet::V6(net) => {
            let o = net.addr().octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            let (hi, lo) = mirror6_words([word(0), word(4), word(8), word(12)]);
            MirrorKey::V6(Key6 {
                hi,
                lo,
                meta_key: mirror6_meta_key(entry.port, entry.proto.number(), net.prefix_len()),
            })
        }
    }
}

/// The words of one way, as many as the layout's way has.
type Way = [u64; 3];

/// A bucket layout: how a family's entries sit in a bucket's words.
pub trait Layout {
    type Key: Copy + Ord + Debug;
    /// The map's name, for errors.
    const MAP: &'static str;
    const WAYS: usize;
    /// Words a way takes (at most 3).
    const WAY_WORDS: usize;
    /// Words a bucket takes (the sequence word first).
    const BUCKET_WORDS: usize;
    fn bucket(key: &Self::Key) -> u32;
    /// The way holding `key`, counting in `slot` (`None`: ask).
    fn way(key: &Self::Key, slot: Option<u32>) -> Way;
    /// The way's field: 0 free, else an entry's.
    fn field(way: &Way) -> u64;
    /// The field that says "ask the hash map".
    const ASK: u64;
    fn holds(way: &Way, key: &Self::Key) -> bool;
    /// The key a used way of bucket `bucket` holds.
    fn key(bucket: u32, way: &Way) -> Self::Key;
}

/// IPv4: one word a way, its tag and field.
pub struct V4;

impl Layout for V4 {
    type Key = u64;
    const MAP: &'static str = MAP_ALLOW_MIRROR;
    const WAYS: usize = MIRROR_WAYS;
    const WAY_WORDS: usize = 1;
    const BUCKET_WORDS: usize = size_of::<MirrorBucket>() / 8;
    const ASK: u64 = MIRROR_ASK;
    fn bucket(key: &u64) -> u32 {
        mirror_place(*key).0
    }
    fn way(key: &u64, slot: Option<u32>) -> Way {
        [mirror_way(*key, slot), 0, 0]
    }
    fn field(way: &Way) -> u64 {
        mirror_way_field(way[0])
    }
    fn holds(way: &Way, key: &u64) -> bool {
        mirror_way_holds(way[0], mirror_place(*key).1)
    }
    fn key(bucket: u32, way: &Way) -> u64 {
        mirror_way_key(bucket, way[0])
    }
}

/// IPv6: three words a way, the address's two and the meta word.
pub struct V6;

impl Layout for V6 {
    type Key = Key6;
    const MAP: &'static str = MAP_ALLOW_MIRROR6;
    const WAYS: usize = MIRROR6_WAYS;
    const WAY_WORDS: usize = 3;
    const BUCKET_WORDS: usize = size_of::<Mirror6Bucket>() / 8;
    const ASK: u64 = MIRROR6_ASK;
    fn bucket(key: &Key6) -> u32 {
        mirror6_bucket(key.hi, key.lo, key.meta_key)
    }
    fn way(key: &Key6, slot: Option<u32>) -> Way {
        [key.hi, key.lo, mirror6_meta(key.meta_key, slot)]
    }
    fn field(way: &Way) -> u64 {
        mirror6_field(way[2])
    }
    fn holds(way: &Way, key: &Key6) -> bool {
        Self::field(way) != 0
            && way[0] == key.hi
            && way[1] == key.lo
            && way[2] & u64::from(u32::MAX) == key.meta_key
    }
    fn key(_bucket: u32, way: &Way) -> Key6 {
        Key6 {
            hi: way[0],
            lo: way[1],
            meta_key: way[2] & u64::from(u32::MAX),
        }
    }
}

/// One family's mirror, mapped into this process (`BPF_F_MMAPABLE`).
pub struct Mirror<L: Layout> {
    words: MappedWords,
    layout: PhantomData<L>,
}

/// The IPv4 mirror.
pub type Mirror4 = Mirror<V4>;
/// The IPv6 mirror.
pub type Mirror6 = Mirror<V6>;

impl<L: Layout> Mirror<L> {
    /// Maps `map` (which must be `L::MAP`) read-write.
    pub fn new(map: MapData) -> anyhow::Result<Self> {
        let len = MIRROR_BUCKETS as usize * L::BUCKET_WORDS;
        Ok(Mirror {
            words: MappedWords::new(map, len, L::MAP)?,
            layout: PhantomData,
        })
    }

    /// Word `w` of bucket `b` (0: seq; then the ways' words in order).
    fn word(&self, b: u32, w: usize) -> &AtomicU64 {
        assert!(b < MIRROR_BUCKETS && w < L::BUCKET_WORDS);
        self.words.word(b as usize * L::BUCKET_WORDS + w)
    }

    fn seq(&self, b: u32) -> &AtomicU64 {
        self.word(b, 0)
    }

    /// Way `w` of bucket `b`, each word loaded with `order`.
    fn load_way(&self, b: u32, w: usize, order: Ordering) -> Way {
        let mut way = [0; 3];
        for (i, word) in way.iter_mut().enumerate().take(L::WAY_WORDS) {
            *word = self.word(b, 1 + w * L::WAY_WORDS + i).load(order);
        }
        way
    }

    /// Stores way `w` of bucket `b`; its last word (which says whether the
    /// way is used) last.
    fn store_way(&self, b: u32, w: usize, way: &Way) {
        for (i, word) in way.iter().enumerate().take(L::WAY_WORDS) {
            self.word(b, 1 + w * L::WAY_WORDS + i)
                .store(*word, Ordering::Relaxed);
        }
    }

    /// The ways of bucket `b` in use: the first ones, as the bucket is
    /// kept packed (the kernel stops at the first free way).
    fn used(&self, b: u32) -> usize {
        (0..L::WAYS)
            .find(|w| L::field(&self.load_way(b, *w, Ordering::Relaxed)) == 0)
            .unwrap_or(L::WAYS)
    }

    /// The way of bucket `b` holding `key`.
    fn way_of(&self, b: u32, key: &L::Key) -> Option<usize> {
        (0..self.used(b)).find(|w| L::holds(&self.load_way(b, *w, Ordering::Relaxed), key))
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
    pub fn put(&mut self, key: L::Key, slot: Option<u32>) {
        let b = L::bucket(&key);
        let way = L::way(&key, slot);
        let overflow = self.seq(b).load(Ordering::Relaxed) & MIRROR_OVERFLOW != 0;
        let used = self.used(b);
        let free = (used < L::WAYS).then_some(used);
        let Some(w) = self.way_of(b, &key).or(free) else {
            // Full: the entry is only in the hash map.
            if !overflow {
                let was = self.begin(b);
                self.end(b, was, true, false);
            }
            return;
        };
        if self.load_way(b, w, Ordering::Relaxed) != way {
            let was = self.begin(b);
            self.store_way(b, w, &way);
            self.end(b, was, overflow, false);
        }
    }

    /// Takes `key` out of the mirror (before it leaves the hash map). The
    /// last used way moves into its place, so the bucket stays packed.
    pub fn remove(&mut self, key: L::Key) {
        let b = L::bucket(&key);
        let Some(w) = self.way_of(b, &key) else {
            return;
        };
        let last = self.used(b) - 1;
        let was = self.begin(b);
        if last != w {
            let moved = self.load_way(b, last, Ordering::Relaxed);
            self.store_way(b, w, &moved);
        }
        self.store_way(b, last, &[0; 3]);
        self.end(b, was, was & MIRROR_OVERFLOW != 0, false);
    }

    /// What the kernel would read for `key`, read the way it reads it.
    pub fn probe(&self, key: L::Key) -> Mirrored {
        let b = L::bucket(&key);
        let seq = self.seq(b).load(Ordering::Acquire);
        if seq & MIRROR_WRITING != 0 {
            return Mirrored::Unsure;
        }
        let found = (0..L::WAYS)
            .map(|w| self.load_way(b, w, Ordering::Acquire))
            .take_while(|way| L::field(way) != 0)
            .find(|way| L::holds(way, &key));
        if self.seq(b).load(Ordering::Acquire) != seq {
            return Mirrored::Unsure;
        }
        match found.map(|way| L::field(&way)) {
            Some(field) if field == L::ASK => Mirrored::Found(None),
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
    pub fn rebuild(&mut self, want: &BTreeMap<L::Key, Option<u32>>) -> usize {
        let mut by_bucket: BTreeMap<u32, Vec<Way>> = BTreeMap::new();
        for (key, slot) in want {
            by_bucket
                .entry(L::bucket(key))
                .or_default()
                .push(L::way(key, *slot));
        }
        let mut rewritten = 0;
        for b in 0..MIRROR_BUCKETS {
            let mut ways = by_bucket.remove(&b).unwrap_or_default();
            let overflow = ways.len() > L::WAYS;
            ways.resize(L::WAYS, [0; 3]);
            let seq = self.seq(b).load(Ordering::Relaxed);
            let same = (0..L::WAYS).all(|w| self.load_way(b, w, Ordering::Relaxed) == ways[w]);
            if same && (seq & MIRROR_OVERFLOW != 0) == overflow && seq & MIRROR_WRITING == 0 {
                continue;
            }
            let was = self.begin(b);
            for (w, way) in ways.iter().enumerate() {
                self.store_way(b, w, way);
            }
            self.end(b, was, overflow, true);
            rewritten += 1;
        }
        rewritten
    }

    /// Every mirrored entry (key -> bucket and slot, `None`: ask), and the
    /// buckets overflowed and marked writing: for tests and `status`.
    pub fn contents(&self) -> MirrorContents<L::Key> {
        let mut out = MirrorContents {
            entries: BTreeMap::new(),
            overflowed: 0,
            writing: 0,
            holes: 0,
        };
        for b in 0..MIRROR_BUCKETS {
            let seq = self.seq(b).load(Ordering::Acquire);
            out.overflowed += usize::from(seq & MIRROR_OVERFLOW != 0);
            out.writing += usize::from(seq & MIRROR_WRITING != 0);
            let mut free_seen = false;
            for w in 0..L::WAYS {
                let way = self.load_way(b, w, Ordering::Acquire);
                let field = L::field(&way);
                if field != 0 {
                    let slot = (field != L::ASK).then(|| (field - 1) as u32);
                    out.entries.insert(L::key(b, &way), (b, slot));
                    out.holes += usize::from(free_seen);
                }
                free_seen |= field == 0;
            }
        }
        out
    }

    /// Test hook: marks `key`'s bucket as a writer killed mid-write leaves it.
    #[doc(hidden)]
    pub fn abandon_write(&mut self, key: L::Key) {
        self.begin(L::bucket(&key));
    }
}

/// What [`Mirror::contents`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorContents<K> {
    /// key -> (bucket, hit slot; `None`: the kernel asks the hash map).
    pub entries: BTreeMap<K, (u32, Option<u32>)>,
    pub overflowed: usize,
    pub writing: usize,
    /// Used ways after a free one, which the kernel never reads (a bucket
    /// is kept packed): 0 unless a hand edit or a bug left one.
    pub holes: usize,
}
