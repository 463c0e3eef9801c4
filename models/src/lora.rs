//! LoRA: configuration, the adapted linear layer, and PEFT-format save/load.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The seven projections PEFT users target; `--target-modules` defaults to all.
pub const ALL_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Module names as PEFT writes them (`q_proj`, ...).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, dropout: 0.0, use_rslora: false, target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect() }
    }
}

impl LoraConfig {
    /// alpha/r, or alpha/sqrt(r) with rsLoRA (as PEFT).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Accepts `q,k,v,o,gate,up,down`, the `_proj` names, or `all`; returns PEFT names.
    pub fn parse_targets(spec: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for raw in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if raw == "all" || raw == "all-linear" {
                return Ok(ALL_TARGETS.iter().map(|s| s.to_string()).collect());
            }
            let name = if raw.ends_with("_proj") { raw.to_string() } else { format!("{raw}_proj") };
            if !ALL_TARGETS.contains(&name.as_str()) {
                bail!("unknown target module `{raw}` (choose from q,k,v,o,gate,up,down or all)");
            }
            if !out.contains(&name) {
                out.push(name);
            }
        }
        if out.is_empty() {
            bail!("--target-modules is empty");
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    /// Fireworks serves r in 4..=64 on the seven projections; outside that we warn, not fail.
    pub fn hosting_warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !(4..=64).contains(&self.rank) {
            w.push(format!("rank {} is outside 4..64, which Fireworks accepts for hosted LoRA", self.rank));
        }
        w
    }
}

/// State shared by every LoRA layer of a model: on/off switch (the DPO/GRPO
/// reference model is the base with adapters off), the dropout seed, and whether
/// the forward is for inference only.
#[derive(Debug, Default)]
pub struct LoraSwitch {
    disabled: AtomicBool,
    /// 0 = eval mode (no dropout); otherwise seed + 1.
    dropout_seed: AtomicU64,
    /// No autograd graph: A/B enter the forward detached, so no op records its
    /// inputs (which the graph would keep alive until the output is dropped).
    inference: AtomicBool,
}

impl LoraSwitch {
    pub fn set_enabled(&self, on: bool) {
        self.disabled.store(!on, Ordering::Relaxed)
    }
    pub fn enabled(&self) -> bool {
        !self.disabled.load(Ordering::Relaxed)
    }
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        self.dropout_seed.store(seed.map(|s| s.wrapping_add(1)).unwrap_or(0), Ordering::Relaxed)
    }
    fn dropout_seed(&self) -> Option<u64> {
        match self.dropout_seed.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s - 1),
        }
    }
    /// Returns the previous state.
    pub fn set_inference(&self, on: bool) -> bool {
        self.inference.swap(on, Ordering::Relaxed)
    }
    pub fn inference(&self) -> bool {
        self.inference.load(Ordering::Relaxed)
    }
}

/// Inference mode until dropped; then the mode that was set before comes back
/// (also when the scope is left by `?` or a panic).
#[must_use = "inference mode ends when the guard is dropped"]
pub struct InferenceGuard {
    switch: Arc<LoraSwitch>,
    previous: bool,
}

impl InferenceGuard {
    pub fn new(switch: Arc<LoraSwitch>) -> Self {
        let previous = switch.set_inference(true);
        Self { switch, previous }
    }
}

impl Drop for InferenceGuard {
    fn drop(&mut self) {
        self.switch.set_inference(self.previous);
    }
}

pub struct LoraAdapter {
    /// [r, in], f32 master weight.
    pub a: Var,
    /// [out, r], f32 master weight.
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

/// A frozen projection, optionally with a LoRA adapter.
pub struct Linear {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// Position among all linears, so each gets its own dropout stream.
    pub index: usize,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    pub switch: Arc<LoraSwitch>,
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    /// Short module name: `q_proj`, ...
    pub fn module(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let bias = self.bias.as_ref();
        let Some(lora) = self.lora.as_ref().filter(|_| self.switch.enabled()) else {
            return lora_kernels::frozen_linear(x, &self.weight, bias);
        };
        let inference = self.switch.inference();
        let (a, b) = forward_weights(lora, inference);
        match self.switch.dropout_seed().filter(|_| lora.dropout > 0.0 && !inference) {
            // The fused op takes f32 A/B next to bf16 x/W and returns f32 gradients,
            // so the master weights are never cast on the hot path.
            None => lora_kernels::lora_linear(x, &self.weight, bias, &a, &b, lora.scale),
            Some(seed) => {
                let a = a.to_dtype(x.dtype())?;
                let b = b.to_dtype(x.dtype())?;
                // PEFT: base(x) + B(A(dropout(x))) * scale; dropout only on the LoRA path.
                let base = lora_kernels::frozen_linear(x, &self.weight, bias)?;
                let dropped = dropout(x, lora.dropout, seed ^ (self.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))?;
                let lora_out = (dropped.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * lora.scale)?;
                base + lora_out
            }
        }
    }

    /// PEFT init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, rng: &mut impl Rng, device: &Device) -> Result<()> {
        let (out, inp, r) = (self.out_features(), self.in_features(), cfg.rank);
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
        let a = Tensor::from_vec(a, (r, inp), device)?;
        let b = Tensor::zeros((out, r), DType::F32, device)?;
        self.lora = Some(LoraAdapter { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, scale: cfg.scale(), dropout: cfg.dropout });
        Ok(())
    }

    /// W + scale * B A, in the weight's dtype (for `merge`).
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => Ok(self.weight.clone()),
            Some(l) => {
                let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
                Ok((self.weight.to_dtype(DType::F32)? + delta)?.to_dtype(self.weight.dtype())?)
            }
        }
    }
}

/// A and B as the forward reads them. For inference they are detached: the same
/// storage (no copy) but untracked, so nothing downstream builds a graph.
fn forward_weights(lora: &LoraAdapter, inference: bool) -> (Tensor, Tensor) {
    if inference {
        (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
    } else {
        (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
    }
}

/// Inverted dropout with a mask drawn from `seed` (deterministic, so a resumed run
/// replays the same masks without saving RNG state). SplitMix64 gives 64 random bits
/// per element at a few cycles each (a ChaCha-based StdRng was the bottleneck of a
/// dropout step); a 24-bit uniform is plenty for a keep/drop decision.
fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    let keep_scale = (1.0 / (1.0 - p)) as f32;
    let threshold = ((1.0 - p) * (1u64 << 24) as f64) as u64;
    let mut state = seed;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if (z >> 40) < threshold { keep_scale } else { 0.0 }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// `model.layers.3.self_attn.q_proj` -> PEFT keys for A and B.
pub fn peft_keys(module_path: &str) -> (String, String) {
    (
        format!("base_model.model.{module_path}.lora_A.weight"),
        format!("base_model.model.{module_path}.lora_B.weight"),
    )
}

/// The `adapter_config.json` PEFT and vLLM read.
pub fn adapter_config_json(cfg: &LoraConfig, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "base_model_name_or_path": base_model,
        "revision": null,
        "use_dora": false,
    })
}

pub fn parse_adapter_config(path: &std::path::Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read adapter config", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let field = |k: &str| v.get(k).with_context(|| format!("{}: missing field `{k}`", path.display()));
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            bail!("{}: peft_type `{t}` is not LORA", path.display());
        }
    }
    let rank = field("r")?.as_u64().with_context(|| format!("{}: field `r` is not an integer", path.display()))? as usize;
    let alpha = field("lora_alpha")?.as_f64().with_context(|| format!("{}: field `lora_alpha` is not a number", path.display()))?;
    let targets = match field("target_modules")? {
        serde_json::Value::Array(a) => a.iter().filter_map(|s| s.as_str().map(String::from)).collect::<Vec<_>>(),
        serde_json::Value::String(s) => LoraConfig::parse_targets(s)?,
        _ => bail!("{}: field `target_modules` must be a list", path.display()),
    };
    for t in &targets {
        if !ALL_TARGETS.contains(&t.as_str()) {
            bail!("{}: target module `{t}` is not supported (supported: {})", path.display(), ALL_TARGETS.join(", "));
        }
    }
    Ok(LoraConfig {
        rank,
        alpha,
        dropout: v.get("lora_dropout").and_then(|d| d.as_f64()).unwrap_or(0.0),
        use_rslora: v.get("use_rslora").and_then(|d| d.as_bool()).unwrap_or(false),
        target_modules: targets,
    })
}

/// Write `bytes` to `path` through a temporary file + rename, so readers never see
/// a half-written file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(&bytes).with_context(|| format!("{}: write failed", tmp.display()))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_keeps_the_expected_fraction_scaled_and_is_deterministic() -> candle_core::Result<()> {
        let x = Tensor::ones((64, 512), DType::F32, &Device::Cpu)?;
        let a = dropout(&x, 0.25, 42)?.flatten_all()?.to_vec1::<f32>()?;
        let b = dropout(&x, 0.25, 42)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        let kept = a.iter().filter(|v| **v > 0.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        let c = dropout(&x, 0.25, 43)?.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(a, c);
        Ok(())
    }
}
