//! The differentiable building blocks of the decoder.
//!
//! Every function here has a forward AND a backward. candle's stock
//! `softmax_last_dim`, `rms_norm` and `rope` have no backward at all and
//! `backward()` still returns Ok (ARCHITECTURE.md, Pitfalls), so the model must only use these.
//!
//! On CPU each function runs a fused candle custom op from [`ops`] (f32 compute,
//! bf16/f16 storage widened on the fly; matmuls through the `gemm` crate). On CUDA
//! (`cuda` feature) every one calls the NVRTC-compiled kernels of [`cuda`]; on other
//! devices they run the composite version in [`reference`]. Frozen tensors (base weights, biases, lm_head, norm
//! weights that are not `Var`s) never receive a gradient.
use candle_core::{DType, Result, Tensor};

pub mod alloc;
pub mod cpu;
pub mod cuda;
pub mod dequant;
pub mod gemm_bf16;
pub mod ops;
pub mod profile;
pub mod reference;
pub mod sampling;
pub mod simd;

/// Call at the start of `main`, before any candle op: sets up the process for the
/// CPU kernels ([`configure_cpu_threads`], [`alloc::keep_freed_memory`]).
pub fn configure_cpu() {
    configure_cpu_threads();
    alloc::keep_freed_memory();
}

/// Runs candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`)
/// unless the user set it. candle 0.11.1 runs them on its own spin-waiting barrier
/// pool, which competes with rayon (our fused ops and gemm) for the same cores; on the
/// 2-core benchmark machine under load the spinning cost ~2 s of an ~8 s training step
/// (measured, BENCHMARKS.md).
pub fn configure_cpu_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Whether the fused op path serves this device.
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu()
}

/// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`, computed in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::ops::rms_norm(x, weight, eps);
    }
    if !fused(x) {
        return reference::rms_norm(x, weight, eps);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, ops::rms_norm::RmsNorm { eps: eps as f32 })
}

/// Rotary embedding, Hugging Face "rotate_half" layout.
/// `x`: [b, h, t, d]; `cos`, `sin`: [b, t, d/2] (per-row positions, so packed
/// samples can restart at 0), or [t, d/2] shared by all rows. Output contiguous.
/// `x` need not be contiguous: pass `y.reshape((b, t, h, d))?.transpose(1, 2)?`
/// directly (no `.contiguous()` copy, which the graph would also keep alive).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::ops::rope(x, cos, sin);
    }
    if !fused(x) {
        let (cos, sin) = if cos.rank() == 2 {
            let b = x.dim(0)?;
            let (t, h) = cos.dims2()?;
            (cos.unsqueeze(0)?.expand((b, t, h))?, sin.unsqueeze(0)?.expand((b, t, h))?)
        } else {
            (cos.clone(), sin.clone())
        };
        return reference::rope(x, &cos, &sin);
    }
    // A strided view (e.g. [b, t, h, d].transpose(1, 2)) is read in place.
    let x = if x.rank() == 4 && x.stride()[3] == 1 { x.clone() } else { x.contiguous()? };
    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, ops::rope::Rope { inverse: false })
}

/// Numerically stable softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::ops::softmax_last_dim(x);
    }
    if !fused(x) {
        return reference::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1(ops::softmax::Softmax)
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return cuda::ops::swiglu(gate, up);
    }
    if !fused(gate) {
        return reference::swiglu(gate, up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, ops::swiglu::Swiglu)
}

/// `silu(gate) * up` for `x` = `[gate | up]` along the last dim (the fused gate/up
/// projection's output): half the last dim out, the gradient as one `[dgate | dup]`.
pub fn swiglu_cat(x: &Tensor) -> Result<Tensor> {
    let i = x.dim(candle_core::D::Minus1)? / 2;
    if !fused(x) {
        let last = x.rank() - 1;
        return reference::swiglu(&x.narrow(last, 0, i)?, &x.narrow(last, i, i)?);
    }
    x.contiguous()?.apply_op1(ops::swiglu::SwigluCat)
}

/// `x @ w^T (+ bias)` for a frozen `w` [out, in]; `x` is [..., in]. The backward
/// returns dX only (and nothing when `x` needs no gradient). `w` and `bias` may be
/// bf16 while `x` is f32 or the reverse; the output has `x`'s dtype.
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::ops::frozen_linear(x, w, bias);
    }
    if !fused(x) {
        return reference::frozen_linear(x, w, bias);
    }
    let op = ops::linear::FrozenLinear { w: w.detach(), bias: bias.map(|b| b.detach()) };
    x.contiguous()?.apply_op1(op)
}

/// `x W^T (+ bias) + scale * (x A^T) B^T` with `A`: [r, in], `B`: [out, r].
/// `W`/`bias` are frozen. dtypes may be mixed (e.g. bf16 `x` and `W` with f32
/// master `A`/`B`): compute is f32, the output has `x`'s dtype and each gradient
/// its input's dtype.
pub fn lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::ops::lora_linear(x, w, bias, a, b, scale);
    }
    if !fused(x) {
        // The composite path needs one dtype; the casts are differentiable.
        return reference::lora_linear(x, w, bias, &a.to_dtype(x.dtype())?, &b.to_dtype(x.dtype())?, scale);
    }
    let op = ops::linear::LoraLinear::new(w.detach(), bias.map(|b| b.detach()), scale);
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// One adapter's LoRA weights for [`segmented_lora_linear`].
#[derive(Clone, Copy)]
pub struct AdapterWeights<'a> {
    /// [r_j, in]
    pub a: &'a Tensor,
    /// [out, r_j]
    pub b: &'a Tensor,
    pub scale: f64,
}

/// Rows `start..start + len` (of x flattened to [n, in]) go through adapter `adapter`
/// (an index into the adapters slice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowSegment {
    pub start: usize,
    pub len: usize,
    pub adapter: usize,
}

/// Several adapters over one frozen base (mLoRA's BatchLoRA, Punica's SGMV):
/// `y = x W^T (+ bias)` over all rows once, then each segment's rows get
/// `+ scale_j * (x A_j^T) B_j^T` of its adapter only. Rows in no segment get the base
/// alone (the frozen reference model of DPO/GRPO). Segments must lie inside the rows
/// and must not overlap (an Err otherwise); several may name one adapter; ranks and
/// scales may differ per adapter. dtypes as in [`lora_linear`]. `W`/`bias` are frozen;
/// adapter j's gradients come from its own rows only (zeros when it has none).
pub fn segmented_lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    adapters: &[AdapterWeights],
    segments: &[RowSegment],
) -> Result<Tensor> {
    let plan = ops::segmented::Plan::new(x, w, adapters, segments)?;
    if adapters.is_empty() {
        return frozen_linear(x, w, bias);
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::segmented::segmented_lora_linear(x, w, bias, adapters, plan);
    }
    if !fused(x) {
        return reference::segmented_lora_linear(x, w, bias, adapters, segments);
    }
    let (a_all, b_all) = ops::segmented::concat_adapters(adapters)?;
    let op = ops::segmented::SegmentedLora::new(w.detach(), bias.map(|b| b.detach()), plan);
    x.contiguous()?.apply_op3(&a_all, &b_all, op)
}

/// Scaled dot-product attention. `q`: [b, h, tq, d], `k`/`v`: [b, h, tk, d]
/// (already repeated for grouped-query attention), `bias`: additive mask
/// broadcastable to [b, h, tq, tk] (0 or -inf). Returns [b, h, tq, d].
/// Holds the full [b, h, tq, tk] scores; prefer [`causal_attention`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    reference::attention_with_softmax(q, k, v, bias, scale, softmax_last_dim)
}

/// Fused causal attention, memory-bounded (never holds [h, tq, tk] scores).
/// `q`: [b, hq, tq, d]; `k`, `v`: [b, hkv, tk, d] NOT repeated (hq % hkv == 0;
/// query head h reads kv head h / (hq / hkv)). Query i is at position i + tk - tq,
/// so a decode step with a KV cache works. `segments`: optional [b, tk] ids of
/// packed samples; a query sees only keys in its own contiguous run of equal ids.
/// Returns [b, hq, tq, d].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::attention::causal_attention(q, k, v, segments, scale);
    }
    if !fused(q) {
        return reference::causal_attention(q, k, v, segments, scale);
    }
    let seg = segments.map(ops::attention::segments_vec).transpose()?;
    let op = ops::attention::CausalAttention::new(scale as f32, seg);
    // A KV-cache view (`narrow` of a preallocated buffer) is read in place, not copied.
    q.contiguous()?.apply_op3(&ops::attention::kv_operand(k)?, &ops::attention::kv_operand(v)?, op)
}

/// [`causal_attention`] for rows that continue shared prompts (decoding; no graph):
/// batch row r's keys are `prefix_k` row `prefix_of_row[r]` ([p, hkv, lp, d], one per
/// prompt, shared by its completions) followed by its own `k` ([b, hkv, n, d]); likewise
/// the values. `segments`: [b, lp + n], the ids of the joined sequence. On CPU
/// (`ops::attention::PrefixAttention`) and on CUDA (`attn_prefix_fwd_*`,
/// `cuda::attention::prefix_causal_attention`) the prompt's planes and the row's own are
/// read in place, nothing gathered or joined (the result of copying the prompt into
/// every row, to float rounding: a key tile ends where the prompt ends); on other devices
/// the prompt rows are gathered and joined for this call only (the cache still holds each
/// prompt once) and [`causal_attention`] runs on the result.
///
/// `own_start` (empty: all 0): row r reads its own positions from `own_start[r]` on, a row
/// that joined a running batch later than the others (the positions before were written
/// before it joined; their segment ids are ignored).
#[allow(clippy::too_many_arguments)]
pub fn prefix_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, prefix_k: &Tensor, prefix_v: &Tensor, prefix_of_row: &[u32], own_start: &[u32], segments: &Tensor, scale: f64) -> Result<Tensor> {
    if q.track_op() || k.track_op() || v.track_op() || prefix_k.track_op() || prefix_v.track_op() {
        candle_core::bail!("prefix_causal_attention is for decoding: it has no backward (run under inference mode)");
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::attention::prefix_causal_attention(q, k, v, prefix_k, prefix_v, prefix_of_row, own_start, segments, scale);
    }
    if !fused(q) {
        return reference::prefix_causal_attention(q, k, v, prefix_k, prefix_v, prefix_of_row, own_start, segments, scale);
    }
    let op = ops::attention::PrefixAttention {
        scale: scale as f32,
        segments: ops::attention::segments_vec(segments)?,
        prefix_k: ops::attention::kv_operand(prefix_k)?,
        prefix_v: ops::attention::kv_operand(prefix_v)?,
        prefix_of_row: prefix_of_row.iter().map(|&r| r as usize).collect(),
        own_start: own_start.iter().map(|&r| r as usize).collect(),
    };
    q.contiguous()?.apply_op3(&ops::attention::kv_operand(k)?, &ops::attention::kv_operand(v)?, op)
}

/// Sum of token cross-entropies of `hidden @ lm_head^T` against `targets`,
/// weighted by `weights` (0 excludes a row). `hidden`: [n, h], `lm_head`: [v, h],
/// `targets`: [n] u32, `weights`: [n] f32. Returns a scalar f32 tensor (the
/// weighted SUM, so callers can normalise over an accumulated batch).
/// Never materialises [n, v] logits; rows with weight 0 cost nothing.
pub fn linear_cross_entropy(hidden: &Tensor, lm_head: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() {
        return cuda::ops::linear_cross_entropy(hidden, lm_head, targets, weights);
    }
    if !fused(hidden) {
        return reference::linear_cross_entropy(hidden, lm_head, targets, weights);
    }
    let w = weights.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    lce(hidden, lm_head, targets, Some(w))?.sum_all()
}

/// Per-row cross-entropies [n] f32 (= minus the target log-probabilities) of
/// `hidden @ lm_head^T`, differentiable w.r.t. `hidden` (per-token log-probs, as preference and RL
/// methods need; no command uses it yet).
pub fn linear_cross_entropy_rows(hidden: &Tensor, lm_head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() {
        return cuda::ops::linear_cross_entropy_rows(hidden, lm_head, targets);
    }
    if !fused(hidden) {
        return reference::linear_cross_entropy_rows(hidden, lm_head, targets);
    }
    lce(hidden, lm_head, targets, None)
}

fn lce(hidden: &Tensor, lm_head: &Tensor, targets: &Tensor, weights: Option<Vec<f32>>) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
    let op = ops::cross_entropy::LinearCrossEntropy {
        lm_head: lm_head.detach(),
        targets,
        weights,
        want_grad: hidden.track_op(),
        dhidden: std::sync::Mutex::new(None),
    };
    hidden.contiguous()?.apply_op1(op)
}
