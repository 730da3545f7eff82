//! Where workers are placed: the daemon's cgroups ([`crate::cgroup`]) and a device gate
//! ([`crate::gate`]) on each worker's group, set up before the worker loads anything.
//!
//! Shared workers (one per model, serving every tenant) live in the pool group `_shared`, a
//! name no tenant can take (tenant names start with a letter or digit). Everything is named
//! by an instance derived from the state directory, so two daemons on one host (each has its
//! own state directory) never touch each other's groups or pins.

use std::path::Path;

use sha2::Digest as _;

use crate::cgroup::{self, Cgroups, TenantLimits, WorkerGroup};
use crate::config::PoolLimits;
use crate::gate::{self, grants, DeviceGate};

/// The group of the workers every tenant shares.
pub const SHARED_POOL: &str = "_shared";
/// The state directory a daemon installed by `make install` uses.
const DEFAULT_STATE_DIR: &str = "/var/lib/accel";

/// The daemon's cgroups and gates for its workers.
#[derive(Debug)]
pub struct Sandbox {
    cgroups: Box<dyn Cgroups>,
    instance: String,
    gpus: usize,
    proc_devices: String,
    /// Set on stop; held across a placement so nothing is placed after the cleanup.
    closed: std::sync::Mutex<bool>,
}

/// `accel` for the installed daemon; `accel-<hash of the state dir>` for any other, so that
/// daemons beside each other (tests, a second instance) keep apart.
pub fn instance_name(state_dir: &Path) -> String {
    if state_dir == Path::new(DEFAULT_STATE_DIR) {
        return "accel".to_owned();
    }
    let digest = sha2::Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("accel-{hex}")
}

impl Sandbox {
    /// Finds the host's cgroups, removes whatever an earlier daemon of this instance left
    /// (groups, the processes in them, pinned gates), and prepares the pool group.
    pub fn prepare(state_dir: &Path, gpus: usize, pool: &PoolLimits) -> Result<Self, String> {
        let instance = instance_name(state_dir);
        let cgroups = cgroup::detect(&instance)?;
        let removed = cgroups.remove_all().map_err(|e| e.to_string())?;
        let unpinned = gate::remove_pins(&instance).map_err(|e| e.to_string())?;
        if removed + unpinned > 0 {
            tracing::warn!(groups = removed, pins = unpinned, %instance, "removed what an earlier daemon left (it did not stop cleanly)");
        }
        gate::ensure_bpffs().map_err(|e| e.to_string())?;
        let proc_devices = std::fs::read_to_string("/proc/devices")
            .map_err(|e| format!("cannot read /proc/devices: {e}"))?;
        let sandbox = Self::with(cgroups, instance, gpus, proc_devices, pool)?;
        tracing::info!(instance = %sandbox.instance, cgroups = sandbox.cgroups.kind(), "workers are isolated: cgroups and a device gate per worker");
        Ok(sandbox)
    }

    /// Over given cgroups (the host's, or a fake in tests): prepares them and the pool group.
    fn with(
        cgroups: Box<dyn Cgroups>,
        instance: String,
        gpus: usize,
        proc_devices: String,
        pool: &PoolLimits,
    ) -> Result<Self, String> {
        cgroups.prepare().map_err(|e| e.to_string())?;
        cgroups
            .set_tenant(
                SHARED_POOL,
                &TenantLimits {
                    memory_max: pool.memory.map(|m| m.bytes()),
                    weight: 1,
                    cpus: pool.cpu,
                    pids_max: pool.pids,
                },
            )
            .map_err(|e| e.to_string())?;
        Ok(Self {
            cgroups,
            instance,
            gpus,
            proc_devices,
            closed: std::sync::Mutex::new(false),
        })
    }

    /// Puts a just-started worker (it waits for its init before loading anything) in its group,
    /// behind a gate granting only `device`'s nodes.
    pub fn place(
        &self,
        pool: &str,
        worker: &str,
        device: &str,
        pid: u32,
    ) -> Result<WorkerGroup, String> {
        let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if *closed {
            return Err("the daemon is stopping".into());
        }
        let grants = grants::for_device(device, self.gpus, &self.proc_devices)?;
        let group = self
            .cgroups
            .create_worker(pool, worker)
            .map_err(|e| e.to_string())?;
        self.cgroups
            .attach(&group, pid)
            .map_err(|e| e.to_string())?;
        match self.cgroups.gate_dir(&group) {
            Some(dir) => {
                let pins = gate::pin_dir(&self.instance, pool, worker);
                // The gate of the worker this one replaces goes first.
                if let Ok(old) = DeviceGate::open(&pins) {
                    old.detach().map_err(|e| e.to_string())?;
                }
                DeviceGate::attach(&dir, &grants, &pins).map_err(|e| e.to_string())?;
            }
            None => {
                tracing::warn!(%worker, "no unified cgroup hierarchy is mounted: this worker has no device gate")
            }
        }
        Ok(group)
    }

    /// What a worker's group uses.
    pub fn usage(&self, pool: &str, worker: &str) -> Result<cgroup::Usage, String> {
        WorkerGroup::new(pool, worker)
            .and_then(|group| self.cgroups.worker_usage(&group))
            .map_err(|e| e.to_string())
    }

    /// Device opens a worker's gate refused.
    pub fn denials(&self, pool: &str, worker: &str) -> u64 {
        DeviceGate::open(&gate::pin_dir(&self.instance, pool, worker)).map_or(0, |g| g.denials())
    }

    /// Kills whatever is left in a lost worker's group (anything it forked); its group and
    /// gate are made again for its replacement.
    /// Whether the group is gone (its replacement starts in a new one).
    pub fn empty(&self, pool: &str, worker: &str) -> bool {
        let removed =
            WorkerGroup::new(pool, worker).and_then(|group| self.cgroups.remove_worker(&group));
        if let Err(e) = &removed {
            tracing::error!(%worker, error = %e, "could not empty a lost worker's cgroup");
        }
        removed.is_ok()
    }

    /// After a worker stopped for good (its model was unloaded): its gate and group go, so
    /// nothing of it is left and the model can be loaded again into a fresh group.
    pub fn release(&self, pool: &str, worker: &str) {
        let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if *closed {
            return; // everything went at close
        }
        if let Ok(gate) = DeviceGate::open(&gate::pin_dir(&self.instance, pool, worker)) {
            if let Err(e) = gate.detach() {
                tracing::error!(%worker, error = %e, "could not remove an unloaded worker's device gate");
            }
        }
        let removed =
            WorkerGroup::new(pool, worker).and_then(|group| self.cgroups.remove_worker(&group));
        if let Err(e) = removed {
            tracing::error!(%worker, error = %e, "could not remove an unloaded worker's cgroup");
        }
    }

    /// Creates a tenant's group for its dedicated workers, or updates its limits.
    pub fn limit_tenant(&self, tenant: &str, limits: &TenantLimits) -> Result<(), String> {
        self.cgroups
            .set_tenant(tenant, limits)
            .map_err(|e| e.to_string())
    }

    /// On stop: kills every worker and removes every group and gate; nothing is placed after.
    pub fn close(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        *closed = true;
        match self.cgroups.remove_all() {
            Ok(groups) => tracing::info!(groups, "worker cgroups removed"),
            Err(e) => tracing::error!(error = %e, "could not remove the workers' cgroups"),
        }
        if let Err(e) = gate::remove_pins(&self.instance) {
            tracing::error!(error = %e, "could not remove the device gates' pins");
        }
    }
}

/// A worker's group name for a model on a device: `<model>-<device>` with `:` spelled `-`.
pub fn worker_name(model: &str, device: &str) -> String {
    format!("{model}-{}", device.replace(':', "-"))
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sandbox over the recording fake, on a node with one GPU.
    fn faked() -> (Sandbox, crate::cgroup::fake::FakeCgroups) {
        let fake = crate::cgroup::fake::FakeCgroups::default();
        let sandbox = Sandbox::with(
            Box::new(fake.clone()),
            "accel-test".into(),
            1,
            "Character devices:\n  1 mem\n508 nvidia-uvm\n".into(),
            &PoolLimits::default(),
        )
        .unwrap();
        (sandbox, fake)
    }

    #[test]
    fn workers_are_placed_in_their_pool_and_nothing_is_placed_after_a_stop() {
        let (sandbox, fake) = faked();
        let limits = TenantLimits {
            memory_max: Some(1 << 30),
            weight: 2,
            cpus: None,
            pids_max: Some(64),
        };
        sandbox.limit_tenant("alpha", &limits).unwrap();
        sandbox.place(SHARED_POOL, "m-cpu", "cpu", 41).unwrap();
        sandbox.place("alpha", "m-cuda-0", "cuda:0", 42).unwrap();
        let recorded = fake.recorded();
        assert_eq!(recorded.tenants["alpha"], limits);
        assert!(recorded.tenants.contains_key(SHARED_POOL));
        assert_eq!(
            recorded.workers[&(SHARED_POOL.into(), "m-cpu".into())],
            [41]
        );
        assert_eq!(recorded.workers[&("alpha".into(), "m-cuda-0".into())], [42]);
        // A GPU the node does not have is refused before anything is made.
        let err = sandbox
            .place(SHARED_POOL, "m-cuda-1", "cuda:1", 43)
            .unwrap_err();
        assert!(err.contains("this node has 1 GPU"), "{err}");
        assert!(!fake
            .recorded()
            .workers
            .contains_key(&(SHARED_POOL.into(), "m-cuda-1".into())));
        // A lost worker's group is emptied; stopping removes everything and nothing follows.
        sandbox.empty(SHARED_POOL, "m-cpu");
        assert!(!fake
            .recorded()
            .workers
            .contains_key(&(SHARED_POOL.into(), "m-cpu".into())));
        sandbox.close();
        assert_eq!(fake.recorded().removed_all, 1);
        let err = sandbox.place(SHARED_POOL, "m-cpu", "cpu", 44).unwrap_err();
        assert!(err.contains("stopping"), "{err}");
        assert!(fake.recorded().workers.is_empty());
    }

    #[test]
    fn instances_keep_daemons_apart_and_names_are_safe_groups() {
        assert_eq!(instance_name(Path::new("/var/lib/accel")), "accel");
        let a = instance_name(Path::new("/tmp/a/state"));
        let b = instance_name(Path::new("/tmp/b/state"));
        assert_ne!(a, b);
        assert!(a.starts_with("accel-") && a.len() == "accel-".len() + 12);
        let name = worker_name("smollm2-135m-instruct", "cuda:0");
        assert_eq!(name, "smollm2-135m-instruct-cuda-0");
        assert!(crate::cgroup::check_name(&name).is_ok());
        assert!(crate::cgroup::check_name(SHARED_POOL).is_ok());
    }
}
