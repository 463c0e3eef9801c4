//! Gradient checkpointing gives the gradients of the ordinary backward: every LoRA
//! gradient within 1e-6 relative in f32 on the tiny models, with dropout on and several
//! adapters routed in one batch (plus reference rows through the base alone); and a
//! quantized base gives the gradients of its dequantized dense twin.
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lora_models::{load_model, load_model_quantized, BaseQuant, LoadedModel, LoraConfig, Route};
use std::path::PathBuf;

fn model_dir(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/models").join(name).to_str().unwrap().to_string()
}

/// Two adapters with non-zero B (so A gets a gradient too) and dropout.
fn with_adapters(m: &mut LoadedModel) -> Result<()> {
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.1, ..Default::default() };
    for (i, name) in ["a", "b"].iter().enumerate() {
        m.model.add_adapter(name, &cfg, 7 + i as u64)?;
        for (_, v) in m.model.adapter_parameters(name)? {
            let t = v.as_tensor();
            v.set(&(t + Tensor::randn(0f32, 0.2, t.dims(), &Device::Cpu)?)?)?;
        }
    }
    Ok(())
}

/// The routed batch's summed loss and every LoRA parameter's gradient.
fn grads(m: &LoadedModel, checkpointing: bool) -> Result<(f32, Vec<(String, Tensor)>)> {
    m.model.set_gradient_checkpointing(checkpointing);
    let (b, t) = (5usize, 19usize);
    let vocab = m.model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|i| ((i as u32).wrapping_mul(2654435761) >> 7) % vocab).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)?.unsqueeze(0)?.repeat((b, 1))?;
    // Row 3 is packed: two samples in one row (segments 1 and 2), positions restart.
    let mut seg = vec![1u32; b * t];
    for s in &mut seg[3 * t + 9..4 * t] {
        *s = 2;
    }
    let seg = Tensor::from_vec(seg, (b, t), &Device::Cpu)?;
    let mask = Tensor::ones((b, t), DType::F32, &Device::Cpu)?;
    let _routing = m.model.route(&[
        Route { rows: 2, adapter: Some("a"), dropout_seed: Some(11) },
        Route { rows: 1, adapter: None, dropout_seed: None },
        Route { rows: 2, adapter: Some("b"), dropout_seed: Some(12) },
    ])?;
    let hidden = m.model.forward_hidden(&ids, &pos, Some(&seg))?;
    let loss = m.model.loss_sum(&hidden, &ids, &mask)?;
    let store = m.model.backward(&loss)?;
    let mut out = Vec::new();
    for name in ["a", "b"] {
        for (key, v) in m.model.adapter_parameters(name)? {
            let g = store.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}/{key}: no gradient (checkpointing {checkpointing})")).clone();
            assert!(g.abs()?.max_all()?.to_scalar::<f32>()? > 0.0, "{name}/{key}: zero gradient");
            out.push((format!("{name}/{key}"), g));
        }
    }
    Ok((loss.to_scalar::<f32>()?, out))
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
}

#[test]
fn checkpointed_gradients_equal_the_ordinary_ones() -> Result<()> {
    for name in ["llama-tiny", "qwen2-tiny", "qwen3-tiny"] {
        let mut m = load_model(&model_dir(name), &Device::Cpu, DType::F32)?;
        with_adapters(&mut m)?;
        let (loss_off, off) = grads(&m, false)?;
        let (loss_on, on) = grads(&m, true)?;
        assert_eq!(loss_off, loss_on, "{name}: the checkpointed forward computes the same loss");
        assert_eq!(off.len(), on.len());
        for ((k, a), (_, b)) in on.iter().zip(&off) {
            let err = max_rel(a, b)?;
            assert!(err <= 1e-6, "{name} {k}: checkpointed gradient off by {err} (relative)");
        }
    }
    Ok(())
}

#[test]
fn a_quantized_base_trains_like_its_dequantized_twin() -> Result<()> {
    // The NF4 base's gradients equal those of a dense model holding the dequantized
    // weights (the quantization error is the only difference, and it is in both).
    let dir = model_dir("llama-tiny");
    let mut q = load_model_quantized(&dir, &Device::Cpu, DType::F32, DType::F32, BaseQuant::Nf4)?;
    assert_eq!(q.model.base_quant(), BaseQuant::Nf4);
    let (stored, params) = q.model.projection_storage();
    assert!((stored as f64) < params as f64 * 0.6, "nf4 stores {stored} bytes for {params} values");
    // A dense model holding the dequantized values.
    let dequantized: std::collections::HashMap<String, Tensor> = q.model.base_tensors().into_iter().collect();
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("model.safetensors");
    candle_core::safetensors::save(&dequantized, &path)?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let src = PathBuf::from(&dir).join(f);
        if src.exists() {
            std::fs::copy(&src, tmp.path().join(f))?;
        }
    }
    let mut dense = load_model(tmp.path().to_str().unwrap(), &Device::Cpu, DType::F32)?;
    with_adapters(&mut q)?;
    with_adapters(&mut dense)?;
    // Same adapter values in both.
    for name in ["a", "b"] {
        for ((_, vq), (_, vd)) in q.model.adapter_parameters(name)?.iter().zip(dense.model.adapter_parameters(name)?) {
            vq.set(vd.as_tensor())?;
        }
    }
    let (lq, gq) = grads(&q, true)?;
    let (ld, gd) = grads(&dense, false)?;
    assert!((lq - ld).abs() <= 1e-5 * ld.abs(), "loss {lq} vs {ld}");
    for ((k, a), (_, b)) in gq.iter().zip(&gd) {
        let err = max_rel(a, b)?;
        assert!(err <= 1e-5, "{k}: nf4 base gradient off by {err}");
    }
    Ok(())
}
