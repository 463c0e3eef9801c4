//! Formats, detection and the `FILE:LINE: message` reports.
use std::path::Path;

use lora_datasets::{load_dataset, parse_jsonl, DatasetError, Format, Role, Sample};

fn parse(text: &str, format: Option<Format>) -> Result<lora_datasets::Dataset, DatasetError> {
    parse_jsonl(Path::new("data.jsonl"), text.as_bytes(), format)
}

fn problems(text: &str) -> Vec<String> {
    parse(text, None).unwrap_err().lines()
}

#[test]
fn detects_each_format() {
    let chat = r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": 1}], "ground_truth": ["a", "b"]}"#;
    let d = parse(chat, None).unwrap();
    assert_eq!(d.format, Format::Chat);
    let Sample::Chat(c) = &d.samples[0] else { panic!() };
    assert_eq!(c.ground_truth.as_deref(), Some(&["a".to_string(), "b".to_string()][..]));

    let fireworks = r#"{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", "content": "good"}], "non_preferred_output": [{"role": "assistant", "content": "bad"}]}"#;
    let trl_strings = r#"{"prompt": "q", "chosen": "good", "rejected": "bad"}"#;
    let trl_messages = r#"{"messages": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}"#;
    let trl_implicit = r#"{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}"#;
    for line in [fireworks, trl_strings, trl_messages, trl_implicit] {
        let d = parse(line, None).unwrap();
        assert_eq!(d.format, Format::Preference, "{line}");
        let Sample::Preference(p) = &d.samples[0] else { panic!() };
        assert_eq!(p.prompt.last().unwrap().content, "q");
        assert_eq!(p.chosen[0].content, "good");
        assert_eq!(p.rejected[0].content, "bad");
        assert_eq!(p.chosen[0].role, Role::Assistant);
    }

    let prompts = "{\"messages\": [{\"role\": \"user\", \"content\": \"2+2?\"}], \"ground_truth\": \"4\", \"difficulty\": 1}\n\n";
    let d = parse(prompts, None).unwrap();
    assert_eq!(d.format, Format::Prompts);
    let Sample::Prompts(p) = &d.samples[0] else { panic!() };
    assert_eq!(p.extra["ground_truth"], "4");
    assert_eq!(p.extra["difficulty"], 1);
    assert_eq!(d.samples[0].label().as_deref(), Some("4"));
}

#[test]
fn tools_and_tool_calls_are_accepted() {
    let line = r#"{"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "messages": [{"role": "user", "content": "call f"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "42", "tool_call_id": "1"}, {"role": "assistant", "content": "It is 42."}]}"#;
    let d = parse(line, None).unwrap();
    let Sample::Chat(c) = &d.samples[0] else { panic!() };
    assert!(c.tools.is_some());
    assert!(c.messages[1].tool_calls.is_some());
    assert_eq!(c.messages[2].tool_call_id.as_deref(), Some("1"));
}

#[test]
fn reports_every_problem_with_file_and_line() {
    let text = [
        r#"{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]}"#,
        r#"{"messages": [{"role": "user", "content": "broken"}"#,
        r#"{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": ""}]}"#,
        r#"{"messages": [{"role": "user", "content": "only a question"}, {"role": "assistant", "content": "a", "weight": 0}]}"#,
        r#"{"messages": "not a list"}"#,
        r#"[1, 2]"#,
        r#"{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a", "weight": 0.5}]}"#,
    ]
    .join("\n");
    let p = problems(&text);
    let expect = [
        "data.jsonl:2: invalid JSON",
        "data.jsonl:3: messages[0]: unknown role `wizard`",
        "data.jsonl:3: messages[1]: empty content",
        "data.jsonl:4: no assistant turn to learn from",
        "data.jsonl:5: `messages` must be a list of messages, got a string",
        "data.jsonl:6: a line must be a JSON object, got a list",
        "data.jsonl:7: messages[0].content must be a string, got a number",
        "data.jsonl:7: messages[1].weight must be 0 or 1, got 0.5",
    ];
    for e in expect {
        assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in\n{}", p.join("\n"));
    }
    assert_eq!(p.len(), expect.len(), "{}", p.join("\n"));
}

#[test]
fn mixed_formats_and_missing_labels_are_errors() {
    let chat = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "ground_truth": "a"}"#;
    let pref = r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#;
    let unlabeled = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let p = problems(&[chat, chat, pref, unlabeled].join("\n"));
    assert!(p[0].starts_with("data.jsonl:3: this line is a preference pair but most of the file is chat"), "{p:?}");
    assert!(p[1].starts_with("data.jsonl:4: missing `ground_truth` (2 of 3 samples have one)"), "{p:?}");

    // An explicit --format validates every line as that format instead.
    let err = parse(pref, Some(Format::Chat)).unwrap_err();
    assert!(err.lines()[0].contains("missing field `messages`"), "{err}");
}

#[test]
fn report_is_capped_with_a_total() {
    let text = "not json\n".repeat(120);
    let err = parse(&text, None).unwrap_err();
    let shown = err.to_string();
    assert_eq!(err.total(), 120);
    assert_eq!(shown.lines().filter(|l| l.contains(": invalid JSON")).count(), 50);
    assert!(shown.contains("... 70 more not shown"), "{shown}");
    assert!(shown.ends_with("data.jsonl: 120 problems found"), "{shown}");
}

#[test]
fn empty_and_unreadable_files() {
    assert!(parse("\n\n", None).unwrap_err().to_string().contains("no samples"));
    let err = load_dataset(Path::new("/nonexistent/x.jsonl"), None).unwrap_err();
    assert!(err.to_string().starts_with("/nonexistent/x.jsonl: cannot read"), "{err}");
}
