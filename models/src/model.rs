//! `Model`: the decoder plus what recipes do with it (LoRA, losses, adapters).
use crate::config::ModelConfig;
use crate::decoder::{Decoder, KvCache};
use crate::lora::{self, InferenceGuard, LoraConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::Path;

pub struct Model {
    pub(crate) decoder: Decoder,
    lora_config: Option<LoraConfig>,
}

impl Model {
    pub fn new(decoder: Decoder) -> Self {
        Self { decoder, lora_config: None }
    }
    pub fn config(&self) -> &ModelConfig {
        &self.decoder.cfg
    }
    pub fn device(&self) -> &Device {
        &self.decoder.device
    }
    /// Storage dtype of the frozen weights.
    pub fn dtype(&self) -> DType {
        self.decoder.dtype
    }
    /// dtype of the activations.
    pub fn compute_dtype(&self) -> DType {
        self.decoder.compute_dtype
    }
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora_config.as_ref()
    }
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Attach fresh adapters (PEFT init) to the configured projections of every layer.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = self.decoder.device.clone();
        for layer in self.decoder.layers.iter_mut() {
            for lin in layer.linears_mut() {
                if cfg.target_modules.iter().any(|t| t == lin.module()) {
                    lin.attach_lora(cfg, &mut rng, &device)?;
                } else {
                    lin.lora = None;
                }
            }
        }
        self.lora_config = Some(cfg.clone());
        Ok(())
    }

    /// Every trainable tensor under its PEFT key, layer by layer, A before B.
    pub fn lora_parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for layer in &self.decoder.layers {
            for lin in layer.linears() {
                if let Some(l) = &lin.lora {
                    let (ka, kb) = lora::peft_keys(&lin.name);
                    out.push((ka, l.a.clone()));
                    out.push((kb, l.b.clone()));
                }
            }
        }
        out
    }

    /// Every frozen base tensor (for tests asserting none of them gets a gradient).
    pub fn base_tensors(&self) -> Vec<(String, Tensor)> {
        let d = &self.decoder;
        let mut out = vec![("model.embed_tokens.weight".to_string(), d.embed_tokens.clone()), ("model.norm.weight".to_string(), d.norm.clone())];
        if let Some(h) = &d.lm_head {
            out.push(("lm_head.weight".into(), h.clone()));
        }
        for (i, layer) in d.layers.iter().enumerate() {
            out.push((format!("model.layers.{i}.input_layernorm.weight"), layer.input_layernorm.clone()));
            out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), layer.post_attention_layernorm.clone()));
            if let Some(n) = &layer.self_attn.q_norm {
                out.push((format!("model.layers.{i}.self_attn.q_norm.weight"), n.clone()));
            }
            if let Some(n) = &layer.self_attn.k_norm {
                out.push((format!("model.layers.{i}.self_attn.k_norm.weight"), n.clone()));
            }
            for lin in layer.linears() {
                out.push((format!("{}.weight", lin.name), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{}.bias", lin.name), b.clone()));
                }
            }
        }
        out
    }

    /// Adapters off = the base model (the DPO/GRPO reference, no second copy).
    pub fn set_adapter_enabled(&self, on: bool) {
        self.decoder.switch.set_enabled(on)
    }
    /// Some(seed): training mode, LoRA dropout masks drawn from `seed`.
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        self.decoder.switch.set_dropout_seed(seed)
    }

    /// On: forwards build no autograd graph (LoRA weights enter detached, no dropout),
    /// for generation and evaluation. Prefer [`Model::inference`], which restores
    /// the previous state.
    pub fn set_inference(&self, on: bool) {
        self.decoder.switch.set_inference(on);
    }
    pub fn is_inference(&self) -> bool {
        self.decoder.switch.inference()
    }
    /// Inference mode until the returned guard is dropped.
    pub fn inference(&self) -> InferenceGuard {
        InferenceGuard::new(self.decoder.switch.clone())
    }

    /// [b, t, hidden] after the final norm. `segment_ids` None = every row is one
    /// unpadded sequence.
    pub fn forward_hidden(&self, input_ids: &Tensor, position_ids: &Tensor, segment_ids: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let positions = position_ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let segments = match segment_ids {
            Some(s) => s.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?,
            None => vec![1; b * t],
        };
        self.decoder.forward(input_ids, &positions, &segments, None)
    }

    /// One decoding step (or a prompt prefill) against a KV cache.
    pub fn forward_cached(&self, input_ids: &Tensor, positions: &[u32], segments: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        self.decoder.forward(input_ids, positions, segments, Some(cache))
    }

    /// [.., vocab] f32 logits of hidden states.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        // The frozen-linear op: no gradient for the (frozen) head, and a memory-bound
        // fast path for decode steps.
        lora_kernels::frozen_linear(hidden, self.decoder.lm_head_weight(), None)?.to_dtype(DType::F32)
    }

    /// Sum over t >= 1 of `loss_mask[b, t] * CE(logits[b, t-1], input_ids[b, t])`, a
    /// scalar f32 (a SUM: callers normalise by the loss tokens of the whole
    /// accumulated batch). Logits are computed chunk by chunk, never all at once.
    pub fn loss_sum(&self, hidden: &Tensor, input_ids: &Tensor, loss_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        if t < 2 {
            return Tensor::zeros((), DType::F32, hidden.device());
        }
        let prev = hidden.narrow(1, 0, t - 1)?.reshape((b * (t - 1), h))?;
        let targets = input_ids.narrow(1, 1, t - 1)?.flatten_all()?.to_dtype(DType::U32)?;
        let weights = loss_mask.narrow(1, 1, t - 1)?.flatten_all()?.to_dtype(DType::F32)?;
        lora_kernels::linear_cross_entropy(&prev, self.decoder.lm_head_weight(), &targets, &weights)
    }

    /// Write `adapter_config.json` + `adapter_model.safetensors` (PEFT layout).
    /// Each file goes through a temporary name + rename; the weights land first so a
    /// config never points at missing weights.
    pub fn save_adapter(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        let cfg = self.lora_config.as_ref().context("the model has no LoRA adapter to save")?;
        let tensors: HashMap<String, Tensor> = self
            .lora_parameters()
            .into_iter()
            .map(|(k, v)| v.as_tensor().to_dtype(DType::F32).map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()?;
        let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v)), None)?;
        lora::write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
        let json = serde_json::to_vec_pretty(&lora::adapter_config_json(cfg, base_model_name_or_path))?;
        lora::write_atomic(&dir.join("adapter_config.json"), &json)?;
        Ok(())
    }

    /// Load a PEFT adapter directory (ours or PEFT's) onto this model.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<LoraConfig> {
        let cfg = lora::parse_adapter_config(&dir.join("adapter_config.json"))?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            bail!("{}: missing adapter_model.safetensors", dir.display());
        }
        let mut tensors = candle_core::safetensors::load(&weights_path, &self.decoder.device)
            .with_context(|| format!("{}: cannot read", weights_path.display()))?;
        // PEFT sometimes writes the adapter name into keys (`lora_A.default.weight`).
        tensors = tensors.into_iter().map(|(k, v)| (k.replace(".default.weight", ".weight"), v)).collect();
        self.add_lora(&cfg, 0)?;
        for (key, var) in self.lora_parameters() {
            let t = tensors.remove(&key).with_context(|| format!("{}: missing tensor `{key}`", weights_path.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: tensor `{key}` has shape {:?}, expected {:?} (rank {}); was this adapter trained on another base model?",
                    weights_path.display(),
                    t.dims(),
                    var.dims(),
                    cfg.rank
                );
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        if let Some(extra) = tensors.keys().next() {
            bail!("{}: unexpected tensor `{extra}` (not a LoRA weight of this model and config)", weights_path.display());
        }
        Ok(cfg)
    }
}
