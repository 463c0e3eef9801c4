//! `lora-train eval`: mean loss per loss token (DESIGN.md s3 mask), perplexity and the
//! loss-token count of a model, optionally with a PEFT adapter, over a chat dataset; on a
//! preference file, the DPO and ORPO losses and reward statistics of the adapter (policy)
//! against the model without it or with `--ref-adapter` (reference).
use std::path::PathBuf;

use anyhow::{Context, Result};
use lora_datasets::{Format, PairLimits, PairLoader};
use serde::Serialize;

use super::model_args::ModelArgs;
use crate::data;
use crate::pair_data;
use crate::recipes::dpo::{Dpo, LossType};
use crate::recipes::orpo::Orpo;
use crate::recipes::preference::{mean_losses, PairLogps};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Chat JSONL to evaluate on.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Cut every sample to its first N tokens (preference pairs: prompt + completion,
    /// cutting the completion's end).
    #[arg(long, visible_alias = "max-length", default_value_t = 2048)]
    pub max_sequence_length: usize,
    /// Preference pairs: keep only the last N prompt tokens.
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Preference pairs: beta of the DPO loss and of ORPO's odds-ratio term.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Preference pairs: the reference model is the base with this adapter (default: the
    /// base alone).
    #[arg(long, value_name = "DIR")]
    pub ref_adapter: Option<PathBuf>,
    /// Samples per forward pass (does not change the result).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Print {"eval_loss", "perplexity", "loss_tokens"} (preference pairs: {"pairs", "beta",
    /// "dpo_loss", "orpo_loss", "rewards_accuracy", "rewards_margin", "logps_chosen",
    /// "logps_rejected"}) as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if is_preference_file(&args.dataset) {
        let result = evaluate_pairs(&args)?;
        if args.json {
            println!("{}", serde_json::to_string(&result)?);
        } else {
            println!(
                "pairs            {}\nbeta             {}\ndpo_loss         {:.6}\norpo_loss        {:.6}\nrewards_accuracy {:.4}\nrewards_margin   {:.6}\nlogps_chosen     {:.4}\nlogps_rejected   {:.4}",
                result.pairs, result.beta, result.dpo_loss, result.orpo_loss, result.rewards_accuracy, result.rewards_margin, result.logps_chosen, result.logps_rejected
            );
        }
        return Ok(());
    }
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

/// Only a file that loads as preference pairs takes the pair path; anything else (and
/// every error) goes to the chat path, whose messages explain what is wrong.
fn is_preference_file(path: &std::path::Path) -> bool {
    lora_datasets::load_dataset(path, None).is_ok_and(|d| d.format == Format::Preference)
}

/// What `eval --json` prints for a preference file. `dpo_loss` is the sigmoid loss;
/// rewards are DPO's (beta * policy-minus-reference summed log-probs); `logps_*` are the
/// policy's summed completion log-probs; `orpo_loss` uses the policy alone.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairEval {
    pub pairs: usize,
    pub beta: f64,
    pub dpo_loss: f64,
    pub orpo_loss: f64,
    pub rewards_accuracy: f64,
    pub rewards_margin: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

pub fn evaluate_pairs(args: &Args) -> Result<PairEval> {
    anyhow::ensure!(args.max_sequence_length >= 2, "--max-sequence-length must be at least 2");
    anyhow::ensure!(args.max_prompt_length != Some(0), "--max-prompt-length must be at least 1");
    let ds = data::load_preference_dataset(&args.dataset)?;
    let mut loaded = args.model.load()?;
    const REFERENCE: &str = "reference";
    if let Some(dir) = &args.ref_adapter {
        loaded.model.load_named_adapter(REFERENCE, dir).with_context(|| format!("--ref-adapter {}", dir.display()))?;
    }
    let model = &loaded.model;
    let limits = PairLimits { max_prompt_length: args.max_prompt_length, max_length: args.max_sequence_length };
    let set = pair_data::tokenize_pairs(&loaded.tokenizer, &ds, &limits)?;
    let loader = PairLoader::new(&set.pairs, args.batch_size.max(1), data::pad_token_id(&loaded.tokenizer), 0);
    let policy = match &args.model.adapter {
        Some(_) => {
            let _route = model.route_all(lora_models::DEFAULT_ADAPTER)?;
            pair_data::score_pairs(model, &loader)?
        }
        None => pair_data::reference_scores(model, &loader, None)?,
    };
    let reference = pair_data::reference_scores(model, &loader, args.ref_adapter.as_ref().map(|_| REFERENCE))?;
    let tokens = pair_data::pair_tokens(&set.pairs);
    let policy = PairLogps::from_values(&policy, &tokens, model.device())?;
    let reference = PairLogps::from_values(&reference, &tokens, model.device())?;
    let (dpo_loss, m) = mean_losses(&Dpo::new(args.beta, LossType::Sigmoid, 0.0)?, &policy, Some(&reference))?;
    let (orpo_loss, _) = mean_losses(&Orpo::new(args.beta)?, &policy, None)?;
    Ok(PairEval {
        pairs: set.pairs.len(),
        beta: args.beta,
        dpo_loss,
        orpo_loss,
        rewards_accuracy: m["rewards_accuracy"],
        rewards_margin: m["rewards_margin"],
        logps_chosen: m["logps_chosen"],
        logps_rejected: m["logps_rejected"],
    })
}
