//! A small generated model (random weights, byte-level tokenizer) that the daemon serves when
//! its default model cannot be had, so a fresh node still answers requests end to end. It is
//! always named as what it is; its answers are noise.

use rand::{Rng as _, SeedableRng as _};

use super::{Arch, LayerWeights, LoadedModel, ModelConfig, ModelWeights, RopeStyle, WeightTensor};
use crate::tokenizer::Tokenizer;

/// The name the stand-in model is served under.
pub const NAME: &str = "generated-tiny-random";

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Builds the stand-in model (deterministic: the same weights every time).
pub fn tiny_random() -> Result<LoadedModel, super::ModelError> {
    let config = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 256 + SPECIALS.len(),
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        rope_style: RopeStyle::Halves,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        rope_freq_factors: None,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
    let mut tensor = |name: &str, shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        WeightTensor::from_f32(name, shape.to_vec(), &data)
    };
    let ones = |name: &str, n: usize| WeightTensor::from_f32(name, vec![n], &vec![1.0; n]);
    let (h, i, kv) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_kv_heads * config.head_dim,
    );
    let layers = (0..config.num_layers)
        .map(|l| LayerWeights {
            attn_norm: ones(&format!("layers.{l}.attn_norm"), h),
            q: tensor(&format!("layers.{l}.q"), &[h, h], 0.2),
            k: tensor(&format!("layers.{l}.k"), &[kv, h], 0.2),
            v: tensor(&format!("layers.{l}.v"), &[kv, h], 0.2),
            q_bias: None,
            k_bias: None,
            v_bias: None,
            o: tensor(&format!("layers.{l}.o"), &[h, h], 0.2),
            mlp_norm: ones(&format!("layers.{l}.mlp_norm"), h),
            gate: tensor(&format!("layers.{l}.gate"), &[i, h], 0.2),
            up: tensor(&format!("layers.{l}.up"), &[i, h], 0.2),
            down: tensor(&format!("layers.{l}.down"), &[h, i], 0.2),
        })
        .collect();
    let embed = tensor("embed", &[config.vocab_size, h], 1.0);
    let weights = ModelWeights {
        lm_head: embed.clone(),
        embed,
        layers,
        final_norm: ones("final_norm", h),
    };
    let tokenizer = Tokenizer::byte_level(&SPECIALS).map_err(|e| super::ModelError::Format {
        file: NAME.into(),
        message: e.to_string(),
    })?;
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        chat_template: Some(CHATML.to_owned()),
        sampling_defaults: Default::default(),
        source: NAME.into(),
        format: "generated",
    })
}
