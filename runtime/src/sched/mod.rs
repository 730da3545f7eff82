//! The scheduler: each step, decides which sequences run (decode tokens and prefill chunks
//! under the step's token budget), which waiting requests are admitted, which running ones are
//! preempted and how (swap to host or drop and recompute), and which swapped ones come back.
//!
//! Pure logic: no backend, device, async or channel types, and no clock of its own (callers
//! pass `now` in seconds), so the simulator, the property tests and the benches drive it
//! alone. One [`Scheduler`] serves one device: every model placed on the device registers here
//! and tenants' counters and quotas span all of them. Models on a device step one at a time
//! (each plan runs the model holding the best-ranked runnable sequence), so tenants' weights
//! divide the device's time between models too.
//!
//! KV blocks are committed on demand: a sequence holds blocks for the tokens it knows (its
//! prompt, then each token as it is generated), never for `max_tokens` up front. When a model's
//! pool or a tenant's `kv_blocks` quota is overrun by that growth, the worst-ranked running
//! sequence is preempted.
//!
//! Invariants (checked by `Scheduler::check_invariants` in the tests): a model's committed
//! blocks never exceed its pool, nor its host blocks its swap space; a tenant's committed
//! device blocks never exceed its quota after a plan; a sequence is in exactly one state.
//!
//! Costs: a plan is O(R + T·A) for R running sequences, T tenants with work and A admissions
//! (plus a sort of the running set when demand exceeds the token budget); submit, advance and
//! remove are O(1) amortised.

pub mod policy;
mod queue;
pub mod quota;
pub mod sim;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::policy::PriorityClass;

pub use self::policy::{PolicyKind, SchedulingPolicy, TenantView};
use self::queue::{Queue, Queues};
pub use self::quota::{Buckets, TokenBucket};

/// The caller's name for a sequence.
pub type SeqKey = u64;

/// What the scheduler enforces for one tenant, from the policy in force when its latest
/// request arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantParams {
    pub weight: u32,
    pub class: PriorityClass,
    pub tokens_per_minute: Option<u64>,
    pub kv_blocks: Option<u64>,
    /// Host-tier blocks its swapped-out sequences may hold on a device; past it, a
    /// preemption recomputes instead of swapping.
    pub host_kv_blocks: Option<u64>,
    /// Disk-tier blocks its swapped-out sequences may hold on a device; past it (and past the
    /// host tier), a preemption recomputes.
    pub disk_kv_blocks: Option<u64>,
    /// Whether its blocks in the disk tier are sealed (AES-256-GCM).
    pub encrypt_disk_kv: bool,
}

impl Default for TenantParams {
    fn default() -> Self {
        Self {
            weight: 1,
            class: PriorityClass::Interactive,
            tokens_per_minute: None,
            kv_blocks: None,
            host_kv_blocks: None,
            disk_kv_blocks: None,
            encrypt_disk_kv: false,
        }
    }
}

/// One model placed on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    pub block_size: usize,
    /// Device KV blocks in the model's pool.
    pub total_blocks: usize,
    /// Host blocks for swapped-out sequences (0: preemption always recomputes).
    pub swap_blocks: usize,
    /// Swap rather than recompute a sequence holding at least this many tokens (the measured
    /// crossover; `usize::MAX` never swaps).
    pub swap_min_tokens: usize,
    /// Disk-tier blocks for swapped-out sequences once the host tier is full (0: none).
    pub disk_blocks: usize,
    /// Swap to disk rather than recompute a sequence holding at least this many tokens (the
    /// disk tier's measured crossover).
    pub disk_swap_min_tokens: usize,
    pub max_sequences: usize,
    pub max_batch_tokens: usize,
    /// Relative cost of one of this model's tokens (virtual counters charge it).
    pub price: f64,
    /// Commit blocks for the prompt and all of `max_tokens` at admission instead of as the
    /// sequence grows (the older runner's behaviour; kept to measure against).
    pub reserve_max_tokens: bool,
}

/// Prices of a prefill and a decode token in the virtual counters (the VTC paper prices
/// output tokens at twice input tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pricing {
    pub prefill: f64,
    pub decode: f64,
}

impl Default for Pricing {
    fn default() -> Self {
        Self {
            prefill: 1.0,
            decode: 2.0,
        }
    }
}

/// A request handed to the scheduler.
#[derive(Debug, Clone)]
pub struct NewSeq {
    pub key: SeqKey,
    pub tenant: String,
    pub params: TenantParams,
    /// Index returned by [`Scheduler::add_model`].
    pub model: usize,
    pub prompt_len: usize,
    pub max_tokens: usize,
}

/// Why a request can never be scheduled (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("the request needs {needed} KV blocks (prompt plus max_tokens) but the model has {total}; lower max_tokens or raise the model's kv_blocks")]
    TooBigForModel { needed: usize, total: usize },
    #[error("the request needs {needed} KV blocks (prompt plus max_tokens) but tenant {tenant:?} may hold {quota} (limits.kv_blocks); lower max_tokens or ask an operator to raise it")]
    OverKvQuota {
        tenant: String,
        needed: usize,
        quota: u64,
    },
    #[error("the prompt has {prompt} tokens but tenant {tenant:?} may use {per_minute} per minute (limits.tokens_per_minute); shorten the prompt or ask an operator to raise it")]
    OverTokenRate {
        tenant: String,
        prompt: usize,
        per_minute: u64,
    },
    #[error("sequence {0} is already scheduled")]
    Duplicate(SeqKey),
    #[error("model {0} is not placed on this device")]
    UnknownModel(usize),
}

/// A swap tier: where a preempted sequence's KV blocks wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Host,
    Disk,
}

impl Tier {
    pub const ALL: [Tier; 2] = [Tier::Host, Tier::Disk];

    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }
}

/// How a sequence is preempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptKind {
    /// Its KV blocks move to host memory and come back later as they were.
    Swap,
    /// Its KV blocks move to the disk tier (the host tier being full) and come back later.
    SwapDisk,
    /// Its KV blocks are dropped; it is prefilled again (prompt and generated tokens) later.
    Recompute,
}

impl PreemptKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PreemptKind::Swap => "swap",
            PreemptKind::SwapDisk => "swap_disk",
            PreemptKind::Recompute => "recompute",
        }
    }
}

/// One step's decisions, applied in this order: reject, preempt, swap in, admit, run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    /// Queued requests that can no longer run (a policy reload lowered their tenant's limits);
    /// the scheduler has forgotten them.
    pub reject: Vec<(SeqKey, Reject)>,
    pub preempt: Vec<(SeqKey, PreemptKind)>,
    pub swap_in: Vec<SeqKey>,
    /// Sequences to start in the engine: new requests, or preempted ones to recompute (their
    /// prompt and generated tokens are fed again).
    pub admit: Vec<SeqKey>,
    /// Tokens to feed each sequence this step: 1 to decode, more for a prefill chunk.
    pub run: Vec<(SeqKey, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Swapped,
}

#[derive(Debug, Clone)]
struct Seq {
    tenant: usize,
    model: usize,
    arrival: u64,
    prompt_len: usize,
    max_tokens: usize,
    /// Tokens in the KV cache (device, or host while swapped).
    computed: usize,
    /// Tokens known: the prompt plus every generated token.
    target: usize,
    /// Tokens already charged to the tenant (recomputation is not charged twice).
    charged: usize,
    /// Blocks committed on the device while running, or held in its tier while swapped.
    blocks: usize,
    /// Of its device blocks, as the engine last said: those an earlier running sequence also
    /// holds (counted there, so not again), and those any other running sequence holds.
    borrowed: usize,
    sharing: usize,
    state: State,
    /// Where it waits while swapped.
    tier: Tier,
    /// Prompt tokens the device's prefix cache held for it when it was queued (a hint).
    resident: usize,
    /// Times a later request of its tenant with a resident prefix was admitted before it.
    bypassed: u32,
    /// Whether its prompt was charged to the token bucket.
    admitted: bool,
}

/// Counters kept per tenant, for the metrics and `accelctl top`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantStats {
    pub prefill_tokens: u64,
    /// Prompt tokens held from the prefix cache instead of computed.
    pub cached_tokens: u64,
    pub decode_tokens: u64,
    pub admitted: u64,
    pub preempted_swap: u64,
    pub preempted_recompute: u64,
}

#[derive(Debug)]
struct Tenant {
    name: String,
    params: TenantParams,
    counter: f64,
    turns: f64,
    queues: Queues,
    running: usize,
    /// Device blocks committed across its running sequences.
    blocks: usize,
    /// Of those, blocks its sequences share with one of its earlier ones (prefix-cache
    /// blocks counted once): what it holds on the device is `blocks - shared`.
    shared: usize,
    /// Blocks its swapped-out sequences hold in each tier (by [`Tier::index`]).
    parked: [usize; 2],
    /// Sequences of any state.
    live: usize,
    /// Its limits changed: queued requests are checked against them again.
    recheck: bool,
    stats: TenantStats,
    /// The same tenant's work in the other class: the two share its quotas.
    sibling: Option<usize>,
}

#[derive(Debug)]
struct ModelState {
    params: ModelParams,
    /// Device blocks committed across its running sequences, each counting its own.
    used_blocks: usize,
    /// Of those, blocks counted more than once (held by several sequences through the prefix
    /// cache) less one per block, as the engine last said and lowered since by sequences that
    /// left: never more than the truth, so the pool is never overcommitted.
    shared: usize,
    /// Blocks its swapped-out sequences hold in each tier.
    used_parked: [usize; 2],
    /// Tier blocks freed by swap-ins of the plan being made: the runner swaps out before it
    /// swaps in, so swap-outs of the same plan may not use them.
    freed_in_plan: [usize; 2],
    running: usize,
    /// Unloaded: nothing is submitted to it, and the next model placed takes its index.
    retired: bool,
    /// Cannot serve for now (its worker is being replaced): nothing of it is admitted.
    paused: bool,
}

/// What one tenant has on this device now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantReport {
    pub tenant: String,
    pub weight: u32,
    pub class: PriorityClass,
    pub waiting: usize,
    pub running: usize,
    pub swapped: usize,
    pub kv_blocks: usize,
    /// Host-tier blocks its swapped-out sequences hold.
    pub host_kv_blocks: usize,
    /// Disk-tier blocks its swapped-out sequences hold.
    #[serde(default)]
    pub disk_kv_blocks: usize,
    /// Weighted service so far (the fair-share policy's virtual counter).
    pub virtual_counter: f64,
    /// Tokens left in its `tokens_per_minute` bucket, if it has one.
    pub bucket_tokens: Option<f64>,
    #[serde(flatten)]
    pub stats: TenantStats,
}

/// The scheduler of one device.
#[derive(Debug)]
pub struct Scheduler {
    policy: Box<dyn SchedulingPolicy>,
    pricing: Pricing,
    models: Vec<ModelState>,
    /// One entry per tenant and class: a tenant's batch jobs queue and share the device
    /// apart from its interactive requests, behind every tenant's interactive work, while
    /// both count against the tenant's one `kv_blocks` quota and token bucket.
    tenants: Vec<Tenant>,
    by_name: HashMap<(String, PriorityClass), usize>,
    seqs: HashMap<SeqKey, Seq>,
    running: Vec<SeqKey>,
    /// Token buckets by tenant; shared by every device's scheduler so a tenant's
    /// `tokens_per_minute` holds across devices.
    buckets: Buckets,
    next_arrival: u64,
    /// System virtual time: the least counter among tenants with work, never decreasing. A
    /// tenant returning from idle starts here, so idleness banks no credit.
    counter_floor: f64,
    turns_floor: f64,
}

/// Checks that a request could ever run on `model`: its prompt and `max_tokens` fit the
/// model's pool and the tenant's `kv_blocks`, and its prompt fits the tenant's token bucket.
pub fn check(model: &ModelParams, seq: &NewSeq) -> Result<(), Reject> {
    let needed = blocks_for(
        seq.prompt_len.saturating_add(seq.max_tokens),
        model.block_size,
    );
    if needed > model.total_blocks {
        return Err(Reject::TooBigForModel {
            needed,
            total: model.total_blocks,
        });
    }
    if let Some(quota) = seq.params.kv_blocks {
        if needed as u64 > quota {
            return Err(Reject::OverKvQuota {
                tenant: seq.tenant.clone(),
                needed,
                quota,
            });
        }
    }
    if let Some(per_minute) = seq.params.tokens_per_minute {
        if seq.prompt_len as u64 > per_minute {
            return Err(Reject::OverTokenRate {
                tenant: seq.tenant.clone(),
                prompt: seq.prompt_len,
                per_minute,
            });
        }
    }
    Ok(())
}

/// Takes a running sequence out of the running set and its model's and tenant's ledgers.
fn leave_running(
    model: &mut ModelState,
    tenant: &mut Tenant,
    running: &mut Vec<SeqKey>,
    seq: &Seq,
    key: SeqKey,
) {
    model.used_blocks -= seq.blocks;
    // Each block it shared loses a holder: the model's double count falls by exactly that
    // many (by more than the truth where two sharers leave in one plan: safe). Its tenant's,
    // counted across both classes, likewise.
    model.shared = model
        .shared
        .saturating_sub(seq.sharing)
        .min(model.used_blocks);
    model.running -= 1;
    tenant.running -= 1;
    tenant.blocks -= seq.blocks;
    tenant.shared = tenant.shared.saturating_sub(seq.sharing).min(tenant.blocks);
    if let Some(i) = running.iter().position(|&k| k == key) {
        running.swap_remove(i);
    }
}

impl ModelState {
    /// Device blocks its running sequences hold, a block several hold counted once.
    fn held(&self) -> usize {
        self.used_blocks - self.shared.min(self.used_blocks)
    }
}

/// Waiting requests behind a tenant's front that admission looks at for one whose prompt the
/// prefix cache holds.
const ADMISSION_LOOKAHEAD: usize = 8;

fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size.max(1))
}

fn class_rank(class: PriorityClass) -> u8 {
    match class {
        PriorityClass::Interactive => 0,
        PriorityClass::Batch => 1,
    }
}

impl Scheduler {
    pub fn new(policy: PolicyKind, pricing: Pricing) -> Self {
        Self {
            policy: policy.build(),
            pricing,
            models: Vec::new(),
            tenants: Vec::new(),
            by_name: HashMap::new(),
            seqs: HashMap::new(),
            running: Vec::new(),
            buckets: Arc::new(Mutex::new(HashMap::new())),
            next_arrival: 0,
            counter_floor: 0.0,
            turns_floor: 0.0,
        }
    }

    /// Uses `buckets` for tenants' token buckets (the same map for every device, with one
    /// clock).
    pub fn with_buckets(mut self, buckets: Buckets) -> Self {
        self.buckets = buckets;
        self
    }

    /// Places a model on this device; returns its index, that of a retired model if there is
    /// one (so a node that loads and unloads models for ever keeps a bounded table).
    pub fn add_model(&mut self, params: ModelParams) -> usize {
        let state = ModelState {
            params,
            used_blocks: 0,
            shared: 0,
            used_parked: [0; 2],
            freed_in_plan: [0; 2],
            running: 0,
            retired: false,
            paused: false,
        };
        if let Some(i) = self.models.iter().position(|m| m.retired) {
            self.models[i] = state;
            return i;
        }
        self.models.push(state);
        self.models.len() - 1
    }

    /// Takes a model off this device. Its sequences must be gone first (the runner ends
    /// them): a model with any is kept, and the error says how many.
    pub fn retire_model(&mut self, model: usize) -> Result<(), usize> {
        let held = self.seqs.values().filter(|s| s.model == model).count();
        if held > 0 {
            return Err(held);
        }
        if let Some(m) = self.models.get_mut(model) {
            m.retired = true;
            m.used_blocks = 0;
            m.used_parked = [0; 2];
            m.running = 0;
        }
        for t in &mut self.tenants {
            t.queues.clear_model(model);
        }
        Ok(())
    }

    /// Whether `model` is placed here and not retired.
    pub fn has_model(&self, model: usize) -> bool {
        self.models.get(model).is_some_and(|m| !m.retired)
    }

    /// Admits nothing of `model` while `paused` (its engine cannot serve yet); what already
    /// runs is the caller's to requeue. Its tenants' other work is admitted meanwhile.
    pub fn pause_model(&mut self, model: usize, paused: bool) {
        if let Some(m) = self.models.get_mut(model) {
            m.paused = paused;
        }
    }

    /// Runs at most `n` of a model's sequences at once from the next plan on (at least one);
    /// sequences already running over it keep running.
    pub fn set_max_sequences(&mut self, model: usize, n: usize) {
        if let Some(m) = self.models.get_mut(model) {
            m.params.max_sequences = n.max(1);
        }
    }

    /// Device blocks a model's running sequences hold (a block several hold counted once).
    pub fn used_blocks(&self, model: usize) -> usize {
        self.models.get(model).map_or(0, ModelState::held)
    }

    /// Of a running sequence's blocks, those counted for an earlier one, as last reported and
    /// accepted (0 for any other sequence).
    pub fn borrowed(&self, key: SeqKey) -> usize {
        self.seqs
            .get(&key)
            .filter(|s| s.state == State::Running)
            .map_or(0, |s| s.borrowed)
    }

    /// What the engines say their running sequences share through the prefix cache, for
    /// every model at once: per sequence, how many of its blocks an earlier running sequence
    /// holds too (`borrowed`), and how many any other holds (`sharing`). Blocks counted
    /// already are not counted again against a pool or a tenant's `kv_blocks`. Sequences not
    /// named share nothing; numbers past what a sequence holds are cut to it.
    pub fn set_sharing(&mut self, shares: impl IntoIterator<Item = (SeqKey, usize, usize)>) {
        for key in &self.running {
            if let Some(seq) = self.seqs.get_mut(key) {
                seq.borrowed = 0;
                seq.sharing = 0;
            }
        }
        for (key, borrowed, sharing) in shares {
            if let Some(seq) = self
                .seqs
                .get_mut(&key)
                .filter(|s| s.state == State::Running)
            {
                seq.sharing = sharing.min(seq.blocks);
                seq.borrowed = borrowed.min(seq.sharing);
            }
        }
        // Blocks are shared only within one cache scope: a model and a tenant's name (both
        // its classes). A report that does not add up is cut to what it could be there:
        // blocks counted twice or more, less one each, are at most the holdings counted less
        // the largest one. Past that, the latest borrowers lose their discount first.
        let mut scopes: HashMap<(usize, &str), Vec<SeqKey>> = HashMap::new();
        for &key in &self.running {
            if let Some(seq) = self
                .seqs
                .get(&key)
                .filter(|s| s.borrowed > 0 || s.sharing > 0)
            {
                let name = self.tenants[seq.tenant].name.as_str();
                scopes.entry((seq.model, name)).or_default().push(key);
            }
        }
        let mut cuts = Vec::new();
        for mut keys in scopes.into_values() {
            let of = |k: &SeqKey| self.seqs.get(k).map_or((0, 0), |s| (s.borrowed, s.sharing));
            let borrowed: usize = keys.iter().map(|k| of(k).0).sum();
            let sharing: usize = keys.iter().map(|k| of(k).1).sum();
            let most = keys.iter().map(|k| of(k).1).max().unwrap_or(0);
            let mut excess = borrowed.saturating_sub(sharing - most);
            keys.sort_unstable_by(|a, b| b.cmp(a));
            for key in keys {
                let cut = excess.min(of(&key).0);
                if cut > 0 {
                    cuts.push((key, cut));
                    excess -= cut;
                }
            }
        }
        for (key, cut) in cuts {
            if let Some(seq) = self.seqs.get_mut(&key) {
                seq.borrowed -= cut;
            }
        }
        let mut model_shared = vec![0; self.models.len()];
        let mut tenant_shared = vec![0; self.tenants.len()];
        for seq in self.running.iter().filter_map(|k| self.seqs.get(k)) {
            model_shared[seq.model] += seq.borrowed;
            tenant_shared[seq.tenant] += seq.borrowed;
        }
        for (model, shared) in self.models.iter_mut().zip(model_shared) {
            model.shared = shared.min(model.used_blocks);
        }
        for (tenant, shared) in self.tenants.iter_mut().zip(tenant_shared) {
            tenant.shared = shared.min(tenant.blocks);
        }
    }

    /// Tokens held by a model's running sequences (for the utilisation measurement).
    pub fn live_tokens(&self, model: usize) -> usize {
        self.running
            .iter()
            .map(|k| &self.seqs[k])
            .filter(|s| s.model == model)
            .map(|s| s.target)
            .sum()
    }

    /// Every sequence known, in no particular order.
    pub fn keys(&self) -> Vec<SeqKey> {
        self.seqs.keys().copied().collect()
    }

    /// Sequences known (waiting, running or swapped).
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Device blocks a tenant holds in both classes (what its `kv_blocks` quota bounds), a
    /// block several of its sequences hold counted once.
    fn quota_blocks(&self, t: usize) -> usize {
        let held = |t: &Tenant| t.blocks - t.shared.min(t.blocks);
        let tenant = &self.tenants[t];
        held(tenant) + tenant.sibling.map_or(0, |s| held(&self.tenants[s]))
    }

    /// Blocks a tenant holds in a tier in both classes (what its `host_kv_blocks` or
    /// `disk_kv_blocks` bounds).
    fn tier_quota_blocks(&self, t: usize, tier: Tier) -> usize {
        let tenant = &self.tenants[t];
        let i = tier.index();
        tenant.parked[i] + tenant.sibling.map_or(0, |s| self.tenants[s].parked[i])
    }

    /// A tenant's entries: its interactive one first, then its batch one.
    fn entries<'a>(&'a self, name: &'a str) -> impl Iterator<Item = usize> + 'a {
        [PriorityClass::Interactive, PriorityClass::Batch]
            .into_iter()
            .filter_map(move |class| self.by_name.get(&(name.to_owned(), class)).copied())
    }

    fn tenant_index(&mut self, name: &str, params: &TenantParams, now: f64) -> usize {
        if let Some(&i) = self.by_name.get(&(name.to_owned(), params.class)) {
            let t = &mut self.tenants[i];
            if t.params != *params {
                // The policy was reloaded: the latest request carries what is in force.
                if let Some(tpm) = params.tokens_per_minute {
                    quota::lock(&self.buckets)
                        .entry(name.to_owned())
                        .and_modify(|b| b.set_capacity(tpm))
                        .or_insert_with(|| TokenBucket::new(tpm, now));
                }
                t.params = params.clone();
                t.recheck = true;
            }
            return i;
        }
        if let Some(tpm) = params.tokens_per_minute {
            quota::lock(&self.buckets)
                .entry(name.to_owned())
                .or_insert_with(|| TokenBucket::new(tpm, now));
        }
        self.tenants.push(Tenant {
            name: name.to_owned(),
            params: params.clone(),
            counter: self.counter_floor,
            turns: self.turns_floor,
            queues: Queues::default(),
            running: 0,
            blocks: 0,
            shared: 0,
            parked: [0; 2],
            live: 0,
            recheck: false,
            stats: TenantStats::default(),
            sibling: None,
        });
        let index = self.tenants.len() - 1;
        let other = match params.class {
            PriorityClass::Interactive => PriorityClass::Batch,
            PriorityClass::Batch => PriorityClass::Interactive,
        };
        if let Some(&sibling) = self.by_name.get(&(name.to_owned(), other)) {
            self.tenants[index].sibling = Some(sibling);
            self.tenants[sibling].sibling = Some(index);
        }
        self.by_name.insert((name.to_owned(), params.class), index);
        index
    }

    /// Checks that a request could ever run, without queuing it.
    pub fn check(&self, seq: &NewSeq) -> Result<(), Reject> {
        let model = self
            .models
            .get(seq.model)
            .filter(|m| !m.retired)
            .ok_or(Reject::UnknownModel(seq.model))?;
        check(&model.params, seq)
    }

    /// Queues a request.
    pub fn submit(&mut self, seq: NewSeq, now: f64) -> Result<(), Reject> {
        self.check(&seq)?;
        if self.seqs.contains_key(&seq.key) {
            return Err(Reject::Duplicate(seq.key));
        }
        let t = self.tenant_index(&seq.tenant, &seq.params, now);
        let tenant = &mut self.tenants[t];
        if tenant.live == 0 {
            // Back from idle: no credit for the time away.
            tenant.counter = tenant.counter.max(self.counter_floor);
            tenant.turns = tenant.turns.max(self.turns_floor);
        }
        tenant.live += 1;
        tenant
            .queues
            .push(Queue::Waiting, seq.model, self.next_arrival, seq.key);
        self.seqs.insert(
            seq.key,
            Seq {
                tenant: t,
                model: seq.model,
                arrival: self.next_arrival,
                prompt_len: seq.prompt_len,
                max_tokens: seq.max_tokens,
                computed: 0,
                target: seq.prompt_len,
                charged: 0,
                blocks: 0,
                borrowed: 0,
                sharing: 0,
                state: State::Waiting,
                tier: Tier::Host,
                resident: 0,
                bypassed: 0,
                admitted: false,
            },
        );
        self.next_arrival += 1;
        Ok(())
    }

    /// Before running sequence `key` leaves: the same tenant's other class shares its cache
    /// scope, so its sequences may have borrowed this one's blocks; their discount goes too
    /// (its own entry's goes in [`leave_running`]). Lowering more than the truth is safe.
    fn lower_sibling_discount(&mut self, key: SeqKey) {
        let Some(seq) = self.seqs.get(&key).filter(|s| s.state == State::Running) else {
            return;
        };
        let sharing = seq.sharing;
        if let Some(sibling) = self.tenants[seq.tenant].sibling {
            let sibling = &mut self.tenants[sibling];
            sibling.shared = sibling.shared.saturating_sub(sharing);
        }
    }

    /// Forgets a sequence (finished, cancelled or failed) and frees what it held.
    pub fn remove(&mut self, key: SeqKey) {
        self.lower_sibling_discount(key);
        let Some(seq) = self.seqs.remove(&key) else {
            return;
        };
        let tenant = &mut self.tenants[seq.tenant];
        tenant.live -= 1;
        let model = &mut self.models[seq.model];
        match seq.state {
            // Left in its queue; skipped when it reaches the head.
            State::Waiting => {}
            State::Running => leave_running(model, tenant, &mut self.running, &seq, key),
            State::Swapped => unpark(model, tenant, &seq),
        }
    }

    /// Records a step's work on a sequence: `fed` tokens went into its cache and, if
    /// `sampled`, one new token was generated (and is the next to feed, unless the caller
    /// removes the finished sequence before the next plan). Generated tokens count against
    /// the tenant's token bucket.
    pub fn advance(&mut self, key: SeqKey, fed: usize, sampled: bool, now: f64) {
        let Some(seq) = self.seqs.get_mut(&key) else {
            return;
        };
        if seq.state != State::Running {
            return;
        }
        seq.computed = (seq.computed + fed).min(seq.target);
        let model = &mut self.models[seq.model];
        let tenant = &mut self.tenants[seq.tenant];
        if seq.computed > seq.charged {
            let prefill = seq.prompt_len.min(seq.computed) - seq.prompt_len.min(seq.charged);
            let decode = (seq.computed - seq.charged) - prefill;
            seq.charged = seq.computed;
            // The prompt was charged when the sequence was admitted.
            let cost = decode as f64 * self.pricing.decode * model.params.price;
            tenant.counter += cost / f64::from(tenant.params.weight.max(1));
            tenant.stats.prefill_tokens += prefill as u64;
            tenant.stats.decode_tokens += decode as u64;
        }
        if sampled {
            seq.target += 1;
            if tenant.params.tokens_per_minute.is_some() {
                if let Some(bucket) = quota::lock(&self.buckets).get_mut(&tenant.name) {
                    bucket.charge(1, now);
                }
            }
            // The new token needs a slot: commit a block when it crosses a boundary. The
            // next plan preempts someone if this overruns the pool or the tenant's quota.
            let blocks = blocks_for(seq.target, model.params.block_size);
            if blocks > seq.blocks {
                let grow = blocks - seq.blocks;
                seq.blocks = blocks;
                model.used_blocks += grow;
                tenant.blocks += grow;
            }
        }
    }

    /// A sequence just admitted holds `tokens` of its context from the prefix cache: they
    /// count as computed and never as prefill work. What its first admission charged the
    /// tenant's counter for them (the whole prompt is charged at admission, before the cache
    /// is asked) is given back, since nothing computed them; the token bucket keeps them, as
    /// rate limits count prompt tokens however they are served.
    pub fn hold_cached(&mut self, key: SeqKey, tokens: usize) {
        let Some(seq) = self.seqs.get_mut(&key) else {
            return;
        };
        if seq.state != State::Running {
            return;
        }
        let tokens = tokens.min(seq.target - seq.computed);
        seq.computed += tokens;
        // Only tokens never charged before: after a preemption they were computed and
        // charged once already, and stay so.
        let uncharged_before = seq.charged;
        seq.charged = seq.charged.max(seq.computed);
        let refunded = seq.prompt_len.min(seq.charged) - seq.prompt_len.min(uncharged_before);
        let model = &self.models[seq.model];
        let tenant = &mut self.tenants[seq.tenant];
        tenant.counter -= refunded as f64 * self.pricing.prefill * model.params.price
            / f64::from(tenant.params.weight.max(1));
        tenant.stats.cached_tokens += tokens as u64;
    }

    fn view(&self, t: usize) -> TenantView {
        let tenant = &self.tenants[t];
        let head_arrival = tenant.queues.earliest();
        TenantView {
            weight: tenant.params.weight.max(1),
            counter: tenant.counter,
            turns: tenant.turns,
            head_arrival,
        }
    }

    /// Whether `need` blocks and one more sequence would fit model `m` once every batch
    /// sequence running on it were preempted.
    fn room_after_batch(&self, m: usize, need: usize) -> bool {
        let model = &self.models[m];
        // What preempting them would free: their blocks no other sequence holds.
        let (batch_blocks, batch_seqs) = self
            .running
            .iter()
            .map(|k| &self.seqs[k])
            .filter(|s| s.model == m && self.tenants[s.tenant].params.class == PriorityClass::Batch)
            .fold((0, 0), |(b, n), s| {
                (b + (s.blocks - s.sharing.min(s.blocks)), n + 1)
            });
        model.running - batch_seqs < model.params.max_sequences
            && model.held().saturating_sub(batch_blocks) + need <= model.params.total_blocks
    }

    /// Rank of a tenant: class first, then the policy's key. Smaller goes first.
    fn rank(&self, t: usize) -> (u8, f64, u64) {
        let (a, b) = self.policy.key(&self.view(t));
        (class_rank(self.tenants[t].params.class), a, b)
    }

    fn seq_rank(&self, key: SeqKey) -> (u8, f64, u64, u64) {
        let seq = &self.seqs[&key];
        let tenant = &self.tenants[seq.tenant];
        let (a, _) = self.policy.key(&self.view(seq.tenant));
        (class_rank(tenant.params.class), a, seq.arrival, key)
    }

    /// The running sequence to preempt first among those `filter` accepts: the worst-ranked
    /// tenant's latest arrival.
    fn victim(&self, filter: impl Fn(&Seq) -> bool) -> Option<SeqKey> {
        self.running
            .iter()
            .copied()
            .filter(|k| filter(&self.seqs[k]))
            .max_by(|&a, &b| {
                self.seq_rank(a)
                    .partial_cmp(&self.seq_rank(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
    }

    fn preempt(&mut self, key: SeqKey, plan: &mut StepPlan) {
        let Some(t) = self.seqs.get(&key).map(|s| s.tenant) else {
            return;
        };
        // The tenant's tiers, each counted with its other class's as its device quota is.
        let room = Tier::ALL.map(|tier| {
            let limit = match tier {
                Tier::Host => self.tenants[t].params.host_kv_blocks,
                Tier::Disk => self.tenants[t].params.disk_kv_blocks,
            };
            let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
            limit.saturating_sub(self.tier_quota_blocks(t, tier))
        });
        self.lower_sibling_discount(key);
        let Some(seq) = self.seqs.get_mut(&key) else {
            return;
        };
        let model = &mut self.models[seq.model];
        let tenant = &mut self.tenants[seq.tenant];
        leave_running(model, tenant, &mut self.running, seq, key);
        let blocks = blocks_for(seq.computed, model.params.block_size);
        let swapped_in = plan.swap_in.contains(&key);
        // Swapped in earlier in this plan: it may only go back where it came from (the runner
        // is not told, so its blocks never moved).
        let tiers: &[Tier] = if swapped_in {
            std::slice::from_ref(&seq.tier)
        } else {
            &Tier::ALL
        };
        let target = tiers.iter().copied().find(|&tier| {
            let (capacity, min_tokens) = match tier {
                Tier::Host => (model.params.swap_blocks, model.params.swap_min_tokens),
                Tier::Disk => (model.params.disk_blocks, model.params.disk_swap_min_tokens),
            };
            let i = tier.index();
            seq.computed >= min_tokens
                && seq.computed > 0
                && model.used_parked[i] + model.freed_in_plan[i] + blocks <= capacity
                && blocks <= room[i]
        });
        let arrival = seq.arrival;
        // Started earlier in this same plan: undo the start instead of telling the runner.
        let fresh = plan.admit.contains(&key);
        plan.admit.retain(|&k| k != key);
        plan.swap_in.retain(|&k| k != key);
        let tell = !(fresh || (swapped_in && target.is_some()));
        let (queue, m) = if let Some(tier) = target {
            model.used_parked[tier.index()] += blocks;
            tenant.parked[tier.index()] += blocks;
            seq.blocks = blocks;
            seq.state = State::Swapped;
            seq.tier = tier;
            if tell {
                tenant.stats.preempted_swap += 1;
                let kind = match tier {
                    Tier::Host => PreemptKind::Swap,
                    Tier::Disk => PreemptKind::SwapDisk,
                };
                plan.preempt.push((key, kind));
            }
            (Queue::Swapped, seq.model)
        } else {
            seq.blocks = 0;
            seq.computed = 0;
            seq.state = State::Waiting;
            if tell {
                tenant.stats.preempted_recompute += 1;
                plan.preempt.push((key, PreemptKind::Recompute));
            }
            (Queue::Waiting, seq.model)
        };
        // Preempted work goes back ahead of later arrivals.
        tenant.queues.push(queue, m, arrival, key);
    }

    /// Blocks a sequence commits on the device while it runs.
    fn commitment(&self, seq: &Seq) -> usize {
        let params = &self.models[seq.model].params;
        let tokens = if params.reserve_max_tokens {
            seq.prompt_len + seq.max_tokens
        } else {
            seq.target
        };
        blocks_for(tokens, params.block_size)
    }

    /// A swap-out the runner could not do: the sequence is recomputed instead.
    pub fn swap_failed(&mut self, key: SeqKey) {
        let Some(seq) = self.seqs.get_mut(&key) else {
            return;
        };
        if seq.state != State::Swapped {
            return;
        }
        let model = &mut self.models[seq.model];
        let tenant = &mut self.tenants[seq.tenant];
        unpark(model, tenant, seq);
        seq.blocks = 0;
        seq.computed = 0;
        seq.state = State::Waiting;
        tenant.stats.preempted_recompute += 1;
        tenant.queues.remove(Queue::Swapped, seq.model, key);
        tenant
            .queues
            .push(Queue::Waiting, seq.model, seq.arrival, key);
    }

    /// The device lost this sequence's cache (its worker process was replaced): it waits to be
    /// recomputed, ahead of later arrivals, like a sequence preempted by recompute.
    pub fn requeue(&mut self, key: SeqKey) {
        self.lower_sibling_discount(key);
        let Some(seq) = self.seqs.get_mut(&key) else {
            return;
        };
        let model = &mut self.models[seq.model];
        let tenant = &mut self.tenants[seq.tenant];
        match seq.state {
            State::Waiting => return,
            State::Running => leave_running(model, tenant, &mut self.running, seq, key),
            State::Swapped => {
                unpark(model, tenant, seq);
                tenant.queues.remove(Queue::Swapped, seq.model, key);
            }
        }
        seq.blocks = 0;
        seq.computed = 0;
        seq.state = State::Waiting;
        tenant.stats.preempted_recompute += 1;
        tenant
            .queues
            .push(Queue::Waiting, seq.model, seq.arrival, key);
    }

    /// Forgets the queued requests of tenants whose limits changed and that can no longer run.
    fn recheck(&mut self, plan: &mut StepPlan) {
        for t in 0..self.tenants.len() {
            if !std::mem::take(&mut self.tenants[t].recheck) {
                continue;
            }
            let tenant = &self.tenants[t];
            let mut rejected = Vec::new();
            for key in tenant.queues.keys() {
                let Some(seq) = self.seqs.get(&key) else {
                    continue;
                };
                if seq.state == State::Running {
                    continue;
                }
                let mut params = tenant.params.clone();
                if seq.admitted {
                    params.tokens_per_minute = None; // its prompt was already charged
                }
                let request = NewSeq {
                    key,
                    tenant: tenant.name.clone(),
                    params,
                    model: seq.model,
                    prompt_len: seq.prompt_len,
                    max_tokens: seq.max_tokens,
                };
                if let Err(e) = check(&self.models[seq.model].params, &request) {
                    rejected.push((key, e));
                }
            }
            for (key, e) in rejected {
                self.remove(key);
                plan.reject.push((key, e));
            }
        }
    }

    /// The tier a sequence was last swapped out to (its blocks are there while it is swapped).
    pub fn tier_of(&self, key: SeqKey) -> Option<Tier> {
        self.seqs.get(&key).map(|s| s.tier)
    }

    /// The waiting requests whose resident prefix admission looks at (each tenant's first
    /// few per model; see [`Scheduler::admission_head`]), with their models: the ones whose
    /// hint is worth refreshing as the cache changes.
    pub fn resident_candidates(&self) -> Vec<(SeqKey, usize)> {
        let mut out = Vec::new();
        for tenant in &self.tenants {
            for m in 0..self.models.len() {
                let front = tenant.queues.waiting_front(m).into_iter();
                let behind = tenant.queues.waiting_behind_front(m, ADMISSION_LOOKAHEAD);
                out.extend(
                    front
                        .chain(behind)
                        .filter(|k| {
                            self.seqs
                                .get(k)
                                .is_some_and(|s| s.state == State::Waiting && s.model == m)
                        })
                        .map(|k| (k, m)),
                );
            }
        }
        out
    }

    /// Notes how many of a queued request's prompt tokens the device's prefix cache holds now
    /// (see [`Scheduler::admission_head`]).
    pub fn note_resident(&mut self, key: SeqKey, tokens: usize) {
        if let Some(seq) = self.seqs.get_mut(&key) {
            seq.resident = tokens;
        }
    }

    /// The tenant's next sequence to admit: its earliest (as [`Scheduler::head`]), unless
    /// that is a waiting request with nothing of its prompt resident and one of the next few
    /// of the same tenant and model has a resident prefix and needs no more blocks. That one
    /// goes first: its cached blocks are used before they are evicted, and it computes less.
    /// Only the tenant's own order changes (which tenant goes next is the policy's), and a
    /// request is passed over at most `MAX_BYPASSES` times.
    fn admission_head(&mut self, t: usize, open: impl Fn(usize) -> bool) -> Option<SeqKey> {
        const MAX_BYPASSES: u32 = 4;
        let front = self.head(t, open)?;
        let seq = &self.seqs[&front];
        if seq.state != State::Waiting || seq.resident > 0 || seq.bypassed >= MAX_BYPASSES {
            return Some(front);
        }
        let (model, need) = (seq.model, self.commitment(seq));
        let better = self.tenants[t]
            .queues
            .waiting_behind_front(model, ADMISSION_LOOKAHEAD)
            .filter_map(|k| Some((k, self.seqs.get(&k)?)))
            .filter(|(_, s)| {
                s.state == State::Waiting
                    && s.tenant == t
                    && s.resident > 0
                    && self.commitment(s) <= need
            })
            // The most held; of equals, the earliest.
            .min_by_key(|(_, s)| std::cmp::Reverse(s.resident))
            .map(|(k, _)| k);
        Some(better.unwrap_or(front))
    }

    /// A tenant's earliest queued sequence for a model that `open` accepts.
    fn head(&mut self, t: usize, open: impl Fn(usize) -> bool) -> Option<SeqKey> {
        let seqs = &self.seqs;
        self.tenants[t].queues.head(open, |k, queue| {
            seqs.get(&k).is_some_and(|s| {
                s.state
                    == match queue {
                        Queue::Swapped => State::Swapped,
                        Queue::Waiting => State::Waiting,
                    }
            })
        })
    }

    /// Decides one step. `now` is the caller's clock in seconds (token buckets refill by it).
    pub fn plan(&mut self, now: f64) -> StepPlan {
        let mut plan = StepPlan::default();
        for m in &mut self.models {
            m.freed_in_plan = [0; 2];
        }
        self.recheck(&mut plan);

        // Growth last step may have overrun a pool or a tenant's quota.
        for m in 0..self.models.len() {
            while self.models[m].held() > self.models[m].params.total_blocks {
                match self.victim(|s| s.model == m) {
                    Some(k) => self.preempt(k, &mut plan),
                    None => break,
                }
            }
        }
        for t in 0..self.tenants.len() {
            let Some(quota) = self.tenants[t].params.kv_blocks else {
                continue;
            };
            let sibling = self.tenants[t].sibling;
            while self.quota_blocks(t) as u64 > quota {
                match self.victim(|s| s.tenant == t || Some(s.tenant) == sibling) {
                    Some(k) => self.preempt(k, &mut plan),
                    None => break,
                }
            }
        }

        // Tokens each model can still take this step after its running sequences.
        let mut budget: Vec<usize> = self
            .models
            .iter()
            .map(|m| m.params.max_batch_tokens)
            .collect();
        for &k in &self.running {
            let s = &self.seqs[&k];
            let b = &mut budget[s.model];
            *b = b.saturating_sub(s.target - s.computed);
        }

        // Admission: swapped sequences and waiting requests, best-ranked tenant first.
        let mut closed: Vec<bool> = self.models.iter().map(|m| m.paused).collect();
        let mut skip = vec![false; self.tenants.len()];
        loop {
            let mut best: Option<((u8, f64, u64), usize, SeqKey)> = None;
            // Indexed: `head` needs `self` mutably while `skip` is written.
            #[allow(clippy::needless_range_loop)]
            for t in 0..self.tenants.len() {
                if skip[t] || self.tenants[t].live == self.tenants[t].running {
                    continue;
                }
                let Some(k) = self.admission_head(t, |m| !closed[m] && budget[m] > 0) else {
                    skip[t] = true;
                    continue;
                };
                let rank = self.rank(t);
                if best
                    .as_ref()
                    .is_none_or(|(r, _, _)| rank.partial_cmp(r) == Some(std::cmp::Ordering::Less))
                {
                    best = Some((rank, t, k));
                }
            }
            let Some((_, t, k)) = best else { break };
            // Preempted by this plan (its pool or quota overran, and later victims freed more
            // than it needs): it starts again in a later plan, never in this one, or the
            // runner would drop its cache only to start it again. Its tenant's later work
            // does not overtake it.
            if plan.preempt.iter().any(|&(p, _)| p == k) {
                skip[t] = true;
                continue;
            }
            let seq = &self.seqs[&k];
            let m = seq.model;
            let need = self.commitment(seq);
            let (admitted, prompt_len) = (seq.admitted, seq.prompt_len);
            let class = self.tenants[t].params.class;
            let quota = self.tenants[t].params.kv_blocks;
            let sibling = self.tenants[t].sibling;
            // The tenant's own limits hold back only the tenant.
            let over_rate = {
                let tenant = &self.tenants[t];
                !admitted
                    && tenant.params.tokens_per_minute.is_some()
                    && quota::lock(&self.buckets)
                        .get_mut(&tenant.name)
                        .is_some_and(|b| !b.fits(prompt_len, now))
            };
            if over_rate {
                skip[t] = true;
                continue;
            }
            if let Some(q) = quota.filter(|&q| (self.quota_blocks(t) + need) as u64 > q) {
                // Its interactive work may displace its own batch work to fit the quota, but
                // only when that is all that stands in the way: the request fits the quota
                // without it, and the device once batch work makes room. Otherwise nothing is
                // preempted, so a sequence is never preempted and readmitted in one plan.
                let own = self.tenants[t].blocks;
                let displace = match (sibling, class) {
                    (Some(_), PriorityClass::Interactive) => {
                        (own + need) as u64 <= q && self.room_after_batch(m, need)
                    }
                    _ => false,
                };
                if !displace {
                    skip[t] = true;
                    continue;
                }
                let sib = sibling.unwrap_or(t);
                while (self.quota_blocks(t) + need) as u64 > q {
                    match self.victim(|s| s.tenant == sib) {
                        Some(v) => self.preempt(v, &mut plan),
                        None => break,
                    }
                }
                if (self.quota_blocks(t) + need) as u64 > q {
                    skip[t] = true;
                    continue;
                }
            }
            // The device's capacity holds back everyone after it (no overtaking, so large
            // requests are not starved), unless higher-class work can displace batch work.
            let model = &self.models[m];
            let fits = |model: &ModelState| {
                model.running < model.params.max_sequences
                    && model.held() + need <= model.params.total_blocks
            };
            if !fits(model) {
                let mut made_room = false;
                // Displace batch work only if that makes enough room.
                if class == PriorityClass::Interactive && self.room_after_batch(m, need) {
                    while !fits(&self.models[m]) {
                        let tenants = &self.tenants;
                        match self.victim(|s| {
                            s.model == m && tenants[s.tenant].params.class == PriorityClass::Batch
                        }) {
                            Some(v) => self.preempt(v, &mut plan),
                            None => break,
                        }
                    }
                    made_room = fits(&self.models[m]);
                }
                if !made_room {
                    // The tenant may still have work for another model.
                    closed[m] = true;
                    continue;
                }
            }
            self.start(k, need, now, &mut plan);
            let s = &self.seqs[&k];
            budget[m] = budget[m].saturating_sub(s.target - s.computed);
        }

        // Tokens for every running sequence: decodes first, then prefill chunks, best-ranked
        // first when the budget is short.
        let mut demand = vec![0usize; self.models.len()];
        for &k in &self.running {
            let s = &self.seqs[&k];
            demand[s.model] += s.target - s.computed;
        }
        let short = demand
            .iter()
            .zip(&self.models)
            .any(|(&d, m)| d > m.params.max_batch_tokens);
        let mut order = self.running.clone();
        if short {
            order.sort_by(|&a, &b| {
                self.seq_rank(a)
                    .partial_cmp(&self.seq_rank(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        }
        let mut left: Vec<usize> = self
            .models
            .iter()
            .map(|m| m.params.max_batch_tokens)
            .collect();
        for decode in [true, false] {
            for &k in &order {
                let s = &self.seqs[&k];
                let pending = s.target - s.computed;
                if pending == 0 || (pending == 1 && s.computed >= s.prompt_len) != decode {
                    continue;
                }
                let take = pending.min(left[s.model]);
                if take > 0 {
                    left[s.model] -= take;
                    plan.run.push((k, take));
                }
            }
        }

        // Models on one device run one after another, so sharing the device means choosing
        // whose step runs: the model holding the best-ranked runnable sequence goes alone.
        // Tenants' counters then divide device steps between models by weight.
        if self.models.len() > 1 {
            let mut best: Option<((u8, f64, u64, u64), usize)> = None;
            for &(k, _) in &plan.run {
                let rank = self.seq_rank(k);
                if best
                    .as_ref()
                    .is_none_or(|(b, _)| rank.partial_cmp(b) == Some(std::cmp::Ordering::Less))
                {
                    best = Some((rank, self.seqs[&k].model));
                }
            }
            if let Some((_, m)) = best {
                let seqs = &self.seqs;
                plan.run.retain(|(k, _)| seqs[k].model == m);
            }
        }

        self.raise_floor();
        plan
    }

    /// Moves a waiting or swapped sequence into the running set, committing `need` blocks.
    fn start(&mut self, key: SeqKey, need: usize, now: f64, plan: &mut StepPlan) {
        let mut bypassed = Vec::new();
        self.start_inner(key, need, now, plan, &mut bypassed);
        for front in bypassed {
            if let Some(seq) = self.seqs.get_mut(&front) {
                if seq.state == State::Waiting {
                    seq.bypassed += 1;
                }
            }
        }
    }

    fn start_inner(
        &mut self,
        key: SeqKey,
        need: usize,
        now: f64,
        plan: &mut StepPlan,
        bypassed: &mut Vec<SeqKey>,
    ) {
        let Some(seq) = self.seqs.get_mut(&key) else {
            return;
        };
        let tenant = &mut self.tenants[seq.tenant];
        let model = &mut self.models[seq.model];
        match seq.state {
            State::Swapped => {
                unpark(model, tenant, seq);
                model.freed_in_plan[seq.tier.index()] += seq.blocks;
                tenant.queues.remove(Queue::Swapped, seq.model, key);
                plan.swap_in.push(key);
            }
            _ => {
                // Started ahead of its tenant's earliest request (a resident prefix): that one
                // is passed over once more.
                let front = tenant.queues.waiting_front(seq.model).filter(|&f| f != key);
                tenant.queues.remove(Queue::Waiting, seq.model, key);
                plan.admit.push(key);
                if let Some(front) = front {
                    bypassed.push(front);
                }
                if !seq.admitted {
                    seq.admitted = true;
                    tenant.stats.admitted += 1;
                    tenant.turns += 1.0;
                    // Charged now, as VTC does, so the admissions of one plan see each other.
                    tenant.counter +=
                        seq.prompt_len as f64 * self.pricing.prefill * model.params.price
                            / f64::from(tenant.params.weight.max(1));
                    if tenant.params.tokens_per_minute.is_some() {
                        if let Some(bucket) = quota::lock(&self.buckets).get_mut(&tenant.name) {
                            bucket.charge(seq.prompt_len, now);
                        }
                    }
                }
            }
        }
        seq.state = State::Running;
        seq.blocks = need;
        model.used_blocks += need;
        model.running += 1;
        tenant.running += 1;
        tenant.blocks += need;
        self.running.push(key);
    }

    fn raise_floor(&mut self) {
        let active = self.tenants.iter().filter(|t| t.live > 0);
        let (mut counter, mut turns) = (f64::INFINITY, f64::INFINITY);
        for t in active {
            counter = counter.min(t.counter);
            turns = turns.min(t.turns);
        }
        if counter.is_finite() {
            self.counter_floor = self.counter_floor.max(counter);
            self.turns_floor = self.turns_floor.max(turns);
        }
    }

    /// Seconds until `tenant`'s next waiting request fits its token bucket (0 if it does or
    /// the tenant has no rate limit).
    pub fn rate_wait(&mut self, tenant: &str, now: f64) -> f64 {
        let entries: Vec<usize> = self.entries(tenant).collect();
        let mut wait: f64 = 0.0;
        for t in entries {
            if self.tenants[t].params.tokens_per_minute.is_none() {
                continue;
            }
            let prompt = self
                .head(t, |_| true)
                .and_then(|k| self.seqs.get(&k))
                .filter(|s| !s.admitted)
                .map_or(0, |s| s.prompt_len);
            let entry_wait = quota::lock(&self.buckets)
                .get_mut(tenant)
                .map_or(0.0, |b| b.wait_for(prompt, now));
            wait = wait.max(entry_wait);
        }
        wait
    }

    /// Per-tenant state, for metrics and the operator's views.
    /// Blocks a placed model's sequences hold in each tier: committed on the device, parked on
    /// the host and on disk.
    pub fn tier_usage(&self, model: usize) -> Option<[usize; 3]> {
        self.models
            .get(model)
            .filter(|m| !m.retired)
            .map(|m| [m.used_blocks, m.used_parked[0], m.used_parked[1]])
    }

    pub fn report(&mut self, now: f64) -> Vec<TenantReport> {
        let mut swapped = vec![0usize; self.tenants.len()];
        for s in self.seqs.values() {
            if s.state == State::Swapped {
                swapped[s.tenant] += 1;
            }
        }
        let mut buckets = quota::lock(&self.buckets);
        self.tenants
            .iter()
            .zip(swapped)
            .map(|(t, swapped)| TenantReport {
                tenant: t.name.clone(),
                weight: t.params.weight,
                class: t.params.class,
                waiting: t.live - t.running - swapped,
                running: t.running,
                swapped,
                kv_blocks: t.blocks - t.shared.min(t.blocks),
                host_kv_blocks: t.parked[Tier::Host.index()],
                disk_kv_blocks: t.parked[Tier::Disk.index()],
                virtual_counter: t.counter,
                bucket_tokens: t
                    .params
                    .tokens_per_minute
                    .and_then(|_| buckets.get_mut(&t.name))
                    .map(|b| b.level(now)),
                stats: t.stats.clone(),
            })
            .collect()
    }

    /// Checks the module's invariants; for tests.
    #[cfg(test)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut used = vec![0usize; self.models.len()];
        let mut parked = vec![[0usize; 2]; self.models.len()];
        let mut running = vec![0usize; self.models.len()];
        let mut by_tenant = vec![(0usize, 0usize, 0usize, [0usize; 2]); self.tenants.len()];
        // Blocks counted already, by model and tenant: what the ledgers' discounts may not pass.
        let mut borrowed = (
            vec![0usize; self.models.len()],
            vec![0usize; self.tenants.len()],
        );
        for (k, s) in &self.seqs {
            if s.computed > s.target {
                return Err(format!(
                    "{k}: computed {} > target {}",
                    s.computed, s.target
                ));
            }
            let t = &mut by_tenant[s.tenant];
            t.2 += 1;
            match s.state {
                State::Running => {
                    if s.blocks != self.commitment(s) {
                        return Err(format!("{k}: {} blocks for {} tokens", s.blocks, s.target));
                    }
                    used[s.model] += s.blocks;
                    running[s.model] += 1;
                    t.0 += s.blocks;
                    t.1 += 1;
                    if s.borrowed > s.sharing || s.sharing > s.blocks {
                        return Err(format!(
                            "{k}: borrows {} and shares {} of {} blocks",
                            s.borrowed, s.sharing, s.blocks
                        ));
                    }
                    borrowed.0[s.model] += s.borrowed;
                    borrowed.1[s.tenant] += s.borrowed;
                    if !self.running.contains(k) {
                        return Err(format!("{k} runs but is not in the running set"));
                    }
                }
                State::Swapped => {
                    parked[s.model][s.tier.index()] += s.blocks;
                    t.3[s.tier.index()] += s.blocks;
                }
                State::Waiting => {
                    if s.computed != 0 {
                        return Err(format!("{k} waits with {} tokens cached", s.computed));
                    }
                }
            }
        }
        for (m, model) in self.models.iter().enumerate() {
            if used[m] != model.used_blocks || parked[m] != model.used_parked {
                return Err(format!("model {m}: ledger differs from its sequences"));
            }
            if model.shared > borrowed.0[m] {
                return Err(format!(
                    "model {m}: {} blocks discounted, {} borrowed",
                    model.shared, borrowed.0[m]
                ));
            }
            if running[m] != model.running {
                return Err(format!("model {m}: running count differs"));
            }
            if model.used_parked[Tier::Host.index()] > model.params.swap_blocks {
                return Err(format!("model {m}: swap space overrun"));
            }
            if model.used_parked[Tier::Disk.index()] > model.params.disk_blocks {
                return Err(format!("model {m}: disk tier overrun"));
            }
        }
        for (i, t) in self.tenants.iter().enumerate() {
            if t.shared > borrowed.1[i] {
                return Err(format!(
                    "tenant {}: {} blocks discounted, {} borrowed",
                    t.name, t.shared, borrowed.1[i]
                ));
            }
            if (t.blocks, t.running, t.live, t.parked) != by_tenant[i] {
                return Err(format!(
                    "tenant {}: ledger differs from its sequences",
                    t.name
                ));
            }
        }
        if self.running.len() != running.iter().sum::<usize>() {
            return Err("running set differs".into());
        }
        Ok(())
    }

    /// Checks what must hold right after a plan: no pool and no quota over its limit, no model
    /// over its sequence or token limit.
    #[cfg(test)]
    pub fn check_plan(&self, plan: &StepPlan) -> Result<(), String> {
        self.check_invariants()?;
        for (m, model) in self.models.iter().enumerate() {
            if model.held() > model.params.total_blocks {
                return Err(format!(
                    "model {m}: {} blocks held of {}",
                    model.held(),
                    model.params.total_blocks
                ));
            }
            if model.running > model.params.max_sequences {
                return Err(format!("model {m}: {} sequences running", model.running));
            }
            let tokens: usize = plan
                .run
                .iter()
                .filter(|(k, _)| self.seqs[k].model == m)
                .map(|&(_, n)| n)
                .sum();
            if tokens > model.params.max_batch_tokens {
                return Err(format!("model {m}: {tokens} tokens in one step"));
            }
        }
        for (i, t) in self.tenants.iter().enumerate() {
            if let Some(q) = t.params.kv_blocks {
                if self.quota_blocks(i) as u64 > q {
                    return Err(format!(
                        "tenant {} ({:?}): {} blocks over its quota {q}",
                        t.name,
                        t.params.class,
                        self.quota_blocks(i)
                    ));
                }
            }
        }
        // A tier limit may be lowered by a policy reload while blocks are parked; what a
        // tenant holds past it can only have been there before.
        for (i, t) in self.tenants.iter().enumerate() {
            for (tier, limit) in [
                (Tier::Host, t.params.host_kv_blocks),
                (Tier::Disk, t.params.disk_kv_blocks),
            ] {
                let newly: usize = plan
                    .preempt
                    .iter()
                    .filter(|(k, kind)| {
                        let s = &self.seqs[k];
                        s.tenant == i
                            && s.state == State::Swapped
                            && s.tier == tier
                            && *kind != PreemptKind::Recompute
                    })
                    .map(|(k, _)| self.seqs[k].blocks)
                    .sum();
                if let Some(limit) = limit {
                    if newly > 0 && self.tier_quota_blocks(i, tier) as u64 > limit {
                        return Err(format!(
                            "tenant {}: {} {} blocks over its limit {limit}",
                            t.name,
                            self.tier_quota_blocks(i, tier),
                            tier.as_str()
                        ));
                    }
                }
            }
        }
        // A sequence preempted and started again in one plan would thrash.
        for &(k, _) in &plan.preempt {
            if plan.admit.contains(&k) || plan.swap_in.contains(&k) {
                return Err(format!("{k} is preempted and started in the same plan"));
            }
        }
        for &(k, n) in &plan.run {
            let s = &self.seqs[&k];
            if s.state != State::Running || n == 0 || s.computed + n > s.target {
                return Err(format!("{k}: cannot feed {n} tokens"));
            }
        }
        Ok(())
    }

    /// Tokens a running sequence still has to feed before it samples (for tests and the
    /// runner's cross-check).
    pub fn pending(&self, key: SeqKey) -> Option<usize> {
        self.seqs.get(&key).map(|s| s.target - s.computed)
    }
}

#[cfg(test)]
mod tests;

/// Takes a swapped sequence's blocks off its tier's ledgers.
fn unpark(model: &mut ModelState, tenant: &mut Tenant, seq: &Seq) {
    let i = seq.tier.index();
    model.used_parked[i] -= seq.blocks;
    tenant.parked[i] -= seq.blocks;
}
