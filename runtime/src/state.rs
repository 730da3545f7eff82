//! The state a running daemon shares between its listeners and signal handlers: the policy in
//! force, metrics, and lifecycle flags.
//!
//! Invariant: the policy is replaced whole (an `Arc` swap under a short lock) and only after the
//! new one validated; reloads are serialized so two cannot interleave.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::DaemonConfig;
use crate::metrics::Metrics;
use crate::policy::{Policy, UserDb};
use crate::yaml::Problems;

/// The outcome of a successful reload.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub applied: bool,
    pub generation: u64,
    pub policy: Arc<Policy>,
}

/// Shared daemon state.
pub struct DaemonState {
    pub config: DaemonConfig,
    pub metrics: Metrics,
    pub user_db: Box<dyn UserDb + Send + Sync>,
    pub started_at: SystemTime,
    pub started: Instant,
    policy: RwLock<(Arc<Policy>, u64, u64)>,
    reload_lock: tokio::sync::Mutex<()>,
    draining: AtomicBool,
    generation: AtomicU64,
}

impl std::fmt::Debug for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonState")
            .field("generation", &self.generation)
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
    pub fn new(
        config: DaemonConfig,
        policy: Policy,
        metrics: Metrics,
        user_db: Box<dyn UserDb + Send + Sync>,
    ) -> Self {
        metrics.set_policy(&policy);
        Self {
            config,
            metrics,
            user_db,
            started_at: SystemTime::now(),
            started: Instant::now(),
            policy: RwLock::new((Arc::new(policy), 1, unix_now())),
            reload_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(1),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// The policy generation and when it was loaded (Unix seconds).
    pub fn policy_generation(&self) -> (u64, u64) {
        let guard = match self.policy.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        (guard.1, guard.2)
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
                generation: self.policy_generation().0,
                policy: Arc::new(policy),
            }),
            Ok(policy) => {
                let policy = Arc::new(policy);
                let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                {
                    let mut guard = match self.policy.write() {
                        Ok(guard) => guard,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    *guard = (policy.clone(), generation, unix_now());
                }
                self.metrics.set_policy(&policy);
                self.metrics
                    .policy_reloads
                    .with_label_values(&["success"])
                    .inc();
                tracing::info!(generation, tenants = policy.tenants.len(), sources = ?policy.sources, "policy reloaded");
                Ok(Reloaded {
                    applied: true,
                    generation,
                    policy,
                })
            }
        }
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}
