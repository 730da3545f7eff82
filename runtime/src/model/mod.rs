//! Models: a Llama-family decoder's configuration and weights, from a Hugging Face folder
//! (`config.json` + safetensors) or a GGUF file, validated before anything runs.
//!
//! Owns the mapping from file conventions (tensor names, metadata keys, RoPE layouts) to one
//! [`ModelConfig`] and one [`ModelWeights`]; the engine never sees file formats. Weights stay
//! in the file mapping in their stored dtype. Every shape is checked at load, so the forward
//! pass can trust them.

pub mod files;
pub mod generated;
pub mod gguf;
pub mod hf;
pub mod tensor;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use self::tensor::{DType, WeightTensor};

/// Why a model could not be loaded; each names the file and, where it applies, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Format { file: PathBuf, message: String },
    #[error("{file}: tensor {tensor:?} {message}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Config { file: PathBuf, message: String },
    #[error("{file}: architecture {arch:?} is not supported; supported: Llama, Mistral, Qwen2 and SmolLM (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; GGUF llama, qwen2)")]
    Architecture { file: PathBuf, arch: String },
}

/// Decoder families that differ in the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3, Mistral, SmolLM: no attention bias.
    Llama,
    /// Qwen2: bias on the query, key and value projections.
    Qwen2,
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Hugging Face's `rotate_half`: dimension `i` pairs with `i + head_dim/2`.
    Halves,
    /// llama.cpp's GGUF llama layout (Q and K rows permuted at conversion): `2i` pairs with `2i+1`.
    Interleaved,
}

/// Llama 3's frequency-dependent RoPE scaling (`rope_type: llama3`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// The shape and constants of a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3Scaling>,
    pub rope_style: RopeStyle,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Per-pair frequency divisors stored by GGUF files as `rope_freqs.weight` (llama.cpp's
    /// form of Llama 3 scaling).
    pub rope_freq_factors: Option<Vec<f32>>,
}

impl ModelConfig {
    /// Checks the numbers fit together; `file` names the source in the message.
    pub fn validate(&self, file: &Path) -> Result<(), ModelError> {
        let bad = |message: String| ModelError::Config {
            file: file.to_owned(),
            message,
        };
        // Maxima far above any released model (Llama 3.1 405B: 126 layers, hidden 16384,
        // vocabulary 128256), checked before anything is sized by them.
        for (name, value, max) in [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 19),
            ("num_hidden_layers", self.num_layers, 1024),
            ("num_attention_heads", self.num_heads, 1024),
            ("num_key_value_heads", self.num_kv_heads, 1024),
            ("head_dim", self.head_dim, 4096),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ] {
            if value == 0 || value > max {
                return Err(bad(format!(
                    "{name} = {value} is out of range (1 to {max}); the model file is corrupt or not a supported model"
                )));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} is odd; RoPE needs pairs",
                self.head_dim
            )));
        }
        if !(self.rms_norm_eps.is_finite()
            && self.rms_norm_eps > 0.0
            && self.rope_theta.is_finite()
            && self.rope_theta > 0.0)
        {
            return Err(bad(format!(
                "rms_norm_eps {} and rope_theta {} must be positive",
                self.rms_norm_eps, self.rope_theta
            )));
        }
        Ok(())
    }

    /// RoPE inverse frequencies, one per pair, computed in f32 as Hugging Face does
    /// (`1 / theta^(2i/d)`), with Llama 3 scaling applied when configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / d as f32;
                1.0 / self.rope_theta.powf(exponent)
            })
            .collect();
        if let Some(factors) = &self.rope_freq_factors {
            for (f, factor) in inv.iter_mut().zip(factors) {
                *f /= *factor;
            }
        }
        if let Some(s) = self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in &mut inv {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        inv
    }
}

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: WeightTensor,
    pub q: WeightTensor,
    pub k: WeightTensor,
    pub v: WeightTensor,
    pub q_bias: Option<WeightTensor>,
    pub k_bias: Option<WeightTensor>,
    pub v_bias: Option<WeightTensor>,
    pub o: WeightTensor,
    pub mlp_norm: WeightTensor,
    pub gate: WeightTensor,
    pub up: WeightTensor,
    pub down: WeightTensor,
}

/// All weights of a model, shapes checked.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    pub embed: WeightTensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: WeightTensor,
    /// The output projection; the embedding table when tied.
    pub lm_head: WeightTensor,
}

impl ModelWeights {
    /// The same weights converted by `f` (tensor by tensor), e.g. to benchmark another dtype.
    pub fn map(&self, f: impl Fn(&WeightTensor) -> WeightTensor) -> Self {
        let opt = |t: &Option<WeightTensor>| t.as_ref().map(&f);
        Self {
            embed: f(&self.embed),
            layers: self
                .layers
                .iter()
                .map(|l| LayerWeights {
                    attn_norm: f(&l.attn_norm),
                    q: f(&l.q),
                    k: f(&l.k),
                    v: f(&l.v),
                    q_bias: opt(&l.q_bias),
                    k_bias: opt(&l.k_bias),
                    v_bias: opt(&l.v_bias),
                    o: f(&l.o),
                    mlp_norm: f(&l.mlp_norm),
                    gate: f(&l.gate),
                    up: f(&l.up),
                    down: f(&l.down),
                })
                .collect(),
            final_norm: f(&self.final_norm),
            lm_head: f(&self.lm_head),
        }
    }

    /// Bytes a decode step reads: every weight except the embedding table, which is gathered
    /// one row per token (unless it doubles as the output projection).
    pub fn bytes_per_token(&self) -> usize {
        let layer: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.attn_norm,
                    &l.q,
                    &l.k,
                    &l.v,
                    &l.o,
                    &l.mlp_norm,
                    &l.gate,
                    &l.up,
                    &l.down,
                ]
                .iter()
                .map(|t| t.bytes().len())
                .sum::<usize>()
                    + [&l.q_bias, &l.k_bias, &l.v_bias]
                        .iter()
                        .filter_map(|b| b.as_ref())
                        .map(|t| t.bytes().len())
                        .sum::<usize>()
            })
            .sum();
        layer + self.final_norm.bytes().len() + self.lm_head.bytes().len()
    }

    /// Multiply-adds of the linear layers per token (2 FLOPs each).
    pub fn matmul_params(&self) -> usize {
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|t| t.elems())
                    .sum::<usize>()
            })
            .sum();
        per_layer + self.lm_head.elems()
    }
}

/// Where a model came from and what it needs besides weights.
#[derive(Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: crate::tokenizer::Tokenizer,
    /// A Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
    /// Sampling the model's authors recommend (`generation_config.json`).
    pub sampling_defaults: crate::engine::sampling::SamplingDefaults,
    pub source: PathBuf,
    pub format: &'static str,
}

/// Looks up tensors by name and checks their shapes against the config.
pub(crate) struct TensorCheck<'a> {
    pub file: &'a Path,
}

impl TensorCheck<'_> {
    pub fn expect(
        &self,
        tensor: Option<&WeightTensor>,
        name: &str,
        shape: &[usize],
    ) -> Result<WeightTensor, ModelError> {
        let tensor = tensor.ok_or_else(|| ModelError::Tensor {
            file: self.file.to_owned(),
            tensor: name.to_owned(),
            message: "is missing".into(),
        })?;
        // A [n] vector may be stored as [1, n] and vice versa; compare element layout.
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if squeeze(&tensor.shape) != squeeze(shape) {
            return Err(ModelError::Tensor {
                file: self.file.to_owned(),
                tensor: name.to_owned(),
                message: format!(
                    "has shape {:?}, expected {:?} for this config",
                    tensor.shape, shape
                ),
            });
        }
        let mut tensor = tensor.clone();
        tensor.shape = shape.to_vec();
        Ok(tensor)
    }
}

/// A weight's role in a decoder layer; each file format names it its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    MlpNorm,
    Gate,
    Up,
    Down,
}

/// A file format's tensor names.
pub(crate) struct TensorNames {
    pub layer: fn(usize, LayerTensor) -> String,
    pub embed: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
}

/// Builds [`ModelWeights`] from tensors found by `lookup`, checking every shape against the
/// config. A missing output projection means tied embeddings.
pub(crate) fn assemble_weights<'a>(
    file: &Path,
    config: &ModelConfig,
    names: &TensorNames,
    lookup: impl Fn(&str) -> Option<&'a WeightTensor>,
) -> Result<ModelWeights, ModelError> {
    use LayerTensor::*;
    let check = TensorCheck { file };
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q_out = config.num_heads * config.head_dim;
    let kv_out = config.num_kv_heads * config.head_dim;
    let get = |name: &str, shape: &[usize]| check.expect(lookup(name), name, shape);
    // Grown as tensors are found rather than sized by the header.
    let mut layers = Vec::new();
    for l in 0..config.num_layers {
        let at = |role, shape: &[usize]| get(&(names.layer)(l, role), shape);
        let bias = |role, n: usize| match config.arch {
            Arch::Qwen2 => at(role, &[n]).map(Some),
            Arch::Llama => Ok(None),
        };
        layers.push(LayerWeights {
            attn_norm: at(AttnNorm, &[h])?,
            q: at(Q, &[q_out, h])?,
            k: at(K, &[kv_out, h])?,
            v: at(V, &[kv_out, h])?,
            q_bias: bias(QBias, q_out)?,
            k_bias: bias(KBias, kv_out)?,
            v_bias: bias(VBias, kv_out)?,
            o: at(O, &[h, q_out])?,
            mlp_norm: at(MlpNorm, &[h])?,
            gate: at(Gate, &[i, h])?,
            up: at(Up, &[i, h])?,
            down: at(Down, &[h, i])?,
        });
    }
    let embed = get(names.embed, &[v, h])?;
    let lm_head = match lookup(names.lm_head) {
        Some(_) => get(names.lm_head, &[v, h])?,
        None if config.tie_word_embeddings => embed.clone(),
        None => {
            return Err(ModelError::Tensor {
                file: file.to_owned(),
                tensor: names.lm_head.into(),
                message: "is missing and the embeddings are not tied".into(),
            })
        }
    };
    Ok(ModelWeights {
        embed,
        layers,
        final_norm: get(names.final_norm, &[h])?,
        lm_head,
    })
}

/// Loads a model from a Hugging Face folder or a `.gguf` file, by what `path` is.
pub fn load(path: &Path) -> Result<LoadedModel, ModelError> {
    if files::is_dir(path) {
        hf::load(path)
    } else {
        gguf::load(path)
    }
}
