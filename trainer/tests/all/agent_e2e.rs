//! `grpo --agent-url` end to end with the example agent (`examples/agent/agent.py`, run
//! by python3 with the standard-library client): GRPO steps whose rollouts are
//! multi-turn conversations the agent drives through the trainer's in-process policy
//! server; rollouts that fail or never end are dropped, counted, and the run goes on.
//! python3 is required (CI has it): this test fails rather than skip without it.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::*;

struct Agent {
    child: Child,
    url: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(extra: &[&str]) -> Agent {
    let script = repo().join("examples/agent/agent.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(["--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 is needed to run the example agent (examples/agent/agent.py)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("agent listening on ").unwrap_or_else(|| panic!("the agent did not start: {line:?}")).to_string();
    Agent { child, url }
}

fn write_problems(dir: &Path, name: &str, n: usize) -> PathBuf {
    let mut text = String::new();
    for i in 0..n {
        let line = serde_json::json!({
            "messages": [{"role": "user", "content": format!("Tom has {i} apples and buys {} more. How many apples does he have?", i + 3)}],
            "ground_truth": (2 * i + 3).to_string(),
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn grpo_args<'a>(model: &'a str, data: &'a str, out: &'a str, agent: &'a str) -> Vec<&'a str> {
    // A separate held-out file: every training prompt is used (no split of the 4).
    let eval = Path::new(data).with_file_name("eval.jsonl");
    if !eval.exists() {
        write_problems(eval.parent().unwrap(), "eval.jsonl", 1);
    }
    let eval: &'static str = Box::leak(eval.display().to_string().into_boxed_str());
    vec![
        "grpo", "--model", model, "--dataset", data, "--eval-dataset", eval, "--output", out, "--json", "--agent-url", agent, "--evaluator", "regex:e",
        "--evaluator", "length:1-5", "--reward-weights", "1,0.5", "--num-generations", "4", "--prompts-per-step", "2",
        "--max-completion-length", "6", "--batch-size", "4", "--learning-rate", "5e-3", "--lora-rank", "4", "--device", "cpu",
    ]
}

#[test]
fn grpo_steps_with_the_example_agent_train_on_every_turn() {
    let agent = start_agent(&["--min-turns", "2", "--max-turns", "2", "--max-tokens", "32"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = write_problems(tmp.path(), "problems.jsonl", 4);
    let out = tmp.path().join("run");
    let (m, d, o) = (tiny("qwen3"), data.display().to_string(), out.display().to_string());
    let mut args = grpo_args(&m, &d, &o, &agent.url);
    args.extend(["--steps", "2"]);
    let summary = stdout_json(&ok(&args));
    assert_eq!(summary["steps"], 2);
    let rows = metrics(&out);
    let trained: Vec<&serde_json::Value> = rows.iter().filter(|r| r["step"].as_u64().unwrap_or(0) > 0).collect();
    assert_eq!(trained.len(), 2);
    for r in &trained {
        assert_eq!(r["agent_rollouts"], 8.0, "{r}");
        assert_eq!(r["agent_rollouts_dropped"], 0.0, "{r}");
        // Two model calls per rollout (the agent asks again after the first answer).
        assert_eq!(r["agent_model_calls"], 16.0, "{r}");
        assert!(r["reward"].is_number() && r["loss"].is_number(), "{r}");
        assert!(r["completion_length_max"].as_f64().unwrap() <= 6.0, "the trainer's --max-completion-length caps each call: {r}");
    }
    let logged: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("rollouts.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!logged.is_empty());
    let adapter = read_adapter(&out);
    let moved = adapter.iter().filter(|(k, _)| k.contains("lora_B")).any(|(_, v)| v.iter().any(|&x| x != 0.0));
    assert!(moved, "GRPO with the agent left every LoRA B at its zero init");
}

#[test]
fn failed_and_hung_agent_rollouts_are_dropped_and_the_run_goes_on() {
    let agent = start_agent(&["--fail-every", "3", "--hang-every", "5"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = write_problems(tmp.path(), "problems.jsonl", 2);
    let out = tmp.path().join("run");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let mut args = grpo_args(&m, &d, &o, &agent.url);
    args.extend(["--steps", "1", "--agent-timeout", "3", "--agent-concurrency", "3"]);
    let summary = stdout_json(&ok(&args));
    assert_eq!(summary["steps"], 1);
    let last = metrics(&out).into_iter().last().unwrap();
    // 8 rollouts: the 3rd and 6th fail, the 5th hangs until the timeout.
    assert_eq!(last["agent_rollouts_dropped"], 3.0, "{last}");
    assert_eq!(last["agent_rollouts_timed_out"], 1.0, "{last}");
    assert_eq!(last["agent_rollouts"], 5.0, "{last}");
}

#[test]
fn an_unreachable_agent_is_an_error_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_problems(tmp.path(), "problems.jsonl", 2);
    let out = tmp.path().join("run");
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let (m, d, o) = (tiny("llama"), data.display().to_string(), out.display().to_string());
    let res = run(&grpo_args(&m, &d, &o, &url));
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("--agent-url") && err.contains("does not answer"), "{err}");
}
