//! The models on this node while it runs: one loop per device, started when its first model
//! is placed, and models loaded onto and taken off those loops (`accelctl models load |
//! unload`) without stopping the others.
//!
//! Loading happens off the loops: files are read (the progress an operator sees), the engine is
//! built (in a worker process when engines are isolated), and only then is the finished model
//! handed to its device's loop, which places it between two steps. Unloading refuses new
//! requests at once, lets those in flight finish for a grace period, and the loop drops the
//! engine off its own thread, so the device's other models never wait on either.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::arbiter::{Arbiter, Control, Gate, Retired};
use super::{
    place, DeviceSchedule, ModelHandle, Placement, PreparedModel, StartError, UpWhileAlive, Workers,
};
use crate::backend::cuda::CudaOptions;
use crate::config::{
    BackendChoice, DaemonConfig, ModelSpec, DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME,
};
use crate::engine::ops::EngineOps;
use crate::metrics::SchedMetrics;
use crate::sched::{Buckets, Pricing, Scheduler};

/// Most files of a model folder read ahead for the progress count; a folder with more is
/// not a model, and loading it fails on its own terms.
pub const MAX_MODEL_FILES: usize = 4096;

/// Bytes read per call while reading a model's files ahead.
const READ_CHUNK: usize = 4 << 20;

/// A load's phases, as [`LoadProgress`] stores them.
const QUEUED: u8 = 0;
const READING: u8 = 1;
const STARTING: u8 = 2;

/// Where a load is, for `accelctl models load`'s progress bar.
#[derive(Debug, Default)]
pub struct LoadProgress {
    /// Bytes of the model's files read so far, and in all.
    read: AtomicU64,
    total: AtomicU64,
    /// [`QUEUED`], [`READING`] or [`STARTING`] (the engine).
    phase: std::sync::atomic::AtomicU8,
}

/// What [`LoadProgress`] says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressReport {
    pub phase: &'static str,
    pub bytes_read: u64,
    pub bytes_total: u64,
}

impl LoadProgress {
    pub fn report(&self) -> ProgressReport {
        ProgressReport {
            phase: match self.phase.load(Ordering::Relaxed) {
                QUEUED => "queued",
                READING => "reading",
                _ => "starting",
            },
            bytes_read: self.read.load(Ordering::Relaxed),
            bytes_total: self.total.load(Ordering::Relaxed),
        }
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::Relaxed);
    }
}

/// Reads a model's files through once, counting bytes into `progress`: the engine then maps
/// them from the page cache, and the operator sees how far the slow part is. Only regular
/// files are read, each up to the size it had when listed, so a device node or a growing file
/// cannot make this endless.
fn read_ahead(path: &Path, progress: &LoadProgress) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    let files: Vec<(std::path::PathBuf, u64)> = if meta.is_file() {
        vec![(path.to_owned(), meta.len())]
    } else if meta.is_dir() {
        // What the Hugging Face loader reads: `model.safetensors` if there is one, else the
        // shards, and the JSON files; not the other formats a model folder often carries.
        let single = path.join("model.safetensors").is_file();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path)?.take(MAX_MODEL_FILES) {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let wanted = name.ends_with(".json")
                || (name.ends_with(".safetensors") && (!single || name == "model.safetensors"));
            if !wanted {
                continue;
            }
            // Hugging Face caches link files to blobs: followed, and read if regular.
            match std::fs::metadata(entry.path()) {
                Ok(m) if m.is_file() => files.push((entry.path(), m.len())),
                _ => {}
            }
        }
        files
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is neither a file nor a folder; give a .gguf file or a Hugging Face model folder",
                path.display()
            ),
        ));
    };
    progress
        .total
        .store(files.iter().map(|(_, n)| n).sum(), Ordering::Relaxed);
    let mut buffer = vec![0u8; READ_CHUNK];
    for (file, size) in files {
        // Checked again once open (not blocking, regular files only): a FIFO swapped in since
        // it was listed cannot hang the load. Not recorded: the load proper opens it again.
        let mut reader = crate::model::files::open(&file)?.take(size);
        loop {
            let n = reader.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            progress.read.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Work for the loader thread.
pub type LoaderJob = Box<dyn FnOnce() + Send>;

/// A device's running loop, as the placing side holds it.
#[derive(Clone)]
struct DeviceLoop {
    jobs: crossbeam_channel::Sender<super::Submission>,
    control: crossbeam_channel::Sender<Control<Box<dyn EngineOps>>>,
    gate: Arc<Gate>,
    schedule: Arc<Mutex<DeviceSchedule>>,
    up: Arc<AtomicBool>,
}

/// Why a model could not be taken off.
#[derive(Debug, thiserror::Error)]
pub enum UnloadError {
    #[error("the device loop of model {0:?} has stopped; see the daemon log")]
    Stopped(String),
}

/// Every device loop, and what placing a model on one takes.
pub struct Fleet {
    config: DaemonConfig,
    devices: crate::devices::DeviceReport,
    metrics: Option<SchedMetrics>,
    workers: Option<Workers>,
    renderer: Option<crate::worker::WorkerIdentity>,
    cuda_options: CudaOptions,
    /// Tenants with workers of their own in the policy in force (each model placed from now
    /// on gets theirs): name, limits, the models they may use.
    dedicated: Mutex<Vec<Dedicated>>,
    /// Tenants' token buckets span devices, on one clock.
    clock: (Buckets, Instant),
    loops: Mutex<BTreeMap<String, DeviceLoop>>,
    /// One load at a time: each reads gigabytes and builds an engine.
    loading: Mutex<()>,
    /// The thread operators' loads run on, started with the first. It lives as long as the
    /// daemon because a worker's parent-death signal follows the *thread* that started it: a
    /// worker started from a short-lived thread would be killed when that thread ends.
    loader: Mutex<Option<crossbeam_channel::Sender<LoaderJob>>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Fleet")
            .field("devices", &loops.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A tenant with workers of its own: its name, limits, and the models it may use.
pub(crate) type Dedicated = (String, crate::cgroup::TenantLimits, Vec<String>);

/// The tenants `policy` gives workers of their own (`isolation: dedicated`).
fn dedicated_tenants(policy: &crate::policy::Policy) -> Vec<Dedicated> {
    policy
        .tenants
        .iter()
        .filter(|t| t.isolation == crate::policy::TenantIsolation::Dedicated)
        .map(|t| {
            (
                t.name.clone(),
                crate::cgroup::TenantLimits::of(t),
                t.models.clone(),
            )
        })
        .collect()
}

/// The block of ids workers take one each from, when there is one (see
/// [`crate::worker::uids`]); else every worker runs as `identity`, which the log says.
fn worker_ids(
    config: &DaemonConfig,
    identity: &crate::worker::WorkerIdentity,
) -> Option<Arc<crate::worker::uids::WorkerIds>> {
    if !nix::unistd::getuid().is_root() {
        if config.worker_uids.is_some() {
            tracing::warn!(
                "acceld is not root: worker_uids is ignored, workers run as its own user"
            );
        }
        return None;
    }
    match crate::worker::uids::IdBlock::choose(config.worker_uids, &identity.user, identity.uid) {
        Ok(Some(block)) => {
            tracing::info!(
                first_uid = block.first_uid,
                first_gid = block.first_gid,
                count = block.count,
                "each worker runs as a uid and gid of its own"
            );
            Some(crate::worker::uids::WorkerIds::new(block))
        }
        Ok(None) => {
            tracing::info!(user = %identity.user,
                "every worker runs as one user; give each its own with worker_uids, or a subordinate range of that user in /etc/subuid and /etc/subgid");
            None
        }
        Err(why) => {
            tracing::warn!(user = %identity.user, reason = %why, "every worker runs as one user");
            None
        }
    }
}

impl Fleet {
    /// Prepares to place models, then loads the configured ones in order (see
    /// [`super::start_models`]); returns their handles.
    pub fn start(
        config: &DaemonConfig,
        devices: &crate::devices::DeviceReport,
        metrics: Option<&SchedMetrics>,
        sandbox: Option<Arc<crate::worker::Sandbox>>,
        policy: Option<&crate::policy::Policy>,
    ) -> (Arc<Fleet>, Vec<ModelHandle>) {
        let dedicated = policy.map(dedicated_tenants).unwrap_or_default();
        if config.isolation == crate::config::Isolation::Off && !dedicated.is_empty() {
            tracing::warn!(tenants = ?dedicated.iter().map(|d| &d.0).collect::<Vec<_>>(), "tenants ask for dedicated workers, but isolation is off: they share acceld's engines");
        }
        // Workers and chat-template renderers run as this user.
        let identity = crate::worker::WorkerIdentity::resolve(config.worker_user.as_deref());
        let workers = match (config.isolation, &identity) {
            (crate::config::Isolation::Off, _) => None,
            (crate::config::Isolation::Shared, Ok(identity)) => Some(Workers {
                identity: identity.clone(),
                ids: worker_ids(config, identity),
                kv_disk_root: config.kv_disk_root(),
                archs: devices
                    .devices
                    .iter()
                    .map(|d| {
                        let arch = format!("sm_{}", d.compute_capability.replace('.', ""));
                        (d.index as usize, arch)
                    })
                    .collect(),
                kernel_cache: config.kernel_cache.clone(),
                sandbox,
                dedicated: dedicated.clone(),
            }),
            (crate::config::Isolation::Shared, Err(why)) => {
                tracing::error!(reason = %why, "cannot choose the workers' user; no model is served");
                None
            }
        };
        // Chat templates come with model files: they render in processes of their own.
        let renderer = match identity {
            Ok(identity) => Some(identity),
            Err(why) => {
                tracing::warn!(reason = %why, "chat templates render inside acceld: no user to run renderers as");
                None
            }
        };
        let fleet = Arc::new(Fleet {
            config: config.clone(),
            devices: devices.clone(),
            metrics: metrics.cloned(),
            workers,
            renderer,
            cuda_options: CudaOptions {
                kernel_cache: Some(config.kernel_cache.clone()),
                memory_budget: None,
            },
            dedicated: Mutex::new(dedicated),
            clock: (Buckets::default(), Instant::now()),
            loops: Mutex::new(BTreeMap::new()),
            loading: Mutex::new(()),
            loader: Mutex::new(None),
        });
        if !fleet.can_place() {
            return (fleet, Vec::new());
        }
        let mut handles = Vec::new();
        for spec in &config.models {
            let started = Instant::now();
            match fleet.load(spec, &LoadProgress::default(), true) {
                Ok(handle) => {
                    tracing::info!(model = %handle.info.name, backend = %handle.info.backend, elapsed = ?started.elapsed(), "model ready");
                    handles.push(handle);
                }
                Err(e) => {
                    tracing::error!(model = %spec.name, error = %e, "model not started; the daemon serves the others")
                }
            }
        }
        (fleet, handles)
    }

    /// Takes a new policy's dedicated tenants for the models placed from now on; returns, for
    /// each of `served` whose tenants' isolation the policy changes, what changes once it is
    /// loaded again (a placed model keeps the workers it has: moving a tenant's sequences
    /// between engines would cut its requests short).
    pub fn take_policy(
        &self,
        policy: &crate::policy::Policy,
        served: &[ModelHandle],
    ) -> Vec<String> {
        let now = dedicated_tenants(policy);
        *self.dedicated.lock().unwrap_or_else(|p| p.into_inner()) = now.clone();
        if self.workers.is_none() {
            return Vec::new();
        }
        let mut pending = Vec::new();
        for handle in served {
            let name = &handle.info.name;
            let wanted: std::collections::BTreeSet<&str> = now
                .iter()
                .filter(|(_, _, models)| models.iter().any(|m| m == "*" || m == name))
                .map(|(tenant, _, _)| tenant.as_str())
                .collect();
            let has = handle.dedicated_tenants();
            let gaining: Vec<&str> = wanted
                .iter()
                .filter(|t| !has.contains(*t))
                .copied()
                .collect();
            let losing: Vec<&str> = has
                .iter()
                .filter(|t| !wanted.contains(*t))
                .copied()
                .collect();
            if gaining.is_empty() && losing.is_empty() {
                continue;
            }
            let mut change = format!("model {name:?}:");
            if !gaining.is_empty() {
                change.push_str(&format!(" {gaining:?} get workers of their own"));
            }
            if !losing.is_empty() {
                change.push_str(&format!(
                    "{} {losing:?} move to the shared workers",
                    if gaining.is_empty() { "" } else { ";" }
                ));
            }
            change.push_str(&format!(
                " once it is loaded again (accelctl models unload {name}, then load it)"
            ));
            pending.push(change);
        }
        pending
    }

    /// Runs `work` on the loader thread (after the loads queued before it).
    pub fn on_loader(&self, work: LoaderJob) -> Result<(), String> {
        let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        if loader.is_none() {
            let (send, jobs) = crossbeam_channel::unbounded::<LoaderJob>();
            std::thread::Builder::new()
                .name("model-loader".into())
                .spawn(move || {
                    // A load competes with serving for the cores: it runs at the compute
                    // threads' priority (not lower: the workers and loops it starts inherit
                    // it, and a worker that dropped its privileges cannot raise it again), and
                    // its parallel work (building the engine, measuring the preemption
                    // crossover) on one thread of its own, not on the compute pool the device
                    // loops step on.
                    let _ = crate::sys::lower_thread_priority(crate::sys::COMPUTE_NICE);
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .thread_name(|_| "model-loader-compute".into())
                        .start_handler(|_| {
                            let _ = crate::sys::lower_thread_priority(crate::sys::COMPUTE_NICE);
                        })
                        .build();
                    for job in jobs {
                        match &pool {
                            Ok(pool) => pool.install(job),
                            Err(_) => job(),
                        }
                    }
                })
                .map_err(|e| format!("cannot start the model loader thread: {e}"))?;
            *loader = Some(send);
        }
        loader
            .as_ref()
            .ok_or_else(|| "no loader thread".to_owned())?
            .send(work)
            .map_err(|_| "the model loader thread has stopped".to_owned())
    }

    /// Whether models can be placed (engines in workers need a user to run them as).
    pub fn can_place(&self) -> bool {
        self.config.isolation == crate::config::Isolation::Off || self.workers.is_some()
    }

    /// Loads `spec`'s model and places it on its device's loop, reporting into `progress`.
    /// With `at_start`, a missing default model is replaced by the generated one, as the
    /// daemon's start does; an operator's load of a missing file fails instead.
    pub fn load(
        &self,
        spec: &ModelSpec,
        progress: &LoadProgress,
        at_start: bool,
    ) -> Result<ModelHandle, StartError> {
        let _one_at_a_time = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if !self.can_place() {
            return Err(StartError::Worker(
                "no user to run the model's worker as (worker_user); see the daemon log".into(),
            ));
        }
        let path = self.config.model_path(spec);
        let choice = spec.backend.unwrap_or(self.config.backend);
        let placement = Placement::resolve(choice, &self.devices, &self.cuda_options)
            .map_err(|why| StartError::Placement(format!("the model's GPU ({choice}) is not available: {why}; set backend: cpu or auto for this model")))?;
        if choice == BackendChoice::Auto {
            match (&placement, &self.devices.reason) {
                (Placement::Cpu, Some(reason)) => {
                    tracing::info!(model = %spec.name, %reason, "no GPU; using the CPU backend")
                }
                (Placement::Cuda { ordinal, .. }, _) => {
                    tracing::info!(model = %spec.name, "backend auto: using cuda:{ordinal}")
                }
                (Placement::Cpu, None) => {}
            }
        }
        let is_default =
            spec.name == DEFAULT_MODEL_NAME && spec.path == Path::new(DEFAULT_MODEL_FILE);
        tracing::info!(model = %spec.name, path = %path.display(), "loading model");
        // At start nobody watches the progress, and reading every model through first would
        // only add a pass over files the load maps anyway.
        progress.set_phase(READING);
        let read = if at_start {
            Ok(())
        } else {
            read_ahead(&path, progress)
        };
        progress.set_phase(STARTING);
        let (loaded, opened) = crate::model::files::record(|| {
            read.map_err(|source| crate::model::ModelError::Io {
                path: path.clone(),
                source,
            })
            .and_then(|()| crate::model::load(&path))
        });
        let (name, model, source) = match loaded {
            Ok(model) => (spec.name.as_str(), model, Some((path.as_path(), &opened))),
            Err(e) if at_start && is_default && !path.exists() => {
                tracing::warn!(
                    error = %e,
                    "the default model is not installed (run `make model`); serving {} instead: random weights, for testing the service only",
                    crate::model::generated::NAME
                );
                let model = crate::model::generated::tiny_random()?;
                (crate::model::generated::NAME, model, None)
            }
            Err(e) => return Err(e.into()),
        };
        let mut spec = spec.clone();
        if spec.disk_blocks > 0 {
            spec.disk_dir = Some(self.config.kv_disk_dir_of(name));
        }
        // Dedicated workers as the policy in force has them now, not as it was at start.
        let dedicated = self
            .dedicated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let workers = self.workers.as_ref().map(|w| Workers {
            dedicated: dedicated.clone(),
            ..w.clone()
        });
        let placed = place(
            name,
            model,
            source,
            &spec,
            &placement,
            workers.as_ref(),
            self.renderer.as_ref(),
        )?;
        let handle = self.place_on(placed)?;
        // A reload while it loaded did not see it among the served models.
        if workers.is_some()
            && *self.dedicated.lock().unwrap_or_else(|p| p.into_inner()) != dedicated
        {
            tracing::warn!(model = %handle.info.name,
                "the policy was reloaded while this model loaded: its workers follow the policy from before; load it again for the new one");
        }
        Ok(handle)
    }

    /// Hands a built model to its device's loop (starting the loop for a device's first
    /// model) and makes its handle.
    fn place_on(&self, (device, p): (String, PreparedModel)) -> Result<ModelHandle, StartError> {
        // Not held while the loop answers (it may be mid-step): unloads elsewhere go on.
        let device_loop = {
            let mut loops = self.loops.lock().unwrap_or_else(|e| e.into_inner());
            // A loop that stopped (see the log) is replaced by a new one for the new model.
            let alive = loops
                .get(&device)
                .is_some_and(|l| l.up.load(Ordering::SeqCst));
            if !alive {
                let spawned = self.spawn_loop(&device).map_err(StartError::Thread)?;
                loops.insert(device.clone(), spawned);
            }
            match loops.get(&device) {
                Some(l) => l.clone(),
                None => return Err(StartError::Placement(format!("no loop for {device}"))),
            }
        };
        // The dedicated tenants' engines follow the shared one, in the order of the reply.
        let mut slots = vec![p.slot];
        let mut dedicated_names = Vec::new();
        let mut refused = Vec::new();
        for (tenant, slot) in p.dedicated {
            match slot {
                Ok(slot) => {
                    dedicated_names.push(tenant);
                    slots.push(slot);
                }
                Err(why) => refused.push((tenant, why)),
            }
        }
        let usage = Arc::clone(&slots[0].usage);
        let params = slots[0].params.clone();
        let workers: Vec<Arc<crate::worker::WorkerStatus>> = slots
            .iter()
            .filter_map(|s| s.usage.worker.clone())
            .collect();
        let dedicated_usage: Vec<Arc<super::Usage>> =
            slots[1..].iter().map(|s| Arc::clone(&s.usage)).collect();
        let (reply, placed) = std::sync::mpsc::sync_channel(1);
        let sent = device_loop.control.send(Control::Place { slots, reply });
        let indices = sent.ok().and_then(|()| placed.recv().ok()).ok_or_else(|| {
            StartError::Placement(format!("the {device} loop has stopped; see the daemon log"))
        })?;
        let mut dedicated: std::collections::HashMap<String, Result<(usize, u64), String>> =
            dedicated_names
                .into_iter()
                .zip(indices.iter().skip(1).copied().map(Ok))
                .collect();
        dedicated.extend(refused.into_iter().map(|(t, why)| (t, Err(why))));
        Ok(ModelHandle {
            guides: Arc::new(crate::guide::Guides::new(
                Arc::clone(&p.tokenizer),
                p.info.vocab_size,
            )),
            info: p.info,
            tokenizer: p.tokenizer,
            template: p.template.map(Arc::new),
            jobs: device_loop.jobs.clone(),
            control: device_loop.control.clone(),
            index: indices[0].0,
            generation: indices[0].1,
            params,
            gate: Arc::clone(&device_loop.gate),
            max_queued: self.config.scheduler.max_queued_per_tenant,
            rejections: self.metrics.as_ref().map(|m| m.rejections.clone()),
            usage,
            dedicated_usage,
            schedule: Arc::clone(&device_loop.schedule),
            up: Arc::clone(&device_loop.up),
            dedicated,
            workers,
        })
    }

    /// Starts an empty loop for `device`.
    fn spawn_loop(&self, device: &str) -> std::io::Result<DeviceLoop> {
        let config = &self.config;
        let sched = Scheduler::new(
            config.scheduler.policy,
            Pricing {
                prefill: config.scheduler.prefill_price,
                decode: config.scheduler.decode_price,
            },
        )
        .with_buckets(Arc::clone(&self.clock.0));
        let (jobs, inbox) = crossbeam_channel::unbounded();
        let (control, orders) = crossbeam_channel::unbounded();
        let gate = Arc::new(Gate::default());
        let up = Arc::new(AtomicBool::new(true));
        let schedule = Arc::new(Mutex::new(DeviceSchedule {
            device: device.to_owned(),
            policy: config.scheduler.policy.as_str().to_owned(),
            models: Vec::new(),
            tenants: Vec::new(),
            memory: Vec::new(),
        }));
        let arbiter: Arbiter<Box<dyn EngineOps>> = Arbiter::new(
            device.to_owned(),
            sched,
            Vec::new(),
            inbox,
            Arc::clone(&gate),
            self.metrics.clone(),
        )
        .with_schedule(Arc::clone(&schedule))
        .with_control(orders)
        .with_epoch(self.clock.1);
        let alive = Arc::clone(&up);
        std::thread::Builder::new()
            .name(format!("device-{device}"))
            .spawn(move || {
                let _up = UpWhileAlive(alive);
                if let Err(e) = crate::sys::lower_thread_priority(crate::sys::COMPUTE_NICE) {
                    tracing::warn!(error = %e, "cannot lower the device loop's CPU priority");
                }
                arbiter.run()
            })?;
        tracing::info!(%device, policy = config.scheduler.policy.as_str(), "device scheduler started");
        Ok(DeviceLoop {
            jobs,
            control,
            gate,
            schedule,
            up,
        })
    }

    /// Takes `handle`'s model (and its dedicated tenants' engines) off its device: requests
    /// already on it may finish for `grace`. Blocks until its engines are gone.
    pub fn unload(&self, handle: &ModelHandle, grace: Duration) -> Result<Retired, UnloadError> {
        // The handle's own loop: if it stopped and a new one took its device, the new one's
        // models are not this one's.
        let stopped = || UnloadError::Stopped(handle.info.name.clone());
        let mut models = vec![(handle.index, handle.generation)];
        models.extend(
            handle
                .dedicated
                .values()
                .filter_map(|d| d.as_ref().ok().copied()),
        );
        let (reply, retired) = std::sync::mpsc::sync_channel(1);
        handle
            .control
            .send(Control::Retire {
                models,
                grace,
                reply,
            })
            .map_err(|_| stopped())?;
        retired.recv().map_err(|_| stopped())
    }
}
