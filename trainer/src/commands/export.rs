//! `lora-train export`: an adapter or a (merged) model as a GGUF file for llama.cpp and
//! Ollama. The layouts are `lora_models::gguf_export`'s; this command loads, checks the
//! flags and writes the file atomically.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args as ClapArgs;
use lora_models::gguf_export::{self, Quant};
use lora_models::source::{self, ModelSource};
use lora_models::weights::GgufSource;
use std::path::{Path, PathBuf};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The adapter alone, as llama.cpp's convert_lora_to_gguf.py writes it (`llama-cli --lora`, Ollama `ADAPTER`).
    #[value(name = "gguf-lora")]
    GgufLora,
    /// The whole model (with the adapter merged in when --adapter is given), metadata of the source GGUF.
    Gguf,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Base model: a .gguf file (needed for --format gguf), a Hugging Face directory, or a hub id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// The PEFT adapter directory (required for gguf-lora; merged into the model for gguf).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub format: Format,
    /// Storage type: f32, f16, q8_0, q4_k_m (llama.cpp's recipe); an adapter takes f32 or f16.
    #[arg(long, default_value = "f32", value_parser = Quant::parse)]
    pub quant: Quant,
    /// The GGUF file to write (replaced atomically if it exists).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let gguf_source = match (args.format, source::resolve(&args.model)?) {
        (Format::Gguf, ModelSource::Gguf(path)) => Some(GgufSource::open(&path)?),
        (Format::Gguf, ModelSource::HfDir(dir)) => bail!(
            "--format gguf needs a .gguf --model, whose tokenizer and chat template metadata are carried over; {} is a Hugging Face \
             directory, and writing llama.cpp's tokenizer metadata for one is not implemented. Convert the base once with llama.cpp's \
             convert_hf_to_gguf.py and export from that file, or export the adapter alone with --format gguf-lora",
            dir.display()
        ),
        (Format::GgufLora, _) => None,
    };
    if args.format == Format::GgufLora && args.adapter.is_none() {
        bail!("--format gguf-lora exports an adapter: give --adapter DIR");
    }
    // f32 on the CPU: the exported numbers are the trained ones, whatever they are stored as.
    let mut loaded = lora_models::load_model(&args.model, &Device::Cpu, DType::F32).with_context(|| format!("loading model {}", args.model))?;
    let adapter_cfg = match &args.adapter {
        Some(dir) => Some(loaded.model.load_adapter(dir).with_context(|| format!("loading adapter {}", dir.display()))?),
        None => None,
    };
    if let Some(dir) = &args.adapter {
        warn_if_trained_on_another_base(dir, &args.model);
    }
    let adapter_name = adapter_cfg.as_ref().map(|_| lora_models::DEFAULT_ADAPTER);
    let bytes = match &gguf_source {
        None => {
            let name = args.adapter.as_ref().and_then(|d| d.file_name()).map_or("adapter".into(), |n| n.to_string_lossy().into_owned());
            gguf_export::lora_adapter_gguf(&loaded.model, lora_models::DEFAULT_ADAPTER, args.quant, &name)?
        }
        Some(src) => gguf_export::model_gguf(&loaded.model, adapter_name, src, args.quant)?,
    };
    lora_models::write_atomic(&args.output, &bytes)?;
    let format = match args.format {
        Format::GgufLora => "gguf-lora",
        Format::Gguf => "gguf",
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "output": args.output,
                "format": format,
                "quant": args.quant.name(),
                "bytes": bytes.len(),
                "adapter": args.adapter,
                "rank": adapter_cfg.as_ref().map(|c| c.rank),
            })
        );
    } else {
        eprintln!("wrote {} ({format}, {:.1} MiB)", args.output.display(), bytes.len() as f64 / (1024.0 * 1024.0));
    }
    Ok(())
}

/// Shapes catch an adapter of a differently sized base (the load fails); one of a base with
/// the same shapes loads, so the base it names is compared too, with a warning only, since a
/// moved or renamed base file is a legitimate reason for a different name.
fn warn_if_trained_on_another_base(adapter: &Path, model: &str) {
    let path = adapter.join("adapter_config.json");
    let named = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["base_model_name_or_path"].as_str().map(String::from));
    let same = |a: &str, b: &str| a == b || matches!((Path::new(a).canonicalize(), Path::new(b).canonicalize()), (Ok(x), Ok(y)) if x == y);
    if let Some(named) = named.filter(|n| !n.is_empty() && !same(n, model)) {
        tracing::warn!("{}: the adapter was trained on `{named}`, exporting it with `{model}`", path.display());
    }
}
