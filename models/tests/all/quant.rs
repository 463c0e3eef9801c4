//! The quantized base against bitsandbytes' own code (tests/golden/quant, made by
//! scripts/golden/make_quant_golden.py with bitsandbytes 0.50.2 on CPU): NF4 with double
//! quantization byte for byte, its dequantized values, int8 codes; and llama-tiny with
//! its PEFT adapter on an NF4 base against transformers + PEFT + bitsandbytes.
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lora_models::quant::{Int8Matrix, Nf4Matrix};
use std::collections::HashMap;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn load() -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let dir = golden_dir().join("quant");
    let t = candle_core::safetensors::load(dir.join("nf4.safetensors"), &Device::Cpu)?;
    let j = serde_json::from_str(&std::fs::read_to_string(dir.join("quant.json"))?)?;
    Ok((t, j))
}

fn u8s(t: &Tensor) -> Result<Vec<u8>> {
    Ok(t.flatten_all()?.to_vec1::<u8>()?)
}
fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

#[test]
fn nf4_equals_bitsandbytes_bit_for_bit() -> Result<()> {
    let (t, j) = load()?;
    assert_eq!(lora_models::quant::dynamic_map().to_vec(), f32s(&t["dynamic_map"])?, "bitsandbytes' dynamic 8-bit map");
    for (name, shape) in j["cases"].as_object().unwrap() {
        let (rows, cols) = (shape[0].as_u64().unwrap() as usize, shape[1].as_u64().unwrap() as usize);
        let input = f32s(&t[&format!("{name}.input")])?;
        let m = Nf4Matrix::quantize(&input, rows, cols)?;
        assert_eq!(m.packed, u8s(&t[&format!("{name}.packed")])?, "{name}: packed NF4 codes");
        assert_eq!(m.offset.to_bits(), f32s(&t[&format!("{name}.offset")])?[0].to_bits(), "{name}: offset (mean absmax)");
        assert_eq!(m.qabsmax, u8s(&t[&format!("{name}.qabsmax")])?, "{name}: 8-bit absmax codes");
        let scales: Vec<u32> = m.absmax_scale.iter().map(|v| v.to_bits()).collect();
        let golden: Vec<u32> = f32s(&t[&format!("{name}.absmax_scale")])?.iter().map(|v| v.to_bits()).collect();
        assert_eq!(scales, golden, "{name}: absmax scales");
        let mut deq = vec![0f32; rows * cols];
        m.dequantize_into(&mut deq);
        let want = f32s(&t[&format!("{name}.dequantized")])?;
        let bad = deq.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(bad, 0, "{name}: {bad} dequantized values differ from bitsandbytes'");

        let q8 = Int8Matrix::quantize(&input, rows, cols)?;
        let codes: Vec<i8> = t[&format!("{name}.int8_codes")].flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().map(|&v| v as i8).collect();
        assert_eq!(q8.codes, codes, "{name}: int8 codes");
        assert_eq!(q8.row_absmax, f32s(&t[&format!("{name}.int8_absmax")])?, "{name}: int8 row absmax");
    }
    Ok(())
}

#[test]
fn nf4_base_with_adapter_matches_transformers_peft_bitsandbytes() -> Result<()> {
    let (_, j) = load()?;
    let Some(g) = j.get("nf4_llama_tiny") else {
        panic!("the golden has no transformers + bitsandbytes result: {}", j["nf4_llama_tiny_error"]);
    };
    let ids: Vec<Vec<u32>> = serde_json::from_value(g["input_ids"].clone())?;
    let (b, t) = (ids.len(), ids[0].len());
    let ids = Tensor::from_vec(ids.concat(), (b, t), &Device::Cpu)?;
    let dir = golden_dir().join("models/llama-tiny");
    let mut m = lora_models::load_model_quantized(dir.to_str().unwrap(), &Device::Cpu, DType::F32, DType::F32, lora_models::BaseQuant::Nf4)?;
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)?.unsqueeze(0)?.repeat((b, 1))?;
    let mut mask = vec![1f32; b * t];
    for r in 0..b {
        mask[r * t] = 0.0;
    }
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
    let n = (b * (t - 1)) as f64;
    let mean_loss = |m: &lora_models::Model| -> Result<f64> {
        let _inference = m.inference();
        let h = m.forward_hidden(&ids, &pos, None)?;
        Ok(m.loss_sum(&h, &ids, &mask)?.to_scalar::<f32>()? as f64 / n)
    };
    let base = mean_loss(&m.model)?;
    m.model.load_adapter(&golden_dir().join("adapters/llama-tiny"))?;
    let adapted = mean_loss(&m.model)?;
    for (ours, key) in [(base, "mean_loss_base"), (adapted, "mean_loss_with_adapter")] {
        let want = g[key].as_f64().unwrap();
        assert!((ours - want).abs() <= 1e-4 * want.abs(), "{key}: ours {ours} vs transformers + PEFT + bitsandbytes {want}");
    }
    Ok(())
}
