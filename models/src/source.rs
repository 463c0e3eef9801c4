//! Resolving `--model`: a local HF directory, a `.gguf` file, or a hub id found in
//! the hf-hub cache (we never download at run time; `HF_HUB_OFFLINE=1` semantics).
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub enum ModelSource {
    HfDir(PathBuf),
    Gguf(PathBuf),
}

pub fn resolve(model_ref: &str) -> Result<ModelSource> {
    let path = Path::new(model_ref);
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        bail!("{model_ref}: a model file must be a .gguf (or pass a Hugging Face model directory)");
    }
    if path.is_dir() {
        if !path.join("config.json").exists() {
            bail!("{model_ref}: missing config.json (expected a Hugging Face model directory)");
        }
        return Ok(ModelSource::HfDir(path.to_path_buf()));
    }
    if looks_like_hub_id(model_ref) {
        let repo = hf_cache().model(model_ref.to_string());
        if let Some(config) = repo.get("config.json") {
            if let Some(dir) = config.parent() {
                return Ok(ModelSource::HfDir(dir.to_path_buf()));
            }
        }
        bail!(
            "{model_ref}: not a local path, and not found in the Hugging Face cache ({}); download it first (e.g. `huggingface-cli download {model_ref}`)",
            hf_cache().path().display()
        );
    }
    bail!("{model_ref}: no such file or directory")
}

/// `Org/Name` in form (not a relative or absolute path); says nothing about whether a
/// local path of that name exists.
pub fn looks_like_hub_id(model_ref: &str) -> bool {
    model_ref.split('/').count() == 2 && !model_ref.starts_with('.') && !model_ref.starts_with('/')
}

/// The hub cache as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else
/// ~/.cache/huggingface/hub.
fn hf_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(PathBuf::from(dir)),
        None => hf_hub::Cache::from_env(),
    }
}
