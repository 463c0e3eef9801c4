//! End-to-end tests of `lora-train run sft` on a tiny model: the gate without a terminal
//! (exit 3, nothing trained), `--resume --yes` through to the final report, a prompts file
//! converted into a fresh copy, and a workflow killed in its final run that resumes.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("workflow.json")).unwrap()).unwrap()
}

fn phase<'a>(state: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    state["phases"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no phase {name} in {state}"))
}

/// `lora-train ARGS` with stdin from /dev/null (no terminal, as in CI and scripts).
fn run_headless(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).env("LORA_TRAIN_LOG", "warn").stdin(Stdio::null()).output().unwrap()
}

#[test]
fn without_a_terminal_the_plan_stops_with_status_3_and_resume_yes_runs_through() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 20);
    let before = std::fs::read(&data).unwrap();
    let out = tmp.path().join("wf");
    let (m, d, o) = (tiny("qwen2"), data.display().to_string(), out.display().to_string());
    let args = ["run", "sft", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--epochs", "2", "--gpu-hour-price", "2.5"];
    let res = run_headless(&args);
    assert_eq!(res.status.code(), Some(3), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(String::from_utf8_lossy(&res.stderr).contains("--resume --yes"));
    let plan = std::fs::read_to_string(out.join("plan.md")).unwrap();
    for needle in ["r8-lr1.5e-4", "r16-lr1e-4", "r32-lr5e-5", "TFLOPs", "**total**", "16 training, 4 held out", "measured over 3 training steps of `r8-lr1.5e-4`"] {
        assert!(plan.contains(needle), "plan.md lacks {needle}:\n{plan}");
    }
    assert!(!out.join("sweep").exists(), "nothing is trained before the approval");
    assert!(!out.join(".calibration").exists(), "the timed calibration steps leave nothing behind");
    let stopped = state(&out);
    let planned = &phase(&stopped, "plan")["outputs"];
    assert!(planned["calibration"]["tokens_per_s"].as_f64().unwrap() > 0.0, "{planned}");
    assert_eq!(planned["device_flops_per_s"], planned["calibration"]["flops_per_s"], "the estimates use the measured rate");
    assert_eq!(state(&out)["status"], "stopped");
    // A second fresh start refuses the directory; without --resume nothing is overwritten.
    assert!(!run_headless(&args).status.success());

    let mut resume = args.to_vec();
    resume.extend(["--resume", "--yes"]);
    let res = run_headless(&resume);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let st = state(&out);
    assert_eq!(st["status"], "completed");
    assert_eq!(phase(&st, "plan")["attempts"], 1, "a done phase is not rerun");
    assert_eq!(phase(&st, "approval")["attempts"], 2);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    let adapter = Path::new(report["adapter"].as_str().unwrap()).to_path_buf();
    assert!(adapter.join("adapter_model.safetensors").exists());
    assert_eq!(report["scoreboard"].as_array().unwrap().len(), 3);
    let winner = report["winner"].as_str().unwrap();
    let best = report["scoreboard"].as_array().unwrap().iter().map(|r| r["eval_loss"].as_f64().unwrap()).fold(f64::MAX, f64::min);
    let w = report["scoreboard"].as_array().unwrap().iter().find(|r| r["name"] == winner).unwrap();
    assert_eq!(w["eval_loss"].as_f64().unwrap(), best, "the winner has the lowest eval loss");
    let cmp = &report["comparison"];
    assert!(cmp["tuned_eval_loss"].as_f64().unwrap() < cmp["base_eval_loss"].as_f64().unwrap(), "fine-tuning lowers the held-out loss: {cmp}");
    assert_eq!(report["hosting"]["rank_ok"], true);
    assert_eq!(report["hosting"]["base_model_ok"], false, "a local directory is not a hub name");
    assert_eq!(report["final_run"]["retrained"], false, "20 samples are under the tuning subsample: no retraining");
    let md = std::fs::read_to_string(out.join("final_report.md")).unwrap();
    for needle in ["Plan against actual", "Scoreboard", "Base against fine-tuned", "Hosting rules", "PeftModel.from_pretrained", "--lora-modules", "firectl create model"] {
        assert!(md.contains(needle), "final_report.md lacks {needle}");
    }
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains(winner));
    assert_eq!(std::fs::read(&data).unwrap(), before, "the user's dataset is never modified");
}

#[test]
fn prompts_with_ground_truth_train_from_a_fresh_converted_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("prompts.jsonl");
    let mut text = String::new();
    for i in 0..12 {
        text.push_str(&serde_json::json!({"messages": [{"role": "user", "content": format!("What is {i} plus 1?")}], "ground_truth": format!("{}", i + 1)}).to_string());
        text.push('\n');
    }
    std::fs::write(&path, &text).unwrap();
    let out = tmp.path().join("wf");
    let (m, d, o) = (tiny("llama"), path.display().to_string(), out.display().to_string());
    let res = run_headless(&["run", "sft", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--epochs", "1", "--candidate", "rank=4,lr=1e-3", "--evaluator", "auto", "--eval-samples", "2", "--max-new-tokens", "4", "--skip-final", "--yes"]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "the user's file is never modified");
    let st = state(&out);
    let generated = &phase(&st, "inspect")["outputs"]["generated"][0];
    let copy = Path::new(generated["path"].as_str().unwrap());
    let name = copy.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("prompts-chat-20") && name.ends_with(".jsonl"), "{name}");
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(copy).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["messages"][1], serde_json::json!({"role": "assistant", "content": "1"}));
    assert!(copy.with_extension("jsonl.provenance.json").exists());
    assert_eq!(phase(&st, "plan")["outputs"]["evaluators"], serde_json::json!(["numeric"]), "auto picks numeric for number answers");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    assert!(report["comparison"]["base"]["reward_mean"].is_number(), "{}", report["comparison"]);
    assert_eq!(report["hosting"]["rank_ok"], true);
    assert_eq!(report["final_run"]["skipped_because"], "--skip-final");
    assert!(std::fs::read_to_string(out.join("final_report.md")).unwrap().contains("Generated data"));

    // JSON answers: auto infers a schema from them.
    let out = tmp.path().join("wf-json");
    let (d, o) = (repo().join("examples/json_answers.train.jsonl").display().to_string(), out.display().to_string());
    let res = run_headless(&["run", "sft", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--steps", "1", "--candidate", "rank=4", "--evaluator", "auto", "--eval-samples", "2", "--max-new-tokens", "4", "--calibration-steps", "0"]);
    assert_eq!(res.status.code(), Some(3));
    let spec = phase(&state(&out), "plan")["outputs"]["evaluators"][0].as_str().unwrap().to_string();
    let file = spec.strip_prefix("json-schema:").unwrap_or_else(|| panic!("{spec}"));
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    assert_eq!(schema["required"], serde_json::json!(["answer", "topic"]));
    assert!(phase(&state(&out), "plan")["outputs"]["calibration"].is_null(), "--calibration-steps 0");
}

#[test]
fn a_workflow_killed_in_its_final_run_resumes_there() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 20);
    let out = tmp.path().join("wf");
    let (m, d, o) = (tiny("qwen2"), data.display().to_string(), out.display().to_string());
    // 8 tuning samples: the winner retrains on all 16 (160 steps, a checkpoint every 10).
    let args = [
        "run", "sft", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--epochs", "40", "--tuning-samples", "8",
        "--candidate", "rank=4,lr=1e-3", "--candidate", "rank=8,lr=5e-4", "--checkpoint-interval", "10", "--yes",
    ];
    let mut child = Command::new(bin()).args(args).env("LORA_TRAIN_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let ckpts = out.join("final").join("checkpoints");
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_dir(&ckpts).map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("step-")).count()).unwrap_or(0);
        if n >= 1 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the workflow ended before its final run could be killed");
        assert!(t0.elapsed() < Duration::from_secs(300), "no final-run checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let st = state(&out);
    assert_eq!(phase(&st, "sweep")["status"], "done");
    assert_eq!(phase(&st, "final run")["status"], "running", "killed inside the final run");
    let sweep_before = std::fs::read(out.join("sweep").join("sweep.json")).unwrap();

    let mut resume = args.to_vec();
    resume.push("--resume");
    let res = run_headless(&resume);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let st = state(&out);
    assert_eq!(st["status"], "completed");
    assert_eq!(phase(&st, "sweep")["attempts"], 1, "the finished sweep is kept");
    assert_eq!(phase(&st, "final run")["attempts"], 2);
    assert_eq!(std::fs::read(out.join("sweep").join("sweep.json")).unwrap(), sweep_before);
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final").join("run.json")).unwrap()).unwrap();
    assert_eq!(run["status"], "completed");
    assert!(run["summary"]["resumed_from_step"].as_u64().unwrap() >= 10, "the final run continued from its checkpoint: {}", run["summary"]);
    assert_eq!(run["summary"]["steps"], 160);
    assert_eq!(run["config"]["device"], "cpu", "the final run trains on --device, as the sweep did");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    assert_eq!(report["final_run"]["retrained"], true);
    assert!(report["adapter"].as_str().unwrap().ends_with("final"));
}

fn tickets() -> String {
    repo().join("examples/ticket_labels.jsonl").display().to_string()
}

#[test]
fn classify_benchmark_only_prints_per_label_scores_and_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("wf");
    let (m, d, o) = (tiny("llama"), tickets(), out.display().to_string());
    let args = ["run", "classify", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--benchmark-only", "--benchmark-samples", "24", "--max-new-tokens", "4", "--json"];
    let res = run_headless(&args);
    assert_eq!(res.status.code(), Some(3), "no terminal, no --yes: {}", String::from_utf8_lossy(&res.stderr));
    assert!(res.stdout.is_empty());
    let plan = std::fs::read_to_string(out.join("plan.md")).unwrap();
    assert!(plan.contains("imbalance ratio (most / least frequent): 2.0") && plan.contains("label log-likelihood benchmark"), "{plan}");
    assert!(!out.join("confusion-base-1.svg").exists());

    let mut yes = args.to_vec();
    yes.extend(["--resume", "--yes"]);
    let res = run_headless(&yes);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let data = stdout_json(&res);
    let models = data["models"].as_array().unwrap();
    assert_eq!(models.len(), 1);
    let base = &models[0];
    assert_eq!(base["kind"], "base");
    assert_eq!(data["held_out"], 24);
    let per_label = base["per_label"].as_object().unwrap();
    assert_eq!(per_label.keys().collect::<Vec<_>>(), ["account", "billing", "bug", "feature_request"]);
    assert_eq!(per_label.values().map(|v| v["support"].as_u64().unwrap()).sum::<u64>(), 24);
    let matrix = base["confusion"]["matrix"].as_array().unwrap();
    let cells: Vec<u64> = matrix.iter().flat_map(|r| r.as_array().unwrap().iter().map(|c| c.as_u64().unwrap())).collect();
    assert_eq!(cells.iter().sum::<u64>(), 24, "one prediction per held-out sample");
    assert!(matrix.iter().all(|r| r[4] == 0), "log-likelihood always predicts a label, never (other)");
    let correct: u64 = (0..4).map(|i| matrix[i][i].as_u64().unwrap()).sum();
    assert!((base["accuracy"].as_f64().unwrap() - correct as f64 / 24.0).abs() < 1e-12);
    assert_eq!(base["generation"]["samples"], 24);
    let svg = std::fs::read_to_string(out.join("confusion-base-1.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("feature_request"));
    assert!(!out.join("sweep").exists(), "--benchmark-only trains nothing");
    assert!(std::fs::read_to_string(out.join("final_report.md")).unwrap().contains("confusion-base-1.svg"));
}

#[test]
fn classify_trains_and_scores_base_against_fine_tuned() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("wf");
    let (m, d, o) = (tiny("qwen2"), tickets(), out.display().to_string());
    let res = run_headless(&[
        "run", "classify", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--epochs", "1", "--candidate", "rank=4,lr=1e-3",
        "--benchmark-samples", "16", "--max-new-tokens", "4", "--json", "--yes",
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let data = stdout_json(&res);
    let kinds: Vec<&str> = data["models"].as_array().unwrap().iter().map(|m| m["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["base", "fine-tuned"]);
    let tuned = &data["models"][1];
    assert!(tuned["adapter"].as_str().unwrap().contains("r4-lr1e-3"));
    assert!(out.join("confusion-fine-tuned.svg").exists());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    assert_eq!(report["comparison"], data, "--json prints the report's data");
    assert_eq!(report["hosting"]["rank_ok"], true);
    let md = std::fs::read_to_string(out.join("final_report.md")).unwrap();
    assert!(md.contains("accuracy (log-likelihood)") && md.contains("Scoreboard"));
}

#[test]
fn dpo_sweeps_betas_compares_against_the_base_and_stops_at_the_target_win_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("wf");
    let data = repo().join("examples/json_preferences.train.jsonl").display().to_string();
    let (m, o) = (tiny("qwen2"), out.display().to_string());
    let args = [
        "run", "dpo", "--model", &m, "--dataset", &data, "--output", &o, "--device", "cpu", "--epochs", "1", "--grid", "beta=0.1,0.5", "--evaluator", "json",
        "--eval-samples", "4", "--max-new-tokens", "8",
    ];
    let res = run_headless(&args);
    assert_eq!(res.status.code(), Some(3), "{}", String::from_utf8_lossy(&res.stderr));
    let plan = std::fs::read_to_string(out.join("plan.md")).unwrap();
    assert!(plan.contains("`beta0.1`") && plan.contains("`beta0.5`") && plan.contains("compare: 2 models"), "{plan}");
    assert!(!out.join("sweep").exists());

    let mut yes = args.to_vec();
    yes.extend(["--resume", "--yes"]);
    let res = run_headless(&yes);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    let board = report["scoreboard"].as_array().unwrap();
    assert_eq!(board.len(), 2);
    for row in board {
        assert!(row["reward_mean"].as_f64().is_some(), "every candidate has a win rate: {row}");
        assert!(row["eval_loss"].as_f64().unwrap() < row["eval_loss_before"].as_f64().unwrap(), "DPO lowers the held-out loss: {row}");
    }
    assert_eq!(report["final_run"]["retrained"], false);
    assert!(report["comparison"]["compare"]["n"].as_u64().unwrap() == 4);
    let generated = report["generated"].as_array().unwrap();
    assert!(generated[0]["path"].as_str().unwrap().contains("heldout-prompts-20"));

    // A target every candidate reaches stops the sweep after the first one.
    let out2 = tmp.path().join("wf2");
    let o2 = out2.display().to_string();
    let mut early = args.to_vec();
    early[7] = &o2;
    early.extend(["--target-win-rate", "0", "--yes"]);
    let res = run_headless(&early);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out2.join("final_report.json")).unwrap()).unwrap();
    assert_eq!(report["scoreboard"].as_array().unwrap().len(), 1);
    assert!(report["comparison"]["stopped_early_by"].as_str().unwrap().contains("beta0.1"));
    assert!(!out2.join("sweep").join("beta0.5").exists(), "the second candidate never trained");

    // ORPO through the same workflow: its run directories say so.
    let out3 = tmp.path().join("wf3");
    let o3 = out3.display().to_string();
    let mut orpo = args.to_vec();
    orpo[7] = &o3;
    orpo.extend(["--method", "orpo", "--target-win-rate", "0", "--yes"]);
    let res = run_headless(&orpo);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out3.join("sweep").join("beta0.1").join("run.json")).unwrap()).unwrap();
    assert_eq!(run["command"], "orpo", "{run}");
}

#[test]
fn rft_benchmarks_the_base_sweeps_briefly_and_reports_reward_before_and_after() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("wf");
    let data = repo().join("examples/arithmetic.train.jsonl").display().to_string();
    let (m, o) = (tiny("qwen2"), out.display().to_string());
    let args = [
        "run", "rft", "--model", &m, "--dataset", &data, "--output", &o, "--device", "cpu", "--steps", "4", "--sweep-steps", "2", "--num-generations", "2",
        "--max-completion-length", "8", "--prompts-per-step", "2", "--evaluator", "numeric", "--eval-samples", "4", "--grid", "rank=4,8", "--tuning-samples", "20",
    ];
    let res = run_headless(&args);
    assert_eq!(res.status.code(), Some(3), "{}", String::from_utf8_lossy(&res.stderr));
    let plan = std::fs::read_to_string(out.join("plan.md")).unwrap();
    assert!(plan.contains("`r4`") && plan.contains("final GRPO run (4 steps") && plan.contains("reward benchmark"), "{plan}");

    let mut yes = args.to_vec();
    yes.extend(["--resume", "--yes"]);
    let res = run_headless(&yes);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let st = state(&out);
    assert_eq!(phase(&st, "benchmark")["status"], "done");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    assert!(report["comparison"]["reward_before"].is_number() && report["comparison"]["reward_after"].is_number(), "{}", report["comparison"]);
    let board = report["scoreboard"].as_array().unwrap();
    assert_eq!(board.len(), 2);
    assert!(board.iter().all(|r| r["status"] == "completed" && r["reward_mean"].is_number()));
    for name in ["r4", "r8"] {
        let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("sweep").join(name).join("run.json")).unwrap()).unwrap();
        assert_eq!(run["summary"]["steps"], 2, "sweep candidates run --sweep-steps");
        assert_eq!(run["summary"]["train_samples"], 20, "on the tuning subsample");
    }
    let fin: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final").join("run.json")).unwrap()).unwrap();
    assert_eq!(fin["summary"]["steps"], 4);
    assert!(fin["summary"]["train_samples"].as_u64().unwrap() > 20, "the final run takes all the prompts");
    assert_eq!(report["final_run"]["retrained"], true);
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(svg.contains("Held-out reward"), "GRPO runs plot their reward, not minus it");
}

#[test]
fn a_workflow_killed_in_its_sweep_resumes_at_the_unfinished_candidate() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 20);
    let out = tmp.path().join("wf");
    let (m, d, o) = (tiny("qwen2"), data.display().to_string(), out.display().to_string());
    // One candidate at a time, so the first finishes while the second trains.
    let args = [
        "run", "sft", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--epochs", "200", "--max-parallel", "1",
        "--candidate", "rank=4,lr=1e-3", "--candidate", "rank=8,lr=5e-4", "--checkpoint-interval", "50", "--calibration-steps", "0", "--yes",
    ];
    // Its own process group: the kill takes the sweep's worker processes with it, as a
    // Ctrl-C or a batch scheduler would.
    let mut child = Command::new(bin()).args(args).env("LORA_TRAIN_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn().unwrap();
    let cands = out.join("sweep").join("candidates");
    let status = |name: &str| -> Option<String> {
        let text = std::fs::read_to_string(cands.join(name).join("run.json")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["status"].as_str().map(str::to_string)
    };
    let t0 = Instant::now();
    let (first, second) = loop {
        let (a, b) = (status("r4-lr1e-3"), status("r8-lr5e-4"));
        let done = |s: &Option<String>| s.as_deref() == Some("completed");
        if done(&a) != done(&b) && (a.is_some() && b.is_some()) {
            break if done(&a) { ("r4-lr1e-3", "r8-lr5e-4") } else { ("r8-lr5e-4", "r4-lr1e-3") };
        }
        assert!(child.try_wait().unwrap().is_none(), "the workflow ended before one candidate finished and the other started");
        assert!(t0.elapsed() < Duration::from_secs(300), "no finished candidate after 300 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    let pgid = child.id().to_string();
    let killed = Command::new("kill").args(["-s", "KILL", "--", &format!("-{pgid}")]).status().unwrap();
    assert!(killed.success(), "kill -s KILL -- -{pgid} failed");
    child.wait().unwrap();
    let st = state(&out);
    assert_eq!(phase(&st, "sweep")["status"], "running", "killed inside the sweep");
    let kept = std::fs::read(cands.join(first).join("run.json")).unwrap();

    let mut resume = args.to_vec();
    resume.push("--resume");
    let res = run_headless(&resume);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let st = state(&out);
    assert_eq!(st["status"], "completed");
    assert_eq!(phase(&st, "sweep")["attempts"], 2);
    assert_eq!(phase(&st, "plan")["attempts"], 1);
    assert_eq!(std::fs::read(cands.join(first).join("run.json")).unwrap(), kept, "the finished candidate is not trained again");
    assert_eq!(status(second).as_deref(), Some("completed"));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    assert_eq!(report["scoreboard"].as_array().unwrap().len(), 2);
}

#[test]
fn dpo_on_prompts_only_makes_pairs_first() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("wf");
    let data = repo().join("examples/arithmetic.train.jsonl");
    let before = std::fs::read(&data).unwrap();
    let (m, d, o) = (tiny("qwen2"), data.display().to_string(), out.display().to_string());
    let base = ["run", "dpo", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--epochs", "1", "--judge-model", &m, "--eval-samples", "3", "--max-new-tokens", "4"];
    let res = run_headless(&base);
    assert!(!res.status.success() && String::from_utf8_lossy(&res.stderr).contains("--strong"), "prompts-only data needs a strong sampler");
    let mut args = base.to_vec();
    args.extend(["--strong", &m, "--pair-max-new-tokens", "6", "--yes"]);
    let res = run_headless(&args);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let plan = std::fs::read_to_string(out.join("plan.md")).unwrap();
    assert!(plan.contains("pairs by delta learning first") && plan.contains("pairs: 2 samplers x 96 prompts"), "{plan}");
    let st = state(&out);
    let pairs = phase(&st, "data")["outputs"]["pairs"]["path"].as_str().unwrap().to_string();
    assert!(Path::new(&pairs).file_name().unwrap().to_string_lossy().starts_with("pairs-20"));
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("sweep").join("beta0.1").join("run.json")).unwrap()).unwrap();
    assert_eq!(run["config"]["dataset"].as_str().unwrap(), pairs, "the candidates train on the generated pairs");
    assert_eq!(std::fs::read(&data).unwrap(), before, "the user's prompts are never modified");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    assert_eq!(report["generated"].as_array().unwrap().len(), 2, "the pairs and the comparison prompts");
}

#[test]
fn a_model_sweep_trains_every_candidate_on_each_base_and_promotes_across_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 20);
    let out = tmp.path().join("wf");
    let (q, l) = (tiny("qwen2"), tiny("llama"));
    let (d, o, models) = (data.display().to_string(), out.display().to_string(), format!("{q},{l}"));
    let res = run_headless(&[
        "run", "sft", "--model", &q, "--models", &models, "--dataset", &d, "--output", &o, "--device", "cpu", "--epochs", "1", "--candidate", "rank=4,lr=1e-3",
        "--evaluator", "exact", "--eval-samples", "2", "--max-new-tokens", "4", "--calibration-steps", "1", "--yes",
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let plan = std::fs::read_to_string(out.join("plan.md")).unwrap();
    assert!(plan.contains("model sweep") && plan.contains("`m1-r4-lr1e-3`") && plan.contains("`m2-r4-lr1e-3`"), "{plan}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final_report.json")).unwrap()).unwrap();
    let names: Vec<&str> = report["scoreboard"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["m1-r4-lr1e-3", "m2-r4-lr1e-3"]);
    assert!(report["scoreboard"].as_array().unwrap().iter().all(|r| r["reward_mean"].is_number()), "each base's candidates are scored on that base");
    for m in ["m1", "m2"] {
        assert!(out.join("sweep").join(m).join("sweep.json").exists());
    }
    let winner = report["winner"].as_str().unwrap();
    let expected_base = if winner.starts_with("m1-") { &q } else { &l };
    assert_eq!(report["model"].as_str().unwrap(), expected_base.as_str(), "the report names the promoted adapter's base");
}
