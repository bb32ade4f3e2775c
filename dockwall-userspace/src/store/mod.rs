//! One policy for a fleet: the allowances and named sets live in etcd
//! (`--store etcd://HOST:PORT[,HOST:PORT...]/PREFIX`) instead of the file.
//!
//! Keys under PREFIX, one per allowance, JSON values:
//!
//! ```text
//! PREFIX/allow/all/ID           every host applies it
//! PREFIX/allow/host/NAME/ID     only host NAME applies it
//! PREFIX/sets/NAME              a named set ({"members": [...]})
//! ```
//!
//! ID is the allowance itself, `SOURCE|KIND=SPEC` with `/` and `%`
//! percent-encoded (`203.0.113.0%2F24|port=8081%2Ftcp`), so the same
//! allowance is the same key and `revoke` finds it. A value carries the
//! comment, the author (uid and host that wrote it) and the expiry; an
//! expiring allowance's key also has an etcd lease, so etcd removes it
//! shortly after the kernel stopped matching it.
//!
//! The daemon reads PREFIX whole, then watches it from the revision it
//! read ([`etcd::follow`]); each change is applied through the same
//! compile step as the file's policy. Fail-static: with every member
//! unreachable the host keeps what it applied, from a cache file beside
//! the config across restarts, and says so.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    config::Policy,
    policy::{Allowance, ContainerSpec, PortProto, SetName, Source, Target},
};

pub mod etcd;

/// How long a store request may take before the store counts as unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the store is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSpec {
    /// As the admin wrote it (for messages).
    pub url: String,
    /// `HOST:PORT` of each member.
    pub members: Vec<String>,
    /// Every key starts with it; ends with `/`.
    pub prefix: String,
    pub tls: Option<Tls>,
    /// etcd user and password.
    pub user: Option<(String, String)>,
}

/// TLS to the members: the CA that signed their certificates, and a client
/// certificate when they ask for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The store options as the CLI and the environment give them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Keep the allowances in etcd: etcd://HOST:PORT[,HOST:PORT...]/PREFIX (default: the file)
    #[arg(
        long = "store",
        global = true,
        env = "DOCKWALL_STORE",
        value_name = "URL"
    )]
    pub store: Option<String>,
    /// CA certificate (PEM) that signed the etcd members' certificates: TLS
    #[arg(long, global = true, env = "DOCKWALL_STORE_CA", value_name = "FILE")]
    pub store_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd members that require one (with --store-key)
    #[arg(long, global = true, env = "DOCKWALL_STORE_CERT", value_name = "FILE")]
    pub store_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM)
    #[arg(long, global = true, env = "DOCKWALL_STORE_KEY", value_name = "FILE")]
    pub store_key: Option<PathBuf>,
    /// etcd user (the password comes from DOCKWALL_STORE_PASSWORD or --store-password-file)
    #[arg(long, global = true, env = "DOCKWALL_STORE_USER", value_name = "NAME")]
    pub store_user: Option<String>,
    /// File holding the etcd user's password (first line)
    #[arg(
        long,
        global = true,
        env = "DOCKWALL_STORE_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub store_password_file: Option<PathBuf>,
}

impl StoreArgs {
    /// The store to use, or None for the file.
    pub fn spec(&self) -> anyhow::Result<Option<StoreSpec>> {
        let Some(url) = self.store.as_deref().filter(|u| !u.is_empty()) else {
            let stray = [
                ("--store-ca", self.store_ca.is_some()),
                ("--store-cert", self.store_cert.is_some()),
                ("--store-user", self.store_user.is_some()),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, set)| *set) {
                bail!("{flag} only goes with --store etcd://HOST:PORT/PREFIX");
            }
            return Ok(None);
        };
        let mut spec = parse_url(url)?;
        spec.tls = match (&self.store_ca, &self.store_cert, &self.store_key) {
            (None, None, None) => None,
            (Some(ca), cert, key) => Some(Tls {
                ca: ca.clone(),
                identity: match (cert, key) {
                    (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                    (None, None) => None,
                    _ => bail!("--store-cert and --store-key go together"),
                },
            }),
            (None, _, _) => {
                bail!(
                    "--store-cert needs --store-ca (the CA that signed the members' certificates)"
                )
            }
        };
        if let Some(user) = &self.store_user {
            let password = match (
                &self.store_password_file,
                std::env::var("DOCKWALL_STORE_PASSWORD"),
            ) {
                (Some(file), _) => std::fs::read_to_string(file)
                    .with_context(|| format!("reading the etcd password from {}", file.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
                (None, Ok(p)) => p,
                (None, Err(_)) => bail!(
                    "--store-user {user} needs a password: DOCKWALL_STORE_PASSWORD or --store-password-file FILE"
                ),
            };
            spec.user = Some((user.clone(), password));
        }
        Ok(Some(spec))
    }
}

/// Parses `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`.
pub fn parse_url(url: &str) -> anyhow::Result<StoreSpec> {
    let usage = "expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX, e.g. etcd://10.0.0.5:2379,10.0.0.6:2379/dockwall";
    let Some(rest) = url.strip_prefix("etcd://") else {
        bail!("invalid store '{url}': {usage}");
    };
    let Some((hosts, prefix)) = rest.split_once('/') else {
        bail!("invalid store '{url}': no /PREFIX; {usage}");
    };
    let prefix = prefix.trim_end_matches('/');
    let valid_prefix = !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
    if !valid_prefix {
        bail!(
            "invalid store '{url}': the prefix '{prefix}' must be letters, digits, '_', '.', '-' or '/'; {usage}"
        );
    }
    let mut members = Vec::new();
    for member in hosts.split(',') {
        let port = member.rsplit_once(':').map(|(_, p)| p);
        if member.is_empty() || port.is_none_or(|p| p.parse::<u16>().is_err()) {
            bail!("invalid store '{url}': member '{member}' is not HOST:PORT; {usage}");
        }
        members.push(member.to_string());
    }
    Ok(StoreSpec {
        url: url.to_string(),
        members,
        prefix: format!("{prefix}/"),
        tls: None,
        user: None,
    })
}

/// Which hosts an allowance is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every host.
    All,
    /// Only this one.
    Host(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::All => f.write_str("all hosts"),
            Scope::Host(h) => write!(f, "host {h}"),
        }
    }
}

/// This host's name for the store: `--host`, else the kernel's hostname.
pub fn this_host() -> String {
    std::env::var("DOCKWALL_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".to_string())
}

/// Checks a host name given with `--host`.
pub fn check_host(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        bail!("invalid host name '{name}': letters, digits, '_', '.' and '-' (as in `hostname`)");
    }
    Ok(())
}

fn encode(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

/// The key of an allowance.
pub fn allow_key(spec: &StoreSpec, scope: &Scope, a: &Allowance) -> String {
    let (kind, target) = match &a.target {
        Target::Port(p) => ("port", p.to_string()),
        Target::Container(c) => ("container", c.to_string()),
        Target::Service(s) => ("service", s.to_string()),
    };
    let id = format!(
        "{}|{kind}={}",
        encode(&a.source.to_string()),
        encode(&target)
    );
    match scope {
        Scope::All => format!("{}allow/all/{id}", spec.prefix),
        Scope::Host(h) => format!("{}allow/host/{h}/{id}", spec.prefix),
    }
}

/// The key of a named set.
pub fn set_key(spec: &StoreSpec, name: SetName) -> String {
    format!("{}sets/{name}", spec.prefix)
}

/// Who wrote a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Author {
    pub uid: u32,
    pub host: String,
}

impl Author {
    pub fn me() -> Self {
        Author {
            // SAFETY: getuid has no preconditions.
            uid: unsafe { libc::getuid() },
            host: this_host(),
        }
    }
}

/// An allowance's value in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowValue {
    pub source: Source,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortProto>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ContainerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// RFC 3339 UTC; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    pub author: Author,
}

impl AllowValue {
    pub fn new(a: &Allowance, comment: Option<String>, expires: Option<u64>) -> Self {
        let (mut port, mut container, mut service) = (None, None, None);
        match &a.target {
            Target::Port(p) => port = Some(*p),
            Target::Container(c) => container = Some(c.clone()),
            Target::Service(s) => service = Some(s.clone()),
        }
        AllowValue {
            source: a.source,
            port,
            container,
            service,
            comment,
            expires: expires.map(crate::clock::rfc3339),
            author: Author::me(),
        }
    }

    /// (allowance, comment, expiry as unix seconds).
    pub fn allowance(&self) -> Result<(Allowance, Option<String>, Option<u64>), String> {
        let target = match (&self.port, &self.container, &self.service) {
            (Some(p), None, None) => Target::Port(*p),
            (None, Some(c), None) => Target::Container(c.clone()),
            (None, None, Some(s)) => Target::Service(s.clone()),
            _ => return Err("needs exactly one of port, container or service".into()),
        };
        let expires = self
            .expires
            .as_deref()
            .map(crate::clock::parse_rfc3339)
            .transpose()?;
        Ok((
            Allowance {
                source: self.source,
                target,
            },
            self.comment.clone(),
            expires,
        ))
    }
}

/// A named set's value in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetValue {
    pub members: Vec<Source>,
    pub author: Author,
}

impl SetValue {
    /// The members as networks ([`parse_entry`] refuses a set holding
    /// anything else).
    pub fn nets(&self) -> BTreeSet<ipnet::IpNet> {
        self.members
            .iter()
            .filter_map(|m| match m {
                Source::Net(n) => Some(*n),
                _ => None,
            })
            .collect()
    }
}

/// One key of the store as this host reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Allow(Scope, AllowValue),
    Set(SetName, SetValue),
}

/// Parses one key and value under the prefix; `Ok(None)` for keys that are
/// not dockwall's (or another host's allowances, when `host` is given).
pub fn parse_entry(spec: &StoreSpec, key: &str, value: &[u8]) -> Result<Option<Entry>, String> {
    let Some(rest) = key.strip_prefix(&spec.prefix) else {
        return Ok(None);
    };
    if let Some(name) = rest.strip_prefix("sets/") {
        let name: SetName = name.parse()?;
        let v: SetValue = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        if let Some(bad) = v.members.iter().find(|m| !matches!(m, Source::Net(_))) {
            return Err(format!(
                "set @{name}: member '{bad}' is not an address or CIDR"
            ));
        }
        return Ok(Some(Entry::Set(name, v)));
    }
    let scope = if rest.starts_with("allow/all/") {
        Scope::All
    } else if let Some(host) = rest.strip_prefix("allow/host/") {
        match host.split_once('/') {
            Some((host, _)) => Scope::Host(host.to_string()),
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    let v: AllowValue = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    Ok(Some(Entry::Allow(scope, v)))
}

/// The policy a host applies: every global allowance, its own, and the
/// sets. `revision` is the store's. Values that do not parse are left out
/// (fewer allowances: fail closed) and returned as warnings.
pub fn policy_for<'a>(
    spec: &StoreSpec,
    host: &str,
    kvs: impl Iterator<Item = (&'a String, &'a Vec<u8>)>,
    revision: u64,
) -> (Policy, Vec<String>) {
    let mut policy = Policy {
        revision,
        ..Policy::default()
    };
    let mut warnings = Vec::new();
    let mut allows = Vec::new();
    for (key, value) in kvs {
        match parse_entry(spec, key, value) {
            Ok(Some(Entry::Set(name, v))) => {
                policy.sets.insert(name, v.nets());
            }
            Ok(Some(Entry::Allow(scope, v))) => {
                if scope == Scope::All || scope == Scope::Host(host.to_string()) {
                    allows.push((key, v));
                }
            }
            Ok(None) => {}
            Err(e) => warnings.push(format!("{key}: {e} (left out)")),
        }
    }
    for (key, v) in allows {
        match v.allowance() {
            Ok((a, comment, expires)) => {
                if let Some(name) = a.source.set()
                    && !policy.sets.contains_key(&name)
                {
                    warnings.push(format!("{key}: no set named @{name} (left out)"));
                    continue;
                }
                if let Some(c) = comment {
                    policy.comments.insert(a.clone(), c);
                }
                if let Some(at) = expires {
                    policy.expires.insert(a.clone(), at);
                }
                policy.add(a);
            }
            Err(e) => warnings.push(format!("{key}: {e} (left out)")),
        }
    }
    (policy, warnings)
}

/// The cache of the last policy applied from the store, beside the config
/// file: a restart without etcd enforces it (fail-static).
pub fn cache_path(config: &Path) -> PathBuf {
    config.with_extension("store-cache.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let s = parse_url("etcd://127.0.0.1:2379,10.0.0.2:2379/fleet/prod").unwrap();
        assert_eq!(s.members, vec!["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(s.prefix, "fleet/prod/");
        for bad in [
            "http://x:1/p",
            "etcd://x:1",
            "etcd://x/p",
            "etcd://x:1/",
            "etcd://x:1/a b",
        ] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains("invalid store"), "{bad}: {e}");
        }
    }

    #[test]
    fn keys_and_values_roundtrip() {
        let spec = parse_url("etcd://127.0.0.1:2379/dw").unwrap();
        let a = Allowance {
            source: "203.0.113.0/24".parse().unwrap(),
            target: Target::Port("8081".parse().unwrap()),
        };
        let key = allow_key(&spec, &Scope::Host("h1".into()), &a);
        assert_eq!(key, "dw/allow/host/h1/203.0.113.0%2F24|port=8081%2Ftcp");
        let value = serde_json::to_vec(&AllowValue::new(
            &a,
            Some("office".into()),
            Some(2_000_000_000),
        ))
        .unwrap();
        let kvs = [(key.clone(), value)];
        let (mine, w) = policy_for(&spec, "h1", kvs.iter().map(|(k, v)| (k, v)), 7);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(mine.allowances, vec![a.clone()]);
        assert_eq!(mine.expires[&a], 2_000_000_000);
        assert_eq!(mine.revision, 7);
        let (theirs, _) = policy_for(&spec, "h2", kvs.iter().map(|(k, v)| (k, v)), 7);
        assert!(
            theirs.allowances.is_empty(),
            "another host's allowance is not applied"
        );
        // A bad value is left out, not fatal.
        let bad = [("dw/allow/all/x".to_string(), b"{".to_vec())];
        let (p, w) = policy_for(&spec, "h1", bad.iter().map(|(k, v)| (k, v)), 1);
        assert!(p.allowances.is_empty() && w.len() == 1);
    }
}
