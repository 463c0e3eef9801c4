//! Softmax over the last dim with backward `dx = y (dy - sum(dy y))`.
use crate::cpu::{exp_shift_sum, f32_view, max_f32, sum_f32, with_float_slice, Elem};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let d = *l.dims().last().unwrap_or(&1);
        fn run<T: Elem>(x: &[T], d: usize) -> CpuStorage {
            let mut y: Vec<T> = crate::cpu::uninit(x.len());
            let rows = (crate::cpu::PAR_CHUNK / d.max(1)).max(1);
            y.par_chunks_mut(d * rows).zip(x.par_chunks(d * rows)).for_each(|(yc, xc)| {
                let mut buf = vec![0f32; d];
                for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                    buf.iter_mut().zip(xr).for_each(|(b, v)| *b = v.to_f32());
                    let m = max_f32(&buf);
                    let inv = 1.0 / exp_shift_sum(&mut buf, m);
                    for (o, b) in yr.iter_mut().zip(&buf) {
                        *o = T::from_f32(b * inv);
                    }
                }
            });
            T::wrap(y)
        }
        let out = with_float_slice!(s, l, self.name(), |x| run(x, d));
        Ok((out, l.shape().clone()))
    }

    // No cuda_fwd: on CUDA, `lora_kernels::softmax_last_dim` calls `cuda::ops::softmax_last_dim` (cuda/src/softmax.cu).

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let y = res.contiguous()?;
        let g = grad.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&g, &SoftmaxBwd)?))
    }
}

/// Inputs (y, dy), output dx in y's dtype.
pub struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-last-dim-bwd"
    }

    fn cpu_fwd(&self, sy: &CpuStorage, ly: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let d = *ly.dims().last().unwrap_or(&1);
        let g = f32_view(sg, lg, self.name())?;
        fn run<T: Elem>(y: &[T], g: &[f32], d: usize) -> CpuStorage {
            let mut dx: Vec<T> = crate::cpu::uninit(y.len());
            let rows = (crate::cpu::PAR_CHUNK / d.max(1)).max(1);
            dx.par_chunks_mut(d * rows).zip(y.par_chunks(d * rows)).zip(g.par_chunks(d * rows)).for_each(
                |((dc, yc), gc)| {
                    for ((dr, yr), gr) in dc.chunks_exact_mut(d).zip(yc.chunks_exact(d)).zip(gc.chunks_exact(d)) {
                        let mut prod = [0f32; 256];
                        let mut dot = 0f32;
                        for (yc, gc) in yr.chunks(256).zip(gr.chunks(256)) {
                            let p = &mut prod[..yc.len()];
                            p.iter_mut().zip(yc).zip(gc).for_each(|((p, y), g)| *p = y.to_f32() * g);
                            dot += sum_f32(p);
                        }
                        for ((o, y), g) in dr.iter_mut().zip(yr).zip(gr) {
                            *o = T::from_f32(y.to_f32() * (g - dot));
                        }
                    }
                },
            );
            T::wrap(dx)
        }
        let out = with_float_slice!(sy, ly, self.name(), |y| run(y, &g, d));
        Ok((out, ly.shape().clone()))
    }
}
