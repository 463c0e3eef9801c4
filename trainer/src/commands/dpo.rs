//! `lora-train dpo`: Direct Preference Optimization of a LoRA adapter on preference pairs
//! (see `recipes/preference.rs` and `recipes/dpo.rs`).
use std::path::PathBuf;

use anyhow::Result;

use crate::recipes::dpo::{Dpo, LossType};
use crate::recipes::preference::{self, PairOptions};

/// The pair flags of `dpo` and `orpo`.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Preference pairs")]
pub struct PairArgs {
    /// Keep only the last N tokens of a longer prompt (the question usually ends it). [default: no limit]
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Cap prompt + completion at N tokens by cutting the end of the completion (TRL's
    /// max_length). [default: --max-sequence-length]
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Start from this adapter (e.g. an SFT run's output); its rank, alpha and targets are
    /// used. For DPO a frozen copy of it is the reference model. (`--adapter`, the old
    /// name, is still accepted for one release: elsewhere it means "apply this adapter".)
    #[arg(long, alias = "adapter", value_name = "DIR")]
    pub init_adapter: Option<PathBuf>,
    /// Weight of the preference term (DPO's beta, ORPO's lambda).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
}

impl PairArgs {
    pub fn options(&self, precompute_ref_logps: bool) -> Result<PairOptions> {
        anyhow::ensure!(self.max_prompt_length != Some(0), "--max-prompt-length must be at least 1");
        anyhow::ensure!(self.max_length.is_none_or(|l| l >= 2), "--max-length must be at least 2");
        Ok(PairOptions { max_prompt_length: self.max_prompt_length, max_length: self.max_length, adapter: self.init_adapter.clone(), precompute_ref_logps })
    }
}

// No argument group of its own: the flattened `sft::Args` already takes the name `Args`.
#[derive(clap::Args, Debug)]
#[group(skip)]
pub struct Args {
    #[command(flatten)]
    pub train: super::sft::Args,
    #[command(flatten)]
    pub pairs: PairArgs,
    /// DPO loss, or several summed (TRL's loss_type list): sigmoid (the DPO paper), ipo,
    /// hinge (SLiC), robust (with --label-smoothing), sigmoid_norm (per-token log-ratios),
    /// apo_zero, apo_down, bco_pair, sft (NLL of the chosen answer). E.g. `sigmoid,sft`.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [LossType::Sigmoid], help_heading = "Preference pairs")]
    pub loss_type: Vec<LossType>,
    /// Weights of the --loss-type terms, one each (TRL's loss_weights). [default: 1 each]
    #[arg(long, value_delimiter = ',', help_heading = "Preference pairs")]
    pub loss_weights: Option<Vec<f64>>,
    /// Assumed fraction of flipped labels for --loss-type robust, in [0, 0.5).
    #[arg(long, default_value_t = 0.0, help_heading = "Preference pairs")]
    pub label_smoothing: f64,
    /// Compute the reference log-probs once before training (kept in OUTPUT/ref_logps.json
    /// and reused by --resume) instead of in every step's forward pass.
    #[arg(long, help_heading = "Preference pairs")]
    pub precompute_ref_logps: bool,
}

pub fn run(args: Args) -> Result<()> {
    crate::jobs::run_training(args.train.launch("dpo"), |control| train(&args, control))
}

fn train(args: &Args, control: &crate::run_control::Control) -> Result<()> {
    let objective = Dpo::combined(args.pairs.beta, args.loss_type.clone(), args.loss_weights.clone(), args.label_smoothing)?;
    let pairs = args.pairs.options(args.precompute_ref_logps)?;
    let summary = preference::run(&args.train.resolve()?, &pairs, objective, &args.train.run_options(control))?;
    args.train.finish(&summary)
}
