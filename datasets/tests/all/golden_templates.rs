//! Chat-template renders compared byte for byte with transformers' `apply_chat_template`
//! (goldens from scripts/golden/datasets/make_golden.py).

use crate::common::{messages_of, opt_str, read_json, template_source};
use lora_datasets::ChatTemplate;

#[test]
fn renders_match_transformers_byte_for_byte() {
    let golden = read_json("renders.json");
    let fixed_now = golden["meta"]["fixed_now_unix"].as_i64().unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let template = ChatTemplate::new(&template_source(name), opt_str(&case["bos_token"]), opt_str(&case["eos_token"]))
            .unwrap()
            .with_fixed_now(fixed_now);
        // Extra apply_chat_template kwargs of the case (e.g. enable_thinking).
        let template = match case["context"].as_object() {
            Some(context) => context.iter().fold(template, |t, (name, value)| t.with_context(name, value.clone())),
            None => template,
        };
        let messages = messages_of(&case["messages"]);
        let tools = (!case["tools"].is_null()).then_some(&case["tools"]);
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = template.render(&messages, add_generation_prompt, tools).unwrap();
        let expected = case["expected"].as_str().unwrap();
        if rendered != expected {
            failures.push(format!(
                "{name} / {} (gen prompt {add_generation_prompt}):\n--- expected\n{expected:?}\n--- got\n{rendered:?}",
                case["conversation"]
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} renders differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn builtin_chatml_matches_the_golden_chatml_template() {
    assert_eq!(lora_datasets::CHATML_TEMPLATE, template_source("chatml"));
}
