//! `lora-train compare`: the fine-tuned model (`--model` + `--adapter`) against its base,
//! or against `--baseline-adapter`, head to head on a prompts file. Judging is by
//! evaluator scores (`--evaluator`) or by a judge model with a pairwise rubric
//! (`--judge-model`), each pair in both orders. Writes `compare.json` and `compare.md`
//! into `--output`.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lora_models::RolloutParams;

use super::model_args::ModelArgs;
use crate::compare::{judge, report, Example, JudgeRecord, Judged, Outcome, SideScores, Summary};
use crate::evaluators::EvaluatorArgs;
use crate::recipes::grpo::prompts::{self, Prompt};
use crate::recipes::grpo::fill_context;
use crate::sides::{self, ModelRef, Models, Side};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The fine-tuned side is --model with --adapter (required here).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts JSONL (a test set; `ground_truth` and other fields go to evaluators, and a
    /// `ground_truth` is shown to the judge as the reference answer).
    #[arg(long)]
    pub dataset: PathBuf,
    /// The baseline is --model with this adapter (default: --model alone).
    #[arg(long, value_name = "DIR")]
    pub baseline_adapter: Option<PathBuf>,
    /// Directory for compare.json, compare.md (and rubric.md when one is written). A
    /// directory that holds an earlier comparison is refused unless --overwrite.
    #[arg(long)]
    pub output: PathBuf,
    /// Replace the comparison already in --output.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub evaluators: EvaluatorArgs,
    /// Judge each pair with this model instead of evaluators: MODEL or MODEL+ADAPTER.
    #[arg(long, value_name = "MODEL[+ADAPTER]", help_heading = "Judge model")]
    pub judge_model: Option<String>,
    /// The judge's instructions (the system message). Without one, a rubric grounded in
    /// a few prompts of --dataset is written to OUTPUT/rubric.md and used.
    #[arg(long, value_name = "FILE", help_heading = "Judge model")]
    pub rubric: Option<PathBuf>,
    /// Tokens the judge may write before its verdict is read (greedy).
    #[arg(long, default_value_t = 16, help_heading = "Judge model")]
    pub judge_max_new_tokens: usize,
    /// Prompts per generation batch (does not change the answers).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Rows of the examples table in compare.md.
    #[arg(long, default_value_t = 20)]
    pub examples: usize,
    /// Print the summary {"n", "wins", "losses", "ties", "win_rate", "ci95", ...} as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    // Last: `next_help_heading` also heads every field after it.
    /// Greedy by default: a comparison should not hinge on sampling luck. With sampling,
    /// both sides draw the same random numbers for a prompt.
    #[command(flatten, next_help_heading = "Generation")]
    pub generation: sides::GenerationArgs,
}

pub fn run(args: Args) -> Result<()> {
    let summary = compare(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "prompts   {}\nwins      {}\nlosses    {}\nties      {}\nwin_rate  {:.3} (95% CI {:.3} to {:.3})\nreport    {}",
            summary.n,
            summary.wins,
            summary.losses,
            summary.ties,
            summary.win_rate,
            summary.ci95[0],
            summary.ci95[1],
            summary.output.join("compare.md").display()
        );
    }
    Ok(())
}

pub fn compare(args: &Args) -> Result<Summary> {
    let Some(adapter) = &args.model.adapter else { bail!("compare needs --adapter (the fine-tuned side)") };
    match (args.evaluators.evaluators.is_empty(), &args.judge_model) {
        (true, None) => bail!("compare needs a judge: --evaluator SPEC or --judge-model MODEL"),
        (false, Some(_)) => bail!("give --evaluator or --judge-model, not both"),
        _ => {}
    }
    if args.rubric.is_some() && args.judge_model.is_none() {
        bail!("--rubric is the judge model's instructions: it needs --judge-model");
    }
    // Checked before any answer is generated: a comparison can take an hour.
    let earlier = args.output.join("compare.json");
    if earlier.exists() && !args.overwrite {
        bail!("{}: holds an earlier comparison; give a new --output or --overwrite", earlier.display());
    }
    let params = args.generation.params(1)?;
    if args.judge_max_new_tokens == 0 {
        bail!("--judge-max-new-tokens must be at least 1");
    }
    let rubric = args.rubric.as_ref().map(|p| std::fs::read_to_string(p).with_context(|| format!("--rubric {}", p.display()))).transpose()?;
    if rubric.as_deref().is_some_and(|r| r.trim().is_empty()) {
        bail!("--rubric {}: the file is empty", args.rubric.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
    }
    let ds = prompts::load_prompt_dataset(&args.dataset)?;
    let judge_ref = args.judge_model.as_deref().map(ModelRef::parse).transpose()?;

    let finetuned_ref = ModelRef { model: args.model.model.clone(), adapter: Some(adapter.clone()) };
    let baseline_ref = ModelRef { model: args.model.model.clone(), adapter: args.baseline_adapter.clone() };
    let mut models = Models::default();
    let finetuned = models.add("finetuned", &finetuned_ref, &args.model.placement)?;
    let baseline = models.add("baseline", &baseline_ref, &args.model.placement)?;
    let judge_side = judge_ref.as_ref().map(|r| models.add("judge", r, &args.model.placement)).transpose()?;
    let prompts = prompts::tokenize_prompts(&models.get(&finetuned).tokenizer, &ds)?;

    // The same stream for both sides: with sampling, a prompt's two answers differ by the
    // adapters, not by the random numbers.
    let mut answers = Vec::new();
    for side in [&finetuned, &baseline] {
        let bar = sides::progress_bar(prompts.len(), &side.label);
        let _route = models.route(side)?;
        let texts = sides::complete_one(models.get(side), &prompts, &params, args.generation.seed, 0, args.batch_size, &bar)?;
        bar.finish_and_clear();
        answers.push(texts);
    }
    let (ft, base) = (&answers[0], &answers[1]);

    std::fs::create_dir_all(&args.output).with_context(|| format!("{}: cannot create directory", args.output.display()))?;
    let (outcomes, scores, judged, judged_by) = match (&judge_side, &judge_ref) {
        (Some(side), Some(r)) => {
            let rubric = match rubric {
                Some(r) => r,
                None => {
                    let has_references = prompts.iter().any(|p| p.ground_truth.is_some());
                    let written = judge::default_rubric(&prompts, has_references);
                    let path = args.output.join("rubric.md");
                    lora_models::write_atomic(&path, written.as_bytes())?;
                    tracing::info!("no --rubric: wrote the rubric used to {}", path.display());
                    written
                }
            };
            let records = judge_pairs(&models, side, &rubric, &prompts, ft, base, args)?;
            let outcomes = records.iter().map(|r| judge::combine(r.finetuned_first.verdict, r.baseline_first.verdict)).collect();
            (outcomes, None, Some(records), format!("judge: {}", r.display()))
        }
        _ => {
            let mut ctx = args.evaluators.context()?;
            fill_context(&mut ctx, &models.get(&finetuned).tokenizer, prompts.iter());
            let set = args.evaluators.build(&ctx)?;
            let mut samples: Vec<_> = prompts.iter().zip(ft).enumerate().map(|(i, (p, a))| p.sample(format!("{}-finetuned", i + 1), a.clone())).collect();
            samples.extend(prompts.iter().zip(base).enumerate().map(|(i, (p, a))| p.sample(format!("{}-baseline", i + 1), a.clone())));
            let mut rewards = set.score_batch(&samples).rewards;
            let base_rewards = rewards.split_off(prompts.len());
            let scores: Vec<SideScores> = rewards.into_iter().zip(base_rewards).map(|(f, b)| SideScores { finetuned: f, baseline: b }).collect();
            let outcomes = scores.iter().map(SideScores::outcome).collect();
            (outcomes, Some(scores), None, format!("evaluator: {}", args.evaluators.evaluators.join(", ")))
        }
    };
    let outcomes: Vec<Outcome> = outcomes;
    let examples: Vec<Example> = (0..prompts.len())
        .map(|i| Example {
            line: i + 1,
            prompt: judge::last_user(&prompts[i].messages),
            finetuned: ft[i].clone(),
            baseline: base[i].clone(),
            outcome: outcomes[i],
            scores: scores.as_ref().map(|s| s[i].clone()),
            judge: judged.as_ref().map(|j| j[i].clone()),
        })
        .collect();
    let summary = Summary::tally(args.output.clone(), finetuned_ref.display(), baseline_ref.display(), judged_by, &examples);
    let settings = serde_json::json!({
        "dataset": args.dataset,
        "generation": args.generation,
        "judge_max_new_tokens": args.judge_max_new_tokens,
        "rubric": args.rubric,
        "evaluators": args.evaluators.evaluators, "reward_weights": args.evaluators.reward_weights,
    });
    let json = serde_json::json!({"summary": summary, "settings": settings, "version": env!("CARGO_PKG_VERSION"), "examples": examples});
    lora_models::write_atomic(&args.output.join("compare.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    lora_models::write_atomic(&args.output.join("compare.md"), report::markdown(&summary, &examples, args.examples).as_bytes())?;
    Ok(summary)
}

/// Asks the judge about every pair twice (fine-tuned answer first, then second), greedy.
fn judge_pairs(models: &Models, side: &Side, rubric: &str, prompts: &[Prompt], ft: &[String], base: &[String], args: &Args) -> Result<Vec<JudgeRecord>> {
    let loaded = models.get(side);
    let template = crate::chat::template_for(&loaded.tokenizer)?;
    let mut conversations = Vec::with_capacity(prompts.len() * 2);
    let mut warned = false;
    for (i, p) in prompts.iter().enumerate() {
        for (a, b) in [(&ft[i], &base[i]), (&base[i], &ft[i])] {
            let messages = judge::judge_messages(rubric, p, a, b);
            let ids = lora_datasets::tokenize_prompt(&loaded.tokenizer.tokenizer, &template, &messages, None)
                .map_err(|e| anyhow::anyhow!("{}:{}: rendering the judge's prompt: {e}", args.dataset.display(), i + 1))?;
            // Two answers and a rubric can outgrow a small judge's context; RoPE goes on
            // past it, but the verdicts are then worth little, so say so once.
            let context = loaded.model.config().max_position_embeddings;
            if ids.len() + args.judge_max_new_tokens > context && !warned {
                tracing::warn!("{}:{}: the judge's prompt ({} tokens) plus --judge-max-new-tokens exceeds the judge's context of {context}", args.dataset.display(), i + 1, ids.len());
                warned = true;
            }
            conversations.push(Prompt { ids, messages: Vec::new(), ground_truth: None, fields: Default::default(), tools: None });
        }
    }
    let greedy = RolloutParams { group: 1, max_new_tokens: args.judge_max_new_tokens, temperature: 0.0, top_k: 0, top_p: 1.0 };
    let bar = sides::progress_bar(conversations.len(), "judge");
    let _route = models.route(side)?;
    let replies = sides::complete_one(loaded, &conversations, &greedy, 0, 0, args.batch_size, &bar)?;
    bar.finish_and_clear();
    let mut replies = replies.into_iter();
    let mut next = || {
        let reply = replies.next().unwrap_or_default();
        Judged { verdict: judge::parse_verdict(&reply), reply }
    };
    Ok((0..prompts.len()).map(|_| JudgeRecord { finetuned_first: next(), baseline_first: next() }).collect())
}
