//! `lora-train merge`: fold a PEFT adapter into the base weights, write an HF directory.
use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use candle_core::Device;
use lora_models::load_model_quantized;
use std::path::PathBuf;

use crate::config::DTypeArg;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Base model: a Hugging Face directory, a .gguf file, or a hub id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// The PEFT adapter directory to fold in.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged model (config.json, model.safetensors, tokenizer files).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// dtype of the written weights.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// The base as the adapter was trained on it: nf4, int8, none, or auto (a .gguf keeps
    /// its blocks). A quantized base is merged into its dequantized weights, as PEFT does.
    #[arg(long, default_value = "auto", value_parser = |s: &str| lora_models::BaseQuant::parse(s).map_err(|e| e.to_string()))]
    pub base_quant: lora_models::BaseQuant,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.output.join("model.safetensors").exists() {
        bail!("{}: already holds a model; choose an empty directory", args.output.display());
    }
    let dtype = args.dtype.to_candle();
    let mut loaded = load_model_quantized(&args.model, &Device::Cpu, dtype, dtype, args.base_quant)?;
    let (stored_bytes, values) = loaded.model.projection_storage();
    let quantized = stored_bytes < values * dtype.size_in_bytes() as u64;
    if quantized {
        eprintln!(
            "note: the base is stored quantized ({}); the adapter is merged into its dequantized weights (as PEFT merges into a 4-bit base), written as {:?}",
            loaded.model.base_quant(),
            args.dtype
        );
    }
    let cfg = loaded.model.load_adapter(&args.adapter)?;
    lora_models::merge::write_merged(&loaded.model, &loaded.tokenizer, &args.output)?;
    if args.json {
        println!("{}", serde_json::json!({"output": args.output, "rank": cfg.rank, "target_modules": cfg.target_modules}));
    } else {
        eprintln!("merged {} (rank {}) into {}", args.adapter.display(), cfg.rank, args.output.display());
    }
    Ok(())
}
