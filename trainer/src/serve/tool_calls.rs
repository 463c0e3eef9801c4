//! Tool calls read from what a model writes, in the two formats of the chat templates
//! this server renders tools with; the reference is vLLM's tool parsers of the same names:
//! - `hermes` (Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
//!   any number of them; the text before the first is the message content.
//! - `llama3_json` (Llama 3.1/3.2): the whole answer is `{"name": ..., "parameters": {...}}`
//!   (or `"arguments"`), optionally after `<|python_tag|>`, several separated by `;`.
//!
//! Text that does not parse (bad JSON, no `name`) stays text, as vLLM leaves it: a model
//! that writes a broken call gets its words back rather than a 500 or a silent drop.
//! Used by `serve` for chat completions (and so by `grpo --agent-url`, whose agents call
//! the policy through the same router); a leaf: it knows nothing of HTTP.
use serde_json::Value;

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const LLAMA_PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    Llama3Json,
}

/// One call: the function's name and its arguments as JSON text (OpenAI's shape).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A finished answer split into message content and tool calls.
#[derive(Clone, Debug, PartialEq)]
pub struct Extracted {
    /// The text that is not a call (None when a call is all there is).
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

impl ToolCallFormat {
    /// `--tool-call-parser` names (vLLM's).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
        }
    }

    /// The format a chat template asks its model to write calls in, from the template's
    /// own text: Qwen's templates spell out `<tool_call>`; Llama 3.1's describe the JSON
    /// `{"name": ..., "parameters": ...}` form under `Environment: ipython`.
    pub fn detect(chat_template: Option<&str>) -> Option<Self> {
        let t = chat_template?;
        if t.contains(HERMES_OPEN) {
            Some(Self::Hermes)
        } else if t.contains("ipython") && t.contains("parameters") {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }

    /// Split a finished answer into content and calls.
    pub fn extract(self, text: &str) -> Extracted {
        let calls = match self {
            Self::Hermes => hermes_calls(text),
            Self::Llama3Json => llama3_calls(text),
        };
        match calls {
            Some((content, calls)) if !calls.is_empty() => Extracted { content: (!content.is_empty()).then(|| content.to_string()), calls },
            _ => Extracted { content: Some(text.to_string()), calls: Vec::new() },
        }
    }

    /// Streaming: the byte offset from which `text` (the answer so far) may be the start
    /// of a call, so it is held back until the answer ends and [`Self::extract`] decides.
    /// None: every byte so far is content.
    pub fn held_from(self, text: &str) -> Option<usize> {
        match self {
            Self::Hermes => text.find(HERMES_OPEN).or_else(|| {
                let n = (1..HERMES_OPEN.len()).rev().find(|&n| text.ends_with(&HERMES_OPEN[..n]))?;
                Some(text.len() - n)
            }),
            Self::Llama3Json => {
                let body = text.trim_start();
                let start = text.len() - body.len();
                let may_be_call = body.is_empty() || body.starts_with('{') || body.starts_with(LLAMA_PYTHON_TAG) || LLAMA_PYTHON_TAG.starts_with(body);
                may_be_call.then_some(start)
            }
        }
    }
}

/// A call object's name and arguments (`arguments`, or Llama's `parameters`).
fn call_of(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments already as a JSON string.
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// `<tool_call>JSON</tool_call>` blocks; an unclosed last block runs to the end (the
/// answer was cut or the model stopped on the closing tag).
fn hermes_calls(text: &str) -> Option<(&str, Vec<ToolCall>)> {
    let first = text.find(HERMES_OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(open) = rest.find(HERMES_OPEN) {
        let body = &rest[open + HERMES_OPEN.len()..];
        let (json, after) = match body.find(HERMES_CLOSE) {
            Some(close) => (&body[..close], &body[close + HERMES_CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(call_of(&serde_json::from_str::<Value>(json.trim()).ok()?)?);
        rest = after;
    }
    Some((&text[..first], calls))
}

/// One or more JSON call objects making up the whole answer.
fn llama3_calls(text: &str) -> Option<(&str, Vec<ToolCall>)> {
    let body = text.trim_start();
    let body = body.strip_prefix(LLAMA_PYTHON_TAG).unwrap_or(body);
    if !body.trim_start().starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    let mut rest = body;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            break;
        }
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = values.next()?.ok()?;
        calls.push(call_of(&v)?);
        rest = &rest[values.byte_offset()..];
    }
    Some(("", calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall { name: name.into(), arguments: arguments.into() }
    }

    #[test]
    fn hermes_reads_every_block_and_keeps_the_text_before() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>";
        let e = ToolCallFormat::Hermes.extract(text);
        assert_eq!(e.content.as_deref(), Some("Let me check.\n"));
        assert_eq!(e.calls, vec![call("weather", r#"{"city":"Paris"}"#), call("time", "{}")]);
        // Only a call: no content; an unclosed block (stopped on the closing tag) still counts.
        let e = ToolCallFormat::Hermes.extract("<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}");
        assert_eq!((e.content, e.calls), (None, vec![call("f", r#"{"x": 1}"#)]));
    }

    #[test]
    fn text_that_is_not_a_valid_call_stays_text() {
        for text in ["no call here", "<tool_call>{\"name\": \"f\", oops}</tool_call>", "<tool_call>{\"arguments\": {}}</tool_call>"] {
            let e = ToolCallFormat::Hermes.extract(text);
            assert_eq!((e.content.as_deref(), e.calls.len()), (Some(text), 0), "{text}");
        }
        for text in ["The answer is 4.", "{not json", "{\"name\": 3}", "[1, 2]"] {
            let e = ToolCallFormat::Llama3Json.extract(text);
            assert_eq!((e.content.as_deref(), e.calls.len()), (Some(text), 0), "{text}");
        }
    }

    #[test]
    fn llama3_json_reads_parameters_and_several_calls() {
        let e = ToolCallFormat::Llama3Json.extract(" {\"name\": \"weather\", \"parameters\": {\"city\": \"Oslo\"}}");
        assert_eq!((e.content, e.calls), (None, vec![call("weather", r#"{"city":"Oslo"}"#)]));
        let e = ToolCallFormat::Llama3Json.extract("<|python_tag|>{\"name\": \"a\", \"arguments\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {}}");
        assert_eq!(e.calls, vec![call("a", r#"{"x":1}"#), call("b", "{}")]);
    }

    #[test]
    fn streaming_holds_back_what_may_start_a_call() {
        let h = ToolCallFormat::Hermes;
        assert_eq!(h.held_from("Sure"), None);
        assert_eq!(h.held_from("Sure <tool"), Some(5));
        assert_eq!(h.held_from("Sure <tool_call>{\"na"), Some(5));
        assert_eq!(h.held_from("a < b"), None);
        let l = ToolCallFormat::Llama3Json;
        assert_eq!(l.held_from(""), Some(0));
        assert_eq!(l.held_from("  {\"name"), Some(2));
        assert_eq!(l.held_from("<|python"), Some(0));
        assert_eq!(l.held_from("Hello {"), None);
    }

    #[test]
    fn the_format_comes_from_the_chat_template() {
        assert_eq!(ToolCallFormat::detect(Some("{% for tool in tools %}<tool_call>{% endfor %}")), Some(ToolCallFormat::Hermes));
        assert_eq!(ToolCallFormat::detect(Some("Environment: ipython ... {\"name\": function name, \"parameters\": ...}")), Some(ToolCallFormat::Llama3Json));
        assert_eq!(ToolCallFormat::detect(Some("{{ messages }}")), None);
        assert_eq!(ToolCallFormat::detect(None), None);
    }
}
