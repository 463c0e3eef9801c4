//! Parity with transformers / PEFT / PyTorch autograd on the tiny random models
//! committed under tests/golden/ (made by scripts/golden/make_tiny_models.py).
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lora_models::{load_model, LoadedModel, LoraConfig};
use std::collections::HashMap;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

struct Golden {
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Golden {
    fn load(name: &str) -> Result<Self> {
        let tensors = candle_core::safetensors::load(golden_dir().join(format!("{name}.safetensors")), &Device::Cpu)?;
        let json = serde_json::from_str(&std::fs::read_to_string(golden_dir().join(format!("{name}.json")))?)?;
        Ok(Self { tensors, json })
    }
    fn get(&self, k: &str) -> &Tensor {
        &self.tensors[k]
    }
    fn input_ids(&self) -> Result<Tensor> {
        Ok(self.get("input_ids").to_dtype(DType::U32)?)
    }
    fn attention_mask(&self) -> Result<Vec<Vec<u32>>> {
        Ok(self.get("attention_mask").to_dtype(DType::U32)?.to_vec2::<u32>()?)
    }
    /// Segment ids (1 = token, 0 = padding) and positions 0..t.
    fn segments_positions(&self) -> Result<(Tensor, Tensor)> {
        let mask = self.get("attention_mask").to_dtype(DType::U32)?;
        let (b, t) = mask.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)?.unsqueeze(0)?.repeat((b, 1))?;
        Ok((mask, pos))
    }
    /// Our loss mask marks the target token t (predicted from t-1); the golden
    /// [b, t-1] mask marks the predicting position.
    fn our_loss_mask(&self) -> Result<Tensor> {
        let m = self.get("loss_mask").to_dtype(DType::F32)?;
        let b = m.dim(0)?;
        Ok(Tensor::cat(&[Tensor::zeros((b, 1), DType::F32, &Device::Cpu)?, m], 1)?)
    }
}

fn model(name: &str) -> Result<LoadedModel> {
    load_model(golden_dir().join("models").join(name).to_str().unwrap(), &Device::Cpu, DType::F32)
}

/// max |a - b| / max |b| over the positions where `valid` holds.
fn rel_err_valid(ours: &Tensor, golden: &Tensor, valid: &[Vec<u32>]) -> Result<f32> {
    let (a, g) = (ours.to_dtype(DType::F32)?.to_vec3::<f32>()?, golden.to_dtype(DType::F32)?.to_vec3::<f32>()?);
    let (mut diff, mut scale) = (0f32, 0f32);
    for (b, rows) in g.iter().enumerate() {
        for (t, row) in rows.iter().enumerate() {
            if valid[b][t] == 0 {
                continue;
            }
            for (x, y) in a[b][t].iter().zip(row) {
                diff = diff.max((x - y).abs());
                scale = scale.max(y.abs());
            }
        }
    }
    Ok(diff / scale)
}

fn rel_err(ours: &Tensor, golden: &Tensor) -> Result<f32> {
    let diff = (ours.to_dtype(DType::F32)? - golden.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = golden.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale)
}

/// The golden loss: mean token cross-entropy over the golden loss mask.
fn mean_loss(m: &LoadedModel, g: &Golden) -> Result<Tensor> {
    let (seg, pos) = g.segments_positions()?;
    let ids = g.input_ids()?;
    let mask = g.our_loss_mask()?;
    let hidden = m.model.forward_hidden(&ids, &pos, Some(&seg))?;
    let n = mask.sum_all()?.to_scalar::<f32>()?;
    Ok((m.model.loss_sum(&hidden, &ids, &mask)? / n as f64)?)
}

fn logits_of(m: &LoadedModel, g: &Golden) -> Result<Tensor> {
    let (seg, pos) = g.segments_positions()?;
    let hidden = m.model.forward_hidden(&g.input_ids()?, &pos, Some(&seg))?;
    Ok(m.model.logits(&hidden)?)
}

fn check_model(name: &str) -> Result<()> {
    let g = Golden::load(name)?;
    let valid = g.attention_mask()?;
    let mut m = model(name)?;

    // 1. Base logits.
    let base = logits_of(&m, &g)?;
    let err = rel_err_valid(&base, g.get("logits"), &valid)?;
    println!("{name}: base logits rel err {err:.2e}");
    assert!(err < 1e-4, "{name}: base logits rel err {err}");

    // 2. Fresh adapter (B = 0) reproduces the base exactly.
    m.model.add_lora(&LoraConfig { rank: 4, alpha: 8.0, ..Default::default() }, 7)?;
    let fresh = logits_of(&m, &g)?;
    assert_eq!(fresh.flatten_all()?.to_vec1::<f32>()?, base.flatten_all()?.to_vec1::<f32>()?, "{name}: B=0 must reproduce the base");

    // 3. The PEFT-written adapter with non-zero A and B.
    let adapter_dir = golden_dir().join("adapters").join(name);
    let cfg = m.model.load_adapter(&adapter_dir)?;
    assert_eq!(cfg.rank, 4);
    let lora = logits_of(&m, &g)?;
    let err = rel_err_valid(&lora, g.get("lora_logits"), &valid)?;
    println!("{name}: LoRA logits rel err {err:.2e}");
    assert!(err < 1e-4, "{name}: LoRA logits rel err {err}");

    // 4. Loss and every LoRA gradient against PyTorch autograd.
    let loss = mean_loss(&m, &g)?;
    let golden_loss = g.get("loss").to_scalar::<f32>()?;
    let loss_v = loss.to_scalar::<f32>()?;
    println!("{name}: loss {loss_v} vs {golden_loss}");
    assert!(((loss_v - golden_loss) / golden_loss).abs() < 1e-5);
    let grads = loss.backward()?;
    let params = m.model.lora_parameters();
    assert_eq!(params.len(), g.json["lora"]["num_tensors"].as_u64().unwrap() as usize);
    let mut worst = 0f32;
    for (key, var) in &params {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
        let norm = grad.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(norm > 0.0, "{name}: zero gradient for {key}");
        let err = rel_err(grad, g.get(&format!("grad.{key}")))?;
        worst = worst.max(err);
        assert!(err < 1e-4, "{name}: gradient of {key} rel err {err}");
    }
    println!("{name}: worst LoRA gradient rel err {worst:.2e} over {} tensors", params.len());
    for (key, t) in m.model.base_tensors() {
        assert!(grads.get(&t).is_none(), "{name}: frozen base tensor {key} received a gradient");
    }

    // 5. Save in PEFT layout, reload into a fresh model: identical logits. The saved
    //    directory is kept for scripts/golden/check_peft_load.py.
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("peft-check").join(name);
    m.model.save_adapter(&out, &format!("tests/golden/models/{name}"))?;
    let mut reloaded = model(name)?;
    reloaded.model.load_adapter(&out)?;
    let again = logits_of(&reloaded, &g)?;
    assert_eq!(again.flatten_all()?.to_vec1::<f32>()?, lora.flatten_all()?.to_vec1::<f32>()?);

    // 6. `merge` folds the adapter in: the merged HF directory gives the LoRA logits.
    let merged_dir = tempfile::tempdir()?;
    lora_models::merge::write_merged(&m.model, &m.tokenizer, merged_dir.path())?;
    let merged = load_model(merged_dir.path().to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let err = rel_err_valid(&logits_of(&merged, &g)?, g.get("lora_logits"), &valid)?;
    println!("{name}: merged model logits rel err {err:.2e}");
    assert!(err < 1e-4, "{name}: merged logits rel err {err}");
    Ok(())
}

#[test]
fn llama_matches_transformers_and_peft() -> Result<()> {
    check_model("llama-tiny")
}

#[test]
fn qwen2_sharded_with_biases_matches_transformers_and_peft() -> Result<()> {
    check_model("qwen2-tiny")
}

#[test]
fn qwen3_bf16_file_with_qk_norm_matches_transformers_and_peft() -> Result<()> {
    check_model("qwen3-tiny")
}

#[test]
fn generation_padding_matches_unpadded() -> Result<()> {
    // A short prompt batched with a long one must decode exactly as when alone.
    let m = model("llama-tiny")?;
    let ids = m.tokenizer.encode("The quick brown fox")?;
    let long = m.tokenizer.encode("How many legs does a spider have? The quick")?;
    let p = lora_models::SamplingParams { max_new_tokens: 8, ..Default::default() };
    let alone = m.model.generate(&[ids.clone()], &p, &[])?;
    let batched = m.model.generate(&[long, ids], &p, &[])?;
    assert_eq!(alone[0].tokens, batched[1].tokens);
    Ok(())
}

#[test]
fn errors_name_the_problem() {
    let err = load_model("/nonexistent/model", &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("/nonexistent/model"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt_neox", "vocab_size": 10}"#).unwrap();
    let err = format!("{:#}", load_model(dir.path().to_str().unwrap(), &Device::Cpu, DType::F32).err().unwrap());
    assert!(err.contains("unsupported model_type `gpt_neox`"), "{err}");
    // A tensor of the wrong shape is named.
    let src = golden_dir().join("models/llama-tiny");
    for f in ["tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = 96.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = format!("{:#}", load_model(dir.path().to_str().unwrap(), &Device::Cpu, DType::F32).err().unwrap());
    assert!(err.contains("gate_proj.weight") && err.contains("expected [96, 64]"), "{err}");
}

/// cosine similarity of two tensors, flattened.
fn cosine(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?.flatten_all()?, b.to_dtype(DType::F32)?.flatten_all()?);
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()?;
    let na = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let nb = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(dot / (na * nb))
}

#[test]
fn bf16_compute_tracks_f32_and_every_lora_tensor_gets_a_gradient() -> Result<()> {
    bf16_compute_case()
}

/// The same bf16 model where the CPU has no bf16 dot product (forced here): bf16
/// activations stay bf16 and the matmuls widen to f32 GEMMs.
#[test]
fn bf16_compute_without_the_bf16_dot_product_tracks_f32_too() -> Result<()> {
    lora_kernels::gemm_bf16::force_fallback(|| {
        assert!(!lora_kernels::gemm_bf16::available());
        bf16_compute_case()
    })
}

fn bf16_compute_case() -> Result<()> {
    let name = "qwen3-tiny";
    let g = Golden::load(name)?;
    let valid = g.attention_mask()?;
    let mut m = load_model(golden_dir().join("models").join(name).to_str().unwrap(), &Device::Cpu, DType::BF16)?;
    assert_eq!(m.model.compute_dtype(), DType::BF16, "bf16 computes in bf16 on every CPU");
    m.model.load_adapter(&golden_dir().join("adapters").join(name))?;
    let lora = logits_of(&m, &g)?;
    let err = rel_err_valid(&lora, g.get("lora_logits"), &valid)?;
    println!("{name} bf16: LoRA logits rel err {err:.2e}");
    assert!(err < 3e-2, "bf16 logits rel err {err}");
    let loss = mean_loss(&m, &g)?;
    let grads = loss.backward()?;
    let mut worst = 1f32;
    for (key, var) in m.model.lora_parameters() {
        assert_eq!(var.dtype(), DType::F32, "LoRA master weights stay f32");
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("bf16: no gradient for {key}"));
        assert!(grad.abs()?.max_all()?.to_scalar::<f32>()? > 0.0, "bf16: zero gradient for {key}");
        worst = worst.min(cosine(grad, g.get(&format!("grad.{key}")))?);
    }
    println!("{name} bf16: worst gradient cosine similarity to f32 autograd {worst:.4}");
    assert!(worst > 0.98, "bf16 gradients drift: cosine {worst}");
    for (key, t) in m.model.base_tensors() {
        assert!(grads.get(&t).is_none(), "bf16: frozen base tensor {key} received a gradient");
    }
    Ok(())
}

#[test]
fn f32_compute_over_bf16_stored_weights() -> Result<()> {
    // The frozen base in bf16 (half the weight memory), activations and LoRA in f32.
    let name = "llama-tiny";
    let g = Golden::load(name)?;
    let valid = g.attention_mask()?;
    let dir = golden_dir().join("models").join(name);
    let mut m = lora_models::load_model_mixed(dir.to_str().unwrap(), &Device::Cpu, DType::F32, DType::BF16)?;
    assert_eq!((m.model.dtype(), m.model.compute_dtype()), (DType::BF16, DType::F32));
    assert!(m.model.base_tensors().iter().all(|(_, t)| t.dtype() == DType::BF16));
    m.model.load_adapter(&golden_dir().join("adapters").join(name))?;
    let lora = logits_of(&m, &g)?;
    assert_eq!(lora.dtype(), DType::F32);
    // Only the weights were rounded to bf16: closer to f32 than full bf16 compute.
    let err = rel_err_valid(&lora, g.get("lora_logits"), &valid)?;
    println!("{name} bf16 weights / f32 compute: LoRA logits rel err {err:.2e}");
    assert!(err < 1e-2, "rel err {err}");
    let grads = mean_loss(&m, &g)?.backward()?;
    for (key, var) in m.model.lora_parameters() {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {key}"));
        assert!(grad.abs()?.max_all()?.to_scalar::<f32>()? > 0.0, "zero gradient for {key}");
        assert!(cosine(grad, g.get(&format!("grad.{key}")))? > 0.99, "{key} drifts");
    }
    for (key, t) in m.model.base_tensors() {
        assert!(grads.get(&t).is_none(), "frozen base tensor {key} received a gradient");
    }
    Ok(())
}
