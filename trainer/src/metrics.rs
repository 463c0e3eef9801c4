//! `RUN/metrics.jsonl`: one JSON object per logged optimizer step.
//!
//! Train rows: `step, loss, lr, grad_norm, tokens, elapsed_s` (plus `epoch`, `loss_tokens`).
//! `loss` is the mean loss per loss token of that step's accumulated batch; `tokens` is the
//! cumulative count of non-padding tokens trained on; `elapsed_s` the cumulative training
//! wall time. When an evaluation runs at a step its row adds `eval_loss` (and
//! `eval_perplexity`, `eval_tokens`); the evaluation before training is the row of step 0.
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};


#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    pub tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_tokens: Option<u64>,
    pub elapsed_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_tokens: Option<u64>,
    /// Method-specific fields (DPO's `rewards_margin`, GRPO's `reward`, their `eval_`
    /// forms), flattened into the row so the engine needs no change for a new method.
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Read every row. A run killed in the middle of a write leaves a torn LAST line: that
/// line is dropped with a warning (the resumed run writes its step again). Any other line
/// that is not a metrics row means the file was damaged or edited: an error naming
/// `FILE:LINE`, because dropping it would silently rewrite the run's history on resume
/// (or, in a sweep, choose the winner from part of a candidate's rows).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>> {
    read_lines(path, TornLast::Warn)
}

/// The rows so far of a run that may be writing right now (a sweep's monitor, a workflow,
/// the dashboard): no file yet is no rows, and a half-written last line is left for the
/// next read without a warning (the writer is likely still on it). A damaged line before
/// the last is an error naming `FILE:LINE`, as in [`read_metrics`]. `T` is
/// [`MetricsRow`], or `serde_json::Value` to keep every key of a row.
pub fn read_metrics_so_far<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    read_lines(path, TornLast::Quiet)
}

/// What to say about a last line that does not parse.
#[derive(Clone, Copy, PartialEq)]
enum TornLast {
    Warn,
    Quiet,
}

fn read_lines<T: DeserializeOwned>(path: &Path, torn: TornLast) -> Result<Vec<T>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let lines: Vec<String> = BufReader::new(f).lines().collect::<std::io::Result<_>>().with_context(|| format!("reading {}", path.display()))?;
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    let mut rows = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(line) {
            Ok(row) => rows.push(row),
            Err(e) if Some(i) == last => {
                if torn == TornLast::Warn {
                    tracing::warn!("{}:{}: dropping a torn last line (a killed run was writing it): {e}", path.display(), i + 1);
                }
            }
            Err(e) => anyhow::bail!("{}:{}: not a metrics row: {e}", path.display(), i + 1),
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics_writer::MetricsWriter;

    #[test]
    fn write_read_and_resume_truncates_later_rows() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&p)?;
        w.write(&MetricsRow { step: 0, eval_loss: Some(3.0), ..Default::default() })?;
        for s in 1..=5 {
            w.write(&MetricsRow { step: s, loss: Some(2.0 / s as f64), lr: Some(1e-3), grad_norm: Some(0.5), tokens: 10 * s as u64, elapsed_s: s as f64, ..Default::default() })?;
        }
        drop(w);
        let text = std::fs::read_to_string(&p)?;
        let first: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap())?;
        for key in ["step", "loss", "lr", "grad_norm", "tokens", "elapsed_s"] {
            assert!(first.get(key).is_some(), "{key} missing in {first}");
        }
        let mut w = MetricsWriter::resume(&p, 3)?;
        w.write(&MetricsRow { step: 4, loss: Some(9.0), ..Default::default() })?;
        let rows = read_metrics(&p)?;
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert_eq!(rows[4].loss, Some(9.0));
        Ok(())
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_a_corrupt_middle_line_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("metrics.jsonl");
        let good = |s: usize| serde_json::to_string(&MetricsRow { step: s, loss: Some(1.0), ..Default::default() }).unwrap();
        // Killed mid-write: the last line is cut off (and has no newline).
        std::fs::write(&p, format!("{}\n{}\n{}", good(1), good(2), &good(3)[..10]))?;
        assert_eq!(read_metrics(&p)?.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2]);
        // Resuming from it keeps the good rows.
        drop(MetricsWriter::resume(&p, 2)?);
        assert_eq!(read_metrics(&p)?.len(), 2);
        // A damaged line in the middle is an error naming FILE:LINE, for reads and resume.
        std::fs::write(&p, format!("{}\n{{\"step\": oops\n{}\n", good(1), good(3)))?;
        let err = format!("{:#}", read_metrics(&p).unwrap_err());
        assert!(err.contains(&format!("{}:2:", p.display())), "{err}");
        assert!(MetricsWriter::resume(&p, 3).is_err());
        Ok(())
    }

    #[test]
    fn rows_so_far_of_a_run_being_written() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("metrics.jsonl");
        assert!(read_metrics_so_far::<MetricsRow>(&p)?.is_empty(), "no file yet: no rows");
        std::fs::write(&p, "{\"step\": 1, \"tokens\": 4, \"elapsed_s\": 0.1, \"reward\": 0.5}\n{\"step\": 2, \"to")?;
        let rows: Vec<serde_json::Value> = read_metrics_so_far(&p)?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["reward"], 0.5, "a method's own keys are kept");
        std::fs::write(&p, "{\"step\": 1, \"tokens\": 4, \"elapsed_s\": 0.1}\n{\"step\": oops\n{\"step\": 3, \"tokens\": 4, \"elapsed_s\": 0.1}\n")?;
        let err = format!("{:#}", read_metrics_so_far::<MetricsRow>(&p).unwrap_err());
        assert!(err.contains(&format!("{}:2:", p.display())), "{err}");
        Ok(())
    }
}
