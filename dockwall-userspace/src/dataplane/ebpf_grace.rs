//! Waiting, from userspace, until every program run that started before
//! now has finished: an RCU grace period.
//!
//! A packet's lookup reads a group's slot in `DW_ALLOW_LENS`, then probes
//! the place the slot names. When a group moves between the hash map and
//! the trie, userspace writes the new place, flips the slot, then empties
//! the old place; a program that read the slot before the flip may still
//! probe the old place after that. So between the flip and the removals
//! userspace waits for the programs running now to finish (tc and XDP
//! programs, and BPF_PROG_TEST_RUN, run under `rcu_read_lock`).
//!
//! The bpf syscall has no command for that wait, but an update of a
//! map-in-map element makes one (`maybe_wait_bpf_programs` calls
//! `synchronize_rcu`, since Linux 5.0), so that userspace knows no program
//! still sees the old inner map. The kernel's own selftests wait this way.
//! Here: a one-element `BPF_MAP_TYPE_ARRAY_OF_MAPS`, private to this
//! process, updated with the same inner map each time.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::Context as _;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The head of `union bpf_attr` for BPF_MAP_CREATE (the kernel zero-fills
/// what a shorter attr leaves out).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` for
    // `cmd`, of the size given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn create(attr: &MapCreateAttr, what: &str) -> anyhow::Result<OwnedFd> {
    let fd =
        bpf(BPF_MAP_CREATE, attr).with_context(|| format!("creating {what} (bpf_map_create)"))?;
    let fd = i32::try_from(fd).context("bpf_map_create returned a fd past i32")?;
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The map-in-map whose update waits for a grace period.
pub struct Grace {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl Grace {
    pub fn new() -> anyhow::Result<Self> {
        let inner = create(
            &MapCreateAttr {
                map_type: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 4,
                max_entries: 1,
                ..Default::default()
            },
            "the inner map of the grace-period map",
        )?;
        let outer = create(
            &MapCreateAttr {
                map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
                key_size: 4,
                value_size: 4,
                max_entries: 1,
                inner_map_fd: inner.as_raw_fd() as u32,
                ..Default::default()
            },
            "the grace-period map (an array of maps)",
        )?;
        Ok(Grace { outer, inner })
    }

    /// Returns once every program run that started before the call has
    /// finished.
    pub fn wait(&self) -> anyhow::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        let attr = MapUpdateAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &attr)
            .context("waiting for running programs (bpf_map_update_elem of an array of maps)")?;
        Ok(())
    }
}
