//! What a user sees when something is wrong before training starts: plain log lines in a
//! file or a pipe, and argument errors before the model loads.
use crate::common::*;

/// stderr is a pipe here (a job log, CI): no ANSI colour codes in the log lines.
#[test]
fn log_lines_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (m, o) = (tiny("llama"), dir.path().join("out").display().to_string());
    // Rank 128 logs a warning while the options resolve; the missing dataset then stops it.
    let out = run(&["sft", "--model", &m, "--dataset", "/nonexistent/train.jsonl", "-o", &o, "--rank", "128"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rank 128 is outside"), "the warning was logged: {stderr}");
    assert!(!stderr.contains("\x1b["), "colour codes in a pipe: {stderr:?}");
}

/// An unknown evaluator kind is reported before the model loads: with a model that does
/// not exist, the evaluator is still the error the user sees.
#[test]
fn grpo_checks_its_evaluators_before_loading_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"1+1?\"}], \"ground_truth\": \"2\"}\n".repeat(4)).unwrap();
    let o = dir.path().join("out").display().to_string();
    for extra in [&[][..], &["--preview", "2"][..]] {
        let mut args = vec!["grpo", "--model", "/nonexistent/model", "--dataset", data.to_str().unwrap(), "-o", &o, "--evaluator", "numerc"];
        args.extend(extra);
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("unknown evaluator kind `numerc`"), "{extra:?}: {stderr}");
        assert!(!stderr.contains("/nonexistent/model"), "{extra:?}: the model was tried first: {stderr}");
    }
}

/// The same for the commands that generate before they score: eval, compare, pairs.
#[test]
fn generating_commands_check_their_evaluators_before_loading_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"1+1?\"}], \"ground_truth\": \"2\"}\n").unwrap();
    let (d, o) = (data.to_str().unwrap(), dir.path().join("out").display().to_string());
    let m = "/nonexistent/model";
    for args in [
        vec!["eval", "--model", m, "--dataset", d, "--evaluator", "numerc"],
        vec!["compare", "--model", m, "--adapter", "/nonexistent/adapter", "--dataset", d, "-o", &o, "--evaluator", "numerc"],
        vec!["pairs", "--strong", m, "--weak", m, "--dataset", d, "-o", &o, "--evaluator", "numerc"],
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("unknown evaluator kind `numerc`"), "{}: {stderr}", args[0]);
    }
}
