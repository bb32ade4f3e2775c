//! `dockwall explain`'s pure part: what the policy decides for a new
//! connection from one source to one published port, and why. The CLI
//! compares this with what each installed dataplane holds.

use std::net::IpAddr;

use serde::Serialize;

use crate::{
    clock,
    config::Policy,
    policy::{self, Binding, PortProto},
};

/// What happens to a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// An allowance matches: it goes through.
    Allow,
    /// In scope, no allowance matches: dropped (counted and let through in audit mode).
    Drop,
    /// Nothing publishes that port for the source's family: dockwall lets it pass.
    NotInScope,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Drop => "drop",
            Verdict::NotInScope => "not in scope",
        }
    }
}

/// Where a connection to the published port lands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reach {
    pub container: String,
    /// The host address it is bound on (`0.0.0.0` / `::` for every one).
    pub host_ip: String,
    pub container_port: u16,
}

/// The allowance entry that decides: the longest matching prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The saved allowances that need this entry (`SOURCE -> TARGET`).
    pub allowances: Vec<String>,
    /// The matching network.
    pub entry: String,
    /// RFC 3339 time it lapses (the latest of the allowances covering it); null: never.
    pub expires_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub verdict: Verdict,
    pub reaches: Vec<Reach>,
    pub decided_by: Option<Decision>,
    /// Lapsed allowances that would have matched (`SOURCE -> TARGET`).
    pub expired: Vec<String>,
    /// Why the port is closed to everyone: its container's labels fail.
    pub closed_by_labels: Option<String>,
}

/// The policy's answer for a new connection from `source` to published
/// port `pp` at `now`, from the same compile step the dataplanes get.
pub fn decide(
    policy: &Policy,
    bindings: &[Binding],
    source: IpAddr,
    pp: PortProto,
    now: u64,
) -> Explanation {
    let scope = policy::compile_scope(bindings);
    let in_scope = scope
        .host_ports
        .iter()
        .any(|hp| hp.port == pp.port && hp.proto == pp.proto && hp.ipv6() == source.is_ipv6());
    let reaches: Vec<Reach> = bindings
        .iter()
        .filter(|b| b.host_port == pp.port && b.proto == pp.proto && b.ipv6 == source.is_ipv6())
        .map(|b| Reach {
            container: b.container.clone(),
            host_ip: b.host_ip_display(),
            container_port: b.container_port,
        })
        .collect();
    let live = policy.in_force(now);
    let compiled = policy::compile_allowances(&live.allowances, &live.sets, bindings);
    let labelled = crate::labels::labelled(bindings, &live.sets);
    let described = crate::labels::describe_all(&live.allowances, &labelled);
    // The longest matching entry, as the kernel's LPM lookup finds it.
    let best = compiled
        .iter()
        .filter(|(e, _)| e.port == pp.port && e.proto == pp.proto && e.net.contains(&source))
        .max_by_key(|(e, _)| e.net.prefix_len());
    // Expiries as the kernel gets them: an entry lives as long as the
    // longest-lived allowance covering it.
    let expiries = policy::entry_expiries(&compiled, |i| {
        live.allowances
            .get(i)
            .and_then(|a| live.expires.get(a).copied())
    });
    let decided_by = best.map(|(entry, owners)| Decision {
        allowances: owners
            .iter()
            .filter_map(|&i| described.get(i).cloned())
            .collect(),
        entry: entry.net.to_string(),
        expires_at: expiries.get(entry).copied().flatten().map(clock::rfc3339),
    });
    let expired = policy
        .allowances
        .iter()
        .filter(|a| policy.expired(a, now))
        .filter(|a| {
            policy::resolve_target(&a.target, bindings).contains(&pp)
                && a.source
                    .nets(&policy.sets)
                    .iter()
                    .any(|n| n.contains(&source))
        })
        .map(|a| a.to_string())
        .collect();
    // A port of a container whose labels fail is closed to everyone.
    let closed_by_labels = labelled
        .invalid
        .iter()
        .find(|(owner, _)| {
            bindings.iter().any(|b| {
                b.host_port == pp.port && b.proto == pp.proto && crate::labels::owner(b) == **owner
            })
        })
        .map(|(container, reason)| format!("the labels of {container} fail: {reason}"));
    let verdict = match (in_scope, decided_by.is_some()) {
        (false, _) => Verdict::NotInScope,
        (true, true) => Verdict::Allow,
        (true, false) => Verdict::Drop,
    };
    Explanation {
        verdict,
        reaches,
        decided_by,
        expired,
        closed_by_labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Allowance, Proto, Target};

    fn bindings() -> Vec<Binding> {
        let any4: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        vec![
            Binding::new("web", "id1", any4, 8081, 8080, Proto::Tcp),
            Binding::new("web", "id1", any6, 8081, 8080, Proto::Tcp),
            Binding::new("dns", "id2", any4, 5353, 53, Proto::Udp),
        ]
    }

    fn allow(policy: &mut Policy, source: &str, target: &str) -> Allowance {
        let a = Allowance {
            source: source.parse().unwrap(),
            target: Target::Port(target.parse().unwrap()),
        };
        policy.add(a.clone());
        a
    }

    #[test]
    fn longest_prefix_decides_and_names_its_allowances() {
        let mut policy = Policy::default();
        allow(&mut policy, "192.0.2.0/24", "8081");
        allow(&mut policy, "192.0.2.7", "8081");
        let tcp: PortProto = "8081".parse().unwrap();
        let e = decide(&policy, &bindings(), "192.0.2.7".parse().unwrap(), tcp, 0);
        assert_eq!(e.verdict, Verdict::Allow);
        let d = e.decided_by.unwrap();
        assert_eq!(d.entry, "192.0.2.7/32");
        assert_eq!(d.allowances, vec!["192.0.2.7 -> port 8081/tcp"]);
        assert_eq!(e.reaches[0].container, "web");
        assert_eq!(e.reaches[0].container_port, 8080);
        let e = decide(&policy, &bindings(), "192.0.2.8".parse().unwrap(), tcp, 0);
        assert_eq!(e.decided_by.unwrap().entry, "192.0.2.0/24");
        let e = decide(
            &policy,
            &bindings(),
            "198.51.100.1".parse().unwrap(),
            tcp,
            0,
        );
        assert_eq!((e.verdict, e.decided_by), (Verdict::Drop, None));
    }

    #[test]
    fn scope_follows_the_family_and_protocol() {
        let policy = Policy::default();
        let e = decide(
            &policy,
            &bindings(),
            "2001:db8::1".parse().unwrap(),
            "5353/udp".parse().unwrap(),
            0,
        );
        assert_eq!(e.verdict, Verdict::NotInScope);
        let e = decide(
            &policy,
            &bindings(),
            "192.0.2.1".parse().unwrap(),
            "5353/tcp".parse().unwrap(),
            0,
        );
        assert_eq!(e.verdict, Verdict::NotInScope);
        let e = decide(
            &policy,
            &bindings(),
            "2001:db8::1".parse().unwrap(),
            "8081".parse().unwrap(),
            0,
        );
        assert_eq!(e.verdict, Verdict::Drop);
    }

    #[test]
    fn expired_allowances_do_not_decide_but_are_named() {
        let mut policy = Policy::default();
        let a = allow(&mut policy, "192.0.2.7", "8081");
        policy.expires.insert(a, 100);
        let b = allow(&mut policy, "192.0.2.0/24", "8081");
        policy.expires.insert(b, 200);
        let tcp: PortProto = "8081".parse().unwrap();
        let src = "192.0.2.7".parse().unwrap();
        let e = decide(&policy, &bindings(), src, tcp, 50);
        assert_eq!(
            e.decided_by.unwrap().expires_at.as_deref(),
            Some("1970-01-01T00:03:20Z"),
            "the /24 keeps the /32's source in until 200"
        );
        let e = decide(&policy, &bindings(), src, tcp, 150);
        assert_eq!(e.decided_by.unwrap().entry, "192.0.2.0/24");
        assert_eq!(e.expired, vec!["192.0.2.7 -> port 8081/tcp"]);
        let e = decide(&policy, &bindings(), src, tcp, 200);
        assert_eq!(e.verdict, Verdict::Drop);
        assert_eq!(e.expired.len(), 2);
    }
}
