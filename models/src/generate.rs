//! KV-cached batched generation with greedy / temperature / top-k / top-p sampling.
use crate::decoder::KvCache;
use crate::model::Model;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_new_tokens: 128, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct Generated {
    /// New tokens only (the stop token excluded).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl GenerationStats {
    /// New tokens per second of decoding (prefill excluded).
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 { self.generated_tokens as f64 / self.decode_s } else { 0.0 }
    }
}

/// Pick the next token from one row of logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32;
    if p.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
    if p.top_k > 0 {
        idx.truncate(p.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / p.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (n, &pr) in probs.iter().enumerate() {
            acc += pr;
            if acc >= p.top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (n, &pr) in probs.iter().enumerate() {
        r -= pr;
        if r <= 0.0 {
            return idx[n] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// NaN or infinite logits mean the forward pass broke (overflow, a corrupt weight or
/// adapter); sampling from them would return an arbitrary token as if it were valid.
fn check_finite_logits(logits: &[f32], step: usize, row: usize) -> Result<()> {
    if let Some(bad) = logits.iter().find(|v| !v.is_finite()) {
        let what = if bad.is_nan() { "NaN" } else { "infinite" };
        bail!("the model produced {what} logits at step {step} for prompt {row} (step 0 = the first generated token)");
    }
    Ok(())
}

impl Model {
    /// Generate for a batch of prompts of different lengths (left-padded internally).
    pub fn generate(&self, prompts: &[Vec<u32>], params: &SamplingParams, stop_ids: &[u32]) -> Result<Vec<Generated>> {
        Ok(self.generate_with_stats(prompts, params, stop_ids)?.0)
    }

    pub fn generate_with_stats(&self, prompts: &[Vec<u32>], params: &SamplingParams, stop_ids: &[u32]) -> Result<(Vec<Generated>, GenerationStats)> {
        if prompts.is_empty() {
            return Ok((vec![], GenerationStats::default()));
        }
        if prompts.iter().any(|p| p.is_empty()) {
            bail!("cannot generate from an empty prompt");
        }
        // Sampling needs no gradients; without a graph each step's activations are freed.
        let _inference = self.inference();
        let device = self.device().clone();
        let b = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        // Left padding: every row's last prompt token sits at the same column.
        // Segments: 0 for padding, 1 for real tokens; positions restart after padding.
        let mut ids = Vec::with_capacity(b * longest);
        let mut positions = Vec::with_capacity(b * longest);
        let mut segments: Vec<Vec<u32>> = Vec::with_capacity(b);
        for p in prompts {
            let pad = longest - p.len();
            ids.extend(std::iter::repeat(0u32).take(pad).chain(p.iter().copied()));
            positions.extend((0..longest).map(|i| i.saturating_sub(pad) as u32));
            segments.push((0..longest).map(|i| if i < pad { 0 } else { 1 }).collect());
        }
        let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
        // Every position this call can reach, so no decode step reallocates the cache.
        let mut cache = KvCache::with_capacity(longest + params.max_new_tokens);
        let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        let mut out: Vec<Generated> = (0..b).map(|_| Generated { tokens: vec![], finish_reason: FinishReason::Length }).collect();
        let mut done = vec![false; b];
        let mut stats = GenerationStats { prompt_tokens: prompts.iter().map(Vec::len).sum(), ..Default::default() };

        let flat_segments = |segs: &Vec<Vec<u32>>| segs.iter().flatten().copied().collect::<Vec<u32>>();
        let start = std::time::Instant::now();
        let input = Tensor::from_vec(ids, (b, longest), &device)?;
        let mut hidden = self.forward_cached(&input, &positions, &flat_segments(&segments), &mut cache)?;
        stats.prefill_s = start.elapsed().as_secs_f64();
        let decode_start = std::time::Instant::now();
        for step in 0..params.max_new_tokens {
            let t = hidden.dim(1)?;
            let last = hidden.narrow(1, t - 1, 1)?;
            let logits = self.logits(&last)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let mut step_ids = Vec::with_capacity(b);
            for row in 0..b {
                if !done[row] {
                    check_finite_logits(&logits[row], step, row)?;
                }
                let tok = if done[row] { 0 } else { sample(&logits[row], params, &mut rng) };
                if !done[row] {
                    if stop_ids.contains(&tok) {
                        done[row] = true;
                        out[row].finish_reason = FinishReason::Stop;
                    } else {
                        out[row].tokens.push(tok);
                        stats.generated_tokens += 1;
                    }
                }
                step_ids.push(tok);
            }
            if done.iter().all(|d| *d) {
                break;
            }
            for (row, seg) in segments.iter_mut().enumerate() {
                seg.push(if done[row] { 0 } else { 1 });
            }
            let step_pos: Vec<u32> = next_pos.clone();
            next_pos.iter_mut().for_each(|p| *p += 1);
            let input = Tensor::from_vec(step_ids, (b, 1), &device)?;
            hidden = self.forward_cached(&input, &step_pos, &flat_segments(&segments), &mut cache)?;
        }
        stats.decode_s = decode_start.elapsed().as_secs_f64();
        Ok((out, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_top_k_1_is_greedy() {
        let logits = [0.1f32, 3.0, -1.0, 2.9];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(sample(&logits, &SamplingParams::default(), &mut rng), 1);
        let p = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &p, &mut rng), 1);
        }
        let p = SamplingParams { temperature: 1.0, top_p: 0.3, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &p, &mut rng), 1);
        }
    }

    #[test]
    fn non_finite_logits_are_an_error_naming_step_and_row() {
        assert!(check_finite_logits(&[0.1, -3.0, 2.0], 0, 0).is_ok());
        let err = check_finite_logits(&[0.1, f32::NAN, 2.0], 4, 1).unwrap_err().to_string();
        assert!(err.contains("NaN logits at step 4 for prompt 1"), "{err}");
        let err = check_finite_logits(&[f32::INFINITY, 0.0], 0, 2).unwrap_err().to_string();
        assert!(err.contains("infinite logits at step 0 for prompt 2"), "{err}");
    }
}
