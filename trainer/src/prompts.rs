//! Prompt datasets (system/user messages plus fields for evaluators) tokenized for
//! generation, and the evaluator `Sample` of a completion. Shared by `grpo`,
//! `eval --evaluator`, `compare`, `pairs` and the workflows (below them all).
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use lora_datasets::{load_dataset, tokenize_prompt, Dataset, Format, Sample as DataSample};
use lora_models::TokenizerBundle;
use serde_json::Value;

use crate::evaluators::Sample;

/// One prompt ready to generate from.
#[derive(Clone, Debug)]
pub struct Prompt {
    /// Token ids with the generation prompt (`add_generation_prompt`).
    pub ids: Vec<u32>,
    /// The messages as OpenAI-form objects, for evaluators.
    pub messages: Vec<Value>,
    pub ground_truth: Option<Value>,
    /// The line's other fields.
    pub fields: serde_json::Map<String, Value>,
    /// The line's tool schemas (rendered into `ids`; `pairs` copies them into its lines).
    pub tools: Option<Value>,
}

impl Prompt {
    /// What an evaluator sees of `completion` for this prompt.
    pub fn sample(&self, id: String, completion: String) -> Sample {
        Sample { id, messages: self.messages.clone(), completion, ground_truth: self.ground_truth.clone(), fields: self.fields.clone() }
    }
}

/// Load a prompts file (every problem as FILE:LINE).
pub fn load_prompt_dataset(path: &Path) -> Result<Dataset> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    let ds = load_dataset(path, Some(Format::Prompts)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ds)
}

/// Render every prompt with the model's chat template and tokenize it.
pub fn tokenize_prompts(bundle: &TokenizerBundle, ds: &Dataset) -> Result<Vec<Prompt>> {
    let template = crate::chat::template_for(bundle)?;
    let mut out = Vec::with_capacity(ds.samples.len());
    for (i, s) in ds.samples.iter().enumerate() {
        let DataSample::Prompts(p) = s else { bail!("{}: sample {} is not a prompt", ds.path.display(), i + 1) };
        let ids = tokenize_prompt(&bundle.tokenizer, &template, &p.messages, p.tools.as_ref())
            .map_err(|e| anyhow::anyhow!("{}: sample {}: {e}", ds.path.display(), i + 1))?;
        if ids.is_empty() {
            bail!("{}: sample {} renders to no tokens", ds.path.display(), i + 1);
        }
        let mut fields = p.extra.clone();
        let ground_truth = fields.remove("ground_truth").filter(|v| !v.is_null());
        let messages = p.messages.iter().map(|m| serde_json::to_value(m).unwrap_or(Value::Null)).collect();
        out.push(Prompt { ids, messages, ground_truth, fields, tools: p.tools.clone() });
    }
    Ok(out)
}

/// The labels `label` evaluators accept and a token counter for `length`.
pub fn fill_context<'a>(ctx: &mut crate::evaluators::Context, bundle: &TokenizerBundle, prompts: impl Iterator<Item = &'a Prompt>) {
    let mut labels: Vec<String> = Vec::new();
    for p in prompts {
        let truths = match &p.ground_truth {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => vec![],
        };
        labels.extend(truths);
    }
    labels.sort();
    labels.dedup();
    ctx.labels = labels;
    let tokenizer = bundle.tokenizer.clone();
    ctx.count_tokens = Some(Arc::new(move |s: &str| tokenizer.encode(s, false).map(|e| e.len()).unwrap_or(0)));
}

/// FNV-1a over every prompt's token ids (identifies the training prompts for `--resume`).
pub fn fingerprint(prompts: &[Prompt]) -> String {
    crate::data::fnv1a(prompts.iter().flat_map(|p| std::iter::once(p.ids.len() as u64).chain(p.ids.iter().map(|&id| id as u64))))
}
