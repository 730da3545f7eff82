//! The CUDA backend: the op interface on one NVIDIA GPU through cudarc, with our own kernels
//! (`cuda-kernels/`, compiled by NVRTC at run time) and cuBLAS for the GEMMs.
//!
//! Two streams per backend: compute (every op, in order) and copy (swap traffic), ordered
//! against each other with events only where they share memory, so swaps overlap compute.
//! Event tracking in cudarc is off: this module orders its streams itself. Every allocation
//! goes through one [`memory::Ledger`]. Step metadata (tokens, positions, slots, block tables)
//! is staged in page-locked memory and copied asynchronously, and an upload whose contents
//! equal the previous one of its kind is skipped, so a step uploads each kind once.
//!
//! Without a driver, GPU or NVRTC, [`CudaBackend::new`] returns a clear error; nothing panics.

pub mod kernels;
pub mod memory;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::PushKernelArg as _;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig};

use self::kernels::Kernels;
use self::memory::{DeviceBuffer, Ledger, PinnedBuffer, Use};
use super::{check_swap_pairs, Backend, BackendError, CopyTicket, Heads, KvLayout, StepLayout};
use crate::model::{DType, RopeStyle, WeightTensor};

/// Activation rows up to which a non-f32 weight is multiplied by the dequantizing
/// matrix-vector kernel (one pass over the weight); above it, the weight is dequantized to f32
/// and multiplied by cuBLAS. Matches `MAX_BATCH` in quant.cu.
const MATVEC_MAX_ROWS: usize = 8;
/// Threads per block of the paged-attention kernels; the general one keeps
/// `head_dim / ATTENTION_THREADS` (at most 4) output dimensions per thread.
const ATTENTION_THREADS: u32 = 128;
const MAX_HEAD_DIM: usize = 4 * ATTENTION_THREADS as usize;
/// The split-context kernels' segment length (SEG in attention.cu) and the largest group
/// and head_dim they are instantiated for; other shapes take the general kernel.
const SPLIT_SEGMENT: usize = 256;
const SPLIT_MAX_GROUP: usize = 8;
const SPLIT_MAX_HEAD_DIM: usize = 256;

/// Which instantiation of the split-context kernel fits a shape (index into
/// `Kernels::paged_attention_partial`).
fn split_variant(group: usize, head_dim: usize) -> Option<usize> {
    let g = match group {
        1..=4 => 0,
        5..=SPLIT_MAX_GROUP => 3,
        _ => return None,
    };
    let c = match head_dim {
        1..=64 => 0,
        65..=128 => 1,
        129..=SPLIT_MAX_HEAD_DIM => 2,
        _ => return None,
    };
    Some(g + c)
}
/// Bound on the f32 tile a non-f32 weight is dequantized into for cuBLAS.
const DEQUANT_TILE_BYTES: usize = 64 << 20;
/// Bound on the device staging of one swap chunk.
const SWAP_STAGING_BYTES: usize = 256 << 20;
/// cuBLAS workspace, booked in the ledger.
const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Host blocks moved per swap chunk (bounds the device staging buffer).
const SWAP_CHUNK_BLOCKS: usize = 256;
/// Initial page-locked staging for step metadata, per stream.
const STAGING_BYTES: usize = 1 << 20;

/// How to set a CUDA backend up.
#[derive(Debug, Clone, Default)]
pub struct CudaOptions {
    /// Where compiled kernels are cached (None: compile every time).
    pub kernel_cache: Option<PathBuf>,
    /// Device bytes this backend may hold (None: what the GPU has).
    pub memory_budget: Option<u64>,
}

/// A GPU opened once per process: its primary context and loaded kernels, shared by every
/// backend (model) on it.
#[derive(Debug)]
pub struct DeviceRuntime {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    name: String,
    arch: String,
    /// Device memory in use right after the context was created: the context itself, plus
    /// whatever other processes held at that moment.
    context_bytes: u64,
    /// Whether a backend's ledger has booked `context_bytes` (only the first does).
    context_booked: std::sync::atomic::AtomicBool,
}

impl DeviceRuntime {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The NVRTC target, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }
}

fn driver_error(device: &str, op: &'static str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Device {
        device: device.to_owned(),
        op,
        detail: format!("{e:?}"),
    }
}

/// Opens GPU `ordinal` (once per process), loading the kernels lazily on first use.
pub fn open_device(
    ordinal: usize,
    kernel_cache: Option<&std::path::Path>,
) -> Result<Arc<DeviceRuntime>, BackendError> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<DeviceRuntime>>>> = OnceLock::new();
    let label = format!("cuda:{ordinal}");
    let unavailable = |why: String| BackendError::Unsupported(format!("{label}: {why}"));
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(device) = devices.get(&ordinal) {
        return Ok(Arc::clone(device));
    }
    // cudarc panics inside CudaContext::new when libcuda is missing: ask first.
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err(unavailable(
            "the NVIDIA driver library (libcuda.so) is not installed".into(),
        ));
    }
    cudarc::driver::result::init()
        .map_err(|e| unavailable(format!("the CUDA driver did not initialise: {e:?}")))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| unavailable(format!("cannot count devices: {e:?}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(unavailable(match count {
            0 => "the driver reports no GPU".into(),
            n => format!(
                "no such GPU: the driver reports {n} (cuda:0 to cuda:{})",
                n - 1
            ),
        }));
    }
    // SAFETY: as above, only dlopen.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(unavailable(
            "cuBLAS (libcublas.so) is not installed; install the CUDA cuBLAS library".into(),
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| driver_error(&label, "context", e))?;
    // SAFETY: called before this context allocates anything; this backend orders its
    // streams with its own events.
    unsafe { ctx.disable_event_tracking() };
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver_error(&label, "compute capability", e))?;
    let arch = format!("sm_{major}{minor}");
    let kernels = Kernels::load(&ctx, &arch, kernel_cache)
        .map_err(|e| unavailable(format!("kernels: {e}")))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let context_bytes = ctx
        .mem_get_info()
        .map_or(0, |(free, total)| total.saturating_sub(free) as u64);
    tracing::info!(device = %label, %name, %arch, context_bytes, "CUDA device ready");
    let device = Arc::new(DeviceRuntime {
        ctx,
        kernels,
        name,
        arch,
        context_bytes,
        context_booked: std::sync::atomic::AtomicBool::new(false),
    });
    devices.insert(ordinal, Arc::clone(&device));
    Ok(device)
}

/// Row-major f32 activations in device memory.
#[derive(Debug)]
pub struct CudaTensor {
    buf: DeviceBuffer,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A weight in device memory as stored in the file (quantized blocks stay quantized), plus
/// f32 for vectors (norm weights and biases are read by f32 kernels).
#[derive(Debug)]
pub struct CudaWeight {
    buf: DeviceBuffer,
    dtype: DType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

/// The dtype numbering of dtype.cuh.
fn dtype_code(dtype: DType) -> i32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::Q8_0 => 3,
        DType::Q4_0 => 4,
        DType::Q4_1 => 5,
    }
}

/// Keys and values of every layer in one allocation: `planes = layers * 2` planes (keys,
/// values) of `[num_blocks * block_size][kv_heads][head_dim]` f32.
#[derive(Debug)]
pub struct CudaKv {
    buf: DeviceBuffer,
    layout: KvLayout,
}

impl CudaKv {
    fn block_floats(&self) -> usize {
        self.layout.block_size * self.layout.num_kv_heads * self.layout.head_dim
    }

    fn plane_ptr(&self, plane: usize) -> u64 {
        let plane_bytes = self.layout.num_blocks * self.block_floats() * 4;
        self.buf.ptr() + (plane * plane_bytes) as u64
    }
}

/// Swapped-out KV blocks in page-locked host memory:
/// `[host_block][layer][k, v][block_size * kv_heads * head_dim]`, as the CPU backend.
#[derive(Debug)]
pub struct CudaHostKv {
    buf: PinnedBuffer,
    layout: KvLayout,
    host_blocks: usize,
    /// The stream its copies run on, waited for before the memory is freed.
    copy: Arc<CudaStream>,
}

impl CudaHostKv {
    /// Where host block `block` lies in the buffer: its offset and length in bytes.
    fn block_span(&self, block: u32, op: &'static str) -> Result<(usize, usize), BackendError> {
        let l = &self.layout;
        let len = l.num_layers * 2 * l.block_size * l.num_kv_heads * l.head_dim * 4;
        let block = block as usize;
        if block >= self.host_blocks || (block + 1) * len > self.buf.bytes() {
            return Err(shape(
                op,
                format!("host block {block} of {}", self.host_blocks),
            ));
        }
        Ok((block * len, len))
    }
}

impl Drop for CudaHostKv {
    fn drop(&mut self) {
        if let Err(e) = self.copy.synchronize() {
            tracing::warn!(error = ?e, "waiting for swap copies before freeing the swap space");
        }
    }
}

/// Kinds of step metadata, each with its own device buffer and last-upload cache.
#[derive(Debug, Clone, Copy)]
enum Meta {
    Tokens,
    Positions,
    Slots,
    InvFreq,
    Attention,
    Rows,
}

/// A page-locked bump allocator for uploads on one stream: space is reused only after the
/// stream has been synchronised, so a copy always reads what was staged for it.
#[derive(Debug)]
struct Staging {
    buf: PinnedBuffer,
    used: usize,
}

#[derive(Debug, Default)]
struct CachedUpload {
    host: Vec<u8>,
    device: Option<DeviceBuffer>,
}

/// Mutable per-backend state (the ops take `&self`).
#[derive(Debug)]
struct State {
    staging: Staging,
    uploads: [CachedUpload; 6],
    /// Dequantized weight for cuBLAS when a non-f32 weight meets a large batch.
    dequantized: Option<DeviceBuffer>,
    /// Per-segment results of split-context attention.
    attention_partial: Option<DeviceBuffer>,
    copy_staging: Staging,
    swap_blocks: Option<DeviceBuffer>,
    swap_buffer: Option<DeviceBuffer>,
    next_ticket: u64,
    /// Swap batches not yet known to be finished, oldest first.
    in_flight: VecDeque<(CopyTicket, CudaEvent)>,
    /// Tickets below this are finished.
    finished_below: u64,
    /// The event compute must wait for before touching the cache (last swap-in).
    swap_in_done: Option<CudaEvent>,
}

/// The CUDA backend for one model on one GPU.
pub struct CudaBackend {
    device: Arc<DeviceRuntime>,
    label: String,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    /// cuBLAS on the compute stream; destroyed in Drop (cudarc's wrapper would panic there if
    /// the context had failed, and would keep the stream alive).
    blas: BlasHandle,
    ledger: Arc<Ledger>,
    /// Keeps cuBLAS's workspace alive (and booked).
    _blas_workspace: DeviceBuffer,
    state: Mutex<State>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.label)
            .field("name", &self.device.name)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// A backend on GPU `ordinal`: streams, cuBLAS, and the device's kernels.
    pub fn new(ordinal: usize, options: &CudaOptions) -> Result<Self, BackendError> {
        let device = open_device(ordinal, options.kernel_cache.as_deref())?;
        let label = format!("cuda:{ordinal}");
        let name = label.as_str();
        let err = |op| move |e: cudarc::driver::DriverError| driver_error(name, op, e);
        let blas_err = |op| move |e: cudarc::cublas::result::CublasError| driver_error(name, op, e);
        let compute = device.ctx.new_stream().map_err(err("stream"))?;
        let copy = device.ctx.new_stream().map_err(err("stream"))?;
        let blas = BlasHandle(blas::create_handle().map_err(blas_err("cuBLAS"))?);
        // SAFETY: a live handle and stream of this context.
        unsafe { blas::set_stream(blas.0, compute.cu_stream() as _) }
            .map_err(blas_err("cuBLAS stream"))?;
        let ledger = Ledger::new(label.clone(), options.memory_budget);
        if !device
            .context_booked
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            ledger.book(Use::Context, device.context_bytes);
        }
        let workspace = ledger.alloc(&compute, Use::Workspace, CUBLAS_WORKSPACE)?;
        // SAFETY: the handle is live; the workspace outlives it (both owned by the backend,
        // the workspace dropped after the handle's last use); default math never uses TF32,
        // so f32 GEMMs stay f32.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                blas.0,
                workspace.ptr() as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE,
            )
            .result()
            .map_err(blas_err("cuBLAS workspace"))?;
            blas_sys::cublasSetMathMode(blas.0, blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .map_err(blas_err("cuBLAS math mode"))?;
        }
        let state = State {
            staging: Staging {
                buf: ledger.alloc_pinned(STAGING_BYTES)?,
                used: 0,
            },
            uploads: Default::default(),
            dequantized: None,
            attention_partial: None,
            copy_staging: Staging {
                buf: ledger.alloc_pinned(STAGING_BYTES)?,
                used: 0,
            },
            swap_blocks: None,
            swap_buffer: None,
            next_ticket: 1,
            in_flight: VecDeque::new(),
            finished_below: 1,
            swap_in_done: None,
        };
        Ok(Self {
            device,
            label,
            compute,
            copy,
            blas,
            ledger,
            _blas_workspace: workspace,
            state: Mutex::new(state),
        })
    }

    pub fn device(&self) -> &Arc<DeviceRuntime> {
        &self.device
    }

    /// The ledger of every allocation this backend makes (for the metrics).
    pub fn ledger(&self) -> Arc<Ledger> {
        Arc::clone(&self.ledger)
    }

    /// Sampling helpers on the device: the index of each row's largest logit (lowest index
    /// among equals, NaN never wins), so greedy decoding reads one id per row, not a row.
    pub fn argmax_rows(&self, logits: &CudaTensor) -> Result<Vec<u32>, BackendError> {
        let _state = self.enter()?;
        let out = self.alloc_buffer(Use::Workspace, logits.rows * 4)?;
        self.launch(
            &self.device.kernels.argmax,
            (as_u32(logits.rows, "argmax")?, 1),
            1024,
            &[&logits.ptr(), &as_i32(logits.cols, "argmax")?, &out.ptr()],
        )?;
        let mut ids = vec![0u32; logits.rows];
        self.read_raw(out.ptr(), &mut ids)?;
        Ok(ids)
    }

    /// Each row's `k` best logits in descending order (lower index first among equals) as
    /// (index, logit): the candidates for top-k / top-p sampling. Rows with fewer than `k`
    /// entries that are not NaN are shorter.
    pub fn top_k_rows(
        &self,
        logits: &CudaTensor,
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, BackendError> {
        if k == 0 || k > 1024 {
            return Err(shape("top_k", format!("k = {k} is not within 1..=1024")));
        }
        let _state = self.enter()?;
        let n = logits.rows * k;
        let values = self.alloc_buffer(Use::Workspace, n * 4)?;
        let indices = self.alloc_buffer(Use::Workspace, n * 4)?;
        self.launch(
            &self.device.kernels.top_k,
            (as_u32(logits.rows, "top_k")?, 1),
            1024,
            &[
                &logits.ptr(),
                &as_i32(logits.cols, "top_k")?,
                &as_i32(k, "top_k")?,
                &values.ptr(),
                &indices.ptr(),
            ],
        )?;
        let mut v = vec![0f32; n];
        let mut i = vec![0u32; n];
        self.read_raw(values.ptr(), &mut v)?;
        self.read_raw(indices.ptr(), &mut i)?;
        Ok(i.chunks(k)
            .zip(v.chunks(k))
            .map(|(i, v)| {
                i.iter()
                    .zip(v)
                    .filter(|(&i, _)| i != u32::MAX)
                    .map(|(&i, &v)| (i, v))
                    .collect()
            })
            .collect())
    }

    /// `out[r] = softmax(logits[r] / temperature)`.
    pub fn softmax_rows(
        &self,
        logits: &CudaTensor,
        temperature: f32,
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        if out.rows != logits.rows
            || out.cols != logits.cols
            || temperature.is_nan()
            || temperature <= 0.0
        {
            return Err(shape(
                "softmax",
                format!("temperature {temperature} or shapes do not fit"),
            ));
        }
        let _state = self.enter()?;
        self.launch(
            &self.device.kernels.softmax_temperature,
            (as_u32(logits.rows, "softmax")?, 1),
            1024,
            &[
                &logits.ptr(),
                &out.ptr(),
                &as_i32(logits.cols, "softmax")?,
                &temperature,
            ],
        )
    }

    /// Copies device memory at `src` into `dst` after everything queued on compute.
    fn read_raw<T: Copy>(&self, src: u64, dst: &mut [T]) -> Result<(), BackendError> {
        if !dst.is_empty() {
            // SAFETY: the caller's device buffer holds at least size_of_val(dst) bytes; the
            // stream is synchronised before dst is read.
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    dst.as_mut_ptr().cast(),
                    src,
                    std::mem::size_of_val(dst),
                    self.compute.cu_stream(),
                )
                .result()
                .map_err(|e| self.error("read", e))?;
            }
        }
        self.compute
            .synchronize()
            .map_err(|e| self.error("read", e))
    }

    /// Device bytes this backend holds (everything but page-locked host memory).
    pub fn device_bytes(&self) -> u64 {
        self.ledger.device_total()
    }

    /// Waits for every op issued on the compute stream.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        self.compute
            .synchronize()
            .map_err(|e| self.error("synchronize", e))
    }

    fn error(&self, op: &'static str, e: impl std::fmt::Debug) -> BackendError {
        driver_error(&self.label, op, e)
    }

    /// Binds the context to this thread (raw driver calls need it) and takes the state.
    fn enter(&self) -> Result<MutexGuard<'_, State>, BackendError> {
        self.device
            .ctx
            .bind_to_thread()
            .map_err(|e| self.error("bind context", e))?;
        Ok(self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn alloc_buffer(&self, what: Use, bytes: usize) -> Result<DeviceBuffer, BackendError> {
        self.ledger.alloc(&self.compute, what, bytes)
    }

    /// Copies `data` to device memory at `dst` on `stream`, through page-locked staging so the
    /// copy is asynchronous. Staging is reused after synchronising the stream.
    fn stage_copy(
        &self,
        staging: &mut Staging,
        stream: &CudaStream,
        dst: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        if data.is_empty() {
            return Ok(());
        }
        let aligned = data.len().next_multiple_of(256);
        if staging.used + aligned > staging.buf.bytes() {
            stream.synchronize().map_err(|e| self.error("staging", e))?;
            staging.used = 0;
            if aligned > staging.buf.bytes() {
                staging.buf = self.ledger.alloc_pinned(aligned.next_power_of_two())?;
            }
        }
        // SAFETY: `used + len` is within the pinned buffer (checked above); the region is not
        // referenced by any copy still queued (reused only after a stream synchronise).
        unsafe {
            let src = staging.buf.ptr().add(staging.used);
            std::ptr::copy_nonoverlapping(data.as_ptr(), src, data.len());
            sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), data.len(), stream.cu_stream())
                .result()
                .map_err(|e| self.error("upload", e))?;
        }
        staging.used += aligned;
        Ok(())
    }

    /// Uploads step metadata of `kind` unless it equals the last upload of that kind; returns
    /// its device address.
    fn upload(&self, state: &mut State, kind: Meta, data: &[u8]) -> Result<u64, BackendError> {
        let slot = kind as usize;
        let cached = &state.uploads[slot];
        if let Some(device) = &cached.device {
            if cached.host == data {
                return Ok(device.ptr());
            }
        }
        let dst = grown(&mut state.uploads[slot].device, data.len().max(4), |n| {
            self.alloc_buffer(Use::Workspace, n.next_power_of_two())
        })?;
        let State {
            staging, uploads, ..
        } = state;
        self.stage_copy(staging, &self.compute, dst, data)?;
        uploads[slot].host.clear();
        uploads[slot].host.extend_from_slice(data);
        Ok(dst)
    }

    /// Makes compute wait (on the device) for the last swap-in, once.
    fn after_swap_in(&self, state: &mut State) -> Result<(), BackendError> {
        if let Some(event) = state.swap_in_done.take() {
            self.compute
                .wait(&event)
                .map_err(|e| self.error("wait for swap-in", e))?;
        }
        Ok(())
    }

    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32),
        block: u32,
        args: &[&dyn KernelArg],
    ) -> Result<(), BackendError> {
        self.launch3(f, (grid.0, grid.1, 1), block, args)
    }

    fn launch3(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[&dyn KernelArg],
    ) -> Result<(), BackendError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut builder = self.compute.launch_builder(f);
        for arg in args {
            arg.push(&mut builder);
        }
        let config = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every caller checks shapes against the buffers' sizes before launching, and
        // passes arguments in the kernel's parameter order with its C types.
        unsafe { builder.launch(config) }
            .map(|_| ())
            .map_err(|e| self.error("kernel launch", e))
    }

    /// An elementwise kernel `(x, y, n)` that updates `x` in place from `y` of its shape.
    fn in_place(
        &self,
        kernel: &CudaFunction,
        op: &'static str,
        x: &mut CudaTensor,
        y: &CudaTensor,
    ) -> Result<(), BackendError> {
        super::check_same_shape(op, (x.rows, x.cols), (y.rows, y.cols))?;
        let _state = self.enter()?;
        let n = x.len();
        self.launch(
            kernel,
            (as_u32(n.div_ceil(256).min(65_535), op)?, 1),
            256,
            &[&x.ptr(), &y.ptr(), &(n as i64)],
        )
    }

    /// Columns `first..first + n` of `out = x · Wᵀ` with cuBLAS, for the f32 rows
    /// `first..first + n` of W at `w` (`[n][k]`).
    fn sgemm(
        &self,
        x: &CudaTensor,
        w: u64,
        n: usize,
        out: &CudaTensor,
        first: usize,
    ) -> Result<(), BackendError> {
        let (m, k, ldc) = (x.rows, x.cols, out.cols);
        let as_int =
            |v: usize| i32::try_from(v).map_err(|_| shape("matmul", format!("{v} exceeds cuBLAS")));
        let (alpha, beta) = (1.0f32, 0.0f32);
        // cuBLAS is column-major: row-major out[m][ldc] is column-major outᵀ (ldc × m), and
        // its block of rows first..first+n is C = Wᵀ·x with W read as column-major k × n
        // (transposed) and x as column-major k × m.
        // SAFETY: W holds n*k floats, x m*k, out m*ldc with first + n <= ldc (checked by the
        // caller); the handle runs on the compute stream.
        unsafe {
            blas::sgemm(
                self.blas.0,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                as_int(n)?,
                as_int(m)?,
                as_int(k)?,
                &alpha,
                w as *const f32,
                as_int(k)?,
                x.ptr() as *const f32,
                as_int(k)?,
                &beta,
                (out.ptr() + (first * 4) as u64) as *mut f32,
                as_int(ldc)?,
            )
        }
        .map_err(|e| self.error("cuBLAS sgemm", e))
    }
}

/// Makes `slot` hold a buffer of at least `bytes` (a smaller one is dropped first, so both
/// are never held; it is freed in stream order, after the work that used it) and returns its
/// address.
fn grown(
    slot: &mut Option<DeviceBuffer>,
    bytes: usize,
    alloc: impl FnOnce(usize) -> Result<DeviceBuffer, BackendError>,
) -> Result<u64, BackendError> {
    if slot.as_ref().is_none_or(|b| b.bytes() < bytes) {
        *slot = None;
        *slot = Some(alloc(bytes)?);
    }
    Ok(slot.as_ref().map_or(0, DeviceBuffer::ptr))
}

/// A cuBLAS handle.
struct BlasHandle(blas_sys::cublasHandle_t);

// SAFETY: the handle is only used under the backend's state lock (every op that calls cuBLAS
// holds it), so never from two threads at once; cuBLAS handles may move between threads.
unsafe impl Send for BlasHandle {}
// SAFETY: as above.
unsafe impl Sync for BlasHandle {}

/// A kernel argument: device addresses and scalars, passed by value.
trait KernelArg {
    fn push<'a>(&'a self, builder: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn push<'a>(&'a self, builder: &mut cudarc::driver::LaunchArgs<'a>) {
                builder.arg(self);
            }
        }
    )*};
}
kernel_arg!(u64, i64, i32, f32);

fn as_i32(v: usize, op: &'static str) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| shape(op, format!("{v} exceeds a 32-bit index")))
}

fn as_u32(v: usize, op: &'static str) -> Result<u32, BackendError> {
    u32::try_from(v).map_err(|_| shape(op, format!("{v} exceeds a 32-bit index")))
}

fn u32_bytes(v: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern of it is valid to read as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: as above, for f32.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn shape(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

/// Threads per block for a row of `cols` elements: a multiple of 32, at most 1024.
fn row_threads(cols: usize) -> u32 {
    (cols.next_multiple_of(32)).clamp(32, 1024) as u32
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Kv = CudaKv;
    type HostKv = CudaHostKv;

    fn name(&self) -> String {
        format!("{} ({})", self.label, self.device.name)
    }

    fn upload(&self, weight: &WeightTensor) -> Result<CudaWeight, BackendError> {
        let (rows, cols) = super::check_upload(weight)?;
        let _state = self.enter()?;
        // Vectors (norms, biases) are kept as f32 for the elementwise kernels.
        let (bytes, dtype, row_bytes): (std::borrow::Cow<'_, [u8]>, DType, usize) = if rows == 1 {
            let f = weight.to_f32();
            (f32_bytes(&f).to_vec().into(), DType::F32, cols * 4)
        } else {
            (weight.bytes().into(), weight.dtype, weight.row_bytes())
        };
        let buf = self.alloc_buffer(Use::Weights, bytes.len())?;
        // Straight from the mapping, ordered on the compute stream after the allocation and
        // before any kernel that reads the weight. From pageable memory the call returns once
        // the driver has staged the bytes, so `bytes` may go right after.
        // SAFETY: the buffer holds bytes.len() bytes; the context is current (enter above).
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                buf.ptr(),
                bytes.as_ptr().cast(),
                bytes.len(),
                self.compute.cu_stream(),
            )
            .result()
            .map_err(|e| self.error("upload", e))?;
        }
        Ok(CudaWeight {
            buf,
            dtype,
            rows,
            cols,
            row_bytes,
        })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        let len = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| shape("alloc", format!("{rows}x{cols} overflows")))?;
        let _state = self.enter()?;
        Ok(CudaTensor {
            buf: self.alloc_buffer(Use::Activations, len)?,
            rows,
            cols,
        })
    }

    fn reshape(&self, t: &mut CudaTensor, rows: usize, cols: usize) -> Result<(), BackendError> {
        let len = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| shape("reshape", format!("{rows}x{cols} overflows")))?;
        if len > t.buf.bytes() {
            let _state = self.enter()?;
            t.buf = self.alloc_buffer(Use::Activations, len)?;
        }
        t.rows = rows;
        t.cols = cols;
        Ok(())
    }

    fn alloc_kv(&self, layout: &KvLayout) -> Result<CudaKv, BackendError> {
        let floats = layout
            .num_layers
            .checked_mul(2 * layout.num_blocks * layout.block_size)
            .and_then(|n| n.checked_mul(layout.num_kv_heads * layout.head_dim))
            .ok_or_else(|| shape("alloc_kv", format!("{layout:?} overflows")))?;
        let _state = self.enter()?;
        let buf = self.alloc_buffer(Use::KvCache, floats * 4)?;
        // Zeroed, as the CPU cache: a stray read sees zeros, not old data.
        // SAFETY: the buffer holds floats * 4 bytes.
        unsafe {
            sys::cuMemsetD8Async(buf.ptr(), 0, floats * 4, self.compute.cu_stream())
                .result()
                .map_err(|e| self.error("alloc_kv", e))?;
        }
        Ok(CudaKv {
            buf,
            layout: *layout,
        })
    }

    fn embed(
        &self,
        table: &CudaWeight,
        tokens: &[u32],
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        super::check_embed(tokens, (table.rows, table.cols), (out.rows, out.cols))?;
        let mut state = self.enter()?;
        let tokens_ptr = self.upload(&mut state, Meta::Tokens, u32_bytes(tokens))?;
        self.launch(
            &self.device.kernels.embed,
            (as_u32(tokens.len(), "embed")?, 1),
            256,
            &[
                &table.buf.ptr(),
                &dtype_code(table.dtype),
                &(table.row_bytes as i64),
                &tokens_ptr,
                &out.ptr(),
                &as_i32(out.cols, "embed")?,
            ],
        )
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        super::check_row_vector(
            "rms_norm",
            (weight.rows, weight.cols),
            (x.rows, x.cols),
            Some((out.rows, out.cols)),
        )?;
        let _state = self.enter()?;
        self.launch(
            &self.device.kernels.rms_norm,
            (as_u32(x.rows, "rms_norm")?, 1),
            row_threads(x.cols),
            &[
                &x.ptr(),
                &weight.buf.ptr(),
                &out.ptr(),
                &as_i32(x.cols, "rms_norm")?,
                &eps,
            ],
        )
    }

    fn matmul(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        super::check_matmul(
            (x.rows, x.cols),
            (weight.rows, weight.cols),
            (out.rows, out.cols),
        )?;
        let mut state = self.enter()?;
        if x.rows == 0 {
            return Ok(());
        }
        if weight.dtype == DType::F32 {
            return self.sgemm(x, weight.buf.ptr(), weight.rows, out, 0);
        }
        if x.rows <= MATVEC_MAX_ROWS {
            // One warp per weight row, 8 warps per block.
            return self.launch(
                &self.device.kernels.matvec,
                (as_u32(weight.rows.div_ceil(8), "matmul")?, 1),
                256,
                &[
                    &weight.buf.ptr(),
                    &dtype_code(weight.dtype),
                    &(weight.row_bytes as i64),
                    &as_i32(weight.rows, "matmul")?,
                    &as_i32(weight.cols, "matmul")?,
                    &x.ptr(),
                    &as_i32(x.rows, "matmul")?,
                    &out.ptr(),
                ],
            );
        }
        // Dequantize a tile of weight rows at a time (bounded workspace) and multiply it
        // into its columns of `out`.
        let tile_rows = (DEQUANT_TILE_BYTES / (weight.cols * 4)).clamp(1, weight.rows);
        let tile = grown(&mut state.dequantized, tile_rows * weight.cols * 4, |n| {
            self.alloc_buffer(Use::Workspace, n)
        })?;
        for first in (0..weight.rows).step_by(tile_rows) {
            let rows = tile_rows.min(weight.rows - first);
            self.launch(
                &self.device.kernels.dequantize_rows,
                (as_u32(rows, "matmul")?, 1),
                256,
                &[
                    &(weight.buf.ptr() + (first * weight.row_bytes) as u64),
                    &dtype_code(weight.dtype),
                    &(weight.row_bytes as i64),
                    &tile,
                    &as_i32(weight.cols, "matmul")?,
                ],
            )?;
            self.sgemm(x, tile, rows, out, first)?;
        }
        Ok(())
    }

    fn add_bias(&self, x: &mut CudaTensor, bias: &CudaWeight) -> Result<(), BackendError> {
        super::check_row_vector("add_bias", (bias.rows, bias.cols), (x.rows, x.cols), None)?;
        let _state = self.enter()?;
        self.launch(
            &self.device.kernels.add_bias,
            (as_u32(x.rows, "add_bias")?, 1),
            row_threads(x.cols),
            &[&x.ptr(), &bias.buf.ptr(), &as_i32(x.cols, "add_bias")?],
        )
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
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
        let mut state = self.enter()?;
        let positions_ptr = self.upload(&mut state, Meta::Positions, u32_bytes(positions))?;
        let freq_ptr = self.upload(&mut state, Meta::InvFreq, f32_bytes(inv_freq))?;
        let style_code: i32 = match style {
            RopeStyle::Halves => 0,
            RopeStyle::Interleaved => 1,
        };
        self.launch(
            &self.device.kernels.rope,
            (as_u32(x.rows, "rope")?, 1),
            row_threads(heads * head_dim / 2),
            &[
                &x.ptr(),
                &positions_ptr,
                &freq_ptr,
                &as_i32(heads, "rope")?,
                &as_i32(head_dim, "rope")?,
                &style_code,
            ],
        )
    }

    fn write_kv(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        slots: &[u32],
    ) -> Result<(), BackendError> {
        super::check_write_kv(&kv.layout, layer, (k.rows, k.cols), (v.rows, v.cols), slots)?;
        let width = kv.layout.num_kv_heads * kv.layout.head_dim;
        let mut state = self.enter()?;
        self.after_swap_in(&mut state)?;
        let slots_ptr = self.upload(&mut state, Meta::Slots, u32_bytes(slots))?;
        self.launch(
            &self.device.kernels.write_kv,
            (as_u32(slots.len(), "write_kv")?, 1),
            row_threads(width),
            &[
                &k.ptr(),
                &v.ptr(),
                &kv.plane_ptr(2 * layer),
                &kv.plane_ptr(2 * layer + 1),
                &slots_ptr,
                &as_i32(width, "write_kv")?,
            ],
        )
    }

    fn attention(
        &self,
        q: &CudaTensor,
        kv: &CudaKv,
        layer: usize,
        step: &StepLayout<'_>,
        heads: Heads,
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        let Heads {
            num_heads,
            num_kv_heads,
            head_dim,
        } = heads;
        let l = &kv.layout;
        let mut owner = Vec::new();
        super::attention_owners(
            (q.rows, q.cols),
            (out.rows, out.cols),
            l,
            layer,
            step,
            heads,
            &mut owner,
        )?;
        if head_dim > MAX_HEAD_DIM {
            return Err(BackendError::Unsupported(format!(
                "attention on {}: head_dim {head_dim} is above the kernel's {MAX_HEAD_DIM}",
                self.label
            )));
        }
        // seq_of_row per query, then the block tables padded to the longest.
        let max_blocks = step
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut meta = vec![0u32; q.rows + step.seqs.len() * max_blocks];
        for (m, &s) in meta.iter_mut().zip(&owner) {
            *m = s as u32;
        }
        for (s, seq) in step.seqs.iter().enumerate() {
            let table = &mut meta[q.rows + s * max_blocks..q.rows + (s + 1) * max_blocks];
            table[..seq.block_table.len()].copy_from_slice(seq.block_table);
        }
        let mut state = self.enter()?;
        self.after_swap_in(&mut state)?;
        let positions_ptr = self.upload(&mut state, Meta::Positions, u32_bytes(step.positions))?;
        let meta_ptr = self.upload(&mut state, Meta::Attention, u32_bytes(&meta))?;
        let tables_ptr = meta_ptr + (q.rows * 4) as u64;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let group = num_heads / num_kv_heads;
        if let Some(variant) = split_variant(group, head_dim) {
            let longest = step.positions.iter().max().map_or(0, |&p| p as usize + 1);
            let segments = longest.div_ceil(SPLIT_SEGMENT).max(1);
            let need = q.rows * num_heads * segments * (head_dim + 2) * 4;
            let partial = grown(&mut state.attention_partial, need, |n| {
                self.alloc_buffer(Use::Workspace, n.next_power_of_two())
            })?;
            self.launch3(
                &self.device.kernels.paged_attention_partial[variant],
                (
                    as_u32(q.rows, "attention")?,
                    as_u32(num_kv_heads, "attention")?,
                    as_u32(segments, "attention")?,
                ),
                ATTENTION_THREADS,
                &[
                    &q.ptr(),
                    &kv.plane_ptr(2 * layer),
                    &kv.plane_ptr(2 * layer + 1),
                    &partial,
                    &positions_ptr,
                    &meta_ptr,
                    &tables_ptr,
                    &as_i32(max_blocks, "attention")?,
                    &as_i32(l.block_size, "attention")?,
                    &as_i32(num_heads, "attention")?,
                    &as_i32(num_kv_heads, "attention")?,
                    &as_i32(head_dim, "attention")?,
                    &scale,
                    &as_i32(segments, "attention")?,
                ],
            )?;
            return self.launch(
                &self.device.kernels.paged_attention_combine,
                (
                    as_u32(q.rows, "attention")?,
                    as_u32(num_heads, "attention")?,
                ),
                row_threads(head_dim),
                &[
                    &partial,
                    &out.ptr(),
                    &positions_ptr,
                    &as_i32(num_heads, "attention")?,
                    &as_i32(head_dim, "attention")?,
                    &as_i32(segments, "attention")?,
                ],
            );
        }
        self.launch(
            &self.device.kernels.paged_attention,
            (
                as_u32(q.rows, "attention")?,
                as_u32(num_heads, "attention")?,
            ),
            ATTENTION_THREADS,
            &[
                &q.ptr(),
                &kv.plane_ptr(2 * layer),
                &kv.plane_ptr(2 * layer + 1),
                &out.ptr(),
                &positions_ptr,
                &meta_ptr,
                &tables_ptr,
                &as_i32(max_blocks, "attention")?,
                &as_i32(l.block_size, "attention")?,
                &as_i32(num_heads, "attention")?,
                &as_i32(num_kv_heads, "attention")?,
                &as_i32(head_dim, "attention")?,
                &scale,
            ],
        )
    }

    fn silu_mul(&self, gate: &mut CudaTensor, up: &CudaTensor) -> Result<(), BackendError> {
        self.in_place(&self.device.kernels.silu_mul, "silu_mul", gate, up)
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<(), BackendError> {
        self.in_place(&self.device.kernels.add, "add", x, y)
    }

    fn gather_rows(
        &self,
        x: &CudaTensor,
        rows: &[usize],
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        super::check_gather((x.rows, x.cols), rows, (out.rows, out.cols))?;
        let indices: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let mut state = self.enter()?;
        let rows_ptr = self.upload(&mut state, Meta::Rows, u32_bytes(&indices))?;
        self.launch(
            &self.device.kernels.gather_rows,
            (as_u32(rows.len(), "gather_rows")?, 1),
            row_threads(x.cols),
            &[
                &x.ptr(),
                &rows_ptr,
                &out.ptr(),
                &as_i32(x.cols, "gather_rows")?,
            ],
        )
    }

    fn read(&self, x: &CudaTensor) -> Result<Vec<f32>, BackendError> {
        let mut host = vec![0.0f32; x.len()];
        let mut state = self.enter()?;
        if !host.is_empty() {
            // SAFETY: the device buffer holds at least len floats; the host Vec is pageable
            // and the stream is synchronised before it is read.
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    host.as_mut_ptr().cast(),
                    x.ptr(),
                    host.len() * 4,
                    self.compute.cu_stream(),
                )
                .result()
                .map_err(|e| self.error("read", e))?;
            }
        }
        self.compute
            .synchronize()
            .map_err(|e| self.error("read", e))?;
        // Everything staged for the compute stream has been consumed.
        state.staging.used = 0;
        Ok(host)
    }

    fn write(&self, t: &mut CudaTensor, data: &[f32]) -> Result<(), BackendError> {
        super::check_write(data.len(), (t.rows, t.cols))?;
        let mut state = self.enter()?;
        let State { staging, .. } = &mut *state;
        for (i, piece) in f32_bytes(data).chunks(STAGING_BYTES / 2).enumerate() {
            self.stage_copy(
                staging,
                &self.compute,
                t.ptr() + (i * (STAGING_BYTES / 2)) as u64,
                piece,
            )?;
        }
        Ok(())
    }

    fn alloc_host_kv(
        &self,
        layout: &KvLayout,
        host_blocks: usize,
    ) -> Result<CudaHostKv, BackendError> {
        let block_bytes =
            layout.num_layers * 2 * layout.block_size * layout.num_kv_heads * layout.head_dim * 4;
        let bytes = host_blocks
            .checked_mul(block_bytes)
            .ok_or_else(|| shape("alloc_host_kv", format!("{host_blocks} blocks")))?;
        let _state = self.enter()?;
        Ok(CudaHostKv {
            buf: self.ledger.alloc_pinned(bytes)?,
            layout: *layout,
            host_blocks,
            copy: Arc::clone(&self.copy),
        })
    }

    fn host_block<'h>(&self, host: &'h CudaHostKv, block: u32) -> Result<&'h [u8], BackendError> {
        let (at, len) = host.block_span(block, "host_block")?;
        // SAFETY: block_span checked the span lies inside the pinned buffer, which `host` owns
        // for 'h; callers wait for the copy stream before reading (see the trait).
        Ok(unsafe { std::slice::from_raw_parts(host.buf.ptr().add(at), len) })
    }

    fn host_block_mut<'h>(
        &self,
        host: &'h mut CudaHostKv,
        block: u32,
    ) -> Result<&'h mut [u8], BackendError> {
        let (at, len) = host.block_span(block, "host_block_mut")?;
        // SAFETY: as above, and `host` is borrowed mutably, so the slice is unique.
        Ok(unsafe { std::slice::from_raw_parts_mut(host.buf.ptr().add(at), len) })
    }

    fn swap_out(
        &self,
        kv: &CudaKv,
        host: &mut CudaHostKv,
        pairs: &[(u32, u32)],
    ) -> Result<CopyTicket, BackendError> {
        self.swap(kv, host, pairs, Direction::Out)
    }

    fn swap_in(
        &self,
        host: &CudaHostKv,
        kv: &mut CudaKv,
        pairs: &[(u32, u32)],
    ) -> Result<CopyTicket, BackendError> {
        let flipped: Vec<(u32, u32)> = pairs.iter().map(|&(h, d)| (d, h)).collect();
        self.swap(kv, host, &flipped, Direction::In)
    }

    fn copy_finished(&self, ticket: CopyTicket) -> Result<bool, BackendError> {
        let mut state = self.enter()?;
        self.retire_finished(&mut state)?;
        Ok(ticket.0 < state.finished_below)
    }

    fn wait_copies(&self) -> Result<(), BackendError> {
        let mut state = self.enter()?;
        self.copy
            .synchronize()
            .map_err(|e| self.error("wait for copies", e))?;
        state.finished_below = state.next_ticket;
        state.in_flight.clear();
        state.copy_staging.used = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_attention_variants_cover_their_shapes_exactly() {
        // [g4_c2, g4_c4, g4_c8, g8_c2, g8_c4, g8_c8]
        assert_eq!(split_variant(3, 64), Some(0));
        assert_eq!(split_variant(4, 128), Some(1));
        assert_eq!(split_variant(1, 40), Some(0));
        assert_eq!(split_variant(7, 128), Some(4));
        assert_eq!(split_variant(8, 256), Some(5));
        assert_eq!(split_variant(5, 200), Some(5));
        assert_eq!(split_variant(9, 64), None);
        assert_eq!(split_variant(2, 320), None);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Out,
    In,
}

impl CudaBackend {
    /// Moves blocks between the cache and the page-locked pool on the copy stream: a kernel
    /// gathers the listed cache blocks of every layer into device staging in host-block
    /// layout, then one DMA per run of consecutive host blocks (and the reverse for swap-in).
    /// `pairs` are (device block, host block) either way.
    fn swap(
        &self,
        kv: &CudaKv,
        host: &CudaHostKv,
        pairs: &[(u32, u32)],
        direction: Direction,
    ) -> Result<CopyTicket, BackendError> {
        let op = match direction {
            Direction::Out => "swap_out",
            Direction::In => "swap_in",
        };
        if host.layout != kv.layout {
            return Err(shape(
                op,
                "the swap space was made for another cache layout".into(),
            ));
        }
        check_swap_pairs(&kv.layout, host.host_blocks, pairs, op)?;
        let planes = kv.layout.num_layers * 2;
        let block_floats = kv.block_floats();
        let host_block_bytes = planes * block_floats * 4;
        let mut state = self.enter()?;
        // The copy sees everything computed so far.
        let computed = self
            .compute
            .record_event(None)
            .map_err(|e| self.error(op, e))?;
        self.copy.wait(&computed).map_err(|e| self.error(op, e))?;
        let chunk = SWAP_CHUNK_BLOCKS
            .min(pairs.len())
            .min(SWAP_STAGING_BYTES / host_block_bytes.max(1))
            .max(1);
        let staging_ptr = grown(&mut state.swap_buffer, chunk * host_block_bytes, |n| {
            self.ledger.alloc(&self.copy, Use::SwapStaging, n)
        })?;
        let blocks_ptr = grown(&mut state.swap_blocks, chunk * 4, |n| {
            self.ledger.alloc(&self.copy, Use::Workspace, n)
        })?;
        let kernel = match direction {
            Direction::Out => &self.device.kernels.gather_kv_blocks,
            Direction::In => &self.device.kernels.scatter_kv_blocks,
        };
        let enqueue = |state: &mut State| -> Result<(), BackendError> {
            for piece in pairs.chunks(chunk) {
                let device_blocks: Vec<u32> = piece.iter().map(|p| p.0).collect();
                {
                    let State { copy_staging, .. } = state;
                    self.stage_copy(
                        copy_staging,
                        &self.copy,
                        blocks_ptr,
                        u32_bytes(&device_blocks),
                    )?;
                }
                if direction == Direction::In {
                    self.dma_runs(piece, host, staging_ptr, host_block_bytes, direction)?;
                }
                let cache = kv.buf.ptr();
                // gather_kv_blocks(cache → staging), scatter_kv_blocks(staging → cache); both then
                // take (blocks, num_blocks, block_floats, planes).
                let (src, dst) = match direction {
                    Direction::Out => (cache, staging_ptr),
                    Direction::In => (staging_ptr, cache),
                };
                let (num_blocks, bf, planes_i) = (
                    kv.layout.num_blocks as i64,
                    block_floats as i64,
                    as_i32(planes, op)?,
                );
                let mut builder = self.copy.launch_builder(kernel);
                builder
                    .arg(&src)
                    .arg(&dst)
                    .arg(&blocks_ptr)
                    .arg(&num_blocks)
                    .arg(&bf)
                    .arg(&planes_i);
                let config = LaunchConfig {
                    grid_dim: (as_u32(piece.len(), op)?, as_u32(planes, op)?, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: staging holds `chunk` host blocks of every plane; block numbers were
                // checked against the cache; arguments follow the kernels' parameter order.
                unsafe { builder.launch(config) }.map_err(|e| self.error(op, e))?;
                if direction == Direction::Out {
                    self.dma_runs(piece, host, staging_ptr, host_block_bytes, direction)?;
                }
            }
            Ok(())
        };
        // Retire finished batches before queuing this one: retiring may reset the copy
        // stream's staging, which this batch's uploads are about to use.
        self.retire_finished(&mut state)?;
        if let Err(e) = enqueue(&mut state) {
            // Part of it may be queued without a ticket: let it land before staging is
            // reused or the blocks are given to anyone else.
            let _ = self.copy.synchronize();
            state.copy_staging.used = 0;
            return Err(e);
        }
        let done = self
            .copy
            .record_event(None)
            .map_err(|e| self.error(op, e))?;
        if direction == Direction::In {
            // Compute waits for this on the device before it next touches the cache.
            state.swap_in_done = Some(
                self.copy
                    .record_event(None)
                    .map_err(|e| self.error(op, e))?,
            );
        }
        let ticket = CopyTicket(state.next_ticket);
        state.next_ticket += 1;
        state.in_flight.push_back((ticket, done));
        Ok(ticket)
    }

    /// Forgets swap batches whose copies have finished (oldest first, as the copy stream
    /// runs them); once none is in flight, the copy stream's staging is free again.
    fn retire_finished(&self, state: &mut State) -> Result<(), BackendError> {
        while let Some((front, event)) = state.in_flight.front() {
            if !event
                .try_is_complete()
                .map_err(|e| self.error("copy status", e))?
            {
                break;
            }
            state.finished_below = front.0 + 1;
            state.in_flight.pop_front();
        }
        if state.in_flight.is_empty() {
            state.copy_staging.used = 0;
        }
        Ok(())
    }

    /// One DMA per run of consecutive host blocks between device staging (entry i holds
    /// pair i's block) and the page-locked pool.
    fn dma_runs(
        &self,
        pairs: &[(u32, u32)],
        host: &CudaHostKv,
        staging: u64,
        block_bytes: usize,
        direction: Direction,
    ) -> Result<(), BackendError> {
        let mut i = 0;
        while i < pairs.len() {
            let mut run = 1;
            while i + run < pairs.len() && pairs[i + run].1 == pairs[i].1 + run as u32 {
                run += 1;
            }
            let device = staging + (i * block_bytes) as u64;
            // SAFETY: host block numbers were checked against the pool's size, so the run
            // lies inside it; staging holds `pairs.len()` blocks; the pool outlives the copy
            // (its owner waits for copies before dropping it).
            unsafe {
                let host_ptr = host.buf.ptr().add(pairs[i].1 as usize * block_bytes);
                match direction {
                    Direction::Out => sys::cuMemcpyDtoHAsync_v2(
                        host_ptr.cast(),
                        device,
                        run * block_bytes,
                        self.copy.cu_stream(),
                    ),
                    Direction::In => sys::cuMemcpyHtoDAsync_v2(
                        device,
                        host_ptr.cast(),
                        run * block_bytes,
                        self.copy.cu_stream(),
                    ),
                }
                .result()
                .map_err(|e| self.error("swap copy", e))?;
            }
            i += run;
        }
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Page-locked memory and staging must not be freed under a copy in flight.
        if self.device.ctx.bind_to_thread().is_ok() {
            let _ = self.copy.synchronize();
            let _ = self.compute.synchronize();
        }
        // SAFETY: the handle is not used after this; errors are ignored rather than unwrapped
        // as cudarc's Drop would.
        let _ = unsafe { blas::destroy_handle(self.blas.0) };
    }
}
