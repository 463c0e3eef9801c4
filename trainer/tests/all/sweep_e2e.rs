//! End-to-end tests of `lora-train sweep` on the tiny golden models: packed candidates
//! equal the same `sft` runs alone, the planner's dry run, a killed worker, divergence,
//! and `--resume`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn sweep_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["sweep", "--model", model, "--dataset", data, "--output", out, "--device", "cpu", "--json"]
}

fn sweep_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap()).unwrap()
}

fn candidate(record: &serde_json::Value, name: &str) -> serde_json::Value {
    record["candidates"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no candidate {name} in {record}")).clone()
}

/// Max over tensors of max|a - b| / max|b|.
fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (read_adapter(a), read_adapter(b));
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (k, va) in &a {
        let vb = &b[k];
        let scale = vb.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        assert!(scale > 0.0, "{k} is all zeros: it never received a gradient");
        let diff = va.iter().zip(vb).fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
        worst = worst.max(diff / scale);
    }
    worst
}

#[test]
fn packed_sweep_candidates_equal_the_same_sft_runs_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 20);
    let out = tmp.path().join("sweep");
    let (m, d, o) = (tiny("qwen2"), data.display().to_string(), out.display().to_string());
    // Different ranks, learning rates, batch shapes (so rows are padded to a common
    // length), accumulation and step counts, all in one process over one base.
    let candidates = [
        ("r4-lr1e-3", vec!["--rank", "4", "--learning-rate", "1e-3", "--epochs", "2"]),
        ("r8-lr5e-4-batch-size2-gradient-accumulation-steps2", vec!["--rank", "8", "--learning-rate", "5e-4", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--epochs", "2"]),
        ("r16-lr2e-3-epochs1", vec!["--rank", "16", "--learning-rate", "2e-3", "--epochs", "1"]),
    ];
    let mut args = sweep_args(&m, &d, &o);
    args.extend(["--epochs", "2", "--candidate", "rank=4,lr=1e-3", "--candidate", "rank=8,lr=5e-4,batch_size=2,gradient_accumulation_steps=2", "--candidate", "rank=16,lr=2e-3,epochs=1"]);
    let packed = Command::new(bin()).args(&args).env("LORA_KERNELS_DECODE_ROWS", "0").env("LORA_TRAIN_LOG", "warn").env("LORA_TRAIN_HOME", std::env::temp_dir().join("lora-train-tests-home")).output().unwrap();
    assert!(packed.status.success(), "{}", String::from_utf8_lossy(&packed.stderr));
    let res = stdout_json(&packed);
    assert_eq!(res["candidates"].as_array().unwrap().len(), 3);
    let record = sweep_json(&out);
    let plan_groups = record["plan"]["groups"].as_array().unwrap();
    assert_eq!(plan_groups.len(), 1, "the three candidates share one base in one process");
    for (name, flags) in &candidates {
        let c = candidate(&record, name);
        assert_eq!(c["status"], "completed", "{c}");
        let solo = tmp.path().join(format!("solo-{name}"));
        let s = solo.display().to_string();
        let mut sft = vec!["sft", "--model", &m, "--dataset", &d, "--output", &s, "--device", "cpu", "--json"];
        sft.extend(flags.iter().copied());
        // Alone through the same per-projection GEMMs that the packed (routed) batch takes:
        // the same numbers up to summation order. Both runs keep the frozen projections on
        // the general GEMM (`LORA_KERNELS_DECODE_ROWS=0`): the AVX-512 tile takes products
        // of at most 256 rows, so the packed batch (every candidate's rows) and a run
        // alone would otherwise sum in different orders, which training amplifies to
        // 1e-4 (the fused-projection check below allows that much for the same reason).
        let per_projection = Command::new(bin()).args(&sft).env("LORA_TRAIN_FUSED_PROJECTIONS", "0").env("LORA_KERNELS_DECODE_ROWS", "0").env("LORA_TRAIN_LOG", "warn").env("LORA_TRAIN_HOME", std::env::temp_dir().join("lora-train-tests-home")).output().unwrap();
        assert!(per_projection.status.success(), "{}", String::from_utf8_lossy(&per_projection.stderr));
        let rel = max_rel_diff(&out.join("candidates").join(name), &solo);
        assert!(rel < 1e-5, "{name}: packed vs alone differ by {rel:e} (relative)");
        // Alone as `sft` runs by default on CPU (q/k/v and gate/up fused into one GEMM
        // each): the fused path's own rounding, still the same training.
        std::fs::remove_dir_all(&solo).unwrap();
        ok(&sft);
        let rel = max_rel_diff(&out.join("candidates").join(name), &solo);
        assert!(rel < 2e-4, "{name}: packed vs alone (fused projections) differ by {rel:e} (relative)");
        // The candidate directory is an sft run directory.
        for f in ["adapter_config.json", "metrics.jsonl", "run.json", "report.md", "loss_curve.svg", "checkpoints"] {
            assert!(out.join("candidates").join(name).join(f).exists(), "{name}: {f} missing");
        }
    }
    let winner = res["winner"].as_str().unwrap();
    let best = res["candidates"].as_array().unwrap().iter().map(|c| c["eval_loss"].as_f64().unwrap()).fold(f64::MAX, f64::min);
    assert_eq!(candidate(&record, winner)["eval_loss"].as_f64().unwrap(), best);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("Scoreboard") && report.contains(winner));
    let svg = std::fs::read_to_string(out.join("eval_curves.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 3, "one eval curve per candidate");
}

#[test]
fn dry_run_plans_simulated_gpus_and_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 10);
    let out = tmp.path().join("sweep");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let mut args = sweep_args(&m, &d, &o);
    args.extend(["--dry-run", "--simulate-devices", "cuda:0=24GiB,cuda:1=80GiB", "--grid", "rank=8,16", "--grid", "lr=1e-4,5e-5"]);
    let plan = stdout_json(&ok(&args));
    let cands = plan["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 4);
    assert!(cands.iter().all(|c| c["device"].as_str().unwrap().starts_with("cuda:") && c["est_memory_bytes"].as_u64().unwrap() > 0));
    assert_eq!(plan["plan"]["groups"].as_array().unwrap().len(), 1, "all four share one base and fit one GPU");
    assert!(!out.exists(), "a dry run writes nothing");
    // Without --dry-run, simulated devices are refused.
    args.retain(|a| *a != "--dry-run");
    let res = run(&args);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("--dry-run"));
}

/// The process ids whose command line contains every needle.
fn find_processes(needles: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if needles.iter().all(|n| cmd.contains(n)) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_killed_worker_fails_only_its_group_and_divergence_retires_only_its_candidate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 10);
    let out = tmp.path().join("sweep");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let mut args = sweep_args(&m, &d, &o);
    // --pack off: one worker per candidate; --max-parallel 1: one after another, the
    // largest (rank 32, a long run) first.
    args.extend([
        "--pack", "off", "--max-parallel", "1", "--warmup-ratio", "0", "--max-grad-norm", "0",
        "--candidate", "rank=32,steps=100000", "--candidate", "rank=4,steps=3", "--candidate", "rank=8,steps=3,lr=1e30",
    ]);
    let child = Command::new(bin()).args(&args).env("LORA_TRAIN_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let spec = out.join("groups").join("group-0.json").display().to_string();
    let t0 = Instant::now();
    let victim = loop {
        if let Some(&pid) = find_processes(&["sweep-worker", &spec]).first() {
            if out.join("candidates/r32-steps100000/metrics.jsonl").exists() {
                break pid;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the first worker never started");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    let res = child.wait_with_output().unwrap();
    assert!(res.status.success(), "one candidate completed, so the sweep succeeds:\n{}", String::from_utf8_lossy(&res.stderr));
    let record = sweep_json(&out);
    let killed = candidate(&record, "r32-steps100000");
    assert_eq!(killed["status"], "failed");
    assert!(killed["error"].as_str().unwrap().contains("worker process exited"), "{killed}");
    assert_eq!(candidate(&record, "r8-lr1e30-steps3")["status"], "diverged");
    assert_eq!(candidate(&record, "r4-steps3")["status"], "completed");
    assert_eq!(record["winner"], "r4-steps3");
    assert!(out.join("candidates/r4-steps3/adapter_model.safetensors").exists());
}

#[test]
fn resume_finishes_a_killed_sweep_to_the_same_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 10);
    let out = tmp.path().join("sweep");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let mut args = sweep_args(&m, &d, &o);
    // r16 finishes after 2 steps; r8 and r4 train on together until step 6.
    args.extend(["--steps", "6", "--checkpoint-interval", "2", "--save-total-limit", "0", "--candidate", "rank=4", "--candidate", "rank=8", "--candidate", "rank=16,steps=2"]);
    ok(&args);
    let res = run(&args);
    assert!(!res.status.success() && String::from_utf8_lossy(&res.stderr).contains("--resume"), "a second sweep into the same directory is refused");

    // Put r4 and r8 back to where a kill after step 4 leaves them.
    let mut finished = Vec::new();
    for name in ["r4", "r8"] {
        let dir = out.join("candidates").join(name);
        let keep: PathBuf = tmp.path().join(format!("{name}-finished"));
        std::fs::create_dir_all(&keep).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::rename(dir.join(f), keep.join(f)).unwrap();
        }
        std::fs::remove_dir_all(dir.join("checkpoints/step-6")).unwrap();
        let run_json = std::fs::read_to_string(dir.join("run.json")).unwrap().replace("\"completed\"", "\"running\"");
        std::fs::write(dir.join("run.json"), run_json).unwrap();
        finished.push((dir, keep));
    }
    let r16_metrics = std::fs::read_to_string(out.join("candidates/r16-steps2/metrics.jsonl")).unwrap();

    let mut changed = args.clone();
    changed.extend(["--resume", "--learning-rate", "1e-3"]);
    let res = run(&changed);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("learning_rate"), "a changed command line is refused with the difference: {err}");

    args.push("--resume");
    let res = stdout_json(&ok(&args));
    assert!(res["candidates"].as_array().unwrap().iter().all(|c| c["status"] == "completed"), "{res}");
    for (dir, keep) in &finished {
        assert_eq!(read_adapter(dir), read_adapter(keep), "{} resumed bit-identical", dir.display());
        let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
        assert_eq!(run["summary"]["resumed_from_step"], 4);
    }
    assert_eq!(std::fs::read_to_string(out.join("candidates/r16-steps2/metrics.jsonl")).unwrap(), r16_metrics, "a completed candidate is not retrained");
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the command name (which may hold spaces) in parentheses: state, ppid.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

#[test]
fn a_sweep_killed_with_sigkill_takes_its_workers_down_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 10);
    let out = tmp.path().join("sweep");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let mut args = sweep_args(&m, &d, &o);
    args.extend(["--steps", "100000", "--checkpoint-interval", "100000", "--candidate", "rank=4"]);
    let mut sweep = Command::new(bin()).args(&args).env("LORA_TRAIN_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let metrics = out.join("candidates/r4/metrics.jsonl");
    let t0 = Instant::now();
    // Wait until the worker trains (a step is written), then kill the sweep alone.
    while std::fs::read_to_string(&metrics).map_or(true, |t| t.lines().count() < 2) {
        assert!(sweep.try_wait().unwrap().is_none(), "the sweep ended early");
        assert!(t0.elapsed() < Duration::from_secs(120), "the worker never trained a step");
        std::thread::sleep(Duration::from_millis(20));
    }
    let workers = children_of(sweep.id());
    assert_eq!(workers.len(), 1, "one worker process");
    sweep.kill().unwrap();
    sweep.wait().unwrap();
    let worker_gone = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')));
    let t1 = Instant::now();
    while !worker_gone(workers[0]) {
        assert!(t1.elapsed() < Duration::from_secs(60), "the worker outlived its sweep by 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // It stopped the way `jobs cancel` stops a run: with a checkpoint to resume from.
    let checkpoints = std::fs::read_dir(out.join("candidates/r4/checkpoints")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("step-")).count();
    assert_eq!(checkpoints, 1, "the worker wrote its checkpoint on the way out");
}

#[test]
fn candidates_that_differ_in_packing_get_their_own_step_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 24);
    let out = tmp.path().join("sweep");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let args = ["sweep", "--model", &m, "--dataset", &d, "-o", &o, "--devices", "cpu", "--json", "--dry-run", "--epochs", "1", "--batch-size", "2",
        "--max-sequence-length", "512", "--grid", "packing=false,true"];
    let plan = stdout_json(&ok(&args));
    let steps: Vec<u64> = plan["candidates"].as_array().unwrap().iter().map(|c| c["total_steps"].as_u64().unwrap()).collect();
    assert_eq!(steps.len(), 2);
    // Short samples packed into 512-token rows make far fewer batches than one sample a row.
    assert!(steps[1] < steps[0], "the packed candidate has its own (smaller) step count: {plan}");
}
