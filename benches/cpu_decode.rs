//! CPU inference speed on SmolLM2-135M-Instruct, each figure next to a bound measured in the
//! same run: the host's read bandwidth (decoding reads every weight once per token, so
//! bandwidth ÷ weight bytes is the single-stream limit) and its f32 GEMM rate (the `gemm`
//! crate, the prefill limit).
//!
//! `cargo bench -p accel-benches --bench cpu_decode` prints a table; with
//! `ACCEL_UPDATE_README=1` it also replaces the table in README.md.
//! f32 and bf16 figures use the GGUF's weights dequantized to those dtypes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use accel_runtime::backend::cpu::CpuBackend;
use accel_runtime::engine::{Engine, LogitsWanted, SeqId, StepInput};
use accel_runtime::model::{self, ModelWeights, WeightTensor};
use criterion::Criterion;
use rayon::prelude::*;

fn model_path() -> Option<PathBuf> {
    let cache =
        std::env::var("ACCEL_MODEL_CACHE").unwrap_or_else(|_| "/var/cache/accel/models".into());
    let path = PathBuf::from(cache).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    path.is_file().then_some(path)
}

/// Read bandwidth: a parallel sum over a buffer far larger than the caches, best of several.
fn read_bandwidth() -> f64 {
    let len = 256 << 20; // 1 GiB of f32
    let data: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 7) as f32).collect();
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: f32 = data
            .par_chunks(1 << 16)
            .map(|chunk| {
                let mut acc = [0.0f32; 16];
                for c in chunk.chunks_exact(16) {
                    for (a, v) in acc.iter_mut().zip(c) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((len * 4) as f64 / seconds);
    }
    best
}

/// f32 GEMM rate of the `gemm` crate on all cores, best of several (FLOP/s).
fn gemm_rate() -> f64 {
    let n = 1024;
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        // SAFETY: a, b and c are n*n contiguous row-major matrices that outlive the call;
        // strides describe exactly that layout.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(&c);
        best = best.max(2.0 * (n * n * n) as f64 / seconds);
    }
    best
}

/// Converts a weight to the dtype under test.
type Convert = Box<dyn Fn(&WeightTensor) -> WeightTensor>;

struct Setup {
    engine: Engine<CpuBackend>,
    bytes_per_token: usize,
    matmul_params: usize,
}

fn setup(weights: &ModelWeights, config: &model::ModelConfig, kv_blocks: usize) -> Setup {
    Setup {
        engine: Engine::new(
            CpuBackend::default(),
            config.clone(),
            weights,
            kv_blocks,
            16,
        )
        .expect("engine"),
        bytes_per_token: weights.bytes_per_token(),
        matmul_params: weights.matmul_params(),
    }
}

/// Mean seconds per decode step with `batch` sequences that already hold `context` tokens.
fn decode_step_time(
    s: &mut Setup,
    batch: usize,
    context: usize,
    c: &mut Criterion,
    id: &str,
) -> f64 {
    let prompt: Vec<u32> = (0..context as u32).map(|i| 100 + i % 1000).collect();
    let start_sequences = |engine: &mut Engine<CpuBackend>| -> Vec<SeqId> {
        let seqs: Vec<SeqId> = (0..batch).map(|_| engine.add_sequence()).collect();
        for &seq in &seqs {
            engine
                .step(&[StepInput {
                    seq,
                    tokens: &prompt,
                    logits: LogitsWanted::Last,
                }])
                .expect("prefill");
        }
        seqs
    };
    let mut seqs = start_sequences(&mut s.engine);
    let mut total = Duration::ZERO;
    let mut count = 0u64;
    let mut group = c.benchmark_group("cpu_decode");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                // Keep contexts near `context`: restart sequences that have grown by 64
                // (outside the timed region).
                if s.engine.sequence_len(seqs[0]).unwrap_or(0) > context + 64 {
                    for &seq in &seqs {
                        s.engine.remove_sequence(seq);
                    }
                    seqs = start_sequences(&mut s.engine);
                }
                let token = [7u32];
                let inputs: Vec<StepInput<'_>> = seqs
                    .iter()
                    .map(|&seq| StepInput {
                        seq,
                        tokens: &token,
                        logits: LogitsWanted::Last,
                    })
                    .collect();
                let start = Instant::now();
                s.engine.step(&inputs).expect("decode");
                elapsed += start.elapsed();
                total += start.elapsed();
                count += 1;
            }
            elapsed
        })
    });
    group.finish();
    for &seq in &seqs {
        s.engine.remove_sequence(seq);
    }
    total.as_secs_f64() / count.max(1) as f64
}

/// Mean seconds to prefill `len` tokens into a fresh sequence.
fn prefill_time(s: &mut Setup, len: usize, c: &mut Criterion, id: &str) -> f64 {
    let prompt: Vec<u32> = (0..len as u32).map(|i| 100 + i % 1000).collect();
    let mut total = Duration::ZERO;
    let mut count = 0u64;
    let mut group = c.benchmark_group("cpu_prefill");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(5));
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let seq = s.engine.add_sequence();
                let start = Instant::now();
                s.engine
                    .step(&[StepInput {
                        seq,
                        tokens: &prompt,
                        logits: LogitsWanted::Last,
                    }])
                    .expect("prefill");
                elapsed += start.elapsed();
                s.engine.remove_sequence(seq);
            }
            total += elapsed;
            count += iters;
            elapsed
        })
    });
    group.finish();
    total.as_secs_f64() / count.max(1) as f64
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let Some(path) = model_path() else {
        eprintln!("SmolLM2 is not in the model cache; run `make model` first");
        return;
    };
    let mut bandwidth = read_bandwidth();
    let gemm = gemm_rate();
    let loaded = model::load(&path).expect("SmolLM2");
    let config = loaded.config.clone();
    let level = CpuBackend::default().level().name();
    let mut rows: Vec<[String; 4]> = Vec::new();
    // Filled in once every decode figure is measured (see below).
    rows.push(Default::default());
    rows.push([
        "f32 GEMM, `gemm` crate (bound)".into(),
        format!("{:.1} GFLOP/s", gemm / 1e9),
        "".into(),
        "".into(),
    ]);

    let variants: [(&str, Convert); 3] = [
        ("q4_1", Box::new(|t: &WeightTensor| t.clone())),
        (
            "bf16",
            Box::new(|t: &WeightTensor| {
                WeightTensor::from_f32_as_bf16(&t.name, t.shape.clone(), &t.to_f32())
            }),
        ),
        (
            "f32",
            Box::new(|t: &WeightTensor| {
                WeightTensor::from_f32(&t.name, t.shape.clone(), &t.to_f32())
            }),
        ),
    ];
    let mut q4 = None;
    let mut singles = Vec::new();
    for (name, convert) in &variants {
        let weights = loaded.weights.map(convert);
        let mut s = setup(&weights, &config, 1024);
        // A shared host's bandwidth drifts between phases: measure it again next to each
        // figure and hold every figure to the best seen.
        bandwidth = bandwidth.max(read_bandwidth());
        let step = decode_step_time(&mut s, 1, 64, &mut c, &format!("{name}_batch1"));
        singles.push((*name, s.bytes_per_token, 1.0 / step));
        if *name == "q4_1" {
            q4 = Some((s, 1.0 / step));
        }
    }
    rows[0] = [
        "read bandwidth (bound, best of the run)".into(),
        format!("{:.1} GB/s", bandwidth / 1e9),
        "".into(),
        "".into(),
    ];
    for (name, bytes_per_token, tokens_per_s) in singles {
        let bound = bandwidth / bytes_per_token as f64;
        rows.push([
            format!(
                "decode, 1 sequence, {name} ({:.0} MB/token)",
                bytes_per_token as f64 / 1e6
            ),
            format!("{tokens_per_s:.1} tok/s"),
            format!(
                "{:.2} of bandwidth bound ({bound:.0} tok/s)",
                tokens_per_s / bound
            ),
            "".into(),
        ]);
    }
    let (mut s, single) = q4.expect("q4_1 ran");
    for batch in [4, 16, 64] {
        let step = decode_step_time(&mut s, batch, 64, &mut c, &format!("q4_1_batch{batch}"));
        let aggregate = batch as f64 / step;
        // However large the batch, every token costs 2 FLOPs per weight: the GEMM rate over
        // that is the most any batch can reach on this host.
        let compute_bound = gemm / (2.0 * s.matmul_params as f64);
        rows.push([
            format!("decode, {batch} sequences, q4_1"),
            format!("{aggregate:.1} tok/s"),
            format!(
                "{:.2}x batch 1; {:.2} of compute bound ({compute_bound:.0} tok/s)",
                aggregate / single,
                aggregate / compute_bound
            ),
            "".into(),
        ]);
    }
    for len in [128, 1024] {
        let seconds = prefill_time(&mut s, len, &mut c, &format!("q4_1_prefill{len}"));
        let flops = 2.0 * s.matmul_params as f64 * len as f64 / seconds;
        rows.push([
            format!("prefill, {len} tokens, q4_1"),
            format!("{:.0} tok/s", len as f64 / seconds),
            format!(
                "{:.2} of GEMM rate (linear layers: {:.1} GFLOP/s)",
                flops / gemm,
                flops / 1e9
            ),
            "".into(),
        ]);
    }
    c.final_summary();

    let mut table = format!("CPU: {} threads, kernels: {level}\n\n| Measurement | Result | Ratio to bound |\n|---|---|---|\n", rayon::current_num_threads());
    for [what, result, ratio, _] in &rows {
        table.push_str(&format!("| {what} | {result} | {ratio} |\n"));
    }
    println!("\n{table}");
    if std::env::var_os("ACCEL_UPDATE_README").is_some() {
        let readme_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let readme = std::fs::read_to_string(readme_path).expect("README.md");
        let (start, end) = ("<!-- cpu-bench:start -->", "<!-- cpu-bench:end -->");
        if let (Some(a), Some(b)) = (readme.find(start), readme.find(end)) {
            let updated = format!("{}{start}\n{table}{}", &readme[..a], &readme[b..]);
            std::fs::write(readme_path, updated).expect("write README.md");
            println!("README.md updated");
        }
    }
}
