//! Nothing a user can put in a file makes the loader (or the stats) panic.
use std::path::Path;

use std::sync::OnceLock;

use lora_datasets::{compute_stats, parse_jsonl, tokenize_chat, ChatTemplate, Format, Message, StatsOptions};
use tokenizers::Tokenizer;
use proptest::prelude::*;
use serde_json::{json, Value};

fn check(bytes: &[u8]) {
    for format in [None, Some(Format::Chat), Some(Format::Preference), Some(Format::Prompts)] {
        match parse_jsonl(Path::new("fuzz.jsonl"), bytes, format) {
            Ok(dataset) => {
                let _ = compute_stats(&dataset, None, &StatsOptions::default());
                let template = ChatTemplate::chatml();
                for sample in &dataset.samples {
                    for m in sample.messages() {
                        let _ = template.render(std::slice::from_ref(m), true, None);
                    }
                }
            }
            Err(err) => {
                assert!(err.total() > 0);
                let _ = err.to_string();
            }
        }
    }
}

/// JSON shaped like our formats, with wrong types and odd values mixed in.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        prop_oneof![
            Just("user"), Just("assistant"), Just("system"), Just("tool"), Just(""), Just(" "), Just("\u{e000}")
        ]
        .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("messages"), Just("role"), Just("content"), Just("weight"), Just("tool_calls"), Just("function"),
            Just("arguments"), Just("name"), Just("ground_truth"), Just("chosen"), Just("rejected"), Just("prompt"),
            Just("input"), Just("preferred_output"), Just("non_preferred_output"), Just("tools"), Just("x")
        ]
        .prop_map(String::from);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn smollm2_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/datasets/smollm2-tokenizer.json");
        Tokenizer::from_file(path).unwrap()
    })
}

/// Qwen3's template rewrites `<think>` blocks, which sends the mask down its fallback paths.
fn qwen3_template() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/datasets/templates/qwen3.jinja");
        ChatTemplate::new(&std::fs::read_to_string(path).unwrap(), None, Some("<|im_end|>")).unwrap()
    })
}

/// Content built from pieces that stress the mask: special-token text, sentinels,
/// whitespace, repeated fragments of the template itself.
fn tricky_content() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("<|im_end|>"), Just("<|im_start|>"), Just("assistant"), Just("\n"), Just(" "), Just("\u{e000}"),
            Just("\u{e001}"), Just("a"), Just("é🙂"), Just("{{ x }}"), Just("{% if %}"), Just("\t"), Just("<think>"),
            Just("</think>")
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn random_json_never_panics(lines in prop::collection::vec(json_value(), 1..6)) {
        let text: String = lines.iter().map(|v| v.to_string() + "\n").collect();
        check(text.as_bytes());
    }

    #[test]
    fn random_chat_content_never_panics(contents in prop::collection::vec(".{0,20}", 2..6)) {
        let messages: Vec<Value> = contents.iter().enumerate().map(|(i, c)| {
            json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": c})
        }).collect();
        let line = json!({"messages": messages}).to_string();
        check(line.as_bytes());
    }

    #[test]
    fn tokenize_chat_never_panics(turns in prop::collection::vec((tricky_content(), any::<bool>()), 1..5)) {
        let messages: Vec<Message> = turns.iter().enumerate().map(|(i, (content, zero))| {
            if i % 2 == 0 { Message::user(content.clone()) }
            else { Message { weight: zero.then_some(0.0), ..Message::assistant(content.clone()) } }
        }).collect();
        for template in [&ChatTemplate::chatml(), qwen3_template()] {
            if let Ok(t) = tokenize_chat(smollm2_tokenizer(), template, &messages) {
                prop_assert_eq!(t.input_ids.len(), t.loss_mask.len());
                prop_assert!(t.loss_tokens() > 0);
            }
        }
    }
}
