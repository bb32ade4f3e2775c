//! What Docker publishes, read from the Engine API with bollard.
//!
//! `DOCKER_HOST` is honoured (default `unix:///var/run/docker.sock`). The API
//! version is negotiated, so old engines (Debian's 20.10 speaks 1.41) work.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use anyhow::Context as _;
use bollard::{
    Docker,
    models::{EventMessage, PortTypeEnum},
    query_parameters::{EventsOptions, ListContainersOptions},
};
use futures_util::Stream;

use crate::policy::{Binding, Proto};

/// How long a single API call may take before Docker counts as unreachable.
const API_TIMEOUT: Duration = Duration::from_secs(5);

pub fn docker_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string())
}

/// Connects and negotiates the API version.
pub async fn connect() -> anyhow::Result<Docker> {
    let host = docker_host();
    let unreachable =
        || format!("cannot reach the Docker Engine at {host} (set DOCKER_HOST to use another)");
    if let Some(path) = host.strip_prefix("unix://") {
        match std::fs::metadata(path) {
            Err(e) => return Err(e).with_context(unreachable),
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt as _;
                if !m.file_type().is_socket() {
                    anyhow::bail!("{}: {path} is not a socket", unreachable());
                }
            }
        }
    }
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
        if c.state.as_ref().map(|s| s.to_string()).as_deref() != Some("running") {
            continue;
        }
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
            snap.bindings.push(Binding::new(
                &name,
                &id,
                host_ip,
                host_port,
                port.private_port,
                proto,
            ));
        }
    }
    snap.bindings.sort();
    snap.bindings.dedup();
    Ok(snap)
}

/// Container and network events that can change what is published.
pub fn events(
    docker: &Docker,
) -> impl Stream<Item = Result<EventMessage, bollard::errors::Error>> + use<> {
    let filters = HashMap::from([(
        "type".to_string(),
        vec!["container".to_string(), "network".to_string()],
    )]);
    docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }))
}
