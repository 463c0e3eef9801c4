//! Decode-time fast path of the frozen projections: a handful of token rows against
//! `W` [out, in], read once and in its own dtype.
//!
//! With one token per step the projection is a matrix-vector product bound by memory
//! traffic. The general path widens a bf16 `W` to an f32 copy on every call (3x the
//! bytes of just reading it) and hands gemm a shape it is not tuned for; here each
//! output row is one streaming dot product, bf16 widened in registers.
use candle_core::{CpuStorage, Layout};
use half::bf16;
use rayon::prelude::*;

/// Use the fast path up to this many rows (a decode step has one row per sequence).
pub const MAX_ROWS: usize = 8;
/// Output rows per rayon task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 64;

/// Row-major weight storage the fast path reads directly.
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Weights<'a> {
    pub fn from_storage(s: &'a CpuStorage, l: &Layout) -> Option<Self> {
        let (start, end) = l.contiguous_offsets()?;
        match s {
            CpuStorage::F32(v) => Some(Weights::F32(&v[start..end])),
            CpuStorage::BF16(v) => Some(Weights::Bf16(&v[start..end])),
            _ => None,
        }
    }
}

#[inline(always)]
fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    // 16 independent accumulators so the loop vectorises without reassociation.
    let mut acc = [0f32; 16];
    let (xc, wc) = (x.chunks_exact(16), w.chunks_exact(16));
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for i in 0..16 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in xr.iter().zip(wr) {
        s += a * b;
    }
    s
}

#[inline(always)]
fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 {
    let mut acc = [0f32; 16];
    let (xc, wc) = (x.chunks_exact(16), w.chunks_exact(16));
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for i in 0..16 {
            // bf16 -> f32 is a 16-bit shift of the bits.
            acc[i] += a[i] * f32::from_bits((b[i].to_bits() as u32) << 16);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in xr.iter().zip(wr) {
        s += a * b.to_f32();
    }
    s
}

/// `y[r, j] (+)= sum_k x[r, k] W[j, k]` for `n <= MAX_ROWS` rows; `y` is [n, out].
pub fn gemv_rows(x: &[f32], n: usize, k: usize, w: &Weights, out: usize, y: &mut [f32], accumulate: bool) {
    // Computed transposed ([out, n]) so each task owns a contiguous block.
    let mut yt = vec![0f32; out * n];
    yt.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, block)| {
        for (jj, cell) in block.chunks_mut(n).enumerate() {
            let j = task * ROWS_PER_TASK + jj;
            for (r, c) in cell.iter_mut().enumerate() {
                let xr = &x[r * k..(r + 1) * k];
                *c = match w {
                    Weights::F32(v) => dot_f32(xr, &v[j * k..(j + 1) * k]),
                    Weights::Bf16(v) => dot_bf16(xr, &v[j * k..(j + 1) * k]),
                };
            }
        }
    });
    for r in 0..n {
        for j in 0..out {
            let v = yt[j * n + r];
            if accumulate {
                y[r * out + j] += v;
            } else {
                y[r * out + j] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], n: usize, k: usize, w: &[f32], out: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * out];
        for r in 0..n {
            for j in 0..out {
                y[r * out + j] = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matches_naive_f32_and_bf16_with_accumulation() {
        for &(n, k, out) in &[(1, 37, 5), (3, 576, 130), (8, 100, 64)] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let w: Vec<f32> = (0..out * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0).collect();
            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            let wb_f32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            for (weights, wref) in [(Weights::F32(&w), &w), (Weights::Bf16(&wb), &wb_f32)] {
                let expect = naive(&x, n, k, wref, out);
                let mut y = vec![1f32; n * out];
                gemv_rows(&x, n, k, &weights, out, &mut y, true);
                for (a, b) in y.iter().zip(&expect) {
                    assert!((a - (b + 1.0)).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {}", b + 1.0);
                }
                gemv_rows(&x, n, k, &weights, out, &mut y, false);
                for (a, b) in y.iter().zip(&expect) {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()));
                }
            }
        }
    }
}
