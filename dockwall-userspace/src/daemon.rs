//! The running `dockwall load`: the one writer of the saved policy and of
//! every dataplane while it runs. It follows Docker, answers edits from the
//! control socket one at a time (saved to the journal, applied as a
//! difference, answered once every dataplane holds it), repairs drift, and
//! prints the drop log.

use std::{
    io::Write as _,
    path::Path,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use dockwall_common::stat;

use crate::{
    clock,
    config::{self, Policy, journal::Change, journal::Journal},
    control::{self, Reply, Request, edit::Edit, server::Pending, sets::SetEdit},
    dataplane::{
        ebpf::{self, AttachMode, Hook},
        sync::{self, BindingsSource, Dataplanes},
    },
    droplog::{self, DropLog},
    policy::{Binding, Compiled},
    runtime,
};

/// Resync even without Docker events: catches Docker coming up, missed
/// events, lapsed allowances and drift.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Every this many resyncs (30 s) the daemon reads the kernel's allowance
/// map back whole and repairs any entry changed behind its back; between
/// them it writes only differences (a full read of 100k entries every 2 s
/// cost 15% of a core).
const DEEP_CHECK_EVERY: u64 = 15;
/// How often the daemon reports what the drop log's limit suppressed.
const LOG_SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// Docker emits bursts (create, connect, start); one resync per burst.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(20);
/// The journal is folded into the saved file once edits pause this long...
const COMPACT_IDLE: Duration = Duration::from_secs(1);
/// ... or once it holds this many changes, busy or not.
const COMPACT_MAX: usize = 20_000;

/// With `--store`: where the policy comes from, and the follower's view.
pub struct StoreLink {
    pub spec: crate::store::StoreSpec,
    /// The last policy applied from the store (fail-static across restarts).
    pub cache: std::path::PathBuf,
    /// The follower's latest view (taken by `follow`).
    pub rx: Option<tokio::sync::watch::Receiver<crate::store::etcd::View>>,
    /// Warnings about store values already printed.
    pub warned: std::collections::BTreeSet<String>,
    /// The store answered at the last report.
    pub reachable: bool,
    /// The revision the cache file holds.
    pub cached: Option<u64>,
}

/// What the daemon needs to repair the eBPF side.
pub struct Kernel<'a> {
    pub obj: &'a mut aya::Ebpf,
    pub pins: ebpf::PinKeeper,
    pub mode: AttachMode,
    pub hook: Hook,
}

/// The running daemon's view of what it keeps in force.
pub struct Daemon<'a, 'k> {
    pub config_path: &'a Path,
    pub ifaces: &'a [String],
    pub dataplanes: &'a mut Dataplanes,
    pub kernel: Option<&'a mut Kernel<'k>>,
    pub docker_up: Arc<AtomicBool>,
    pub log_rate: u32,
    /// The writer's lock, held for the daemon's whole life.
    pub lock: config::Lock,
    pub journal: Journal,
    /// The saved policy, which is also the policy in force: every edit
    /// goes through the daemon, and a hand edit waits for `reload`.
    pub policy: Policy,
    /// `policy` compiled for `bindings`, kept up to date edit by edit.
    pub compiled: Compiled,
    /// Docker's published ports the dataplanes were last given.
    pub bindings: Vec<Binding>,
    /// An apply failed: the next resync rewrites everything.
    pub needs_full: bool,
    /// LOG_SUPPRESSED and LOG_LOST as last reported.
    pub log_seen: [u64; 2],
    /// The earliest expiry (unix seconds) among the allowances in force.
    pub next_expiry: Option<u64>,
    pub resyncs: u64,
    pub last_edit: Option<Instant>,
    /// A hand edit is waiting for `reload` and was reported.
    pub hand_edit_noted: bool,
    /// Containers whose labels fail, as last reported (each is logged once).
    pub label_errors: std::collections::BTreeMap<String, String>,
    /// The node was a swarm worker at the last resync (warned once).
    pub swarm_worker_noted: bool,
    /// With `--store`: the policy is the store's, not the file's.
    pub store: Option<StoreLink>,
}

impl Daemon<'_, '_> {
    /// Follows Docker, the control socket and the drop log until
    /// SIGINT/SIGTERM.
    pub async fn follow(
        &mut self,
        mut drop_log: Option<DropLog>,
        mut requests: mpsc::Receiver<Pending>,
    ) -> anyhow::Result<ExitCode> {
        let mut sigint =
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut sigterm =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut tick = tokio::time::interval(RESYNC_INTERVAL);
        let mut log_tick = tokio::time::interval(LOG_SUMMARY_INTERVAL);
        let mut events = None;
        let mut names = runtime::published().unwrap_or_default();
        let mut store_rx = self.store.as_mut().and_then(|s| s.rx.take());
        if let Some(link) = &self.store {
            self.record_store(&crate::store::etcd::Health {
                url: link.spec.url.clone(),
                reachable: link.reachable,
                since: clock::now_unix(),
                error: (!link.reachable).then(|| "not reached at start".to_string()),
                revision: self.policy.revision,
            });
        }
        self.log_seen = self.log_counters();
        self.next_expiry = next_expiry(&self.policy, clock::now_unix());
        loop {
            if events.is_none()
                && let Ok(docker) = crate::docker::connect().await
            {
                events = Some(Box::pin(crate::docker::events(&docker)));
                self.resync().await;
            }
            let event = async {
                match events.as_mut() {
                    Some(stream) => stream.next().await,
                    None => std::future::pending().await,
                }
            };
            let dropped = async {
                match drop_log.as_mut() {
                    Some(log) => log.next_batch().await,
                    None => std::future::pending().await,
                }
            };
            let store_changed = async {
                match store_rx.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                alive = store_changed => match store_rx.as_mut() {
                    Some(rx) if alive => {
                        let view = rx.borrow_and_update().clone();
                        self.store_view(view);
                    }
                    _ => store_rx = None,
                },
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sighup.recv() => match self.reload().await {
                    Ok(line) => println!("dockwall: {line}"),
                    Err(e) => eprintln!("dockwall: reload refused, the policy in force is unchanged: {e:#}"),
                },
                Some((request, answer)) = requests.recv() => {
                    let reply = self.answer(request).await;
                    let _ = answer.send(reply);
                }
                _ = tick.tick() => {
                    self.resync().await;
                    names = runtime::published().unwrap_or_default();
                }
                _ = log_tick.tick() => self.report_suppressed(),
                batch = dropped => match batch {
                    Ok(batch) => {
                        let mut out = std::io::stdout().lock();
                        for e in &batch {
                            let line = droplog::format_event(e, &names, &droplog::ifname(e.ifindex));
                            let _ = writeln!(out, "{line}");
                        }
                        let _ = out.flush();
                    }
                    Err(e) => {
                        eprintln!("dockwall: drop log stopped: {e:#}");
                        drop_log = None;
                    }
                },
                item = event => match item {
                    Some(Ok(_)) => {
                        tokio::time::sleep(EVENT_DEBOUNCE).await;
                        self.resync().await;
                    }
                    // Docker went away: keep the rules as they are, reconnect.
                    Some(Err(_)) | None => events = None,
                },
            }
        }
        // Edits the journal holds are in the file for the next start.
        if let Err(e) = self.compact(true) {
            eprintln!(
                "dockwall: folding the journal into the saved file failed (it is replayed at the next start): {e:#}"
            );
        }
        // Only our own record: a daemon started since owns the file.
        let me = std::process::id();
        if let Err(e) = runtime::update_daemon(|d| {
            if d.pid == Some(me) {
                d.phase = runtime::Phase::Stopped;
            }
        }) {
            eprintln!("dockwall: recording that the daemon stopped failed: {e:#}");
        }
        println!("dockwall: exiting; the filter stays in force (`dockwall unload` removes it)");
        Ok(ExitCode::SUCCESS)
    }

    async fn answer(&mut self, request: Request) -> Reply {
        if let Some(link) = &self.store {
            return Reply::Failed {
                error: format!(
                    "this host's allowances come from the store {url}: run the command with --store {url} (or DOCKWALL_STORE); nothing was changed",
                    url = link.spec.url
                ),
            };
        }
        let result = match request {
            Request::Edit(edit) => self.edit(edit).await,
            Request::Set(edit) => self.set_edit(&edit),
            Request::Reload => self.reload().await.map(|line| vec![line]),
        };
        match result {
            Ok(lines) => Reply::Done { lines },
            Err(e) => Reply::Failed {
                error: format!("{e:#}").replace('\n', " "),
            },
        }
    }

    /// One `allow` or `revoke`: validated, saved (journal, fdatasync),
    /// applied as a difference to every dataplane, then answered.
    async fn edit(&mut self, edit: Edit) -> anyhow::Result<Vec<String>> {
        // --container needs Docker's word on the name; the daemon's own
        // snapshot serves every other edit.
        let live = if edit.names_containers() {
            let ours = crate::docker::docker_host();
            if let Some(theirs) = edit.docker_host.as_ref().filter(|h| **h != ours) {
                anyhow::bail!(
                    "DOCKER_HOST is {theirs}, but the running daemon follows the Docker Engine at {ours}, where --container names are resolved; unset DOCKER_HOST, or restart `dockwall load` with it"
                );
            }
            Some(
                sync::live()
                    .await
                    .context("--container and --service need Docker to know the name")?,
            )
        } else {
            None
        };
        let now = clock::now_unix();
        let outcome =
            control::edit::apply(&mut self.policy, &edit, &self.bindings, live.as_ref(), now)?;
        let mut lines = outcome.lines.clone();
        if !outcome.changes.is_empty() {
            let revision = self.policy.revision + 1;
            if let Err(e) = self.journal.append(revision, &outcome.changes) {
                outcome.undo(&mut self.policy);
                return Err(e.context("not saved, nothing changed"));
            }
            self.policy.revision = revision;
            self.last_edit = Some(Instant::now());
            if let Some(at) = edit.lifetime_secs.map(|d| now + d) {
                self.next_expiry = Some(self.next_expiry.map_or(at, |n| n.min(at)));
            }
            let applied = match live.filter(|snap| snap.bindings != self.bindings) {
                // Docker changed since the last resync: the whole policy
                // for its ports now, not a difference against stale ones.
                Some(snap) => self.apply_full(snap.bindings, BindingsSource::Docker),
                None => {
                    let changes = self.compiled.update(
                        &outcome.removed,
                        &outcome.added,
                        &self.policy.sets,
                        &self.bindings,
                    );
                    sync::apply_changes(self.dataplanes, &changes, &self.compiled, &self.bindings)
                        .map(|_| ())
                }
            };
            if let Err(e) = applied {
                self.needs_full = true;
                self.dataplanes.allow_applied = None;
                return Err(e.context(format!(
                    "saved as revision {revision}, but applying it to the loaded filter failed (the daemon retries at its next resync)"
                )));
            }
            self.record_applied();
        }
        lines.push("in force now".to_string());
        Ok(lines)
    }

    /// One `set add|remove|load`: saved, then the whole policy applied
    /// once (every allowance and label naming the set changes with it).
    fn set_edit(&mut self, edit: &SetEdit) -> anyhow::Result<Vec<String>> {
        let outcome = control::sets::apply(&mut self.policy, edit)?;
        let mut lines = outcome.lines.clone();
        if let Some(change) = &outcome.change {
            let revision = self.policy.revision + 1;
            if let Err(e) = self.journal.append(revision, std::slice::from_ref(change)) {
                outcome.undo(&mut self.policy);
                return Err(e.context("not saved, nothing changed"));
            }
            self.policy.revision = revision;
            self.last_edit = Some(Instant::now());
            let started = Instant::now();
            let bindings = self.bindings.clone();
            self.apply_full(bindings, BindingsSource::Snapshot).map_err(|e| {
                e.context(format!(
                    "saved as revision {revision}, but applying it to the loaded filter failed (the daemon retries at its next resync)"
                ))
            })?;
            lines.push(format!("applied in {} ms", started.elapsed().as_millis()));
        }
        lines.push("in force now".to_string());
        Ok(lines)
    }

    /// The whole policy for `bindings` to every dataplane (start, reload,
    /// Docker changed, lapsed allowances, drift, a failed apply).
    fn apply_full(&mut self, bindings: Vec<Binding>, source: BindingsSource) -> anyhow::Result<()> {
        let expires = &self.policy.expires;
        self.compiled = Compiled::new(
            &self.policy.allowances,
            |a| expires.get(a).copied(),
            &self.policy.sets,
            &bindings,
        );
        let result = sync::apply(self.dataplanes, &self.policy, &bindings, source);
        // Parsing and compiling a large policy leaves freed heap behind.
        release_heap();
        match result {
            Ok(applied) => {
                let (p, a) = (applied.published, applied.allow);
                if p.added + p.removed + a.added + a.removed > 0 {
                    println!(
                        "dockwall: synced: published ports +{} -{}, allowance entries +{} -{}",
                        p.added, p.removed, a.added, a.removed
                    );
                }
                self.report_label_errors(&bindings);
                self.bindings = bindings;
                self.needs_full = false;
                self.next_expiry = next_expiry(&self.policy, clock::now_unix());
                self.record_applied();
                Ok(())
            }
            Err(e) => {
                // Next time: a full read-back and diff, not a delta.
                self.dataplanes.allow_applied = None;
                self.needs_full = true;
                Err(e)
            }
        }
    }

    /// Logs a container whose labels fail once (and once more should the
    /// reason change), and when they are fixed.
    pub fn report_label_errors(&mut self, bindings: &[Binding]) {
        let now = crate::labels::labelled(bindings, &self.policy.sets).invalid;
        for (container, reason) in &now {
            if self.label_errors.get(container) != Some(reason) {
                eprintln!(
                    "dockwall: labels of container {container} fail, its published ports are closed to everyone: {reason}"
                );
            }
        }
        for container in self.label_errors.keys().filter(|c| !now.contains_key(*c)) {
            println!("dockwall: labels of container {container} no longer fail (or it is gone)");
        }
        self.label_errors = now;
    }

    /// The store follower's news: its health, and a policy newer than the
    /// one in force, applied whole (a difference per dataplane) and cached.
    fn store_view(&mut self, view: crate::store::etcd::View) {
        let Some(link) = self.store.as_mut() else {
            return;
        };
        for w in &view.warnings {
            if link.warned.insert(w.clone()) {
                eprintln!("dockwall: store: {w}");
            }
        }
        if link.reachable != view.health.reachable {
            link.reachable = view.health.reachable;
            if view.health.reachable {
                println!("dockwall: store {} reachable again", link.spec.url);
            } else {
                eprintln!(
                    "dockwall: store {} unreachable ({}): enforcing revision {} as applied; edits are refused until it is back",
                    link.spec.url,
                    view.health.error.as_deref().unwrap_or("no member answers"),
                    self.policy.revision
                );
            }
        }
        let cache = link.cache.clone();
        if let Some(policy) = view.policy.filter(|p| **p != self.policy) {
            let started = Instant::now();
            self.policy = (*policy).clone();
            let bindings = self.bindings.clone();
            match self.apply_full(bindings, BindingsSource::Snapshot) {
                Ok(()) => println!(
                    "dockwall: store revision {} applied in {} ms: {} allowance(s)",
                    self.policy.revision,
                    started.elapsed().as_millis(),
                    self.policy.allowances.len()
                ),
                Err(e) => eprintln!(
                    "dockwall: applying store revision {} failed (retried at the next resync): {e:#}",
                    self.policy.revision
                ),
            }
        }
        // What a restart without the store enforces.
        if let Some(link) = self.store.as_mut()
            && link.cached != Some(self.policy.revision)
        {
            let cached = config::render(&self.policy)
                .and_then(|text| config::write_text(&cache, &text, &self.lock));
            match cached {
                Ok(()) => link.cached = Some(self.policy.revision),
                Err(e) => eprintln!(
                    "dockwall: caching the store's policy in {} failed: {e:#}",
                    cache.display()
                ),
            }
        }
        self.record_store(&crate::store::etcd::Health {
            revision: self.policy.revision,
            ..view.health
        });
    }

    /// Tells `status` and the metrics how the store is.
    fn record_store(&self, health: &crate::store::etcd::Health) {
        if let Err(e) = runtime::update_daemon(|d| d.store = Some(health.clone())) {
            eprintln!("dockwall: recording the store's health failed: {e:#}");
        }
    }

    /// Tells `status` which revision every dataplane holds now.
    fn record_applied(&self) {
        if let Err(e) = runtime::record_applied(&self.dataplanes.names(), self.policy.revision) {
            eprintln!("dockwall: recording the applied revision failed: {e:#}");
        }
    }

    fn log_counters(&self) -> [u64; 2] {
        match self.dataplanes.maps.as_ref().map(|m| m.stats()) {
            Some(Ok(s)) => [s[stat::LOG_SUPPRESSED as usize], s[stat::LOG_LOST as usize]],
            _ => self.log_seen,
        }
    }

    /// One line a second at most for what the drop log did not print.
    fn report_suppressed(&mut self) {
        let now = self.log_counters();
        let [suppressed, lost] = [now[0] - self.log_seen[0], now[1] - self.log_seen[1]];
        if suppressed > 0 {
            println!(
                "dockwall: drop log: {suppressed} more drop(s) not logged, over the limit of {} a second (--log-rate); the counters have every one",
                self.log_rate
            );
        }
        if lost > 0 {
            println!("dockwall: drop log: {lost} event(s) lost (ring buffer full)");
        }
        self.log_seen = now;
    }

    async fn resync(&mut self) {
        if let Err(e) = self.try_resync().await {
            eprintln!("dockwall: resync failed, keeping the rules in force: {e:#}");
        }
    }

    /// `dockwall reload` or SIGHUP: the saved file (and the journal's
    /// changes on top) becomes the policy in force. A file that fails is
    /// refused whole and the policy in force stays.
    async fn reload(&mut self) -> anyhow::Result<String> {
        if let Some(link) = &self.store {
            anyhow::bail!(
                "the policy comes from the store {}, followed continuously (revision {} applied); there is no file to reload",
                link.spec.url,
                self.policy.revision
            );
        }
        let path = self.config_path;
        config::check_readable(path)?;
        if !path.exists() {
            anyhow::bail!(
                "{} does not exist; refused, the policy in force is unchanged (to remove every allowance, write an empty file)",
                path.display()
            );
        }
        let mut fresh = config::load(path).context("refused; the policy in force is unchanged")?;
        let file_revision = config::file_revision(path)?;
        let same = {
            let mut f = fresh.clone();
            f.revision = self.policy.revision;
            f == self.policy
        };
        // A hand edit is a saved change too: it gets the next revision
        // (or the one the admin wrote, when higher).
        fresh.revision = if same {
            self.policy.revision
        } else {
            fresh.revision.max(self.policy.revision + 1)
        };
        let (bindings, source, _) = sync::bindings().await;
        self.policy = fresh;
        self.apply_full(bindings, source)?;
        // The file just read is the daemon's now; from here on it says
        // which revision it holds.
        self.note_file();
        self.hand_edit_noted = false;
        if self.journal.len > 0 {
            self.compact(true)?;
        } else if file_revision != self.policy.revision {
            // Only the revision line changes: the admin's text stays.
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            config::write_text(
                path,
                &config::with_revision(&text, self.policy.revision),
                &self.lock,
            )?;
            self.note_file();
        }
        if self.journal.len == 0 {
            // New edits continue the file just read, at its revision now: a
            // journal left with an older base would be skipped by every
            // reader (and by the next start), losing those edits.
            self.journal.restart(self.policy.revision)?;
        }
        Ok(format!(
            "reloaded {}: {} allowance(s) in force (revision {})",
            path.display(),
            self.policy.in_force(clock::now_unix()).allowances.len(),
            self.policy.revision
        ))
    }

    /// Remembers the saved file as it is now (the daemon's own write, or the
    /// file it just read): any other stamp later is a hand edit.
    fn note_file(&self) {
        if let Err(e) = runtime::note_saved_file(self.config_path) {
            eprintln!("dockwall: recording the saved file's identity failed: {e:#}");
        }
    }

    /// Folds the journal into the saved file when edits paused (or `force`),
    /// unless the file was edited by hand since the daemon read it: the
    /// hand edit waits for `reload`, and the journal keeps the daemon's
    /// edits, replayed on top of it.
    fn compact(&mut self, force: bool) -> anyhow::Result<()> {
        if self.journal.len == 0 || self.needs_full {
            return Ok(());
        }
        let idle = self.last_edit.is_none_or(|t| t.elapsed() >= COMPACT_IDLE);
        if !(force || idle || self.journal.len >= COMPACT_MAX) {
            return Ok(());
        }
        let known = runtime::daemon()?.file_stamp;
        // A file that appeared or vanished is a hand edit too.
        if known != runtime::stamp(self.config_path) {
            if !self.hand_edit_noted {
                println!(
                    "dockwall: {} was edited by hand; `dockwall reload` applies it (edits made through dockwall since are kept in {} and replayed on top)",
                    self.config_path.display(),
                    config::journal::path(self.config_path).display()
                );
                self.hand_edit_noted = true;
            }
            return Ok(());
        }
        // The applied copy first: applied.toml plus the journal must stay
        // the policy in force at every moment.
        runtime::save_applied(&self.policy)?;
        self.dataplanes.policy_applied = Some(self.policy.clone());
        config::save(self.config_path, &self.policy, &self.lock)?;
        self.journal.restart(self.policy.revision)?;
        self.note_file();
        release_heap();
        Ok(())
    }

    async fn try_resync(&mut self) -> anyhow::Result<()> {
        let (bindings, source, snapshot) = sync::bindings().await;
        let worker = snapshot.as_ref().is_some_and(|s| s.swarm_worker);
        if worker && !self.swarm_worker_noted {
            eprintln!(
                "dockwall: WARNING: this node is a swarm worker; only managers list services, so ports published through the routing mesh are NOT filtered here (container ports are); see README, Swarm"
            );
        }
        self.swarm_worker_noted = worker;
        self.docker_up
            .store(source == BindingsSource::Docker, Ordering::Relaxed);
        let now = clock::now_unix();
        let expired = self.prune_expired(now);
        let fallback_missing = self.dataplanes.fallback.is_some_and(|f| !f.present());
        self.resyncs += 1;
        let deep = self.resyncs.is_multiple_of(DEEP_CHECK_EVERY);
        let needed = deep
            || fallback_missing
            || expired
            || self.needs_full
            || self.next_expiry.is_some_and(|at| at <= now)
            || bindings != self.bindings;
        // A failed apply must not stop the repairs below (re-attaching the
        // filter matters more): its error is returned after them.
        let apply_error = if needed {
            if deep {
                self.dataplanes.allow_applied = None;
            }
            self.apply_full(bindings, source).err()
        } else {
            None
        };
        let mut repaired = Vec::new();
        if let Some(f) = self.dataplanes.fallback.filter(|_| fallback_missing) {
            repaired.push(format!("{} rules were missing: restored", f.name()));
        }
        if let Some(kernel) = self.kernel.as_deref_mut() {
            for name in kernel.pins.repin()? {
                repaired.push(format!("pin of map {name} was removed: pinned again"));
            }
            for iface in self.ifaces {
                // An interface that is gone cannot be repaired until it returns.
                let exists = Path::new("/sys/class/net").join(iface).exists();
                if exists && !ebpf::attached(iface, kernel.mode, kernel.hook) {
                    ebpf::attach(kernel.obj, iface, kernel.mode, kernel.hook)?;
                    repaired.push(format!(
                        "eBPF filter was not attached to {iface}: attached again"
                    ));
                }
            }
        }
        // Docker re-creates DOCKER-USER when it restarts, and appears after
        // us when it starts later: put our jumps (back) in place.
        if let Some(fallback) = self.dataplanes.fallback {
            for jump in fallback.hook(self.ifaces)? {
                repaired.push(format!("iptables jump was missing: {jump}"));
            }
        }
        for what in &repaired {
            println!("dockwall: repaired drift: {what}");
        }
        runtime::record_repairs(&repaired)?;
        if let Err(e) = self.compact(false) {
            eprintln!(
                "dockwall: folding the journal into the saved file failed (it stays, nothing is lost): {e:#}"
            );
        }
        match apply_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Takes lapsed allowances out of the saved policy (they are out of
    /// force in the kernel already); returns whether any were.
    fn prune_expired(&mut self, now: u64) -> bool {
        // The store's keys lapse by their lease; the kernel and the
        // fallback already leave them out (see next_expiry).
        if self.store.is_some() {
            return false;
        }
        let lapsed: Vec<Change> = self
            .policy
            .allowances
            .iter()
            .filter(|a| self.policy.expired(a, now))
            .filter_map(|a| self.policy.record(a).map(Change::Revoke))
            .collect();
        if lapsed.is_empty() {
            return false;
        }
        let revision = self.policy.revision + 1;
        if let Err(e) = self.journal.append(revision, &lapsed) {
            eprintln!(
                "dockwall: could not save the removal of lapsed allowances (they are out of force anyway): {e:#}"
            );
            return false;
        }
        for change in &lapsed {
            let _ = change.apply_to(&mut self.policy);
            if let Change::Revoke(r) = change
                && let Ok((a, _, _)) = r.clone().into_allowance()
            {
                println!("dockwall: allowance expired, removed: {a}");
            }
        }
        self.policy.revision = revision;
        self.last_edit = Some(Instant::now());
        true
    }
}

/// The earliest expiry after `now` among the policy's allowances.
fn next_expiry(policy: &Policy, now: u64) -> Option<u64> {
    policy
        .expires
        .values()
        .copied()
        .filter(|&at| at > now)
        .min()
}

/// Gives freed heap back to the kernel. Parsing and compiling a large
/// policy (100k allowances) peaks at well over 100 MiB that glibc would
/// otherwise keep mapped for the daemon's whole life.
pub fn release_heap() {
    // SAFETY: malloc_trim only releases free memory at the top of the heaps.
    unsafe { libc::malloc_trim(0) };
}
