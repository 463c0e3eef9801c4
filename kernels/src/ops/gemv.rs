//! Decode-time path of the frozen projections: a few to a few hundred token rows (one per
//! sequence of a decode batch, up to [`fast_rows`]) against `W` [out, in], read in place
//! and in its own dtype, never packed.
//!
//! With few rows the projection is bound by reading `W`. The general path widens a bf16
//! `W` to an f32 copy on every call (3x the bytes of just reading it) and packs `W` into
//! the `gemm` crate's panels on every call. Here each task owns a block of output columns
//! (rows of `W`, streamed once per block of token rows) and computes them for every token
//! row, in dot-product form: both operands run along the reduction dim, 16 lanes (32 bf16
//! for `vdpbf16ps`) per step, horizontal sums at the end.
//!
//! **The AVX-512 register tile** (`tile512`, used when the CPU has AVX-512 F/BW/VL and
//! `LORA_KERNELS_ISA` does not cap it): 4 rows of `W` x 6 token rows = 24 zmm
//! accumulators; each step loads 4 `W` vectors and 6 token vectors for 24 FMAs (29 of the
//! 32 registers), the reduction tail as one more step with masked loads (zeros past `k`,
//! nothing read beyond the row), then one horizontal sum per output. Three variants: f32 `W` (`vfmadd`); bf16 `W` widened in
//! registers (a 16-bit shift) against f32 rows, which stay f32; and bf16 rows x bf16 `W`
//! on `vdpbf16ps` where [`crate::cpu::use_bf16_dot`] picks the bf16 kernel: 32
//! consecutive bf16 of a row are already the pairs the instruction wants, so only the
//! rows are converted to bf16 once per call (exact: they hold bf16 values). The tile is
//! written in intrinsics because the same tile written as arrays of scalar accumulators
//! ran 5-10x slower (LLVM kept them in memory), and the portable step below (4 rows of
//! `W` against one token row) loads 5 vectors for 4 FMAs and plateaus near 40-50
//! GFLOP/s on a 2-vCPU Zen 4 host. There the tile reaches 90-105 GFLOP/s in f32 and
//! 150-200 with `vdpbf16ps` (`gemm_bench --decode 1`, BENCHMARKS.md "Many-row decoding"),
//! and on the SmolLM2 decode shapes beats the general path (sgemm, widen + sgemm, the
//! vdpbf16ps GEMM, which pack per call) from 2 rows to 128 on every shape; at 256 sgemm
//! is within 5% ahead on three shapes and 33% behind on `down`, the tile still ahead
//! over a layer; so the limits are 256 rows for all three variants. Products under 1 M
//! multiply-adds (one token row) run on the calling thread: waking the pool cost more
//! (q/o at one row: 37 GFLOP/s serial, 14-20 through rayon).
//!
//! **The portable path** (hosts without AVX-512, compiled through `isa_dispatch!`): 4
//! rows of `W` against one token row at a time, 16 lanes each, bf16 widened in
//! registers, the reduction tail scalar; limits 8 rows (f32 `W`: sgemm's packed kernel
//! wins past that) and 16 (bf16 `W`, which the general path first widens); bf16 x bf16
//! computes here as bf16 widened, up to 8 rows. [`force_portable`] selects it on any
//! host (tests, `gemm_bench`). `LORA_KERNELS_DECODE_ROWS=N` caps both paths' limits.
//!
//! Every output is the same arithmetic whatever the number of rows or the tile it falls
//! in (one accumulator over the chunks in order, the masked last chunk, one horizontal
//! sum; the portable path: lane sums in one order, then the tail), so a row's result
//! never depends on its batch-mates: decoding R rows at once gives each row the bits it
//! gets alone (tested for each variant and both paths).
use candle_core::{CpuStorage, Layout};
use half::bf16;
use rayon::prelude::*;
use std::cell::Cell;

use crate::simd::isa_dispatch;

/// The arithmetic of a frozen product, which picks the kernel and its row limit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// f32 `W`, f32 rows.
    F32,
    /// bf16 `W` widened to f32 in registers, f32 rows (f32 compute).
    Bf16Widened,
    /// bf16 `W` times bf16 rows on `vdpbf16ps` ([`crate::cpu::use_bf16_dot`]).
    Bf16Dot,
}

/// Limits of the AVX-512 register tile (`gemm_bench --decode 1`, BENCHMARKS.md).
const TILE_ROWS_F32: usize = 256;
const TILE_ROWS_BF16: usize = 256;
const TILE_ROWS_BF16_DOT: usize = 256;
/// Limits of the portable path (hosts without AVX-512, `LORA_KERNELS_ISA=avx2`): with
/// f32 weights sgemm's packed kernel wins past about 8 rows; with bf16 weights, which
/// the general path first widens to an f32 copy, past about 16; bf16 x bf16 computes
/// here as bf16 widened (as before the tile) up to 8.
const FAST_ROWS_F32: usize = 8;
const FAST_ROWS_BF16: usize = 16;
const FAST_ROWS_BF16_DOT: usize = 8;

/// How many rows take the decode path for a product of this kind, capped by
/// `LORA_KERNELS_DECODE_ROWS=N` (N = 8 is the limit before bf16 weights got their own).
pub fn fast_rows(kind: Kind) -> usize {
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cap = *CAP.get_or_init(|| std::env::var("LORA_KERNELS_DECODE_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX));
    let limit = match (tile_available(), kind) {
        (true, Kind::F32) => TILE_ROWS_F32,
        (true, Kind::Bf16Widened) => TILE_ROWS_BF16,
        (true, Kind::Bf16Dot) if crate::gemm_bf16::available() => TILE_ROWS_BF16_DOT,
        (_, Kind::F32) => FAST_ROWS_F32,
        (_, Kind::Bf16Widened) => FAST_ROWS_BF16,
        (_, Kind::Bf16Dot) => FAST_ROWS_BF16_DOT,
    };
    cap.min(limit)
}

thread_local! {
    static FORCE_PORTABLE: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the AVX-512 tile switched off on the calling thread: the portable path
/// (what hosts without AVX-512 run) computes, so its tests run on any host.
pub fn force_portable<R>(f: impl FnOnce() -> R) -> R {
    let prev = FORCE_PORTABLE.with(|c| c.replace(true));
    let r = f();
    FORCE_PORTABLE.with(|c| c.set(prev));
    r
}

/// Whether the AVX-512 register tile runs on this thread: the CPU has AVX-512 F/BW/VL,
/// `LORA_KERNELS_ISA` does not cap it, and [`force_portable`] is not in effect.
pub fn tile_available() -> bool {
    !FORCE_PORTABLE.with(|c| c.get()) && crate::simd::isa() == crate::simd::Isa::Avx512 && cpu_has_bw_vl()
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_bw_vl() -> bool {
    static BW_VL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *BW_VL.get_or_init(|| is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl"))
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_bw_vl() -> bool {
    false
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
/// general path is faster); `y` is [n, out]. f32 arithmetic: a bf16 `W` is widened.
pub fn gemv_rows(x: &[f32], n: usize, k: usize, w: &Weights, out: usize, y: &mut [f32], accumulate: bool) {
    assert!(x.len() >= n * k && y.len() >= n * out, "gemv_rows: buffers too small for {n} x {k} -> {out}");
    #[cfg(target_arch = "x86_64")]
    if tile_available() {
        match w {
            Weights::F32(v) => tile512::rows_f32(x, n, k, v, out, y, accumulate),
            Weights::Bf16(v) => tile512::rows_bf16(x, n, k, v, out, y, accumulate),
        }
        return;
    }
    match w {
        Weights::F32(v) => rows::<f32>(x, n, k, v, out, y, accumulate),
        Weights::Bf16(v) => rows::<bf16>(x, n, k, v, out, y, accumulate),
    }
}

/// As [`gemv_rows`] for bf16 rows (`x` holds bf16 values as f32; others are rounded to
/// bf16, nearest even) and a bf16 `W`, on `vdpbf16ps` when [`tile_available`] and
/// [`crate::gemm_bf16::available`]; otherwise `W` is widened and the rows stay f32.
pub fn gemv_rows_bf16_dot(x: &[f32], n: usize, k: usize, w: &[bf16], out: usize, y: &mut [f32], accumulate: bool) {
    assert!(x.len() >= n * k && y.len() >= n * out, "gemv_rows: buffers too small for {n} x {k} -> {out}");
    #[cfg(target_arch = "x86_64")]
    if tile_available() && crate::gemm_bf16::available() {
        return tile512::rows_dot(x, n, k, w, out, y, accumulate);
    }
    gemv_rows(x, n, k, &Weights::Bf16(w), out, y, accumulate)
}

/// The portable path: `W` rows per task, 4 rows of `W` against one token row.
fn rows<E: Elem>(x: &[f32], n: usize, k: usize, w: &[E], out: usize, y: &mut [f32], accumulate: bool) {
    assert!(w.len() >= out * k, "gemv_rows: weight too small for {out} x {k}");
    let y = Out { ptr: y.as_mut_ptr(), ld: out, len: y.len() };
    (0..out.div_ceil(W_ROWS_PER_TASK)).into_par_iter().for_each(|task| {
        let j0 = task * W_ROWS_PER_TASK;
        column_block(x, n, k, w, j0, (j0 + W_ROWS_PER_TASK).min(out), &y, accumulate);
    });
}

/// The AVX-512 register tile: 4 rows of `W` x 6 token rows in 24 zmm accumulators.
#[cfg(target_arch = "x86_64")]
mod tile512 {
    use super::Out;
    use core::arch::x86_64::*;
    use half::bf16;
    use rayon::prelude::*;

    /// Rows of `W` per tile.
    const TJ: usize = 4;
    /// Token rows per tile: 4 x 6 = 24 accumulators, + 4 `W` vectors + 1 token vector
    /// = 29 of the 32 zmm registers.
    const TR: usize = 6;
    /// Token rows walked against each `W` tile: as many as fit in this many bytes (L2).
    const X_BLOCK_BYTES: usize = 128 * 1024;
    /// Products up to this many multiply-adds run on the calling thread: waking the
    /// other threads costs more than the work (one token row of a 576 x 1536 projection
    /// is 0.9 M).
    const SERIAL_MACS: usize = 1 << 20;

    /// How one variant loads a chunk of a `W` row and of a token row and multiplies them.
    trait Arith {
        type W: Copy + Sync;
        type X: Copy + Sync;
        type V: Copy;
        /// Reduction elements per chunk.
        const STEP: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load_w(p: *const Self::W) -> Self::V;
        /// The first `n` < STEP elements, zeros after (reads nothing past them).
        unsafe fn load_w_tail(p: *const Self::W, n: usize) -> Self::V;
        unsafe fn load_x(p: *const Self::X) -> Self::V;
        unsafe fn load_x_tail(p: *const Self::X, n: usize) -> Self::V;
        unsafe fn fma(acc: __m512, x: Self::V, w: Self::V) -> __m512;
    }

    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    #[inline(always)]
    fn mask32(n: usize) -> __mmask32 {
        ((1u64 << n) - 1) as __mmask32
    }

    /// f32 rows, f32 `W`.
    struct F32;
    impl Arith for F32 {
        type W = f32;
        type X = f32;
        type V = __m512;
        const STEP: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_w(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_w_tail(p: *const f32, n: usize) -> __m512 {
            unsafe { _mm512_maskz_loadu_ps(mask16(n), p) }
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_x_tail(p: *const f32, n: usize) -> __m512 {
            unsafe { _mm512_maskz_loadu_ps(mask16(n), p) }
        }
        #[inline(always)]
        unsafe fn fma(acc: __m512, x: __m512, w: __m512) -> __m512 {
            _mm512_fmadd_ps(x, w, acc)
        }
    }

    /// f32 rows, bf16 `W` widened in registers (bf16 -> f32 is a 16-bit shift).
    struct Widened;
    impl Widened {
        #[inline(always)]
        unsafe fn widen(h: __m256i) -> __m512 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
    impl Arith for Widened {
        type W = bf16;
        type X = f32;
        type V = __m512;
        const STEP: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_w(p: *const bf16) -> __m512 {
            unsafe { Self::widen(_mm256_loadu_si256(p as *const __m256i)) }
        }
        #[inline(always)]
        unsafe fn load_w_tail(p: *const bf16, n: usize) -> __m512 {
            unsafe { Self::widen(_mm256_maskz_loadu_epi16(mask16(n), p as *const i16)) }
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_x_tail(p: *const f32, n: usize) -> __m512 {
            unsafe { _mm512_maskz_loadu_ps(mask16(n), p) }
        }
        #[inline(always)]
        unsafe fn fma(acc: __m512, x: __m512, w: __m512) -> __m512 {
            _mm512_fmadd_ps(x, w, acc)
        }
    }

    /// bf16 rows, bf16 `W` on `vdpbf16ps`: both rows run along the reduction dim, so 32
    /// consecutive bf16 are already the pairs the instruction multiplies.
    struct Dot;
    impl Arith for Dot {
        type W = bf16;
        type X = u16;
        type V = __m512bh;
        const STEP: usize = 32;
        #[inline(always)]
        unsafe fn zero() -> __m512bh {
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()) }
        }
        #[inline(always)]
        unsafe fn load_w(p: *const bf16) -> __m512bh {
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)) }
        }
        #[inline(always)]
        unsafe fn load_w_tail(p: *const bf16, n: usize) -> __m512bh {
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask32(n), p as *const i16)) }
        }
        #[inline(always)]
        unsafe fn load_x(p: *const u16) -> __m512bh {
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)) }
        }
        #[inline(always)]
        unsafe fn load_x_tail(p: *const u16, n: usize) -> __m512bh {
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask32(n), p as *const i16)) }
        }
        #[inline(always)]
        unsafe fn fma(acc: __m512, x: __m512bh, w: __m512bh) -> __m512 {
            _mm512_dpbf16_ps(acc, x, w)
        }
    }

    /// The lane of [`reduce16`]'s result that holds the sum of its input `i`.
    #[inline(always)]
    pub(super) const fn lane_of(i: usize) -> usize {
        4 * (i % 4) + i / 4
    }

    /// The horizontal sums of `v[from..from + 16]` in one vector (input i in lane
    /// [`lane_of`]`(i)`), each summed in the tree `_mm512_reduce_add_ps` uses (LLVM's
    /// vector reduction: lanes i + i+8, then + i+4, + i+2, + i+1), so every output keeps
    /// the bits it had with one reduction per accumulator. 15 adds and 30 shuffles for 16
    /// sums instead of 16 x 8 operations: the reductions were 7.6% of a rollout in
    /// `perf`. Each level adds two halves of two vectors at once: 256-bit halves, then
    /// 128-bit quarters (`shuffle_f32x4`), then pairs and single lanes within each
    /// quarter (`shuffle_ps`).
    #[inline(always)]
    pub(super) unsafe fn reduce16(v: &[__m512; 32], from: usize) -> __m512 {
        let v = &v[from..from + 16];
        // i + i+8: v[2p] in quarters 0-1, v[2p+1] in quarters 2-3.
        let mut l1 = [_mm512_setzero_ps(); 8];
        for p in 0..8 {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            l1[p] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
        }
        // + i+4: quarter q of l2[p] holds input 4p + q.
        let mut l2 = [_mm512_setzero_ps(); 4];
        for p in 0..4 {
            let (a, b) = (l1[2 * p], l1[2 * p + 1]);
            l2[p] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
        }
        // + i+2: quarter q of l3[p] holds inputs 8p + q (lanes 0-1) and 8p + 4 + q (2-3).
        let mut l3 = [_mm512_setzero_ps(); 2];
        for p in 0..2 {
            let (a, b) = (l2[2 * p], l2[2 * p + 1]);
            l3[p] = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
        }
        // + i+1: lane 4q + k holds input q + 4k.
        _mm512_add_ps(_mm512_shuffle_ps::<0x88>(l3[0], l3[1]), _mm512_shuffle_ps::<0xDD>(l3[0], l3[1]))
    }

    /// Rows `j..j + J` of `W` against token rows `r..r + R`: every output is one
    /// accumulator over the chunks in order (the masked last chunk included), then one
    /// horizontal sum, then stored: the same operations whatever J, R or n.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<A: Arith, const J: usize, const R: usize, const PREFETCH: bool>(x: *const A::X, k: usize, w: *const A::W, j: usize, r: usize, y: &Out, accumulate: bool, next: *const A::W) {
        unsafe {
            let w = w.add(j * k);
            let x = x.add(r * k);
            let mut acc = [[_mm512_setzero_ps(); R]; J];
            let mut wv = [A::zero(); J];
            let full = k / A::STEP * A::STEP;
            let mut i = 0;
            while i < full {
                for a in 0..J {
                    wv[a] = A::load_w(w.add(a * k + i));
                }
                if PREFETCH {
                    // The same chunk of the next W tile's rows, into L2 (see `tiles`).
                    for a in 0..J {
                        _mm_prefetch::<_MM_HINT_T1>(next.add(a * k + i) as *const i8);
                    }
                }
                for b in 0..R {
                    let xv = A::load_x(x.add(b * k + i));
                    for a in 0..J {
                        acc[a][b] = A::fma(acc[a][b], xv, wv[a]);
                    }
                }
                i += A::STEP;
            }
            if full < k {
                let n = k - full;
                for a in 0..J {
                    wv[a] = A::load_w_tail(w.add(a * k + full), n);
                }
                for b in 0..R {
                    let xv = A::load_x_tail(x.add(b * k + full), n);
                    for a in 0..J {
                        acc[a][b] = A::fma(acc[a][b], xv, wv[a]);
                    }
                }
            }
            // All horizontal sums first, then the stores: a loop this small unrolls, so the
            // accumulators stay in registers. Interleaved with `put` it did not, and `acc`
            // lived on the stack, zeroed by a `memset` call per tile (6% of a bf16
            // rollout's time in `perf`) and stored to after the loop. The sums go 16
            // accumulators at a time through `reduce16` (the zero vectors past J x R
            // only fill lanes nobody reads).
            let mut flat = [_mm512_setzero_ps(); 32];
            for a in 0..J {
                for b in 0..R {
                    flat[a * R + b] = acc[a][b];
                }
            }
            let mut sums = [0f32; 32];
            _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(&flat, 0));
            if J * R > 16 {
                _mm512_storeu_ps(sums.as_mut_ptr().add(16), reduce16(&flat, 16));
            }
            for a in 0..J {
                for b in 0..R {
                    let i = a * R + b;
                    // SAFETY: column j + a belongs to this task alone (`run`).
                    y.put(r + b, j + a, sums[i / 16 * 16 + lane_of(i % 16)], accumulate);
                }
            }
        }
    }

    /// Rows `j..j + J` of `W` against token rows `r0..r1`, 6 at a time, then the rest.
    /// `next` (or null): the first of the next W tile's rows, fetched into L2 while the
    /// last 6 token rows meet this tile. Without it the first pass over each tile waited
    /// on memory: `perf` put a third of a bf16 rollout's tile samples on the W loads (W
    /// streams from memory once per step; the token rows stay in L2). Measured on a
    /// 4 x 8 x 128 rollout, Zen 4 (BENCHMARKS.md): fetching into L2 during the last pass
    /// beat fetching during the first pass (into L1 or L2) by 8-15%: into L1 the token
    /// rows streaming through evicted the lines again before use.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles<A: Arith, const J: usize>(x: *const A::X, k: usize, w: *const A::W, j: usize, r0: usize, r1: usize, y: &Out, accumulate: bool, next: *const A::W) {
        unsafe {
            let mut r = r0;
            let mut next = next;
            while r + TR <= r1 {
                if next.is_null() || r + 2 * TR <= r1 {
                    tile::<A, J, TR, false>(x, k, w, j, r, y, accumulate, std::ptr::null());
                } else {
                    tile::<A, J, TR, true>(x, k, w, j, r, y, accumulate, next);
                    next = std::ptr::null();
                }
                r += TR;
            }
            // Fewer than 6 token rows in all (single-row decoding): the one pass fetches.
            match (r1 - r, next.is_null()) {
                (0, _) => {}
                (1, true) => tile::<A, J, 1, false>(x, k, w, j, r, y, accumulate, next),
                (1, false) => tile::<A, J, 1, true>(x, k, w, j, r, y, accumulate, next),
                (2, true) => tile::<A, J, 2, false>(x, k, w, j, r, y, accumulate, next),
                (2, false) => tile::<A, J, 2, true>(x, k, w, j, r, y, accumulate, next),
                (3, true) => tile::<A, J, 3, false>(x, k, w, j, r, y, accumulate, next),
                (3, false) => tile::<A, J, 3, true>(x, k, w, j, r, y, accumulate, next),
                (4, true) => tile::<A, J, 4, false>(x, k, w, j, r, y, accumulate, next),
                (4, false) => tile::<A, J, 4, true>(x, k, w, j, r, y, accumulate, next),
                (_, true) => tile::<A, J, 5, false>(x, k, w, j, r, y, accumulate, next),
                (_, false) => tile::<A, J, 5, true>(x, k, w, j, r, y, accumulate, next),
            }
        }
    }

    /// Columns `j0..j1` of `y` for every token row: token rows in blocks that stay in
    /// L2, each `W` tile (4 rows, in L1) against every row of the block.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<A: Arith>(x: *const A::X, n: usize, k: usize, w: *const A::W, j0: usize, j1: usize, y: &Out, accumulate: bool) {
        let xb = (X_BLOCK_BYTES / (k * std::mem::size_of::<A::X>()).max(1) / TR * TR).max(TR);
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + xb).min(n);
            let mut j = j0;
            unsafe {
                while j + TJ <= j1 {
                    let next = if j + 2 * TJ <= j1 { w.add((j + TJ) * k) } else { std::ptr::null() };
                    tiles::<A, TJ>(x, k, w, j, r0, r1, y, accumulate, next);
                    j += TJ;
                }
                while j < j1 {
                    tiles::<A, 1>(x, k, w, j, r0, r1, y, accumulate, std::ptr::null());
                    j += 1;
                }
            }
            r0 = r1;
        }
    }

    type Block<A> = unsafe fn(*const <A as Arith>::X, usize, usize, *const <A as Arith>::W, usize, usize, &Out, bool);

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_f32(x: *const f32, n: usize, k: usize, w: *const f32, j0: usize, j1: usize, y: &Out, accumulate: bool) {
        unsafe { block::<F32>(x, n, k, w, j0, j1, y, accumulate) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_widened(x: *const f32, n: usize, k: usize, w: *const bf16, j0: usize, j1: usize, y: &Out, accumulate: bool) {
        unsafe { block::<Widened>(x, n, k, w, j0, j1, y, accumulate) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_dot(x: *const u16, n: usize, k: usize, w: *const bf16, j0: usize, j1: usize, y: &Out, accumulate: bool) {
        unsafe { block::<Dot>(x, n, k, w, j0, j1, y, accumulate) }
    }

    /// Blocks of `W` rows in parallel, enough tasks to keep every thread busy.
    #[allow(clippy::too_many_arguments)]
    fn run<A: Arith>(x: &[A::X], n: usize, k: usize, w: &[A::W], out: usize, y: &mut [f32], accumulate: bool, block: Block<A>) {
        assert!(w.len() >= out * k, "gemv_rows: weight too small for {out} x {k}");
        assert!(x.len() >= n * k && y.len() >= n * out, "gemv_rows: buffers too small for {n} x {k} -> {out}");
        if n == 0 || out == 0 {
            return;
        }
        let y = Out { ptr: y.as_mut_ptr(), ld: out, len: y.len() };
        let threads = rayon::current_num_threads().max(1);
        let per_task = (out / (threads * 8) / TJ * TJ).clamp(TJ, 64);
        let task = |task: usize| {
            let j0 = task * per_task;
            // SAFETY: the caller checked the CPU features (`tile_available`); the tiles
            // read rows < out of `w` and < n of `x` (asserted above), the last chunk of
            // a row masked, and each task writes only its own columns j0..j1 of `y`.
            unsafe { block(x.as_ptr(), n, k, w.as_ptr(), j0, (j0 + per_task).min(out), &y, accumulate) };
        };
        if n * out * k <= SERIAL_MACS {
            (0..out.div_ceil(per_task)).for_each(task);
        } else {
            (0..out.div_ceil(per_task)).into_par_iter().for_each(task);
        }
    }

    pub(super) fn rows_f32(x: &[f32], n: usize, k: usize, w: &[f32], out: usize, y: &mut [f32], accumulate: bool) {
        run::<F32>(x, n, k, w, out, y, accumulate, block_f32)
    }

    pub(super) fn rows_bf16(x: &[f32], n: usize, k: usize, w: &[bf16], out: usize, y: &mut [f32], accumulate: bool) {
        run::<Widened>(x, n, k, w, out, y, accumulate, block_widened)
    }

    pub(super) fn rows_dot(x: &[f32], n: usize, k: usize, w: &[bf16], out: usize, y: &mut [f32], accumulate: bool) {
        let mut xb = vec![0u16; n * k];
        // SAFETY: the caller checked AVX512-BF16 (`gemm_bf16::available`).
        unsafe { to_bf16(&x[..n * k], &mut xb) };
        run::<Dot>(&xb, n, k, w, out, y, accumulate, block_dot)
    }

    /// f32 -> bf16 bits, nearest even (exact for bf16 values), 16 at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn to_bf16(x: &[f32], o: &mut [u16]) {
        let full = x.len() / 16 * 16;
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= len of both.
            unsafe {
                let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
                _mm256_storeu_si256(o.as_mut_ptr().add(i) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(h));
            }
            i += 16;
        }
        for (o, v) in o[full..].iter_mut().zip(&x[full..]) {
            *o = bf16::from_f32(*v).to_bits();
        }
    }
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

    /// The three variants: f32 W, bf16 W widened (f32 rows), bf16 x bf16 on the dot kernel.
    #[derive(Clone, Copy, Debug)]
    enum Variant {
        F32,
        Widened,
        Dot,
    }
    const VARIANTS: [Variant; 3] = [Variant::F32, Variant::Widened, Variant::Dot];

    fn round_bf16(v: &[f32]) -> Vec<f32> {
        v.iter().map(|v| bf16::from_f32(*v).to_f32()).collect()
    }

    /// `y (+)= x W^T` through `variant`, from f32 `x` and `w` (rounded to bf16 where the
    /// variant stores them so); returns the f32 values the product actually used.
    #[allow(clippy::too_many_arguments)]
    fn product(variant: Variant, x: &[f32], n: usize, k: usize, w: &[f32], out: usize, y: &mut [f32], acc: bool) -> (Vec<f32>, Vec<f32>) {
        match variant {
            Variant::F32 => {
                gemv_rows(x, n, k, &Weights::F32(w), out, y, acc);
                (x.to_vec(), w.to_vec())
            }
            Variant::Widened => {
                let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
                gemv_rows(x, n, k, &Weights::Bf16(&wb), out, y, acc);
                (x.to_vec(), round_bf16(w))
            }
            Variant::Dot => {
                let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
                let xb = round_bf16(x);
                gemv_rows_bf16_dot(&xb, n, k, &wb, out, y, acc);
                (xb, round_bf16(w))
            }
        }
    }

    /// f64-accumulated reference and the scale of its terms (sum of |x w|).
    fn naive(x: &[f32], n: usize, k: usize, w: &[f32], out: usize) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; n * out];
        let mut mag = vec![0f64; n * out];
        for r in 0..n {
            for j in 0..out {
                for i in 0..k {
                    let p = x[r * k + i] as f64 * w[j * k + i] as f64;
                    y[r * out + j] += p;
                    mag[r * out + j] += p.abs();
                }
            }
        }
        (y, mag)
    }

    fn inputs(n: usize, k: usize, out: usize) -> (Vec<f32>, Vec<f32>) {
        // Not bf16-representable (so rounding the rows to bf16 where they must stay f32
        // would show), mixed signs and magnitudes.
        let x = (0..n * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 333.3).collect();
        let w = (0..out * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 251.7).collect();
        (x, w)
    }

    fn check_against_naive(path: &str) {
        let out = 21; // 5 tiles of 4 rows of W and one row alone
        for variant in VARIANTS {
            for n in [1, 2, 3, 5, 7, 13, 32, 100] {
                for k in [1, 15, 16, 17, 576, 1000] {
                    let (x, w) = inputs(n, k, out);
                    for acc in [false, true] {
                        let bias: Vec<f32> = (0..n * out).map(|i| (i % 5) as f32 * 0.75 - 1.0).collect();
                        let mut y = if acc { bias.clone() } else { vec![f32::NAN; n * out] };
                        let (xu, wu) = product(variant, &x, n, k, &w, out, &mut y, acc);
                        let (expect, mag) = naive(&xu, n, k, &wu, out);
                        for i in 0..n * out {
                            let e = expect[i] + if acc { bias[i] as f64 } else { 0.0 };
                            let tol = 1e-5 * (mag[i] + 1.0);
                            assert!(
                                (y[i] as f64 - e).abs() <= tol,
                                "{path} {variant:?} n {n} k {k} acc {acc} [{}, {}]: {} vs {e}",
                                i / out,
                                i % out,
                                y[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_variant_matches_an_f64_reference() {
        check_against_naive(if tile_available() { "tile" } else { "portable" });
    }

    #[test]
    fn the_portable_path_matches_an_f64_reference() {
        force_portable(|| {
            assert!(!tile_available());
            check_against_naive("portable")
        });
    }

    #[test]
    fn the_dot_variant_without_the_bf16_instructions_widens() {
        crate::gemm_bf16::force_fallback(|| check_against_naive("no bf16 dot"));
    }

    #[test]
    fn matches_naive_at_many_rows() {
        for &(n, k, out) in &[(256, 48, 9), (256, 576, 130), (200, 1536, 64)] {
            let (x, w) = inputs(n, k, out);
            for variant in VARIANTS {
                let mut y = vec![0f32; n * out];
                let (xu, wu) = product(variant, &x, n, k, &w, out, &mut y, false);
                let (expect, mag) = naive(&xu, n, k, &wu, out);
                for i in 0..n * out {
                    assert!((y[i] as f64 - expect[i]).abs() <= 1e-5 * (mag[i] + 1.0), "{variant:?} {n} x {k} -> {out} at {i}");
                }
            }
        }
    }

    fn same_bits_alone_as_in_any_batch(path: &str) {
        for variant in VARIANTS {
            for (n, k, out) in [(23, 150, 67), (19, 1000, 9), (14, 17, 6)] {
                let (x, w) = inputs(n, k, out);
                let mut all: Vec<f32> = (0..n * out).map(|i| i as f32 * 0.1).collect();
                let bias = all.clone();
                product(variant, &x, n, k, &w, out, &mut all, true);
                for r in 0..n {
                    let mut alone = bias[r * out..(r + 1) * out].to_vec();
                    product(variant, &x[r * k..(r + 1) * k], 1, k, &w, out, &mut alone, true);
                    assert_eq!(alone, all[r * out..(r + 1) * out], "{path} {variant:?} {n} x {k} -> {out}: row {r}");
                }
                // And at another position in a smaller batch (rows 3.. land elsewhere in
                // the tiles).
                let mut part = bias[3 * out..].to_vec();
                product(variant, &x[3 * k..], n - 3, k, &w, out, &mut part, true);
                assert_eq!(part, all[3 * out..], "{path} {variant:?} {n} x {k} -> {out}: rows 3..");
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_as_in_any_batch() {
        same_bits_alone_as_in_any_batch(if tile_available() { "tile" } else { "portable" });
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_as_in_any_batch_on_the_portable_path() {
        force_portable(|| same_bits_alone_as_in_any_batch("portable"));
    }

    /// `reduce16` gives each input's sum in its lane with the bits of
    /// `_mm512_reduce_add_ps` (values of very different magnitudes, where the order of
    /// the additions shows).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce16_keeps_the_bits_of_one_reduction_per_vector() {
        use core::arch::x86_64::*;
        if !tile_available() {
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn run(seed: u64) {
            let mut state = seed;
            let mut next = || {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let m = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0;
                m * 10f32.powi(((state >> 20) % 13) as i32 - 6)
            };
            let mut data = [[0f32; 16]; 32];
            data.iter_mut().flatten().for_each(|x| *x = next());
            let mut v = [_mm512_setzero_ps(); 32];
            for (v, d) in v.iter_mut().zip(&data) {
                *v = unsafe { _mm512_loadu_ps(d.as_ptr()) };
            }
            for from in [0, 16] {
                let mut got = [0f32; 16];
                unsafe { _mm512_storeu_ps(got.as_mut_ptr(), tile512::reduce16(&v, from)) };
                for i in 0..16 {
                    let want = _mm512_reduce_add_ps(v[from + i]);
                    assert_eq!(got[tile512::lane_of(i)].to_bits(), want.to_bits(), "seed {seed} input {}", from + i);
                }
            }
        }
        for seed in 0..50 {
            // SAFETY: tile_available() checked AVX-512 F/BW/VL.
            unsafe { run(seed) };
        }
    }

    #[test]
    fn row_limits_follow_the_path() {
        let cap = std::env::var("LORA_KERNELS_DECODE_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
        force_portable(|| {
            assert_eq!(fast_rows(Kind::F32), FAST_ROWS_F32.min(cap));
            assert_eq!(fast_rows(Kind::Bf16Widened), FAST_ROWS_BF16.min(cap));
            assert_eq!(fast_rows(Kind::Bf16Dot), FAST_ROWS_BF16_DOT.min(cap));
        });
        if tile_available() {
            assert_eq!(fast_rows(Kind::F32), TILE_ROWS_F32.min(cap));
        }
    }
}
