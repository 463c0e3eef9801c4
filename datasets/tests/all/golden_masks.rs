//! Token ids and loss masks compared exactly with the Python reference of the mask rule
//! (scripts/golden/datasets/make_golden.py, `reference_mask`).

use crate::common::{golden_dir, messages_of, opt_str, read_json, template_source};
use lora_datasets::{tokenize_chat, tokenize_chat_with_tools, ChatTemplate, MaskError, Message};
use tokenizers::{AddedToken, Tokenizer};

fn tokenizers() -> (Tokenizer, Tokenizer) {
    let path = golden_dir().join("smollm2-tokenizer.json");
    let base = Tokenizer::from_file(&path).unwrap();
    let mut llama = Tokenizer::from_file(&path).unwrap();
    let golden = read_json("masks.json");
    let specials: Vec<AddedToken> = golden["meta"]["llama3_special_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| AddedToken::from(t.as_str().unwrap().to_string(), true))
        .collect();
    llama.add_special_tokens(specials).unwrap();
    (base, llama)
}

#[test]
fn token_ids_and_masks_match_the_python_reference() {
    let (base, llama) = tokenizers();
    let golden = read_json("masks.json");
    let fixed_now = golden["meta"]["fixed_now_unix"].as_i64().unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    assert!(cases.iter().filter(|c| c["conversation"].as_str().unwrap().starts_with("tool_call")).count() >= 6, "tool-call cases");
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let tokenizer = if name == "llama3" { &llama } else { &base };
        let template = ChatTemplate::new(&template_source(name), opt_str(&case["bos_token"]), opt_str(&case["eos_token"]))
            .unwrap()
            .with_fixed_now(fixed_now);
        let messages = messages_of(&case["messages"]);
        let what = format!("{name} / {}", case["conversation"]);
        let tools = case.get("tools").filter(|t| !t.is_null());
        assert_eq!(template.render(&messages, false, tools).unwrap(), case["rendered"].as_str().unwrap(), "{what}");
        let tokenized = tokenize_chat_with_tools(tokenizer, &template, &messages, tools).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let mask: Vec<u8> = serde_json::from_value(case["loss_mask"].clone()).unwrap();
        assert_eq!(tokenized.input_ids, ids, "{what}: ids");
        assert_eq!(tokenized.loss_mask, mask, "{what}: mask");
    }
}

#[test]
fn mask_holds_exactly_assistant_content_and_end_of_turn() {
    let (base, _) = tokenizers();
    let template = ChatTemplate::new(&template_source("smollm2"), Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
    let messages = vec![
        Message::user("Name a colour."),
        Message { weight: Some(0.0), ..Message::assistant("Wrong answer here.") },
        Message::user("Again."),
        Message::assistant("Blue"),
    ];
    let t = tokenize_chat(&base, &template, &messages).unwrap();
    let learned: Vec<u32> = t.input_ids.iter().zip(&t.loss_mask).filter(|(_, &m)| m == 1).map(|(&id, _)| id).collect();
    let text = base.decode(&learned, false).unwrap();
    assert_eq!(text, "Blue<|im_end|>");

    let all_zero = vec![Message::user("hi"), Message { weight: Some(0.0), ..Message::assistant("x") }];
    assert!(matches!(tokenize_chat(&base, &template, &all_zero), Err(MaskError::NoLossTokens)));
}

fn learned_text(tokenizer: &Tokenizer, t: &lora_datasets::TokenizedSample) -> String {
    let learned: Vec<u32> = t.input_ids.iter().zip(&t.loss_mask).filter(|(_, &m)| m == 1).map(|(&id, _)| id).collect();
    tokenizer.decode(&learned, false).unwrap()
}

#[test]
fn tool_calls_are_learned_unless_weighted_out_or_not_rendered() {
    let (base, _) = tokenizers();
    let qwen = ChatTemplate::new(&template_source("qwen2.5"), None, Some("<|im_end|>")).unwrap();
    let call = serde_json::json!([{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]);
    let conversation = |weight: Option<f32>| {
        vec![
            Message::user("2 + 3?"),
            Message { tool_calls: Some(call.clone()), weight, ..Message::assistant("") },
            Message { tool_call_id: Some("c1".into()), ..Message::new(lora_datasets::Role::Tool, "5") },
            Message::assistant("5"),
        ]
    };
    let t = tokenize_chat(&base, &qwen, &conversation(None)).unwrap();
    assert_eq!(learned_text(&base, &t), "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n</tool_call><|im_end|>5<|im_end|>");
    let t = tokenize_chat(&base, &qwen, &conversation(Some(0.0))).unwrap();
    assert_eq!(learned_text(&base, &t), "5<|im_end|>", "weight 0 excludes the tool calls too");

    // SmolLM2's template has no tool support: the calls never reach the text, so a turn that
    // asks to learn them is an error, not a silently empty target.
    let smol = ChatTemplate::new(&template_source("smollm2"), Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
    let err = tokenize_chat(&base, &smol, &conversation(None)).unwrap_err();
    assert!(matches!(err, MaskError::ToolCallsNotRendered(1)), "{err}");
}
