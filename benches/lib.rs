//! Shared pieces of accel's benchmarks: every figure is reported next to a bound measured in
//! the same run (a memory-bandwidth sweep, a bare socket round trip, a peer implementation),
//! because the hosts are shared and noisy and absolute numbers do not compare across runs.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// A binary built beside the running benchmark (`target/release/NAME`), which the daemon
/// benchmarks start; panics with what to build when it is missing.
pub fn built(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/release/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first (cargo build --release --bins)",
        path.display()
    );
    path
}

/// The default model from the model cache, loaded as the daemon loads it (the files it opened
/// recorded, for a worker), with its path; the generated model and no path when it is not
/// installed (`make model`).
pub fn default_model() -> (
    accel_runtime::model::LoadedModel,
    accel_runtime::model::files::Opened,
    Option<std::path::PathBuf>,
) {
    let config = accel_runtime::config::DaemonConfig::default();
    let path = config
        .model_cache
        .join(accel_runtime::config::DEFAULT_MODEL_FILE);
    let (loaded, opened) =
        accel_runtime::model::files::record(|| accel_runtime::model::load(&path));
    match loaded {
        Ok(model) => (model, opened, Some(path)),
        Err(_) => (
            accel_runtime::model::generated::tiny_random().expect("generated model"),
            opened,
            None,
        ),
    }
}

/// Mean time per iteration of each benchmark, collected while criterion runs them.
#[derive(Debug, Default)]
pub struct Ledger {
    runs: Mutex<BTreeMap<String, (Duration, u64)>>,
}

impl Ledger {
    /// Adds `iterations` iterations that took `elapsed` in total to `name`.
    pub fn record(&self, name: &str, elapsed: Duration, iterations: u64) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let entry = runs.entry(name.to_owned()).or_default();
        entry.0 += elapsed;
        entry.1 += iterations;
    }

    /// Mean time per iteration of `name`, if it ran.
    pub fn mean(&self, name: &str) -> Option<Duration> {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let (total, n) = runs.get(name)?;
        (*n > 0).then(|| *total / u32::try_from(*n).unwrap_or(u32::MAX))
    }

    /// A table of every benchmark's mean time and its ratio to `bound` (time / bound time).
    pub fn ratio_table(&self, bound: &str) -> String {
        let Some(bound_time) = self.mean(bound) else {
            return format!("bound {bound} did not run; no ratios");
        };
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = format!(
            "{:<32} {:>12} {:>10}\n",
            "benchmark",
            "mean",
            format!("x {bound}")
        );
        for (name, (total, n)) in runs.iter() {
            let mean = total.as_secs_f64() / (*n).max(1) as f64;
            out.push_str(&format!(
                "{name:<32} {:>10.2}µs {:>10.2}\n",
                mean * 1e6,
                mean / bound_time.as_secs_f64()
            ));
        }
        out
    }
}

/// Runs `iters` iterations of `run` (each returning the seconds it measured itself), keeping
/// every iteration's seconds in `samples`; the total, for criterion's `iter_custom`.
pub fn timed_iterations(
    iters: u64,
    samples: &mut Vec<f64>,
    mut run: impl FnMut() -> f64,
) -> Duration {
    let mut total = 0.0;
    for _ in 0..iters {
        let seconds = run();
        samples.push(seconds);
        total += seconds;
    }
    Duration::from_secs_f64(total)
}

/// The median of `samples`; `None` when there are none (a command-line filter skipped them).
pub fn median(samples: &mut [f64]) -> Option<f64> {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied()
}

/// Greedy generation on an engine driven directly, as a device loop would without its
/// scheduler: one prefill step for every prompt, then `output - 1` decode steps for all,
/// sampling on the host. Returns the seconds from the first sequence added to the last
/// removed.
pub fn greedy_streams(
    engine: &mut dyn accel_runtime::engine::ops::EngineOps,
    prompts: &[Vec<u32>],
    output: usize,
) -> f64 {
    use accel_runtime::engine::sampling::{Sampler, SamplingParams};
    use accel_runtime::engine::{LogitsWanted, StepInput};

    let mut samplers: Vec<Sampler> = prompts
        .iter()
        .map(|_| Sampler::new(SamplingParams::greedy()))
        .collect();
    let start = std::time::Instant::now();
    let seqs: Vec<_> = prompts
        .iter()
        .map(|_| engine.add_sequence().expect("sequence"))
        .collect();
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..output {
        let inputs: Vec<StepInput<'_>> = seqs
            .iter()
            .zip(&next)
            .map(|(&seq, tokens)| StepInput {
                seq,
                tokens,
                logits: LogitsWanted::Last,
            })
            .collect();
        let outputs = engine.step(&inputs).expect("step");
        for (i, out) in outputs.iter().enumerate() {
            let sampled = samplers[i].sample(&out.logits[0], &prompts[i], prompts[i].len());
            next[i] = vec![sampled.token];
        }
    }
    for seq in seqs {
        engine.remove_sequence(seq);
    }
    start.elapsed().as_secs_f64()
}

/// Submits `requests` to a model's device loop at once and waits for all of them; returns
/// the seconds that took and each request's generated tokens. Events are polled rather than
/// awaited: a consumer woken for every token would compete with the engine's threads for the
/// cores, and that is the client's cost, not the server's.
pub fn serve(
    handle: &accel_runtime::runner::ModelHandle,
    requests: Vec<accel_runtime::runner::GenerateRequest>,
) -> (f64, Vec<usize>) {
    use accel_runtime::runner::Event;
    let start = std::time::Instant::now();
    let mut receivers: Vec<_> = requests
        .into_iter()
        .map(|r| handle.submit(r).expect("submit"))
        .collect();
    let mut generated: Vec<Option<usize>> = vec![None; receivers.len()];
    while generated.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_millis(1));
        for (r, done) in receivers.iter_mut().zip(&mut generated) {
            while let Ok(event) = r.try_recv() {
                match event {
                    Event::Done {
                        completion_tokens, ..
                    } => *done = Some(completion_tokens),
                    Event::Error { message, .. } => panic!("{message}"),
                    Event::Token { .. } => {}
                }
            }
        }
    }
    (
        start.elapsed().as_secs_f64(),
        generated.into_iter().flatten().collect(),
    )
}

/// A greedy request of `prompt` for `max_tokens` tokens that ignores EOS, as the benches
/// time them.
pub fn greedy_request(
    tenant: &str,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> accel_runtime::runner::GenerateRequest {
    accel_runtime::runner::GenerateRequest {
        tenant: tenant.to_owned(),
        prompt,
        params: accel_runtime::engine::sampling::SamplingParams::greedy(),
        max_tokens,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
        limits: accel_runtime::sched::TenantParams::default(),
        guide: None,
    }
}
