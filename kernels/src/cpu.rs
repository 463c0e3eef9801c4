//! CPU building blocks shared by the ops: dtype conversion, storage access and a
//! thin safe wrapper around the `gemm` crate (AVX-512 via the `x86-v4` feature).
//!
//! Every op computes in f32. bf16/f16 inputs are widened once per call (a cheap,
//! memory-bound pass next to the matmuls) and the result is narrowed back.
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;

use crate::simd::isa_dispatch;

/// Elements per rayon task for memory-bound element-wise loops.
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// A floating-point storage element: loaded and stored through f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    /// The storage's elements, if it holds this type.
    fn of_storage(s: &CpuStorage) -> Option<&[Self]>;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn of_storage(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        // Round to nearest even; written branch-free so loops vectorise.
        let b = v.to_bits();
        let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
        let r = if v.is_nan() { 0x7fc0 } else { r };
        bf16::from_bits(r as u16)
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::BF16(v)
    }
    fn of_storage(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F16(v)
    }
    fn of_storage(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
}

/// Run `$body` with `$v` bound to the contiguous typed slice of a float CPU storage.
macro_rules! with_float_slice {
    ($storage:expr, $layout:expr, $op:expr, |$v:ident| $body:expr) => {{
        let (start, end) = match $layout.contiguous_offsets() {
            Some(o) => o,
            None => candle_core::bail!("{}: input must be contiguous", $op),
        };
        match $storage {
            candle_core::CpuStorage::F32(all) => {
                let $v = &all[start..end];
                $body
            }
            candle_core::CpuStorage::BF16(all) => {
                let $v = &all[start..end];
                $body
            }
            candle_core::CpuStorage::F16(all) => {
                let $v = &all[start..end];
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {:?}", $op, candle_core::backend::BackendStorage::dtype(other)),
        }
    }};
}
pub(crate) use with_float_slice;

/// Widen a slice to f32 in parallel.
pub(crate) fn widen<T: Elem>(v: &[T]) -> Vec<f32> {
    // Every element is written below: skip the zero-fill (a whole extra pass).
    let mut out = uninit::<f32>(v.len());
    out.par_chunks_mut(PAR_CHUNK).zip(v.par_chunks(PAR_CHUNK)).for_each(|(o, i)| widen_chunk(o, i));
    out
}

isa_dispatch! {
    fn widen_chunk<T: Elem>(o: &mut [f32], i: &[T]) {
        for (o, i) in o.iter_mut().zip(i) {
            *o = i.to_f32();
        }
    }
}

isa_dispatch! {
    pub(crate) fn narrow_chunk<T: Elem>(o: &mut [T], i: &[f32]) {
        for (o, i) in o.iter_mut().zip(i) {
            *o = T::from_f32(*i);
        }
    }
}

/// Narrow an f32 buffer to `T` in parallel.
pub(crate) fn narrow<T: Elem>(v: &[f32]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    // SAFETY: every element is written below before the vec is read.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(v.len())
    };
    out.par_chunks_mut(PAR_CHUNK).zip(v.par_chunks(PAR_CHUNK)).for_each(|(o, i)| narrow_chunk(o, i));
    out
}

/// A contiguous f32 view of a float CPU storage (borrowed when it already is f32).
pub(crate) fn f32_view<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Cow<'a, [f32]>> {
    let (start, end) = match l.contiguous_offsets() {
        Some(o) => o,
        None => bail!("{op}: input must be contiguous"),
    };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => Cow::Owned(widen(&v[start..end])),
        CpuStorage::F16(v) => Cow::Owned(widen(&v[start..end])),
        other => bail!("{op}: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(other)),
    })
}

/// Wrap an f32 result as a storage of `dtype` (narrowing when needed).
pub(crate) fn storage_from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(narrow(&v)),
        DType::F16 => CpuStorage::F16(narrow(&v)),
        d => bail!("unsupported dtype {d:?}"),
    })
}

/// A CPU tensor (no backprop) from an f32 buffer, narrowed to `dtype`.
pub(crate) fn tensor_from_f32(v: Vec<f32>, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let storage = storage_from_f32(v, dtype)?;
    Ok(Tensor::from_storage(
        Storage::Cpu(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// A strided read-only matrix view for [`matmul`].
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows x cols`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix buffer too small");
        Mat { data, rows, cols, rs: cols as isize, cs: 1 }
    }
    /// The transpose (a view, no copy).
    pub fn t(self) -> Self {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

/// Which threads a gemm may use.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Par {
    /// All rayon threads (large, top-level matmuls).
    All,
    /// The calling thread only (inside an already parallel loop).
    Seq,
}

/// `dst (m x n, row-major, leading dim ld) = [dst +] alpha * a @ b`.
pub(crate) fn matmul_ld(dst: &mut [f32], ld: usize, accumulate: bool, a: Mat, b: Mat, alpha: f32, par: Par) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul inner dims");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ld >= n && dst.len() >= (m - 1) * ld + n, "matmul dst too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ld..r * ld + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = match par {
        Par::All if rayon::current_num_threads() > 1 => gemm::Parallelism::Rayon(rayon::current_num_threads()),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the dimension and length checks above bound every access.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `dst (m x n, row-major) = [dst +] alpha * a @ b`.
pub(crate) fn matmul(dst: &mut [f32], accumulate: bool, a: Mat, b: Mat, alpha: f32, par: Par) {
    let n = b.cols;
    matmul_ld(dst, n, accumulate, a, b, alpha, par)
}

/// Which product of a frozen weight `W` [out, in] [`frozen_matmul`] computes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum WProd {
    /// `dst [n, out] = x [n, in] W^T` (forward).
    XWt,
    /// `dst [n, in] = g [n, out] W` (input gradient).
    GW,
}

/// Whether products with a frozen `w` run the bf16 dot-product kernel: bf16
/// activations (`x_dtype`, so `x` is bf16-exact) times a bf16 `w`, on a CPU with
/// AVX512-BF16. Everything else computes in f32.
pub(crate) fn use_bf16_dot(x_dtype: DType, w: &Tensor) -> bool {
    x_dtype == DType::BF16 && w.dtype() == DType::BF16 && crate::gemm_bf16::available()
}

/// `dst (+)= x op(W)` (see [`WProd`]) for a frozen `W` of any float dtype, `x`
/// holding `n` rows. bf16 x bf16 runs `gemm_bf16` ([`use_bf16_dot`]); otherwise W
/// is viewed as f32 (widened when stored narrower) and the f32 GEMM runs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn frozen_matmul(dst: &mut [f32], accumulate: bool, x: &[f32], n: usize, w: &Tensor, prod: WProd, x_dtype: DType, op: &str) -> Result<()> {
    let (out, in_) = w.dims2()?;
    let (k, cols) = match prod {
        WProd::XWt => (in_, out),
        WProd::GW => (out, in_),
    };
    if x.len() < n * k || dst.len() < n * cols {
        bail!("{op}: {n} rows of {k} features do not fit the weight {:?}", w.dims());
    }
    if use_bf16_dot(x_dtype, w) {
        use crate::gemm_bf16::{AnyMat, Src};
        let wc = w.contiguous()?;
        let (ws, wl) = wc.storage_and_layout();
        let (start, end) = wl.contiguous_offsets().unwrap_or((0, 0));
        let CpuStorage::BF16(wv) = cpu_storage(&ws, op)? else { bail!("{op}: bf16 weight expected") };
        let xm = AnyMat::new(Src::F32(x), n, k);
        let wv = &wv[start..end];
        match prod {
            WProd::XWt => crate::gemm_bf16::matmul_xwt(dst, cols, accumulate, xm, wv, out, 1.0),
            WProd::GW => crate::gemm_bf16::matmul(dst, cols, accumulate, xm, AnyMat::new(Src::Bf16(wv), out, in_), 1.0),
        }
        return Ok(());
    }
    bind_f32!(wv = w, op);
    let wm = Mat::new(&wv, out, in_);
    let b = if prod == WProd::XWt { wm.t() } else { wm };
    matmul(dst, accumulate, Mat::new(x, n, k), b, 1.0, Par::All);
    Ok(())
}

/// The CPU storage of a tensor, or an error naming the op.
pub(crate) fn cpu_storage<'a>(s: &'a Storage, op: &str) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => bail!("{op}: expected a CPU tensor"),
    }
}

/// `bind_f32!(name = tensor, "op")` binds `name: Cow<[f32]>`, a contiguous f32 view
/// of a CPU tensor that stays valid (its storage lock held) to the end of the block.
/// f32 tensors are borrowed, not copied.
macro_rules! bind_f32 {
    ($name:ident = $t:expr, $op:expr) => {
        let __t = $t.contiguous()?;
        let __g = __t.storage_and_layout();
        let $name = $crate::cpu::f32_view($crate::cpu::cpu_storage(&__g.0, $op)?, __g.1, $op)?;
    };
}
pub(crate) use bind_f32;

/// exp(x) to ~2 ulp (Cephes polynomial), branch-free so loops over it vectorise;
/// inputs below -87.3 (including -inf) give exactly 0.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// Sum with 16 independent accumulators (vectorises; no fast-math needed).
#[inline]
pub(crate) fn sum_f32(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let mut s: f32 = chunks.remainder().iter().sum();
    s += acc.iter().sum::<f32>();
    s
}

/// Max with 16 independent lanes.
#[inline]
pub(crate) fn max_f32(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    acc.iter().fold(m, |a, &b| a.max(b))
}

/// `v[i] = exp(v[i] - m)` in place, returning the sum.
#[inline]
pub(crate) fn exp_shift_sum(v: &mut [f32], m: f32) -> f32 {
    v.iter_mut().for_each(|x| *x = fast_exp(*x - m));
    sum_f32(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_is_accurate() {
        for i in -1990..=2000 {
            let x = i as f32 * 0.0437;
            let (got, want) = (super::fast_exp(x), x.exp());
            assert!((got - want).abs() <= 3e-7 * want, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(super::fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::fast_exp(-100.0), 0.0);
    }
}

/// A buffer of `n` elements for outputs that are fully overwritten before being read
/// (gemm with `accumulate = false`, element-wise maps): skips the zero-fill pass.
#[allow(clippy::uninit_vec)]
pub fn uninit<T: Copy>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: callers write every element before reading any (plain float data).
    unsafe { v.set_len(n) };
    v
}
