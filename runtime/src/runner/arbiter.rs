//! One device's loop: every model placed on the device is stepped here, in the order the
//! device's [`Scheduler`] plans, so tenant shares and quotas hold across the models.
//!
//! Owns the engines and the requests' per-sequence state (sampler, detokenizer, tokens still
//! to feed); the scheduler owns every decision. Each iteration: take new requests, drop those
//! whose client went away, plan, apply the plan (preempt, swap in, admit, one engine step per
//! model), publish usage. A sequence preempted by recompute is fed its prompt and generated
//! tokens again; its sampler is untouched, so its output is what it would have been.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::detok::Detokenizer;
use super::{DeviceSchedule, Event, Failure, FinishReason, GenerateRequest, Usage};
use crate::backend::Backend;
use crate::config::{ModelSpec, PreemptionMode};
use crate::engine::ops::{EngineOps, Loss};
use crate::engine::sampling::Sampler;
use crate::engine::{Engine, LogitsWanted, SeqId, StepInput};
use crate::metrics::SchedMetrics;
use crate::sched::{ModelParams, NewSeq, PreemptKind, Scheduler, SeqKey, StepPlan, Tier};
use crate::tokenizer::Tokenizer;

/// A request on its way to a device's loop.
pub(crate) struct Submission {
    pub model: usize,
    /// Which placement of `model` it is for: an index freed by an unload is reused, and a
    /// request for the model that had it must not run on the one that has it now.
    pub generation: u64,
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<Event>,
    pub submitted: Instant,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("model", &self.model)
            .field("tenant", &self.request.tenant)
            .field("prompt_tokens", &self.request.prompt.len())
            .finish_non_exhaustive()
    }
}

/// Where a request counts against `max_queued_per_tenant`: its tenant's interactive requests
/// and its batch jobs' lines have a bound each, so a tenant's jobs cannot fill the queue its
/// interactive requests need.
pub(crate) fn queue_key(request: &super::GenerateRequest) -> String {
    match request.limits.class {
        crate::policy::PriorityClass::Interactive => request.tenant.clone(),
        crate::policy::PriorityClass::Batch => format!("{}\u{1f}batch", request.tenant),
    }
}

/// Requests each tenant has waiting on a device, counted from submission to first admission
/// (the per-tenant queue bound), with a hint for `Retry-After`.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    queued: Mutex<HashMap<String, (usize, f64)>>,
}

impl Gate {
    /// Takes a queue place for `tenant`, or says how many it has and when to retry.
    pub fn enter(&self, tenant: &str, limit: usize) -> Result<(), (usize, f64)> {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let entry = queued.entry(tenant.to_owned()).or_insert((0, 1.0));
        if entry.0 >= limit {
            return Err(*entry);
        }
        entry.0 += 1;
        Ok(())
    }

    pub fn leave(&self, tenant: &str) {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = queued.get_mut(tenant) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }

    fn set_retry_after(&self, tenant: &str, seconds: f64) {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = queued.get_mut(tenant) {
            entry.1 = seconds;
        }
    }

    fn tenants(&self) -> Vec<String> {
        let queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        queued.keys().cloned().collect()
    }
}

/// A model on the device: its engine and what the loop needs to finish its tokens.
pub(crate) struct Slot<E: EngineOps> {
    pub name: String,
    pub engine: E,
    pub tokenizer: Arc<Tokenizer>,
    pub usage: Arc<Usage>,
    pub params: ModelParams,
    /// Whether sequences start through the prefix cache (the model's `prefix_cache`).
    pub prefix_cache: bool,
}

/// The models placed on the device, by their index in its scheduler. An unloaded model's place
/// stays empty until the next model placed takes it, so the indices requests carry stay valid.
pub(crate) struct Slots<E: EngineOps> {
    /// By index: the model placed there, with the generation of its placement.
    placed: Vec<Option<(u64, Slot<E>)>>,
    next_generation: u64,
}

impl<E: EngineOps> Slots<E> {
    /// The first models of a device, generations 0, 1, ... in order.
    fn new(models: Vec<Slot<E>>) -> Self {
        let mut slots = Self {
            placed: Vec::new(),
            next_generation: 0,
        };
        for (m, slot) in models.into_iter().enumerate() {
            slots.put(m, slot);
        }
        slots
    }

    pub fn get(&self, m: usize) -> Option<&Slot<E>> {
        self.placed.get(m).and_then(Option::as_ref).map(|(_, s)| s)
    }

    pub fn get_mut(&mut self, m: usize) -> Option<&mut Slot<E>> {
        self.placed
            .get_mut(m)
            .and_then(Option::as_mut)
            .map(|(_, s)| s)
    }

    /// The generation of the model placed at `m`, if one is.
    pub fn generation(&self, m: usize) -> Option<u64> {
        self.placed.get(m).and_then(Option::as_ref).map(|(g, _)| *g)
    }

    /// The models placed now, with their indices.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Slot<E>)> {
        self.placed
            .iter()
            .enumerate()
            .filter_map(|(m, s)| s.as_ref().map(|(_, s)| (m, s)))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut Slot<E>)> {
        self.placed
            .iter_mut()
            .enumerate()
            .filter_map(|(m, s)| s.as_mut().map(|(_, s)| (m, s)))
    }

    /// Indices of the models placed now.
    fn placed(&self) -> Vec<usize> {
        self.iter().map(|(m, _)| m).collect()
    }

    /// Places `slot` at `m`; returns the placement's generation.
    fn put(&mut self, m: usize, slot: Slot<E>) -> u64 {
        if self.placed.len() <= m {
            self.placed.resize_with(m + 1, || None);
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.placed[m] = Some((generation, slot));
        generation
    }

    fn take(&mut self, m: usize) -> Option<Slot<E>> {
        self.placed
            .get_mut(m)
            .and_then(Option::take)
            .map(|(_, s)| s)
    }
}

/// Only the loop's own bookkeeping indexes: every request it holds is for a placed model (it
/// refuses others at the door and ends a model's requests before taking the model off), so a
/// miss is a bug, caught like any panic in a step.
impl<E: EngineOps> std::ops::Index<usize> for Slots<E> {
    type Output = Slot<E>;
    fn index(&self, m: usize) -> &Slot<E> {
        self.get(m)
            .unwrap_or_else(|| panic!("model {m} is not placed on this device"))
    }
}

impl<E: EngineOps> std::ops::IndexMut<usize> for Slots<E> {
    fn index_mut(&mut self, m: usize) -> &mut Slot<E> {
        self.placed
            .get_mut(m)
            .and_then(Option::as_mut)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("model {m} is not placed on this device"))
    }
}

/// An operator's change to the models on a running device.
pub(crate) enum Control<E: EngineOps> {
    /// Places models: one served model's engine, then its dedicated tenants' engines. The
    /// reply carries their indices and generations, in that order.
    Place {
        slots: Vec<Slot<E>>,
        reply: std::sync::mpsc::SyncSender<Vec<(usize, u64)>>,
    },
    /// Takes models off: new requests for them are refused at once, those in flight may
    /// finish for `grace` and then fail. The reply comes once their engines are gone.
    /// Models are named by index and the generation of their placement, so a retire can
    /// only ever take off the placements it was meant for.
    Retire {
        models: Vec<(usize, u64)>,
        grace: Duration,
        reply: std::sync::mpsc::SyncSender<Retired>,
    },
}

/// What became of the requests of models taken off a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retired {
    /// In flight when the unload began, and ended on their own (done, or their client left).
    pub finished: usize,
    /// Still running when the grace period ran out: they failed, saying why.
    pub cancelled: usize,
}

/// Models being taken off, waiting for their requests.
struct Retiring {
    models: Vec<usize>,
    deadline: Instant,
    in_flight: usize,
    reply: std::sync::mpsc::SyncSender<Retired>,
}

/// Measures whether moving a sequence's blocks to the swap space and back costs less than
/// prefilling it again, on this engine; returns the scheduler's `swap_min_tokens`.
pub(crate) fn preemption_crossover<B: Backend>(
    engine: &mut Engine<B>,
    spec: &ModelSpec,
    block_size: usize,
    vocab: usize,
    context: usize,
) -> usize {
    if spec.swap_blocks == 0 || spec.preemption == PreemptionMode::Recompute {
        return usize::MAX;
    }
    if let Err(e) = engine.enable_swap(spec.swap_blocks) {
        tracing::warn!(model = %spec.name, error = %e, "no swap space; preempted sequences will be recomputed");
        return usize::MAX;
    }
    if spec.preemption == PreemptionMode::Swap {
        return 0;
    }
    let tokens: Vec<u32> = (0..(4 * block_size)
        .min(context.saturating_sub(1))
        .min(spec.swap_blocks * block_size))
        .map(|i| (i % vocab.max(1)) as u32)
        .collect();
    if tokens.is_empty() {
        return usize::MAX;
    }
    let measured = super::tiers::round_trip(engine, &tokens, |e, seq| e.swap_out(seq));
    match measured {
        Ok(super::tiers::Costs { prefill, swap }) => {
            let use_swap = swap < prefill;
            tracing::info!(
                model = %spec.name,
                tokens = tokens.len(),
                prefill = ?prefill,
                swap_round_trip = ?swap,
                preemption = if use_swap { "swap" } else { "recompute" },
                "preemption crossover measured"
            );
            if use_swap {
                0
            } else {
                usize::MAX
            }
        }
        Err(e) => {
            tracing::warn!(model = %spec.name, error = %e, "measuring swap failed; preempted sequences will be recomputed");
            usize::MAX
        }
    }
}

/// The error of a request whose worker the kernel killed at its memory limit while it was the
/// only sequence there: it cannot fit under that limit.
fn out_of_memory(limit_bytes: Option<u64>) -> String {
    let limit = match limit_bytes {
        Some(bytes) => format!(
            "its tenant's memory limit (limits.memory, {} MiB)",
            bytes >> 20
        ),
        None => "the memory it could have".to_owned(),
    };
    format!(
        "the kernel stopped this request's worker for going over {limit} while it served this request alone; raise the tenant's limits.memory, or ask for fewer tokens (a shorter prompt or a lower max_tokens)"
    )
}

/// A request being served.
struct Active {
    job: Submission,
    seq: Option<SeqId>,
    /// Tokens still to feed: the prompt (or, after a recompute preemption, the prompt and
    /// every generated token), then each sampled token.
    pending: Vec<u32>,
    /// Prompt and output, for penalties and recomputation.
    context: Vec<u32>,
    sampler: Sampler,
    detok: Detokenizer,
    admitted: bool,
    /// Tokens of `pending` that are being computed again after a preemption.
    recomputing: usize,
    /// Prompt tokens found in the prefix cache rather than computed (the first admission's).
    cached_tokens: usize,
}

impl Active {
    /// After its cache was dropped: everything known is fed again. The last sampled token was
    /// never fed, so it is not recomputation.
    fn restart(&mut self) {
        self.pending = self.context.clone();
        let sampled = self.context.len() > self.job.request.prompt.len();
        self.recomputing = self.pending.len() - usize::from(sampled);
    }
}

/// The device's loop.
pub(crate) struct Arbiter<E: EngineOps> {
    pub device: String,
    pub sched: Scheduler,
    pub models: Slots<E>,
    pub inbox: crossbeam_channel::Receiver<Submission>,
    /// Models placed and taken off while the device runs.
    control: crossbeam_channel::Receiver<Control<E>>,
    retiring: Vec<Retiring>,
    pub gate: Arc<Gate>,
    pub metrics: Option<SchedMetrics>,
    active: HashMap<SeqKey, Active>,
    next_key: SeqKey,
    epoch: Instant,
    tenants_seen: HashSet<String>,
    schedule: Option<Arc<Mutex<DeviceSchedule>>>,
    /// When the per-tenant report was last published (it is refreshed a few times a second).
    reported: Option<Instant>,
    /// Per model, the sequences its worker held when the kernel killed it at its memory limit:
    /// until they are done the model runs one sequence at a time, so each that fits alone
    /// finishes.
    one_at_a_time: HashMap<usize, HashSet<SeqKey>>,
    /// Per model, its engine's counters when last published (evictions, disk
    /// authentication failures), so the metrics grow by the difference.
    engine_counters: HashMap<usize, [u64; 5]>,
    /// Whether the engines last said that some sequences share blocks.
    shared_reported: bool,
    /// Where the next look at waiting requests' resident prefixes starts among the
    /// candidates (each pass looks at a bounded number).
    resident_cursor: usize,
    /// When the waiting requests' resident prefixes were last looked at again.
    residents_noted: Option<Instant>,
}

impl<E: EngineOps + 'static> Arbiter<E> {
    pub fn new(
        device: String,
        sched: Scheduler,
        models: Vec<Slot<E>>,
        inbox: crossbeam_channel::Receiver<Submission>,
        gate: Arc<Gate>,
        metrics: Option<SchedMetrics>,
    ) -> Self {
        Self {
            device,
            sched,
            models: Slots::new(models),
            inbox,
            control: crossbeam_channel::never(),
            retiring: Vec::new(),
            gate,
            metrics,
            active: HashMap::new(),
            next_key: 0,
            epoch: Instant::now(),
            tenants_seen: HashSet::new(),
            schedule: None,
            reported: None,
            one_at_a_time: HashMap::new(),
            engine_counters: HashMap::new(),
            shared_reported: false,
            resident_cursor: 0,
            residents_noted: None,
        }
    }

    /// Measures time from `epoch` (one clock for every device: token buckets are shared).
    pub fn with_epoch(mut self, epoch: Instant) -> Self {
        self.epoch = epoch;
        self
    }

    /// Takes models to place and to take off from `control`.
    pub fn with_control(mut self, control: crossbeam_channel::Receiver<Control<E>>) -> Self {
        self.control = control;
        self
    }

    /// Publishes the per-tenant report into `schedule` for the API.
    pub fn with_schedule(mut self, schedule: Arc<Mutex<DeviceSchedule>>) -> Self {
        self.schedule = Some(schedule);
        self
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    pub fn run(mut self) {
        loop {
            if self.sched.is_empty() && self.retiring.is_empty() && !self.wait(None) {
                return;
            }
            // A panic in a step (a model file's tokenizer, a kernel's shape check) fails the
            // requests of that step's device and the loop keeps serving.
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.turn()));
            let ran = match turn {
                Ok(ran) => ran,
                Err(_) => {
                    let recovered =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.recover()));
                    if recovered.is_err() {
                        // Cleaning up panicked too: nothing here can be trusted. Stopping marks
                        // the device's models down (`/healthz`, `accel_model_up`), and dropping
                        // the loop closes every request still on it.
                        tracing::error!(device = %self.device, "recovering from a panicked step panicked; this device's loop stops");
                        return;
                    }
                    true
                }
            };
            // Nothing could run (a rate limit): wait for a new request, a change of models or
            // a refill.
            if !ran && !self.wait(Some(Duration::from_millis(50))) {
                return;
            }
        }
    }

    /// Waits for a request or a change of models (at most `timeout`) and takes it in; false
    /// when nothing can come any more and nothing is left to do.
    fn wait(&mut self, timeout: Option<Duration>) -> bool {
        // Receivers are shared handles: clones, so taking a message in may borrow the loop.
        let (inbox, control) = (self.inbox.clone(), self.control.clone());
        let timer = timeout.map_or_else(crossbeam_channel::never, crossbeam_channel::after);
        crossbeam_channel::select! {
            recv(inbox) -> job => match job {
                Ok(job) => self.accept(job),
                // Every handle is gone: the daemon is shutting down.
                Err(_) if self.sched.is_empty() => return false,
                // No handle is left to wake us: wait out the refill.
                Err(_) => std::thread::sleep(timeout.unwrap_or(Duration::from_millis(50))),
            },
            recv(control) -> message => match message {
                Ok(message) => {
                    // As a step is: a panic fails this device's requests, not its loop.
                    let changed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.control(message)
                    }));
                    if changed.is_err()
                        && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.recover()))
                            .is_err()
                    {
                        tracing::error!(device = %self.device, "recovering from a panicked change of models panicked; this device's loop stops");
                        return false;
                    }
                }
                // Nobody can change the models any more; requests still come.
                Err(_) => self.control = crossbeam_channel::never(),
            },
            recv(timer) -> _ => {}
        }
        true
    }

    /// Places models or starts taking them off.
    fn control(&mut self, message: Control<E>) {
        match message {
            Control::Place { slots, reply } => {
                let mut placed = Vec::with_capacity(slots.len());
                for slot in slots {
                    let index = self.sched.add_model(slot.params.clone());
                    tracing::debug!(device = %self.device, model = %slot.name, index, "model placed");
                    let generation = self.models.put(index, slot);
                    placed.push((index, generation));
                }
                self.publish_models();
                if reply.send(placed.clone()).is_err() {
                    // Whoever placed them is gone: nobody can reach them, so they go again.
                    let (reply, _) = std::sync::mpsc::sync_channel(1);
                    self.control(Control::Retire {
                        models: placed,
                        grace: Duration::ZERO,
                        reply,
                    });
                }
            }
            Control::Retire {
                models,
                grace,
                reply,
            } => {
                let models: Vec<usize> = models
                    .into_iter()
                    .filter(|&(m, g)| self.models.generation(m) == Some(g))
                    .map(|(m, _)| m)
                    .collect();
                let in_flight = self
                    .active
                    .values()
                    .filter(|a| models.contains(&a.job.model))
                    .count();
                self.retiring.push(Retiring {
                    models,
                    deadline: Instant::now() + grace,
                    in_flight,
                    reply,
                });
                self.settle_retiring();
            }
        }
    }

    /// Whether `model` is being taken off.
    fn is_retiring(&self, model: usize) -> bool {
        self.retiring.iter().any(|r| r.models.contains(&model))
    }

    /// Takes off the models whose requests are all done, ending those past their grace first.
    fn settle_retiring(&mut self) {
        let mut i = 0;
        while i < self.retiring.len() {
            let r = &self.retiring[i];
            let left: Vec<SeqKey> = self
                .active
                .iter()
                .filter(|(_, a)| r.models.contains(&a.job.model))
                .map(|(&k, _)| k)
                .collect();
            if !left.is_empty() && Instant::now() < r.deadline {
                i += 1;
                continue;
            }
            let r = self.retiring.swap_remove(i);
            for &key in &left {
                let model = self.active.get(&key).map_or_else(String::new, |a| {
                    self.models
                        .get(a.job.model)
                        .map_or_else(String::new, |s| s.name.clone())
                });
                self.fail(
                    key,
                    format!("an operator unloaded model {model:?} while this request ran; it is no longer served here"),
                    Failure::Server,
                );
            }
            // A sequence no request owns (left by a panic) must not keep the models: with
            // those gone and the requests above ended, they hold no sequence.
            for key in self.sched.keys() {
                if !self.active.contains_key(&key) {
                    self.sched.remove(key);
                }
            }
            let mut gone = Vec::new();
            for &m in &r.models {
                if let Err(held) = self.sched.retire_model(m) {
                    tracing::error!(device = %self.device, model = m, held, "a model taken off still has sequences in the scheduler; its index is not reused");
                }
                self.one_at_a_time.remove(&m);
                self.engine_counters.remove(&m);
                if let Some(slot) = self.models.take(m) {
                    tracing::info!(device = %self.device, model = %slot.name, "model taken off the device");
                    gone.push(slot);
                }
            }
            self.publish_models();
            let retired = Retired {
                finished: r.in_flight.saturating_sub(left.len()),
                cancelled: left.len(),
            };
            // An engine in a worker takes a moment to stop: not on this thread, whose other
            // models keep stepping. The reply waits for it, so memory is free when it comes.
            let reply = r.reply;
            let dropped = std::thread::Builder::new()
                .name("model-unload".into())
                .spawn(move || {
                    drop(gone);
                    let _ = reply.send(retired);
                });
            if let Err(e) = dropped {
                tracing::warn!(error = %e, "cannot stop the unloaded model's engine off the device's thread");
            }
        }
    }

    /// The names of the models placed, for the device's report.
    fn publish_models(&self) {
        let Some(schedule) = &self.schedule else {
            return;
        };
        let mut names: Vec<String> = Vec::new();
        for (_, slot) in self.models.iter() {
            // A dedicated tenant's engine has its model's name: listed once.
            if !names.contains(&slot.name) {
                names.push(slot.name.clone());
            }
        }
        schedule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .models = names;
    }

    /// One iteration; false when the plan ran nothing.
    pub fn turn(&mut self) -> bool {
        while let Ok(message) = self.control.try_recv() {
            self.control(message);
        }
        while let Ok(job) = self.inbox.try_recv() {
            self.accept(job);
        }
        self.drop_cancelled();
        self.settle_retiring();
        // A worker lost between steps (killed while idle, or noticed by a cleanup call); a
        // model whose replacement is still starting admits nothing until it is up.
        for m in self.models.placed() {
            if let Some(loss) = self.models[m].engine.take_loss() {
                self.requeue_lost(m, loss);
            }
            let starting = self.models[m].engine.starting();
            self.sched.pause_model(m, starting);
        }
        let now = self.now();
        let plan = self.sched.plan(now);
        let ran = !plan.run.is_empty();
        self.apply(plan, now);
        self.report_sharing();
        if self
            .residents_noted
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(100))
        {
            self.note_residents();
        }
        // Usage every step; the per-tenant report (metrics, `accelctl top`) ten times a
        // second, and whenever the device goes idle so the last figures are not stale.
        let report = !ran
            || self.sched.is_empty()
            || self
                .reported
                .is_none_or(|at| at.elapsed() >= Duration::from_millis(100));
        self.publish(now, report);
        ran
    }

    /// Tells the scheduler again how much of each waiting request's prompt the prefix cache
    /// holds now, for those admission looks at: the cache has changed since they arrived
    /// (blocks published by the requests ahead of them, or evicted).
    fn note_residents(&mut self) {
        // Bounded per pass (a worker's engine is asked over its socket), taking turns.
        const MAX_LOOKUPS: usize = 64;
        self.residents_noted = Some(Instant::now());
        let candidates = self.sched.resident_candidates();
        let start = self.resident_cursor % candidates.len().max(1);
        let looked = candidates.len().min(MAX_LOOKUPS);
        self.resident_cursor = start + looked;
        for &(key, m) in candidates.iter().cycle().skip(start).take(looked) {
            let (Some(slot), Some(a)) = (self.models.get_mut(m), self.active.get(&key)) else {
                continue;
            };
            if slot.prefix_cache {
                let request = &a.job.request;
                let resident = slot
                    .engine
                    .resident_prefix(&request.tenant, &request.prompt);
                self.sched.note_resident(key, resident);
            }
        }
    }

    /// Tells the scheduler which running sequences share blocks through the prefix cache, so
    /// those blocks count once against the pool and the tenants' quotas.
    fn report_sharing(&mut self) {
        let mut shares = Vec::new();
        for (m, slot) in self.models.iter_mut() {
            if !slot.prefix_cache {
                continue;
            }
            let sharing = slot.engine.sharing();
            if sharing.is_empty() {
                continue;
            }
            let keys: HashMap<SeqId, SeqKey> = self
                .active
                .iter()
                .filter(|(_, a)| a.job.model == m)
                .filter_map(|(&k, a)| Some((a.seq?, k)))
                .collect();
            shares.extend(
                sharing
                    .into_iter()
                    .filter_map(|(id, borrowed, shared)| Some((*keys.get(&id)?, borrowed, shared))),
            );
        }
        // Nothing shared now nor at the last report: nothing to tell.
        if shares.is_empty() && !self.shared_reported {
            return;
        }
        self.shared_reported = !shares.is_empty();
        self.sched.set_sharing(shares);
    }

    /// After a panic in a turn: every request on the device fails with an error and its blocks
    /// are freed; the engines and the scheduler are left empty and serve on.
    pub fn recover(&mut self) {
        tracing::error!(device = %self.device, requests = self.active.len(), "a step on this device panicked; its requests fail and the device keeps serving");
        let keys: Vec<SeqKey> = self.active.keys().copied().collect();
        for key in keys {
            self.fail(
                key,
                "the model failed while serving this request (see the daemon log); retry it".into(),
                Failure::Server,
            );
        }
        // A sequence the scheduler knows but no request owns (a panic between the two) would
        // hold its blocks and be planned for ever.
        for key in self.sched.keys() {
            self.sched.remove(key);
        }
    }

    /// Model `m`'s worker process was lost with every sequence it held (an operation said so).
    fn worker_lost(&mut self, m: usize) {
        // Handled here, whoever noticed it first.
        let loss = self.models[m].engine.take_loss().unwrap_or(Loss::Failed);
        self.requeue_lost(m, loss);
    }

    /// Every sequence of model `m`'s lost worker goes back to the scheduler to be recomputed on
    /// the worker that replaces it. Samplers and detokenizers are kept, so the outputs are what
    /// they would have been. After a kill at the memory limit the sequences run again one at a
    /// time, and one that was alone when it happened fails: it cannot fit.
    fn requeue_lost(&mut self, m: usize, loss: Loss) {
        let mut lost: Vec<SeqKey> = self
            .active
            .iter()
            .filter(|(_, a)| a.job.model == m && a.seq.is_some())
            .map(|(&k, _)| k)
            .collect();
        tracing::warn!(device = %self.device, model = %self.models[m].name, sequences = lost.len(), ?loss, "requeueing the sequences of a lost worker");
        if let Loss::OutOfMemory { limit_bytes } = loss {
            if let [alone] = lost[..] {
                if let Some(a) = self.active.get_mut(&alone) {
                    a.seq = None; // it died with its worker
                }
                self.fail(alone, out_of_memory(limit_bytes), Failure::Request);
                lost.clear();
            } else if !lost.is_empty() {
                tracing::warn!(device = %self.device, model = %self.models[m].name, sequences = lost.len(), "the worker went over its memory limit; its sequences run again one at a time");
                self.one_at_a_time
                    .entry(m)
                    .or_default()
                    .extend(lost.iter().copied());
                self.sched.set_max_sequences(m, 1);
            }
        }
        for key in lost {
            if let Some(a) = self.active.get_mut(&key) {
                a.seq = None;
                a.restart();
            }
            self.sched.requeue(key);
        }
    }

    /// Takes a new request in. A panic on the way (a sampler or detokenizer built from the
    /// request) fails that request alone and leaves nothing of it behind.
    fn accept(&mut self, job: Submission) {
        let key = self.next_key;
        self.next_key += 1;
        let tenant = job.request.tenant.clone();
        let queue = queue_key(&job.request);
        let events = job.events.clone();
        let accepted =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.accept_as(key, job)));
        if accepted.is_err() {
            tracing::error!(device = %self.device, %tenant, "taking a request in panicked; it fails alone");
            self.sched.remove(key);
            match self.active.remove(&key) {
                Some(a) if a.admitted => {}
                _ => self.gate.leave(&queue),
            }
            let _ = events.send(Event::Error {
                message: "the request could not be started (see the daemon log); retry it".into(),
                cause: Failure::Server,
            });
        }
    }

    fn accept_as(&mut self, key: SeqKey, job: Submission) {
        let request = &job.request;
        // A handle taken before its model was unloaded can still submit: refused, retryable
        // (a retry finds the model gone, or loaded again).
        if self.models.generation(job.model) != Some(job.generation) || self.is_retiring(job.model)
        {
            self.gate.leave(&queue_key(request));
            let _ = job.events.send(Event::Error {
                message: "the model is being unloaded by an operator; it is no longer served here"
                    .into(),
                cause: Failure::Server,
            });
            return;
        }
        let submitted = self.sched.submit(
            NewSeq {
                key,
                tenant: request.tenant.clone(),
                params: request.limits.clone(),
                model: job.model,
                prompt_len: request.prompt.len(),
                max_tokens: request.max_tokens,
            },
            self.now(),
        );
        if let Err(e) = submitted {
            self.gate.leave(&queue_key(request));
            if let Some(m) = &self.metrics {
                m.rejections
                    .with_label_values(&[
                        request.tenant.as_str(),
                        self.models.get(job.model).map_or("", |s| s.name.as_str()),
                        "unschedulable",
                    ])
                    .inc();
            }
            let _ = job.events.send(Event::Error {
                message: e.to_string(),
                cause: Failure::Request,
            });
            return;
        }
        // Between the scheduler taking the sequence and the request owning it: the worst place.
        #[cfg(test)]
        if request.tenant == super::tests::PANIC_IN_ACCEPT {
            panic!("fault injected by a test");
        }
        self.tenants_seen.insert(request.tenant.clone());
        // What the prefix cache holds of it now: the scheduler admits such requests of a
        // tenant first (see Scheduler::admission_head).
        if let Some(slot) = self.models.get_mut(job.model).filter(|s| s.prefix_cache) {
            let resident = slot
                .engine
                .resident_prefix(&request.tenant, &request.prompt);
            self.sched.note_resident(key, resident);
        }
        let active = Active {
            seq: None,
            pending: request.prompt.clone(),
            context: request.prompt.clone(),
            sampler: Sampler::new(request.params.clone()),
            detok: Detokenizer::new(request.stop.clone()),
            admitted: false,
            recomputing: 0,
            cached_tokens: 0,
            job,
        };
        self.active.insert(key, active);
    }

    /// Removes a request everywhere, freeing its blocks at once.
    fn finish(&mut self, key: SeqKey) {
        self.sched.remove(key);
        if let Some(a) = self.active.remove(&key) {
            let m = a.job.model;
            if let Some(seq) = a.seq {
                self.models[m].engine.remove_sequence(seq);
            }
            if !a.admitted {
                self.gate.leave(&queue_key(&a.job.request));
            }
            // The last of a memory kill's survivors is done: back to full batches.
            if let Some(survivors) = self.one_at_a_time.get_mut(&m) {
                survivors.remove(&key);
                if survivors.is_empty() {
                    self.one_at_a_time.remove(&m);
                    self.sched
                        .set_max_sequences(m, self.models[m].params.max_sequences);
                }
            }
        }
    }

    fn fail(&mut self, key: SeqKey, message: String, cause: Failure) {
        if let Some(a) = self.active.get(&key) {
            let _ = a.job.events.send(Event::Error { message, cause });
        }
        self.finish(key);
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqKey> = self
            .active
            .iter()
            .filter(|(_, a)| a.job.events.is_closed())
            .map(|(&k, _)| k)
            .collect();
        for key in gone {
            self.finish(key);
        }
    }

    /// Each placed model's KV blocks by tier, as the scheduler holds them.
    fn memory_report(&self) -> Vec<super::ModelMemory> {
        self.models
            .iter()
            .filter_map(|(index, slot)| {
                let used = self.sched.tier_usage(index)?;
                let p = &slot.params;
                let capacity = [p.total_blocks, p.swap_blocks, p.disk_blocks];
                Some(super::ModelMemory {
                    model: slot.name.clone(),
                    block_bytes: slot.engine.kv_block_bytes() as u64,
                    tiers: ["device", "host", "disk"]
                        .into_iter()
                        .zip(capacity.into_iter().zip(used))
                        .map(|(tier, (capacity, used))| super::TierBlocks {
                            tier: tier.into(),
                            capacity,
                            used,
                        })
                        .collect(),
                })
            })
            .collect()
    }

    /// Counts a swap of `seq`'s blocks (`None`: one that failed) into or out of `tier`.
    fn count_swap(&self, model: usize, tier: Tier, direction: &str, seq: Option<SeqId>) {
        let Some(m) = &self.metrics else {
            return;
        };
        let slot = &self.models[model];
        let labels = [slot.name.as_str(), tier.as_str(), direction];
        let Some(seq) = seq else {
            m.swap_failures.with_label_values(&labels).inc();
            return;
        };
        let blocks = slot
            .engine
            .sequence_len(seq)
            .unwrap_or(0)
            .div_ceil(slot.params.block_size.max(1));
        m.swaps.with_label_values(&labels).inc();
        m.swap_bytes
            .with_label_values(&labels)
            .inc_by((blocks * slot.engine.kv_block_bytes()) as u64);
    }

    fn labels(&self, key: SeqKey) -> Option<(String, String)> {
        self.active.get(&key).map(|a| {
            (
                a.job.request.tenant.clone(),
                self.models[a.job.model].name.clone(),
            )
        })
    }

    fn apply(&mut self, plan: StepPlan, now: f64) {
        let StepPlan {
            reject,
            preempt,
            swap_in,
            admit,
            run,
        } = plan;
        for (key, why) in reject {
            if let (Some(m), Some((tenant, model))) = (&self.metrics, self.labels(key)) {
                m.rejections
                    .with_label_values(&[tenant.as_str(), model.as_str(), "policy_reload"])
                    .inc();
            }
            self.fail(key, why.to_string(), Failure::Request);
        }
        for (key, kind) in preempt {
            if let (Some(m), Some((tenant, model))) = (&self.metrics, self.labels(key)) {
                m.preemptions
                    .with_label_values(&[tenant.as_str(), model.as_str(), kind.as_str()])
                    .inc();
            }
            let Some(a) = self.active.get_mut(&key) else {
                continue;
            };
            let model = a.job.model;
            let engine = &mut self.models[model].engine;
            let tier = match kind {
                PreemptKind::SwapDisk => Tier::Disk,
                _ => Tier::Host,
            };
            let mut swapped = None;
            let failure = match (kind, a.seq) {
                (PreemptKind::Swap | PreemptKind::SwapDisk, Some(seq)) => match match kind {
                    PreemptKind::SwapDisk => engine.swap_out_to_disk(
                        seq,
                        &a.job.request.tenant,
                        a.job.request.limits.encrypt_disk_kv,
                    ),
                    _ => engine.swap_out(seq),
                } {
                    Ok(()) => {
                        swapped = Some(Ok(seq));
                        None
                    }
                    Err(crate::engine::EngineError::WorkerLost(_)) => {
                        self.worker_lost(model);
                        continue;
                    }
                    Err(e) => {
                        // Recompute instead; the output is the same. A full disk (ENOSPC) or
                        // a failed write lands here too.
                        tracing::warn!(error = %e, tier = tier.as_str(), "swapping a sequence out failed; it will be recomputed");
                        engine.remove_sequence(seq);
                        a.seq = None;
                        a.restart();
                        self.sched.swap_failed(key);
                        swapped = Some(Err(()));
                        None
                    }
                },
                (PreemptKind::Recompute, seq) => {
                    if let Some(seq) = seq {
                        engine.remove_sequence(seq);
                    }
                    a.seq = None;
                    a.restart();
                    None
                }
                // Its worker was lost earlier in this plan: it is already back in the queue.
                (PreemptKind::Swap | PreemptKind::SwapDisk, None) => None,
            };
            match swapped {
                Some(Ok(seq)) => self.count_swap(model, tier, "out", Some(seq)),
                Some(Err(())) => self.count_swap(model, tier, "out", None),
                None => {}
            }
            if let Some(message) = failure {
                self.fail(key, message, Failure::Server);
            }
        }
        for key in swap_in {
            let Some(a) = self.active.get_mut(&key) else {
                continue;
            };
            let model = a.job.model;
            // The tier the scheduler parked it in (kept while it runs again).
            let tier = self.sched.tier_of(key).unwrap_or(Tier::Host);
            let Some(seq) = a.seq else {
                // Its worker was lost earlier in this plan: it is already back in the queue.
                continue;
            };
            let result = self.models[model].engine.swap_in(seq);
            self.count_swap(model, tier, "in", result.is_ok().then_some(seq));
            if let Err(crate::engine::EngineError::WorkerLost(_)) = result {
                self.worker_lost(model);
            } else if let (Err(e), Tier::Disk) = (&result, tier) {
                // A disk tier block that could not be read back, or failed authentication
                // (or any other failure to bring it back from disk): the sequence is
                // recomputed, with the same output.
                tracing::warn!(error = %e, "swapping a sequence in from disk failed; it will be recomputed");
                if let Some(a) = self.active.get_mut(&key) {
                    if let Some(seq) = a.seq.take() {
                        self.models[model].engine.remove_sequence(seq);
                    }
                    a.restart();
                }
                self.sched.requeue(key);
            } else if let Err(e) = result {
                tracing::error!(error = %e, "swapping a sequence in failed");
                self.fail(
                    key,
                    format!("resuming the request failed: {e}"),
                    Failure::Server,
                );
            }
        }
        for key in admit {
            let Some(model) = self.active.get(&key).map(|a| a.job.model) else {
                continue;
            };
            let slot = &mut self.models[model];
            let started = match self.active.get(&key) {
                Some(a) if slot.prefix_cache => slot
                    .engine
                    .add_sequence_cached(&a.job.request.tenant, &a.pending),
                _ => slot.engine.add_sequence().map(|seq| (seq, 0)),
            };
            let seq = match started {
                Ok((seq, held)) => {
                    if slot.prefix_cache {
                        self.prefix_cache_used(key, held);
                    }
                    seq
                }
                Err(crate::engine::EngineError::WorkerLost(_)) => {
                    self.sched.requeue(key);
                    self.worker_lost(model);
                    continue;
                }
                Err(e) => {
                    self.fail(
                        key,
                        format!("starting the request failed: {e}"),
                        Failure::Server,
                    );
                    continue;
                }
            };
            let Some(a) = self.active.get_mut(&key) else {
                continue;
            };
            a.seq = Some(seq);
            if !a.admitted {
                a.admitted = true;
                self.gate.leave(&queue_key(&a.job.request));
                if let Some(m) = &self.metrics {
                    m.queue_time
                        .with_label_values(&[
                            a.job.request.tenant.as_str(),
                            self.models[a.job.model].name.as_str(),
                        ])
                        .observe(a.job.submitted.elapsed().as_secs_f64());
                }
            }
        }
        for m in self.models.placed() {
            let batch: Vec<(SeqKey, usize)> = run
                .iter()
                .copied()
                .filter(|(k, _)| self.active.get(k).is_some_and(|a| a.job.model == m))
                .collect();
            if !batch.is_empty() {
                self.step_model(m, &batch, now);
            }
        }
    }

    /// A sequence started holding `held` tokens from the prefix cache: they are not fed
    /// again, the scheduler counts them computed, and the metrics count the query.
    fn prefix_cache_used(&mut self, key: SeqKey, held: usize) {
        let Some(a) = self.active.get_mut(&key) else {
            return;
        };
        let held = held.min(a.pending.len().saturating_sub(1));
        a.pending.drain(..held);
        a.recomputing = a.recomputing.saturating_sub(held);
        if !a.admitted {
            a.cached_tokens = held;
        }
        if let Some(m) = &self.metrics {
            let labels = [
                a.job.request.tenant.as_str(),
                self.models[a.job.model].name.as_str(),
            ];
            m.prefix_queries.with_label_values(&labels).inc();
            if held > 0 {
                m.prefix_hits.with_label_values(&labels).inc();
                m.prefix_hit_tokens
                    .with_label_values(&labels)
                    .inc_by(held as u64);
            }
        }
        self.sched.hold_cached(key, held);
    }

    /// One engine step of model `m` over `batch`, then sampling for every sequence whose
    /// pending tokens are all fed.
    fn step_model(&mut self, m: usize, batch: &[(SeqKey, usize)], now: f64) {
        let mut keys = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        for &(key, take) in batch {
            let Some(a) = self.active.get(&key) else {
                continue;
            };
            let Some(seq) = a.seq else {
                continue;
            };
            let take = take.min(a.pending.len());
            if take == 0 {
                continue;
            }
            keys.push((key, take));
            inputs.push(StepInput {
                seq,
                tokens: &a.pending[..take],
                logits: LogitsWanted::Last,
            });
        }
        let slot = &mut self.models[m];
        let outputs = match slot.engine.step(&inputs) {
            Ok(outputs) => outputs,
            Err(crate::engine::EngineError::WorkerLost(_)) => {
                self.worker_lost(m);
                return;
            }
            Err(e) => {
                // The engine rolled the step back; fail its requests, keep serving the rest.
                tracing::error!(model = %slot.name, error = %e, "engine step failed");
                let message = e.to_string();
                for (key, _) in keys {
                    self.fail(key, message.clone(), Failure::Server);
                }
                return;
            }
        };
        let tokenizer = Arc::clone(&slot.tokenizer);
        let model_name = slot.name.clone();
        // The sequences about to sample this step, by whether a grammar constrains them: one
        // look-up per sequence in the step.
        let (mut guided, mut free) = (HashSet::new(), HashSet::new());
        for (key, take) in &keys {
            if let Some(a) = self.active.get(key).filter(|a| a.pending.len() == *take) {
                if a.job.request.guide.is_some() {
                    guided.insert(*key);
                } else {
                    free.insert(*key);
                }
            }
        }
        // Their grammar masks side by side on the pool's threads (the step that used them is
        // over): one tenant's many guided sequences do not add up on this device's thread.
        if guided.len() > 1 {
            use rayon::prelude::*;
            let mut guides: Vec<&mut crate::guide::Guide> = self
                .active
                .iter_mut()
                .filter(|(key, _)| guided.contains(key))
                .filter_map(|(_, a)| a.job.request.guide.as_mut())
                .collect();
            // An error here comes back from `constrain`, which computes again.
            guides.par_iter_mut().for_each(|g| {
                let _ = g.prepare();
            });
        }
        // Free sampling (no grammar) of the sequences about to sample, side by side on the
        // pool's threads when there are several: a nucleus over a large vocabulary costs a
        // noticeable part of a big batch's step. Each sequence has its own generator, so the
        // order does not change any output.
        let mut presampled: HashMap<SeqKey, crate::engine::sampling::Sampled> = HashMap::new();
        if free.len() > 1 {
            use rayon::prelude::*;
            let logits_of: HashMap<SeqKey, &[f32]> = keys
                .iter()
                .zip(&outputs)
                .filter(|((key, _), _)| free.contains(key))
                .filter_map(|((key, _), out)| out.logits.first().map(|l| (*key, l.as_slice())))
                .collect();
            let mut work: Vec<_> = self
                .active
                .iter_mut()
                .filter_map(|(key, a)| {
                    let logits = *logits_of.get(key)?;
                    let prompt_len = a.job.request.prompt.len();
                    Some((
                        *key,
                        &mut a.sampler,
                        a.context.as_slice(),
                        prompt_len,
                        logits,
                    ))
                })
                .collect();
            presampled = work
                .par_iter_mut()
                .map(|(key, sampler, context, prompt_len, logits)| {
                    (*key, sampler.sample(logits, context, *prompt_len))
                })
                .collect();
        }
        let mut finished = Vec::new();
        for (&(key, take), mut output) in keys.iter().zip(outputs) {
            let Some(a) = self.active.get_mut(&key) else {
                continue;
            };
            a.pending.drain(..take);
            let prompt_len = a.job.request.prompt.len();
            if let Some(metrics) = &self.metrics {
                let phase = if a.recomputing > 0 {
                    "recompute"
                } else if a.context.len() == prompt_len {
                    "prefill"
                } else {
                    "decode"
                };
                metrics
                    .tokens
                    .with_label_values(&[a.job.request.tenant.as_str(), model_name.as_str(), phase])
                    .inc_by(take as u64);
            }
            a.recomputing = a.recomputing.saturating_sub(take);
            if !a.pending.is_empty() {
                self.sched.advance(key, take, false, now);
                continue; // more to feed before sampling
            }
            let Some(logits) = output.logits.first_mut() else {
                self.sched.advance(key, take, false, now);
                continue;
            };
            // The grammar's mask, then sampling, then the grammar follows the token.
            let ignore_eos = a.job.request.ignore_eos;
            let guided = a.job.request.guide.as_mut().map(|guide| {
                guide.constrain(logits)?;
                // `ignore_eos` holds under a grammar too: the output goes on while the grammar
                // allows anything else.
                if ignore_eos {
                    let eos = tokenizer.eos_ids();
                    let other = logits
                        .iter()
                        .enumerate()
                        .any(|(i, l)| l.is_finite() && !eos.contains(&(i as u32)));
                    if other {
                        for &id in eos {
                            if let Some(l) = logits.get_mut(id as usize) {
                                *l = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
                let sampled = a.sampler.sample(logits, &a.context, prompt_len);
                let complete = guide.advance(sampled.token)?;
                Ok::<_, String>((sampled, complete))
            });
            let (sampled, grammar_complete) = match guided {
                None => match presampled.remove(&key) {
                    Some(sampled) => (sampled, false),
                    None => (a.sampler.sample(logits, &a.context, prompt_len), false),
                },
                Some(Ok(guided)) => guided,
                Some(Err(message)) => {
                    self.sched.advance(key, take, false, now);
                    let _ = a.job.events.send(Event::Error {
                        message,
                        cause: Failure::Request,
                    });
                    finished.push(key);
                    continue;
                }
            };
            a.context.push(sampled.token);
            let generated = a.context.len() - prompt_len;
            let request = &a.job.request;
            let eos = !request.ignore_eos && tokenizer.eos_ids().contains(&sampled.token);
            let stop_token = request.stop_token_ids.contains(&sampled.token);
            let (text, stopped) = if eos || stop_token {
                (a.detok.finish(&tokenizer), true)
            } else {
                let delta = a.detok.push(&tokenizer, sampled.token);
                (delta.text, delta.stopped)
            };
            // A complete grammar ends the output with its last token's text.
            let (text, stopped) = if grammar_complete && !stopped {
                (text + &a.detok.finish(&tokenizer), true)
            } else {
                (text, stopped)
            };
            let length = !stopped && generated >= request.max_tokens;
            let text = if length {
                text + &a.detok.finish(&tokenizer)
            } else {
                text
            };
            if let Some(crash) = a.detok.take_crash() {
                // The model's tokenizer cannot decode this output: the request ends with that.
                self.sched.advance(key, take, false, now);
                let _ = a.job.events.send(Event::Error {
                    message: crash,
                    cause: Failure::Server,
                });
                finished.push(key);
                continue;
            }
            let sent = a.job.events.send(Event::Token {
                text,
                token: sampled.token,
                logprob: sampled.logprob,
                top: sampled.top,
            });
            let done = stopped || length;
            // The token counts against the tenant's rate even when it is the last.
            self.sched.advance(key, take, true, now);
            if sent.is_err() {
                finished.push(key); // the client went away
                continue;
            }
            if done {
                let _ = a.job.events.send(Event::Done {
                    reason: if stopped {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    },
                    prompt_tokens: prompt_len,
                    completion_tokens: generated,
                    cached_tokens: a.cached_tokens,
                });
                finished.push(key);
            } else {
                a.pending.push(sampled.token);
            }
        }
        for key in finished {
            self.finish(key);
        }
    }

    /// Publishes KV usage per tenant and model, and the scheduler's per-tenant state.
    fn publish(&mut self, now: f64, report: bool) {
        for (m, slot) in self.models.iter() {
            let block_bytes = slot.engine.kv_block_bytes() as u64;
            let mut by_tenant: HashMap<String, u64> = HashMap::new();
            for (key, a) in self.active.iter().filter(|(_, a)| a.job.model == m) {
                // A block another sequence holds first counts there.
                let blocks = a
                    .seq
                    .filter(|&s| !slot.engine.is_swapped(s))
                    .and_then(|s| slot.engine.sequence_len(s))
                    .unwrap_or(0)
                    .div_ceil(slot.params.block_size)
                    .saturating_sub(self.sched.borrowed(*key)) as u64;
                *by_tenant.entry(a.job.request.tenant.clone()).or_default() += blocks * block_bytes;
            }
            for tenant in &self.tenants_seen {
                by_tenant.entry(tenant.clone()).or_default();
            }
            let mut shared = slot
                .usage
                .kv_by_tenant
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *shared = by_tenant;
        }
        if !report {
            return;
        }
        self.reported = Some(Instant::now());
        for tenant in self.gate.tenants() {
            let wait = self.sched.rate_wait(&tenant, now);
            self.gate.set_retry_after(&tenant, wait.max(1.0));
        }
        let reports = self.sched.report(now);
        let memory = self.memory_report();
        if let Some(schedule) = &self.schedule {
            let mut schedule = schedule
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            schedule.tenants = reports.clone();
            schedule.memory = memory.clone();
        }
        let Some(m) = &self.metrics else {
            return;
        };
        for model in &memory {
            for tier in &model.tiers {
                let labels = [
                    self.device.as_str(),
                    model.model.as_str(),
                    tier.tier.as_str(),
                ];
                m.tier_capacity
                    .with_label_values(&labels)
                    .set(tier.capacity as i64);
                m.tier_free
                    .with_label_values(&labels)
                    .set(tier.capacity.saturating_sub(tier.used) as i64);
            }
        }
        for (index, slot) in self.models.iter_mut() {
            let counted = slot.engine.counters();
            let now = [
                counted.cache_evictions,
                counted.disk_auth_failures,
                counted.cold.demoted,
                counted.cold.promoted,
                counted.cold.dropped,
            ];
            let before = self.engine_counters.insert(index, now).unwrap_or_default();
            let grew = |i: usize| now[i].saturating_sub(before[i]);
            let name = slot.name.as_str();
            m.prefix_evictions
                .with_label_values(&[name])
                .inc_by(grew(0));
            m.disk_auth_failures
                .with_label_values(&[name])
                .inc_by(grew(1));
            for (i, event) in [(2, "demoted"), (3, "promoted"), (4, "dropped")] {
                m.prefix_cold
                    .with_label_values(&[name, event])
                    .inc_by(grew(i));
            }
        }
        let mut tiers: std::collections::BTreeMap<&str, [usize; 3]> = Default::default();
        for r in &reports {
            let t = tiers.entry(r.tenant.as_str()).or_default();
            t[0] += r.kv_blocks;
            t[1] += r.host_kv_blocks;
            t[2] += r.disk_kv_blocks;
        }
        for (tenant, blocks) in tiers {
            for (tier, n) in ["device", "host", "disk"].into_iter().zip(blocks) {
                m.tier_blocks
                    .with_label_values(&[self.device.as_str(), tenant, tier])
                    .set(n as i64);
            }
        }
        // A tenant's interactive and batch entries are one series each: their sums, and the
        // larger virtual counter.
        let mut by_tenant: std::collections::BTreeMap<&str, (usize, usize, usize, usize, f64)> =
            std::collections::BTreeMap::new();
        for r in &reports {
            let t = by_tenant
                .entry(r.tenant.as_str())
                .or_insert((0, 0, 0, 0, f64::NEG_INFINITY));
            t.0 += r.waiting;
            t.1 += r.running;
            t.2 += r.swapped;
            t.3 += r.kv_blocks;
            t.4 = t.4.max(r.virtual_counter);
        }
        for (tenant, (waiting, running, swapped, kv_blocks, counter)) in by_tenant {
            let labels = [self.device.as_str(), tenant];
            m.waiting.with_label_values(&labels).set(waiting as i64);
            m.running.with_label_values(&labels).set(running as i64);
            m.swapped.with_label_values(&labels).set(swapped as i64);
            m.kv_blocks.with_label_values(&labels).set(kv_blocks as i64);
            m.virtual_counter.with_label_values(&labels).set(counter);
        }
    }
}
