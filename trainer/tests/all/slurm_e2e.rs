//! `--backend slurm` against a real Slurm (a one-node cluster on loopback, started by
//! `scripts/slurm/start.sh`; CI runs it before the tests): a two-candidate sweep as a job
//! array plus its final job, cancelled while it trains (the workers checkpoint on
//! SIGTERM), retried from the checkpoints to the same adapters as the runs alone.
use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::jobs_e2e::{job, last_step, lt, lt_ok, wait_for};

/// Is a Slurm controller answering? Without one the test fails under CI (which starts
/// it) and elsewhere unless LORA_TRAIN_NO_SLURM=1 says to skip.
fn slurm_available() -> bool {
    let up = Command::new("sinfo").args(["-h", "-o", "%T"]).output().is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if up {
        return true;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let opted_out = std::env::var("LORA_TRAIN_NO_SLURM").is_ok_and(|v| v == "1");
    if opted_out && !ci {
        eprintln!("skipping: no Slurm here and LORA_TRAIN_NO_SLURM=1");
        return false;
    }
    panic!("no Slurm controller answers `sinfo`: start one with `sudo bash scripts/slurm/start.sh` (or set LORA_TRAIN_NO_SLURM=1 outside CI to skip)");
}

fn sweep_workers_running(spec_dir: &Path) -> bool {
    let needle = spec_dir.display().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        cmd.contains("sweep-worker") && cmd.contains(&needle)
    })
}

#[test]
fn a_sweep_on_slurm_is_cancelled_mid_training_and_retried_to_the_same_adapters() {
    if !slurm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let out = tmp.path().join("sweep");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let steps = "1500";
    let shared = ["--steps", steps, "--checkpoint-interval", "20", "--warmup-ratio", "0"];
    let mut args = vec!["sweep", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu", "--pack", "off", "--candidate", "rank=4", "--candidate", "rank=8,lr=5e-4"];
    args.extend(shared);
    args.extend(["--backend", "slurm", "--slurm-time", "30:00", "--json"]);

    // The dry run shows both scripts: the array of groups, the final job after it.
    let mut dry = args.clone();
    dry.push("--dry-run");
    let scripts = stdout_json(&lt_ok(&home, &dry));
    let scripts = scripts["scripts"].as_array().unwrap();
    assert_eq!(scripts.len(), 2);
    assert!(scripts[0].as_str().unwrap().contains("#SBATCH --array=0,1") && scripts[0].as_str().unwrap().contains("sweep-worker --spec"), "{}", scripts[0]);
    assert!(scripts[1].as_str().unwrap().contains("#SBATCH --dependency=afterok:"), "{}", scripts[1]);
    assert!(!out.join("sweep.json").exists(), "a dry run submits nothing");

    let submitted = stdout_json(&lt_ok(&home, &args));
    let id = submitted["job_id"].as_i64().unwrap();
    let slurm_ids = submitted["slurm_job_ids"].as_array().unwrap();
    assert_eq!(slurm_ids.len(), 2, "{submitted}");
    let listed = stdout_json(&lt_ok(&home, &["jobs", "list", "--json"]));
    assert_eq!((listed["jobs"][0]["id"].as_i64(), listed["jobs"][0]["backend"].as_str()), (Some(id), Some("slurm")), "Slurm jobs are in the same store");

    let cands = [out.join("candidates/r4"), out.join("candidates/r8-lr5e-4")];
    wait_for(180, "both candidates training on Slurm", || cands.iter().all(|c| last_step(c) >= 5));
    assert_eq!(job(&home, id)["status"], "running");
    let res = lt_ok(&home, &["jobs", "cancel", &id.to_string(), "--timeout", "120"]);
    assert!(String::from_utf8_lossy(&res.stdout).contains("cancelled"), "{}", String::from_utf8_lossy(&res.stdout));
    wait_for(60, "the workers to stop", || !sweep_workers_running(&out.join("groups")));
    for c in &cands {
        let step = last_step(c);
        assert!(step < 1500, "{} was cancelled mid-training (steps: {:?})", c.display(), cands.iter().map(|c| last_step(c)).collect::<Vec<_>>());
        assert!(c.join(format!("checkpoints/step-{step}/trainer_state.json")).exists(), "{}: SIGTERM wrote the checkpoint of step {step}", c.display());
    }
    let logs = String::from_utf8_lossy(&lt_ok(&home, &["jobs", "logs", &id.to_string()]).stdout).to_string();
    assert!(logs.contains(".group-0.log") && logs.contains("stopped by SIGTERM"), "the groups' Slurm output files:\n{logs}");

    let retry = stdout_json(&lt_ok(&home, &["jobs", "retry", &id.to_string(), "--json"]));
    let new_id = retry["job_id"].as_i64().unwrap();
    let waited = lt(&home, &["jobs", "wait", &new_id.to_string(), "--timeout", "600"]);
    let new_job = job(&home, new_id);
    assert_eq!(waited.status.code(), Some(0), "{new_job}\n{}", String::from_utf8_lossy(&lt(&home, &["jobs", "logs", &new_id.to_string()]).stdout));
    assert_eq!((new_job["backend"].as_str(), new_job["retry_of"].as_i64()), (Some("slurm"), Some(id)));

    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(record["status"], "completed", "the final job wrote the scoreboard");
    for (c, flags) in cands.iter().zip([vec!["--rank", "4"], vec!["--rank", "8", "--learning-rate", "5e-4"]]) {
        let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(c.join("run.json")).unwrap()).unwrap();
        assert_eq!(run["status"], "completed");
        assert!(run["summary"]["resumed_from_step"].as_u64().unwrap() >= 5, "{run}");
        // The same candidate as a plain sft run, never interrupted.
        let solo = tmp.path().join(format!("solo-{}", c.file_name().unwrap().to_string_lossy()));
        let s = solo.display().to_string();
        let mut sft = vec!["sft", "--model", &m, "--dataset", &d, "--output", &s, "--device", "cpu"];
        sft.extend(shared);
        sft.extend(flags);
        lt_ok(&home, &sft);
        let (a, b) = (read_adapter(c), read_adapter(&solo));
        assert_eq!(a.len(), b.len());
        for (k, va) in &a {
            let vb = &b[k];
            let scale = vb.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{k} never trained");
            let diff = va.iter().zip(vb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff / scale < 1e-5, "{}: {k} differs from the uninterrupted run by {:e} (relative)", c.display(), diff / scale);
        }
    }
}

fn squeue_state(slurm_id: &str) -> String {
    let out = Command::new("squeue").args(["-h", "-t", "all", "-j", slurm_id, "-o", "%T"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn preemption_usr1_checkpoints_requeues_and_the_requeued_job_resumes_to_the_same_adapter() {
    if !slurm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let (m, d) = (tiny("qwen2"), data.display().to_string());
    let (out, reference) = (tmp.path().join("run"), tmp.path().join("reference"));
    let (o, r) = (out.display().to_string(), reference.display().to_string());
    // No checkpoint interval reached: the only checkpoint is the one the signal writes.
    let train = |dir: &str| -> Vec<String> {
        ["sft", "--model", &m, "--dataset", &d, "--output", dir, "--device", "cpu", "--steps", "800", "--checkpoint-interval", "100000", "--warmup-ratio", "0"].iter().map(|s| s.to_string()).collect()
    };
    let mut args = train(&o);
    args.extend(["--backend", "slurm", "--requeue", "--json"].map(String::from));
    let submitted = stdout_json(&lt_ok(&home, &args.iter().map(String::as_str).collect::<Vec<_>>()));
    let id = submitted["job_id"].as_i64().unwrap();
    let sid = submitted["slurm_job_ids"][0].as_str().unwrap().to_string();
    wait_for(180, "training on Slurm", || last_step(&out) >= 20);
    // What Slurm sends --signal=B:USR1@120 jobs before their time limit (or preemption).
    assert!(Command::new("scancel").args(["--signal=USR1", "--batch", &sid]).status().unwrap().success());
    wait_for(60, "the requeue", || job(&home, id)["exit_reason"].as_str().is_some_and(|r| r.contains("requeued")));
    let j = job(&home, id);
    assert_eq!(j["status"], "queued", "{j}");
    let stopped = j["checkpoint"].as_str().expect("the checkpoint the signal wrote").to_string();
    // Slurm holds a requeued job back for a while (its begin time); let it start now.
    wait_for(60, "the job back in the queue", || squeue_state(&sid) == "PENDING");
    // slurmd refuses a launch whose credential is not newer (1 s resolution) than the
    // revocation of the job's previous run ("Job credential revoked", the job FAILED with
    // exit 1 in a run where all this happened within one second): Slurm's own begin-time
    // delay avoids that, and so does waiting 2 s before starting it by hand.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let _ = Command::new("scontrol").args(["update", &format!("JobId={sid}"), "StartTime=now"]).status();
    let waited = lt(&home, &["jobs", "wait", &id.to_string(), "--timeout", "300"]);
    if waited.status.code() != Some(0) {
        // Keep the job's log in the failure message (the test's temp dir is gone after it).
        let j = job(&home, id);
        let log = j["log"].as_str().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        panic!("the requeued job did not succeed: {j}\n--- its log (last 40 lines) ---\n{}", tail.join("\n"));
    }
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let resumed = run["summary"]["resumed_from_step"].as_u64().expect("the requeued job resumed");
    assert!(stopped.ends_with(&format!("step-{resumed}")), "resumed from {resumed}, the signal's checkpoint was {stopped}");
    lt_ok(&home, &train(&r).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(read_adapter(&out), read_adapter(&reference), "preempted + requeued == uninterrupted");
}
