//! Preference pairs from prompts alone (delta learning): the preferred answer from a
//! stronger sampler, the non-preferred one from a weaker one, optionally kept only where
//! evaluators score the preferred answer higher. Writes Fireworks-form pairs (what `dpo`
//! and `orpo` read) and a provenance sidecar. The `pairs` command and `run dpo` (prompts-
//! only data) both call [`generate_pairs`] with typed options.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use lora_models::RolloutParams;
use serde::Serialize;
use serde_json::json;

use crate::evaluators::EvaluatorArgs;
use crate::output_file;
use crate::placement::PlacementArgs;
use crate::prompts::{self, fill_context};
use crate::sides::{self, ModelRef, Models};

/// One reward per prompt (`None`: no evaluator scored it).
type Rewards = Vec<Option<f64>>;

const PROVENANCE: &str = ".provenance.json";

/// The preferred side samples greedily by default, the other at temperature 1.
pub const STRONG_TEMPERATURE: f64 = 0.0;
pub const WEAK_TEMPERATURE: f64 = 1.0;
/// Longest generated answer (`--max-new-tokens`).
pub const MAX_NEW_TOKENS: usize = 256;
/// Prompts per generation batch (`--batch-size`; does not change the answers).
pub const BATCH_SIZE: usize = 4;

/// One side: a model (with an optional adapter) and how it samples.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub model: ModelRef,
    /// 0 = greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling mass (1.0 = off).
    pub top_p: f64,
}

impl Sampler {
    /// `model` at `temperature`, no top-k or top-p cut.
    pub fn new(model: ModelRef, temperature: f64) -> Self {
        Sampler { model, temperature, top_k: 0, top_p: 1.0 }
    }

    fn params(&self, max_new_tokens: usize) -> RolloutParams {
        RolloutParams { group: 1, max_new_tokens, temperature: self.temperature, top_k: self.top_k, top_p: self.top_p }
    }
}

/// Everything one `pairs` run needs.
#[derive(Clone, Debug)]
pub struct PairsOptions {
    /// Prompts JSONL (system/user messages; other fields go to the evaluators).
    pub dataset: PathBuf,
    /// The preferred side.
    pub strong: Sampler,
    /// The non-preferred side (the same base as `strong` is loaded once).
    pub weak: Sampler,
    /// A new file, or a directory (the file gets a time-stamped name inside it).
    pub output: PathBuf,
    pub placement: PlacementArgs,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// With evaluators: keep a pair only when the strong answer scores strictly higher.
    pub evaluators: EvaluatorArgs,
}

/// Why a prompt gave no pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Drop {
    /// An answer is empty: `dpo` refuses empty outputs.
    Empty,
    /// Both answers are the same text: the pair has no preference to learn.
    Identical,
    /// An evaluator gave one side no score: no evidence the strong answer is better.
    Unscored,
    /// The strong answer did not score strictly higher.
    NotBetter,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub output: PathBuf,
    pub provenance: PathBuf,
    pub prompts: usize,
    pub pairs: usize,
    pub dropped: usize,
    pub dropped_by_reason: BTreeMap<Drop, usize>,
}

/// Answers every prompt with both samplers and writes the pairs kept and their provenance.
pub fn generate_pairs(opts: &PairsOptions) -> Result<Outcome> {
    let strong_params = opts.strong.params(opts.max_new_tokens);
    let weak_params = opts.weak.params(opts.max_new_tokens);
    sides::check_params("--strong-", &strong_params)?;
    sides::check_params("--weak-", &weak_params)?;
    // Everything that can fail cheaply fails before a model is loaded.
    let ds = prompts::load_prompt_dataset(&opts.dataset)?;
    if !opts.evaluators.evaluators.is_empty() {
        opts.evaluators.check()?;
    }
    let path = output_file::fresh_path(&opts.output, "pairs", "jsonl", PROVENANCE)?;
    let (strong_ref, weak_ref) = (&opts.strong.model, &opts.weak.model);
    let mut models = Models::default();
    let strong = models.add("strong", strong_ref, &opts.placement)?;
    let weak = models.add("weak", weak_ref, &opts.placement)?;
    // What evaluators see of a prompt (messages, fields) is the same for both sides.
    let prompt_view = prompts::tokenize_prompts(&models.get(&strong).tokenizer, &ds)?;
    let evaluators = if opts.evaluators.evaluators.is_empty() {
        None
    } else {
        let mut ctx = opts.evaluators.context()?;
        fill_context(&mut ctx, &models.get(&strong).tokenizer, prompt_view.iter());
        Some(opts.evaluators.build(&ctx)?)
    };

    // Each side renders the prompts with its own model's chat template.
    let mut answers = Vec::new();
    for (stream, (side, params)) in [(&strong, &strong_params), (&weak, &weak_params)].into_iter().enumerate() {
        let loaded = models.get(side);
        let tokenized = prompts::tokenize_prompts(&loaded.tokenizer, &ds)?;
        let bar = sides::progress_bar(tokenized.len(), &side.label);
        let _route = models.route(side)?;
        let texts = sides::complete_one(loaded, &tokenized, params, opts.seed, stream, opts.batch_size, &bar)?;
        bar.finish_and_clear();
        answers.push(texts);
        tracing::info!("{}: {} answers", side.label, tokenized.len());
    }
    let (strong_answers, weak_answers) = (&answers[0], &answers[1]);

    // Per prompt: the strong side's reward, the weak side's reward.
    let scores: Option<(Rewards, Rewards)> = evaluators.as_ref().map(|set| {
        let mut samples: Vec<_> = prompt_view.iter().zip(strong_answers).enumerate().map(|(i, (p, a))| p.sample(format!("{}-strong", i + 1), a.clone())).collect();
        samples.extend(prompt_view.iter().zip(weak_answers).enumerate().map(|(i, (p, a))| p.sample(format!("{}-weak", i + 1), a.clone())));
        let mut rewards = set.score_batch(&samples).rewards;
        let weak = rewards.split_off(prompt_view.len());
        (rewards, weak)
    });

    let mut lines = String::new();
    // Every reason listed, zeros too: readers need not guess whether a check ran.
    let mut dropped_by_reason: BTreeMap<Drop, usize> = [Drop::Empty, Drop::Identical, Drop::Unscored, Drop::NotBetter].into_iter().map(|d| (d, 0)).collect();
    let mut pairs = 0;
    for (i, p) in prompt_view.iter().enumerate() {
        let (s, w) = (&strong_answers[i], &weak_answers[i]);
        let pair_scores = scores.as_ref().map(|(ss, ws)| (ss[i], ws[i]));
        let verdict = if s.trim().is_empty() || w.trim().is_empty() {
            Some(Drop::Empty)
        } else if s == w {
            Some(Drop::Identical)
        } else {
            match pair_scores {
                Some((Some(a), Some(b))) if a > b => None,
                Some((Some(_), Some(_))) => Some(Drop::NotBetter),
                Some(_) => Some(Drop::Unscored),
                None => None,
            }
        };
        if let Some(why) = verdict {
            *dropped_by_reason.entry(why).or_insert(0) += 1;
            continue;
        }
        let mut line = json!({
            "input": {"messages": p.messages},
            "preferred_output": [{"role": "assistant", "content": s}],
            "non_preferred_output": [{"role": "assistant", "content": w}],
        });
        // The answers were generated with the tools in the prompt; training must see them too.
        if let Some(tools) = &p.tools {
            line["tools"] = tools.clone();
        }
        if let Some((a, b)) = pair_scores {
            line["scores"] = json!({"preferred": a, "non_preferred": b});
        }
        lines.push_str(&line.to_string());
        lines.push('\n');
        pairs += 1;
    }
    let dropped: usize = dropped_by_reason.values().sum();
    if pairs == 0 {
        tracing::warn!("no pair kept out of {} prompts: {} is empty", prompt_view.len(), path.display());
    }

    let side_json = |r: &ModelRef, p: &RolloutParams| json!({"model": r.model, "adapter": r.adapter, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p});
    let provenance = json!({
        "command": "pairs",
        "version": env!("CARGO_PKG_VERSION"),
        "created": lora_datasets::strftime("%Y-%m-%dT%H:%M:%SZ", lora_datasets::unix_now()),
        "dataset": opts.dataset,
        "output": path,
        "strong": side_json(strong_ref, &strong_params),
        "weak": side_json(weak_ref, &weak_params),
        "max_new_tokens": opts.max_new_tokens,
        "seed": opts.seed,
        "evaluators": opts.evaluators.evaluators,
        "reward_weights": opts.evaluators.reward_weights,
        "evaluator_failures": evaluators.as_ref().map(|e| e.failures()),
        "prompts": prompt_view.len(),
        "pairs": pairs,
        "dropped": dropped,
        "dropped_by_reason": dropped_by_reason,
    });
    // The pairs first: a provenance file never describes pairs that are not there.
    lora_models::write_new(&path, lines.as_bytes())?;
    let provenance_path = output_file::with_suffix(&path, PROVENANCE);
    lora_models::write_new(&provenance_path, serde_json::to_string_pretty(&provenance)?.as_bytes())?;
    Ok(Outcome { output: path, provenance: provenance_path, prompts: prompt_view.len(), pairs, dropped, dropped_by_reason })
}
