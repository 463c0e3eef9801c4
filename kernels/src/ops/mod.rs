//! One module per fused op. Each op is a candle `CustomOp{1,2,3}` with a CPU forward
//! (`cpu_fwd`) and a hand-written backward (`bwd`). None has a `cuda_fwd`: on CUDA the
//! functions of the crate root call `crate::cuda::ops` (or `reference`) instead.
//! Frozen tensors (base weights, lm_head) are held by the op instead of being op
//! inputs, so candle never computes a gradient for them. Backward ops only compute the
//! gradients of inputs that are tracked (`Tensor::track_op`).
pub mod attention;
pub mod cross_entropy;
pub(crate) mod decode_attention;
pub mod gemv;
pub mod linear;
pub mod rms_norm;
pub mod rope;
pub mod segmented;
pub mod softmax;
pub mod swiglu;
