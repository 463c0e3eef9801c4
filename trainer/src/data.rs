//! From a chat JSONL file to token batches on a device: load + validate, render with the
//! model's chat template, tokenize with the loss mask (ARCHITECTURE.md), truncate, batch.
//! Shared by `sft` (train and eval sets) and `eval`.
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use lora_datasets::{
    load_dataset, prepare_samples, tokenize_chat_with_tools, Batch, BatchConfig, DataLoader, Dataset, Format, Sample,
    TokenizedSample,
};
use lora_models::{Model, TokenizerBundle};
use rayon::prelude::*;

/// Load a dataset and insist on the chat format (every problem is reported as FILE:LINE).
pub fn load_chat_dataset(path: &Path) -> Result<Dataset> {
    load_dataset_of(path, Format::Chat, "SFT and eval need chat samples (`{\"messages\": [...]}` with assistant turns)")
}

/// Load a dataset and insist on preference pairs.
pub fn load_preference_dataset(path: &Path) -> Result<Dataset> {
    load_dataset_of(path, Format::Preference, "dpo and orpo need preference pairs (`prompt`/`chosen`/`rejected` or `input`/`preferred_output`/`non_preferred_output`)")
}

fn load_dataset_of(path: &Path, format: Format, need: &str) -> Result<Dataset> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    let ds = load_dataset(path, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    if ds.format != format {
        bail!("{}: this is a {} dataset; {need}", path.display(), ds.format);
    }
    Ok(ds)
}

/// Tokenized samples fitted to the sequence length, with what was cut.
pub struct TokenizedSet {
    pub samples: Vec<TokenizedSample>,
    /// Samples cut at `max_sequence_length` (kept) and dropped (no loss token left).
    pub truncated: usize,
    pub dropped: usize,
    pub tokens: usize,
    pub loss_tokens: usize,
}

/// Render + tokenize every sample. Samples the template or tokenizer reject are reported
/// together as `FILE:LINE: problem`.
pub fn tokenize_dataset(bundle: &TokenizerBundle, ds: &Dataset, max_sequence_length: usize) -> Result<TokenizedSet> {
    let template = crate::chat::template_for(bundle)?;
    let results: Vec<Result<TokenizedSample, String>> = ds
        .samples
        .par_iter()
        .map(|s| match s {
            Sample::Chat(c) => tokenize_chat_with_tools(&bundle.tokenizer, &template, &c.messages, c.tools.as_ref())
                .map_err(|e| format!("{e:#}")),
            other => Err(format!("expected a chat sample, found {}", other.format())),
        })
        .collect();
    let mut samples = Vec::with_capacity(results.len());
    let mut problems = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(t) => samples.push(t),
            Err(e) => problems.push(format!("{}:{}: {e}", ds.path.display(), ds.lines[i])),
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(50);
        bail!("{}\n{}: {n} sample(s) could not be tokenized", problems.join("\n"), ds.path.display());
    }
    let prepared = prepare_samples(samples, max_sequence_length);
    if let Some(w) = prepared.warning(max_sequence_length) {
        tracing::warn!("{}: {w}", ds.path.display());
    }
    if prepared.samples.is_empty() {
        bail!("{}: no sample has a loss token within --max-sequence-length {max_sequence_length}", ds.path.display());
    }
    let tokens = prepared.samples.iter().map(|s| s.len()).sum();
    let loss_tokens = prepared.samples.iter().map(|s| s.loss_tokens()).sum();
    Ok(TokenizedSet { truncated: prepared.truncated, dropped: prepared.dropped.len(), samples: prepared.samples, tokens, loss_tokens })
}

impl TokenizedSet {
    /// Identifies the training data (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.samples)
    }
}

/// FNV-1a over every token id and mask bit, in order: a resumed run refuses data that
/// tokenizes differently.
pub fn fingerprint<'a>(samples: impl IntoIterator<Item = &'a TokenizedSample>) -> String {
    fnv1a(samples.into_iter().flat_map(|s| std::iter::once(s.input_ids.len() as u64).chain(s.input_ids.iter().zip(&s.loss_mask).map(|(&id, &m)| ((id as u64) << 1) | (m != 0) as u64))))
}

/// FNV-1a over the little-endian bytes of `values`, as 16 hex digits.
pub fn fnv1a(values: impl IntoIterator<Item = u64>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in values {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

pub fn pad_token_id(bundle: &TokenizerBundle) -> u32 {
    bundle.eos_token_ids.first().copied().unwrap_or(0)
}

/// A batch as device tensors (`[b, t]`).
pub struct BatchTensors {
    pub input_ids: Tensor,
    pub position_ids: Tensor,
    pub segment_ids: Tensor,
    pub loss_mask: Tensor,
    /// Non-padding tokens and loss tokens in the batch.
    pub tokens: usize,
    pub loss_tokens: usize,
}

pub fn to_tensors(b: &Batch, device: &Device) -> Result<BatchTensors> {
    let shape = (b.batch_size, b.seq_len);
    Ok(BatchTensors {
        input_ids: Tensor::from_slice(&b.input_ids, shape, device)?,
        position_ids: Tensor::from_slice(&b.position_ids, shape, device)?,
        segment_ids: Tensor::from_slice(&b.segment_ids, shape, device)?,
        loss_mask: Tensor::from_slice(&b.loss_mask, shape, device)?,
        tokens: b.segment_ids.iter().filter(|&&s| s != 0).count(),
        loss_tokens: b.loss_tokens,
    })
}

/// Mean loss per loss token over a whole set.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct EvalResult {
    pub eval_loss: f64,
    pub perplexity: f64,
    pub loss_tokens: usize,
}

/// A loader for evaluation: length-grouped (less padding; the sum does not depend on order).
pub fn eval_loader(set: &TokenizedSet, batch_size: usize, max_sequence_length: usize, pad: u32) -> DataLoader {
    DataLoader::new(
        set.samples.clone(),
        BatchConfig { batch_size, max_seq_len: max_sequence_length, packing: false, group_by_length: true, pad_token_id: pad, seed: 0 },
    )
}

/// Sum of per-token losses over every batch of `loader` (dropout off), divided by the
/// number of loss tokens.
pub fn evaluate(model: &Model, loader: &DataLoader) -> Result<EvalResult> {
    model.set_dropout_seed(None);
    // Only the loss value is needed: no graph keeping every activation alive.
    let _inference = model.inference();
    let mut sum = 0.0f64;
    let mut count = 0usize;
    for batch in loader.epoch(0) {
        let t = to_tensors(&batch, model.device())?;
        let hidden = model.forward_hidden(&t.input_ids, &t.position_ids, Some(&t.segment_ids))?;
        let loss = model.loss_sum(&hidden, &t.input_ids, &t.loss_mask)?.detach();
        sum += loss.to_scalar::<f32>().context("eval loss")? as f64;
        count += t.loss_tokens;
    }
    let eval_loss = if count > 0 { sum / count as f64 } else { f64::NAN };
    Ok(EvalResult { eval_loss, perplexity: eval_loss.exp(), loss_tokens: count })
}
