//! `load --metrics ADDR:PORT`: Prometheus metrics over HTTP (`GET /metrics`),
//! encoded by the `prometheus-client` crate (OpenMetrics text).
//!
//! Every scrape reads the kernel's counters afresh; nothing is cached, so a
//! scrape shows what the filter did up to that moment. Off by default, and
//! refused on a non-loopback address unless `--metrics-public` says so:
//! the labels name containers, ports and allowed sources.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use dockwall_common::stat;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{config, dataplane::ebpf, policy, runtime};

/// Checks the address before anything is installed.
pub fn check_addr(addr: SocketAddr, public: bool) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() && !public {
        bail!(
            "--metrics {addr} is not a loopback address: anyone who reaches it sees your published \
             ports, containers and allowed sources; use 127.0.0.1:{} (scrape through a tunnel or \
             a local agent), or add --metrics-public if you mean it",
            addr.port()
        );
    }
    Ok(())
}

/// Binds the listener (before the filter is installed, so a taken port
/// fails `load` with nothing changed).
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics {addr}: bind() failed"))?;
    listener
        .set_nonblocking(true)
        .context("metrics listener: fcntl(O_NONBLOCK)")?;
    Ok(listener)
}

/// What the daemon shares with the metrics server.
#[derive(Clone)]
pub struct Shared {
    pub config_path: std::path::PathBuf,
    /// Whether the last resync reached Docker.
    pub docker_up: Arc<AtomicBool>,
}

/// Serves scrapes until the daemon exits.
pub async fn serve(listener: std::net::TcpListener, shared: Shared) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dockwall: metrics server could not start: {e}");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // A client that never finishes its request cannot hold the task.
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &shared)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let target = line.split_whitespace().take(2).collect::<Vec<_>>();
    let (status, content_type, body) = match target.as_slice() {
        ["GET", path] if *path == "/metrics" || path.starts_with("/metrics?") => {
            match render(shared) {
                Ok(body) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(e) => (
                    "500 Internal Server Error",
                    "text/plain",
                    format!("dockwall: reading the counters failed: {e:#}\n"),
                ),
            }
        }
        ["GET", _] => (
            "404 Not Found",
            "text/plain",
            "dockwall serves /metrics only\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Names of the verdict counters, in `stat` index order.
pub const VERDICT_NAMES: [&str; stat::VERDICTS as usize] = [
    "allowed",
    "dropped",
    "not_in_scope",
    "established",
    "reply",
    "fragment",
    "malformed",
    "audited",
];

/// One scrape: everything read now.
fn render(shared: &Shared) -> anyhow::Result<String> {
    let state = runtime::state()?;
    let ifaces: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
    let bindings = runtime::published().unwrap_or_default();
    let policy = match runtime::applied_policy(&shared.config_path)? {
        Some(p) => p,
        None => config::load(&shared.config_path)?,
    };
    let policy = policy.in_force(crate::clock::now_unix());
    let mut registry = Registry::with_prefix("dockwall");

    let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        registry.register(name, help, g);
    };
    gauge(
        &mut registry,
        "audit_mode",
        "1 when loaded with --audit: nothing is dropped, would-be drops are counted",
        i64::from(state.audit),
    );
    gauge(
        &mut registry,
        "docker_reachable",
        "1 when the daemon's last sync reached Docker",
        i64::from(shared.docker_up.load(Ordering::Relaxed)),
    );
    gauge(
        &mut registry,
        "allowances",
        "Allowances in force (expired ones left out)",
        policy.allowances.len() as i64,
    );
    if let Some(store) = runtime::daemon()?.store {
        gauge(
            &mut registry,
            "store_reachable",
            "With --store: 1 when an etcd member answers the daemon's watch",
            i64::from(store.reachable),
        );
        gauge(
            &mut registry,
            "store_applied_revision",
            "With --store: the store revision of the policy this host enforces",
            i64::try_from(store.revision).unwrap_or(i64::MAX),
        );
        gauge(
            &mut registry,
            "store_state_since_seconds",
            "With --store: unix time since which store_reachable has held",
            i64::try_from(store.since).unwrap_or(i64::MAX),
        );
    }
    gauge(
        &mut registry,
        "published_ports",
        "Published (host address, port, protocol) bindings Docker reports",
        bindings.len() as i64,
    );

    let up = Family::<Labels, Gauge>::default();
    for iface in &ifaces {
        let attached = state.ebpf && ebpf::pins_present() && {
            let (mode, hook) = state
                .interfaces
                .iter()
                .find(|i| &i.name == iface)
                .map_or((ebpf::AttachMode::Auto, ebpf::Hook::Tc), |i| {
                    (i.mode, i.hook)
                });
            ebpf::attached(iface, mode, hook)
        };
        if state.ebpf {
            up.get_or_create(&labels(&[("dataplane", "ebpf"), ("iface", iface)]))
                .set(i64::from(attached));
        }
    }
    if let Some(f) = state.fallback {
        let kind = match f {
            crate::dataplane::fallback::Fallback::Iptables(_) => "iptables",
            crate::dataplane::fallback::Fallback::Nftables => "nftables",
        };
        up.get_or_create(&labels(&[
            ("dataplane", kind),
            ("iface", &ifaces.join(",")),
        ]))
        .set(i64::from(f.in_force(&ifaces)));
    }
    registry.register(
        "dataplane_up",
        "1 when the dataplane is installed and hooked in on the interface",
        up,
    );

    if state.ebpf && ebpf::pins_present() {
        let maps = ebpf::Maps::open_pinned()?;
        let stats = maps.stats()?;
        let packets = Family::<Labels, Counter>::default();
        for (i, name) in VERDICT_NAMES.iter().enumerate() {
            packets
                .get_or_create(&labels(&[("verdict", name)]))
                .inc_by(stats[i]);
        }
        registry.register(
            "packets",
            "Packets the eBPF filter judged, by verdict (audited: would-be drops let through in audit mode)",
            packets,
        );
        let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
            let c: Counter = Counter::default();
            c.inc_by(value);
            registry.register(name, help, c);
        };
        counter(
            &mut registry,
            "expired_matches",
            "Denied new connections whose best matching allowance had expired",
            stats[stat::EXPIRED as usize],
        );
        counter(
            &mut registry,
            "drop_log_suppressed",
            "Drop-log events the kernel's rate limit suppressed",
            stats[stat::LOG_SUPPRESSED as usize],
        );
        counter(
            &mut registry,
            "drop_log_lost",
            "Drop-log events lost to a full ring buffer",
            stats[stat::LOG_LOST as usize],
        );

        let drops = Family::<Labels, Counter>::default();
        for (key, count) in maps.port_drops()? {
            let Some(proto) = policy::Proto::from_number(key.proto) else {
                continue;
            };
            let mut names: Vec<&str> = bindings
                .iter()
                .filter(|b| b.host_port == key.port && b.proto == proto)
                .map(|b| b.container.as_str())
                .collect();
            names.dedup();
            drops
                .get_or_create(&labels(&[
                    ("port", &key.port.to_string()),
                    ("proto", &proto.to_string()),
                    ("container", &names.join(",")),
                ]))
                .inc_by(count);
        }
        registry.register(
            "port_drops",
            "New connections dropped per published port (would-be drops in audit mode)",
            drops,
        );

        let hits = maps.allow_hits()?;
        let per_allowance = Family::<Labels, Counter>::default();
        let sums = policy::hits_per_allowance(&policy.allowances, &policy.sets, &bindings, &hits);
        let labelled = crate::labels::labelled(&bindings, &policy.sets);
        let origins = crate::labels::with_origins(&policy.allowances, &labelled);
        for ((a, origin), sum) in origins.zip(sums) {
            per_allowance
                .get_or_create(&labels(&[
                    ("source", &a.source.to_string()),
                    ("target", &a.target.to_string()),
                    ("origin", &origin),
                ]))
                .inc_by(sum);
        }
        registry.register(
            "allowance_hits",
            "New connections let in by each allowance (an entry shared by two counts for both)",
            per_allowance,
        );
    }
    let mut out = String::new();
    encode(&mut out, &registry).context("encoding metrics")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses_need_consent() {
        let lo: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        assert!(check_addr(lo, false).is_ok());
        assert!(check_addr("[::1]:9464".parse().unwrap(), false).is_ok());
        let err = check_addr(any, false).unwrap_err().to_string();
        assert!(
            err.contains("0.0.0.0:9464") && err.contains("--metrics-public"),
            "{err}"
        );
        assert!(check_addr(any, true).is_ok());
    }
}
