//! The CUDA backend against the CPU backend (the reference) and against transformers: every
//! op on fresh random inputs of awkward sizes, whole models' logits and greedy continuations,
//! swapping a sequence to page-locked memory and back, and running out of device memory.
//!
//! Run on a GPU machine by `tests/gpu/check.sh`. Without a GPU, driver or NVRTC every test
//! prints why and passes; `ACCEL_REQUIRE_GPU=1` turns that into a failure (the check script
//! sets it). Outputs are poisoned with NaN before each op, so an element the GPU never writes
//! fails the comparison.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use accel_runtime::backend::cpu::CpuBackend;
use accel_runtime::backend::cuda::{CudaBackend, CudaOptions};
use accel_runtime::backend::{Backend, BackendError, Heads, KvLayout, SeqSlice, StepLayout};
use accel_runtime::engine::{Engine, EngineError, LogitsWanted, StepInput};
use accel_runtime::kv::disk::DiskTier;
use accel_runtime::model::{self, DType, LoadedModel, RopeStyle, WeightTensor};
use accel_tests::reference::{
    expected_logits, fixtures, greedy, greedy_moved, greedy_with_swap, ids, json, prompt_logits,
    prompts, relative_error, HF_MODELS,
};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// f32 compute on both sides, summed in different orders.
const OP_TOLERANCE: f64 = 1e-5;
const MODEL_TOLERANCE: f64 = 1e-4;
/// Every weight dtype the backends read.
const DTYPES: [DType; 6] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
];

fn cuda_with(memory_budget: Option<u64>) -> Option<CudaBackend> {
    let options = CudaOptions {
        kernel_cache: std::env::var_os("ACCEL_KERNEL_CACHE").map(PathBuf::from),
        memory_budget,
    };
    match CudaBackend::new(0, &options) {
        Ok(backend) => Some(backend),
        Err(e) if std::env::var("ACCEL_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("ACCEL_REQUIRE_GPU=1 but there is no CUDA backend: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no CUDA backend on this machine: {e}");
            None
        }
    }
}

fn cuda() -> Option<CudaBackend> {
    cuda_with(None)
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn tensor<B: Backend>(b: &B, rows: usize, cols: usize, data: &[f32]) -> B::Tensor {
    let mut t = b.alloc(rows, cols).unwrap();
    b.write(&mut t, data).unwrap();
    t
}

/// An output tensor full of NaN, so anything left unwritten fails the comparison.
fn poisoned<B: Backend>(b: &B, rows: usize, cols: usize) -> B::Tensor {
    tensor(b, rows, cols, &vec![f32::NAN; rows * cols])
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f64) {
    let err = relative_error(got, want);
    assert!(
        err <= tolerance,
        "{what}: relative error {err:e} > {tolerance:e}"
    );
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// A random weight of `rows`×`cols` in `dtype` (quantized blocks with sane scales).
fn random_weight(rng: &mut StdRng, dtype: DType, rows: usize, cols: usize) -> WeightTensor {
    let shape = vec![rows, cols];
    let values = random(rng, rows * cols);
    let bytes: Vec<u8> = match dtype {
        DType::F32 => return WeightTensor::from_f32("w", shape, &values),
        DType::BF16 => return WeightTensor::from_f32_as_bf16("w", shape, &values),
        DType::F16 => values.iter().flat_map(|&v| f16_bytes(v)).collect(),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
            let blocks = rows * cols / 32;
            let mut out = Vec::new();
            for _ in 0..blocks {
                out.extend(f16_bytes(rng.random_range(0.01f32..0.08)));
                match dtype {
                    DType::Q8_0 => out.extend((0..32).map(|_| rng.random::<u8>())),
                    DType::Q4_0 => out.extend((0..16).map(|_| rng.random::<u8>())),
                    _ => {
                        out.extend(f16_bytes(rng.random_range(-0.5f32..0.5)));
                        out.extend((0..16).map(|_| rng.random::<u8>()));
                    }
                }
            }
            out
        }
    };
    WeightTensor::from_raw("w", dtype, shape, bytes).unwrap()
}

fn matmul_on<B: Backend>(b: &B, w: &WeightTensor, x: &[f32], rows: usize) -> Vec<f32> {
    let (out_features, in_features) = w.rows_cols();
    let weight = b.upload(w).unwrap();
    let x = tensor(b, rows, in_features, x);
    let mut out = poisoned(b, rows, out_features);
    b.matmul(&x, &weight, &mut out).unwrap();
    b.read(&out).unwrap()
}

#[test]
fn matmul_matches_the_cpu_for_every_dtype_and_batch() {
    let Some(gpu) = cuda() else { return };
    let cpu = CpuBackend::default();
    let mut rng = StdRng::seed_from_u64(1);
    for dtype in DTYPES {
        // Odd output counts; inputs a whole number of quant blocks but not of warps.
        let (out_features, in_features) = if dtype.is_quantized() {
            (67, 96)
        } else {
            (67, 83)
        };
        let w = random_weight(&mut rng, dtype, out_features, in_features);
        // 1..=8 rows take the matrix-vector kernel, more the cuBLAS path.
        for rows in [1, 3, 8, 9, 40] {
            let x = random(&mut rng, rows * in_features);
            assert_close(
                &format!("matmul {dtype} x{rows}"),
                &matmul_on(&gpu, &w, &x, rows),
                &matmul_on(&cpu, &w, &x, rows),
                OP_TOLERANCE,
            );
        }
    }
}

fn embed_on<B: Backend>(b: &B, table: &WeightTensor, tokens: &[u32]) -> Vec<f32> {
    let weight = b.upload(table).unwrap();
    let mut out = poisoned(b, tokens.len(), table.rows_cols().1);
    b.embed(&weight, tokens, &mut out).unwrap();
    b.read(&out).unwrap()
}

fn norm_on<B: Backend>(b: &B, x: &[f32], rows: usize, w: &WeightTensor) -> Vec<f32> {
    let cols = w.rows_cols().1;
    let weight = b.upload(w).unwrap();
    let x = tensor(b, rows, cols, x);
    let mut out = poisoned(b, rows, cols);
    b.rms_norm(&x, &weight, 1e-5, &mut out).unwrap();
    b.read(&out).unwrap()
}

/// add_bias, silu_mul, add and gather_rows in sequence.
fn elementwise_on<B: Backend>(
    b: &B,
    x: &[f32],
    y: &[f32],
    bias: &WeightTensor,
    rows: usize,
    gather: &[usize],
) -> Vec<f32> {
    let cols = bias.rows_cols().1;
    let bias = b.upload(bias).unwrap();
    let mut x = tensor(b, rows, cols, x);
    let y = tensor(b, rows, cols, y);
    b.add_bias(&mut x, &bias).unwrap();
    b.silu_mul(&mut x, &y).unwrap();
    b.add(&mut x, &y).unwrap();
    let mut out = poisoned(b, gather.len(), cols);
    b.gather_rows(&x, gather, &mut out).unwrap();
    b.read(&out).unwrap()
}

fn rope_on<B: Backend>(
    b: &B,
    x: &[f32],
    heads: usize,
    head_dim: usize,
    style: RopeStyle,
    positions: &[u32],
) -> Vec<f32> {
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 10_000f32.powf(-2.0 * i as f32 / head_dim as f32))
        .collect();
    let mut t = tensor(b, positions.len(), heads * head_dim, x);
    b.rope(&mut t, heads, head_dim, &inv_freq, style, positions)
        .unwrap();
    b.read(&t).unwrap()
}

#[test]
fn elementwise_ops_match_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let cpu = CpuBackend::default();
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in DTYPES {
        let table = random_weight(&mut rng, dtype, 71, 64);
        let tokens = [5, 0, 70, 5, 13];
        assert_close(
            &format!("embed {dtype}"),
            &embed_on(&gpu, &table, &tokens),
            &embed_on(&cpu, &table, &tokens),
            OP_TOLERANCE,
        );
    }
    for (rows, cols) in [(1, 83), (5, 576), (3, 1030)] {
        let x = random(&mut rng, rows * cols);
        for w in [
            WeightTensor::from_f32("norm", vec![cols], &random(&mut rng, cols)),
            WeightTensor::from_f32_as_bf16("norm", vec![cols], &random(&mut rng, cols)),
        ] {
            assert_close(
                &format!("rms_norm {rows}x{cols} {}", w.dtype),
                &norm_on(&gpu, &x, rows, &w),
                &norm_on(&cpu, &x, rows, &w),
                OP_TOLERANCE,
            );
        }
        let y = random(&mut rng, rows * cols);
        let bias = WeightTensor::from_f32("bias", vec![cols], &random(&mut rng, cols));
        let gather: Vec<usize> = (0..rows).rev().chain([0]).collect();
        assert_close(
            &format!("bias, silu_mul, add, gather {rows}x{cols}"),
            &elementwise_on(&gpu, &x, &y, &bias, rows, &gather),
            &elementwise_on(&cpu, &x, &y, &bias, rows, &gather),
            OP_TOLERANCE,
        );
    }
    for (heads, head_dim) in [(9, 40), (3, 64), (5, 128)] {
        let positions = [0, 1, 17, 4095, 31_999, 2];
        let x = random(&mut rng, positions.len() * heads * head_dim);
        for style in [RopeStyle::Halves, RopeStyle::Interleaved] {
            assert_close(
                &format!("rope {heads}x{head_dim} {style:?}"),
                &rope_on(&gpu, &x, heads, head_dim, style, &positions),
                &rope_on(&cpu, &x, heads, head_dim, style, &positions),
                OP_TOLERANCE,
            );
        }
    }
}

/// One step's attention: sequences given as (tokens already cached, new tokens), with
/// scattered block tables; keys and values written through `write_kv` first.
struct AttentionCase {
    heads: Heads,
    block_size: usize,
    num_blocks: usize,
    seqs: Vec<(usize, usize)>,
    tables: Vec<Vec<u32>>,
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

impl AttentionCase {
    fn new(rng: &mut StdRng, heads: Heads, seqs: Vec<(usize, usize)>) -> Self {
        let block_size = 16;
        let needed: usize = seqs
            .iter()
            .map(|(cached, new)| (cached + new).div_ceil(block_size))
            .sum();
        let num_blocks = needed + 7;
        // Blocks handed out in a scrambled order.
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.random_range(0..=i));
        }
        let tables = seqs
            .iter()
            .map(|(cached, new)| {
                let n = (cached + new).div_ceil(block_size);
                free.split_off(free.len() - n)
            })
            .collect();
        let width = heads.num_kv_heads * heads.head_dim;
        let total: usize = seqs.iter().map(|(c, n)| c + n).sum();
        let rows: usize = seqs.iter().map(|(_, n)| n).sum();
        Self {
            heads,
            block_size,
            num_blocks,
            k: random(rng, total * width),
            v: random(rng, total * width),
            q: random(rng, rows * heads.num_heads * heads.head_dim),
            seqs,
            tables,
        }
    }

    fn run<B: Backend>(&self, b: &B) -> Vec<f32> {
        let h = self.heads;
        let width = h.num_kv_heads * h.head_dim;
        let mut kv = b
            .alloc_kv(&KvLayout {
                num_layers: 2,
                num_blocks: self.num_blocks,
                block_size: self.block_size,
                num_kv_heads: h.num_kv_heads,
                head_dim: h.head_dim,
            })
            .unwrap();
        // Every token's K/V (cached and new) written at its slot, in layer 1.
        let mut slots = Vec::new();
        for ((cached, new), table) in self.seqs.iter().zip(&self.tables) {
            for p in 0..cached + new {
                slots.push(
                    table[p / self.block_size] * self.block_size as u32
                        + (p % self.block_size) as u32,
                );
            }
        }
        let k = tensor(b, slots.len(), width, &self.k);
        let v = tensor(b, slots.len(), width, &self.v);
        b.write_kv(&mut kv, 1, &k, &v, &slots).unwrap();
        let mut positions = Vec::new();
        let mut slices = Vec::new();
        for ((cached, new), table) in self.seqs.iter().zip(&self.tables) {
            slices.push(SeqSlice {
                first_token: positions.len(),
                num_tokens: *new,
                context_len: cached + new,
                block_table: table,
            });
            positions.extend((*cached..cached + new).map(|p| p as u32));
        }
        let step_slots = vec![0u32; positions.len()];
        let layout = StepLayout {
            positions: &positions,
            slots: &step_slots,
            seqs: &slices,
            block_size: self.block_size,
        };
        let q_cols = h.num_heads * h.head_dim;
        let q = tensor(b, positions.len(), q_cols, &self.q);
        let mut out = poisoned(b, positions.len(), q_cols);
        b.attention(&q, &kv, 1, &layout, h, &mut out).unwrap();
        b.read(&out).unwrap()
    }
}

#[test]
fn paged_attention_matches_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let cpu = CpuBackend::default();
    let mut rng = StdRng::seed_from_u64(3);
    // Groups of up to 8 query heads per KV head and head_dim up to 256 take the split-context
    // kernel; the last two shapes take the general one.
    for (num_heads, num_kv_heads, head_dim) in [
        (9, 3, 40),
        (6, 2, 128),
        (7, 7, 64),
        (9, 3, 64),
        (4, 2, 192),
        (16, 2, 256),
        (14, 2, 128),
        (6, 1, 64),
        (18, 2, 32),
        (2, 1, 320),
    ] {
        let heads = Heads {
            num_heads,
            num_kv_heads,
            head_dim,
        };
        // A prefill, a decode, a chunk after a full block, and a context past one CHUNK (1024).
        let case = AttentionCase::new(
            &mut rng,
            heads,
            vec![(0, 37), (69, 1), (16, 5), (1500, 1), (1030, 3)],
        );
        assert_close(
            &format!("attention {heads:?}"),
            &case.run(&gpu),
            &case.run(&cpu),
            OP_TOLERANCE,
        );
    }
}

fn cuda_engine(backend: CudaBackend, model: &LoadedModel) -> Engine<CudaBackend> {
    Engine::new(backend, model.config.clone(), &model.weights, 64, 16).unwrap()
}

/// `model` on the GPU against transformers' logits and greedy continuations (`expected.json`
/// and `expected.safetensors` in `dir`) and against the CPU backend.
fn check_against_references(label: &str, model: &LoadedModel, dir: &std::path::Path) {
    let meta = json(&dir.join("expected.json"));
    let expected = expected_logits(&dir.join("expected.safetensors"));
    let mut gpu = cuda_engine(cuda().unwrap(), model);
    let mut cpu = Engine::new(
        CpuBackend::default(),
        model.config.clone(),
        &model.weights,
        64,
        16,
    )
    .unwrap();
    for (i, prompt) in meta["prompt_ids"].as_array().unwrap().iter().enumerate() {
        let got = prompt_logits(&mut gpu, &ids(prompt));
        assert_close(
            &format!("{label} prompt {i} against transformers"),
            &got,
            &expected[&format!("prompt{i}")],
            MODEL_TOLERANCE,
        );
        assert_close(
            &format!("{label} prompt {i} against the CPU backend"),
            &got,
            &prompt_logits(&mut cpu, &ids(prompt)),
            MODEL_TOLERANCE,
        );
    }
    let steps = meta["greedy_tokens"].as_u64().unwrap() as usize;
    for (prompt, want) in meta["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(meta["greedy"].as_array().unwrap())
    {
        assert_eq!(greedy(&mut gpu, &ids(prompt), steps), ids(want), "{label}");
    }
    assert_eq!(gpu.free_blocks(), 64, "{label}: every block is returned");
}

#[test]
fn fixture_models_match_the_cpu_and_transformers() {
    let Some(_) = cuda() else { return };
    for name in HF_MODELS {
        let dir = fixtures().join(name);
        check_against_references(name, &model::load(&dir).unwrap(), &dir);
    }
}

#[test]
fn quantized_gguf_fixtures_match_their_references() {
    let Some(_) = cuda() else { return };
    let dir = fixtures().join("llama-gqa-f32");
    for quant in ["f32", "f16", "q8_0", "q4_0", "q4_1"] {
        let path = dir.join(format!("model-{quant}.gguf"));
        let model = model::load(&path).unwrap();
        let meta = json(&dir.join(format!("model-{quant}.expected.json")));
        let expected = expected_logits(&dir.join(format!("model-{quant}.expected.safetensors")));
        let mut gpu = cuda_engine(cuda().unwrap(), &model);
        for (i, prompt) in meta["prompt_ids"].as_array().unwrap().iter().enumerate() {
            // Prefill takes the dequantize + cuBLAS path; greedy decode the matvec kernel.
            assert_close(
                &format!("{quant} prompt {i}"),
                &prompt_logits(&mut gpu, &ids(prompt)),
                &expected[&format!("prompt{i}")],
                MODEL_TOLERANCE,
            );
        }
        for (prompt, want) in meta["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(meta["greedy"].as_array().unwrap())
        {
            let steps = ids(want).len();
            assert_eq!(greedy(&mut gpu, &ids(prompt), steps), ids(want), "{quant}");
        }
    }
}

/// The SmolLM2-shaped random model the check script makes with transformers, with logits and
/// greedy continuations transformers computed on the same GPU in f32.
#[test]
fn smollm2_shaped_model_matches_the_cpu_and_transformers_on_this_gpu() {
    let Some(_) = cuda() else { return };
    let Some(dir) = std::env::var_os("ACCEL_GPU_MODEL").map(PathBuf::from) else {
        eprintln!("skipped: ACCEL_GPU_MODEL is not set (tests/gpu/check.sh makes the model)");
        return;
    };
    check_against_references("SmolLM2-shaped", &model::load(&dir).unwrap(), &dir);
}

#[test]
fn a_sequence_swapped_to_host_and_back_continues_identically() {
    let Some(backend) = cuda() else { return };
    let dir = fixtures().join("llama-gqa-f32");
    let model = model::load(&dir).unwrap();
    let meta = json(&dir.join("expected.json"));
    let prompts = prompts(&meta);
    let mut engine = cuda_engine(backend, &model);
    engine.enable_swap(8).unwrap();
    let want = greedy(&mut engine, &prompts[0], 12);
    for swap_at in [1, 5, 11] {
        let got = greedy_with_swap(&mut engine, &prompts[0], &prompts[1], 12, swap_at);
        assert_eq!(got, want, "swapped after {swap_at} tokens");
    }
    assert_eq!(engine.free_blocks(), 64);
    assert_eq!(engine.free_swap_blocks(), 8);
}

/// The disk tier on the GPU: device → page-locked host → disk (sealed) → device, and device →
/// disk → device through the staging blocks, continue as a run never moved.
#[test]
fn a_sequence_moved_to_disk_and_back_on_the_gpu_continues_identically() {
    let Some(backend) = cuda() else { return };
    let dir = fixtures().join("llama-gqa-f32");
    let model = model::load(&dir).unwrap();
    let prompts = prompts(&json(&dir.join("expected.json")));
    let mut engine = cuda_engine(backend, &model);
    engine.enable_swap(8).unwrap();
    let files = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(files.path(), engine.kv_block_bytes(), 8, 4).unwrap();
    engine.enable_disk(tier).unwrap();
    let want = greedy(&mut engine, &prompts[0], 12);
    for swap_at in [1, 5, 11] {
        let through_host = greedy_moved(
            &mut engine,
            &prompts[0],
            &prompts[1],
            12,
            swap_at,
            |e, seq| {
                e.swap_out(seq).unwrap();
                e.demote(seq, "tenant", true).unwrap();
            },
        );
        assert_eq!(
            through_host, want,
            "via host and disk after {swap_at} tokens"
        );
        let straight = greedy_moved(
            &mut engine,
            &prompts[0],
            &prompts[1],
            12,
            swap_at,
            |e, seq| {
                e.swap_out_to_disk(seq, "tenant", false).unwrap();
            },
        );
        assert_eq!(straight, want, "via disk after {swap_at} tokens");
    }
    assert_eq!(engine.free_blocks(), 64);
    assert_eq!(engine.free_swap_blocks(), 8);
    assert_eq!(engine.free_disk_blocks(), 8);
}

#[test]
fn running_out_of_device_memory_fails_the_request_not_the_backend() {
    let Some(backend) = cuda() else { return };
    // The driver itself refuses: far more than any GPU has.
    let err = backend.alloc(1 << 22, 1 << 22).unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::OutOfMemory {
                memory: "device",
                ..
            }
        ),
        "{err}"
    );

    // A budget: exactly what a short prompt needs (measured on an engine without one), so
    // a long prompt's larger activations do not fit.
    let dir = fixtures().join("llama-gqa-f32");
    let model = model::load(&dir).unwrap();
    let meta = json(&dir.join("expected.json"));
    let prompt = ids(&meta["prompt_ids"][0]);
    let mut probe = cuda_engine(cuda().unwrap(), &model);
    prompt_logits(&mut probe, &prompt);
    let budget = probe.backend().device_bytes() + (64 << 10);
    drop(probe);
    let mut engine = cuda_engine(cuda_with(Some(budget)).unwrap(), &model);
    prompt_logits(&mut engine, &prompt);
    let seq = engine.add_sequence();
    let long: Vec<u32> = prompt.iter().copied().cycle().take(250).collect();
    let err = engine
        .step(&[StepInput {
            seq,
            tokens: &long,
            logits: LogitsWanted::All,
        }])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Backend(BackendError::OutOfMemory { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("budget"), "{err}");
    assert_eq!(
        engine.sequence_len(seq),
        Some(0),
        "the failed step left nothing behind"
    );
    engine.remove_sequence(seq);
    // The same engine still serves a normal request, correctly.
    let expected = expected_logits(&dir.join("expected.safetensors"));
    assert_close(
        "after running out of memory",
        &prompt_logits(&mut engine, &prompt),
        &expected["prompt0"],
        MODEL_TOLERANCE,
    );
}

#[test]
fn sampling_helpers_match_the_host() {
    let Some(gpu) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, vocab) = (4, 50_001);
    let mut logits = random(&mut rng, rows * vocab);
    // Ties (the lower index ranks first), NaN (never chosen) and -inf.
    logits[7] = 3.0;
    logits[9] = 3.0;
    logits[vocab + 3] = f32::NAN;
    logits[vocab + 4] = 5.0;
    logits[2 * vocab + 11] = f32::NEG_INFINITY;
    let t = tensor(&gpu, rows, vocab, &logits);
    let want_order = |row: &[f32]| -> Vec<(u32, f32)> {
        let mut order: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, &v)| (i as u32, v))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        order
    };
    let ids = gpu.argmax_rows(&t).unwrap();
    let tops = gpu.top_k_rows(&t, 40).unwrap();
    for r in 0..rows {
        let order = want_order(&logits[r * vocab..(r + 1) * vocab]);
        assert_eq!(ids[r], order[0].0, "argmax row {r}");
        assert_eq!(tops[r], order[..40].to_vec(), "top-k row {r}");
    }
    assert_eq!(ids[0], 7, "of two equal maxima the lower index wins");

    let mut probs = poisoned(&gpu, rows, vocab);
    let clean: Vec<f32> = logits
        .iter()
        .map(|v| if v.is_nan() { 0.0 } else { *v })
        .collect();
    let t = tensor(&gpu, rows, vocab, &clean);
    gpu.softmax_rows(&t, 0.7, &mut probs).unwrap();
    let got = gpu.read(&probs).unwrap();
    let mut want = Vec::new();
    for row in clean.chunks(vocab) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b / 0.7));
        let e: Vec<f64> = row.iter().map(|&v| f64::from(v / 0.7 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        want.extend(e.iter().map(|v| (v / s) as f32));
    }
    assert_close("softmax with temperature", &got, &want, OP_TOLERANCE);
    assert!(gpu.top_k_rows(&t, 0).is_err() && gpu.top_k_rows(&t, 1025).is_err());
}

/// The product path: the real daemon serving a model on `cuda:0` (its runner thread driving
/// the backend created on another thread), answering greedy completions as transformers does,
/// and reporting the GPU's memory by use in its metrics.
#[test]
fn the_daemon_serves_a_model_on_the_gpu() {
    let Some(backend) = cuda() else { return };
    drop(backend);
    let (daemon, _cache) = fixture_daemon_on_cuda0("");
    let (_, metrics) = daemon.request("GET", "/metrics", None);
    let weights = metrics
        .lines()
        .find(|l| {
            l.starts_with("accel_backend_memory_bytes{device=\"GPU-")
                && l.contains("use=\"weights\"")
        })
        .unwrap_or_else(|| panic!("no GPU weights in the metrics:\n{metrics}"));
    let bytes: u64 = weights.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes > 0, "{weights}");
}

/// The same through an isolated worker (`isolation: shared`): the engine in `acceld worker`,
/// unprivileged, in its cgroup behind a device gate granting only `/dev/nvidia0`, `nvidiactl`
/// and `nvidia-uvm`. Prints what the worker's cgroup holds (its CUDA context included).
#[test]
fn an_isolated_worker_serves_a_model_on_the_gpu() {
    let Some(backend) = cuda() else { return };
    drop(backend);
    if !accel_tests::is_root() {
        eprintln!("skipped: isolated workers need root (CI and the GPU check run as root)");
        return;
    }
    let (daemon, _cache) = fixture_daemon_on_cuda0("isolation: shared\n");
    // The API rather than accelctl: the GPU check carries only acceld.
    let (status, text) = daemon.request("GET", "/v1/workers", None);
    assert_eq!(status, 200, "{text}");
    let listed: serde_json::Value = serde_json::from_str(&text).unwrap();
    let worker = &listed["workers"][0];
    assert_eq!(worker["device"], "cuda:0", "{listed}");
    assert_eq!(worker["device_denials"], 0, "{listed}");
    eprintln!(
        "isolated GPU worker: memory {} MiB (peak {} MiB) in its cgroup",
        worker["memory_bytes"].as_u64().unwrap_or(0) >> 20,
        worker["memory_peak_bytes"].as_u64().unwrap_or(0) >> 20
    );
}

/// The daemon serving the f32 fixture on `cuda:0` (with `extra` config lines), checked
/// against transformers; its kernel cache lives as long as the returned directory.
fn fixture_daemon_on_cuda0(extra: &str) -> (accel_tests::Daemon, tempfile::TempDir) {
    let dir = fixtures().join("llama-gqa-f32");
    let cache = accel_tests::shared_tempdir();
    let config = format!(
        "{extra}kernel_cache: {}\nmodels:\n  - name: tiny\n    path: {}\n    backend: cuda:0\n    kv_blocks: 64\n",
        cache.path().display(),
        dir.display()
    );
    let daemon = accel_tests::Daemon::start_with(accel_tests::DaemonOptions {
        extra_config: &config,
        ..Default::default()
    });
    assert_reference_answers_on_cuda0(&daemon, &dir);
    (daemon, cache)
}

/// Greedy completions of the fixture's prompts equal transformers', served on `cuda:0`.
fn assert_reference_answers_on_cuda0(daemon: &accel_tests::Daemon, dir: &std::path::Path) {
    let (status, models) = daemon.request("GET", "/v1/models", None);
    assert_eq!(status, 200, "{models}");
    assert!(models.contains("\"backend\":\"cuda:0\""), "{models}");
    let meta = json(&dir.join("expected.json"));
    let tokenizer = model::load(dir).unwrap().tokenizer;
    for (prompt, want) in meta["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(meta["greedy"].as_array().unwrap())
    {
        let want = ids(want);
        let body = serde_json::json!({"model": "tiny", "prompt": ids(prompt), "max_tokens": want.len(), "temperature": 0, "ignore_eos": true});
        let (status, text) =
            daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
        assert_eq!(status, 200, "{text}");
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            answer["choices"][0]["text"],
            tokenizer.decode(&want, true).unwrap()
        );
    }
}

/// The last logits after feeding `tokens` to a sequence started through the prefix cache
/// (scope `scope`), then `steps` greedy tokens; the sequence is removed after.
fn cached_continuation(
    engine: &mut Engine<CudaBackend>,
    scope: &str,
    tokens: &[u32],
    steps: usize,
) -> (usize, Vec<f32>, Vec<u32>) {
    let (seq, held) = engine.add_sequence_cached(scope, tokens);
    let mut feed = tokens[held..].to_vec();
    let mut first = None;
    let mut out = Vec::new();
    for _ in 0..=steps {
        let logits = engine
            .step(&[StepInput {
                seq,
                tokens: &feed,
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .remove(0)
            .logits
            .remove(0);
        let next = accel_runtime::engine::sampling::argmax(&logits) as u32;
        first.get_or_insert(logits);
        out.push(next);
        feed = vec![next];
    }
    engine.remove_sequence(seq);
    out.pop();
    (held, first.unwrap_or_default(), out)
}

/// The prefix cache on the GPU: a request that starts as an earlier one of its scope did
/// holds that one's blocks, and its logits and greedy continuation are those of a run
/// without the cache.
#[test]
fn a_shared_prefix_on_the_gpu_changes_no_output() {
    let Some(backend) = cuda() else { return };
    let dir = fixtures().join("llama-gqa-f32");
    let model = model::load(&dir).unwrap();
    let prompts = prompts(&json(&dir.join("expected.json")));
    let first: Vec<u32> = prompts.iter().flatten().copied().cycle().take(40).collect();
    let mut second = first[..36].to_vec();
    second.extend([5, 6, 7, 8, 9]);
    let mut engine = cuda_engine(backend, &model);
    let (held, _, _) = cached_continuation(&mut engine, "t", &first, 4);
    assert_eq!(held, 0);
    let (held, got_logits, got) = cached_continuation(&mut engine, "t", &second, 8);
    assert_eq!(held, 32);
    engine.disable_prefix_cache();
    let (held, want_logits, want) = cached_continuation(&mut engine, "t", &second, 8);
    assert_eq!(held, 0);
    assert_close(
        "logits after a cached prefix",
        &got_logits,
        &want_logits,
        MODEL_TOLERANCE,
    );
    assert_eq!(got, want);
    assert_eq!(engine.free_blocks(), 64);
}
