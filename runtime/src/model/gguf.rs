//! GGUF files (llama.cpp's and Ollama's model format): header, metadata and tensor table,
//! parsed from a memory map with every length and offset checked against the file.
//!
//! Tensors are not copied: each [`WeightTensor`] views the mapping. GGUF lists a tensor's
//! dimensions innermost first (`ne[0]` = columns); we report shapes in row-major order like
//! safetensors, so `[ne1, ne0]`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::tensor::{Backing, DType, WeightTensor};
use super::ModelError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;
/// Largest metadata array we accept: bigger than any real vocabulary, small enough to bound memory.
const MAX_ARRAY_LEN: u64 = 1 << 24;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// A parsed GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<WeightTensor>,
}

/// A bounds-checked reader over the mapped bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: &str) -> ModelError {
        ModelError::Format {
            file: self.file.to_owned(),
            message: format!(
                "file ends at byte {} while reading {what}; it is truncated or not GGUF",
                self.bytes.len()
            ),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.truncated(what))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| self.truncated(what))?;
        let bytes = self.take(len, what)?;
        // Vocabularies hold arbitrary byte strings; keep them lossless where valid, replace otherwise.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, kind: u32, key: &str, depth: u32) -> Result<Value, ModelError> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.bad(format!("metadata {key:?} nests arrays too deeply")));
                }
                let item_kind = self.u32(key)?;
                let len = self.u64(key)?;
                // Every item takes at least one byte: a length beyond the file is corrupt.
                if len > MAX_ARRAY_LEN || len > (self.bytes.len() - self.pos) as u64 {
                    return Err(self.bad(format!(
                        "metadata {key:?} claims an array of {len} items, more than the file holds; it is truncated or corrupt"
                    )));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_kind, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.bad(format!("metadata {key:?} has unknown value type {other}")))
            }
        })
    }

    fn bad(&self, message: String) -> ModelError {
        ModelError::Format {
            file: self.file.to_owned(),
            message,
        }
    }
}

/// Maps a GGML type id to our dtype, or names the unsupported type.
fn ggml_dtype(id: u32) -> Result<DType, String> {
    Ok(match id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        8 => DType::Q8_0,
        30 => DType::BF16,
        other => {
            let name = match other {
                6 => "Q5_0",
                7 => "Q5_1",
                9 => "Q8_1",
                10 => "Q2_K",
                11 => "Q3_K",
                12 => "Q4_K",
                13 => "Q5_K",
                14 => "Q6_K",
                15 => "Q8_K",
                16..=23 => "IQ*",
                _ => "unknown",
            };
            return Err(format!(
                "type {other} ({name}), which this engine does not read; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"
            ));
        }
    })
}

/// Maps and parses a GGUF file.
pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
    parse(path, Backing::map(path)?)
}

/// Parses GGUF bytes (already mapped or read).
pub fn parse(path: &Path, backing: Arc<Backing>) -> Result<GgufFile, ModelError> {
    let bytes = backing.bytes();
    let mut r = Reader {
        bytes,
        pos: 0,
        file: path,
    };
    let magic = r.take(4, "the magic number")?;
    if magic != MAGIC {
        return Err(r.bad(format!(
            "starts with {magic:02x?}, not the GGUF magic; is this a GGUF file?"
        )));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(r.bad(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        )));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // Each tensor entry takes at least 28 bytes and each metadata entry 12: counts beyond
    // what the file could hold are corrupt, refused before anything is sized by them.
    let room = (r.bytes.len() - r.pos) as u64;
    if tensor_count > MAX_ARRAY_LEN
        || kv_count > MAX_ARRAY_LEN
        || tensor_count.saturating_mul(28) > room
        || kv_count.saturating_mul(12) > room
    {
        return Err(r.bad(format!(
            "claims {tensor_count} tensors and {kv_count} metadata entries, more than the file holds; it is truncated or corrupt"
        )));
    }

    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string("a metadata key")?;
        let kind = r.u32(&key)?;
        let value = r.value(kind, &key, 0)?;
        metadata.insert(key, value);
    }

    struct Info {
        name: String,
        dims: Vec<u64>,
        kind: u32,
        offset: u64,
    }
    let mut infos = Vec::new();
    for _ in 0..tensor_count {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(r.bad(format!(
                "tensor {name:?} has {n_dims} dimensions (1 to 4 expected)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let kind = r.u32(&name)?;
        let offset = r.u64(&name)?;
        infos.push(Info {
            name,
            dims,
            kind,
            offset,
        });
    }

    let alignment = match metadata.get("general.alignment").and_then(Value::as_u64) {
        Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
        Some(a) => {
            return Err(r.bad(format!(
                "general.alignment {a} is not a power of two up to 65536"
            )))
        }
        None => DEFAULT_ALIGNMENT,
    };
    let data_start = r.pos.div_ceil(alignment) * alignment;

    let mut tensors = Vec::with_capacity(infos.len());
    for info in infos {
        let dtype = ggml_dtype(info.kind).map_err(|message| ModelError::Tensor {
            file: path.to_owned(),
            tensor: info.name.clone(),
            message,
        })?;
        let tensor_error = |message: String| ModelError::Tensor {
            file: path.to_owned(),
            tensor: info.name.clone(),
            message,
        };
        let dims: Vec<usize> = info
            .dims
            .iter()
            .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0 && d < 1 << 40))
            .collect::<Option<_>>()
            .ok_or_else(|| tensor_error(format!("has impossible dimensions {:?}", info.dims)))?;
        let elems = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let cols = dims[0];
        if !cols.is_multiple_of(dtype.block_elems()) {
            return Err(tensor_error(format!(
                "rows of {cols} elements are not whole {dtype} blocks of {}",
                dtype.block_elems()
            )));
        }
        let len = elems
            .and_then(|e| dtype.bytes_for(e))
            .ok_or_else(|| tensor_error(format!("size of {:?} overflows", info.dims)))?;
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .ok_or_else(|| tensor_error(format!("offset {} overflows", info.offset)))?;
        if start.checked_add(len).is_none_or(|end| end > bytes.len()) {
            return Err(tensor_error(format!(
                "needs bytes {start}..{} but the file has {}; the file is truncated",
                start.saturating_add(len),
                bytes.len()
            )));
        }
        // Row-major shape: outermost first.
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        tensors.push(WeightTensor::new(
            info.name,
            dtype,
            shape,
            backing.clone(),
            start,
            len,
        ));
    }
    Ok(GgufFile {
        version,
        metadata,
        tensors,
    })
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&WeightTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// llama.cpp's tensor names.
const GGUF_NAMES: super::TensorNames = super::TensorNames {
    layer: |l, role| {
        use super::LayerTensor;
        let name = match role {
            LayerTensor::AttnNorm => "attn_norm.weight",
            LayerTensor::Q => "attn_q.weight",
            LayerTensor::K => "attn_k.weight",
            LayerTensor::V => "attn_v.weight",
            LayerTensor::QBias => "attn_q.bias",
            LayerTensor::KBias => "attn_k.bias",
            LayerTensor::VBias => "attn_v.bias",
            LayerTensor::O => "attn_output.weight",
            LayerTensor::MlpNorm => "ffn_norm.weight",
            LayerTensor::Gate => "ffn_gate.weight",
            LayerTensor::Up => "ffn_up.weight",
            LayerTensor::Down => "ffn_down.weight",
        };
        format!("blk.{l}.{name}")
    },
    embed: "token_embd.weight",
    final_norm: "output_norm.weight",
    lm_head: "output.weight",
};

/// Loads a GGUF model: config from metadata, weights by llama.cpp's tensor names, tokenizer
/// and chat template from metadata.
pub fn load(path: &Path) -> Result<super::LoadedModel, ModelError> {
    use super::{Arch, ModelConfig, RopeStyle};

    let gguf = open(path)?;
    let arch_name = gguf
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let (arch, rope_style) = match arch_name.as_str() {
        // llama.cpp permutes Q/K rows of llama models for its interleaved RoPE; qwen2 keeps
        // Hugging Face's layout (NEOX-style RoPE).
        "llama" => (Arch::Llama, RopeStyle::Interleaved),
        "qwen2" => (Arch::Qwen2, RopeStyle::Halves),
        _ => {
            return Err(ModelError::Architecture {
                file: path.to_owned(),
                arch: arch_name,
            })
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let bad = |message: String| ModelError::Config {
        file: path.to_owned(),
        message,
    };
    let uint = |k: &str| -> Result<usize, ModelError> {
        gguf.get(&key(k))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("metadata {} is missing", key(k))))
    };
    let hidden_size = uint("embedding_length")?;
    let num_heads = uint("attention.head_count")?;
    let num_kv_heads = uint("attention.head_count_kv").unwrap_or(num_heads);
    let head_dim = uint("attention.key_length")
        .or_else(|_| uint("rope.dimension_count"))
        .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
    let tokens = gguf
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map_or(0, <[Value]>::len);
    let vocab_size = uint("vocab_size").unwrap_or(tokens);
    let rope_freq_factors = gguf.tensor("rope_freqs.weight").map(WeightTensor::to_f32);
    let config = ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: uint("feed_forward_length")?,
        num_layers: uint("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: gguf
            .get(&key("attention.layer_norm_rms_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(1e-5) as f32,
        rope_theta: gguf
            .get(&key("rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0) as f32,
        rope_scaling: None,
        rope_style,
        max_position_embeddings: uint("context_length")?,
        tie_word_embeddings: gguf.tensor("output.weight").is_none(),
        rope_freq_factors,
    };
    config.validate(path)?;
    if let Some(factors) = &config.rope_freq_factors {
        if factors.len() != config.head_dim / 2 {
            return Err(bad(format!(
                "rope_freqs has {} entries, expected {}",
                factors.len(),
                config.head_dim / 2
            )));
        }
    }

    let weights = super::assemble_weights(path, &config, &GGUF_NAMES, |name| gguf.tensor(name))?;
    let tokenizer = crate::tokenizer::Tokenizer::from_gguf(path, &gguf)?;
    Ok(super::LoadedModel {
        chat_template: gguf
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned),
        config,
        weights,
        tokenizer,
        // GGUF files carry no sampling; the model's config entry may.
        sampling_defaults: Default::default(),
        source: path.to_owned(),
        format: "gguf",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a small GGUF file by hand, independent of the parser.
    fn tiny_gguf(truncate: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&2u64.to_le_bytes()); // kv
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        string(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        string(&mut b, "llama");
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        string(&mut b, "a");
        string(&mut b, "b");
        string(&mut b, "w");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes()); // ne0 = cols
        b.extend_from_slice(&2u64.to_le_bytes()); // ne1 = rows
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for v in [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.truncate(b.len() - truncate);
        b
    }

    fn parse_bytes(bytes: Vec<u8>) -> Result<GgufFile, ModelError> {
        parse(Path::new("t.gguf"), Arc::new(Backing::Owned(bytes)))
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let file = parse_bytes(tiny_gguf(0)).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(
            file.get("general.architecture").and_then(Value::as_str),
            Some("llama")
        );
        let tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .unwrap();
        assert_eq!(tokens.len(), 2);
        let w = file.tensor("w").unwrap();
        assert_eq!(w.shape, [2, 3]);
        assert_eq!(w.to_f32(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn truncation_anywhere_is_a_clear_error() {
        let full = tiny_gguf(0).len();
        for cut in 1..full {
            match parse_bytes(tiny_gguf(cut)) {
                Err(ModelError::Format { message, .. }) => {
                    assert!(message.contains("truncated"), "cut {cut}: {message}")
                }
                Err(ModelError::Tensor {
                    tensor, message, ..
                }) => {
                    assert_eq!(tensor, "w");
                    assert!(message.contains("truncated"), "cut {cut}: {message}");
                }
                Ok(_) => panic!("cut {cut} bytes and still parsed"),
                Err(other) => panic!("cut {cut}: unexpected {other}"),
            }
        }
    }

    #[test]
    fn unknown_quant_type_is_named() {
        let mut bytes = tiny_gguf(0);
        // The type id follows the name "w", the dimension count and two dimensions.
        let name_at = bytes.windows(1).rposition(|w| w == b"w").unwrap();
        let type_at = name_at + 1 + 4 + 16;
        bytes[type_at..type_at + 4].copy_from_slice(&12u32.to_le_bytes());
        let err = parse_bytes(bytes).unwrap_err().to_string();
        assert!(err.contains("Q4_K") && err.contains("\"w\""), "{err}");
    }

    #[test]
    fn counts_beyond_the_file_are_refused_before_allocating() {
        let mut bytes = tiny_gguf(0);
        // 16M tensors claimed by a file of a few hundred bytes.
        bytes[8..16].copy_from_slice(&(1u64 << 24).to_le_bytes());
        let err = parse_bytes(bytes).unwrap_err().to_string();
        assert!(err.contains("more than the file holds"), "{err}");
    }

    #[test]
    fn wrong_magic_is_named() {
        let err = parse_bytes(b"PK\x03\x04xxxxxxxxxxxxxxxxxxxxxxx".to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the GGUF magic"), "{err}");
    }
}
