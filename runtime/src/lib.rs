//! accel's node daemon, `acceld`, as a library: the binary only parses arguments, sets up
//! logging and calls [`daemon::run`].
//!
//! Subsystems, one module each:
//! - [`config`]: the daemon's own settings (socket, state dir, listeners, logging);
//! - [`policy`]: tenants, caller-to-tenant mapping, limits; validated YAML;
//! - [`api`]: HTTP/JSON control API over the Unix socket (and TCP), authentication;
//! - [`metrics`]: Prometheus families and exposition;
//! - [`state`]: what a running daemon shares between listeners (the policy in force);
//! - [`daemon`]: lifecycle, signals, drain;
//! - [`sys`]: every raw host interface (locks, socket files, NSS, procfs, systemd);
//! - [`yaml`], [`units`]: file parsing with positions, sizes and durations.

pub mod api;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod policy;
pub mod state;
pub mod sys;
pub mod units;
pub mod yaml;
