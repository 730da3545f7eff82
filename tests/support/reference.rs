//! Helpers for checking an engine against the references in `fixtures/` (written by
//! `reference/make_fixtures.py` with Hugging Face transformers), on any backend: the CPU
//! engine tests and the CUDA tests share them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use accel_runtime::backend::Backend;
use accel_runtime::engine::sampling::argmax;
use accel_runtime::engine::{Engine, EngineError, LogitsWanted, SeqId, StepInput};
use accel_runtime::model;
use serde_json::Value;

/// The Hugging Face fixture models.
pub const HF_MODELS: [&str; 4] = [
    "llama-gqa-f32",
    "llama-tied-rope3-f32",
    "qwen2-bias-f32",
    "llama-gqa-bf16",
];

/// `tests/fixtures`, or `ACCEL_FIXTURES` (test binaries built on one machine and run on
/// another, as the GPU check script does).
pub fn fixtures() -> PathBuf {
    std::env::var_os("ACCEL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
}

pub fn json(path: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// Reference logits by name, as f32 rows of `vocab` each.
pub fn expected_logits(path: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    model::hf::open_safetensors(path)
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t.to_f32()))
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The prompts of an `expected.json`, as token ids.
pub fn prompts(meta: &Value) -> Vec<Vec<u32>> {
    meta["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect()
}

/// ‖a − b‖ / ‖b‖, with NaN or a length mismatch as infinity so it never passes.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// Logits after every token of `prompt`, run as one prefill.
pub fn prompt_logits(engine: &mut Engine<impl Backend>, prompt: &[u32]) -> Vec<f32> {
    let seq = engine.add_sequence();
    let out = engine
        .step(&[StepInput {
            seq,
            tokens: prompt,
            logits: LogitsWanted::All,
        }])
        .unwrap();
    engine.remove_sequence(seq);
    out[0].logits.concat()
}

/// Greedy continuation: one prefill, then one token per step.
pub fn greedy(engine: &mut Engine<impl Backend>, prompt: &[u32], steps: usize) -> Vec<u32> {
    greedy_interrupted(engine, prompt, steps, |_, _, _, _| {})
}

/// Greedy continuation as [`greedy`], but after `swap_at` tokens the sequence is swapped out,
/// another sequence runs `other` through the freed device blocks, and it is swapped back in.
pub fn greedy_with_swap<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    other: &[u32],
    steps: usize,
    swap_at: usize,
) -> Vec<u32> {
    greedy_moved(engine, prompt, other, steps, swap_at, |engine, seq| {
        engine.swap_out(seq).unwrap();
    })
}

/// As [`greedy_with_swap`], with `move_out` taking the sequence off the device (to the host
/// tier, to disk, or down both) before `other` overwrites its blocks.
pub fn greedy_moved<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    other: &[u32],
    steps: usize,
    swap_at: usize,
    mut move_out: impl FnMut(&mut Engine<B>, SeqId),
) -> Vec<u32> {
    greedy_interrupted(
        engine,
        prompt,
        steps,
        |engine: &mut Engine<B>, seq, next, i| {
            if i != swap_at {
                return;
            }
            move_out(engine, seq);
            assert!(engine.is_swapped(seq));
            let refused = engine.step(&[StepInput {
                seq,
                tokens: next,
                logits: LogitsWanted::Last,
            }]);
            assert!(
                matches!(refused, Err(EngineError::Swapped(s)) if s == seq),
                "a swapped-out sequence cannot step"
            );
            // Overwrite the device blocks it had: once its copy has landed they are the first
            // free ones again, and the next sequence takes them.
            engine.backend().wait_copies().unwrap();
            greedy(engine, other, 4);
            engine.swap_in(seq).unwrap();
        },
    )
}

/// The greedy loop, with `before_step(engine, seq, next tokens, step index)` run before each
/// step.
fn greedy_interrupted<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    steps: usize,
    mut before_step: impl FnMut(&mut Engine<B>, SeqId, &[u32], usize),
) -> Vec<u32> {
    let seq = engine.add_sequence();
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for i in 0..steps {
        before_step(engine, seq, &next, i);
        let logits = engine
            .step(&[StepInput {
                seq,
                tokens: &next,
                logits: LogitsWanted::Last,
            }])
            .unwrap();
        let token = argmax(&logits[0].logits[0]);
        out.push(token);
        next = vec![token];
    }
    engine.remove_sequence(seq);
    out
}
