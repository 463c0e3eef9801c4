//! `lora-train eval`: mean loss per loss token (the training loss mask, ARCHITECTURE.md),
//! perplexity and the loss-token count of a model, optionally with a PEFT adapter, over a
//! chat dataset; on a preference file, the DPO and ORPO losses and reward statistics of the
//! adapter (policy) against the model without it or with `--ref-adapter` (reference); with
//! `--evaluator`, completions generated for a prompts file, scored.
use std::path::PathBuf;

use anyhow::{Context, Result};
use lora_datasets::{Format, PairLimits, PairLoader};
use serde::Serialize;

use super::model_args::ModelArgs;
use crate::data;
use crate::evaluators::{EvaluatorArgs, Summary};
use crate::pair_data;
use crate::recipes::dpo::{Dpo, LossType};
use crate::prompts::{self, fill_context};
use crate::recipes::orpo::Orpo;
use crate::recipes::preference::{mean_losses, PairLogps};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Chat JSONL to evaluate on (a preference JSONL for DPO/ORPO numbers, a prompts JSONL
    /// with --evaluator).
    #[arg(long)]
    pub dataset: PathBuf,
    #[command(flatten)]
    pub evaluators: EvaluatorArgs,
    /// With --evaluator: completions per prompt.
    #[arg(long, default_value_t = 1, help_heading = "Generation (with --evaluator)")]
    pub samples: usize,
    /// Cut every sample to its first N tokens (preference pairs: prompt + completion,
    /// cutting the completion's end). `--max-length` (TRL's name) is the same flag.
    #[arg(long, alias = "max-length", default_value_t = 2048)]
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
    /// "logps_rejected"}; with --evaluator: {"prompts", "samples", "reward_mean",
    /// "reward_std", "failures", ...}) as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    // Last: `next_help_heading` also heads every field after it.
    #[command(flatten, next_help_heading = "Generation (with --evaluator)")]
    pub generation: crate::sides::GenerationArgs,
}

pub fn run(args: Args) -> Result<()> {
    if !args.evaluators.evaluators.is_empty() {
        let summary = score_generations(&args)?;
        if args.json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
            println!("prompts     {}\nsamples     {}\nreward_mean {}\nreward_std  {}\nfailures    {}", summary.prompts, summary.samples, f(summary.reward_mean), f(summary.reward_std), summary.failures);
            for (k, v) in &summary.per_evaluator {
                println!("{k} {}", f(*v));
            }
        }
        return Ok(());
    }
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

/// Generate `--samples` completions per prompt (greedy unless `--temperature`), score them.
pub fn score_generations(args: &Args) -> Result<Summary> {
    anyhow::ensure!(args.samples >= 1, "--samples must be at least 1");
    let params = args.generation.params(args.samples)?;
    anyhow::ensure!(args.samples == 1 || params.temperature > 0.0, "--samples {} needs a --temperature above 0 (greedy gives one answer)", args.samples);
    let ds = prompts::load_prompt_dataset(&args.dataset)?;
    args.evaluators.check()?;
    let mut ctx = args.evaluators.context()?;
    let loaded = args.model.load()?;
    let bundle = &loaded.tokenizer;
    let prompts = prompts::tokenize_prompts(bundle, &ds)?;
    fill_context(&mut ctx, bundle, prompts.iter());
    let set = args.evaluators.build(&ctx)?;
    let answers = crate::sides::complete(&loaded, &prompts, &params, args.generation.seed, 0, args.batch_size, &indicatif::ProgressBar::hidden())?;
    let mut samples = Vec::with_capacity(prompts.len() * args.samples);
    for (i, (p, group)) in prompts.iter().zip(answers).enumerate() {
        for (g, text) in group.into_iter().enumerate() {
            samples.push(p.sample(format!("{}-{g}", i + 1), text));
        }
    }
    let scores = set.score_batch(&samples);
    Ok(Summary::of(&set, &samples, &scores))
}
