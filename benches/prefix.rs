//! Time to first token with the prefix cache, against the same request from a cold cache, in
//! the same run: a `SYSTEM`-token shared system prompt followed by a `QUESTION`-token question
//! that differs in every iteration (so only the system prompt can be cached), on the default
//! model. The miss is the bound: a full prefill of the whole prompt, first token's logits out.
//! The hit holds the system prompt's full blocks and prefills the rest.
//!
//! `cargo bench -p accel-benches --bench prefix`. Uses the default model
//! (SmolLM2-135M-Instruct) when it is in the model cache, else the small generated model (with
//! a system prompt cut to its context).

use std::time::Duration;

use accel_runtime::backend::cpu::CpuBackend;
use accel_runtime::engine::{Engine, LogitsWanted, StepInput};
use criterion::Criterion;

const SYSTEM: usize = 1000;
const QUESTION: usize = 24;

/// The whole prompt of iteration `i`: the shared system prompt, then its own question.
fn prompt(system: &[u32], i: u64, vocab: usize) -> Vec<u32> {
    let mut p = system.to_vec();
    p.extend((0..QUESTION as u64).map(|t| ((i * 7919 + t * 31 + 11) % vocab as u64) as u32));
    p
}

/// One request's time to first token: a sequence started through the cache, its uncached
/// tokens prefilled in one step, the last token's logits out; then it ends.
fn first_token(engine: &mut Engine<CpuBackend>, tokens: &[u32]) -> usize {
    let (seq, held) = engine.add_sequence_cached("tenant", tokens);
    let out = engine
        .step(&[StepInput {
            seq,
            tokens: &tokens[held..],
            logits: LogitsWanted::Last,
        }])
        .expect("prefill");
    assert_eq!(out[0].logits.len(), 1);
    engine.remove_sequence(seq);
    held
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let (model, _, source) = accel_benches::default_model();
    let vocab = model.config.vocab_size;
    let system_len = SYSTEM.min(
        model
            .config
            .max_position_embeddings
            .saturating_sub(QUESTION + 1),
    );
    println!(
        "model: {}; system prompt {system_len} tokens, question {QUESTION}",
        source
            .as_ref()
            .map_or("the generated model".to_owned(), |p| p
                .display()
                .to_string())
    );
    let system: Vec<u32> = (0..system_len)
        .map(|t| ((t * 13 + 5) % vocab) as u32)
        .collect();
    let engine = |cache: bool| {
        let mut e = Engine::new(
            CpuBackend::default(),
            model.config.clone(),
            &model.weights,
            512,
            16,
        )
        .expect("engine");
        if !cache {
            e.disable_prefix_cache();
        }
        e
    };
    let (mut cold, mut warm) = (engine(false), engine(true));
    // The system prompt is cached once, as a first request would leave it.
    first_token(&mut warm, &prompt(&system, u64::MAX, vocab));

    let (mut misses, mut hits) = (Vec::new(), Vec::new());
    let mut held = 0;
    let mut group = c.benchmark_group("prefix_cache");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(8));
    let mut i = 0u64;
    group.bench_function("time_to_first_token_miss_bound", |b| {
        b.iter_custom(|iters| {
            accel_benches::timed_iterations(iters, &mut misses, || {
                i += 1;
                let p = prompt(&system, i, vocab);
                let t = std::time::Instant::now();
                first_token(&mut cold, &p);
                t.elapsed().as_secs_f64()
            })
        })
    });
    group.bench_function("time_to_first_token_hit", |b| {
        b.iter_custom(|iters| {
            accel_benches::timed_iterations(iters, &mut hits, || {
                i += 1;
                let p = prompt(&system, i, vocab);
                let t = std::time::Instant::now();
                held = first_token(&mut warm, &p);
                t.elapsed().as_secs_f64()
            })
        })
    });
    group.finish();
    if let (Some(miss), Some(hit)) = (
        accel_benches::median(&mut misses),
        accel_benches::median(&mut hits),
    ) {
        println!(
            "\ntime to first token, {} tokens: miss {:.1} ms (bound), hit {:.1} ms holding {held} from the cache: {:.3}x the miss ({:.1}x faster)",
            system_len + QUESTION,
            miss * 1e3,
            hit * 1e3,
            hit / miss,
            miss / hit
        );
    }
}
