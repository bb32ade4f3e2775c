//! The eBPF dataplane: loading the embedded object, attaching it to
//! interfaces, pinning, and keeping its maps equal to the policy.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
    sys::SyscallError,
    util::KernelVersion,
};
use dockwall_common::{
    ALL_MAPS, ALLOW_GROUPS, AllowKey, AllowNetKey, AllowValue, Config, GLOBAL_COARSE_CLOCK,
    GLOBAL_LOG_CPUS, GLOBAL_MIRROR_ON, HitSlotWords, LEGACY_MAPS_LENS, LEGACY_MAPS_MIRROR,
    LEGACY_MAPS_PORT_DROPS, MAP_ALLOW, MAP_ALLOW_LENS, MAP_ALLOW_MIRROR, MAP_ALLOW_MIRROR6,
    MAP_ALLOW_NETS, MAP_CONFIG, MAP_HIT_COUNTS, MAP_HIT_SLOTS, MAP_PORT_DROPS, MAP_PORTS,
    MAP_PUBLISHED, MAP_STATS, PROG_EGRESS, PROG_INGRESS, PROG_XDP, PortKey, PublishedKey,
    PublishedValue, port_drop_index, scope_bit, stat,
};
use serde::{Deserialize, Serialize};

use super::ebpf_grace::Grace;
use super::ebpf_mirror::{Mirror4, Mirror6};
use super::ebpf_mmap::MappedWords;

/// Where dockwall pins its maps and links (bpffs).
pub const PIN_DIR: &str = "/sys/fs/bpf/dockwall";
/// The bpffs mount dockwall needs.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Handle and priority of dockwall's filters on the legacy clsact path, so a
/// reload replaces them in place (no moment without a filter).
const NETLINK_HANDLE: u32 = 0xd0c;
const NETLINK_PRIORITY: u16 = 1;

/// The compiled eBPF object, embedded at build time.
#[cfg(feature = "embed-ebpf")]
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dockwall"))
}

/// Built without the object (the fuzz targets): nothing to load.
#[cfg(not(feature = "embed-ebpf"))]
pub fn object() -> &'static [u8] {
    &[]
}

/// How the classifiers are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// tcx (Linux >= 6.6) where available, else netlink.
    Auto,
    /// tcx links, pinned under /sys/fs/bpf/dockwall.
    Tcx,
    /// Legacy clsact qdisc filters (older kernels).
    Netlink,
}

impl AttachMode {
    pub fn resolve(self) -> AttachMode {
        match self {
            AttachMode::Auto => match KernelVersion::current() {
                Ok(v) if v >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
                _ => AttachMode::Netlink,
            },
            other => other,
        }
    }
}

/// Where the ingress decision runs. The egress program that notes outbound
/// UDP flows is a tc program either way (XDP has no egress hook).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// tc ingress classifier: every driver, every kernel dockwall supports.
    #[default]
    Tc,
    /// Native XDP in the driver: a denied packet is dropped before the
    /// kernel allocates an skb for it (Linux >= 5.18, a driver with native XDP).
    Xdp,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Tc => "tc",
            Hook::Xdp => "xdp",
        }
    }
}

/// The release that added bpf_xdp_load_bytes, which dw_xdp reads headers
/// beyond the linear area with.
pub const XDP_MIN_KERNEL: (u8, u8) = (5, 18);

/// Fails with a clear message unless /sys/fs/bpf is a bpffs.
pub fn check_bpffs() -> anyhow::Result<()> {
    let path = std::ffi::CString::new(BPFFS).context("BPFFS path")?;
    // SAFETY: statfs into a zeroed struct we own.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("statfs({BPFFS})"));
    }
    if fs.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "no bpffs mounted at {BPFFS}: mount it with `mount -t bpf bpf {BPFFS}` \
             (or add it to /etc/fstab) and try again"
        );
    }
    Ok(())
}

pub(super) fn map_pin(name: &str) -> PathBuf {
    Path::new(PIN_DIR).join(name)
}

fn link_pin(iface: &str, direction: &str) -> PathBuf {
    Path::new(PIN_DIR).join(format!("link_{direction}_{iface}"))
}

/// The pin of an interface's XDP link. `link_{direction}_` like the tc links,
/// so `unload` finds it by the same prefix.
const XDP_LINK: &str = "xdp";

/// The prefixes of link pins, each followed by the interface name.
pub const LINK_PIN_PREFIXES: [&str; 3] = ["link_ingress_", "link_egress_", "link_xdp_"];

/// The oldest kernel dockwall supports: Debian 11's 5.10, the oldest one
/// the platform matrix runs (`cargo xtask test --matrix`). The program needs
/// 5.8 (ring buffer, bpf_ktime_get_boot_ns); nothing older was tried.
pub const MIN_KERNEL: (u8, u8) = (5, 10);

/// Refuses a kernel older than [`MIN_KERNEL`] (or [`XDP_MIN_KERNEL`] for
/// the XDP hook), or one without what the program uses, in one line that
/// names what is missing.
pub fn check_kernel(hook: Hook) -> anyhow::Result<()> {
    let current = KernelVersion::current().context("reading the kernel's version (uname)")?;
    refuse_old_kernel(current)?;
    let (major, minor) = XDP_MIN_KERNEL;
    if hook == Hook::Xdp && current < KernelVersion::new(major, minor, 0) {
        bail!(
            "--hook xdp needs Linux {major}.{minor} or later (bpf_xdp_load_bytes) and this is {current}; load with --hook tc"
        );
    }
    // A kernel built without them (custom configs) fails the same way.
    for (map, what) in [
        (aya::maps::MapType::RingBuf, "BPF ring buffer maps"),
        (aya::maps::MapType::LpmTrie, "BPF LPM trie maps"),
    ] {
        if matches!(aya::sys::is_map_supported(map), Ok(false)) {
            bail!(
                "this kernel has no {what}, which dockwall's eBPF filter needs; load with --no-ebpf to use only the iptables/nftables fallback"
            );
        }
    }
    Ok(())
}

fn refuse_old_kernel(current: KernelVersion) -> anyhow::Result<()> {
    let (major, minor) = MIN_KERNEL;
    if current < KernelVersion::new(major, minor, 0) {
        bail!(
            "Linux {current} is older than {major}.{minor}, the oldest kernel dockwall supports (its eBPF filter needs ring buffer maps and bpf_ktime_get_boot_ns); upgrade the kernel, or load with --no-ebpf to use only the iptables/nftables fallback"
        );
    }
    Ok(())
}

/// Loads the object, reusing maps already pinned by an earlier load (so
/// allowances, counters and UDP flows survive a restart of the daemon).
pub fn load_pinned(hook: Hook) -> anyhow::Result<Ebpf> {
    check_kernel(hook)?;
    std::fs::create_dir_all(PIN_DIR).with_context(|| format!("creating {PIN_DIR}"))?;
    remove_legacy_pins()?;
    let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, map_pin(m))).collect();
    let globals = Globals::for_this_host()?;
    let mut loader = EbpfLoader::new();
    globals.set(&mut loader);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(object())
        .context("loading the dockwall eBPF object (bpf_map_create / BPF_OBJ_GET)")?;
    load_programs(&mut ebpf, hook)?;
    Ok(ebpf)
}

/// Loads the object with private, unpinned maps (tests, benchmarks).
pub fn load_unpinned(hook: Hook) -> anyhow::Result<Ebpf> {
    load_unpinned_with(hook, &Globals::for_this_host()?)
}

/// [`load_unpinned`] with these globals (the benchmark's hash-only object).
pub fn load_unpinned_with(hook: Hook, globals: &Globals) -> anyhow::Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    globals.set(&mut loader);
    let mut ebpf = loader
        .load(object())
        .context("loading the dockwall eBPF object")?;
    load_programs(&mut ebpf, hook)?;
    Ok(ebpf)
}

/// Whether the kernel reads the mirrors (`DW_MIRROR_V4`, `DW_MIRROR_V6`):
/// on x86-64 only, whose loads keep their order, as the mirrors' sequence
/// lock needs.
pub(super) const MIRROR_ON: bool = cfg!(target_arch = "x86_64");

/// The object's read-only globals, which the verifier treats as constants.
pub struct Globals {
    /// The CPUs online now, between which the kernel shares the drop-log rate.
    log_cpus: u32,
    /// 1: the kernel has bpf_ktime_get_coarse_ns (Linux 5.11).
    coarse_clock: u32,
    /// 1: the kernel reads the mirrors (x86-64; see `ebpf_mirror`).
    mirror_on: u32,
}

impl Globals {
    pub fn for_this_host() -> anyhow::Result<Self> {
        let kernel = KernelVersion::current().context("reading the kernel's version (uname)")?;
        Ok(Globals {
            log_cpus: log_cpus()?,
            coarse_clock: u32::from(kernel >= KernelVersion::new(5, 11, 0)),
            mirror_on: u32::from(MIRROR_ON),
        })
    }

    /// The same, with the kernel reading only the hash map, not the
    /// mirrors: the lookup as it was before the mirror (benchmarks).
    pub fn without_mirror(self) -> Self {
        Globals {
            mirror_on: 0,
            ..self
        }
    }

    /// Sets them on `loader`, before it loads the object.
    pub fn set<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader
            .override_global(GLOBAL_LOG_CPUS, &self.log_cpus, true)
            .override_global(GLOBAL_COARSE_CLOCK, &self.coarse_clock, true)
            .override_global(GLOBAL_MIRROR_ON, &self.mirror_on, true);
    }
}

/// The CPUs online now, between which the kernel shares the drop-log rate.
pub fn log_cpus() -> anyhow::Result<u32> {
    let cpus = aya::util::online_cpus()
        .map_err(|(path, e)| anyhow!("reading {path}: {e}"))?
        .len();
    Ok(u32::try_from(cpus.max(1)).unwrap_or(u32::MAX))
}

/// Pins an older dockwall left that this one has replaced: its per-port
/// drop counters (shared, then a per-CPU hash; now a per-CPU array under a
/// new name). Their counts start again from zero, as a Prometheus counter
/// does after a restart.
fn remove_legacy_pins() -> anyhow::Result<()> {
    let drops = LEGACY_MAPS_PORT_DROPS.map(|name| {
        (
            name,
            "per-port drop counters of an older dockwall; they are a per-CPU array now and start from zero",
        )
    });
    let lens = LEGACY_MAPS_LENS.map(|name| {
        (
            name,
            "the per-port prefix lengths of an older dockwall, which it wrote with a copy the kernel may see torn; the new map is filled from the allowances before the program is swapped",
        )
    });
    let mirror = LEGACY_MAPS_MIRROR.map(|name| {
        (
            name,
            "the IPv4 allowance mirror of an older dockwall, in a layout this one does not read; the new one is filled from the allowances before the program is swapped",
        )
    });
    for (name, why) in drops.into_iter().chain(lens).chain(mirror) {
        let legacy = map_pin(name);
        match std::fs::remove_file(&legacy) {
            Ok(()) => println!("dockwall: removed {} ({why})", legacy.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", legacy.display())),
        }
    }
    Ok(())
}

/// The tc programs always (a switch back to `--hook tc` needs the ingress
/// one at hand); dw_xdp only for the XDP hook, as older kernels refuse it.
fn load_programs(ebpf: &mut Ebpf, hook: Hook) -> anyhow::Result<()> {
    for name in [PROG_INGRESS, PROG_EGRESS] {
        program(ebpf, name)?
            .load()
            .with_context(|| format!("loading program {name} (BPF_PROG_LOAD)"))?;
    }
    if hook == Hook::Xdp {
        xdp_program(ebpf, PROG_XDP)?
            .load()
            .with_context(|| format!("loading program {PROG_XDP} (BPF_PROG_LOAD)"))?;
    }
    Ok(())
}

pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not an XDP program"))
}

pub fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a tc classifier"))
}

/// Attaches the ingress decision at `hook` and the egress classifier to
/// `iface`. Where dockwall is attached already the program is swapped in
/// place (bpf_link_update / netlink replace), and a change of hook attaches
/// the new one before it detaches the old: there is never a moment without
/// the filter.
pub fn attach(ebpf: &mut Ebpf, iface: &str, mode: AttachMode, hook: Hook) -> anyhow::Result<()> {
    match hook {
        Hook::Tc => {
            attach_tc(ebpf, iface, mode, TcAttachType::Ingress)?;
            attach_tc(ebpf, iface, mode, TcAttachType::Egress)?;
            detach_xdp(iface)
        }
        Hook::Xdp => {
            attach_xdp(ebpf, iface)?;
            attach_tc(ebpf, iface, mode, TcAttachType::Egress)?;
            detach_tc(iface, TcAttachType::Ingress)
        }
    }
}

/// The program, pin direction and verb of each tc attach point.
fn tc_point(attach_type: TcAttachType) -> (&'static str, &'static str) {
    match attach_type {
        TcAttachType::Egress => (PROG_EGRESS, "egress"),
        _ => (PROG_INGRESS, "ingress"),
    }
}

fn attach_tc(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: AttachMode,
    attach_type: TcAttachType,
) -> anyhow::Result<()> {
    let (name, direction) = tc_point(attach_type);
    let prog = program(ebpf, name)?;
    match mode {
        AttachMode::Tcx | AttachMode::Auto => attach_tcx(prog, iface, attach_type, direction),
        AttachMode::Netlink => attach_netlink(prog, iface, attach_type),
    }
}

fn attach_tcx(
    prog: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
    direction: &str,
) -> anyhow::Result<()> {
    let pin = link_pin(iface, direction);
    // A pinned link that no longer attaches anything (detached by hand, or
    // its interface was re-created) is dropped and attached afresh.
    if pin.exists() && !tcx_attached(iface, attach_type) {
        let _ = std::fs::remove_file(&pin);
    }
    match PinnedLink::from_pin(&pin) {
        Ok(old) => {
            let link = SchedClassifierLink::try_from(FdLink::from(old))
                .with_context(|| format!("{} is not a tcx link", pin.display()))?;
            let id = prog.attach_to_link(link).with_context(|| {
                format!(
                    "replacing the program in {} (bpf_link_update)",
                    pin.display()
                )
            })?;
            // The pin keeps the link; dropping our handle only closes an fd.
            drop(prog.take_link(id)?);
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            // First in the chain: a program before us returning TC_ACT_OK
            // would otherwise skip the filter.
            let id = prog
                .attach_with_options(
                    iface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .with_context(|| {
                    format!("attaching to {iface} {direction} (tcx, bpf_link_create)")
                })?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .context("tcx link into FdLink")?;
            link.pin(&pin)
                .with_context(|| format!("pinning {} (BPF_OBJ_PIN)", pin.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", pin.display())),
    }
    Ok(())
}

/// Attaches dw_xdp in native (driver) mode through a pinned bpf_link, or
/// swaps it into the pinned link of an earlier load.
fn attach_xdp(ebpf: &mut Ebpf, iface: &str) -> anyhow::Result<()> {
    let pin = link_pin(iface, XDP_LINK);
    if pin.exists() && !xdp_attached(iface) {
        let _ = std::fs::remove_file(&pin);
    }
    let prog = xdp_program(ebpf, PROG_XDP)?;
    match PinnedLink::from_pin(&pin) {
        Ok(old) => {
            let link = XdpLink::try_from(FdLink::from(old))
                .with_context(|| format!("{} is not an XDP link", pin.display()))?;
            let id = prog.attach_to_link(link).with_context(|| {
                format!(
                    "replacing the program in {} (bpf_link_update)",
                    pin.display()
                )
            })?;
            drop(prog.take_link(id)?);
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            // Native only: generic (skb) XDP would cost more than tc does.
            let id = prog
                .attach(iface, XdpMode::Driver)
                .map_err(|e| xdp_attach_error(iface, e))?;
            let link: FdLink = prog.take_link(id)?.try_into().with_context(|| {
                format!("the XDP attach to {iface} fell back to netlink; dockwall needs a bpf_link")
            })?;
            link.pin(&pin)
                .with_context(|| format!("pinning {} (BPF_OBJ_PIN)", pin.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", pin.display())),
    }
    Ok(())
}

/// The one-line reason a native XDP attach failed, for the errors an admin
/// can act on.
fn xdp_attach_error(iface: &str, e: ProgramError) -> anyhow::Error {
    let errno = match &e {
        ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EOPNOTSUPP) => anyhow!(
            "{iface} ({}) has no native XDP support; load with --hook tc",
            driver(iface)
        ),
        Some(libc::EBUSY | libc::EEXIST) => match xdp_program_on(iface) {
            Ok(Some(other)) => foreign_xdp(iface, &other),
            _ => anyhow!(
                "{iface} already has an XDP program attached; detach it or load with --hook tc"
            ),
        },
        _ => anyhow::Error::new(e).context(format!(
            "attaching {PROG_XDP} to {iface} (XDP, bpf_link_create)"
        )),
    }
}

/// An XDP program on an interface: its id and name, as the kernel reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpProgram {
    pub id: u64,
    pub name: String,
}

fn foreign_xdp(iface: &str, other: &XdpProgram) -> anyhow::Error {
    anyhow!(
        "{iface} already has XDP program id {} ({}) attached; detach it (`ip link set dev {iface} xdp off`) or load with --hook tc",
        other.id,
        other.name
    )
}

/// Refuses, before anything is changed, an interface where `--hook xdp`
/// cannot attach: another XDP program is there. (A driver without native
/// XDP is only known by trying; that refusal comes from the attach.)
pub fn check_xdp_free(iface: &str) -> anyhow::Result<()> {
    match xdp_program_on(iface)? {
        Some(other) if other.name != PROG_XDP => Err(foreign_xdp(iface, &other)),
        _ => Ok(()),
    }
}

/// The interface's driver (or link kind for virtual ones), for messages.
fn driver(iface: &str) -> String {
    let link = Path::new("/sys/class/net")
        .join(iface)
        .join("device/driver");
    if let Some(name) = std::fs::read_link(&link)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    {
        return format!("driver {name}");
    }
    match ip_link_json(iface)
        .ok()
        .and_then(|v| v["linkinfo"]["info_kind"].as_str().map(str::to_string))
    {
        Some(kind) => format!("{kind} device"),
        None => "no driver".to_string(),
    }
}

/// `ip -j -d link show dev IF`: iproute2 reads the XDP attachment and the
/// link kind over netlink, which aya does not expose.
fn ip_link_json(iface: &str) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", iface])
        .output()
        .context("running `ip -j -d link show` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip link show dev {iface}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut links: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j link show` output")?;
    Ok(links[0].take())
}

/// The XDP program attached to `iface` in any mode, if one is.
pub fn xdp_program_on(iface: &str) -> anyhow::Result<Option<XdpProgram>> {
    let link = ip_link_json(iface)?;
    let xdp = &link["xdp"];
    // One program: xdp.prog; several modes at once: xdp.attached[].prog.
    let progs = std::iter::once(&xdp["prog"]).chain(
        xdp["attached"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| &a["prog"]),
    );
    for prog in progs {
        if let Some(id) = prog["id"].as_u64() {
            let name = prog["name"].as_str().unwrap_or("unnamed").to_string();
            return Ok(Some(XdpProgram { id, name }));
        }
    }
    Ok(None)
}

fn xdp_attached(iface: &str) -> bool {
    matches!(xdp_program_on(iface), Ok(Some(p)) if p.name == PROG_XDP)
}

fn attach_netlink(
    prog: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
) -> anyhow::Result<()> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => {}
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e).with_context(|| format!("adding the clsact qdisc to {iface}")),
    }
    let options = NlOptions {
        priority: NETLINK_PRIORITY,
        handle: TcHandle::from(NETLINK_HANDLE),
        ..Default::default()
    };
    let existing = SchedClassifierLink::attached(
        iface,
        attach_type,
        NETLINK_PRIORITY,
        TcHandle::from(NETLINK_HANDLE),
        None,
    )?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        Err(_) => prog
            .attach_with_options(iface, attach_type, TcAttachOptions::Netlink(options))
            .with_context(|| format!("attaching to {iface} {attach_type:?} (netlink)"))?,
    };
    // Netlink filters stay on the qdisc after we exit; dropping the link
    // would detach it, so hand it to the kernel for good.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// Detaches dockwall from `iface` (any hook, either attach mode); missing
/// is fine.
pub fn detach(iface: &str) -> anyhow::Result<()> {
    detach_xdp(iface)?;
    detach_tc(iface, TcAttachType::Ingress)?;
    detach_tc(iface, TcAttachType::Egress)
}

fn remove_pin(pin: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin.display())),
    }
}

/// The XDP link lives only in its pin: removing it detaches dw_xdp.
fn detach_xdp(iface: &str) -> anyhow::Result<()> {
    remove_pin(&link_pin(iface, XDP_LINK))
}

fn detach_tc(iface: &str, attach_type: TcAttachType) -> anyhow::Result<()> {
    let (name, direction) = tc_point(attach_type);
    remove_pin(&link_pin(iface, direction))?;
    if Path::new("/sys/class/net").join(iface).exists() {
        match tc::qdisc_detach_program(iface, attach_type, name) {
            Ok(()) => {}
            Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            // No clsact qdisc: nothing of ours is there.
            Err(tc::TcError::NetlinkError(_)) => {}
            Err(e) => return Err(e).with_context(|| format!("detaching {name} from {iface}")),
        }
    }
    Ok(())
}

/// Whether dockwall's ingress decision is attached to `iface` now.
pub fn attached(iface: &str, mode: AttachMode, hook: Hook) -> bool {
    match (hook, mode) {
        (Hook::Xdp, _) => xdp_attached(iface),
        (Hook::Tc, AttachMode::Netlink) => netlink_attached(iface),
        (Hook::Tc, _) => tcx_attached(iface, TcAttachType::Ingress),
    }
}

fn tcx_attached(iface: &str, attach_type: TcAttachType) -> bool {
    let (name, _) = tc_point(attach_type);
    SchedClassifier::query_tcx(iface, attach_type)
        .map(|(_, progs)| progs.iter().any(|p| p.name_as_str() == Some(name)))
        .unwrap_or(false)
}

fn netlink_attached(iface: &str) -> bool {
    // `tc filter show` is the simplest reliable read of legacy filters.
    std::process::Command::new("tc")
        .args(["filter", "show", "dev", iface, "ingress"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(PROG_INGRESS))
        .unwrap_or(false)
}

/// Removes every map pin and the pin directory.
pub fn remove_pins() -> anyhow::Result<()> {
    let dir = Path::new(PIN_DIR);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {PIN_DIR}")),
    };
    for entry in entries {
        let path = entry.with_context(|| format!("reading {PIN_DIR}"))?.path();
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {PIN_DIR}"))
}

pub fn pins_present() -> bool {
    ALL_MAPS.iter().all(|m| map_pin(m).exists())
}

/// A second handle on every pinned map, kept by the daemon so it can pin a
/// map again if someone removes its pin (the maps themselves live on while
/// the program uses them).
pub struct PinKeeper(Vec<(&'static str, MapData)>);

impl PinKeeper {
    /// Opens every map from its pin; call right after [`load_pinned`].
    pub fn open() -> anyhow::Result<Self> {
        ALL_MAPS
            .iter()
            .map(|name| {
                let path = map_pin(name);
                MapData::from_pin(&path)
                    .map(|data| (*name, data))
                    .with_context(|| format!("opening {} (BPF_OBJ_GET)", path.display()))
            })
            .collect::<anyhow::Result<_>>()
            .map(PinKeeper)
    }

    /// Pins again every map whose pin is gone; returns their names.
    pub fn repin(&self) -> anyhow::Result<Vec<&'static str>> {
        std::fs::create_dir_all(PIN_DIR).with_context(|| format!("creating {PIN_DIR}"))?;
        let mut repinned = Vec::new();
        for (name, data) in &self.0 {
            let path = map_pin(name);
            if !path.exists() {
                data.pin(&path)
                    .with_context(|| format!("re-pinning {} (BPF_OBJ_PIN)", path.display()))?;
                repinned.push(*name);
            }
        }
        Ok(repinned)
    }
}

/// The maps userspace writes and reads.
pub struct Maps {
    published: HashMap<MapData, PublishedKey, PublishedValue>,
    ports: Array<MapData, u8>,
    /// Whether DW_PORTS was brought in line with DW_PUBLISHED since these
    /// maps were opened (a pinned map from an older load may lack bits).
    ports_checked: bool,
    /// The trie fallback (see `ebpf_allow`).
    pub(super) allow: LpmTrie<MapData, AllowKey, AllowValue>,
    /// Per group: the prefix lengths its allowances use, longest first.
    /// Mapped here: each slot is stored in one atomic write (see
    /// `AllowLens`).
    pub(super) allow_lens: MappedWords,
    /// The allowances of the groups with lengths listed.
    pub(super) allow_nets: HashMap<MapData, AllowNetKey, AllowValue>,
    /// Their IPv4 entries again, mapped here (see `ebpf_mirror`).
    pub(super) mirror: Mirror4,
    /// Their IPv6 entries again.
    pub(super) mirror6: Mirror6,
    /// The allowances' hit counters, per CPU, a slot each (see `ebpf_hits`).
    pub(super) hit_counts: PerCpuArray<MapData, u64>,
    /// Which of those slots are taken.
    pub(super) hit_slots: Array<MapData, HitSlotWords>,
    /// The kernel's possible CPUs: the values of a per-CPU map entry.
    pub(super) possible_cpus: usize,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    port_drops: PerCpuArray<MapData, u64>,
    /// Made on the first wait for running programs (see `ebpf_grace`).
    grace: Option<Grace>,
}

/// The DW_PORTS byte of each port that has published-map keys.
fn port_bits<'a>(keys: impl Iterator<Item = &'a PublishedKey>) -> BTreeMap<u16, u8> {
    let mut bits = BTreeMap::new();
    for k in keys {
        let specific = k.addr != [0; 16];
        *bits.entry(k.port).or_default() |= scope_bit(k.proto, k.family, specific);
    }
    bits
}

/// A delete that failed because the key is not there (another command
/// removed it first). The syscall reports it as ENOENT.
pub(super) fn already_gone(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

/// `BPF_NOEXIST`: create the element only if it is not there yet.
pub(super) const BPF_NOEXIST: u64 = 1;

/// Expiries are recomputed from the wall clock on every sync; a difference
/// under a second is that rounding, not a change.
pub(super) fn same_expiry(a: u64, b: u64) -> bool {
    (a == 0) == (b == 0) && a.abs_diff(b) < 1_000_000_000
}

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
}

impl Maps {
    /// Takes the maps out of a freshly loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        Self::from_maps([
            take(MAP_PUBLISHED)?,
            take(MAP_PORTS)?,
            take(MAP_ALLOW)?,
            take(MAP_ALLOW_LENS)?,
            take(MAP_ALLOW_NETS)?,
            take(MAP_ALLOW_MIRROR)?,
            take(MAP_ALLOW_MIRROR6)?,
            take(MAP_HIT_COUNTS)?,
            take(MAP_HIT_SLOTS)?,
            take(MAP_STATS)?,
            take(MAP_CONFIG)?,
            take(MAP_PORT_DROPS)?,
        ])
    }

    /// Opens the maps a running `load` pinned.
    pub fn open_pinned() -> anyhow::Result<Self> {
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = map_pin(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "dockwall is not loaded: cannot open {} (run `dockwall load --iface IF` first)",
                    path.display()
                )
            })?;
            Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
        };
        Self::from_maps([
            open(MAP_PUBLISHED)?,
            open(MAP_PORTS)?,
            open(MAP_ALLOW)?,
            open(MAP_ALLOW_LENS)?,
            open(MAP_ALLOW_NETS)?,
            open(MAP_ALLOW_MIRROR)?,
            open(MAP_ALLOW_MIRROR6)?,
            open(MAP_HIT_COUNTS)?,
            open(MAP_HIT_SLOTS)?,
            open(MAP_STATS)?,
            open(MAP_CONFIG)?,
            open(MAP_PORT_DROPS)?,
        ])
    }

    fn from_maps(
        [
            published,
            ports,
            allow,
            allow_lens,
            allow_nets,
            mirror,
            mirror6,
            hit_counts,
            hit_slots,
            stats,
            config,
            port_drops,
        ]: [Map; 12],
    ) -> anyhow::Result<Self> {
        Ok(Maps {
            published: published.try_into().context(MAP_PUBLISHED)?,
            ports: ports.try_into().context(MAP_PORTS)?,
            ports_checked: false,
            allow: allow.try_into().context(MAP_ALLOW)?,
            allow_lens: match allow_lens {
                Map::Array(data) => MappedWords::new(data, ALLOW_GROUPS as usize, MAP_ALLOW_LENS)?,
                other => bail!("{MAP_ALLOW_LENS} is a {other:?}, not an array"),
            },
            allow_nets: allow_nets.try_into().context(MAP_ALLOW_NETS)?,
            mirror: match mirror {
                Map::Array(data) => Mirror4::new(data)?,
                other => bail!("{MAP_ALLOW_MIRROR} is a {other:?}, not an array"),
            },
            mirror6: match mirror6 {
                Map::Array(data) => Mirror6::new(data)?,
                other => bail!("{MAP_ALLOW_MIRROR6} is a {other:?}, not an array"),
            },
            hit_counts: hit_counts.try_into().context(MAP_HIT_COUNTS)?,
            hit_slots: hit_slots.try_into().context(MAP_HIT_SLOTS)?,
            possible_cpus: aya::util::nr_cpus()
                .map_err(|(path, e)| anyhow!("reading {path}: {e}"))?,
            stats: stats.try_into().context(MAP_STATS)?,
            config: config.try_into().context(MAP_CONFIG)?,
            port_drops: port_drops.try_into().context(MAP_PORT_DROPS)?,
            grace: None,
        })
    }

    /// Returns once every program run that started before the call has
    /// finished (an RCU grace period, see `ebpf_grace`): no packet still
    /// looks where a slot pointed before it was rewritten.
    pub(super) fn wait_for_running_programs(&mut self) -> anyhow::Result<()> {
        if self.grace.is_none() {
            self.grace = Some(Grace::new()?);
        }
        match &self.grace {
            Some(grace) => grace.wait(),
            None => Ok(()),
        }
    }

    /// Makes the published-port map equal `desired`: adds first, then removes.
    pub fn sync_published(
        &mut self,
        desired: &BTreeMap<PublishedKey, PublishedValue>,
    ) -> anyhow::Result<Changes> {
        let current: BTreeMap<PublishedKey, PublishedValue> = self
            .published
            .iter()
            .collect::<Result<_, _>>()
            .context("reading DW_PUBLISHED (bpf_map_get_next_key)")?;
        let old_bits = port_bits(current.keys());
        let new_bits = port_bits(desired.keys());
        // Bits first for what is added (a bit ahead of its key only costs a
        // lookup, or treats a port as in scope: fail-closed), and a full
        // write once after opening, in case a pinned map lacks bits.
        let mut union = old_bits.clone();
        for (port, bits) in &new_bits {
            *union.entry(*port).or_default() |= bits;
        }
        if !self.ports_checked {
            self.write_ports(&union, None)?;
            self.ports_checked = true;
        } else {
            self.write_ports(&union, Some(&old_bits))?;
        }
        let mut changes = Changes::default();
        for (key, value) in desired {
            if current.get(key) != Some(value) {
                self.published
                    .insert(key, value, 0)
                    .context("updating DW_PUBLISHED (bpf_map_update_elem)")?;
                changes.added += 1;
            }
        }
        for key in current.keys().filter(|k| !desired.contains_key(k)) {
            self.published
                .remove(key)
                .context("updating DW_PUBLISHED (bpf_map_delete_elem)")?;
            changes.removed += 1;
        }
        // Then the bits of what was removed go.
        let mut cleared = new_bits.clone();
        for port in union.keys() {
            cleared.entry(*port).or_default();
        }
        self.write_ports(&cleared, Some(&union))?;
        Ok(changes)
    }

    /// Writes the DW_PORTS slots in `bits` that differ from `was` (all of
    /// them when `was` is None).
    fn write_ports(
        &mut self,
        bits: &BTreeMap<u16, u8>,
        was: Option<&BTreeMap<u16, u8>>,
    ) -> anyhow::Result<()> {
        for (port, value) in bits {
            let before = was.map(|w| w.get(port).copied().unwrap_or(0));
            if before != Some(*value) {
                self.ports
                    .set(u32::from(*port), value, 0)
                    .with_context(|| format!("updating DW_PORTS[{port}] (bpf_map_update_elem)"))?;
            }
        }
        Ok(())
    }

    /// The published-port entries the kernel holds.
    pub fn published(&self) -> anyhow::Result<BTreeMap<PublishedKey, PublishedValue>> {
        self.published
            .iter()
            .collect::<Result<_, _>>()
            .context("reading DW_PUBLISHED (bpf_map_get_next_key)")
    }

    /// The settings the loaded program runs with.
    pub fn config(&self) -> anyhow::Result<Config> {
        self.config
            .get(&0, 0)
            .context("reading DW_CONFIG (bpf_map_lookup_elem)")
    }

    pub fn set_config(&mut self, config: Config) -> anyhow::Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing DW_CONFIG (bpf_map_update_elem)")
    }

    /// Drops (or would-be drops) per published port, summed over CPUs.
    pub fn port_drops(&self) -> anyhow::Result<BTreeMap<PortKey, u64>> {
        Ok(self
            .port_drops_by_cpu()?
            .into_iter()
            .map(|(key, per_cpu)| (key, per_cpu.iter().sum()))
            .collect())
    }

    /// Drops per published port as each CPU counted them (index: CPU id):
    /// the ports `DW_PUBLISHED` holds now that have a drop. The counter of a
    /// port no longer published stays in the array, and counts on if it is
    /// published again.
    pub fn port_drops_by_cpu(&self) -> anyhow::Result<BTreeMap<PortKey, Vec<u64>>> {
        let mut ports = BTreeSet::new();
        for key in self.published.keys() {
            let key = key.context("reading DW_PUBLISHED (bpf_map_get_next_key)")?;
            ports.insert(PortKey {
                port: key.port,
                proto: key.proto,
                _pad: 0,
            });
        }
        let mut out = BTreeMap::new();
        for key in ports {
            let index = port_drop_index(key.proto, key.port);
            let per_cpu: Vec<u64> = self
                .port_drops
                .get(&index, 0)
                .with_context(|| {
                    format!("reading {MAP_PORT_DROPS}[{index}] (bpf_map_lookup_elem per CPU)")
                })?
                .iter()
                .copied()
                .collect();
            if per_cpu.iter().any(|&n| n > 0) {
                out.insert(key, per_cpu);
            }
        }
        Ok(out)
    }

    /// The verdict counters, summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<[u64; stat::COUNT as usize]> {
        let mut out = [0u64; stat::COUNT as usize];
        for (index, slot) in out.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(index as u32), 0)
                .context("reading DW_STATS (bpf_map_lookup_elem)")?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_older_than_the_minimum_is_refused_in_one_line_naming_both() {
        let err = refuse_old_kernel(KernelVersion::new(5, 4, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Linux 5.4.0") && err.contains("5.10"), "{err}");
        assert!(err.contains("--no-ebpf") && !err.contains('\n'), "{err}");
        refuse_old_kernel(KernelVersion::new(5, 10, 0)).unwrap();
        refuse_old_kernel(KernelVersion::new(6, 18, 44)).unwrap();
    }
}
