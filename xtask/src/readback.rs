//! What each place holds, read back from the kernel and the files the way
//! an admin would (bpftool, ipset, nft, `dockwall list --json`), as sets the
//! tests compare with each other and with their model.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{lab::Dockwall, util::capture};

/// One allowance as `dockwall list --json` names it: (source, target).
pub type Saved = BTreeSet<(String, String)>;

/// One kernel or fallback entry: (published port, "tcp"|"udp", network).
pub type Entry = (u16, &'static str, String);

/// The saved allowances (the file and the daemon's journal).
pub fn saved(dw: &Dockwall) -> anyhow::Result<Saved> {
    let (code, out, err) = dw.run(&["list", "--json"])?;
    if code != 0 {
        bail!("dockwall list --json: exit {code}: {err}");
    }
    let rows: serde_json::Value = serde_json::from_str(&out).context("parsing list --json")?;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["source"].as_str().unwrap_or_default().to_string(),
                r["target"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// A network as both tools print it, with the prefix always written.
pub fn net(text: &str) -> String {
    if text.contains('/') {
        text.to_string()
    } else if text.contains(':') {
        format!("{text}/128")
    } else {
        format!("{text}/32")
    }
}

fn proto_name(n: u8) -> &'static str {
    if n == 17 { "udp" } else { "tcp" }
}

/// The maps that hold eBPF allowances: the per-length hash and the trie
/// fallback. Their keys are the same bytes.
pub const EBPF_ALLOW_MAPS: [&str; 2] = [
    "/sys/fs/bpf/dockwall/DW_ALLOW_NETS",
    "/sys/fs/bpf/dockwall/DW_ALLOW",
];

/// The eBPF allowance maps' entries (bpftool's hex key bytes: prefix
/// length u32, port u16, proto, family, 16 address bytes).
pub fn ebpf_entries() -> anyhow::Result<BTreeSet<Entry>> {
    let mut out = BTreeSet::new();
    for map in EBPF_ALLOW_MAPS {
        ebpf_map_entries(map, &mut out)?;
    }
    Ok(out)
}

fn ebpf_map_entries(map: &str, out: &mut BTreeSet<Entry>) -> anyhow::Result<()> {
    let dump = capture(Command::new("bpftool").args(["map", "dump", "pinned", map, "-j"]))?;
    let rows: serde_json::Value = serde_json::from_str(&dump).context("parsing bpftool -j")?;
    for row in rows.as_array().into_iter().flatten() {
        let bytes: Vec<u8> = row["key"]
            .as_array()
            .context("bpftool row without a key")?
            .iter()
            .filter_map(|b| b.as_str())
            .filter_map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).ok())
            .collect();
        if bytes.len() < 24 {
            bail!("short key in {map}: {bytes:?}");
        }
        let prefix = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) - 32;
        let port = u16::from_le_bytes([bytes[4], bytes[5]]);
        let addr: [u8; 16] = bytes[8..24].try_into().context("address bytes")?;
        let net = if bytes[7] == 6 {
            format!("{}/{prefix}", Ipv6Addr::from(addr))
        } else {
            format!(
                "{}/{prefix}",
                Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])
            )
        };
        out.insert((port, proto_name(bytes[6]), net));
    }
    Ok(())
}

/// Members of one of dockwall's ipsets (empty when it does not exist).
pub fn ipset_members(name: &str) -> BTreeSet<String> {
    let text = capture(Command::new("ipset").args(["list", name])).unwrap_or_default();
    text.lines()
        .skip_while(|l| !l.starts_with("Members:"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| net(l.split_whitespace().next().unwrap_or_default()))
        .collect()
}

/// The members of every dockwall ipset of a family, as entries.
pub fn ipset_entries(ports: &[(u16, &'static str)]) -> BTreeSet<Entry> {
    let mut out = BTreeSet::new();
    for &(port, proto) in ports {
        for family in [4, 6] {
            for m in ipset_members(&format!("dockwall-{family}-{proto}-{port}")) {
                out.insert((port, proto, m));
            }
        }
    }
    out
}
