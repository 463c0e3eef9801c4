//! `lora-train sft`: supervised fine-tuning of a LoRA adapter (see `recipes/sft.rs`).
use std::path::PathBuf;

use anyhow::Result;

use crate::config::{TrainConfig, TrainOptions};
use crate::engine::{RunOptions, RunSummary};
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

    pub fn run_options(&self) -> RunOptions {
        RunOptions { resume: self.resume, quiet: self.json }
    }

    /// How `jobs::run_training` registers, detaches or submits this command.
    pub fn launch(&self, command: &'static str) -> crate::jobs::Launch<'_> {
        crate::jobs::Launch { command, job: &self.job, output: run_dir(&self.options, self.config.as_deref()), json: self.json, dry_run: self.dry_run }
    }

    /// Print the summary on stdout under `--json`.
    pub fn finish(&self, summary: &RunSummary) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(summary)?);
        }
        Ok(())
    }
}

pub fn run(args: Args) -> Result<()> {
    crate::jobs::run_training(args.launch("sft"), || {
        let summary = sft::run(&args.resolve()?, &args.run_options())?;
        args.finish(&summary)
    })
}

/// The run directory `--output` (or the config file) names, absolute: the job store is
/// read from other directories.
pub fn run_dir(options: &TrainOptions, config: Option<&std::path::Path>) -> Option<PathBuf> {
    let out = options.clone().with_config_file(config).ok()?.output?;
    Some(if out.is_absolute() { out } else { std::env::current_dir().ok()?.join(out) })
}
