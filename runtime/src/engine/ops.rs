//! What a device loop needs of a model's engine, wherever the engine runs: in this process
//! ([`super::Engine`]) or in a worker process (`crate::worker::RemoteEngine`).

use super::{Engine, EngineError, SeqId, StepInput, StepOutput};
use crate::backend::Backend;

pub trait EngineOps: Send {
    /// A new, empty sequence.
    fn add_sequence(&mut self) -> Result<SeqId, EngineError>;
    /// A new sequence to be fed `tokens` first, holding what the prefix cache has of them for
    /// `scope` (see [`Engine::add_sequence_cached`]); how many tokens it holds. An engine
    /// without a cache holds none.
    fn add_sequence_cached(
        &mut self,
        scope: &str,
        tokens: &[u32],
    ) -> Result<(SeqId, usize), EngineError> {
        let _ = (scope, tokens);
        Ok((self.add_sequence()?, 0))
    }
    /// How many of `tokens` a sequence of `scope` would hold from the device's prefix cache
    /// now, without holding anything (a worker is asked; 0 where it is not known).
    fn resident_prefix(&mut self, scope: &str, tokens: &[u32]) -> usize {
        let _ = (scope, tokens);
        0
    }
    /// What running sequences share through the prefix cache now (see [`Engine::sharing`];
    /// a worker is asked); nothing where it is not known, which the scheduler takes as
    /// nothing shared: every holder counts its blocks.
    fn sharing(&mut self) -> Vec<(SeqId, usize, usize)> {
        Vec::new()
    }
    /// Forgets a sequence and frees its blocks; unknown ids are ignored.
    fn remove_sequence(&mut self, id: SeqId);
    fn swap_out(&mut self, id: SeqId) -> Result<(), EngineError>;
    fn swap_in(&mut self, id: SeqId) -> Result<(), EngineError>;
    /// Moves a sequence to the disk tier, in `scope`'s file, sealed when `encrypt` (see
    /// [`Engine::swap_out_to_disk`]); an engine without one refuses.
    fn swap_out_to_disk(
        &mut self,
        id: SeqId,
        scope: &str,
        encrypt: bool,
    ) -> Result<(), EngineError> {
        let _ = (id, scope, encrypt);
        Err(EngineError::NoDiskTier)
    }
    /// The engine's counters so far, for the metrics (a worker is asked for them).
    fn counters(&mut self) -> Counters {
        Counters::default()
    }
    /// One batched step; on error the engine's sequences are as before it.
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<StepOutput>, EngineError>;
    fn is_swapped(&self, id: SeqId) -> bool;
    /// Tokens in a sequence's cache.
    fn sequence_len(&self, id: SeqId) -> Option<usize>;
    fn kv_block_bytes(&self) -> usize;
    /// Whether every sequence was lost since the last time this was asked (a worker process
    /// replaced), and how; the caller must recompute them. An in-process engine never loses
    /// any.
    fn take_loss(&mut self) -> Option<Loss> {
        None
    }
    /// Whether the engine cannot serve yet: a replacement worker is still starting, off the
    /// device loop's thread. Asked before each plan; the model's requests wait, and the
    /// device's other models step on meanwhile.
    fn starting(&mut self) -> bool {
        false
    }
}

/// What an engine counts for the metrics; every field only grows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Cached blocks evicted for room.
    pub cache_evictions: u64,
    /// Disk-tier blocks that failed authentication when read back.
    pub disk_auth_failures: u64,
    /// Cold prefix blocks moved down the tiers, brought back and dropped.
    pub cold: super::cold::ColdStats,
}

impl std::ops::Add for Counters {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        // Saturating: a worker's numbers are not trusted to be small.
        Self {
            cache_evictions: self.cache_evictions.saturating_add(other.cache_evictions),
            disk_auth_failures: self
                .disk_auth_failures
                .saturating_add(other.disk_auth_failures),
            cold: super::cold::ColdStats {
                demoted: self.cold.demoted.saturating_add(other.cold.demoted),
                promoted: self.cold.promoted.saturating_add(other.cold.promoted),
                dropped: self.cold.dropped.saturating_add(other.cold.dropped),
            },
        }
    }
}

/// How a worker process and every sequence it held were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// It crashed, was killed, hung or broke the protocol.
    Failed,
    /// The kernel killed it for going over its cgroup's memory limit (`None`: no limit known,
    /// the host itself ran out).
    OutOfMemory { limit_bytes: Option<u64> },
}

impl<B: Backend> EngineOps for Engine<B> {
    fn add_sequence(&mut self) -> Result<SeqId, EngineError> {
        Ok(Engine::add_sequence(self))
    }
    fn add_sequence_cached(
        &mut self,
        scope: &str,
        tokens: &[u32],
    ) -> Result<(SeqId, usize), EngineError> {
        Ok(Engine::add_sequence_cached(self, scope, tokens))
    }
    fn resident_prefix(&mut self, scope: &str, tokens: &[u32]) -> usize {
        Engine::resident_prefix(self, scope, tokens)
    }
    fn sharing(&mut self) -> Vec<(SeqId, usize, usize)> {
        Engine::sharing(self)
    }
    fn remove_sequence(&mut self, id: SeqId) {
        Engine::remove_sequence(self, id);
    }
    fn swap_out(&mut self, id: SeqId) -> Result<(), EngineError> {
        Engine::swap_out(self, id)
    }
    fn swap_in(&mut self, id: SeqId) -> Result<(), EngineError> {
        Engine::swap_in(self, id)
    }
    fn swap_out_to_disk(
        &mut self,
        id: SeqId,
        scope: &str,
        encrypt: bool,
    ) -> Result<(), EngineError> {
        Engine::swap_out_to_disk(self, id, scope, encrypt)
    }
    fn counters(&mut self) -> Counters {
        Counters {
            cache_evictions: Engine::cache_evictions(self),
            disk_auth_failures: Engine::disk_stats(self).map_or(0, |d| d.auth_failures),
            cold: Engine::cold_stats(self),
        }
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<StepOutput>, EngineError> {
        Engine::step(self, inputs)
    }
    fn is_swapped(&self, id: SeqId) -> bool {
        Engine::is_swapped(self, id)
    }
    fn sequence_len(&self, id: SeqId) -> Option<usize> {
        Engine::sequence_len(self, id)
    }
    fn kv_block_bytes(&self) -> usize {
        Engine::kv_block_bytes(self)
    }
}

impl EngineOps for Box<dyn EngineOps> {
    fn add_sequence(&mut self) -> Result<SeqId, EngineError> {
        (**self).add_sequence()
    }
    fn add_sequence_cached(
        &mut self,
        scope: &str,
        tokens: &[u32],
    ) -> Result<(SeqId, usize), EngineError> {
        (**self).add_sequence_cached(scope, tokens)
    }
    fn resident_prefix(&mut self, scope: &str, tokens: &[u32]) -> usize {
        (**self).resident_prefix(scope, tokens)
    }
    fn sharing(&mut self) -> Vec<(SeqId, usize, usize)> {
        (**self).sharing()
    }
    fn remove_sequence(&mut self, id: SeqId) {
        (**self).remove_sequence(id);
    }
    fn swap_out(&mut self, id: SeqId) -> Result<(), EngineError> {
        (**self).swap_out(id)
    }
    fn swap_in(&mut self, id: SeqId) -> Result<(), EngineError> {
        (**self).swap_in(id)
    }
    fn swap_out_to_disk(
        &mut self,
        id: SeqId,
        scope: &str,
        encrypt: bool,
    ) -> Result<(), EngineError> {
        (**self).swap_out_to_disk(id, scope, encrypt)
    }
    fn counters(&mut self) -> Counters {
        (**self).counters()
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<StepOutput>, EngineError> {
        (**self).step(inputs)
    }
    fn is_swapped(&self, id: SeqId) -> bool {
        (**self).is_swapped(id)
    }
    fn sequence_len(&self, id: SeqId) -> Option<usize> {
        (**self).sequence_len(id)
    }
    fn kv_block_bytes(&self) -> usize {
        (**self).kv_block_bytes()
    }
    fn take_loss(&mut self) -> Option<Loss> {
        (**self).take_loss()
    }
    fn starting(&mut self) -> bool {
        (**self).starting()
    }
}
