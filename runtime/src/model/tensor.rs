//! Weight tensors as they sit in a model file: a dtype, a shape, and bytes in a shared
//! memory map. Nothing is copied or converted here; backends read the bytes as they are.
//!
//! Shapes are row-major `[rows, cols]` (or `[n]`), in Hugging Face order: a linear layer's
//! weight is `[out_features, in_features]`. Quantized types store each row as whole blocks.

use std::sync::Arc;

/// Element types of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    F16,
    BF16,
    /// GGML Q8_0: blocks of 32, one f16 scale and 32 signed bytes (34 bytes).
    Q8_0,
    /// GGML Q4_0: blocks of 32, one f16 scale and 32 four-bit values offset by 8 (18 bytes).
    Q4_0,
    /// GGML Q4_1: blocks of 32, f16 scale and f16 minimum, 32 four-bit values (20 bytes).
    Q4_1,
}

impl DType {
    /// Elements per block (1 for plain types).
    pub const fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => 32,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
        }
    }

    /// Bytes of `elems` elements, or `None` if `elems` is not a whole number of blocks.
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        elems
            .is_multiple_of(self.block_elems())
            .then(|| (elems / self.block_elems()).checked_mul(self.block_bytes()))
            .flatten()
    }

    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        })
    }
}

/// Bytes that stay alive as long as any tensor views them (a file mapping, or owned memory
/// for weights that had to be transformed at load).
#[derive(Debug)]
pub enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    /// Maps a model file read-only.
    pub fn map(path: &std::path::Path) -> Result<Arc<Self>, super::ModelError> {
        let io = |source| super::ModelError::Io {
            path: path.to_owned(),
            source,
        };
        let file = super::files::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process. Model files are not
        // modified while a daemon serves them (operators replace them by rename, which leaves
        // this mapping on the old inode); a concurrent in-place write could change weights under
        // us but cannot break memory safety, since every read goes through bounds-checked slices.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(Arc::new(Backing::Mapped(map)))
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(map) => map,
            Backing::Owned(bytes) => bytes,
        }
    }
}

/// A weight tensor: a view into shared backing bytes.
#[derive(Debug, Clone)]
pub struct WeightTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    backing: Arc<Backing>,
    offset: usize,
    len: usize,
}

impl WeightTensor {
    /// A view of `len` bytes at `offset`; the caller has checked that they fit the shape.
    pub(crate) fn new(
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        backing: Arc<Backing>,
        offset: usize,
        len: usize,
    ) -> Self {
        Self {
            name,
            dtype,
            shape,
            backing,
            offset,
            len,
        }
    }

    /// A tensor over owned f32 data (tests, and weights transformed at load).
    pub fn from_f32(name: &str, shape: Vec<usize>, data: &[f32]) -> Self {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let len = bytes.len();
        Self::new(
            name.to_owned(),
            DType::F32,
            shape,
            Arc::new(Backing::Owned(bytes)),
            0,
            len,
        )
    }

    /// A tensor over owned bytes in `dtype`'s file layout (tests of quantized kernels), or None
    /// when the bytes do not fit the shape.
    pub fn from_raw(name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Option<Self> {
        let elems: usize = shape.iter().product();
        let cols = *shape.last()?;
        if !cols.is_multiple_of(dtype.block_elems()) || dtype.bytes_for(elems)? != bytes.len() {
            return None;
        }
        let len = bytes.len();
        Some(Self::new(
            name.to_owned(),
            dtype,
            shape,
            Arc::new(Backing::Owned(bytes)),
            0,
            len,
        ))
    }

    /// A tensor over owned bf16 data rounded from `data` (benchmarks of the bf16 path).
    pub fn from_f32_as_bf16(name: &str, shape: Vec<usize>, data: &[f32]) -> Self {
        let bytes: Vec<u8> = data
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let len = bytes.len();
        Self::new(
            name.to_owned(),
            DType::BF16,
            shape,
            Arc::new(Backing::Owned(bytes)),
            0,
            len,
        )
    }

    /// The raw bytes, in the file's layout.
    pub fn bytes(&self) -> &[u8] {
        &self.backing.bytes()[self.offset..self.offset + self.len]
    }

    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows and columns of a 2-D tensor (a 1-D tensor is one row).
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [n] => (1, *n),
            [rows, cols] => (*rows, *cols),
            _ => (
                self.shape.first().copied().unwrap_or(0),
                self.shape.iter().skip(1).product(),
            ),
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        let (_, cols) = self.rows_cols();
        cols / self.dtype.block_elems() * self.dtype.block_bytes()
    }

    /// Whether the bytes live in a file mapping (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(*self.backing, Backing::Mapped(_))
    }

    /// Every element as f32 (for tests and small tensors such as norms and biases).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.elems()];
        crate::backend::cpu::kernels::dequantize_row(self.dtype, self.bytes(), &mut out);
        out
    }
}
