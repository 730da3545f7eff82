//! The models the daemon serves, as the API reads them, and the operator's changes to that
//! list while it runs: loads with their progress, and unloads.
//!
//! The list is replaced whole (an `Arc` swap under a short lock), like the policy: a request
//! that already took a model's handle keeps it, so an unload never pulls a model from under a
//! request that found it; the device loop decides what becomes of such requests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::ModelSpec;
use crate::metrics::Metrics;
use crate::runner::arbiter::Retired;
use crate::runner::{Fleet, LoadProgress, ModelHandle};

/// Loads remembered after they end, for `accelctl models load` to read the outcome.
const RECENT_LOADS: usize = 32;

/// Loads waiting or running at once; more are refused (429) until some end.
pub const MAX_PENDING_LOADS: usize = 8;

/// A load an operator asked for.
#[derive(Debug)]
pub struct Load {
    spec: ModelSpec,
    progress: LoadProgress,
    started: Instant,
    /// `Ok(backend)` or why it failed, once it ended, with how long it took.
    outcome: Mutex<Option<(Result<String, String>, Duration)>>,
}

/// A load as the API shows it (`GET /v1/models/{name}/load`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadStatus {
    pub model: String,
    /// `queued`, `reading`, `starting`, `ready` or `failed`.
    pub state: String,
    /// Bytes of the model's files read, and in all (0 until they are listed).
    pub bytes_read: u64,
    pub bytes_total: u64,
    pub elapsed_ms: u64,
    /// Where it runs, once ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Load {
    pub fn status(&self) -> LoadStatus {
        let progress = self.progress.report();
        let outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let (state, elapsed, backend, error) = match &*outcome {
            None => (progress.phase, self.started.elapsed(), None, None),
            Some((Ok(backend), took)) => ("ready", *took, Some(backend.clone()), None),
            Some((Err(why), took)) => ("failed", *took, None, Some(why.clone())),
        };
        LoadStatus {
            model: self.spec.name.clone(),
            state: state.to_owned(),
            bytes_read: progress.bytes_read,
            bytes_total: progress.bytes_total,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            backend,
            error,
        }
    }

    fn is_done(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn finish(&self, outcome: Result<String, String>) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((outcome, self.started.elapsed()));
    }
}

/// Why a load or unload was refused before it began.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeRefused {
    #[error("model {0:?} is already served; unload it first (accelctl models unload {0})")]
    AlreadyServed(String),
    #[error(
        "model {0:?} is already being loaded; follow it with accelctl models load --follow {0}"
    )]
    AlreadyLoading(String),
    #[error("model {0:?} is not served")]
    NotServed(String),
    #[error("model {0:?} is being unloaded; load it again once the unload has answered")]
    Unloading(String),
    #[error(
        "{0} model loads are already waiting or running, the most at once; wait for one to end"
    )]
    TooManyLoads(usize),
    #[error("models cannot be loaded or unloaded on this daemon: {0}")]
    Unavailable(String),
    #[error("model {model:?} could not be unloaded: {why}")]
    Failed { model: String, why: String },
}

/// The served models and the changes in progress.
#[derive(Debug)]
pub struct Served {
    list: RwLock<Arc<Vec<ModelHandle>>>,
    fleet: Option<Arc<Fleet>>,
    loads: Mutex<VecDeque<Arc<Load>>>,
    /// Names whose unload has not answered yet: a model of that name may not be loaded until
    /// the old one's engine, worker, cgroup and metrics are gone.
    unloading: Mutex<std::collections::HashSet<String>>,
}

impl Served {
    /// Serves `models`; with a fleet, models can be loaded and unloaded too.
    pub fn new(models: Vec<ModelHandle>, fleet: Option<Arc<Fleet>>) -> Self {
        Self {
            list: RwLock::new(Arc::new(models)),
            fleet,
            loads: Mutex::new(VecDeque::new()),
            unloading: Mutex::default(),
        }
    }

    /// The fleet models are loaded on, when they can be.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// The models served now.
    pub fn list(&self) -> Arc<Vec<ModelHandle>> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The served model named `name`.
    pub fn get(&self, name: &str) -> Option<ModelHandle> {
        self.list().iter().find(|m| m.info.name == name).cloned()
    }

    fn edit(&self, change: impl FnOnce(&mut Vec<ModelHandle>)) {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let mut models = Vec::clone(&list);
        change(&mut models);
        *list = Arc::new(models);
    }

    /// The load of `name`, running or recently ended.
    pub fn load_status(&self, name: &str) -> Option<LoadStatus> {
        let loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
        loads
            .iter()
            .rev()
            .find(|l| l.spec.name == name)
            .map(|l| l.status())
    }

    /// Starts loading `spec` on a thread of its own; the model is served once it is placed.
    /// Refused if a model of that name is served or being loaded.
    pub fn start_load(
        self: &Arc<Self>,
        spec: ModelSpec,
        metrics: &Metrics,
    ) -> Result<Arc<Load>, ChangeRefused> {
        let fleet = match &self.fleet {
            Some(fleet) if fleet.can_place() => Arc::clone(fleet),
            Some(_) => {
                return Err(ChangeRefused::Unavailable(
                    "no user to run models' workers as (see the daemon log at start)".into(),
                ))
            }
            None => return Err(ChangeRefused::Unavailable("it has no device loops".into())),
        };
        let load = {
            let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
            if self.get(&spec.name).is_some() {
                return Err(ChangeRefused::AlreadyServed(spec.name));
            }
            if loads
                .iter()
                .any(|l| l.spec.name == spec.name && !l.is_done())
            {
                return Err(ChangeRefused::AlreadyLoading(spec.name));
            }
            if self
                .unloading
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&spec.name)
            {
                return Err(ChangeRefused::Unloading(spec.name));
            }
            let pending = loads.iter().filter(|l| !l.is_done()).count();
            if pending >= MAX_PENDING_LOADS {
                return Err(ChangeRefused::TooManyLoads(pending));
            }
            let load = Arc::new(Load {
                spec,
                progress: LoadProgress::default(),
                started: Instant::now(),
                outcome: Mutex::new(None),
            });
            loads.push_back(Arc::clone(&load));
            // Forget the oldest ended loads; running ones are few (one runs at a time).
            while loads.len() > RECENT_LOADS {
                match loads.iter().position(|l| l.is_done()) {
                    Some(i) => {
                        loads.remove(i);
                    }
                    None => break,
                }
            }
            load
        };
        let served = Arc::clone(self);
        let running = Arc::clone(&load);
        let metrics = metrics.clone();
        let loader = Arc::clone(&fleet);
        let queued = loader.on_loader(Box::new(move || {
                let name = running.spec.name.clone();
                // A panic in a model file's parser ends this load, not the daemon.
                let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    fleet.load(&running.spec, &running.progress, false)
                }));
                match loaded {
                    Ok(Ok(handle)) => {
                        tracing::info!(model = %name, backend = %handle.info.backend, elapsed = ?running.started.elapsed(), "model loaded at an operator's request");
                        metrics.model_loaded(&handle);
                        let backend = handle.info.backend.clone();
                        served.edit(|models| models.push(handle));
                        running.finish(Ok(backend));
                    }
                    Ok(Err(e)) => {
                        tracing::error!(model = %name, error = %e, "an operator's model load failed");
                        running.finish(Err(e.to_string()));
                    }
                    Err(_) => {
                        tracing::error!(model = %name, "loading the model panicked");
                        running.finish(Err(
                            "loading the model failed unexpectedly (see the daemon log)".into(),
                        ));
                    }
                }
        }));
        if let Err(why) = queued {
            load.finish(Err(why));
        }
        Ok(load)
    }

    /// Stops serving `name` at once (new requests get 404), lets its requests in flight finish
    /// for `grace`, then ends the rest and frees its engines. Returns what became of them.
    /// `forget` clears the model's metrics once its engines are gone.
    pub async fn unload(
        &self,
        name: &str,
        grace: Duration,
        forget: impl FnOnce(&ModelHandle),
    ) -> Result<Retired, ChangeRefused> {
        let Some(fleet) = self.fleet.clone() else {
            return Err(ChangeRefused::Unavailable("it has no device loops".into()));
        };
        let mut taken = None;
        {
            // Under the loads lock, so a load of this name cannot slip in between.
            let _loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
            self.edit(|models| {
                if let Some(i) = models.iter().position(|m| m.info.name == name) {
                    taken = Some(models.remove(i));
                }
            });
            if taken.is_some() {
                self.unloading
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_owned());
            }
        }
        let handle = taken.ok_or_else(|| ChangeRefused::NotServed(name.to_owned()))?;
        tracing::info!(model = %name, grace = ?grace, "unloading a model at an operator's request");
        let unloading = handle.clone();
        let retired = tokio::task::spawn_blocking(move || fleet.unload(&unloading, grace))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        forget(&handle);
        self.unloading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        match retired {
            Ok(retired) => {
                tracing::info!(model = %name, finished = retired.finished, cancelled = retired.cancelled, "model unloaded");
                Ok(retired)
            }
            Err(why) => Err(ChangeRefused::Failed {
                model: name.to_owned(),
                why,
            }),
        }
    }
}
