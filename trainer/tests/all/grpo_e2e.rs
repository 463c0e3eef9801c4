//! `lora-train grpo` and `eval --evaluator` end to end on the tiny golden models: a few
//! GRPO steps with built-in evaluators write every metric, a sample of rollouts and an
//! adapter that moved; a run resumed in the middle of a reused rollout batch ends bit
//! for bit where the uninterrupted run ends; every loss variant trains; `--preview`
//! and the no-signal warning and stop on an evaluator that always gives the same score.

use std::path::{Path, PathBuf};

use crate::common::*;

fn write_prompts(dir: &Path, name: &str, n: usize) -> PathBuf {
    let mut text = String::new();
    for i in 0..n {
        let line = serde_json::json!({
            "messages": [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": format!("What is {i} + {}?", i + 2)}],
            "ground_truth": (2 * i + 2).to_string(),
            "level": i % 3,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn grpo_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "grpo", "--model", model, "--dataset", data, "--output", out, "--json", "--evaluator", "regex:e", "--evaluator", "length:1-5",
        "--reward-weights", "1,0.5", "--num-generations", "4", "--prompts-per-step", "2", "--max-completion-length", "6",
        "--batch-size", "4", "--learning-rate", "5e-3", "--lora-rank", "4",
    ]
}

#[test]
fn a_few_grpo_steps_write_metrics_rollouts_and_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_prompts(tmp.path(), "train.jsonl", 6);
    let eval = write_prompts(tmp.path(), "eval.jsonl", 2);
    let out = tmp.path().join("run");
    let (m, d, e, o) = (tiny("qwen3"), data.display().to_string(), eval.display().to_string(), out.display().to_string());
    let mut args = grpo_args(&m, &d, &o);
    args.extend(["--steps", "3", "--beta", "0.04", "--eval-dataset", &e, "--top-k", "50", "--top-p", "0.95"]);
    let summary = stdout_json(&ok(&args));
    assert_eq!(summary["steps"], 3);
    let rows = metrics(&out);
    assert_eq!(rows[0]["step"], 0, "the held-out reward before training");
    assert!(rows[0]["eval_reward"].is_number());
    let last = rows.last().unwrap();
    for key in [
        "loss", "reward", "reward_std", "rewards_regex", "rewards_length", "frac_reward_zero_std", "completion_length_mean",
        "completion_length_min", "completion_length_max", "clipped_ratio", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
        "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "entropy", "evaluator_failures", "time_rollout_s", "time_scoring_s", "time_training_s", "eval_reward",
    ] {
        assert!(last[key].is_number(), "metrics.jsonl lacks {key}: {last}");
    }
    assert!(last["completion_length_max"].as_f64().unwrap() <= 6.0);
    let logged: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("rollouts.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(logged.len(), 3 * 8, "eight completions of each step's 2 x 4");
    assert!(logged.iter().all(|r| r["completion"].is_string() && r["advantage"].is_number()));
    // The evaluators score each group on their own thread while the others decode, and the
    // groups finish in any order: each reward must still be its own completion's
    // (regex `e` weighs 1, length 1-5 weighs 0.5, so the integer part is the regex's).
    for r in &logged {
        let has_e = r["completion"].as_str().unwrap().contains('e');
        let reward = r["reward"].as_f64().expect("every completion scored");
        assert_eq!(reward.floor() == 1.0, has_e, "a reward that is not its completion's: {r}");
    }
    assert!(last["time_scoring_total_s"].is_number());
    let adapter = read_adapter(&out);
    let moved = adapter.iter().filter(|(k, _)| k.contains("lora_B")).any(|(_, v)| v.iter().any(|&x| x != 0.0));
    assert!(moved, "GRPO left every LoRA B at its zero init");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn resume_in_the_middle_of_a_rollout_batch_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_prompts(tmp.path(), "train.jsonl", 4);
    let full = tmp.path().join("full");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), full.display().to_string());
    let extra = ["--steps", "6", "--num-iterations", "2", "--checkpoint-interval", "3", "--save-total-limit", "0", "--eval-split", "0", "--loss-type", "grpo"];
    let mut args = grpo_args(&m, &d, &o);
    args.extend(extra);
    ok(&args);
    // A run killed after step 4: checkpoint step-3 (inside the batch of steps 3-4).
    let cut = tmp.path().join("cut");
    copy_dir(&full.join("checkpoints/step-3"), &cut.join("checkpoints/step-3"));
    copy_dir(&full.join("rollout_cache"), &cut.join("rollout_cache"));
    for f in ["run.json", "metrics.jsonl", "rollouts.jsonl"] {
        std::fs::copy(full.join(f), cut.join(f)).unwrap();
    }
    let c = cut.display().to_string();
    let mut args = grpo_args(&m, &d, &c);
    args.extend(extra);
    args.push("--resume");
    let summary = stdout_json(&ok(&args));
    assert_eq!(summary["resumed_from_step"], 3);
    assert_eq!(
        std::fs::read(full.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(cut.join("adapter_model.safetensors")).unwrap(),
        "resumed adapter differs from the uninterrupted one"
    );
    let strip = |rows: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        rows.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().retain(|k, _| k != "elapsed_s" && !k.starts_with("time_"));
                r
            })
            .collect()
    };
    // Rows after the checkpoint are recomputed and must be identical; the kept rows are
    // re-serialised by the metrics writer (serde_json's float parsing may move the last
    // digit), so those are compared at 1e-12.
    let (a, b) = (strip(metrics(&full)), strip(metrics(&cut)));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        if x["step"].as_u64().unwrap() > 3 {
            assert_eq!(x, y);
        } else {
            for (k, v) in x.as_object().unwrap() {
                let (p, q) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
                assert!((p - q).abs() <= 1e-12 * (1.0 + p.abs()), "step {}: {k} {p} vs {q}", x["step"]);
            }
        }
    }
    assert_eq!(std::fs::read(full.join("rollouts.jsonl")).unwrap(), std::fs::read(cut.join("rollouts.jsonl")).unwrap());

    // Other GRPO options on --resume are refused.
    let mut args = grpo_args(&m, &d, &c);
    args.extend(extra);
    args.extend(["--resume", "--beta", "0.1"]);
    let out = run(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("method options"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn eval_with_an_evaluator_generates_and_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_prompts(tmp.path(), "prompts.jsonl", 3);
    let (m, d) = (tiny("qwen2"), data.display().to_string());
    let base = ["eval", "--model", &m, "--dataset", &d, "--json", "--evaluator", "numeric", "--evaluator", "regex:.", "--max-new-tokens", "5"];
    let greedy = stdout_json(&ok(&base));
    assert_eq!(greedy["prompts"], 3);
    assert_eq!(greedy["samples"], 3);
    for key in ["reward_mean", "reward_std", "failures", "rewards_numeric", "rewards_regex"] {
        assert!(greedy.get(key).is_some(), "{key} missing: {greedy}");
    }
    let mut sampled_args = base.to_vec();
    sampled_args.extend(["--samples", "4", "--temperature", "1.0", "--seed", "3"]);
    let sampled = stdout_json(&ok(&sampled_args));
    assert_eq!(sampled["samples"], 12);
    assert_eq!(sampled, stdout_json(&ok(&sampled_args)), "same seed, same completions");
}

#[test]
fn an_evaluator_that_crashes_costs_rewards_not_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_prompts(tmp.path(), "train.jsonl", 4);
    let out = tmp.path().join("run");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let args = [
        "grpo", "--model", &m, "--dataset", &d, "--output", &o, "--json", "--evaluator", "cmd:exit 3", "--evaluator", "regex:a",
        "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "4", "--steps", "2", "--eval-split", "0",
        "--evaluator-workers", "1",
    ];
    stdout_json(&ok(&args));
    let last = metrics(&out).pop().unwrap();
    assert!(last["evaluator_failures"].as_f64().unwrap() >= 4.0, "{last}");
    assert!(last["rewards_regex"].is_number());
}

#[test]
fn grpo_flags_come_from_config_and_accumulation_takes_more_prompts_per_step() {
    let tmp = tempfile::tempdir().unwrap();
    write_prompts(tmp.path(), "train.jsonl", 6);
    let out = tmp.path().join("run");
    let config = tmp.path().join("grpo.toml");
    // The GRPO and evaluator flags of grpo_args, as config keys (paths relative to the file).
    std::fs::write(
        &config,
        "model = \"MODEL\"\ndataset = \"train.jsonl\"\nevaluator = [\"regex:e\", \"length:1-5\"]\nreward_weights = \"1,0.5\"\nnum_generations = 4\n\
         prompts_per_step = 2\nmax_completion_length = 6\nbatch_size = 4\nlora_rank = 4\ngradient_accumulation_steps = 2\nepochs = 1\neval_split = 0\n"
            .replace("MODEL", &tiny("qwen3")),
    )
    .unwrap();
    let (c, o) = (config.display().to_string(), out.display().to_string());
    let summary = stdout_json(&ok(&["grpo", "--config", &c, "--output", &o, "--json", "--num-generations", "2"]));
    // 6 prompts, 2 per rollout batch, 2 batches per optimizer step: 2 steps make the epoch.
    assert_eq!(summary["steps"], 2, "{summary}");
    let logged = std::fs::read_to_string(out.join("rollouts.jsonl")).unwrap().lines().count();
    assert_eq!(logged, (4 + 2) * 2, "4 prompts then 2, two completions each (the command line's 2 over the file's 4)");

    std::fs::write(&config, "betaa = 1\n").unwrap();
    let bad = run(&["grpo", "--config", &c, "--output", &o]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("grpo.toml") && err.contains("unknown key `betaa`"), "{err}");
}

/// Train one step with each loss variant TRL has: each moves the adapter and logs TRL's metrics for it.
#[test]
fn every_loss_variant_trains_and_logs_trl_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_prompts(tmp.path(), "train.jsonl", 2);
    let (m, d) = (tiny("qwen2"), data.display().to_string());
    let variants: [(&[&str], &[&str]); 6] = [
        (&["--loss-type", "cispo", "--epsilon-high", "5"], &["cispo_clip_ratio"]),
        (&["--loss-type", "sapo", "--sapo-temperature-pos", "0.5", "--sapo-temperature-neg", "2"], &[]),
        (&["--loss-type", "vespo", "--vespo-k-pos", "1.5"], &["vespo/phi_seq_mean"]),
        (&["--loss-type", "luspo", "--importance-sampling-level", "sequence"], &["clip_ratio/region_mean"]),
        (&["--loss-type", "grpo", "--importance-sampling-level", "sequence", "--epsilon", "3e-4", "--epsilon-high", "4e-4"], &["clip_ratio/low_min"]),
        (&["--top-entropy-quantile", "0.2", "--delta", "1.5", "--scale-rewards", "false"], &["clip_ratio/high_max"]),
    ];
    for (k, (flags, keys)) in variants.iter().enumerate() {
        let out = tmp.path().join(format!("run{k}"));
        let o = out.display().to_string();
        let mut args = grpo_args(&m, &d, &o);
        args.extend(["--steps", "2", "--eval-split", "0"]);
        args.extend(flags.iter());
        ok(&args);
        let last = metrics(&out).pop().unwrap();
        assert!(last["loss"].as_f64().unwrap().is_finite(), "{flags:?}: {last}");
        for key in keys.iter() {
            assert!(last[key].is_number(), "{flags:?}: metrics.jsonl lacks {key}: {last}");
        }
    }
}

#[test]
fn bad_loss_options_are_errors_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_prompts(tmp.path(), "train.jsonl", 2);
    let (m, d, o) = (tiny("llama"), data.display().to_string(), tmp.path().join("run").display().to_string());
    for (flags, named) in [
        (["--loss-type", "ppo"], "--loss-type"),
        (["--importance-sampling-level", "group"], "--importance-sampling-level"),
        (["--scale-rewards", "yes"], "--scale-rewards"),
        (["--top-entropy-quantile", "1.5"], "--top-entropy-quantile"),
        (["--sapo-temperature-neg", "0"], "--sapo-temperature-neg"),
        (["--delta", "0.9"], "--delta"),
        (["--stop-on-no-signal", "0"], "--stop-on-no-signal"),
    ] {
        let mut args = grpo_args(&m, &d, &o);
        args.extend(flags);
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named), "{flags:?}: {err}");
    }
    assert!(!tmp.path().join("run").exists(), "a refused run writes nothing");
}

/// `--preview` on an evaluator that always gives the same score: every group is without
/// signal, the advice says what to change, the completions are those the run's first
/// step samples, and nothing is written.
#[test]
fn preview_shows_the_signal_before_a_run_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_prompts(tmp.path(), "train.jsonl", 5);
    let out = tmp.path().join("run");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let constant = ["--evaluator", "regex:.*", "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "6", "--eval-split", "0"];
    let base = ["grpo", "--model", &m, "--dataset", &d, "--lora-rank", "4"];
    let mut args: Vec<&str> = base.to_vec();
    args.extend(constant);
    args.extend(["--preview", "2", "--output", &o]);
    let text = String::from_utf8_lossy(&ok(&args).stdout).to_string();
    assert!(text.contains("groups with zero reward variance: 2 of 2 (100%)"), "{text}");
    assert!(text.contains("--num-generations, now 2") && text.contains("--temperature"), "{text}");
    assert!(text.contains("evaluator failures: none"), "{text}");
    assert!(!out.exists(), "--preview wrote {}", out.display());

    args.push("--json");
    let p = stdout_json(&ok(&args));
    assert_eq!((p["prompts"].as_u64(), p["groups"].as_u64(), p["groups_without_signal"].as_u64()), (Some(2), Some(2), Some(2)), "{p}");
    assert_eq!(p["frac_reward_zero_std"], 1.0);
    assert_eq!(p["buckets"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["buckets"][0]["label"], "1.000");
    assert_eq!(p["buckets"][0]["count"], 4);
    assert!(p["advice"].is_string());

    // The same completions as the run's first step (same prompts, seeds and starting adapter).
    let mut train: Vec<&str> = base.to_vec();
    train.extend(constant);
    train.extend(["--output", &o, "--steps", "1", "--json"]);
    ok(&train);
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(out.join("rollouts.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for e in p["buckets"][0]["examples"].as_array().unwrap() {
        let same = logged.iter().find(|r| r["prompt"] == e["prompt"] && r["g"] == e["g"]).expect("the previewed completion in step 1");
        assert_eq!(same["completion"], e["completion"]);
    }

    // A graded evaluator that fails on some samples: failures are shown.
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--evaluator", "numeric", "--num-generations", "3", "--max-completion-length", "4", "--eval-split", "0", "--preview", "3", "--json"]);
    let p = stdout_json(&ok(&args));
    assert_eq!(p["groups"], 3);
    assert!(p["failures"].is_object());
}

/// A run whose every group has zero reward variance warns once and, with
/// `--stop-on-no-signal K`, ends after K such steps with its checkpoint and status `stopped`.
#[test]
fn a_run_without_signal_warns_once_and_stops_after_k_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_prompts(tmp.path(), "train.jsonl", 4);
    let (m, d) = (tiny("llama"), data.display().to_string());
    let common = ["--evaluator", "regex:.*", "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "4", "--eval-split", "0", "--lora-rank", "4"];

    let out = tmp.path().join("warned");
    let o = out.display().to_string();
    let mut args = vec!["grpo", "--model", &m, "--dataset", &d, "--output", &o, "--steps", "4", "--json"];
    args.extend(common);
    let done = ok(&args);
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(err.matches("no learning signal").count(), 1, "warned once: {err}");
    assert!(err.contains("100% of the groups had zero reward variance") && err.contains("--num-generations, now 2"), "{err}");
    assert!(metrics(&out).iter().skip(1).all(|r| r["frac_reward_zero_std"] == 1.0));

    let out = tmp.path().join("stopped");
    let o = out.display().to_string();
    let mut args = vec!["grpo", "--model", &m, "--dataset", &d, "--output", &o, "--steps", "6", "--checkpoint-interval", "100", "--stop-on-no-signal", "2"];
    args.extend(common);
    let stopped = run(&args);
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success(), "a stopped run exits with a failure status");
    assert!(err.contains("stopped at step 2 of 6") && err.contains("--stop-on-no-signal 2") && err.contains("step-2"), "{err}");
    let run_json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["status"], "stopped");
    assert!(out.join("checkpoints/step-2/adapter_model.safetensors").exists(), "the last step's checkpoint is kept");
    assert!(!out.join("adapter_model.safetensors").exists(), "no final adapter");
    assert_eq!(metrics(&out).last().unwrap()["step"], 2);
}

#[test]
fn shared_flags_a_method_does_not_use_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), "train.jsonl", 2).display().to_string();
    let pairs = crate::dpo_e2e::write_pairs(tmp.path(), "pairs.jsonl", 4).display().to_string();
    let m = tiny("llama");
    let o = tmp.path().join("run").display().to_string();
    let cases: [(&str, &str, &[&str], &str); 4] = [
        ("grpo", &prompts, &["--max-sequence-length", "64"], "--max-sequence-length"),
        ("grpo", &prompts, &["--packing"], "--packing"),
        ("grpo", &prompts, &["--group-by-length"], "--group-by-length"),
        ("dpo", &pairs, &["--group-by-length"], "--group-by-length"),
    ];
    for (method, data, flags, named) in cases {
        let mut args = vec![method, "--model", &m, "--dataset", data, "-o", &o, "--device", "cpu", "--steps", "1"];
        if method == "grpo" {
            args.extend(["--evaluator", "regex:e"]);
        }
        args.extend(flags);
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named) && err.contains("does not apply"), "{method} {flags:?}: {err}");
        assert!(!std::path::Path::new(&o).exists(), "refused before anything was written");
    }
}
