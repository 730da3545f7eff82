//! A [`Cgroups`] that only records: for unit tests of code that places workers, with no
//! kernel and no root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{check_name, CgroupError, Cgroups, TenantLimits, Usage, WorkerGroup};

/// What a [`FakeCgroups`] was told.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recorded {
    pub tenants: BTreeMap<String, TenantLimits>,
    /// Worker groups and the processes attached to each.
    pub workers: BTreeMap<(String, String), Vec<u32>>,
    pub removed_all: usize,
}

#[derive(Debug, Default)]
pub struct FakeCgroups {
    state: Mutex<Recorded>,
}

impl FakeCgroups {
    pub fn recorded(&self) -> Recorded {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn invalid(name: &str, why: String) -> CgroupError {
    CgroupError::new(
        "name a group",
        std::path::Path::new(name),
        std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
    )
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
        check_name(tenant).map_err(|why| invalid(tenant, why))?;
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

    fn gate_dir(&self, group: &WorkerGroup) -> Option<PathBuf> {
        Some(PathBuf::from(format!(
            "/fake/{}/{}",
            group.tenant, group.worker
        )))
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
