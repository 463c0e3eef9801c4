//! Data-parallel `sft --device cpu,cpu`: two replicas (threads with their own model copy,
//! gradients summed through the in-process communicator, the same code path as NCCL on
//! GPUs apart from the transport) train the adapter that one device trains with the same
//! global batch.

use crate::common::*;

fn run_sft(model: &str, data: &str, out: &std::path::Path, device: &str, extra: &[&str]) -> serde_json::Value {
    let o = out.display().to_string();
    let mut args = vec!["sft", "--model", model, "--dataset", data, "--output", &o, "--device", device, "--json"];
    args.extend(["--steps", "5", "--batch-size", "2", "--learning-rate", "1e-2", "--warmup-ratio", "0", "--eval-split", "0"]);
    args.extend(extra);
    stdout_json(&ok(&args))
}

fn max_relative_difference(a: &std::path::Path, b: &std::path::Path) -> f32 {
    let (wa, wb) = (read_adapter(a), read_adapter(b));
    assert_eq!(wa.len(), wb.len());
    let mut worst = 0f32;
    for (k, va) in &wa {
        let vb = &wb[k];
        let scale = va.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    worst
}

#[test]
fn two_cpu_replicas_train_the_adapter_of_one_device_with_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 16);
    let (m, d) = (tiny("qwen2"), data.display().to_string());
    // Dropout on: each micro-batch's mask is seeded by (step, micro-batch), so the replica
    // that computes micro-batches 2 and 3 draws the masks the single device draws for them.
    let extra = ["--gradient-accumulation-steps", "4", "--lora-dropout", "0.1"];
    let one = tmp.path().join("one");
    let two = tmp.path().join("two");
    let s1 = run_sft(&m, &d, &one, "cpu", &extra);
    let s2 = run_sft(&m, &d, &two, "cpu,cpu", &extra);
    assert_eq!(s1["steps"], s2["steps"]);
    assert_eq!(s1["tokens"], s2["tokens"], "both must see the same global batches");
    // Each micro-batch's gradient is bit-identical on both sides; only the order of the
    // sum over micro-batches differs (per replica, then across), and AdamW's g/sqrt(v)
    // magnifies that rounding in near-zero gradients: 1.5e-5 after 4 steps with the
    // key-tiled attention (a wrong micro-batch split or a lost gradient gives >1e-2).
    let diff = max_relative_difference(&one, &two);
    assert!(diff < 3e-5, "adapters differ by {diff} (relative to each tensor's largest value)");
    // The step losses are the same numbers (summed through f32 across replicas).
    for (a, b) in metrics(&one).iter().zip(metrics(&two).iter()) {
        let (la, lb) = (a["loss"].as_f64().unwrap_or(0.0), b["loss"].as_f64().unwrap_or(0.0));
        assert!((la - lb).abs() <= 1e-5 * la.abs().max(1.0), "step {}: loss {la} vs {lb}", a["step"]);
        assert_eq!(a["loss_tokens"], b["loss_tokens"]);
    }
}

#[test]
fn a_data_parallel_run_resumes_and_odd_accumulation_leaves_a_replica_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let (m, d) = (tiny("llama"), data.display().to_string());
    // Accumulation 3 over 2 replicas: replica 0 takes micro-batches 0 and 1, replica 1 takes 2.
    let extra = ["--gradient-accumulation-steps", "3", "--checkpoint-interval", "2", "--save-total-limit", "0", "--lora-dropout", "0"];
    let one = tmp.path().join("one");
    run_sft(&m, &d, &one, "cpu", &extra);
    // Two replicas, cut back to the checkpoint of step 2, resumed on two replicas.
    let cut = tmp.path().join("cut");
    run_sft(&m, &d, &cut, "cpu,cpu", &extra);
    for step in [4, 5] {
        std::fs::remove_dir_all(cut.join(format!("checkpoints/step-{step}"))).unwrap();
    }
    let o = cut.display().to_string();
    let mut args = vec!["sft", "--model", &m, "--dataset", &d, "--output", &o, "--device", "cpu,cpu", "--json", "--resume"];
    args.extend(["--steps", "5", "--batch-size", "2", "--learning-rate", "1e-2", "--warmup-ratio", "0", "--eval-split", "0"]);
    args.extend(extra);
    let summary = stdout_json(&ok(&args));
    assert_eq!(summary["resumed_from_step"], 2);
    let diff = max_relative_difference(&one, &cut);
    assert!(diff < 1e-5, "adapters differ by {diff}");
}

#[test]
fn bad_device_lists_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path(), "train.jsonl", 4);
    let (m, d) = (tiny("llama"), data.display().to_string());
    let o = tmp.path().join("out").display().to_string();
    for (device, expect) in [("cpu,cuda:0", "all GPUs or all the CPU"), ("cpu,tpu", "unknown device"), ("auto,cpu", "not auto")] {
        let out = run(&["sft", "--model", &m, "--dataset", &d, "--output", &o, "--device", device, "--steps", "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{device}: {err}");
        assert!(err.contains(expect), "{device}: {err}");
    }
    // Methods other than sft say that they train on one device.
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs, "{\"prompt\": \"hi\", \"chosen\": \"yes\", \"rejected\": \"no\"}\n".repeat(4)).unwrap();
    let p = pairs.display().to_string();
    let out = run(&["orpo", "--model", &m, "--dataset", &p, "--output", &o, "--device", "cpu,cpu", "--steps", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("supported by `sft` only"), "{}", String::from_utf8_lossy(&out.stderr));
}
