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
/// reference model is the base with adapters off) and the dropout seed.
#[derive(Debug, Default)]
pub struct LoraSwitch {
    disabled: AtomicBool,
    /// 0 = eval mode (no dropout); otherwise seed + 1.
    dropout_seed: AtomicU64,
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
        match self.switch.dropout_seed().filter(|_| lora.dropout > 0.0) {
            // The fused op takes f32 A/B next to bf16 x/W and returns f32 gradients,
            // so the master weights are never cast on the hot path.
            None => lora_kernels::lora_linear(x, &self.weight, bias, lora.a.as_tensor(), lora.b.as_tensor(), lora.scale),
            Some(seed) => {
                let a = lora.a.as_tensor().to_dtype(x.dtype())?;
                let b = lora.b.as_tensor().to_dtype(x.dtype())?;
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

/// Inverted dropout with a mask drawn from `seed` (deterministic, so a resumed run
/// replays the same masks without saving RNG state). SplitMix64 gives 64 random bits
/// per element at a few cycles each (a ChaCha-based StdRng was the bottleneck of a
/// dropout step); a 24-bit uniform is plenty for a keep/drop decision.
fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    let keep_scale = (1.0 / (1.0 - p)) as f32;
    let threshold = ((1.0 - p) * (1u64 << 24) as f64) as u64;
    let mut state = seed;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if (crate::rng::splitmix64(&mut state) >> 40) < threshold { keep_scale } else { 0.0 })
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
    reject_unsupported_peft_features(&v).with_context(|| format!("{}", path.display()))?;
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

/// PEFT options that change what the adapter computes or which weights it holds. We
/// load plain LoRA only; anything else must fail here, not later as a shape mismatch or
/// as an adapter that silently computes something else than it did under PEFT.
fn reject_unsupported_peft_features(v: &serde_json::Value) -> Result<()> {
    use serde_json::Value;
    let set = |k: &str| match v.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    let unsupported = [
        ("use_dora", "DoRA (`use_dora: true`)"),
        ("rank_pattern", "per-module ranks (`rank_pattern`)"),
        ("alpha_pattern", "per-module alphas (`alpha_pattern`)"),
        ("layers_to_transform", "adapting only some layers (`layers_to_transform`)"),
        ("modules_to_save", "fully trained extra modules (`modules_to_save`)"),
    ];
    let found: Vec<&str> = unsupported.iter().filter(|(k, _)| set(k)).map(|(_, what)| *what).collect();
    if !found.is_empty() {
        bail!("this adapter uses {}, which lora-train does not support (plain LoRA only)", found.join(", "));
    }
    Ok(())
}

pub use crate::io::write_atomic;

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

    fn parse(json: &str) -> Result<LoraConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, json)?;
        parse_adapter_config(&path)
    }

    #[test]
    fn adapter_configs_with_unsupported_peft_features_are_refused() {
        let base = r#""peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]"#;
        // What PEFT itself writes for a plain LoRA (the features present but off) loads.
        let plain = parse(&format!(
            r#"{{{base}, "use_dora": false, "rank_pattern": {{}}, "alpha_pattern": {{}}, "layers_to_transform": null, "modules_to_save": null}}"#
        ))
        .unwrap();
        assert_eq!((plain.rank, plain.alpha), (8, 16.0));
        for (extra, needle) in [
            (r#""use_dora": true"#, "DoRA"),
            (r#""rank_pattern": {"q_proj": 16}"#, "rank_pattern"),
            (r#""alpha_pattern": {"v_proj": 4}"#, "alpha_pattern"),
            (r#""layers_to_transform": [0, 1]"#, "layers_to_transform"),
            (r#""layers_to_transform": 3"#, "layers_to_transform"),
            (r#""modules_to_save": ["lm_head"]"#, "modules_to_save"),
        ] {
            let err = format!("{:#}", parse(&format!("{{{base}, {extra}}}")).unwrap_err());
            assert!(err.contains(needle) && err.contains("not support") && err.contains("adapter_config.json"), "{extra}: {err}");
        }
    }

    #[test]
    fn dropout_mask_is_pinned() -> candle_core::Result<()> {
        // Masks are part of a run's identity (resume replays them): these 64 keep/drop
        // decisions for seed 42, p = 0.25 must never change.
        let x = Tensor::ones(64, DType::F32, &Device::Cpu)?;
        let kept = dropout(&x, 0.25, 42)?.to_vec1::<f32>()?;
        let bits = kept.iter().enumerate().fold(0u64, |acc, (i, v)| if *v > 0.0 { acc | 1 << i } else { acc });
        assert_eq!(bits, 0xdb7d_f7bd_27ef_ff5f);
        Ok(())
    }
}
