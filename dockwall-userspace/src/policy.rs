//! The policy model: allowances as the user writes them, Docker's published
//! ports, and how both compile to the kernel's map keys.
//!
//! Pure: no I/O, no kernel. Every dataplane is generated from what
//! [`compile_allowances`] and [`compile_published`] return.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use dockwall_common::{
    ALLOW_KEY_FIXED_BITS, AllowKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, PublishedKey,
    PublishedValue,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A transport protocol Docker can publish and dockwall filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!(
                "unknown protocol '{s}': use tcp or udp (dockwall filters TCP and UDP published ports)"
            )),
        }
    }
}

/// The longest name a named source set may have.
pub const SET_NAME_MAX: usize = 31;

/// The name of a named source set (`@office`): 1 to 31 of `A-Z a-z 0-9 _ . -`,
/// starting with a letter or digit. Held inline so a [`Source`] stays `Copy`
/// (sources are copied into every compiled entry).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SetName {
    len: u8,
    bytes: [u8; SET_NAME_MAX],
}

impl SetName {
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked in from_str).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl PartialOrd for SetName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SetName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for SetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.as_str())
    }
}

impl fmt::Display for SetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SetName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.strip_prefix('@').unwrap_or(s);
        let valid = (1..=SET_NAME_MAX).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(format!(
                "invalid set name '{s}': 1 to {SET_NAME_MAX} letters, digits, '_', '.' or '-', \
                 starting with a letter or digit (e.g. office, cdn-v4)"
            ));
        }
        let mut bytes = [0u8; SET_NAME_MAX];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(SetName {
            len: name.len() as u8,
            bytes,
        })
    }
}

impl Serialize for SetName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SetName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The named source sets: each name with its networks.
pub type Sets = BTreeMap<SetName, BTreeSet<IpNet>>;

/// One member of a named set: an address or a CIDR (`any` and other sets
/// are not members).
pub fn parse_member(s: &str) -> Result<IpNet, String> {
    match s.parse::<Source>()? {
        Source::Net(net) => Ok(net),
        Source::Any | Source::Set(_) => Err(format!(
            "invalid set member '{s}': a set holds addresses and CIDRs (203.0.113.7, 198.51.100.0/24)"
        )),
    }
}

/// Who an allowance lets in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Everyone, IPv4 and IPv6.
    Any,
    /// One address (a /32 or /128) or a network.
    Net(IpNet),
    /// The members of a named set (`@office`), whatever they are now.
    Set(SetName),
}

impl Source {
    /// The networks this source stands for now (a set that does not exist
    /// stands for none: edits and the file are checked against that).
    pub fn nets(self, sets: &Sets) -> Vec<IpNet> {
        match self {
            Source::Any => vec![
                IpNet::new(IpAddr::from([0u8; 4]), 0).expect("/0 is a valid prefix"),
                IpNet::new(IpAddr::from([0u8; 16]), 0).expect("/0 is a valid prefix"),
            ],
            Source::Net(net) => vec![net],
            Source::Set(name) => sets
                .get(&name)
                .map(|m| m.iter().copied().collect())
                .unwrap_or_default(),
        }
    }

    /// The set it names, if any.
    pub fn set(self) -> Option<SetName> {
        match self {
            Source::Set(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Any => f.write_str("any"),
            Source::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            Source::Net(net) => write!(f, "{net}"),
            Source::Set(name) => write!(f, "@{name}"),
        }
    }
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("any") {
            return Ok(Source::Any);
        }
        if s.starts_with('@') {
            return s.parse().map(Source::Set);
        }
        if let Ok(addr) = s.parse::<IpAddr>() {
            return Ok(Source::Net(IpNet::from(addr)));
        }
        let net: IpNet = s.parse().map_err(|_| {
            format!(
                "invalid source '{s}': expected an IPv4/IPv6 address (203.0.113.7, 2001:db8::7), \
                 a CIDR (203.0.113.0/24, 2001:db8::/48), a named set (@office) or 'any'"
            )
        })?;
        if net.trunc() != net {
            return Err(format!(
                "invalid source '{s}': host bits are set after the /{len} prefix; \
                 did you mean the network {trunc} or the single host {host}?",
                len = net.prefix_len(),
                trunc = net.trunc(),
                host = IpNet::from(net.addr()),
            ));
        }
        Ok(Source::Net(net))
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `PORT[/tcp|/udp]`, protocol tcp when left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortProto {
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for PortProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

impl FromStr for PortProto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (port, proto) = match s.split_once('/') {
            Some((port, proto)) => (port, proto.parse()?),
            None => (s, Proto::Tcp),
        };
        Ok(PortProto {
            port: parse_port(port)?,
            proto,
        })
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("invalid port '0': ports run from 1 to 65535".to_string()),
        Ok(n) if n > 65535 => Err(format!("invalid port '{s}': ports run from 1 to 65535")),
        Ok(n) => Ok(n as u16),
        Err(_) => Err(format!(
            "invalid port '{s}': expected a number from 1 to 65535"
        )),
    }
}

impl Serialize for PortProto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortProto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ContainerSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ContainerSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `NAME[:CPORT[/proto]]`: a container, and optionally one of its ports
/// (the container-side port, as in `-p 8081:8080` it is 8080).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerSpec {
    pub name: String,
    pub port: Option<PortProto>,
}

impl fmt::Display for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{}", self.name, p),
            None => f.write_str(&self.name),
        }
    }
}

impl FromStr for ContainerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, port) = match s.split_once(':') {
            Some((name, port)) => (name, Some(port.parse::<PortProto>()?)),
            None => (s, None),
        };
        let name = name.trim_start_matches('/');
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(format!(
                "invalid container '{s}': expected NAME[:CONTAINER_PORT[/tcp|/udp]], e.g. web or web:8080/tcp"
            ));
        }
        Ok(ContainerSpec {
            name: name.to_string(),
            port,
        })
    }
}

impl ContainerSpec {
    /// `NAME[:TARGET_PORT[/proto]]` naming a swarm service (same syntax).
    pub fn parse_service(s: &str) -> Result<Self, String> {
        s.parse::<ContainerSpec>().map_err(|_| {
            format!(
                "invalid service '{s}': expected NAME[:TARGET_PORT[/tcp|/udp]], e.g. web or web:8080/tcp"
            )
        })
    }
}

/// What an allowance opens.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A published port: the one clients connect to (8081 in `-p 8081:8080`).
    Port(PortProto),
    /// Every published port of a container, or the one publishing its port.
    Container(ContainerSpec),
    /// Every port a swarm service publishes (routing mesh or host mode), or
    /// the one publishing its target port.
    Service(ContainerSpec),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Port(p) => write!(f, "port {p}"),
            Target::Container(c) => write!(f, "container {c}"),
            Target::Service(s) => write!(f, "service {s}"),
        }
    }
}

/// One allowance: `source` may open new connections to `target`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Allowance {
    pub source: Source,
    pub target: Target,
}

impl fmt::Display for Allowance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.source, self.target)
    }
}

/// A port Docker publishes, as read from the Engine API.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Binding {
    pub container: String,
    pub container_id: String,
    /// `None`: every host address of the family (Docker's 0.0.0.0 / ::).
    pub host_ip: Option<IpAddr>,
    pub ipv6: bool,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
    /// The container's own addresses (one per network), for connections
    /// routed straight to it. Empty while it is stopped.
    #[serde(default)]
    pub container_ips: Vec<IpAddr>,
    /// The container's `dockwall.*` labels (see [`crate::labels`]); the
    /// others are not kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Published by a swarm service (the services API), not by a container's
    /// port binding: `container` and `container_id` are the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl Binding {
    /// Builds a binding from Docker's `HostIp` string ("0.0.0.0", "::", an address).
    pub fn new(
        container: &str,
        container_id: &str,
        host_ip: IpAddr,
        host_port: u16,
        container_port: u16,
        proto: Proto,
    ) -> Self {
        Binding {
            container: container.trim_start_matches('/').to_string(),
            container_id: container_id.to_string(),
            host_ip: (!host_ip.is_unspecified()).then_some(host_ip),
            ipv6: host_ip.is_ipv6(),
            host_port,
            container_port,
            proto,
            container_ips: Vec::new(),
            labels: BTreeMap::new(),
            service: None,
        }
    }

    /// A port a swarm service publishes.
    pub fn for_service(mut self) -> Self {
        self.service = Some(self.container.clone());
        self
    }

    pub fn with_container_ips(mut self, ips: Vec<IpAddr>) -> Self {
        self.container_ips = ips;
        self
    }

    /// Keeps the container's `dockwall.*` labels.
    pub fn with_labels<'a>(
        mut self,
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        self.labels = labels
            .into_iter()
            .filter(|(k, _)| crate::labels::ours(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self
    }

    pub fn host_ip_display(&self) -> String {
        match (self.host_ip, self.ipv6) {
            (Some(ip), _) => ip.to_string(),
            (None, false) => "0.0.0.0".to_string(),
            (None, true) => "::".to_string(),
        }
    }

    /// Whether `target` stands for this binding: a port by number, a
    /// container's or a swarm service's by name (a service's binding is
    /// never a container's, nor the other way round).
    fn targeted_by(&self, target: &Target) -> bool {
        match target {
            Target::Port(p) => p.port == self.host_port && p.proto == self.proto,
            Target::Container(spec) => self.service.is_none() && self.named(spec),
            Target::Service(spec) => self.service.is_some() && self.named(spec),
        }
    }

    fn named(&self, spec: &ContainerSpec) -> bool {
        let named = self.container == spec.name
            || (spec.name.len() >= 12 && self.container_id.starts_with(&spec.name));
        named
            && spec
                .port
                .is_none_or(|p| p.port == self.container_port && p.proto == self.proto)
    }
}

/// Whether a container spec names a container Docker reports (running or not).
pub fn container_known(spec: &ContainerSpec, names_and_ids: &[(String, String)]) -> bool {
    names_and_ids.iter().any(|(name, id)| {
        *name == spec.name || (spec.name.len() >= 12 && id.starts_with(&spec.name))
    })
}

/// One entry of the kernel's allowance trie: (published port, proto, source net).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowEntry {
    pub port: u16,
    pub proto: Proto,
    pub net: IpNet,
}

impl AllowEntry {
    /// The LPM trie key: prefix length and data.
    pub fn key(&self) -> (u32, AllowKey) {
        let (family, addr) = addr_bytes(self.net.addr());
        (
            ALLOW_KEY_FIXED_BITS + u32::from(self.net.prefix_len()),
            AllowKey {
                port: self.port,
                proto: self.proto.number(),
                family,
                addr,
            },
        )
    }

    /// The inverse of [`AllowEntry::key`], for reading the map back.
    pub fn from_key(prefix_len: u32, key: &AllowKey) -> Option<Self> {
        let proto = Proto::from_number(key.proto)?;
        let addr_len = u8::try_from(prefix_len.checked_sub(ALLOW_KEY_FIXED_BITS)?).ok()?;
        let addr = addr_from_bytes(key.family, &key.addr)?;
        Some(AllowEntry {
            port: key.port,
            proto,
            net: IpNet::new(addr, addr_len).ok()?,
        })
    }
}

impl AllowEntry {
    /// (port, proto, ipv6): the entries one fallback rule and its set hold.
    pub fn group(&self) -> (u16, Proto, bool) {
        (self.port, self.proto, self.net.addr().is_ipv6())
    }
}

/// A rule group's first and last entry in `AllowEntry` order: its /0, and
/// the all-ones /32 or /128.
pub fn group_bounds((port, proto, ipv6): (u16, Proto, bool)) -> (AllowEntry, AllowEntry) {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let (zero, ones, max) = if ipv6 {
        (
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::from(u128::MAX)),
            128,
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::BROADCAST),
            32,
        )
    };
    // Both prefix lengths are in range for their family.
    let entry = |addr, len| AllowEntry {
        port,
        proto,
        net: IpNet::new_assert(addr, len),
    };
    (entry(zero, 0), entry(ones, max))
}

/// Whether the group lets everyone in (holds its /0): its rule has no set.
pub fn group_has_everyone(entries: &BTreeSet<AllowEntry>, group: (u16, Proto, bool)) -> bool {
    entries.contains(&group_bounds(group).0)
}

/// Whether applying `changes` (entry, held afterwards) to `applied` keeps
/// every fallback rule as it is: no port gains its first or loses its last
/// source, no /0 comes or goes. Then only set members change, in place.
pub fn rules_unchanged(applied: &BTreeSet<AllowEntry>, changes: &[(AllowEntry, bool)]) -> bool {
    let changed: BTreeMap<AllowEntry, bool> = changes.iter().copied().collect();
    let groups: BTreeSet<_> = changes.iter().map(|(e, _)| e.group()).collect();
    groups.into_iter().all(|g| {
        let (zero, last) = group_bounds(g);
        let members = || applied.range(zero..=last);
        let after = |e: &AllowEntry| changed.get(e).copied().unwrap_or(true);
        let before_any = members().next().is_some();
        let after_any = members().any(after) || changed.iter().any(|(e, p)| *p && e.group() == g);
        let before_all = applied.contains(&zero);
        let after_all = changed.get(&zero).copied().unwrap_or(before_all);
        before_any == after_any && before_all == after_all
    })
}

/// The entries of `entries` strictly inside `outer` (same port and
/// protocol, a longer prefix within its network), in order.
pub fn inside<'a>(
    entries: &'a BTreeSet<AllowEntry>,
    outer: &AllowEntry,
) -> impl Iterator<Item = &'a AllowEntry> + 'a {
    let last = AllowEntry {
        net: IpNet::new(outer.net.broadcast(), outer.net.max_prefix_len()).unwrap_or(outer.net),
        ..*outer
    };
    let outer = *outer;
    entries.range(outer..=last).filter(move |e| **e != outer)
}

/// Whether a shorter prefix of the same port and protocol covers `entry`.
pub fn covered(entries: &BTreeSet<AllowEntry>, entry: &AllowEntry) -> bool {
    (0..entry.net.prefix_len()).any(|len| {
        IpNet::new(entry.net.addr(), len).is_ok_and(|wider| {
            entries.contains(&AllowEntry {
                net: wider.trunc(),
                ..*entry
            })
        })
    })
}

/// The networks of `nets` no other one of them covers: what an interval
/// set without auto-merge may hold (it refuses overlaps).
pub fn maximal<'a>(nets: impl Iterator<Item = &'a IpNet>) -> Vec<IpNet> {
    let mut sorted: Vec<IpNet> = nets.copied().collect();
    sorted.sort();
    let mut out: Vec<IpNet> = Vec::new();
    for net in sorted {
        // Sorted by address, then prefix: a cover comes before what it covers.
        if out.last().is_some_and(|last| last.contains(&net)) {
            continue;
        }
        out.push(net);
    }
    out
}

/// (family, 16 bytes with IPv4 in the first four).
pub fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, bytes)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}

pub fn addr_from_bytes(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
        FAMILY_V6 => Some(IpAddr::from(*bytes)),
        _ => None,
    }
}

/// The (published port, proto) pairs an allowance's target stands for now.
pub fn resolve_target(target: &Target, bindings: &[Binding]) -> BTreeSet<PortProto> {
    match target {
        // A port stands for itself, published or not (yet).
        Target::Port(p) => BTreeSet::from([*p]),
        Target::Container(_) | Target::Service(_) => bindings
            .iter()
            .filter(|b| b.targeted_by(target))
            .map(|b| PortProto {
                port: b.host_port,
                proto: b.proto,
            })
            .collect(),
    }
}

/// Every allowance trie entry the policy needs, and which allowances need
/// each (for hit counters per allowance). The containers' labels add
/// allowances of their own: index `allowances.len() + i` is the label
/// allowance `labels::labelled(bindings, sets).allowances[i]`. A port of a
/// container whose labels fail gets no entry at all: closed to everyone.
pub fn compile_allowances(
    allowances: &[Allowance],
    sets: &Sets,
    bindings: &[Binding],
) -> BTreeMap<AllowEntry, Vec<usize>> {
    let labelled = crate::labels::labelled(bindings, sets);
    let closed = labelled.closed_ports(bindings);
    let mut entries: BTreeMap<AllowEntry, Vec<usize>> = BTreeMap::new();
    for (index, allowance) in allowances.iter().chain(&labelled.allowances).enumerate() {
        for pp in resolve_target(&allowance.target, bindings) {
            if closed.contains(&pp) {
                continue;
            }
            for net in allowance.source.nets(sets) {
                entries
                    .entry(AllowEntry {
                        port: pp.port,
                        proto: pp.proto,
                        net,
                    })
                    .or_default()
                    .push(index);
            }
        }
    }
    entries
}

/// New connections each allowance let in, from the kernel's per-entry
/// counters (`hits`): the file's allowances, then the labels' (in the order
/// of [`compile_allowances`]). An entry two allowances need counts for
/// both; an entry the kernel does not hold counts 0. Linear in the entries.
pub fn hits_per_allowance(
    allowances: &[Allowance],
    sets: &Sets,
    bindings: &[Binding],
    hits: &BTreeMap<AllowEntry, u64>,
) -> Vec<u64> {
    let labels = crate::labels::labelled(bindings, sets).allowances.len();
    let mut sums = vec![0u64; allowances.len() + labels];
    for (entry, owners) in compile_allowances(allowances, sets, bindings) {
        let h = hits.get(&entry).copied().unwrap_or(0);
        for owner in owners {
            sums[owner] += h;
        }
    }
    sums
}

/// When each allowance entry stops letting anyone in (unix seconds; `None`
/// = never), for the kernel's `expires_ns`.
///
/// The kernel only sees the longest matching entry, so an entry's expiry is
/// the latest of every allowance that needs it or a shorter prefix covering
/// it (same port and protocol): a lapsed /32 inside a permanent /24 must
/// not shut out what the /24 still lets in.
pub fn entry_expiries(
    entries: &BTreeMap<AllowEntry, Vec<usize>>,
    expiry: impl Fn(usize) -> Option<u64>,
) -> BTreeMap<AllowEntry, Option<u64>> {
    let later = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a.max(b));
    let own: BTreeMap<AllowEntry, Option<u64>> = entries
        .iter()
        .map(|(entry, owners)| {
            let at = owners.iter().map(|&o| expiry(o)).reduce(later).flatten();
            (*entry, at)
        })
        .collect();
    own.iter()
        .map(|(entry, &at)| {
            let mut effective = at;
            // Only expiring entries need the walk up (at most 128 lookups).
            let mut len = entry.net.prefix_len();
            while effective.is_some() && len > 0 {
                len -= 1;
                let Ok(wider) = IpNet::new(entry.net.addr(), len) else {
                    break;
                };
                let wider = AllowEntry {
                    net: wider.trunc(),
                    ..*entry
                };
                if let Some(&w) = own.get(&wider) {
                    effective = later(effective, w);
                }
            }
            (*entry, effective)
        })
        .collect()
}

/// The allowed sources of one (published port, protocol) in one family:
/// everyone (a /0), or a list of networks. Both fallbacks keep the list in a
/// set of their own (ipset, nftables set) and match it with one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub port: u16,
    pub proto: Proto,
    pub everyone: bool,
    pub nets: Vec<IpNet>,
}

/// Groups the allowance entries of one family by (port, proto).
pub fn group_allowed(entries: &BTreeSet<AllowEntry>, ipv6: bool) -> Vec<Allowed> {
    let mut grouped: BTreeMap<(u16, Proto), Vec<IpNet>> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.net.addr().is_ipv6() == ipv6) {
        grouped.entry((e.port, e.proto)).or_default().push(e.net);
    }
    grouped
        .into_iter()
        .map(|((port, proto), nets)| Allowed {
            port,
            proto,
            everyone: nets.iter().any(|n| n.prefix_len() == 0),
            nets,
        })
        .collect()
}

/// A published port as seen from outside: (host address or every address
/// of a family, protocol, port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    /// `None`: every address of the family (Docker's 0.0.0.0 / ::).
    pub ip: Option<IpAddr>,
    pub ipv6: bool,
    pub port: u16,
    pub proto: Proto,
    pub container_port: u16,
}

/// A published container endpoint reached directly (routed setups): the
/// container's address, its port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

/// What dockwall guards: the one definition both dataplanes are compiled from.
/// New connections arriving on a managed interface (a) to a published port
/// on a host address, (b) straight to a published container endpoint, or
/// (c) to a published port Docker's userland proxy accepts on the host
/// itself ((a) and (c) are the same host ports; the dataplanes differ in
/// where they see them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub host_ports: BTreeSet<HostPort>,
    /// Each endpoint with the published port whose allowances decide for it:
    /// the lowest host port that publishes it.
    pub endpoints: BTreeMap<Endpoint, u16>,
}

impl HostPort {
    pub fn ipv6(&self) -> bool {
        self.ip.map_or(self.ipv6, |ip| ip.is_ipv6())
    }
}

pub fn compile_scope(bindings: &[Binding]) -> Scope {
    let mut scope = Scope::default();
    let mut sorted: Vec<&Binding> = bindings.iter().collect();
    sorted.sort_by_key(|b| b.host_port);
    for b in sorted {
        scope.host_ports.insert(HostPort {
            ip: b.host_ip,
            ipv6: b.ipv6,
            port: b.host_port,
            proto: b.proto,
            container_port: b.container_port,
        });
        for ip in &b.container_ips {
            let endpoint = Endpoint {
                ip: *ip,
                port: b.container_port,
                proto: b.proto,
            };
            scope.endpoints.entry(endpoint).or_insert(b.host_port);
        }
    }
    scope
}

/// The eBPF published-port map's contents: host ports and endpoints.
pub fn compile_published(bindings: &[Binding]) -> BTreeMap<PublishedKey, PublishedValue> {
    let scope = compile_scope(bindings);
    let mut map = BTreeMap::new();
    for hp in &scope.host_ports {
        let (family, addr) = match hp.ip {
            Some(ip) => addr_bytes(ip),
            None if hp.ipv6 => (FAMILY_V6, [0; 16]),
            None => (FAMILY_V4, [0; 16]),
        };
        let key = PublishedKey {
            addr,
            port: hp.port,
            proto: hp.proto.number(),
            family,
        };
        // Two containers cannot publish the same host port; keep the first.
        map.entry(key).or_insert(PublishedValue {
            container_port: hp.container_port,
            policy_port: hp.port,
            _pad: [0; 4],
        });
    }
    for (ep, policy_port) in &scope.endpoints {
        let (family, addr) = addr_bytes(ep.ip);
        let key = PublishedKey {
            addr,
            port: ep.port,
            proto: ep.proto.number(),
            family,
        };
        map.entry(key).or_insert(PublishedValue {
            container_port: ep.port,
            policy_port: *policy_port,
            _pad: [0; 4],
        });
    }
    map
}

/// What needs an entry: how many allowances without an expiry, and the
/// expiries of those with one.
#[derive(Debug, Default, Clone)]
struct Owners {
    permanent: u32,
    expiring: Vec<u64>,
}

impl Owners {
    fn is_empty(&self) -> bool {
        self.permanent == 0 && self.expiring.is_empty()
    }

    /// The entry's own expiry: never while one owner is permanent.
    fn expiry(&self) -> Option<u64> {
        if self.permanent > 0 {
            None
        } else {
            self.expiring.iter().copied().max()
        }
    }
}

/// An entry's change from one edit: `Some(expiry)` to write (new, or its
/// effective expiry moved), `None` to remove.
pub type EntryChanges = BTreeMap<AllowEntry, Option<Option<u64>>>;

/// The compiled allowance entries of a policy for one set of bindings,
/// kept up to date edit by edit: an `allow` on top of 100k allowances
/// touches the entries of that allowance (and the expiring ones it covers),
/// not the whole policy. Equal, entry for entry, to [`compile_allowances`]
/// followed by [`entry_expiries`] (a unit test checks it on random edits).
#[derive(Debug, Default, Clone)]
pub struct Compiled {
    own: BTreeMap<AllowEntry, Owners>,
    effective: BTreeMap<AllowEntry, Option<u64>>,
}

impl Compiled {
    /// Compiles a whole policy (the allowances in force, with their expiries).
    pub fn new(
        allowances: &[Allowance],
        expiry: impl Fn(&Allowance) -> Option<u64>,
        sets: &Sets,
        bindings: &[Binding],
    ) -> Self {
        let compiled = compile_allowances(allowances, sets, bindings);
        // Label allowances (indices past the file's) never lapse.
        let expiry_of = |i: usize| allowances.get(i).and_then(&expiry);
        let effective = entry_expiries(&compiled, expiry_of);
        let own = compiled
            .into_iter()
            .map(|(entry, owners)| {
                let mut o = Owners::default();
                for i in owners {
                    match expiry_of(i) {
                        None => o.permanent += 1,
                        Some(at) => o.expiring.push(at),
                    }
                }
                (entry, o)
            })
            .collect();
        Compiled { own, effective }
    }

    /// Every entry with the unix time it stops matching (`None`: never).
    pub fn effective(&self) -> &BTreeMap<AllowEntry, Option<u64>> {
        &self.effective
    }

    /// Takes `removed` out and puts `added` in (each with the expiry it has
    /// in the policy), returning the entries whose kernel value changes.
    pub fn update(
        &mut self,
        removed: &[(Allowance, Option<u64>)],
        added: &[(Allowance, Option<u64>)],
        sets: &Sets,
        bindings: &[Binding],
    ) -> EntryChanges {
        let mut touched = BTreeSet::new();
        let closed = crate::labels::labelled(bindings, sets).closed_ports(bindings);
        let entries = |a: &Allowance| {
            let nets = a.source.nets(sets);
            resolve_target(&a.target, bindings)
                .into_iter()
                .filter(|pp| !closed.contains(pp))
                .flat_map(move |pp| {
                    nets.clone().into_iter().map(move |net| AllowEntry {
                        port: pp.port,
                        proto: pp.proto,
                        net,
                    })
                })
                .collect::<Vec<_>>()
        };
        for (a, at) in removed {
            for e in entries(a) {
                if let Some(o) = self.own.get_mut(&e) {
                    match at {
                        None => o.permanent = o.permanent.saturating_sub(1),
                        Some(at) => {
                            if let Some(i) = o.expiring.iter().position(|x| x == at) {
                                o.expiring.swap_remove(i);
                            }
                        }
                    }
                    if o.is_empty() {
                        self.own.remove(&e);
                    }
                }
                touched.insert(e);
            }
        }
        for (a, at) in added {
            for e in entries(a) {
                let o = self.own.entry(e).or_default();
                match at {
                    None => o.permanent += 1,
                    Some(at) => o.expiring.push(*at),
                }
                touched.insert(e);
            }
        }
        // A touched entry's own expiry moves the effective expiry of the
        // expiring entries it covers (same port and protocol, inside its net).
        let mut affected = touched.clone();
        for t in &touched {
            let last = AllowEntry {
                net: IpNet::new(t.net.broadcast(), t.net.max_prefix_len()).unwrap_or(t.net),
                ..*t
            };
            affected.extend(
                self.own
                    .range(*t..=last)
                    .filter(|(_, o)| o.expiry().is_some())
                    .map(|(e, _)| *e),
            );
        }
        let mut changes = EntryChanges::new();
        for e in affected {
            let now = self.own.get(&e).map(|o| self.effective_of(&e, o.expiry()));
            let was = self.effective.get(&e).copied();
            if now == was {
                continue;
            }
            match now {
                Some(at) => self.effective.insert(e, at),
                None => self.effective.remove(&e),
            };
            changes.insert(e, now);
        }
        changes
    }

    /// The latest expiry of the entry and every entry covering it (the
    /// rule of [`entry_expiries`]).
    fn effective_of(&self, entry: &AllowEntry, own: Option<u64>) -> Option<u64> {
        let mut effective = own;
        let mut len = entry.net.prefix_len();
        while effective.is_some() && len > 0 {
            len -= 1;
            let Ok(wider) = IpNet::new(entry.net.addr(), len) else {
                break;
            };
            let wider = AllowEntry {
                net: wider.trunc(),
                ..*entry
            };
            if let Some(o) = self.own.get(&wider) {
                effective = effective.zip(o.expiry()).map(|(a, b)| a.max(b));
            }
        }
        effective
    }
}

/// For unit tests of the dataplanes: an allowance entry from text.
#[cfg(test)]
pub(crate) fn test_entry(port: u16, proto: Proto, net: &str) -> AllowEntry {
    AllowEntry {
        port,
        proto,
        net: net.parse().expect("test CIDR"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(name: &str, host_ip: &str, host_port: u16, cport: u16, proto: Proto) -> Binding {
        Binding::new(
            name,
            "0123456789abcdef0123",
            host_ip.parse().unwrap(),
            host_port,
            cport,
            proto,
        )
    }

    #[test]
    fn sources_parse_and_reject_with_reasons() {
        assert_eq!("any".parse::<Source>(), Ok(Source::Any));
        assert_eq!(
            "203.0.113.7".parse::<Source>(),
            Ok(Source::Net("203.0.113.7/32".parse().unwrap()))
        );
        assert_eq!(
            "2001:db8::/32".parse::<Source>(),
            Ok(Source::Net("2001:db8::/32".parse().unwrap()))
        );
        let err = "10.0.0.1/8".parse::<Source>().unwrap_err();
        assert!(
            err.contains("10.0.0.0/8") && err.contains("10.0.0.1/32"),
            "{err}"
        );
        for bad in [
            "10.0.0.256",
            "10.0.0.0/33",
            "::/129",
            "",
            "host.example",
            "1.2.3.4/",
        ] {
            let err = bad.parse::<Source>().unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{bad}: {err}");
        }
    }

    #[test]
    fn ports_parse_and_reject_with_reasons() {
        assert_eq!(
            "8081".parse::<PortProto>(),
            Ok(PortProto {
                port: 8081,
                proto: Proto::Tcp
            })
        );
        assert_eq!(
            "53/UDP".parse::<PortProto>(),
            Ok(PortProto {
                port: 53,
                proto: Proto::Udp
            })
        );
        for bad in ["0", "65536", "http", "80/sctp", "-1", "80/"] {
            assert!(bad.parse::<PortProto>().is_err(), "{bad}");
        }
        assert!("65535".parse::<PortProto>().is_ok());
    }

    #[test]
    fn container_specs() {
        let spec: ContainerSpec = "web:8080/udp".parse().unwrap();
        assert_eq!(spec.name, "web");
        assert_eq!(spec.port.unwrap().proto, Proto::Udp);
        assert!("web:0".parse::<ContainerSpec>().is_err());
        assert!("we b".parse::<ContainerSpec>().is_err());
        assert!("".parse::<ContainerSpec>().is_err());
    }

    #[test]
    fn allow_entry_key_roundtrip_and_prefixes() {
        for (net, prefix) in [
            ("0.0.0.0/0", 32),
            ("10.1.0.0/16", 48),
            ("203.0.113.7/32", 64),
            ("::/0", 32),
            ("2001:db8::/48", 80),
            ("2001:db8::1/128", 160),
        ] {
            let entry = AllowEntry {
                port: 8081,
                proto: Proto::Tcp,
                net: net.parse().unwrap(),
            };
            let (len, key) = entry.key();
            assert_eq!(len, prefix, "{net}");
            assert_eq!(AllowEntry::from_key(len, &key), Some(entry));
        }
    }

    #[test]
    fn container_allowance_resolves_to_published_ports() {
        let bindings = vec![
            binding("web", "0.0.0.0", 8081, 8080, Proto::Tcp),
            binding("web", "::", 8081, 8080, Proto::Tcp),
            binding("web", "0.0.0.0", 5353, 53, Proto::Udp),
            binding("api", "0.0.0.0", 8082, 8080, Proto::Tcp),
        ];
        let all = Target::Container("web".parse().unwrap());
        let ports: Vec<_> = resolve_target(&all, &bindings).into_iter().collect();
        assert_eq!(ports.len(), 2);
        let one = Target::Container("web:53/udp".parse().unwrap());
        let ports: Vec<_> = resolve_target(&one, &bindings).into_iter().collect();
        assert_eq!(
            ports,
            vec![PortProto {
                port: 5353,
                proto: Proto::Udp
            }]
        );
        // api also uses container port 8080, published on 8082: not web's.
        let web8080 = Target::Container("web:8080".parse().unwrap());
        let ports: Vec<_> = resolve_target(&web8080, &bindings).into_iter().collect();
        assert_eq!(ports.iter().map(|p| p.port).collect::<Vec<_>>(), vec![8081]);
    }

    #[test]
    fn any_compiles_to_both_families_and_duplicates_merge() {
        let allowances = vec![
            Allowance {
                source: Source::Any,
                target: Target::Port("8081".parse().unwrap()),
            },
            Allowance {
                source: "0.0.0.0/0".parse().unwrap(),
                target: Target::Port("8081".parse().unwrap()),
            },
        ];
        let entries = compile_allowances(&allowances, &Sets::new(), &[]);
        assert_eq!(entries.len(), 2);
        let v4 = entries
            .iter()
            .find(|(e, _)| e.net.addr().is_ipv4())
            .unwrap();
        assert_eq!(v4.1, &vec![0, 1]);
    }

    #[test]
    fn container_endpoints_point_at_their_published_port() {
        let web = binding("web", "0.0.0.0", 8081, 8080, Proto::Tcp)
            .with_container_ips(vec!["172.17.0.2".parse().unwrap()]);
        let web_v6 = binding("web", "::", 8081, 8080, Proto::Tcp)
            .with_container_ips(vec!["172.17.0.2".parse().unwrap()]);
        let also = binding("web", "0.0.0.0", 9091, 8080, Proto::Tcp)
            .with_container_ips(vec!["172.17.0.2".parse().unwrap()]);
        let map = compile_published(&[also, web, web_v6]);
        let endpoint = map
            .iter()
            .find(|(k, _)| k.addr[..4] == [172, 17, 0, 2])
            .unwrap();
        assert_eq!(endpoint.0.port, 8080);
        assert_eq!(
            endpoint.1.policy_port, 8081,
            "lowest publishing port decides"
        );
        assert_eq!(map.len(), 4, "two v4 wildcard ports, one v6, one endpoint");
    }

    #[test]
    fn published_wildcard_and_specific() {
        let map = compile_published(&[
            binding("web", "0.0.0.0", 8081, 8080, Proto::Tcp),
            binding("web", "::", 8081, 8080, Proto::Tcp),
            binding("db", "10.0.0.5", 5432, 5432, Proto::Tcp),
        ]);
        let keys: Vec<_> = map.keys().collect();
        assert_eq!(keys.len(), 3);
        assert!(
            keys.iter()
                .any(|k| k.family == FAMILY_V4 && k.addr == [0; 16] && k.port == 8081)
        );
        assert!(
            keys.iter()
                .any(|k| k.family == FAMILY_V6 && k.addr == [0; 16] && k.port == 8081)
        );
        assert!(keys.iter().any(|k| k.addr[..4] == [10, 0, 0, 5]));
    }

    #[test]
    fn an_entry_expires_only_when_every_covering_allowance_has() {
        let e = |net: &str, port: u16| AllowEntry {
            port,
            proto: Proto::Tcp,
            net: net.parse().unwrap(),
        };
        let entries = BTreeMap::from([
            (e("192.0.2.7/32", 80), vec![0]),
            (e("192.0.2.0/24", 80), vec![1]),
            (e("192.0.2.8/32", 80), vec![2, 3]),
            (e("198.51.100.7/32", 80), vec![4]),
            (e("198.51.100.0/24", 80), vec![5]),
            (e("198.51.100.0/24", 443), vec![6]),
        ]);
        // 0: expires 100, inside 1 (never); 2+3: 50 and 70; 4: 30 inside 5: 60.
        let at = [
            Some(100),
            None,
            Some(50),
            Some(70),
            Some(30),
            Some(60),
            None,
        ];
        let got = entry_expiries(&entries, |i| at[i]);
        assert_eq!(got[&e("192.0.2.7/32", 80)], None);
        assert_eq!(got[&e("192.0.2.0/24", 80)], None);
        assert_eq!(got[&e("192.0.2.8/32", 80)], None);
        assert_eq!(got[&e("198.51.100.7/32", 80)], Some(60));
        assert_eq!(got[&e("198.51.100.0/24", 80)], Some(60));
        assert_eq!(got[&e("198.51.100.0/24", 443)], None);
        let lone = BTreeMap::from([(e("203.0.113.0/24", 80), vec![0, 1])]);
        assert_eq!(
            entry_expiries(&lone, |i| [Some(5), Some(9)][i])[&e("203.0.113.0/24", 80)],
            Some(9)
        );
    }

    #[test]
    fn a_shared_entry_counts_for_every_allowance_that_needs_it() {
        let a = |src: &str, port: &str| Allowance {
            source: src.parse().unwrap(),
            target: Target::Port(port.parse().unwrap()),
        };
        let allowances = vec![
            a("192.0.2.0/24", "80"),
            a("192.0.2.0/24", "80/tcp"),
            a("any", "443"),
        ];
        let entry = |net: &str, port| AllowEntry {
            port,
            proto: Proto::Tcp,
            net: net.parse().unwrap(),
        };
        let hits = BTreeMap::from([
            (entry("192.0.2.0/24", 80), 5),
            (entry("0.0.0.0/0", 443), 2),
            (entry("::/0", 443), 1),
        ]);
        assert_eq!(
            hits_per_allowance(&allowances, &Sets::new(), &[], &hits),
            vec![5, 5, 3]
        );
    }

    #[test]
    fn incremental_compile_equals_the_whole_compile_on_random_edits() {
        // Nested and adjacent networks on two ports, some expiring: every
        // covering-prefix case of the expiry rule shows up.
        let sources = [
            "any",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3",
            "10.1.2.4",
            "192.0.2.0/24",
            "2001:db8::/32",
            "2001:db8::1",
        ];
        let targets = ["80", "80/udp", "443"];
        let mut rng = crate::testing::Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: usize| rng.index(n);
        let mut policy: BTreeMap<Allowance, Option<u64>> = BTreeMap::new();
        let mut compiled = Compiled::default();
        let mut mirror: BTreeMap<AllowEntry, Option<u64>> = BTreeMap::new();
        for step in 0..3000 {
            let a = Allowance {
                source: sources[next(sources.len())].parse().unwrap(),
                target: Target::Port(targets[next(targets.len())].parse().unwrap()),
            };
            let expiry = [None, Some(100), Some(200), Some(300)][next(4)];
            let old = policy.get(&a).copied();
            let (removed, added) = if next(3) == 0 {
                policy.remove(&a);
                (old.map(|o| (a.clone(), o)).into_iter().collect(), vec![])
            } else {
                policy.insert(a.clone(), expiry);
                (
                    old.map(|o| (a.clone(), o)).into_iter().collect::<Vec<_>>(),
                    vec![(a.clone(), expiry)],
                )
            };
            let changes = compiled.update(&removed, &added, &Sets::new(), &[]);
            for (e, c) in changes {
                match c {
                    Some(at) => mirror.insert(e, at),
                    None => mirror.remove(&e),
                };
            }
            let all: Vec<Allowance> = policy.keys().cloned().collect();
            let whole = Compiled::new(&all, |x| policy[x], &Sets::new(), &[]);
            assert_eq!(compiled.effective(), whole.effective(), "step {step}");
            assert_eq!(&mirror, whole.effective(), "changes at step {step}");
        }
    }
}
