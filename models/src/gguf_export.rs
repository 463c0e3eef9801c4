//! GGUF files for llama.cpp (and Ollama, which runs it): a LoRA adapter laid out as
//! llama.cpp's `convert_lora_to_gguf.py` writes it, and a whole model (merged with its
//! adapter when it has one) with the source GGUF's metadata (tokenizer, chat template)
//! carried over. Both come back as bytes; the caller writes them atomically.
use crate::config::Architecture;
use crate::model::Model;
use crate::weights::{gguf_tensor_name, permute_rows, GgufSource};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};

/// The storage types `export --quant` offers; each maps to llama.cpp's file type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    Q8_0,
    /// llama.cpp's `Q4_K_M` recipe (`llama_tensor_get_type_impl` in llama-quant.cpp):
    /// Q4_K, with Q6_K for the output layer and for attn_v / ffn_down of the layers
    /// `use_more_bits` picks.
    Q4KM,
}

impl Quant {
    pub const NAMES: [&'static str; 4] = ["f32", "f16", "q8_0", "q4_k_m"];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            "q4_k_m" => Self::Q4KM,
            other => bail!("unknown quantization `{other}` (expected one of: {})", Self::NAMES.join(", ")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4KM => "q4_k_m",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` (llama.h).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
        }
    }
}

/// `general.quantization_version` that gguf-py writes (GGML_QUANT_VERSION).
const GGML_QUANT_VERSION: u32 = 2;

/// llama.cpp's `use_more_bits(i_layer, n_layers)`: the first and last eighth of the
/// layers and every third one between get the larger type in the `_M` recipes.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type llama.cpp's quantizer gives tensor `name` ([rows, cols]) under `quant`, after
/// its fallback for rows whose length is not a multiple of the block size (Q4_K -> Q5_0,
/// Q6_K -> Q8_0, then F16). 1-D tensors (norms, biases) stay F32 as in every llama.cpp file.
fn tensor_type(name: &str, dims: &[usize], quant: Quant, n_layers: usize, tied_embeddings: bool) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = dims[dims.len() - 1];
    let layer = || name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
    let wanted = match quant {
        Quant::F32 => return GgmlDType::F32,
        Quant::F16 => return GgmlDType::F16,
        Quant::Q8_0 => GgmlDType::Q8_0,
        Quant::Q4KM => {
            let is_output = name == "output.weight" || (tied_embeddings && name == "token_embd.weight");
            if is_output {
                if cols % GgmlDType::Q6K.block_size() != 0 {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::Q6K
                }
            } else if (name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight")) && layer().is_some_and(|i| use_more_bits(i, n_layers))
            {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    if cols % wanted.block_size() == 0 {
        return wanted;
    }
    let fallback = match wanted {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if cols % fallback.block_size() == 0 {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// The rows of q/k outputs in llama.cpp's order for the `llama` arch (see
/// [`permute_rows`]); other archs and other modules pass through.
fn to_llama_cpp_rows(t: Tensor, arch: Architecture, module: &str, n_head: usize, n_kv_head: usize) -> Result<Tensor> {
    Ok(match (arch, module) {
        (Architecture::Llama, "q_proj") => permute_rows(&t, n_head)?,
        (Architecture::Llama, "k_proj") => permute_rows(&t, n_kv_head)?,
        _ => t,
    })
}

/// Serialize with candle's GGUF writer; metadata in key order so the bytes are
/// reproducible (candle keeps metadata in a HashMap).
fn gguf_bytes(metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<Vec<u8>> {
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tens: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta, &tens)?;
    Ok(out.into_inner())
}

fn quantize(name: &str, t: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    // A tensor of its own storage: candle's `QTensor::quantize` reads the whole storage and
    // ignores the layout's offset, and the decoder's weights can be views into a larger one.
    let values = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let t = Tensor::from_vec(values, t.dims(), &Device::Cpu)?;
    QTensor::quantize(&t, dtype).with_context(|| format!("cannot store `{name}` {:?} as {dtype:?}", t.dims()))
}

/// Adapter `adapter` of `model` as a llama.cpp LoRA GGUF, as `convert_lora_to_gguf.py`
/// writes it: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
/// `general.architecture` of the base, and per adapted module `blk.N.<tensor>.weight.lora_a`
/// (numpy [r, in], i.e. ggml ne [in, r]) and `.lora_b` ([out, r]), B's rows of q/k in
/// llama.cpp's permuted order for `llama`. `quant` is f32 or f16 (the converter's own
/// choices for adapters besides bf16).
///
/// llama.cpp scales by alpha / r (llama-adapter.cpp: `scale * alpha / rank`); an rsLoRA
/// adapter (alpha / sqrt(r)) is written with alpha * sqrt(r) so llama.cpp applies the scale
/// we trained with (the Python converter writes alpha unchanged, which is wrong for rsLoRA).
pub fn lora_adapter_gguf(model: &Model, adapter: &str, quant: Quant, name: &str) -> Result<Vec<u8>> {
    let dtype = match quant {
        Quant::F32 => GgmlDType::F32,
        Quant::F16 => GgmlDType::F16,
        other => bail!("an adapter is exported as f32 or f16 (as llama.cpp's convert_lora_to_gguf.py does), not {}", other.name()),
    };
    let i = model.adapter_names().position(|n| n == adapter).with_context(|| format!("the model holds no adapter named `{adapter}`"))?;
    let lcfg = model.adapter_config(adapter).context("adapter without a config")?;
    let cfg = model.config();
    let mut tensors = Vec::new();
    for layer in &model.decoder().layers {
        for lin in layer.linears() {
            let Some(lora) = lin.adapter(i) else { continue };
            let base = gguf_tensor_name(&format!("{}.weight", lin.name)).with_context(|| format!("no llama.cpp name for `{}`", lin.name))?;
            let b = to_llama_cpp_rows(lora.b.as_tensor().clone(), cfg.architecture, lin.module(), cfg.num_attention_heads, cfg.num_key_value_heads)?;
            let a_name = format!("{base}.lora_a");
            let b_name = format!("{base}.lora_b");
            tensors.push((a_name.clone(), quantize(&a_name, lora.a.as_tensor(), dtype)?));
            tensors.push((b_name.clone(), quantize(&b_name, &b, dtype)?));
        }
    }
    if tensors.is_empty() {
        bail!("adapter `{adapter}` adapts no module");
    }
    let alpha = if lcfg.use_rslora { lcfg.alpha * (lcfg.rank as f64).sqrt() } else { lcfg.alpha };
    let metadata = vec![
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("general.architecture".to_string(), Value::String(cfg.architecture.model_type().into())),
        ("general.name".to_string(), Value::String(name.into())),
        ("general.quantization_version".to_string(), Value::U32(GGML_QUANT_VERSION)),
        ("general.type".to_string(), Value::String("adapter".into())),
    ];
    gguf_bytes(&metadata, &tensors)
}

/// Source metadata keys that describe the old file rather than the model: the new file
/// sets them itself (alignment must match candle's writer, which pads to 32 bytes).
const REWRITTEN_KEYS: [&str; 3] = ["general.alignment", "general.file_type", "general.quantization_version"];

/// The whole model as a GGUF llama.cpp loads: every metadata key of `source` (the GGUF the
/// model was loaded from: architecture, tokenizer, chat template) except the file-layout
/// ones, the model's weights in llama.cpp's names and layout with adapter `adapter` merged in
/// (when given), stored as `quant` says; tensors of the source the decoder does not hold
/// (e.g. `rope_freqs.weight`) are copied unchanged.
pub fn model_gguf(model: &Model, adapter: Option<&str>, source: &GgufSource, quant: Quant) -> Result<Vec<u8>> {
    let cfg = model.config();
    let arch_name = source.content().metadata.get("general.architecture").and_then(|v| v.to_string().ok()).map(String::as_str);
    if arch_name != Some(cfg.architecture.model_type()) {
        bail!("{}: architecture {arch_name:?} does not match the loaded model's `{}`", source.path().display(), cfg.architecture.model_type());
    }
    let adapter_index = match adapter {
        Some(name) => Some(model.adapter_names().position(|n| n == name).with_context(|| format!("the model holds no adapter named `{name}`"))?),
        None => None,
    };
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    if let Some(i) = adapter_index {
        for lin in model.decoder().layers.iter().flat_map(|l| l.linears()) {
            if lin.adapter(i).is_some() {
                merged.insert(format!("{}.weight", lin.name), lin.merged_weight(i)?);
            }
        }
    }
    let mut weights: Vec<(String, Tensor)> = Vec::new();
    for (hf_name, t) in model.base_tensors() {
        let gname = gguf_tensor_name(&hf_name).with_context(|| format!("no llama.cpp name for `{hf_name}`"))?;
        let t = merged.remove(&hf_name).unwrap_or(t);
        let t = match hf_name.strip_suffix(".weight") {
            Some(module_path) => {
                let module = module_path.rsplit('.').next().unwrap_or("");
                to_llama_cpp_rows(t, cfg.architecture, module, cfg.num_attention_heads, cfg.num_key_value_heads)?
            }
            None => t,
        };
        weights.push((gname, t));
    }
    let written: BTreeSet<String> = weights.iter().map(|(n, _)| n.clone()).collect();
    let mut tensors = Vec::with_capacity(weights.len());
    for (gname, t) in &weights {
        let dtype = tensor_type(gname, t.dims(), quant, cfg.num_hidden_layers, cfg.tie_word_embeddings);
        tensors.push((gname.clone(), quantize(gname, t, dtype)?));
    }
    let mut extra: Vec<&String> = source.content().tensor_infos.keys().filter(|k| !written.contains(*k)).collect();
    extra.sort();
    let mut file = std::fs::File::open(source.path()).with_context(|| format!("{}: cannot open", source.path().display()))?;
    for name in extra {
        let q =
            source.content().tensor(&mut file, name, &Device::Cpu).with_context(|| format!("{}: cannot read `{name}`", source.path().display()))?;
        tensors.push((name.clone(), q));
    }
    let mut metadata: Vec<(String, Value)> =
        source.content().metadata.iter().filter(|(k, _)| !REWRITTEN_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.push(("general.file_type".into(), Value::U32(quant.file_type())));
    metadata.push(("general.quantization_version".into(), Value::U32(GGML_QUANT_VERSION)));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    gguf_bytes(&metadata, &tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_cpp_choices_and_fallbacks() {
        // 256-wide rows: the k-quants fit.
        assert_eq!(tensor_type("blk.5.attn_q.weight", &[512, 256], Quant::Q4KM, 32, false), GgmlDType::Q4K);
        assert_eq!(tensor_type("blk.0.attn_v.weight", &[512, 256], Quant::Q4KM, 32, false), GgmlDType::Q6K);
        assert_eq!(tensor_type("blk.5.ffn_down.weight", &[512, 256], Quant::Q4KM, 32, false), GgmlDType::Q4K);
        assert_eq!(tensor_type("blk.6.ffn_down.weight", &[512, 256], Quant::Q4KM, 32, false), GgmlDType::Q6K);
        assert_eq!(tensor_type("output.weight", &[512, 256], Quant::Q4KM, 32, false), GgmlDType::Q6K);
        assert_eq!(tensor_type("token_embd.weight", &[512, 256], Quant::Q4KM, 32, true), GgmlDType::Q6K);
        assert_eq!(tensor_type("token_embd.weight", &[512, 256], Quant::Q4KM, 32, false), GgmlDType::Q4K);
        // SmolLM2's 576-wide rows: Q4_K -> Q5_0, the output Q8_0.
        assert_eq!(tensor_type("blk.5.attn_q.weight", &[576, 576], Quant::Q4KM, 30, false), GgmlDType::Q5_0);
        assert_eq!(tensor_type("token_embd.weight", &[49152, 576], Quant::Q4KM, 30, true), GgmlDType::Q8_0);
        // Rows of no block size at all: F16; 1-D: F32.
        assert_eq!(tensor_type("blk.0.attn_q.weight", &[8, 20], Quant::Q8_0, 2, false), GgmlDType::F16);
        assert_eq!(tensor_type("blk.0.attn_norm.weight", &[64], Quant::Q4KM, 2, false), GgmlDType::F32);
        assert_eq!(tensor_type("blk.0.attn_q.weight", &[64, 64], Quant::F16, 2, false), GgmlDType::F16);
    }

    #[test]
    fn use_more_bits_matches_llama_cpp() {
        // n = 32: layers 0..4, 28..32 and (i - 4) % 3 == 2 between.
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(picked, vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
    }

    #[test]
    fn unknown_quant_names_the_choices() {
        let err = Quant::parse("q3_k").unwrap_err().to_string();
        assert!(err.contains("q3_k") && err.contains("q4_k_m"), "{err}");
        assert_eq!(Quant::parse("Q8_0").unwrap(), Quant::Q8_0);
    }
}
