//! `lora-train grpo`: reinforcement fine-tuning of a LoRA adapter from evaluator rewards
//! (see `recipes/grpo/mod.rs`).
use std::path::PathBuf;

use anyhow::Result;

use crate::config::TrainOptions;
use crate::engine::RunOptions;
use crate::evaluators::EvaluatorArgs;
use crate::recipes::grpo::agent::AgentOptions;
use crate::recipes::grpo::{self, GrpoOptions};

#[derive(clap::Args, Debug)]
#[command(after_help = "--dataset is a prompts file: one {\"messages\": [system/user ...], \"ground_truth\"?: ..., ...} \
per line; the other fields go to the evaluators. --batch-size is completions per micro-batch (memory only). \
Every option can also be set in a TOML --config (keys are the flag names with underscores: \
num_generations = 8, evaluator = [\"numeric\"]); flags override it.")]
pub struct Args {
    #[command(flatten)]
    pub options: TrainOptions,
    #[command(flatten)]
    pub grpo: GrpoOptions,
    #[command(flatten)]
    pub agent: AgentOptions,
    #[command(flatten)]
    pub evaluators: EvaluatorArgs,
    /// TOML file with any of this command's options (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run in --output from its latest complete checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Print one JSON object with the run summary on stdout (no progress bar).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub job: crate::jobs::JobArgs,
    /// With --backend slurm: print the sbatch script, submit nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: Args) -> Result<()> {
    let launch = crate::jobs::Launch { command: "grpo", job: &args.job, output: super::sft::run_dir(&args.options, args.config.as_deref()), json: args.json, dry_run: args.dry_run };
    crate::jobs::run_training(launch, || train(&args))
}

fn train(args: &Args) -> Result<()> {
    let cfg = args.options.clone().with_config_file(args.config.as_deref())?.resolve()?;
    let summary = grpo::run(&cfg, &args.grpo, &args.agent, &args.evaluators, &RunOptions { resume: args.resume, quiet: args.json })?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}
