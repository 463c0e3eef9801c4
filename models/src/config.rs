//! Model hyper-parameters, read from a Hugging Face `config.json` (both dialects) or
//! from GGUF metadata.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" | "mistral" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
    pub fn hf_class(&self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Llama-3.1 style frequency scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_llama3: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2: q/k/v projections carry biases.
    pub attention_bias: bool,
    /// Qwen3: RMSNorm on each query/key head before RoPE.
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The original JSON (HF configs), echoed back when `merge` writes a model.
    #[serde(skip)]
    pub raw: Option<Value>,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// The attention window a config asks for, when it is in effect: Mistral's
/// `sliding_window` (null in v0.2 and later), or Qwen2's, which only applies with
/// `use_sliding_window: true`. A window no shorter than the longest sequence the model
/// supports changes nothing, so it does not count unless the config switches it on.
fn sliding_window_in_effect(json: &Value, max_positions: usize) -> Option<usize> {
    let window = get_usize(json, "sliding_window")?;
    match json.get("use_sliding_window").and_then(Value::as_bool) {
        Some(false) => None,
        Some(true) => Some(window),
        None => (window < max_positions).then_some(window),
    }
}

impl ModelConfig {
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read model config", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_hf_json(json).with_context(|| format!("{}", path.display()))
    }

    pub fn from_hf_json(json: Value) -> Result<Self> {
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        let Some(architecture) = Architecture::from_model_type(model_type) else {
            bail!("unsupported model_type `{model_type}` (supported: llama, mistral, qwen2, qwen3)")
        };
        let need = |key: &str| get_usize(&json, key).with_context(|| format!("missing integer field `{key}`"));
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        let num_key_value_heads = get_usize(&json, "num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = get_usize(&json, "head_dim").unwrap_or(hidden_size / num_attention_heads);
        // Two dialects: `rope_theta` (+ `rope_scaling`) at the top level, or the newer
        // `rope_parameters: {rope_theta, rope_type, ...}`.
        let rope_params = json.get("rope_parameters").or_else(|| json.get("rope_scaling")).filter(|v| v.is_object());
        let rope_theta = json
            .get("rope_theta")
            .or_else(|| json.get("rope_parameters").and_then(|p| p.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let rope_llama3 = match rope_params {
            Some(p) => {
                let ty = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                match ty {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| p.get(k).and_then(Value::as_f64).with_context(|| format!("rope llama3 scaling lacks `{k}`"));
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?,
                        })
                    }
                    other => bail!("unsupported rope_type `{other}` (supported: default, llama3)"),
                }
            }
            None => None,
        };
        let max_position_embeddings = get_usize(&json, "max_position_embeddings").unwrap_or(4096);
        // Sliding-window attention is not implemented; every layer attends causally over
        // the whole sequence. That is exactly the model's attention for sequences up to
        // the window (4096 tokens for Mistral-7B-v0.1, longer than most fine-tuning rows),
        // so such models load with a warning instead of being refused; beyond the window
        // the outputs differ from the reference implementation.
        if let Some(w) = sliding_window_in_effect(&json, max_position_embeddings) {
            tracing::warn!(
                "{model_type} config: sliding-window attention (window {w} tokens) is not implemented; full causal \
                 attention is used, which matches this model only for sequences of up to {w} tokens"
            );
        }
        let attention_bias = match architecture {
            Architecture::Qwen2 => true,
            _ => json.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
        };
        Ok(Self {
            architecture,
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: json.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_llama3,
            max_position_embeddings,
            tie_word_embeddings: json.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            attention_bias,
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id: token_ids(json.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(json.get("eos_token_id")),
            raw: Some(json),
        })
    }

    /// A `config.json` for this model, for `merge`: the original one when we had it.
    pub fn to_hf_json(&self) -> Value {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if self.architecture == Architecture::Llama {
            v["attention_bias"] = Value::Bool(self.attention_bias);
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        if let Some(e) = self.eos_token_ids.first() {
            v["eos_token_id"] = (*e).into();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_counts_only_when_it_limits_attention() {
        let w = |j: Value| sliding_window_in_effect(&j, 32768);
        // Mistral-7B-v0.1: a 4096 window under 32k positions.
        assert_eq!(w(serde_json::json!({"sliding_window": 4096})), Some(4096));
        // Mistral v0.2+: null. Qwen2: a window that is switched off, or as long as the model.
        assert_eq!(w(serde_json::json!({"sliding_window": null})), None);
        assert_eq!(w(serde_json::json!({"sliding_window": 4096, "use_sliding_window": false})), None);
        assert_eq!(w(serde_json::json!({"sliding_window": 32768})), None);
        assert_eq!(w(serde_json::json!({"sliding_window": 131072, "use_sliding_window": true})), Some(131072));
        assert_eq!(w(serde_json::json!({})), None);
    }

    #[test]
    fn a_mistral_config_with_a_window_still_loads() {
        let cfg = ModelConfig::from_hf_json(serde_json::json!({
            "model_type": "mistral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32768, "sliding_window": 4096,
        }))
        .unwrap();
        assert_eq!(cfg.architecture, Architecture::Llama);
        assert_eq!(cfg.max_position_embeddings, 32768);
    }
}
