//! dockwall: decide who may reach the ports Docker publishes.
//!
//! The binary's modules are public so the kernel tests (tests/) can load the
//! same embedded object and compile keys with the same code.
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod docker;
pub mod droplog;
pub mod explain;
pub mod labels;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod runtime;
pub mod store;
pub mod testing;
