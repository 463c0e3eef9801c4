//! `RUN/README.md`: the model card of a final adapter, as PEFT's `save_pretrained` writes it
//! (YAML front matter with `base_model`, `library_name: peft`, `pipeline_tag`, `tags`) so the
//! Hugging Face hub files it as an adapter of its base, plus what the run knows: the data's
//! fingerprint and size, the method and its settings, eval before and after, the loss curve.
//!
//! The front-matter keys are the hub's model card metadata (huggingface_hub `ModelCardData`:
//! `base_model`, `library_name`, `pipeline_tag`, `tags`). `base_model` must be a hub model
//! id, so a local base (a directory or a .gguf) is named in the text only, never there.
use anyhow::Result;
use std::fmt::Write as _;
use std::path::Path;

use crate::config::TrainConfig;
use crate::report::SVG_FILE;

pub const CARD_FILE: &str = "README.md";

/// What a card says about a finished run: the three parts of `run.json` (command, config,
/// summary) and the training data's fingerprint.
pub struct CardFacts<'a> {
    /// The method (`sft`, `dpo`, `orpo`, `grpo`).
    pub method: &'a str,
    pub config: &'a TrainConfig,
    /// The run's summary as `run.json` records it (`steps`, `epochs`, `train_samples`,
    /// `eval_samples`, `train_loss`, `initial_eval_loss`, `eval_loss`, `tokens`, ...).
    pub summary: &'a serde_json::Value,
    pub data_fingerprint: Option<&'a str>,
}

/// A YAML scalar for any string: a JSON string is a valid YAML double-quoted scalar
/// (same escapes), so no value can break the front matter.
fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The base model's hub id, when `--model` was one (not a local path).
fn hub_base_model(model: &str) -> Option<&str> {
    (lora_models::source::looks_like_hub_id(model) && !Path::new(model).exists()).then_some(model)
}

fn front_matter(facts: &CardFacts) -> String {
    let mut y = String::from("---\n");
    let base = hub_base_model(&facts.config.model);
    if let Some(id) = base {
        let _ = writeln!(y, "base_model: {}", yaml_str(id));
    }
    y.push_str("library_name: peft\npipeline_tag: text-generation\ntags:\n");
    let mut tags: Vec<String> = Vec::new();
    if let Some(id) = base {
        tags.push(format!("base_model:adapter:{id}"));
    }
    tags.extend(["lora".to_string(), facts.method.to_string(), "lora-train".to_string()]);
    for t in tags {
        let _ = writeln!(y, "- {}", yaml_str(&t));
    }
    y.push_str("---\n");
    y
}

/// An enum's name as the configuration files spell it (`cosine`, `bf16`).
fn serde_name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "-".to_string(),
    }
}

fn number(summary: &serde_json::Value, key: &str) -> Option<f64> {
    summary.get(key).and_then(serde_json::Value::as_f64)
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("-".to_string(), |v| format!("{v:.4}"))
}

/// The card's text (front matter and body).
pub fn render_card(facts: &CardFacts, adapter_name: &str) -> String {
    let cfg = facts.config;
    let s = facts.summary;
    let mut md = front_matter(facts);
    let method = facts.method.to_uppercase();
    let _ = writeln!(md, "\n# Model Card for {adapter_name}\n");
    let _ = writeln!(
        md,
        "A LoRA adapter for `{}`, trained with lora-train ({method}). It is a PEFT adapter: load it with \
         `peft.PeftModel.from_pretrained(base, DIR)`, serve it with vLLM `--lora-modules`, or export it for llama.cpp with \
         `lora-train export --format gguf-lora`.\n",
        cfg.model
    );
    md.push_str("## Training data\n\n| | |\n| --- | --- |\n");
    let _ = writeln!(md, "| dataset | `{}` |", cfg.dataset.display());
    if let Some(eval) = &cfg.eval_dataset {
        let _ = writeln!(md, "| eval dataset | `{}` |", eval.display());
    } else if let Some(split) = cfg.eval_split {
        let _ = writeln!(md, "| eval split | {split} of the dataset |");
    }
    let count = |k: &str| s.get(k).and_then(serde_json::Value::as_u64).map_or("-".to_string(), |v| v.to_string());
    let _ = writeln!(md, "| train samples | {} |", count("train_samples"));
    let _ = writeln!(md, "| eval samples | {} |", count("eval_samples"));
    let _ = writeln!(md, "| tokens trained on | {} |", count("tokens"));
    let _ = writeln!(md, "| data fingerprint | `{}` (FNV-1a of the token ids and loss mask) |", facts.data_fingerprint.unwrap_or("-"));
    md.push_str("\n## Evaluation\n\n| | eval loss | perplexity |\n| --- | --- | --- |\n");
    for (label, key) in [("before training", "initial_eval_loss"), ("after training", "eval_loss")] {
        let loss = number(s, key);
        let _ = writeln!(md, "| {label} | {} | {} |", fmt_opt(loss), fmt_opt(loss.map(f64::exp)));
    }
    let _ = writeln!(md, "\nFinal train loss: {}.\n", fmt_opt(number(s, "train_loss")));
    let _ = writeln!(md, "## Loss curve\n\n![train and eval loss]({SVG_FILE})\n");
    md.push_str("## Method and settings\n\n| setting | value |\n| --- | --- |\n");
    let steps = s.get("steps").and_then(serde_json::Value::as_u64).unwrap_or(0);
    let settings: Vec<(&str, String)> = vec![
        ("method", method.clone()),
        ("steps", format!("{steps} ({:.2} epochs)", number(s, "epochs").unwrap_or(0.0))),
        ("LoRA rank / alpha", format!("{} / {}{}", cfg.lora_rank, cfg.lora_alpha, if cfg.use_rslora { " (rsLoRA)" } else { "" })),
        ("LoRA dropout", cfg.lora_dropout.to_string()),
        ("target modules", cfg.target_modules.join(", ")),
        ("learning rate", format!("{} ({}, warmup ratio {})", cfg.learning_rate, serde_name(&cfg.lr_scheduler), cfg.warmup_ratio)),
        ("batch size x accumulation", format!("{} x {}", cfg.batch_size, cfg.gradient_accumulation_steps)),
        ("max sequence length", format!("{}{}", cfg.max_sequence_length, if cfg.packing { " (packed)" } else { "" })),
        ("weight decay / max grad norm", format!("{} / {}", cfg.weight_decay, cfg.max_grad_norm)),
        ("dtype / base dtype", format!("{} / {}", serde_name(&cfg.dtype), serde_name(&cfg.base_dtype))),
        ("seed", cfg.seed.to_string()),
    ];
    for (k, v) in settings {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push_str("\nThe full configuration is in `run.json`, the per-step metrics in `metrics.jsonl`, the report in `report.md`.\n");
    let _ = writeln!(md, "\n### Framework versions\n\n- lora-train {}", env!("CARGO_PKG_VERSION"));
    md
}

/// Write `RUN/README.md` for the adapter in `run_dir` (atomically).
pub fn write_model_card(run_dir: &Path, facts: &CardFacts) -> Result<()> {
    let name = run_dir.file_name().map_or("adapter".to_string(), |n| n.to_string_lossy().into_owned());
    crate::checkpoint::write_atomic(&run_dir.join(CARD_FILE), render_card(facts, &name).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::{Yaml, YamlLoader};

    fn config(model: &str) -> TrainConfig {
        let opts = crate::config::TrainOptions {
            model: Some(model.to_string()),
            dataset: Some("train.jsonl".into()),
            output: Some("out".into()),
            ..Default::default()
        };
        opts.resolve().unwrap()
    }

    /// The YAML between the first two `---` lines, parsed.
    fn front_matter_yaml(card: &str) -> Yaml {
        let rest = card.strip_prefix("---\n").expect("card starts with front matter");
        let end = rest.find("\n---\n").expect("front matter is closed");
        YamlLoader::load_from_str(&rest[..end]).expect("front matter is valid YAML").remove(0)
    }

    fn summary() -> serde_json::Value {
        serde_json::json!({"steps": 20, "epochs": 2.0, "train_samples": 40, "eval_samples": 8, "tokens": 5120,
            "train_loss": 1.25, "initial_eval_loss": 2.5, "eval_loss": 1.5})
    }

    #[test]
    fn hub_base_gets_peft_front_matter_and_the_run_facts() {
        let cfg = config("HuggingFaceTB/SmolLM2-135M-Instruct");
        let s = summary();
        let card = render_card(&CardFacts { method: "dpo", config: &cfg, summary: &s, data_fingerprint: Some("00ff00ff00ff00ff") }, "run-1");
        let y = front_matter_yaml(&card);
        assert_eq!(y["base_model"].as_str(), Some("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert_eq!(y["library_name"].as_str(), Some("peft"));
        assert_eq!(y["pipeline_tag"].as_str(), Some("text-generation"));
        let tags: Vec<&str> = y["tags"].as_vec().unwrap().iter().filter_map(Yaml::as_str).collect();
        assert_eq!(tags, ["base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct", "lora", "dpo", "lora-train"]);
        assert!(card.contains("| data fingerprint | `00ff00ff00ff00ff`"), "{card}");
        assert!(card.contains("| train samples | 40 |") && card.contains("| eval samples | 8 |"), "{card}");
        assert!(card.contains("| before training | 2.5000 |") && card.contains("| after training | 1.5000 |"), "{card}");
        assert!(card.contains(&format!("]({SVG_FILE})")), "the card links the loss curve");
        assert!(card.contains("| method | DPO |"), "{card}");
    }

    #[test]
    fn local_base_is_never_put_in_base_model_and_odd_names_stay_valid_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("my: model \"q4\".gguf");
        std::fs::write(&local, b"").unwrap();
        let cfg = config(local.to_str().unwrap());
        let s = serde_json::json!({});
        let card = render_card(&CardFacts { method: "sft", config: &cfg, summary: &s, data_fingerprint: None }, "out");
        let y = front_matter_yaml(&card);
        assert!(y["base_model"].is_badvalue(), "a local path is not a hub id: {card}");
        let tags: Vec<&str> = y["tags"].as_vec().unwrap().iter().filter_map(Yaml::as_str).collect();
        assert_eq!(tags, ["lora", "sft", "lora-train"]);
        assert!(card.contains("| before training | - | - |"), "missing numbers print as -: {card}");
        // A quoted scalar survives any characters.
        assert_eq!(YamlLoader::load_from_str(&format!("k: {}", yaml_str("a: \"b\"\n- c"))).unwrap()[0]["k"].as_str(), Some("a: \"b\"\n- c"));
    }
}
