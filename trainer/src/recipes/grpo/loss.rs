//! GRPO's policy loss per token, as TRL 1.16's `GRPOTrainer._compute_loss`, every loss
//! type and importance-sampling level it has, and how each loss type normalises it.
//!
//! log_ratio = logp - logp_old per token; the importance weight w is exp(log_ratio) per
//! token (`token`), or exp(mean log_ratio of the sequence) shared by its tokens
//! (`sequence`, GSPO). With one iteration per rollout batch, logp_old is logp detached
//! (w = 1 with gradient, TRL's shortcut); with more it is the rollout-time log-prob.
//! Per token, with A the sequence's advantage:
//! - clipped types (`dapo`, `grpo`, `bnpo`, `dr_grpo`, `luspo`):
//!   -min(w' A, clamp(w, 1 - eps_low, 1 + eps_high) A), w' = min(w, delta) with `--delta`;
//! - `cispo`: -sg(min(w, eps_high)) A logp (the weight clipped, not the update);
//! - `sapo`: -sigmoid(tau (w - 1)) 4 / tau A, tau = the positive or negative temperature
//!   by the sign of A;
//! - `vespo`: -sg(phi) A logp, phi = exp(lambda + k log W - lambda W) of the sequence's
//!   ratio W = exp(sum log_ratio), k and lambda by the sign of A (TRL's gamma weights);
//!
//! then x the high-entropy mask (`top_entropy_quantile` < 1: only tokens whose entropy is
//! at least that quantile of the micro-batch's keep a policy loss), then
//! + beta (exp(ref - logp) - (ref - logp) - 1) (k3 KL, when beta > 0).
//!
//! Normalisation (the engine divides the step's summed micro-losses by [`denominator`]):
//! - `dapo`, `cispo`, `vespo`: sum over the step's tokens / the step's tokens;
//! - `bnpo`: per micro-batch, sum / its tokens; averaged over micro-batches;
//! - `grpo`, `sapo`: per micro-batch, the mean over sequences of each sequence's token
//!   mean; averaged over micro-batches;
//! - `dr_grpo`: per micro-batch, sum / (sequences x max completion length); averaged;
//! - `luspo`: per micro-batch, sum / sequences (each sequence weighted by its length).
use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Dapo,
    Grpo,
    Bnpo,
    #[value(name = "dr_grpo")]
    DrGrpo,
    Cispo,
    Sapo,
    Luspo,
    Vespo,
}

/// Where the importance weight is taken: per token, or one per sequence (GSPO).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    Token,
    Sequence,
}

/// VESPO's gamma weighting: k (power) and lambda (decay), for A >= 0 and A < 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VespoParams {
    pub k_pos: f64,
    pub lambda_pos: f64,
    pub k_neg: f64,
    pub lambda_neg: f64,
}

/// The loss settings (`--loss-type`, `--epsilon`, `--beta`, ...), TRL's defaults in [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossTerms {
    pub loss_type: LossType,
    pub importance_sampling_level: ImportanceSamplingLevel,
    pub epsilon_low: f64,
    /// The upper clip 1 + epsilon_high; for `cispo` the weight's absolute maximum.
    pub epsilon_high: f64,
    /// Two-sided clipping: the unclipped ratio is capped at delta too.
    pub delta: Option<f64>,
    pub beta: f64,
    pub max_completion_length: usize,
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    pub vespo: VespoParams,
    /// 1.0 = every token keeps its policy loss.
    pub top_entropy_quantile: f64,
}

impl Default for LossTerms {
    fn default() -> Self {
        LossTerms {
            loss_type: LossType::Dapo,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            beta: 0.0,
            max_completion_length: 256,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo: VespoParams { k_pos: 2.0, lambda_pos: 3.0, k_neg: 3.0, lambda_neg: 2.0 },
            top_entropy_quantile: 1.0,
        }
    }
}

/// The policy tokens of one micro-batch, flattened sequence by sequence.
pub struct PolicyTokens<'a> {
    /// log p of each token under the policy, `[n]`, with its graph.
    pub logp: &'a Tensor,
    /// Rollout-time log-probs (`None` = one iteration: logp detached).
    pub old_logp: Option<&'a [f32]>,
    /// Reference (adapter-off) log-probs, when beta > 0.
    pub ref_logp: Option<&'a [f32]>,
    /// One advantage per sequence.
    pub advantages: &'a [f32],
    /// Tokens per sequence (0 for a sequence whose loss is masked).
    pub lengths: &'a [usize],
    /// Entropy of the policy at each token (needed when top_entropy_quantile < 1; logged
    /// as `entropy` when given).
    pub entropies: Option<&'a [f32]>,
}

/// The micro-batch's share of the step loss (a SUM the engine divides by
/// [`denominator`]), and TRL's metrics of it under TRL's names (`clip_ratio/low_mean`,
/// `kl`, `cispo_clip_ratio`, ...), each a mean over this micro-batch.
pub fn micro_loss(p: &PolicyTokens, terms: &LossTerms) -> Result<(Tensor, BTreeMap<String, f64>)> {
    let dev = p.logp.device();
    let n: usize = p.lengths.iter().sum();
    if n == 0 {
        return Ok((Tensor::zeros((), DType::F32, dev)?, BTreeMap::new()));
    }
    let per_token_f32 = |v: Vec<f32>| Tensor::from_vec(v, n, dev);
    let adv: Vec<f32> = p.lengths.iter().zip(p.advantages).flat_map(|(&len, &a)| std::iter::repeat_n(a, len)).collect();
    let adv_t = per_token_f32(adv.clone())?;
    let old = match p.old_logp {
        Some(o) => Tensor::from_slice(o, n, dev)?,
        None => p.logp.detach(),
    };
    let log_ratio = (p.logp - &old)?;
    let log_weights = match terms.importance_sampling_level {
        ImportanceSamplingLevel::Token => log_ratio.clone(),
        ImportanceSamplingLevel::Sequence => sequence_means(&log_ratio, p.lengths)?,
    };
    let coef_1 = log_weights.exp()?;
    let coef = coef_1.to_vec1::<f32>()?;
    let mut metrics = BTreeMap::new();

    let mut per_token = match terms.loss_type {
        LossType::Cispo => {
            let scale: Vec<f32> = coef.iter().zip(&adv).map(|(&w, &a)| -(w.min(terms.epsilon_high as f32)) * a).collect();
            let units = Units::new(&coef, &adv, p, terms.importance_sampling_level);
            metrics.insert("cispo_clip_ratio".into(), units.mean(&units.flags(|w, a| w > terms.epsilon_high && a > 0.0)));
            per_token_f32(scale)?.mul(p.logp)?
        }
        LossType::Sapo => {
            let tau: Vec<f32> = adv.iter().map(|&a| if a > 0.0 { terms.sapo_temperature_pos } else { terms.sapo_temperature_neg } as f32).collect();
            let gate_scale: Vec<f32> = tau.iter().zip(&adv).map(|(&t, &a)| -4.0 / t * a).collect();
            let x = ((&coef_1 - 1.0)? * per_token_f32(tau)?)?;
            let sigmoid = (x.neg()?.exp()? + 1.0)?.recip()?;
            (sigmoid * per_token_f32(gate_scale)?)?
        }
        LossType::Vespo => {
            let phi = vespo_weights(&log_ratio.to_vec1::<f32>()?, p.lengths, p.advantages, &terms.vespo);
            metrics.insert("vespo/phi_seq_mean".into(), phi.iter().map(|&x| x as f64).sum::<f64>() / phi.len().max(1) as f64);
            let scale: Vec<f32> = p.lengths.iter().zip(phi.iter().zip(p.advantages)).flat_map(|(&len, (&f, &a))| std::iter::repeat_n(-f * a, len)).collect();
            per_token_f32(scale)?.mul(p.logp)?
        }
        LossType::Dapo | LossType::Grpo | LossType::Bnpo | LossType::DrGrpo | LossType::Luspo => {
            let clipped = coef_1.clamp(1.0 - terms.epsilon_low, 1.0 + terms.epsilon_high)?;
            let (capped, coef) = match terms.delta {
                Some(delta) => (coef_1.minimum(delta)?, coef.iter().map(|&w| w.min(delta as f32)).collect()),
                None => (coef_1.clone(), coef),
            };
            clip_metrics(&mut metrics, &Units::new(&coef, &adv, p, terms.importance_sampling_level), terms);
            capped.mul(&adv_t)?.minimum(&clipped.mul(&adv_t)?)?.neg()?
        }
    };
    if let Some(h) = p.entropies {
        metrics.insert("entropy".into(), h.iter().map(|&x| x as f64).sum::<f64>() / n as f64);
    }
    if terms.top_entropy_quantile < 1.0 {
        let h = p.entropies.ok_or_else(|| anyhow::anyhow!("--top-entropy-quantile needs the policy's token entropies"))?;
        per_token = (per_token * per_token_f32(high_entropy_mask(h, terms.top_entropy_quantile))?)?;
    }
    if terms.beta != 0.0 {
        if let Some(r) = p.ref_logp {
            let diff = (Tensor::from_slice(r, n, dev)? - p.logp)?;
            let kl = ((diff.exp()? - &diff)? - 1.0)?;
            metrics.insert("kl".into(), kl.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum::<f64>() / n as f64);
            per_token = (per_token + (kl * terms.beta)?)?;
        }
    }
    let weights = per_token_f32(token_weights(terms, p.lengths))?;
    Ok(((per_token * weights)?.sum_all()?, metrics))
}

/// Each token's value replaced by the mean over its sequence (GSPO's sequence-level
/// log-weight), with the gradient flowing to every token of the sequence.
fn sequence_means(x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for &len in lengths.iter().filter(|&&l| l > 0) {
        let mean = (x.narrow(0, start, len)?.sum_keepdim(0)? / len as f64)?;
        parts.push(mean.broadcast_as(len)?.contiguous()?);
        start += len;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// What TRL averages a logged ratio flag over: tokens when the importance weights are per
/// token; sequences when they are per sequence (every one: an empty sequence has weight 1).
struct Units {
    weight: Vec<f32>,
    adv: Vec<f32>,
    /// The units of each sequence, for TRL's `masked_seq_mean` (empty sequences left out
    /// at token level: their mean is NaN, which `nanmin`/`nanmax` skip).
    sequences: Vec<std::ops::Range<usize>>,
}

impl Units {
    fn new(weight: &[f32], adv: &[f32], p: &PolicyTokens, level: ImportanceSamplingLevel) -> Self {
        let mut start = 0;
        let mut sequences = Vec::new();
        let (mut w, mut a) = (Vec::new(), Vec::new());
        for (s, (&len, &seq_adv)) in p.lengths.iter().zip(p.advantages).enumerate() {
            match level {
                ImportanceSamplingLevel::Token if len > 0 => sequences.push(start..start + len),
                ImportanceSamplingLevel::Token => {}
                ImportanceSamplingLevel::Sequence => {
                    w.push(if len > 0 { weight[start] } else { 1.0 });
                    a.push(seq_adv);
                    sequences.push(s..s + 1);
                }
            }
            start += len;
        }
        if level == ImportanceSamplingLevel::Token {
            (w, a) = (weight.to_vec(), adv.to_vec());
        }
        Units { weight: w, adv: a, sequences }
    }

    fn flags(&self, f: impl Fn(f64, f32) -> bool) -> Vec<f64> {
        self.weight.iter().zip(&self.adv).map(|(&w, &a)| f64::from(u8::from(f(w as f64, a)))).collect()
    }

    /// TRL's `global_masked_mean`.
    fn mean(&self, flags: &[f64]) -> f64 {
        flags.iter().sum::<f64>() / flags.len().max(1) as f64
    }

    /// TRL's `masked_seq_mean`, one value per sequence.
    fn sequence_means(&self, flags: &[f64]) -> Vec<f64> {
        self.sequences.iter().map(|r| flags[r.clone()].iter().sum::<f64>() / r.len() as f64).collect()
    }
}

/// TRL's clip ratios: a unit is clipped low when w < 1 - eps_low and A < 0, high when
/// w > 1 + eps_high and A > 0 (w after `--delta`'s cap); `_mean` over the units,
/// `low_min` / `high_max` over the sequences' means.
fn clip_metrics(metrics: &mut BTreeMap<String, f64>, units: &Units, terms: &LossTerms) {
    let low = units.flags(|w, a| w < 1.0 - terms.epsilon_low && a < 0.0);
    let high = units.flags(|w, a| w > 1.0 + terms.epsilon_high && a > 0.0);
    let region: Vec<f64> = low.iter().zip(&high).map(|(l, h)| l.max(*h)).collect();
    metrics.insert("clip_ratio/low_mean".into(), units.mean(&low));
    metrics.insert("clip_ratio/high_mean".into(), units.mean(&high));
    metrics.insert("clip_ratio/region_mean".into(), units.mean(&region));
    metrics.insert("clip_ratio/low_min".into(), units.sequence_means(&low).into_iter().fold(f64::INFINITY, f64::min));
    metrics.insert("clip_ratio/high_max".into(), units.sequence_means(&high).into_iter().fold(f64::NEG_INFINITY, f64::max));
}

/// VESPO's per-sequence weight (TRL's `get_gamma_weights`, without a sampler
/// correction): phi = exp(lambda + k log W - lambda W), log W = clamp(sum of the clamped
/// token log-ratios, ln 1e-8, 20); no gradient flows through it.
pub fn vespo_weights(log_ratio: &[f32], lengths: &[usize], advantages: &[f32], v: &VespoParams) -> Vec<f32> {
    let mut start = 0;
    lengths
        .iter()
        .zip(advantages)
        .map(|(&len, &a)| {
            let sum: f32 = log_ratio[start..start + len].iter().map(|&x| x.clamp(-20.0, 20.0)).sum();
            start += len;
            let log_w = sum.clamp(1e-8f32.ln(), 20.0);
            let (k, lambda) = if a >= 0.0 { (v.k_pos, v.lambda_pos) } else { (v.k_neg, v.lambda_neg) };
            let lambda = (lambda as f32).max(1e-4);
            let phi = (lambda + k as f32 * log_w - lambda * log_w.exp()).exp();
            if phi.is_finite() {
                phi
            } else {
                0.0
            }
        })
        .collect()
}

/// 1 for the tokens whose entropy is at least the (1 - quantile) quantile of the
/// micro-batch's token entropies, else 0 (TRL's `get_high_entropy_mask`: torch.quantile's
/// linear interpolation, in f32).
pub fn high_entropy_mask(entropies: &[f32], quantile: f64) -> Vec<f32> {
    let mut sorted = entropies.to_vec();
    sorted.sort_by(f32::total_cmp);
    let q = (1.0 - quantile) as f32;
    let rank = q * (sorted.len() - 1) as f32;
    let below = rank.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let (start, end, w) = (sorted[below], sorted[above], rank - below as f32);
    // torch's lerp: exact at both ends.
    let threshold = if w < 0.5 { start + w * (end - start) } else { end - (end - start) * (1.0 - w) };
    entropies.iter().map(|&h| f32::from(u8::from(h >= threshold))).collect()
}

/// The weight of each token of a micro-batch in its loss sum.
fn token_weights(terms: &LossTerms, lengths: &[usize]) -> Vec<f32> {
    let n: usize = lengths.iter().sum();
    let seqs = lengths.len().max(1) as f64;
    lengths
        .iter()
        .flat_map(|&len| {
            let w = match terms.loss_type {
                LossType::Dapo | LossType::Cispo | LossType::Vespo => 1.0,
                LossType::Bnpo => 1.0 / n.max(1) as f64,
                LossType::Grpo | LossType::Sapo => 1.0 / (len.max(1) as f64 * seqs),
                LossType::DrGrpo => 1.0 / (seqs * terms.max_completion_length.max(1) as f64),
                LossType::Luspo => 1.0 / seqs,
            };
            std::iter::repeat_n(w as f32, len)
        })
        .collect()
}

/// What the engine divides the step's summed micro-losses by.
pub fn denominator(loss_type: LossType, micro_batches: usize, step_tokens: usize) -> f64 {
    match loss_type {
        LossType::Dapo | LossType::Cispo | LossType::Vespo => step_tokens.max(1) as f64,
        _ => micro_batches.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entropy_quantile_keeps_the_top_share() {
        let h = [0.5f32, 0.1, 0.9, 0.3, 0.7];
        assert_eq!(high_entropy_mask(&h, 1.0), vec![1.0; 5]);
        assert_eq!(high_entropy_mask(&h, 0.0), vec![0.0, 0.0, 1.0, 0.0, 0.0], "0 keeps only the highest");
        assert_eq!(high_entropy_mask(&h, 0.4), vec![0.0, 0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn vespo_weight_is_one_at_ratio_one() {
        let v = LossTerms::default().vespo;
        let phi = vespo_weights(&[0.0, 0.0, 0.0], &[2, 1, 0], &[1.0, -1.0, 0.5], &v);
        for f in phi {
            assert!((f - 1.0).abs() < 1e-6);
        }
    }
}
