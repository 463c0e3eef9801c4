//! Decode-time fast path of the frozen projections: a few token rows (one per sequence
//! of a decode batch, up to [`fast_rows`]) against `W` [out, in], read once and in its
//! own dtype.
//!
//! With a few rows the projection is bound by reading `W`. The general path widens a
//! bf16 `W` to an f32 copy on every call (3x the bytes of just reading it) and packs `W`
//! into the `gemm` crate's panels on every call. Here each task owns a block of output
//! columns (rows of `W`, streamed from memory once) and computes them for every token
//! row, 4 rows of `W` (kept in L1) against one token row at a time, 16 lanes each; bf16
//! is widened in registers. That inner step loads 5 vectors for 4 FMAs, so it plateaus
//! near 40 GFLOP/s on 2 cores, where sgemm's register-blocked kernel reaches 100+: past
//! [`fast_rows`] the general path is faster. A 4 x 4 tile (4 rows of `W` x 4 token rows)
//! written as arrays of accumulators ran 5-10x slower (LLVM kept them in memory); a tile
//! in explicit intrinsics is what would lift the plateau.
//!
//! Every output is the same 16-lane dot product whatever the number of rows or the tile
//! it falls in (lane sums in one order, then the tail), so a row's result never depends
//! on its batch-mates: decoding R rows at once gives each row the bits it gets alone.
use candle_core::{CpuStorage, Layout};
use half::bf16;
use rayon::prelude::*;

use crate::simd::isa_dispatch;

/// Up to where the fast path beats the general one (`gemm_bench --decode 1`,
/// BENCHMARKS.md): with f32 weights sgemm's packed kernel wins past about 8 rows; with
/// bf16 weights, which the general path first widens to an f32 copy, past about 16.
const FAST_ROWS_F32: usize = 8;
const FAST_ROWS_BF16: usize = 16;

/// How many rows take the fast path for weights of this kind (`bf16`: stored bf16 and
/// not multiplied by the bf16 dot-product kernel), capped by `LORA_KERNELS_DECODE_ROWS=N`
/// (N = 8 is the limit before bf16 weights got their own).
pub fn fast_rows(bf16: bool) -> usize {
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cap = *CAP.get_or_init(|| std::env::var("LORA_KERNELS_DECODE_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX));
    cap.min(if bf16 { FAST_ROWS_BF16 } else { FAST_ROWS_F32 })
}

/// Rows of `W` (output columns) per rayon task: enough work to amortise scheduling.
const W_ROWS_PER_TASK: usize = 64;
/// Token rows walked together: 16 rows x 1536 features x 4 bytes stay inside L1.
const X_ROWS_PER_BLOCK: usize = 16;
const LANES: usize = 16;

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

/// A weight element, widened to f32 in registers.
pub trait Elem: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 -> f32 is a 16-bit shift of the bits.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// `y` [n, ld], written by several tasks at disjoint columns.
pub struct Out {
    ptr: *mut f32,
    ld: usize,
    len: usize,
}

// SAFETY: tasks write disjoint elements (see `put`), so sharing the pointer is sound.
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// No other thread may access element (r, j) during the call: [`gemv_rows`] gives
    /// each task its own columns.
    #[inline(always)]
    unsafe fn put(&self, r: usize, j: usize, v: f32, accumulate: bool) {
        let idx = r * self.ld + j;
        assert!(idx < self.len, "gemv output index out of bounds");
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        let p = unsafe { self.ptr.add(idx) };
        unsafe {
            if accumulate {
                *p += v;
            } else {
                *p = v;
            }
        }
    }
}

/// `y[r, j] (+)= sum_k x[r, k] W[j, k]` for `n` rows (any number: past [`fast_rows`] the
/// general path is faster); `y` is [n, out].
pub fn gemv_rows(x: &[f32], n: usize, k: usize, w: &Weights, out: usize, y: &mut [f32], accumulate: bool) {
    assert!(x.len() >= n * k && y.len() >= n * out, "gemv_rows: buffers too small for {n} x {k} -> {out}");
    match w {
        Weights::F32(v) => rows::<f32>(x, n, k, v, out, y, accumulate),
        Weights::Bf16(v) => rows::<bf16>(x, n, k, v, out, y, accumulate),
    }
}

fn rows<E: Elem>(x: &[f32], n: usize, k: usize, w: &[E], out: usize, y: &mut [f32], accumulate: bool) {
    assert!(w.len() >= out * k, "gemv_rows: weight too small for {out} x {k}");
    let y = Out { ptr: y.as_mut_ptr(), ld: out, len: y.len() };
    (0..out.div_ceil(W_ROWS_PER_TASK)).into_par_iter().for_each(|task| {
        let j0 = task * W_ROWS_PER_TASK;
        column_block(x, n, k, w, j0, (j0 + W_ROWS_PER_TASK).min(out), &y, accumulate);
    });
}

isa_dispatch! {
    /// Columns `j0..j1` of `y` for every row, 4 rows of `W` against one token row at a
    /// time, the edge columns one by one.
    #[allow(clippy::too_many_arguments)]
    fn column_block<E: Elem>(x: &[f32], n: usize, k: usize, w: &[E], j0: usize, j1: usize, y: &Out, accumulate: bool) {
        let full = j0 + (j1 - j0) / 4 * 4;
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + X_ROWS_PER_BLOCK).min(n);
            let mut j = j0;
            while j < full {
                for r in r0..r1 {
                    tile::<4, 1, E>(x, k, w, j, r, y, accumulate);
                }
                j += 4;
            }
            for j in full..j1 {
                for r in r0..r1 {
                    tile::<1, 1, E>(x, k, w, j, r, y, accumulate);
                }
            }
            r0 = r1;
        }
    }
}

/// Rows `j..j + J` of `W` against token rows `r..r + R`: J x R dot products of 16 lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const J: usize, const R: usize, E: Elem>(x: &[f32], k: usize, w: &[E], j: usize, r: usize, y: &Out, accumulate: bool) {
    let mut ws: [&[E]; J] = [&[]; J];
    for (a, s) in ws.iter_mut().enumerate() {
        *s = &w[(j + a) * k..(j + a + 1) * k];
    }
    let mut xs: [&[f32]; R] = [&[]; R];
    for (b, s) in xs.iter_mut().enumerate() {
        *s = &x[(r + b) * k..(r + b + 1) * k];
    }
    let mut acc = [[[0f32; LANES]; R]; J];
    let chunks = k / LANES;
    for c in 0..chunks {
        let i = c * LANES;
        let mut wv = [[0f32; LANES]; J];
        for a in 0..J {
            let s = &ws[a][i..i + LANES];
            for l in 0..LANES {
                wv[a][l] = s[l].widen();
            }
        }
        for b in 0..R {
            let xv = &xs[b][i..i + LANES];
            for a in 0..J {
                for l in 0..LANES {
                    acc[a][b][l] += xv[l] * wv[a][l];
                }
            }
        }
    }
    for a in 0..J {
        for b in 0..R {
            let mut s: f32 = acc[a][b].iter().sum();
            for i in chunks * LANES..k {
                s += xs[b][i] * ws[a][i].widen();
            }
            // SAFETY: column j + a belongs to this task alone (`rows`).
            unsafe { y.put(r + b, j + a, s, accumulate) };
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
        for &(n, k, out) in &[(1, 37, 5), (3, 576, 130), (8, 100, 64), (37, 70, 131), (256, 48, 9)] {
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

    #[test]
    fn a_row_gets_the_same_bits_alone_as_in_any_batch() {
        let (n, k, out) = (23, 150, 67);
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 333.0).collect();
        let w: Vec<f32> = (0..out * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 251.0).collect();
        let mut all = vec![0f32; n * out];
        gemv_rows(&x, n, k, &Weights::F32(&w), out, &mut all, false);
        for r in 0..n {
            let mut alone = vec![0f32; out];
            gemv_rows(&x[r * k..(r + 1) * k], 1, k, &Weights::F32(&w), out, &mut alone, false);
            assert_eq!(alone, all[r * out..(r + 1) * out], "row {r}");
        }
    }
}
