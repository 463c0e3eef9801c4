//! `lora-train pairs`: preference pairs from prompts alone (delta learning), the flags of
//! [`crate::pairs::generate_pairs`].
use std::path::PathBuf;

use anyhow::Result;

use crate::evaluators::EvaluatorArgs;
use crate::pairs::{self, PairsOptions, Sampler};
use crate::placement::PlacementArgs;
use crate::sides::ModelRef;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Prompts JSONL (system/user messages; other fields go to the evaluators).
    #[arg(long)]
    pub dataset: PathBuf,
    /// The preferred side: MODEL or MODEL+ADAPTER.
    #[arg(long, value_name = "MODEL[+ADAPTER]")]
    pub strong: String,
    /// The non-preferred side: MODEL or MODEL+ADAPTER (the same base as --strong is loaded once).
    #[arg(long, value_name = "MODEL[+ADAPTER]")]
    pub weak: String,
    /// A new file, or a directory (the file gets a time-stamped name inside it). An
    /// existing file is never overwritten.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// 0 = greedy.
    #[arg(long, default_value_t = pairs::STRONG_TEMPERATURE, help_heading = "Sampling")]
    pub strong_temperature: f64,
    #[arg(long, default_value_t = pairs::WEAK_TEMPERATURE, help_heading = "Sampling")]
    pub weak_temperature: f64,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0, help_heading = "Sampling")]
    pub strong_top_k: usize,
    #[arg(long, default_value_t = 0, help_heading = "Sampling")]
    pub weak_top_k: usize,
    /// Nucleus sampling mass (1.0 = off).
    #[arg(long, default_value_t = 1.0, help_heading = "Sampling")]
    pub strong_top_p: f64,
    #[arg(long, default_value_t = 1.0, help_heading = "Sampling")]
    pub weak_top_p: f64,
    #[arg(long, default_value_t = pairs::MAX_NEW_TOKENS, help_heading = "Sampling")]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0, help_heading = "Sampling")]
    pub seed: u64,
    /// Prompts per generation batch (does not change the answers).
    #[arg(long, default_value_t = pairs::BATCH_SIZE)]
    pub batch_size: usize,
    /// With --evaluator: keep a pair only when the strong answer scores strictly higher.
    #[command(flatten)]
    pub evaluators: EvaluatorArgs,
    /// Print {"output", "provenance", "prompts", "pairs", "dropped", "dropped_by_reason"} as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let json = args.json;
    let out = pairs::generate_pairs(&args.options()?)?;
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("output    {}\npairs     {}\ndropped   {}", out.output.display(), out.pairs, out.dropped);
        for (why, n) in &out.dropped_by_reason {
            println!("  {:<12} {n}", serde_json::to_value(why)?.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

impl Args {
    /// The flags as the library's options.
    pub fn options(self) -> Result<PairsOptions> {
        let side = |model: &str, temperature, top_k, top_p| -> Result<Sampler> { Ok(Sampler { model: ModelRef::parse(model)?, temperature, top_k, top_p }) };
        Ok(PairsOptions {
            strong: side(&self.strong, self.strong_temperature, self.strong_top_k, self.strong_top_p)?,
            weak: side(&self.weak, self.weak_temperature, self.weak_top_k, self.weak_top_p)?,
            dataset: self.dataset,
            output: self.output,
            placement: self.placement,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            batch_size: self.batch_size,
            evaluators: self.evaluators,
        })
    }
}
