//! `--report-to tensorboard` end to end: an `sft` and a `dpo` run on the tiny model write
//! event files whose records (both CRCs checked) hold every number of every
//! `metrics.jsonl` row, at its step, under transformers' / TRL's tag. TensorBoard's own
//! reader is checked by scripts/check_tensorboard.sh (it needs the Python venv).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_train::tensorboard::{self, read_events, Event};

use crate::common::*;

fn event_files(run: &Path, name: &str) -> Vec<PathBuf> {
    let dir = run.join(tensorboard::RUNS_DIR).join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(tensorboard::FILE_PREFIX))
        .collect();
    files.sort();
    files
}

/// Every scalar of every metrics row is in the events at the row's step (as f32).
fn assert_events_hold_metrics(events: &[Event], rows: &[serde_json::Value]) {
    let mut by_step: BTreeMap<i64, BTreeMap<String, f32>> = BTreeMap::new();
    for ev in events {
        by_step.entry(ev.step).or_default().extend(ev.scalars.iter().cloned());
    }
    for row in rows {
        let step = row["step"].as_i64().unwrap();
        let got = by_step.get(&step).unwrap_or_else(|| panic!("no events at step {step}"));
        for (key, v) in row.as_object().unwrap() {
            let Some(x) = v.as_f64().filter(|_| key != "step") else { continue };
            let tag = tensorboard::tag(key);
            let y = *got.get(&tag).unwrap_or_else(|| panic!("step {step}: no {tag} (for {key})"));
            // serde_json's float parsing (no `float_roundtrip`) can be 1 ulp off in f64.
            assert!((f64::from(y) - x).abs() <= 1e-6 * x.abs(), "step {step}: {key} = {x}, {tag} = {y}");
        }
    }
}

#[test]
fn sft_and_dpo_event_files_hold_every_metrics_value() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let out = tmp.path().join("sft");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    ok(&["sft", "--model", &m, "--dataset", &d, "-o", &o, "--device", "cpu", "--steps", "6", "--eval-interval", "2", "--report-to", "tensorboard"]);
    let files = event_files(&out, "default");
    assert_eq!(files.len(), 1, "{files:?}");
    let events = read_events(&files[0]).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let args = events.iter().flat_map(|e| &e.texts).find(|(t, _)| t == "args/text_summary").expect("hyperparameters as text");
    assert!(args.1.contains("\"learning_rate\""), "{}", args.1);
    let rows = metrics(&out);
    assert_eq!(rows.len(), 7, "step 0 (eval) and 6 steps");
    assert_events_hold_metrics(&events, &rows);
    let tags: Vec<&str> = events.iter().flat_map(|e| e.scalars.iter().map(|(t, _)| t.as_str())).collect();
    for t in ["train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "train/epoch"] {
        assert!(tags.contains(&t), "{t} missing from {tags:?}");
    }

    // Without the flag no event file is written.
    let plain = tmp.path().join("plain");
    ok(&["sft", "--model", &m, "--dataset", &d, "-o", &plain.display().to_string(), "--device", "cpu", "--steps", "2"]);
    assert!(!plain.join(tensorboard::RUNS_DIR).exists());

    // DPO: the method's own keys under TRL's names.
    let pairs = crate::dpo_e2e::write_pairs(tmp.path(), "pairs.jsonl", 8);
    let dpo = tmp.path().join("dpo");
    ok(&["dpo", "--model", &m, "--dataset", &pairs.display().to_string(), "-o", &dpo.display().to_string(), "--device", "cpu", "--steps", "3", "--report-to", "tensorboard"]);
    let events = read_events(&event_files(&dpo, "default")[0]).unwrap();
    assert_events_hold_metrics(&events, &metrics(&dpo));
    let tags: Vec<&str> = events.iter().flat_map(|e| e.scalars.iter().map(|(t, _)| t.as_str())).collect();
    for t in ["train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen", "eval/rewards/margins"] {
        assert!(tags.contains(&t), "{t} missing from {tags:?}");
    }
}
