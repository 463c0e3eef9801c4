//! Atomic files and resumable checkpoints.
//!
//! A checkpoint is `RUN/checkpoints/step-N/` holding whatever the recipe writes (adapter,
//! optimizer state) plus `trainer_state.json` (step, data-loader position, seed, counters).
//! It is assembled in a hidden temporary directory, every file is fsynced, and the
//! directory is renamed into place in one step: a `step-N` directory either is complete
//! or does not exist, so a run killed at any moment never leaves a half-written one that
//! `latest_checkpoint` could pick.
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "trainer_state.json";
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// Everything besides tensors that is needed to continue a run bit-for-bit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Data-loader position of the next micro-batch: epoch and index within that epoch
    /// (batches are a pure function of (seed, epoch), so this is all the loader needs).
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// The run seed; dropout masks are drawn from seeds derived from (seed, step, micro-batch),
    /// so there is no RNG stream to save.
    pub seed: u64,
    /// Non-padding tokens trained on so far, and loss tokens among them.
    pub tokens_seen: u64,
    pub loss_tokens_seen: u64,
    /// Wall time spent training so far (summed over resumed segments).
    pub elapsed_s: f64,
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    /// Hash of the training tokens and loss masks: resuming on changed data is refused.
    #[serde(default)]
    pub data_fingerprint: Option<String>,
}

/// fsync a file or directory (directories: so a rename inside them is durable).
fn sync_path(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// The one atomic file write of the workspace (temporary sibling, fsync, rename, fsync
/// of the directory), re-exported so trainer code keeps calling `checkpoint::write_atomic`.
pub use lora_models::write_atomic;

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR)
}

pub fn checkpoint_dir(run_dir: &Path, step: usize) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step-{step}"))
}

/// Write a checkpoint atomically. `write_tensors` fills the (temporary) directory with the
/// adapter and optimizer state; `trainer_state.json` is added last.
pub fn save_checkpoint(
    run_dir: &Path,
    state: &TrainerState,
    write_tensors: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let tmp = root.join(format!(".tmp-step-{}-{}", state.step, std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    write_tensors(&tmp)?;
    fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(state)?)?;
    for entry in fs::read_dir(&tmp)? {
        let path = entry?.path();
        if path.is_file() {
            sync_path(&path)?;
        }
    }
    sync_path(&tmp)?;
    let dst = checkpoint_dir(run_dir, state.step);
    if dst.exists() {
        // Re-reaching a step after a resume: the new one replaces the old one.
        let old = root.join(format!(".old-step-{}-{}", state.step, std::process::id()));
        fs::rename(&dst, &old)?;
        fs::rename(&tmp, &dst)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(&tmp, &dst).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    }
    sync_path(&root)?;
    Ok(dst)
}

/// The complete checkpoint with the highest step, if any (temporary directories and
/// directories without a readable state file are ignored).
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let root = checkpoints_dir(run_dir);
    if !root.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(PathBuf, TrainerState)> = None;
    for entry in fs::read_dir(&root)? {
        let path = entry?.path();
        let Some(step) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let Ok(bytes) = fs::read(path.join(STATE_FILE)) else { continue };
        let Ok(state) = serde_json::from_slice::<TrainerState>(&bytes) else { continue };
        if state.step != step {
            continue;
        }
        if best.as_ref().is_none_or(|(_, b)| b.step < step) {
            best = Some((path, state));
        }
    }
    Ok(best)
}

/// Remove leftovers of checkpoints that a killed run was writing.
pub fn remove_stale_temporaries(run_dir: &Path) -> Result<()> {
    let root = checkpoints_dir(run_dir);
    if !root.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(&root)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(".tmp-step-") || name.starts_with(".old-step-") {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Keep only the `keep` most recent checkpoints (0 keeps all).
pub fn prune_checkpoints(run_dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let root = checkpoints_dir(run_dir);
    let mut steps: Vec<(usize, PathBuf)> = fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let s = p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()?;
            Some((s, p))
        })
        .collect();
    steps.sort();
    let n = steps.len();
    for (_, p) in steps.into_iter().take(n.saturating_sub(keep)) {
        fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainerState {
        TrainerState { step, seed: 7, ..Default::default() }
    }

    #[test]
    fn latest_complete_checkpoint_wins_and_partial_ones_are_ignored() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = dir.path();
        assert!(latest_checkpoint(run)?.is_none());
        save_checkpoint(run, &state(2), |d| Ok(fs::write(d.join("a.bin"), b"two")?))?;
        save_checkpoint(run, &state(10), |d| Ok(fs::write(d.join("a.bin"), b"ten")?))?;
        // A killed writer: temporary dir, and a step dir without its state file.
        fs::create_dir_all(checkpoints_dir(run).join(".tmp-step-12-999"))?;
        fs::create_dir_all(checkpoint_dir(run, 11))?;
        fs::write(checkpoint_dir(run, 11).join("a.bin"), b"half")?;
        let (path, st) = latest_checkpoint(run)?.unwrap();
        assert_eq!(st.step, 10);
        assert_eq!(fs::read(path.join("a.bin"))?, b"ten");
        remove_stale_temporaries(run)?;
        assert!(!checkpoints_dir(run).join(".tmp-step-12-999").exists());
        // A failing writer leaves no step dir behind.
        assert!(save_checkpoint(run, &state(20), |_| anyhow::bail!("disk full")).is_err());
        assert_eq!(latest_checkpoint(run)?.unwrap().1.step, 10);
        // Overwrite and prune.
        save_checkpoint(run, &state(10), |d| Ok(fs::write(d.join("a.bin"), b"TEN")?))?;
        assert_eq!(fs::read(checkpoint_dir(run, 10).join("a.bin"))?, b"TEN");
        fs::remove_dir_all(checkpoint_dir(run, 11))?;
        prune_checkpoints(run, 1)?;
        assert!(!checkpoint_dir(run, 2).exists());
        assert!(checkpoint_dir(run, 10).exists());
        Ok(())
    }
}
