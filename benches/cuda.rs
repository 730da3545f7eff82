//! CUDA backend speed, each figure next to a bound measured in the same run on the same GPU:
//! - paged-attention decode: bytes the kernel must read (keys, values, queries) per second,
//!   against a device-to-device copy (bytes read + written per second);
//! - swap: KV blocks device → page-locked host and back, against one plain `cuMemcpy` of the
//!   same bytes between device memory and page-locked host memory;
//! - decode tokens/s of a SmolLM2-shaped model in bf16 at batch 1 and 64 (`ACCEL_GPU_MODEL`,
//!   made by tests/gpu/make_model.py); the check script compares it with transformers.
//!
//! `cargo bench -p accel-benches --bench cuda` prints a table and, with `ACCEL_BENCH_JSON`
//! set, writes the figures there as JSON. Without a GPU it says why and exits 0 (1 with
//! `ACCEL_REQUIRE_GPU=1`, as the GPU check script sets).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use accel_runtime::backend::cuda::{CudaBackend, CudaOptions};
use accel_runtime::backend::{Backend, Heads, KvLayout, SeqSlice, StepLayout};
use accel_runtime::engine::{Engine, LogitsWanted, SeqId, StepInput};
use accel_runtime::model::{self, WeightTensor};
use criterion::Criterion;
use cudarc::driver::{result, sys, CudaContext};

fn backend() -> Option<CudaBackend> {
    let options = CudaOptions {
        kernel_cache: std::env::var_os("ACCEL_KERNEL_CACHE").map(PathBuf::from),
        memory_budget: None,
    };
    match CudaBackend::new(0, &options) {
        Ok(b) => Some(b),
        Err(e) if std::env::var("ACCEL_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            eprintln!("ACCEL_REQUIRE_GPU=1 but there is no CUDA backend: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("no CUDA backend here, nothing to measure: {e}");
            None
        }
    }
}

/// Mean seconds of `f` under criterion (`f` returns once its GPU work is finished).
fn measure(c: &mut Criterion, group: &str, id: &str, mut f: impl FnMut()) -> f64 {
    // First runs pay for module loads, allocations and heuristics: keep them out.
    for _ in 0..3 {
        f();
    }
    let mut total = Duration::ZERO;
    let mut count = 0u64;
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            let elapsed = start.elapsed();
            total += elapsed;
            count += iters;
            elapsed
        })
    });
    g.finish();
    total.as_secs_f64() / count.max(1) as f64
}

/// Raw device and page-locked buffers for the bounds, on the backend's device.
struct Bounds {
    ctx: Arc<CudaContext>,
    device_a: u64,
    device_b: u64,
    host: *mut u8,
    bytes: usize,
}

impl Bounds {
    fn new(bytes: usize) -> Self {
        let ctx = CudaContext::new(0).expect("context");
        // SAFETY: plain allocations of `bytes`, freed in Drop; contents are irrelevant.
        unsafe {
            Self {
                device_a: result::malloc_sync(bytes).expect("device memory"),
                device_b: result::malloc_sync(bytes).expect("device memory"),
                host: result::malloc_host(bytes, 0)
                    .expect("page-locked memory")
                    .cast(),
                bytes,
                ctx,
            }
        }
    }

    fn dtod(&self) {
        // SAFETY: both buffers hold `bytes`; the synchronous copy completes before return.
        unsafe {
            sys::cuMemcpyDtoD_v2(self.device_b, self.device_a, self.bytes)
                .result()
                .expect("copy");
        }
        self.ctx.synchronize().expect("sync");
    }

    fn dtoh(&self) {
        // SAFETY: as above, device → page-locked host.
        unsafe {
            sys::cuMemcpyDtoH_v2(self.host.cast(), self.device_a, self.bytes)
                .result()
                .expect("copy");
        }
    }

    fn htod(&self) {
        // SAFETY: as above, page-locked host → device.
        unsafe {
            sys::cuMemcpyHtoD_v2(self.device_a, self.host.cast(), self.bytes)
                .result()
                .expect("copy");
        }
    }
}

impl Drop for Bounds {
    fn drop(&mut self) {
        // SAFETY: allocated in new, freed once.
        unsafe {
            let _ = result::free_sync(self.device_a);
            let _ = result::free_sync(self.device_b);
            let _ = result::free_host(self.host.cast());
        }
    }
}

/// SmolLM2-135M's attention shape.
const HEADS: Heads = Heads {
    num_heads: 9,
    num_kv_heads: 3,
    head_dim: 64,
};
const LAYERS: usize = 30;
const BLOCK: usize = 16;

/// One layer's decode attention for `batch` sequences of `context` tokens each.
fn attention_time(
    b: &CudaBackend,
    c: &mut Criterion,
    batch: usize,
    context: usize,
) -> (f64, usize) {
    let blocks_per_seq = context.div_ceil(BLOCK);
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: batch * blocks_per_seq,
        block_size: BLOCK,
        num_kv_heads: HEADS.num_kv_heads,
        head_dim: HEADS.head_dim,
    };
    let kv = b.alloc_kv(&layout).expect("kv");
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let seqs: Vec<SeqSlice<'_>> = tables
        .iter()
        .enumerate()
        .map(|(s, t)| SeqSlice {
            first_token: s,
            num_tokens: 1,
            context_len: context,
            block_table: t,
        })
        .collect();
    let positions = vec![(context - 1) as u32; batch];
    let slots = vec![0u32; batch];
    let step = StepLayout {
        positions: &positions,
        slots: &slots,
        seqs: &seqs,
        block_size: BLOCK,
    };
    let width = HEADS.num_heads * HEADS.head_dim;
    let mut q = b.alloc(batch, width).expect("q");
    b.write(&mut q, &vec![0.01; batch * width]).expect("q");
    let mut out = b.alloc(batch, width).expect("out");
    let seconds = measure(
        c,
        "cuda_attention",
        &format!("batch{batch}_ctx{context}"),
        || {
            b.attention(&q, &kv, 0, &step, HEADS, &mut out)
                .expect("attention");
            b.synchronize().expect("sync");
        },
    );
    let kv_bytes = batch * context * HEADS.num_kv_heads * HEADS.head_dim * 4 * 2;
    (seconds, kv_bytes + 2 * batch * width * 4)
}

/// Swapping `blocks` KV blocks of SmolLM2's shape out and back in.
fn swap_times(b: &CudaBackend, c: &mut Criterion, blocks: usize) -> (f64, f64, usize) {
    let layout = KvLayout {
        num_layers: LAYERS,
        num_blocks: blocks,
        block_size: BLOCK,
        num_kv_heads: HEADS.num_kv_heads,
        head_dim: HEADS.head_dim,
    };
    let mut kv = b.alloc_kv(&layout).expect("kv");
    let mut host = b.alloc_host_kv(&layout, blocks).expect("swap space");
    let pairs: Vec<(u32, u32)> = (0..blocks as u32).map(|i| (i, i)).collect();
    let out = measure(c, "cuda_swap", &format!("out_{blocks}"), || {
        b.swap_out(&kv, &mut host, &pairs).expect("swap out");
        b.wait_copies().expect("wait");
    });
    let back = measure(c, "cuda_swap", &format!("in_{blocks}"), || {
        b.swap_in(&host, &mut kv, &pairs).expect("swap in");
        b.wait_copies().expect("wait");
    });
    (
        out,
        back,
        blocks * LAYERS * 2 * BLOCK * HEADS.num_kv_heads * HEADS.head_dim * 4,
    )
}

/// Aggregate decode tokens/s with `batch` sequences holding `context` tokens.
fn decode_rate(
    engine: &mut Engine<CudaBackend>,
    c: &mut Criterion,
    batch: usize,
    context: usize,
) -> f64 {
    let prompt: Vec<u32> = (0..context as u32).map(|i| 100 + i % 1000).collect();
    let start = |engine: &mut Engine<CudaBackend>| -> Vec<SeqId> {
        let seqs: Vec<SeqId> = (0..batch).map(|_| engine.add_sequence()).collect();
        let inputs: Vec<StepInput<'_>> = seqs
            .iter()
            .map(|&seq| StepInput {
                seq,
                tokens: &prompt,
                logits: LogitsWanted::Last,
            })
            .collect();
        engine.step(&inputs).expect("prefill");
        seqs
    };
    let mut seqs = start(engine);
    let token = [7u32];
    let decode = |engine: &mut Engine<CudaBackend>, seqs: &[SeqId]| {
        let inputs: Vec<StepInput<'_>> = seqs
            .iter()
            .map(|&seq| StepInput {
                seq,
                tokens: &token,
                logits: LogitsWanted::Last,
            })
            .collect();
        engine.step(&inputs).expect("decode");
    };
    // Kernels loaded, cuBLAS heuristics settled, buffers grown before anything is timed.
    for _ in 0..8 {
        decode(engine, &seqs);
    }
    let (mut total, mut count) = (Duration::ZERO, 0u64);
    let mut g = c.benchmark_group("cuda_decode");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    g.bench_function(format!("bf16_batch{batch}"), |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                // Keep contexts near `context`: restart the sequences that have grown by 64,
                // outside the timed region.
                if engine.sequence_len(seqs[0]).unwrap_or(0) > context + 64 {
                    for &seq in &seqs {
                        engine.remove_sequence(seq);
                    }
                    seqs = start(engine);
                }
                let started = Instant::now();
                decode(engine, &seqs);
                elapsed += started.elapsed();
            }
            total += elapsed;
            count += iters;
            elapsed
        })
    });
    g.finish();
    let seconds = total.as_secs_f64() / count.max(1) as f64;
    for &seq in &seqs {
        engine.remove_sequence(seq);
    }
    batch as f64 / seconds
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let Some(b) = backend() else { return };
    let device = b.device().name().to_owned();
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut json = serde_json::Map::new();

    let bounds = Bounds::new(512 << 20);
    let copy = measure(&mut c, "cuda_bound", "dtod_512MiB", || bounds.dtod());
    let copy_rate = 2.0 * bounds.bytes as f64 / copy;
    rows.push((
        "device-to-device copy (bound)".into(),
        format!("{:.0} GB/s (read + write)", copy_rate / 1e9),
        String::new(),
    ));
    json.insert("dtod_bytes_per_s".into(), copy_rate.into());

    for (batch, context) in [(64, 2048), (16, 4096)] {
        let (seconds, bytes) = attention_time(&b, &mut c, batch, context);
        let rate = bytes as f64 / seconds;
        rows.push((
            format!("paged attention decode, {batch} seqs x {context} tokens, one layer"),
            format!("{:.0} GB/s ({:.1} µs)", rate / 1e9, seconds * 1e6),
            format!("{:.2} of copy", rate / copy_rate),
        ));
        json.insert(
            format!("attention_{batch}x{context}_ratio"),
            (rate / copy_rate).into(),
        );
    }

    let blocks = 512;
    let (out, back, bytes) = swap_times(&b, &mut c, blocks);
    drop(bounds);
    let pinned = Bounds::new(bytes);
    let dtoh = measure(&mut c, "cuda_bound", "dtoh_pinned", || pinned.dtoh());
    let htod = measure(&mut c, "cuda_bound", "htod_pinned", || pinned.htod());
    for (what, seconds, bound) in [("device → host", out, dtoh), ("host → device", back, htod)]
    {
        rows.push((
            format!("swap {blocks} blocks ({:.0} MB) {what}", bytes as f64 / 1e6),
            format!("{:.1} GB/s", bytes as f64 / seconds / 1e9),
            format!(
                "{:.2} of pinned memcpy ({:.1} GB/s)",
                bound / seconds,
                bytes as f64 / bound / 1e9
            ),
        ));
    }
    json.insert("swap_out_ratio".into(), (dtoh / out).into());
    json.insert("swap_in_ratio".into(), (htod / back).into());
    drop(pinned);

    match std::env::var_os("ACCEL_GPU_MODEL") {
        None => eprintln!("ACCEL_GPU_MODEL is not set: no decode figures"),
        Some(dir) => {
            let loaded = model::load(std::path::Path::new(&dir)).expect("model");
            let bf16 = loaded.weights.map(|t: &WeightTensor| {
                WeightTensor::from_f32_as_bf16(&t.name, t.shape.clone(), &t.to_f32())
            });
            let mut engine =
                Engine::new(b, loaded.config.clone(), &bf16, 64 * 12, BLOCK).expect("engine");
            let one = decode_rate(&mut engine, &mut c, 1, 64);
            let many = decode_rate(&mut engine, &mut c, 64, 64);
            rows.push((
                "decode, SmolLM2-shaped bf16, batch 1".into(),
                format!("{one:.0} tok/s"),
                String::new(),
            ));
            rows.push((
                "decode, SmolLM2-shaped bf16, batch 64".into(),
                format!("{many:.0} tok/s"),
                format!("{:.1}x batch 1", many / one),
            ));
            json.insert("decode_bf16_batch1_tok_s".into(), one.into());
            json.insert("decode_bf16_batch64_tok_s".into(), many.into());
        }
    }
    c.final_summary();

    let mut table =
        format!("GPU: {device}\n\n| Measurement | Result | Ratio to bound |\n|---|---|---|\n");
    for (what, result, ratio) in &rows {
        table.push_str(&format!("| {what} | {result} | {ratio} |\n"));
    }
    println!("\n{table}");
    if let Some(path) = std::env::var_os("ACCEL_BENCH_JSON") {
        let text = serde_json::to_string_pretty(&json).expect("json");
        std::fs::write(path, text).expect("write ACCEL_BENCH_JSON");
    }
}
