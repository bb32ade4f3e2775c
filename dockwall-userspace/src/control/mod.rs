//! The control plane: while `dockwall load` runs it is the only writer of
//! the saved policy and of every dataplane. `allow`, `revoke`, `set` and `reload`
//! are requests to it over a Unix socket in the runtime dir (root only),
//! one JSON line each way; it serialises them, saves each change (journal,
//! fsync), applies the difference and answers only once every dataplane
//! holds it.
//!
//! With no daemon running, a command takes the writer's lock the daemon
//! holds for its life and applies directly, so an admin can still revoke
//! while the daemon is dead. A starting daemon takes that lock before it
//! reads the file: no edit can fall between its read and its apply.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod client;
pub mod edit;
pub mod server;
pub mod sets;

/// The socket's name in the runtime dir.
pub const SOCKET: &str = "control.sock";

pub fn socket_path() -> PathBuf {
    crate::runtime::run_dir().join(SOCKET)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    Edit(edit::Edit),
    /// `dockwall set add|remove|load`.
    Set(sets::SetEdit),
    /// Apply the saved file as it is now (after a hand edit).
    Reload,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// Saved and in force: the lines the command prints.
    Done { lines: Vec<String> },
    /// Refused or failed, with the one line that says why.
    Failed { error: String },
}
