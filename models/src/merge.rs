//! `merge`: fold the adapter into the base weights and write a Hugging Face
//! model directory that transformers / vLLM load without PEFT.
use crate::lora::write_atomic;
use crate::model::Model;
use crate::tokenizer::TokenizerBundle;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

pub fn write_merged(model: &Model, tokenizer: &TokenizerBundle, out: &Path) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in model.base_tensors() {
        tensors.insert(name, t);
    }
    for layer in &model.decoder().layers {
        for lin in layer.linears() {
            tensors.insert(format!("{}.weight", lin.name), lin.merged_weight(0)?);
        }
    }
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v)), None)?;
    write_atomic(&out.join("model.safetensors"), &bytes)?;
    let mut config = model.config().to_hf_json();
    config["torch_dtype"] = serde_json::Value::String(
        match model.dtype() {
            candle_core::DType::BF16 => "bfloat16",
            candle_core::DType::F16 => "float16",
            _ => "float32",
        }
        .into(),
    );
    write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&config)?)?;
    let tok_json = tokenizer.tokenizer.to_string(true).map_err(anyhow::Error::msg)?;
    write_atomic(&out.join("tokenizer.json"), tok_json.as_bytes())?;
    let mut tcfg = serde_json::json!({});
    if let Some(t) = &tokenizer.chat_template {
        tcfg["chat_template"] = t.clone().into();
    }
    if let Some(t) = &tokenizer.bos_token {
        tcfg["bos_token"] = t.clone().into();
    }
    if let Some(t) = &tokenizer.eos_token {
        tcfg["eos_token"] = t.clone().into();
    }
    write_atomic(&out.join("tokenizer_config.json"), &serde_json::to_vec_pretty(&tcfg)?)?;
    Ok(())
}
