//! The engine's side of the disk tier ([`crate::kv::disk`]): swapping a sequence out to disk
//! (from the device, or demoted from the host tier) and back onto the device.
//!
//! Device blocks reach disk through a small host staging area of the backend's own host
//! memory (page-locked on a GPU), a batch at a time: copy a batch of device blocks to the
//! stage, wait for it, hand its bytes to the tier's write. Coming back, the tier's reads fill
//! the stage and each full stage is copied to the device; the stage is reused only after the
//! copies reading it have finished. A failure leaves the sequence where it was: still on the
//! device after a failed swap-out, still parked on disk after a failed swap-in (the caller
//! removes it and recomputes; a block that failed authentication is never copied back).

use super::{Engine, EngineError, Parked, Place, SeqId};
use crate::backend::{Backend, BackendError};
use crate::kv::disk::{DiskStats, DiskTier};

/// The tier and the host blocks its transfers stage through.
pub(super) struct DiskSwap<B: Backend> {
    pub(super) tier: DiskTier,
    pub(super) stage: B::HostKv,
    pub(super) stage_blocks: usize,
}

/// Host blocks in the staging area: the tier's batch, so one stage fills one submission.
const STAGE_BLOCKS: usize = crate::kv::disk::DEFAULT_BATCH;

impl<B: Backend> Engine<B> {
    /// Gives the engine a disk tier for swapped-out sequences (blocks of
    /// [`Engine::kv_block_bytes`]); allocates its host staging area.
    pub fn enable_disk(&mut self, tier: DiskTier) -> Result<(), EngineError> {
        // Parked sequences' and cold blocks' slots point into the existing tier.
        if self.disk.is_some() {
            return Err(EngineError::DiskAlreadyEnabled);
        }
        if tier.block_bytes() != self.kv_block_bytes() {
            return Err(EngineError::DiskBlockMismatch {
                tier: tier.block_bytes(),
                engine: self.kv_block_bytes(),
            });
        }
        let stage_blocks = STAGE_BLOCKS;
        let stage = self.backend.alloc_host_kv(&self.layout, stage_blocks)?;
        self.disk = Some(DiskSwap {
            tier,
            stage,
            stage_blocks,
        });
        Ok(())
    }

    /// Disk-tier blocks free (0 without a disk tier), counting those cold prefix blocks hold
    /// (a swap-out takes them).
    pub fn free_disk_blocks(&self) -> usize {
        self.disk
            .as_ref()
            .map_or(0, |d| d.tier.free_blocks() + self.cold.disk_blocks())
    }

    /// The disk tier's traffic so far.
    pub fn disk_stats(&self) -> Option<DiskStats> {
        self.disk.as_ref().map(|d| d.tier.stats())
    }

    /// Whether a sequence is swapped out to disk.
    pub fn is_on_disk(&self, id: SeqId) -> bool {
        matches!(
            self.parked.get(&id),
            Some(Parked {
                place: Place::Disk(_),
                ..
            })
        )
    }

    /// Moves a sequence's KV blocks from the device to `scope`'s file in the disk tier
    /// (sealed when `encrypt`) and frees its device blocks. On error it stays on the device.
    pub fn swap_out_to_disk(
        &mut self,
        id: SeqId,
        scope: &str,
        encrypt: bool,
    ) -> Result<(), EngineError> {
        let disk = self.disk.as_mut().ok_or(EngineError::NoDiskTier)?;
        if self.parked.contains_key(&id) {
            return Err(EngineError::Swapped(id));
        }
        let needed = self.seqs.get(&id).map_or(0, |t| t.blocks().len());
        let free = disk.tier.free_blocks();
        if free < needed {
            self.free_cold_disk(needed - free);
        }
        let Some(disk) = self.disk.as_mut() else {
            return Err(EngineError::NoDiskTier);
        };
        let table = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))?;
        let device = table.blocks();
        let DiskSwap {
            tier,
            stage,
            stage_blocks,
        } = disk;
        let (backend, kv, per_stage) = (&self.backend, &self.kv, *stage_blocks);
        let blocks = tier.write(scope, encrypt, device.len(), |i, buf| {
            let j = i % per_stage;
            if j == 0 {
                let chunk = &device[i..(i + per_stage).min(device.len())];
                let pairs: Vec<(u32, u32)> = chunk.iter().copied().zip(0..).collect();
                // The stage may still feed an earlier swap-in; the copy out must have landed
                // before its bytes are read.
                backend.wait_copies()?;
                backend.swap_out(kv, stage, &pairs)?;
                backend.wait_copies()?;
            }
            buf.copy_from_slice(backend.host_block(stage, j as u32)?);
            Ok::<_, BackendError>(())
        })??;
        let Some(mut table) = self.seqs.remove(&id) else {
            return Err(EngineError::UnknownSequence(id));
        };
        let len = table.len();
        let prefix = self.published_prefix(table.blocks());
        // The copies have finished, so the device blocks are free now.
        table.release(&mut self.pool);
        self.parked.insert(
            id,
            Parked {
                len,
                place: Place::Disk(blocks),
                prefix,
            },
        );
        Ok(())
    }

    /// Moves a sequence swapped out to the host tier on down to the disk tier, freeing its host
    /// blocks. On error it stays on the host.
    pub fn demote(&mut self, id: SeqId, scope: &str, encrypt: bool) -> Result<(), EngineError> {
        let needed = match self.parked.get(&id) {
            Some(Parked {
                place: Place::Host(blocks),
                ..
            }) => blocks.len(),
            _ => 0,
        };
        let free = self.disk.as_ref().map_or(0, |d| d.tier.free_blocks());
        if free < needed {
            self.free_cold_disk(needed - free);
        }
        let disk = self.disk.as_mut().ok_or(EngineError::NoDiskTier)?;
        let swap = self.swap.as_mut().ok_or(EngineError::NoSwapSpace)?;
        let Some(Parked {
            place: Place::Host(host_blocks),
            ..
        }) = self.parked.get(&id)
        else {
            return Err(EngineError::NotSwapped(id));
        };
        // The swap-out that filled these host blocks may still be in flight.
        self.backend.wait_copies()?;
        let backend = &self.backend;
        let written = disk
            .tier
            .write(scope, encrypt, host_blocks.len(), |i, buf| {
                buf.copy_from_slice(backend.host_block(&swap.kv, host_blocks[i])?);
                Ok::<_, BackendError>(())
            })??;
        let Some(parked) = self.parked.get_mut(&id) else {
            return Err(EngineError::NotSwapped(id));
        };
        if let Place::Host(host_blocks) = std::mem::replace(&mut parked.place, Place::Disk(written))
        {
            swap.pool.give_back(host_blocks);
        }
        Ok(())
    }

    /// Reads a disk-parked sequence's blocks after its first `skip` and copies them into
    /// fresh device blocks, and unparks it; returns those blocks and its length. On error it
    /// stays parked.
    pub(super) fn copy_in_from_disk(
        &mut self,
        id: SeqId,
        skip: usize,
    ) -> Result<(Vec<u32>, usize), EngineError> {
        let Some(Parked {
            place: Place::Disk(blocks),
            len,
            ..
        }) = self.parked.get(&id)
        else {
            return Err(EngineError::NotSwapped(id));
        };
        let len = *len;
        let total = blocks.len();
        let skip = skip.min(total);
        let needed = total - skip;
        self.take_for_swap_in(needed)?;
        let disk = self.disk.as_mut().ok_or(EngineError::NoDiskTier)?;
        let Some(Parked {
            place: Place::Disk(blocks),
            ..
        }) = self.parked.get(&id)
        else {
            return Err(EngineError::NotSwapped(id));
        };
        let device = self.pool.take(needed)?;
        let DiskSwap {
            tier,
            stage,
            stage_blocks,
        } = disk;
        let (backend, kv, per_stage) = (&self.backend, &mut self.kv, *stage_blocks);
        let flush =
            |stage: &mut B::HostKv, kv: &mut B::Kv, first: usize| -> Result<(), BackendError> {
                let count = per_stage.min(needed - first);
                let pairs: Vec<(u32, u32)> = (0..count as u32)
                    .zip(device[first..first + count].iter().copied())
                    .collect();
                backend.swap_in(stage, kv, &pairs).map(|_| ())
            };
        // The blocks shared again are not read.
        let read = tier.read_from(blocks, skip, |i, bytes| -> Result<(), BackendError> {
            let Some(i) = i.checked_sub(skip) else {
                return Ok(());
            };
            let j = i % per_stage;
            if j == 0 {
                if i > 0 {
                    flush(stage, kv, i - per_stage)?;
                }
                // The stage is rewritten only once the copies reading it have finished.
                backend.wait_copies()?;
            }
            backend
                .host_block_mut(stage, j as u32)?
                .copy_from_slice(bytes);
            Ok(())
        });
        let result = match read {
            Ok(Ok(())) if needed > 0 => {
                flush(stage, kv, (needed - 1) / per_stage * per_stage).map_err(EngineError::from)
            }
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            // Copies already issued may still write these blocks: let them land first.
            if let Err(wait) = self.backend.wait_copies() {
                tracing::warn!(error = %wait, "waiting for swap copies after a failed swap-in");
            }
            self.pool.give_back(device);
            return Err(e);
        }
        let Some(Parked {
            place: Place::Disk(blocks),
            ..
        }) = self.parked.remove(&id)
        else {
            return Err(EngineError::NotSwapped(id));
        };
        tier.free(blocks);
        Ok((device, len))
    }
}
