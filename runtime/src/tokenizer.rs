//! Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` crate (pure-Rust
//! features), and GGUF vocabularies turned into the same kind of tokenizer the way
//! transformers does it, so both formats tokenize identically to the reference.
//!
//! Encoding never adds special tokens by itself except a BOS token when the model asks for
//! one (`add_bos_token`); chat templates write their own special tokens as text.

use std::path::Path;

use serde_json::{json, Value};

use crate::model::gguf::{GgufFile, Value as GgufValue};
use crate::model::ModelError;

/// A tokenizer with the model's special ids.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Vec<u32>,
    bos: Option<u32>,
    add_bos: bool,
}

/// GPT-2's reversible map from bytes to printable characters, used by byte-level BPE.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    map
}

/// A tokenization failure (never expected on valid UTF-8, but never a panic either).
#[derive(Debug, thiserror::Error)]
#[error("tokenizer failed: {0}")]
pub struct TokenizerError(String);

impl TokenizerError {
    /// Whether the tokenizer crashed (a contained panic) rather than refused an input: the
    /// request it was serving cannot go on.
    pub fn is_crash(&self) -> bool {
        self.0.contains(CRASH_MARK)
    }
}

/// Marks the message of a contained panic.
const CRASH_MARK: &str = "the model's tokenizer failed while";

impl Tokenizer {
    /// Loads `tokenizer.json` from a model folder; `eos` comes in from `config.json` and gains
    /// the `eos_token` of `tokenizer_config.json` and `generation_config.json`'s ids.
    pub fn from_hf_folder(
        dir: &Path,
        tokenizer_config: &Value,
        eos: &mut Vec<u32>,
    ) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        // The tokenizers crate can panic on a malformed file: contained, it is this model's
        // load error.
        let bytes = crate::model::files::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let inner = contained("loading tokenizer.json", || {
            tokenizers::Tokenizer::from_bytes(&bytes)
        })
        .map_err(|e| ModelError::Format {
            file: path.clone(),
            message: e.to_string(),
        })?
        .map_err(|e| ModelError::Format {
            file: path.clone(),
            message: format!("is not a tokenizer this engine can read: {e}"),
        })?;
        let token = |field: &str| -> Option<u32> {
            let v = &tokenizer_config[field];
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(text)
        };
        if let Some(id) = token("eos_token") {
            eos.push(id);
        }
        if let Ok(text) = crate::model::files::read_to_string(&dir.join("generation_config.json")) {
            if let Ok(generation) = serde_json::from_str::<Value>(&text) {
                match &generation["eos_token_id"] {
                    Value::Number(n) => eos.extend(n.as_u64().map(|v| v as u32)),
                    Value::Array(items) => {
                        eos.extend(items.iter().filter_map(|v| v.as_u64().map(|v| v as u32)))
                    }
                    _ => {}
                }
            }
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Self {
            bos: token("bos_token"),
            add_bos: tokenizer_config["add_bos_token"].as_bool().unwrap_or(false),
            inner,
            eos: std::mem::take(eos),
        })
    }

    /// Builds the tokenizer of a GGUF file from its vocabulary and merges.
    pub fn from_gguf(file: &Path, gguf: &GgufFile) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::Format {
            file: file.to_owned(),
            message,
        };
        let model = gguf
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model {model:?} is not supported yet; byte-level BPE (\"gpt2\": Llama 3, Qwen2, SmolLM) is"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>, ModelError> {
            gguf.get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| bad(format!("lacks {key}")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = gguf
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let id_of = |key: &str| gguf.get(key).and_then(GgufValue::as_u64).map(|v| v as u32);

        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            // GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
            let kind = types.get(id).copied().unwrap_or(1);
            if kind == 3 || kind == 4 {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": kind == 3,
                }));
            }
            vocab.entry(token.clone()).or_insert(json!(id));
        }
        let add_prefix_space = gguf
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(GgufValue::as_bool)
            .unwrap_or(false);
        // The same structure transformers' GGUF converter builds (a GPT-2 byte-level BPE).
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let inner: tokenizers::Tokenizer = contained("building the GGUF tokenizer", || {
            spec.to_string().parse::<tokenizers::Tokenizer>()
        })
        .map_err(|e| bad(e.to_string()))?
        .map_err(|e| {
            bad(format!(
                "its vocabulary does not form a valid BPE tokenizer: {e}"
            ))
        })?;
        let mut eos: Vec<u32> = id_of("tokenizer.ggml.eos_token_id").into_iter().collect();
        eos.extend(id_of("tokenizer.ggml.eot_token_id"));
        eos.sort_unstable();
        eos.dedup();
        Ok(Self {
            inner,
            eos,
            bos: id_of("tokenizer.ggml.bos_token_id"),
            add_bos: gguf
                .get("tokenizer.ggml.add_bos_token")
                .and_then(GgufValue::as_bool)
                .unwrap_or(false),
        })
    }

    /// A byte-level tokenizer with one token per byte (GPT-2's byte-to-character map) and the
    /// given special tokens after them; for the generated stand-in model.
    pub fn byte_level(specials: &[&str]) -> Result<Self, TokenizerError> {
        let mut vocab = serde_json::Map::new();
        for (id, c) in byte_to_char().iter().enumerate() {
            vocab.insert(c.to_string(), json!(id));
        }
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                vocab.insert((*s).to_owned(), json!(256 + i));
                json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []},
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| TokenizerError(e.to_string()))?;
        let eos = specials
            .iter()
            .position(|s| *s == "<|im_end|>")
            .map(|i| 256 + i as u32);
        Ok(Self {
            inner,
            eos: eos.into_iter().collect(),
            bos: None,
            add_bos: false,
        })
    }

    /// A tokenizer from `tokenizer.json` text, with no special ids (tests of decoding).
    pub fn from_json(json: &str) -> Result<Self, TokenizerError> {
        let inner: tokenizers::Tokenizer = contained("loading tokenizer.json", || {
            json.parse::<tokenizers::Tokenizer>()
        })?
        .map_err(|e: tokenizers::Error| TokenizerError(e.to_string()))?;
        Ok(Self {
            inner,
            eos: Vec::new(),
            bos: None,
            add_bos: false,
        })
    }

    /// Token ids of `text`, with the model's BOS first when it wants one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = contained("encoding", || self.inner.encode(text, false))?
            .map_err(|e| TokenizerError(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Text of `ids`; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        contained("decoding", || self.inner.decode(ids, skip_special))?
            .map_err(|e| TokenizerError(e.to_string()))
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Token ids of `text` and nothing else: no BOS, whatever the model wants.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = contained("encoding", || self.inner.encode(text, false))?
            .map_err(|e| TokenizerError(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The bytes each of the first `vocab_size` ids stands for, as constrained decoding needs
    /// them: a special token is its name after a 0xFF marker byte (which no UTF-8 text holds);
    /// an id with no token is empty. Byte-level (GPT-2 style) and byte-fallback
    /// (SentencePiece style) vocabularies are understood; others are an error.
    pub fn token_bytes(&self, vocab_size: usize) -> Result<Vec<Vec<u8>>, TokenizerError> {
        const SPECIAL: u8 = 0xFF;
        let (mut byte_level, mut byte_fallback) = (false, false);
        fn kinds(d: &tokenizers::DecoderWrapper, level: &mut bool, fallback: &mut bool) {
            match d {
                tokenizers::DecoderWrapper::ByteLevel(_) => *level = true,
                tokenizers::DecoderWrapper::ByteFallback(_) => *fallback = true,
                tokenizers::DecoderWrapper::Sequence(seq) => {
                    for d in seq.get_decoders() {
                        kinds(d, level, fallback);
                    }
                }
                _ => {}
            }
        }
        if let Some(decoder) = self.inner.get_decoder() {
            kinds(decoder, &mut byte_level, &mut byte_fallback);
        }
        if !byte_level && !byte_fallback {
            return Err(TokenizerError(
                "constrained decoding needs a byte-level or byte-fallback tokenizer, and this model's decodes otherwise".into(),
            ));
        }
        let byte_of: std::collections::HashMap<char, u8> = byte_to_char()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let added = contained("listing added tokens", || {
            self.inner.get_added_tokens_decoder()
        })?;
        let mut bytes = Vec::with_capacity(vocab_size);
        for id in 0..vocab_size as u32 {
            let token = match added.get(&id) {
                Some(t) if t.special => {
                    let mut name = vec![SPECIAL];
                    name.extend_from_slice(t.content.as_bytes());
                    name
                }
                Some(t) => t.content.clone().into_bytes(),
                None => match self.id_to_token(id) {
                    None => Vec::new(),
                    Some(name) if byte_level => {
                        // A character outside GPT-2's map means the token is not byte-level
                        // text: it can never be produced.
                        name.chars()
                            .map(|c| byte_of.get(&c).copied())
                            .collect::<Option<Vec<u8>>>()
                            .unwrap_or_default()
                    }
                    Some(name) => {
                        let hex = name
                            .strip_prefix("<0x")
                            .and_then(|rest| rest.strip_suffix('>'))
                            .filter(|h| h.len() == 2)
                            .and_then(|h| u8::from_str_radix(h, 16).ok());
                        match hex {
                            Some(byte) => vec![byte],
                            None => name.replace('\u{2581}', " ").into_bytes(),
                        }
                    }
                },
            };
            bytes.push(token);
        }
        Ok(bytes)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        contained("looking up a token", || self.inner.id_to_token(id))
            .ok()
            .flatten()
    }
}

/// Runs a call into the tokenizers crate, turning a panic (a model's tokenizer.json can drive
/// it into one) into an error for the request at hand instead of a dead thread.
fn contained<T>(what: &str, call: impl FnOnce() -> T) -> Result<T, TokenizerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|panic| {
        let detail = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%detail, "the model's tokenizer panicked while {what}");
        TokenizerError(format!(
            "{CRASH_MARK} {what} ({detail}); the request was stopped, the model keeps serving; an operator should check its tokenizer.json"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer.json whose `Strip` decoder, asked to strip more than a token holds, panics
    /// inside the tokenizers crate (an index below zero).
    const PANICKING: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":null,"post_processor":null,
        "decoder":{"type":"Strip","content":" ","start":5,"stop":5},
        "model":{"type":"WordLevel","vocab":{" ":0,"a":1,"[UNK]":2},"unk_token":"[UNK]"}}"#;

    #[test]
    fn a_panicking_tokenizer_is_an_error_not_a_dead_thread() {
        let t = Tokenizer::from_json(PANICKING).unwrap();
        let err = t.decode(&[0], false).unwrap_err().to_string();
        assert!(err.contains("failed while decoding"), "{err}");
        assert!(err.contains("keeps serving"), "{err}");
        // The same guard stands around encoding and token lookups.
        let err = contained("encoding", || -> u32 { panic!("boom") }).unwrap_err();
        assert!(
            err.to_string().contains("failed while encoding (boom)"),
            "{err}"
        );
        assert_eq!(t.encode("a").unwrap(), [1]);
    }

    #[test]
    fn byte_level_tokenizer_round_trips_any_text() {
        let t = Tokenizer::byte_level(&["<|im_start|>", "<|im_end|>"]).unwrap();
        for text in ["hello", "naïve 東京 🙂", " two  spaces\n", ""] {
            let ids = t.encode(text).unwrap();
            assert_eq!(ids.len(), text.len(), "one token per byte: {text:?}");
            assert_eq!(t.decode(&ids, false).unwrap(), text);
        }
        assert_eq!(
            t.encode("<|im_start|>hi<|im_end|>").unwrap(),
            [256, b'h' as u32, b'i' as u32, 257]
        );
        assert_eq!(t.eos_ids(), [257]);
    }
}
