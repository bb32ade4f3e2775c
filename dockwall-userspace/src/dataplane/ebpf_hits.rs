//! The allowances' hit counters: a slot each in the per-CPU array
//! `DW_HIT_COUNTS`, named in the allowance's value, and the bitmap of taken
//! slots, `DW_HIT_SLOTS`.
//!
//! The kernel counts a hit on the matching CPU's counter at the slot its
//! value names, an array load; the slot's number is the allowance's, for
//! as long as it exists, wherever it is kept (a group moving between the
//! hash and the trie takes its values, slots and all). Userspace gives out
//! the slots:
//!
//! - a new allowance takes a free slot: its bit is written first, then the
//!   allowance that names it;
//! - an allowance that goes is removed, then its slot's counters zeroed,
//!   then its bit cleared: a free slot's counters are zero;
//! - a full sync rebuilds the bitmap from the allowances it keeps, gives a
//!   slot to any allowance without one (an older dockwall's, carrying its
//!   shared count into it) or sharing one (a hand edit), and frees what a
//!   crash between two steps left taken.
//!
//! So a crash leaves at worst a slot taken that no allowance names (freed
//! by the next full sync), never two allowances on one slot. With every
//! slot taken, a new allowance counts shared in its value, as an older
//! dockwall's did.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::maps::{Map, MapData, MapError, PerCpuHashMap, PerCpuValues};
use dockwall_common::{
    AllowNetKey, AllowValue, HIT_SLOT_ELEMENTS, HIT_SLOTS, HIT_SLOTS_PER_WORDS, HitSlotWords,
    LEGACY_MAPS_ALLOW_HITS, MAP_HIT_COUNTS, MAP_HIT_SLOTS,
};

use super::ebpf::{Maps, already_gone, map_pin};
use crate::policy::AllowEntry;

/// The slot of `DW_HIT_COUNTS` an allowance counts in, if any: the one its
/// value names, when it lies in the map (a slot past it, which only a hand
/// edit writes, counts nowhere: the kernel's array lookup fails and it
/// counts shared).
pub(super) fn counting_slot(value: &AllowValue) -> Option<u32> {
    value.hit_slot().filter(|s| *s < HIT_SLOTS)
}

/// `DW_HIT_SLOTS` as read: a bit per slot, 1 taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SlotBitmap {
    elements: Vec<HitSlotWords>,
    /// Where the search for a free slot starts: slots below are taken.
    next_free: u32,
}

impl SlotBitmap {
    /// No slot taken.
    pub(super) fn empty() -> Self {
        SlotBitmap {
            elements: vec![HitSlotWords::default(); HIT_SLOT_ELEMENTS as usize],
            next_free: 0,
        }
    }

    fn place(slot: u32) -> (usize, usize, u64) {
        let element = (slot / HIT_SLOTS_PER_WORDS) as usize;
        let within = slot % HIT_SLOTS_PER_WORDS;
        (element, (within / 64) as usize, 1 << (within % 64))
    }

    pub(super) fn is_taken(&self, slot: u32) -> bool {
        let (e, w, bit) = Self::place(slot);
        slot < HIT_SLOTS && self.elements[e].words[w] & bit != 0
    }

    /// Marks `slot` taken; false when it was already (or is past the map).
    pub(super) fn take(&mut self, slot: u32) -> bool {
        if slot >= HIT_SLOTS || self.is_taken(slot) {
            return false;
        }
        let (e, w, bit) = Self::place(slot);
        self.elements[e].words[w] |= bit;
        true
    }

    fn release(&mut self, slot: u32) {
        if slot < HIT_SLOTS {
            let (e, w, bit) = Self::place(slot);
            self.elements[e].words[w] &= !bit;
            self.next_free = self.next_free.min(slot);
        }
    }

    /// The taken slots, lowest first.
    pub(super) fn taken_slots(&self) -> impl Iterator<Item = u32> + '_ {
        (0..HIT_SLOTS).filter(|s| self.is_taken(*s))
    }

    /// Takes the lowest free slot, if any.
    pub(super) fn take_free(&mut self) -> Option<u32> {
        let mut slot = self.next_free;
        while slot < HIT_SLOTS {
            let (e, w, _) = Self::place(slot);
            // The bits below `slot` in its word count as taken.
            let below = (1u64 << (slot % 64)) - 1;
            let word = self.elements[e].words[w] | below;
            if word != u64::MAX {
                let free = slot - slot % 64 + (!word).trailing_zeros();
                self.take(free);
                self.next_free = free + 1;
                return Some(free);
            }
            slot = (slot / 64 + 1) * 64;
        }
        self.next_free = HIT_SLOTS;
        None
    }
}

impl Maps {
    /// `DW_HIT_SLOTS` as the kernel holds it.
    pub(super) fn read_slots(&self) -> anyhow::Result<SlotBitmap> {
        let mut bitmap = SlotBitmap::empty();
        for (index, element) in bitmap.elements.iter_mut().enumerate() {
            let index = index as u32;
            *element = self.hit_slots.get(&index, 0).with_context(|| {
                format!("reading {MAP_HIT_SLOTS}[{index}] (bpf_map_lookup_elem)")
            })?;
        }
        Ok(bitmap)
    }

    /// The slots `DW_HIT_SLOTS` says are taken.
    pub fn taken_slots(&self) -> anyhow::Result<std::collections::BTreeSet<u32>> {
        Ok(self.read_slots()?.taken_slots().collect())
    }

    /// Writes every element of `bitmap` that differs from `was` (all of
    /// them without `was`).
    pub(super) fn write_slots(
        &mut self,
        bitmap: &SlotBitmap,
        was: Option<&SlotBitmap>,
    ) -> anyhow::Result<()> {
        for (index, element) in bitmap.elements.iter().enumerate() {
            if was.is_some_and(|was| was.elements[index] == *element) {
                continue;
            }
            self.write_slot_element(bitmap, index)?;
        }
        Ok(())
    }

    fn write_slot_element(&mut self, bitmap: &SlotBitmap, index: usize) -> anyhow::Result<()> {
        let at = index as u32;
        self.hit_slots
            .set(at, bitmap.elements[index], 0)
            .with_context(|| format!("writing {MAP_HIT_SLOTS}[{at}] (bpf_map_update_elem)"))
    }

    /// Takes a free slot for a new allowance, in `bitmap` and in the map,
    /// with its counters set to `count` (on CPU 0) and zero. A free slot's
    /// counters are zero already ([`Maps::free_slot`]); written again here
    /// for a packet that counted after its allowance was removed (RCU), as
    /// one edit's single write costs nothing. `None`: every slot is taken.
    pub(super) fn new_slot(
        &mut self,
        bitmap: &mut SlotBitmap,
        count: u64,
    ) -> anyhow::Result<Option<u32>> {
        let Some(slot) = bitmap.take_free() else {
            return Ok(None);
        };
        self.write_slot_element(bitmap, SlotBitmap::place(slot).0)?;
        self.set_slot_counts(slot, count)?;
        Ok(Some(slot))
    }

    /// Frees the slot of an allowance that is gone, if it had one: its
    /// counters zeroed, then its bit cleared (a crash in between leaves it
    /// taken, for the next full sync to free).
    pub(super) fn free_slot(
        &mut self,
        bitmap: &mut SlotBitmap,
        value: &AllowValue,
    ) -> anyhow::Result<()> {
        if let Some(slot) = value.hit_slot()
            && bitmap.is_taken(slot)
        {
            self.set_slot_counts(slot, 0)?;
            bitmap.release(slot);
            self.write_slot_element(bitmap, SlotBitmap::place(slot).0)?;
        }
        Ok(())
    }

    /// The value an allowance is written with (untagged), expiring at
    /// `expires_ns`: counting in `carried`'s slot when it has one; else in
    /// a new slot with `carried`'s shared count moved into it; shared where
    /// no slot is free.
    pub(super) fn counter_for(
        &mut self,
        bitmap: &mut SlotBitmap,
        carried: Option<AllowValue>,
        expires_ns: u64,
    ) -> anyhow::Result<AllowValue> {
        if let Some(value) = carried
            && counting_slot(&value).is_some()
        {
            return Ok(AllowValue {
                expires_ns,
                ..value.untagged()
            });
        }
        let count = carried.map_or(0, |v| v.count());
        Ok(match self.new_slot(bitmap, count)? {
            Some(slot) => AllowValue::counted_in_slot(slot, expires_ns),
            None => AllowValue::counted_shared(count, expires_ns),
        })
    }

    /// Sets `slot`'s counters: `count` on CPU 0, zero on the others.
    pub(super) fn set_slot_counts(&mut self, slot: u32, count: u64) -> anyhow::Result<()> {
        let mut values = vec![0u64; self.possible_cpus];
        values[0] = count;
        self.write_slot_counts(slot, values)
    }

    fn write_slot_counts(&mut self, slot: u32, values: Vec<u64>) -> anyhow::Result<()> {
        let values =
            PerCpuValues::try_from(values).map_err(|e| anyhow!("counts of slot {slot}: {e}"))?;
        self.hit_counts
            .set(slot, values, 0)
            .with_context(|| format!("writing {MAP_HIT_COUNTS}[{slot}] (bpf_map_update_elem)"))
    }

    /// What each CPU counted at `slot` (index: CPU id).
    pub(super) fn slot_counts(&self, slot: u32) -> anyhow::Result<Vec<u64>> {
        let values = self.hit_counts.get(&slot, 0).with_context(|| {
            format!("reading {MAP_HIT_COUNTS}[{slot}] (bpf_map_lookup_elem per CPU)")
        })?;
        Ok(values.iter().copied().collect())
    }

    /// `value` with its `hits` the allowance's whole count (explain's
    /// read-back): its shared count and what every CPU counted in its slot.
    pub(super) fn with_total_hits(&self, value: AllowValue) -> anyhow::Result<AllowValue> {
        Ok(AllowValue {
            hits: self.hits_of(&value)?,
            expires_ns: value.expires_ns,
        })
    }

    /// An allowance's hits: its shared count and what every CPU counted in
    /// its slot.
    pub(super) fn hits_of(&self, value: &AllowValue) -> anyhow::Result<u64> {
        let per_cpu = match counting_slot(value) {
            Some(slot) => self.slot_counts(slot)?.iter().sum(),
            None => 0,
        };
        Ok(value.count() + per_cpu)
    }

    /// Moves the counts of an older dockwall's hit-counter maps, if their
    /// pins are there, into the slots of the allowances they count, then
    /// removes the pins. Each key is deleted once its count is in, so a
    /// crash midway repeats one key's count at most. Counts of allowances
    /// that are gone (or have no slot) are dropped with their key. Call
    /// after the new program is attached: the old one counts until then.
    pub fn drain_legacy_hits(&mut self) -> anyhow::Result<()> {
        for name in LEGACY_MAPS_ALLOW_HITS {
            let pin = map_pin(name);
            if !pin.exists() {
                continue;
            }
            let moved = self.drain_hits_from(&pin)?;
            println!(
                "dockwall: moved the hit counts of {moved} allowances from {} (an older dockwall's per-CPU hash) into {MAP_HIT_COUNTS}",
                pin.display()
            );
        }
        Ok(())
    }

    fn drain_hits_from(&mut self, pin: &Path) -> anyhow::Result<usize> {
        let data = MapData::from_pin(pin)
            .with_context(|| format!("opening {} (BPF_OBJ_GET)", pin.display()))?;
        let mut old: PerCpuHashMap<MapData, AllowNetKey, u64> =
            PerCpuHashMap::try_from(Map::from_map_data(data)?)
                .with_context(|| format!("{} is not a per-CPU hash map", pin.display()))?;
        let keys: Vec<AllowNetKey> = old
            .keys()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {} (bpf_map_get_next_key)", pin.display()))?;
        let values = self.allow_values()?;
        let mut moved = 0;
        for key in &keys {
            let counts = match old.get(key, 0) {
                Ok(counts) => counts.iter().copied().collect::<Vec<u64>>(),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("reading {} (bpf_map_lookup_elem)", pin.display())
                    });
                }
            };
            let slot = AllowEntry::from_key(key.prefix_len, &key.data)
                .and_then(|e| values.get(&e))
                .and_then(counting_slot);
            if let Some(slot) = slot {
                let mut sum = self.slot_counts(slot)?;
                for (s, c) in sum.iter_mut().zip(&counts) {
                    *s += c;
                }
                self.write_slot_counts(slot, sum)?;
                moved += 1;
            }
            match old.remove(key) {
                Ok(()) => {}
                Err(e) if already_gone(&e) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("removing from {} (bpf_map_delete_elem)", pin.display())
                    });
                }
            }
        }
        std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_lowest_first_and_a_freed_one_is_reused() {
        let mut bitmap = SlotBitmap::empty();
        assert!(bitmap.take(0) && bitmap.take(2) && bitmap.take(64));
        assert!(!bitmap.take(2), "taken twice");
        assert!(!bitmap.take(HIT_SLOTS), "past the map");
        let got: Vec<u32> = (0..3).filter_map(|_| bitmap.take_free()).collect();
        assert_eq!(got, [1, 3, 4]);
        bitmap.release(2);
        assert_eq!(bitmap.take_free(), Some(2));
        assert_eq!(bitmap.take_free(), Some(5));
    }

    #[test]
    fn every_slot_can_be_taken_once_then_none() {
        let mut bitmap = SlotBitmap::empty();
        for want in 0..HIT_SLOTS {
            assert_eq!(bitmap.take_free(), Some(want));
        }
        assert_eq!(bitmap.take_free(), None);
        assert!((0..HIT_SLOTS).all(|s| bitmap.is_taken(s)));
        bitmap.release(HIT_SLOTS - 1);
        bitmap.release(40_000);
        assert_eq!(bitmap.take_free(), Some(40_000));
        assert_eq!(bitmap.take_free(), Some(HIT_SLOTS - 1));
        assert_eq!(bitmap.take_free(), None);
    }
}
