//! CUDA implementations of the lora-kernels ops.
//!
//! `sources` (always compiled, no dependencies) lists the CUDA C sources and the NVRTC
//! options; the GPU-less CI check (`tools/cuda-check`) includes the same file. With the
//! `cuda` feature, `runtime` compiles them with NVRTC for the device's architecture
//! (cached on disk by source hash) and `ops` exposes differentiable tensor functions that
//! launch them through candle's CUDA storage:
//!
//! | function | kernels |
//! | --- | --- |
//! | [`ops::lora_linear`] | `lora_fwd_*` (fused x W^T + s (x A^T) B^T), `lora_bwd_dx_*`, `lora_wgrad_*`; bf16/f16 on tensor cores (`lora_linear.cu`), f32 on FMA (`lora_f32.cu`) or TF32 tensor cores when allowed (`lora_tf32.cu`); ranks above 64 as 64-rank chunks |
//! | [`ops::frozen_linear`] | `lora_fwd_*` / `lora_bwd_dx_*` with rank 0 |
//! | [`attention::causal_attention`] | `attn_fwd_*_d{64,128,256}`, `attn_bwd_dot_*`, `attn_bwd_*_d*`, `attn_seg_starts` |
//! | [`attention::prefix_causal_attention`] | `attn_prefix_fwd_*_d{64,128,256}` (forward only) |
//! | [`ops::rms_norm`] | `rms_norm_fwd_*`, `rms_norm_bwd_*` |
//! | [`ops::rope`] | `rope_*` (the backward is the inverse rotation) |
//! | [`ops::softmax_last_dim`], [`ops::causal_softmax`] | `softmax_fwd_*`, `softmax_bwd_*` |
//! | [`ops::swiglu`] | `swiglu_fwd_*`, `swiglu_bwd_*` |
//! | [`ops::linear_cross_entropy`], [`ops::linear_cross_entropy_rows`] | `lora_fwd_f32out_*` + `ce_rows_*` + `lora_bwd_dx_*` per chunk |
//! | [`segmented::segmented_lora_linear`] | `lora_fwd_f32out_*` (base) + `sgmv_shrink_*`, `sgmv_expand` (composite backward) |
//! | [`ops::AdamW`] | `adamw_multi`, `sqnorm_multi` (one launch for all LoRA tensors) |
pub mod sources;

#[cfg(feature = "cuda")]
pub mod attention;
#[cfg(feature = "cuda")]
pub mod ops;
#[cfg(feature = "cuda")]
pub mod runtime;
#[cfg(feature = "cuda")]
pub mod segmented;
