//! What `lora-train inspect` reports about a dataset.
use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::mask::{tokenize_chat_with_tools, tokenize_preference, tokenize_prompt, TokenizedSample};
use crate::pairs::{pair_stats, PairLimits, PairStats, TokenizedPair};
use crate::sample::{Dataset, Format, Role, Sample};
use crate::split::labels_are_categorical;
use crate::template::ChatTemplate;

#[derive(Debug, Clone)]
pub struct StatsOptions {
    /// Samples longer than this are counted in `over_max_length`.
    pub max_seq_len: usize,
    /// Label imbalance (most / least frequent) above this is flagged.
    pub imbalance_threshold: f64,
    /// Preference data: the prompt limit whose truncations are counted (the completion
    /// limit is `max_seq_len`).
    pub max_prompt_length: Option<usize>,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions { max_seq_len: 2048, imbalance_threshold: 50.0, max_prompt_length: None }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetStats {
    pub path: String,
    pub format: Format,
    pub samples: usize,
    /// Messages per role over all samples.
    pub role_counts: BTreeMap<Role, usize>,
    /// Samples identical to an earlier sample.
    pub duplicates: usize,
    /// Up to 10 (line, line of the first occurrence) pairs.
    pub duplicate_examples: Vec<(usize, usize)>,
    /// Present when a tokenizer was given.
    pub tokens: Option<TokenStats>,
    /// Present when the labels look categorical (see `labels_are_categorical`).
    pub labels: Option<LabelStats>,
    /// Preference pairs whose chosen and rejected outputs are the same messages.
    pub identical_pairs: usize,
    /// Preference data with a tokenizer: prompt / chosen / rejected lengths and truncation.
    pub pairs: Option<PairStats>,
    pub warnings: Vec<String>,
}

/// Token counts per tokenized sequence (a preference pair counts its two sequences).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenStats {
    pub sequences: usize,
    pub min: usize,
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
    pub total: usize,
    pub loss_tokens: usize,
    pub max_seq_len: usize,
    pub over_max_length: usize,
    /// Samples that could not be tokenized (template error, no loss token), with the reason.
    pub failed: Vec<(usize, String)>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelStats {
    /// `ground_truth`, or `final assistant message` for chat data without it.
    pub source: &'static str,
    /// Most frequent first.
    pub counts: Vec<(String, usize)>,
    /// Most frequent / least frequent count.
    pub imbalance_ratio: f64,
    pub imbalance_threshold: f64,
    pub imbalanced: bool,
}

/// Statistics of `dataset`; token statistics when `tokenization` is given.
pub fn compute_stats(
    dataset: &Dataset,
    tokenization: Option<(&Tokenizer, &ChatTemplate)>,
    options: &StatsOptions,
) -> DatasetStats {
    let mut role_counts: BTreeMap<Role, usize> = Role::ALL.iter().map(|&r| (r, 0)).collect();
    for message in dataset.samples.iter().flat_map(Sample::messages) {
        *role_counts.entry(message.role).or_default() += 1;
    }
    let (duplicates, duplicate_examples) = find_duplicates(dataset);
    let tokenized = tokenization.map(|(tokenizer, template)| tokenize_all(dataset, tokenizer, template));
    let tokens = tokenized.as_ref().map(|t| token_stats(t, &dataset.lines, options));
    let pairs = tokenized.as_ref().filter(|_| dataset.format == Format::Preference).map(|t| {
        let pairs: Vec<TokenizedPair> = t
            .iter()
            .filter_map(|r| match r.as_deref() {
                Ok([chosen, rejected]) => Some(TokenizedPair { chosen: chosen.clone(), rejected: rejected.clone() }),
                _ => None,
            })
            .collect();
        pair_stats(&pairs, &PairLimits { max_prompt_length: options.max_prompt_length, max_length: options.max_seq_len })
    });
    let labels = label_stats(dataset, options);
    let identical_pairs = dataset.samples.iter().filter(|s| matches!(s, Sample::Preference(p) if p.chosen == p.rejected)).count();

    let mut warnings = Vec::new();
    if duplicates > 0 {
        warnings.push(format!("{duplicates} duplicate sample(s)"));
    }
    if let Some(t) = &tokens {
        if t.over_max_length > 0 {
            warnings.push(format!("{} sequence(s) longer than {} tokens will be truncated", t.over_max_length, t.max_seq_len));
        }
        if !t.failed.is_empty() {
            let (line, reason) = &t.failed[0];
            warnings.push(format!("{} sample(s) cannot be tokenized (line {line}: {reason})", t.failed.len()));
        }
    }
    if identical_pairs > 0 {
        warnings.push(format!("{identical_pairs} pair(s) with identical chosen and rejected outputs (they teach nothing)"));
    }
    if let Some(line) = pairs.as_ref().and_then(|p| p.truncation.summary(&p.limits)) {
        warnings.push(line);
    }
    if let Some(l) = labels.as_ref().filter(|l| l.imbalanced) {
        warnings.push(format!(
            "labels are imbalanced: most/least frequent = {:.1} (threshold {})",
            l.imbalance_ratio, l.imbalance_threshold
        ));
    }
    DatasetStats {
        path: dataset.path.display().to_string(),
        format: dataset.format,
        samples: dataset.len(),
        role_counts,
        duplicates,
        duplicate_examples,
        tokens,
        labels,
        identical_pairs,
        pairs,
        warnings,
    }
}

fn find_duplicates(dataset: &Dataset) -> (usize, Vec<(usize, usize)>) {
    // Compare the parsed samples (so key order and whitespace in the JSON do not matter).
    let keys: Vec<String> = dataset.samples.par_iter().map(|s| serde_json::to_string(s).unwrap_or_default()).collect();
    let mut first_line: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
    let mut count = 0;
    let mut examples = Vec::new();
    for (key, &line) in keys.iter().zip(&dataset.lines) {
        match first_line.get(key.as_str()) {
            Some(&first) => {
                count += 1;
                if examples.len() < 10 {
                    examples.push((line, first));
                }
            }
            None => {
                first_line.insert(key, line);
            }
        }
    }
    (count, examples)
}

/// Every sample's token sequences (two for a preference pair), or why it failed.
fn tokenize_all(dataset: &Dataset, tokenizer: &Tokenizer, template: &ChatTemplate) -> Vec<Result<Vec<TokenizedSample>, String>> {
    dataset
        .samples
        .par_iter()
        .map(|sample| -> Result<Vec<TokenizedSample>, String> {
            match sample {
                Sample::Chat(c) => tokenize_chat_with_tools(tokenizer, template, &c.messages, c.tools.as_ref())
                    .map(|t| vec![t])
                    .map_err(|e| e.to_string()),
                Sample::Preference(p) => {
                    tokenize_preference(tokenizer, template, p).map(|t| vec![t.chosen, t.rejected]).map_err(|e| e.to_string())
                }
                Sample::Prompts(p) => tokenize_prompt(tokenizer, template, &p.messages, p.tools.as_ref())
                    .map(|ids| vec![TokenizedSample { loss_mask: vec![0; ids.len()], input_ids: ids }])
                    .map_err(|e| e.to_string()),
            }
        })
        .collect()
}

fn token_stats(per_sample: &[Result<Vec<TokenizedSample>, String>], lines: &[usize], options: &StatsOptions) -> TokenStats {
    let mut lengths = Vec::with_capacity(per_sample.len());
    let mut loss_tokens = 0;
    let mut failed = Vec::new();
    for (result, &line) in per_sample.iter().zip(lines) {
        match result {
            Ok(sequences) => {
                for s in sequences {
                    lengths.push(s.len());
                    loss_tokens += s.loss_tokens();
                }
            }
            Err(reason) => failed.push((line, reason.clone())),
        }
    }
    lengths.sort_unstable();
    let total: usize = lengths.iter().sum();
    let percentile = |p: f64| -> usize {
        if lengths.is_empty() {
            return 0;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * lengths.len() as f64).ceil().max(1.0) as usize;
        lengths[rank.min(lengths.len()) - 1]
    };
    TokenStats {
        sequences: lengths.len(),
        min: lengths.first().copied().unwrap_or(0),
        mean: if lengths.is_empty() { 0.0 } else { total as f64 / lengths.len() as f64 },
        p50: percentile(50.0),
        p95: percentile(95.0),
        max: lengths.last().copied().unwrap_or(0),
        total,
        loss_tokens,
        max_seq_len: options.max_seq_len,
        over_max_length: lengths.iter().filter(|&&l| l > options.max_seq_len).count(),
        failed,
    }
}

fn label_stats(dataset: &Dataset, options: &StatsOptions) -> Option<LabelStats> {
    let labels = dataset.labels();
    if !labels_are_categorical(&labels) {
        return None;
    }
    let source = match dataset.samples.first() {
        Some(Sample::Chat(c)) if c.ground_truth.is_none() => "final assistant message",
        _ => "ground_truth",
    };
    let mut counts: HashMap<String, usize> = HashMap::new();
    for label in labels.into_iter().flatten() {
        *counts.entry(label).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let most = counts.first().map_or(0, |c| c.1) as f64;
    let least = counts.last().map_or(0, |c| c.1).max(1) as f64;
    let imbalance_ratio = most / least;
    Some(LabelStats {
        source,
        counts,
        imbalance_ratio,
        imbalance_threshold: options.imbalance_threshold,
        imbalanced: imbalance_ratio > options.imbalance_threshold,
    })
}
