//! Keys of the prefix cache: a full block is known by a hash of its scope (the tenant, within
//! one model's engine) and of every token from the sequence's start to the block's end, as a
//! chain: each block's key hashes the previous block's key and its own tokens. Two blocks
//! share a key only if their sequences agree on every token up to there, in the same scope,
//! so a tenant never reads another's cache: their scopes differ, and a collision of 128 bits
//! of SHA-256 is not a practical event.

use sha2::{Digest as _, Sha256};

/// A block's place in a token chain.
pub type Key = [u8; 16];

/// The key a scope's chains start from.
pub fn scope_key(scope: &str) -> Key {
    let mut hash = Sha256::new();
    hash.update(b"accel prefix cache v1\0");
    hash.update((scope.len() as u64).to_le_bytes());
    hash.update(scope.as_bytes());
    truncate(hash)
}

/// The key of the block after `previous` holding `tokens` (a full block).
pub fn next_key(previous: &Key, tokens: &[u32]) -> Key {
    let mut hash = Sha256::new();
    hash.update(previous);
    for t in tokens {
        hash.update(t.to_le_bytes());
    }
    truncate(hash)
}

/// The keys of the full blocks of `tokens`, from `start`, in order.
pub fn chain(start: Key, tokens: &[u32], block_size: usize) -> Vec<Key> {
    let mut key = start;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|block| {
            key = next_key(&key, block);
            key
        })
        .collect()
}

fn truncate(hash: Sha256) -> Key {
    let digest = hash.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// Where a sequence's chain stands: the key of its last full block (or its scope's) and the
/// tokens fed since, so each block is hashed once, when it fills.
#[derive(Debug, Clone)]
pub struct ChainState {
    key: Key,
    /// Full blocks hashed so far.
    blocks: usize,
    partial: Vec<u32>,
}

impl ChainState {
    /// A chain whose first `blocks` full blocks end at `key`.
    pub fn new(key: Key, blocks: usize) -> Self {
        Self {
            key,
            blocks,
            partial: Vec::new(),
        }
    }

    /// Takes fed tokens in; returns (index, key) of each block they filled.
    pub fn feed(&mut self, tokens: &[u32], block_size: usize) -> Vec<(usize, Key)> {
        let block_size = block_size.max(1);
        let mut filled = Vec::new();
        for &t in tokens {
            self.partial.push(t);
            if self.partial.len() == block_size {
                self.key = next_key(&self.key, &self.partial);
                filled.push((self.blocks, self.key));
                self.blocks += 1;
                self.partial.clear();
            }
        }
        filled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_every_token_before_them_and_the_scope() {
        let a = scope_key("alpha");
        let tokens: Vec<u32> = (0..40).collect();
        let keys = chain(a, &tokens, 16);
        assert_eq!(keys.len(), 2, "only full blocks have keys");
        // The same tokens in another scope, or one token changed early, change every key on.
        assert!(chain(scope_key("beta"), &tokens, 16)
            .iter()
            .zip(&keys)
            .all(|(x, y)| x != y));
        let mut changed = tokens.clone();
        changed[3] = 99;
        let other = chain(a, &changed, 16);
        assert!(other[0] != keys[0] && other[1] != keys[1]);
        // A change in the second block leaves the first block's key.
        changed = tokens.clone();
        changed[20] = 99;
        let other = chain(a, &changed, 16);
        assert!(other[0] == keys[0] && other[1] != keys[1]);
        // Scopes are length-prefixed: no two names run together into one.
        assert_ne!(scope_key("ab"), scope_key("a\u{0}b"));
    }

    #[test]
    fn feeding_in_pieces_gives_the_chains_keys() {
        let tokens: Vec<u32> = (100..150).collect();
        let start = scope_key("t");
        let whole = chain(start, &tokens, 8);
        let mut state = ChainState::new(start, 0);
        let mut fed = Vec::new();
        for piece in [&tokens[..5], &tokens[5..6], &tokens[6..31], &tokens[31..]] {
            fed.extend(state.feed(piece, 8));
        }
        assert_eq!(fed, whole.iter().copied().enumerate().collect::<Vec<_>>());
        // A chain that starts from shared blocks goes on from their last key.
        let mut resumed = ChainState::new(whole[1], 2);
        assert_eq!(resumed.feed(&tokens[16..24], 8), [(2, whole[2])]);
    }
}
