//! RMSNorm over the last dim with a hand-written backward.
//!
//! forward:  r = 1/sqrt(mean(x^2) + eps), y = x r w
//! backward: g = dy w, dx = r (g - x r^2 mean(g x)), dw = sum_rows dy x r
use crate::cpu::{with_float_slice, Elem};
use crate::simd::isa_dispatch;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per rayon task.
const ROWS: usize = 16;

/// 1 / rms(x), the sum of squares over 16 independent lanes (a single running sum is a
/// 576-long dependency chain per row and does not vectorise).
#[inline(always)]
fn inv_rms<T: Elem>(x: &[T], eps: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v.to_f32() * v.to_f32()).sum();
    for c in chunks {
        for i in 0..16 {
            let v = c[i].to_f32();
            acc[i] += v * v;
        }
    }
    let ss = tail + acc.iter().sum::<f32>();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

isa_dispatch! {
    /// One block of rows of the forward: `y = x / rms(x) * w`.
    fn forward_rows<T: Elem>(yc: &mut [T], xc: &[T], w: &[f32], d: usize, eps: f32) {
        for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
            let r = inv_rms(xr, eps);
            for ((o, i), w) in yr.iter_mut().zip(xr).zip(w) {
                *o = T::from_f32(i.to_f32() * r * w);
            }
        }
    }
}

isa_dispatch! {
    /// One block of rows of the backward: their dX, and their share of dW added to `dw`
    /// (empty when W is frozen).
    fn backward_rows<T: Elem>(dxc: &mut [f32], xc: &[T], gc: &[f32], w: &[f32], dw: &mut [f32], d: usize, eps: f32) {
        for ((dxr, xr), gr) in dxc.chunks_exact_mut(d).zip(xc.chunks_exact(d)).zip(gc.chunks_exact(d)) {
            let r = inv_rms(xr, eps);
            let mut acc = [0f32; 16];
            let (xs, gs, ws) = (xr.chunks_exact(16), gr.chunks_exact(16), w.chunks_exact(16));
            let tail: f32 = xs.remainder().iter().zip(gs.remainder()).zip(ws.remainder()).map(|((x, g), w)| g * w * x.to_f32()).sum();
            for ((x, g), w) in xs.zip(gs).zip(ws) {
                for i in 0..16 {
                    acc[i] += g[i] * w[i] * x[i].to_f32();
                }
            }
            let dot = tail + acc.iter().sum::<f32>();
            let c = dot * r * r / d as f32;
            for (((o, x), g), w) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = r * (g * w - x.to_f32() * c);
            }
            for ((a, x), g) in dw.iter_mut().zip(xr).zip(gr) {
                *a += g * x.to_f32() * r;
            }
        }
    }
}

fn weight_f32(s: &CpuStorage, l: &Layout, d: usize, op: &str) -> Result<Vec<f32>> {
    let w = crate::cpu::f32_view(s, l, op)?;
    if w.len() != d {
        bail!("{op}: weight has {} elements, expected {d}", w.len());
    }
    Ok(w.into_owned())
}

pub struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let d = *lx.dims().last().unwrap_or(&1);
        let w = weight_f32(sw, lw, d, op)?;
        let eps = self.eps;
        fn run<T: Elem>(x: &[T], w: &[f32], d: usize, eps: f32) -> CpuStorage {
            let mut y: Vec<T> = crate::cpu::uninit(x.len());
            y.par_chunks_mut(d * ROWS).zip(x.par_chunks(d * ROWS)).for_each(|(yc, xc)| forward_rows(yc, xc, w, d, eps));
            T::wrap(y)
        }
        let out = with_float_slice!(sx, lx, op, |x| run(x, &w, d, eps));
        Ok((out, lx.shape().clone()))
    }

    // No cuda_fwd: on CUDA, `lora_kernels::rms_norm` calls `cuda::ops::rms_norm` (cuda/src/rms_norm.cu) instead.

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() && !w.track_op() {
            return Ok((None, None));
        }
        let bw = RmsNormBwd { eps: self.eps, want_dw: w.track_op() };
        let g = grad.contiguous()?;
        // One fused pass: [dx | dw partial sums] packed in a single output.
        let packed = x.apply_op3_no_bwd(w, &g, &bw)?;
        let d = w.elem_count();
        let n = x.elem_count() / d;
        let dx = if x.track_op() {
            Some(packed.narrow(0, 0, n * d)?.reshape(x.shape())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        let dw = if w.track_op() { Some(packed.narrow(0, n * d, d)?.to_dtype(w.dtype())?) } else { None };
        Ok((dx, dw))
    }
}

/// Backward: inputs (x, w, dy); output a flat f32 [n*d + d] = [dx, dw].
pub struct RmsNormBwd {
    pub eps: f32,
    pub want_dw: bool,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let d = *lx.dims().last().unwrap_or(&1);
        let n = lx.shape().elem_count() / d.max(1);
        let w = weight_f32(sw, lw, d, op)?;
        let g = crate::cpu::f32_view(sg, lg, op)?;
        let (eps, want_dw) = (self.eps, self.want_dw);
        fn run<T: Elem>(x: &[T], g: &[f32], w: &[f32], n: usize, d: usize, eps: f32, want_dw: bool) -> Vec<f32> {
            let mut out = vec![0f32; n * d + d];
            let (dx, dw_out) = out.split_at_mut(n * d);
            let partial: Vec<f32> = dx
                .par_chunks_mut(d * ROWS)
                .zip(x.par_chunks(d * ROWS))
                .zip(g.par_chunks(d * ROWS))
                .map(|((dxc, xc), gc)| {
                    let mut dw = if want_dw { vec![0f32; d] } else { Vec::new() };
                    backward_rows(dxc, xc, gc, w, &mut dw, d, eps);
                    dw
                })
                .reduce(Vec::new, |mut a, b| {
                    if a.is_empty() {
                        return b;
                    }
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                });
            if want_dw && !partial.is_empty() {
                dw_out.copy_from_slice(&partial);
            }
            out
        }
        let out = with_float_slice!(sx, lx, op, |x| run(x, &g, &w, n, d, eps, want_dw));
        Ok((CpuStorage::F32(out), Shape::from(n * d + d)))
    }
}
