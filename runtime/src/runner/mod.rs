//! Served models as the API sees them: [`ModelHandle`] (submit a request, read its events),
//! and the start-up that loads every configured model and places it on a device.
//!
//! Every model placed on a device is stepped by that device's loop ([`arbiter`]), which
//! runs the device's scheduler (`sched`): tenant shares, classes and quotas hold across all
//! models on the device, KV blocks are committed as sequences grow, and sequences are
//! preempted (swapped or recomputed) when blocks run out. The API never sees the loop; a
//! worker process can later take its thread's place behind the same handle.

pub mod arbiter;
pub mod detok;
pub mod fleet;
pub(crate) mod tiers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::memory::Ledger;
use crate::backend::cuda::{CudaBackend, CudaOptions};
use crate::backend::Backend;
use crate::chat::ChatTemplate;
use crate::config::{BackendChoice, DaemonConfig, ModelSpec};
use crate::engine::ops::EngineOps;
use crate::engine::sampling::SamplingParams;
use crate::engine::Engine;
use crate::metrics::SchedMetrics;
use crate::model::LoadedModel;
use crate::sched::{ModelParams, NewSeq, Reject, TenantParams};
use crate::tokenizer::Tokenizer;

use self::arbiter::{Gate, Slot, Submission};
pub use self::fleet::{Fleet, LoadProgress};

/// What clients can know about a served model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    /// `gguf`, `hf` or `generated`.
    pub format: String,
    pub source: String,
    pub backend: String,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Unix time it was loaded.
    pub created: u64,
    /// Sampling for requests that leave these fields out.
    pub sampling_defaults: crate::engine::sampling::SamplingDefaults,
}

/// A device's scheduler as operators see it (`GET /v1/scheduler`), refreshed by its loop.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DeviceSchedule {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub policy: String,
    pub models: Vec<String>,
    pub tenants: Vec<crate::sched::TenantReport>,
    /// Each model's KV memory by tier.
    #[serde(default)]
    pub memory: Vec<ModelMemory>,
}

/// One model's KV blocks on a device, by tier (`device`, `host`, `disk`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ModelMemory {
    pub model: String,
    /// Bytes one block holds (every layer's keys and values).
    pub block_bytes: u64,
    pub tiers: Vec<TierBlocks>,
}

/// A tier's blocks: how many there are and how many sequences hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct TierBlocks {
    pub tier: String,
    pub capacity: usize,
    pub used: usize,
}

/// A generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The tenant its KV cache is accounted to.
    pub tenant: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// The tenant's weight, class and quotas from the policy in force.
    pub limits: TenantParams,
    /// The grammar its output must follow, compiled; `None` for free text.
    pub guide: Option<crate::guide::Guide>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What a request sees, in order: tokens, then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        /// Text to append (may be empty while a character or stop string is pending).
        text: String,
        token: u32,
        logprob: f32,
        /// Most likely alternatives with their log-probabilities, if asked for.
        top: Vec<(u32, f32)>,
    },
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Of the prompt, tokens held from the prefix cache rather than computed.
        cached_tokens: usize,
    },
    Error {
        message: String,
        cause: Failure,
    },
}

/// Whose a failed request's failure is, for its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Serving it went wrong: a retry may succeed (503).
    Server,
    /// It cannot be served as asked (it outgrows its tenant's memory alone, its grammar
    /// allows nothing, the policy no longer admits it): a retry fails alike (400).
    Request,
    /// An operator cancelled it (410): not to be retried.
    Cancelled,
}

/// Why a request could not be submitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt has {prompt} tokens and max_tokens is {max_tokens}: {total} tokens exceed the model's context of {limit}; shorten the prompt or lower max_tokens")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        total: usize,
        limit: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(transparent)]
    Unschedulable(#[from] Reject),
    #[error("token id {token} is outside the model's vocabulary of {vocab}")]
    BadToken { token: u32, vocab: usize },
    #[error("tenant {tenant:?} already has {queued} requests waiting on this device, its limit (scheduler.max_queued_per_tenant); retry after {retry_after_secs} s")]
    QueueFull {
        tenant: String,
        queued: usize,
        retry_after_secs: u64,
    },
    #[error("the model's runner has stopped; see the daemon log")]
    Stopped,
    #[error("your tenant's dedicated worker for this model is not running: {0}")]
    Dedicated(String),
}

impl SubmitError {
    /// A short reason for the rejections metric.
    pub fn reason(&self) -> &'static str {
        match self {
            SubmitError::TooLong { .. } => "context_length",
            SubmitError::EmptyPrompt => "empty_prompt",
            SubmitError::Unschedulable(Reject::TooBigForModel { .. }) => "kv_cache_size",
            SubmitError::Unschedulable(Reject::OverKvQuota { .. }) => "kv_blocks_quota",
            SubmitError::Unschedulable(Reject::OverTokenRate { .. }) => "tokens_per_minute",
            SubmitError::Unschedulable(_) => "unschedulable",
            SubmitError::BadToken { .. } => "bad_token",
            SubmitError::QueueFull { .. } => "queue_full",
            SubmitError::Stopped => "stopped",
            SubmitError::Dedicated(_) => "dedicated_worker_down",
        }
    }
}

/// A served model: its tokenizer and template for the API, and the channel to its loop.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    pub info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Option<Arc<ChatTemplate>>,
    /// Compiles requests' grammars against this model's vocabulary.
    guides: Arc<crate::guide::Guides>,
    jobs: crossbeam_channel::Sender<Submission>,
    /// Its device loop's changes of models (unloading it).
    control: crossbeam_channel::Sender<arbiter::Control<Box<dyn EngineOps>>>,
    /// Its index in the device's scheduler and the generation of that placement, and what
    /// the scheduler knows of it.
    index: usize,
    generation: u64,
    params: ModelParams,
    gate: Arc<Gate>,
    max_queued: usize,
    rejections: Option<prometheus::IntCounterVec>,
    usage: Arc<Usage>,
    /// What the dedicated tenants' engines for this model hold.
    dedicated_usage: Vec<Arc<Usage>>,
    schedule: Arc<Mutex<DeviceSchedule>>,
    /// False once the device's loop has ended (it survives panics; this is for anything else).
    up: Arc<std::sync::atomic::AtomicBool>,
    /// Tenants with workers of their own: their index in the device's scheduler, or why
    /// their worker could not start.
    dedicated: HashMap<String, Result<(usize, u64), String>>,
    /// Every worker process serving this model (shared first).
    workers: Vec<Arc<crate::worker::WorkerStatus>>,
}

/// Marks a device's models down when its loop ends, however it ends.
struct UpWhileAlive(Arc<std::sync::atomic::AtomicBool>);

impl Drop for UpWhileAlive {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What a model holds, for the metrics: KV-cache bytes per tenant (updated by the runner
/// after every step) and, on a GPU, the backend's memory ledger.
#[derive(Debug, Default)]
pub struct Usage {
    kv_by_tenant: Mutex<HashMap<String, u64>>,
    ledger: Option<Arc<Ledger>>,
    worker: Option<Arc<crate::worker::WorkerStatus>>,
}

impl Usage {
    fn new(ledger: Option<Arc<Ledger>>, worker: Option<Arc<crate::worker::WorkerStatus>>) -> Self {
        Self {
            kv_by_tenant: Mutex::default(),
            ledger,
            worker,
        }
    }

    /// KV-cache bytes held by each tenant's sequences.
    pub fn kv_by_tenant(&self) -> HashMap<String, u64> {
        self.kv_by_tenant
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Device and page-locked bytes by use, for a model on a GPU.
    pub fn device_memory(&self) -> Option<Vec<(&'static str, u64)>> {
        self.ledger.as_ref().map(|l| l.by_use())
    }
}

/// Why a model could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("chat template of {model}: {source}")]
    Template {
        model: String,
        #[source]
        source: crate::chat::TemplateError,
    },
    #[error("cannot start the runner thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot start the model's worker process: {0}")]
    Worker(String),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Placement(String),
}

/// Where a model runs, resolved from the config and the GPUs found.
#[derive(Debug, Clone)]
pub enum Placement {
    Cpu,
    Cuda {
        ordinal: usize,
        options: CudaOptions,
        /// `auto`: if the GPU cannot be set up, serve on the CPU rather than not at all.
        cpu_fallback: bool,
    },
}

impl Placement {
    /// Resolves a model's backend choice against the devices found; `Err` says why a
    /// requested GPU cannot be used (the model is then not started).
    pub fn resolve(
        choice: BackendChoice,
        devices: &crate::devices::DeviceReport,
        options: &CudaOptions,
    ) -> Result<Self, String> {
        let cuda = |ordinal: u32| Placement::Cuda {
            ordinal: ordinal as usize,
            options: options.clone(),
            cpu_fallback: choice == BackendChoice::Auto,
        };
        match choice {
            BackendChoice::Cpu => Ok(Placement::Cpu),
            BackendChoice::Auto if devices.devices.is_empty() => Ok(Placement::Cpu),
            BackendChoice::Auto => Ok(cuda(devices.devices[0].index)),
            BackendChoice::Cuda(n) => {
                if devices.devices.iter().any(|d| d.index == n) {
                    Ok(cuda(n))
                } else {
                    Err(devices.reason.clone().unwrap_or_else(|| {
                        format!(
                            "there is no GPU {n}; this node has cuda:0 to cuda:{}",
                            devices.devices.len().saturating_sub(1)
                        )
                    }))
                }
            }
        }
    }
}

impl ModelHandle {
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The tenants this model was placed with workers of their own for (those whose worker
    /// could not start included).
    pub fn dedicated_tenants(&self) -> std::collections::BTreeSet<&str> {
        self.dedicated.keys().map(String::as_str).collect()
    }

    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// KV-cache bytes each tenant's sequences of this model hold, in the shared engine and in
    /// the dedicated tenants' own.
    pub fn kv_by_tenant(&self) -> HashMap<String, u64> {
        let mut held = self.usage.kv_by_tenant();
        for usage in &self.dedicated_usage {
            for (tenant, bytes) in usage.kv_by_tenant() {
                *held.entry(tenant).or_default() += bytes;
            }
        }
        held
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_deref()
    }

    /// This model's grammar compiler (constrained decoding).
    pub fn guides(&self) -> &Arc<crate::guide::Guides> {
        &self.guides
    }

    /// The worker processes serving this model, when engines run in workers.
    pub fn workers(&self) -> &[Arc<crate::worker::WorkerStatus>] {
        &self.workers
    }

    /// Whether the model's device loop is running.
    pub fn is_up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The latest state of the scheduler of the device this model is on.
    pub fn schedule(&self) -> DeviceSchedule {
        self.schedule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Queues a request with its device's scheduler; its events arrive on the returned
    /// receiver. Dropping the receiver cancels the request and frees its blocks.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        // Only the tenant is kept for the metric: the prompt is not copied.
        let tenant = self.rejections.as_ref().map(|_| request.tenant.clone());
        let result = self.try_submit(request);
        if let (Err(e), Some(rejections), Some(tenant)) = (&result, &self.rejections, tenant) {
            rejections
                .with_label_values(&[tenant.as_str(), self.info.name.as_str(), e.reason()])
                .inc();
        }
        result
    }

    fn try_submit(
        &self,
        request: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let limit = self.info.context_length;
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if let Some(&token) = request
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.info.vocab_size)
        {
            return Err(SubmitError::BadToken {
                token,
                vocab: self.info.vocab_size,
            });
        }
        let total = request.prompt.len().saturating_add(request.max_tokens);
        if total > limit {
            return Err(SubmitError::TooLong {
                prompt: request.prompt.len(),
                max_tokens: request.max_tokens,
                total,
                limit,
            });
        }
        // A tenant with workers of its own is served only by them.
        let (index, generation) = match self.dedicated.get(&request.tenant) {
            Some(Ok(placed)) => *placed,
            Some(Err(why)) => return Err(SubmitError::Dedicated(why.clone())),
            None => (self.index, self.generation),
        };
        crate::sched::check(
            &self.params,
            &NewSeq {
                key: 0,
                tenant: request.tenant.clone(),
                params: request.limits.clone(),
                model: index,
                prompt_len: request.prompt.len(),
                max_tokens: request.max_tokens,
            },
        )?;
        let queue = arbiter::queue_key(&request);
        self.gate
            .enter(&queue, self.max_queued)
            .map_err(|(queued, retry_after)| SubmitError::QueueFull {
                tenant: request.tenant.clone(),
                queued,
                retry_after_secs: retry_after.clamp(1.0, 3600.0).ceil() as u64,
            })?;
        let (events, receiver) = mpsc::unbounded_channel();
        let sent = self.jobs.send(Submission {
            model: index,
            generation,
            request,
            events,
            submitted: Instant::now(),
        });
        if sent.is_err() {
            self.gate.leave(&queue);
            return Err(SubmitError::Stopped);
        }
        Ok(receiver)
    }
}

/// A model ready to be placed on its device's loop.
struct Prepared<E: EngineOps> {
    slot: Slot<E>,
    /// Engines of tenants with workers of their own (`isolation: dedicated`), or why theirs
    /// could not start.
    dedicated: Vec<(String, Result<Slot<E>, String>)>,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    /// Not shared yet: placing may still move its rendering into renderer processes.
    template: Option<ChatTemplate>,
}

/// Builds a model's engine (with its swap space) on `backend`, in this process.
fn prepare<B: Backend + 'static>(
    name: &str,
    model: LoadedModel,
    spec: &ModelSpec,
    backend: B,
    label: String,
    ledger: Option<Arc<Ledger>>,
) -> Result<PreparedModel, StartError> {
    let block_size = crate::kv::DEFAULT_BLOCK_SIZE;
    let mut engine = Engine::new(
        backend,
        model.config.clone(),
        &model.weights,
        spec.kv_blocks,
        block_size,
    )?;
    let c = &model.config;
    let swap_min_tokens = arbiter::preemption_crossover(
        &mut engine,
        spec,
        block_size,
        c.vocab_size,
        c.max_position_embeddings,
    );
    let disk_swap_min_tokens = tiers::enable_disk_tier(
        &mut engine,
        spec,
        block_size,
        c.vocab_size,
        c.max_position_embeddings,
    );
    finish_prepare(
        name,
        model,
        spec,
        Box::new(engine),
        Crossovers {
            swap_min_tokens,
            disk_swap_min_tokens,
        },
        label,
        Usage::new(ledger, None),
    )
}

/// The measured lengths past which a preempted sequence is swapped rather than recomputed,
/// per tier (`usize::MAX`: never).
#[derive(Debug, Clone, Copy)]
struct Crossovers {
    swap_min_tokens: usize,
    disk_swap_min_tokens: usize,
}

/// A model whose engine runs in a worker process; the supervisor keeps its tokenizer and
/// template.
fn prepare_in_worker(
    name: &str,
    model: LoadedModel,
    spec: &ModelSpec,
    worker: (crate::worker::RemoteEngine, crate::worker::WorkerReady),
    label: String,
) -> Result<PreparedModel, StartError> {
    let (engine, ready) = worker;
    let usage = Usage::new(None, Some(engine.status()));
    finish_prepare(
        name,
        model,
        spec,
        Box::new(engine),
        Crossovers {
            swap_min_tokens: ready.swap_min_tokens(),
            disk_swap_min_tokens: ready.disk_swap_min_tokens(),
        },
        label,
        usage,
    )
}

/// A dedicated tenant's engine for the model of `shared`: a worker of its own in the tenant's
/// cgroup, under its limits. A memory limit below what the model needs there (its files and
/// its KV cache, as the shared worker measured it) is refused before anything starts.
fn dedicated_slot(
    shared: &Slot<Box<dyn EngineOps>>,
    tenant: &str,
    limits: &crate::cgroup::TenantLimits,
    weights_bytes: u64,
    spec: &ModelSpec,
    sandbox: Option<&crate::worker::Sandbox>,
    start: impl FnOnce() -> Result<(crate::worker::RemoteEngine, crate::worker::WorkerReady), String>,
) -> Result<Slot<Box<dyn EngineOps>>, String> {
    let kv_bytes = shared.engine.kv_block_bytes() as u64
        * (spec.kv_blocks as u64 + shared.params.swap_blocks as u64);
    let needs = weights_bytes + kv_bytes;
    if let Some(limit) = limits.memory_max.filter(|&limit| limit < needs) {
        return Err(format!(
            "tenant {tenant:?} has limits.memory {} MiB, below the {} MiB model {:?} needs in a worker of its own ({} MiB of model files, {} MiB of KV cache); raise limits.memory or lower the model's kv_blocks",
            limit >> 20,
            needs.div_ceil(1 << 20),
            shared.name,
            weights_bytes.div_ceil(1 << 20),
            kv_bytes.div_ceil(1 << 20),
        ));
    }
    if let Some(sandbox) = sandbox {
        sandbox.limit_tenant(tenant, limits)?;
    }
    let (engine, ready) = start()?;
    engine.status().limited_to(limits.memory_max);
    let mut params = shared.params.clone();
    params.swap_min_tokens = ready.swap_min_tokens();
    // Its own disk tier, as its worker measured it (or could not open it).
    params.disk_swap_min_tokens = ready.disk_swap_min_tokens();
    params.disk_blocks = if params.disk_swap_min_tokens == usize::MAX {
        0
    } else {
        spec.disk_blocks
    };
    Ok(Slot {
        name: shared.name.clone(),
        usage: Arc::new(Usage::new(None, Some(engine.status()))),
        engine: Box::new(engine),
        tokenizer: Arc::clone(&shared.tokenizer),
        params,
        prefix_cache: shared.prefix_cache,
    })
}

/// How models' workers are started, when engines run in worker processes.
#[derive(Debug, Clone)]
struct Workers {
    identity: crate::worker::WorkerIdentity,
    /// Ids workers take one each from; `None`: they all run as `identity`.
    ids: Option<Arc<crate::worker::uids::WorkerIds>>,
    /// The KV disk tier's root: each worker of a model with `disk_blocks` gets a directory of
    /// its own under it.
    kv_disk_root: std::path::PathBuf,
    /// Each GPU's NVRTC target (`sm_90`) by ordinal: its kernels are compiled into
    /// `kernel_cache` here before a worker starts on it.
    archs: HashMap<usize, String>,
    kernel_cache: std::path::PathBuf,
    sandbox: Option<Arc<crate::worker::Sandbox>>,
    /// Tenants with workers of their own: name, limits, the models they may use.
    dedicated: Vec<fleet::Dedicated>,
}

fn finish_prepare(
    name: &str,
    model: LoadedModel,
    spec: &ModelSpec,
    engine: Box<dyn EngineOps>,
    crossovers: Crossovers,
    label: String,
    usage: Usage,
) -> Result<PreparedModel, StartError> {
    let Crossovers {
        swap_min_tokens,
        disk_swap_min_tokens,
    } = crossovers;
    let block_size = crate::kv::DEFAULT_BLOCK_SIZE;
    let template = match &model.chat_template {
        Some(source) => Some(
            ChatTemplate::new(source).map_err(|source| StartError::Template {
                model: name.to_owned(),
                source,
            })?,
        ),
        None => None,
    };
    let c = &model.config;
    // Tokens of different models cost the device in proportion to their weights.
    let parameters = model.weights.matmul_params();
    let params = ModelParams {
        block_size,
        total_blocks: spec.kv_blocks,
        swap_blocks: if swap_min_tokens == usize::MAX {
            0
        } else {
            spec.swap_blocks
        },
        swap_min_tokens,
        disk_blocks: if disk_swap_min_tokens == usize::MAX {
            0
        } else {
            spec.disk_blocks
        },
        disk_swap_min_tokens,
        max_sequences: spec.max_sequences,
        max_batch_tokens: spec.max_batch_tokens,
        price: (parameters as f64 / 1e9).max(1e-3),
        reserve_max_tokens: false,
    };
    let tokenizer = Arc::new(model.tokenizer);
    let info = ModelInfo {
        name: name.to_owned(),
        format: model.format.to_owned(),
        source: model.source.display().to_string(),
        backend: label,
        context_length: c.max_position_embeddings,
        vocab_size: c.vocab_size,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        sampling_defaults: spec.sampling_defaults.or(model.sampling_defaults),
    };
    let usage = Arc::new(usage);
    Ok(Prepared {
        dedicated: Vec::new(),
        slot: Slot {
            name: name.to_owned(),
            engine,
            tokenizer: Arc::clone(&tokenizer),
            usage,
            params,
            prefix_cache: spec.prefix_cache,
        },
        info,
        tokenizer,
        template,
    })
}

/// A model ready to serve, its engine in this process or in a worker.
type PreparedModel = Prepared<Box<dyn EngineOps>>;

/// Once a model is placed, its chat template renders in memory-limited processes, not in
/// acceld.
fn sandbox_template(
    (device, mut prepared): (String, PreparedModel),
    renderer: Option<&crate::worker::WorkerIdentity>,
) -> (String, PreparedModel) {
    if let Some(identity) = renderer {
        prepared.template = prepared
            .template
            .take()
            .map(|t| t.in_sandbox(identity.clone()));
    }
    (device, prepared)
}

/// Builds a model's engine where `placement` says, then moves its chat template into
/// renderer processes.
fn place(
    name: &str,
    model: LoadedModel,
    source: Option<(&std::path::Path, &crate::model::files::Opened)>,
    spec: &ModelSpec,
    placement: &Placement,
    workers: Option<&Workers>,
    renderer: Option<&crate::worker::WorkerIdentity>,
) -> Result<(String, PreparedModel), StartError> {
    let placed = place_engine(name, model, source, spec, placement, workers)?;
    Ok(sandbox_template(placed, renderer))
}

/// Compiles the CUDA kernels for GPU `ordinal` into the kernel cache, so that its workers
/// (which may not write the cache) start without compiling; a failure is logged, and the
/// workers compile for themselves.
fn precompile_kernels(workers: &Workers, ordinal: usize) {
    let Some(arch) = workers.archs.get(&ordinal) else {
        return;
    };
    let started = std::time::Instant::now();
    match crate::backend::cuda::kernels::precompile(arch, &workers.kernel_cache) {
        Ok(modules) => {
            tracing::info!(%arch, modules, elapsed = ?started.elapsed(), cache = %workers.kernel_cache.display(), "CUDA kernels ready in the cache for the workers")
        }
        Err(e) => {
            tracing::warn!(%arch, error = %e, "cannot compile the CUDA kernels for the workers; each compiles its own")
        }
    }
}

/// Builds a model's engine where `placement` says: in a worker process when engines run in
/// workers (with one more per dedicated tenant), else in this process.
fn place_engine(
    name: &str,
    model: LoadedModel,
    source: Option<(&std::path::Path, &crate::model::files::Opened)>,
    spec: &ModelSpec,
    placement: &Placement,
    workers: Option<&Workers>,
) -> Result<(String, PreparedModel), StartError> {
    if let Some(workers) = workers {
        let start = |device: String, pool: &str| {
            let init = crate::worker::WorkerInit {
                model: name.to_owned(),
                path: source.map(|(p, _)| p.to_owned()),
                spec: spec.clone(),
                device,
                kernel_cache: Some(workers.kernel_cache.clone()),
                files: source.map(|(_, o)| o.files.clone()).unwrap_or_default(),
                dirs: source.map(|(_, o)| o.dirs.clone()).unwrap_or_default(),
                disk_dir: None,
            };
            let worker = format!(
                "{pool}/{}",
                crate::worker::sandbox::worker_name(&init.model, &init.device)
            );
            let identity = workers.identity.for_worker(workers.ids.as_ref(), &worker)?;
            let wants_disk =
                spec.disk_blocks > 0 && spec.preemption != crate::config::PreemptionMode::Recompute;
            // A worker's disk tier holds its tenants' KV blocks: only a worker with a uid of
            // its own keeps files no other worker can read.
            if wants_disk && identity.lease.is_none() {
                tracing::warn!(model = %name, %worker,
                    "workers share one uid, so the worker gets no KV disk tier (disk_blocks is ignored); give each worker its own with worker_uids");
            }
            let disk_root =
                (wants_disk && identity.lease.is_some()).then(|| workers.kv_disk_root.clone());
            crate::worker::RemoteEngine::start(
                init,
                source.map(|(_, o)| o.handles.clone()).unwrap_or_default(),
                identity,
                workers.sandbox.clone(),
                pool,
                disk_root,
            )
        };
        let shared = crate::worker::sandbox::SHARED_POOL;
        let weights_bytes: u64 = source
            .map(|(_, o)| {
                o.handles
                    .iter()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        // Each dedicated tenant allowed this model gets a worker of its own on the same device.
        let dedicate = |p: &mut PreparedModel, device: &str| {
            for (tenant, limits, models) in &workers.dedicated {
                if !models.iter().any(|m| m == "*" || m == name) {
                    continue;
                }
                let slot = dedicated_slot(
                    &p.slot,
                    tenant,
                    limits,
                    weights_bytes,
                    spec,
                    workers.sandbox.as_deref(),
                    || start(device.to_owned(), tenant),
                );
                if let Err(why) = &slot {
                    tracing::error!(model = %name, %tenant, reason = %why, "the tenant's dedicated worker is not started; its requests to this model are refused");
                }
                p.dedicated.push((tenant.clone(), slot));
            }
        };
        return match placement {
            Placement::Cpu => {
                let worker = start("cpu".into(), shared).map_err(StartError::Worker)?;
                let mut p = prepare_in_worker(name, model, spec, worker, "cpu".into())?;
                dedicate(&mut p, "cpu");
                Ok(("cpu".into(), p))
            }
            Placement::Cuda {
                ordinal,
                cpu_fallback,
                ..
            } => {
                precompile_kernels(workers, *ordinal);
                match start(format!("cuda:{ordinal}"), shared) {
                    Ok(worker) => {
                        let device = format!("cuda:{ordinal}");
                        let mut p = prepare_in_worker(name, model, spec, worker, device.clone())?;
                        dedicate(&mut p, &device);
                        Ok((device, p))
                    }
                    Err(e) if *cpu_fallback => {
                        tracing::warn!(model = %name, error = %e, "backend auto: the GPU cannot be used; serving on the CPU");
                        let worker = start("cpu".into(), shared).map_err(StartError::Worker)?;
                        let mut p = prepare_in_worker(name, model, spec, worker, "cpu".into())?;
                        dedicate(&mut p, "cpu");
                        Ok(("cpu".into(), p))
                    }
                    Err(e) => Err(StartError::Worker(e)),
                }
            }
        };
    }
    match placement {
        Placement::Cpu => {
            let p = prepare(name, model, spec, CpuBackend::default(), "cpu".into(), None)?;
            Ok(("cpu".into(), p))
        }
        Placement::Cuda {
            ordinal,
            options,
            cpu_fallback,
        } => match CudaBackend::new(*ordinal, options) {
            Ok(backend) => {
                let ledger = backend.ledger();
                let label = format!("cuda:{ordinal}");
                let p = prepare(name, model, spec, backend, label.clone(), Some(ledger))?;
                Ok((label, p))
            }
            Err(e) if *cpu_fallback => {
                tracing::warn!(model = %name, error = %e, "backend auto: the GPU cannot be used; serving on the CPU");
                let p = prepare(name, model, spec, CpuBackend::default(), "cpu".into(), None)?;
                Ok(("cpu".into(), p))
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// Loads and starts every configured model, logging progress, each on its device's loop. A
/// model that fails to load is logged and skipped, so the others are served. If the built-in
/// default model's file is missing, a small generated model, named as such, is served instead.
/// The loops run on while any handle does; models cannot be added or taken off afterwards
/// (the daemon keeps its [`Fleet`] for that).
pub fn start_models(
    config: &DaemonConfig,
    devices: &crate::devices::DeviceReport,
    metrics: Option<&SchedMetrics>,
    sandbox: Option<Arc<crate::worker::Sandbox>>,
    policy: Option<&crate::policy::Policy>,
) -> Vec<ModelHandle> {
    Fleet::start(config, devices, metrics, sandbox, policy).1
}

#[cfg(test)]
mod tests;
