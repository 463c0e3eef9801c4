//! Llama / Qwen2 / Qwen3 decoders with LoRA: loading (HF safetensors, GGUF, hub
//! cache), the decoder, PEFT adapters, merging and KV-cached generation.
pub mod checkpointing;
pub mod config;
pub mod continuous;
pub mod decoder;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod io;
pub mod lora;
pub mod merge;
pub mod quant;
pub mod model;
pub mod prefix_cache;
pub mod rollout;
pub mod rope;
pub mod rng;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use continuous::{DecodeBatch, RowFinish, RowSpec, RowToken};
pub use decoder::KvCache;
pub use generate::{FinishReason, Generated, GenerationStats, SamplingParams};
pub use io::{write_atomic, write_new};
pub use lora::{LoraConfig, ALL_TARGETS};
pub use rollout::{Completion, KvLayout, RolloutParams};
pub use quant::BaseQuant;
pub use prefix_cache::{PrefixCache, PrefixStats};
pub use model::{InferenceGuard, Model, Route, RoutingGuard, DEFAULT_ADAPTER};
pub use tokenizer::TokenizerBundle;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use source::ModelSource;

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TokenizerBundle,
    /// What goes into `base_model_name_or_path` of saved adapters.
    pub source: String,
}

/// Load weights, config and tokenizer from a HF directory, a .gguf file or a hub id;
/// weights stored and computed in `dtype`.
pub fn load_model(model_ref: &str, device: &Device, dtype: DType) -> Result<LoadedModel> {
    load_model_mixed(model_ref, device, dtype, dtype)
}

/// bf16 on a CPU without a bf16 dot product (AVX512-BF16, e.g. AVX2-only CPUs) keeps
/// bf16 activations and weights (the same numerics as on CPUs with it) and runs each
/// frozen matmul by widening its bf16 operands to f32 panels for the f32 GEMM: measured
/// 0.94-1.06x the f32 step's speed at 0.64x its memory (BENCHMARKS.md, round 3). Computing
/// in f32 over bf16 weights instead (`--dtype f32 --base-dtype bf16`) is as fast as f32
/// but saves only the weights' half. Said once per load.
fn warn_if_bf16_without_dot_product(device: &Device, compute_dtype: DType) {
    if device.is_cpu() && compute_dtype == DType::BF16 && !lora_kernels::gemm_bf16::available() {
        let why = if lora_kernels::gemm_bf16::cpu_has_bf16_dot() { "LORA_KERNELS_NO_BF16_DOT is set" } else { "this CPU has no AVX512-BF16" };
        tracing::warn!(
            "--dtype bf16 on CPU: {why}, so bf16 matmuls widen to f32 GEMMs (about 0.95x the speed of f32 at 2/3 of its memory; \
             --dtype f32 --base-dtype bf16 computes in f32 over bf16 weights instead)"
        );
    }
}

/// As [`load_model`], with the frozen weights stored in `weight_dtype` and the
/// activations in `compute_dtype` (e.g. bf16 weights under f32 compute: half the
/// weight memory, f32 numerics everywhere else).
pub fn load_model_mixed(model_ref: &str, device: &Device, compute_dtype: DType, weight_dtype: DType) -> Result<LoadedModel> {
    load_model_quantized(model_ref, device, compute_dtype, weight_dtype, BaseQuant::Auto)
}

/// As [`load_model_mixed`], with the projections stored as `quant` (`crate::quant`):
/// `Auto` keeps a GGUF file's blocks and dequantizes them per GEMM (the same values as
/// dequantizing at load, at a fraction of the memory).
pub fn load_model_quantized(model_ref: &str, device: &Device, compute_dtype: DType, weight_dtype: DType, quant: BaseQuant) -> Result<LoadedModel> {
    warn_if_bf16_without_dot_product(device, compute_dtype);
    let (decoder, tokenizer) = match source::resolve(model_ref)? {
        ModelSource::HfDir(dir) => {
            let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
            let src = weights::SafetensorsSource::open_dir(&dir)?;
            let decoder = decoder::Decoder::load(cfg, &src, device, weight_dtype, compute_dtype, quant)?;
            (decoder, tokenizer::load_from_hf_dir(&dir)?)
        }
        ModelSource::Gguf(path) => {
            let mut src = weights::GgufSource::open(&path)?;
            let cfg = gguf::config_from_gguf(src.content()).with_context(|| format!("{}", path.display()))?;
            if cfg.architecture == Architecture::Llama {
                src.set_unpermute_qk(Some((cfg.num_attention_heads, cfg.num_key_value_heads)));
            }
            let tokenizer = gguf::tokenizer_from_gguf(src.content()).with_context(|| format!("{}", path.display()))?;
            (decoder::Decoder::load(cfg, &src, device, weight_dtype, compute_dtype, quant)?, tokenizer)
        }
    };
    if !decoder.cfg.tie_word_embeddings && decoder.lm_head.is_none() {
        tracing::warn!(
            "{model_ref}: the config says the output layer is untied (tie_word_embeddings: false) but the weights have \
             no `lm_head.weight`; using the input embeddings as the output layer (tied)"
        );
    }
    Ok(LoadedModel { model: Model::new(decoder), tokenizer, source: model_ref.to_string() })
}

/// Only the configuration (fast: no weights), e.g. for memory estimates.
pub fn load_model_config(model_ref: &str) -> Result<ModelConfig> {
    match source::resolve(model_ref)? {
        ModelSource::HfDir(dir) => ModelConfig::from_hf_file(&dir.join("config.json")),
        ModelSource::Gguf(path) => {
            let src = weights::GgufSource::open(&path)?;
            gguf::config_from_gguf(src.content()).with_context(|| format!("{}", path.display()))
        }
    }
}

/// Only the tokenizer side (fast: no weights), for `inspect` and dataset tooling.
pub fn load_tokenizer_bundle(model_ref: &str) -> Result<TokenizerBundle> {
    match source::resolve(model_ref)? {
        ModelSource::HfDir(dir) => tokenizer::load_from_hf_dir(&dir),
        ModelSource::Gguf(path) => {
            let src = weights::GgufSource::open(&path)?;
            gguf::tokenizer_from_gguf(src.content()).with_context(|| format!("{}", path.display()))
        }
    }
}
