//! What `inspect` reports: roles, duplicates, token statistics, label balance.
use std::path::Path;

use lora_datasets::{compute_stats, parse_jsonl, ChatTemplate, Role, StatsOptions};
use tokenizers::Tokenizer;

fn chat_line(user: &str, answer: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}).to_string()
}

#[test]
fn counts_roles_duplicates_and_labels_from_final_assistant_message() {
    let mut lines: Vec<String> = (0..200).map(|i| chat_line(&format!("text {i}"), if i % 2 == 0 { "yes" } else { "no" })).collect();
    lines.push(chat_line("text 1", "rare"));
    lines.push(chat_line("text 0", "yes")); // duplicate of line 1
    let dataset = parse_jsonl(Path::new("d.jsonl"), lines.join("\n").as_bytes(), None).unwrap();
    let options = StatsOptions { imbalance_threshold: 50.0, ..StatsOptions::default() };
    let stats = compute_stats(&dataset, None, &options);
    assert_eq!(stats.samples, 202);
    assert_eq!(stats.role_counts[&Role::User], 202);
    assert_eq!(stats.role_counts[&Role::System], 0);
    assert_eq!(stats.duplicates, 1);
    assert_eq!(stats.duplicate_examples, vec![(202, 1)]);
    let labels = stats.labels.unwrap();
    assert_eq!(labels.source, "final assistant message");
    assert_eq!(labels.counts, vec![("yes".into(), 101), ("no".into(), 100), ("rare".into(), 1)]);
    assert_eq!(labels.imbalance_ratio, 101.0);
    assert!(labels.imbalanced);
    assert!(stats.warnings.iter().any(|w| w.contains("imbalanced")));

    // Free-form answers are not labels.
    let free: Vec<String> = (0..50).map(|i| chat_line("q", &format!("answer {i}"))).collect();
    let dataset = parse_jsonl(Path::new("d.jsonl"), free.join("\n").as_bytes(), None).unwrap();
    assert!(compute_stats(&dataset, None, &options).labels.is_none());
}

#[test]
fn token_statistics_with_a_tokenizer() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/datasets/smollm2-tokenizer.json");
    let tokenizer = Tokenizer::from_file(path).unwrap();
    let template = ChatTemplate::chatml();
    let lines: Vec<String> = (1..=20).map(|n| chat_line("Repeat after me.", &"word ".repeat(n))).collect();
    let dataset = parse_jsonl(Path::new("d.jsonl"), lines.join("\n").as_bytes(), None).unwrap();
    let options = StatsOptions { max_seq_len: 20, ..StatsOptions::default() };
    let t = compute_stats(&dataset, Some((&tokenizer, &template)), &options).tokens.unwrap();
    assert_eq!(t.sequences, 20);
    assert!(t.min < t.p50 && t.p50 <= t.p95 && t.p95 <= t.max);
    let expected_loss: usize = dataset
        .samples
        .iter()
        .map(|s| match s {
            lora_datasets::Sample::Chat(c) => lora_datasets::tokenize_chat(&tokenizer, &template, &c.messages).unwrap().loss_tokens(),
            _ => unreachable!(),
        })
        .sum();
    assert_eq!(t.loss_tokens, expected_loss);
    assert!(t.loss_tokens >= (1..=20).sum::<usize>() + 20, "every word and each <|im_end|> is learned");
    assert!(t.over_max_length > 0 && t.over_max_length < 20);
    assert!(t.failed.is_empty());
}
