//! What a worker process costs, against the same engine in this process, in the same run:
//! - decode throughput at batch 1 and 16 (`PROMPT` tokens of prefill, then `OUTPUT` decode
//!   steps, sampling in the caller as the device loop does), in-process against through a
//!   worker (every step a request over its socket, logits back);
//! - start to first token: building the engine here against spawning a worker that loads the
//!   model, then one prefill.
//!
//! `cargo build --release -p accel-runtime && cargo bench -p accel-benches --bench workers`
//! (the worker is the built `acceld`). Uses the default model (SmolLM2-135M-Instruct) when it
//! is in the model cache, else the small generated model. Workers run without cgroups here
//! (no root needed); the groups cost nothing per step.

use std::time::{Duration, Instant};

use accel_runtime::backend::cpu::CpuBackend;
use accel_runtime::config::ModelSpec;
use accel_runtime::engine::Engine;
use accel_runtime::worker::{RemoteEngine, WorkerIdentity, WorkerInit};
use criterion::Criterion;

const PROMPT: usize = 32;
const OUTPUT: usize = 32;

fn spec() -> ModelSpec {
    ModelSpec {
        kv_blocks: 512,
        swap_blocks: 0,
        ..ModelSpec::default_model()
    }
}

/// `n` prompts of `PROMPT` tokens.
fn prompts(n: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..PROMPT)
                .map(|t| ((i * 131 + t * 7) % vocab) as u32)
                .collect()
        })
        .collect()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let (model, opened, source) = accel_benches::default_model();
    let vocab = model.config.vocab_size;
    println!(
        "model: {}",
        source
            .as_ref()
            .map_or("the generated model".to_owned(), |p| p
                .display()
                .to_string())
    );
    let identity = WorkerIdentity {
        program: accel_benches::built("acceld"),
        ..WorkerIdentity::resolve(None).expect("a user for workers")
    };
    let init = WorkerInit {
        model: "bench".into(),
        path: source.clone(),
        spec: spec(),
        device: "cpu".into(),
        kernel_cache: None,
        files: opened.files.clone(),
        dirs: opened.dirs.clone(),
        disk_dir: None,
    };

    // Start to first token.
    let started = Instant::now();
    let mut local = Engine::new(
        CpuBackend::default(),
        model.config.clone(),
        &model.weights,
        spec().kv_blocks,
        16,
    )
    .expect("engine");
    // One prefill and its first token, as a first request would.
    accel_benches::greedy_streams(&mut local, &prompts(1, vocab), 1);
    let local_start = started.elapsed();
    let started = Instant::now();
    let (mut remote, _) = RemoteEngine::start(
        init,
        opened.handles.clone(),
        identity,
        None,
        "_shared",
        None,
    )
    .expect("worker");
    accel_benches::greedy_streams(&mut remote, &prompts(1, vocab), 1);
    let remote_start = started.elapsed();

    let mut rows = Vec::new();
    let mut group = c.benchmark_group("worker_throughput");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(6));
    for n in [1usize, 16] {
        let (mut here, mut there) = (Vec::new(), Vec::new());
        group.bench_function(format!("in_process_batch_{n}"), |b| {
            b.iter_custom(|iters| {
                let prompts = prompts(n, vocab);
                accel_benches::timed_iterations(iters, &mut here, || {
                    accel_benches::greedy_streams(&mut local, &prompts, OUTPUT)
                })
            })
        });
        group.bench_function(format!("worker_batch_{n}"), |b| {
            b.iter_custom(|iters| {
                accel_benches::timed_iterations(iters, &mut there, || {
                    accel_benches::greedy_streams(&mut remote, &prompts(n, vocab), OUTPUT)
                })
            })
        });
        if let (Some(here), Some(there)) = (
            accel_benches::median(&mut here),
            accel_benches::median(&mut there),
        ) {
            rows.push((n, here, there));
        }
    }
    group.finish();

    println!("\n| batch | in process | through a worker | worker cost |");
    println!("|---|---|---|---|");
    for (n, here, there) in &rows {
        let tokens = (n * OUTPUT) as f64;
        println!(
            "| {n} | {:.0} tok/s | {:.0} tok/s | {:+.1}% |",
            tokens / here,
            tokens / there,
            (there / here - 1.0) * 100.0
        );
    }
    println!(
        "\nstart to first token: in process {:.0} ms (engine built, one {PROMPT}-token prefill), through a new worker {:.0} ms (spawn, model loaded there, one prefill): {:.2}x",
        local_start.as_secs_f64() * 1e3,
        remote_start.as_secs_f64() * 1e3,
        remote_start.as_secs_f64() / local_start.as_secs_f64()
    );
}
