//! SwiGLU `silu(gate) * up` with backward
//! `dgate = dy up sig(g) (1 + g (1 - sig(g)))`, `dup = dy silu(g)`.
use crate::cpu::{f32_view, with_float_slice, Elem, PAR_CHUNK};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
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
