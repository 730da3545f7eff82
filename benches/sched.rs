//! The scheduler's cost, each figure against a bound measured in the same run:
//! - planning one step with 256 running and 10,000 waiting sequences across 100 tenants,
//!   against the 50 µs budget and against one decode step of the engine at that batch;
//! - N concurrent streams served through the scheduler (a [`ModelHandle`], the path the API
//!   takes) against the same requests driven on the engine directly at the same batch size;
//! - the simulator's fairness report (the README's table).
//!
//! `cargo bench -p accel-benches --bench sched`. The throughput figures use the default model
//! (SmolLM2-135M-Instruct) when it is in the model cache, else the small generated model.
//! With `ACCEL_UPDATE_README=1` the fairness table in README.md is replaced.

use std::time::{Duration, Instant};

use accel_runtime::backend::cpu::CpuBackend;
use accel_runtime::config::{DaemonConfig, ModelSpec};
use accel_runtime::engine::Engine;
use accel_runtime::runner::ModelHandle;
use accel_runtime::sched::{
    self, ModelParams, NewSeq, PolicyKind, Pricing, Scheduler, TenantParams,
};
use criterion::Criterion;

const RUNNING: usize = 256;
const WAITING: usize = 10_000;
const TENANTS: usize = 100;

/// A scheduler at steady state: `RUNNING` decoding, `WAITING` queued across `TENANTS`.
fn loaded_scheduler() -> Scheduler {
    let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    s.add_model(ModelParams {
        block_size: 16,
        // Counters only: room for every iteration criterion runs.
        total_blocks: 1 << 40,
        swap_blocks: 0,
        swap_min_tokens: usize::MAX,
        disk_blocks: 0,
        disk_swap_min_tokens: usize::MAX,
        max_sequences: RUNNING,
        max_batch_tokens: 8192,
        price: 1.0,
        reserve_max_tokens: false,
    });
    for key in 0..(RUNNING + WAITING) as u64 {
        let tenant = format!("tenant-{}", key as usize % TENANTS);
        s.submit(
            NewSeq {
                key,
                tenant,
                params: TenantParams {
                    weight: 1 + (key % 4) as u32,
                    ..TenantParams::default()
                },
                model: 0,
                prompt_len: 16,
                max_tokens: 1 << 16,
            },
            0.0,
        )
        .expect("submit");
    }
    // Admit and prefill until every slot decodes.
    for _ in 0..4 {
        let plan = s.plan(0.0);
        for &(k, n) in &plan.run {
            let done = s.pending(k) == Some(n);
            s.advance(k, n, done, 0.0);
        }
    }
    s
}

fn bench_planning(c: &mut Criterion) -> f64 {
    let mut s = loaded_scheduler();
    let mut total = Duration::ZERO;
    let mut count = 0u64;
    c.bench_function("sched_plan_256_running_10k_waiting_100_tenants", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let plan = s.plan(0.0);
                elapsed += start.elapsed();
                assert_eq!(plan.run.len(), RUNNING);
                for &(k, n) in &plan.run {
                    s.advance(k, n, true, 0.0);
                }
            }
            total += elapsed;
            count += iters;
            elapsed
        })
    });
    total.as_secs_f64() / count.max(1) as f64
}

fn model_spec() -> ModelSpec {
    let mut spec = ModelSpec::default_model();
    spec.kv_blocks = 512;
    spec.swap_blocks = 0;
    spec
}

fn config() -> DaemonConfig {
    let cache =
        std::env::var("ACCEL_MODEL_CACHE").unwrap_or_else(|_| "/var/cache/accel/models".into());
    DaemonConfig {
        model_cache: cache.into(),
        backend: accel_runtime::config::BackendChoice::Cpu,
        models: vec![model_spec()],
        ..DaemonConfig::default()
    }
}

const PROMPT: usize = 16;
const OUTPUT: usize = 32;

fn prompt(i: usize) -> Vec<u32> {
    (0..PROMPT as u32)
        .map(|t| 100 + (t * 17 + i as u32 * 31) % 1000)
        .collect()
}

/// Seconds to serve `n` requests of `PROMPT` + `OUTPUT` tokens through the handle.
fn through_scheduler(handle: &ModelHandle, n: usize) -> f64 {
    let requests = (0..n)
        .map(|i| accel_benches::greedy_request(&format!("t{}", i % 2), prompt(i), OUTPUT))
        .collect();
    accel_benches::serve(handle, requests).0
}

fn bench_throughput(c: &mut Criterion) -> Vec<(usize, f64, f64)> {
    let config = config();
    let devices = accel_runtime::devices::DeviceReport {
        devices: Vec::new(),
        cuda_driver: false,
        reason: Some("the scheduler bench runs on the CPU".into()),
    };
    let handles = accel_runtime::runner::start_models(&config, &devices, None, None, None);
    let handle = handles.first().expect("a model");
    let (model, _, _) = accel_benches::default_model();
    println!(
        "throughput model: {} ({})",
        handle.info.name, handle.info.source
    );
    let mut engine = Engine::new(
        CpuBackend::default(),
        model.config.clone(),
        &model.weights,
        model_spec().kv_blocks,
        16,
    )
    .expect("engine");
    let mut rows = Vec::new();
    let mut group = c.benchmark_group("sched_throughput");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(5));
    for n in [1usize, 8, 32] {
        let (mut via, mut bare) = (Vec::new(), Vec::new());
        group.bench_function(format!("scheduler_{n}_streams"), |b| {
            b.iter_custom(|iters| {
                accel_benches::timed_iterations(iters, &mut via, || through_scheduler(handle, n))
            })
        });
        group.bench_function(format!("engine_direct_{n}_streams"), |b| {
            b.iter_custom(|iters| {
                let prompts: Vec<Vec<u32>> = (0..n).map(prompt).collect();
                accel_benches::timed_iterations(iters, &mut bare, || {
                    accel_benches::greedy_streams(&mut engine, &prompts, OUTPUT)
                })
            })
        });
        if let (Some(via), Some(bare)) = (
            accel_benches::median(&mut via),
            accel_benches::median(&mut bare),
        ) {
            rows.push((n, via, bare));
        }
    }
    group.finish();
    rows
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let plan = bench_planning(&mut c);
    let rows = bench_throughput(&mut c);
    let report = format!(
        "{}\nKV blocks committed on demand against reserved for `max_tokens` (simulator, same load):\n\n{}",
        sched::sim::fairness_report(),
        sched::sim::utilisation_report()
    );
    println!("\nplanning one step, {RUNNING} running / {WAITING} waiting / {TENANTS} tenants: {:.1} µs = {:.2} x the 50 µs budget", plan * 1e6, plan / 50e-6);
    println!("\n| streams | through the scheduler | engine directly | scheduler cost |");
    println!("|---|---|---|---|");
    for (n, via, bare) in &rows {
        let tokens = (n * OUTPUT) as f64;
        println!(
            "| {n} | {:.0} tok/s | {:.0} tok/s | {:+.1}% |",
            tokens / via,
            tokens / bare,
            (via / bare - 1.0) * 100.0
        );
    }
    println!("\nsimulator:\n{report}");
    if std::env::var_os("ACCEL_UPDATE_README").is_some() {
        let readme_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let readme = std::fs::read_to_string(readme_path).expect("README.md");
        let (start, end) = ("<!-- fairness:start -->", "<!-- fairness:end -->");
        if let (Some(a), Some(b)) = (readme.find(start), readme.find(end)) {
            let updated = format!("{}{start}\n{report}{}", &readme[..a], &readme[b..]);
            std::fs::write(readme_path, updated).expect("write README.md");
            println!("README.md updated");
        }
    }
    c.final_summary();
}
