//! The composite versions of the public ops, built from candle primitives (which
//! all have backward). Kept as the ground truth for tests and as the path for
//! devices that have no fused kernel yet.
use candle_core::{DType, Result, Tensor, D};

/// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`, computed in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Rotary embedding, Hugging Face "rotate_half" layout.
/// `x`: [b, h, t, d]; `cos`, `sin`: [b, t, d/2] (per-row positions, so packed
/// samples can restart at 0).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let cos = cos.unsqueeze(1)?.to_dtype(x.dtype())?;
    let sin = sin.unsqueeze(1)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

/// Numerically stable softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_core::Tensor::silu(gate)? * up
}

/// `x @ w^T (+ bias)` for a frozen `w` [out, in]; `x` is [..., in].
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x W^T (+ bias) + scale * (x A^T) B^T` with `A`: [r, in], `B`: [out, r].
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let base = frozen_linear(x, w, bias)?;
    let xa = x.broadcast_matmul(&a.t()?)?;
    let lora = (xa.broadcast_matmul(&b.t()?)? * scale)?;
    base + lora
}

/// [`crate::segmented_lora_linear`] from candle ops: the base over all rows plus, per
/// segment, its adapter's `scale * (x A^T) B^T` on its rows (narrow / matmul / cat).
/// A and B are cast to x's dtype (differentiable) so mixed dtypes work.
pub fn segmented_lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    adapters: &[crate::AdapterWeights],
    segments: &[crate::RowSegment],
) -> Result<Tensor> {
    let plan = crate::ops::segmented::Plan::new(x, w, adapters, segments)?;
    let (n, k) = (plan.n, plan.k);
    let x2 = x.reshape((n, k))?;
    let mut blocks = Vec::with_capacity(plan.segments.len());
    for s in &plan.segments {
        let ad = &adapters[s.adapter];
        let xs = x2.narrow(0, s.start, s.len)?;
        let xa = xs.matmul(&ad.a.to_dtype(x.dtype())?.t()?)?;
        blocks.push((s.start, (xa.matmul(&ad.b.to_dtype(x.dtype())?.t()?)? * ad.scale)?));
    }
    let lora = crate::ops::segmented::scatter_rows(n, plan.out, blocks, x.device())?.to_dtype(x.dtype())?;
    let y = (frozen_linear(&x2, w, bias)? + lora)?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = plan.out;
    y.reshape(dims)
}

/// Scaled dot-product attention. `q`: [b, h, tq, d], `k`/`v`: [b, h, tk, d]
/// (already repeated for grouped-query attention), `bias`: additive mask
/// broadcastable to [b, h, tq, tk] (0 or -inf). Returns [b, h, tq, d].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    attention_with_softmax(q, k, v, bias, scale, softmax_last_dim)
}

/// [`attention`] with the softmax supplied by the caller (the public API passes the
/// fused one; this module its composite one).
pub fn attention_with_softmax(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    softmax: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs = softmax(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}

/// Sum of token cross-entropies of `hidden @ lm_head^T` against `targets`,
/// weighted by `weights` (0 excludes a row). `hidden`: [n, h], `lm_head`: [v, h],
/// `targets`: [n] u32, `weights`: [n] f32. Returns a scalar f32 tensor (the
/// weighted SUM, so callers can normalise over an accumulated batch).
pub fn linear_cross_entropy(hidden: &Tensor, lm_head: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let logits = hidden.matmul(&lm_head.t()?)?.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    let nll = (lse - picked)?.squeeze(1)?;
    (nll * weights)?.sum_all()
}

/// Repeat each key/value head `n` times (`[b, h, t, d] -> [b, h*n, t, d]`).
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, h, n, t, d))?.reshape((b, h * n, t, d))
}

/// The additive mask of [`crate::causal_attention`]: [b, 1, tq, tk] f32, 0 or -inf.
pub fn causal_mask(b: usize, tq: usize, tk: usize, segments: Option<&Tensor>, device: &candle_core::Device) -> Result<Tensor> {
    let seg = match segments {
        Some(s) => Some(crate::ops::attention::segments_vec(s)?),
        None => None,
    };
    let off = tk - tq;
    let mut m = vec![0f32; b * tq * tk];
    for bi in 0..b {
        for i in 0..tq {
            let pos = i + off;
            for j in 0..tk {
                let mut visible = j <= pos;
                if let Some(s) = &seg {
                    // same contiguous run of equal ids
                    visible &= (j..=pos).all(|x| s[bi * tk + x] == s[bi * tk + pos]);
                }
                if !visible {
                    m[(bi * tq + i) * tk + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, tq, tk), device)
}

/// Composite causal attention with grouped-query heads and optional segment ids.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, hq, tq, _) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let k = repeat_kv(k, hq / hkv)?;
    let v = repeat_kv(v, hq / hkv)?;
    let mask = causal_mask(b, tq, tk, segments, q.device())?;
    attention(q, &k, &v, Some(&mask), scale)
}

/// Per-row (unweighted) cross-entropies [n] f32 of `hidden @ lm_head^T`.
pub fn linear_cross_entropy_rows(hidden: &Tensor, lm_head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = hidden.matmul(&lm_head.t()?)?.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.squeeze(1)
}

/// [`crate::prefix_causal_attention`] from tensor ops (the path of devices without the
/// CPU op): each row's prompt rows are gathered and joined in front of its own, then
/// [`crate::causal_attention`] runs on the joined rows. A row's skipped own positions
/// (before its `own_start`) are moved to the front of its joined row with segment id 0,
/// so every row keeps `lp + n` keys and the query its position at the end; attention
/// skips them as padding.
#[allow(clippy::too_many_arguments)]
pub fn prefix_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, prefix_k: &Tensor, prefix_v: &Tensor, prefix_of_row: &[u32], own_start: &[u32], segments: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, n, _) = k.dims4()?;
    let (p, _, lp, _) = prefix_k.dims4()?;
    if prefix_of_row.len() != b || prefix_of_row.iter().any(|&r| r as usize >= p) {
        candle_core::bail!("prefix-attention: {} prefix rows for {b} batch rows of {p} prefixes", prefix_of_row.len());
    }
    let rows = Tensor::from_slice(prefix_of_row, b, q.device())?;
    let join = |prefix: &Tensor, own: &Tensor| Tensor::cat(&[&prefix.index_select(&rows, 0)?, &own.contiguous()?], 2);
    let (kj, vj) = (join(prefix_k, k)?, join(prefix_v, v)?);
    if own_start.iter().all(|&s| s == 0) {
        return crate::causal_attention(q, &kj, &vj, Some(segments), scale);
    }
    if own_start.len() != b || own_start.iter().any(|&s| s as usize >= n) {
        candle_core::bail!("prefix-attention: own starts {own_start:?} for {b} rows of {n} positions");
    }
    // Joined position j of row r comes from: a skipped own position (j < s), the prompt
    // (s <= j < s + lp), or its own position j.
    let tk = lp + n;
    let seg = crate::ops::attention::segments_vec(segments)?;
    let (mut from, mut ids) = (Vec::with_capacity(b * tk), Vec::with_capacity(b * tk));
    for (r, &s) in own_start.iter().enumerate() {
        let s = s as usize;
        for j in 0..tk {
            let src = if j < s { lp } else if j < s + lp { j - s } else { j };
            from.push(src as u32);
            ids.push(if j < s { 0 } else { seg[r * tk + src] });
        }
    }
    let (_, h, _, d) = kj.dims4()?;
    let index = Tensor::from_vec(from, (b, 1, tk, 1), q.device())?.broadcast_as((b, h, tk, d))?.contiguous()?;
    let ids = Tensor::from_vec(ids, (b, tk), q.device())?;
    crate::causal_attention(q, &kj.gather(&index, 2)?, &vj.gather(&index, 2)?, Some(&ids), scale)
}
