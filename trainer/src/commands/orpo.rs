//! `lora-train orpo`: Odds Ratio Preference Optimization of a LoRA adapter (no reference
//! model; see `recipes/preference.rs` and `recipes/orpo.rs`).
use anyhow::Result;

use super::dpo::PairArgs;
use crate::recipes::orpo::Orpo;
use crate::recipes::preference;

// No argument group of its own: the flattened `sft::Args` already takes the name `Args`.
#[derive(clap::Args, Debug)]
#[group(skip)]
pub struct Args {
    #[command(flatten)]
    pub train: super::sft::Args,
    #[command(flatten)]
    pub pairs: PairArgs,
}

pub fn run(args: Args) -> Result<()> {
    crate::jobs::run_training(args.train.launch("orpo"), |control| {
        let objective = Orpo::new(args.pairs.beta)?;
        let summary = preference::run(&args.train.resolve()?, &args.pairs.options(false)?, objective, &args.train.run_options(control))?;
        args.train.finish(&summary)
    })
}
