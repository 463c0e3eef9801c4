//! Writing a run's `metrics.jsonl` (one row per step or evaluation, appended and flushed
//! as the run goes, so `jobs`, the dashboard and a sweep's progress read it live) and, with
//! `--report-to tensorboard`, the same rows as TensorBoard events. Apart from `metrics.rs`
//! (the row and its readers), which `tensorboard.rs` reads too.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::ReportTo;
use crate::metrics::{read_metrics, MetricsRow};

pub struct MetricsWriter {
    path: PathBuf,
    file: File,
    /// `--report-to tensorboard`: every row also goes to an event file.
    tensorboard: Option<crate::tensorboard::Reporter>,
}

impl MetricsWriter {
    /// Start a fresh file (a new run).
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), file, tensorboard: None })
    }

    /// Also write every row to the `report_to` targets of run `name` in `run_dir`.
    /// `config` is logged as the run's hyperparameters; `resumed_at` is the checkpoint step
    /// a resumed run continues from.
    pub fn report_to(mut self, targets: &[ReportTo], run_dir: &Path, name: &str, config: &serde_json::Value, resumed_at: Option<usize>) -> Result<Self> {
        if targets.contains(&ReportTo::Tensorboard) {
            let reporter = crate::tensorboard::Reporter::start(run_dir, name, config, resumed_at)?;
            tracing::info!("TensorBoard events: {}", reporter.path().display());
            self.tensorboard = Some(reporter);
        }
        Ok(self)
    }

    /// Continue a resumed run: keep the rows up to `step` (rows written after the checkpoint
    /// by the killed run are dropped, the resumed run writes them again), then append.
    pub fn resume(path: &Path, step: usize) -> Result<Self> {
        // No file yet is an empty history; a damaged one is an error, never a silent reset.
        let rows = if path.exists() { read_metrics(path)? } else { Vec::new() };
        let kept: Vec<MetricsRow> = rows.into_iter().filter(|r| r.step <= step).collect();
        let mut bytes = Vec::new();
        for r in &kept {
            serde_json::to_writer(&mut bytes, r)?;
            bytes.push(b'\n');
        }
        crate::checkpoint::write_atomic(path, &bytes)?;
        let file = OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), file, tensorboard: None })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, row: &MetricsRow) -> Result<()> {
        let mut line = serde_json::to_vec(row)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.flush()?;
        if let Some(tb) = &mut self.tensorboard {
            tb.write(row)?;
        }
        Ok(())
    }
}

