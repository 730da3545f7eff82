//! Tenant cgroups: the hierarchy the daemon owns (`<its own cgroup>/<instance>/<tenant>/<worker>`)
//! and the limits the kernel enforces on each tenant's workers.
//!
//! One trait, [`Cgroups`], with two kernel drivers chosen at run time from the mounts
//! ([`detect`]): [`V2Cgroups`] where one unified hierarchy carries every controller, and
//! [`HybridCgroups`] where memory, cpu and pids are v1 hierarchies and the unified one (if
//! mounted) only holds the groups device-gate programs attach to, as systemd arranges such
//! hosts. [`fake::FakeCgroups`] records what would be done, for unit tests of callers.
//!
//! Limits sit on the tenant's group, so all of a tenant's workers share them; a worker's own
//! group is where it is placed, counted and killed. Everything is created under the cgroup the
//! daemon runs in (its delegated subtree under systemd), never beside it, so the host's own
//! accounting of the daemon still holds; and everything under the instance directory is the
//! daemon's to remove, on stop and on start after a crash.

pub mod fake;
mod kernel;
pub mod limits;
pub mod mounts;

use std::fmt;
use std::path::{Path, PathBuf};

pub use self::kernel::{HybridCgroups, V2Cgroups};
pub use self::limits::TenantLimits;

/// A worker's group: `<instance>/<tenant>/<worker>` in every hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerGroup {
    pub tenant: String,
    pub worker: String,
}

impl WorkerGroup {
    /// A worker's group, its names checked to be single safe path components.
    pub fn new(tenant: &str, worker: &str) -> Result<Self, CgroupError> {
        group_name(tenant)?;
        group_name(worker)?;
        Ok(Self {
            tenant: tenant.to_owned(),
            worker: worker.to_owned(),
        })
    }
}

/// What a tenant's workers use, read from its group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: u64,
    /// Highest memory use seen, where the kernel keeps it.
    pub memory_peak_bytes: Option<u64>,
    /// The memory limit in force; `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// CPU time used, in microseconds.
    pub cpu_usec: u64,
    /// Processes the kernel killed for running out of the group's memory.
    pub oom_kills: u64,
}

/// A cgroup operation that failed: what, where, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}{}", path.display(), hint(source))]
pub struct CgroupError {
    pub action: String,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn hint(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(nix::libc::EROFS) => "; the cgroup filesystem is read-only (in a container, give it a writable cgroup namespace, or set `isolation: off` to run unisolated)",
        Some(nix::libc::EACCES | nix::libc::EPERM) => "; acceld must run as root, or with a cgroup delegated to its user",
        Some(nix::libc::ENOENT) => "; the controller may not be enabled for this cgroup",
        _ => "",
    }
}

impl CgroupError {
    pub(crate) fn new(action: impl Into<String>, path: &Path, source: std::io::Error) -> Self {
        Self {
            action: action.into(),
            path: path.to_owned(),
            source,
        }
    }
}

/// The daemon's cgroups, whatever the host's layout.
pub trait Cgroups: Send + Sync + fmt::Debug {
    /// `v2`, `hybrid` or `fake`, for logs and `accelctl workers`.
    fn kind(&self) -> &'static str;

    /// Creates the instance directory and hands the controllers down to it; after
    /// [`Cgroups::remove_all`] at start.
    fn prepare(&self) -> Result<(), CgroupError>;

    /// Creates the tenant's group if needed and writes its limits.
    fn set_tenant(&self, tenant: &str, limits: &TenantLimits) -> Result<(), CgroupError>;

    /// Creates a worker's group under its tenant's (which must exist).
    fn create_worker(&self, tenant: &str, worker: &str) -> Result<WorkerGroup, CgroupError>;

    /// Moves process `pid` into the worker's group in every hierarchy.
    fn attach(&self, group: &WorkerGroup, pid: u32) -> Result<(), CgroupError>;

    /// The unified-hierarchy directory of the worker's group, where a device-gate program
    /// attaches; `None` when no unified hierarchy is mounted.
    fn gate_dir(&self, group: &WorkerGroup) -> Option<PathBuf>;

    /// What the tenant's workers use together.
    fn usage(&self, tenant: &str) -> Result<Usage, CgroupError>;

    /// What one worker uses.
    fn worker_usage(&self, group: &WorkerGroup) -> Result<Usage, CgroupError>;

    /// Kills whatever is left in the worker's group and removes it.
    fn remove_worker(&self, group: &WorkerGroup) -> Result<(), CgroupError>;

    /// Kills whatever is left under the tenant's group and removes it.
    fn remove_tenant(&self, tenant: &str) -> Result<(), CgroupError>;

    /// Kills and removes everything under the instance directory, and the directory: on
    /// stop, and on start after a crash. Returns how many groups were removed.
    fn remove_all(&self) -> Result<usize, CgroupError>;
}

/// The driver for this host's layout, with the daemon's groups under `instance` (a single
/// directory name) in its own cgroup.
pub fn detect(instance: &str) -> Result<Box<dyn Cgroups>, String> {
    check_name(instance)?;
    let layout = mounts::detect()?;
    match layout {
        mounts::Layout::Unified(placed) => Ok(Box::new(V2Cgroups::new(placed, instance)?)),
        layout @ mounts::Layout::Hybrid { .. } => {
            Ok(Box::new(HybridCgroups::new(&layout, instance)?))
        }
    }
}

/// [`check_name`] as a cgroup operation's error.
pub(crate) fn group_name(name: &str) -> Result<(), CgroupError> {
    check_name(name).map_err(|why| {
        CgroupError::new(
            "name a group",
            Path::new(name),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
        )
    })
}

/// Group names are one path component the daemon chose: tenant names are validated by the
/// policy, worker names by the supervisor; this catches a mistake before it becomes a path.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with("cgroup.");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} cannot name a cgroup: use 1-128 letters, digits, '-', '_' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_single_safe_components() {
        for good in ["accel", "team-a", "w0.cuda_0"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "cgroup.procs",
            "x y",
            &"a".repeat(129),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
