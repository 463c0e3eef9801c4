//! Shared by the golden tests: paths and turning golden JSON messages into `Message`s
//! through the real parser.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use lora_datasets::{parse_jsonl, Message, Sample};
use serde_json::Value;

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/datasets")
}

pub fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(golden_dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn template_source(name: &str) -> String {
    std::fs::read_to_string(golden_dir().join("templates").join(format!("{name}.jinja"))).unwrap()
}

/// Parse golden messages as a dataset line would be parsed.
pub fn messages_of(messages: &Value) -> Vec<Message> {
    let line = serde_json::json!({ "messages": messages }).to_string();
    let dataset = parse_jsonl(Path::new("golden.jsonl"), line.as_bytes(), None).unwrap();
    match dataset.samples.into_iter().next().unwrap() {
        Sample::Chat(c) => c.messages,
        Sample::Prompts(p) => p.messages,
        Sample::Preference(_) => unreachable!(),
    }
}

pub fn opt_str(v: &Value) -> Option<&str> {
    v.as_str()
}
