//! The eBPF allowance maps, and writing them.
//!
//! Allowances are kept by group: (published port, protocol, family). A
//! group whose entries use at most [`ALLOW_MAX_LENS`] prefix lengths has
//! them in `DW_ALLOW_NETS`, one exact-match entry each, and its slot in
//! `DW_ALLOW_LENS` lists the lengths, longest first: the kernel probes once
//! per length and the first hit is the longest match. Any other group is
//! looked up in the LPM trie `DW_ALLOW`, as every group was before.
//!
//! Every write keeps one rule: a packet never sees fewer allowances than
//! both the old and the new policy grant. Entries go in before the slot
//! that makes them visible, and go out after the slot that stops probing
//! their length; a group moving between the hash and the trie is written
//! whole into its new place, then its slot flips, then its old place is
//! emptied. A crash between two steps leaves extra entries the kernel does
//! not look at (the next full sync removes them) or a length not yet
//! listed (its entries miss: fail closed), never an allowance the policy
//! does not grant.
//!
//! The entries of `DW_ALLOW_NETS` are mirrored in `DW_MIRROR_V4` and
//! `DW_MIRROR_V6` (see `ebpf_mirror`), which the kernel reads first: every write of the
//! hash map here goes through `net_put` and `net_remove`, which keep the
//! mirror behind it, and a full sync rebuilds the mirror's buckets.
//!
//! Hit counters: each allowance's value names its slot in the per-CPU
//! array `DW_HIT_COUNTS` (see `ebpf_hits`). A value written again (its
//! expiry moved, or its group changing place) keeps its slot, so its
//! count; an allowance that leaves the policy frees its slot after it is
//! gone, and a new one takes a free slot, zeroed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use aya::{
    maps::{MapError, lpm_trie::Key},
    sys::SyscallError,
};
use dockwall_common::{
    ALLOW_KEY_FIXED_BITS, ALLOW_MAX_LENS, AllowKey, AllowLens, AllowNetKey, AllowValue, FAMILY_V4,
    FAMILY_V6, MAP_ALLOW_NETS, allow_group_index,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::IpAddr;

use super::ebpf::{BPF_NOEXIST, Changes, MIRROR_ON, Maps, already_gone, same_expiry};
use super::ebpf_hits::{SlotBitmap, counting_slot};
use super::ebpf_mirror::{self, Key6, MirrorContents, MirrorKey, Mirrored};
use crate::policy::{AllowEntry, Proto};

/// (published port, protocol, IPv6?): the allowances one `DW_ALLOW_LENS`
/// slot describes; [`AllowEntry::group`].
pub type Group = (u16, Proto, bool);

/// Where a group's allowances are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// By length in `DW_ALLOW_NETS`, with these lengths.
    Nets(AllowLens),
    /// In the trie (also: a group with no allowances).
    Trie,
}

/// Where `entries` (one group's) belong: by length when their distinct
/// prefix lengths fit a slot, else the trie.
fn place_for<'a>(entries: impl IntoIterator<Item = &'a AllowEntry>) -> Place {
    place_of_lengths(&entries.into_iter().map(|e| e.net.prefix_len()).collect())
}

/// Where a group using these prefix lengths belongs.
fn place_of_lengths(lens: &BTreeSet<u8>) -> Place {
    if lens.is_empty() || lens.len() > ALLOW_MAX_LENS {
        return Place::Trie;
    }
    let mut slot = AllowLens::default();
    for (i, len) in lens.iter().rev().enumerate() {
        slot.lens[i] = *len;
    }
    slot.n = lens.len() as u8;
    Place::Nets(slot)
}

/// The slot a place is written as.
fn slot_of(place: Place) -> AllowLens {
    match place {
        Place::Nets(slot) => slot,
        Place::Trie => AllowLens::default(),
    }
}

fn slot_index((port, proto, v6): Group) -> u32 {
    allow_group_index(port, proto.number(), if v6 { FAMILY_V6 } else { FAMILY_V4 })
}

/// The entries of one group in a map ordered by [`AllowEntry`]: a range,
/// not a scan (entries sort by port, protocol, then IPv4 before IPv6).
pub fn group_entries<V>(
    map: &BTreeMap<AllowEntry, V>,
    group: Group,
) -> impl Iterator<Item = (&AllowEntry, &V)> {
    let (port, proto, v6) = group;
    let net = if v6 {
        IpNet::V6(Ipv6Net::default())
    } else {
        IpNet::V4(Ipv4Net::default())
    };
    map.range(AllowEntry { port, proto, net }..)
        .take_while(move |(e, _)| e.group() == group)
}

/// A policy's allowance entries, as an edit needs to ask about them: cheap
/// questions first, the whole group only when it changes place.
pub trait Desired {
    /// Whether the group has an entry of this prefix length (stops at the
    /// first: O(1) for a length many entries use).
    fn has_len(&self, group: Group, len: u8) -> bool;
    /// The group's entries and their kernel expiries (O(group)).
    fn entries(&self, group: Group) -> BTreeMap<AllowEntry, u64>;
}

/// [`Desired`] over an ordered map, with how its values become kernel
/// `expires_ns`.
pub struct DesiredMap<'a, V, F> {
    pub map: &'a BTreeMap<AllowEntry, V>,
    pub expires_ns: F,
}

impl<V, F: Fn(&V) -> u64> Desired for DesiredMap<'_, V, F> {
    fn has_len(&self, group: Group, len: u8) -> bool {
        group_entries(self.map, group).any(|(e, _)| e.net.prefix_len() == len)
    }

    fn entries(&self, group: Group) -> BTreeMap<AllowEntry, u64> {
        group_entries(self.map, group)
            .map(|(e, v)| (*e, (self.expires_ns)(v)))
            .collect()
    }
}

/// A group's place after an edit, from its slot before and the edit alone
/// when the group is looked up by length (the usual case: no scan of the
/// group unless a length may have gone out of use); from its whole content
/// otherwise.
fn place_after(
    now: AllowLens,
    group: Group,
    edit: &[(AllowEntry, Option<u64>)],
    desired: &impl Desired,
) -> Place {
    if now.n == 0 {
        return place_for(desired.entries(group).keys());
    }
    let n = usize::from(now.n).min(ALLOW_MAX_LENS);
    let mut lens: BTreeSet<u8> = now.lens[..n].iter().copied().collect();
    for (entry, change) in edit {
        let len = entry.net.prefix_len();
        if change.is_some() {
            lens.insert(len);
        } else if lens.contains(&len)
            && !edit
                .iter()
                .any(|(e, c)| c.is_some() && e.net.prefix_len() == len)
            && !desired.has_len(group, len)
        {
            lens.remove(&len);
        }
    }
    place_of_lengths(&lens)
}

fn net_key(entry: &AllowEntry) -> AllowNetKey {
    let (prefix_len, data) = AllowEntry {
        net: entry.net.trunc(),
        ..*entry
    }
    .key();
    AllowNetKey { prefix_len, data }
}

fn trie_key(entry: &AllowEntry) -> Key<AllowKey> {
    let (len, data) = entry.key();
    Key::new(len, data)
}

impl Maps {
    /// Makes the allowance maps hold exactly `desired` (entry -> kernel
    /// `expires_ns`, 0 = never), each group in its place. Kept entries are
    /// rewritten only when their expiry moved, with their hit counters'
    /// slots (also into a group's new place). Repairs anything a crash or
    /// a hand edit left: what is not desired goes, an entry without a slot
    /// or sharing one gets its own, and the slot bitmap is rebuilt.
    pub fn sync_allow(&mut self, desired: &BTreeMap<AllowEntry, u64>) -> anyhow::Result<Changes> {
        let trie_now = self.trie_values()?;
        let nets_now = self.nets_values()?;
        let mut places: BTreeMap<Group, Place> = BTreeMap::new();
        let groups: BTreeSet<Group> = desired.keys().map(AllowEntry::group).collect();
        for group in groups {
            let place = place_for(group_entries(desired, group).map(|(e, _)| e));
            places.insert(group, place);
        }
        // Groups the maps hold and the policy no longer has: empty slots.
        for entry in trie_now.keys().chain(nets_now.keys()) {
            places.entry(entry.group()).or_insert(Place::Trie);
        }
        let in_nets = |e: &AllowEntry| matches!(places.get(&e.group()), Some(Place::Nets(_)));
        // 0. Hit-counter slots. A kept entry keeps the slot its value names
        // (in its place, else the other: a group moving), the first to
        // name it; any other gets a free one. Until the end, the slots of
        // every entry still in the maps stay taken, so no new allowance is
        // counted where a leaving one still counts.
        let now_of = |e: &AllowEntry| {
            let (first, second) = if in_nets(e) {
                (&nets_now, &trie_now)
            } else {
                (&trie_now, &nets_now)
            };
            first.get(e).or_else(|| second.get(e)).copied()
        };
        let mut kept_slots = SlotBitmap::empty();
        let mut counters: BTreeMap<AllowEntry, AllowValue> = BTreeMap::new();
        let mut unslotted = Vec::new();
        for entry in desired.keys() {
            let now = now_of(entry);
            match now.and_then(|v| v.hit_slot()) {
                Some(slot) if kept_slots.take(slot) => {
                    counters.insert(*entry, now.unwrap_or_default().untagged());
                }
                _ => unslotted.push((*entry, now.map_or(0, |v| v.count()))),
            }
        }
        let mut taken = kept_slots.clone();
        for value in trie_now.values().chain(nets_now.values()) {
            if let Some(slot) = value.hit_slot() {
                taken.take(slot);
            }
        }
        // Slots the map has taken that no entry names (a crash between
        // removing an allowance and freeing its slot) are freed, zeroed
        // first: a free slot's counters are zero, so the slots given out
        // below need no write unless a count moves in (one syscall each
        // fewer for a policy loaded whole).
        let was = self.read_slots()?;
        for slot in was.taken_slots().filter(|s| !taken.is_taken(*s)) {
            self.set_slot_counts(slot, 0)?;
        }
        for (entry, count) in unslotted {
            let counter = match taken.take_free() {
                Some(slot) => {
                    kept_slots.take(slot);
                    if count != 0 {
                        self.set_slot_counts(slot, count)?;
                    }
                    AllowValue::counted_in_slot(slot, 0)
                }
                None => AllowValue::counted_shared(count, 0),
            };
            counters.insert(entry, counter);
        }
        // Taken in the map before any entry names them.
        self.write_slots(&taken, Some(&was))?;
        let mut changes = Changes::default();
        // The mirrors' whole content after this sync: every entry looked
        // up by length, as the hash map holds it.
        let (mut mirror_want, mut mirror6_want) = (BTreeMap::new(), BTreeMap::new());
        // 1. Every entry into its place.
        for (entry, &expires_ns) in desired {
            let counter = counters.get(entry).copied().unwrap_or_default();
            let value = AllowValue {
                hits: counter.hits,
                expires_ns,
            };
            let unchanged = |now: Option<&AllowValue>| {
                now.is_some_and(|now| {
                    same_expiry(now.expires_ns, expires_ns) && now.untagged().hits == counter.hits
                })
            };
            if in_nets(entry) {
                let now = nets_now.get(entry).filter(|now| unchanged(Some(now)));
                let slot = mirrored(now.unwrap_or(&value));
                match ebpf_mirror::key_of(entry) {
                    MirrorKey::V4(key) => mirror_want.insert(key, slot),
                    MirrorKey::V6(key) => mirror6_want.insert(key, slot),
                };
                if now.is_some() {
                    continue;
                }
                self.net_put(entry, value)?;
            } else {
                let now = trie_now.get(entry);
                // Rewritten too when an older dockwall wrote it without
                // the tag that names it.
                if unchanged(now)
                    && now.and_then(AllowValue::trie_prefix_len) == Some(entry.net.prefix_len())
                {
                    continue;
                }
                self.trie_put(entry, value)?;
            }
            changes.added += 1;
        }
        // 2. The slots, now that what they point at is there.
        for (&group, &place) in &places {
            if self.slot(group) != slot_of(place) {
                self.set_slot(group, slot_of(place));
            }
        }
        // A packet that read a moving group's slot before the flip may
        // still look in the old place: wait for it before emptying that.
        let moving = nets_now
            .keys()
            .any(|e| desired.contains_key(e) && !in_nets(e))
            || trie_now
                .keys()
                .any(|e| desired.contains_key(e) && in_nets(e));
        if moving {
            self.wait_for_running_programs()?;
        }
        // The mirror, whole: buckets a crash or a hand edit left wrong, and
        // overflow marks that room since freed has cleared. After the slots
        // (a group leaving for the trie is looked up there before its
        // mirrored entries go; one arriving was mirrored by `net_put` in
        // step 1), before the hash map's removals (out of the mirror first).
        self.mirror.rebuild(&mirror_want);
        self.mirror6.rebuild(&mirror6_want);
        // 3. What is no longer looked up where it is.
        for entry in nets_now.keys() {
            let kept = desired.contains_key(entry) && in_nets(entry);
            if !kept {
                self.net_remove(entry)?;
                changes.removed += usize::from(!desired.contains_key(entry));
            }
        }
        for entry in trie_now.keys() {
            let kept = desired.contains_key(entry) && !in_nets(entry);
            if !kept {
                self.trie_remove(entry)?;
                changes.removed += usize::from(!desired.contains_key(entry));
            }
        }
        // 4. Only the kept entries' slots stay taken; the others, their
        // entries gone, are zeroed, then freed.
        for slot in taken.taken_slots().filter(|s| !kept_slots.is_taken(*s)) {
            self.set_slot_counts(slot, 0)?;
        }
        self.write_slots(&kept_slots, Some(&taken))?;
        Ok(changes)
    }

    /// Writes only the difference between `old` (what the maps were last
    /// given) and `new`: O(change), not O(policy), for `allow`/`revoke` on
    /// a large policy. Kept entries whose expiry moved are rewritten with
    /// their hit counters; an entry already gone is fine.
    pub fn sync_allow_delta(
        &mut self,
        old: &BTreeMap<AllowEntry, u64>,
        new: &BTreeMap<AllowEntry, u64>,
    ) -> anyhow::Result<Changes> {
        let mut changes: BTreeMap<AllowEntry, Option<u64>> = BTreeMap::new();
        for (entry, &expires_ns) in new {
            if !old
                .get(entry)
                .is_some_and(|&was| same_expiry(was, expires_ns))
            {
                changes.insert(*entry, Some(expires_ns));
            }
        }
        for entry in old.keys().filter(|e| !new.contains_key(e)) {
            changes.insert(*entry, None);
        }
        let desired = DesiredMap {
            map: new,
            expires_ns: |v: &u64| *v,
        };
        self.apply_allow_changes(&changes, &desired)
    }

    /// Writes one edit's entries: `Some(expires_ns)` puts the entry in (a
    /// running hit counter's slot carried over, a new entry given a free
    /// one), `None` takes it out and frees its slot. `desired` is the whole
    /// policy after the edit, which decides each group's place.
    /// O(change), or O(group) when a group moves between the hash and the
    /// trie or lives in the trie.
    pub fn apply_allow_changes(
        &mut self,
        changes: &BTreeMap<AllowEntry, Option<u64>>,
        desired: &impl Desired,
    ) -> anyhow::Result<Changes> {
        let mut done = Changes::default();
        let mut slots = self.read_slots()?;
        let groups: BTreeSet<Group> = changes.keys().map(AllowEntry::group).collect();
        for group in groups {
            let edit: Vec<(AllowEntry, Option<u64>)> = group_entries(changes, group)
                .map(|(e, c)| (*e, *c))
                .collect();
            let now = self.slot(group);
            let place = place_after(now, group, &edit, desired);
            let old_place = if now.n == 0 {
                Place::Trie
            } else {
                Place::Nets(now)
            };
            let moving = (now.n != 0) != matches!(place, Place::Nets(_));
            if moving {
                let want = desired.entries(group);
                // Whole into the new place, flip the slot, empty the old
                // place of the group's entries (old and new). Counter
                // slots move along.
                for (entry, &expires_ns) in &want {
                    let carried = self.get_from(old_place, entry)?;
                    let value = self.counter_for(&mut slots, carried, expires_ns)?;
                    self.put_into(place, entry, value)?;
                }
                self.set_slot(group, slot_of(place));
                // Packets that read the slot before the flip finish first.
                self.wait_for_running_programs()?;
                for entry in want.keys() {
                    self.remove_from(old_place, entry)?;
                }
                for (entry, _) in edit.iter().filter(|(_, c)| c.is_none()) {
                    if let Some(gone) = self.take_from(old_place, entry)? {
                        self.free_slot(&mut slots, &gone)?;
                    }
                }
                done.added += edit.iter().filter(|(_, c)| c.is_some()).count();
            } else {
                for (entry, expires_ns) in edit.iter().filter_map(|(e, c)| c.map(|c| (e, c))) {
                    done.added += usize::from(self.put(&mut slots, place, entry, expires_ns)?);
                }
                if now != slot_of(place) {
                    self.set_slot(group, slot_of(place));
                }
                for (entry, _) in edit.iter().filter(|(_, c)| c.is_none()) {
                    if let Some(gone) = self.take_from(place, entry)? {
                        self.free_slot(&mut slots, &gone)?;
                    }
                }
            }
            done.removed += edit.iter().filter(|(_, c)| c.is_none()).count();
        }
        Ok(done)
    }

    /// Puts one entry in `place`, its running hit counter's slot carried
    /// over (a new one given a free slot). False when it was there already
    /// with this expiry (nothing written).
    fn put(
        &mut self,
        slots: &mut SlotBitmap,
        place: Place,
        entry: &AllowEntry,
        expires_ns: u64,
    ) -> anyhow::Result<bool> {
        let now = self.get_from(place, entry)?;
        if now.is_some_and(|v| same_expiry(v.expires_ns, expires_ns) && counting_slot(&v).is_some())
        {
            return Ok(false);
        }
        if let (Place::Trie, None) = (place, now) {
            return self.trie_upsert(slots, entry, expires_ns);
        }
        let value = self.counter_for(slots, now, expires_ns)?;
        self.put_into(place, entry, value)?;
        Ok(true)
    }

    /// `entry`'s value in `place`, if it is there.
    fn get_from(&self, place: Place, entry: &AllowEntry) -> anyhow::Result<Option<AllowValue>> {
        match place {
            Place::Nets(_) => self.net_get(entry),
            Place::Trie => self.trie_exact(entry),
        }
    }

    fn put_into(
        &mut self,
        place: Place,
        entry: &AllowEntry,
        value: AllowValue,
    ) -> anyhow::Result<()> {
        match place {
            Place::Nets(_) => self.net_put(entry, value),
            Place::Trie => self.trie_put(entry, value),
        }
    }

    /// The entry of `place`, read then removed; `None` when it was not
    /// there.
    fn take_from(
        &mut self,
        place: Place,
        entry: &AllowEntry,
    ) -> anyhow::Result<Option<AllowValue>> {
        let value = self.get_from(place, entry)?;
        self.remove_from(place, entry)?;
        Ok(value)
    }

    fn remove_from(&mut self, place: Place, entry: &AllowEntry) -> anyhow::Result<()> {
        match place {
            Place::Nets(_) => self.net_remove(entry),
            Place::Trie => self.trie_remove(entry),
        }
    }

    /// Puts a trie entry that [`Maps::trie_exact`] did not find: a new one,
    /// or one an older dockwall wrote without the tag that names it. Only
    /// create is tried first: a trie lookup answers the longest match, so
    /// for an untagged entry it cannot tell whether this very entry
    /// exists. Linux before 6.13 (without the stable backport; Debian's
    /// 5.10 here) ignores BPF_NOEXIST for LPM tries and overwrites, so such
    /// an untagged entry's count restarts there.
    fn trie_upsert(
        &mut self,
        slots: &mut SlotBitmap,
        entry: &AllowEntry,
        expires_ns: u64,
    ) -> anyhow::Result<bool> {
        let fresh = self.counter_for(slots, None, expires_ns)?;
        let tagged = fresh.in_trie(entry.net.prefix_len());
        match self.allow.insert(&trie_key(entry), tagged, BPF_NOEXIST) {
            Ok(()) => return Ok(true),
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("adding {entry:?} to DW_ALLOW (bpf_map_update_elem)")
                });
            }
        }
        // It exists, untagged: the lookup answers this very entry. Its
        // shared count moves into the slot just taken.
        self.free_slot(slots, &fresh)?;
        let now = self.trie_lookup(entry)?;
        let value = self.counter_for(slots, now, expires_ns)?;
        self.trie_put(entry, value)?;
        Ok(true)
    }

    /// The trie's longest match for `entry`'s address, at its length.
    fn trie_lookup(&self, entry: &AllowEntry) -> anyhow::Result<Option<AllowValue>> {
        match self.allow.get(&trie_key(entry), 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading DW_ALLOW (bpf_map_lookup_elem)"),
        }
    }

    /// `entry`'s own trie value: the longest match, when its tag says it
    /// has `entry`'s length (then it is `entry`: same length, covering
    /// `entry`'s address). `None` when absent, or written untagged.
    fn trie_exact(&self, entry: &AllowEntry) -> anyhow::Result<Option<AllowValue>> {
        Ok(self
            .trie_lookup(entry)?
            .filter(|v| v.trie_prefix_len() == Some(entry.net.prefix_len())))
    }

    /// Writes a trie entry, tagged with its prefix length.
    fn trie_put(&mut self, entry: &AllowEntry, value: AllowValue) -> anyhow::Result<()> {
        let tagged = value.in_trie(entry.net.prefix_len());
        self.allow
            .insert(&trie_key(entry), tagged, 0)
            .with_context(|| format!("writing {entry:?} to DW_ALLOW (bpf_map_update_elem)"))
    }

    /// Removes one trie entry; one already gone is fine.
    fn trie_remove(&mut self, entry: &AllowEntry) -> anyhow::Result<()> {
        match self.allow.remove(&trie_key(entry)) {
            Ok(()) => Ok(()),
            Err(e) if already_gone(&e) => Ok(()),
            Err(e) => Err(e)
                .with_context(|| format!("removing {entry:?} from DW_ALLOW (bpf_map_delete_elem)")),
        }
    }

    fn net_get(&self, entry: &AllowEntry) -> anyhow::Result<Option<AllowValue>> {
        match self.allow_nets.get(&net_key(entry), 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("reading {MAP_ALLOW_NETS} (bpf_map_lookup_elem)"))
            }
        }
    }

    /// Writes one entry of `DW_ALLOW_NETS`, then its mirror.
    fn net_put(&mut self, entry: &AllowEntry, value: AllowValue) -> anyhow::Result<()> {
        self.allow_nets
            .insert(net_key(entry), value.untagged(), 0)
            .with_context(|| {
                format!("writing {entry:?} to {MAP_ALLOW_NETS} (bpf_map_update_elem)")
            })?;
        let slot = mirrored(&value);
        match ebpf_mirror::key_of(entry) {
            MirrorKey::V4(key) => self.mirror.put(key, slot),
            MirrorKey::V6(key) => self.mirror6.put(key, slot),
        }
        Ok(())
    }

    /// Removes one entry of `DW_ALLOW_NETS`, its mirror first; one already
    /// gone is fine.
    fn net_remove(&mut self, entry: &AllowEntry) -> anyhow::Result<()> {
        match ebpf_mirror::key_of(entry) {
            MirrorKey::V4(key) => self.mirror.remove(key),
            MirrorKey::V6(key) => self.mirror6.remove(key),
        }
        match self.allow_nets.remove(&net_key(entry)) {
            Ok(()) => Ok(()),
            Err(e) if already_gone(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| {
                format!("removing {entry:?} from {MAP_ALLOW_NETS} (bpf_map_delete_elem)")
            }),
        }
    }

    /// Each allowance's hits as each CPU counted them in its slot of
    /// `DW_HIT_COUNTS` (index: CPU id), for those any CPU counted; the
    /// shared part is in its value's `hits`.
    pub fn allow_hits_by_cpu(&self) -> anyhow::Result<BTreeMap<AllowEntry, Vec<u64>>> {
        let mut out = BTreeMap::new();
        for (entry, value) in self.allow_values()? {
            if let Some(slot) = counting_slot(&value) {
                let counts = self.slot_counts(slot)?;
                if counts.iter().any(|c| *c != 0) {
                    out.insert(entry, counts);
                }
            }
        }
        Ok(out)
    }

    /// A group's slot, read from the shared mapping.
    fn slot(&self, group: Group) -> AllowLens {
        let word = self.allow_lens.word(slot_index(group) as usize);
        AllowLens::from_word(word.load(Ordering::Acquire))
    }

    /// Stores a group's slot in one atomic write, after (Release) the
    /// entries it points at.
    fn set_slot(&mut self, group: Group, slot: AllowLens) {
        let word = self.allow_lens.word(slot_index(group) as usize);
        word.store(slot.to_word(), Ordering::Release);
    }

    /// The trie's entries as stored: `hits` with its tag (see
    /// [`AllowValue::count`]).
    fn trie_values(&self) -> anyhow::Result<BTreeMap<AllowEntry, AllowValue>> {
        let mut out = BTreeMap::new();
        for item in self.allow.iter() {
            let (key, value) = item.context("reading DW_ALLOW (bpf_map_get_next_key)")?;
            if let Some(entry) = AllowEntry::from_key(key.prefix_len(), &key.data()) {
                out.insert(entry, value);
            }
        }
        Ok(out)
    }

    fn nets_values(&self) -> anyhow::Result<BTreeMap<AllowEntry, AllowValue>> {
        let mut out = BTreeMap::new();
        for item in self.allow_nets.iter() {
            let (key, value) =
                item.with_context(|| format!("reading {MAP_ALLOW_NETS} (bpf_map_get_next_key)"))?;
            if let Some(entry) = AllowEntry::from_key(key.prefix_len, &key.data) {
                out.insert(entry, value);
            }
        }
        Ok(out)
    }

    /// Every allowance entry in the kernel with its hits: its own counter
    /// plus what each CPU counted in its slot.
    pub fn allow_hits(&self) -> anyhow::Result<BTreeMap<AllowEntry, u64>> {
        self.allow_values()?
            .into_iter()
            .map(|(e, v)| Ok((e, self.hits_of(&v)?)))
            .collect()
    }

    /// Every allowance entry in the kernel with its value, wherever it is
    /// kept, untagged (`count()`: the entry's own counter, without the
    /// per-CPU ones; `hit_slot()`: where those are).
    pub fn allow_values(&self) -> anyhow::Result<BTreeMap<AllowEntry, AllowValue>> {
        let mut out: BTreeMap<AllowEntry, AllowValue> = self
            .trie_values()?
            .into_iter()
            .map(|(e, v)| (e, v.untagged()))
            .collect();
        for (entry, value) in self.nets_values()? {
            out.insert(entry, value.untagged());
        }
        Ok(out)
    }

    /// How the kernel looks up a group's allowances: `Some(lengths)`, one
    /// probe each, longest first; `None`: in the trie.
    pub fn allow_lengths(&self, group: Group) -> anyhow::Result<Option<Vec<u8>>> {
        let slot = self.slot(group);
        let n = usize::from(slot.n).min(ALLOW_MAX_LENS);
        Ok((n != 0).then(|| slot.lens[..n].to_vec()))
    }

    /// The kernel's own longest-prefix match for a source on a published
    /// port, the way the program looks it up: the value of the entry that
    /// decides, if any, with its hits from every CPU.
    pub fn lookup_allow(
        &self,
        port: u16,
        proto: Proto,
        source: IpAddr,
    ) -> anyhow::Result<Option<AllowValue>> {
        let slot = self.slot((port, proto, source.is_ipv6()));
        if slot.n != 0 {
            let n = usize::from(slot.n).min(ALLOW_MAX_LENS);
            for &len in &slot.lens[..n] {
                // A length past the family's (a hand edit) never matches.
                let Ok(net) = IpNet::new(source, len) else {
                    continue;
                };
                let entry = AllowEntry { port, proto, net };
                // The kernel asks the mirror first: so does this, and it
                // answers alike (an entry only in the hash map, say after
                // a crash, decides nothing until a sync mirrors it).
                if MIRROR_ON {
                    match self.mirror_probe(&entry) {
                        // A permanent entry: the hash map's value (the
                        // same, but for a hand edit), with its hits.
                        Mirrored::Found(Some(_)) => {
                            let value = self.net_get(&entry)?.unwrap_or_default();
                            return Ok(Some(self.with_total_hits(value)?));
                        }
                        Mirrored::Absent => continue,
                        Mirrored::Found(None) | Mirrored::Unsure => {}
                    }
                }
                if let Some(value) = self.net_get(&entry)? {
                    return Ok(Some(self.with_total_hits(value)?));
                }
            }
            return Ok(None);
        }
        let (family, addr) = crate::policy::addr_bytes(source);
        let bits = if source.is_ipv4() { 32 } else { 128 };
        let key = Key::new(
            ALLOW_KEY_FIXED_BITS + bits,
            AllowKey {
                port,
                proto: proto.number(),
                family,
                addr,
            },
        );
        let value = match self.allow.get(&key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e).context("looking up DW_ALLOW (bpf_map_lookup_elem)"),
        };
        Ok(Some(self.with_total_hits(value)?))
    }
}

/// What the mirror holds for an allowance with this value: the slot of a
/// permanent one counting in a slot, which the mirror then decides; `None`
/// for any other (it expires, or counts shared), which the kernel looks
/// up in the hash map.
fn mirrored(value: &AllowValue) -> Option<u32> {
    if value.expires_ns != 0 {
        return None;
    }
    counting_slot(value)
}

impl Maps {
    /// What the entry's family's mirror says of it, read as the kernel does.
    fn mirror_probe(&self, entry: &AllowEntry) -> Mirrored {
        match ebpf_mirror::key_of(entry) {
            MirrorKey::V4(key) => self.mirror.probe(key),
            MirrorKey::V6(key) => self.mirror6.probe(key),
        }
    }

    /// Where the mirrors and `DW_ALLOW_NETS` disagree, a line each: an
    /// entry the kernel would not find or would find with another slot, a
    /// mirrored key the hash map does not have, a bucket left marked
    /// writing, a used way after a free one. Empty after every completed
    /// write.
    pub fn mirror_disagreements(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let (mut keys, mut keys6) = (BTreeSet::new(), BTreeSet::new());
        for (entry, value) in self.nets_values()? {
            match ebpf_mirror::key_of(&entry) {
                MirrorKey::V4(key) => keys.insert(key),
                MirrorKey::V6(key) => keys6.insert(key),
            };
            match (self.mirror_probe(&entry), mirrored(&value.untagged())) {
                (Mirrored::Found(got), want) if got == want => {}
                (Mirrored::Unsure, _) => {}
                (got, want) => out.push(format!("{entry:?}: mirror {got:?}, hash map {want:?}")),
            }
        }
        let (contents, contents6) = self.mirror_contents();
        for (key, (bucket, slot)) in &contents.entries {
            if !keys.contains(key) {
                out.push(format!(
                    "key {key:#x} (bucket {bucket}, slot {slot:?}) is mirrored, not in {MAP_ALLOW_NETS}"
                ));
            }
        }
        for (key, (bucket, slot)) in &contents6.entries {
            if !keys6.contains(key) {
                out.push(format!(
                    "key {key:x?} (bucket {bucket}, slot {slot:?}) is mirrored, not in {MAP_ALLOW_NETS}"
                ));
            }
        }
        for (family, writing, holes) in [
            ("IPv4", contents.writing, contents.holes),
            ("IPv6", contents6.writing, contents6.holes),
        ] {
            if writing != 0 {
                out.push(format!("{family}: {writing} buckets left marked writing"));
            }
            if holes != 0 {
                out.push(format!(
                    "{family}: {holes} mirrored entries after a free way, which the kernel does not read"
                ));
            }
        }
        Ok(out)
    }

    /// The mirrors' content, IPv4 then IPv6 (tests, `status`).
    pub fn mirror_contents(&self) -> (MirrorContents<u64>, MirrorContents<Key6>) {
        (self.mirror.contents(), self.mirror6.contents())
    }

    /// Test hook: removes `entry` from `DW_ALLOW_NETS` and leaves its
    /// mirror, as no dockwall write does: what the kernel then decides
    /// shows which of the two it read.
    #[doc(hidden)]
    pub fn remove_net_behind_mirror(&mut self, entry: &AllowEntry) -> anyhow::Result<()> {
        self.allow_nets
            .remove(&net_key(entry))
            .with_context(|| format!("removing {entry:?} from {MAP_ALLOW_NETS}"))
    }

    /// Test hook: leaves `entry`'s bucket as a writer killed mid-write does.
    #[doc(hidden)]
    pub fn abandon_mirror_write(&mut self, entry: &AllowEntry) {
        match ebpf_mirror::key_of(entry) {
            MirrorKey::V4(key) => self.mirror.abandon_write(key),
            MirrorKey::V6(key) => self.mirror6.abandon_write(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(port: u16, net: &str) -> AllowEntry {
        AllowEntry {
            port,
            proto: Proto::Tcp,
            net: net.parse().unwrap(),
        }
    }

    #[test]
    fn a_group_is_looked_up_by_length_until_it_uses_more_lengths_than_a_slot_holds() {
        let nets = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "10.2.0.0/16"];
        let place = place_for(nets.iter().map(|n| e(80, n)).collect::<Vec<_>>().iter());
        let Place::Nets(slot) = place else {
            panic!("{place:?}")
        };
        assert_eq!((slot.n, &slot.lens[..3]), (3, &[32u8, 16, 8][..]));
        let many: Vec<AllowEntry> = (0..=ALLOW_MAX_LENS as u8)
            .map(|len| e(80, &format!("10.0.0.0/{}", 8 + len)))
            .collect();
        assert!(matches!(
            place_for(many.iter().take(ALLOW_MAX_LENS)),
            Place::Nets(_)
        ));
        assert_eq!(place_for(many.iter()), Place::Trie);
        assert_eq!(place_for(std::iter::empty()), Place::Trie);
    }

    #[test]
    fn group_entries_is_exactly_one_group() {
        let map: BTreeMap<AllowEntry, u64> = [
            e(79, "10.0.0.0/8"),
            e(80, "0.0.0.0/0"),
            e(80, "10.0.0.0/8"),
            e(80, "::/0"),
            e(80, "2001:db8::/32"),
            AllowEntry {
                proto: Proto::Udp,
                ..e(80, "10.0.0.0/8")
            },
            e(81, "0.0.0.0/0"),
        ]
        .into_iter()
        .map(|e| (e, 0))
        .collect();
        let v4: Vec<String> = group_entries(&map, (80, Proto::Tcp, false))
            .map(|(e, _)| e.net.to_string())
            .collect();
        assert_eq!(v4, ["0.0.0.0/0", "10.0.0.0/8"]);
        let v6: Vec<String> = group_entries(&map, (80, Proto::Tcp, true))
            .map(|(e, _)| e.net.to_string())
            .collect();
        assert_eq!(v6, ["::/0", "2001:db8::/32"]);
        assert_eq!(group_entries(&map, (80, Proto::Udp, true)).count(), 0);
    }
}
