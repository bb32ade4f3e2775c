//! Firewall intent declared on the container, next to the service in a
//! compose file:
//!
//! ```yaml
//! services:
//!   web:
//!     ports: ["8081:8080", "8443:8443"]
//!     labels:
//!       dockwall.allow: "203.0.113.0/24, @office"    # every port it publishes
//!       dockwall.allow.8443/tcp: "any"               # only the one publishing 8443
//! ```
//!
//! `dockwall.allow=SRC[,SRC...]` allows those sources on every port the
//! container publishes; `dockwall.allow.CPORT[/proto]=SRC[,...]` on the one
//! publishing its port CPORT. Sources are addresses, CIDRs, `any` or
//! `@set`. A swarm service's labels (`docker service create --label`) work
//! the same on the ports it publishes. They follow the container as
//! `--container` allowances do and
//! add to the file's allowances. Labels that fail to parse (or name a set
//! that does not exist) fail closed: every port of that container is
//! closed to everyone, file allowances included, until the labels are
//! fixed (which means recreating the container).
//!
//! Pure: the labels come with Docker's bindings ([`Binding::labels`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::{Allowance, Binding, ContainerSpec, PortProto, Sets, Source, Target};

/// The label prefix dockwall reads; every other label is ignored.
pub const PREFIX: &str = "dockwall.";
/// `dockwall.allow` and `dockwall.allow.CPORT[/proto]`.
pub const ALLOW: &str = "dockwall.allow";

/// Whether a label is dockwall's to read.
pub fn ours(key: &str) -> bool {
    key.starts_with(PREFIX)
}

/// What the labels of all containers ask for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Labelled {
    /// One allowance per source and target, each targeting its container.
    pub allowances: Vec<Allowance>,
    /// Containers whose labels fail, with the reason.
    pub invalid: BTreeMap<String, String>,
}

impl Labelled {
    /// The published ports of containers whose labels fail: no allowance
    /// (label or file) opens them.
    pub fn closed_ports(&self, bindings: &[Binding]) -> BTreeSet<PortProto> {
        if self.invalid.is_empty() {
            return BTreeSet::new();
        }
        bindings
            .iter()
            .filter(|b| self.invalid.contains_key(&owner(b)))
            .map(|b| PortProto {
                port: b.host_port,
                proto: b.proto,
            })
            .collect()
    }
}

/// Who carries a binding's labels: the container's name, or `service NAME`.
pub fn owner(b: &Binding) -> String {
    match &b.service {
        Some(name) => format!("service {name}"),
        None => b.container.clone(),
    }
}

/// Where a label allowance comes from: `label on NAME` (a container's) or
/// `label on service NAME`.
pub fn origin(allowance: &Allowance) -> String {
    match &allowance.target {
        Target::Container(spec) => format!("label on {}", spec.name),
        Target::Service(spec) => format!("label on service {}", spec.name),
        Target::Port(_) => "label".to_string(),
    }
}

/// Every allowance in the order [`crate::policy::compile_allowances`]
/// numbers them (the file's, then the labels'), each with where it comes
/// from: `file`, or a label's [`origin`].
pub fn with_origins<'a>(
    file: &'a [Allowance],
    labelled: &'a Labelled,
) -> impl Iterator<Item = (&'a Allowance, String)> {
    file.iter()
        .map(|a| (a, "file".to_string()))
        .chain(labelled.allowances.iter().map(|a| (a, origin(a))))
}

/// Every allowance in compile order as `SOURCE -> TARGET`, a label's with
/// `(label on NAME)`.
pub fn describe_all(allowances: &[Allowance], labelled: &Labelled) -> Vec<String> {
    allowances
        .iter()
        .map(|a| a.to_string())
        .chain(
            labelled
                .allowances
                .iter()
                .map(|a| format!("{a} ({})", origin(a))),
        )
        .collect()
}

/// The label allowances and failures of every container in `bindings`.
pub fn labelled(bindings: &[Binding], sets: &Sets) -> Labelled {
    let mut out = Labelled::default();
    let mut seen = BTreeSet::new();
    for b in bindings {
        let owner = owner(b);
        if b.labels.is_empty() || seen.contains(&owner) {
            continue;
        }
        match parse(&b.container, b.service.is_some(), &b.labels, sets) {
            Ok(allowances) => out.allowances.extend(allowances),
            Err(reason) => {
                out.invalid.insert(owner.clone(), reason);
            }
        }
        seen.insert(owner);
    }
    out
}

/// One container's (or, `service`, one swarm service's) `dockwall.*`
/// labels as allowances; the first label that fails is the error (one line
/// naming the label, the value and why).
pub fn parse(
    container: &str,
    service: bool,
    labels: &BTreeMap<String, String>,
    sets: &Sets,
) -> Result<Vec<Allowance>, String> {
    let mut out = Vec::new();
    for (key, value) in labels.iter().filter(|(k, _)| ours(k)) {
        let port = if key == ALLOW {
            None
        } else if let Some(spec) = key.strip_prefix(ALLOW).and_then(|r| r.strip_prefix('.')) {
            Some(spec.parse::<PortProto>().map_err(|e| {
                format!("label {key}: {e} (the container port, as 8080 in -p 8081:8080)")
            })?)
        } else {
            return Err(format!(
                "label {key}: unknown dockwall label (dockwall reads {ALLOW}=SRC,... and {ALLOW}.CPORT[/proto]=SRC,...)"
            ));
        };
        let sources: Vec<&str> = value.split(',').map(str::trim).collect();
        if sources.iter().any(|s| s.is_empty()) {
            return Err(format!(
                "label {key}={value}: an empty source; give addresses, CIDRs, any or @set, separated by commas"
            ));
        }
        for text in sources {
            let source: Source = text.parse().map_err(|e| format!("label {key}: {e}"))?;
            if let Some(name) = source.set()
                && !sets.contains_key(&name)
            {
                return Err(format!(
                    "label {key}: no set named @{name} (create it with `dockwall set add {name} SRC...`)"
                ));
            }
            let spec = ContainerSpec {
                name: container.to_string(),
                port,
            };
            let allowance = Allowance {
                source,
                target: if service {
                    Target::Service(spec)
                } else {
                    Target::Container(spec)
                },
            };
            if !out.contains(&allowance) {
                out.push(allowance);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Proto, resolve_target};

    fn binding(container: &str, host: u16, cport: u16, labels: &[(&str, &str)]) -> Binding {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Binding::new(
            container,
            "id",
            "0.0.0.0".parse().unwrap(),
            host,
            cport,
            Proto::Tcp,
        )
        .with_labels(&labels)
    }

    #[test]
    fn all_ports_one_port_and_sets() {
        let mut sets = Sets::new();
        sets.insert("office".parse().unwrap(), BTreeSet::new());
        let b = [
            binding(
                "web",
                8081,
                8080,
                &[
                    ("dockwall.allow", "203.0.113.0/24, @office"),
                    ("dockwall.allow.8443/tcp", "any"),
                    ("com.example.other", "x"),
                ],
            ),
            binding(
                "web",
                8443,
                8443,
                &[("dockwall.allow", "203.0.113.0/24, @office")],
            ),
        ];
        let l = labelled(&b, &sets);
        assert!(l.invalid.is_empty(), "{:?}", l.invalid);
        assert_eq!(l.allowances.len(), 3);
        let any = l
            .allowances
            .iter()
            .find(|a| a.source == Source::Any)
            .unwrap();
        let ports: Vec<u16> = resolve_target(&any.target, &b)
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, vec![8443]);
        assert_eq!(b[0].labels.len(), 2, "only dockwall.* labels are kept");
    }

    #[test]
    fn a_service_is_not_a_container_of_the_same_name() {
        let svc = binding("web", 8098, 8080, &[("dockwall.allow", "any")]).for_service();
        let ctr = binding("web", 8081, 8080, &[]);
        let b = [svc, ctr];
        let l = labelled(&b, &Sets::new());
        assert_eq!(l.allowances.len(), 1);
        assert_eq!(origin(&l.allowances[0]), "label on service web");
        let ports =
            |t: &Target| -> Vec<u16> { resolve_target(t, &b).iter().map(|p| p.port).collect() };
        assert_eq!(ports(&l.allowances[0].target), vec![8098]);
        assert_eq!(
            ports(&Target::Container("web".parse().unwrap())),
            vec![8081]
        );
        assert_eq!(
            ports(&Target::Service("web:8080".parse().unwrap())),
            vec![8098]
        );
    }

    #[test]
    fn bad_labels_fail_closed_with_a_reason() {
        let sets = Sets::new();
        for (labels, why) in [
            (("dockwall.allow", "203.0.113.0/33"), "invalid source"),
            (("dockwall.allow", "10.0.0.1,,10.0.0.2"), "empty source"),
            (("dockwall.allow.http", "any"), "invalid port"),
            (("dockwall.alow", "any"), "unknown dockwall label"),
            (("dockwall.allow", "@missing"), "no set named @missing"),
        ] {
            let b = [binding("web", 8081, 8080, &[labels])];
            let l = labelled(&b, &sets);
            assert!(l.allowances.is_empty());
            let reason = &l.invalid["web"];
            assert!(reason.contains(why), "{labels:?}: {reason}");
            assert_eq!(
                l.closed_ports(&b),
                BTreeSet::from([PortProto {
                    port: 8081,
                    proto: Proto::Tcp
                }])
            );
        }
    }
}
