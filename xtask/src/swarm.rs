//! A one-node swarm on the lab's dockerd: a service published through the
//! routing mesh (ingress) has no port bindings on its task container, so
//! only the services API says it is published. Filtered before the mesh's
//! DNAT like a container port: an allowed source reaches it, others are
//! blocked, the task's egress works, under eBPF and each fallback alone.
//!
//! The routing mesh needs IPVS (`ip_vs`), which this host's kernel lacks:
//! CI runs this phase in a VM with Debian's kernel (matrix.rs).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{
    e2e::{Report, blocked, connects, http_is, retry},
    lab::{Client, Dockerd, Dockwall, IMAGE},
};

const SERVICE: &str = "sweb";
const PUBLISHED: u16 = 8098;

/// Leaves the swarm (and so removes the service) when dropped.
struct Swarm<'a>(&'a Dockerd);

impl Drop for Swarm<'_> {
    fn drop(&mut self) {
        let _ = self.0.cli(&["service", "rm", SERVICE]);
        let _ = self.0.cli(&["swarm", "leave", "--force"]);
    }
}

pub fn run(
    r: &mut Report,
    dockerd: &Dockerd,
    dw: &Dockwall,
    a: &Client,
    b: &Client,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&dw.config);
    dockerd
        .cli(&["swarm", "init", "--advertise-addr", &a.host4])
        .context("docker swarm init")?;
    let _swarm = Swarm(dockerd);
    let script = format!(
        "/bin/busybox mkdir -p /w && echo {SERVICE} > /w/index.html && exec /bin/busybox httpd -f -p 8080 -h /w"
    );
    let publish = format!("published={PUBLISHED},target=8080");
    dockerd
        .cli(&[
            "service",
            "create",
            "--detach",
            "--no-resolve-image",
            "--name",
            SERVICE,
            "--publish",
            &publish,
            IMAGE,
            "/bin/busybox",
            "sh",
            "-c",
            &script,
        ])
        .context("docker service create")?;
    let (a_addr, b_addr) = (
        format!("{}:{PUBLISHED}", a.host4),
        format!("{}:{PUBLISHED}", b.host4),
    );
    // The mesh takes a while to program IPVS (slower still under TCG).
    let deadline = Instant::now() + Duration::from_secs(120);
    while http_is(b, &b_addr, SERVICE).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the swarm service never answered on {b_addr} without dockwall: {}",
                dockerd
                    .cli(&["service", "ps", "--no-trunc", SERVICE])
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    r.check(
        "swarm: without dockwall both sources reach the service through the routing mesh",
        http_is(a, &a_addr, SERVICE),
    );
    let task = dockerd.cli(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.swarm.service.name={SERVICE}"),
    ])?;
    let bindings = dockerd.cli(&["port", &task])?;
    r.expect(
        "swarm: the task container has no port binding (only the services API knows the port)",
        bindings.is_empty(),
        || bindings.clone(),
    );

    for (plane, flags) in [
        ("ebpf + iptables", &[][..]),
        (
            "iptables alone",
            &["--no-ebpf", "--fallback", "iptables"][..],
        ),
        (
            "nftables alone",
            &["--no-ebpf", "--fallback", "nftables"][..],
        ),
    ] {
        let _ = std::fs::remove_file(&dw.config);
        let loaded = dw.load_with(&[&a.host_if, &b.host_if], flags, None)?;
        r.check(
            &format!("swarm, {plane}: with no allowance the ingress-published service is blocked"),
            retry(|| blocked(b, &b_addr)),
        );
        let (code, out, err) = dw.run(&["allow", &a.addr4, "--service", SERVICE])?;
        r.expect(
            &format!("swarm, {plane}: `allow --service` resolves the published port"),
            code == 0 && out.contains(&format!("[published {PUBLISHED}/tcp]")),
            || format!("exit {code}: {out}{err}"),
        );
        r.check(
            &format!("swarm, {plane}: the allowed source reaches the service"),
            retry(|| http_is(a, &a_addr, SERVICE)),
        );
        r.check(
            &format!("swarm, {plane}: another source is blocked"),
            blocked(b, &b_addr),
        );
        r.check(
            &format!("swarm, {plane}: the task's egress works"),
            crate::equivalence::tcp_egress(dockerd, &task, a, 8099),
        );
        if plane == "ebpf + iptables" {
            let (_, status, _) = dw.run(&["status"])?;
            r.expect(
                "swarm: `status` lists the service's published port",
                status.contains(SERVICE) && status.contains(&format!(":{PUBLISHED} ->")),
                || status.clone(),
            );
            let (code, _, err) = dw.run(&["allow", &a.addr4, "--service", "nosuch"])?;
            r.expect(
                "swarm: `allow --service` of an unknown service is refused naming it",
                code != 0 && err.contains("unknown service 'nosuch'"),
                || err.clone(),
            );
        }
        drop(loaded);
        if connects(b, &b_addr).is_err() {
            bail!("after unload the service is not reachable again");
        }
    }
    let _ = std::fs::remove_file(&dw.config);
    Ok(())
}
