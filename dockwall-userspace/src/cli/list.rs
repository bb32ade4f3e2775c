//! `dockwall list`: saved allowances, what each resolves to now, hits.

use std::{path::Path, process::ExitCode};

use clap::Args;
use serde::Serialize;

use crate::{config, dataplane::ebpf, dataplane::sync, policy};

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    source: String,
    target: String,
    /// `file` (saved by `allow`), or `label on NAME` (a container's label).
    origin: String,
    /// Published port/proto pairs the allowance covers now.
    resolves_to: Vec<String>,
    /// The comment saved with it, if any.
    comment: Option<String>,
    /// New connections let in by the kernel entries of this allowance
    /// (an entry shared by two allowances counts for both); null when not loaded.
    hits: Option<u64>,
    /// RFC 3339 UTC time it lapses; null: never.
    expires_at: Option<String>,
    /// Seconds left (0 once lapsed); null: never expires.
    expires_in_secs: Option<u64>,
    /// Lapsed: no longer in force (the daemon removes it at its next sync).
    expired: bool,
}

pub fn run(config_path: &Path, args: ListArgs) -> anyhow::Result<ExitCode> {
    config::check_readable(config_path)?;
    let policy = config::load(config_path)?;
    let (bindings, _, _) = super::runtime()?.block_on(sync::bindings());
    let hits = if ebpf::pins_present() {
        ebpf::Maps::open_pinned().and_then(|m| m.allow_hits()).ok()
    } else {
        None
    };
    let hits = hits
        .map(|hits| policy::hits_per_allowance(&policy.allowances, &policy.sets, &bindings, &hits));
    let labelled = crate::labels::labelled(&bindings, &policy.sets);
    let now = crate::clock::now_unix();
    // The file's allowances, then the containers' labels' (compile order).
    let all = crate::labels::with_origins(&policy.allowances, &labelled);
    let rows: Vec<Row> = all
        .enumerate()
        .map(|(index, (a, origin))| Row {
            origin,
            comment: policy.comments.get(a).cloned(),
            expires_at: policy.expires.get(a).map(|&at| crate::clock::rfc3339(at)),
            expires_in_secs: policy.expires.get(a).map(|&at| at.saturating_sub(now)),
            expired: policy.expired(a, now),
            source: a.source.to_string(),
            target: a.target.to_string(),
            // Only ports something publishes now: an allowance for a port
            // nobody publishes is saved but has no effect yet.
            resolves_to: policy::resolve_target(&a.target, &bindings)
                .iter()
                .filter(|p| {
                    bindings
                        .iter()
                        .any(|b| b.host_port == p.port && b.proto == p.proto)
                })
                .map(|p| p.to_string())
                .collect(),
            hits: hits.as_ref().map(|hits| hits[index]),
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (container, reason) in &labelled.invalid {
        println!(
            "labels of {container} fail, its published ports are closed to everyone: {reason}"
        );
    }
    if rows.is_empty() {
        println!(
            "no allowances saved in {}: every new connection to a published port is dropped while loaded",
            config_path.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<22} {:<28} {:<24} {:>8}  {:<16} COMMENT",
        "SOURCE", "TARGET", "PUBLISHED NOW", "HITS", "EXPIRES"
    );
    for row in rows {
        let published = if row.resolves_to.is_empty() {
            "-".to_string()
        } else {
            row.resolves_to.join(",")
        };
        let hits = row.hits.map_or("-".to_string(), |h| h.to_string());
        let expires = match (row.expired, row.expires_in_secs) {
            (true, _) => "EXPIRED".to_string(),
            (false, Some(left)) => format!("in {}", crate::clock::remaining(left, 0)),
            (false, None) => "never".to_string(),
        };
        println!(
            "{:<22} {:<28} {:<24} {:>8}  {:<16} {}",
            row.source,
            row.target,
            published,
            hits,
            expires,
            match (row.origin.as_str(), row.comment.as_deref()) {
                ("file", comment) => comment.unwrap_or("").to_string(),
                (origin, None) => format!("({origin})"),
                (origin, Some(comment)) => format!("({origin}) {comment}"),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
