//! `lora-train dpo` / `orpo` / `eval` on preference pairs, end to end on the tiny models:
//! training moves the rewards the right way, metrics carry TRL's names, a resumed run is
//! bit-identical, and `eval --json` prints the pair statistics.

use std::path::{Path, PathBuf};

use crate::common::*;

/// Pairs whose chosen answer is a fixed code word and whose rejected answer is a refusal.
pub fn write_pairs(dir: &Path, name: &str, n: usize) -> PathBuf {
    let words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"];
    let mut text = String::new();
    for i in 0..n {
        let w = words[i % words.len()];
        let line = serde_json::json!({
            "prompt": format!("Say the code word number {i}."),
            "chosen": format!("The code word is {w}."),
            "rejected": "I would rather not say.",
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn args<'a>(method: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![method, "--model", "", "--dataset", data, "--output", out, "--device", "cpu", "--json"];
    a.extend_from_slice(extra);
    a
}

fn with_model<'a>(mut a: Vec<&'a str>, model: &'a str) -> Vec<&'a str> {
    a[2] = model;
    a
}

const COMMON: [&str; 12] = ["--steps", "6", "--batch-size", "2", "--learning-rate", "5e-3", "--eval-split", "2", "--checkpoint-interval", "2", "--save-total-limit", "0"];

#[test]
fn dpo_trains_logs_trl_metrics_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), "pairs.jsonl", 8).display().to_string();
    let m = tiny("qwen2");
    let full = tmp.path().join("full");
    let o = full.display().to_string();
    let summary = stdout_json(&ok(&with_model(args("dpo", &data, &o, &COMMON), &m)));
    assert_eq!(summary["steps"], 6);
    assert_eq!((summary["train_samples"].as_u64(), summary["eval_samples"].as_u64()), (Some(6), Some(2)));

    let rows = metrics(&full);
    let first_train = rows.iter().find(|r| r["step"] == 1).unwrap();
    // A fresh adapter (B = 0) is its own reference: the first loss is ln 2.
    assert!((first_train["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{first_train}");
    for key in ["rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin", "logps_chosen", "logps_rejected"] {
        assert!(first_train.get(key).is_some(), "no {key} in {first_train}");
        assert!(rows.last().unwrap().get(&format!("eval_{key}")).is_some(), "no eval_{key}");
    }
    let last = rows.last().unwrap();
    assert!(last["eval_rewards_margin"].as_f64().unwrap() > 0.0, "the margin did not grow: {last}");
    assert!(last["loss"].as_f64().unwrap() < std::f64::consts::LN_2);
    let report = std::fs::read_to_string(full.join("report.md")).unwrap();
    assert!(report.contains("eval_rewards/accuracies") && report.contains("> held-out DPO loss per pair 0.6931 -> "), "{report}");

    // Killed after step 3: only checkpoint step-2 (and the run's files) remain.
    let cut = tmp.path().join("cut");
    copy_dir(&full.join("checkpoints/step-2"), &cut.join("checkpoints/step-2"));
    for f in ["run.json"] {
        std::fs::copy(full.join(f), cut.join(f)).unwrap();
    }
    let c = cut.display().to_string();
    let mut resumed = with_model(args("dpo", &data, &c, &COMMON), &m);
    resumed.push("--resume");
    assert_eq!(stdout_json(&ok(&resumed))["resumed_from_step"], 2);
    assert_eq!(read_adapter(&full), read_adapter(&cut), "resumed adapter differs from the uninterrupted one");

    // A run.json of an older lora-train (before method options, quantized bases,
    // checkpointing and --report-to were recorded) still resumes, to the same adapter.
    let old = tmp.path().join("old");
    copy_dir(&full.join("checkpoints/step-2"), &old.join("checkpoints/step-2"));
    let mut run_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(full.join("run.json")).unwrap()).unwrap();
    run_json.as_object_mut().unwrap().remove("method_options");
    for key in ["base_quant", "gradient_checkpointing", "report_to", "max_train_samples"] {
        run_json["config"].as_object_mut().unwrap().remove(key);
    }
    std::fs::write(old.join("run.json"), run_json.to_string()).unwrap();
    let o2 = old.display().to_string();
    let mut resumed_old = with_model(args("dpo", &data, &o2, &COMMON), &m);
    resumed_old.push("--resume");
    assert_eq!(stdout_json(&ok(&resumed_old))["resumed_from_step"], 2);
    assert_eq!(read_adapter(&full), read_adapter(&old), "an older run.json resumed to another adapter");

    // Another beta is another run.
    let mut other = resumed.clone();
    other.extend(["--beta", "0.5"]);
    let out = run(&other);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("options of the run"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn precomputed_reference_is_stored_and_gives_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), "pairs.jsonl", 8).display().to_string();
    let m = tiny("llama");
    let (a, b) = (tmp.path().join("inline"), tmp.path().join("pre"));
    let (oa, ob) = (a.display().to_string(), b.display().to_string());
    let extra = ["--steps", "3", "--batch-size", "4", "--learning-rate", "5e-3", "--eval-split", "0", "--loss-type", "ipo"];
    ok(&with_model(args("dpo", &data, &oa, &extra), &m));
    let mut pre = with_model(args("dpo", &data, &ob, &extra), &m);
    pre.push("--precompute-ref-logps");
    ok(&pre);
    assert!(b.join("ref_logps.json").exists());
    let (x, y) = (read_adapter(&a), read_adapter(&b));
    for (k, v) in &x {
        let max = v.iter().zip(&y[k]).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(max < 1e-5, "{k}: precomputed reference changes the update by {max}");
    }
}

#[test]
fn orpo_trains_and_continues_from_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), "pairs.jsonl", 6).display().to_string();
    let m = tiny("qwen3");
    let out = tmp.path().join("orpo");
    let o = out.display().to_string();
    let extra = ["--steps", "4", "--batch-size", "3", "--learning-rate", "1e-2", "--eval-split", "2", "--rank", "4"];
    ok(&with_model(args("orpo", &data, &o, &extra), &m));
    let rows = metrics(&out);
    let last = rows.last().unwrap();
    for key in ["nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards_accuracy", "eval_nll_loss", "eval_log_odds_chosen"] {
        assert!(last.get(key).is_some(), "no {key} in {last}");
    }
    let first = rows.iter().find(|r| r["step"] == 1).unwrap();
    assert!(last["nll_loss"].as_f64().unwrap() < first["nll_loss"].as_f64().unwrap(), "ORPO's NLL did not fall");

    // DPO from the ORPO adapter: its shape is adopted, and since the reference is a copy
    // of it, the first loss is ln 2 again.
    let dpo = tmp.path().join("dpo");
    let d = dpo.display().to_string();
    ok(&with_model(args("dpo", &data, &d, &["--steps", "1", "--batch-size", "2", "--eval-split", "0", "--init-adapter", &o]), &m));
    let first = &metrics(&dpo)[0];
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{first}");
    assert_eq!(read_adapter(&dpo).keys().collect::<std::collections::BTreeSet<_>>(), read_adapter(&out).keys().collect());
}

#[test]
fn eval_on_a_preference_file_prints_pair_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), "pairs.jsonl", 5).display().to_string();
    let m = tiny("qwen2");
    // No adapter: policy = reference, so DPO is at ln 2 and the rewards are 0.
    let v = stdout_json(&ok(&["eval", "--model", &m, "--dataset", &data, "--device", "cpu", "--json", "--beta", "0.2"]));
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["beta", "dpo_loss", "logps_chosen", "logps_rejected", "orpo_loss", "pairs", "rewards_accuracy", "rewards_margin"]);
    assert_eq!((v["pairs"].as_u64(), v["beta"].as_f64()), (Some(5), Some(0.2)));
    assert!((v["dpo_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-9);
    assert_eq!(v["rewards_accuracy"].as_f64(), Some(0.0));
    // With the golden adapter as the policy the numbers move.
    let adapter = repo().join("tests/golden/adapters/qwen2-tiny").display().to_string();
    let w = stdout_json(&ok(&["eval", "--model", &m, "--adapter", &adapter, "--dataset", &data, "--device", "cpu", "--json"]));
    assert!((w["dpo_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() > 1e-4);
    // --ref-adapter equal to the policy: back at ln 2.
    let same = stdout_json(&ok(&["eval", "--model", &m, "--adapter", &adapter, "--ref-adapter", &adapter, "--dataset", &data, "--device", "cpu", "--json"]));
    assert!((same["dpo_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-9);
}

#[test]
fn bad_pairs_are_reported_by_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.jsonl");
    let lines = [
        r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#,
        r#"{"prompt": "q", "chosen": "", "rejected": "b"}"#,
        r#"{"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}"#,
        r#"{"prompt": "q", "rejected": "b"}"#,
    ];
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let p = path.display().to_string();
    let out = run(&["dpo", "--model", &tiny("qwen2"), "--dataset", &p, "--output", &tmp.path().join("o").display().to_string(), "--device", "cpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for (line, what) in [(2, "`chosen` is empty"), (3, "role `user`"), (4, "missing field `chosen`")] {
        assert!(err.contains(&format!("bad.jsonl:{line}: ")) && err.contains(what), "line {line} ({what}) not reported:\n{err}");
    }
}

/// `--loss-type sigmoid,sft --loss-weights 1,0.5`: the first loss is ln 2 (the sigmoid
/// term of a fresh adapter) plus half the chosen answers' NLL per token, each term is
/// logged, and a weight count that does not match is refused.
#[test]
fn combined_loss_types_add_their_weighted_terms() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), "pairs.jsonl", 8).display().to_string();
    let m = tiny("qwen2");
    let out = tmp.path().join("rpo");
    let o = out.display().to_string();
    let mut extra = COMMON.to_vec();
    extra.extend(["--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5"]);
    ok(&with_model(args("dpo", &data, &o, &extra), &m));
    let rows = metrics(&out);
    let first = rows.iter().find(|r| r["step"] == 1).unwrap();
    let (sigmoid, sft) = (first["loss_term_sigmoid"].as_f64().unwrap(), first["loss_term_sft"].as_f64().unwrap());
    assert!((sigmoid - std::f64::consts::LN_2).abs() < 1e-6 && sft > 0.0, "{first}");
    assert!((first["loss"].as_f64().unwrap() - (sigmoid + 0.5 * sft)).abs() < 1e-5, "{first}");
    assert!(rows.last().unwrap()["eval_loss_term_sft"].as_f64().unwrap() < sft, "the sft term did not fall");

    let bad = tmp.path().join("bad").display().to_string();
    let mut extra = COMMON.to_vec();
    extra.extend(["--loss-type", "sigmoid,sft", "--loss-weights", "1"]);
    let err = run(&with_model(args("dpo", &data, &bad, &extra), &m));
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("one weight per --loss-type"));
}

#[test]
fn packed_dpo_candidates_equal_the_same_dpo_runs_alone() {
    // A sweep worker packs DPO candidates over one base (each with its own adapter and its
    // reference rows routed to the base) exactly as it packs SFT ones.
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), "pairs.jsonl", 8).display().to_string();
    let m = tiny("qwen2");
    let solo = |name: &str, extra: &[&str]| {
        let o = tmp.path().join(format!("solo-{name}"));
        let os = o.display().to_string();
        let mut a = with_model(args("dpo", &data, &os, &["--steps", "4", "--batch-size", "2", "--learning-rate", "5e-3", "--eval-split", "2"]), &m);
        a.extend_from_slice(extra);
        // Through the per-projection GEMMs the packed (routed) batch takes.
        let res = std::process::Command::new(bin()).args(&a).env("LORA_TRAIN_FUSED_PROJECTIONS", "0").env("LORA_TRAIN_LOG", "warn")
            .env("LORA_TRAIN_HOME", std::env::temp_dir().join("lora-train-tests-home")).output().unwrap();
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        o
    };
    let (a, b) = (solo("a", &["--beta", "0.1", "--rank", "4"]), solo("b", &["--beta", "0.5", "--rank", "8", "--learning-rate", "1e-2"]));
    let run_json = |dir: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap() };
    let member = |name: &str, dir: &Path| {
        let mut config = run_json(dir)["config"].clone();
        config["output"] = serde_json::json!(tmp.path().join("packed").join(name));
        serde_json::json!({ "name": name, "config": config, "resume": false })
    };
    // The recipe of a DPO group is the method options its runs record.
    let recipe = run_json(&a)["method_options"].clone();
    assert_eq!(recipe["method"], "dpo", "{recipe}");
    let mut recipe_b = run_json(&b)["method_options"].clone();
    recipe_b["objective"]["beta"] = recipe["objective"]["beta"].clone();
    assert_eq!(recipe_b, recipe, "the candidates differ only in beta");
    // Beta is a DPO option: candidates with other betas are separate groups in a sweep of
    // them; here the packed pair shares a beta and differs in rank and learning rate.
    let b = solo("b2", &["--beta", "0.1", "--rank", "8", "--learning-rate", "1e-2"]);
    let spec = serde_json::json!({ "device": "cpu", "members": [member("a", &a), member("b", &b)], "recipe": recipe });
    let spec_path = tmp.path().join("group.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let res = std::process::Command::new(bin()).args(["sweep-worker", "--spec", &spec_path.display().to_string()]).env("LORA_TRAIN_LOG", "warn").output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    for (name, alone) in [("a", &a), ("b", &b)] {
        let packed = tmp.path().join("packed").join(name);
        let (p, s) = (read_adapter(&packed), read_adapter(alone));
        assert_eq!(p.len(), s.len());
        for (k, vs) in &s {
            let scale = vs.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: {k} never received a gradient");
            let diff = p[k].iter().zip(vs).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff / scale < 1e-5, "{name}: {k} packed vs alone differ by {:e} (relative)", diff / scale);
        }
        assert_eq!(run_json(&packed)["method_options"], run_json(alone)["method_options"]);
    }
}
