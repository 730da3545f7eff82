//! The paged KV cache's bookkeeping: a pool of fixed-size blocks and one block table per
//! sequence. Pure logic with no backend types; only a backend touches the memory the block
//! numbers index.
//!
//! Costs: allocating or freeing `n` blocks is O(n); a slot lookup is O(1).
//! Invariants: a block is either free or owned by exactly one table; a table holds exactly
//! `ceil(len / block_size)` blocks.

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The pool ran out of blocks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache needs {needed} more blocks of {block_size} tokens but only {free} are free")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
    pub block_size: usize,
}

/// Free blocks of the device tier.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    free: Vec<u32>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Hand out low block numbers first (a stack popped from the end).
        let free = (0..num_blocks as u32).rev().collect();
        Self { block_size, free }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` blocks (low numbers first, so a fresh pool hands out runs), or none.
    pub fn take(&mut self, n: usize) -> Result<Vec<u32>, OutOfBlocks> {
        if n > self.free.len() {
            return Err(OutOfBlocks {
                needed: n,
                free: self.free.len(),
                block_size: self.block_size,
            });
        }
        let mut taken = self.free.split_off(self.free.len() - n);
        taken.reverse();
        Ok(taken)
    }

    /// Returns blocks taken from this pool.
    pub fn give_back(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

/// A sequence's blocks and how many tokens they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// A table over blocks already taken, holding `len` tokens (a sequence swapped back in).
    pub fn from_blocks(blocks: Vec<u32>, len: usize) -> Self {
        Self { blocks, len }
    }

    /// Gives up the table's blocks without returning them to a pool (the caller frees them
    /// once nothing reads them any more).
    pub fn into_blocks(self) -> Vec<u32> {
        self.blocks
    }

    /// Grows the table to hold `new_len` tokens, taking blocks from `pool`; on failure nothing
    /// changes.
    pub fn grow(&mut self, pool: &mut BlockPool, new_len: usize) -> Result<(), OutOfBlocks> {
        let needed = new_len
            .div_ceil(pool.block_size())
            .saturating_sub(self.blocks.len());
        if needed > 0 {
            let blocks = pool.take(needed)?;
            self.blocks.extend(blocks);
        }
        self.len = self.len.max(new_len);
        Ok(())
    }

    /// The pool slot of token `position` (which must be below `len`).
    pub fn slot(&self, position: usize, block_size: usize) -> u32 {
        self.blocks[position / block_size] * block_size as u32 + (position % block_size) as u32
    }

    /// Shrinks the table back to `len` tokens (undoing a grow), returning spare blocks.
    pub fn truncate(&mut self, pool: &mut BlockPool, len: usize) {
        let keep = len.div_ceil(pool.block_size());
        if keep < self.blocks.len() {
            pool.give_back(self.blocks.drain(keep..));
        }
        self.len = self.len.min(len);
    }

    /// Returns every block to `pool`.
    pub fn release(&mut self, pool: &mut BlockPool) {
        pool.give_back(self.blocks.drain(..));
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_take_whole_blocks_and_give_them_back() {
        let mut pool = BlockPool::new(4, 16);
        let mut a = BlockTable::new();
        a.grow(&mut pool, 1).unwrap();
        assert_eq!(a.blocks(), [0]);
        a.grow(&mut pool, 16).unwrap();
        assert_eq!(a.blocks().len(), 1);
        a.grow(&mut pool, 17).unwrap();
        assert_eq!(a.blocks(), [0, 1]);
        assert_eq!(a.slot(16, 16), 16);
        assert_eq!(a.slot(5, 16), 5);

        let mut b = BlockTable::new();
        b.grow(&mut pool, 20).unwrap();
        assert_eq!(b.blocks(), [2, 3]);
        assert_eq!(b.slot(17, 16), 3 * 16 + 1);
        assert_eq!(pool.free_blocks(), 0);

        let err = a.grow(&mut pool, 33).unwrap_err();
        assert_eq!(
            err,
            OutOfBlocks {
                needed: 1,
                free: 0,
                block_size: 16
            }
        );
        assert_eq!(a.len(), 17, "a failed grow changes nothing");

        a.release(&mut pool);
        assert_eq!(pool.free_blocks(), 2);
        assert!(a.is_empty());
        let mut c = BlockTable::new();
        c.grow(&mut pool, 32).unwrap();
        let mut blocks = c.blocks().to_vec();
        blocks.sort_unstable();
        assert_eq!(blocks, [0, 1]);
    }

    #[test]
    fn no_block_is_ever_owned_twice() {
        let mut pool = BlockPool::new(64, 4);
        let mut tables: Vec<BlockTable> = (0..8).map(|_| BlockTable::new()).collect();
        // A deterministic churn of grows and releases.
        for round in 0..200usize {
            let i = round * 7 % tables.len();
            if round % 5 == 4 {
                tables[i].release(&mut pool);
            } else {
                let len = tables[i].len() + round % 9 + 1;
                let _ = tables[i].grow(&mut pool, len);
            }
            let mut owned: Vec<u32> = tables
                .iter()
                .flat_map(|t| t.blocks().iter().copied())
                .collect();
            let total = owned.len() + pool.free_blocks();
            owned.sort_unstable();
            owned.dedup();
            assert_eq!(owned.len() + pool.free_blocks(), 64, "round {round}");
            assert_eq!(total, 64);
            for t in &tables {
                assert_eq!(t.blocks().len(), t.len().div_ceil(4));
            }
        }
    }
}
