//! Agent trajectories as SFT conversations (`lora-train sft --trajectory-dataset`).
//!
//! A trajectory file is JSONL, one rollout a line, in any of the shapes agents write:
//! - `{"messages": [...], "tools"?: [...]}`: an OpenAI-style message list with assistant
//!   `tool_calls` and `tool` results (the chat format itself);
//! - a bare JSON list of messages;
//! - a prompt and its completion: `{"messages" | "prompt": [...] | "text", "completion":
//!   "text" | message | [messages]}` (this project's GRPO `rollouts.jsonl` rows carry
//!   `messages`, `completion`, `reward` and `stopped`).
//!
//! Each line becomes one chat sample, so the loss covers every assistant turn, its tool
//! calls included (the mask rule of ARCHITECTURE.md), and never tool output. What other
//! dialects write differently is rewritten: `function`/`ipython` roles become `tool`, and
//! tool-call `arguments` given as a JSON string (OpenAI's wire form) become the object the
//! chat templates expect. Turns after the last assistant turn (a tool result the agent
//! never answered) teach nothing and are dropped. Lines that cannot teach anything are
//! skipped and counted, never silently: a truncated rollout (`"stopped": false`), a reward
//! under `min_reward` (or none when a minimum is asked for), no assistant turn. Malformed
//! lines are errors as `FILE:LINE: what`, like every dataset.
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::load::parse_jsonl;
use crate::parse::kind;
use crate::problems::{DatasetError, Problem};
use crate::sample::{Dataset, Format};

/// Which rollouts are worth learning from.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrajectoryFilter {
    /// Keep only rollouts whose `reward` is at least this (rejection-sampling fine-tuning).
    pub min_reward: Option<f64>,
}

/// What happened to the lines of one trajectory file.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrajectoryCounts {
    pub lines: usize,
    pub kept: usize,
    /// `"stopped": false`: the completion was cut at the length limit.
    pub skipped_truncated: usize,
    pub skipped_below_min_reward: usize,
    /// A minimum reward was asked for and the line has none.
    pub skipped_no_reward: usize,
    /// No assistant turn with content or tool calls.
    pub skipped_nothing_to_learn: usize,
    /// Messages after the last assistant turn, dropped.
    pub trailing_messages_dropped: usize,
    /// Tool-call `arguments` strings decoded into JSON objects.
    pub tool_arguments_decoded: usize,
    /// `function` / `ipython` roles rewritten to `tool`.
    pub roles_rewritten: usize,
}

/// Read and convert one trajectory file (the whole file is checked; every problem is
/// reported with its line).
pub fn load_trajectories(path: &Path, filter: TrajectoryFilter) -> Result<(Dataset, TrajectoryCounts), DatasetError> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::file(path, format!("cannot read: {e}")))?;
    parse_trajectories(path, &bytes, filter)
}

/// [`load_trajectories`] on bytes already read.
pub fn parse_trajectories(path: &Path, bytes: &[u8], filter: TrajectoryFilter) -> Result<(Dataset, TrajectoryCounts), DatasetError> {
    let mut counts = TrajectoryCounts::default();
    let mut problems = Vec::new();
    // One output line per input line, so the chat parser's problems name the user's lines.
    let mut normalized: Vec<u8> = Vec::with_capacity(bytes.len());
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if !raw.iter().all(u8::is_ascii_whitespace) {
            counts.lines += 1;
            match normalize_line(raw, filter, &mut counts) {
                Line::Keep(value) => {
                    counts.kept += 1;
                    // Writing a Value to a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut normalized, &value);
                }
                Line::Skip => {}
                // Not JSON, or not an object: the chat parser reports it in its own words.
                Line::AsIs => normalized.extend_from_slice(raw),
                Line::Problem(message) => problems.push(Problem { line: Some(i + 1), message }),
            }
        }
        normalized.push(b'\n');
    }
    let parsed = if counts.kept == 0 && problems.is_empty() && counts.lines > 0 {
        Err(DatasetError::file(path, format!("no trajectory to learn from: {}", describe_skips(&counts))))
    } else {
        parse_jsonl(path, &normalized, Some(Format::Chat))
    };
    match parsed {
        Ok(dataset) if problems.is_empty() => Ok((dataset, counts)),
        Ok(_) => Err(DatasetError { path: path.to_path_buf(), problems }),
        Err(mut error) => {
            error.problems.extend(problems);
            error.problems.sort_by_key(|p| p.line);
            Err(error)
        }
    }
}

/// The skip counts in words, for logs and errors.
pub fn describe_skips(c: &TrajectoryCounts) -> String {
    format!(
        "{} lines, {} kept; skipped: {} truncated, {} below the minimum reward, {} without a reward, {} with no assistant turn",
        c.lines, c.kept, c.skipped_truncated, c.skipped_below_min_reward, c.skipped_no_reward, c.skipped_nothing_to_learn
    )
}

enum Line {
    Keep(Value),
    Skip,
    AsIs,
    Problem(String),
}

fn normalize_line(raw: &[u8], filter: TrajectoryFilter, counts: &mut TrajectoryCounts) -> Line {
    let Ok(value) = serde_json::from_slice::<Value>(raw) else { return Line::AsIs };
    let (messages, object) = match value {
        Value::Array(messages) => (messages, Map::new()),
        Value::Object(object) => match conversation_of(&object) {
            Ok(messages) => (messages, object),
            Err(message) => return Line::Problem(message),
        },
        _ => return Line::AsIs,
    };
    if object.get("stopped") == Some(&Value::Bool(false)) {
        counts.skipped_truncated += 1;
        return Line::Skip;
    }
    if let Some(min) = filter.min_reward {
        match object.get("reward") {
            None | Some(Value::Null) => {
                counts.skipped_no_reward += 1;
                return Line::Skip;
            }
            Some(Value::Number(r)) if r.as_f64().is_some_and(|r| r < min) => {
                counts.skipped_below_min_reward += 1;
                return Line::Skip;
            }
            Some(Value::Number(_)) => {}
            Some(other) => return Line::Problem(format!("`reward` must be a number, got {other}")),
        }
    }
    let mut messages = match rewrite_messages(messages, counts) {
        Ok(m) => m,
        Err(message) => return Line::Problem(message),
    };
    let learnable = |m: &Value| {
        m.get("role").and_then(Value::as_str) == Some("assistant")
            && m.get("weight").and_then(Value::as_f64) != Some(0.0)
            && (m.get("content").and_then(Value::as_str).is_some_and(|c| !c.is_empty())
                || m.get("tool_calls").and_then(Value::as_array).is_some_and(|c| !c.is_empty()))
    };
    let Some(last) = messages.iter().rposition(learnable) else {
        counts.skipped_nothing_to_learn += 1;
        return Line::Skip;
    };
    counts.trailing_messages_dropped += messages.len() - (last + 1);
    messages.truncate(last + 1);
    let mut sample = Map::new();
    sample.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = object.get("tools").filter(|t| !t.is_null()) {
        sample.insert("tools".into(), tools.clone());
    }
    Line::Keep(Value::Object(sample))
}

/// The message list of an object line: `messages` or `prompt`, then `completion` appended.
fn conversation_of(object: &Map<String, Value>) -> Result<Vec<Value>, String> {
    let mut messages = match (object.get("messages"), object.get("prompt")) {
        (Some(Value::Array(m)), _) => m.clone(),
        (None | Some(Value::Null), Some(Value::Array(m))) => m.clone(),
        (None | Some(Value::Null), Some(Value::String(p))) => vec![serde_json::json!({"role": "user", "content": p})],
        (Some(other), _) => return Err(format!("`messages` must be a list of messages, got {}", kind(other))),
        _ => return Err("expected `messages` (a list of messages), a `prompt`, or a JSON list of messages".into()),
    };
    match object.get("completion") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(serde_json::json!({"role": "assistant", "content": text})),
        Some(message @ Value::Object(_)) => messages.push(message.clone()),
        Some(Value::Array(more)) => messages.extend(more.iter().cloned()),
        Some(other) => return Err(format!("`completion` must be a string, a message or a list of messages, got {}", kind(other))),
    }
    Ok(messages)
}

/// Other dialects' roles and tool-call argument strings, rewritten to the chat format.
fn rewrite_messages(messages: Vec<Value>, counts: &mut TrajectoryCounts) -> Result<Vec<Value>, String> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, mut message) in messages.into_iter().enumerate() {
        if let Some(object) = message.as_object_mut() {
            if matches!(object.get("role").and_then(Value::as_str), Some("function" | "ipython")) {
                object.insert("role".into(), Value::String("tool".into()));
                counts.roles_rewritten += 1;
            }
            if let Some(Value::Array(calls)) = object.get_mut("tool_calls") {
                for (j, call) in calls.iter_mut().enumerate() {
                    let Some(arguments) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) else { continue };
                    if let Value::String(text) = arguments {
                        let decoded: Value = serde_json::from_str(text)
                            .map_err(|e| format!("messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}"))?;
                        *arguments = decoded;
                        counts.tool_arguments_decoded += 1;
                    }
                }
            }
        }
        out.push(message);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{Role, Sample};

    fn parse(text: &str, min_reward: Option<f64>) -> Result<(Dataset, TrajectoryCounts), DatasetError> {
        parse_trajectories(Path::new("t.jsonl"), text.as_bytes(), TrajectoryFilter { min_reward })
    }

    fn chat(d: &Dataset, i: usize) -> &crate::sample::ChatSample {
        match &d.samples[i] {
            Sample::Chat(c) => c,
            other => panic!("not chat: {other:?}"),
        }
    }

    #[test]
    fn every_shape_becomes_a_chat_sample() {
        let text = [
            // OpenAI wire form: arguments as a string, a `function` role, a trailing tool turn.
            r#"{"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]}, {"role": "function", "content": "5", "tool_call_id": "c"}, {"role": "assistant", "content": "5"}, {"role": "tool", "content": "ignored"}], "tools": [{"type": "function", "function": {"name": "add"}}]}"#,
            r#"[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]"#,
            r#"{"step": 3, "prompt": 0, "messages": [{"role": "user", "content": "1+1?"}], "completion": "2", "reward": 1.0, "stopped": true}"#,
            r#"{"prompt": "Say yes.", "completion": {"role": "assistant", "content": "yes"}}"#,
        ]
        .join("\n");
        let (d, c) = parse(&text, None).unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(d.lines, [1, 2, 3, 4]);
        assert_eq!((c.kept, c.tool_arguments_decoded, c.roles_rewritten, c.trailing_messages_dropped), (4, 1, 1, 1));
        let first = chat(&d, 0);
        assert_eq!(first.messages.len(), 4);
        assert_eq!(first.messages[2].role, Role::Tool);
        assert_eq!(first.messages[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"], serde_json::json!({"a": 2, "b": 3}));
        assert!(first.tools.is_some());
        assert_eq!(chat(&d, 2).messages.last().unwrap().content, "2");
        assert_eq!(chat(&d, 3).messages[0].content, "Say yes.");
    }

    #[test]
    fn rollouts_that_teach_nothing_are_skipped_and_counted() {
        let text = [
            r#"{"messages": [{"role": "user", "content": "a"}], "completion": "cut", "reward": 1, "stopped": false}"#,
            r#"{"messages": [{"role": "user", "content": "b"}], "completion": "low", "reward": 0.2}"#,
            r#"{"messages": [{"role": "user", "content": "c"}], "completion": "none"}"#,
            r#"{"messages": [{"role": "user", "content": "d"}, {"role": "tool", "content": "x"}], "reward": 0.9}"#,
            r#"{"messages": [{"role": "user", "content": "e"}], "completion": "good", "reward": 0.9}"#,
        ]
        .join("\n");
        let (d, c) = parse(&text, Some(0.5)).unwrap();
        assert_eq!(d.lines, [5]);
        assert_eq!((c.skipped_truncated, c.skipped_below_min_reward, c.skipped_no_reward, c.skipped_nothing_to_learn), (1, 1, 1, 1));
        // Nothing left at all is an error that says why.
        let err = parse(r#"{"messages": [{"role": "user", "content": "a"}], "completion": "x", "stopped": false}"#, None).unwrap_err();
        assert!(err.to_string().contains("no trajectory to learn from") && err.to_string().contains("1 truncated"), "{err}");
    }

    #[test]
    fn bad_lines_name_their_line() {
        let text = [
            r#"[{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]"#,
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}"#,
            "not json",
            r#"{"messages": "text"}"#,
            r#"{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
        ]
        .join("\n");
        let err = parse(&text, None).unwrap_err();
        let lines = err.lines();
        assert!(lines.iter().any(|l| l.starts_with("t.jsonl:2:") && l.contains("arguments is not valid JSON")), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("t.jsonl:3:")), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("t.jsonl:4:") && l.contains("`messages` must be a list")), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("t.jsonl:5:") && l.contains("robot")), "{lines:?}");
        assert!(!lines.iter().any(|l| l.starts_with("t.jsonl:1:")), "{lines:?}");
    }
}
