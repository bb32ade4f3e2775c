//! Empty library target: `dockwall-userspace` build-depends on this crate so
//! cargo rebuilds the embedded eBPF object when its sources change. The
//! program itself is the `dockwall` binary target in `main.rs`.
#![no_std]
