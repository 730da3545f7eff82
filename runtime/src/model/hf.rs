//! Hugging Face model folders: `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), `tokenizer.json`, and the chat template from
//! `chat_template.jinja` or `tokenizer_config.json`.
//!
//! Safetensors files are mapped; tensors view the mapping with no copy.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::tensor::{Backing, DType, WeightTensor};
use super::{
    assemble_weights, Arch, LayerTensor, Llama3Scaling, LoadedModel, ModelConfig, ModelError,
    ModelWeights, RopeStyle, TensorNames,
};

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = super::files::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Format {
        file: path.to_owned(),
        message: format!("is not valid JSON: {e}"),
    })
}

/// Reads `config.json` into a [`ModelConfig`].
pub fn parse_config(file: &Path, json: &Value) -> Result<ModelConfig, ModelError> {
    let bad = |message: String| ModelError::Config {
        file: file.to_owned(),
        message,
    };
    let Some(arch_name) = json["architectures"][0].as_str() else {
        return Err(bad(format!(
            "has no \"architectures\" list (model_type: {}); a Hugging Face config names its class there, e.g. \"architectures\": [\"LlamaForCausalLM\"]",
            json["model_type"].as_str().unwrap_or("none")
        )));
    };
    let arch = match arch_name {
        "LlamaForCausalLM" | "MistralForCausalLM" => Arch::Llama,
        "Qwen2ForCausalLM" => Arch::Qwen2,
        other => {
            return Err(ModelError::Architecture {
                file: file.to_owned(),
                arch: if other.is_empty() {
                    json["model_type"].as_str().unwrap_or("unknown").to_owned()
                } else {
                    other.to_owned()
                },
            })
        }
    };
    let usize_field = |name: &str| -> Result<usize, ModelError> {
        json[name]
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(format!("{name} is missing or not a positive integer")))
    };
    // An optional field may be absent (or null) for its default, never present and wrong.
    let optional_usize = |name: &str| -> Result<Option<usize>, ModelError> {
        match &json[name] {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .filter(|&n| n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| bad(format!("{name} is {v}, not a positive integer"))),
        }
    };
    let optional_number = |name: &str| -> Result<Option<f64>, ModelError> {
        match &json[name] {
            Value::Null => Ok(None),
            v => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(format!("{name} is {v}, not a number"))),
        }
    };
    let hidden_size = usize_field("hidden_size")?;
    let num_heads = usize_field("num_attention_heads")?;
    let num_kv_heads = optional_usize("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = match optional_usize("head_dim")? {
        Some(d) => d,
        None if num_heads > 0 => hidden_size / num_heads,
        None => 0,
    };
    optional_number("rms_norm_eps")?;
    optional_number("rope_theta")?;
    // Newer transformers writes RoPE settings under `rope_parameters`; older ones use
    // `rope_theta` and `rope_scaling` at the top level. Read both.
    let rope = match &json["rope_parameters"] {
        Value::Object(_) => json["rope_parameters"].clone(),
        _ => json["rope_scaling"].clone(),
    };
    let rope_theta = json["rope_theta"]
        .as_f64()
        .or_else(|| json["rope_parameters"]["rope_theta"].as_f64())
        .unwrap_or(10000.0) as f32;
    let rope_type = rope["rope_type"]
        .as_str()
        .or_else(|| rope["type"].as_str())
        .unwrap_or("default");
    let rope_scaling = match rope_type {
        "default" => None,
        "llama3" => {
            let f = |name: &str| {
                rope[name]
                    .as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| bad(format!("llama3 RoPE scaling lacks {name}")))
            };
            Some(Llama3Scaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")?,
            })
        }
        other => {
            return Err(bad(format!(
                "RoPE scaling type {other:?} is not supported (default and llama3 are)"
            )))
        }
    };
    let config = ModelConfig {
        arch,
        vocab_size: usize_field("vocab_size")?,
        hidden_size,
        intermediate_size: usize_field("intermediate_size")?,
        num_layers: usize_field("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        rope_theta,
        rope_scaling,
        rope_style: RopeStyle::Halves,
        max_position_embeddings: usize_field("max_position_embeddings")?,
        tie_word_embeddings: json["tie_word_embeddings"].as_bool().unwrap_or(false),
        rope_freq_factors: None,
    };
    config.validate(file)?;
    Ok(config)
}

fn dtype_of(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Maps one safetensors file and returns its tensors.
pub fn open_safetensors(path: &Path) -> Result<Vec<WeightTensor>, ModelError> {
    let backing = Backing::map(path)?;
    let bytes = backing.bytes();
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Format {
            file: path.to_owned(),
            message: format!("is not a valid safetensors file (truncated or corrupt): {e}"),
        })?;
    let data_start = 8 + header_len;
    let mut tensors = Vec::new();
    let mut infos: Vec<_> = metadata.tensors().into_iter().collect();
    infos.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, info) in infos {
        let Some(dtype) = dtype_of(info.dtype) else {
            return Err(ModelError::Tensor {
                file: path.to_owned(),
                tensor: name,
                message: format!("has dtype {:?}; supported: F32, F16, BF16", info.dtype),
            });
        };
        let (begin, end) = info.data_offsets;
        // Checked: a header can claim any shape and offsets.
        let elems = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let expected = elems.and_then(|e| dtype.bytes_for(e));
        let start = data_start.saturating_add(begin);
        if expected != Some(end.saturating_sub(begin))
            || data_start.saturating_add(end) > bytes.len()
        {
            return Err(ModelError::Tensor {
                file: path.to_owned(),
                tensor: name,
                message: format!("data {begin}..{end} does not fit its shape {:?} or the file; it is truncated or corrupt", info.shape),
            });
        }
        tensors.push(WeightTensor::new(
            name,
            dtype,
            info.shape.clone(),
            backing.clone(),
            start,
            end - begin,
        ));
    }
    Ok(tensors)
}

/// Loads every tensor of a folder (single file or sharded).
fn load_tensors(dir: &Path) -> Result<HashMap<String, WeightTensor>, ModelError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if super::files::exists(&single) {
        vec![single]
    } else if super::files::exists(&index) {
        let json = read_json(&index)?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| ModelError::Format {
                file: index.clone(),
                message: "has no weight_map".into(),
            })?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        shards.sort();
        shards.dedup();
        shards
            .into_iter()
            .map(|s| {
                if s.contains('/') || s.contains("..") {
                    Err(ModelError::Format {
                        file: index.clone(),
                        message: format!("shard name {s:?} must be a file name in the same folder"),
                    })
                } else {
                    Ok(dir.join(s))
                }
            })
            .collect::<Result<_, _>>()?
    } else {
        return Err(ModelError::Format {
            file: dir.to_owned(),
            message: "has neither model.safetensors nor model.safetensors.index.json".into(),
        });
    };
    let mut all = HashMap::new();
    for file in files {
        for tensor in open_safetensors(&file)? {
            all.insert(tensor.name.clone(), tensor);
        }
    }
    Ok(all)
}

/// Hugging Face tensor names.
const HF_NAMES: TensorNames = TensorNames {
    layer: |l, role| {
        let name = match role {
            LayerTensor::AttnNorm => "input_layernorm.weight",
            LayerTensor::Q => "self_attn.q_proj.weight",
            LayerTensor::K => "self_attn.k_proj.weight",
            LayerTensor::V => "self_attn.v_proj.weight",
            LayerTensor::QBias => "self_attn.q_proj.bias",
            LayerTensor::KBias => "self_attn.k_proj.bias",
            LayerTensor::VBias => "self_attn.v_proj.bias",
            LayerTensor::O => "self_attn.o_proj.weight",
            LayerTensor::MlpNorm => "post_attention_layernorm.weight",
            LayerTensor::Gate => "mlp.gate_proj.weight",
            LayerTensor::Up => "mlp.up_proj.weight",
            LayerTensor::Down => "mlp.down_proj.weight",
        };
        format!("model.layers.{l}.{name}")
    },
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
};

/// Assembles [`ModelWeights`] from tensors named the Hugging Face way.
pub fn weights_from_hf_names(
    file: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, WeightTensor>,
) -> Result<ModelWeights, ModelError> {
    assemble_weights(file, config, &HF_NAMES, |name| tensors.get(name))
}

/// The chat template: `chat_template.jinja` if present, else `chat_template` in
/// `tokenizer_config.json` (a string, or a list of named templates: the `default` one).
fn chat_template(dir: &Path, tokenizer_config: &Value) -> Option<String> {
    if let Ok(text) = super::files::read_to_string(&dir.join("chat_template.jinja")) {
        return Some(text);
    }
    match &tokenizer_config["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str().map(str::to_owned)),
        _ => None,
    }
}

/// The sampling `generation_config.json` recommends; none if it is absent, and none (with a
/// warning) if its values are out of range, since the model loads fine without them.
fn generation_defaults(dir: &Path) -> crate::engine::sampling::SamplingDefaults {
    let Ok(json) = read_json(&dir.join("generation_config.json")) else {
        return Default::default();
    };
    let defaults = crate::engine::sampling::SamplingDefaults::from_generation_config(&json);
    let problems = defaults.validate();
    if problems.is_empty() {
        defaults
    } else {
        tracing::warn!(model = %dir.display(), problems = %problems.join("; "), "ignoring generation_config.json's sampling");
        Default::default()
    }
}

/// Loads a Hugging Face model folder.
pub fn load(dir: &Path) -> Result<LoadedModel, ModelError> {
    let config_path = dir.join("config.json");
    let json = read_json(&config_path)?;
    let config = parse_config(&config_path, &json)?;
    let tensors = load_tensors(dir)?;
    let weights = weights_from_hf_names(dir, &config, &tensors)?;
    let tokenizer_config = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
    let mut eos: Vec<u32> = match &json["eos_token_id"] {
        Value::Number(n) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    };
    let tokenizer = crate::tokenizer::Tokenizer::from_hf_folder(dir, &tokenizer_config, &mut eos)?;
    Ok(LoadedModel {
        sampling_defaults: generation_defaults(dir),
        chat_template: chat_template(dir, &tokenizer_config),
        config,
        weights,
        tokenizer,
        source: dir.to_owned(),
        format: "hf",
    })
}
