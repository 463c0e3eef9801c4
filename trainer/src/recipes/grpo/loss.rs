//! GRPO's clipped surrogate loss per token, as TRL's `GRPOTrainer._compute_loss`
//! (token-level importance sampling), and how each loss type normalises it.
//!
//! Per completion token: ratio = exp(logp - logp_old),
//! loss = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
//!        + beta * (exp(ref - logp) - (ref - logp) - 1)   (k3 KL, when beta > 0).
//! With one iteration per rollout batch, logp_old is logp detached (ratio 1, TRL's
//! shortcut); with more it is the rollout-time log-prob.
//!
//! Normalisation (the engine divides the step's summed micro-losses by [`denominator`]):
//! - `dapo`: sum over the step's tokens / the step's tokens;
//! - `bnpo`: per micro-batch, sum / its tokens; averaged over micro-batches;
//! - `grpo`: per micro-batch, the mean over sequences of each sequence's token mean;
//!   averaged over micro-batches;
//! - `dr_grpo`: per micro-batch, sum / (sequences x max completion length); averaged.
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Dapo,
    Grpo,
    Bnpo,
    #[value(name = "dr_grpo")]
    DrGrpo,
}

/// The loss settings (`--loss-type`, `--epsilon`, `--epsilon-high`, `--beta`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossTerms {
    pub loss_type: LossType,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
    pub max_completion_length: usize,
}

/// Token-level numbers of one micro-batch, as TRL logs them (means over its tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    pub tokens: usize,
    pub clip_ratio_low: f64,
    pub clip_ratio_high: f64,
    pub clip_ratio_region: f64,
    /// Mean k3 KL to the reference (0 without one).
    pub kl: f64,
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
}

/// The micro-batch's share of the step loss (a SUM the engine divides by
/// [`denominator`]), and its token statistics.
pub fn micro_loss(p: &PolicyTokens, terms: &LossTerms) -> Result<(Tensor, LossStats)> {
    let dev = p.logp.device();
    let n: usize = p.lengths.iter().sum();
    if n == 0 {
        return Ok((Tensor::zeros((), candle_core::DType::F32, dev)?, LossStats::default()));
    }
    let adv: Vec<f32> = p.lengths.iter().zip(p.advantages).flat_map(|(&len, &a)| std::iter::repeat_n(a, len)).collect();
    let adv_t = Tensor::from_slice(&adv, n, dev)?;
    let old = match p.old_logp {
        Some(o) => Tensor::from_slice(o, n, dev)?,
        None => p.logp.detach(),
    };
    let ratio = (p.logp - &old)?.exp()?;
    let clipped = ratio.clamp(1.0 - terms.epsilon_low, 1.0 + terms.epsilon_high)?;
    let mut per_token = (ratio.mul(&adv_t)?.minimum(&clipped.mul(&adv_t)?)?.neg())?;
    let mut stats = clip_stats(&ratio.to_vec1::<f32>()?, &adv, terms);
    if terms.beta != 0.0 {
        if let Some(r) = p.ref_logp {
            let diff = (Tensor::from_slice(r, n, dev)? - p.logp)?;
            let kl = ((diff.exp()? - &diff)? - 1.0)?;
            stats.kl = kl.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
            per_token = (per_token + (kl * terms.beta)?)?;
        }
    }
    let weights = Tensor::from_vec(token_weights(terms, p.lengths), n, dev)?;
    Ok(((per_token * weights)?.sum_all()?, stats))
}

/// The weight of each token of a micro-batch in its loss sum.
fn token_weights(terms: &LossTerms, lengths: &[usize]) -> Vec<f32> {
    let n: usize = lengths.iter().sum();
    let seqs = lengths.len().max(1) as f64;
    lengths
        .iter()
        .flat_map(|&len| {
            let w = match terms.loss_type {
                LossType::Dapo => 1.0,
                LossType::Bnpo => 1.0 / n.max(1) as f64,
                LossType::Grpo => 1.0 / (len.max(1) as f64 * seqs),
                LossType::DrGrpo => 1.0 / (seqs * terms.max_completion_length.max(1) as f64),
            };
            std::iter::repeat_n(w as f32, len)
        })
        .collect()
}

/// What the engine divides the step's summed micro-losses by.
pub fn denominator(loss_type: LossType, micro_batches: usize, step_tokens: usize) -> f64 {
    match loss_type {
        LossType::Dapo => step_tokens.max(1) as f64,
        _ => micro_batches.max(1) as f64,
    }
}

/// TRL's clip ratios: a token is clipped low when ratio < 1 - eps_low and A < 0, high
/// when ratio > 1 + eps_high and A > 0.
fn clip_stats(ratio: &[f32], adv: &[f32], terms: &LossTerms) -> LossStats {
    let n = ratio.len().max(1) as f64;
    let (mut low, mut high) = (0usize, 0usize);
    for (&r, &a) in ratio.iter().zip(adv) {
        low += usize::from((r as f64) < 1.0 - terms.epsilon_low && a < 0.0);
        high += usize::from((r as f64) > 1.0 + terms.epsilon_high && a > 0.0);
    }
    LossStats { tokens: ratio.len(), clip_ratio_low: low as f64 / n, clip_ratio_high: high as f64 / n, clip_ratio_region: (low + high) as f64 / n, kl: 0.0 }
}
