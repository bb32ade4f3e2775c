//! The etcd side of the store: connect (TLS, user), read the prefix whole,
//! write edits in transactions, and follow the prefix with a watch.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use futures_util::FutureExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{REQUEST_TIMEOUT, StoreSpec};
use crate::config::Policy;

/// etcd refuses transactions of more operations than this by default
/// (`--max-txn-ops` 128).
pub const TXN_OPS: usize = 100;

/// Every key under the prefix with its value, and the store revision they
/// were read at.
pub type Kvs = BTreeMap<String, Vec<u8>>;

fn unreachable(spec: &StoreSpec) -> String {
    format!("the store {} is unreachable (no member answered)", spec.url)
}

/// How long one member may take to answer before the next is tried.
const MEMBER_TIMEOUT: Duration = Duration::from_millis(1500);

/// A client of the first member that answers, in the order given. One
/// member per client, asked first: a client balancing over every member
/// sends requests to a dead one and waits out the timeout (seen with one
/// member of three killed), where trying the next at once keeps edits going.
///
/// Members that are up but cannot answer yet (electing a leader after one
/// was killed: "leader changed", no answer) are asked again for up to
/// [`ELECTION_WAIT`]; when every member refuses the connection the store
/// is down and the answer comes at once.
pub async fn connect(spec: &StoreSpec) -> anyhow::Result<Client> {
    let started = tokio::time::Instant::now();
    loop {
        let mut errors = Vec::new();
        let mut all_refused = true;
        for member in &spec.members {
            match connect_member(spec, member).await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    let text = format!("{e:#}");
                    all_refused &= text.contains("Connection refused");
                    errors.push(format!("{member}: {text}"));
                }
            }
        }
        if all_refused || started.elapsed() >= ELECTION_WAIT {
            return Err(anyhow::anyhow!(errors.join("; "))).with_context(|| unreachable(spec));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long members that are up may take to elect a leader.
const ELECTION_WAIT: Duration = Duration::from_secs(8);

async fn connect_member(spec: &StoreSpec, member: &str) -> anyhow::Result<Client> {
    let scheme = if spec.tls.is_some() { "https" } else { "http" };
    let endpoints = [format!("{scheme}://{member}")];
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(REQUEST_TIMEOUT)
        // A member that vanishes (partitioned, no RST) ends the watch
        // within about 9 s instead of leaving it hanging. etcd refuses
        // pings more often than every 5 s (--grpc-keepalive-min-time):
        // at 1 s it closed every connection ("too many pings").
        .with_keep_alive(Duration::from_secs(6), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &spec.user {
        options = options.with_user(user, password);
    }
    if let Some(tls) = &spec.tls {
        let ca = std::fs::read(&tls.ca)
            .with_context(|| format!("reading the store's CA certificate {}", tls.ca.display()))?;
        let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &tls.identity {
            let c = std::fs::read(cert)
                .with_context(|| format!("reading the client certificate {}", cert.display()))?;
            let k = std::fs::read(key)
                .with_context(|| format!("reading the client key {}", key.display()))?;
            config = config.identity(Identity::from_pem(c, k));
        }
        options = options.with_tls(config);
    }
    let mut client =
        tokio::time::timeout(MEMBER_TIMEOUT, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| anyhow::anyhow!("connecting timed out"))
            .and_then(|r| r.map_err(anyhow::Error::from))?;
    // A member cut off from the quorum still accepts connections; a
    // (linearizable) read needs the cluster.
    tokio::time::timeout(MEMBER_TIMEOUT, client.get("\0", None))
        .await
        .map_err(|_| anyhow::anyhow!("no answer in {MEMBER_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))?;
    Ok(client)
}

/// The largest answer a whole read may be: the client's default (4 MiB)
/// holds about 15k allowances.
const READ_LIMIT: usize = 256 << 20;

/// Every key under the prefix, and the revision it was read at.
pub async fn read_all(client: &mut Client, spec: &StoreSpec) -> anyhow::Result<(Kvs, i64)> {
    let resp = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client
            .kv_client()
            .max_decoding_message_size(READ_LIMIT)
            .get(spec.prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| anyhow::anyhow!("reading {} timed out", spec.prefix))
    .and_then(|r| r.map_err(anyhow::Error::from))
    .with_context(|| unreachable(spec))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut kvs = Kvs::new();
    for kv in resp.kvs() {
        let key = kv.key_str().context("a key that is not UTF-8")?;
        kvs.insert(key.to_string(), kv.value().to_vec());
    }
    Ok((kvs, revision))
}

/// One write of an edit.
pub enum Op {
    /// Put the key (with a lease of that many seconds, for an expiring allowance).
    Put(String, Vec<u8>, Option<u64>),
    /// Delete the key; it must exist.
    Delete(String),
    /// Change nothing, but the key must exist (a set an allowance names).
    Require(String),
}

/// Applies the operations, `TXN_OPS` to a transaction; each transaction
/// first checks that every key it deletes or requires exists (nothing of
/// it is written otherwise). Returns the store revision after the last one.
pub async fn write(client: &mut Client, spec: &StoreSpec, ops: Vec<Op>) -> anyhow::Result<i64> {
    let mut leases: BTreeMap<u64, i64> = BTreeMap::new();
    for op in &ops {
        if let Op::Put(_, _, Some(ttl)) = op
            && !leases.contains_key(ttl)
        {
            let lease = client
                .lease_grant(i64::try_from(*ttl).unwrap_or(i64::MAX), None)
                .await
                .with_context(|| unreachable(spec))?;
            leases.insert(*ttl, lease.id());
        }
    }
    // A required key guards every transaction of the edit, not only the
    // one it would fall into.
    let (requires, ops): (Vec<Op>, Vec<Op>) =
        ops.into_iter().partition(|op| matches!(op, Op::Require(_)));
    let requires: Vec<String> = requires
        .into_iter()
        .filter_map(|op| match op {
            Op::Require(key) => Some(key),
            _ => None,
        })
        .collect();
    let mut revision = 0;
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let chunk: Vec<Op> = ops.by_ref().take(TXN_OPS).collect();
        let mut compares: Vec<Compare> = requires
            .iter()
            .map(|key| Compare::version(key.as_str(), CompareOp::Greater, 0))
            .collect();
        let mut txn_ops = Vec::new();
        let mut required = requires.clone();
        for op in chunk {
            match op {
                Op::Put(key, value, ttl) => {
                    let options = ttl
                        .and_then(|t| leases.get(&t))
                        .map(|id| PutOptions::new().with_lease(*id));
                    txn_ops.push(TxnOp::put(key, value, options));
                }
                Op::Delete(key) => {
                    compares.push(Compare::version(key.as_str(), CompareOp::Greater, 0));
                    required.push(key.clone());
                    txn_ops.push(TxnOp::delete(key, None));
                }
                // Taken out above.
                Op::Require(_) => {}
            }
        }
        let resp = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.txn(Txn::new().when(compares).and_then(txn_ops)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the transaction timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| unreachable(spec))?;
        if !resp.succeeded() {
            // An edit over TXN_OPS keys spans transactions: say so when an
            // earlier one went in, rather than claim nothing changed.
            let done = if revision == 0 {
                "nothing of it was changed".to_string()
            } else {
                format!("the edit's earlier keys went in at revision {revision}, the rest did not")
            };
            bail!(
                "one of {} is not in the store (see `dockwall --store ... list` and `set list`); {done}",
                required.join(", ")
            );
        }
        revision = resp.header().map_or(revision, |h| h.revision());
    }
    Ok(revision)
}

/// How the daemon last found the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub url: String,
    pub reachable: bool,
    /// Unix seconds since which `reachable` has held.
    pub since: u64,
    /// Why it is unreachable.
    pub error: Option<String>,
    /// The store revision of the policy this host applies.
    pub revision: u64,
}

/// What the follower hands the daemon: the latest policy for this host and
/// the store's health. Only the latest matters, so a burst of writes is
/// applied once.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// None until the store was read once (the daemon keeps its cache).
    pub policy: Option<Arc<Policy>>,
    pub warnings: Vec<String>,
    pub health: Health,
}

/// Follows the store forever: reads the prefix whole when it has no view
/// (or the watch's start was compacted away), then applies every watched
/// change to its copy and publishes the host's policy. Reconnects when
/// every member is gone, resuming from the last revision it saw.
pub async fn follow(
    spec: StoreSpec,
    host: String,
    mut state: Option<(Kvs, i64)>,
    tx: watch::Sender<View>,
) {
    let mut health = Health {
        url: spec.url.clone(),
        reachable: state.is_some(),
        since: crate::clock::now_unix(),
        error: None,
        revision: state.as_ref().map_or(0, |(_, r)| *r as u64),
    };
    loop {
        let result = session(&spec, &host, &mut state, &tx, &mut health).await;
        let error = match result {
            Ok(()) => "the watch ended".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if health.reachable || health.error.is_none() {
            health.reachable = false;
            health.since = crate::clock::now_unix();
        }
        health.error = Some(error);
        tx.send_modify(|v| v.health = health.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn publish(
    spec: &StoreSpec,
    host: &str,
    kvs: &Kvs,
    revision: i64,
    tx: &watch::Sender<View>,
    health: &mut Health,
) {
    let (policy, warnings) = super::policy_for(spec, host, kvs.iter(), revision.max(0) as u64);
    health.revision = policy.revision;
    tx.send_modify(|v| {
        v.policy = Some(Arc::new(policy));
        v.warnings = warnings;
        v.health = health.clone();
    });
}

async fn session(
    spec: &StoreSpec,
    host: &str,
    state: &mut Option<(Kvs, i64)>,
    tx: &watch::Sender<View>,
    health: &mut Health,
) -> anyhow::Result<()> {
    let mut client = connect(spec).await?;
    if state.is_none() {
        let (kvs, revision) = read_all(&mut client, spec).await?;
        *state = Some((kvs, revision));
    }
    let Some((kvs, revision)) = state.as_mut() else {
        return Ok(());
    };
    let options = || {
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(0)
            .with_progress_notify()
    };
    let mut stream = client
        .watch(
            spec.prefix.as_str(),
            Some(options().with_start_revision(*revision + 1)),
        )
        .await
        .with_context(|| unreachable(spec))?;
    let mut first = true;
    loop {
        let Some(mut resp) = stream.message().await.with_context(|| unreachable(spec))? else {
            return Ok(());
        };
        let mut changed = first;
        if first {
            // Connected and watching: reachable again (a reconnect
            // publishes the view it resumes from, with the health).
            first = false;
            if !health.reachable {
                health.reachable = true;
                health.since = crate::clock::now_unix();
            }
            health.error = None;
        }
        loop {
            if resp.compact_revision() > 0 || resp.canceled() {
                // The history from our revision is gone: read whole, diff.
                let (fresh, at) = read_all(&mut client, spec).await?;
                eprintln!(
                    "dockwall: store: the history after revision {} was compacted away (from {}); read the prefix whole at revision {at}",
                    *revision,
                    resp.compact_revision()
                );
                *kvs = fresh;
                *revision = at;
                changed = true;
                stream = client
                    .watch(
                        spec.prefix.as_str(),
                        Some(options().with_start_revision(at + 1)),
                    )
                    .await
                    .with_context(|| unreachable(spec))?;
            } else {
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let key = kv.key_str().context("a key that is not UTF-8")?.to_string();
                    match event.event_type() {
                        EventType::Put => kvs.insert(key, kv.value().to_vec()),
                        EventType::Delete => kvs.remove(&key),
                    };
                    *revision = (*revision).max(kv.mod_revision());
                    changed = true;
                }
            }
            // Take whatever else is already here before publishing once.
            match stream.message().now_or_never() {
                Some(Ok(Some(next))) => resp = next,
                Some(Ok(None)) => return Ok(()),
                Some(Err(e)) => return Err(e).with_context(|| unreachable(spec)),
                None => break,
            }
        }
        if changed {
            publish(spec, host, kvs, *revision, tx, health);
        }
    }
}
