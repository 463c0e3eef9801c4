//! One JSON line -> one checked `Sample`, or the list of everything wrong with it.
//!
//! Every check pushes a message and carries on, so a user sees all the problems of a
//! line at once. Messages name the JSON path (`messages[2].content`) of the problem.
use serde_json::{Map, Value};

use crate::problems::LineProblems;
use crate::sample::{ChatSample, Format, Message, PreferenceSample, PromptSample, Role, Sample};

pub(crate) fn parse_sample(object: &Map<String, Value>, format: Format, problems: &mut LineProblems) -> Option<Sample> {
    let sample = match format {
        Format::Chat => parse_chat(object, problems).map(Sample::Chat),
        Format::Preference => parse_preference(object, problems).map(Sample::Preference),
        Format::Prompts => parse_prompts(object, problems).map(Sample::Prompts),
    };
    if problems.is_empty() {
        sample
    } else {
        None
    }
}

fn parse_chat(object: &Map<String, Value>, problems: &mut LineProblems) -> Option<ChatSample> {
    let messages = required_messages(object, "messages", problems)?;
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        problems.push("no assistant message to learn from (a chat sample needs at least one)");
    } else if !messages.iter().any(Message::is_learned) {
        problems.push("no assistant turn to learn from (every assistant message has weight 0 or neither content nor tool calls)");
    }
    let ground_truth = match object.get("ground_truth") {
        None | Some(Value::Null) => None,
        Some(value) => parse_ground_truth(value, problems),
    };
    let tools = parse_tools(object, problems);
    Some(ChatSample { messages, ground_truth, tools })
}

fn parse_ground_truth(value: &Value, problems: &mut LineProblems) -> Option<Vec<String>> {
    match value {
        Value::String(s) if s.trim().is_empty() => {
            problems.push("`ground_truth` is empty");
            None
        }
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) if items.is_empty() => {
            problems.push("`ground_truth` is an empty list");
            None
        }
        Value::Array(items) => {
            let mut truths = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) => truths.push(s.to_string()),
                    None => problems.push(format!("`ground_truth[{i}]` must be a string, got {}", kind(item))),
                }
            }
            Some(truths)
        }
        other => {
            problems.push(format!("`ground_truth` must be a string or a list of strings, got {}", kind(other)));
            None
        }
    }
}

fn parse_tools(object: &Map<String, Value>, problems: &mut LineProblems) -> Option<Value> {
    match object.get("tools") {
        None | Some(Value::Null) => None,
        Some(tools @ Value::Array(_)) => Some(tools.clone()),
        Some(other) => {
            problems.push(format!("`tools` must be a list of tool schemas, got {}", kind(other)));
            None
        }
    }
}

fn parse_prompts(object: &Map<String, Value>, problems: &mut LineProblems) -> Option<PromptSample> {
    let messages = required_messages(object, "messages", problems)?;
    for (i, message) in messages.iter().enumerate() {
        if !matches!(message.role, Role::System | Role::User) {
            problems.push(format!(
                "messages[{i}]: a prompts-only sample holds system and user messages, found `{}`",
                message.role.as_str()
            ));
        }
    }
    if !messages.iter().any(|m| m.role == Role::User) {
        problems.push("no user message in the prompt");
    }
    let tools = parse_tools(object, problems);
    let extra = object
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "messages" | "tools"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(PromptSample { messages, extra, tools })
}

fn parse_preference(object: &Map<String, Value>, problems: &mut LineProblems) -> Option<PreferenceSample> {
    let tools = parse_tools(object, problems);
    if object.contains_key("preferred_output") || object.contains_key("non_preferred_output") {
        return parse_fireworks_preference(object, tools, problems);
    }
    parse_trl_preference(object, tools, problems)
}

/// `{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}`
fn parse_fireworks_preference(
    object: &Map<String, Value>,
    tools: Option<Value>,
    problems: &mut LineProblems,
) -> Option<PreferenceSample> {
    let prompt = match object.get("input") {
        Some(Value::Object(input)) => required_messages(input, "input.messages", problems),
        Some(other) => {
            problems.push(format!("`input` must be an object with `messages`, got {}", kind(other)));
            None
        }
        None => {
            problems.push("missing field `input` (an object with the prompt `messages`)");
            None
        }
    };
    let chosen = completion(object, "preferred_output", problems).filter(|c| outputs_ok(c, "preferred_output", problems));
    let rejected = completion(object, "non_preferred_output", problems).filter(|r| outputs_ok(r, "non_preferred_output", problems));
    Some(PreferenceSample { prompt: prompt?, chosen: chosen?, rejected: rejected?, tools })
}

/// TRL: `{"prompt" | "messages": str | [msg], "chosen": str | [msg], "rejected": str | [msg]}`,
/// or the implicit-prompt form where `chosen`/`rejected` are whole conversations that
/// share the prompt as a common prefix.
fn parse_trl_preference(
    object: &Map<String, Value>,
    tools: Option<Value>,
    problems: &mut LineProblems,
) -> Option<PreferenceSample> {
    let prompt_key = ["prompt", "messages"].into_iter().find(|k| object.contains_key(*k));
    let chosen = completion(object, "chosen", problems);
    let rejected = completion(object, "rejected", problems);
    match prompt_key {
        Some(key) => {
            let prompt = match &object[key] {
                Value::String(text) if text.trim().is_empty() => {
                    problems.push(format!("`{key}` is empty"));
                    None
                }
                Value::String(text) => Some(vec![Message::user(text.clone())]),
                value => messages_list(value, key, problems),
            };
            let chosen = chosen.filter(|c| outputs_ok(c, "chosen", problems));
            let rejected = rejected.filter(|r| outputs_ok(r, "rejected", problems));
            Some(PreferenceSample { prompt: prompt?, chosen: chosen?, rejected: rejected?, tools })
        }
        None => {
            let (chosen, rejected) = (chosen?, rejected?);
            let shared = chosen.iter().zip(&rejected).take_while(|(a, b)| a == b).count();
            if shared == 0 {
                problems.push("missing field `prompt` (or `messages`), and `chosen`/`rejected` share no prompt prefix");
                return None;
            }
            let (chosen_out, rejected_out) = (&chosen[shared..], &rejected[shared..]);
            let ok = outputs_ok(chosen_out, "chosen", problems) & outputs_ok(rejected_out, "rejected", problems);
            ok.then(|| PreferenceSample { prompt: chosen[..shared].to_vec(), chosen: chosen_out.to_vec(), rejected: rejected_out.to_vec(), tools })
        }
    }
}

/// A completion: a string (one assistant message) or a list of messages with at least
/// one assistant message.
fn completion(object: &Map<String, Value>, key: &str, problems: &mut LineProblems) -> Option<Vec<Message>> {
    match object.get(key) {
        None => {
            problems.push(format!("missing field `{key}`"));
            None
        }
        Some(Value::String(text)) if text.trim().is_empty() => {
            problems.push(format!("`{key}` is empty"));
            None
        }
        Some(Value::String(text)) => Some(vec![Message::assistant(text.clone())]),
        Some(value) => {
            let messages = messages_list(value, key, problems)?;
            if !messages.iter().any(|m| m.role == Role::Assistant) {
                problems.push(format!("`{key}` has no assistant message"));
            }
            Some(messages)
        }
    }
}

/// The output side of a pair (after the shared prompt): present, and only what the model
/// writes (assistant turns and the tool results between them). A user or system message
/// here means the two conversations diverge before the answer, or the line is mislabelled.
fn outputs_ok(messages: &[Message], key: &str, problems: &mut LineProblems) -> bool {
    if messages.is_empty() {
        problems.push(format!("`{key}` is empty after the prompt it shares with the other side (nothing to compare)"));
        return false;
    }
    let mut ok = true;
    for (i, m) in messages.iter().enumerate() {
        if matches!(m.role, Role::System | Role::User) {
            problems.push(format!("`{key}` output message {i} has role `{}`; outputs hold assistant (and tool) messages only", m.role.as_str()));
            ok = false;
        }
    }
    ok
}

fn required_messages(object: &Map<String, Value>, key: &str, problems: &mut LineProblems) -> Option<Vec<Message>> {
    let field = key.rsplit('.').next().unwrap_or(key);
    match object.get(field) {
        None => {
            problems.push(format!("missing field `{key}`"));
            None
        }
        Some(value) => messages_list(value, key, problems),
    }
}

fn messages_list(value: &Value, key: &str, problems: &mut LineProblems) -> Option<Vec<Message>> {
    let Value::Array(items) = value else {
        problems.push(format!("`{key}` must be a list of messages, got {}", kind(value)));
        return None;
    };
    if items.is_empty() {
        problems.push(format!("`{key}` is an empty list"));
        return None;
    }
    let before = problems.messages.len();
    let messages: Vec<Message> =
        items.iter().enumerate().filter_map(|(i, item)| parse_message(item, &format!("{key}[{i}]"), problems)).collect();
    (problems.messages.len() == before).then_some(messages)
}

fn parse_message(value: &Value, at: &str, problems: &mut LineProblems) -> Option<Message> {
    let Value::Object(fields) = value else {
        problems.push(format!("{at} must be an object with `role` and `content`, got {}", kind(value)));
        return None;
    };
    let role = match fields.get("role") {
        None => {
            problems.push(format!("{at}: missing field `role`"));
            None
        }
        Some(Value::String(name)) => {
            let role = Role::parse(name);
            if role.is_none() {
                problems.push(format!("{at}: unknown role `{name}` (expected system, user, assistant or tool)"));
            }
            role
        }
        Some(other) => {
            problems.push(format!("{at}.role must be a string, got {}", kind(other)));
            None
        }
    };
    let tool_calls = match fields.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(calls) => {
            check_tool_calls(calls, at, problems);
            Some(calls.clone())
        }
    };
    let content = parse_content(fields.get("content"), at, problems);
    let weight = match fields.get("weight") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(w) if w == 0.0 || w == 1.0 => Some(w as f32),
            _ => {
                problems.push(format!("{at}.weight must be 0 or 1, got {n}"));
                None
            }
        },
        Some(other) => {
            problems.push(format!("{at}.weight must be 0 or 1, got {}", kind(other)));
            None
        }
    };
    let role = role?;
    let content = content?;
    if role != Role::Assistant && weight.is_some() {
        problems.push(format!("{at}: `weight` is only allowed on assistant messages"));
    }
    if role != Role::Assistant && tool_calls.is_some() {
        problems.push(format!("{at}: `tool_calls` is only allowed on assistant messages"));
    }
    if content.trim().is_empty() && tool_calls.is_none() {
        problems.push(format!("{at}: empty content"));
    }
    let tool_call_id = fields.get("tool_call_id").and_then(Value::as_str).map(str::to_string);
    let name = fields.get("name").and_then(Value::as_str).map(str::to_string);
    Some(Message { role, content, weight, tool_calls, tool_call_id, name })
}

/// `content` is a string, or OpenAI content parts `[{"type": "text", "text": ...}]`
/// (joined); `null`/missing reads as empty (allowed only next to `tool_calls`).
fn parse_content(value: Option<&Value>, at: &str, problems: &mut LineProblems) -> Option<String> {
    match value {
        None | Some(Value::Null) => Some(String::new()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        problems.push(format!("{at}.content[{i}] must be a text part {{\"type\": \"text\", \"text\": ...}}"));
                        return None;
                    }
                }
            }
            Some(text)
        }
        Some(other) => {
            problems.push(format!("{at}.content must be a string, got {}", kind(other)));
            None
        }
    }
}

/// OpenAI form: `[{"id"?, "type": "function", "function": {"name": str, "arguments": str | object}}]`.
fn check_tool_calls(calls: &Value, at: &str, problems: &mut LineProblems) {
    let Value::Array(calls) = calls else {
        problems.push(format!("{at}.tool_calls must be a list, got {}", kind(calls)));
        return;
    };
    for (i, call) in calls.iter().enumerate() {
        let here = format!("{at}.tool_calls[{i}]");
        let Some(function) = call.get("function") else {
            problems.push(format!("{here}: missing field `function` (OpenAI form: {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}})"));
            continue;
        };
        if function.get("name").and_then(Value::as_str).is_none_or(|n| n.is_empty()) {
            problems.push(format!("{here}.function.name must be a non-empty string"));
        }
        match function.get("arguments") {
            Some(Value::String(_)) | Some(Value::Object(_)) => {}
            _ => problems.push(format!("{here}.function.arguments must be a JSON string or an object")),
        }
    }
}

/// The JSON type name, for "must be X, got Y" messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
