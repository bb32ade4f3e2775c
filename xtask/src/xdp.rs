//! `load --hook xdp` end to end, on the veths of the lab's clients (native
//! XDP in the veth driver): the refusals, which change nothing; the core
//! flow and the operator's tools at XDP; what only the eBPF dataplane shows
//! (status, the programs on the interface, the pinned link across kill -9);
//! a live switch between the hooks; unload.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    e2e::{Report, blocked, http_is, retry},
    lab::{Client, Dockerd, Dockwall},
    util::output,
};

/// The pin dockwall keeps an interface's XDP link under.
fn xdp_pin(iface: &str) -> String {
    format!("/sys/fs/bpf/dockwall/link_xdp_{iface}")
}

pub fn run(
    r: &mut Report,
    dockerd: &Dockerd,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    if !crate::util::kernel_has_xdp_hook() {
        println!("e2e: xdp: skipped, --hook xdp needs Linux 5.18");
        return Ok(());
    }
    refusals(r, dw, a, b)?;
    // Everything below with --hook xdp on every load of the eBPF filter.
    dw.set_hook(Some("xdp"));
    r.set_label("xdp");
    let result = (|| {
        crate::e2e::core(r, dockerd, dw, a, b)?;
        crate::operations::at_xdp(r, dw, a, b)?;
        only_ebpf(r, dw, a, b)
    })();
    r.set_label("");
    dw.set_hook(None);
    result
}

/// Nothing of dockwall on the host: no pins, no rules, no state.
fn nothing_installed(dw: &Dockwall) -> anyhow::Result<()> {
    if Path::new("/sys/fs/bpf/dockwall").exists() {
        bail!("/sys/fs/bpf/dockwall exists");
    }
    if crate::e2e::iptables_has_dockwall() || crate::e2e::nft_table_present() {
        bail!("dockwall rules are installed");
    }
    let (code, out, _) = dw.run(&["status"])?;
    if code == 0 {
        bail!("status says in force: {out}");
    }
    Ok(())
}

/// The `dockwall: error:` lines of a refusal.
fn error_lines(err: &str) -> Vec<&str> {
    err.lines()
        .filter(|l| l.starts_with("dockwall: error:"))
        .collect()
}

fn refusals(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&dw.config);
    dw.ok(&["allow", &a.addr4, "--port", "8081"])?;

    // A bridge is Ethernet to dockwall but has no native XDP (no ndo_bpf):
    // only the attach can tell, after the maps and rules are filled.
    let bridge = Bridge::new("dwxbr0")?;
    let (code, _, err) = dw.run(&[
        "load", "--iface", &a.host_if, "--iface", &bridge.0, "--hook", "xdp",
    ])?;
    let want = "dwxbr0 (bridge device) has no native XDP support; load with --hook tc";
    r.expect(
        "xdp: a driver without native XDP is refused in one line naming the interface and what to do",
        code != 0 && error_lines(&err).len() == 1 && error_lines(&err)[0].contains(want),
        || format!("exit {code}: {err}"),
    );
    r.check(
        "xdp: the refused load leaves nothing behind (the interface attached before it too)",
        nothing_installed(dw).and_then(|()| crate::e2e::no_tc_programs(&[&a.host_if])),
    );
    drop(bridge);

    // Someone else's XDP program on b's interface.
    let foreign = ForeignXdp::attach(&b.host_if)?;
    let id = xdp_prog(&b.host_if)?.map(|(id, _)| id).unwrap_or(0);
    let (code, _, err) = dw.run(&[
        "load", "--iface", &a.host_if, "--iface", &b.host_if, "--hook", "xdp",
    ])?;
    let want = format!(
        "{} already has XDP program id {id} ({}) attached",
        b.host_if,
        ForeignXdp::NAME
    );
    r.expect(
        "xdp: another XDP program is refused in one line naming its id and name",
        code != 0 && error_lines(&err).len() == 1 && error_lines(&err)[0].contains(&want),
        || format!("want {want:?}; exit {code}: {err}"),
    );
    r.check("xdp: the refusal changed nothing", nothing_installed(dw));
    r.expect(
        "xdp: the other program is still attached",
        xdp_prog(&b.host_if)?.is_some_and(|(i, n)| i == id && n == ForeignXdp::NAME),
        || format!("{:?}", xdp_prog(&b.host_if)),
    );
    drop(foreign);

    let (code, _, err) = dw.run(&["load", "--iface", &a.host_if, "--hook", "xdp", "--no-ebpf"])?;
    r.expect(
        "xdp: --hook xdp with --no-ebpf is refused, naming both",
        code != 0 && err.contains("--hook xdp") && err.contains("--no-ebpf"),
        || err.clone(),
    );
    let (code, _, err) = dw.run(&["load", "--iface", &a.host_if, "--hook", "ebpf"])?;
    r.expect(
        "xdp: an unknown --hook is refused, naming the choices",
        code != 0 && err.contains("ebpf") && err.contains("tc") && err.contains("xdp"),
        || err.clone(),
    );
    Ok(())
}

/// At XDP with the fallback off: the eBPF decision alone, seen from the
/// kernel's side too.
fn only_ebpf(r: &mut Report, dw: &Dockwall, a: &Client, b: &Client) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&dw.config);
    dw.ok(&["allow", &a.addr4, "--port", "8081"])?;
    let a8081 = format!("{}:8081", a.host4);
    let b8081 = format!("{}:8081", b.host4);
    let ifaces = [a.host_if.as_str(), b.host_if.as_str()];
    let mut loaded = dw.load_with(&ifaces, &["--no-iptables"], None)?;
    r.check(
        "xdp alone: allowed source reaches web1",
        http_is(a, &a8081, "web1"),
    );
    r.check("xdp alone: other source is blocked", blocked(b, &b8081));
    let status = status_json(dw)?;
    r.expect(
        "xdp alone: status --json gives each interface's hook as xdp, attached",
        status["interfaces"].as_array().is_some_and(|i| {
            i.len() == 2
                && i.iter()
                    .all(|i| i["hook"] == "xdp" && i["attached"] == true)
        }) && status["counters"]["dropped"].as_u64().unwrap_or(0) >= 1,
        || status.to_string(),
    );
    r.check(
        "xdp alone: dw_xdp at XDP and dw_egress at tc egress; no tc ingress program",
        programs_are(&ifaces, Hook::Xdp),
    );

    loaded.kill9();
    r.check(
        "xdp: after kill -9 the pinned XDP link holds: other source still blocked",
        blocked(b, &b8081),
    );
    r.expect(
        "xdp: after kill -9 the XDP link is still pinned and dw_xdp attached",
        Path::new(&xdp_pin(&b.host_if)).exists()
            && xdp_prog(&b.host_if)?.is_some_and(|(_, n)| n == "dw_xdp"),
        String::new,
    );
    // A live switch from the killed daemon's pinned XDP filter to tc: tc is
    // attached before XDP goes. Then back, from a stopped daemon's filter.
    loaded.hand_over()?;
    dw.set_hook(Some("tc"));
    let loaded = dw.load_with(&ifaces, &["--no-iptables"], None)?;
    r.check(
        "switch xdp -> tc: dw_ingress at tc, no XDP program left",
        programs_are(&ifaces, Hook::Tc),
    );
    r.check("switch xdp -> tc: other source blocked", blocked(b, &b8081));
    r.check(
        "switch xdp -> tc: allowed source gets in",
        http_is(a, &a8081, "web1"),
    );
    loaded.hand_over()?;
    dw.set_hook(Some("xdp"));
    let loaded = dw.load_with(&ifaces, &["--no-iptables"], None)?;
    r.check(
        "switch tc -> xdp: dw_xdp at XDP, no tc ingress program left",
        programs_are(&ifaces, Hook::Xdp),
    );
    r.check("switch tc -> xdp: other source blocked", blocked(b, &b8081));
    r.check(
        "switch tc -> xdp: allowed source gets in",
        http_is(a, &a8081, "web1"),
    );
    drop(loaded);
    r.check(
        "xdp: unload leaves no XDP program, no tc program, no pin",
        (|| {
            retry(|| crate::e2e::no_tc_programs(&ifaces))?;
            for iface in ifaces {
                if let Some(p) = xdp_prog(iface)? {
                    bail!("{iface} still has XDP program {p:?}");
                }
            }
            if Path::new("/sys/fs/bpf/dockwall").exists() {
                bail!("/sys/fs/bpf/dockwall left");
            }
            Ok(())
        })(),
    );
    r.check(
        "xdp: after unload everyone gets in again",
        http_is(b, &b8081, "web1"),
    );
    Ok(())
}

fn status_json(dw: &Dockwall) -> anyhow::Result<Value> {
    let (_, out, err) = dw.run(&["status", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("status --json: {out}{err}"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Tc,
    Xdp,
}

/// The ingress decision at `hook` only, the egress classifier always: XDP
/// per interface as iproute2 reads it; tcx links counted by program name
/// (this bpftool names no tcx interface; the lab is their only user).
fn programs_are(ifaces: &[&str], hook: Hook) -> anyhow::Result<()> {
    for iface in ifaces {
        let at_xdp = xdp_prog(iface)?;
        let ok = match hook {
            Hook::Xdp => at_xdp.as_ref().is_some_and(|(_, n)| n == "dw_xdp"),
            Hook::Tc => at_xdp.is_none(),
        };
        if !ok {
            bail!("{iface}: XDP program {at_xdp:?}");
        }
    }
    let names = prog_names()?;
    let links: Value = bpftool_json(&["link", "show"])?;
    let count = |name: &str| {
        links.as_array().map_or(0, |links| {
            links
                .iter()
                .filter(|l| l["type"] == 11 || l["type"] == "tcx")
                .filter(|l| {
                    l["prog_id"].as_u64().and_then(|id| names.get(&id)) == Some(&name.to_string())
                })
                .count()
        })
    };
    let want_ingress = if hook == Hook::Tc { ifaces.len() } else { 0 };
    let (ingress, egress) = (count("dw_ingress"), count("dw_egress"));
    if ingress != want_ingress || egress != ifaces.len() {
        bail!(
            "tcx links: {ingress} dw_ingress (want {want_ingress}), {egress} dw_egress (want {})",
            ifaces.len()
        );
    }
    Ok(())
}

fn bpftool_json(args: &[&str]) -> anyhow::Result<Value> {
    let out = output(Command::new("bpftool").arg("-j").args(args))?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool -j {}", args.join(" ")))
}

/// Every loaded program's name by id.
fn prog_names() -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    let progs = bpftool_json(&["prog", "show"])?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect())
}

/// The XDP program on `iface` (id, name), as iproute2 reads it.
pub(crate) fn xdp_prog(iface: &str) -> anyhow::Result<Option<(u64, String)>> {
    let out = output(Command::new("ip").args(["-j", "-d", "link", "show", "dev", iface]))?;
    let links: Value = serde_json::from_slice(&out.stdout).context("ip -j link show")?;
    let prog = &links[0]["xdp"]["prog"];
    Ok(prog["id"]
        .as_u64()
        .map(|id| (id, prog["name"].as_str().unwrap_or("").to_string())))
}

/// A bridge: an Ethernet device whose driver has no native XDP.
struct Bridge(String);

impl Bridge {
    fn new(name: &str) -> anyhow::Result<Self> {
        let _ = output(Command::new("ip").args(["link", "del", name]));
        crate::util::run(Command::new("ip").args(["link", "add", name, "type", "bridge"]))?;
        let bridge = Bridge(name.to_string());
        crate::util::run(Command::new("ip").args(["link", "set", name, "up"]))?;
        Ok(bridge)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = output(Command::new("ip").args(["link", "del", &self.0]));
    }
}

/// Another tool's XDP program (returns XDP_PASS), attached in native mode
/// through a bpf_link this process holds: closing it detaches. Loaded with
/// the bpf syscall directly, two instructions, no object file.
struct ForeignXdp {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl ForeignXdp {
    const NAME: &'static str = "foreign_xdp";

    fn attach(iface: &str) -> anyhow::Result<Self> {
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_XDP: u32 = 6;
        const BPF_XDP: u32 = 37;
        const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
        // r0 = XDP_PASS (2); exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
        // log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16]
        // (offset 48), prog_ifindex, expected_attach_type (offset 68).
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..48 + Self::NAME.len()].copy_from_slice(Self::NAME.as_bytes());
        attr[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
        // SAFETY: attr is a valid bpf_attr of the size passed; the pointers in
        // it outlive the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("bpf(BPF_PROG_LOAD) of foreign_xdp");
        }
        // SAFETY: a new fd we own.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let cname = std::ffi::CString::new(iface)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        // BPF_LINK_CREATE: prog_fd, target_ifindex, attach_type, flags.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
        attr[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
        // SAFETY: as above.
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("bpf(BPF_LINK_CREATE) of foreign_xdp on {iface}"));
        }
        // SAFETY: a new fd we own.
        let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(ForeignXdp {
            _link: link,
            _prog: prog,
        })
    }
}
