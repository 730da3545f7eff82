//! CPU kernels: dot products and dequantization for every weight dtype, activations in f32.
//!
//! Plain, portable code written so the compiler can vectorize the inner loops (independent
//! accumulators, fixed-size chunks). Quantized rows are never expanded in memory: each block is
//! dequantized inside the dot product, so results match a dequantize-then-multiply reference up
//! to f32 rounding. The performance work replaces these bodies, not their signatures.

// Kernels index lanes explicitly: that is the shape the vectorizer needs.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

use crate::model::DType;

const LANES: usize = 8;

/// Dot product of two f32 slices of equal length.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (
            &a[c * LANES..c * LANES + LANES],
            &b[c * LANES..c * LANES + LANES],
        );
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * LANES..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[i], bytes[i + 1]]).to_f32()
}

/// Dot product of one weight row (in its stored dtype) with f32 activations.
/// `row.len()` must be the row's bytes for `x.len()` elements.
pub fn dot(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    match dtype {
        DType::F32 => {
            let mut acc = [0.0f32; LANES];
            let chunks = x.len() / LANES;
            for c in 0..chunks {
                for l in 0..LANES {
                    let i = c * LANES + l;
                    let w = f32::from_le_bytes([
                        row[4 * i],
                        row[4 * i + 1],
                        row[4 * i + 2],
                        row[4 * i + 3],
                    ]);
                    acc[l] += w * x[i];
                }
            }
            let mut sum: f32 = acc.iter().sum();
            for i in chunks * LANES..x.len() {
                sum += f32::from_le_bytes([
                    row[4 * i],
                    row[4 * i + 1],
                    row[4 * i + 2],
                    row[4 * i + 3],
                ]) * x[i];
            }
            sum
        }
        DType::BF16 | DType::F16 => {
            let convert = |i: usize| match dtype {
                DType::BF16 => bf16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
                _ => f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
            };
            let mut acc = [0.0f32; LANES];
            let chunks = x.len() / LANES;
            for c in 0..chunks {
                for l in 0..LANES {
                    let i = c * LANES + l;
                    acc[l] += convert(i) * x[i];
                }
            }
            let mut sum: f32 = acc.iter().sum();
            for i in chunks * LANES..x.len() {
                sum += convert(i) * x[i];
            }
            sum
        }
        DType::Q8_0 => {
            let mut sum = 0.0f32;
            for (b, xs) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
                let d = f16_at(b, 0);
                let mut acc = [0.0f32; LANES];
                for c in 0..4 {
                    for l in 0..LANES {
                        let i = c * LANES + l;
                        acc[l] += f32::from(b[2 + i] as i8) * xs[i];
                    }
                }
                sum += d * acc.iter().sum::<f32>();
            }
            sum
        }
        DType::Q4_0 | DType::Q4_1 => {
            let block = dtype.block_bytes();
            let quants_at = if dtype == DType::Q4_0 { 2 } else { 4 };
            let mut sum = 0.0f32;
            for (b, xs) in row.chunks_exact(block).zip(x.chunks_exact(32)) {
                let d = f16_at(b, 0);
                let q = &b[quants_at..quants_at + 16];
                // Low nibbles are elements 0..16, high nibbles 16..32.
                let mut acc_lo = [0.0f32; LANES];
                let mut acc_hi = [0.0f32; LANES];
                for c in 0..2 {
                    for l in 0..LANES {
                        let i = c * LANES + l;
                        acc_lo[l] += f32::from(q[i] & 0x0f) * xs[i];
                        acc_hi[l] += f32::from(q[i] >> 4) * xs[i + 16];
                    }
                }
                let qx = acc_lo.iter().sum::<f32>() + acc_hi.iter().sum::<f32>();
                if dtype == DType::Q4_0 {
                    let xsum: f32 = xs.iter().sum();
                    sum += d * (qx - 8.0 * xsum);
                } else {
                    let m = f16_at(b, 2);
                    let xsum: f32 = xs.iter().sum();
                    sum += d * qx + m * xsum;
                }
            }
            sum
        }
    }
}

/// Expands a row (or any whole number of blocks) into f32.
pub fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (i, v) in o.iter_mut().enumerate() {
                    *v = d * f32::from(b[2 + i] as i8);
                }
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let block = dtype.block_bytes();
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(block)) {
                let d = f16_at(b, 0);
                let (m, offset, q) = match dtype {
                    DType::Q4_0 => (0.0, 8.0, &b[2..18]),
                    _ => (f16_at(b, 2), 0.0, &b[4..20]),
                };
                for i in 0..16 {
                    o[i] = d * (f32::from(q[i] & 0x0f) - offset) + m;
                    o[i + 16] = d * (f32::from(q[i] >> 4) - offset) + m;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};

    /// Quantizes like ggml's reference quantizers, to make test rows (an independent
    /// round trip: the kernels must agree with dequantize-then-multiply).
    fn quantize(dtype: DType, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in values.chunks(32) {
            match dtype {
                DType::Q8_0 => {
                    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
                }
                DType::Q4_0 => {
                    let max = block
                        .iter()
                        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    for i in 0..16 {
                        let lo = ((block[i] * id + 8.5) as u8).min(15);
                        let hi = ((block[i + 16] * id + 8.5) as u8).min(15);
                        out.push(lo | (hi << 4));
                    }
                }
                DType::Q4_1 => {
                    let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                    let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    for i in 0..16 {
                        let lo = (((block[i] - min) * id + 0.5) as u8).min(15);
                        let hi = (((block[i + 16] - min) * id + 0.5) as u8).min(15);
                        out.push(lo | (hi << 4));
                    }
                }
                _ => unreachable!("not a quantized type"),
            }
        }
        out
    }

    fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
        match dtype {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            q => quantize(q, values),
        }
    }

    #[test]
    fn dot_matches_dequantize_then_multiply_for_every_dtype_and_awkward_length() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for dtype in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
        ] {
            let lengths: &[usize] = if dtype.is_quantized() {
                &[32, 64, 96, 576]
            } else {
                &[1, 7, 8, 9, 31, 33, 100, 577]
            };
            for &n in lengths {
                let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let bytes = encode(dtype, &w);
                let mut deq = vec![0.0; n];
                dequantize_row(dtype, &bytes, &mut deq);
                // Float64 reference over the dequantized weights.
                let reference: f64 = deq
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let got = dot(dtype, &bytes, &x);
                let scale: f64 = deq
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
                    .sum::<f64>()
                    .max(1e-6);
                assert!(
                    ((f64::from(got) - reference) / scale).abs() < 1e-5,
                    "{dtype} n={n}: {got} vs {reference}"
                );
                // And dequantization stays close to the original values.
                let tolerance = match dtype {
                    DType::F32 => 0.0,
                    DType::F16 => 1e-3,
                    DType::BF16 => 1e-2,
                    DType::Q8_0 => 1e-2,
                    _ => 0.15,
                };
                for (a, b) in deq.iter().zip(&w) {
                    assert!((a - b).abs() <= tolerance, "{dtype}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn q4_nibble_layout_is_low_half_then_high_half() {
        // One Q4_1 block: d = 1, m = 0, nibble i (low) = i % 16, high = 15 - i % 16.
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
        block.extend_from_slice(&f16::from_f32(0.0).to_le_bytes());
        for i in 0..16u8 {
            block.push(i | ((15 - i) << 4));
        }
        let mut out = [0.0f32; 32];
        dequantize_row(DType::Q4_1, &block, &mut out);
        for i in 0..16 {
            assert_eq!(out[i], i as f32);
            assert_eq!(out[i + 16], (15 - i) as f32);
        }
    }
}
