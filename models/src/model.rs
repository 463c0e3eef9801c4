//! `Model`: the decoder plus what recipes do with it (LoRA, losses, adapters).
use crate::config::ModelConfig;
use crate::decoder::{Decoder, KvCache};
use crate::lora::{self, LoraConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::Path;

pub struct Model {
    pub(crate) decoder: Decoder,
    /// Named adapters in the order their index is used by the layers and the routing.
    adapters: Vec<(String, LoraConfig)>,
}

/// The name `add_lora` / `load_adapter` give the single adapter of a plain run.
pub const DEFAULT_ADAPTER: &str = "default";

/// One block of batch rows for [`Model::route`]: `rows` rows through adapter `adapter`
/// (`None` = the frozen base alone), with that adapter's dropout seed for this step.
#[derive(Clone, Debug)]
pub struct Route<'a> {
    pub rows: usize,
    pub adapter: Option<&'a str>,
    pub dropout_seed: Option<u64>,
}

/// Restores the routing (or adapter on/off state) it replaced when dropped, so an early
/// `?` return can never leave the model routed for somebody else's batch.
#[must_use = "the routing is undone when the guard drops"]
pub struct RoutingGuard {
    switch: std::sync::Arc<lora::LoraSwitch>,
    routes: Option<lora::Routing>,
    enabled: bool,
}

impl Drop for RoutingGuard {
    fn drop(&mut self) {
        self.switch.set_routes(self.routes.take());
        self.switch.set_enabled(self.enabled);
    }
}

/// Inference mode (no autograd graph through the LoRA weights, no dropout) until dropped;
/// then the previous mode is back.
#[must_use = "inference mode ends when the guard drops"]
pub struct InferenceGuard {
    switch: std::sync::Arc<lora::LoraSwitch>,
    previous: bool,
}

impl Drop for InferenceGuard {
    fn drop(&mut self) {
        self.switch.set_inference(self.previous);
    }
}

impl Model {
    pub fn new(decoder: Decoder) -> Self {
        Self { decoder, adapters: Vec::new() }
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
    /// The configuration of the model's first (in a plain run: only) adapter.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.adapters.first().map(|(_, c)| c)
    }
    pub fn adapter_names(&self) -> impl Iterator<Item = &str> {
        self.adapters.iter().map(|(n, _)| n.as_str())
    }
    pub fn adapter_config(&self, name: &str) -> Option<&LoraConfig> {
        self.adapters.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }
    fn adapter_index(&self, name: &str) -> Result<usize> {
        self.adapters.iter().position(|(n, _)| n == name).with_context(|| {
            format!("no adapter named `{name}` (the model holds: {})", self.adapter_names().collect::<Vec<_>>().join(", "))
        })
    }
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Replace every adapter with one fresh adapter named [`DEFAULT_ADAPTER`] (PEFT init).
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        self.remove_adapters();
        self.add_adapter(DEFAULT_ADAPTER, cfg, seed).map(|_| ())
    }

    /// Attach one more adapter (PEFT init from `seed`) to the configured projections of
    /// every layer; returns its index. Its init does not depend on the other adapters, so
    /// a sweep candidate starts exactly where the same `sft` run starts.
    pub fn add_adapter(&mut self, name: &str, cfg: &LoraConfig, seed: u64) -> Result<usize> {
        cfg.validate()?;
        if self.adapter_config(name).is_some() {
            bail!("the model already holds an adapter named `{name}`");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = self.decoder.device.clone();
        let index = self.adapters.len();
        for layer in self.decoder.layers.iter_mut() {
            for lin in layer.linears_mut() {
                let adapter = if cfg.target_modules.iter().any(|t| t == lin.module()) { Some(lin.new_adapter(cfg, &mut rng, &device)?) } else { None };
                lin.adapters.resize_with(index, || None);
                lin.adapters.push(adapter);
            }
        }
        self.adapters.push((name.to_string(), cfg.clone()));
        self.decoder.switch.set_adapter_count(self.adapters.len());
        Ok(index)
    }

    fn remove_adapters(&mut self) {
        for layer in self.decoder.layers.iter_mut() {
            for lin in layer.linears_mut() {
                lin.adapters.clear();
            }
        }
        self.adapters.clear();
        self.decoder.switch.set_adapter_count(0);
        self.decoder.switch.set_routes(None);
    }

    /// The trainable tensors of one adapter under their PEFT keys, layer by layer, A
    /// before B.
    pub fn adapter_parameters(&self, name: &str) -> Result<Vec<(String, Var)>> {
        let i = self.adapter_index(name)?;
        Ok(self.parameters_of(i))
    }

    fn parameters_of(&self, i: usize) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for layer in &self.decoder.layers {
            for lin in layer.linears() {
                if let Some(l) = lin.adapter(i) {
                    let (ka, kb) = lora::peft_keys(&lin.name);
                    out.push((ka, l.a.clone()));
                    out.push((kb, l.b.clone()));
                }
            }
        }
        out
    }

    /// Every trainable tensor: under its PEFT key when the model holds one adapter, as
    /// `NAME/KEY` when it holds several.
    pub fn lora_parameters(&self) -> Vec<(String, Var)> {
        if self.adapters.len() == 1 {
            return self.parameters_of(0);
        }
        (0..self.adapters.len())
            .flat_map(|i| self.parameters_of(i).into_iter().map(move |(k, v)| (format!("{}/{k}", self.adapters[i].0), v)))
            .collect()
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
                // A quantized base gives its dequantized values (what `merge` writes).
                out.push((format!("{}.weight", lin.name), lin.weight.dense().expect("dequantize a base weight")));
                if let Some(b) = &lin.bias {
                    out.push((format!("{}.bias", lin.name), b.clone()));
                }
            }
        }
        out
    }

    /// Route blocks of batch rows to adapters until the guard drops. The blocks cover
    /// the batch in order; rows with `adapter: None` see the frozen base alone, which is
    /// how a reference model shares the base GEMM with the policy rows.
    pub fn route(&self, routes: &[Route]) -> Result<RoutingGuard> {
        let resolved = routes
            .iter()
            .map(|r| Ok(lora::RowRoute { rows: r.rows, adapter: r.adapter.map(|n| self.adapter_index(n)).transpose()?, dropout_seed: r.dropout_seed }))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.set_routing(lora::Routing::Blocks(resolved)))
    }

    /// Every row of every batch through adapter `name` until the guard drops (evaluating
    /// or sampling one candidate of a sweep, for example).
    pub fn route_all(&self, name: &str) -> Result<RoutingGuard> {
        let adapter = Some(self.adapter_index(name)?);
        Ok(self.set_routing(lora::Routing::AllRows { adapter, dropout_seed: None }))
    }

    fn set_routing(&self, routing: lora::Routing) -> RoutingGuard {
        let guard = self.routing_guard();
        self.decoder.switch.set_routes(Some(routing));
        self.decoder.switch.set_enabled(true);
        guard
    }

    /// Adapters off (= the base model, the DPO/GRPO reference) until the guard drops.
    pub fn adapters_off(&self) -> RoutingGuard {
        let guard = self.routing_guard();
        self.decoder.switch.set_enabled(false);
        guard
    }

    fn routing_guard(&self) -> RoutingGuard {
        let switch = self.decoder.switch.clone();
        RoutingGuard { routes: switch.routes(), enabled: switch.enabled(), switch }
    }

    /// Inference mode until the guard drops: the forward records no autograd graph
    /// through the LoRA weights (they enter detached) and dropout is off.
    pub fn inference(&self) -> InferenceGuard {
        let switch = self.decoder.switch.clone();
        let previous = switch.inference();
        switch.set_inference(true);
        InferenceGuard { switch, previous }
    }

    /// Set inference mode without a guard (prefer [`Model::inference`]).
    pub fn set_inference(&self, on: bool) {
        self.decoder.switch.set_inference(on)
    }

    /// Some(seed): training mode, LoRA dropout masks drawn from `seed` (for the default
    /// route; explicit routes carry their own seeds).
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        self.decoder.switch.set_dropout_seed(seed)
    }

    /// Keep only each decoder layer's input for the backward and rerun the layer there
    /// (`crate::checkpointing`); gradients are unchanged, a forward costs once more.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.decoder.gradient_checkpointing.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn gradient_checkpointing(&self) -> bool {
        self.decoder.gradient_checkpointing.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Bytes the frozen projections hold as stored (quantized or dense), and the
    /// parameter count of those projections.
    pub fn projection_storage(&self) -> (u64, u64) {
        let mut bytes = 0u64;
        let mut params = 0u64;
        for layer in &self.decoder.layers {
            for lin in layer.linears() {
                bytes += lin.weight.storage_bytes() as u64;
                params += (lin.out_features() * lin.in_features()) as u64;
            }
        }
        (bytes, params)
    }
    /// How the frozen projections are stored (`none`, `nf4`, `int8`, or `auto` for GGUF
    /// blocks kept as loaded).
    pub fn base_quant(&self) -> crate::quant::BaseQuant {
        self.decoder.base_quant
    }

    /// `loss.backward()`, plus the LoRA gradients that checkpointed layers computed while
    /// rerunning in it. Every training backward goes through here.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<candle_core::backprop::GradStore> {
        self.decoder.checkpoint_grads.clear();
        let mut grads = loss.backward()?;
        self.decoder.checkpoint_grads.drain_into(&mut grads)?;
        Ok(grads)
    }

    pub fn is_inference(&self) -> bool {
        self.decoder.switch.inference()
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

    /// log p(target) of each row of `hidden` `[n, hidden]` under softmax(logits /
    /// temperature), `[n]` f32, differentiable w.r.t. `hidden` (the logits are linear in
    /// the hidden state, so scaling it scales them; never materialises `[n, vocab]`).
    pub fn token_logprobs(&self, hidden: &Tensor, targets: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
        let scaled = if temperature > 0.0 && temperature != 1.0 { hidden.affine(1.0 / temperature, 0.0)? } else { hidden.clone() };
        lora_kernels::linear_cross_entropy_rows(&scaled, self.decoder.lm_head_weight(), targets)?.neg()
    }

    /// Write the model's only adapter as `adapter_config.json` +
    /// `adapter_model.safetensors` (PEFT layout).
    pub fn save_adapter(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        match self.adapters.as_slice() {
            [] => bail!("the model has no LoRA adapter to save"),
            [(name, _)] => self.save_named_adapter(&name.clone(), dir, base_model_name_or_path),
            _ => bail!("the model holds {} adapters; save one by name", self.adapters.len()),
        }
    }

    /// Write adapter `name` in PEFT layout (keys without the adapter name, as PEFT and
    /// vLLM expect). Each file goes through a temporary name + rename; the weights land
    /// first so a config never points at missing weights.
    pub fn save_named_adapter(&self, name: &str, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        let i = self.adapter_index(name)?;
        let tensors: HashMap<String, Tensor> = self
            .parameters_of(i)
            .into_iter()
            .map(|(k, v)| v.as_tensor().to_dtype(DType::F32).map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()?;
        let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v)), None)?;
        lora::write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
        let json = serde_json::to_vec_pretty(&lora::adapter_config_json(&self.adapters[i].1, base_model_name_or_path))?;
        lora::write_atomic(&dir.join("adapter_config.json"), &json)?;
        Ok(())
    }

    /// Load a PEFT adapter directory (ours or PEFT's) as the model's only adapter.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<LoraConfig> {
        self.remove_adapters();
        self.load_named_adapter(DEFAULT_ADAPTER, dir)
    }

    /// Load a PEFT adapter directory as one more adapter named `name`.
    pub fn load_named_adapter(&mut self, name: &str, dir: &Path) -> Result<LoraConfig> {
        let cfg = lora::parse_adapter_config(&dir.join("adapter_config.json"))?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            bail!("{}: missing adapter_model.safetensors", dir.display());
        }
        let mut tensors = candle_core::safetensors::load(&weights_path, &self.decoder.device)
            .with_context(|| format!("{}: cannot read", weights_path.display()))?;
        // PEFT sometimes writes the adapter name into keys (`lora_A.default.weight`).
        tensors = tensors.into_iter().map(|(k, v)| (k.replace(".default.weight", ".weight"), v)).collect();
        let i = self.add_adapter(name, &cfg, 0)?;
        let filled = self.fill_adapter(i, &mut tensors, &weights_path, &cfg);
        if filled.is_err() {
            self.pop_adapter();
        }
        filled.map(|()| cfg)
    }

    /// Remove adapter `name` (a server unloading it); the adapters after it move down
    /// one index, which routing by name never sees.
    pub fn remove_named_adapter(&mut self, name: &str) -> Result<()> {
        let i = self.adapter_index(name)?;
        for layer in self.decoder.layers.iter_mut() {
            for lin in layer.linears_mut() {
                if i < lin.adapters.len() {
                    lin.adapters.remove(i);
                }
            }
        }
        self.adapters.remove(i);
        self.decoder.switch.set_adapter_count(self.adapters.len());
        self.decoder.switch.set_routes(None);
        Ok(())
    }

    /// Undo the last `add_adapter` (a load that failed half-way).
    fn pop_adapter(&mut self) {
        for layer in self.decoder.layers.iter_mut() {
            for lin in layer.linears_mut() {
                lin.adapters.truncate(self.adapters.len() - 1);
            }
        }
        self.adapters.pop();
        self.decoder.switch.set_adapter_count(self.adapters.len());
    }

    fn fill_adapter(&self, i: usize, tensors: &mut HashMap<String, Tensor>, weights_path: &Path, cfg: &LoraConfig) -> Result<()> {
        for (key, var) in self.parameters_of(i) {
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
        Ok(())
    }
}
