//! A `BPF_F_MMAPABLE` array map mapped into this process, as words.
//!
//! What the kernel reads while userspace changes it goes through such a
//! mapping, where each 8-byte word is written with one atomic store: the
//! bpf syscall's update copies a value with `memcpy`, which need not be
//! one store, so a program could read a mix of an old and a new value.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use anyhow::Context as _;
use aya::maps::MapData;

/// The whole map, shared with the kernel.
pub struct MappedWords {
    words: NonNull<u64>,
    len: usize,
    /// Keeps the map open while it is mapped.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory, owned by this value; all
// access goes through atomics.
unsafe impl Send for MappedWords {}
// SAFETY: as above.
unsafe impl Sync for MappedWords {}

impl MappedWords {
    /// Maps `map` (named `name`, `len` words long) read-write.
    pub fn new(map: MapData, len: usize, name: &str) -> anyhow::Result<Self> {
        let bytes = len * size_of::<u64>();
        // SAFETY: a fresh shared mapping of the map's memory; the kernel
        // checks the length against the map and that it is mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!(
                    "mapping {name} (mmap of {bytes} bytes; a pin from an older dockwall without BPF_F_MMAPABLE?)"
                )
            });
        }
        let words = NonNull::new(ptr.cast::<u64>())
            .ok_or_else(|| anyhow::anyhow!("mmap of {name} returned NULL"))?;
        Ok(MappedWords {
            words,
            len,
            _map: map,
        })
    }

    /// Word `i`.
    pub fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len, "word {i} of a map of {}", self.len);
        // SAFETY: in bounds (checked above) of a mapping that lives as long
        // as `self`, 8-byte aligned (page-aligned base); the kernel reads
        // it concurrently, so only atomics touch it.
        unsafe { AtomicU64::from_ptr(self.words.as_ptr().add(i)) }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * size_of::<u64>()) };
    }
}
