//! The model's vocabulary as llguidance sees it: a trie of every token's bytes, and the
//! model's own tokenizer for text the grammar needs as tokens.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

/// Longest token the trie takes; a longer one (none in real vocabularies) is never allowed.
const MAX_TOKEN_BYTES: usize = 1024;

pub(super) struct ModelVocab {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl ModelVocab {
    /// Indexes the first `vocab_size` ids of `tokenizer` (the model's logits may cover more
    /// ids than its tokenizer names; those are never allowed).
    pub(super) fn build(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<TokEnv, String> {
        let mut words = tokenizer
            .token_bytes(vocab_size)
            .map_err(|e| e.to_string())?;
        for word in &mut words {
            if word.len() > MAX_TOKEN_BYTES {
                word.clear();
            }
        }
        let eos = tokenizer.eos_ids().to_vec();
        let Some(&first_eos) = eos.first() else {
            return Err("the model names no end-of-sequence token".into());
        };
        if eos.iter().any(|&id| id as usize >= vocab_size) {
            return Err("an end-of-sequence id lies outside the model's vocabulary".into());
        }
        let vocab = u32::try_from(vocab_size).map_err(|_| "the vocabulary is too large")?;
        let mut info = TokRxInfo::new(vocab, first_eos);
        info.tok_bos = tokenizer.bos_id().filter(|&id| id < vocab);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        Ok(Arc::new(Self { trie, tokenizer }))
    }
}

impl TokenizerEnv for ModelVocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode_plain(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}
