//! Where and in which dtypes a model is loaded (`--dtype`, `--base-dtype`, `--base-quant`,
//! `--device`): the placement flags shared by the commands that load a model and by the
//! library code they call (`sides`, the workflows), so it lives below both.
use anyhow::{Context, Result};
use lora_models::LoadedModel;

use crate::config::{DTypeArg, TrainConfig};

/// Where and in which dtypes a model is loaded; separate from `--model` so commands that
/// load several models (`pairs`, `compare`) share one set of these flags.
#[derive(clap::Args, Debug, Clone)]
pub struct PlacementArgs {
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// Storage dtype of the frozen base weights (bf16 halves their memory). [default: --dtype]
    #[arg(long, value_enum)]
    pub base_dtype: Option<DTypeArg>,
    /// How the frozen base is stored: nf4, int8, none, or auto (a .gguf model keeps its
    /// quantized blocks). Use the one the adapter was trained on.
    #[arg(long, default_value = "auto", value_parser = |s: &str| lora_models::BaseQuant::parse(s).map_err(|e| e.to_string()))]
    pub base_quant: lora_models::BaseQuant,
    /// cpu, cuda, cuda:N, or auto (the first GPU if there is one).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl PlacementArgs {
    /// A training run's placement (its `--device` may be overridden: a data-parallel
    /// replica, a sweep group's device).
    pub fn of_run(cfg: &TrainConfig, device: &str) -> Self {
        PlacementArgs { dtype: cfg.dtype, base_dtype: Some(cfg.base_dtype), base_quant: cfg.base_quant, device: device.to_string() }
    }

    /// The base model `model_ref`, without adapters: the one loader of every command,
    /// training run, sweep worker and replica.
    pub fn load(&self, model_ref: &str) -> Result<LoadedModel> {
        let device = crate::device::parse_device(&self.device)?;
        let weights = self.base_dtype.unwrap_or(self.dtype);
        lora_models::load_model_quantized(model_ref, &device, self.dtype.to_candle(), weights.to_candle(), self.base_quant).with_context(|| format!("loading model {model_ref}"))
    }
}
