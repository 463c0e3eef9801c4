//! The model flags shared by `eval`, `generate`, `pairs` and `compare` (`--model`,
//! `--adapter`, dtypes, `--device`) and loading what they name.
use std::path::PathBuf;

use anyhow::{Context, Result};
use lora_models::LoadedModel;

pub use crate::placement::PlacementArgs;

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Base model: a Hugging Face model directory, a .gguf file, or a hub id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// PEFT adapter directory (ours or PEFT's) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

impl ModelArgs {
    /// The model on the chosen device, with the adapter applied when one was given.
    pub fn load(&self) -> Result<LoadedModel> {
        let mut loaded = self.placement.load(&self.model)?;
        if let Some(dir) = &self.adapter {
            loaded.model.load_adapter(dir).with_context(|| format!("loading adapter {}", dir.display()))?;
        }
        Ok(loaded)
    }
}
