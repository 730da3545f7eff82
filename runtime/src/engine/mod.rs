//! The model engine: runs a Llama-family decoder on any [`Backend`], one batched step at a time.
//!
//! A step takes any mix of sequences, each with one or more new tokens (a prefill chunk or a
//! decode token), flattened into one pass over the weights; keys and values go to the paged KV
//! cache through each sequence's block table. The engine owns the block pool and tables; the
//! backend owns the memory. Which sequences run in a step is the caller's decision.

pub mod cold;
mod disk;
pub mod ops;
pub mod sampling;

use std::collections::HashMap;

use crate::backend::{Backend, BackendError, CopyTicket, Heads, KvLayout, SeqSlice, StepLayout};
use crate::kv::prefix::{self, ChainState};
use crate::kv::{BlockPool, BlockTable, OutOfBlocks};
use crate::model::{ModelConfig, ModelWeights};

/// A sequence known to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Which logits a step should return for a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only after the last new token (what generation needs).
    Last,
    /// After every new token (for scoring and tests).
    All,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub logits: LogitsWanted,
}

/// Logits for one sequence: one row of `vocab_size` per requested position.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub seq: SeqId,
    pub logits: Vec<Vec<f32>>,
}

/// Why a step failed; the engine's state is as before the step.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("sequence {0:?} is not known to the engine")]
    UnknownSequence(SeqId),
    #[error("sequence {0:?} appears twice in one step")]
    DuplicateSequence(SeqId),
    #[error("a step input for {0:?} has no tokens")]
    NoTokens(SeqId),
    #[error("the sequence would hold {tokens} tokens, more than the model's context of {limit}; shorten the prompt or lower max_tokens")]
    TooLong { tokens: usize, limit: usize },
    #[error("token id {token} is outside the model's vocabulary of {vocab}")]
    BadToken { token: u32, vocab: usize },
    #[error("sequence {0:?} is swapped out; swap it in before stepping it")]
    Swapped(SeqId),
    #[error("sequence {0:?} is not swapped out")]
    NotSwapped(SeqId),
    #[error("this engine has no swap space; enable it with a number of host blocks")]
    NoSwapSpace,
    #[error("this engine's swap space is already allocated")]
    SwapAlreadyEnabled,
    #[error("the swap space needs {needed} more blocks but only {free} are free")]
    OutOfSwapSpace { needed: usize, free: usize },
    #[error("this engine has no disk tier")]
    NoDiskTier,
    #[error("this engine's disk tier is already enabled")]
    DiskAlreadyEnabled,
    #[error("the disk tier holds blocks of {tier} bytes but this engine's are {engine} bytes")]
    DiskBlockMismatch { tier: usize, engine: usize },
    #[error(transparent)]
    Disk(#[from] crate::kv::disk::DiskError),
    #[error(transparent)]
    OutOfBlocks(#[from] OutOfBlocks),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The engine runs in a worker process, which reported this.
    #[error("{0}")]
    Worker(String),
    /// The engine's worker process is gone (crashed, killed, or stopped answering); every
    /// sequence it held is lost and must be recomputed.
    #[error("the model's worker process was lost: {0}")]
    WorkerLost(String),
}

struct LayerWeightsOn<B: Backend> {
    attn_norm: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    q_bias: Option<B::Weight>,
    k_bias: Option<B::Weight>,
    v_bias: Option<B::Weight>,
    o: B::Weight,
    mlp_norm: B::Weight,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

struct WeightsOn<B: Backend> {
    embed: B::Weight,
    layers: Vec<LayerWeightsOn<B>>,
    final_norm: B::Weight,
    lm_head: B::Weight,
}

/// A model ready to run on backend `B`, with its KV cache.
pub struct Engine<B: Backend> {
    backend: B,
    config: ModelConfig,
    weights: WeightsOn<B>,
    inv_freq: Vec<f32>,
    kv: B::Kv,
    pool: BlockPool,
    seqs: HashMap<SeqId, BlockTable>,
    next_seq: u64,
    /// Activation buffers kept between steps, so a decode step allocates nothing.
    scratch: Option<Scratch<B>>,
    layout: KvLayout,
    swap: Option<SwapTier<B>>,
    disk: Option<disk::DiskSwap<B>>,
    /// Swapped-out sequences: their length and where their blocks are.
    parked: HashMap<SeqId, Parked>,
    /// Device blocks of swapped-out sequences, free once their copy has finished.
    pending_free: Vec<(CopyTicket, Vec<u32>)>,
    indices: StepIndices,
    /// Sequences started through the prefix cache: where their token chains stand, so each
    /// block they fill is published (see [`crate::kv`]).
    chains: HashMap<SeqId, ChainState>,
    /// The scope of each sequence that keeps a chain, and of each published block (the cold
    /// prefix blocks' files are per scope).
    seq_scope: HashMap<SeqId, std::sync::Arc<str>>,
    block_scope: HashMap<u32, std::sync::Arc<str>>,
    /// Cached blocks moved down the tiers instead of dropped.
    cold: cold::ColdPrefixes,
    prefix_cache: bool,
}

/// A parked sequence, to change.
fn parked_mut(parked: &mut HashMap<SeqId, Parked>, id: SeqId) -> Result<&mut Parked, EngineError> {
    parked.get_mut(&id).ok_or(EngineError::NotSwapped(id))
}

/// A step's host-side indices, kept between steps so decoding does not allocate them.
#[derive(Debug, Default)]
struct StepIndices {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    logit_rows: Vec<usize>,
}

/// Host memory holding swapped-out sequences' KV blocks.
struct SwapTier<B: Backend> {
    kv: B::HostKv,
    pool: BlockPool,
}

#[derive(Debug)]
struct Parked {
    len: usize,
    place: Place,
    /// The keys of its leading blocks that were published when it left the device: those
    /// still published when it comes back are shared again instead of copied.
    prefix: Vec<crate::kv::Key>,
}

/// Where a swapped-out sequence's blocks are.
#[derive(Debug)]
enum Place {
    Host(Vec<u32>),
    Disk(crate::kv::disk::DiskBlocks),
}

/// The activations of one step.
struct Scratch<B: Backend> {
    x: B::Tensor,
    normed: B::Tensor,
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    attn: B::Tensor,
    proj: B::Tensor,
    gate: B::Tensor,
    up: B::Tensor,
    last: B::Tensor,
    last_normed: B::Tensor,
    logits: B::Tensor,
}

impl<B: Backend> Scratch<B> {
    fn new(b: &B) -> Result<Self, BackendError> {
        Ok(Self {
            x: b.alloc(0, 0)?,
            normed: b.alloc(0, 0)?,
            q: b.alloc(0, 0)?,
            k: b.alloc(0, 0)?,
            v: b.alloc(0, 0)?,
            attn: b.alloc(0, 0)?,
            proj: b.alloc(0, 0)?,
            gate: b.alloc(0, 0)?,
            up: b.alloc(0, 0)?,
            last: b.alloc(0, 0)?,
            last_normed: b.alloc(0, 0)?,
            logits: b.alloc(0, 0)?,
        })
    }
}

impl<B: Backend> Drop for Engine<B> {
    fn drop(&mut self) {
        // Swap copies read and write the swap space and the cache: let them land first.
        if let Err(e) = self.backend.wait_copies() {
            tracing::warn!(error = %e, "waiting for swap copies while dropping an engine");
        }
    }
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.name())
            .field("sequences", &self.seqs.len())
            .field("free_blocks", &self.pool.free_blocks())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// Uploads `weights` and allocates a KV cache of `kv_blocks` blocks of `block_size` tokens.
    pub fn new(
        backend: B,
        config: ModelConfig,
        weights: &ModelWeights,
        kv_blocks: usize,
        block_size: usize,
    ) -> Result<Self, EngineError> {
        let up = |w: &crate::model::WeightTensor| backend.upload(w);
        let opt = |w: &Option<crate::model::WeightTensor>| {
            w.as_ref().map(|w| backend.upload(w)).transpose()
        };
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeightsOn {
                    attn_norm: up(&l.attn_norm)?,
                    q: up(&l.q)?,
                    k: up(&l.k)?,
                    v: up(&l.v)?,
                    q_bias: opt(&l.q_bias)?,
                    k_bias: opt(&l.k_bias)?,
                    v_bias: opt(&l.v_bias)?,
                    o: up(&l.o)?,
                    mlp_norm: up(&l.mlp_norm)?,
                    gate: up(&l.gate)?,
                    up: up(&l.up)?,
                    down: up(&l.down)?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let on = WeightsOn {
            embed: up(&weights.embed)?,
            layers,
            final_norm: up(&weights.final_norm)?,
            lm_head: up(&weights.lm_head)?,
        };
        let layout = KvLayout {
            num_layers: config.num_layers,
            num_blocks: kv_blocks,
            block_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        };
        let kv = backend.alloc_kv(&layout)?;
        Ok(Self {
            inv_freq: config.rope_inv_freq(),
            backend,
            config,
            weights: on,
            kv,
            pool: BlockPool::new(kv_blocks, block_size),
            seqs: HashMap::new(),
            next_seq: 0,
            scratch: None,
            layout,
            swap: None,
            disk: None,
            parked: HashMap::new(),
            pending_free: Vec::new(),
            indices: StepIndices::default(),
            chains: HashMap::new(),
            seq_scope: HashMap::new(),
            block_scope: HashMap::new(),
            cold: cold::ColdPrefixes::default(),
            prefix_cache: true,
        })
    }

    /// Turns the prefix cache off (it is on from the start): sequences then share nothing.
    pub fn disable_prefix_cache(&mut self) {
        self.prefix_cache = false;
    }

    /// Starts a sequence that will be fed `tokens` first, holding the longest run of their
    /// full blocks that a sequence of the same `scope` published before; returns it and how
    /// many of `tokens` it already holds (a multiple of the block size, and never all of
    /// them, so feeding the rest yields the last token's logits).
    pub fn add_sequence_cached(&mut self, scope: &str, tokens: &[u32]) -> (SeqId, usize) {
        let id = self.add_sequence();
        if !self.prefix_cache {
            return (id, 0);
        }
        let block_size = self.pool.block_size();
        let start = prefix::scope_key(scope);
        let usable = tokens.len().saturating_sub(1);
        let mut shared = Vec::new();
        let mut key = start;
        for k in prefix::chain(start, &tokens[..usable], block_size) {
            match self.pool.share(&k).or_else(|| self.promote(&k)) {
                Some(block) => {
                    shared.push(block);
                    key = k;
                }
                None => break,
            }
        }
        let blocks = shared.len();
        let held = blocks * block_size;
        self.seqs.insert(id, BlockTable::from_blocks(shared, held));
        self.chains.insert(id, ChainState::new(key, blocks));
        self.seq_scope.insert(id, scope.into());
        (id, held)
    }

    /// How many of `tokens` a sequence of `scope` started now would hold from blocks on the
    /// device (a look, holding nothing; cold blocks further down do not count).
    pub fn resident_prefix(&self, scope: &str, tokens: &[u32]) -> usize {
        if !self.prefix_cache {
            return 0;
        }
        let block_size = self.pool.block_size().max(1);
        let usable = tokens.len().saturating_sub(1);
        // Key by key, stopping at the first block not on the device: a prompt with nothing
        // resident costs one hash, however long it is (asked again as the cache changes).
        let mut key = prefix::scope_key(scope);
        tokens[..usable]
            .chunks_exact(block_size)
            .take_while(|block| {
                key = prefix::next_key(&key, block);
                self.pool.is_published(&key)
            })
            .count()
            * block_size
    }

    /// After a step: publishes the blocks its tokens filled in sequences that keep a chain.
    fn publish_filled(&mut self, inputs: &[StepInput<'_>]) {
        let block_size = self.pool.block_size();
        let mut published = Vec::new();
        for input in inputs {
            let (Some(chain), Some(table)) =
                (self.chains.get_mut(&input.seq), self.seqs.get(&input.seq))
            else {
                continue;
            };
            for (index, key) in chain.feed(input.tokens, block_size) {
                if let Some(&block) = table.blocks().get(index) {
                    if self.pool.publish(block, key) {
                        if let Some(scope) = self.seq_scope.get(&input.seq) {
                            self.block_scope.insert(block, std::sync::Arc::clone(scope));
                        }
                        published.push(key);
                    }
                }
            }
        }
        // A block computed again supersedes its cold copy.
        for key in published {
            self.drop_cold(&key);
        }
    }

    /// What running sequences share through the prefix cache, for the scheduler's ledger:
    /// per sequence holding a block another holds too, how many of its blocks an earlier
    /// sequence (a lower id) holds as well, and how many any other does. Over all sequences
    /// the first numbers add up to the device blocks counted twice or more, less one per
    /// block. Empty when nothing is shared.
    pub fn sharing(&self) -> Vec<(SeqId, usize, usize)> {
        if !self.prefix_cache || self.chains.is_empty() {
            return Vec::new();
        }
        // Per block: how many tables hold it, and the lowest id among them.
        let mut holders: HashMap<u32, (u32, SeqId)> = HashMap::new();
        for (&id, table) in &self.seqs {
            for &block in table.blocks() {
                let entry = holders.entry(block).or_insert((0, id));
                entry.0 += 1;
                entry.1 = entry.1.min(id);
            }
        }
        if holders.values().all(|&(n, _)| n < 2) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&id, table) in &self.seqs {
            let (mut borrowed, mut sharing) = (0, 0);
            for block in table.blocks() {
                if let Some(&(_, first)) = holders.get(block).filter(|(n, _)| *n >= 2) {
                    sharing += 1;
                    if first != id {
                        borrowed += 1;
                    }
                }
            }
            if sharing > 0 {
                out.push((id, borrowed, sharing));
            }
        }
        out
    }

    /// Cached blocks evicted from the prefix cache for room so far.
    pub fn cache_evictions(&self) -> u64 {
        self.pool.evictions()
    }

    /// Device blocks published in the prefix cache, held or idle.
    pub fn cached_blocks(&self) -> usize {
        self.pool.cached_blocks()
    }

    /// A sequence's device blocks, in order (tests).
    pub fn block_table(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(BlockTable::blocks)
    }

    /// Allocates `host_blocks` blocks of swap space (page-locked host memory on a GPU), each
    /// holding one KV block of every layer.
    pub fn enable_swap(&mut self, host_blocks: usize) -> Result<(), EngineError> {
        // Swapped-out sequences' host block numbers point into the existing space.
        if self.swap.is_some() {
            return Err(EngineError::SwapAlreadyEnabled);
        }
        let kv = self.backend.alloc_host_kv(&self.layout, host_blocks)?;
        self.swap = Some(SwapTier {
            kv,
            pool: BlockPool::new(host_blocks, self.layout.block_size),
        });
        Ok(())
    }

    /// Moves a sequence's KV blocks to the swap space and frees its device blocks (once the
    /// copy has finished). The sequence cannot step until [`Engine::swap_in`].
    pub fn swap_out(&mut self, id: SeqId) -> Result<(), EngineError> {
        let swap = self.swap.as_mut().ok_or(EngineError::NoSwapSpace)?;
        if self.parked.contains_key(&id) {
            return Err(EngineError::Swapped(id));
        }
        let needed = self.seqs.get(&id).map_or(0, |t| t.blocks().len());
        let free = swap.pool.free_blocks();
        if free < needed {
            self.free_cold_host(needed - free);
        }
        let Some(swap) = self.swap.as_mut() else {
            return Err(EngineError::NoSwapSpace);
        };
        let table = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))?;
        let host_blocks =
            swap.pool
                .take(table.blocks().len())
                .map_err(|e| EngineError::OutOfSwapSpace {
                    needed: e.needed,
                    free: e.free,
                })?;
        let pairs: Vec<(u32, u32)> = table
            .blocks()
            .iter()
            .copied()
            .zip(host_blocks.iter().copied())
            .collect();
        let ticket = match self.backend.swap_out(&self.kv, &mut swap.kv, &pairs) {
            Ok(ticket) => ticket,
            Err(e) => {
                swap.pool.give_back(host_blocks);
                return Err(e.into());
            }
        };
        let Some(table) = self.seqs.remove(&id) else {
            return Err(EngineError::UnknownSequence(id));
        };
        let len = table.len();
        let prefix = self.published_prefix(table.blocks());
        self.pending_free.push((ticket, table.into_blocks()));
        self.parked.insert(
            id,
            Parked {
                len,
                place: Place::Host(host_blocks),
                prefix,
            },
        );
        Ok(())
    }

    /// The keys of the leading run of `blocks` that are published in the prefix cache.
    fn published_prefix(&self, blocks: &[u32]) -> Vec<crate::kv::Key> {
        blocks.iter().map_while(|&b| self.pool.key_of(b)).collect()
    }

    /// Holds again, in order, the blocks still published under `prefix`'s keys, stopping at
    /// the first that is not; returns them.
    fn share_again(&mut self, prefix: &[crate::kv::Key]) -> Vec<u32> {
        prefix.iter().map_while(|k| self.pool.share(k)).collect()
    }

    /// Brings a swapped-out sequence back into device blocks, from whichever tier holds it; it
    /// can step right away (its compute waits for the copy on the device, not on the host).
    /// Its leading blocks still in the prefix cache (often the very blocks it left) are shared
    /// again, not copied: the same key is the same tokens of the same tenant at the same
    /// positions, so the same KV (from disk they are not even read). On error
    /// it stays parked; after a failed read from disk (I/O, or a block that failed
    /// authentication) its blocks cannot be trusted, and the caller should remove it and
    /// recompute.
    pub fn swap_in(&mut self, id: SeqId) -> Result<(), EngineError> {
        let parked = parked_mut(&mut self.parked, id)?;
        let from_disk = matches!(parked.place, Place::Disk(_));
        // Shared before anything is taken: a take could evict them.
        let prefix = std::mem::take(&mut parked.prefix);
        let shared = self.share_again(&prefix);
        let copied = if from_disk {
            self.copy_in_from_disk(id, shared.len())
        } else {
            self.copy_in_from_host(id, shared.len())
        };
        match copied {
            Ok((blocks, len)) => {
                let mut table = shared;
                table.extend(blocks);
                self.seqs.insert(id, BlockTable::from_blocks(table, len));
                Ok(())
            }
            Err(e) => {
                self.pool.give_back(shared);
                if let Ok(parked) = parked_mut(&mut self.parked, id) {
                    parked.prefix = prefix;
                }
                Err(e)
            }
        }
    }

    /// Copies a host-parked sequence's blocks after its first `skip` into fresh device blocks
    /// and unparks it; returns those blocks and its length. On error it stays parked.
    fn copy_in_from_host(
        &mut self,
        id: SeqId,
        skip: usize,
    ) -> Result<(Vec<u32>, usize), EngineError> {
        let total = match &parked_mut(&mut self.parked, id)?.place {
            Place::Host(host_blocks) => host_blocks.len(),
            Place::Disk(_) => return Err(EngineError::NotSwapped(id)),
        };
        let needed = total - skip.min(total);
        self.take_for_swap_in(needed)?;
        let Some(Parked {
            place: Place::Host(host_blocks),
            ..
        }) = self.parked.get(&id)
        else {
            return Err(EngineError::NotSwapped(id));
        };
        let swap = self.swap.as_mut().ok_or(EngineError::NoSwapSpace)?;
        let blocks = self.pool.take(needed)?;
        let pairs: Vec<(u32, u32)> = host_blocks[total - needed..]
            .iter()
            .copied()
            .zip(blocks.iter().copied())
            .collect();
        if let Err(e) = self.backend.swap_in(&swap.kv, &mut self.kv, &pairs) {
            self.pool.give_back(blocks);
            return Err(e.into());
        }
        let Some(parked) = self.parked.remove(&id) else {
            return Err(EngineError::NotSwapped(id));
        };
        // Later swap-outs into these host blocks queue behind this copy, so they are free now.
        if let Place::Host(host_blocks) = parked.place {
            swap.pool.give_back(host_blocks);
        }
        Ok((blocks, parked.len))
    }

    /// Makes room for `needed` device blocks of a sequence coming back: finished swap-outs'
    /// blocks are reclaimed, and cached blocks the take would evict moved down the tiers.
    fn take_for_swap_in(&mut self, needed: usize) -> Result<(), EngineError> {
        if self.pool.free_blocks() < needed && !self.pending_free.is_empty() {
            reclaim(&self.backend, &mut self.pool, &mut self.pending_free, true)?;
        }
        if needed <= self.pool.free_blocks() {
            self.demote_evicted(needed);
        }
        Ok(())
    }

    pub fn is_swapped(&self, id: SeqId) -> bool {
        self.parked.contains_key(&id)
    }

    /// Bytes one KV block holds across every layer (keys and values, f32).
    pub fn kv_block_bytes(&self) -> usize {
        let l = &self.layout;
        l.num_layers * 2 * l.block_size * l.num_kv_heads * l.head_dim * 4
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Starts an empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, BlockTable::new());
        id
    }

    /// Forgets a sequence and frees its blocks.
    pub fn remove_sequence(&mut self, id: SeqId) {
        self.chains.remove(&id);
        self.seq_scope.remove(&id);
        if let Some(mut table) = self.seqs.remove(&id) {
            table.release(&mut self.pool);
        }
        match self.parked.remove(&id).map(|p| p.place) {
            Some(Place::Host(blocks)) => {
                if let Some(swap) = self.swap.as_mut() {
                    swap.pool.give_back(blocks);
                }
            }
            Some(Place::Disk(blocks)) => {
                if let Some(disk) = self.disk.as_mut() {
                    disk.tier.free(blocks);
                }
            }
            None => {}
        }
    }

    /// Tokens a sequence holds in the cache (or in the swap space).
    pub fn sequence_len(&self, id: SeqId) -> Option<usize> {
        self.seqs
            .get(&id)
            .map(BlockTable::len)
            .or_else(|| self.parked.get(&id).map(|p| p.len))
    }

    /// Device blocks free, counting those of swapped-out sequences whose copy is in flight
    /// (unless another sequence holds them too, through the prefix cache).
    pub fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
            + self
                .pending_free
                .iter()
                .flat_map(|(_, blocks)| blocks)
                .filter(|&&b| self.pool.holders(b) == 1)
                .count()
    }

    /// Swap-space blocks free (0 without swap space), counting those cold prefix blocks hold
    /// (a swap-out takes them).
    pub fn free_swap_blocks(&self) -> usize {
        self.swap
            .as_ref()
            .map_or(0, |s| s.pool.free_blocks() + self.cold.host_blocks())
    }

    /// Runs one batched step. On any error the sequences are as they were before it.
    pub fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<StepOutput>, EngineError> {
        let mut before = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            if inputs[..i].iter().any(|other| other.seq == input.seq) {
                return Err(EngineError::DuplicateSequence(input.seq));
            }
            if input.tokens.is_empty() {
                return Err(EngineError::NoTokens(input.seq));
            }
            if let Some(&token) = input
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(EngineError::BadToken {
                    token,
                    vocab: self.config.vocab_size,
                });
            }
            if self.parked.contains_key(&input.seq) {
                return Err(EngineError::Swapped(input.seq));
            }
            let len = self
                .seqs
                .get(&input.seq)
                .ok_or(EngineError::UnknownSequence(input.seq))?
                .len();
            let total = len + input.tokens.len();
            if total > self.config.max_position_embeddings {
                return Err(EngineError::TooLong {
                    tokens: total,
                    limit: self.config.max_position_embeddings,
                });
            }
            before.push(len);
        }
        // Device blocks of swapped-out sequences become free once their copies are done;
        // wait for them only when this step cannot fit otherwise.
        reclaim(&self.backend, &mut self.pool, &mut self.pending_free, false)?;
        let needed: usize = inputs
            .iter()
            .zip(&before)
            .map(|(input, &len)| {
                let held = len.div_ceil(self.pool.block_size());
                (len + input.tokens.len())
                    .div_ceil(self.pool.block_size())
                    .saturating_sub(held)
            })
            .sum();
        if needed > self.pool.free_blocks() && !self.pending_free.is_empty() {
            reclaim(&self.backend, &mut self.pool, &mut self.pending_free, true)?;
        }
        // Only when the blocks can be had: a failed step must not leave copies behind.
        if needed <= self.pool.free_blocks() {
            self.demote_evicted(needed);
        }
        // Reserve KV blocks for every sequence, undoing all of it if any cannot grow.
        for (i, input) in inputs.iter().enumerate() {
            let grown = match self.seqs.get_mut(&input.seq) {
                Some(table) => table.grow(&mut self.pool, before[i] + input.tokens.len()),
                None => Err(OutOfBlocks {
                    needed: 0,
                    free: 0,
                    block_size: 0,
                }),
            };
            if let Err(e) = grown {
                self.rollback(&inputs[..i], &before);
                return Err(e.into());
            }
        }
        let result = B::run_step(|| self.forward(inputs, &before));
        match &result {
            Ok(_) => self.publish_filled(inputs),
            Err(_) => self.rollback(inputs, &before),
        }
        result
    }

    fn rollback(&mut self, inputs: &[StepInput<'_>], before: &[usize]) {
        for (input, &len) in inputs.iter().zip(before) {
            if let Some(table) = self.seqs.get_mut(&input.seq) {
                table.truncate(&mut self.pool, len);
            }
        }
    }

    fn forward(
        &mut self,
        inputs: &[StepInput<'_>],
        before: &[usize],
    ) -> Result<Vec<StepOutput>, EngineError> {
        let c = &self.config;
        let bs = self.pool.block_size();
        // Host-side index vectors, kept between steps (taken out while the step borrows self).
        let StepIndices {
            mut tokens,
            mut positions,
            mut slots,
            mut logit_rows,
        } = std::mem::take(&mut self.indices);
        for v in [&mut tokens, &mut positions, &mut slots] {
            v.clear();
        }
        logit_rows.clear();
        let mut seqs = Vec::with_capacity(inputs.len());
        let n: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        for (input, &start) in inputs.iter().zip(before) {
            let table = self
                .seqs
                .get(&input.seq)
                .ok_or(EngineError::UnknownSequence(input.seq))?;
            let first = tokens.len();
            for (k, &t) in input.tokens.iter().enumerate() {
                tokens.push(t);
                positions.push((start + k) as u32);
                slots.push(table.slot(start + k, bs));
            }
            match input.logits {
                LogitsWanted::Last => logit_rows.push(tokens.len() - 1),
                LogitsWanted::All => logit_rows.extend(first..tokens.len()),
            }
            seqs.push(SeqSlice {
                first_token: first,
                num_tokens: input.tokens.len(),
                context_len: start + input.tokens.len(),
                block_table: table.blocks(),
            });
        }
        let layout = StepLayout {
            positions: &positions,
            slots: &slots,
            seqs: &seqs,
            block_size: bs,
        };
        let heads = Heads {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let b = &self.backend;
        let w = &self.weights;
        let (h, q_out, kv_out) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );

        let mut scratch = match self.scratch.take() {
            Some(scratch) => scratch,
            None => Scratch::new(b)?,
        };
        let Scratch {
            x,
            normed,
            q,
            k,
            v,
            attn,
            proj,
            gate,
            up,
            last,
            last_normed,
            logits,
        } = &mut scratch;
        for (t, cols) in [
            (&mut *x, h),
            (&mut *normed, h),
            (&mut *q, q_out),
            (&mut *k, kv_out),
            (&mut *v, kv_out),
            (&mut *attn, q_out),
            (&mut *proj, h),
            (&mut *gate, c.intermediate_size),
            (&mut *up, c.intermediate_size),
        ] {
            b.reshape(t, n, cols)?;
        }
        b.embed(&w.embed, &tokens, x)?;
        for (layer, lw) in w.layers.iter().enumerate() {
            b.rms_norm(x, &lw.attn_norm, c.rms_norm_eps, normed)?;
            b.matmul(normed, &lw.q, q)?;
            b.matmul(normed, &lw.k, k)?;
            b.matmul(normed, &lw.v, v)?;
            for (t, bias) in [
                (&mut *q, &lw.q_bias),
                (&mut *k, &lw.k_bias),
                (&mut *v, &lw.v_bias),
            ] {
                if let Some(bias) = bias {
                    b.add_bias(t, bias)?;
                }
            }
            b.rope(
                q,
                c.num_heads,
                c.head_dim,
                &self.inv_freq,
                c.rope_style,
                &positions,
            )?;
            b.rope(
                k,
                c.num_kv_heads,
                c.head_dim,
                &self.inv_freq,
                c.rope_style,
                &positions,
            )?;
            b.write_kv(&mut self.kv, layer, k, v, &slots)?;
            b.attention(q, &self.kv, layer, &layout, heads, attn)?;
            b.matmul(attn, &lw.o, proj)?;
            b.add(x, proj)?;

            b.rms_norm(x, &lw.mlp_norm, c.rms_norm_eps, normed)?;
            b.matmul(normed, &lw.gate, gate)?;
            b.matmul(normed, &lw.up, up)?;
            b.silu_mul(gate, up)?;
            b.matmul(gate, &lw.down, proj)?;
            b.add(x, proj)?;
        }
        let m = logit_rows.len();
        b.reshape(last, m, h)?;
        b.reshape(last_normed, m, h)?;
        b.reshape(logits, m, c.vocab_size)?;
        b.gather_rows(x, &logit_rows, last)?;
        b.rms_norm(last, &w.final_norm, c.rms_norm_eps, last_normed)?;
        b.matmul(last_normed, &w.lm_head, logits)?;
        let host = b.read(logits)?;
        self.scratch = Some(scratch);
        drop(seqs);
        self.indices = StepIndices {
            tokens,
            positions,
            slots,
            logit_rows,
        };

        let mut rows = host.chunks_exact(c.vocab_size).map(<[f32]>::to_vec);
        Ok(inputs
            .iter()
            .map(|input| {
                let count = match input.logits {
                    LogitsWanted::Last => 1,
                    LogitsWanted::All => input.tokens.len(),
                };
                StepOutput {
                    seq: input.seq,
                    logits: rows.by_ref().take(count).collect(),
                }
            })
            .collect())
    }
}

/// Returns to `pool` the device blocks whose swap-out copy has finished (all of them, waiting
/// for the copies, when `wait` is set).
fn reclaim<B: Backend>(
    backend: &B,
    pool: &mut BlockPool,
    pending: &mut Vec<(CopyTicket, Vec<u32>)>,
    wait: bool,
) -> Result<(), BackendError> {
    if pending.is_empty() {
        return Ok(());
    }
    if wait {
        backend.wait_copies()?;
    }
    let mut i = 0;
    while i < pending.len() {
        if wait || backend.copy_finished(pending[i].0)? {
            let (_, blocks) = pending.swap_remove(i);
            pool.give_back(blocks);
        } else {
            i += 1;
        }
    }
    Ok(())
}
