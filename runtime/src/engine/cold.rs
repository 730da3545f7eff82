//! Cold prefix blocks: cached blocks nobody holds, moved down the tiers when the device pool
//! needs their room instead of being dropped, and brought back when a sequence of the same
//! scope starts with their tokens again.
//!
//! A block about to be evicted is copied to a free host-tier block (the swap space) or, when
//! the host tier is full or absent, to the disk tier, always sealed there (the key is per
//! engine, and a cold block's tenant may have asked for it). Both tiers serve swapped-out
//! sequences first: a swap-out that needs room takes it from cold blocks, oldest first, host
//! ones moving down to disk where it has room. A cold block found by a later chain is copied
//! into a fresh device block and published under its key again; the sequence holds it as it
//! would a block still cached. A cold block that cannot be read back (an I/O error, failed
//! authentication) is dropped, and the chain stops there: its tokens are computed instead.
//!
//! Costs: demotion and promotion are one block's copy each, synchronous on a GPU (rare:
//! only at eviction and on a hit); lookups are O(1), choosing what to drop O(log n).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::disk::DiskSwap;
use super::{Engine, EngineError};
use crate::backend::{Backend, BackendError};
use crate::kv::disk::DiskBlocks;
use crate::kv::Key;

/// Counts of cold-block traffic, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ColdStats {
    /// Blocks moved off the device instead of dropped.
    pub demoted: u64,
    /// Blocks brought back for a sequence.
    pub promoted: u64,
    /// Cold blocks dropped for room, or because they could not be kept or read.
    pub dropped: u64,
}

/// The cold blocks, by key, and their order per tier (oldest first).
#[derive(Default)]
pub(super) struct ColdPrefixes {
    entries: HashMap<Key, ColdBlock>,
    host_order: BTreeMap<u64, Key>,
    disk_order: BTreeMap<u64, Key>,
    clock: u64,
    pub(super) stats: ColdStats,
}

struct ColdBlock {
    place: ColdPlace,
    since: u64,
    scope: Arc<str>,
}

enum ColdPlace {
    Host(u32),
    Disk(DiskBlocks),
}

impl ColdPrefixes {
    fn insert(&mut self, key: Key, place: ColdPlace, scope: Arc<str>) {
        self.clock += 1;
        let order = match place {
            ColdPlace::Host(_) => &mut self.host_order,
            ColdPlace::Disk(_) => &mut self.disk_order,
        };
        order.insert(self.clock, key);
        self.entries.insert(
            key,
            ColdBlock {
                place,
                since: self.clock,
                scope,
            },
        );
    }

    fn take(&mut self, key: &Key) -> Option<ColdBlock> {
        let block = self.entries.remove(key)?;
        match block.place {
            ColdPlace::Host(_) => self.host_order.remove(&block.since),
            ColdPlace::Disk(_) => self.disk_order.remove(&block.since),
        };
        Some(block)
    }

    fn oldest_host(&mut self) -> Option<(Key, ColdBlock)> {
        let (_, key) = self.host_order.first_key_value()?;
        let key = *key;
        Some((key, self.take(&key)?))
    }

    fn oldest_disk(&mut self) -> Option<ColdBlock> {
        let (_, key) = self.disk_order.first_key_value()?;
        let key = *key;
        self.take(&key)
    }

    pub(super) fn host_blocks(&self) -> usize {
        self.host_order.len()
    }

    pub(super) fn disk_blocks(&self) -> usize {
        self.disk_order.len()
    }
}

impl<B: Backend> Engine<B> {
    /// Cold-block traffic so far.
    pub fn cold_stats(&self) -> ColdStats {
        self.cold.stats
    }

    /// Cold prefix blocks kept in the host and disk tiers.
    pub fn cold_blocks(&self) -> (usize, usize) {
        (self.cold.host_blocks(), self.cold.disk_blocks())
    }

    /// Before `n` device blocks are taken: the cached blocks taking them would evict move down
    /// the tiers (when the engine has any).
    pub(super) fn demote_evicted(&mut self, n: usize) {
        if self.swap.is_none() && self.disk.is_none() {
            return;
        }
        for (block, key) in self.pool.would_evict(n) {
            let Some(scope) = self.block_scope.remove(&block) else {
                continue;
            };
            match self.demote_block(block, key, &scope) {
                Ok(true) => self.cold.stats.demoted += 1,
                Ok(false) => self.cold.stats.dropped += 1,
                Err(e) => {
                    tracing::debug!(error = %e, "a cold prefix block is dropped instead of kept");
                    self.cold.stats.dropped += 1;
                }
            }
        }
    }

    /// Copies device block `block` down a tier; false when no tier has room.
    fn demote_block(
        &mut self,
        block: u32,
        key: Key,
        scope: &Arc<str>,
    ) -> Result<bool, EngineError> {
        // An older copy of the same block (its chain was computed again since): this one
        // replaces it.
        self.drop_cold(&key);
        if self
            .swap
            .as_ref()
            .is_some_and(|s| s.pool.free_blocks() == 0)
        {
            self.free_cold_host(1);
        }
        if let Some(swap) = self.swap.as_mut() {
            if let Ok(taken) = swap.pool.take(1) {
                let host = taken[0];
                let copied = self
                    .backend
                    .swap_out(&self.kv, &mut swap.kv, &[(block, host)])
                    .and_then(|_| self.backend.wait_copies());
                if let Err(e) = copied {
                    swap.pool.give_back([host]);
                    return Err(e.into());
                }
                self.cold
                    .insert(key, ColdPlace::Host(host), Arc::clone(scope));
                return Ok(true);
            }
        }
        if self
            .disk
            .as_ref()
            .is_some_and(|d| d.tier.free_blocks() == 0)
        {
            self.free_cold_disk(1);
        }
        let Some(disk) = self.disk.as_mut() else {
            return Ok(false);
        };
        if disk.tier.free_blocks() == 0 {
            return Ok(false);
        }
        let DiskSwap { tier, stage, .. } = disk;
        let (backend, kv) = (&self.backend, &self.kv);
        backend.wait_copies()?;
        backend.swap_out(kv, stage, &[(block, 0)])?;
        backend.wait_copies()?;
        let bytes = backend.host_block(stage, 0)?;
        let written = tier.write(scope, true, 1, |_, buf| {
            buf.copy_from_slice(bytes);
            Ok::<_, BackendError>(())
        })??;
        self.cold
            .insert(key, ColdPlace::Disk(written), Arc::clone(scope));
        Ok(true)
    }

    /// Frees `n` host-tier blocks held by cold prefix blocks, oldest first, moving each down to
    /// disk where it has room; returns how many were freed.
    pub(super) fn free_cold_host(&mut self, n: usize) -> usize {
        let mut freed = 0;
        while freed < n {
            let Some((key, cold)) = self.cold.oldest_host() else {
                break;
            };
            let ColdPlace::Host(host) = cold.place else {
                continue;
            };
            let moved = match (self.swap.as_ref(), self.disk.as_mut()) {
                (Some(swap), Some(disk)) if disk.tier.free_blocks() > 0 => self
                    .backend
                    .wait_copies()
                    .map_err(EngineError::from)
                    .and_then(|()| Ok(self.backend.host_block(&swap.kv, host)?))
                    .and_then(|bytes| {
                        Ok(disk.tier.write(&cold.scope, true, 1, |_, buf| {
                            buf.copy_from_slice(bytes);
                            Ok::<_, BackendError>(())
                        })??)
                    })
                    .ok(),
                _ => None,
            };
            match moved {
                Some(written) => self.cold.insert(key, ColdPlace::Disk(written), cold.scope),
                None => self.cold.stats.dropped += 1,
            }
            if let Some(swap) = self.swap.as_mut() {
                swap.pool.give_back([host]);
            }
            freed += 1;
        }
        freed
    }

    /// Frees `n` disk-tier blocks held by cold prefix blocks, oldest first.
    pub(super) fn free_cold_disk(&mut self, n: usize) -> usize {
        let mut freed = 0;
        while freed < n {
            let Some(cold) = self.cold.oldest_disk() else {
                break;
            };
            if let (ColdPlace::Disk(blocks), Some(disk)) = (cold.place, self.disk.as_mut()) {
                disk.tier.free(blocks);
            }
            self.cold.stats.dropped += 1;
            freed += 1;
        }
        freed
    }

    /// Brings the cold block of `key` back into a fresh device block, published under `key`
    /// and held once (by the caller's sequence); `None` when there is none or it cannot be
    /// read back.
    pub(super) fn promote(&mut self, key: &Key) -> Option<u32> {
        if !self.cold.entries.contains_key(key) || self.pool.free_blocks() == 0 {
            return None;
        }
        self.demote_evicted(1);
        let cold = self.cold.take(key)?;
        let block = match self.pool.take(1) {
            Ok(taken) => taken[0],
            Err(_) => {
                self.release_cold(cold);
                return None;
            }
        };
        let copied = self.copy_up(&cold, block);
        let scope = Arc::clone(&cold.scope);
        self.release_cold(cold);
        match copied {
            Ok(()) => {
                self.pool.publish(block, *key);
                self.block_scope.insert(block, scope);
                self.cold.stats.promoted += 1;
                Some(block)
            }
            Err(e) => {
                tracing::warn!(error = %e, "a cold prefix block could not be read back; its tokens are computed again");
                self.cold.stats.dropped += 1;
                if let Err(wait) = self.backend.wait_copies() {
                    tracing::warn!(error = %wait, "waiting for copies after a failed promotion");
                }
                self.pool.give_back([block]);
                None
            }
        }
    }

    fn copy_up(&mut self, cold: &ColdBlock, block: u32) -> Result<(), EngineError> {
        match &cold.place {
            ColdPlace::Host(host) => {
                let swap = self.swap.as_ref().ok_or(EngineError::NoSwapSpace)?;
                self.backend
                    .swap_in(&swap.kv, &mut self.kv, &[(*host, block)])?;
                Ok(())
            }
            ColdPlace::Disk(blocks) => {
                let disk = self.disk.as_mut().ok_or(EngineError::NoDiskTier)?;
                let DiskSwap { tier, stage, .. } = disk;
                let backend = &self.backend;
                backend.wait_copies()?;
                tier.read(blocks, |_, bytes| -> Result<(), BackendError> {
                    backend.host_block_mut(stage, 0)?.copy_from_slice(bytes);
                    Ok(())
                })??;
                backend.swap_in(stage, &mut self.kv, &[(0, block)])?;
                Ok(())
            }
        }
    }

    /// Forgets the cold copy of `key`, if there is one (its block is published on the device
    /// again, or a newer copy replaces it).
    pub(super) fn drop_cold(&mut self, key: &Key) {
        if let Some(old) = self.cold.take(key) {
            self.release_cold(old);
        }
    }

    /// Gives a cold block's storage back to its tier.
    fn release_cold(&mut self, cold: ColdBlock) {
        match cold.place {
            ColdPlace::Host(host) => {
                if let Some(swap) = self.swap.as_mut() {
                    // A copy up from it was issued first; later copies into it queue behind.
                    swap.pool.give_back([host]);
                }
            }
            ColdPlace::Disk(blocks) => {
                if let Some(disk) = self.disk.as_mut() {
                    disk.tier.free(blocks);
                }
            }
        }
    }
}
