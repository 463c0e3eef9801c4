//! The attention of a decode step on CPU: one query per row (`tq == 1`), against that
//! row's keys and values read in place, in the cache's own dtype.
//!
//! Why not the general forward of [`super::attention`]: it is built for blocks of many
//! queries. With one query per row it ran a `gemm` call per (row, query head, key tile)
//! for a 1 x t product, widened every bf16/f16 cache plane to an f32 copy on every call
//! (the whole cache, every layer, every step), and read a kv head's keys once per query
//! head. That was 12% of a 4 x 8 x 128 f32 rollout and 18% of a bf16 one
//! (`LORA_KERNELS_PROFILE=1 rollout_bench`, BENCHMARKS.md). Here one task per (row, kv
//! head) reads each key and value once, widens it in registers, and serves every query
//! head of the group from it (grouped-query attention): a step reads the cache once,
//! which is what bounds it (a 4 x 8 rollout at ~110 positions holds ~100 MB of f32 keys
//! and values over the 30 layers of SmolLM2-135M).
//!
//! The mathematics of the general forward (scaled scores over the visible keys, softmax
//! with the max subtracted, `fast_exp`), in one pass over all visible keys instead of an
//! online softmax over key tiles, so the results agree to float rounding, not bit for
//! bit. A row's result depends only on its own query, keys and values (never on the
//! other rows of the batch, nor on where its planes lie).
use super::attention::Dims;
use crate::cpu::{fast_exp, Elem};
use crate::simd::isa_dispatch;
use rayon::prelude::*;

/// One row's keys (or values) of one kv head, `d` values a position: positions
/// `0..first.len() / d` in `first` (a shared prompt's plane; empty without one), the
/// rest in `second` (the row's own).
#[derive(Clone, Copy)]
pub(crate) struct RowSeq<'a, T> {
    pub first: &'a [T],
    pub second: &'a [T],
}

impl<'a, T> RowSeq<'a, T> {
    pub fn own(plane: &'a [T]) -> Self {
        RowSeq { first: &[], second: plane }
    }

    #[inline(always)]
    fn at(&self, t: usize, d: usize) -> &'a [T] {
        let split = self.first.len() / d;
        if t < split {
            &self.first[t * d..(t + 1) * d]
        } else {
            let t = t - split;
            &self.second[t * d..(t + 1) * d]
        }
    }
}

/// What one row's query heads of one kv head see: the keys and values, and the visible
/// positions `lo..hi` (`hi` = the query's own position + 1).
pub(crate) struct RowKv<'a, T> {
    pub k: RowSeq<'a, T>,
    pub v: RowSeq<'a, T>,
    pub lo: usize,
    pub hi: usize,
}

/// The output [b, hq, 1, d] and log-sum-exp [b, hq, 1] of one decode step. `q`: [b, hq,
/// 1, d] (query head h reads kv head h / (hq / hkv)); `kv(row, kv head)`: what that row's
/// group of query heads sees.
pub(crate) fn decode_step<'a, T: Elem + Lanes>(q: &[f32], dims: &Dims, scale: f32, kv: impl Fn(usize, usize) -> RowKv<'a, T> + Sync) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, hq, hkv, d, .. } = *dims;
    let rep = hq / hkv;
    let mut out = crate::cpu::uninit::<f32>(b * hq * d);
    let mut lse = vec![0f32; b * hq];
    // One task per (row, kv head): its query heads are consecutive in q, out and lse.
    out.par_chunks_mut(rep * d).zip(lse.par_chunks_mut(rep)).enumerate().for_each(|(task, (o, l))| {
        let row = kv(task / hkv, task % hkv);
        let mut probs = vec![0f32; rep * (row.hi - row.lo)];
        let q = &q[task * rep * d..(task + 1) * rep * d];
        #[cfg(target_arch = "x86_64")]
        if d.is_multiple_of(16) && tile512::available() {
            // SAFETY: the CPU has AVX-512 F/BW/VL (checked just above).
            return unsafe { tile512::group(q, &row, d, scale, &mut probs, o, l) };
        }
        group(q, &row, d, scale, &mut probs, o, l);
    });
    (out, lse)
}

/// `a . b`, `b` widened in registers: 16 lanes, then a pairwise tree over them (a
/// left-to-right sum of the lanes would be 15 dependent adds), then the tail.
#[inline(always)]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.to_f32()).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

isa_dispatch! {
    /// The query heads `q` (rep x d) of one row against one kv head: scores of every
    /// visible key (each key read once for all heads), softmax, then the values (each
    /// read once). `probs`: rep x (hi - lo) scratch; `o`: rep x d; `lse`: rep.
    fn group<T: Elem>(q: &[f32], row: &RowKv<'_, T>, d: usize, scale: f32, probs: &mut [f32], o: &mut [f32], lse: &mut [f32]) {
        let rep = lse.len();
        let n = row.hi - row.lo;
        for (j, t) in (row.lo..row.hi).enumerate() {
            let k = row.k.at(t, d);
            for h in 0..rep {
                probs[h * n + j] = scale * dot(&q[h * d..(h + 1) * d], k);
            }
        }
        for h in 0..rep {
            lse[h] = softmax_in_place(&mut probs[h * n..(h + 1) * n]);
        }
        o.fill(0.0);
        for (j, t) in (row.lo..row.hi).enumerate() {
            let v = row.v.at(t, d);
            for h in 0..rep {
                let p = probs[h * n + j];
                o[h * d..(h + 1) * d].iter_mut().zip(v).for_each(|(o, v)| *o += p * v.to_f32());
            }
        }
    }
}

/// Scores -> probabilities in place (max subtracted, `fast_exp`, scaled to sum 1);
/// returns the log-sum-exp. Inlined so it compiles in its caller's instruction set (the
/// crate's `exp_shift_sum`, called from an AVX-512 function, ran as a baseline call).
#[inline(always)]
pub(crate) fn softmax_in_place(p: &mut [f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 16];
    let mut chunks = p.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            mx[i] = mx[i].max(c[i]);
        }
    }
    let m = chunks.remainder().iter().chain(&mx).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut acc = [0f32; 16];
    let mut chunks = p.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            c[i] = fast_exp(c[i] - m);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - m);
        sum += *x;
    }
    sum += acc.iter().sum::<f32>();
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|x| *x *= inv);
    m + sum.ln()
}

/// Loads 16 consecutive elements as f32 in one zmm register.
pub(crate) trait Lanes: Copy {
    /// # Safety
    /// 16 elements from `p` are readable and the CPU has AVX-512 F/BW.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> core::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
mod lanes {
    use super::Lanes;
    use core::arch::x86_64::*;
    use half::{bf16, f16};

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
    }

    impl Lanes for bf16 {
        /// bf16 is the top half of an f32: widen the 16-bit lanes and shift them up.
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> __m512 {
            unsafe { _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)), 16)) }
        }
    }

    impl Lanes for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod lanes {
    impl super::Lanes for f32 {}
    impl super::Lanes for half::bf16 {}
    impl super::Lanes for half::f16 {}
}

/// [`group`] in AVX-512 intrinsics for head dims that are a multiple of 16 (64, 128, 256
/// in the supported models): the portable version's 16-lane arrays compiled to scalar
/// stores and reloads (`perf`: 1.5x slower than the general forward it replaced). Query
/// heads go in runs of up to 4, so a run's accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod tile512 {
    use super::{softmax_in_place, Lanes, RowKv};
    use core::arch::x86_64::*;

    /// The same condition as the projections' register tile (AVX-512 F/BW/VL, not capped
    /// by `LORA_KERNELS_ISA`, not `gemv::force_portable`).
    pub fn available() -> bool {
        crate::ops::gemv::tile_available()
    }

    /// Keys ahead of the one being scored whose cache lines are requested early: a row's
    /// keys and values come from memory (the cache of a 32-row batch does not fit in L3),
    /// and without the hint each key's load stalls its FMAs (`perf`: 70% of this
    /// function's samples on the two FMAs that consume a fresh key or value).
    const AHEAD: usize = 8;

    /// Asks for the `bytes` from `p` into the caches.
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, bytes: usize) {
        let mut o = 0;
        while o < bytes {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(o) as *const i8) };
            o += 64;
        }
    }

    /// Scores of query heads `q` (H x d) against every visible key into `probs` rows;
    /// also asks for each key's value, which the value pass reads next.
    #[inline(always)]
    unsafe fn scores<T: Lanes, const H: usize>(q: *const f32, row: &RowKv<'_, T>, d: usize, scale: f32, probs: &mut [f32], n: usize) {
        let bytes = d * std::mem::size_of::<T>();
        unsafe {
            for (j, t) in (row.lo..row.hi).enumerate() {
                if t + AHEAD < row.hi {
                    prefetch(row.k.at(t + AHEAD, d).as_ptr() as *const u8, bytes);
                }
                prefetch(row.v.at(t, d).as_ptr() as *const u8, bytes);
                let k = row.k.at(t, d).as_ptr();
                let mut acc = [_mm512_setzero_ps(); H];
                let mut c = 0;
                while c < d {
                    let kv = T::load16(k.add(c));
                    for h in 0..H {
                        acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(h * d + c)), kv, acc[h]);
                    }
                    c += 16;
                }
                for h in 0..H {
                    *probs.get_unchecked_mut(h * n + j) = scale * _mm512_reduce_add_ps(acc[h]);
                }
            }
        }
    }

    /// Columns `c0..c0 + 16 C` of o (H x d) = the probabilities' rows (H x n) times the
    /// visible values: H x C accumulators (at most 16 registers), each value chunk read
    /// once for the H heads, the keys walked once in order.
    #[inline(always)]
    unsafe fn values<T: Lanes, const H: usize, const C: usize>(probs: &[f32], n: usize, row: &RowKv<'_, T>, d: usize, c0: usize, o: *mut f32) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; H];
            for (j, t) in (row.lo..row.hi).enumerate() {
                let v = row.v.at(t, d).as_ptr().add(c0);
                let mut p = [_mm512_setzero_ps(); H];
                for h in 0..H {
                    p[h] = _mm512_set1_ps(*probs.get_unchecked(h * n + j));
                }
                for c in 0..C {
                    let vv = T::load16(v.add(16 * c));
                    for h in 0..H {
                        acc[h][c] = _mm512_fmadd_ps(p[h], vv, acc[h][c]);
                    }
                }
            }
            for h in 0..H {
                for c in 0..C {
                    _mm512_storeu_ps(o.add(h * d + c0 + 16 * c), acc[h][c]);
                }
            }
        }
    }

    /// All columns of heads `h..h + H` of o: 64 at a time, then 16 at a time.
    #[inline(always)]
    unsafe fn values_heads<T: Lanes, const H: usize>(probs: &[f32], n: usize, row: &RowKv<'_, T>, d: usize, o: *mut f32) {
        let mut c0 = 0;
        unsafe {
            while c0 + 64 <= d {
                values::<T, H, 4>(probs, n, row, d, c0, o);
                c0 += 64;
            }
            while c0 < d {
                values::<T, H, 1>(probs, n, row, d, c0, o);
                c0 += 16;
            }
        }
    }

    /// As the portable `group`; `d` a multiple of 16.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL ([`available`]); `q` and `o` hold lse.len() x d,
    /// `probs` lse.len() x (hi - lo), and every visible position has d elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn group<T: Lanes>(q: &[f32], row: &RowKv<'_, T>, d: usize, scale: f32, probs: &mut [f32], o: &mut [f32], lse: &mut [f32]) {
        let rep = lse.len();
        let n = row.hi - row.lo;
        debug_assert!(d.is_multiple_of(16) && q.len() >= rep * d && o.len() >= rep * d && probs.len() >= rep * n);
        let mut h = 0;
        while h < rep {
            let (qh, ph) = (q[h * d..].as_ptr(), &mut probs[h * n..]);
            // SAFETY: heads h.. fit q and probs (the caller's sizes).
            let took = unsafe {
                match rep - h {
                    1 => { scores::<T, 1>(qh, row, d, scale, ph, n); 1 }
                    2 => { scores::<T, 2>(qh, row, d, scale, ph, n); 2 }
                    3 => { scores::<T, 3>(qh, row, d, scale, ph, n); 3 }
                    _ => { scores::<T, 4>(qh, row, d, scale, ph, n); 4 }
                }
            };
            h += took;
        }
        for h in 0..rep {
            lse[h] = softmax_in_place(&mut probs[h * n..(h + 1) * n]);
        }
        let mut h = 0;
        while h < rep {
            let (ph, oh) = (&probs[h * n..], o[h * d..].as_mut_ptr());
            // SAFETY: as above, for o.
            let took = unsafe {
                match rep - h {
                    1 => { values_heads::<T, 1>(ph, n, row, d, oh); 1 }
                    2 => { values_heads::<T, 2>(ph, n, row, d, oh); 2 }
                    3 => { values_heads::<T, 3>(ph, n, row, d, oh); 3 }
                    _ => { values_heads::<T, 4>(ph, n, row, d, oh); 4 }
                }
            };
            h += took;
        }
    }
}

/// The first position of the contiguous run of equal segment ids that ends the sequence
/// `first` followed by `second` (0 when both are empty): the first key a decode step's
/// query (the last position) sees.
pub(crate) fn last_run_start(first: &[u32], second: &[u32]) -> usize {
    let total = first.len() + second.len();
    let Some(&last) = second.last().or(first.last()) else { return 0 };
    total - second.iter().rev().chain(first.iter().rev()).take_while(|&&id| id == last).count()
}

#[cfg(test)]
mod tests {
    use super::last_run_start;

    #[test]
    fn the_last_run_starts_where_its_ids_begin() {
        assert_eq!(last_run_start(&[], &[]), 0);
        assert_eq!(last_run_start(&[1, 1, 2], &[2, 2]), 2);
        assert_eq!(last_run_start(&[1, 1, 1], &[]), 0);
        assert_eq!(last_run_start(&[0, 1], &[2]), 2);
        assert_eq!(last_run_start(&[], &[3, 3]), 0);
        // A run that breaks and resumes counts from its last start only.
        assert_eq!(last_run_start(&[5, 6, 5], &[5]), 2);
    }
}
