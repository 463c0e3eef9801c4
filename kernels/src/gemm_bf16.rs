//! bf16 x bf16 -> f32 GEMM on AVX512-BF16 (`vdpbf16ps`), for the frozen matmuls when
//! the weights are stored in bf16.
//!
//! Neither candle nor the `gemm` crate has a bf16 GEMM on CPU: without this, every
//! bf16 matmul widens its weight to an f32 copy and runs the f32 GEMM, so `--dtype
//! bf16` cannot beat f32. `vdpbf16ps` does 32 bf16 products per instruction (2x the
//! f32 FMA rate) into f32 accumulators: each 32-bit lane holds a *pair* of
//! consecutive reduction-dim elements, so both operands are packed as bf16 pairs:
//!
//! - A [m, k] -> micro-panels of `MR` rows: `[m/MR][k/2][MR]` pairs (u32);
//! - B [k, n] -> micro-panels of `NR` columns: `[n/NR][k/2][NR]` pairs.
//!
//! Padding (odd k, partial panels) is zero, so it adds nothing. Each `MR x NR` tile
//! of C is accumulated over the whole reduction in 24 zmm registers and stored once
//! (the B micro-panel, <= 1 MiB for k <= 10k, streams from L2 in order; the A
//! micro-panel stays in L1). f32 operands are rounded to bf16 (nearest even) while
//! packing, like PyTorch's bf16 matmul does with its inputs.
//!
//! Availability is decided at run time ([`available`]): the CPU must report
//! `avx512bf16`, and `LORA_KERNELS_NO_BF16_DOT=1` (or [`force_fallback`] on the
//! calling thread) turns it off so the f32 fallback can be tested on any host.
use crate::cpu::Elem;
use half::bf16;
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Rows of a micro-tile.
pub const MR: usize = 8;
/// Columns of a micro-tile (three 16-lane vectors).
pub const NR: usize = 48;
/// Rows of C per parallel task (a multiple of `MR`).
const ROWS_PER_TASK: usize = 128;

/// Element storage of a GEMM operand.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::F32(v) => v.len(),
            Src::Bf16(v) => v.len(),
        }
    }
}

/// A strided read-only matrix view of f32 or bf16 storage.
#[derive(Clone, Copy)]
pub struct AnyMat<'a> {
    pub data: Src<'a>,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> AnyMat<'a> {
    /// Row-major `rows x cols`.
    pub fn new(data: Src<'a>, rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix buffer too small");
        AnyMat { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose (a view, no copy).
    pub fn t(self) -> Self {
        AnyMat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

/// The bf16 bits of element (r, c).
#[inline(always)]
fn bits(m: &AnyMat, r: usize, c: usize) -> u32 {
    let i = r * m.rs + c * m.cs;
    match m.data {
        Src::F32(v) => <bf16 as Elem>::from_f32(v[i]).to_bits() as u32,
        Src::Bf16(v) => v[i].to_bits() as u32,
    }
}

/// Pair `p` along the reduction dim: (elem 2p, elem 2p+1), zero past `k`.
#[inline(always)]
fn pair(lo: u32, hi: u32) -> u32 {
    lo | (hi << 16)
}

/// A packed as `[ceil(m/MR)][kp][MR]` pairs.
fn pack_a(a: &AnyMat) -> Vec<u32> {
    let (m, k) = (a.rows, a.cols);
    let kp = k.div_ceil(2);
    let panels = m.div_ceil(MR);
    let mut out = vec![0u32; panels * kp * MR];
    out.par_chunks_mut(kp * MR).enumerate().for_each(|(pi, panel)| {
        for i in 0..MR.min(m - pi * MR) {
            let r = pi * MR + i;
            for p in 0..kp {
                let lo = bits(a, r, 2 * p);
                let hi = if 2 * p + 1 < k { bits(a, r, 2 * p + 1) } else { 0 };
                panel[p * MR + i] = pair(lo, hi);
            }
        }
    });
    out
}

/// B [k, n] packed once for any number of products with it (e.g. every row chunk
/// of the cross-entropy).
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Pack `b` [k, n] as `[ceil(n/NR)][kp][NR]` pairs.
    pub fn new(b: &AnyMat) -> Self {
        let (k, n) = (b.rows, b.cols);
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kp * NR];
        data.par_chunks_mut(kp * NR).enumerate().for_each(|(pj, panel)| {
            let width = NR.min(n - pj * NR);
            // Row-by-column order that reads the source along its contiguous dim.
            if b.cs == 1 {
                for p in 0..kp {
                    for j in 0..width {
                        let c = pj * NR + j;
                        let lo = bits(b, 2 * p, c);
                        let hi = if 2 * p + 1 < k { bits(b, 2 * p + 1, c) } else { 0 };
                        panel[p * NR + j] = pair(lo, hi);
                    }
                }
            } else {
                for j in 0..width {
                    let c = pj * NR + j;
                    for p in 0..kp {
                        let lo = bits(b, 2 * p, c);
                        let hi = if 2 * p + 1 < k { bits(b, 2 * p + 1, c) } else { 0 };
                        panel[p * NR + j] = pair(lo, hi);
                    }
                }
            }
        });
        PackedB { data, k, n }
    }
}

static DETECTED: OnceLock<bool> = OnceLock::new();
static CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many products the bf16 kernel has computed in this process (tests check
/// that a path really ran it).
pub fn calls() -> usize {
    CALLS.load(Ordering::Relaxed)
}
thread_local! {
    static FORCE_FALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Whether the CPU has the bf16 dot product and it is not turned off
/// (`LORA_KERNELS_NO_BF16_DOT=1`, or [`force_fallback`] on this thread).
pub fn available() -> bool {
    if FORCE_FALLBACK.with(|f| f.get()) {
        return false;
    }
    *DETECTED.get_or_init(|| detect() && !std::env::var("LORA_KERNELS_NO_BF16_DOT").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Whether the CPU reports AVX512-BF16 (regardless of the switches above).
pub fn cpu_has_bf16_dot() -> bool {
    detect()
}

fn detect() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Make [`available`] false on the calling thread while `f` runs (tests of the
/// fallback path on a host that has the instructions).
pub fn force_fallback<R>(f: impl FnOnce() -> R) -> R {
    let prev = FORCE_FALLBACK.with(|c| c.replace(true));
    let r = f();
    FORCE_FALLBACK.with(|c| c.set(prev));
    r
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method, so closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst (m x n, leading dim ld) = [dst +] alpha * a @ b` in bf16 x bf16 -> f32, on all
/// rayon threads. Panics if the CPU lacks AVX512-BF16: check [`available`] first.
pub fn matmul(dst: &mut [f32], ld: usize, accumulate: bool, a: AnyMat, b: AnyMat, alpha: f32) {
    assert_eq!(a.cols, b.rows, "matmul inner dims");
    let pb = PackedB::new(&b);
    matmul_packed(dst, ld, accumulate, a, &pb, alpha)
}

/// As [`matmul`] with B already packed.
pub fn matmul_packed(dst: &mut [f32], ld: usize, accumulate: bool, a: AnyMat, b: &PackedB, alpha: f32) {
    assert!(cpu_has_bf16_dot(), "bf16 GEMM called on a CPU without AVX512-BF16");
    CALLS.fetch_add(1, Ordering::Relaxed);
    let (m, k, n) = (a.rows, a.cols, b.n);
    assert_eq!(k, b.k, "matmul inner dims");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ld >= n && dst.len() >= (m - 1) * ld + n, "matmul dst too small");
    let pa = pack_a(&a);
    let kp = k.div_ceil(2);
    let col_panels = n.div_ceil(NR);
    let row_tasks = m.div_ceil(ROWS_PER_TASK);
    let out = SendPtr(dst.as_mut_ptr());
    // Task order: column panel outer, so consecutive tasks (one thread's share)
    // reuse the same B micro-panel from L2.
    (0..col_panels * row_tasks).into_par_iter().for_each(|t| {
        let (pj, rt) = (t / row_tasks, t % row_tasks);
        let bp = &b.data[pj * kp * NR..(pj + 1) * kp * NR];
        let width = NR.min(n - pj * NR);
        let mut tile = [[0f32; NR]; MR];
        let first = rt * ROWS_PER_TASK / MR;
        let last = (((rt + 1) * ROWS_PER_TASK).min(m)).div_ceil(MR);
        for pi in first..last {
            let ap = &pa[pi * kp * MR..(pi + 1) * kp * MR];
            // SAFETY: the CPU has AVX512-BF16 (asserted above); the panels hold kp
            // pairs of MR and NR lanes.
            unsafe { x86::tile(ap.as_ptr(), 1, MR, bp.as_ptr(), kp, &mut tile) };
            for (i, row) in tile.iter().enumerate().take(MR.min(m - pi * MR)) {
                let r = pi * MR + i;
                // SAFETY: tiles of different tasks cover disjoint (row, column) cells
                // of dst, inside the bounds asserted above.
                let d = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * ld + pj * NR), width) };
                if accumulate {
                    d.iter_mut().zip(row).for_each(|(d, v)| *d += alpha * v);
                } else {
                    d.iter_mut().zip(row).for_each(|(d, v)| *d = alpha * v);
                }
            }
        }
    });
}

/// `dst [n, out] (leading dim ld) = [dst +] alpha * x [n, k] W^T` for a row-major
/// bf16 `w` [out, k]: the forward of a frozen linear. Computed as `(W x^T)^T`, so W
/// is read in place as the A operand (its rows already hold consecutive k pairs) and
/// only the activations are packed: no per-call copy of the weight. Odd k packs W.
pub fn matmul_xwt(dst: &mut [f32], ld: usize, accumulate: bool, x: AnyMat, w: &[bf16], out: usize, alpha: f32) {
    assert!(cpu_has_bf16_dot(), "bf16 GEMM called on a CPU without AVX512-BF16");
    let (n, k) = (x.rows, x.cols);
    assert!(w.len() >= out * k, "weight buffer too small");
    if k % 2 == 1 {
        let wm = AnyMat::new(Src::Bf16(w), out, k);
        return matmul(dst, ld, accumulate, x, wm.t(), alpha);
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    if n == 0 || out == 0 {
        return;
    }
    assert!(ld >= out && dst.len() >= (n - 1) * ld + out, "matmul dst too small");
    let kp = k / 2;
    // SAFETY: bf16 is a u16; k is even, so row j's pairs are u32 j*kp..(j+1)*kp
    // (read unaligned below).
    let w32 = w.as_ptr() as *const u32;
    let xt = PackedB::new(&x.t()); // [k, n]: tokens are the columns
    let row_panels = out.div_ceil(MR);
    let col_panels = n.div_ceil(NR);
    let per_task = (ROWS_PER_TASK / MR).max(1);
    let row_tasks = row_panels.div_ceil(per_task);
    let dptr = SendPtr(dst.as_mut_ptr());
    let wptr = SendConst(w32);
    // Tasks: token panel outer (B micro-panel reused from L2), weight rows inner.
    (0..col_panels * row_tasks).into_par_iter().for_each(|t| {
        let (pj, rt) = (t / row_tasks, t % row_tasks);
        let bp = &xt.data[pj * kp * NR..(pj + 1) * kp * NR];
        let width = NR.min(n - pj * NR);
        let mut tile = [[0f32; NR]; MR];
        let mut tail = Vec::new();
        for pi in rt * per_task..((rt + 1) * per_task).min(row_panels) {
            let rows = MR.min(out - pi * MR);
            // SAFETY: full panels read rows pi*MR..pi*MR+MR < out of w; a partial last
            // panel is copied into a zero-padded packed panel first.
            unsafe {
                if rows == MR {
                    x86::tile(wptr.get().add(pi * MR * kp), kp, 1, bp.as_ptr(), kp, &mut tile);
                } else {
                    tail.clear();
                    tail.resize(kp * MR, 0u32);
                    for i in 0..rows {
                        for p in 0..kp {
                            tail[p * MR + i] = std::ptr::read_unaligned(wptr.get().add((pi * MR + i) * kp + p));
                        }
                    }
                    x86::tile(tail.as_ptr(), 1, MR, bp.as_ptr(), kp, &mut tile);
                }
            }
            // tile[i][jj] = y[token pj*NR+jj, feature pi*MR+i]: stored transposed.
            #[allow(clippy::needless_range_loop)] // jj indexes tile columns and dst rows
            for jj in 0..width {
                let r = pj * NR + jj;
                // SAFETY: each task owns features pi*MR.. of tokens pj*NR.., disjoint
                // across tasks and inside the asserted bounds.
                let d = unsafe { std::slice::from_raw_parts_mut(dptr.get().add(r * ld + pi * MR), rows) };
                for (i, d) in d.iter_mut().enumerate() {
                    let v = alpha * tile[i][jj];
                    *d = if accumulate { *d + v } else { v };
                }
            }
        }
    });
}

#[derive(Clone, Copy)]
struct SendConst(*const u32);
unsafe impl Send for SendConst {}
unsafe impl Sync for SendConst {}

impl SendConst {
    fn get(self) -> *const u32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `tile = A_panel @ B_panel` over `kp` pairs; A's pair p of row i is at
    /// `ap[i * a_rs + p * a_ps]` (packed panel: `a_rs = 1, a_ps = MR`; rows of a
    /// row-major bf16 matrix read in place: `a_rs = kp, a_ps = 1`).
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16; `ap` covers every (i, p) above and
    /// `bp` holds `kp * NR` pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(ap: *const u32, a_rs: usize, a_ps: usize, bp: *const u32, kp: usize, tile: &mut [[f32; NR]; MR]) {
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        for p in 0..kp {
            let b = bp.add(p * NR) as *const __m512i;
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(1)));
            let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(2)));
            let a = ap.add(p * a_ps);
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * a_rs) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
                acc[2] = _mm512_dpbf16_ps(acc[2], ai, b2);
            }
        }
        for (row, acc) in tile.iter_mut().zip(&acc) {
            for (v, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), *a);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) unsafe fn tile(_: *const u32, _: usize, _: usize, _: *const u32, _: usize, _: &mut [[f32; super::NR]; super::MR]) {
        unreachable!("bf16 GEMM without x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(v: f32) -> f32 {
        <bf16 as Elem>::from_f32(v).to_f32()
    }

    /// f64 reference on bf16-rounded inputs.
    fn naive(a: &AnyMat, b: &AnyMat) -> Vec<f32> {
        let get = |m: &AnyMat, r: usize, c: usize| f32::from_bits(bits(m, r, c) << 16) as f64;
        let mut y = vec![0f32; a.rows * b.cols];
        for r in 0..a.rows {
            for c in 0..b.cols {
                y[r * b.cols + c] = (0..a.cols).map(|i| get(a, r, i) * get(b, i, c)).sum::<f64>() as f32;
            }
        }
        y
    }

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7 + seed * 13) % 29) as f32 - 14.0) / 9.0).collect()
    }

    #[test]
    fn bf16_gemm_matches_reference_all_layouts() {
        if !cpu_has_bf16_dot() {
            eprintln!("SKIPPED bf16_gemm_matches_reference_all_layouts: this CPU has no AVX512-BF16");
            return;
        }
        // Odd k, partial row and column panels, several row tasks.
        for &(m, k, n) in &[(1, 1, 1), (9, 37, 50), (130, 576, 97), (256, 64, 192), (50, 2, 3), (7, 300, 1030)] {
            let av = data(m * k, 1);
            let bv = data(k * n, 2);
            let ab: Vec<bf16> = av.iter().map(|v| bf16::from_f32(*v)).collect();
            let bt: Vec<f32> = {
                let mut t = vec![0f32; k * n];
                for i in 0..k {
                    for j in 0..n {
                        t[j * k + i] = bv[i * n + j];
                    }
                }
                t
            };
            let cases: Vec<(AnyMat, AnyMat)> = vec![
                (AnyMat::new(Src::F32(&av), m, k), AnyMat::new(Src::F32(&bv), k, n)),
                (AnyMat::new(Src::Bf16(&ab), m, k), AnyMat::new(Src::F32(&bt), n, k).t()),
            ];
            for (a, b) in cases {
                let want = naive(&a, &b);
                let mut got = vec![1f32; m * n];
                matmul(&mut got, n, true, a, b, 0.5);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - (1.0 + 0.5 * w)).abs() <= 1e-4 * (1.0 + w.abs()), "{m}x{k}x{n}: {g} vs {}", 1.0 + 0.5 * w);
                }
                matmul(&mut got, n, false, a, b, 1.0);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}x{k}x{n}: {g} vs {w}");
                }
            }
            // The forward entry point: W [n, k] bf16 read in place (k odd takes the packed path).
            let btb: Vec<bf16> = bt.iter().map(|v| bf16::from_f32(*v)).collect();
            let a = AnyMat::new(Src::F32(&av), m, k);
            let want = naive(&a, &AnyMat::new(Src::Bf16(&btb), n, k).t());
            let mut got = vec![1f32; m * n];
            matmul_xwt(&mut got, n, true, a, &btb, n, 0.5);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - (1.0 + 0.5 * w)).abs() <= 1e-4 * (1.0 + w.abs()), "xwt {m}x{k}x{n}: {g} vs {}", 1.0 + 0.5 * w);
            }
        }
        assert_eq!(round(1.0), 1.0);
    }

    #[test]
    fn force_fallback_switches_off_on_this_thread_only() {
        force_fallback(|| assert!(!available()));
        assert_eq!(std::thread::spawn(available).join().unwrap(), available());
    }
}
