//! Preference pairs from a JSONL file to sequence log-probabilities: tokenize (every
//! problem as FILE:LINE), fit to the limits, and score pair batches with the model.
//! Shared by `dpo`, `orpo` and `eval` on a preference file.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use lora_datasets::{fit_pairs, tokenize_preference, Dataset, PairBatch, PairLimits, PairLoader, Sample, TokenizedPair};
use lora_models::{Model, TokenizerBundle};
use rayon::prelude::*;

use crate::engine::InputRows;

/// Tokenized pairs fitted to the limits.
pub struct PairSet {
    pub pairs: Vec<TokenizedPair>,
    /// Source line of each kept pair.
    pub lines: Vec<usize>,
}

impl PairSet {
    /// Identifies the training data: a resumed run refuses pairs that tokenize differently.
    pub fn fingerprint(&self) -> String {
        crate::data::fingerprint(self.pairs.iter().flat_map(|p| [&p.chosen, &p.rejected]))
    }
}

/// Render + tokenize every pair, fit it to `limits`, and say what was cut. Pairs the
/// template rejects are reported together; identical pairs are a warning (they teach
/// nothing, but they are not wrong).
pub fn tokenize_pairs(bundle: &TokenizerBundle, ds: &Dataset, limits: &PairLimits) -> Result<PairSet> {
    let template = crate::chat::template_for(bundle)?;
    let results: Vec<Result<TokenizedPair, String>> = ds
        .samples
        .par_iter()
        .map(|s| match s {
            Sample::Preference(p) => tokenize_preference(&bundle.tokenizer, &template, p).map_err(|e| format!("{e:#}")),
            other => Err(format!("expected a preference pair, found {}", other.format())),
        })
        .collect();
    let mut pairs = Vec::with_capacity(results.len());
    let mut problems = Vec::new();
    for (r, &line) in results.into_iter().zip(&ds.lines) {
        match r {
            Ok(p) => pairs.push(p),
            Err(e) => problems.push(format!("{}:{line}: {e}", ds.path.display())),
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(50);
        bail!("{}\n{}: {n} pair(s) could not be tokenized", problems.join("\n"), ds.path.display());
    }
    let identical: Vec<String> = pairs.iter().zip(&ds.lines).filter(|(p, _)| p.is_identical()).map(|(_, l)| l.to_string()).collect();
    if !identical.is_empty() {
        let shown = identical.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        tracing::warn!("{}: {} pair(s) with identical chosen and rejected sequences (lines {shown}); they teach nothing", ds.path.display(), identical.len());
    }
    let (pairs, kept, truncation) = fit_pairs(pairs, limits);
    if let Some(line) = truncation.summary(limits) {
        tracing::warn!("{}: {line}", ds.path.display());
    }
    if pairs.is_empty() {
        bail!("{}: no pair keeps a completion token within --max-length {}", ds.path.display(), limits.max_length);
    }
    Ok(PairSet { pairs, lines: kept.iter().map(|&i| ds.lines[i]).collect() })
}

/// The rows of a pair batch for the engine.
pub fn pair_rows(b: &PairBatch, through_adapter: bool) -> InputRows {
    let r = &b.rows;
    InputRows {
        batch_size: r.batch_size,
        seq_len: r.seq_len,
        input_ids: r.input_ids.clone(),
        position_ids: r.position_ids.clone(),
        segment_ids: r.segment_ids.clone(),
        through_adapter,
    }
}

/// Completion tokens of each row [2 * pairs] (what a sequence log-prob sums over).
pub fn row_tokens(b: &PairBatch) -> Vec<f64> {
    let t = b.rows.seq_len;
    b.rows.loss_mask.chunks(t.max(1)).map(|row| row.iter().filter(|&&m| m != 0.0).count() as f64).collect()
}

/// Sequence log-probs [2 * pairs] f32 of the rows of `b` (chosen rows, then rejected):
/// the sum over each row's completion tokens of log p(token | everything before it),
/// from the final hidden states `hidden` [2 * pairs, t, h]. Differentiable w.r.t. `hidden`;
/// only the completion positions go through the LM head.
pub fn sequence_logps(model: &Model, b: &PairBatch, hidden: &Tensor) -> Result<Tensor> {
    let (rows, t, h) = hidden.dims3()?;
    let (mut at, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &m) in b.rows.loss_mask.iter().enumerate() {
        // Token i of a row is predicted by the hidden state just before it.
        if m != 0.0 && i % t != 0 {
            at.push((i - 1) as u32);
            targets.push(b.rows.input_ids[i]);
            owner.push(i / t);
        }
    }
    let dev = hidden.device();
    let picked = hidden.reshape((rows * t, h))?.index_select(&Tensor::from_slice(&at, at.len(), dev)?, 0)?;
    let token_logps = model.token_logprobs(&picked, &Tensor::from_slice(&targets, targets.len(), dev)?, 1.0)?;
    // A [rows, n] 0/1 matrix sums each row's tokens in one differentiable product.
    let mut sum = vec![0f32; rows * owner.len()];
    for (n, &r) in owner.iter().enumerate() {
        sum[r * owner.len() + n] = 1.0;
    }
    let sum = Tensor::from_vec(sum, (rows, owner.len()), dev)?;
    Ok(sum.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?)
}

/// Sequence log-probs of every pair of `loader`, with the model as routed now and no
/// autograd graph: `[chosen, rejected]` per pair, in pair order.
pub fn score_pairs(model: &Model, loader: &PairLoader) -> Result<Vec<[f32; 2]>> {
    let _inference = model.inference();
    let mut out = vec![[0f32; 2]; loader.pairs()];
    for b in loader.in_order() {
        let t = crate::data::to_tensors(&b.rows, model.device())?;
        let hidden = model.forward_hidden(&t.input_ids, &t.position_ids, Some(&t.segment_ids))?;
        let logps = sequence_logps(model, &b, &hidden)?.to_dtype(DType::F32)?.to_vec1::<f32>().context("sequence log-probs")?;
        for (k, &p) in b.pair_indices.iter().enumerate() {
            out[p] = [logps[k], logps[b.pairs + k]];
        }
    }
    Ok(out)
}

/// Completion tokens `[chosen, rejected]` of every pair.
pub fn pair_tokens(pairs: &[TokenizedPair]) -> Vec<[f64; 2]> {
    // Token 0 of a sequence is never predicted, so it never counts.
    let count = |s: &lora_datasets::TokenizedSample| s.loss_mask.iter().skip(1).filter(|&&m| m != 0).count() as f64;
    pairs.iter().map(|p| [count(&p.chosen), count(&p.rejected)]).collect()
}

/// [`score_pairs`] with every row routed to the reference: the adapter `adapter`, or no
/// adapter at all (the frozen base).
pub fn reference_scores(model: &Model, loader: &PairLoader, adapter: Option<&str>) -> Result<Vec<[f32; 2]>> {
    let _route = match adapter {
        Some(name) => model.route_all(name)?,
        None => model.adapters_off(),
    };
    score_pairs(model, loader)
}
