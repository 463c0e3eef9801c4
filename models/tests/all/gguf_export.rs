//! GGUF export (`lora_models::gguf_export`) on the tiny Llama: the exported model read back
//! by our own GGUF loader gives the same logits (with and without a merged adapter), the
//! source metadata is carried over, the quantized files load, and the LoRA GGUF has the
//! names, shapes, layout and metadata of llama.cpp's convert_lora_to_gguf.py.
use anyhow::Result;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use lora_models::gguf_export::{lora_adapter_gguf, model_gguf, Quant};
use lora_models::weights::{permute_rows, GgufSource};
use lora_models::{LoadedModel, LoraConfig, Model, DEFAULT_ADAPTER};
use std::path::Path;

/// A byte-level BPE tokenizer's GGUF metadata for llama-tiny's 512 ids (no merges: enough
/// to load the file, and to check that the export carries it over).
fn tokenizer_metadata() -> Vec<(&'static str, Value)> {
    let tokens: Vec<Value> = (0..512).map(|i| Value::String(format!("t{i}"))).collect();
    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.chat_template", Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into())),
        // A key of the old file's layout that must not be copied.
        ("general.file_type", Value::U32(1)),
    ]
}

fn tiny_gguf(dir: &Path) -> Result<std::path::PathBuf> {
    let path = dir.join("llama-tiny.gguf");
    crate::gguf::write_llama_tiny_gguf_with(&path, tokenizer_metadata())?;
    Ok(path)
}

/// The model with an adapter whose B is not zero (a fresh adapter is the identity), on
/// q, k, v, o and down so both permuted and plain modules are covered.
fn with_adapter(loaded: &mut LoadedModel, use_rslora: bool) -> Result<LoraConfig> {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora,
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"].map(String::from).to_vec(),
    };
    loaded.model.add_adapter(DEFAULT_ADAPTER, &cfg, 7)?;
    for (i, (_, var)) in loaded.model.adapter_parameters(DEFAULT_ADAPTER)?.into_iter().enumerate() {
        let t = var.as_tensor();
        let values = Tensor::randn(0f32, 0.05, t.dims(), &Device::Cpu)?;
        var.set(&(values + i as f64 * 1e-3)?)?;
    }
    Ok(cfg)
}

fn logits(model: &Model) -> Result<Tensor> {
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu)?;
    let pos = Tensor::arange(0u32, 8, &Device::Cpu)?.unsqueeze(0)?;
    let _inference = model.inference();
    Ok(model.logits(&model.forward_hidden(&ids, &pos, None)?)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn read(bytes: &[u8]) -> Result<Content> {
    Ok(Content::read(&mut std::io::Cursor::new(bytes))?)
}

#[test]
fn exported_f32_model_gives_the_same_logits_merged_or_not_and_keeps_the_metadata() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src_path = tiny_gguf(tmp.path())?;
    let src = GgufSource::open(&src_path)?;
    let mut loaded = lora_models::load_model(src_path.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let base_logits = logits(&loaded.model)?;

    let plain = tmp.path().join("plain.gguf");
    std::fs::write(&plain, model_gguf(&loaded.model, None, &src, Quant::F32)?)?;
    let back = lora_models::load_model(plain.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    assert_eq!(max_abs_diff(&logits(&back.model)?, &base_logits)?, 0.0, "an f32 export is lossless");

    with_adapter(&mut loaded, false)?;
    let adapted_logits = logits(&loaded.model)?;
    assert!(max_abs_diff(&adapted_logits, &base_logits)? > 1e-3, "the test adapter changes the output");
    let merged = tmp.path().join("merged.gguf");
    std::fs::write(&merged, model_gguf(&loaded.model, Some(DEFAULT_ADAPTER), &src, Quant::F32)?)?;
    let back = lora_models::load_model(merged.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let diff = max_abs_diff(&logits(&back.model)?, &adapted_logits)?;
    assert!(diff < 1e-4, "merged GGUF vs base + adapter: {diff}");

    let c = Content::read(&mut std::fs::File::open(&merged)?)?;
    let original = src.content();
    for key in ["tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.rope.freq_base", "general.architecture"] {
        assert_eq!(format!("{:?}", c.metadata[key]), format!("{:?}", original.metadata[key]), "{key} carried over");
    }
    assert!(matches!(c.metadata["general.file_type"], Value::U32(0)), "file type rewritten to ALL_F32");
    assert_eq!(back.tokenizer.chat_template, loaded.tokenizer.chat_template);
    let names: Vec<&String> = c.tensor_infos.keys().collect();
    assert_eq!(names.len(), original.tensor_infos.len(), "{names:?}");
    Ok(())
}

#[test]
fn quantized_exports_use_llama_cpp_types_and_stay_close() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src_path = tiny_gguf(tmp.path())?;
    let src = GgufSource::open(&src_path)?;
    let loaded = lora_models::load_model(src_path.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let reference = logits(&loaded.model)?;
    // 64-wide rows: Q8_0 fits; Q4_K / Q6_K fall back to Q5_0 / Q8_0 as llama.cpp does.
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    // Tolerances relative to the largest logit, ~3x the errors measured on this random tiny
    // model (f16 6.0e-4, q8_0 1.7e-2, q4_k_m 8.7e-2): a wrong layout or type moves them by O(1).
    for (quant, q_proj_type, tol) in [(Quant::F16, GgmlDType::F16, 2e-3), (Quant::Q8_0, GgmlDType::Q8_0, 5e-2), (Quant::Q4KM, GgmlDType::Q5_0, 0.25)]
    {
        let bytes = model_gguf(&loaded.model, None, &src, quant)?;
        let c = read(&bytes)?;
        assert_eq!(c.tensor_infos["blk.0.attn_q.weight"].ggml_dtype, q_proj_type, "{quant:?}");
        assert_eq!(c.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype, GgmlDType::F32, "{quant:?}: norms stay f32");
        let path = tmp.path().join(format!("{}.gguf", quant.name()));
        std::fs::write(&path, &bytes)?;
        let back = lora_models::load_model(path.to_str().unwrap(), &Device::Cpu, DType::F32)?;
        let rel = max_abs_diff(&logits(&back.model)?, &reference)? / scale;
        eprintln!("{quant:?}: max logit error {rel:.2e} of the largest logit");
        assert!(rel < tol, "{quant:?}: logits moved by {rel} of the largest logit");
    }
    Ok(())
}

#[test]
fn lora_gguf_has_llama_cpp_names_shapes_layout_and_metadata() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src_path = tiny_gguf(tmp.path())?;
    let mut loaded = lora_models::load_model(src_path.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let cfg = with_adapter(&mut loaded, false)?;
    let bytes = lora_adapter_gguf(&loaded.model, DEFAULT_ADAPTER, Quant::F32, "tiny-adapter")?;
    let c = read(&bytes)?;
    let s = |k: &str| c.metadata[k].to_string().unwrap().clone();
    assert_eq!(s("general.type"), "adapter");
    assert_eq!(s("adapter.type"), "lora");
    assert_eq!(s("general.architecture"), "llama");
    assert_eq!(c.metadata["adapter.lora.alpha"].to_f32()?, 8.0);
    // 2 layers x 5 modules x (A, B).
    assert_eq!(c.tensor_infos.len(), 20);
    let (hidden, kv_out, r) = (64, 2 * 16, cfg.rank);
    let mut file = std::io::Cursor::new(&bytes);
    let tensor =
        |file: &mut std::io::Cursor<&Vec<u8>>, name: &str| -> Result<Tensor> { Ok(c.tensor(file, name, &Device::Cpu)?.dequantize(&Device::Cpu)?) };
    // candle reports numpy order, reversed from ggml's ne: lora_a [r, in] (ne [in, r]), lora_b [out, r].
    assert_eq!(c.tensor_infos["blk.1.attn_k.weight.lora_a"].shape.dims(), &[r, hidden]);
    assert_eq!(c.tensor_infos["blk.1.attn_k.weight.lora_b"].shape.dims(), &[kv_out, r]);
    assert_eq!(c.tensor_infos["blk.0.ffn_down.weight.lora_a"].shape.dims(), &[r, 128]);
    assert!(!c.tensor_infos.contains_key("blk.0.ffn_up.weight.lora_a"), "untargeted modules are absent");

    // Layout: B of q / k in llama.cpp's permuted row order (the base GGUF's q/k rows are
    // permuted, and W + s B A must be too); A and every other B unchanged.
    let layer = &loaded.model.decoder().layers[0];
    let lin = |m: &str| layer.linears().into_iter().find(|l| l.module() == m).unwrap();
    let hf_b = |m: &str| lin(m).adapter(0).unwrap().b.as_tensor().clone();
    let hf_a = |m: &str| lin(m).adapter(0).unwrap().a.as_tensor().clone();
    assert_eq!(max_abs_diff(&tensor(&mut file, "blk.0.attn_q.weight.lora_b")?, &permute_rows(&hf_b("q_proj"), 4)?)?, 0.0);
    assert_eq!(max_abs_diff(&tensor(&mut file, "blk.0.attn_k.weight.lora_b")?, &permute_rows(&hf_b("k_proj"), 2)?)?, 0.0);
    assert_eq!(max_abs_diff(&tensor(&mut file, "blk.0.attn_q.weight.lora_a")?, &hf_a("q_proj"))?, 0.0);
    assert_eq!(max_abs_diff(&tensor(&mut file, "blk.0.attn_v.weight.lora_b")?, &hf_b("v_proj"))?, 0.0);

    // What llama.cpp computes, W_gguf + alpha/r * B A from the two files, is the merged export.
    let src = GgufSource::open(&src_path)?;
    let merged_bytes = model_gguf(&loaded.model, Some(DEFAULT_ADAPTER), &src, Quant::F32)?;
    let merged = read(&merged_bytes)?;
    let w = src.content().tensor(&mut std::fs::File::open(&src_path)?, "blk.0.attn_q.weight", &Device::Cpu)?.dequantize(&Device::Cpu)?;
    let ba = tensor(&mut file, "blk.0.attn_q.weight.lora_b")?.matmul(&tensor(&mut file, "blk.0.attn_q.weight.lora_a")?)?;
    let llama_cpp = (w + (ba * (8.0 / 4.0))?)?;
    let ours = merged.tensor(&mut std::io::Cursor::new(&merged_bytes), "blk.0.attn_q.weight", &Device::Cpu)?.dequantize(&Device::Cpu)?;
    assert!(max_abs_diff(&llama_cpp, &ours)? < 1e-6);
    Ok(())
}

#[test]
fn rslora_alpha_is_written_so_llama_cpp_applies_our_scale() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src_path = tiny_gguf(tmp.path())?;
    let mut loaded = lora_models::load_model(src_path.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let cfg = with_adapter(&mut loaded, true)?;
    let c = read(&lora_adapter_gguf(&loaded.model, DEFAULT_ADAPTER, Quant::F16, "rs")?)?;
    // llama.cpp: alpha_written / r == our alpha / sqrt(r).
    let written = c.metadata["adapter.lora.alpha"].to_f32()? as f64;
    assert!((written / cfg.rank as f64 - cfg.scale()).abs() < 1e-6, "{written}");
    assert_eq!(c.tensor_infos["blk.0.attn_q.weight.lora_a"].ggml_dtype, GgmlDType::F16);
    let err = lora_adapter_gguf(&loaded.model, DEFAULT_ADAPTER, Quant::Q8_0, "rs").unwrap_err().to_string();
    assert!(err.contains("f32 or f16"), "{err}");
    Ok(())
}
