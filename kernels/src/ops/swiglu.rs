//! SwiGLU `silu(gate) * up` with backward
//! `dgate = dy up sig(g) (1 + g (1 - sig(g)))`, `dup = dy silu(g)`.
use crate::cpu::{f32_view, with_float_slice, Elem, PAR_CHUNK};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use crate::simd::isa_dispatch;
use rayon::prelude::*;

pub struct Swiglu;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + crate::cpu::fast_exp(-x))
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, sg: &CpuStorage, lg: &Layout, su: &CpuStorage, lu: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        if lg.dims() != lu.dims() {
            bail!("swiglu: gate {:?} and up {:?} differ", lg.dims(), lu.dims());
        }
        let up = f32_view(su, lu, self.name())?;
        fn run<T: Elem>(g: &[T], u: &[f32]) -> CpuStorage {
            let mut y: Vec<T> = crate::cpu::uninit(g.len());
            y.par_chunks_mut(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK)).zip(u.par_chunks(PAR_CHUNK)).for_each(
                |((yc, gc), uc)| {
                    for ((o, g), u) in yc.iter_mut().zip(gc).zip(uc) {
                        let g = g.to_f32();
                        *o = T::from_f32(g * sigmoid(g) * u);
                    }
                },
            );
            T::wrap(y)
        }
        let out = with_float_slice!(sg, lg, self.name(), |g| run(g, &up));
        Ok((out, lg.shape().clone()))
    }

    // No cuda_fwd: on CUDA, `lora_kernels::swiglu` calls `cuda::ops::swiglu` (cuda/src/swiglu.cu) instead.

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !gate.track_op() && !up.track_op() {
            return Ok((None, None));
        }
        let g = grad.contiguous()?;
        // Packed [2, ...]: dgate then dup, one pass over memory.
        let packed = gate.apply_op3_no_bwd(up, &g, &SwigluBwd)?;
        let dg = if gate.track_op() { Some(packed.get(0)?) } else { None };
        let du = if up.track_op() { Some(packed.get(1)?.to_dtype(up.dtype())?) } else { None };
        Ok((dg, du))
    }
}

/// Inputs (gate, up, dy); output [2, ...shape] in gate's dtype: (dgate, dup).
pub struct SwigluBwd;

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let up = f32_view(su, lu, self.name())?;
        let dy = f32_view(sd, ld, self.name())?;
        fn run<T: Elem>(g: &[T], u: &[f32], dy: &[f32]) -> CpuStorage {
            let n = g.len();
            let mut out: Vec<T> = crate::cpu::uninit(2 * n);
            let (dg, du) = out.split_at_mut(n);
            dg.par_chunks_mut(PAR_CHUNK)
                .zip(du.par_chunks_mut(PAR_CHUNK))
                .zip(g.par_chunks(PAR_CHUNK))
                .zip(u.par_chunks(PAR_CHUNK).zip(dy.par_chunks(PAR_CHUNK)))
                .for_each(|(((dgc, duc), gc), (uc, dyc))| {
                    for i in 0..gc.len() {
                        let g = gc[i].to_f32();
                        let s = sigmoid(g);
                        dgc[i] = T::from_f32(dyc[i] * uc[i] * s * (1.0 + g * (1.0 - s)));
                        duc[i] = T::from_f32(dyc[i] * g * s);
                    }
                });
            T::wrap(out)
        }
        let out = with_float_slice!(sg, lg, self.name(), |g| run(g, &up, &dy));
        let mut dims = vec![2];
        dims.extend_from_slice(lg.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// SwiGLU on one tensor holding `[gate | up]` in its last dim (the output of the fused
/// gate/up GEMM): `y[..., c] = silu(x[..., c]) * x[..., i + c]`, `i` = half the last dim.
/// Reads both halves in place (no narrowed copies kept for backward) and returns the
/// gradient as one `[dgate | dup]` tensor.
pub struct SwigluCat;

isa_dispatch! {
    /// `o = silu(g) * u` for one row.
    fn swiglu_row<T: Elem>(g: &[T], u: &[T], o: &mut [T]) {
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            let g = g.to_f32();
            *o = T::from_f32(g * sigmoid(g) * u.to_f32());
        }
    }
}

isa_dispatch! {
    /// dgate and dup of one row.
    fn swiglu_bwd_row<T: Elem>(g: &[T], u: &[T], dy: &[f32], dg: &mut [T], du: &mut [T]) {
        for c in 0..dy.len() {
            let g = g[c].to_f32();
            let s = sigmoid(g);
            dg[c] = T::from_f32(dy[c] * u[c].to_f32() * s * (1.0 + g * (1.0 - s)));
            du[c] = T::from_f32(dy[c] * g * s);
        }
    }
}

/// Rows of `2i` inputs -> rows of `i` outputs, `f(gate, up, j)` per element.
fn per_half_row<T: Elem, O: Send>(x: &[T], i: usize, out: &mut [O], width: usize, f: impl Fn(&[T], &[T], &mut [O], usize) + Sync) {
    out.par_chunks_mut(width * (PAR_CHUNK / width.max(1)).max(1)).enumerate().for_each(|(c, oc)| {
        let rows_per = (PAR_CHUNK / width.max(1)).max(1);
        for (r, o) in oc.chunks_mut(width).enumerate() {
            let row = c * rows_per + r;
            let xr = &x[row * 2 * i..(row + 1) * 2 * i];
            f(&xr[..i], &xr[i..], o, row);
        }
    });
}

impl CustomOp1 for SwigluCat {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let two_i = *l.dims().last().unwrap_or(&0);
        if !two_i.is_multiple_of(2) {
            bail!("swiglu: the last dim ({two_i}) must hold gate and up halves");
        }
        let i = two_i / 2;
        fn run<T: Elem>(x: &[T], i: usize) -> CpuStorage {
            let mut y: Vec<T> = crate::cpu::uninit(x.len() / 2);
            per_half_row(x, i, &mut y, i, |g, u, o, _| swiglu_row(g, u, o));
            T::wrap(y)
        }
        let out = with_float_slice!(s, l, self.name(), |x| run(x, i));
        let mut dims = l.dims().to_vec();
        *dims.last_mut().unwrap() = i;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &SwigluCatBwd)?))
    }
}

/// Inputs (x = [gate | up], dy); output [dgate | dup] in x's dtype.
pub struct SwigluCatBwd;

impl CustomOp2 for SwigluCatBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sd: &CpuStorage, ld: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let i = *lx.dims().last().unwrap_or(&0) / 2;
        if ld.shape().elem_count() * 2 != lx.shape().elem_count() {
            bail!("swiglu-bwd: dy {:?} does not match x {:?}", ld.dims(), lx.dims());
        }
        let dy = f32_view(sd, ld, self.name())?;
        fn run<T: Elem>(x: &[T], dy: &[f32], i: usize) -> CpuStorage {
            let mut out: Vec<T> = crate::cpu::uninit(x.len());
            per_half_row(x, i, &mut out, 2 * i, |g, u, o, row| {
                let (dg, du) = o.split_at_mut(i);
                swiglu_bwd_row(g, u, &dy[row * i..(row + 1) * i], dg, du);
            });
            T::wrap(out)
        }
        let out = with_float_slice!(sx, lx, self.name(), |x| run(x, &dy, i));
        Ok((out, lx.shape().clone()))
    }
}
