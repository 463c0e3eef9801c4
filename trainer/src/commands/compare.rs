//! `lora-train compare`: the fine-tuned model (`--model` + `--adapter`) against its base,
//! or against `--baseline-adapter`, head to head on a prompts file. Judging is by
//! evaluator scores (`--evaluator`) or by a judge model with a pairwise rubric
//! (`--judge-model`), each pair in both orders. Writes `compare.json` and `compare.md`
//! into `--output`.
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::model_args::ModelArgs;
use crate::compare::{self, CompareOptions};
use crate::evaluators::EvaluatorArgs;
use crate::sides;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The fine-tuned side is --model with --adapter (required here).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts JSONL (a test set; `ground_truth` and other fields go to evaluators, and a
    /// `ground_truth` is shown to the judge as the reference answer).
    #[arg(long)]
    pub dataset: PathBuf,
    /// The reference side (the baseline) is --model with this adapter (default: --model
    /// alone), as `eval --ref-adapter`. `--baseline-adapter` is its old name.
    #[arg(long, alias = "baseline-adapter", value_name = "DIR")]
    pub ref_adapter: Option<PathBuf>,
    /// Directory for compare.json, compare.md (and rubric.md when one is written). A
    /// directory that holds an earlier comparison is refused unless --overwrite.
    #[arg(long, short = 'o')]
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
    #[arg(long, default_value_t = compare::JUDGE_MAX_NEW_TOKENS, help_heading = "Judge model")]
    pub judge_max_new_tokens: usize,
    /// Prompts per generation batch (does not change the answers).
    #[arg(long, default_value_t = compare::BATCH_SIZE)]
    pub batch_size: usize,
    /// Rows of the examples table in compare.md.
    #[arg(long, default_value_t = compare::EXAMPLES)]
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
    let json = args.json;
    let summary = compare::compare(&args.options()?)?;
    if json {
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

impl Args {
    /// The flags as the library's options (`--adapter` is required here: it is the
    /// fine-tuned side).
    pub fn options(self) -> Result<CompareOptions> {
        let Some(adapter) = self.model.adapter else { bail!("compare needs --adapter (the fine-tuned side)") };
        Ok(CompareOptions {
            model: self.model.model,
            adapter,
            baseline_adapter: self.ref_adapter,
            placement: self.model.placement,
            dataset: self.dataset,
            output: self.output,
            overwrite: self.overwrite,
            evaluators: self.evaluators,
            judge_model: self.judge_model,
            rubric: self.rubric,
            judge_max_new_tokens: self.judge_max_new_tokens,
            batch_size: self.batch_size,
            examples: self.examples,
            generation: self.generation,
        })
    }
}
