//! Dot products with SIMD chosen at run time: AVX-512 (F, BW) or AVX2 + FMA + F16C where the
//! CPU has them, the
//! portable kernels (`kernels.rs`) everywhere else. Activations stay f32; weights are read in
//! their stored dtype and widened in registers, quantized blocks dequantized inside the loop.
//!
//! Every function here must agree with the portable kernel of the same dtype up to f32
//! rounding; the tests check that on random inputs of awkward lengths for each level the host
//! supports.

use crate::model::DType;

/// An instruction-set level. The kernels of a level are only reachable through a backend built
/// for a level the CPU supports (`CpuBackend::with_level` checks), never directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Portable,
    /// AVX2 with FMA and F16C (x86-64).
    Avx2,
    /// AVX-512 F and BW on top of AVX2 (x86-64): 16 lanes.
    Avx512,
}

impl Level {
    /// The level to use: `ACCEL_CPU_KERNELS` (`portable`, `avx2`, `avx512`) if set and
    /// supported, else AVX2 where present. AVX-512 is opt-in: on the AMD hosts we measured
    /// (benches/cpu_decode) its Q4 kernels were slower than AVX2 and the rest no faster.
    pub fn detect() -> Self {
        let supported = Self::available();
        let wanted = std::env::var("ACCEL_CPU_KERNELS")
            .ok()
            .and_then(|name| supported.iter().copied().find(|l| l.name() == name));
        wanted.unwrap_or(if supported.contains(&Level::Avx2) {
            Level::Avx2
        } else {
            Level::Portable
        })
    }

    /// The best level the CPU supports.
    fn best_supported() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            if avx2
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                return Level::Avx512;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Portable
    }

    /// Every level this CPU can run, best last (for tests and benches).
    pub fn available() -> Vec<Self> {
        let mut levels = vec![Level::Portable];
        match Self::best_supported() {
            Level::Avx512 => levels.extend([Level::Avx2, Level::Avx512]),
            Level::Avx2 => levels.push(Level::Avx2),
            Level::Portable => {}
        }
        levels
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// A dot product of one weight row (stored dtype) with f32 activations.
pub type DotFn = fn(&[u8], &[f32]) -> f32;

/// The dot product for `dtype` at `level`.
pub(crate) fn dot_fn(level: Level, dtype: DType) -> DotFn {
    match level {
        Level::Portable => portable(dtype),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => match dtype {
            DType::F32 => avx2::dot_f32_entry,
            DType::BF16 => avx2::dot_bf16_entry,
            DType::F16 => avx2::dot_f16_entry,
            DType::Q8_0 => avx2::dot_q8_0_entry,
            DType::Q4_0 => avx2::dot_q4_0_entry,
            DType::Q4_1 => avx2::dot_q4_1_entry,
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => match dtype {
            DType::F32 => avx512::dot_f32_entry,
            DType::BF16 => avx512::dot_bf16_entry,
            // F16 is rare in served models; the AVX2 kernel serves it.
            DType::F16 => avx2::dot_f16_entry,
            DType::Q8_0 => avx512::dot_q8_0_entry,
            DType::Q4_0 => avx512::dot_q4_0_entry,
            DType::Q4_1 => avx512::dot_q4_1_entry,
        },
        #[cfg(not(target_arch = "x86_64"))]
        Level::Avx2 | Level::Avx512 => portable(dtype),
    }
}

/// A bf16 dot product whose activations were arranged by [`permute_for_bf16_pairs`]:
/// `(row, permuted, x)`, with `x` the original activations (for the tail).
pub type Bf16PairsFn = fn(&[u8], &[f32], &[f32]) -> f32;

/// The bf16 dot product over permuted activations at `level`, where there is one.
pub(crate) fn bf16_pairs_fn(level: Level) -> Option<Bf16PairsFn> {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 => Some(avx2::dot_bf16_pairs_entry),
        _ => None,
    }
}

/// Arranges activations for [`Bf16PairsFn`]: in each whole group of 16, the 8 even-indexed
/// values, then the 8 odd-indexed ones. A 256-bit load of 16 bf16 weights holds each even
/// element in the low half of a 32-bit lane and the odd one in the high half, so one shift
/// and one mask widen them to two f32 vectors in exactly this order, with no cross-lane
/// shuffle. Decoding permutes each activation row once and reuses it for every weight row.
pub fn permute_for_bf16_pairs(x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    for group in x.chunks_exact(16) {
        out.extend(group.iter().step_by(2));
        out.extend(group.iter().skip(1).step_by(2));
    }
}

/// Expands whole blocks of a weight row into f32.
pub type DequantFn = fn(&[u8], &mut [f32]);

/// The row dequantizer for `dtype` at `level`.
pub(crate) fn dequant_fn(level: Level, dtype: DType) -> DequantFn {
    match (level, dtype) {
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2 | Level::Avx512, DType::Q4_0) => avx2::dequant_q4_0_entry,
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2 | Level::Avx512, DType::Q4_1) => avx2::dequant_q4_1_entry,
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2 | Level::Avx512, DType::Q8_0) => avx2::dequant_q8_0_entry,
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2 | Level::Avx512, DType::BF16) => avx2::dequant_bf16_entry,
        (_, DType::F32) => |r, o| super::kernels::dequantize_row(DType::F32, r, o),
        (_, DType::F16) => |r, o| super::kernels::dequantize_row(DType::F16, r, o),
        (_, DType::BF16) => |r, o| super::kernels::dequantize_row(DType::BF16, r, o),
        (_, DType::Q8_0) => |r, o| super::kernels::dequantize_row(DType::Q8_0, r, o),
        (_, DType::Q4_0) => |r, o| super::kernels::dequantize_row(DType::Q4_0, r, o),
        (_, DType::Q4_1) => |r, o| super::kernels::dequantize_row(DType::Q4_1, r, o),
    }
}

fn portable(dtype: DType) -> DotFn {
    match dtype {
        DType::F32 => |r, x| super::kernels::dot(DType::F32, r, x),
        DType::BF16 => |r, x| super::kernels::dot(DType::BF16, r, x),
        DType::F16 => |r, x| super::kernels::dot(DType::F16, r, x),
        DType::Q8_0 => |r, x| super::kernels::dot(DType::Q8_0, r, x),
        DType::Q4_0 => |r, x| super::kernels::dot(DType::Q4_0, r, x),
        DType::Q4_1 => |r, x| super::kernels::dot(DType::Q4_1, r, x),
    }
}

/// f32 · f32 at `level`.
pub(crate) fn dot_f32(level: Level, a: &[f32], b: &[f32]) -> f32 {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx2 and Avx512 are only constructed when the CPU reports AVX2, FMA
        // and F16C.
        Level::Avx2 | Level::Avx512 => unsafe { avx2::dot_f32_f32(a, b) },
        _ => super::kernels::dot_f32(a, b),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Horizontal sum of 8 lanes (register-only, so safe where the features are enabled).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
        _mm_cvtss_f32(s)
    }

    /// Eight 16-bit floats at `p` widened to f32.
    ///
    /// # Safety
    /// AVX2 and F16C; `p` must point at 16 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn widen8(p: *const u8, bf16: bool) -> __m256 {
        // SAFETY: the caller guarantees the features and 16 readable bytes at `p`.
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            if bf16 {
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            } else {
                _mm256_cvtph_ps(h)
            }
        }
    }

    /// The f16 block scale at `at`, widened with F16C in-line (half's conversion checks the
    /// CPU's features on every call, which cost a tenth of quantized decoding).
    ///
    /// # Safety
    /// The CPU must support F16C.
    #[target_feature(enable = "f16c")]
    #[inline]
    unsafe fn scale(bytes: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `a` and `b` must have the same length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32_f32(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: the caller guarantees the CPU features (see # Safety); every pointer
        // access stays within the slices, whose lengths are checked first.
        unsafe {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i + 8 * k)),
                        _mm256_loadu_ps(pb.add(i + 8 * k)),
                        *acc,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let mut sum = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            while i < n {
                sum += a[i] * b[i];
                i += 1;
            }
            sum
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `row` holds `x.len()` little-endian f32 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: the caller guarantees the CPU features (see # Safety); every pointer
        // access stays within the slices, whose lengths are checked first.
        unsafe {
            assert!(row.len() >= x.len() * 4);
            let n = x.len();
            let (pw, px) = (row.as_ptr().cast::<f32>(), x.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pw.add(i + 8 * k)),
                        _mm256_loadu_ps(px.add(i + 8 * k)),
                        *acc,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pw.add(i)),
                    _mm256_loadu_ps(px.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let mut sum = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            while i < n {
                sum += f32::from_le_bytes([
                    row[4 * i],
                    row[4 * i + 1],
                    row[4 * i + 2],
                    row[4 * i + 3],
                ]) * x[i];
                i += 1;
            }
            sum
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `row` holds `x.len()` 16-bit values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_half(row: &[u8], x: &[f32], bf16: bool) -> f32 {
        // SAFETY: the caller guarantees the CPU features (see # Safety); every pointer
        // access stays within the slices, whose lengths are checked first.
        unsafe {
            assert!(row.len() >= x.len() * 2);
            let n = x.len();
            let (pw, px) = (row.as_ptr(), x.as_ptr());
            let widen = |p: *const u8| widen8(p, bf16);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(
                        widen(pw.add(2 * (i + 8 * k))),
                        _mm256_loadu_ps(px.add(i + 8 * k)),
                        *acc,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(widen(pw.add(2 * i)), _mm256_loadu_ps(px.add(i)), acc[0]);
                i += 8;
            }
            let mut sum = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            while i < n {
                let bits = u16::from_le_bytes([row[2 * i], row[2 * i + 1]]);
                let w = if bf16 {
                    f32::from_bits(u32::from(bits) << 16)
                } else {
                    f16::from_bits(bits).to_f32()
                };
                sum += w * x[i];
                i += 1;
            }
            sum
        }
    }

    /// bf16 row · activations, with the activations' whole groups of 16 permuted by
    /// `permute_for_bf16_pairs` (`xp`) and the tail read from `x`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_bf16_pairs(row: &[u8], xp: &[f32], x: &[f32]) -> f32 {
        // SAFETY: the caller guarantees the CPU features (see # Safety); every pointer
        // access stays within the slices, whose lengths are checked first.
        unsafe {
            let n = x.len();
            let groups = n / 16;
            assert!(row.len() >= n * 2 && xp.len() >= groups * 16);
            let (pw, pp) = (row.as_ptr(), xp.as_ptr());
            let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut g = 0;
            while g + 2 <= groups {
                for u in 0..2 {
                    let w = _mm256_loadu_si256(pw.add(32 * (g + u)).cast());
                    let even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                    let odd = _mm256_castsi256_ps(_mm256_and_si256(w, high));
                    let xe = _mm256_loadu_ps(pp.add(16 * (g + u)));
                    let xo = _mm256_loadu_ps(pp.add(16 * (g + u) + 8));
                    acc[2 * u] = _mm256_fmadd_ps(even, xe, acc[2 * u]);
                    acc[2 * u + 1] = _mm256_fmadd_ps(odd, xo, acc[2 * u + 1]);
                }
                g += 2;
            }
            if g < groups {
                let w = _mm256_loadu_si256(pw.add(32 * g).cast());
                let even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                let odd = _mm256_castsi256_ps(_mm256_and_si256(w, high));
                acc[0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(pp.add(16 * g)), acc[0]);
                acc[1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(pp.add(16 * g + 8)), acc[1]);
            }
            let mut sum = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            for i in groups * 16..n {
                let bits = u16::from_le_bytes([row[2 * i], row[2 * i + 1]]);
                sum += f32::from_bits(u32::from(bits) << 16) * x[i];
            }
            sum
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `row` holds `x.len() / 32` Q8_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: the caller guarantees the CPU features (see # Safety); every pointer
        // access stays within the slices, whose lengths are checked first.
        unsafe {
            let blocks = x.len() / 32;
            assert!(row.len() >= blocks * 34);
            let mut acc = _mm256_setzero_ps();
            for b in 0..blocks {
                let block = row.as_ptr().add(b * 34);
                let xs = x.as_ptr().add(b * 32);
                let mut s = _mm256_setzero_ps();
                for k in 0..4 {
                    let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        block.add(2 + 8 * k).cast(),
                    )));
                    s = _mm256_fmadd_ps(q, _mm256_loadu_ps(xs.add(8 * k)), s);
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(scale(row, b * 34)), s, acc);
            }
            hsum(acc)
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `row` holds `x.len() / 32` Q4_0 (`with_min` false)
    /// or Q4_1 (`with_min` true) blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4(row: &[u8], x: &[f32], with_min: bool) -> f32 {
        // SAFETY: the caller guarantees the CPU features (see # Safety); every pointer
        // access stays within the slices, whose lengths are checked first.
        unsafe {
            let (block_bytes, quants_at) = if with_min { (20, 4) } else { (18, 2) };
            let blocks = x.len() / 32;
            assert!(row.len() >= blocks * block_bytes);
            let mask = _mm_set1_epi8(0x0f);
            let mut acc_q = _mm256_setzero_ps();
            let mut acc_x = _mm256_setzero_ps();
            for b in 0..blocks {
                let block = row.as_ptr().add(b * block_bytes);
                let xs = x.as_ptr().add(b * 32);
                let q = _mm_loadu_si128(block.add(quants_at).cast());
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                // Elements 0..16 are the low nibbles, 16..32 the high ones.
                let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                let mut sq = _mm256_setzero_ps();
                let mut sx = _mm256_setzero_ps();
                for (k, part) in parts.iter().enumerate() {
                    let xv = _mm256_loadu_ps(xs.add(8 * k));
                    sq = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(*part)), xv, sq);
                    sx = _mm256_add_ps(sx, xv);
                }
                let d = scale(row, b * block_bytes);
                if with_min {
                    let m = scale(row, b * block_bytes + 2);
                    acc_q = _mm256_fmadd_ps(_mm256_set1_ps(d), sq, acc_q);
                    acc_x = _mm256_fmadd_ps(_mm256_set1_ps(m), sx, acc_x);
                } else {
                    // d * (q - 8) · x = d * (q · x) - 8d * Σx
                    acc_q = _mm256_fmadd_ps(_mm256_set1_ps(d), sq, acc_q);
                    acc_x = _mm256_fmadd_ps(_mm256_set1_ps(-8.0 * d), sx, acc_x);
                }
            }
            hsum(_mm256_add_ps(acc_q, acc_x))
        }
    }

    /// # Safety
    /// AVX2 and FMA; `row` holds `out.len() / 32` Q4_0 or Q4_1 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequant_q4(row: &[u8], out: &mut [f32], with_min: bool) {
        let (block_bytes, quants_at) = if with_min { (20, 4) } else { (18, 2) };
        let blocks = out.len() / 32;
        assert!(row.len() >= blocks * block_bytes);
        // SAFETY: the caller guarantees the features; reads stay inside `row` (checked above)
        // and writes inside `out` (32 floats per block).
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            for b in 0..blocks {
                let block = row.as_ptr().add(b * block_bytes);
                let d = _mm256_set1_ps(scale(row, b * block_bytes));
                let m = _mm256_set1_ps(if with_min {
                    scale(row, b * block_bytes + 2)
                } else {
                    -8.0 * scale(row, b * block_bytes)
                });
                let q = _mm_loadu_si128(block.add(quants_at).cast());
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                let dst = out.as_mut_ptr().add(b * 32);
                for (k, part) in parts.iter().enumerate() {
                    let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(*part)), d, m);
                    _mm256_storeu_ps(dst.add(8 * k), v);
                }
            }
        }
    }

    /// # Safety
    /// AVX2; `row` holds `out.len() / 32` Q8_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequant_q8_0(row: &[u8], out: &mut [f32]) {
        let blocks = out.len() / 32;
        assert!(row.len() >= blocks * 34);
        // SAFETY: as in dequant_q4.
        unsafe {
            for b in 0..blocks {
                let block = row.as_ptr().add(b * 34);
                let d = _mm256_set1_ps(scale(row, b * 34));
                let dst = out.as_mut_ptr().add(b * 32);
                for k in 0..4 {
                    let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        block.add(2 + 8 * k).cast(),
                    )));
                    _mm256_storeu_ps(dst.add(8 * k), _mm256_mul_ps(q, d));
                }
            }
        }
    }

    /// # Safety
    /// AVX2; `row` holds `out.len()` bf16 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequant_bf16(row: &[u8], out: &mut [f32]) {
        let n = out.len();
        assert!(row.len() >= 2 * n);
        let mut i = 0;
        // SAFETY: as in dequant_q4; 8 values at a time while they fit.
        unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(
                    out.as_mut_ptr().add(i),
                    widen8(row.as_ptr().add(2 * i), true),
                );
                i += 8;
            }
        }
        while i < n {
            out[i] =
                f32::from_bits(u32::from(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])) << 16);
            i += 1;
        }
    }

    pub fn dequant_q4_0_entry(row: &[u8], out: &mut [f32]) {
        // SAFETY: only reachable through dequant_fn(Level::Avx2, _); see the entry points below.
        unsafe { dequant_q4(row, out, false) }
    }
    pub fn dequant_q4_1_entry(row: &[u8], out: &mut [f32]) {
        // SAFETY: as for dequant_q4_0_entry.
        unsafe { dequant_q4(row, out, true) }
    }
    pub fn dequant_q8_0_entry(row: &[u8], out: &mut [f32]) {
        // SAFETY: as for dequant_q4_0_entry.
        unsafe { dequant_q8_0(row, out) }
    }
    pub fn dequant_bf16_entry(row: &[u8], out: &mut [f32]) {
        // SAFETY: as for dequant_q4_0_entry.
        unsafe { dequant_bf16(row, out) }
    }

    // Safe entry points for the dispatch table: only reachable through `dot_fn(Level::Avx2, _)`,
    // and `Level::Avx2` is only constructed when the CPU has AVX2, FMA and F16C.
    pub fn dot_f32_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: see the comment above these entry points; lengths are asserted inside.
        unsafe { dot_f32(row, x) }
    }
    pub fn dot_bf16_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_half(row, x, true) }
    }
    pub fn dot_bf16_pairs_entry(row: &[u8], xp: &[f32], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry (only reachable through bf16_pairs_fn at Avx2 or
        // Avx512).
        unsafe { dot_bf16_pairs(row, xp, x) }
    }
    pub fn dot_f16_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_half(row, x, false) }
    }
    pub fn dot_q8_0_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_q8_0(row, x) }
    }
    pub fn dot_q4_0_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_q4(row, x, false) }
    }
    pub fn dot_q4_1_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_q4(row, x, true) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The f16 block scale at `at`, widened with F16C in-line (half's conversion checks the
    /// CPU's features on every call, which cost a tenth of quantized decoding).
    ///
    /// # Safety
    /// The CPU must support F16C.
    #[target_feature(enable = "f16c")]
    #[inline]
    unsafe fn scale(bytes: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// # Safety
    /// AVX-512 F; `row` holds `x.len()` f32 values.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        assert!(row.len() >= 4 * n);
        let (pw, px) = (row.as_ptr().cast::<f32>(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY: the caller guarantees the features; loads stay below n (checked above).
        unsafe {
            while i + 32 <= n {
                acc[0] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pw.add(i)),
                    _mm512_loadu_ps(px.add(i)),
                    acc[0],
                );
                acc[1] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pw.add(i + 16)),
                    _mm512_loadu_ps(px.add(i + 16)),
                    acc[1],
                );
                i += 32;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pw.add(i)),
                    _mm512_loadu_ps(px.add(i)),
                    acc[0],
                );
                i += 16;
            }
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        while i < n {
            sum += f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
                * x[i];
            i += 1;
        }
        sum
    }

    /// # Safety
    /// AVX-512 F and BW; `row` holds `x.len()` bf16 values.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        assert!(row.len() >= 2 * n);
        let (pw, px) = (row.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY: as in dot_f32.
        unsafe {
            let widen = |p: *const u8| {
                _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
                    16,
                ))
            };
            while i + 32 <= n {
                acc[0] = _mm512_fmadd_ps(widen(pw.add(2 * i)), _mm512_loadu_ps(px.add(i)), acc[0]);
                acc[1] = _mm512_fmadd_ps(
                    widen(pw.add(2 * (i + 16))),
                    _mm512_loadu_ps(px.add(i + 16)),
                    acc[1],
                );
                i += 32;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(widen(pw.add(2 * i)), _mm512_loadu_ps(px.add(i)), acc[0]);
                i += 16;
            }
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        while i < n {
            sum +=
                f32::from_bits(u32::from(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])) << 16)
                    * x[i];
            i += 1;
        }
        sum
    }

    /// # Safety
    /// AVX-512 F and BW; `row` holds `x.len() / 32` Q8_0 blocks.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let blocks = x.len() / 32;
        assert!(row.len() >= blocks * 34);
        let mut acc = _mm512_setzero_ps();
        // SAFETY: as in dot_f32; each block reads 34 bytes of `row` and 32 floats of `x`.
        unsafe {
            for b in 0..blocks {
                let block = row.as_ptr().add(b * 34 + 2);
                let xs = x.as_ptr().add(b * 32);
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(block.cast())));
                let q1 =
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(16).cast())));
                let s = _mm512_fmadd_ps(
                    q1,
                    _mm512_loadu_ps(xs.add(16)),
                    _mm512_mul_ps(q0, _mm512_loadu_ps(xs)),
                );
                acc = _mm512_fmadd_ps(_mm512_set1_ps(scale(row, b * 34)), s, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// # Safety
    /// AVX-512 F and BW; `row` holds `x.len() / 32` Q4_0 or Q4_1 blocks.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn dot_q4(row: &[u8], x: &[f32], with_min: bool) -> f32 {
        let (block_bytes, quants_at) = if with_min { (20, 4) } else { (18, 2) };
        let blocks = x.len() / 32;
        assert!(row.len() >= blocks * block_bytes);
        let mut acc_q = _mm512_setzero_ps();
        let mut acc_x = _mm512_setzero_ps();
        // SAFETY: as in dot_q8_0.
        unsafe {
            let mask = _mm512_set1_epi32(0x0f);
            for b in 0..blocks {
                let xs = x.as_ptr().add(b * 32);
                // 16 bytes widened to 16 lanes: low nibbles are elements 0..16, high 16..32.
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                    row.as_ptr().add(b * block_bytes + quants_at).cast(),
                ));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, mask));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
                let (x0, x1) = (_mm512_loadu_ps(xs), _mm512_loadu_ps(xs.add(16)));
                let sq = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
                let sx = _mm512_add_ps(x0, x1);
                let d = scale(row, b * block_bytes);
                let m = if with_min {
                    scale(row, b * block_bytes + 2)
                } else {
                    -8.0 * d
                };
                acc_q = _mm512_fmadd_ps(_mm512_set1_ps(d), sq, acc_q);
                acc_x = _mm512_fmadd_ps(_mm512_set1_ps(m), sx, acc_x);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc_q, acc_x))
    }

    // Safe entry points: only reachable through `dot_fn(Level::Avx512, _)`, and Level::Avx512
    // is only constructed when the CPU has AVX-512 F and BW (and AVX2, FMA, F16C).
    pub fn dot_f32_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: see above; lengths are asserted inside.
        unsafe { dot_f32(row, x) }
    }
    pub fn dot_bf16_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_bf16(row, x) }
    }
    pub fn dot_q8_0_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_q8_0(row, x) }
    }
    pub fn dot_q4_0_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_q4(row, x, false) }
    }
    pub fn dot_q4_1_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: as for dot_f32_entry.
        unsafe { dot_q4(row, x, true) }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng as _, SeedableRng as _};

    use super::*;
    use crate::backend::cpu::kernels;

    /// Random row bytes of `dtype` for `n` elements: floats for plain types, random blocks with
    /// sane scales for quantized ones.
    fn random_row(rng: &mut impl rand::Rng, dtype: DType, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        match dtype {
            DType::F32 => {
                (0..n).for_each(|_| out.extend(rng.random_range(-1.0f32..1.0).to_le_bytes()))
            }
            DType::F16 => (0..n).for_each(|_| {
                out.extend(half::f16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes())
            }),
            DType::BF16 => (0..n).for_each(|_| {
                out.extend(half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes())
            }),
            q => {
                for _ in 0..n / 32 {
                    out.extend(half::f16::from_f32(rng.random_range(0.001..0.1)).to_le_bytes());
                    if q == DType::Q4_1 {
                        out.extend(half::f16::from_f32(rng.random_range(-0.5..0.5)).to_le_bytes());
                    }
                    let quants = if q == DType::Q8_0 { 32 } else { 16 };
                    (0..quants).for_each(|_| out.push(rng.random()));
                }
            }
        }
        out
    }

    #[test]
    fn bf16_over_permuted_activations_matches_the_plain_kernel() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for level in Level::available() {
            let Some(pairs) = bf16_pairs_fn(level) else {
                continue;
            };
            for n in [1, 15, 16, 17, 31, 32, 33, 48, 100, 576, 1536, 1543] {
                let row = random_row(&mut rng, DType::BF16, n);
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut xp = Vec::new();
                permute_for_bf16_pairs(&x, &mut xp);
                assert_eq!(xp.len(), n / 16 * 16);
                let want = kernels::dot(DType::BF16, &row, &x);
                let got = pairs(&row, &xp, &x);
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{level:?} n={n}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn every_level_matches_the_portable_kernel_on_awkward_lengths() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        for level in Level::available() {
            for dtype in [
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::Q8_0,
                DType::Q4_0,
                DType::Q4_1,
            ] {
                let lengths: &[usize] = if dtype.is_quantized() {
                    &[32, 64, 96, 160, 576, 1536]
                } else {
                    &[1, 7, 8, 9, 31, 33, 65, 100, 576, 577]
                };
                for &n in lengths {
                    let row = random_row(&mut rng, dtype, n);
                    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let mut w = vec![0.0; n];
                    kernels::dequantize_row(dtype, &row, &mut w);
                    let reference: f64 = w
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let magnitude: f64 = w
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
                        .sum::<f64>()
                        .max(1e-9);
                    let got = f64::from(dot_fn(level, dtype)(&row, &x));
                    assert!(
                        got.is_finite() && ((got - reference) / magnitude).abs() < 1e-5,
                        "{} {dtype} n={n}: {got} vs {reference}",
                        level.name()
                    );
                }
            }
            for dtype in [
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::Q8_0,
                DType::Q4_0,
                DType::Q4_1,
            ] {
                for n in [32, 96, 576] {
                    let row = random_row(&mut rng, dtype, n);
                    let mut want = vec![0.0; n];
                    kernels::dequantize_row(dtype, &row, &mut want);
                    let mut got = vec![f32::NAN; n];
                    dequant_fn(level, dtype)(&row, &mut got);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                            "{} {dtype} dequant: {g} vs {w}",
                            level.name()
                        );
                    }
                }
            }
            for n in [0, 1, 7, 8, 33, 1000] {
                let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let reference: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                assert!(
                    (dot_f32(level, &a, &b) - reference).abs() < 1e-4,
                    "{} n={n}",
                    level.name()
                );
            }
        }
    }
}
