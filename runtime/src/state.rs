//! The state a running daemon shares between its listeners and signal handlers: the policy in
//! force, metrics, and lifecycle flags.
//!
//! Invariant: the policy is replaced whole (an `Arc` swap under a short lock) and only after the
//! new one validated; reloads are serialized so two cannot interleave.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::DaemonConfig;
use crate::devices::DeviceReport;
use crate::metrics::Metrics;
use crate::policy::{Policy, UserDb};
use crate::runner::ModelHandle;
use crate::yaml::Problems;

/// The outcome of a successful reload.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// False for a dry run.
    pub applied: bool,
    /// The generation in force afterwards.
    pub generation: u64,
    pub tenants: usize,
    pub sources: Vec<String>,
    /// Changes to tenants' isolation that served models take when they are loaded again.
    pub pending: Vec<String>,
}

/// The policy in force with its generation (1 at start, +1 per reload that took effect) and
/// the Unix time it was loaded; replaced whole on reload.
#[derive(Debug)]
pub struct PolicySnapshot {
    pub policy: Policy,
    pub generation: u64,
    pub loaded_at: u64,
}

impl std::ops::Deref for PolicySnapshot {
    type Target = Policy;
    fn deref(&self) -> &Policy {
        &self.policy
    }
}

/// Shared daemon state.
pub struct DaemonState {
    pub config: DaemonConfig,
    /// Models served: those loaded at start, and operators' loads and unloads since.
    pub served: Arc<crate::served::Served>,
    /// Accelerators found at start.
    pub devices: DeviceReport,
    tenant_in_flight: Mutex<HashMap<String, usize>>,
    pub metrics: Metrics,
    /// Held while the per-model gauges are written or cleared.
    model_metrics: Mutex<()>,
    pub user_db: Box<dyn UserDb + Send + Sync>,
    pub started_at: SystemTime,
    pub started: Instant,
    policy: RwLock<Arc<PolicySnapshot>>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Set when the daemon stops (SIGTERM, SIGINT).
    draining: AtomicBool,
    /// Set by an operator's drain: new requests are refused until undrained.
    drained: AtomicBool,
    /// Batch jobs, with their journals.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Bearer tokens created at run time (`accelctl tokens`).
    pub tokens: crate::tokens::TokenStore,
    /// Generation requests in flight (`accelctl requests`).
    pub requests: crate::requests::Requests,
}

impl std::fmt::Debug for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonState")
            .field("generation", &self.policy().generation)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl DaemonState {
    /// The device label a model's memory metrics carry: a GPU's UUID, as the device metrics
    /// label it, or `cpu`.
    fn device_label(&self, m: &ModelHandle) -> String {
        m.info
            .backend
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(|n| self.devices.devices.iter().find(|d| d.index == n))
            .map_or_else(|| m.info.backend.clone(), |d| d.uuid.clone())
    }

    /// Brings the per-model memory gauges up to date (called before each scrape).
    pub fn refresh_model_metrics(&self) {
        // Serialized with an unload's clean-up, so a scrape cannot write back the series of a
        // model just unloaded.
        let _serialized = self.model_metrics.lock().unwrap_or_else(|p| p.into_inner());
        for m in self.models().iter() {
            let device = self.device_label(m);
            self.metrics
                .model_up
                .with_label_values(&[m.info.name.as_str()])
                .set(i64::from(m.is_up()));
            let usage = m.usage();
            for worker in m.workers() {
                let w = &self.metrics.workers;
                let group = format!("{}/{}", worker.pool, worker.name);
                let labels = [m.info.name.as_str(), group.as_str()];
                let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                w.up.with_label_values(&labels)
                    .set(i64::from(worker.pid().is_some()));
                w.restarts
                    .with_label_values(&labels)
                    .set(clamp(worker.restarts()));
                if let Some((cg, denials)) = worker.usage() {
                    w.memory
                        .with_label_values(&labels)
                        .set(clamp(cg.memory_bytes));
                    if let Some(peak) = cg.memory_peak_bytes {
                        w.memory_peak.with_label_values(&labels).set(clamp(peak));
                    }
                    w.cpu_seconds
                        .with_label_values(&labels)
                        .set(cg.cpu_usec as f64 / 1e6);
                    w.oom_kills
                        .with_label_values(&labels)
                        .set(clamp(cg.oom_kills));
                    w.device_denials
                        .with_label_values(&labels)
                        .set(clamp(denials));
                }
            }
            for (tenant, bytes) in m.kv_by_tenant() {
                self.metrics
                    .kv_cache
                    .with_label_values(&[device.as_str(), m.info.name.as_str(), tenant.as_str()])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
            for (what, bytes) in usage.device_memory().unwrap_or_default() {
                self.metrics
                    .backend_memory
                    .with_label_values(&[device.as_str(), m.info.name.as_str(), what])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
    }

    /// Clears the series of a model taken off, so a scrape shows only what is served.
    fn forget_model_metrics(&self, m: &ModelHandle) {
        let _serialized = self.model_metrics.lock().unwrap_or_else(|p| p.into_inner());
        let name = m.info.name.as_str();
        let device = self.device_label(m);
        let metrics = &self.metrics;
        let _ = metrics.models_loaded.remove_label_values(&[
            name,
            m.info.format.as_str(),
            m.info.backend.as_str(),
        ]);
        let _ = metrics.model_up.remove_label_values(&[name]);
        for tenant in m.kv_by_tenant().keys() {
            let _ = metrics
                .kv_cache
                .remove_label_values(&[device.as_str(), name, tenant.as_str()]);
        }
        for (what, _) in m.usage().device_memory().unwrap_or_default() {
            let _ = metrics
                .backend_memory
                .remove_label_values(&[device.as_str(), name, what]);
        }
        let w = &metrics.workers;
        for worker in m.workers() {
            let group = format!("{}/{}", worker.pool, worker.name);
            let labels = [name, group.as_str()];
            for gauge in [
                &w.up,
                &w.restarts,
                &w.memory,
                &w.memory_peak,
                &w.oom_kills,
                &w.device_denials,
            ] {
                let _ = gauge.remove_label_values(&labels);
            }
            let _ = w.cpu_seconds.remove_label_values(&labels);
        }
    }

    /// The models served now (a snapshot: loads and unloads replace the list whole).
    pub fn models(&self) -> Arc<Vec<ModelHandle>> {
        self.served.list()
    }

    /// Starts loading a model at an operator's request; see [`crate::served::Served`].
    pub fn load_model(
        &self,
        spec: crate::config::ModelSpec,
    ) -> Result<crate::served::LoadStatus, crate::served::ChangeRefused> {
        self.served
            .start_load(spec, &self.metrics)
            .map(|load| load.status())
    }

    /// Unloads a model at an operator's request; see [`crate::served::Served::unload`].
    pub async fn unload_model(
        &self,
        name: &str,
        grace: std::time::Duration,
    ) -> Result<crate::runner::arbiter::Retired, crate::served::ChangeRefused> {
        self.served
            .unload(name, grace, |m| self.forget_model_metrics(m))
            .await
    }

    pub fn new(
        config: DaemonConfig,
        policy: Policy,
        metrics: Metrics,
        user_db: Box<dyn UserDb + Send + Sync>,
        models: Vec<ModelHandle>,
        devices: DeviceReport,
    ) -> Self {
        metrics.set_policy(&policy);
        for m in &models {
            metrics.model_loaded(m);
        }
        for d in &devices.devices {
            let index = d.index.to_string();
            metrics
                .device_info
                .with_label_values(&[
                    d.uuid.as_str(),
                    index.as_str(),
                    d.name.as_str(),
                    d.compute_capability.as_str(),
                ])
                .set(1);
            metrics
                .device_memory
                .with_label_values(&[d.uuid.as_str()])
                .set(d.memory_bytes as i64);
        }
        let config_jobs = config.jobs.clone();
        Self {
            config,
            served: Arc::new(crate::served::Served::new(models, None)),
            devices,
            tenant_in_flight: Mutex::new(HashMap::new()),
            metrics,
            model_metrics: Mutex::new(()),
            user_db,
            started_at: SystemTime::now(),
            started: Instant::now(),
            policy: RwLock::new(Arc::new(PolicySnapshot {
                policy,
                generation: 1,
                loaded_at: unix_now(),
            })),
            reload_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            jobs: Arc::new(crate::jobs::Jobs::disabled(config_jobs)),
            tokens: crate::tokens::TokenStore::in_memory(),
            requests: crate::requests::Requests::default(),
        }
    }

    /// Lets operators load and unload models on `fleet`'s device loops.
    pub fn with_fleet(mut self, fleet: Arc<crate::runner::Fleet>) -> Self {
        self.served = Arc::new(crate::served::Served::new(
            self.served.list().to_vec(),
            Some(fleet),
        ));
        self
    }

    /// Keeps run-time tokens in `tokens` (a file in the state directory).
    pub fn with_tokens(mut self, tokens: crate::tokens::TokenStore) -> Self {
        self.tokens = tokens;
        self
    }

    /// Serves batch jobs from `jobs` (opened on the state directory).
    pub fn with_jobs(mut self, jobs: crate::jobs::Jobs) -> Self {
        self.jobs = Arc::new(jobs);
        self
    }

    /// The policy in force, with its generation.
    pub fn policy(&self) -> Arc<PolicySnapshot> {
        match self.policy.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Rereads and validates the policy files; puts the result in force unless `dry_run`.
    /// On failure the policy in force is untouched.
    pub async fn reload_policy(&self, dry_run: bool) -> Result<Reloaded, Problems> {
        let _serialized = self.reload_lock.lock().await;
        let paths = self.config.policy_paths();
        let timer = self.metrics.policy_load_duration.start_timer();
        let loaded = tokio::task::spawn_blocking(move || paths.load())
            .await
            .unwrap_or_else(|e| {
                Err(Problems(vec![crate::yaml::Problem {
                    file: String::new(),
                    path: String::new(),
                    line: 0,
                    column: 0,
                    message: format!("policy loader failed: {e}"),
                }]))
            });
        timer.observe_duration();
        let result = if dry_run { "dry_run" } else { "apply" };
        match loaded {
            Err(problems) => {
                if !dry_run {
                    self.metrics
                        .policy_reloads
                        .with_label_values(&["failure"])
                        .inc();
                }
                tracing::warn!(%problems, mode = result, "new policy rejected; the policy in force is unchanged");
                Err(problems)
            }
            Ok(policy) if dry_run => Ok(Reloaded {
                applied: false,
                generation: self.policy().generation,
                tenants: policy.tenants.len(),
                sources: policy.sources.clone(),
                pending: Vec::new(),
            }),
            Ok(policy) => {
                // Serialized by reload_lock, so read-then-write cannot lose a generation.
                let generation = self.policy().generation + 1;
                let snapshot = Arc::new(PolicySnapshot {
                    policy,
                    generation,
                    loaded_at: unix_now(),
                });
                *match self.policy.write() {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                } = snapshot.clone();
                self.metrics.set_policy(&snapshot);
                // Dedicated workers' cgroups take their tenants' new limits at once.
                for worker in self.models().iter().flat_map(|m| m.workers()) {
                    let Some(tenant) = worker.tenant().and_then(|t| snapshot.tenant(t)) else {
                        continue;
                    };
                    let limits = crate::cgroup::TenantLimits::of(tenant);
                    if let Err(e) = worker.apply_limits(&limits) {
                        tracing::error!(tenant = %tenant.name, error = %e, "could not apply the tenant's new limits to its workers' cgroup");
                    }
                }
                // Models loaded from now on place workers as this policy says; served ones
                // keep theirs until they are loaded again.
                let pending = self.served.fleet().map_or_else(Vec::new, |fleet| {
                    fleet.take_policy(&snapshot.policy, &self.models())
                });
                for change in &pending {
                    tracing::warn!(%change, "a tenant's isolation changed");
                }
                self.metrics
                    .policy_reloads
                    .with_label_values(&["success"])
                    .inc();
                tracing::info!(generation, tenants = snapshot.tenants.len(), sources = ?snapshot.sources, "policy reloaded");
                Ok(Reloaded {
                    applied: true,
                    generation,
                    tenants: snapshot.tenants.len(),
                    sources: snapshot.sources.clone(),
                    pending,
                })
            }
        }
    }

    /// The served model named `name`.
    pub fn model(&self, name: &str) -> Option<ModelHandle> {
        self.served.get(name)
    }

    /// Takes one of `tenant`'s request slots, or returns how many it already has in flight.
    pub fn enter_tenant(
        self: &Arc<Self>,
        tenant: &str,
        limit: Option<u32>,
    ) -> Result<TenantSlot, usize> {
        let mut counts = self
            .tenant_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(tenant.to_owned()).or_insert(0);
        if limit.is_some_and(|l| *count >= l as usize) {
            return Err(*count);
        }
        *count += 1;
        self.metrics
            .tenant_requests_in_flight
            .with_label_values(&[tenant])
            .set(*count as i64);
        Ok(TenantSlot {
            state: self.clone(),
            tenant: tenant.to_owned(),
            counted: true,
        })
    }

    /// A slot for a batch job's line: not counted against `limits.max_concurrent_requests`,
    /// since `jobs.concurrency` bounds a job, and a job must not lock its tenant's interactive
    /// requests out.
    pub fn job_slot(self: &Arc<Self>, tenant: &str) -> TenantSlot {
        TenantSlot {
            state: self.clone(),
            tenant: tenant.to_owned(),
            counted: false,
        }
    }

    /// Whether the policy in force makes this socket peer an operator.
    pub fn is_operator(&self, peer: &crate::api::PeerCred) -> bool {
        let caller = crate::policy::Caller {
            uid: peer.uid,
            gid: peer.gid,
            pid: peer.pid,
            groups: peer.groups.to_vec(),
        };
        self.policy()
            .identify(&caller, self.user_db.as_ref())
            .is_some_and(|i| i.role == crate::policy::Role::Operator)
    }

    /// Whether new work is refused: the daemon is stopping, or an operator drained it.
    pub fn draining(&self) -> bool {
        self.stopping() || self.drained.load(Ordering::SeqCst)
    }

    /// Whether the daemon is stopping (SIGTERM): unlike an operator's drain, it ends.
    pub fn stopping(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// An operator's drain (`accelctl drain`), or its end; returns whether it changed.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::SeqCst) != drained
    }

    /// Inference requests in flight (not counting batch job lines).
    pub fn inference_in_flight(&self) -> usize {
        self.tenant_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }
}

/// One in-flight request of a tenant; the slot frees itself when dropped (the response sent,
/// the stream finished, or the client gone).
#[derive(Debug)]
pub struct TenantSlot {
    state: Arc<DaemonState>,
    tenant: String,
    counted: bool,
}

impl TenantSlot {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut counts = self
            .state
            .tenant_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            self.state
                .metrics
                .tenant_requests_in_flight
                .with_label_values(&[self.tenant.as_str()])
                .set(*count as i64);
        }
    }
}
