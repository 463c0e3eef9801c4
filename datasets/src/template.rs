//! Chat templates rendered with minijinja the way transformers' `apply_chat_template`
//! renders them with jinja2, so the token sequences we train on are the ones the model
//! sees at inference.
//!
//! What transformers sets up, and what we mirror:
//! - `trim_blocks` + `lstrip_blocks`, no trailing-newline keeping, no auto-escaping;
//! - `loopcontrols` (`{% break %}`), Python string/dict methods (`.strip()`, `.items()`:
//!   minijinja-contrib's `pycompat` callback);
//! - globals `raise_exception(msg)` and `strftime_now(fmt)`; filter `tojson` as Python's
//!   `json.dumps` (`pyjson.rs`);
//! - context: `messages`, `tools` (None when absent), `documents` (None),
//!   `add_generation_prompt`, and the tokenizer's `bos_token` / `eos_token`;
//! - `{% generation %}` blocks (transformers' assistant-mask extension) render their body.
//!
//! jinja2 prints Python's `None`/`True`/`False`; minijinja would print `none`/`true`, so a
//! formatter restores Python's spelling.
use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use minijinja::value::ValueKind;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::json;

use crate::sample::Message;
use crate::strftime::{strftime, unix_now};

const TEMPLATE_NAME: &str = "chat_template";

/// The ChatML template used when a model ships none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    extra_context: BTreeMap<String, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

impl ChatTemplate {
    /// Compile a Jinja chat template (e.g. `tokenizer_config.json`'s `chat_template`).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", crate::pyjson::tojson_filter);
        env.add_function("raise_exception", raise_exception);
        set_clock(&mut env, None);
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source))
            .context("the chat template does not compile")?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            extra_context: BTreeMap::new(),
        })
    }

    /// The ChatML fallback for models without a template.
    pub fn chatml() -> Self {
        // The constant is known to compile (tested), so this cannot fail.
        Self::new(CHATML_TEMPLATE, None, None).expect("the built-in ChatML template compiles")
    }

    /// Pin the instant `strftime_now` formats (unix seconds, UTC), for reproducible renders.
    pub fn with_fixed_now(mut self, unix_seconds: i64) -> Self {
        set_clock(&mut self.env, Some(unix_seconds));
        self
    }

    /// Extra template variables, as `apply_chat_template(**kwargs)` passes them
    /// (e.g. `enable_thinking`, `date_string`).
    pub fn with_context(mut self, name: &str, value: serde_json::Value) -> Self {
        self.extra_context.insert(name.to_string(), Value::from_serialize(&value));
        self
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let messages: Vec<serde_json::Value> = messages.iter().map(template_message).collect();
        let mut context: BTreeMap<String, Value> = self.extra_context.clone();
        context.insert("messages".into(), Value::from_serialize(&messages));
        context.insert("tools".into(), tools.map(Value::from_serialize).unwrap_or(Value::from(())));
        context.insert("documents".into(), Value::from(()));
        context.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token".into(), Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token".into(), Value::from(eos.as_str()));
        }
        let template = self.env.get_template(TEMPLATE_NAME)?;
        template.render(context).map_err(|e| anyhow::anyhow!("chat template: {}", describe(&e)))
    }
}

/// The message as the template sees it: `role` and `content`, plus the tool fields when
/// present. `weight` is a training annotation, not part of the conversation.
fn template_message(message: &Message) -> serde_json::Value {
    let mut m = json!({"role": message.role.as_str(), "content": message.content});
    if let Some(calls) = &message.tool_calls {
        m["tool_calls"] = calls.clone();
    }
    if let Some(id) = &message.tool_call_id {
        m["tool_call_id"] = json!(id);
    }
    if let Some(name) = &message.name {
        m["name"] = json!(name);
    }
    m
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn set_clock(env: &mut Environment<'static>, fixed: Option<i64>) {
    let fixed = Arc::new(fixed);
    env.add_function("strftime_now", move |format: String| -> String {
        strftime(&format, fixed.unwrap_or_else(unix_now))
    });
}

fn python_formatter(out: &mut minijinja::Output, state: &minijinja::State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(Error::from),
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" }).map_err(Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// The message of a template error (including `raise_exception`'s) with its location.
fn describe(error: &Error) -> String {
    let mut text = match error.detail() {
        Some(detail) => detail.to_string(),
        None => error.to_string(),
    };
    if let Some(line) = error.line() {
        text.push_str(&format!(" (template line {line})"));
    }
    text
}

/// transformers' `{% generation %}...{% endgeneration %}` marks assistant text for its
/// own mask machinery; it renders the body unchanged. minijinja has no such tag, so it is
/// rewritten into an always-true `if` that keeps any `-` whitespace control.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{left} if true {right}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{left} endif {right}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::chatml();
        let text = t.render(&[Message::user("hi"), Message::assistant("yo")], true, None).unwrap();
        assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns, please') }}", None, None).unwrap();
        let err = t.render(&[Message::user("x")], false, None).unwrap_err();
        assert!(err.to_string().contains("only user turns, please"), "{err}");
    }

    #[test]
    fn python_methods_and_spellings() {
        let source = "{{ messages[0].content.strip().upper() }}|{{ none }}|{{ true }}|{{ messages[0].content.split(',') | length }}|{% for m in messages %}{% if loop.first %}{% break %}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        let text = t.render(&[Message::user("  a,b  ")], false, None).unwrap();
        assert_eq!(text, "A,B|None|True|2|");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let source = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration -%}{% endfor %}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(t.render(&[Message::assistant("ok")], false, None).unwrap(), "ok");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ tools[0] | tojson }}|{{ tools[0] | tojson(indent=2) }}", None, None).unwrap();
        let tools = json!([{"b": "<é>", "a": [1, 2.5, null, true], "c": {}}]);
        let text = t.render(&[Message::user("x")], false, Some(&tools)).unwrap();
        assert_eq!(
            text,
            "{\"b\": \"<é>\", \"a\": [1, 2.5, null, true], \"c\": {}}|{\n  \"b\": \"<é>\",\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"c\": {}\n}"
        );
    }
}
