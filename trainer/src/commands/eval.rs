//! `lora-train eval`: mean loss per loss token (the training loss mask, ARCHITECTURE.md), perplexity and the
//! loss-token count of a model, optionally with a PEFT adapter, over a chat dataset.
use std::path::PathBuf;

use anyhow::Result;

use super::model_args::ModelArgs;
use crate::data;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Chat JSONL to evaluate on.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Cut every sample to its first N tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_sequence_length: usize,
    /// Samples per forward pass (does not change the result).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Print {"eval_loss", "perplexity", "loss_tokens"} as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let result = evaluate(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("eval_loss   {:.6}\nperplexity  {:.4}\nloss_tokens {}", result.eval_loss, result.perplexity, result.loss_tokens);
    }
    Ok(())
}

pub fn evaluate(args: &Args) -> Result<data::EvalResult> {
    anyhow::ensure!(args.max_sequence_length >= 2, "--max-sequence-length must be at least 2");
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    // Data problems first: they are cheaper to find than loading a model.
    let ds = data::load_chat_dataset(&args.dataset)?;
    let loaded = args.model.load()?;
    let set = data::tokenize_dataset(&loaded.tokenizer, &ds, args.max_sequence_length)?;
    let loader = data::eval_loader(&set, args.batch_size, args.max_sequence_length, data::pad_token_id(&loaded.tokenizer));
    data::evaluate(&loaded.model, &loader)
}
