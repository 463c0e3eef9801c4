//! End-to-end tests of the job lifecycle on the tiny golden models: `--detach`, the job
//! store under parallel jobs, `jobs list|show|logs|wait|cancel|retry`, a kill -9 found by
//! pid and start time and retried to the same adapter as an uninterrupted run, SIGTERM
//! writing a checkpoint, and the sbatch script of `--backend slurm --dry-run`.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::*;

/// `lora-train ARGS` with its job store in `home`.
pub fn lt(home: &Path, args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("LORA_TRAIN_HOME", home).env("LORA_TRAIN_LOG", "warn").output().expect("spawn lora-train")
}

pub fn lt_ok(home: &Path, args: &[&str]) -> Output {
    let out = lt(home, args);
    assert!(out.status.success(), "lora-train {args:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

pub fn job(home: &Path, id: i64) -> serde_json::Value {
    stdout_json(&lt_ok(home, &["jobs", "show", &id.to_string(), "--json"]))
}

/// Wait until `cond` holds (polling), or fail after `secs`.
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last step in a run directory's metrics.jsonl (0 when there is none yet).
pub fn last_step(run: &Path) -> u64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter_map(|v| v["step"].as_u64()).max().unwrap_or(0)
}

fn sft_args<'a>(model: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec!["sft", "--model", model, "--dataset", data, "--output", out, "--device", "cpu", "--steps", steps, "--checkpoint-interval", "20", "--warmup-ratio", "0"]
}

fn detach(home: &Path, args: &[&str]) -> i64 {
    let mut a = args.to_vec();
    a.extend(["--detach", "--json"]);
    let v = stdout_json(&lt_ok(home, &a));
    v["job_id"].as_i64().unwrap_or_else(|| panic!("no job id in {v}"))
}

#[test]
fn parallel_detached_jobs_a_kill_9_found_dead_and_retried_to_the_uninterrupted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let (m, d) = (tiny("llama"), data.display().to_string());
    let dir = |n: &str| tmp.path().join(n).display().to_string();
    let (reference, victim) = (dir("reference"), dir("victim"));

    // Three short jobs and the victim write to the store at the same time.
    let short: Vec<(i64, PathBuf)> = (0..3)
        .map(|i| {
            let out = dir(&format!("short-{i}"));
            (detach(&home, &sft_args(&m, &d, &out, "30")), PathBuf::from(out))
        })
        .collect();
    let victim_id = detach(&home, &sft_args(&m, &d, &victim, "400"));
    let v = job(&home, victim_id);
    assert_eq!(v["backend"], "local");
    assert!(v["log"].as_str().unwrap().ends_with(&format!("{victim_id}.log")), "{v}");

    // Kill -9 once a checkpoint is behind it and it is well into the next interval.
    wait_for(120, "the victim's progress", || last_step(Path::new(&victim)) >= 50);
    let pid = job(&home, victim_id)["pid"].as_i64().expect("a running job has a pid");
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    wait_for(10, "the kill", || !Path::new(&format!("/proc/{pid}")).exists() || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z"));
    let dead = job(&home, victim_id);
    assert_eq!(dead["status"], "failed", "{dead}");
    assert_eq!(dead["exit_code"], 137);
    assert!(dead["exit_reason"].as_str().unwrap().contains("died without a word"), "{dead}");
    let checkpoint = dead["checkpoint"].as_str().expect("the last checkpoint is recorded");
    assert!(checkpoint.contains("checkpoints/step-"), "{dead}");

    // `jobs wait` exits with the job's status.
    let waited = lt(&home, &["jobs", "wait", &victim_id.to_string()]);
    assert_eq!(waited.status.code(), Some(137));

    let retry = stdout_json(&lt_ok(&home, &["jobs", "retry", &victim_id.to_string(), "--json"]));
    let new_id = retry["job_id"].as_i64().unwrap();
    assert_eq!(retry["retry_of"], victim_id);
    let waited = lt(&home, &["jobs", "wait", &new_id.to_string(), "--timeout", "300"]);
    assert_eq!(waited.status.code(), Some(0), "{}", String::from_utf8_lossy(&waited.stderr));
    let done = job(&home, new_id);
    assert_eq!((done["status"].as_str(), done["retry_of"].as_i64(), done["step"].as_i64()), (Some("completed"), Some(victim_id), Some(400)), "{done}");
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(&victim).join("run.json")).unwrap()).unwrap();
    assert!(run["summary"]["resumed_from_step"].as_u64().unwrap() >= 40, "{run}");

    // The same run, never interrupted, in the foreground: the same adapter, bit for bit.
    lt_ok(&home, &sft_args(&m, &d, &reference, "400"));
    assert_eq!(read_adapter(Path::new(&victim)), read_adapter(Path::new(&reference)), "killed + retried == uninterrupted");

    for (id, out) in &short {
        assert_eq!(lt(&home, &["jobs", "wait", &id.to_string(), "--timeout", "300"]).status.code(), Some(0));
        assert!(out.join("adapter_model.safetensors").exists());
    }
    let list = stdout_json(&lt_ok(&home, &["jobs", "list", "--json"]));
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 6, "3 short, the victim, its retry, the foreground reference: {list}");
    let ids: Vec<i64> = jobs.iter().map(|j| j["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    for j in jobs {
        let expected = if j["id"] == victim_id { "failed" } else { "completed" };
        assert_eq!(j["status"], expected, "{j}");
        assert_eq!(j["command"], "sft");
    }
    let reference_job = jobs.iter().find(|j| j["output"].as_str() == Some(reference.as_str())).expect("the foreground run is a job too");
    assert!(reference_job["log"].is_null(), "a foreground job has no log file");
    let table = String::from_utf8_lossy(&lt_ok(&home, &["jobs", "list"]).stdout).to_string();
    assert!(table.contains("400/400") && table.contains("failed"), "{table}");
}

#[test]
fn cancel_writes_a_checkpoint_and_stops_and_logs_follow_to_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let (m, d) = (tiny("qwen2"), data.display().to_string());
    let out = tmp.path().join("run");
    let o = out.display().to_string();
    // A checkpoint interval the run never reaches: the checkpoint is the signal's.
    let mut args = sft_args(&m, &d, &o, "100000");
    args.extend(["--checkpoint-interval", "100000"]);
    let id = detach(&home, &args);
    wait_for(120, "progress", || last_step(&out) >= 5);
    // Follow the log while the job is cancelled: it must return once the job has ended.
    let home2 = home.clone();
    let follow = std::thread::spawn(move || Command::new(bin()).args(["jobs", "logs", &id.to_string(), "--follow"]).env("LORA_TRAIN_HOME", &home2).output().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let res = lt_ok(&home, &["jobs", "cancel", &id.to_string()]);
    assert!(String::from_utf8_lossy(&res.stdout).contains("cancelled"), "{}", String::from_utf8_lossy(&res.stdout));
    let j = job(&home, id);
    assert_eq!((j["status"].as_str(), j["exit_code"].as_i64()), (Some("cancelled"), Some(143)), "{j}");
    let stopped_at = last_step(&out);
    let checkpoint = out.join("checkpoints").join(format!("step-{stopped_at}"));
    assert!(checkpoint.join("trainer_state.json").exists(), "SIGTERM wrote the checkpoint of the last step ({stopped_at})");
    assert_eq!(j["checkpoint"].as_str(), Some(checkpoint.display().to_string().as_str()));
    assert_eq!(j["step"].as_u64(), Some(stopped_at), "the last step is recorded at the end");
    assert_eq!(lt(&home, &["jobs", "wait", &id.to_string()]).status.code(), Some(143));
    let followed = follow.join().unwrap();
    assert!(followed.status.success());
    let text = String::from_utf8_lossy(&followed.stdout);
    assert!(text.contains("stopped by SIGTERM"), "--follow printed to the end of the job:\n{text}");
    let err = lt(&home, &["jobs", "cancel", &id.to_string()]);
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("already ended"));
    let err = lt(&home, &["jobs", "show", "999"]);
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("no job 999"));
}

#[test]
fn a_foreground_run_stops_cleanly_on_sigint_with_a_checkpoint_to_resume_from() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let (m, d) = (tiny("llama"), data.display().to_string());
    let out = tmp.path().join("run");
    let o = out.display().to_string();
    let child = Command::new(bin()).args(sft_args(&m, &d, &o, "100000")).env("LORA_TRAIN_HOME", &home).env("LORA_TRAIN_LOG", "warn").stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for(120, "progress", || last_step(&out) >= 3);
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let res = child.wait_with_output().unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("stopped by SIGINT") && err.contains("--resume"), "{err}");
    let step = last_step(&out);
    assert!(out.join(format!("checkpoints/step-{step}/adapter_model.safetensors")).exists());
    let list = stdout_json(&lt_ok(&home, &["jobs", "list", "--json"]));
    assert_eq!(list["jobs"][0]["status"], "cancelled");
}

#[test]
fn slurm_dry_run_prints_the_sbatch_script_and_registers_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 4);
    let (m, d, o) = (tiny("llama"), data.display().to_string(), tmp.path().join("out dir").display().to_string());
    let mut args = sft_args(&m, &d, &o, "5");
    args.extend(["--backend", "slurm", "--dry-run", "--slurm-partition", "gpu", "--slurm-account", "lab", "--slurm-time", "2:00:00", "--gpus", "2", "--requeue"]);
    let script = String::from_utf8_lossy(&lt_ok(&home, &args).stdout).to_string();
    for line in ["#!/bin/bash", "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=2:00:00", "#SBATCH --gres=gpu:2", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "export LORA_TRAIN_SLURM_REQUEUE=1"] {
        assert!(script.lines().any(|l| l == line), "missing `{line}` in:\n{script}");
    }
    let exec = script.lines().find(|l| l.starts_with("exec ")).unwrap();
    assert!(exec.contains(" sft --model ") && exec.contains("'") && exec.contains("--backend local --job-id"), "{exec}");
    assert!(!exec.contains("--dry-run"), "the script runs the job, not a dry run: {exec}");
    assert!(script.contains("SLURM_RESTART_COUNT"), "a requeued job resumes:\n{script}");
    let list = stdout_json(&lt_ok(&home, &["jobs", "list", "--json"]));
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "a dry run registers no job");
    let local = lt(&home, &sft_args(&m, &d, &o, "5").into_iter().chain(["--dry-run"]).collect::<Vec<_>>());
    assert!(!local.status.success() && String::from_utf8_lossy(&local.stderr).contains("--backend slurm"));
}

#[test]
fn a_workflow_is_a_job_detached_waited_for_and_its_gate_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let (m, d) = (tiny("qwen2"), data.display().to_string());
    let out = tmp.path().join("wf").display().to_string();
    let args = ["run", "sft", "--model", &m, "--dataset", &d, "--output", &out, "--device", "cpu", "--steps", "2", "--candidate", "rank=4", "--calibration-steps", "0", "--skip-final"];
    // In the background there is no terminal: without --yes it stops at the plan (status 3).
    let id = detach(&home, &args);
    let waited = lt(&home, &["jobs", "wait", &id.to_string()]);
    assert_eq!(waited.status.code(), Some(3), "{}", String::from_utf8_lossy(&waited.stderr));
    let j = job(&home, id);
    assert_eq!((j["command"].as_str(), j["status"].as_str()), (Some("run sft"), Some("awaiting_approval")), "{j}");
    assert!(j["exit_reason"].as_str().unwrap_or_default().contains("--yes"), "{j}");
    // Continued in the background with the approval given.
    let mut yes = args.to_vec();
    yes.extend(["--resume", "--yes"]);
    let id = detach(&home, &yes);
    let waited = lt(&home, &["jobs", "wait", &id.to_string()]);
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stderr));
    let j = job(&home, id);
    assert_eq!(j["status"], "completed", "{j}");
    assert!(Path::new(&out).join("final_report.json").exists());
}

#[test]
fn a_sweep_job_row_shows_the_steps_of_all_its_candidates() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 10);
    let (m, d) = (tiny("llama"), data.display().to_string());
    let out = tmp.path().join("sweep").display().to_string();
    lt_ok(&home, &["sweep", "--model", &m, "--dataset", &d, "--output", &out, "--device", "cpu", "--json", "--steps", "3", "--candidate", "rank=4", "--candidate", "rank=8,steps=2"]);
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(&out).join("sweep.json")).unwrap()).unwrap();
    let best = record["candidates"].as_array().unwrap().iter().filter_map(|c| c["train_loss"].as_f64()).fold(f64::MAX, f64::min);
    let list = stdout_json(&lt_ok(&home, &["jobs", "list", "--json"]));
    let row = list["jobs"].as_array().unwrap().iter().find(|j| j["command"] == "sweep").unwrap_or_else(|| panic!("no sweep job in {list}"));
    assert_eq!((row["step"].as_i64(), row["total_steps"].as_i64()), (Some(5), Some(5)), "{row}");
    assert!((row["loss"].as_f64().unwrap() - best).abs() < 1e-9, "{row} vs best train loss {best}");
}

/// `lora-train ARGS` run from `cwd`, detached, its job id.
fn detach_in(home: &Path, cwd: &Path, args: &[&str]) -> i64 {
    let out = Command::new(bin()).args(args).args(["--detach", "--json"]).current_dir(cwd).env("LORA_TRAIN_HOME", home).env("LORA_TRAIN_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stdout_json(&out)["job_id"].as_i64().unwrap()
}

#[test]
fn a_workflow_with_a_relative_output_is_retried_from_another_directory_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let (here, elsewhere) = (tmp.path().join("here"), tmp.path().join("elsewhere"));
    std::fs::create_dir_all(&here).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    write_dataset(&here, "train.jsonl", 12);
    let m = tiny("qwen2");
    let args = ["run", "sft", "--model", &m, "--dataset", "train.jsonl", "-o", "wf", "--devices", "cpu", "--steps", "2", "--candidate", "rank=4", "--calibration-steps", "0", "--skip-final"];
    let id = detach_in(&home, &here, &args);
    assert_eq!(lt(&home, &["jobs", "wait", &id.to_string()]).status.code(), Some(3));
    let j = job(&home, id);
    assert_eq!(j["output"].as_str(), Some(here.join("wf").display().to_string().as_str()), "the output is stored absolute: {j}");
    // Retried from elsewhere: the workflow's state is found, so the retry resumes it (and
    // stops at the same gate again) instead of refusing a directory that holds a workflow.
    let retry = Command::new(bin()).args(["jobs", "retry", &id.to_string(), "--json"]).current_dir(&elsewhere).env("LORA_TRAIN_HOME", &home).output().unwrap();
    assert!(retry.status.success(), "{}", String::from_utf8_lossy(&retry.stderr));
    let again = stdout_json(&retry)["job_id"].as_i64().unwrap();
    assert_eq!(lt(&home, &["jobs", "wait", &again.to_string()]).status.code(), Some(3));
    let j = job(&home, again);
    assert_eq!(j["status"].as_str(), Some("awaiting_approval"), "{j}");
    assert!(j["argv"].as_array().unwrap().iter().any(|a| a == "--resume"), "{j}");
}

#[test]
fn a_command_that_fails_its_checks_leaves_no_job_row() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let m = tiny("llama");
    let o = tmp.path().join("run").display().to_string();
    for dataset in ["missing.jsonl", "typo.jsonl", "nowhere.jsonl"] {
        let res = lt(&home, &["sft", "--model", &m, "--dataset", dataset, "-o", &o, "--device", "cpu", "--steps", "2"]);
        assert!(!res.status.success());
    }
    let res = lt(&home, &["dpo", "--model", "no-such-model-dir", "--dataset", "x.jsonl", "-o", &o, "--device", "cpu"]);
    assert!(!res.status.success());
    let list = stdout_json(&lt_ok(&home, &["jobs", "list", "--json"]));
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "no run started, so no job: {list}");
}

#[test]
fn a_dpo_workflow_cancelled_mid_sweep_is_cancelled_and_its_retry_continues_it() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let out = tmp.path().join("wf");
    let data = repo().join("examples/json_preferences.train.jsonl").display().to_string();
    let (m, o) = (tiny("qwen2"), out.display().to_string());
    let args = [
        "run", "dpo", "--model", &m, "--dataset", &data, "-o", &o, "--device", "cpu", "--steps", "400", "--checkpoint-interval", "100000",
        "--grid", "beta=0.1,0.5", "--evaluator", "json", "--eval-samples", "2", "--max-new-tokens", "4", "--yes",
    ];
    let id = detach(&home, &args);
    let first = out.join("sweep").join("beta0.1");
    wait_for(300, "the first candidate's progress", || last_step(&first) >= 3);
    let res = lt_ok(&home, &["jobs", "cancel", &id.to_string()]);
    assert!(String::from_utf8_lossy(&res.stdout).contains("cancelled"), "{}", String::from_utf8_lossy(&res.stdout));
    let j = job(&home, id);
    assert_eq!((j["status"].as_str(), j["exit_code"].as_i64()), (Some("cancelled"), Some(143)), "a stop is not a failed candidate: {j}");
    // Without --target-win-rate the candidates train packed: both stopped with a checkpoint.
    let cands = [first.clone(), out.join("sweep").join("beta0.5")];
    for c in &cands {
        let stopped_at = last_step(c);
        assert!(stopped_at < 400, "cancelled mid-run");
        assert!(c.join(format!("checkpoints/step-{stopped_at}/adapter_model.safetensors")).exists(), "{}: the checkpoint was written", c.display());
    }
    assert!(!out.join("compare").exists(), "the workflow stopped; it did not go on to compare a candidate");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("workflow.json")).unwrap()).unwrap();
    assert_eq!(state["status"], "cancelled");

    let retry = stdout_json(&lt_ok(&home, &["jobs", "retry", &id.to_string(), "--json"]));
    let again = retry["job_id"].as_i64().unwrap();
    let waited = lt(&home, &["jobs", "wait", &again.to_string(), "--timeout", "600"]);
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stderr));
    for c in &cands {
        let steps: Vec<u64> = metrics(c).iter().filter(|r| r.get("loss").is_some()).filter_map(|r| r["step"].as_u64()).collect();
        assert!(steps.windows(2).all(|w| w[1] > w[0]), "the candidate continued from its checkpoint, no step twice: {steps:?}");
        assert_eq!(steps.last(), Some(&400));
    }
    assert!(out.join("final_report.json").exists());
}
