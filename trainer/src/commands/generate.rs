//! `lora-train generate`: KV-cached decoding from a base model, optionally with an adapter.
use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use lora_models::SamplingParams;

use super::model_args::ModelArgs;
use crate::chat;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Raw text prompt (no chat template). Repeat for a batch.
    #[arg(long, conflicts_with = "chat")]
    pub prompt: Vec<String>,
    /// A user message, rendered with the model's chat template. Repeat for a batch.
    #[arg(long)]
    pub chat: Vec<String>,
    #[command(flatten)]
    pub generation: crate::sides::GenerationArgs,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// With --json, each output also carries `prompt_ids` and `last_logits`: the logits at the
    /// prompt's last position (the first new token's distribution), to check another runtime
    /// (llama.cpp, transformers) against this one.
    #[arg(long, requires = "json")]
    pub logits: bool,
}

/// Logits at the last position of `ids` through the model (and its adapter), as f32.
fn last_position_logits(model: &lora_models::Model, ids: &[u32]) -> Result<Vec<f32>> {
    let _inference = model.inference();
    let device = model.device();
    let input = candle_core::Tensor::new(ids, device)?.unsqueeze(0)?;
    let positions = candle_core::Tensor::arange(0u32, ids.len() as u32, device)?.unsqueeze(0)?;
    let hidden = model.forward_hidden(&input, &positions, None)?;
    let last = hidden.narrow(1, ids.len() - 1, 1)?;
    Ok(model.logits(&last)?.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?)
}

pub fn run(args: Args) -> Result<()> {
    if args.prompt.is_empty() && args.chat.is_empty() {
        bail!("give --prompt TEXT or --chat TEXT");
    }
    let checked = args.generation.params(1)?;
    let loaded = args.model.load()?;
    let bundle = &loaded.tokenizer;
    let prompts: Vec<Vec<u32>> = if args.chat.is_empty() {
        args.prompt.iter().map(|p| bundle.encode(p)).collect::<Result<_>>()?
    } else {
        let template = chat::template_for(bundle)?;
        args.chat.iter().map(|c| chat::user_prompt_ids(bundle, &template, c)).collect::<Result<_>>()?
    };
    let params = SamplingParams {
        max_new_tokens: checked.max_new_tokens,
        temperature: checked.temperature,
        top_k: checked.top_k,
        top_p: checked.top_p,
        seed: args.generation.seed,
    };
    let (outputs, stats) = loaded.model.generate_with_stats(&prompts, &params, &bundle.eos_token_ids)?;
    let texts: Vec<String> = outputs.iter().map(|o| bundle.decode(&o.tokens, true)).collect::<Result<_>>()?;
    if args.json {
        let mut rows = Vec::with_capacity(outputs.len());
        for ((o, t), ids) in outputs.iter().zip(&texts).zip(&prompts) {
            let mut row = serde_json::json!({
                "text": t,
                "tokens": o.tokens,
                "finish_reason": match o.finish_reason { lora_models::FinishReason::Stop => "stop", _ => "length" },
            });
            if args.logits && !ids.is_empty() {
                row["prompt_ids"] = serde_json::json!(ids);
                row["last_logits"] = serde_json::json!(last_position_logits(&loaded.model, ids)?);
            }
            rows.push(row);
        }
        let out = serde_json::json!({
            "outputs": rows,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prefill_s": stats.prefill_s,
            "decode_s": stats.decode_s,
            "tokens_per_s": stats.decode_tokens_per_s(),
        });
        println!("{out}");
    } else {
        for t in &texts {
            println!("{t}");
        }
        eprintln!(
            "{} new tokens in {:.2}s ({:.1} tokens/s decoding, prefill {:.2}s for {} prompt tokens)",
            stats.generated_tokens,
            stats.decode_s,
            stats.decode_tokens_per_s(),
            stats.prefill_s,
            stats.prompt_tokens
        );
    }
    Ok(())
}
