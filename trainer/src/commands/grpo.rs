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
    /// Sample N prompts x --num-generations completions from the starting policy, score
    /// them with the evaluators, print the reward distribution, the groups with zero
    /// reward variance, completions per reward bucket and evaluator failures; then exit
    /// without training or writing anything (--output may be left out).
    #[arg(long, value_name = "N")]
    pub preview: Option<usize>,
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
    if let Some(n) = args.preview {
        return preview(&args, n);
    }
    let launch = crate::jobs::Launch {
        command: "grpo",
        job: &args.job,
        output: super::sft::run_dir(&args.options, args.config.as_deref()),
        resume_marker: Some(crate::engine::RUN_FILE),
        json: args.json,
        dry_run: args.dry_run,
    };
    crate::jobs::run_training(launch, |control| train(&args, control))
}

fn preview(args: &Args, n: usize) -> Result<()> {
    let mut options = args.options.clone().with_config_file(args.config.as_deref())?;
    // Nothing is written: the run directory is not needed.
    options.output.get_or_insert_with(|| PathBuf::from("."));
    let cfg = options.resolve()?;
    let preview = grpo::preview::preview(&cfg, &args.grpo, &args.evaluators, n)?;
    if args.json {
        println!("{}", serde_json::to_string(&preview)?);
    } else {
        print!("{}", grpo::preview::render(&preview));
    }
    Ok(())
}

fn train(args: &Args, control: &crate::run_control::Control) -> Result<()> {
    let cfg = args.options.clone().with_config_file(args.config.as_deref())?.resolve()?;
    let summary = grpo::run(&cfg, &args.grpo, &args.agent, &args.evaluators, &RunOptions { resume: args.resume, quiet: args.json, control: control.clone() })?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}
