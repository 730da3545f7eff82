//! One model's engine on a thread of its own, fed by a simple continuous-batching loop:
//! requests in over a channel, events out per request.
//!
//! The API layer sees only [`ModelHandle`] (submit a request, read its events), so a later
//! scheduler can replace the loop's policy and a worker process can take the thread's place
//! without touching the API. The loop is first come, first served: it admits a request when a
//! sequence slot and KV blocks for its whole prompt and `max_tokens` are free, then runs steps
//! that mix decode tokens with prefill chunks up to `max_batch_tokens`.

pub mod detok;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::memory::Ledger;
use crate::backend::cuda::{CudaBackend, CudaOptions};
use crate::backend::Backend;
use crate::chat::ChatTemplate;
use crate::config::{
    BackendChoice, DaemonConfig, ModelSpec, DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME,
};
use crate::engine::sampling::{Sampler, SamplingParams};
use crate::engine::{Engine, LogitsWanted, SeqId, StepInput};
use crate::model::LoadedModel;
use crate::tokenizer::Tokenizer;

use self::detok::Detokenizer;

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
    },
    Error {
        message: String,
    },
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
    #[error("the request needs {needed} KV blocks but this model has {total}; lower max_tokens or raise the model's kv_blocks")]
    TooBigForCache { needed: usize, total: usize },
    #[error("token id {token} is outside the model's vocabulary of {vocab}")]
    BadToken { token: u32, vocab: usize },
    #[error("the model's runner has stopped; see the daemon log")]
    Stopped,
}

struct Job {
    request: GenerateRequest,
    events: mpsc::UnboundedSender<Event>,
}

/// A served model: its tokenizer and template for the API, and the channel to its loop.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    pub info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Option<Arc<ChatTemplate>>,
    jobs: crossbeam_channel::Sender<Job>,
    blocks: (usize, usize),
    usage: Arc<Usage>,
}

/// What a model holds, for the metrics: KV-cache bytes per tenant (updated by the runner
/// after every step) and, on a GPU, the backend's memory ledger.
#[derive(Debug, Default)]
pub struct Usage {
    kv_by_tenant: Mutex<HashMap<String, u64>>,
    ledger: Option<Arc<Ledger>>,
}

impl Usage {
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

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("prompt_tokens", &self.request.prompt.len())
            .finish_non_exhaustive()
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
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
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
    /// Puts `model` on a new thread with its own engine and KV cache, on `placement`.
    pub fn spawn(
        name: &str,
        model: LoadedModel,
        spec: &ModelSpec,
        placement: &Placement,
    ) -> Result<Self, StartError> {
        match placement {
            Placement::Cpu => {
                Self::spawn_on(name, model, spec, CpuBackend::default(), "cpu".into(), None)
            }
            Placement::Cuda {
                ordinal,
                options,
                cpu_fallback,
            } => match CudaBackend::new(*ordinal, options) {
                Ok(backend) => {
                    let ledger = backend.ledger();
                    let label = format!("cuda:{ordinal}");
                    Self::spawn_on(name, model, spec, backend, label, Some(ledger))
                }
                Err(e) if *cpu_fallback => {
                    tracing::warn!(model = %name, error = %e, "backend auto: the GPU cannot be used; serving on the CPU");
                    Self::spawn_on(name, model, spec, CpuBackend::default(), "cpu".into(), None)
                }
                Err(e) => Err(e.into()),
            },
        }
    }

    fn spawn_on<B: Backend>(
        name: &str,
        model: LoadedModel,
        spec: &ModelSpec,
        backend: B,
        label: String,
        ledger: Option<Arc<Ledger>>,
    ) -> Result<Self, StartError> {
        let block_size = crate::kv::DEFAULT_BLOCK_SIZE;
        let engine = Engine::new(
            backend,
            model.config.clone(),
            &model.weights,
            spec.kv_blocks,
            block_size,
        )?;
        let template = match &model.chat_template {
            Some(source) => Some(Arc::new(ChatTemplate::new(source).map_err(|source| {
                StartError::Template {
                    model: name.to_owned(),
                    source,
                }
            })?)),
            None => None,
        };
        let tokenizer = Arc::new(model.tokenizer);
        let info = ModelInfo {
            name: name.to_owned(),
            format: model.format.to_owned(),
            source: model.source.display().to_string(),
            backend: label,
            context_length: model.config.max_position_embeddings,
            vocab_size: model.config.vocab_size,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let (jobs, inbox) = crossbeam_channel::unbounded();
        let usage = Arc::new(Usage {
            kv_by_tenant: Mutex::default(),
            ledger,
        });
        let runner = Runner {
            usage: Arc::clone(&usage),
            engine,
            tokenizer: tokenizer.clone(),
            inbox,
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_sequences: spec.max_sequences,
            max_batch_tokens: spec.max_batch_tokens,
            block_size,
            total_blocks: spec.kv_blocks,
        };
        std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || runner.run())
            .map_err(StartError::Thread)?;
        Ok(Self {
            info,
            tokenizer,
            template,
            jobs,
            blocks: (block_size, spec.kv_blocks),
            usage,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_deref()
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn submit(
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
        let (block_size, blocks) = self.blocks;
        let needed = total.div_ceil(block_size);
        if needed > blocks {
            return Err(SubmitError::TooBigForCache {
                needed,
                total: blocks,
            });
        }
        let (events, receiver) = mpsc::unbounded_channel();
        self.jobs
            .send(Job { request, events })
            .map_err(|_| SubmitError::Stopped)?;
        Ok(receiver)
    }
}

/// Loads and starts every configured model, logging progress. A model that fails to load is
/// logged and skipped, so the daemon serves the others. If the built-in default model's file is
/// missing, the daemon says so and serves a small generated model, named as such, instead.
pub fn start_models(
    config: &DaemonConfig,
    devices: &crate::devices::DeviceReport,
) -> Vec<ModelHandle> {
    let mut handles = Vec::new();
    let cuda_options = CudaOptions {
        kernel_cache: Some(config.kernel_cache.clone()),
        memory_budget: None,
    };
    for spec in &config.models {
        let path = config.model_path(spec);
        let choice = spec.backend.unwrap_or(config.backend);
        let placement = match Placement::resolve(choice, devices, &cuda_options) {
            Ok(placement) => placement,
            Err(why) => {
                tracing::error!(model = %spec.name, backend = %choice, reason = %why, "the model's GPU is not available; set backend: cpu or auto for this model");
                continue;
            }
        };
        if choice == BackendChoice::Auto {
            match (&placement, &devices.reason) {
                (Placement::Cpu, Some(reason)) => {
                    tracing::info!(model = %spec.name, %reason, "no GPU; using the CPU backend")
                }
                (Placement::Cuda { ordinal, .. }, _) => {
                    tracing::info!(model = %spec.name, "backend auto: using cuda:{ordinal}")
                }
                (Placement::Cpu, None) => {}
            }
        }
        let is_default = spec.name == DEFAULT_MODEL_NAME
            && spec.path == std::path::Path::new(DEFAULT_MODEL_FILE);
        let started = Instant::now();
        tracing::info!(model = %spec.name, path = %path.display(), "loading model");
        let loaded = match crate::model::load(&path) {
            Ok(model) => model,
            Err(e) if is_default && !path.exists() => {
                tracing::warn!(
                    error = %e,
                    "the default model is not installed (run `make model`); serving {} instead: random weights, for testing the service only",
                    crate::model::generated::NAME
                );
                match crate::model::generated::tiny_random() {
                    Ok(model) => {
                        match ModelHandle::spawn(
                            crate::model::generated::NAME,
                            model,
                            spec,
                            &placement,
                        ) {
                            Ok(handle) => handles.push(handle),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start the generated model")
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot build the generated model"),
                }
                continue;
            }
            Err(e) => {
                tracing::error!(model = %spec.name, error = %e, "model not loaded; the daemon serves the others");
                continue;
            }
        };
        let layers = loaded.config.num_layers;
        match ModelHandle::spawn(&spec.name, loaded, spec, &placement) {
            Ok(handle) => {
                tracing::info!(
                    model = %spec.name,
                    format = %handle.info.format,
                    layers,
                    context = handle.info.context_length,
                    elapsed = ?started.elapsed(),
                    "model ready"
                );
                handles.push(handle);
            }
            Err(e) => {
                tracing::error!(model = %spec.name, error = %e, "model not started; the daemon serves the others")
            }
        }
    }
    handles
}

/// A request being served.
struct Active {
    job: Job,
    seq: SeqId,
    /// Tokens still to feed: the rest of the prompt, then each sampled token.
    pending: Vec<u32>,
    prompt_done: bool,
    /// Prompt and output, for penalties.
    context: Vec<u32>,
    sampler: Sampler,
    detok: Detokenizer,
    reserved_blocks: usize,
    started: Instant,
}

struct Runner<B: Backend> {
    engine: Engine<B>,
    usage: Arc<Usage>,
    tokenizer: Arc<Tokenizer>,
    inbox: crossbeam_channel::Receiver<Job>,
    waiting: VecDeque<Job>,
    running: Vec<Active>,
    max_sequences: usize,
    max_batch_tokens: usize,
    block_size: usize,
    total_blocks: usize,
}

impl<B: Backend> Runner<B> {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.inbox.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    // Every handle is gone: the daemon is shutting down.
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.inbox.try_recv() {
                self.waiting.push_back(job);
            }
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.account();
        }
    }

    /// Publishes the KV-cache bytes each tenant's sequences hold now.
    fn account(&self) {
        let block_bytes = self.engine.kv_block_bytes() as u64;
        let mut by_tenant: HashMap<String, u64> = HashMap::new();
        for a in &self.running {
            let blocks = self
                .engine
                .sequence_len(a.seq)
                .unwrap_or(0)
                .div_ceil(self.block_size) as u64;
            *by_tenant.entry(a.job.request.tenant.clone()).or_default() += blocks * block_bytes;
        }
        let mut shared = self
            .usage
            .kv_by_tenant
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Tenants that finished stay listed at zero, so their series drop to 0 rather than
        // going stale.
        for bytes in shared.values_mut() {
            *bytes = 0;
        }
        shared.extend(by_tenant);
    }

    fn reserved(&self) -> usize {
        self.running.iter().map(|a| a.reserved_blocks).sum()
    }

    /// First come, first served, while a sequence slot and blocks for the whole request are free.
    fn admit(&mut self) {
        self.waiting.retain(|job| !job.events.is_closed());
        while self.running.len() < self.max_sequences {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let need =
                (job.request.prompt.len() + job.request.max_tokens).div_ceil(self.block_size);
            if self.reserved() + need > self.total_blocks {
                break;
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            let seq = self.engine.add_sequence();
            self.running.push(Active {
                seq,
                pending: job.request.prompt.clone(),
                prompt_done: false,
                context: job.request.prompt.clone(),
                sampler: Sampler::new(job.request.params.clone()),
                detok: Detokenizer::new(job.request.stop.clone()),
                reserved_blocks: need,
                started: Instant::now(),
                job,
            });
        }
    }

    /// One batched step: a decode token for every generating sequence, then prefill chunks.
    fn step(&mut self) {
        // Requests whose client went away stop here, mid-prefill included.
        let gone: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].job.events.is_closed())
            .collect();
        self.remove(&gone);
        if self.running.is_empty() {
            return;
        }
        let mut budget = self.max_batch_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for (i, a) in self.running.iter().enumerate() {
            if a.prompt_done && budget > 0 {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for (i, a) in self.running.iter().enumerate() {
            if !a.prompt_done && budget > 0 {
                let take = a.pending.len().min(budget);
                plan.push((i, take));
                budget -= take;
            }
        }
        let inputs: Vec<StepInput<'_>> = plan
            .iter()
            .map(|&(i, take)| StepInput {
                seq: self.running[i].seq,
                tokens: &self.running[i].pending[..take],
                logits: LogitsWanted::Last,
            })
            .collect();
        let outputs = match self.engine.step(&inputs) {
            Ok(outputs) => outputs,
            Err(e) => {
                // The engine rolled the step back; fail its requests, keep serving the rest.
                tracing::error!(error = %e, "engine step failed");
                let failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                for &i in &failed {
                    let _ = self.running[i].job.events.send(Event::Error {
                        message: e.to_string(),
                    });
                }
                self.remove(&failed);
                return;
            }
        };
        let mut finished = Vec::new();
        for (&(i, take), output) in plan.iter().zip(outputs) {
            let a = &mut self.running[i];
            a.pending.drain(..take);
            if !a.prompt_done && !a.pending.is_empty() {
                continue; // more prompt to feed
            }
            a.prompt_done = true;
            let Some(logits) = output.logits.first() else {
                continue;
            };
            let prompt_len = a.job.request.prompt.len();
            let sampled = a.sampler.sample(logits, &a.context, prompt_len);
            a.context.push(sampled.token);
            let generated = a.context.len() - prompt_len;
            let request = &a.job.request;
            let eos = !request.ignore_eos && self.tokenizer.eos_ids().contains(&sampled.token);
            let stop_token = request.stop_token_ids.contains(&sampled.token);
            let (text, stopped) = if eos || stop_token {
                (a.detok.finish(&self.tokenizer), true)
            } else {
                let delta = a.detok.push(&self.tokenizer, sampled.token);
                (delta.text, delta.stopped)
            };
            let length = !stopped && generated >= request.max_tokens;
            let text = if length {
                text + &a.detok.finish(&self.tokenizer)
            } else {
                text
            };
            let sent = a.job.events.send(Event::Token {
                text,
                token: sampled.token,
                logprob: sampled.logprob,
                top: sampled.top,
            });
            if sent.is_err() {
                finished.push(i); // the client went away
                continue;
            }
            if stopped || length {
                let _ = a.job.events.send(Event::Done {
                    reason: if stopped {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    },
                    prompt_tokens: prompt_len,
                    completion_tokens: generated,
                });
                tracing::debug!(elapsed = ?a.started.elapsed(), generated, "request finished");
                finished.push(i);
            } else {
                a.pending.push(sampled.token);
            }
        }
        self.remove(&finished);
    }

    fn remove(&mut self, indices: &[usize]) {
        let mut indices = indices.to_vec();
        indices.sort_unstable();
        indices.dedup();
        for &i in indices.iter().rev() {
            let a = self.running.swap_remove(i);
            self.engine.remove_sequence(a.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tenant: &str, prompt: Vec<u32>) -> (Job, mpsc::UnboundedReceiver<Event>) {
        let (events, receiver) = mpsc::unbounded_channel();
        let request = GenerateRequest {
            tenant: tenant.into(),
            prompt,
            params: SamplingParams::default(),
            max_tokens: 8,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
        };
        (Job { request, events }, receiver)
    }

    #[test]
    fn kv_cache_bytes_are_accounted_to_each_tenant_and_released() {
        let model = crate::model::generated::tiny_random().unwrap();
        let block_size = 16;
        let engine = Engine::new(
            CpuBackend::default(),
            model.config.clone(),
            &model.weights,
            64,
            block_size,
        )
        .unwrap();
        let block_bytes = engine.kv_block_bytes() as u64;
        let (_jobs, inbox) = crossbeam_channel::unbounded();
        let usage = Arc::new(Usage::default());
        let mut runner = Runner {
            engine,
            usage: Arc::clone(&usage),
            tokenizer: Arc::new(model.tokenizer),
            inbox,
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_sequences: 8,
            max_batch_tokens: 512,
            block_size,
            total_blocks: 64,
        };
        let (a, _ra) = job("alpha", vec![5; 20]);
        let (b, _rb) = job("beta", vec![6; 3]);
        let (c, rc) = job("alpha", vec![7; 40]);
        runner.waiting.extend([a, b, c]);
        runner.admit();
        runner.step();
        runner.account();
        let held = usage.kv_by_tenant();
        // alpha: 20 and 40 prompt tokens (2 + 3 blocks); beta: 3 tokens (1 block).
        assert_eq!(held["alpha"], 5 * block_bytes, "{held:?}");
        assert_eq!(held["beta"], block_bytes, "{held:?}");

        // A request that goes away releases its blocks; the tenant's entry stays, lower.
        drop(rc);
        runner.step();
        runner.account();
        assert_eq!(usage.kv_by_tenant()["alpha"], 2 * block_bytes);
        while !runner.running.is_empty() {
            runner.step();
        }
        runner.account();
        let held = usage.kv_by_tenant();
        assert_eq!((held["alpha"], held["beta"]), (0, 0), "{held:?}");
    }
}
