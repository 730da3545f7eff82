//! The paged KV cache's bookkeeping: a pool of fixed-size blocks and one block table per
//! sequence. Pure logic with no backend types; only a backend touches the memory the block
//! numbers index.
//!
//! Blocks are counted by holder: a table, or a copy in flight. A full block whose tokens are
//! known can be published under the key of its token chain ([`prefix`]); another sequence of
//! the same scope (tenant and model) whose prompt starts with the same tokens then holds the
//! same block instead of computing it again. Only full blocks are shared, and a table only
//! ever writes past its last full block, so a shared block is never written. A published
//! block nobody holds stays cached and counts as free: it is evicted, least recently let go
//! first, when the pool needs it.
//!
//! Costs: allocating or freeing `n` blocks is O(n log n) at worst (eviction order); a slot
//! lookup is O(1). Invariants: a block is free, idle in the cache, or held; its count of
//! holders is exact; a table holds exactly `ceil(len / block_size)` blocks.

pub mod disk;
pub mod prefix;

use std::collections::{BTreeMap, HashMap};

pub use self::prefix::Key;

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

/// The blocks of a pool, free and held, and the published ones (the prefix cache).
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    free: Vec<u32>,
    /// Holders of each block.
    holders: Vec<u32>,
    by_key: HashMap<Key, u32>,
    key_of: HashMap<u32, Key>,
    /// Published blocks nobody holds, by when they were let go (oldest evicted first).
    idle: BTreeMap<u64, u32>,
    idle_since: HashMap<u32, u64>,
    clock: u64,
    /// Cached blocks evicted for room so far.
    evictions: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Hand out low block numbers first (a stack popped from the end).
        let free = (0..num_blocks as u32).rev().collect();
        Self {
            block_size,
            free,
            holders: vec![0; num_blocks],
            by_key: HashMap::new(),
            key_of: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: HashMap::new(),
            clock: 0,
            evictions: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be taken: free ones and cached ones nobody holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// The cached blocks (and their keys) that taking `n` blocks now would evict, oldest
    /// first: what can still be saved before they go.
    pub fn would_evict(&self, n: usize) -> Vec<(u32, Key)> {
        let evicted = n.saturating_sub(self.free.len()).min(self.idle.len());
        self.idle
            .values()
            .take(evicted)
            .filter_map(|&b| Some((b, *self.key_of.get(&b)?)))
            .collect()
    }

    /// Whether a block is published under `key` (held or idle), without holding it.
    pub fn is_published(&self, key: &Key) -> bool {
        self.by_key.contains_key(key)
    }

    /// Cached blocks evicted for room so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Published blocks, held or idle.
    pub fn cached_blocks(&self) -> usize {
        self.key_of.len()
    }

    /// Takes `n` blocks (low numbers first, so a fresh pool hands out runs), evicting cached
    /// blocks nobody holds when the free ones are too few; or takes none.
    pub fn take(&mut self, n: usize) -> Result<Vec<u32>, OutOfBlocks> {
        if n > self.free_blocks() {
            return Err(OutOfBlocks {
                needed: n,
                free: self.free_blocks(),
                block_size: self.block_size,
            });
        }
        while self.free.len() < n {
            let Some((_, block)) = self.idle.pop_first() else {
                break;
            };
            self.idle_since.remove(&block);
            if let Some(key) = self.key_of.remove(&block) {
                self.by_key.remove(&key);
            }
            self.free.push(block);
            self.evictions += 1;
        }
        let mut taken = self.free.split_off(self.free.len().saturating_sub(n));
        taken.reverse();
        for &b in &taken {
            self.holders[b as usize] = 1;
        }
        Ok(taken)
    }

    /// Lets go of blocks taken or shared from this pool: each is free (or idle in the cache,
    /// if published) once its last holder lets go.
    pub fn give_back(&mut self, blocks: impl IntoIterator<Item = u32>) {
        for block in blocks {
            let Some(holders) = self.holders.get_mut(block as usize) else {
                debug_assert!(false, "block {block} is not of this pool");
                continue;
            };
            if *holders == 0 {
                debug_assert!(false, "block {block} given back twice");
                continue;
            }
            *holders -= 1;
            if *holders > 0 {
                continue;
            }
            if self.key_of.contains_key(&block) {
                self.clock += 1;
                self.idle.insert(self.clock, block);
                self.idle_since.insert(block, self.clock);
            } else {
                self.free.push(block);
            }
        }
    }

    /// The block published under `key`, now held once more; none if no block is.
    pub fn share(&mut self, key: &Key) -> Option<u32> {
        let block = *self.by_key.get(key)?;
        if let Some(since) = self.idle_since.remove(&block) {
            self.idle.remove(&since);
        }
        self.holders[block as usize] += 1;
        Some(block)
    }

    /// Publishes a held, full block under the key of its token chain. A key already published
    /// (the same tokens in another block) keeps its block; this one stays private.
    pub fn publish(&mut self, block: u32, key: Key) -> bool {
        if self.holders.get(block as usize).is_none_or(|&h| h == 0)
            || self.by_key.contains_key(&key)
            || self.key_of.contains_key(&block)
        {
            return false;
        }
        self.by_key.insert(key, block);
        self.key_of.insert(block, key);
        true
    }

    /// The key `block` is published under, if it is.
    pub fn key_of(&self, block: u32) -> Option<Key> {
        self.key_of.get(&block).copied()
    }

    /// Holders of `block` (tests and invariant checks).
    pub fn holders(&self, block: u32) -> u32 {
        self.holders.get(block as usize).copied().unwrap_or(0)
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
    fn a_published_block_is_shared_kept_while_idle_and_evicted_last_let_go_last() {
        let mut pool = BlockPool::new(4, 4);
        let key = |i: u8| [i; 16];
        let mut a = BlockTable::new();
        a.grow(&mut pool, 8).unwrap();
        let (first, second) = (a.blocks()[0], a.blocks()[1]);
        assert!(pool.publish(first, key(1)));
        assert!(pool.publish(second, key(2)));
        assert!(!pool.publish(second, key(3)), "a block has one key");
        // Another table holds the same two blocks.
        let shared: Vec<u32> = [key(1), key(2)]
            .iter()
            .filter_map(|k| pool.share(k))
            .collect();
        assert_eq!(shared, [first, second]);
        assert_eq!(pool.holders(first), 2);
        let mut b = BlockTable::from_blocks(shared, 8);
        b.grow(&mut pool, 9).unwrap();
        a.release(&mut pool);
        assert_eq!(pool.holders(first), 1, "b still holds it");
        assert_eq!(pool.free_blocks(), 1);
        // Let go by everyone: idle, still found, and counted free.
        b.release(&mut pool);
        assert_eq!(pool.free_blocks(), 4);
        assert_eq!(pool.cached_blocks(), 2);
        // Taking all but one evicts the block let go first.
        let taken = pool.take(3).unwrap();
        assert!(
            taken.contains(&first) && !taken.contains(&second),
            "{taken:?}"
        );
        assert_eq!(pool.share(&key(1)), None);
        assert_eq!(pool.share(&key(2)), Some(second));
        pool.give_back(taken);
        pool.give_back([second]);
        assert_eq!(pool.free_blocks(), 4);
        assert!(pool.take(5).is_err());
    }

    #[test]
    fn holders_are_counted_exactly_through_sharing_and_eviction() {
        let bs = 4;
        let mut pool = BlockPool::new(32, bs);
        let mut tables: Vec<BlockTable> = (0..6).map(|_| BlockTable::new()).collect();
        for round in 0..400usize {
            let i = round * 5 % tables.len();
            match round % 6 {
                5 => tables[i].release(&mut pool),
                4 => {
                    // Start again from another table's published prefix.
                    tables[i].release(&mut pool);
                    let from = (i + 1) % tables.len();
                    let full = tables[from].len() / bs;
                    let keys: Vec<Key> = (0..full).map(|j| [(from * 64 + j) as u8; 16]).collect();
                    let mut shared = Vec::new();
                    for k in &keys {
                        match pool.share(k) {
                            Some(b) => shared.push(b),
                            None => break,
                        }
                    }
                    let len = shared.len() * bs;
                    tables[i] = BlockTable::from_blocks(shared, len);
                }
                _ => {
                    let len = tables[i].len() + round % 7 + 1;
                    if tables[i].grow(&mut pool, len).is_ok() {
                        // Publish its full blocks under keys of its own.
                        for (j, &b) in tables[i].blocks()[..len / bs].iter().enumerate() {
                            pool.publish(b, [(i * 64 + j) as u8; 16]);
                        }
                    }
                }
            }
            let mut held: HashMap<u32, u32> = HashMap::new();
            for t in &tables {
                for &b in t.blocks() {
                    *held.entry(b).or_default() += 1;
                }
                assert_eq!(t.blocks().len(), t.len().div_ceil(bs));
            }
            for b in 0..32u32 {
                assert_eq!(
                    pool.holders(b),
                    held.get(&b).copied().unwrap_or(0),
                    "round {round}"
                );
            }
            assert_eq!(held.len() + pool.free_blocks(), 32, "round {round}");
        }
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
