//! End-to-end tests of `lora-train sft` / `lora-train eval` on the tiny golden models
//! (tests/golden/models, random weights, ChatML tokenizer). Each run takes about a second.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Common flags for a fast, deterministic CPU run.
fn base_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["sft", "--model", model, "--dataset", data, "--output", out, "--device", "cpu", "--json"]
}

#[test]
fn tiny_model_overfits_small_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 8);
    let out = tmp.path().join("run");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let mut args = base_args(&m, &d, &o);
    args.extend(["--eval-dataset", &d, "--steps", "60", "--batch-size", "4", "--learning-rate", "1e-2", "--lora-rank", "8", "--warmup-ratio", "0"]);
    let summary = stdout_json(&ok(&args));
    let before = summary["initial_eval_loss"].as_f64().unwrap();
    let after = summary["eval_loss"].as_f64().unwrap();
    // Stated factor: the eval loss on the training samples falls at least 5x.
    assert!(after * 5.0 < before, "eval loss {before} -> {after}: did not fall 5x");
    // Run directory contract (ARCHITECTURE.md).
    for f in ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "run.json", "report.md", "loss_curve.svg"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(out.join("checkpoints/step-60/trainer_state.json").is_file());
    assert!(out.join("checkpoints/step-60/optimizer.safetensors").is_file());
    assert!(out.join("checkpoints/step-60/adapter_model.safetensors").is_file());
    let rows = metrics(&out);
    let train_rows: Vec<_> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train_rows.len(), 60);
    for key in ["step", "loss", "lr", "grad_norm", "tokens", "elapsed_s"] {
        assert!(train_rows[0].get(key).is_some(), "{key} missing from metrics rows");
    }
    assert!(rows.iter().any(|r| r.get("eval_loss").is_some()));
    let run_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["status"], "completed");
    assert_eq!(run_json["config"]["lora_rank"], 8);
    assert_eq!(run_json["config"]["learning_rate"], 1e-2);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| 60 |") && report.contains("loss_curve.svg"));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
}

#[test]
fn adapter_reloads_with_the_same_eval_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 8);
    let eval = write_dataset(tmp.path(), "eval.jsonl", 5);
    let out = tmp.path().join("run");
    let (m, d, e, o) = (tiny("qwen2"), data.display().to_string(), eval.display().to_string(), out.display().to_string());
    let mut args = base_args(&m, &d, &o);
    args.extend(["--eval-dataset", &e, "--steps", "12", "--learning-rate", "5e-3", "--lora-dropout", "0.1"]);
    let summary = stdout_json(&ok(&args));
    let trained = summary["eval_loss"].as_f64().unwrap();
    let evaluated = stdout_json(&ok(&["eval", "--model", &m, "--adapter", &o, "--dataset", &e, "--device", "cpu", "--json"]));
    let reloaded = evaluated["eval_loss"].as_f64().unwrap();
    assert!((trained - reloaded).abs() < 1e-5, "sft's final eval loss {trained} vs eval --adapter {reloaded}");
    assert!((evaluated["perplexity"].as_f64().unwrap() - reloaded.exp()).abs() < 1e-6 * reloaded.exp());
    assert!(evaluated["loss_tokens"].as_u64().unwrap() > 0);
    let base = stdout_json(&ok(&["eval", "--model", &m, "--dataset", &e, "--device", "cpu", "--json"]));
    assert!((base["eval_loss"].as_f64().unwrap() - summary["initial_eval_loss"].as_f64().unwrap()).abs() < 1e-5);
}

#[test]
fn batch_4_equals_batch_2_times_accumulation_2() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 16);
    let (m, d) = (tiny("llama"), data.display().to_string());
    let run_with = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let o = out.display().to_string();
        let mut args = base_args(&m, &d, &o);
        // No held-out split: all 16 samples train, so the three runs see the same data.
        args.extend(["--steps", "6", "--learning-rate", "1e-2", "--lora-dropout", "0", "--warmup-ratio", "0", "--eval-split", "0"]);
        args.extend(extra);
        ok(&args);
        out
    };
    let a = run_with("b4", &["--batch-size", "4"]);
    let b = run_with("b2x2", &["--batch-size", "2", "--gradient-accumulation-steps", "2"]);
    let c = run_with("b1x4", &["--batch-size", "1", "--gradient-accumulation-steps", "4"]);
    let (ra, rb, rc) = (metrics(&a), metrics(&b), metrics(&c));
    for i in 0..6 {
        let (la, lb, lc) = (ra[i]["loss"].as_f64().unwrap(), rb[i]["loss"].as_f64().unwrap(), rc[i]["loss"].as_f64().unwrap());
        assert!((la - lb).abs() < 1e-5 && (la - lc).abs() < 1e-5, "step {i}: loss {la} / {lb} / {lc}");
        assert_eq!(ra[i]["loss_tokens"], rb[i]["loss_tokens"]);
    }
    let (wa, wb, wc) = (read_adapter(&a), read_adapter(&b), read_adapter(&c));
    let mut max_diff = 0f32;
    for (k, va) in &wa {
        for other in [&wb, &wc] {
            for (x, y) in va.iter().zip(&other[k]) {
                max_diff = max_diff.max((x - y).abs());
            }
        }
    }
    assert!(max_diff < 1e-4, "adapters differ by {max_diff}");
}

/// Keep every checkpoint, then resume a copy of the run from the middle one.
#[test]
fn resume_from_a_checkpoint_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 10);
    let eval = write_dataset(tmp.path(), "eval.jsonl", 3);
    let full = tmp.path().join("full");
    let (m, d, e, o) = (tiny("qwen3"), data.display().to_string(), eval.display().to_string(), full.display().to_string());
    let common = ["--eval-dataset", &e, "--steps", "9", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--learning-rate", "5e-3", "--lora-dropout", "0.1", "--weight-decay", "0.01", "--checkpoint-interval", "3", "--save-total-limit", "0", "--group-by-length"];
    let mut args = base_args(&m, &d, &o);
    args.extend(common);
    ok(&args);
    // Simulate a run killed after step 4: only checkpoint step-3 and its run.json remain
    // (plus metrics rows past the checkpoint, which the resumed run must replace).
    let cut = tmp.path().join("cut");
    std::fs::create_dir_all(cut.join("checkpoints")).unwrap();
    copy_dir(&full.join("checkpoints/step-3"), &cut.join("checkpoints/step-3"));
    std::fs::copy(full.join("run.json"), cut.join("run.json")).unwrap();
    let rows: Vec<String> = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap().lines().take(6).map(String::from).collect();
    std::fs::write(cut.join("metrics.jsonl"), rows.join("\n") + "\n").unwrap();
    std::fs::create_dir_all(cut.join("checkpoints/.tmp-step-6-1")).unwrap(); // a half-written one
    let c = cut.display().to_string();
    let mut args = base_args(&m, &d, &c);
    args.extend(common);
    args.push("--resume");
    let summary = stdout_json(&ok(&args));
    assert_eq!(summary["resumed_from_step"], 3);
    assert_eq!(
        std::fs::read(full.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(cut.join("adapter_model.safetensors")).unwrap(),
        "resumed adapter differs from the uninterrupted one"
    );
    let strip = |rows: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        rows.into_iter().map(|mut r| { r.as_object_mut().unwrap().remove("elapsed_s"); r }).collect()
    };
    assert_eq!(strip(metrics(&full)), strip(metrics(&cut)));
    assert!(!cut.join("checkpoints/.tmp-step-6-1").exists());
}

/// The real thing: SIGKILL a run at an arbitrary moment, then `--resume` it.
#[test]
fn sigkill_then_resume_gives_the_uninterrupted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let (m, d) = (tiny("llama"), data.display().to_string());
    let common = ["--steps", "120", "--batch-size", "2", "--learning-rate", "3e-3", "--lora-dropout", "0.05", "--checkpoint-interval", "7", "--eval-split", "2"];
    let full = tmp.path().join("full");
    let o = full.display().to_string();
    let mut args = base_args(&m, &d, &o);
    args.extend(common);
    ok(&args);

    let killed = tmp.path().join("killed");
    let k = killed.display().to_string();
    let mut args = base_args(&m, &d, &k);
    args.extend(common);
    let mut child = Command::new(bin()).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Kill once a couple of checkpoints exist (mid-run, possibly mid-write).
    let t0 = Instant::now();
    while !killed.join("checkpoints/step-14").exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(37));
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let killed_early = !killed.join("adapter_model.safetensors").exists();
    // 100+ steps cannot finish within 37 ms, so the kill landed mid-run.
    assert!(killed_early, "the run finished before it was killed");
    let mut args = base_args(&m, &d, &k);
    args.extend(common);
    args.push("--resume");
    ok(&args);
    assert_eq!(
        std::fs::read(full.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(killed.join("adapter_model.safetensors")).unwrap(),
        "adapter after SIGKILL + --resume differs (killed before the end: {killed_early})"
    );
}

#[test]
fn divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 8);
    let out = tmp.path().join("run");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let mut args = base_args(&m, &d, &o);
    args.extend(["--steps", "20", "--learning-rate", "1e30", "--max-grad-norm", "0", "--warmup-ratio", "0", "--checkpoint-interval", "1", "--save-total-limit", "0"]);
    let res = run(&args);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("training diverged at step") && err.contains("last good checkpoint"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists(), "no final adapter after divergence");
    let run_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["status"], "diverged");
    // Every checkpoint left holds finite weights.
    for entry in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        let w = read_adapter(&entry.unwrap().path());
        assert!(w.values().flatten().all(|x| x.is_finite()));
    }
}

#[test]
fn bad_flags_and_bad_data_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 4);
    let (m, d) = (tiny("llama"), data.display().to_string());
    let stderr = |args: &[&str]| {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let o = tmp.path().join("o").display().to_string();
    // Missing required options, all reported at once.
    let e = stderr(&["sft", "--lora-dropout", "2"]);
    assert!(e.contains("missing --model") && e.contains("missing --dataset") && e.contains("missing --output") && e.contains("--lora-dropout"), "{e}");
    // clap-level problems.
    assert!(stderr(&["sft", "--model", &m, "--dataset", &d, "--output", &o, "--steps", "3", "--epochs", "2"]).contains("cannot be used with"));
    assert!(stderr(&["sft", "--model", &m, "--dataset", &d, "--output", &o, "--batch-size", "0"]).contains("at least 1"));
    assert!(stderr(&["sft", "--model", &m, "--dataset", &d, "--output", &o, "--lr-scheduler", "step"]).contains("cosine"));
    assert!(stderr(&["sft", "--model", &m, "--dataset", &d, "--output", &o, "--target-modules", "q_proj,attn"]).contains("attn"));
    // Bad data: every broken line, as FILE:LINE.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n{not json\n{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n",
    )
    .unwrap();
    let b = bad.display().to_string();
    let e = stderr(&["sft", "--model", &m, "--dataset", &b, "--output", &o, "--device", "cpu"]);
    assert!(e.contains(&format!("{b}:2:")) && e.contains(&format!("{b}:3:")), "{e}");
    let e = stderr(&["eval", "--model", &m, "--dataset", &b, "--device", "cpu"]);
    assert!(e.contains(&format!("{b}:2:")), "{e}");
    let e = stderr(&["sft", "--model", &m, "--dataset", "/nonexistent/x.jsonl", "--output", &o, "--device", "cpu"]);
    assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    let e = stderr(&["sft", "--model", "/nonexistent/model", "--dataset", &d, "--output", &o, "--device", "cpu"]);
    assert!(e.contains("/nonexistent/model"), "{e}");
    // A config file with a typo.
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "lerning_rate = 0.1\n").unwrap();
    let e = stderr(&["sft", "--config", &cfg.display().to_string()]);
    assert!(e.contains("lerning_rate"), "{e}");
    // Output directory already holding a run; --resume with a different command line.
    let mut args = base_args(&m, &d, &o);
    args.extend(["--steps", "2"]);
    ok(&args);
    assert!(stderr(&args).contains("--resume"));
    let mut args2 = args.clone();
    args2.extend(["--resume", "--learning-rate", "0.5"]);
    let e = stderr(&args2);
    assert!(e.contains("learning_rate"), "{e}");
    // Same flags, but the dataset changed under the run.
    write_dataset(tmp.path(), "train.jsonl", 5);
    let mut args3 = args.clone();
    args3.push("--resume");
    let e = stderr(&args3);
    assert!(e.contains("training data changed"), "{e}");
    let e = stderr(&["sft", "--model", &m, "--dataset", &d, "--output", &tmp.path().join("none").display().to_string(), "--resume", "--device", "cpu"]);
    assert!(e.contains("nothing to resume"), "{e}");
}

#[test]
fn config_file_is_merged_under_flags_and_written_to_run_json() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 6);
    let cfg = tmp.path().join("sft.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"{}\"\ndataset = \"train.jsonl\"\noutput = \"run\"\nsteps = 3\nlora_rank = 4\nlearning_rate = 1e-3\ntarget_modules = [\"q_proj\", \"v_proj\"]\ndevice = \"cpu\"\n",
            tiny("llama")
        ),
    )
    .unwrap();
    let _ = data;
    let out = ok(&["sft", "--config", &cfg.display().to_string(), "--learning-rate", "2e-3", "--json"]);
    let summary = stdout_json(&out);
    assert_eq!(summary["steps"], 3);
    let run_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run/run.json")).unwrap()).unwrap();
    assert_eq!(run_json["config"]["learning_rate"], 2e-3);
    assert_eq!(run_json["config"]["lora_rank"], 4);
    assert_eq!(run_json["config"]["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    // Neither --eval-dataset nor --eval-split: 20% of the data is held out and evaluated.
    assert_eq!(run_json["config"]["eval_split"], 0.2);
    assert!(metrics(&tmp.path().join("run")).iter().any(|r| r.get("eval_loss").is_some()), "no eval rows");
    let adapter = read_adapter(&tmp.path().join("run"));
    assert!(adapter.keys().all(|k| k.contains("q_proj") || k.contains("v_proj")));
}

