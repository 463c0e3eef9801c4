//! `lora-train pairs` and `lora-train compare` end to end on the tiny golden models.
use crate::common;

use std::path::{Path, PathBuf};

use crate::common::{ok, run, stdout_json, tiny};
use serde_json::Value;

fn adapter() -> String {
    common::repo().join("tests/golden/adapters/llama-tiny").display().to_string()
}

/// Short prompts (the tiny models' context is 256 positions) with a ground truth each.
fn write_prompts(dir: &Path, n: usize) -> PathBuf {
    let colors = ["red", "green", "blue", "black", "white", "pink"];
    let mut text = String::new();
    for i in 0..n {
        let line = serde_json::json!({"messages": [{"role": "user", "content": format!("Name color {i}.")}], "ground_truth": colors[i % colors.len()]});
        text.push_str(&format!("{line}\n"));
    }
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn pairs_args<'a>(prompts: &'a str, model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["pairs", "--dataset", prompts, "--strong", model, "--weak", model, "--output", out, "--max-new-tokens", "6", "--device", "cpu", "--json"]
}

#[test]
fn pairs_in_a_directory_are_valid_dpo_input_with_provenance_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path(), 5);
    let model = tiny("llama");
    let strong = format!("{model}+{}", adapter());
    let out_dir = dir.path().join("pairs");
    std::fs::create_dir(&out_dir).unwrap();
    let mut args = pairs_args(s(&prompts), &model, s(&out_dir));
    args[4] = &strong; // strong = base + adapter, weak = base (one base in memory)
    let summary = stdout_json(&ok(&args));
    let file = PathBuf::from(summary["output"].as_str().unwrap());
    assert_eq!(file.parent().unwrap(), out_dir);
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("pairs-") && name.ends_with(".jsonl"), "time-stamped name: {name}");
    let (kept, dropped) = (summary["pairs"].as_u64().unwrap(), summary["dropped"].as_u64().unwrap());
    assert_eq!(kept + dropped, 5);
    assert!(kept > 0, "{summary}");

    // What dpo reads: the dataset loader sees Fireworks-form preference pairs.
    let ds = lora_datasets::load_dataset(&file, None).unwrap();
    assert_eq!(ds.format, lora_datasets::Format::Preference);
    assert_eq!(ds.samples.len() as u64, kept);
    ok(&["inspect", "--dataset", s(&file), "--model", &model, "--json"]);

    let provenance: Value = serde_json::from_str(&std::fs::read_to_string(format!("{}.provenance.json", file.display())).unwrap()).unwrap();
    assert_eq!(provenance["pairs"], summary["pairs"]);
    assert_eq!(provenance["dropped"], summary["dropped"]);
    assert_eq!(provenance["strong"]["adapter"].as_str().unwrap(), adapter());
    assert_eq!(provenance["weak"]["adapter"], Value::Null);
    assert_eq!(provenance["weak"]["temperature"], 1.0);
    assert_eq!(provenance["seed"], 0);

    // A second run into the directory gets a new name; a run onto the file is refused.
    let again = stdout_json(&ok(&args));
    assert_ne!(again["output"], summary["output"]);
    let before = std::fs::read(&file).unwrap();
    let args = pairs_args(s(&prompts), &model, s(&file));
    let refused = run(&args);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("never overwritten"), "{}", String::from_utf8_lossy(&refused.stderr));
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

#[test]
fn pairs_evaluator_keeps_only_strictly_better_strong_answers_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path(), 6);
    let model = tiny("llama");
    // Any non-empty answer matches `.`: both sides score 1, so no strong answer is better.
    let out = dir.path().join("all-equal.jsonl");
    let mut args = pairs_args(s(&prompts), &model, s(&out));
    args.extend(["--evaluator", "regex:."]);
    let summary = stdout_json(&ok(&args));
    assert_eq!(summary["pairs"], 0);
    assert_eq!(summary["dropped"], 6);
    let reasons = &summary["dropped_by_reason"];
    let total: u64 = ["empty", "identical", "unscored", "not_better"].iter().map(|k| reasons[k].as_u64().unwrap()).sum();
    assert_eq!(total, 6, "{reasons}");
    assert!(reasons["not_better"].as_u64().unwrap() > 0, "{reasons}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "");

    // A discriminating evaluator: whatever is kept carries its scores, strong strictly higher.
    let out = dir.path().join("filtered.jsonl");
    let mut args = pairs_args(s(&prompts), &model, s(&out));
    args.extend(["--evaluator", "regex:[aeiou]", "--weak-temperature", "1.5"]);
    let summary = stdout_json(&ok(&args));
    assert_eq!(summary["pairs"].as_u64().unwrap() + summary["dropped"].as_u64().unwrap(), 6);
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v["scores"]["preferred"].as_f64().unwrap() > v["scores"]["non_preferred"].as_f64().unwrap(), "{v}");
    }
    let provenance: Value = serde_json::from_str(&std::fs::read_to_string(format!("{}.provenance.json", out.display())).unwrap()).unwrap();
    assert_eq!(provenance["evaluators"][0], "regex:[aeiou]");
    assert_eq!(provenance["dropped_by_reason"], summary["dropped_by_reason"]);
}

fn compare_args<'a>(model: &'a str, adapter: &'a str, prompts: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["compare", "--model", model, "--adapter", adapter, "--dataset", prompts, "--output", out, "--max-new-tokens", "6", "--device", "cpu", "--json"]
}

fn check_summary(summary: &Value, n: u64) {
    let get = |k: &str| summary[k].as_u64().unwrap();
    assert_eq!(get("n"), n);
    assert_eq!(get("wins") + get("losses") + get("ties"), n, "{summary}");
    let rate = summary["win_rate"].as_f64().unwrap();
    assert!((rate - (get("wins") as f64 + get("ties") as f64 / 2.0) / n as f64).abs() < 1e-12);
    let (lo, hi) = (summary["ci95"][0].as_f64().unwrap(), summary["ci95"][1].as_f64().unwrap());
    assert!(0.0 <= lo && lo <= rate && rate <= hi && hi <= 1.0, "{summary}");
}

#[test]
fn compare_by_evaluator_counts_outcomes_from_the_scores() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path(), 6);
    let model = tiny("llama");
    let a = adapter();
    let out = dir.path().join("cmp");
    let mut args = compare_args(&model, &a, s(&prompts), s(&out));
    args.extend(["--evaluator", "regex:[aeiou]"]);
    let summary = stdout_json(&ok(&args));
    check_summary(&summary, 6);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(report["summary"], summary);
    let examples = report["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 6);
    for e in examples {
        let (f, b) = (e["scores"]["finetuned"].as_f64().unwrap(), e["scores"]["baseline"].as_f64().unwrap());
        let want = if f > b { "win" } else if f < b { "loss" } else { "tie" };
        assert_eq!(e["outcome"], want, "{e}");
    }
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.contains("win rate") && md.contains("| line | prompt |"), "{md}");

    // The same --output again: refused before any generation, the report untouched;
    // --overwrite replaces it.
    let again = run(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("holds an earlier comparison"), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::read_to_string(out.join("compare.md")).unwrap(), md);
    args.push("--overwrite");
    check_summary(&stdout_json(&ok(&args)), 6);

    // The adapter against itself: the same answers, so every prompt is a tie.
    let out = dir.path().join("self");
    let mut args = compare_args(&model, &a, s(&prompts), s(&out));
    args.extend(["--evaluator", "regex:[aeiou]", "--ref-adapter", &a]);
    let summary = stdout_json(&ok(&args));
    check_summary(&summary, 6);
    assert_eq!(summary["ties"], 6);
    assert_eq!(summary["win_rate"], 0.5);
}

#[test]
fn compare_by_judge_model_asks_in_both_orders() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path(), 3);
    let model = tiny("llama");
    let a = adapter();
    let out = dir.path().join("judged");
    let mut args = compare_args(&model, &a, s(&prompts), s(&out));
    args.extend(["--judge-model", &model, "--judge-max-new-tokens", "4"]);
    let summary = stdout_json(&ok(&args));
    check_summary(&summary, 3);
    assert!(summary["judged_by"].as_str().unwrap().starts_with("judge: "));
    let rubric = std::fs::read_to_string(out.join("rubric.md")).unwrap();
    assert!(rubric.contains("Name color 0.") && rubric.contains("reference answer"), "grounded in the data: {rubric}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    for e in report["examples"].as_array().unwrap() {
        for order in ["finetuned_first", "baseline_first"] {
            assert!(e["judge"][order]["reply"].is_string(), "{e}");
            assert!(["a", "b", "tie", "unparsed"].contains(&e["judge"][order]["verdict"].as_str().unwrap()), "{e}");
        }
    }

    // A given rubric is used as is; none is written.
    let rubric_file = dir.path().join("rubric.txt");
    std::fs::write(&rubric_file, "Prefer the shorter answer. Reply A, B or tie.").unwrap();
    let out = dir.path().join("given");
    let mut args = compare_args(&model, &a, s(&prompts), s(&out));
    args.extend(["--judge-model", &model, "--judge-max-new-tokens", "4", "--rubric", s(&rubric_file)]);
    check_summary(&stdout_json(&ok(&args)), 3);
    assert!(!out.join("rubric.md").exists());
}

#[test]
fn compare_needs_exactly_one_judge() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path(), 2);
    let model = tiny("llama");
    let a = adapter();
    let out = dir.path().join("x");
    let none = run(&compare_args(&model, &a, s(&prompts), s(&out)));
    assert!(String::from_utf8_lossy(&none.stderr).contains("needs a judge"));
    let mut both = compare_args(&model, &a, s(&prompts), s(&out));
    both.extend(["--evaluator", "exact", "--judge-model", &model]);
    assert!(String::from_utf8_lossy(&run(&both).stderr).contains("not both"));
}

#[test]
fn pairs_carry_the_prompts_tools() {
    let dir = tempfile::tempdir().unwrap();
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}]);
    let prompts = dir.path().join("tools.jsonl");
    std::fs::write(&prompts, format!("{}\n", serde_json::json!({"messages": [{"role": "user", "content": "Say hi."}], "tools": tools}))).unwrap();
    let model = tiny("llama");
    let out = dir.path().join("pairs.jsonl");
    let summary = stdout_json(&ok(&pairs_args(s(&prompts), &model, s(&out))));
    assert_eq!(summary["pairs"], 1, "{summary}");
    let line: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    assert_eq!(line["tools"], tools);
    assert_eq!(lora_datasets::load_dataset(&out, None).unwrap().format, lora_datasets::Format::Preference);
}
