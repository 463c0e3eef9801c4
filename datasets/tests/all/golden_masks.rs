//! Token ids and loss masks compared exactly with the Python reference of the mask rule
//! (scripts/golden/datasets/make_golden.py, `reference_mask`).

use crate::common::{golden_dir, messages_of, opt_str, read_json, template_source};
use lora_datasets::{tokenize_chat, ChatTemplate, MaskError, Message};
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
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let tokenizer = if name == "llama3" { &llama } else { &base };
        let template = ChatTemplate::new(&template_source(name), opt_str(&case["bos_token"]), opt_str(&case["eos_token"]))
            .unwrap()
            .with_fixed_now(fixed_now);
        let messages = messages_of(&case["messages"]);
        let what = format!("{name} / {}", case["conversation"]);
        assert_eq!(template.render(&messages, false, None).unwrap(), case["rendered"].as_str().unwrap(), "{what}");
        let tokenized = tokenize_chat(tokenizer, &template, &messages).unwrap();
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
