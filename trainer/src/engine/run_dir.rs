//! The run directory's lifecycle: a fresh run needs an empty `--output`, `--resume` needs
//! the configuration of the run it continues; `run.json` records configuration, status
//! and summary.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;

pub const RUN_FILE: &str = "run.json";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Where a run stands, as `run.json` and `sweep.json` say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Pending,
    Running,
    Completed,
    /// Stopped by a NaN/Inf loss, gradient or update; its last good checkpoint is kept.
    Diverged,
    /// Ended early at its method's request (`Method::stop_reason`); its last step's
    /// checkpoint is kept.
    Stopped,
    /// Its process died (crash, OOM, kill) or it could not start.
    Failed,
}

/// Returns the checkpoint to resume from. Writes nothing: the directory is only touched
/// once model and data have loaded, so a run that fails to start leaves no trace.
/// `method_options` are the method's own options (`Method::options`): on `--resume` they
/// must equal those in `run.json`, as the shared configuration must, for every method.
pub fn prepare_run_dir(out: &Path, cfg: &TrainConfig, method_options: &serde_json::Value, resume: bool) -> Result<Option<(PathBuf, TrainerState)>> {
    let run_json = out.join(RUN_FILE);
    if !resume {
        if run_json.exists() || checkpoint::checkpoints_dir(out).exists() || out.join("adapter_model.safetensors").exists() {
            bail!("{} already holds a run; pass --resume to continue it, or choose another --output", out.display());
        }
        return Ok(None);
    }
    let prev: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&run_json).with_context(|| format!("--resume: {} not found (nothing to resume)", run_json.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", run_json.display()))?;
    let prev_cfg: TrainConfig =
        serde_json::from_value(prev["config"].clone()).with_context(|| format!("{}: no training configuration", run_json.display()))?;
    let (a, b) = (prev_cfg.resume_relevant(), cfg.resume_relevant());
    if a != b {
        let mut diffs = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).unwrap_or(&serde_json::Value::Null);
                if va != vb {
                    diffs.push(format!("{k}: {va} in the run, {vb} now"));
                }
            }
        }
        bail!("--resume needs the command line of the run it continues; these differ:\n  {}", diffs.join("\n  "));
    }
    match prev.get("method_options") {
        Some(before) if before != method_options => {
            bail!("--resume needs the method options of the run it continues:\n  in the run: {before}\n  now:        {method_options}")
        }
        Some(_) => {}
        // A run.json written before method options were recorded there still resumes.
        None => tracing::warn!("{}: written by an older lora-train without the method's options; they are not checked", run_json.display()),
    }
    let latest = checkpoint::latest_checkpoint(out)?;
    match &latest {
        Some((dir, st)) => tracing::info!("resuming from {} (step {})", dir.display(), st.step),
        None => tracing::warn!("--resume: no complete checkpoint in {}; starting from step 0", out.display()),
    }
    Ok(latest)
}

/// `run.json`: the command, its resolved configuration and method options, status and
/// (when done) summary.
pub fn write_run_json(out: &Path, command: &str, cfg: &TrainConfig, method_options: &serde_json::Value, status: RunStatus, summary: Option<&impl Serialize>) -> Result<()> {
    let v = serde_json::json!({
        "command": command,
        "version": env!("CARGO_PKG_VERSION"),
        "status": status,
        "config": cfg,
        "method_options": method_options,
        "summary": summary,
    });
    checkpoint::write_atomic(&out.join(RUN_FILE), &serde_json::to_vec_pretty(&v)?)
}

/// The status recorded in `DIR/run.json`, if it can be read.
pub fn read_status(out: &Path) -> Option<RunStatus> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(RUN_FILE)).ok()?).ok()?;
    serde_json::from_value(v.get("status")?.clone()).ok()
}
