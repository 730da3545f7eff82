//! The CPU backend: the default on a node without a GPU and the reference the CUDA backend is
//! checked against. Weights are read where they are mapped; activations and the KV cache are
//! plain f32 vectors. The only file of this backend that touches KV memory.

pub mod kernels;
pub mod simd;

use rayon::prelude::*;

use self::simd::Level;
use super::{Backend, BackendError, CopyTicket, Heads, KvLayout, StepLayout};
use crate::model::{DType, RopeStyle, WeightTensor};

/// Row-major f32 activations.
#[derive(Debug, Clone)]
pub struct CpuTensor {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl CpuTensor {
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// A weight: the mapped tensor, plus an f32 copy for small vectors (norms, biases).
#[derive(Debug)]
pub struct CpuWeight {
    tensor: WeightTensor,
    vector: Option<Vec<f32>>,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

/// Keys and values of every layer: `[layer][slot][kv_head][head_dim]`.
#[derive(Debug)]
pub struct CpuKv {
    layout: KvLayout,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The CPU backend: kernels of one SIMD level, run on rayon's persistent thread pool (one
/// thread per core), work split along weight rows.
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    level: Level,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self {
            level: Level::detect(),
        }
    }
}

impl CpuBackend {
    /// A backend using `level`'s kernels, if this CPU supports them.
    pub fn with_level(level: Level) -> Option<Self> {
        Level::available()
            .contains(&level)
            .then_some(Self { level })
    }

    pub fn level(&self) -> Level {
        self.level
    }
}

/// A pointer that may cross to rayon's threads; see each use for why writes never overlap.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used to write disjoint elements from different threads within one rayon scope,
// while the owning Vec is borrowed mutably by the caller and not otherwise touched.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element pointer at `offset` (taking `self` whole, so closures capture the Sync
    /// wrapper rather than the raw pointer inside it).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Weight rows per parallel task: enough tasks to balance the cores, few enough to amortise
/// scheduling, and at least 8 rows so each task streams whole cache lines of weights.
fn rows_per_task(rows: usize) -> usize {
    let tasks = rayon::current_num_threads() * 8;
    rows.div_ceil(tasks).max(8)
}

/// Batches of at least this many rows go through dequantize-then-GEMM: converting a weight
/// row once and reusing it for every batch row beats converting it inside each dot product.
const GEMM_MIN_ROWS: usize = 2;
/// Weight rows dequantized per GEMM task (the f32 tile stays in L2: 64 x 1536 x 4 = 384 KiB).
const GEMM_TILE_ROWS: usize = 64;

impl CpuBackend {
    /// One activation row times a bf16 weight: the row is permuted once (see
    /// `simd::permute_for_bf16_pairs`) so every weight row widens with a shift and a mask.
    fn matvec_bf16_pairs(
        &self,
        x: &CpuTensor,
        weight: &CpuWeight,
        out: &mut CpuTensor,
        dot: simd::Bf16PairsFn,
    ) {
        let bytes = weight.tensor.bytes();
        let row_bytes = weight.row_bytes;
        let chunk = rows_per_task(weight.rows);
        let x = x.row(0);
        // Taken out of the thread-local rather than borrowed across the parallel loop: while
        // this thread waits in the loop, rayon may run another model's step on it, which
        // would find the buffer borrowed.
        let mut xp = PERMUTED.take();
        simd::permute_for_bf16_pairs(x, &mut xp);
        out.data[..weight.rows]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(task, outs)| {
                for (k, o) in outs.iter_mut().enumerate() {
                    let j = task * chunk + k;
                    *o = dot(&bytes[j * row_bytes..(j + 1) * row_bytes], &xp, x);
                }
            });
        PERMUTED.set(xp);
    }

    /// `out = x · Wᵀ` for a batch: each task dequantizes a tile of weight rows into f32 (or
    /// reads f32 weights in place when aligned) and multiplies the whole batch by it with the
    /// `gemm` crate, writing its own columns of `out`.
    fn matmul_gemm(&self, x: &CpuTensor, weight: &CpuWeight, out: &mut CpuTensor) {
        let (n, k, cols) = (x.rows, x.cols, out.cols);
        let bytes = weight.tensor.bytes();
        let dtype = weight.tensor.dtype;
        let in_place = dtype == DType::F32
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>());
        let shared = SharedOut(out.data.as_mut_ptr());
        let dequantize = simd::dequant_fn(self.level, dtype);
        let tiles = weight.rows.div_ceil(GEMM_TILE_ROWS);
        (0..tiles).into_par_iter().for_each(|tile| {
            let j0 = tile * GEMM_TILE_ROWS;
            let rows = GEMM_TILE_ROWS.min(weight.rows - j0);
            TILE.with_borrow_mut(|scratch| {
                let w: *const f32 = if in_place {
                    bytes[j0 * weight.row_bytes..].as_ptr().cast()
                } else {
                    // Every element is overwritten below: grow without zeroing what is there.
                    if scratch.len() < rows * k {
                        scratch.resize(rows * k, 0.0);
                    }
                    for (r, dst) in scratch[..rows * k].chunks_exact_mut(k).enumerate() {
                        let row =
                            &bytes[(j0 + r) * weight.row_bytes..(j0 + r + 1) * weight.row_bytes];
                        dequantize(row, dst);
                    }
                    scratch.as_ptr()
                };
                // SAFETY: `x` is n×k row-major; `w` points at `rows` weight rows of k f32 each
                // (the aligned mapped tensor, or the scratch tile just filled), read as the k×rows
                // matrix Wᵀ (row stride 1, column stride k); `out` is n×cols row-major and this
                // task writes only its columns j0..j0+rows, which no other task touches. All of
                // it outlives the call.
                unsafe {
                    gemm::gemm(
                        n,
                        rows,
                        k,
                        shared.at(j0),
                        1,
                        cols as isize,
                        false,
                        x.data.as_ptr(),
                        1,
                        k as isize,
                        w,
                        k as isize,
                        1,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
    }
}

/// Sequences with at least this many new tokens in a step get GEMM attention.
const ATTENTION_GEMM_MIN_TOKENS: usize = 16;

impl CpuBackend {
    /// Causal attention for whole prefill chunks: per (sequence, head), gather the keys and
    /// values through the block table, `S = Q Kᵀ` and `O = softmax(S) V` with the `gemm` crate.
    #[allow(clippy::too_many_arguments)]
    fn attention_gemm(
        &self,
        q: &CpuTensor,
        keys: &[f32],
        values: &[f32],
        step: &StepLayout<'_>,
        long: &[usize],
        heads: Heads,
        width: usize,
        out: &mut CpuTensor,
    ) {
        let Heads {
            num_heads,
            num_kv_heads,
            head_dim,
        } = heads;
        let group = num_heads / num_kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let bs = step.block_size;
        let shared = SharedOut(out.data.as_mut_ptr());
        let out_cols = out.cols;
        let jobs: Vec<(usize, usize)> = long
            .iter()
            .flat_map(|&s| (0..num_heads).map(move |h| (s, h)))
            .collect();
        jobs.into_par_iter().for_each(|(s, h)| {
            let seq = &step.seqs[s];
            let ctx = seq.context_len;
            let n = seq.num_tokens;
            let kv_head = h / group;
            ATTENTION.with_borrow_mut(|(kt, v, scores)| {
                kt.clear();
                kt.resize(ctx * head_dim, 0.0);
                v.clear();
                v.resize(ctx * head_dim, 0.0);
                for p in 0..ctx {
                    let base = (seq.block_table[p / bs] as usize * bs + p % bs) * width
                        + kv_head * head_dim;
                    kt[p * head_dim..(p + 1) * head_dim]
                        .copy_from_slice(&keys[base..base + head_dim]);
                    v[p * head_dim..(p + 1) * head_dim]
                        .copy_from_slice(&values[base..base + head_dim]);
                }
                scores.clear();
                scores.resize(n * ctx, 0.0);
                let q0 = q.data[seq.first_token * q.cols + h * head_dim..].as_ptr();
                // SAFETY: Q rows of this sequence and head: n rows of head_dim floats with row
                // stride q.cols, inside q.data; `kt` is ctx×head_dim row-major, read as its
                // transpose; `scores` is n×ctx. All live through the call.
                unsafe {
                    gemm::gemm(
                        n,
                        ctx,
                        head_dim,
                        scores.as_mut_ptr(),
                        1,
                        ctx as isize,
                        false,
                        q0,
                        1,
                        q.cols as isize,
                        kt.as_ptr(),
                        head_dim as isize,
                        1,
                        0.0f32,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for (i, row) in scores.chunks_exact_mut(ctx).enumerate() {
                    let visible = step.positions[seq.first_token + i] as usize + 1;
                    let max = row[..visible]
                        .iter()
                        .copied()
                        .fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0.0f32;
                    for x in &mut row[..visible] {
                        *x = (*x - max).exp();
                        total += *x;
                    }
                    for x in &mut row[..visible] {
                        *x /= total;
                    }
                    row[visible..].fill(0.0);
                }
                // SAFETY: `scores` is n×ctx, `v` ctx×head_dim; the destination is this
                // sequence's n rows of `out` (row stride out_cols) at this head's columns, which
                // no other job writes.
                unsafe {
                    gemm::gemm(
                        n,
                        head_dim,
                        ctx,
                        shared.at(seq.first_token * out_cols + h * head_dim),
                        1,
                        out_cols as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        ctx as isize,
                        v.as_ptr(),
                        1,
                        head_dim as isize,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
    }
}

thread_local! {
    /// Gathered keys, values and scores for GEMM attention, reused across steps.
    static ATTENTION: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    /// A dequantized weight tile for the batched path, reused across steps.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// RoPE's cos and sin of one position, reused across calls.
    static ROPE_TABLES: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// Each query row's sequence, for attention, reused across layers and steps.
    static OWNERS: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One activation row permuted for the bf16 matrix-vector kernel, reused across steps.
    static PERMUTED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Attention scores, reused across steps so decoding allocates nothing here.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn shape_error(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

/// A zeroed vector whose pages the kernel provides lazily (a large KV cache costs nothing until
/// used), with allocation failure as an error rather than an abort.
fn try_zeroed(len: usize, what: &str) -> Result<Vec<f32>, BackendError> {
    let oom = || BackendError::OutOfMemory {
        memory: "host",
        what: what.to_owned(),
        bytes: len.saturating_mul(4),
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).map_err(|_| oom())?;
    // SAFETY: the layout has a non-zero size (len > 0). alloc_zeroed returns memory aligned for
    // f32 and zero-filled, which is a valid f32 (0.0) in every element; on success the Vec takes
    // ownership with exactly this capacity and layout, so it frees it with the same layout.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<f32>();
        if ptr.is_null() {
            return Err(oom());
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Kv = CpuKv;
    type HostKv = CpuHostKv;

    fn name(&self) -> String {
        format!("cpu ({})", self.level.name())
    }

    fn run_step<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        // From a thread outside the pool, every parallel loop would be injected into the pool
        // with the caller asleep until it ends: a futex wake-up per op, hundreds per token.
        rayon::scope(|_| f())
    }

    fn upload(&self, weight: &WeightTensor) -> Result<CpuWeight, BackendError> {
        let (rows, cols) = super::check_upload(weight)?;
        let vector = (rows == 1).then(|| weight.to_f32());
        Ok(CpuWeight {
            row_bytes: weight.row_bytes(),
            tensor: weight.clone(),
            vector,
            rows,
            cols,
        })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CpuTensor, BackendError> {
        Ok(CpuTensor {
            rows,
            cols,
            data: try_zeroed(rows * cols, "activations")?,
        })
    }

    fn reshape(&self, t: &mut CpuTensor, rows: usize, cols: usize) -> Result<(), BackendError> {
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| shape_error("reshape", format!("{rows}x{cols} overflows")))?;
        if len > t.data.capacity() {
            t.data.clear();
            t.data
                .try_reserve_exact(len)
                .map_err(|_| BackendError::OutOfMemory {
                    memory: "host",
                    what: "activations".into(),
                    bytes: len.saturating_mul(4),
                })?;
        }
        // Within capacity: no allocation.
        t.data.resize(len, 0.0);
        t.rows = rows;
        t.cols = cols;
        Ok(())
    }

    fn alloc_kv(&self, layout: &KvLayout) -> Result<CpuKv, BackendError> {
        let per_layer =
            layout.num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim;
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            k.push(try_zeroed(per_layer, "the KV cache")?);
            v.push(try_zeroed(per_layer, "the KV cache")?);
        }
        Ok(CpuKv {
            layout: *layout,
            k,
            v,
        })
    }

    fn embed(
        &self,
        table: &CpuWeight,
        tokens: &[u32],
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        super::check_embed(tokens, (table.rows, table.cols), (out.rows, out.cols))?;
        let bytes = table.tensor.bytes();
        for (r, &token) in tokens.iter().enumerate() {
            let t = token as usize;
            let row = &bytes[t * table.row_bytes..(t + 1) * table.row_bytes];
            kernels::dequantize_row(
                table.tensor.dtype,
                row,
                &mut out.data[r * out.cols..(r + 1) * out.cols],
            );
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuWeight,
        eps: f32,
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        super::check_row_vector(
            "rms_norm",
            (weight.rows, weight.cols),
            (x.rows, x.cols),
            Some((out.rows, out.cols)),
        )?;
        let w = weight.vector.as_deref().unwrap_or_default();
        for r in 0..x.rows {
            let row = x.row(r);
            let mean_square = kernels::dot_f32(row, row) / x.cols as f32;
            let scale = 1.0 / (mean_square + eps).sqrt();
            for ((o, v), g) in out.data[r * x.cols..(r + 1) * x.cols]
                .iter_mut()
                .zip(row)
                .zip(w)
            {
                *o = v * scale * g;
            }
        }
        Ok(())
    }

    fn matmul(
        &self,
        x: &CpuTensor,
        weight: &CpuWeight,
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        super::check_matmul(
            (x.rows, x.cols),
            (weight.rows, weight.cols),
            (out.rows, out.cols),
        )?;
        if x.rows >= GEMM_MIN_ROWS {
            self.matmul_gemm(x, weight, out);
            return Ok(());
        }
        let bytes = weight.tensor.bytes();
        if x.rows == 1 && weight.tensor.dtype == DType::BF16 {
            if let Some(dot) = simd::bf16_pairs_fn(self.level) {
                self.matvec_bf16_pairs(x, weight, out, dot);
                return Ok(());
            }
        }
        let dot = simd::dot_fn(self.level, weight.tensor.dtype);
        let (n, cols, row_bytes) = (x.rows, out.cols, weight.row_bytes);
        let chunk = rows_per_task(weight.rows);
        let shared = SharedOut(out.data.as_mut_ptr());
        // Each task owns a run of weight rows (output columns) and computes them for every
        // batch row: a weight row is read from memory once per step and reused from cache for
        // the whole batch.
        (0..weight.rows.div_ceil(chunk))
            .into_par_iter()
            .for_each(|task| {
                for j in task * chunk..((task + 1) * chunk).min(weight.rows) {
                    let row = &bytes[j * row_bytes..(j + 1) * row_bytes];
                    for r in 0..n {
                        let value = dot(row, x.row(r));
                        // SAFETY: element (r, j) is written by exactly one task (the one owning
                        // column j), r < n and j < cols, so r * cols + j is inside `out.data`,
                        // which outlives this parallel loop and is not read during it.
                        unsafe { *shared.at(r * cols + j) = value };
                    }
                }
            });
        Ok(())
    }

    fn add_bias(&self, x: &mut CpuTensor, bias: &CpuWeight) -> Result<(), BackendError> {
        super::check_row_vector("add_bias", (bias.rows, bias.cols), (x.rows, x.cols), None)?;
        let b = bias.vector.as_deref().unwrap_or_default();
        for row in x.data.chunks_exact_mut(x.cols) {
            for (v, b) in row.iter_mut().zip(b) {
                *v += b;
            }
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        heads: usize,
        head_dim: usize,
        inv_freq: &[f32],
        style: RopeStyle,
        positions: &[u32],
    ) -> Result<(), BackendError> {
        super::check_rope(
            (x.rows, x.cols),
            heads,
            head_dim,
            inv_freq.len(),
            positions.len(),
        )?;
        let half = head_dim / 2;
        // Angle tables reused across calls (rope runs twice per layer when decoding).
        let (mut cos, mut sin) = ROPE_TABLES.take();
        cos.clear();
        cos.resize(half, 0.0);
        sin.clear();
        sin.resize(half, 0.0);
        for (r, &pos) in positions.iter().enumerate() {
            for i in 0..half {
                // f32 throughout, as the reference computes `position * inv_freq` then cos/sin.
                let angle = pos as f32 * inv_freq[i];
                cos[i] = angle.cos();
                sin[i] = angle.sin();
            }
            for h in 0..heads {
                let head = &mut x.data[r * x.cols + h * head_dim..r * x.cols + (h + 1) * head_dim];
                for i in 0..half {
                    let (a, b) = match style {
                        RopeStyle::Halves => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x1 * cos[i] + x0 * sin[i];
                }
            }
        }
        ROPE_TABLES.set((cos, sin));
        Ok(())
    }

    fn write_kv(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        slots: &[u32],
    ) -> Result<(), BackendError> {
        super::check_write_kv(&kv.layout, layer, (k.rows, k.cols), (v.rows, v.cols), slots)?;
        let width = kv.layout.num_kv_heads * kv.layout.head_dim;
        for (r, &slot) in slots.iter().enumerate() {
            let slot = slot as usize;
            kv.k[layer][slot * width..(slot + 1) * width].copy_from_slice(k.row(r));
            kv.v[layer][slot * width..(slot + 1) * width].copy_from_slice(v.row(r));
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        kv: &CpuKv,
        layer: usize,
        step: &StepLayout<'_>,
        heads: Heads,
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        let Heads {
            num_heads,
            num_kv_heads,
            head_dim,
        } = heads;
        let width = num_kv_heads * head_dim;
        // Which sequence each query row belongs to; the slices tile the rows exactly (the GEMM
        // path writes whole row ranges through raw pointers).
        // Taken out of the thread-local (not borrowed across the parallel loops below).
        let mut owner = OWNERS.take();
        super::attention_owners(
            (q.rows, q.cols),
            (out.rows, out.cols),
            &kv.layout,
            layer,
            step,
            heads,
            &mut owner,
        )?;
        let group = num_heads / num_kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (keys, values) = (&kv.k[layer], &kv.v[layer]);
        let bs = step.block_size;
        let level = self.level;
        // Long prefill chunks go through GEMMs (all their queries against the gathered keys at
        // once); decode tokens and short chunks take the per-row path below.
        let is_long = |s: usize| step.seqs[s].num_tokens >= ATTENTION_GEMM_MIN_TOKENS;
        if (0..step.seqs.len()).any(is_long) {
            let long: Vec<usize> = (0..step.seqs.len()).filter(|&s| is_long(s)).collect();
            self.attention_gemm(q, keys, values, step, &long, heads, width, out);
        }
        // One task per (query row, head): each writes its own head_dim slice of `out`.
        out.data
            .par_chunks_mut(head_dim)
            .enumerate()
            .for_each(|(index, o)| {
                let (t, h) = (index / num_heads, index % num_heads);
                if is_long(owner[t]) {
                    return;
                }
                let seq = &step.seqs[owner[t]];
                let visible = step.positions[t] as usize + 1;
                let slot = |p: usize| seq.block_table[p / bs] as usize * bs + p % bs;
                let kv_head = h / group;
                let query = &q.data[t * q.cols + h * head_dim..t * q.cols + (h + 1) * head_dim];
                SCORES.with_borrow_mut(|scores| {
                    scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for p in 0..visible {
                        let base = slot(p) * width + kv_head * head_dim;
                        let s = simd::dot_f32(level, query, &keys[base..base + head_dim]) * scale;
                        max = max.max(s);
                        scores.push(s);
                    }
                    let mut total = 0.0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    o.fill(0.0);
                    for (p, s) in scores.iter().enumerate() {
                        let base = slot(p) * width + kv_head * head_dim;
                        let weight = s / total;
                        for (o, v) in o.iter_mut().zip(&values[base..base + head_dim]) {
                            *o += weight * v;
                        }
                    }
                });
            });
        OWNERS.set(owner);
        Ok(())
    }

    fn silu_mul(&self, gate: &mut CpuTensor, up: &CpuTensor) -> Result<(), BackendError> {
        super::check_same_shape("silu_mul", (gate.rows, gate.cols), (up.rows, up.cols))?;
        for (g, u) in gate.data.iter_mut().zip(&up.data) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        Ok(())
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<(), BackendError> {
        super::check_same_shape("add", (x.rows, x.cols), (y.rows, y.cols))?;
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn gather_rows(
        &self,
        x: &CpuTensor,
        rows: &[usize],
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        super::check_gather((x.rows, x.cols), rows, (out.rows, out.cols))?;
        for (i, &r) in rows.iter().enumerate() {
            out.data[i * x.cols..(i + 1) * x.cols].copy_from_slice(x.row(r));
        }
        Ok(())
    }

    fn read(&self, x: &CpuTensor) -> Result<Vec<f32>, BackendError> {
        Ok(x.data.clone())
    }

    fn write(&self, t: &mut CpuTensor, data: &[f32]) -> Result<(), BackendError> {
        super::check_write(data.len(), (t.rows, t.cols))?;
        t.data.copy_from_slice(data);
        Ok(())
    }

    fn alloc_host_kv(
        &self,
        layout: &KvLayout,
        host_blocks: usize,
    ) -> Result<CpuHostKv, BackendError> {
        let block_floats = layout.block_size * layout.num_kv_heads * layout.head_dim;
        let len = host_blocks
            .checked_mul(layout.num_layers * 2 * block_floats)
            .ok_or_else(|| shape_error("alloc_host_kv", format!("{host_blocks} blocks")))?;
        Ok(CpuHostKv {
            layout: *layout,
            host_blocks,
            data: try_zeroed(len, "the KV swap space")?,
        })
    }

    fn swap_out(
        &self,
        kv: &CpuKv,
        host: &mut CpuHostKv,
        pairs: &[(u32, u32)],
    ) -> Result<CopyTicket, BackendError> {
        check_swap(&kv.layout, host, pairs, "swap_out")?;
        let bf = host.block_floats();
        for &(device, parked) in pairs {
            for (layer, (k, v)) in kv.k.iter().zip(&kv.v).enumerate() {
                let src = device as usize * bf..(device as usize + 1) * bf;
                let (hk, hv) = host.block_mut(parked as usize, layer);
                hk.copy_from_slice(&k[src.clone()]);
                hv.copy_from_slice(&v[src]);
            }
        }
        Ok(CopyTicket(0))
    }

    fn swap_in(
        &self,
        host: &CpuHostKv,
        kv: &mut CpuKv,
        pairs: &[(u32, u32)],
    ) -> Result<CopyTicket, BackendError> {
        let flipped: Vec<(u32, u32)> = pairs.iter().map(|&(h, d)| (d, h)).collect();
        check_swap(&kv.layout, host, &flipped, "swap_in")?;
        let bf = host.block_floats();
        for &(parked, device) in pairs {
            for (layer, (k, v)) in kv.k.iter_mut().zip(kv.v.iter_mut()).enumerate() {
                let dst = device as usize * bf..(device as usize + 1) * bf;
                let (hk, hv) = host.block(parked as usize, layer);
                k[dst.clone()].copy_from_slice(hk);
                v[dst].copy_from_slice(hv);
            }
        }
        Ok(CopyTicket(0))
    }

    fn host_block<'h>(&self, host: &'h CpuHostKv, block: u32) -> Result<&'h [u8], BackendError> {
        let range = host.block_range(block, "host_block")?;
        Ok(bytemuck::cast_slice(&host.data[range]))
    }

    fn host_block_mut<'h>(
        &self,
        host: &'h mut CpuHostKv,
        block: u32,
    ) -> Result<&'h mut [u8], BackendError> {
        let range = host.block_range(block, "host_block_mut")?;
        Ok(bytemuck::cast_slice_mut(&mut host.data[range]))
    }

    fn copy_finished(&self, _ticket: CopyTicket) -> Result<bool, BackendError> {
        // CPU copies complete before swap_out/swap_in return.
        Ok(true)
    }

    fn wait_copies(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The CPU backend's swap tier: `[host_block][layer][k, v][block_size * kv_heads * head_dim]`,
/// the layout the CUDA backend's page-locked pool uses, so a block moves as one piece.
#[derive(Debug)]
pub struct CpuHostKv {
    layout: KvLayout,
    host_blocks: usize,
    data: Vec<f32>,
}

impl CpuHostKv {
    fn block_floats(&self) -> usize {
        self.layout.block_size * self.layout.num_kv_heads * self.layout.head_dim
    }

    fn offset(&self, block: usize, layer: usize) -> usize {
        ((block * self.layout.num_layers + layer) * 2) * self.block_floats()
    }

    /// Every layer's floats of host block `block`.
    fn block_range(
        &self,
        block: u32,
        op: &'static str,
    ) -> Result<std::ops::Range<usize>, BackendError> {
        let block = block as usize;
        if block >= self.host_blocks {
            return Err(shape_error(
                op,
                format!("host block {block} of {}", self.host_blocks),
            ));
        }
        Ok(self.offset(block, 0)..self.offset(block + 1, 0))
    }

    fn block(&self, block: usize, layer: usize) -> (&[f32], &[f32]) {
        let (bf, at) = (self.block_floats(), self.offset(block, layer));
        self.data[at..at + 2 * bf].split_at(bf)
    }

    fn block_mut(&mut self, block: usize, layer: usize) -> (&mut [f32], &mut [f32]) {
        let (bf, at) = (self.block_floats(), self.offset(block, layer));
        self.data[at..at + 2 * bf].split_at_mut(bf)
    }
}

fn check_swap(
    layout: &KvLayout,
    host: &CpuHostKv,
    pairs: &[(u32, u32)],
    op: &'static str,
) -> Result<(), BackendError> {
    if *layout != host.layout {
        return Err(shape_error(
            op,
            "the swap space was made for another cache layout".into(),
        ));
    }
    super::check_swap_pairs(layout, host.host_blocks, pairs, op)
}

#[cfg(test)]
mod tests {
    use rand::{Rng as _, SeedableRng as _};

    use super::*;
    use crate::backend::SeqSlice;

    /// Causal attention in f64 straight from the definition, over contiguous keys and values.
    fn reference(q: &[f32], k: &[f32], v: &[f32], positions: &[u32], heads: Heads) -> Vec<f64> {
        let Heads {
            num_heads,
            num_kv_heads,
            head_dim,
        } = heads;
        let width = num_kv_heads * head_dim;
        let mut out = vec![0.0f64; positions.len() * num_heads * head_dim];
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..num_heads {
                let kvh = h / (num_heads / num_kv_heads);
                let qv = &q[(t * num_heads + h) * head_dim..(t * num_heads + h + 1) * head_dim];
                let scores: Vec<f64> = (0..=pos as usize)
                    .map(|p| {
                        let kv = &k[p * width + kvh * head_dim..p * width + (kvh + 1) * head_dim];
                        qv.iter()
                            .zip(kv)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                            / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (p, s) in scores.iter().enumerate() {
                    let w = (s - max).exp() / total;
                    for d in 0..head_dim {
                        out[(t * num_heads + h) * head_dim + d] +=
                            w * f64::from(v[p * width + kvh * head_dim + d]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_paths_match_the_definition_through_scattered_blocks() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let heads = Heads {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 10,
        };
        let width = heads.num_kv_heads * heads.head_dim;
        let bs = 4;
        // Lengths on both sides of the GEMM threshold, chunks starting mid-sequence.
        for (cached, new) in [(0usize, 37usize), (5, 1), (9, 20), (0, 3)] {
            let ctx = cached + new;
            let layout = KvLayout {
                num_layers: 1,
                num_blocks: 32,
                block_size: bs,
                num_kv_heads: 2,
                head_dim: 10,
            };
            let backend = CpuBackend::default();
            let mut kv = backend.alloc_kv(&layout).unwrap();
            // Blocks deliberately out of order.
            let table: Vec<u32> = (0..ctx.div_ceil(bs) as u32).map(|b| 31 - 2 * b).collect();
            let k: Vec<f32> = (0..ctx * width)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let v: Vec<f32> = (0..ctx * width)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let slots: Vec<u32> = (0..ctx)
                .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                .collect();
            let kt = CpuTensor {
                rows: ctx,
                cols: width,
                data: k.clone(),
            };
            let vt = CpuTensor {
                rows: ctx,
                cols: width,
                data: v.clone(),
            };
            backend.write_kv(&mut kv, 0, &kt, &vt, &slots).unwrap();
            let q: Vec<f32> = (0..new * heads.num_heads * heads.head_dim)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let positions: Vec<u32> = (cached as u32..ctx as u32).collect();
            let seqs = [SeqSlice {
                first_token: 0,
                num_tokens: new,
                context_len: ctx,
                block_table: &table,
            }];
            let step = StepLayout {
                positions: &positions,
                slots: &slots[cached..],
                seqs: &seqs,
                block_size: bs,
            };
            let qt = CpuTensor {
                rows: new,
                cols: heads.num_heads * heads.head_dim,
                data: q.clone(),
            };
            let mut out = backend.alloc(new, qt.cols).unwrap();
            out.data.fill(f32::NAN);
            backend
                .attention(&qt, &kv, 0, &step, heads, &mut out)
                .unwrap();
            let want = reference(&q, &k, &v, &positions, heads);
            for (i, (g, w)) in out.data.iter().zip(&want).enumerate() {
                assert!(
                    g.is_finite() && (f64::from(*g) - w).abs() < 1e-5,
                    "cached {cached} new {new} element {i}: {g} vs {w}"
                );
            }
        }
    }
}
