//! Inputs that used to be handled silently: each is now a warning or an error.
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lora_models::{load_model, SamplingParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn llama_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/models/llama-tiny")
}

/// A copy of llama-tiny whose config and weights `edit` may change.
fn edited_copy(dir: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>) -> Result<()>) -> Result<()> {
    let src = llama_tiny();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f))?;
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    let mut weights = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)?;
    edit(&mut cfg, &mut weights)?;
    std::fs::write(dir.join("config.json"), cfg.to_string())?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(())
}

/// Runs `f` and returns what it logged at warn level or above.
fn warnings_of<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf(Arc::new(Mutex::new(Vec::new())));
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_ansi(false).with_writer(move || writer.clone()).finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, text)
}

#[test]
fn untied_config_without_lm_head_warns_naming_the_model_then_ties() -> Result<()> {
    let untied = tempfile::tempdir()?;
    edited_copy(untied.path(), |_, w| {
        w.remove("lm_head.weight");
        Ok(())
    })?;
    let tied = tempfile::tempdir()?;
    edited_copy(tied.path(), |cfg, w| {
        cfg["tie_word_embeddings"] = true.into();
        w.remove("lm_head.weight");
        Ok(())
    })?;
    let name = untied.path().to_str().unwrap();
    let (m, log) = warnings_of(|| load_model(name, &Device::Cpu, DType::F32));
    let m = m?;
    assert!(log.contains(name) && log.contains("lm_head.weight") && log.contains("tied"), "{log}");
    let (t, log) = warnings_of(|| load_model(tied.path().to_str().unwrap(), &Device::Cpu, DType::F32));
    assert!(log.is_empty(), "a tied model loads without a warning: {log}");
    let ids = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu)?;
    let pos = Tensor::new(&[[0u32, 1, 2, 3]], &Device::Cpu)?;
    let logits = |m: &lora_models::LoadedModel| -> Result<Vec<f32>> {
        Ok(m.model.logits(&m.model.forward_hidden(&ids, &pos, None)?)?.flatten_all()?.to_vec1()?)
    };
    assert_eq!(logits(&m)?, logits(&t?)?);
    Ok(())
}

#[test]
fn a_sliding_window_config_warns_that_full_attention_is_used() -> Result<()> {
    let dir = tempfile::tempdir()?;
    edited_copy(dir.path(), |cfg, _| {
        cfg["model_type"] = "mistral".into();
        cfg["max_position_embeddings"] = 32768.into();
        cfg["sliding_window"] = 4096.into();
        Ok(())
    })?;
    let (m, log) = warnings_of(|| load_model(dir.path().to_str().unwrap(), &Device::Cpu, DType::F32));
    m?;
    assert!(log.contains("sliding-window attention (window 4096 tokens) is not implemented"), "{log}");
    Ok(())
}

#[test]
fn nan_logits_stop_generation_naming_step_and_prompt() -> Result<()> {
    let clean = load_model(llama_tiny().to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let healthy = clean.tokenizer.encode("The quick brown fox")?;
    let poisoned_prompt = clean.tokenizer.encode("How many legs does a spider have?")?;
    // Poison the embedding of a token only the second prompt contains.
    let token = *poisoned_prompt.iter().find(|t| !healthy.contains(t)).expect("a token of its own");
    let dir = tempfile::tempdir()?;
    edited_copy(dir.path(), |_, w| {
        let e = &w["model.embed_tokens.weight"];
        let mut rows: Vec<Vec<f32>> = e.to_vec2()?;
        rows[token as usize].fill(f32::NAN);
        let n = rows.len();
        w.insert("model.embed_tokens.weight".into(), Tensor::new(rows.concat(), &Device::Cpu)?.reshape((n, ()))?);
        Ok(())
    })?;
    let m = load_model(dir.path().to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let p = SamplingParams { max_new_tokens: 4, temperature: 0.8, seed: 3, ..Default::default() };
    assert!(m.model.generate(&[healthy.clone()], &p, &[])?.len() == 1, "the healthy prompt alone still generates");
    let err = format!("{:#}", m.model.generate(&[healthy, poisoned_prompt], &p, &[]).unwrap_err());
    assert!(err.contains("NaN logits at step 0 for prompt 1"), "{err}");
    Ok(())
}
