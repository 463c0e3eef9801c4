//! Preference pairs as tokens: the two sequences of a pair, TRL's truncation rules, and
//! a loader that keeps the chosen and rejected sequences of a pair in one batch.
//!
//! The prompt of a sequence is everything before its first loss token (the rendered
//! prompt messages plus the assistant header the template writes before the answer).
//! `max_prompt_length` keeps the END of a longer prompt (the question usually sits at
//! the end of it); `max_length` then caps prompt + completion by cutting the end of the
//! completion. Both follow TRL's `DPOConfig`.
use serde::Serialize;

use crate::batch::{longest_first, Batch, BatchConfig, DataLoader};
use crate::mask::TokenizedSample;
use crate::rng::SplitMix64;

/// The chosen and rejected sequences of one pair (each the prompt + its completion,
/// with the completion's loss mask).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizedPair {
    pub chosen: TokenizedSample,
    pub rejected: TokenizedSample,
}

impl TokenizedPair {
    /// Tokens before the first loss token of each side.
    pub fn prompt_lengths(&self) -> (usize, usize) {
        (prompt_length(&self.chosen), prompt_length(&self.rejected))
    }
    /// Same tokens on both sides: the pair carries no preference.
    pub fn is_identical(&self) -> bool {
        self.chosen.input_ids == self.rejected.input_ids
    }
}

fn prompt_length(s: &TokenizedSample) -> usize {
    s.loss_mask.iter().position(|&m| m != 0).unwrap_or(s.len())
}

/// Where a pair is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PairLimits {
    /// Keep at most this many prompt tokens (the last ones). None = no limit.
    pub max_prompt_length: Option<usize>,
    /// Keep at most this many tokens of prompt + completion (cutting the completion's end).
    pub max_length: usize,
}

/// What [`fit_pairs`] did, for the log and `inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PairTruncation {
    /// Pairs whose prompt lost its start to `max_prompt_length`.
    pub prompts_truncated: usize,
    /// Pairs with a completion cut at `max_length`.
    pub completions_truncated: usize,
    /// Input indices of pairs left without a completion token on a side (dropped).
    pub dropped: Vec<usize>,
}

impl PairTruncation {
    /// One line for the user, or None when nothing was cut.
    pub fn summary(&self, limits: &PairLimits) -> Option<String> {
        if self.prompts_truncated == 0 && self.completions_truncated == 0 && self.dropped.is_empty() {
            return None;
        }
        let prompt_limit = limits.max_prompt_length.map_or("-".to_string(), |p| p.to_string());
        Some(format!(
            "{} pair(s) had the start of the prompt cut (--max-prompt-length {prompt_limit}), {} a completion cut (--max-length {}), {} dropped with no completion token left",
            self.prompts_truncated,
            self.completions_truncated,
            limits.max_length,
            self.dropped.len()
        ))
    }
}

/// Cut one side; returns (prompt cut, completion cut), or None when no completion token
/// is left to predict (a token at position 0 has nothing before it).
fn fit_side(s: &mut TokenizedSample, limits: &PairLimits) -> Option<(bool, bool)> {
    let prompt = prompt_length(s);
    let prompt_cut = limits.max_prompt_length.is_some_and(|p| prompt > p);
    if let Some(p) = limits.max_prompt_length.filter(|_| prompt_cut) {
        s.input_ids.drain(..prompt - p);
        s.loss_mask.drain(..prompt - p);
    }
    let completion_cut = s.len() > limits.max_length;
    s.input_ids.truncate(limits.max_length);
    s.loss_mask.truncate(limits.max_length);
    s.loss_mask.iter().skip(1).any(|&m| m != 0).then_some((prompt_cut, completion_cut))
}

/// Apply `limits` to every pair; pairs with a side left without completion tokens are
/// dropped. Returns the kept pairs, their input indices, and the counts.
pub fn fit_pairs(pairs: Vec<TokenizedPair>, limits: &PairLimits) -> (Vec<TokenizedPair>, Vec<usize>, PairTruncation) {
    let mut kept = Vec::with_capacity(pairs.len());
    let mut indices = Vec::with_capacity(pairs.len());
    let mut t = PairTruncation::default();
    for (i, mut pair) in pairs.into_iter().enumerate() {
        match (fit_side(&mut pair.chosen, limits), fit_side(&mut pair.rejected, limits)) {
            (Some((pc, cc)), Some((pr, cr))) => {
                t.prompts_truncated += usize::from(pc || pr);
                t.completions_truncated += usize::from(cc || cr);
                kept.push(pair);
                indices.push(i);
            }
            _ => t.dropped.push(i),
        }
    }
    (kept, indices, t)
}

/// Lengths of the parts of a set of pairs (`inspect`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairStats {
    pub pairs: usize,
    pub prompt: LengthSummary,
    pub chosen: LengthSummary,
    pub rejected: LengthSummary,
    /// Pairs whose two sequences are the same tokens.
    pub identical: usize,
    pub limits: PairLimits,
    pub truncation: PairTruncation,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthSummary {
    pub min: usize,
    pub mean: f64,
    pub max: usize,
}

impl LengthSummary {
    fn of(lengths: impl Iterator<Item = usize>) -> Self {
        let v: Vec<usize> = lengths.collect();
        let sum: usize = v.iter().sum();
        LengthSummary {
            min: v.iter().copied().min().unwrap_or(0),
            mean: if v.is_empty() { 0.0 } else { sum as f64 / v.len() as f64 },
            max: v.iter().copied().max().unwrap_or(0),
        }
    }
}

/// Prompt and completion lengths (in tokens, before truncation) and what `limits` would cut.
pub fn pair_stats(pairs: &[TokenizedPair], limits: &PairLimits) -> PairStats {
    let prompt = |p: &TokenizedPair| p.prompt_lengths().0;
    let completion = |s: &TokenizedSample| s.len() - prompt_length(s);
    let (_, _, truncation) = fit_pairs(pairs.to_vec(), limits);
    PairStats {
        pairs: pairs.len(),
        prompt: LengthSummary::of(pairs.iter().map(prompt)),
        chosen: LengthSummary::of(pairs.iter().map(|p| completion(&p.chosen))),
        rejected: LengthSummary::of(pairs.iter().map(|p| completion(&p.rejected))),
        identical: pairs.iter().filter(|p| p.is_identical()).count(),
        limits: *limits,
        truncation,
    }
}

/// One micro-batch of `pairs` pairs: rows `0..pairs` are the chosen sequences, rows
/// `pairs..2*pairs` the rejected ones, in the same pair order (TRL's concatenated layout).
#[derive(Debug, Clone, PartialEq)]
pub struct PairBatch {
    pub pairs: usize,
    /// Indices of the pairs (into the loader's pairs), in row order.
    pub pair_indices: Vec<usize>,
    pub rows: Batch,
}

/// Batches of pairs, a pure function of (pairs, batch size, seed, epoch) so a resumed run
/// sees the same batches.
pub struct PairLoader {
    /// The chosen sequences, then the rejected ones (sample `n + i` is pair i's rejected).
    sequences: DataLoader,
    pairs: usize,
    batch_size: usize,
    seed: u64,
}

impl PairLoader {
    /// `pairs` should already be fitted ([`fit_pairs`]).
    pub fn new(pairs: &[TokenizedPair], batch_size: usize, pad_token_id: u32, seed: u64) -> Self {
        let samples: Vec<TokenizedSample> =
            pairs.iter().map(|p| p.chosen.clone()).chain(pairs.iter().map(|p| p.rejected.clone())).collect();
        let max_seq_len = samples.iter().map(TokenizedSample::len).max().unwrap_or(1);
        let config = BatchConfig { batch_size: 1, max_seq_len, packing: false, group_by_length: false, pad_token_id, seed };
        PairLoader { sequences: DataLoader::new(samples, config), pairs: pairs.len(), batch_size: batch_size.max(1), seed }
    }

    pub fn pairs(&self) -> usize {
        self.pairs
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.pairs.div_ceil(self.batch_size)
    }

    /// The batch at data-loader position (epoch, index); None past the epoch's end.
    pub fn batch(&self, epoch: u64, index: usize) -> Option<PairBatch> {
        let mut order: Vec<usize> = (0..self.pairs).collect();
        SplitMix64::derived(self.seed, epoch).shuffle(&mut order);
        // The longest pair (by its longer side) leads the epoch: the first micro-batch is the
        // largest for any batch size, and batch 4 still equals batch 2 x accumulation 2.
        let samples = self.sequences.samples();
        longest_first(&mut order, |p| samples[p].len().max(samples[self.pairs + p].len()));
        order.chunks(self.batch_size).nth(index).map(|chunk| self.collate(chunk))
    }

    /// Every pair once, in file order (evaluation, reference pre-computation).
    pub fn in_order(&self) -> impl Iterator<Item = PairBatch> + '_ {
        let all: Vec<usize> = (0..self.pairs).collect();
        let chunks: Vec<Vec<usize>> = all.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        chunks.into_iter().map(move |c| self.collate(&c))
    }

    fn collate(&self, pair_indices: &[usize]) -> PairBatch {
        let rows: Vec<usize> = pair_indices.iter().copied().chain(pair_indices.iter().map(|&i| self.pairs + i)).collect();
        PairBatch { pairs: pair_indices.len(), pair_indices: pair_indices.to_vec(), rows: self.sequences.collate(&rows) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(prompt: usize, completion: usize, first: u32) -> TokenizedSample {
        let n = prompt + completion;
        TokenizedSample {
            input_ids: (first..first + n as u32).collect(),
            loss_mask: (0..n).map(|i| u8::from(i >= prompt)).collect(),
        }
    }

    #[test]
    fn prompt_keeps_its_end_and_completion_its_start() {
        let pair = TokenizedPair { chosen: side(6, 4, 0), rejected: side(6, 2, 100) };
        let limits = PairLimits { max_prompt_length: Some(3), max_length: 5 };
        let (kept, idx, t) = fit_pairs(vec![pair], &limits);
        assert_eq!(idx, vec![0]);
        assert_eq!(kept[0].chosen.input_ids, vec![3, 4, 5, 6, 7]);
        assert_eq!(kept[0].chosen.loss_mask, vec![0, 0, 0, 1, 1]);
        assert_eq!(kept[0].rejected.input_ids, vec![103, 104, 105, 106, 107]);
        assert_eq!((t.prompts_truncated, t.completions_truncated, t.dropped.len()), (1, 1, 0));
    }

    #[test]
    fn a_pair_without_completion_tokens_is_dropped() {
        let pairs = vec![TokenizedPair { chosen: side(6, 4, 0), rejected: side(2, 2, 0) }, TokenizedPair { chosen: side(1, 2, 0), rejected: side(1, 2, 9) }];
        let (kept, idx, t) = fit_pairs(pairs, &PairLimits { max_prompt_length: None, max_length: 6 });
        assert_eq!((kept.len(), idx, t.dropped), (1, vec![1], vec![0]));
    }

    #[test]
    fn the_largest_pair_batch_comes_first_in_every_epoch() {
        // Pair i's rejected side grows with i, so the largest batch is wherever pair 9 lands.
        let pairs: Vec<TokenizedPair> = (0..10).map(|i| TokenizedPair { chosen: side(2, 3, 0), rejected: side(2, 1 + 2 * i, 50) }).collect();
        let loader = PairLoader::new(&pairs, 2, 0, 11);
        for epoch in 0..5 {
            let batches: Vec<PairBatch> = (0..loader.batches_per_epoch()).map(|i| loader.batch(epoch, i).unwrap()).collect();
            let size = |b: &PairBatch| b.rows.batch_size * b.rows.seq_len;
            assert_eq!(size(&batches[0]), batches.iter().map(size).max().unwrap(), "epoch {epoch}");
            assert!(batches[0].pair_indices.contains(&9), "epoch {epoch}: {:?}", batches[0].pair_indices);
            let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.pair_indices.clone()).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_batch_holds_both_sides_of_each_pair() {
        let pairs: Vec<TokenizedPair> = (0..5).map(|i| TokenizedPair { chosen: side(2, 1 + i, 0), rejected: side(2, 1, 50) }).collect();
        let loader = PairLoader::new(&pairs, 2, 0, 7);
        assert_eq!(loader.batches_per_epoch(), 3);
        let mut seen = Vec::new();
        for i in 0..3 {
            let b = loader.batch(1, i).unwrap();
            assert_eq!(b.rows.batch_size, 2 * b.pairs);
            for (r, &p) in b.pair_indices.iter().enumerate() {
                let t = b.rows.seq_len;
                let chosen_len = b.rows.segment_ids[r * t..(r + 1) * t].iter().filter(|&&s| s != 0).count();
                assert_eq!(chosen_len, pairs[p].chosen.len());
                assert_eq!(b.rows.input_ids[(b.pairs + r) * t], 50);
            }
            seen.extend(b.pair_indices);
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(loader.batch(1, 2), loader.batch(1, 2));
        assert!(loader.batch(1, 3).is_none());
    }
}
