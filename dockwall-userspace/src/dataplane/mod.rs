//! The dataplanes that enforce one compiled policy: the eBPF filter, and the
//! iptables or nftables fallback compiled from the same model. [`sync`] is
//! the one path from policy to every installed dataplane.

pub mod ebpf;
pub mod ebpf_allow;
pub mod ebpf_grace;
pub mod ebpf_hits;
pub mod ebpf_mirror;
pub mod ebpf_mmap;
pub mod fallback;
pub mod iptables;
pub mod nftables;
pub mod nftables_netlink;
pub mod sync;
