//! Frozen-weight linear and fused LoRA linear.
//!
//! The frozen weight `W` [out, in] (and bias) live inside the op, not as op inputs,
//! so candle's backprop never asks for (or computes) their gradient. The LoRA op
//! computes `y = x W^T + b + s (x A^T) B^T` without forming `W + s B A`, keeps
//! `x A^T` for backward, and returns dX, dA, dB from one backward call.
use super::gemv;
use crate::cpu::{bind_f32, f32_view, frozen_matmul, matmul, storage_from_f32, tensor_from_f32, Mat, Par, WProd};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

pub(crate) fn out_shape(x: &Layout, out: usize) -> Shape {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = out;
    Shape::from(dims)
}

/// `y = x W^T + bias` into a fresh f32 buffer (bias broadcast first, then gemm accumulates).
/// `x_dtype`: the activations' storage dtype (picks the bf16 kernel, see [`frozen_matmul`]).
pub(crate) fn base_forward(x: &[f32], n: usize, k: usize, w: &Tensor, bias: Option<&Tensor>, x_dtype: DType, op: &str) -> Result<Vec<f32>> {
    let (out, in_) = w.dims2()?;
    if in_ != k {
        bail!("{op}: x has {k} features but the weight expects {in_}");
    }
    let mut y = crate::cpu::uninit::<f32>(n * out);
    let acc = match bias {
        Some(b) => {
            bind_f32!(bv = b, op);
            if bv.len() != out {
                bail!("{op}: bias has {} elements, expected {out}", bv.len());
            }
            y.chunks_exact_mut(out).for_each(|row| row.copy_from_slice(&bv));
            true
        }
        None => false,
    };
    let dot = crate::cpu::use_bf16_dot(x_dtype, w);
    let kind = match w.dtype() {
        DType::BF16 if dot => gemv::Kind::Bf16Dot,
        DType::BF16 => gemv::Kind::Bf16Widened,
        _ => gemv::Kind::F32,
    };
    if n <= gemv::fast_rows(kind) {
        let wc = w.contiguous()?;
        let (ws, wl) = wc.storage_and_layout();
        match gemv::Weights::from_storage(crate::cpu::cpu_storage(&ws, op)?, wl) {
            Some(gemv::Weights::Bf16(wv)) if dot => {
                gemv::gemv_rows_bf16_dot(x, n, k, wv, out, &mut y, acc);
                return Ok(y);
            }
            Some(weights) => {
                gemv::gemv_rows(x, n, k, &weights, out, &mut y, acc);
                return Ok(y);
            }
            None => {}
        }
    }
    frozen_matmul(&mut y, acc, x, n, w, WProd::XWt, x_dtype, op)?;
    Ok(y)
}

/// Forward op of [`crate::frozen_linear`]: input `x` [..., in].
pub struct FrozenLinear {
    pub w: Tensor,
    pub bias: Option<Tensor>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let k = *l.dims().last().unwrap_or(&1);
        let n = l.shape().elem_count() / k.max(1);
        let x = f32_view(s, l, op)?;
        let y = base_forward(&x, n, k, &self.w, self.bias.as_ref(), s.dtype(), op)?;
        let out = self.w.dim(0)?;
        Ok((storage_from_f32(y, s.dtype())?, out_shape(l, out)))
    }

    // No cuda_fwd: on CUDA, `lora_kernels::frozen_linear` calls `cuda::ops::frozen_linear`
    // (the tensor-core kernels of cuda/src/lora_linear.cu with rank 0, bias in the epilogue).

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None); // e.g. the first layer's input: the embeddings are frozen
        }
        if grad.device().is_cpu() {
            let g = grad.contiguous()?;
            return Ok(Some(g.apply_op1_no_bwd(&FrozenLinearBwd { w: self.w.clone(), dtype: x.dtype() })?));
        }
        // Device-generic fallback (no dW is ever computed: W is not an op input).
        let w = self.w.to_dtype(grad.dtype())?;
        Ok(Some(grad.broadcast_matmul(&w)?.to_dtype(x.dtype())?))
    }
}

/// `dX = dY W`: input dY [..., out], output [..., in].
pub struct FrozenLinearBwd {
    pub w: Tensor,
    pub dtype: candle_core::DType,
}

impl CustomOp1 for FrozenLinearBwd {
    fn name(&self) -> &'static str {
        "frozen-linear-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let (out, in_) = self.w.dims2()?;
        let n = l.shape().elem_count() / out.max(1);
        let g = f32_view(s, l, op)?;
        let mut dx = crate::cpu::uninit::<f32>(n * in_);
        frozen_matmul(&mut dx, false, &g, n, &self.w, WProd::GW, s.dtype(), op)?;
        Ok((storage_from_f32(dx, self.dtype)?, out_shape(l, in_)))
    }
}

/// Forward op of [`crate::lora_linear`]: inputs `x` [..., in], `A` [r, in], `B` [out, r].
pub struct LoraLinear {
    pub w: Tensor,
    pub bias: Option<Tensor>,
    pub scale: f64,
    /// `x A^T` [n, r] in f32, saved by the forward for the backward.
    pub xa: Mutex<Option<Tensor>>,
}

impl LoraLinear {
    pub fn new(w: Tensor, bias: Option<Tensor>, scale: f64) -> Self {
        LoraLinear { w, bias, scale, xa: Mutex::new(None) }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let k = *lx.dims().last().unwrap_or(&1);
        let n = lx.shape().elem_count() / k.max(1);
        let (r, a_in) = la.shape().dims2()?;
        let (out, b_r) = lb.shape().dims2()?;
        if a_in != k || b_r != r || self.w.dim(0)? != out {
            bail!("{op}: shape mismatch x {:?} A {:?} B {:?} W {:?}", lx.dims(), la.dims(), lb.dims(), self.w.dims());
        }
        let x = f32_view(sx, lx, op)?;
        let a = f32_view(sa, la, op)?;
        let b = f32_view(sb, lb, op)?;
        let mut y = {
            let _p = crate::profile::part("lora-linear/base");
            base_forward(&x, n, k, &self.w, self.bias.as_ref(), sx.dtype(), op)?
        };
        let _p = crate::profile::part("lora-linear/lora+casts");
        let mut xa = crate::cpu::uninit::<f32>(n * r);
        matmul(&mut xa, false, Mat::new(&x, n, k), Mat::new(&a, r, k).t(), 1.0, Par::All);
        matmul(&mut y, true, Mat::new(&xa, n, r), Mat::new(&b, out, r).t(), self.scale as f32, Par::All);
        *self.xa.lock().unwrap() = Some(tensor_from_f32(xa, (n, r), candle_core::DType::F32)?);
        Ok((storage_from_f32(y, sx.dtype())?, out_shape(lx, out)))
    }

    // No cuda_fwd: on CUDA, `lora_kernels::lora_linear` calls `cuda::ops::lora_linear`
    // (cuda/src/lora_linear.cu: base GEMM + down-projection, up-projection + scale in the
    // epilogue), which has its own backward.

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xa = self.xa.lock().unwrap().take();
        if grad.device().is_cpu() {
            self.cpu_bwd(x, a, b, grad, xa)
        } else {
            self.generic_bwd(x, a, b, grad)
        }
    }
}

impl LoraLinear {
    fn cpu_bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
        xa: Option<Tensor>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "lora-linear-bwd";
        let _p = crate::profile::scope(op);
        let s = self.scale as f32;
        let (r, k) = a.dims2()?;
        let (out, _) = b.dims2()?;
        let n = x.elem_count() / k;
        bind_f32!(g = grad, op);
        bind_f32!(xv = x, op);
        bind_f32!(av = a, op);
        bind_f32!(bv = b, op);
        let g = Mat::new(&g, n, out);
        // gx = s * dY B  [n, r]: the gradient reaching x A^T.
        let mut gx = crate::cpu::uninit::<f32>(n * r);
        matmul(&mut gx, false, g, Mat::new(&bv, out, r), s, Par::All);
        let db = if b.track_op() {
            let xa = match xa {
                Some(t) => t,
                None => {
                    let mut v = vec![0f32; n * r];
                    matmul(&mut v, false, Mat::new(&xv, n, k), Mat::new(&av, r, k).t(), 1.0, Par::All);
                    tensor_from_f32(v, (n, r), candle_core::DType::F32)?
                }
            };
            bind_f32!(xav = xa, op);
            let mut db = crate::cpu::uninit::<f32>(out * r);
            matmul(&mut db, false, g.t(), Mat::new(&xav, n, r), s, Par::All);
            Some(tensor_from_f32(db, (out, r), b.dtype())?)
        } else {
            None
        };
        let da = if a.track_op() {
            let mut da = crate::cpu::uninit::<f32>(r * k);
            matmul(&mut da, false, Mat::new(&gx, n, r).t(), Mat::new(&xv, n, k), 1.0, Par::All);
            Some(tensor_from_f32(da, (r, k), a.dtype())?)
        } else {
            None
        };
        let dx = if x.track_op() {
            let mut dx = crate::cpu::uninit::<f32>(n * k);
            {
                let _p = crate::profile::part("lora-linear-bwd/base-dx");
                frozen_matmul(&mut dx, false, g.data, n, &self.w, WProd::GW, grad.dtype(), op)?;
            }
            matmul(&mut dx, true, Mat::new(&gx, n, r), Mat::new(&av, r, k), 1.0, Par::All);
            Some(tensor_from_f32(dx, x.shape(), x.dtype())?)
        } else {
            None
        };
        Ok((dx, da, db))
    }

    /// Device-generic backward from candle tensor ops (used until a device has its own).
    fn generic_bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use candle_core::DType::F32;
        let (r, k) = a.dims2()?;
        let out = b.dim(0)?;
        let n = x.elem_count() / k;
        let g = grad.reshape((n, out))?.to_dtype(F32)?;
        let xf = x.reshape((n, k))?.to_dtype(F32)?;
        let af = a.to_dtype(F32)?;
        let bf = b.to_dtype(F32)?;
        let gx = (g.matmul(&bf)? * self.scale)?;
        let db = if b.track_op() {
            let xa = xf.matmul(&af.t()?)?;
            Some((g.t()?.matmul(&xa)? * self.scale)?.to_dtype(b.dtype())?)
        } else {
            None
        };
        let da = if a.track_op() { Some(gx.t()?.matmul(&xf)?.to_dtype(a.dtype())?) } else { None };
        let dx = if x.track_op() {
            let w = self.w.to_dtype(F32)?;
            let dx = (g.matmul(&w)? + gx.matmul(&af)?)?;
            Some(dx.reshape(x.shape())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        let _ = r;
        Ok((dx, da, db))
    }
}
