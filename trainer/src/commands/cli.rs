//! The command line: every subcommand and the function that runs it. In the library (not
//! `main.rs`) so tests can walk the whole interface (`tests/all/cli_flags.rs`).
use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Subcommand};

use crate::commands;

#[derive(clap::Parser)]
#[command(name = "lora-train", version, about = "LoRA fine-tuning for Llama and Qwen models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Supervised fine-tuning of a LoRA adapter on a chat dataset.
    Sft(Box<commands::sft::Command>),
    /// Direct Preference Optimization of a LoRA adapter on preference pairs.
    Dpo(Box<commands::dpo::Args>),
    /// Odds Ratio Preference Optimization (SFT + preference in one loss, no reference).
    Orpo(Box<commands::orpo::Args>),
    /// Reinforcement fine-tuning (GRPO) of a LoRA adapter from evaluator rewards on a prompts file.
    Grpo(Box<commands::grpo::Args>),
    /// Train several candidate configurations over one base and pick the best by eval loss.
    Sweep(Box<commands::sweep::Args>),
    /// One group of a sweep's candidates (started by `sweep`, not by hand).
    #[command(hide = true)]
    SweepWorker(commands::sweep::WorkerArgs),
    /// Preference pairs from prompts alone: a strong sampler's answer preferred over a weak one's.
    Pairs(Box<commands::pairs::Args>),
    /// Fine-tuned vs base (or another adapter) head to head: wins, losses, ties, win rate.
    Compare(Box<commands::compare::Args>),
    /// Workflows from a dataset to a promoted adapter: inspect, plan, approval, sweep,
    /// promotion, final run, evaluation, final_report.md.
    Run(commands::run::Args),
    /// Mean loss / perplexity of a model (optionally with an adapter) on a dataset.
    Eval(commands::eval::Args),
    /// Generate text from a prompt or a chat message.
    Generate(commands::generate::Args),
    /// Serve the base model and adapters over an OpenAI-compatible HTTP API (continuous batching).
    Serve(Box<commands::serve::Args>),
    /// Fold an adapter into the base weights and write a Hugging Face model directory.
    Merge(commands::merge::Args),
    /// Write an adapter (llama.cpp LoRA) or a model (merged with its adapter) as a GGUF file.
    Export(commands::export::Args),
    /// Validate a dataset and print its statistics.
    Inspect(commands::inspect::Args),
    /// List the GPUs this build can use (name, compute capability, memory).
    Devices(commands::devices::Args),
    /// The memory a training run needs (base, LoRA + optimizer, activations, workspace),
    /// with and without checkpointing and a quantized base, and the largest batch that fits.
    PlanMemory(commands::plan_memory::Args),
    /// A local web page: jobs, live training curves, sweeps, workflows and compare results.
    Dashboard(commands::dashboard::Args),
    /// Training jobs: list, show, logs, wait, cancel, retry (local and Slurm).
    Jobs(commands::jobs::Args),
    /// Check every CUDA kernel against the CPU implementation, then time the fused LoRA linear.
    Selftest(commands::selftest::Args),
}

/// The whole interface as clap sees it when parsing: a flag given twice takes its last
/// value (how `--config FILE` keys yield to the user's flags).
pub fn command() -> clap::Command {
    Cli::command().mut_subcommands(|sub| sub.args_override_self(true))
}

/// The command line, with the command's own keys of `--config FILE` as flags before the
/// user's (config_file.rs); a flag given twice takes its last value, so the user's wins.
pub fn parse_command_line() -> Cli {
    let command = command();
    let argv = match crate::config_file::expand_argv(&command, std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(2);
        }
    };
    let matches = command.get_matches_from(argv);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Runs the chosen subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Sft(args) => commands::sft::run(*args),
        Command::Dpo(args) => commands::dpo::run(*args),
        Command::Orpo(args) => commands::orpo::run(*args),
        Command::Grpo(args) => commands::grpo::run(*args),
        Command::Sweep(args) => commands::sweep::run(*args),
        Command::SweepWorker(args) => commands::sweep::run_worker(args),
        Command::Pairs(args) => commands::pairs::run(*args),
        Command::Compare(args) => commands::compare::run(*args),
        Command::Run(args) => commands::run::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Serve(args) => commands::serve::run(*args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Devices(args) => commands::devices::run(args),
        Command::PlanMemory(args) => commands::plan_memory::run(args),
        Command::Selftest(args) => commands::selftest::run(args),
        Command::Jobs(args) => commands::jobs::run(args),
        Command::Dashboard(args) => commands::dashboard::run(args),
    }
}
