//! The op interface every compute backend implements: exactly the operations the decoder's
//! forward pass needs, on backend-owned activations, weights and KV memory.
//!
//! The model code (`engine`) is written once against [`Backend`]; the CPU backend is the
//! reference and the default, and a CUDA backend implements the same trait. Host-side step
//! metadata (positions, KV slots, block tables) is passed as plain slices in [`StepLayout`];
//! a device backend copies it over once per step. Activations are f32 whatever the weights.

pub mod cpu;
pub mod cuda;

use crate::model::{RopeStyle, WeightTensor};

/// A backend failure, per request where possible (out of memory is not fatal to the daemon).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("out of {memory} memory allocating {bytes} bytes for {what}")]
    OutOfMemory {
        memory: &'static str,
        what: String,
        bytes: usize,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// The device or its driver failed an operation.
    #[error("{device} failed in {op}: {detail}")]
    Device {
        device: String,
        op: &'static str,
        detail: String,
    },
}

/// Shape of the paged KV cache a backend allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One sequence's share of a step: a run of consecutive flattened tokens.
#[derive(Debug, Clone, Copy)]
pub struct SeqSlice<'a> {
    /// Index of its first token in the step's flattened tokens.
    pub first_token: usize,
    pub num_tokens: usize,
    /// Tokens in its context once this step's tokens are written (the last token's position + 1).
    pub context_len: usize,
    /// Its KV blocks, in order; covers `context_len` tokens.
    pub block_table: &'a [u32],
}

/// Host-side description of one step: which tokens, where they sit, where their K/V go.
#[derive(Debug, Clone, Copy)]
pub struct StepLayout<'a> {
    /// Position of each flattened token in its sequence.
    pub positions: &'a [u32],
    /// KV pool slot of each flattened token (`block * block_size + offset`).
    pub slots: &'a [u32],
    pub seqs: &'a [SeqSlice<'a>],
    pub block_size: usize,
}

/// Attention head geometry.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The operations of a Llama-family forward pass.
pub trait Backend: Send + Sync + 'static {
    /// Activations: a row-major f32 matrix.
    type Tensor: Send;
    /// A weight as the backend keeps it (mapped, uploaded, or converted).
    type Weight: Send + Sync;
    /// The KV cache of every layer.
    type Kv: Send;
    /// The swap tier of a KV cache: page-locked host memory on a GPU.
    type HostKv: Send;

    /// A short name for logs and metrics: `cpu`, `cuda:0`.
    fn name(&self) -> String;
    /// Runs one step's ops (`f`) where they are cheapest to issue. The CPU backend runs it on
    /// a worker of its thread pool, so each op's parallel loop forks and joins among workers
    /// instead of waking the calling thread every time.
    fn run_step<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }
    fn upload(&self, weight: &WeightTensor) -> Result<Self::Weight, BackendError>;
    fn alloc(&self, rows: usize, cols: usize) -> Result<Self::Tensor, BackendError>;
    /// Makes `t` a `rows`×`cols` tensor, reusing its memory when it is large enough (the
    /// decode loop reshapes the same buffers every step instead of allocating); contents are
    /// unspecified afterwards.
    fn reshape(&self, t: &mut Self::Tensor, rows: usize, cols: usize) -> Result<(), BackendError>;
    fn alloc_kv(&self, layout: &KvLayout) -> Result<Self::Kv, BackendError>;

    /// `out[r] = table[tokens[r]]`.
    fn embed(
        &self,
        table: &Self::Weight,
        tokens: &[u32],
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// `out[r] = x[r] / rms(x[r]) * weight`.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// `out[r][j] = dot(weight[j], x[r])`: a linear layer, weights `[out, in]`.
    fn matmul(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// `x[r] += bias`.
    fn add_bias(&self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<(), BackendError>;
    /// Rotates each head of each row by its token's position.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        head_dim: usize,
        inv_freq: &[f32],
        style: RopeStyle,
        positions: &[u32],
    ) -> Result<(), BackendError>;
    /// Stores each row's keys and values at its slot in `layer`'s cache.
    fn write_kv(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        slots: &[u32],
    ) -> Result<(), BackendError>;
    /// Causal attention of each query row over its sequence's cached keys and values, read
    /// through the block table; `out` has one row per query, `num_heads * head_dim` wide.
    fn attention(
        &self,
        q: &Self::Tensor,
        kv: &Self::Kv,
        layer: usize,
        step: &StepLayout<'_>,
        heads: Heads,
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut Self::Tensor, up: &Self::Tensor) -> Result<(), BackendError>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<(), BackendError>;
    /// `out[i] = x[rows[i]]`.
    fn gather_rows(
        &self,
        x: &Self::Tensor,
        rows: &[usize],
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// Copies a tensor to host memory, row-major.
    fn read(&self, x: &Self::Tensor) -> Result<Vec<f32>, BackendError>;
    /// Copies host values (row-major, exactly the tensor's size) into a tensor.
    fn write(&self, t: &mut Self::Tensor, data: &[f32]) -> Result<(), BackendError>;

    /// Allocates the swap tier for `layout`'s cache: `host_blocks` blocks, each holding one KV
    /// block of every layer (keys and values), so a swapped sequence's blocks are contiguous.
    fn alloc_host_kv(
        &self,
        layout: &KvLayout,
        host_blocks: usize,
    ) -> Result<Self::HostKv, BackendError>;
    /// Copies KV block `pair.0` of every layer to host block `pair.1`, for each pair. The copy
    /// is asynchronous: it sees everything computed before the call, and the device blocks
    /// must not be overwritten before [`Backend::copy_finished`] says the ticket is done.
    fn swap_out(
        &self,
        kv: &Self::Kv,
        host: &mut Self::HostKv,
        pairs: &[(u32, u32)],
    ) -> Result<CopyTicket, BackendError>;
    /// Copies host block `pair.0` back to KV block `pair.1` of every layer, for each pair.
    /// Asynchronous too; any later compute on `kv` waits for it, the host does not.
    fn swap_in(
        &self,
        host: &Self::HostKv,
        kv: &mut Self::Kv,
        pairs: &[(u32, u32)],
    ) -> Result<CopyTicket, BackendError>;
    /// The bytes of host block `block` (every layer's keys and values, as [`Backend::swap_out`]
    /// lays them out), for the disk tier. Only meaningful once the copies touching the block
    /// have finished ([`Backend::wait_copies`]).
    fn host_block<'h>(&self, host: &'h Self::HostKv, block: u32) -> Result<&'h [u8], BackendError>;
    /// The same bytes, to fill before a [`Backend::swap_in`] reads them.
    fn host_block_mut<'h>(
        &self,
        host: &'h mut Self::HostKv,
        block: u32,
    ) -> Result<&'h mut [u8], BackendError>;
    /// Whether a swap has completed, without waiting.
    fn copy_finished(&self, ticket: CopyTicket) -> Result<bool, BackendError>;
    /// Waits for every swap issued so far.
    fn wait_copies(&self) -> Result<(), BackendError>;
}

/// Identifies one batch of swap copies; tickets of one backend increase monotonically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CopyTicket(pub u64);

/// Checks `(device block, host block)` pairs against both pools before any copy starts.
pub(crate) fn check_swap_pairs(
    layout: &KvLayout,
    host_blocks: usize,
    pairs: &[(u32, u32)],
    op: &'static str,
) -> Result<(), BackendError> {
    for &(device, parked) in pairs {
        if device as usize >= layout.num_blocks || parked as usize >= host_blocks {
            return Err(BackendError::Shape {
                op,
                detail: format!(
                    "block pair ({device}, {parked}) outside {} device and {host_blocks} host blocks",
                    layout.num_blocks
                ),
            });
        }
    }
    Ok(())
}

/// Checks that a weight's bytes match its shape exactly (kernels read `rows * row_bytes`
/// bytes through raw pointers, whoever built the tensor); returns (rows, cols).
pub(crate) fn check_upload(weight: &WeightTensor) -> Result<(usize, usize), BackendError> {
    let (rows, cols) = weight.rows_cols();
    if !cols.is_multiple_of(weight.dtype.block_elems())
        || weight.bytes().len() != rows * weight.row_bytes()
    {
        return Err(BackendError::Shape {
            op: "upload",
            detail: format!(
                "tensor {:?} has shape {:?} but {} bytes of {}",
                weight.name,
                weight.shape,
                weight.bytes().len(),
                weight.dtype
            ),
        });
    }
    Ok((rows, cols))
}

// Shape checks every backend runs before an op touches memory, so both refuse the same
// inputs with the same words. Shapes are (rows, cols).

fn shape(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

/// `embed`: one output row per token, each token inside the table.
pub(crate) fn check_embed(
    tokens: &[u32],
    table: (usize, usize),
    out: (usize, usize),
) -> Result<(), BackendError> {
    if out != (tokens.len(), table.1) {
        return Err(shape(
            "embed",
            format!("{} tokens into {}x{}", tokens.len(), out.0, out.1),
        ));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.0) {
        return Err(shape(
            "embed",
            format!("token {t} outside a vocabulary of {}", table.0),
        ));
    }
    Ok(())
}

/// `rms_norm` and `add_bias`: a vector weight as wide as `x` (and `out`, when there is one,
/// shaped as `x`).
pub(crate) fn check_row_vector(
    op: &'static str,
    vector: (usize, usize),
    x: (usize, usize),
    out: Option<(usize, usize)>,
) -> Result<(), BackendError> {
    if vector.0 != 1 || vector.1 != x.1 || out.is_some_and(|o| o != x) {
        return Err(shape(
            op,
            format!("{}x{} with a {}x{} weight", x.0, x.1, vector.0, vector.1),
        ));
    }
    Ok(())
}

/// `matmul`: `x` (n × in) times a weight (out × in) into n × out.
pub(crate) fn check_matmul(
    x: (usize, usize),
    weight: (usize, usize),
    out: (usize, usize),
) -> Result<(), BackendError> {
    if x.1 != weight.1 || out != (x.0, weight.0) {
        return Err(shape(
            "matmul",
            format!(
                "{}x{} by weight {}x{} into {}x{}",
                x.0, x.1, weight.0, weight.1, out.0, out.1
            ),
        ));
    }
    Ok(())
}

/// `rope`: `x` is `heads` heads of `head_dim` per row, one position per row, one frequency
/// per pair.
pub(crate) fn check_rope(
    x: (usize, usize),
    heads: usize,
    head_dim: usize,
    inv_freq: usize,
    positions: usize,
) -> Result<(), BackendError> {
    if x.1 != heads * head_dim || positions != x.0 || inv_freq != head_dim / 2 {
        return Err(shape(
            "rope",
            format!("{}x{} for {heads} heads of {head_dim}", x.0, x.1),
        ));
    }
    Ok(())
}

/// `silu_mul` and `add`: operands of one shape.
pub(crate) fn check_same_shape(
    op: &'static str,
    x: (usize, usize),
    y: (usize, usize),
) -> Result<(), BackendError> {
    if x != y {
        return Err(shape(op, format!("{}x{} and {}x{}", x.0, x.1, y.0, y.1)));
    }
    Ok(())
}

/// `gather_rows`: one output row per index, each inside `x`.
pub(crate) fn check_gather(
    x: (usize, usize),
    rows: &[usize],
    out: (usize, usize),
) -> Result<(), BackendError> {
    if out != (rows.len(), x.1) || rows.iter().any(|&r| r >= x.0) {
        return Err(shape(
            "gather_rows",
            format!("{} rows of {}", rows.len(), x.0),
        ));
    }
    Ok(())
}

/// `write`: exactly the tensor's size.
pub(crate) fn check_write(values: usize, t: (usize, usize)) -> Result<(), BackendError> {
    if values != t.0 * t.1 {
        return Err(shape(
            "write",
            format!("{values} values into {}x{}", t.0, t.1),
        ));
    }
    Ok(())
}

/// Checks a `write_kv` call (keys and values as rows × cols) against the cache layout, before
/// any backend touches memory.
pub(crate) fn check_write_kv(
    layout: &KvLayout,
    layer: usize,
    k: (usize, usize),
    v: (usize, usize),
    slots: &[u32],
) -> Result<(), BackendError> {
    let width = layout.num_kv_heads * layout.head_dim;
    let capacity = layout.num_blocks * layout.block_size;
    let shape = |detail| BackendError::Shape {
        op: "write_kv",
        detail,
    };
    if k != (slots.len(), width) || v != (slots.len(), width) {
        return Err(shape(format!(
            "{}x{} keys and {}x{} values for {} slots of width {width}",
            k.0,
            k.1,
            v.0,
            v.1,
            slots.len()
        )));
    }
    if layer >= layout.num_layers {
        return Err(shape(format!("layer {layer} of {}", layout.num_layers)));
    }
    if let Some(&slot) = slots.iter().find(|&&s| s as usize >= capacity) {
        return Err(shape(format!("slot {slot} beyond {capacity}")));
    }
    Ok(())
}

/// Checks an `attention` call (queries and output as rows × cols) against the cache layout
/// and writes each query row's sequence into `owner` (reused, so decoding allocates nothing):
/// the sequences must tile the rows exactly, their block tables must lie in the cache and
/// cover their context, and every row's position must lie inside its sequence's context.
pub(crate) fn attention_owners(
    q: (usize, usize),
    out: (usize, usize),
    layout: &KvLayout,
    layer: usize,
    step: &StepLayout<'_>,
    heads: Heads,
    owner: &mut Vec<usize>,
) -> Result<(), BackendError> {
    let shape = |detail| BackendError::Shape {
        op: "attention",
        detail,
    };
    let Heads {
        num_heads,
        num_kv_heads,
        head_dim,
    } = heads;
    if q.1 != num_heads * head_dim
        || out != q
        || num_kv_heads != layout.num_kv_heads
        || head_dim != layout.head_dim
        || num_kv_heads == 0
        || !num_heads.is_multiple_of(num_kv_heads)
    {
        return Err(shape(format!(
            "{}x{} queries into {}x{} for {heads:?} over {layout:?}",
            q.0, q.1, out.0, out.1
        )));
    }
    if layer >= layout.num_layers || step.block_size != layout.block_size {
        return Err(shape(format!(
            "layer {layer} with blocks of {} over {layout:?}",
            step.block_size
        )));
    }
    if step.positions.len() != q.0 {
        return Err(shape(format!(
            "{} positions for {} query rows",
            step.positions.len(),
            q.0
        )));
    }
    let bs = layout.block_size;
    owner.clear();
    owner.resize(q.0, usize::MAX);
    for (s, seq) in step.seqs.iter().enumerate() {
        let Some(end) = seq
            .first_token
            .checked_add(seq.num_tokens)
            .filter(|&e| e <= q.0)
        else {
            return Err(shape(format!(
                "sequence {s} covers rows beyond the {} queries",
                q.0
            )));
        };
        if seq
            .block_table
            .iter()
            .any(|&b| b as usize >= layout.num_blocks)
            || seq.context_len > seq.block_table.len() * bs
        {
            return Err(shape(format!(
                "sequence {s}'s block table does not fit the cache"
            )));
        }
        for o in &mut owner[seq.first_token..end] {
            if *o != usize::MAX {
                return Err(shape(format!("sequence {s} overlaps another's rows")));
            }
            *o = s;
        }
    }
    for (t, &s) in owner.iter().enumerate() {
        let seq = step
            .seqs
            .get(s)
            .ok_or_else(|| shape(format!("query row {t} belongs to no sequence")))?;
        let visible = step.positions[t] as usize + 1;
        if visible > seq.context_len {
            return Err(shape(format!(
                "position {} beyond the sequence's {} cached tokens",
                visible - 1,
                seq.context_len
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: KvLayout = KvLayout {
        num_layers: 2,
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 8,
    };
    const HEADS: Heads = Heads {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
    };

    fn owners(
        positions: &[u32],
        seqs: &[SeqSlice<'_>],
        layer: usize,
    ) -> Result<Vec<usize>, BackendError> {
        let step = StepLayout {
            positions,
            slots: positions,
            seqs,
            block_size: 16,
        };
        let rows = positions.len();
        let mut owner = Vec::new();
        attention_owners(
            (rows, 32),
            (rows, 32),
            &LAYOUT,
            layer,
            &step,
            HEADS,
            &mut owner,
        )
        .map(|()| owner)
    }

    #[test]
    fn attention_layouts_are_checked_before_any_backend_reads_memory() {
        let table = [2u32, 0];
        let seq = |first_token, num_tokens, context_len| SeqSlice {
            first_token,
            num_tokens,
            context_len,
            block_table: &table,
        };
        // Two sequences tiling three rows.
        assert_eq!(
            owners(&[20, 3, 4], &[seq(0, 1, 21), seq(1, 2, 5)], 1).unwrap(),
            [0, 1, 1]
        );
        let refused = |positions: &[u32], seqs: &[SeqSlice<'_>], layer| {
            owners(positions, seqs, layer).unwrap_err().to_string()
        };
        assert!(refused(&[0], &[seq(0, 1, 1)], 2).contains("layer 2"));
        assert!(refused(&[0, 1], &[seq(0, 2, 2), seq(1, 1, 2)], 0).contains("overlaps"));
        assert!(refused(&[0, 1], &[seq(0, 1, 2)], 0).contains("belongs to no sequence"));
        assert!(refused(&[5], &[seq(0, 1, 5)], 0).contains("beyond"));
        assert!(refused(&[0], &[seq(0, 1, 40)], 0).contains("block table"));
        let far = [9u32];
        let outside = SeqSlice {
            first_token: 0,
            num_tokens: 1,
            context_len: 1,
            block_table: &far,
        };
        assert!(refused(&[0], &[outside], 0).contains("block table"));
    }

    #[test]
    fn op_shapes_are_checked_the_same_for_every_backend() {
        let refused = |r: Result<(), BackendError>| r.unwrap_err().to_string();
        assert!(check_embed(&[0, 9], (10, 4), (2, 4)).is_ok());
        assert!(refused(check_embed(&[10], (10, 4), (1, 4))).contains("token 10 outside"));
        assert!(refused(check_embed(&[0], (10, 4), (2, 4))).contains("1 tokens into 2x4"));
        assert!(check_row_vector("rms_norm", (1, 8), (3, 8), Some((3, 8))).is_ok());
        assert!(check_row_vector("add_bias", (1, 8), (3, 8), None).is_ok());
        for (vector, out) in [((2, 8), None), ((1, 7), None), ((1, 8), Some((2, 8)))] {
            let err = refused(check_row_vector("rms_norm", vector, (3, 8), out));
            assert!(err.contains("rms_norm"), "{err}");
        }
        assert!(check_matmul((3, 8), (5, 8), (3, 5)).is_ok());
        assert!(check_matmul((3, 8), (5, 7), (3, 5)).is_err());
        assert!(check_matmul((3, 8), (5, 8), (5, 3)).is_err());
        assert!(check_rope((2, 16), 2, 8, 4, 2).is_ok());
        assert!(check_rope((2, 16), 2, 8, 3, 2).is_err());
        assert!(check_rope((2, 16), 2, 8, 4, 1).is_err());
        assert!(check_same_shape("add", (2, 3), (2, 3)).is_ok());
        assert!(check_same_shape("add", (2, 3), (3, 2)).is_err());
        assert!(check_gather((4, 3), &[3, 0], (2, 3)).is_ok());
        assert!(check_gather((4, 3), &[4], (1, 3)).is_err());
        assert!(check_write(6, (2, 3)).is_ok());
        assert!(refused(check_write(5, (2, 3))).contains("5 values into 2x3"));
    }

    #[test]
    fn kv_writes_are_checked_against_the_cache() {
        assert!(check_write_kv(&LAYOUT, 1, (2, 16), (2, 16), &[0, 63]).is_ok());
        for (layer, k, slots, needle) in [
            (2, (1, 16), &[0u32][..], "layer 2"),
            (0, (1, 15), &[0][..], "width 16"),
            (0, (1, 16), &[64][..], "slot 64"),
        ] {
            let err = check_write_kv(&LAYOUT, layer, k, k, slots)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
