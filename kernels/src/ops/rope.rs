//! Rotary embedding, Hugging Face rotate_half layout, with its backward (the same
//! rotation by the negated angle).
//!
//! x: [b, h, t, d], any strides with a contiguous last dim (e.g. the
//! `[b, t, h, d] -> transpose(1, 2)` view, read without a copy); output contiguous; cos/sin: [b, t, d/2] (per-row positions) or [t, d/2].
use crate::cpu::{f32_view, Elem};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of a strided x [b, h, t, d] (last dim contiguous).
#[derive(Clone, Copy)]
struct Geo {
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    s0: usize,
    s1: usize,
    s2: usize,
    off: usize,
}

pub struct Rope {
    /// Rotate by -angle (the backward of the forward rotation).
    pub inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.inverse {
            "rope-bwd"
        } else {
            "rope"
        }
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let (b, h, t, d) = lx.shape().dims4()?;
        if d % 2 != 0 {
            bail!("{op}: head dim {d} must be even");
        }
        let half = d / 2;
        let cos = f32_view(sc, lc, op)?;
        let sin = f32_view(ss, ls, op)?;
        let per_batch = match lc.dims() {
            [cb, ct, ch] if *cb == b && *ct == t && *ch == half => true,
            [ct, ch] if *ct == t && *ch == half => false,
            other => bail!("{op}: cos/sin shape {other:?} does not fit x {:?}", lx.dims()),
        };
        if ls.dims() != lc.dims() {
            bail!("{op}: cos {:?} and sin {:?} differ", lc.dims(), ls.dims());
        }
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let st = lx.stride();
        if st[3] != 1 {
            bail!("{op}: the head dim of x must be contiguous (strides {st:?})");
        }
        let geo = Geo { b, h, t, d, s0: st[0], s1: st[1], s2: st[2], off: lx.start_offset() };
        fn run<T: Elem>(x: &[T], cos: &[f32], sin: &[f32], g: Geo, per_batch: bool, sign: f32) -> CpuStorage {
            let (h, t, d) = (g.h, g.t, g.d);
            let half = d / 2;
            let b = g.b;
            let mut y: Vec<T> = crate::cpu::uninit(b * h * t * d);
            // One task per (batch, head) plane of t*d output elements.
            y.par_chunks_mut(t * d).enumerate().for_each(|(bh, yp)| {
                let (bi, hi) = (bh / h, bh % h);
                let off = if per_batch { bi * t * half } else { 0 };
                for ti in 0..t {
                    let c = &cos[off + ti * half..off + (ti + 1) * half];
                    let s = &sin[off + ti * half..off + (ti + 1) * half];
                    let xo = g.off + bi * g.s0 + hi * g.s1 + ti * g.s2;
                    let xr = &x[xo..xo + d];
                    let yr = &mut yp[ti * d..(ti + 1) * d];
                    let (y1, y2) = yr.split_at_mut(half);
                    let (x1, x2) = xr.split_at(half);
                    for i in 0..half {
                        let (a, bb) = (x1[i].to_f32(), x2[i].to_f32());
                        let (c, s) = (c[i], sign * s[i]);
                        y1[i] = T::from_f32(a * c - bb * s);
                        y2[i] = T::from_f32(bb * c + a * s);
                    }
                }
            });
            T::wrap(y)
        }
        let out = match sx {
            CpuStorage::F32(x) => run(x, &cos, &sin, geo, per_batch, sign),
            CpuStorage::BF16(x) => run(x, &cos, &sin, geo, per_batch, sign),
            CpuStorage::F16(x) => run(x, &cos, &sin, geo, per_batch, sign),
            _ => bail!("{op}: unsupported dtype"),
        };
        Ok((out, lx.shape().clone()))
    }

    // No cuda_fwd: on CUDA, `lora_kernels::rope` calls `cuda::ops::rope` (cuda/src/rope.cu) instead.

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let g = grad.contiguous()?;
        let dx = g.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        // cos/sin are position tables, never trained.
        Ok((Some(dx), None, None))
    }
}
