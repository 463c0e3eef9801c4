//! `sft --trajectory-dataset`: agent rollouts (tool calls and tool results) train as SFT
//! conversations, mixed with --dataset and scaffolded with --system-prompt.
use std::path::Path;

use crate::common::*;

/// qwen2-tiny with the Qwen2.5 chat template, which renders tools and tool calls.
fn tool_model(dir: &Path) -> String {
    let model = dir.join("qwen2-tools");
    copy_dir(Path::new(&tiny("qwen2")), &model);
    std::fs::copy(repo().join("tests/golden/datasets/templates/qwen2.5.jinja"), model.join("chat_template.jinja")).unwrap();
    model.display().to_string()
}

fn write_trajectories(dir: &Path) -> std::path::PathBuf {
    let mut text = String::new();
    for i in 0..6 {
        // OpenAI wire form: arguments as a JSON string, an unanswered tool turn at the end.
        let line = serde_json::json!({
            "messages": [
                {"role": "user", "content": format!("What is {i} + 2?")},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "add", "arguments": format!("{{\"a\": {i}, \"b\": 2}}")}}]},
                {"role": "tool", "tool_call_id": "c1", "content": (i + 2).to_string()},
                {"role": "assistant", "content": format!("{i} + 2 = {}", i + 2)},
                {"role": "tool", "tool_call_id": "c2", "content": "never answered"},
            ],
            "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
            "reward": if i % 2 == 0 { 1.0 } else { 0.0 },
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let path = dir.join("agent.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn trajectories_train_with_the_dataset_and_a_system_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tool_model(tmp.path());
    let traj = write_trajectories(tmp.path());
    let data = write_dataset(tmp.path(), "chat.jsonl", 4);
    let system = tmp.path().join("system.txt");
    std::fs::write(&system, "You can call tools.\n").unwrap();
    let out = tmp.path().join("run");
    let (t, d, s, o) = (traj.display().to_string(), data.display().to_string(), system.display().to_string(), out.display().to_string());
    let summary = stdout_json(&ok(&[
        "sft", "--model", &model, "--dataset", &d, "--trajectory-dataset", &t, "--trajectory-min-reward", "0.5",
        "--system-prompt", &s, "--output", &o, "--steps", "2", "--batch-size", "2", "--lora-rank", "4", "--eval-split", "0", "--json",
    ]));
    assert_eq!(summary["steps"], 2, "{summary}");
    assert!(out.join("adapter_model.safetensors").exists());
    let trained: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("data/sft-data.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 4 chat samples + the 3 trajectories with reward >= 0.5, each with the system prompt first.
    assert_eq!(trained.len(), 7);
    assert!(trained.iter().all(|s| s["messages"][0]["content"] == "You can call tools."));
    let agent = &trained[4];
    assert_eq!(agent["messages"].as_array().unwrap().len(), 5, "system + 4 turns; the unanswered tool turn is dropped");
    assert_eq!(agent["messages"][2]["tool_calls"][0]["function"]["arguments"], serde_json::json!({"a": 0, "b": 2}));
    let provenance: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("data/sft-data.provenance.json")).unwrap()).unwrap();
    assert_eq!(provenance["trajectories"][0]["skipped_below_min_reward"], 3, "{provenance}");
    // The run records the generated file as its dataset, and resumes with the same inputs.
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert!(run.to_string().contains("sft-data.jsonl"), "{run}");
}

#[test]
fn trajectories_alone_are_enough_and_bad_lines_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tool_model(tmp.path());
    let traj = write_trajectories(tmp.path());
    let out = tmp.path().join("run");
    let (t, o) = (traj.display().to_string(), out.display().to_string());
    ok(&["sft", "--model", &model, "--trajectory-dataset", &t, "--output", &o, "--steps", "1", "--batch-size", "2", "--lora-rank", "4", "--eval-split", "0"]);
    assert!(out.join("adapter_model.safetensors").exists());

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "[{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": \"{oops\"}}]}]}\n").unwrap();
    let b = bad.display().to_string();
    let o2 = tmp.path().join("run2").display().to_string();
    let failed = run(&["sft", "--model", &model, "--trajectory-dataset", &b, "--output", &o2, "--steps", "1"]);
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success() && err.contains("bad.jsonl:2:") && err.contains("arguments is not valid JSON"), "{err}");
}

#[test]
fn the_tool_calls_of_a_trajectory_are_in_the_loss() {
    // Straight through the library: the Qwen2.5 template renders the call, and the mask
    // covers it (tool output does not count).
    let tmp = tempfile::tempdir().unwrap();
    let model = tool_model(tmp.path());
    let traj = write_trajectories(tmp.path());
    let (ds, _) = lora_datasets::load_trajectories(&traj, Default::default()).unwrap();
    let bundle = lora_models::load_tokenizer_bundle(&model).unwrap();
    let set = lora_train::data::tokenize_dataset(&bundle, &ds, 512).unwrap();
    let sample = &set.samples[0];
    let learned: Vec<u32> = sample.input_ids.iter().zip(&sample.loss_mask).filter(|(_, &m)| m == 1).map(|(&i, _)| i).collect();
    let text = bundle.tokenizer.decode(&learned, false).unwrap();
    assert!(text.contains("\"name\": \"add\"") && text.contains("0 + 2 = 2"), "{text}");
    assert!(!text.contains("never answered"), "{text}");
}
