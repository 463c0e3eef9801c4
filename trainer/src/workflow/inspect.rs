//! Phase `inspect`: the dataset's format, validity, token statistics and label balance
//! (`lora_datasets::compute_stats`, as `lora-train inspect`), and the conversions it needs,
//! applied to a copy under `DIR/data/` with a new time-stamped name (the user's file is
//! never modified). Today's conversion: a prompts file whose lines carry `ground_truth`
//! becomes chat data whose final assistant message is the ground truth.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lora_datasets::{compute_stats, load_dataset, Format, Role, Sample, StatsOptions};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Generated;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Inspection {
    /// The file as the user gave it.
    pub source: PathBuf,
    /// What training reads: `source`, or the converted copy.
    pub dataset: PathBuf,
    pub format: String,
    pub samples: usize,
    /// `DatasetStats` of `dataset` (tokens with the model's tokenizer, labels, warnings).
    pub stats: Value,
    /// Conversions applied to the copy, in words.
    pub conversions: Vec<String>,
    pub generated: Vec<Generated>,
}

impl Inspection {
    /// Total tokens of the dataset with the model's tokenizer (0 when unknown).
    pub fn tokens(&self) -> u64 {
        self.stats["tokens"]["total"].as_u64().unwrap_or(0)
    }
}

/// Inspects `source` with `model`'s tokenizer and writes a converted copy when needed.
pub fn run(dir: &Path, source: &Path, model: &str, max_sequence_length: usize, imbalance_threshold: f64) -> Result<Inspection> {
    run_for(dir, source, model, max_sequence_length, imbalance_threshold, Format::Chat)
}

/// [`run`] for a workflow that trains on `wants` (chat, or preference pairs for `run dpo`).
pub fn run_for(dir: &Path, user_file: &Path, model: &str, max_sequence_length: usize, imbalance_threshold: f64, wants: Format) -> Result<Inspection> {
    let mut conversions = Vec::new();
    let mut generated = Vec::new();
    let rewritten = rewrite_tool_roles(dir, user_file)?;
    if let Some((g, n)) = &rewritten {
        conversions.push(format!("{} ({n} messages) -> {}", g.what, g.path.display()));
        generated.push(g.clone());
    }
    let source_buf = rewritten.as_ref().map_or_else(|| user_file.to_path_buf(), |(g, _)| g.path.clone());
    let source = source_buf.as_path();
    let ds = load_dataset(source, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut dataset = source.to_path_buf();
    match ds.format {
        f if f == wants => {}
        Format::Chat => bail!("{}: chat data; this workflow takes {} data (see Dataset formats)", source.display(), wants),
        Format::Prompts => {
            let mut lines = Vec::with_capacity(ds.len());
            for (s, line) in ds.samples.iter().zip(&ds.lines) {
                let Sample::Prompts(p) = s else { continue };
                let Some(answer) = p.extra.get("ground_truth").and_then(ground_truth_text) else {
                    bail!("{}:{line}: a prompt without `ground_truth`: the workflow needs an answer to learn (add a final assistant message or a ground_truth)", source.display());
                };
                let mut messages: Vec<Value> = p.messages.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
                messages.push(json!({"role": "assistant", "content": answer}));
                let mut obj = p.extra.clone();
                obj.insert("messages".into(), Value::Array(messages));
                if let Some(t) = &p.tools {
                    obj.insert("tools".into(), t.clone());
                }
                lines.push(Value::Object(obj));
            }
            let stem = source.file_stem().map_or("data".into(), |s| s.to_string_lossy().to_string());
            let what = "ground_truth mapped onto a final assistant message";
            let g = super::write_generated(&dir.join("data"), &format!("{stem}-chat"), source, what, &lines)?;
            conversions.push(format!("{what} ({} samples) -> {}", lines.len(), g.path.display()));
            dataset = g.path.clone();
            generated.push(g);
        }
        Format::Preference => bail!("{}: preference pairs; `run sft` and `run classify` train on chat data (prompts with ground_truth are converted); `run dpo` takes pairs", source.display()),
    }
    let used = if dataset == source { ds } else { load_dataset(&dataset, Some(wants)).map_err(|e| anyhow::anyhow!("{e}"))? };
    let bundle = lora_models::load_tokenizer_bundle(model).with_context(|| format!("loading the tokenizer of {model}"))?;
    let template = crate::chat::template_for(&bundle)?;
    let options = StatsOptions { max_seq_len: max_sequence_length, imbalance_threshold, max_prompt_length: None };
    let stats = compute_stats(&used, Some((&bundle.tokenizer, &template)), &options);
    if let Some(t) = &stats.tokens {
        if !t.failed.is_empty() {
            let (line, why) = &t.failed[0];
            bail!("{}:{line}: {why} ({} sample(s) cannot be trained on)", dataset.display(), t.failed.len());
        }
    }
    let no_answer = if wants == Format::Prompts { 0 } else { used.samples.iter().filter(|s| !s.messages().any(|m| m.role == Role::Assistant && m.is_trainable())).count() };
    if no_answer > 0 {
        bail!("{}: {no_answer} sample(s) have no assistant message to learn", dataset.display());
    }
    for w in &stats.warnings {
        tracing::warn!("{}: {w}", dataset.display());
    }
    Ok(Inspection {
        source: user_file.to_path_buf(),
        dataset,
        format: format!("{}", used.format),
        samples: used.len(),
        stats: serde_json::to_value(&stats)?,
        conversions,
        generated,
    })
}

/// Roles other chat dialects give tool results, rewritten to `tool`: OpenAI's legacy
/// `function`, Llama 3's `ipython`, ChatGLM's `observation`.
const TOOL_DIALECTS: [&str; 3] = ["function", "ipython", "observation"];

/// A copy of `source` with the tool roles of other dialects rewritten to `tool`, and how
/// many messages changed; None when there is nothing to rewrite. Lines that are not JSON
/// are copied as they are (the loader reports them with their line numbers).
fn rewrite_tool_roles(dir: &Path, source: &Path) -> Result<Option<(Generated, usize)>> {
    let text = std::fs::read_to_string(source).with_context(|| format!("reading {}", source.display()))?;
    let mut changed = 0usize;
    let mut lines: Vec<Result<Value, &str>> = Vec::new();
    fn fix(v: &mut Value, changed: &mut usize) {
        match v {
            Value::Array(items) => items.iter_mut().for_each(|x| fix(x, changed)),
            Value::Object(map) => {
                if let Some(Value::String(role)) = map.get_mut("role") {
                    if TOOL_DIALECTS.contains(&role.as_str()) {
                        *role = "tool".into();
                        *changed += 1;
                    }
                }
                map.values_mut().for_each(|x| fix(x, changed));
            }
            _ => {}
        }
    }
    for line in text.lines() {
        match serde_json::from_str::<Value>(line) {
            Ok(mut v) => {
                fix(&mut v, &mut changed);
                lines.push(Ok(v));
            }
            Err(_) => lines.push(Err(line)),
        }
    }
    if changed == 0 {
        return Ok(None);
    }
    let stem = source.file_stem().map_or("data".into(), |s| s.to_string_lossy().to_string());
    let mut out = String::new();
    for v in &lines {
        match v {
            Ok(v) => out.push_str(&serde_json::to_string(v)?),
            Err(raw) => out.push_str(raw),
        }
        out.push('\n');
    }
    let what = format!("tool roles of other dialects ({}) rewritten to `tool`", TOOL_DIALECTS.join(", "));
    let g = super::write_generated_text(&dir.join("data"), &format!("{stem}-tools"), source, &what, &out)?;
    Ok(Some((g, changed)))
}

/// A ground truth as assistant text: a string as is, a list joined with ", ", a number
/// as its JSON text.
pub fn ground_truth_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().filter_map(ground_truth_text).collect();
            (!parts.is_empty()).then(|| parts.join(", "))
        }
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// The plan's lines about the data.
pub fn summary_lines(i: &Inspection) -> Vec<String> {
    let mut out = vec![format!("dataset `{}`: {} samples, {}", i.source.display(), i.samples, i.format)];
    if let Some(t) = i.stats.get("tokens").filter(|t| !t.is_null()) {
        out.push(format!(
            "tokens: {} in all ({} loss tokens); per sample min {}, mean {:.1}, p95 {}, max {}; {} longer than {}",
            t["total"], t["loss_tokens"], t["min"], t["mean"].as_f64().unwrap_or(0.0), t["p95"], t["max"], t["over_max_length"], t["max_seq_len"]
        ));
    }
    out.push(format!("duplicates: {}", i.stats["duplicates"]));
    for c in &i.conversions {
        out.push(format!("conversion: {c}"));
    }
    if let Some(ws) = i.stats["warnings"].as_array() {
        for w in ws {
            out.push(format!("warning: {}", w.as_str().unwrap_or_default()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_roles_of_other_dialects_are_rewritten_in_a_fresh_copy() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("agent.jsonl");
        let original = "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"function\", \"name\": \"f\", \"content\": \"1\"}, {\"role\": \"ipython\", \"content\": \"2\"}]}\nnot json\n";
        std::fs::write(&src, original).unwrap();
        let (g, n) = rewrite_tool_roles(dir.path(), &src).unwrap().unwrap();
        assert_eq!(n, 2);
        assert_eq!(std::fs::read_to_string(&src).unwrap(), original, "the user's file is untouched");
        let copy = std::fs::read_to_string(&g.path).unwrap();
        let first: Value = serde_json::from_str(copy.lines().next().unwrap()).unwrap();
        assert_eq!(first["messages"][1], json!({"role": "tool", "name": "f", "content": "1"}));
        assert_eq!(first["messages"][2]["role"], "tool");
        assert_eq!(copy.lines().nth(1), Some("not json"), "a broken line is copied for the loader to report");
        assert!(g.path.file_name().unwrap().to_string_lossy().starts_with("agent-tools-20"));
        let plain = dir.path().join("plain.jsonl");
        std::fs::write(&plain, "{\"messages\": [{\"role\": \"tool\", \"content\": \"1\"}]}\n").unwrap();
        assert!(rewrite_tool_roles(dir.path(), &plain).unwrap().is_none(), "nothing to rewrite, no copy");
    }
}
