//! Phase `final run`: the winner's configuration retrained on all the training data
//! (not the tuning subsample) into `DIR/final/`, continuing from its latest checkpoint
//! after a kill. Skipped, and the winning candidate promoted as it is, with
//! `--skip-final` or when the candidates already trained on all the data.
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::engine::{RunOptions, RUN_FILE};
use crate::run_control::Control;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinalRun {
    /// The promoted adapter's directory.
    pub adapter: PathBuf,
    pub retrained: bool,
    /// Why there was no retraining.
    pub skipped_because: Option<String>,
    pub config: TrainConfig,
    pub elapsed_s: Option<f64>,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
}

/// `winner` is the promoted candidate's configuration and run directory; `full` the
/// user's own `--max-train-samples` (None = all).
pub fn run(dir: &Path, winner_cfg: &TrainConfig, winner_dir: &Path, full: Option<usize>, skip: Option<String>, control: &Control) -> Result<FinalRun> {
    if let Some(why) = skip {
        return Ok(FinalRun { adapter: winner_dir.to_path_buf(), retrained: false, skipped_because: Some(why), config: winner_cfg.clone(), elapsed_s: None, train_loss: None, eval_loss: None });
    }
    let cfg = TrainConfig { output: dir.join("final"), max_train_samples: full, ..winner_cfg.clone() };
    let resume = cfg.output.join(RUN_FILE).exists();
    if resume {
        eprintln!("final run: continuing {}", cfg.output.display());
    }
    let summary = crate::recipes::sft::run(&cfg, &RunOptions { resume, quiet: false, control: control.clone() })?;
    Ok(FinalRun {
        adapter: summary.adapter.clone(),
        retrained: true,
        skipped_because: None,
        config: cfg,
        elapsed_s: Some(summary.elapsed_s),
        train_loss: summary.train_loss,
        eval_loss: summary.eval_loss,
    })
}
