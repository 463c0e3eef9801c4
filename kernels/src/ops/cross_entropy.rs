//! Chunked linear + cross-entropy (Liger's fused-linear-cross-entropy idea).
//!
//! For `hidden` [n, h] and a frozen `lm_head` [v, h], returns the per-row
//! `w_i * (logsumexp(h_i W^T) - (h_i W^T)[t_i])` [n] f32. Rows are processed in
//! chunks of `chunk_rows(v)`; each chunk's logits live only in a scratch buffer
//! that is turned into d(loss_i)/d(logits) in place and multiplied back through
//! `lm_head`, so the forward already holds d(loss_i)/d(h_i) [n, h]. The backward
//! only scales those rows by the incoming gradient. Rows with weight 0 are skipped.
use crate::gemm_bf16;
use crate::cpu::{exp_shift_sum, f32_view, matmul, max_f32, tensor_from_f32, Mat, Par};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Logit scratch budget in f32 elements (32 MiB).
const SCRATCH: usize = 1 << 23;

fn chunk_rows(vocab: usize) -> usize {
    (SCRATCH / vocab.max(1)).clamp(16, 1024)
}

/// The two products with `lm_head` [v, h] that every row chunk needs, with the
/// weight prepared once per call: packed for the bf16 kernel (bf16 hidden states and
/// lm_head on an AVX512-BF16 CPU, see `cpu::use_bf16_dot`), else an f32 view.
enum LmHead<'a> {
    /// `w` is read in place for the logits; `plain` is packed for d(hidden).
    Bf16 { w: &'a [half::bf16], plain: Option<gemm_bf16::PackedB>, v: usize, h: usize },
    F32 { w: std::borrow::Cow<'a, [f32]>, v: usize, h: usize },
}

impl<'a> LmHead<'a> {
    fn new(lm: &'a CpuStorage, l: &Layout, x_dtype: DType, want_grad: bool, op: &str) -> Result<Self> {
        let (v, h) = l.shape().dims2()?;
        if x_dtype == DType::BF16 && gemm_bf16::available() {
            if let (CpuStorage::BF16(w), Some((start, end))) = (lm, l.contiguous_offsets()) {
                use gemm_bf16::{AnyMat, PackedB, Src};
                let wm = AnyMat::new(Src::Bf16(&w[start..end]), v, h);
                let plain = if want_grad { Some(PackedB::new(&wm)) } else { None };
                return Ok(LmHead::Bf16 { w: &w[start..end], plain, v, h });
            }
        }
        Ok(LmHead::F32 { w: f32_view(lm, l, op)?, v, h })
    }

    /// `logits [m, v] = hidden [m, h] lm_head^T`.
    fn logits(&self, lg: &mut [f32], hc: &[f32], m: usize) {
        match self {
            LmHead::Bf16 { w, v, h, .. } => gemm_bf16::matmul_xwt(lg, *v, false, gemm_bf16::AnyMat::new(gemm_bf16::Src::F32(hc), m, *h), w, *v, 1.0),
            LmHead::F32 { w, v, h } => matmul(lg, false, Mat::new(hc, m, *h), Mat::new(w, *v, *h).t(), 1.0, Par::All),
        }
    }

    /// `dhidden [m, h] = dlogits [m, v] lm_head`.
    fn dhidden(&self, dhc: &mut [f32], lg: &[f32], m: usize) {
        match self {
            LmHead::Bf16 { plain, v, h, .. } => {
                let plain = plain.as_ref().expect("packed for the gradient");
                gemm_bf16::matmul_packed(dhc, *h, false, gemm_bf16::AnyMat::new(gemm_bf16::Src::F32(lg), m, *v), plain, 1.0)
            }
            LmHead::F32 { w, v, h } => matmul(dhc, false, Mat::new(lg, m, *v), Mat::new(w, *v, *h), 1.0, Par::All),
        }
    }
}

pub struct LinearCrossEntropy {
    pub lm_head: Tensor,
    pub targets: Vec<u32>,
    pub weights: Option<Vec<f32>>,
    /// Compute d(loss)/d(hidden) in the forward (false for evaluation).
    pub want_grad: bool,
    /// d(loss_i)/d(hidden_i) [n, h] f32, saved by the forward.
    pub dhidden: Mutex<Option<Tensor>>,
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let (n, h) = l.shape().dims2()?;
        let (v, lh) = self.lm_head.dims2()?;
        if lh != h || self.targets.len() != n || self.weights.as_ref().is_some_and(|w| w.len() != n) {
            bail!("{op}: hidden [{n}, {h}], lm_head {:?}, {} targets", self.lm_head.dims(), self.targets.len());
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("{op}: target {t} outside the vocabulary of {v}");
        }
        let hid = f32_view(s, l, op)?;
        let lm_c = self.lm_head.contiguous()?;
        let lm_g = lm_c.storage_and_layout();
        let _pp = crate::profile::part("linear-cross-entropy/prepare");
        let lm_prod = LmHead::new(crate::cpu::cpu_storage(&lm_g.0, op)?, lm_g.1, s.dtype(), self.want_grad, op)?;
        drop(_pp);
        let active: Vec<usize> = match &self.weights {
            Some(w) => (0..n).filter(|&i| w[i] != 0.0).collect(),
            None => (0..n).collect(),
        };
        let weight = |i: usize| self.weights.as_ref().map_or(1.0, |w| w[i]);
        let mut loss = vec![0f32; n];
        let mut dh = if self.want_grad { vec![0f32; n * h] } else { Vec::new() };
        let c = chunk_rows(v);
        let mut logits = crate::cpu::uninit::<f32>(c.min(active.len().max(1)) * v);
        let mut hc = vec![0f32; c * h];
        let mut dhc = vec![0f32; c * h];
        for rows in active.chunks(c) {
            let m = rows.len();
            for (j, &i) in rows.iter().enumerate() {
                hc[j * h..(j + 1) * h].copy_from_slice(&hid[i * h..(i + 1) * h]);
            }
            let lg = &mut logits[..m * v];
            {
                let _p = crate::profile::part("linear-cross-entropy/logits");
                lm_prod.logits(lg, &hc[..m * h], m);
            }
            let want_grad = self.want_grad;
            let nll: Vec<f32> = lg
                .par_chunks_mut(v)
                .zip(rows.par_iter())
                .map(|(row, &i)| {
                    let t = self.targets[i] as usize;
                    let mx = max_f32(row);
                    let picked = row[t];
                    let sum = exp_shift_sum(row, mx);
                    let lse = mx + sum.ln();
                    let w = weight(i);
                    let nll = w * (lse - picked);
                    if want_grad {
                        let c = w / sum;
                        row.iter_mut().for_each(|x| *x *= c);
                        row[t] -= w;
                    }
                    nll
                })
                .collect();
            for (&i, l) in rows.iter().zip(nll) {
                loss[i] = l;
            }
            if self.want_grad {
                let _p = crate::profile::part("linear-cross-entropy/dhidden");
                lm_prod.dhidden(&mut dhc[..m * h], lg, m);
                for (j, &i) in rows.iter().enumerate() {
                    dh[i * h..(i + 1) * h].copy_from_slice(&dhc[j * h..(j + 1) * h]);
                }
            }
        }
        if self.want_grad {
            *self.dhidden.lock().unwrap() = Some(tensor_from_f32(dh, (n, h), DType::F32)?);
        }
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    // No cuda_fwd: on CUDA, `lora_kernels::linear_cross_entropy` and `linear_cross_entropy_rows`
    // call `cuda::ops::linear_cross_entropy{,_rows}` (chunked, cuda/src/cross_entropy.cu).

    fn bwd(&self, hidden: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !hidden.track_op() {
            return Ok(None);
        }
        let dh = match self.dhidden.lock().unwrap().take() {
            Some(t) => t,
            None => bail!("linear-cross-entropy: no saved gradient (built with want_grad = false, or backward ran twice)"),
        };
        let _p = crate::profile::scope("linear-cross-entropy-bwd");
        let g = grad.to_dtype(DType::F32)?.reshape((grad.elem_count(), 1))?;
        Ok(Some(dh.broadcast_mul(&g)?.to_dtype(hidden.dtype())?))
    }
}
