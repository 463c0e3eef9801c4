//! `lora-train sft`: supervised fine-tuning of a LoRA adapter (see `recipes/sft.rs`).
use std::path::PathBuf;

use anyhow::Result;

use crate::config::{TrainConfig, TrainOptions};
use crate::engine::{RunOptions, RunSummary};
use crate::run_control::Control;
use crate::recipes::sft;

#[derive(clap::Args, Debug)]
#[command(after_help = "Every option can also be set in a TOML file given with --config (keys are the flag \
names with underscores, e.g. learning_rate = 2e-4); flags on the command line win. The resolved \
configuration is written to OUTPUT/run.json.")]
pub struct Args {
    #[command(flatten)]
    pub options: TrainOptions,
    /// TOML file with any of the options below (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run in --output from its latest complete checkpoint (give the same
    /// options as the original run).
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

impl Args {
    /// The resolved configuration: flags over `--config` over defaults.
    pub fn resolve(&self) -> Result<TrainConfig> {
        self.options.clone().with_config_file(self.config.as_deref())?.resolve()
    }

    pub fn run_options(&self, control: &Control) -> RunOptions {
        RunOptions { resume: self.resume, quiet: self.json, control: control.clone() }
    }

    /// How `jobs::run_training` registers, detaches or submits this command.
    pub fn launch(&self, command: &'static str) -> crate::jobs::Launch<'_> {
        crate::jobs::Launch {
            command,
            job: &self.job,
            output: run_dir(&self.options, self.config.as_deref()),
            resume_marker: Some(crate::engine::RUN_FILE),
            json: self.json,
            dry_run: self.dry_run,
        }
    }

    /// Print the summary on stdout under `--json`.
    pub fn finish(&self, summary: &RunSummary) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(summary)?);
        }
        Ok(())
    }
}

/// `lora-train sft`: the shared training flags plus agent trajectories as data.
// No argument group of its own: the flattened `Args` already takes the name.
#[derive(clap::Args, Debug)]
#[group(skip)]
pub struct Command {
    #[command(flatten)]
    pub train: Args,
    #[command(flatten)]
    pub data: TrajectoryArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TrajectoryArgs {
    /// Agent rollouts to learn from, as SFT conversations (repeatable; mixable with
    /// --dataset): OpenAI-style message lists with tool_calls and tool results, or
    /// `rollouts.jsonl` of `lora-train grpo`. Assistant turns are learned, their tool calls
    /// included; tool output never is.
    #[arg(long = "trajectory-dataset", value_name = "FILE", value_hint = clap::ValueHint::FilePath, help_heading = "Trajectories")]
    pub trajectory_datasets: Vec<PathBuf>,
    /// Keep only trajectories whose `reward` is at least this (those without one are skipped).
    #[arg(long, value_name = "R", help_heading = "Trajectories")]
    pub trajectory_min_reward: Option<f64>,
    /// A text file whose content becomes the system message of every sample that has none.
    #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath, help_heading = "Trajectories")]
    pub system_prompt: Option<PathBuf>,
}

impl Command {
    /// The resolved configuration; with trajectories or a system prompt, `--dataset` becomes
    /// the training file built from them in OUTPUT/data (`crate::sft_data`).
    pub fn resolve(&self) -> Result<TrainConfig> {
        let mut options = self.train.options.clone().with_config_file(self.train.config.as_deref())?;
        let d = &self.data;
        if !d.trajectory_datasets.is_empty() || d.system_prompt.is_some() {
            anyhow::ensure!(d.trajectory_min_reward.is_none_or(f64::is_finite), "--trajectory-min-reward must be a number");
            let Some(output) = options.output.clone() else { anyhow::bail!("missing --output") };
            let inputs = crate::sft_data::SftDataInputs {
                dataset: options.dataset.as_deref(),
                trajectories: &d.trajectory_datasets,
                system_prompt: d.system_prompt.as_deref(),
                filter: lora_datasets::TrajectoryFilter { min_reward: d.trajectory_min_reward },
            };
            options.dataset = Some(crate::sft_data::prepare(&inputs, &output, self.train.resume)?);
        } else if d.trajectory_min_reward.is_some() {
            anyhow::bail!("--trajectory-min-reward needs --trajectory-dataset");
        }
        options.resolve()
    }
}

pub fn run(command: Command) -> Result<()> {
    let args = &command.train;
    crate::jobs::run_training(args.launch("sft"), |control| {
        let summary = sft::run(&command.resolve()?, &args.run_options(control))?;
        args.finish(&summary)
    })
}

/// The run directory `--output` (or the config file) names, absolute: the job store is
/// read from other directories.
pub fn run_dir(options: &TrainOptions, config: Option<&std::path::Path>) -> Option<PathBuf> {
    let out = options.clone().with_config_file(config).ok()?.output?;
    Some(if out.is_absolute() { out } else { std::env::current_dir().ok()?.join(out) })
}
