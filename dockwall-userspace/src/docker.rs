//! What Docker publishes, read from the Engine API with bollard.
//!
//! `DOCKER_HOST` is honoured (default `unix:///var/run/docker.sock`). The API
//! version is negotiated, so old engines (Debian's 20.10 speaks 1.41) work.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use anyhow::Context as _;
use bollard::{
    Docker,
    models::{
        EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, EventMessage,
        LocalNodeState, PortTypeEnum,
    },
    query_parameters::{
        EventsOptions, InspectContainerOptions, ListContainersOptions, ListServicesOptions,
    },
};
use futures_util::Stream;

use crate::policy::{Binding, Proto};

/// How long a single API call may take before Docker counts as unreachable.
const API_TIMEOUT: Duration = Duration::from_secs(5);

pub fn docker_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string())
}

fn unreachable(host: &str) -> String {
    format!("cannot reach the Docker Engine at {host} (set DOCKER_HOST to use another)")
}

/// Refuses a `unix://` host whose path is missing or not a socket, before
/// any connection is tried (bollard's own error names neither).
pub fn check_socket(host: &str) -> anyhow::Result<()> {
    if let Some(path) = host.strip_prefix("unix://") {
        match std::fs::metadata(path) {
            Err(e) => return Err(e).with_context(|| unreachable(host)),
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt as _;
                if !m.file_type().is_socket() {
                    anyhow::bail!("{}: {path} is not a socket", unreachable(host));
                }
            }
        }
    }
    Ok(())
}

/// Connects and negotiates the API version.
pub async fn connect() -> anyhow::Result<Docker> {
    let host = docker_host();
    let unreachable = || unreachable(&host);
    check_socket(&host)?;
    let docker = Docker::connect_with_defaults().with_context(unreachable)?;
    tokio::time::timeout(API_TIMEOUT, docker.negotiate_version())
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(unreachable)
}

/// Docker's view: running containers' published ports, and every container's
/// name and ID (to tell "not running" from "no such container").
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub bindings: Vec<Binding>,
    pub containers: Vec<(String, String)>,
    /// Swarm services' names and IDs (none outside swarm mode).
    pub services: Vec<(String, String)>,
    /// This node is a swarm worker: the services API is a manager's, so
    /// ports published through the routing mesh cannot be seen here.
    pub swarm_worker: bool,
}

pub async fn snapshot(docker: &Docker) -> anyhow::Result<Snapshot> {
    let options = ListContainersOptions {
        all: true,
        ..Default::default()
    };
    let containers = tokio::time::timeout(API_TIMEOUT, docker.list_containers(Some(options)))
        .await
        .map_err(|_| anyhow::anyhow!("Docker API: listing containers timed out"))?
        .context("Docker API: GET /containers/json")?;
    let mut snap = Snapshot::default();
    for c in containers {
        let id = c.id.unwrap_or_default();
        let name = c
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.chars().take(12).collect());
        snap.containers.push((name.clone(), id.clone()));
        let labels = c.labels.clone().unwrap_or_default();
        if c.state.as_ref().map(|s| s.to_string()).as_deref() != Some("running") {
            // A stopped container keeps its fixed published ports in scope,
            // so the port is filtered from the first packet when it starts
            // again (docker restart, restart policies, reboots).
            snap.bindings.extend(
                configured_bindings(docker, &name, &id)
                    .await?
                    .into_iter()
                    .map(|b| b.with_labels(&labels)),
            );
            continue;
        }
        let container_ips: Vec<IpAddr> = c
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .values()
            .flat_map(|e| [e.ip_address.as_deref(), e.global_ipv6_address.as_deref()])
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        for port in c.ports.unwrap_or_default() {
            let (Some(host_port), Some(ip)) = (port.public_port, port.ip.as_deref()) else {
                continue;
            };
            let proto = match port.typ {
                Some(PortTypeEnum::TCP) => Proto::Tcp,
                Some(PortTypeEnum::UDP) => Proto::Udp,
                // SCTP is not filtered (see README); nothing to map.
                _ => continue,
            };
            let Ok(host_ip) = ip.parse::<IpAddr>() else {
                continue;
            };
            snap.bindings.push(
                Binding::new(&name, &id, host_ip, host_port, port.private_port, proto)
                    .with_container_ips(container_ips.clone())
                    .with_labels(&labels),
            );
        }
    }
    services(docker, &mut snap).await?;
    snap.bindings.sort();
    snap.bindings.dedup();
    Ok(snap)
}

/// Swarm services' published ports, from the services API: a port published
/// through the routing mesh (ingress) has no binding on any task container,
/// so nothing else says it is published. Filtered like a container's port,
/// on the host port, before the mesh's DNAT. Host-mode ports are listed too
/// (their task containers also bind them), for `--service`.
///
/// Only a manager answers; a worker or a daemon outside swarm mode says
/// 503, and has no services to read.
async fn services(docker: &Docker, snap: &mut Snapshot) -> anyhow::Result<()> {
    let listed = tokio::time::timeout(
        API_TIMEOUT,
        docker.list_services(None::<ListServicesOptions>),
    )
    .await
    .map_err(|_| anyhow::anyhow!("Docker API: listing services timed out"))?;
    let services = match listed {
        Ok(s) => s,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 503, ..
        }) => {
            let info = tokio::time::timeout(API_TIMEOUT, docker.info())
                .await
                .ok()
                .and_then(Result::ok);
            let swarm = info.and_then(|i| i.swarm);
            snap.swarm_worker = swarm.is_some_and(|s| {
                s.local_node_state == Some(LocalNodeState::ACTIVE)
                    && s.control_available != Some(true)
            });
            return Ok(());
        }
        Err(e) => return Err(e).context("Docker API: GET /services"),
    };
    for service in services {
        let id = service.id.unwrap_or_default();
        let name = service
            .spec
            .as_ref()
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| id.chars().take(12).collect());
        let labels = service
            .spec
            .as_ref()
            .and_then(|s| s.labels.clone())
            .unwrap_or_default();
        snap.services.push((name.clone(), id.clone()));
        let ports = service.endpoint.and_then(|e| e.ports).unwrap_or_default();
        for port in ports {
            let proto = match port.protocol {
                Some(EndpointPortConfigProtocolEnum::TCP) => Proto::Tcp,
                Some(EndpointPortConfigProtocolEnum::UDP) => Proto::Udp,
                _ => continue,
            };
            let (Some(published), Some(target)) = (
                port.published_port.and_then(|p| u16::try_from(p).ok()),
                port.target_port.and_then(|p| u16::try_from(p).ok()),
            ) else {
                continue;
            };
            if published == 0 {
                continue;
            }
            // The routing mesh is IPv4 (Docker's ingress network); a
            // host-mode port binds both families like `-p`.
            let ingress = port.publish_mode != Some(EndpointPortConfigPublishModeEnum::HOST);
            let families: &[IpAddr] = if ingress {
                &[IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)]
            } else {
                &[
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                ]
            };
            for &ip in families {
                snap.bindings.push(
                    Binding::new(&name, &id, ip, published, target, proto)
                        .with_labels(&labels)
                        .for_service(),
                );
            }
        }
    }
    Ok(())
}

/// The fixed host ports a (stopped) container is configured to publish.
/// Ports Docker picks at start (`-p 8080`) are unknown until then.
async fn configured_bindings(
    docker: &Docker,
    name: &str,
    id: &str,
) -> anyhow::Result<Vec<Binding>> {
    let inspect = tokio::time::timeout(
        API_TIMEOUT,
        docker.inspect_container(id, None::<InspectContainerOptions>),
    )
    .await
    .map_err(|_| anyhow::anyhow!("Docker API: inspecting {name} timed out"))?;
    let inspect = match inspect {
        Ok(i) => i,
        // Removed between list and inspect: nothing to publish.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("Docker API: GET /containers/{name}/json"));
        }
    };
    let mut out = Vec::new();
    let port_map = inspect
        .host_config
        .and_then(|h| h.port_bindings)
        .unwrap_or_default();
    for (spec, bindings) in port_map {
        let Some((cport, proto)) = spec.split_once('/') else {
            continue;
        };
        let (Ok(cport), Ok(proto)) = (cport.parse::<u16>(), proto.parse::<Proto>()) else {
            continue;
        };
        for b in bindings.unwrap_or_default() {
            let Some(host_port) = b
                .host_port
                .as_deref()
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)
            else {
                continue;
            };
            // An empty HostIp means Docker's default: 0.0.0.0 and ::.
            let ips: Vec<IpAddr> = match b.host_ip.as_deref().unwrap_or("") {
                "" => vec![IpAddr::from([0u8; 4]), IpAddr::from([0u8; 16])],
                ip => ip.parse().into_iter().collect(),
            };
            for ip in ips {
                out.push(Binding::new(name, id, ip, host_port, cport, proto));
            }
        }
    }
    Ok(out)
}

/// Container and network events that can change what is published.
pub fn events(
    docker: &Docker,
) -> impl Stream<Item = Result<EventMessage, bollard::errors::Error>> + use<> {
    let filters = HashMap::from([(
        "type".to_string(),
        vec![
            "container".to_string(),
            "network".to_string(),
            "service".to_string(),
        ],
    )]);
    docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }))
}
