//! Phase `sweep`: the candidates trained by `lora-train sweep`'s machinery into
//! `DIR/sweep/` (each an `sft` run directory). A killed sweep resumes at its candidates:
//! finished ones are kept, the others continue from their latest checkpoint.
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::run_control::Control;
use crate::config::TrainOptions;
use crate::engine::RunStatus;
use crate::sweep::{self, CandidateRecord, SweepOptions, SWEEP_FILE};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepResult {
    pub dir: PathBuf,
    pub winner: Option<String>,
    pub criterion: String,
    pub wall_s: f64,
    pub candidates: Vec<CandidateRecord>,
}

/// Runs (or continues) the sweep of `options` (whose `output` is the sweep directory).
pub fn run(options: &TrainOptions, opts: &SweepOptions, control: &Control) -> Result<SweepResult> {
    let dir = options.output.clone().unwrap_or_default();
    let resume = dir.join(SWEEP_FILE).exists();
    if resume {
        eprintln!("sweep: continuing the sweep in {}", dir.display());
    }
    let record = sweep::run(options.clone(), &SweepOptions { resume, dry_run: false, control: control.clone(), ..opts.clone() })?;
    if !record.candidates.iter().any(|c| c.status == RunStatus::Completed) {
        bail!("no candidate completed (see {})", dir.join(SWEEP_FILE).display());
    }
    Ok(SweepResult { dir, winner: record.winner, criterion: record.criterion, wall_s: record.wall_s, candidates: record.candidates })
}
