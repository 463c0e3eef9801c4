//! GGUF loading: a llama.cpp-style export of the tiny Llama (q/k rows permuted as
//! llama.cpp's converter does, llama.cpp tensor names and metadata keys) must give
//! the Hugging Face model's logits; every supported quantization type dequantizes.
use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use lora_models::weights::{gguf_tensor_name, permute_rows, GgufSource, WeightSource};
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

/// Write llama-tiny as an F32 GGUF the way convert_hf_to_gguf.py lays it out.
fn write_llama_tiny_gguf(path: &Path) -> Result<()> {
    write_llama_tiny_gguf_with(path, Vec::new())
}

/// As [`write_llama_tiny_gguf`], with `extra` metadata (e.g. a tokenizer) besides the config.
pub(crate) fn write_llama_tiny_gguf_with(path: &Path, extra: Vec<(&str, Value)>) -> Result<()> {
    write_llama_tiny_gguf_as(path, GgmlDType::F32, extra)
}

/// llama-tiny as a GGUF whose projections are stored as `projections` blocks.
fn write_llama_tiny_gguf_as(path: &Path, projections: GgmlDType, extra: Vec<(&str, Value)>) -> Result<()> {
    let dir = golden_dir().join("models/llama-tiny");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let (nh, nkv) = (cfg["num_attention_heads"].as_u64().unwrap() as usize, cfg["num_key_value_heads"].as_u64().unwrap() as usize);
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let mut tensors = Vec::new();
    for (name, t) in &weights {
        let t = if name.ends_with("q_proj.weight") {
            permute_rows(t, nh)?
        } else if name.ends_with("k_proj.weight") {
            permute_rows(t, nkv)?
        } else {
            t.clone()
        };
        let ty = if name.contains("_proj.") { projections } else { GgmlDType::F32 };
        tensors.push((gguf_tensor_name(name).expect("a llama tensor"), QTensor::quantize(&t.to_dtype(DType::F32)?, ty)?));
    }
    let u = |k: &str| Value::U32(cfg[k].as_u64().unwrap() as u32);
    let meta: Vec<(&str, Value)> = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u("num_hidden_layers")),
        ("llama.embedding_length", u("hidden_size")),
        ("llama.feed_forward_length", u("intermediate_size")),
        ("llama.attention.head_count", u("num_attention_heads")),
        ("llama.attention.head_count_kv", u("num_key_value_heads")),
        ("llama.vocab_size", u("vocab_size")),
        ("llama.rope.freq_base", Value::F32(cfg["rope_theta"].as_f64().unwrap() as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32)),
    ]
    .into_iter()
    .chain(extra)
    .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

#[test]
fn llama_cpp_layout_gives_the_hf_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("llama-tiny.f32.gguf");
    write_llama_tiny_gguf(&path)?;
    let hf = lora_models::load_model(golden_dir().join("models/llama-tiny").to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let mut src = GgufSource::open(&path)?;
    let cfg = lora_models::gguf::config_from_gguf(src.content())?;
    assert_eq!(cfg.num_key_value_heads, 2);
    assert!(!cfg.tie_word_embeddings);
    src.set_unpermute_qk(Some((cfg.num_attention_heads, cfg.num_key_value_heads)));
    let decoder = lora_models::decoder::Decoder::load(cfg, &src, &Device::Cpu, DType::F32, DType::F32, lora_models::BaseQuant::None)?;
    let gguf_model = lora_models::Model::new(decoder);
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu)?;
    let pos = Tensor::arange(0u32, 8, &Device::Cpu)?.unsqueeze(0)?;
    let a = hf.model.logits(&hf.model.forward_hidden(&ids, &pos, None)?)?;
    let b = gguf_model.logits(&gguf_model.forward_hidden(&ids, &pos, None)?)?;
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "GGUF (unpermuted) vs HF logits differ by {diff}");
    Ok(())
}

#[test]
fn every_supported_quantization_dequantizes() -> Result<()> {
    // 256-wide rows so the k-quants' super-blocks fit.
    let n = 4 * 256;
    let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
    let original = Tensor::from_vec(values, (4, 256), &Device::Cpu)?;
    let types = [
        (GgmlDType::F32, 1e-6),
        (GgmlDType::F16, 1e-3),
        (GgmlDType::Q8_0, 1e-2),
        (GgmlDType::Q4_0, 0.15),
        (GgmlDType::Q4_1, 0.15),
        (GgmlDType::Q4K, 0.15),
        (GgmlDType::Q6K, 0.04),
    ];
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("types.gguf");
    let qs: Vec<(String, QTensor)> = types
        .iter()
        .enumerate()
        .map(|(i, (ty, _))| Ok((format!("blk.{i}.ffn_up.weight"), QTensor::quantize(&original, *ty)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path)?, &[("general.architecture", &Value::String("llama".into()))], &refs)?;
    let src = GgufSource::open(&path)?;
    for (i, (ty, tol)) in types.iter().enumerate() {
        let t = src.try_get(&format!("model.layers.{i}.mlp.up_proj.weight"), &Device::Cpu)?.expect("tensor present");
        assert_eq!(t.dims(), &[4, 256]);
        let err = (t - &original)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < *tol as f32, "{ty:?}: max error {err}");
    }
    Ok(())
}

#[test]
fn gguf_blocks_kept_quantized_give_the_dequantized_models_logits() -> Result<()> {
    // Q8_0 projections (q/k rows permuted as llama.cpp stores them): kept as blocks
    // (`auto`, the default for .gguf) and dequantized per GEMM, the model computes what
    // the model dequantized at load computes, bit for bit, at a quarter of the memory.
    // Every 32-value block type (each has its own dequantization, run straight into the
    // fused projection's buffer, in parallel over chunks of blocks).
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
        blocks_kept_match_dense(dtype)?;
    }
    Ok(())
}

fn blocks_kept_match_dense(dtype: GgmlDType) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join(format!("llama-tiny.{dtype:?}.gguf"));
    write_llama_tiny_gguf_as(&path, dtype, Vec::new())?;
    let load = |quant| -> Result<lora_models::Model> {
        let mut src = GgufSource::open(&path)?;
        let cfg = lora_models::gguf::config_from_gguf(src.content())?;
        src.set_unpermute_qk(Some((cfg.num_attention_heads, cfg.num_key_value_heads)));
        Ok(lora_models::Model::new(lora_models::decoder::Decoder::load(cfg, &src, &Device::Cpu, DType::F32, DType::F32, quant)?))
    };
    let (kept, dense) = (load(lora_models::BaseQuant::Auto)?, load(lora_models::BaseQuant::None)?);
    assert_eq!(kept.base_quant(), lora_models::BaseQuant::Auto);
    let ((kept_bytes, params), (dense_bytes, _)) = (kept.projection_storage(), dense.projection_storage());
    assert_eq!(dense_bytes, params * 4);
    assert!(kept_bytes * 3 < dense_bytes, "{dtype:?} blocks hold {kept_bytes} bytes, dense f32 {dense_bytes}");
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]], &Device::Cpu)?;
    let pos = Tensor::arange(0u32, 8, &Device::Cpu)?.unsqueeze(0)?.repeat((2, 1))?;
    let a = kept.logits(&kept.forward_hidden(&ids, &pos, None)?)?;
    let b = dense.logits(&dense.forward_hidden(&ids, &pos, None)?)?;
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0, "{dtype:?}: kept-quantized vs dequantized-at-load logits differ by {diff}");
    Ok(())
}

#[test]
fn a_gguf_type_that_cannot_be_kept_is_an_error_naming_the_tensor() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("q8_1.gguf");
    let q = QTensor::quantize(&Tensor::ones((4, 64), DType::F32, &Device::Cpu)?, GgmlDType::Q8_1)?;
    gguf_file::write(&mut std::fs::File::create(&path)?, &[("general.architecture", &Value::String("llama".into()))], &[("blk.0.ffn_up.weight", &q)])?;
    let src = GgufSource::open(&path)?;
    let err = lora_models::weights::load_frozen(&src, "model.layers.0.mlp.up_proj.weight", &[4, 64], DType::F32, &Device::Cpu, lora_models::BaseQuant::Auto)
        .err()
        .expect("Q8_1 cannot be kept");
    let msg = format!("{err:#}");
    assert!(msg.contains("blk.0.ffn_up.weight") && msg.contains("Q8_1"), "{msg}");
    Ok(())
}
