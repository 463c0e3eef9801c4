//! The training file of `sft --trajectory-dataset` / `--system-prompt`: the chat samples of
//! `--dataset` and of every trajectory file (converted by `lora_datasets::trajectory`),
//! scaffolded with the system prompt, written once as one chat JSONL inside the run
//! directory. The rest of SFT then reads it like any `--dataset` (split, tokenization, the
//! loss mask with tool calls learned), and the file stays next to the adapter as the
//! record of what was trained on. The user's files are only read.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lora_datasets::{trajectory, ChatSample, Message, Role, Sample, TrajectoryFilter};
use serde::Serialize;

/// The generated training file, relative to the run directory.
pub const SFT_DATA_FILE: &str = "data/sft-data.jsonl";
/// Where its inputs and counts are recorded.
pub const SFT_DATA_PROVENANCE: &str = "data/sft-data.provenance.json";

/// What goes into the training file.
#[derive(Debug, Clone)]
pub struct SftDataInputs<'a> {
    pub dataset: Option<&'a Path>,
    pub trajectories: &'a [PathBuf],
    pub system_prompt: Option<&'a Path>,
    pub filter: TrajectoryFilter,
}

#[derive(Debug, Serialize)]
struct Provenance {
    dataset: Option<PathBuf>,
    dataset_samples: usize,
    trajectories: Vec<TrajectorySource>,
    system_prompt: Option<PathBuf>,
    system_prompt_added: usize,
    system_prompt_kept_own: usize,
    min_reward: Option<f64>,
    samples: usize,
}

#[derive(Debug, Serialize)]
struct TrajectorySource {
    path: PathBuf,
    #[serde(flatten)]
    counts: lora_datasets::TrajectoryCounts,
}

/// Build (or, on `--resume`, check) `OUTPUT/data/sft-data.jsonl` and return its path.
/// On resume the file is rebuilt in memory and must equal the one the run began with:
/// changed inputs would change the training data under a half-trained adapter.
pub fn prepare(inputs: &SftDataInputs, output: &Path, resume: bool) -> Result<PathBuf> {
    let mut samples: Vec<ChatSample> = Vec::new();
    let mut provenance = Provenance {
        dataset: inputs.dataset.map(Path::to_path_buf),
        dataset_samples: 0,
        trajectories: Vec::new(),
        system_prompt: inputs.system_prompt.map(Path::to_path_buf),
        system_prompt_added: 0,
        system_prompt_kept_own: 0,
        min_reward: inputs.filter.min_reward,
        samples: 0,
    };
    if let Some(path) = inputs.dataset {
        let dataset = crate::data::load_chat_dataset(path)?;
        provenance.dataset_samples = dataset.len();
        samples.extend(chat_samples(dataset.samples));
    }
    for path in inputs.trajectories {
        let (dataset, counts) = trajectory::load_trajectories(path, inputs.filter)?;
        tracing::info!("{}: {}", path.display(), trajectory::describe_skips(&counts));
        samples.extend(chat_samples(dataset.samples));
        provenance.trajectories.push(TrajectorySource { path: path.clone(), counts });
    }
    if let Some(path) = inputs.system_prompt {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading --system-prompt {}", path.display()))?;
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            bail!("{}: the system prompt is empty", path.display());
        }
        let (added, kept) = scaffold(&mut samples, text);
        if kept > 0 {
            tracing::warn!("--system-prompt: {kept} samples bring their own system message and keep it ({added} got {})", path.display());
        }
        (provenance.system_prompt_added, provenance.system_prompt_kept_own) = (added, kept);
    }
    if samples.is_empty() {
        bail!("no training samples: --dataset and --trajectory-dataset gave none");
    }
    provenance.samples = samples.len();

    let mut bytes = Vec::new();
    for sample in &samples {
        serde_json::to_writer(&mut bytes, sample)?;
        bytes.push(b'\n');
    }
    let file = output.join(SFT_DATA_FILE);
    if resume && file.exists() {
        let before = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        if before != bytes {
            bail!(
                "{}: the training data built from --dataset/--trajectory-dataset/--system-prompt differs from the one this run began with; \
                 resume with the same inputs, or start a new --output",
                file.display()
            );
        }
        return Ok(file);
    }
    std::fs::create_dir_all(output.join("data")).with_context(|| format!("creating {}", output.join("data").display()))?;
    lora_models::write_atomic(&file, &bytes)?;
    lora_models::write_atomic(&output.join(SFT_DATA_PROVENANCE), &serde_json::to_vec_pretty(&provenance)?)?;
    Ok(file)
}

fn chat_samples(samples: Vec<Sample>) -> impl Iterator<Item = ChatSample> {
    samples.into_iter().filter_map(|s| match s {
        Sample::Chat(c) => Some(c),
        _ => None,
    })
}

/// Put `system` first in every sample that has no system message; returns (added, kept
/// their own).
fn scaffold(samples: &mut [ChatSample], system: &str) -> (usize, usize) {
    let (mut added, mut kept) = (0, 0);
    for sample in samples {
        if sample.messages.first().is_some_and(|m| m.role == Role::System) {
            kept += 1;
        } else {
            sample.messages.insert(0, Message::system(system));
            added += 1;
        }
    }
    (added, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_and_trajectories_merge_with_the_system_prompt_and_resume_checks_them() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{\"messages\": [{\"role\": \"system\", \"content\": \"own\"}, {\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n").unwrap();
        let traj = dir.path().join("t.jsonl");
        std::fs::write(&traj, "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}], \"completion\": \"r\", \"reward\": 1, \"stopped\": true}\n").unwrap();
        let system = dir.path().join("system.txt");
        std::fs::write(&system, "Be brief.\n").unwrap();
        let out = dir.path().join("run");
        let trajectories = [traj.clone()];
        let inputs = SftDataInputs { dataset: Some(&data), trajectories: &trajectories, system_prompt: Some(&system), filter: TrajectoryFilter::default() };
        let file = prepare(&inputs, &out, false).unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["messages"][0]["content"], "own", "a sample's own system message is kept");
        assert_eq!(lines[1]["messages"][0]["content"], "Be brief.");
        assert_eq!(lines[1]["messages"][2]["content"], "r");
        let provenance: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(SFT_DATA_PROVENANCE)).unwrap()).unwrap();
        assert_eq!(provenance["system_prompt_added"], 1);
        assert_eq!(provenance["trajectories"][0]["kept"], 1);
        // The generated file is what `--dataset` reads.
        assert_eq!(crate::data::load_chat_dataset(&file).unwrap().len(), 2);

        assert_eq!(prepare(&inputs, &out, true).unwrap(), file, "same inputs resume");
        std::fs::write(&system, "Be verbose.\n").unwrap();
        let err = prepare(&inputs, &out, true).unwrap_err().to_string();
        assert!(err.contains("differs from the one this run began with"), "{err}");
    }
}
