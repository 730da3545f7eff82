//! The kernel drivers: groups made, written, read and removed as directories and files of the
//! mounted cgroup hierarchies.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::mounts::{Layout, Placed};
use super::{check_name, group_name, CgroupError, Cgroups, TenantLimits, Usage, WorkerGroup};

/// Controllers the limits need.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// How long a group's processes get to die before its removal is an error.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Groups nest `<instance>/<tenant>/<worker>`; deeper is not ours.
const MAX_DEPTH: usize = 4;
/// v1 reports "no limit" as a page-rounded `i64::MAX`.
const V1_UNLIMITED: u64 = 1 << 62;

/// One hierarchy's `<own cgroup>/<instance>` directory.
#[derive(Debug, Clone)]
struct Hierarchy {
    root: PathBuf,
}

impl Hierarchy {
    fn tenant(&self, tenant: &str) -> PathBuf {
        self.root.join(tenant)
    }

    fn worker(&self, group: &WorkerGroup) -> PathBuf {
        self.root.join(&group.tenant).join(&group.worker)
    }
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => {
            Err(CgroupError::new("create the cgroup", dir, e))
        }
        _ => Ok(()),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value)
        .map_err(|e| CgroupError::new(format!("write {value:?} to"), &path, e))
}

fn read(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| CgroupError::new("read", &path, e))
}

/// A file that may not exist on this kernel (`memory.peak` before 5.19).
fn read_optional(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

fn number(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// The value of `key` in a flat keyed file (`memory.events`, `cpu.stat`).
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let (k, v) = line.split_once(' ')?;
            (k == key).then(|| number(v))
        })
        .unwrap_or(0)
}

fn pids_in(dir: &Path) -> Vec<i32> {
    read_optional(dir, "cgroup.procs")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The groups directly below `dir`.
fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Kills every process in `dir` (not below it) and waits until the group is empty.
fn kill_all(dir: &Path) -> Result<(), CgroupError> {
    let started = Instant::now();
    loop {
        let pids = pids_in(dir);
        if pids.is_empty() {
            return Ok(());
        }
        if started.elapsed() > KILL_WAIT {
            return Err(CgroupError::new(
                format!("empty ({} processes survive SIGKILL)", pids.len()),
                dir,
                std::io::Error::from(ErrorKind::TimedOut),
            ));
        }
        // v2's cgroup.kill takes the whole group at once, even processes forking meanwhile.
        if write(dir, "cgroup.kill", "1").is_err() {
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills and removes `dir` and every group below it; returns how many groups went.
fn remove_tree(dir: &Path, depth: usize) -> Result<usize, CgroupError> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(CgroupError::new("list", dir, e)),
        Ok(entries) => entries,
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if depth >= MAX_DEPTH {
                return Err(CgroupError::new(
                    "remove (groups nest deeper than the daemon makes them)",
                    &entry.path(),
                    std::io::Error::from(ErrorKind::InvalidData),
                ));
            }
            removed += remove_tree(&entry.path(), depth + 1)?;
        }
    }
    kill_all(dir)?;
    // The kernel finishes detaching killed processes asynchronously: retry while busy.
    let started = Instant::now();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(removed + 1),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(removed),
            Err(e)
                if e.raw_os_error() == Some(nix::libc::EBUSY) && started.elapsed() < KILL_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(CgroupError::new("remove the cgroup", dir, e)),
        }
    }
}

/// One unified hierarchy with the memory, cpu and pids controllers.
#[derive(Debug)]
pub struct V2Cgroups {
    own: PathBuf,
    is_top: bool,
    instance: String,
    h: Hierarchy,
}

impl V2Cgroups {
    pub fn new(placed: Placed, instance: &str) -> Result<Self, String> {
        check_name(instance)?;
        Ok(Self {
            is_top: placed.own_dir == placed.mount.point,
            h: Hierarchy {
                root: placed.own_dir.join(instance),
            },
            own: placed.own_dir,
            instance: instance.to_owned(),
        })
    }

    /// Over a directory that stands in for a cgroup filesystem (tests of the file logic).
    #[cfg(test)]
    fn at(own: &Path, instance: &str) -> Self {
        Self {
            own: own.to_owned(),
            is_top: false,
            instance: instance.to_owned(),
            h: Hierarchy {
                root: own.join(instance),
            },
        }
    }

    /// Hands the controllers down from the daemon's own group to `dir`'s children. A v2 group
    /// with processes cannot hand controllers down (the "no internal processes" rule), so the
    /// first time the daemon's own group is asked, its processes move to a leaf beside the
    /// instance directory, as systemd's delegation guide does.
    fn delegate(&self, dir: &Path) -> Result<(), CgroupError> {
        let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        match write(dir, "cgroup.subtree_control", &enable) {
            Err(e)
                if dir == self.own
                    && !self.is_top
                    && e.source.raw_os_error() == Some(nix::libc::EBUSY) =>
            {
                // Only our own processes may move: a cgroup shared with others (a login
                // session, a container's init) is not ours to rearrange.
                let me = std::process::id() as i32;
                let others = pids_in(&self.own).into_iter().filter(|&p| p != me).count();
                if others > 0 {
                    return Err(CgroupError::new(
                        "hand controllers down from",
                        &self.own,
                        std::io::Error::other(format!(
                            "it holds {others} other processes besides acceld; run acceld as its own service with a delegated cgroup (the shipped unit sets Delegate=yes)"
                        )),
                    ));
                }
                let leaf = self.own.join(format!("{}.supervisor", self.instance));
                make_dir(&leaf)?;
                for pid in pids_in(&self.own) {
                    match write(&leaf, "cgroup.procs", &pid.to_string()) {
                        Err(e) if e.source.raw_os_error() == Some(nix::libc::ESRCH) => {}
                        other => other?,
                    }
                }
                write(dir, "cgroup.subtree_control", &enable)
            }
            other => other,
        }
    }

    fn usage_of(dir: &Path) -> Result<Usage, CgroupError> {
        let limit = read(dir, "memory.max")?;
        Ok(Usage {
            memory_bytes: number(&read(dir, "memory.current")?),
            memory_peak_bytes: read_optional(dir, "memory.peak").map(|t| number(&t)),
            memory_limit_bytes: (limit.trim() != "max").then(|| number(&limit)),
            cpu_usec: keyed(&read(dir, "cpu.stat")?, "usage_usec"),
            oom_kills: keyed(&read(dir, "memory.events")?, "oom_kill"),
        })
    }
}

impl Cgroups for V2Cgroups {
    fn kind(&self) -> &'static str {
        "v2"
    }

    fn prepare(&self) -> Result<(), CgroupError> {
        let offered = read(&self.own, "cgroup.controllers")?;
        for controller in CONTROLLERS {
            if !offered.split_whitespace().any(|c| c == controller) {
                return Err(CgroupError::new(
                    format!("use the {controller} controller in"),
                    &self.own,
                    std::io::Error::new(
                        ErrorKind::Unsupported,
                        "it is not offered to the daemon's cgroup; under systemd set Delegate=yes on the unit",
                    ),
                ));
            }
        }
        self.delegate(&self.own)?;
        make_dir(&self.h.root)?;
        self.delegate(&self.h.root)
    }

    fn set_tenant(&self, tenant: &str, limits: &TenantLimits) -> Result<(), CgroupError> {
        group_name(tenant)?;
        let dir = self.h.tenant(tenant);
        make_dir(&dir)?;
        // Workers below get their own counters.
        self.delegate(&dir)?;
        for (file, value) in limits.v2_files() {
            write(&dir, file, &value)?;
        }
        Ok(())
    }

    fn create_worker(&self, tenant: &str, worker: &str) -> Result<WorkerGroup, CgroupError> {
        let group = WorkerGroup::new(tenant, worker)?;
        make_dir(&self.h.worker(&group))?;
        Ok(group)
    }

    fn attach(&self, group: &WorkerGroup, pid: u32) -> Result<(), CgroupError> {
        write(&self.h.worker(group), "cgroup.procs", &pid.to_string())
    }

    fn gate_dir(&self, group: &WorkerGroup) -> Option<PathBuf> {
        Some(self.h.worker(group))
    }

    fn usage(&self, tenant: &str) -> Result<Usage, CgroupError> {
        Self::usage_of(&self.h.tenant(tenant))
    }

    fn worker_usage(&self, group: &WorkerGroup) -> Result<Usage, CgroupError> {
        Self::usage_of(&self.h.worker(group))
    }

    fn remove_worker(&self, group: &WorkerGroup) -> Result<(), CgroupError> {
        remove_tree(&self.h.worker(group), 2).map(drop)
    }

    fn remove_tenant(&self, tenant: &str) -> Result<(), CgroupError> {
        remove_tree(&self.h.tenant(tenant), 1).map(drop)
    }

    fn remove_all(&self) -> Result<usize, CgroupError> {
        remove_tree(&self.h.root, 0)
    }
}

/// v1 hierarchies for memory, cpu (and cpuacct) and pids, and the unified hierarchy, when
/// mounted, for the device gate.
#[derive(Debug)]
pub struct HybridCgroups {
    /// By controller: `memory`, `cpu`, `pids`, then `cpuacct` when mounted on its own.
    v1: Vec<(&'static str, Hierarchy)>,
    unified: Option<Hierarchy>,
}

impl HybridCgroups {
    pub fn new(layout: &Layout, instance: &str) -> Result<Self, String> {
        check_name(instance)?;
        let Layout::Hybrid { unified, .. } = layout else {
            return Err("not a hybrid cgroup layout".into());
        };
        let mut v1: Vec<(&'static str, Hierarchy)> = Vec::new();
        for controller in ["memory", "cpu", "pids", "cpuacct"] {
            let Some(placed) = layout.v1_with(controller) else {
                if controller == "cpuacct" {
                    continue;
                }
                return Err(format!(
                    "the cgroup v1 {controller} controller is not mounted (see /proc/self/mountinfo); mount it, or set `isolation: off` to run unisolated"
                ));
            };
            let root = placed.own_dir.join(instance);
            // cpu and cpuacct are often one hierarchy: one directory, listed once.
            if !v1.iter().any(|(_, h)| h.root == root) {
                v1.push((controller, Hierarchy { root }));
            }
        }
        Ok(Self {
            v1,
            unified: unified.as_ref().map(|p| Hierarchy {
                root: p.own_dir.join(instance),
            }),
        })
    }

    /// Over directories that stand in for cgroup filesystems (tests of the file logic).
    #[cfg(test)]
    fn at(base: &Path, instance: &str) -> Self {
        let h = |name: &str| Hierarchy {
            root: base.join(name).join(instance),
        };
        Self {
            v1: vec![
                ("memory", h("memory")),
                ("cpu", h("cpu")),
                ("pids", h("pids")),
                ("cpuacct", h("cpuacct")),
            ],
            unified: Some(h("unified")),
        }
    }

    fn hierarchies(&self) -> impl Iterator<Item = &Hierarchy> {
        self.v1.iter().map(|(_, h)| h).chain(self.unified.iter())
    }

    fn v1(&self, controller: &str) -> Option<&Hierarchy> {
        self.v1
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, h)| h)
    }

    fn usage_in(&self, dir_of: impl Fn(&Hierarchy) -> PathBuf) -> Result<Usage, CgroupError> {
        let mut usage = Usage::default();
        if let Some(memory) = self.v1("memory") {
            let dir = dir_of(memory);
            let limit = number(&read(&dir, "memory.limit_in_bytes")?);
            usage.memory_bytes = number(&read(&dir, "memory.usage_in_bytes")?);
            usage.memory_peak_bytes =
                read_optional(&dir, "memory.max_usage_in_bytes").map(|t| number(&t));
            usage.memory_limit_bytes = (limit < V1_UNLIMITED).then_some(limit);
            // v1 counts a kill only in the victim's own group: add up the groups below.
            usage.oom_kills = keyed(&read(&dir, "memory.oom_control")?, "oom_kill")
                + child_dirs(&dir)
                    .iter()
                    .filter_map(|d| read_optional(d, "memory.oom_control"))
                    .map(|t| keyed(&t, "oom_kill"))
                    .sum::<u64>();
        }
        let cpuacct = self.v1("cpuacct").or_else(|| self.v1("cpu"));
        if let Some(text) = cpuacct.and_then(|h| read_optional(&dir_of(h), "cpuacct.usage")) {
            usage.cpu_usec = number(&text) / 1_000;
        }
        Ok(usage)
    }
}

impl Cgroups for HybridCgroups {
    fn kind(&self) -> &'static str {
        "hybrid"
    }

    fn prepare(&self) -> Result<(), CgroupError> {
        for h in self.hierarchies() {
            make_dir(&h.root)?;
        }
        Ok(())
    }

    fn set_tenant(&self, tenant: &str, limits: &TenantLimits) -> Result<(), CgroupError> {
        group_name(tenant)?;
        for h in self.hierarchies() {
            make_dir(&h.tenant(tenant))?;
        }
        for (controller, file, value) in limits.v1_files() {
            if let Some(h) = self.v1(controller) {
                write(&h.tenant(tenant), file, &value)?;
            }
        }
        Ok(())
    }

    fn create_worker(&self, tenant: &str, worker: &str) -> Result<WorkerGroup, CgroupError> {
        let group = WorkerGroup::new(tenant, worker)?;
        for h in self.hierarchies() {
            make_dir(&h.worker(&group))?;
        }
        Ok(group)
    }

    fn attach(&self, group: &WorkerGroup, pid: u32) -> Result<(), CgroupError> {
        for h in self.hierarchies() {
            write(&h.worker(group), "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    fn gate_dir(&self, group: &WorkerGroup) -> Option<PathBuf> {
        self.unified.as_ref().map(|h| h.worker(group))
    }

    fn usage(&self, tenant: &str) -> Result<Usage, CgroupError> {
        self.usage_in(|h| h.tenant(tenant))
    }

    fn worker_usage(&self, group: &WorkerGroup) -> Result<Usage, CgroupError> {
        self.usage_in(|h| h.worker(group))
    }

    fn remove_worker(&self, group: &WorkerGroup) -> Result<(), CgroupError> {
        for h in self.hierarchies() {
            remove_tree(&h.worker(group), 2)?;
        }
        Ok(())
    }

    fn remove_tenant(&self, tenant: &str) -> Result<(), CgroupError> {
        for h in self.hierarchies() {
            remove_tree(&h.tenant(tenant), 1)?;
        }
        Ok(())
    }

    fn remove_all(&self) -> Result<usize, CgroupError> {
        let mut removed = 0;
        for h in self.hierarchies() {
            removed = removed.max(remove_tree(&h.root, 0)?);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> TenantLimits {
        TenantLimits {
            memory_max: Some(256 << 20),
            weight: 2,
            cpus: Some(0.5),
            pids_max: Some(32),
        }
    }

    /// The file logic over plain directories: what the kernel would be told. The real
    /// hierarchies are exercised by `tests/isolation.rs` as root.
    #[test]
    fn v2_writes_limits_on_the_tenant_and_hands_controllers_down() {
        let own = tempfile::tempdir().unwrap();
        std::fs::write(
            own.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let cg = V2Cgroups::at(own.path(), "accel");
        cg.prepare().unwrap();
        let root = own.path().join("accel");
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        cg.set_tenant("team-a", &limits()).unwrap();
        let tenant = root.join("team-a");
        for (file, value) in limits().v2_files() {
            assert_eq!(std::fs::read_to_string(tenant.join(file)).unwrap(), value);
        }
        let group = cg.create_worker("team-a", "w1").unwrap();
        assert!(tenant.join("w1").is_dir());
        assert_eq!(cg.gate_dir(&group), Some(tenant.join("w1")));
        assert!(cg.create_worker("team-a", "../escape").is_err());
    }

    #[test]
    fn v2_refuses_a_cgroup_without_the_controllers() {
        let own = tempfile::tempdir().unwrap();
        std::fs::write(own.path().join("cgroup.controllers"), "cpu pids\n").unwrap();
        let err = V2Cgroups::at(own.path(), "accel").prepare().unwrap_err();
        assert!(err.to_string().contains("memory controller"), "{err}");
        assert!(err.to_string().contains("Delegate=yes"), "{err}");
    }

    #[test]
    fn hybrid_writes_each_file_in_its_controllers_hierarchy() {
        let base = tempfile::tempdir().unwrap();
        for name in ["memory", "cpu", "pids", "cpuacct", "unified"] {
            std::fs::create_dir(base.path().join(name)).unwrap();
        }
        let cg = HybridCgroups::at(base.path(), "accel");
        cg.prepare().unwrap();
        cg.set_tenant("team-a", &limits()).unwrap();
        for (controller, file, value) in limits().v1_files() {
            let path = base.path().join(controller).join("accel/team-a").join(file);
            assert_eq!(std::fs::read_to_string(&path).unwrap(), value, "{path:?}");
        }
        let group = cg.create_worker("team-a", "w1").unwrap();
        assert_eq!(
            cg.gate_dir(&group),
            Some(base.path().join("unified/accel/team-a/w1"))
        );
        // No limits file lands in a hierarchy whose controller does not own it.
        assert!(!base
            .path()
            .join("pids/accel/team-a/memory.limit_in_bytes")
            .exists());
    }

    #[test]
    fn a_hybrid_layout_without_the_memory_controller_is_refused() {
        let mounts = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        let layout = super::super::mounts::layout(mounts, "1:cpu:/\n").unwrap();
        let err = HybridCgroups::new(&layout, "accel").unwrap_err();
        assert!(err.contains("memory controller is not mounted"), "{err}");
        assert!(err.contains("isolation: off"), "{err}");
    }

    #[test]
    fn keyed_files_and_numbers_are_read() {
        assert_eq!(keyed("low 0\nhigh 3\noom 1\noom_kill 2\n", "oom_kill"), 2);
        assert_eq!(
            keyed("usage_usec 1234\nuser_usec 1000\n", "usage_usec"),
            1234
        );
        assert_eq!(keyed("", "oom_kill"), 0);
    }
}
