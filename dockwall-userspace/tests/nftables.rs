//! The nftables fallback's in-place edits against the real kernel: set
//! elements added and deleted over dockwall's own netlink messages, read
//! back with `nft`, after every step of a seeded random edit sequence.
//!
//! Needs root (CAP_NET_ADMIN) and `nft`. Each test runs on a thread moved
//! into a network namespace of its own (nftables state is per namespace,
//! and `nft` children inherit the thread's), so it never sees or touches
//! the host's tables, a running dockwall's included.

use std::{collections::BTreeSet, process::Command};

use dockwall_userspace::{
    dataplane::{nftables, nftables_netlink},
    policy::{AllowEntry, Proto, Scope, maximal},
    testing::Rng,
};

/// Runs `test` on a thread in a fresh network namespace.
fn in_private_netns(test: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which owns nothing yet.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {} (are we root?)",
            std::io::Error::last_os_error()
        );
        test();
    })
    .join()
    .expect("test thread");
}

fn entry(port: u16, net: &str) -> AllowEntry {
    AllowEntry {
        port,
        proto: Proto::Tcp,
        net: net.parse().expect("net"),
    }
}

fn is_host(net: &ipnet::IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// What the kernel's set holds, as `nft` lists it.
fn elements(set: &str) -> BTreeSet<String> {
    let out = Command::new("nft")
        .args(["list", "set", "inet", nftables::TABLE, set])
        .output()
        .expect("nft list set");
    assert!(
        out.status.success(),
        "nft list set {set}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(at) = text.find("elements = {") else {
        return BTreeSet::new();
    };
    let rest = &text[at + "elements = {".len()..];
    rest[..rest.find('}').expect("closing brace")]
        .split([',', ' ', '\n', '\t'])
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// (set, element) as the table must hold them for `applied`: hosts in the
/// hash set, the maximal wider networks in the interval set.
fn expected(applied: &BTreeSet<AllowEntry>) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for ipv6 in [false, true] {
        let family: Vec<&AllowEntry> = applied
            .iter()
            .filter(|e| e.net.addr().is_ipv6() == ipv6)
            .collect();
        for e in family.iter().filter(|e| is_host(&e.net)) {
            out.insert((
                nftables::set_name(ipv6, Proto::Tcp, 80),
                e.net.addr().to_string(),
            ));
        }
        for n in maximal(family.iter().map(|e| &e.net).filter(|n| !is_host(n))) {
            out.insert((nftables::nets_set_name(ipv6, Proto::Tcp, 80), n.to_string()));
        }
    }
    out
}

fn listed() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for ipv6 in [false, true] {
        for set in [
            nftables::set_name(ipv6, Proto::Tcp, 80),
            nftables::nets_set_name(ipv6, Proto::Tcp, 80),
        ] {
            out.extend(elements(&set).into_iter().map(|e| (set.clone(), e)));
        }
    }
    out
}

#[test]
fn in_place_edits_over_netlink_keep_the_kernel_sets_equal_to_the_model() {
    in_private_netns(|| {
        let nets = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3/32",
            "10.1.2.4/30",
            "10.1.3.0/24",
            "10.2.0.0/24",
            "10.2.1.0/24",
            "192.0.2.9/32",
            // Ends at the last address: a start element and no end.
            "255.255.255.0/24",
            "128.0.0.0/1",
            "2001:db8::/32",
            "2001:db8::1/128",
            "2001:db8:1::/48",
            "ffff::/16",
        ];
        // Never touched: every group keeps a member, so the rules never
        // change and every step is an in-place element update.
        let keep = [entry(80, "203.0.113.1/32"), entry(80, "2001:db9::1/128")];
        let mut applied: BTreeSet<AllowEntry> = keep.into_iter().collect();
        nftables::apply(&applied, &Scope::default(), &["dwtest0".to_string()], false)
            .expect("install the table");
        assert!(nftables::installed(), "the chain exists after install");
        assert_eq!(listed(), expected(&applied));
        let mut rng = Rng::new(7);
        let mut next = |n: usize| rng.index(n);
        for step in 0..300 {
            let batch: Vec<(AllowEntry, bool)> = (0..1 + next(3))
                .map(|_| (entry(80, nets[next(nets.len())]), next(2) == 0))
                .collect();
            let in_place = nftables::update_in_place(&mut applied, &batch)
                .unwrap_or_else(|e| panic!("step {step} {batch:?}: {e:#}"));
            assert!(in_place, "step {step}: the rules never change here");
            assert_eq!(listed(), expected(&applied), "step {step}: after {batch:?}");
        }

        // A transaction with a refused part changes nothing, and says which
        // element was refused.
        let before = listed();
        let ops = [
            nftables_netlink::ElementOp {
                add: true,
                set: nftables::set_name(false, Proto::Tcp, 80),
                net: "198.51.100.7/32".parse().expect("net"),
                interval: false,
            },
            nftables_netlink::ElementOp {
                add: false,
                set: nftables::set_name(false, Proto::Tcp, 80),
                net: "198.51.100.8/32".parse().expect("net"),
                interval: false,
            },
        ];
        let err = nftables_netlink::apply_elements(nftables::TABLE, &ops)
            .expect_err("deleting an absent element fails");
        let text = err.to_string();
        assert!(
            text.contains("delete element") && text.contains("198.51.100.8"),
            "{text}"
        );
        assert_eq!(
            listed(),
            before,
            "a refused batch applies none of its elements"
        );

        nftables::remove().expect("remove the table");
        assert!(!nftables::installed(), "no chain after remove");
    });
}
