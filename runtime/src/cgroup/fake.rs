//! A [`Cgroups`] that only records: for unit tests of code that places workers, with no
//! kernel and no root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{group_name, CgroupError, Cgroups, TenantLimits, Usage, WorkerGroup};

/// What a [`FakeCgroups`] was told.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recorded {
    pub tenants: BTreeMap<String, TenantLimits>,
    /// Worker groups and the processes attached to each.
    pub workers: BTreeMap<(String, String), Vec<u32>>,
    pub removed_all: usize,
}

/// Clones share what they record, so a test can keep one while a caller owns another.
#[derive(Debug, Default, Clone)]
pub struct FakeCgroups {
    state: std::sync::Arc<Mutex<Recorded>>,
}

impl FakeCgroups {
    pub fn recorded(&self) -> Recorded {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn missing(what: &str) -> CgroupError {
    CgroupError::new(
        "find",
        std::path::Path::new(what),
        std::io::Error::from(std::io::ErrorKind::NotFound),
    )
}

impl Cgroups for FakeCgroups {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn prepare(&self) -> Result<(), CgroupError> {
        Ok(())
    }

    fn set_tenant(&self, tenant: &str, limits: &TenantLimits) -> Result<(), CgroupError> {
        group_name(tenant)?;
        self.lock().tenants.insert(tenant.to_owned(), *limits);
        Ok(())
    }

    fn create_worker(&self, tenant: &str, worker: &str) -> Result<WorkerGroup, CgroupError> {
        let group = WorkerGroup::new(tenant, worker)?;
        let mut state = self.lock();
        if !state.tenants.contains_key(tenant) {
            return Err(missing(tenant));
        }
        state
            .workers
            .insert((tenant.to_owned(), worker.to_owned()), Vec::new());
        Ok(group)
    }

    fn attach(&self, group: &WorkerGroup, pid: u32) -> Result<(), CgroupError> {
        let mut state = self.lock();
        let pids = state
            .workers
            .get_mut(&(group.tenant.clone(), group.worker.clone()))
            .ok_or_else(|| missing(&group.worker))?;
        pids.push(pid);
        Ok(())
    }

    /// No unified hierarchy: callers place no device gate.
    fn gate_dir(&self, _: &WorkerGroup) -> Option<PathBuf> {
        None
    }

    fn usage(&self, tenant: &str) -> Result<Usage, CgroupError> {
        let state = self.lock();
        let limits = state.tenants.get(tenant).ok_or_else(|| missing(tenant))?;
        Ok(Usage {
            memory_limit_bytes: limits.memory_max,
            ..Usage::default()
        })
    }

    fn worker_usage(&self, group: &WorkerGroup) -> Result<Usage, CgroupError> {
        self.usage(&group.tenant)
    }

    fn remove_worker(&self, group: &WorkerGroup) -> Result<(), CgroupError> {
        self.lock()
            .workers
            .remove(&(group.tenant.clone(), group.worker.clone()));
        Ok(())
    }

    fn remove_tenant(&self, tenant: &str) -> Result<(), CgroupError> {
        let mut state = self.lock();
        state.tenants.remove(tenant);
        state.workers.retain(|(t, _), _| t != tenant);
        Ok(())
    }

    fn remove_all(&self) -> Result<usize, CgroupError> {
        let mut state = self.lock();
        let removed = state.tenants.len() + state.workers.len();
        state.tenants.clear();
        state.workers.clear();
        state.removed_all += 1;
        Ok(removed)
    }
}
