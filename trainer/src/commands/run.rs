//! `lora-train run sft|classify|dpo|rft`: workflows from a dataset to a promoted adapter and
//! `final_report.md` (see `workflow/`).
use anyhow::Result;

use crate::workflow;

#[derive(clap::Args, Debug)]
#[command(after_help = "Phases: inspect, plan (DIR/plan.md, with cost), approval, sweep, promotion, final run, \
evaluation, report (DIR/final_report.md and .json). State in DIR/workflow.json; --resume continues a killed \
workflow. Without a terminal and without --yes the workflow stops at a gate with exit status 3.")]
pub struct Args {
    #[command(subcommand)]
    pub workflow: Workflow,
}

#[derive(clap::Subcommand, Debug)]
pub enum Workflow {
    /// Supervised fine-tuning: sweep candidates, promote the best, retrain it on all the data.
    Sft(Box<workflow::sft::SftArgs>),
    /// Classification: labels and their balance, a base-model benchmark, then the sft
    /// phases, scored per label (accuracy, precision, recall, F1, confusion matrix).
    Classify(Box<workflow::classify::ClassifyArgs>),
    /// Preference pairs: a beta sweep of DPO candidates, each compared against the base
    /// (win rate), early stop at --target-win-rate, the best promoted; no final retrain.
    Dpo(Box<workflow::dpo::DpoArgs>),
    /// Reinforcement fine-tuning: prompts + evaluators, a base reward benchmark, a short
    /// GRPO sweep, the final GRPO run, reward before and after.
    Rft(Box<workflow::rft::RftArgs>),
}

pub fn run(args: Args) -> Result<()> {
    // A workflow is one job of the job store (`jobs list`, `--detach`, `--backend slurm`:
    // the whole workflow runs as one batch job; its sweep's workers are its children).
    let (command, common) = match &args.workflow {
        Workflow::Sft(a) => ("run sft", &a.common),
        Workflow::Classify(a) => ("run classify", &a.common),
        Workflow::Dpo(a) => ("run dpo", &a.common),
        Workflow::Rft(a) => ("run rft", &a.common),
    };
    let launch = crate::jobs::Launch {
        command,
        job: &common.job,
        output: common.options.output.clone(),
        resume_marker: Some(workflow::STATE_FILE),
        json: common.json,
        dry_run: false,
    };
    crate::jobs::run_training(launch, |control| match &args.workflow {
        Workflow::Sft(a) => workflow::sft::run((**a).clone(), control),
        Workflow::Classify(a) => workflow::classify::run((**a).clone(), control),
        Workflow::Dpo(a) => workflow::dpo::run((**a).clone(), control),
        Workflow::Rft(a) => workflow::rft::run((**a).clone(), control),
    })
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::Args,
    }

    #[test]
    fn every_workflow_parses() {
        Cli::command().debug_assert();
        for w in ["sft", "classify", "dpo", "rft"] {
            let cli = Cli::try_parse_from(["run", w, "--model", "m", "--dataset", "d", "-o", "o", "--yes"]);
            assert!(cli.is_ok(), "{w}: {:?}", cli.err());
        }
        assert!(Cli::try_parse_from(["run", "classify", "--split", "0.3", "--eval-split", "0.2"]).is_err());
    }
}
